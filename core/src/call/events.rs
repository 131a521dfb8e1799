//! What the call needs to know about an event of the stream it relays.

use bytes::Bytes;

use crate::profile::{EventRole, Profile};
use crate::sse::{Parser, RawEvent};

/// What the call needs to know about an event: its role per the profile, or blank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Held under the first-content commit point.
    Preamble,
    /// Ends the stream cleanly.
    End,
    Error,
    /// A frame without an `event` field and without data lines (a comment or a stray blank
    /// line): it never decides the commit point on its own.
    Blank,
    Other,
}

pub(super) fn kind(profile: &Profile, frame: &RawEvent) -> Kind {
    if frame.name().is_none() && is_blank_frame(frame.bytes()) {
        return Kind::Blank;
    }
    match profile.event_role(frame) {
        EventRole::Preamble => Kind::Preamble,
        EventRole::End => Kind::End,
        EventRole::Error => Kind::Error,
        EventRole::Content => Kind::Other,
    }
}

/// An event after which the end of the body is a clean end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EndEvent {
    /// The profile's end event: the stream is complete.
    Stop,
    /// An in-band error, relayed to the caller.
    Error,
}

impl Kind {
    pub(super) fn end_event(self) -> Option<EndEvent> {
        match self {
            Self::End => Some(EndEvent::Stop),
            Self::Error => Some(EndEvent::Error),
            Self::Preamble | Self::Blank | Self::Other => None,
        }
    }
}

/// Whether a frame carries no field but comments and blank lines.
fn is_blank_frame(bytes: &[u8]) -> bool {
    bytes
        .split(|&b| b == b'\n' || b == b'\r')
        .all(|line| line.is_empty() || line[0] == b':')
}

/// The data of one raw event (rare path: in-band errors before commit).
pub(super) fn event_data(raw: Bytes) -> Bytes {
    let mut parser = Parser::new();
    parser.feed(&raw);
    let _ = parser.finish();
    match parser.next_event() {
        Some(Ok(event)) => event.into_data(),
        _ => Bytes::new(),
    }
}
