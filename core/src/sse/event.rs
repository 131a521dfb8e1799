//! [`Event`]: one dispatched server-sent event.

use bytes::Bytes;

use super::as_str;

/// One event as dispatched by the WHATWG algorithm.
///
/// All text is valid UTF-8 (invalid input is decoded with U+FFFD replacement), stored as
/// [`Bytes`] so that cloning an event never copies its payload.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Event {
    /// Never empty: an absent or empty `event` field is stored as `message`.
    pub(super) event_type: Text,
    pub(super) data: Bytes,
    pub(super) id: Text,
    pub(super) retry: Option<u64>,
}

/// The default event type.
pub(super) const MESSAGE: &[u8] = b"message";

/// The text of an event's type or id (valid UTF-8): static for the usual values (the known
/// event types, `message`, no id), so that an event carrying them costs no reference counting.
#[derive(Clone)]
pub(super) enum Text {
    Static(&'static [u8]),
    Shared(Bytes),
}

impl Text {
    pub(super) const EMPTY: Self = Self::Static(b"");

    /// The text as [`Bytes`], without copying.
    pub(super) fn to_bytes(&self) -> Bytes {
        match self {
            Self::Static(text) => Bytes::from_static(text),
            Self::Shared(bytes) => bytes.clone(),
        }
    }
}

impl Default for Text {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl std::ops::Deref for Text {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            Self::Static(text) => text,
            Self::Shared(bytes) => bytes,
        }
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Text {}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl Event {
    /// An event with every field empty (an empty type is not valid outside the parser).
    pub(super) const EMPTY: Self = Self {
        event_type: Text::EMPTY,
        data: Bytes::new(),
        id: Text::EMPTY,
        retry: None,
    };

    /// An event of type `message` with the given data, no id and no retry.
    #[must_use]
    pub fn new(data: impl Into<String>) -> Self {
        Self {
            event_type: Text::Static(MESSAGE),
            data: Bytes::from(data.into()),
            id: Text::EMPTY,
            retry: None,
        }
    }

    /// Sets the event type; an empty one means `message`, as in the WHATWG algorithm.
    #[must_use]
    pub fn with_event_type(mut self, event_type: impl Into<String>) -> Self {
        let event_type = event_type.into();
        self.event_type = if event_type.is_empty() {
            Text::Static(MESSAGE)
        } else {
            Text::Shared(Bytes::from(event_type))
        };
        self
    }

    /// Sets the last event id carried by this event (empty means none).
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Text::Shared(Bytes::from(id.into()));
        self
    }

    /// Sets the reconnection time in milliseconds announced with this event.
    #[must_use]
    pub const fn with_retry(mut self, retry_ms: u64) -> Self {
        self.retry = Some(retry_ms);
        self
    }

    /// The event type: the last `event` field of the event, or `message` if there was none.
    #[must_use]
    pub fn event_type(&self) -> &str {
        as_str(&self.event_type)
    }

    /// The data: the `data` lines joined with `\n`.
    #[must_use]
    pub fn data(&self) -> &str {
        as_str(&self.data)
    }

    /// The data as bytes (guaranteed UTF-8); a slice of the fed chunk when the data was one
    /// line inside one [`Bytes`] chunk.
    #[must_use]
    #[inline]
    pub const fn data_bytes(&self) -> &Bytes {
        &self.data
    }

    /// Takes the data out without copying.
    #[must_use]
    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// The event's last event id (WHATWG `lastEventId`): the value of the most recent valid
    /// `id` field of the stream, in this event or an earlier one; empty if there was none.
    #[must_use]
    pub fn id(&self) -> &str {
        as_str(&self.id)
    }

    /// The reconnection time (ms) of a valid `retry` field inside this event, if any. The
    /// stream-wide value is [`Parser::retry`](super::Parser::retry).
    #[must_use]
    pub const fn retry(&self) -> Option<u64> {
        self.retry
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("event_type", &self.event_type())
            .field("data", &self.data())
            .field("id", &self.id())
            .field("retry", &self.retry)
            .finish()
    }
}
