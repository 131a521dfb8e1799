//! [`Encoder`]: events back to `text/event-stream` bytes.

use bytes::{BufMut, Bytes, BytesMut};
use memchr::{memchr, memchr2};

use super::Event;

/// Why an [`Event`] cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The event type contains CR or LF, which would end the `event:` line early.
    #[error("SSE event type contains a line break")]
    NewlineInEventType,
    /// The id contains CR or LF, which would end the `id:` line early.
    #[error("SSE event id contains a line break")]
    NewlineInId,
    /// The id contains U+0000 NULL; a receiver ignores such an `id` field.
    #[error("SSE event id contains a NUL character")]
    NulInId,
}

/// Writes [`Event`]s as `text/event-stream` bytes that a [`Parser`](super::Parser) reads back
/// as the same events.
///
/// - `event:` is written unless the type is `message` (the default);
/// - the data is split at CR LF, LF and CR into one `data:` line per line (a receiver joins
///   them with LF, so CR LF and CR in data come back as LF);
/// - `id:` is written when the event's id differs from the last one this encoder wrote (an
///   event's id is the stream's last event id, which persists from event to event), so an
///   empty id after a non-empty one is written as a bare `id:` line that resets it;
/// - `retry:` is written when the event carries one.
#[derive(Debug, Clone, Default)]
pub struct Encoder {
    last_id: Bytes,
}

impl Encoder {
    /// An encoder for a new stream (last event id empty).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one event to `out`. On error nothing is written.
    pub fn encode(&mut self, event: &Event, out: &mut BytesMut) -> Result<(), EncodeError> {
        if memchr2(b'\r', b'\n', &event.event_type).is_some() {
            return Err(EncodeError::NewlineInEventType);
        }
        if memchr2(b'\r', b'\n', &event.id).is_some() {
            return Err(EncodeError::NewlineInId);
        }
        if memchr(0, &event.id).is_some() {
            return Err(EncodeError::NulInId);
        }
        if &event.event_type[..] != b"message" {
            write_field(out, b"event", &event.event_type);
        }
        if event.id[..] != self.last_id[..] {
            write_field(out, b"id", &event.id);
            self.last_id = event.id.to_bytes();
        }
        if let Some(retry) = event.retry {
            write_field(out, b"retry", retry.to_string().as_bytes());
        }
        let mut data: &[u8] = &event.data;
        loop {
            let Some(end) = memchr2(b'\r', b'\n', data) else {
                write_field(out, b"data", data);
                break;
            };
            write_field(out, b"data", &data[..end]);
            let skip = if data[end] == b'\r' && data.get(end + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            data = &data[end + skip..];
        }
        out.put_u8(b'\n');
        Ok(())
    }

    /// Encodes one event into fresh [`Bytes`].
    pub fn encode_to_bytes(&mut self, event: &Event) -> Result<Bytes, EncodeError> {
        let mut out = BytesMut::with_capacity(event.data.len() + 32);
        self.encode(event, &mut out)?;
        Ok(out.freeze())
    }
}

/// `name: value\n`, or `name:\n` for an empty value. The space is always written before a
/// value, so a value that itself starts with a space keeps it.
fn write_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 3);
    out.put_slice(name);
    out.put_u8(b':');
    if !value.is_empty() {
        out.put_u8(b' ');
        out.put_slice(value);
    }
    out.put_u8(b'\n');
}
