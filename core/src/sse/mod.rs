//! Server-sent events: an incremental parser, a framer that cuts whole raw events, and an encoder.
//!
//! Everything here is sans-IO: bytes go in through `feed`, results come out through a pull
//! method (`next_event` / `next_frame`), and `finish` marks the end of the stream (h11's
//! `receive_data` / `next_event` split). No state lives in a `Stream` impl; an adapter drives
//! these types from whatever IO it has.
//!
//! - [`Parser`] implements the WHATWG *event stream interpretation* algorithm (HTML Living
//!   Standard, "Server-sent events", §9.2.6) in full and yields [`Event`]s.
//! - [`Framer`] only finds event boundaries: it lends [`RawEvent`]s whose bytes are identical
//!   to the input (terminating blank line included) and tells each event's `event:` name, which
//!   is all a relay needs to decide what to hold back or forward; a frame to keep is taken out
//!   as [`bytes::Bytes`] without copying.
//! - [`Encoder`] writes [`Event`]s back out as `text/event-stream` bytes.
//!
//! Both readers are bounded by [`Limits`]: no input makes them buffer more than the configured
//! line and event sizes. Past a limit they fail with a typed [`SseError`] and stop growing.
//!
//! Both take chunks as borrowed [`bytes::Bytes`], which lets event data and frames be handed
//! out without copying: when an event's data is a single line inside one fed chunk,
//! [`Event::data_bytes`] is a slice of that chunk, and so is a frame inside one chunk.
//!
//! The `event` lines of the Anthropic Messages stream (`content_block_delta`, `ping`, ...) are
//! recognised by comparison, without searching for their line end; any other line is found
//! with memchr's vectorised search. This is only a shortcut: every input is read the same way.
//!
//! ```
//! use keypool_core::sse::{Encoder, Event, Framer, Parser};
//!
//! let input = bytes::Bytes::from_static(b"event: ping\ndata: {}\n\n: keep-alive\n\ndata: a\r\ndata: b\r\n\r\n");
//! let mut parser = Parser::new();
//! parser.feed(&input);
//! let first = parser.next_event().unwrap()?;
//! assert_eq!((first.event_type(), first.data()), ("ping", "{}"));
//! let second = parser.next_event().unwrap()?;
//! assert_eq!((second.event_type(), second.data()), ("message", "a\nb"));
//! assert!(parser.next_event().is_none());
//! assert!(!parser.finish(), "nothing was left unterminated");
//!
//! let mut framer = Framer::new();
//! framer.feed(&input);
//! let frame = framer.next_frame().unwrap()?;
//! assert_eq!((frame.name(), &frame.bytes()[..]), (Some("ping"), &b"event: ping\ndata: {}\n\n"[..]));
//!
//! let bytes = Encoder::new().encode_to_bytes(&Event::new("x\ny").with_event_type("delta"))?;
//! assert_eq!(&bytes[..], b"event: delta\ndata: x\ndata: y\n\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod encoder;
mod event;
mod framer;
mod parser;

pub use encoder::{EncodeError, Encoder};
pub use event::Event;
use event::{MESSAGE, Text};
pub use framer::{Framer, RawEvent};
pub use parser::Parser;

// The event types of the Anthropic Messages API, the most frequent first: the parser and the
// framer recognise these `event` lines without searching for their ends.
use crate::profile::anthropic::EVENT_TYPES as ANTHROPIC_EVENT_TYPES;

/// Default for both [`Limits::max_line`] and [`Limits::max_event`]: 16 MiB.
pub const DEFAULT_LIMIT: usize = 16 * 1024 * 1024;

/// Size limits of a [`Parser`] or [`Framer`]; past them the reader fails with an [`SseError`].
///
/// ```
/// let limits = keypool_core::sse::Limits::new().with_max_line(64 * 1024).with_max_event(1 << 20);
/// let parser = keypool_core::sse::Parser::with_limits(limits);
/// # let _ = parser;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    max_line: usize,
    max_event: usize,
}

impl Limits {
    /// Both limits at [`DEFAULT_LIMIT`] (16 MiB).
    #[must_use]
    pub const fn new() -> Self {
        Self {
            max_line: DEFAULT_LIMIT,
            max_event: DEFAULT_LIMIT,
        }
    }

    /// Sets the longest line, in bytes without its line end, that the [`Parser`] accepts.
    #[must_use]
    pub const fn with_max_line(mut self, bytes: usize) -> Self {
        self.max_line = bytes;
        self
    }

    /// Sets the largest event: for the [`Parser`] the size of the data buffer (the data lines
    /// joined with `\n`); for the [`Framer`] the raw size of one event, blank line included.
    #[must_use]
    pub const fn with_max_event(mut self, bytes: usize) -> Self {
        self.max_event = bytes;
        self
    }

    /// The longest accepted line, in bytes without its line end.
    #[must_use]
    pub const fn max_line(&self) -> usize {
        self.max_line
    }

    /// The largest accepted event (see [`Limits::with_max_event`]).
    #[must_use]
    pub const fn max_event(&self) -> usize {
        self.max_event
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a [`Parser`] or [`Framer`] stopped.
///
/// Errors are terminal: the reader hands out the events completed before the error, then the
/// error once, then nothing; it drops its buffers and ignores any further input, so memory never
/// grows past the limit. Resynchronising inside a stream whose framing is already broken would
/// risk forwarding half an event, so a caller that wants to go on starts a new stream (and a new
/// reader).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// A line (without its line end) was longer than [`Limits::max_line`] bytes. Reported as
    /// soon as the buffered part of the line exceeds the limit, before the line end arrives.
    #[error("SSE line longer than the limit of {limit} bytes")]
    LineTooLong {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// An event was larger than [`Limits::max_event`] bytes: for the [`Parser`] its data
    /// buffer, for the [`Framer`] its raw bytes.
    #[error("SSE event larger than the limit of {limit} bytes")]
    EventTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
}

/// `b"\xEF\xBB\xBF"`, the UTF-8 byte order mark; stripped once at the start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Finds the next line end (CR or LF), like `memchr::memchr2(b'\n', b'\r', ..)`.
///
/// On x86_64 with AVX2 (detected once, when the reader is built) it calls memchr's AVX2
/// searcher directly: SSE lines are short (about 20 to 200 bytes), so the per-call CPU
/// dispatch of `memchr2` costs about as much as the search itself; this skips it.
/// Elsewhere it is `memchr2`. Both give the same answer for every input.
#[derive(Debug, Clone, Copy)]
struct LineEnds {
    #[cfg(target_arch = "x86_64")]
    avx2: Option<memchr::arch::x86_64::avx2::memchr::Two>,
}

impl LineEnds {
    fn new() -> Self {
        Self {
            #[cfg(target_arch = "x86_64")]
            avx2: memchr::arch::x86_64::avx2::memchr::Two::new(b'\n', b'\r'),
        }
    }

    /// The index of the first CR or LF in `haystack`.
    #[inline]
    fn find(&self, haystack: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(two) = &self.avx2 {
            return two.find(haystack);
        }
        memchr::memchr2(b'\n', b'\r', haystack)
    }
}

/// When `rest` starts with a whole line `event: <an Anthropic event type>`, the index of its
/// line end (CR or LF) and the type. Nearly every `event` line of a Messages stream is one of
/// these, so its end is known by comparison, without a search: the line has no line end before
/// that index.
#[inline]
fn known_event_line(rest: &[u8]) -> Option<(usize, &'static [u8])> {
    let name = rest.strip_prefix(b"event: ")?;
    ANTHROPIC_EVENT_TYPES
        .into_iter()
        .find(|known| matches!(name.get(known.len()), Some(b'\n' | b'\r')) && name.starts_with(known))
        .map(|known| (b"event: ".len() + known.len(), known))
}

/// Splits a non-blank line into its field name and the start of its value, per WHATWG: the
/// name is everything before the first colon (the whole line if there is none) and one
/// leading space of the value is removed. `None` for a comment (a line starting with `:`).
fn split_field(line: &[u8]) -> Option<(&[u8], usize)> {
    match memchr::memchr(b':', line) {
        Some(0) => None,
        Some(colon) => {
            let value = colon + 1;
            let value = if line.get(value) == Some(&b' ') {
                value + 1
            } else {
                value
            };
            Some((&line[..colon], value))
        }
        None => Some((line, line.len())),
    }
}

/// Borrows bytes known to be UTF-8 as `&str`.
fn as_str(bytes: &[u8]) -> &str {
    // Every `Bytes` passed here was validated or produced by lossy decoding when it was built,
    // so the fallback never happens; it avoids an unwrap.
    std::str::from_utf8(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::LineEnds;

    #[test]
    fn line_ends_agree_with_memchr2() {
        let line_ends = LineEnds::new();
        // Every length up to a few vectors, a line end at every position (or none), both kinds.
        for len in 0..200 {
            for at in 0..=len {
                for end in [b'\n', b'\r'] {
                    let mut haystack = vec![b'a'; len];
                    if at < len {
                        haystack[at] = end;
                    }
                    let want = memchr::memchr2(b'\n', b'\r', &haystack);
                    assert_eq!(line_ends.find(&haystack), want, "len {len}, at {at}");
                    // Not aligned to the start of the allocation either.
                    if len > 0 {
                        let want = memchr::memchr2(b'\n', b'\r', &haystack[1..]);
                        assert_eq!(line_ends.find(&haystack[1..]), want, "len {len}, at {at}, +1");
                    }
                }
            }
        }
    }
}
