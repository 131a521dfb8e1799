//! Helpers shared by the SSE tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use bytes::Bytes;
use keypool_core::sse::Framer;

/// Every frame the framer has cut so far, taken out with its name.
pub fn take_frames(framer: &mut Framer) -> Vec<(Bytes, Option<String>)> {
    let mut out = Vec::new();
    while let Some(frame) = framer.next_frame() {
        let frame = frame.unwrap();
        let name = frame.name().map(str::to_owned);
        out.push((frame.into_bytes(), name));
    }
    out
}
