//! [`Parser`]: the WHATWG event stream interpretation, incremental and bounded.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use memchr::memchr;

use super::{
    ANTHROPIC_EVENT_TYPES, BOM, Event, Limits, LineEnds, MESSAGE, SseError, Text, known_event_line,
    split_field,
};

/// Initial capacity of the buffers that collect copied bytes. They are split into frozen
/// [`Bytes`] and reclaimed once the consumer drops what it was handed, so a steady stream
/// allocates nothing.
const ARENA: usize = 4 * 1024;

/// An incremental `text/event-stream` parser (WHATWG HTML §9.2.6, "Interpreting an event
/// stream").
///
/// Drive it with [`feed`](Self::feed) (or [`feed_slice`](Self::feed_slice)), drain it with
/// [`next_event`](Self::next_event) until `None`, and call [`finish`](Self::finish) when the
/// stream ends. Feeding parses eagerly; the completed events wait in a queue, so the order of
/// `feed` and `next_event` calls does not matter, and any chunking of the same bytes gives the
/// same events.
///
/// The algorithm, as implemented:
/// - the stream is decoded as UTF-8; one leading BOM is stripped; invalid bytes become U+FFFD;
/// - lines end with CR LF, a lone LF, or a lone CR (also when the CR ends one chunk and the LF
///   starts the next);
/// - "If the line is empty (a blank line): Dispatch the event";
/// - "If the line starts with a U+003A COLON character (:): Ignore the line";
/// - "If the line contains a U+003A COLON character (:): Collect the characters on the line
///   before the first U+003A COLON character (:), and let field be that string. Collect the
///   characters on the line after the first U+003A COLON character (:), and let value be that
///   string. If value starts with a U+0020 SPACE character, remove it from value";
/// - "Otherwise, the string is not empty but does not contain a U+003A COLON character (:):
///   Process the field using the whole line as the field name, and the empty string as the
///   field value";
/// - `event` sets the event type buffer, `data` appends the value and an LF to the data
///   buffer, `id` sets the last event ID buffer unless the value contains U+0000 NULL, `retry`
///   sets the reconnection time if the value is only ASCII digits; other fields are ignored;
/// - "Once the end of the file is reached, any pending data must be discarded. (If the file
///   ends in the middle of an event, before the final empty line, the incomplete event is not
///   dispatched.)"
///
/// Errors ([`SseError`]) are terminal: see there.
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    line_ends: LineEnds,
    /// The bytes of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// Length of a prefix of `line` known to be valid UTF-8 (ending at a character boundary).
    line_valid: usize,
    /// The last chunk ended with CR: an LF at the start of the next one belongs to it.
    skip_lf: bool,
    /// Past the point where a BOM could start the stream.
    bom_done: bool,
    /// Number of `data` lines in the data buffer (0: the buffer is the empty string).
    data_lines: usize,
    /// The event being collected: its type (empty: `message`), and its data when the data
    /// buffer is one line sliced out of a fed chunk (`single`). Kept in place, so that
    /// dispatching moves it out in one piece.
    event: Event,
    /// `event.data` holds the data buffer (one sliced line); otherwise `data_acc` does.
    single: bool,
    /// The data buffer otherwise (lines joined with LF, no trailing LF).
    data_acc: BytesMut,
    /// A valid `retry` value seen since the last dispatch.
    event_retry: Option<u64>,
    /// A field line has been processed since the last dispatch (for [`Parser::finish`]).
    in_event: bool,
    /// The last event ID buffer; persists across events.
    last_id: Bytes,
    /// The reconnection time; persists across events.
    retry: Option<u64>,
    /// Copies of `feed_slice` input and of values taken from lines that spanned chunks.
    arena: BytesMut,
    queue: VecDeque<Event>,
    error: Option<SseError>,
    failed: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    /// A parser with the default [`Limits`] (16 MiB line, 16 MiB event).
    #[must_use]
    pub fn new() -> Self {
        Self::with_limits(Limits::new())
    }

    /// A parser with the given limits.
    #[must_use]
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            line_ends: LineEnds::new(),
            line: Vec::new(),
            line_valid: 0,
            skip_lf: false,
            bom_done: false,
            data_lines: 0,
            event: Event::EMPTY,
            single: false,
            data_acc: BytesMut::new(),
            event_retry: None,
            in_event: false,
            last_id: Bytes::new(),
            retry: None,
            arena: BytesMut::new(),
            queue: VecDeque::new(),
            error: None,
            failed: false,
        }
    }

    /// The limits this parser enforces.
    #[must_use]
    pub const fn limits(&self) -> Limits {
        self.limits
    }

    /// Parses a chunk of the stream. The chunk is borrowed: event data that is a single line
    /// inside it is handed out as a slice of it, without copying. Ignored after an error.
    pub fn feed(&mut self, chunk: &Bytes) {
        if self.failed || chunk.is_empty() {
            return;
        }
        let mut pos = 0;
        if !self.bom_done {
            match self.strip_bom(chunk) {
                Some(skip) => pos = skip,
                None => return,
            }
        }
        if self.skip_lf {
            self.skip_lf = false;
            if chunk.get(pos) == Some(&b'\n') {
                pos += 1;
            }
        }
        self.scan(chunk, pos);
    }

    /// Parses a chunk given as a slice; the bytes are copied once into a reused buffer.
    pub fn feed_slice(&mut self, chunk: &[u8]) {
        if self.failed || chunk.is_empty() {
            return;
        }
        let chunk = copy_into(&mut self.arena, chunk);
        self.feed(&chunk);
    }

    /// The next dispatched event, or the error that stopped the parser (once), or `None` when
    /// more input is needed.
    #[must_use]
    #[inline]
    pub fn next_event(&mut self) -> Option<Result<Event, SseError>> {
        if let Some(event) = self.queue.pop_front() {
            return Some(Ok(event));
        }
        self.error.take().map(Err)
    }

    /// Ends the stream: an unterminated last event (and any unterminated line) is discarded,
    /// as the WHATWG algorithm requires. Returns `true` if something was discarded, so the
    /// caller knows the stream was cut inside an event.
    ///
    /// Events already dispatched stay queued for [`next_event`](Self::next_event). The parser
    /// is then ready for a new stream (a reconnection): a BOM is accepted again, while the
    /// last event id and the reconnection time are kept, as an `EventSource` keeps them.
    pub fn finish(&mut self) -> bool {
        let discarded = !self.line.is_empty() || self.in_event;
        self.line.clear();
        self.line_valid = 0;
        self.skip_lf = false;
        self.bom_done = false;
        self.reset_event();
        discarded
    }

    /// Whether the parser stopped on an error (it then ignores input).
    #[must_use]
    pub const fn is_failed(&self) -> bool {
        self.failed
    }

    /// Bytes held for the line and the event in progress (never more than the two limits).
    /// Queued, already dispatched events are not counted.
    #[must_use]
    pub fn buffered_len(&self) -> usize {
        self.line.len() + self.data_len()
    }

    /// The last event ID buffer: the value of the most recent valid `id` field (empty if none).
    #[must_use]
    pub fn last_event_id(&self) -> &str {
        super::as_str(&self.last_id)
    }

    /// The reconnection time (ms) set by the most recent valid `retry` field, if any.
    #[must_use]
    pub const fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Consumes the start of a stream that may be a BOM. Returns where parsing continues in
    /// `chunk`, or `None` when all of it was held (a BOM prefix that may still complete).
    fn strip_bom(&mut self, chunk: &[u8]) -> Option<usize> {
        // `self.line` holds only the BOM bytes matched so far (at most two).
        let held = self.line.len();
        let take = (BOM.len() - held).min(chunk.len());
        if chunk[..take] != BOM[held..held + take] {
            // Not a BOM: held bytes stay as the start of the first line.
            self.bom_done = true;
            return Some(0);
        }
        if held + take == BOM.len() {
            self.line.clear();
            self.bom_done = true;
            Some(take)
        } else {
            self.line.extend_from_slice(&chunk[..take]);
            None
        }
    }

    /// Splits `chunk[pos..]` into lines and processes them.
    fn scan(&mut self, chunk: &Bytes, mut pos: usize) {
        let buf: &[u8] = chunk;
        // The chunk's UTF-8 run, validated at most once, from the first line that needs it:
        // blank lines, comments and the known event types need no check, so a chunk holding
        // only those (a line-aligned stream) is never validated.
        let mut run: Option<Utf8Run> = None;
        while pos < buf.len() {
            // A blank line (every third line of a typical stream) needs no search, nor does
            // the `event` line of a known type (every third line again), whose type is then
            // known too.
            let mut known = None;
            let found = match buf[pos] {
                b'\n' | b'\r' => Some(0),
                b'e' => match known_event_line(&buf[pos..]) {
                    Some((offset, name)) => {
                        if self.line.is_empty() && offset <= self.limits.max_line {
                            known = Some(name);
                        }
                        Some(offset)
                    }
                    None => self.line_ends.find(&buf[pos..]),
                },
                _ => self.line_ends.find(&buf[pos..]),
            };
            let Some(offset) = found else {
                let rest = buf.len() - pos;
                if self.line.len() + rest > self.limits.max_line {
                    self.fail(SseError::LineTooLong {
                        limit: self.limits.max_line,
                    });
                    return;
                }
                if self.line_valid == self.line.len() {
                    // The held part grows its known-valid prefix by what the run covers.
                    self.line_valid += Utf8Run::at(&mut run, buf, pos).valid_from(pos, buf.len());
                }
                self.line.extend_from_slice(&buf[pos..]);
                return;
            };
            let end = pos + offset;
            if let Some(name) = known {
                self.in_event = true;
                self.event.event_type = Text::Static(name);
            } else if self.line.is_empty() {
                if offset > self.limits.max_line {
                    self.fail(SseError::LineTooLong {
                        limit: self.limits.max_line,
                    });
                    return;
                }
                let utf8 = || Utf8Run::at(&mut run, buf, pos).covers(pos, end) || is_utf8(&buf[pos..end]);
                self.process_line(Some(chunk), pos, &buf[pos..end], utf8);
            } else {
                if self.line.len() + offset > self.limits.max_line {
                    self.fail(SseError::LineTooLong {
                        limit: self.limits.max_line,
                    });
                    return;
                }
                // The line is [known valid prefix][unknown middle][tail in this chunk]; when
                // the run covers the tail from its first character start, only the middle
                // (at most a character cut by the chunk end, plus its continuation bytes
                // here) needs checking: valid strings joined at character starts are valid.
                // (A held line is only ever the first line of a chunk: `pos` is where the
                // chunk's bytes start, so the run starts there too.)
                let run = Utf8Run::at(&mut run, buf, pos);
                let head = self.line.len();
                let tail_start = run.start.clamp(pos, end);
                self.line.extend_from_slice(&buf[pos..end]);
                let line = std::mem::take(&mut self.line);
                let middle_end = if run.covers(tail_start, end) {
                    head + (tail_start - pos)
                } else {
                    line.len()
                };
                let line_valid = self.line_valid;
                let utf8 = || {
                    let middle = &line[line_valid.min(middle_end)..middle_end];
                    middle.is_empty() || is_utf8(middle)
                };
                self.process_line(None, 0, &line, utf8);
                self.line = line;
                self.line.clear();
                self.line_valid = 0;
            }
            if self.failed {
                return;
            }
            pos = end + 1;
            if buf[end] == b'\r' {
                match buf.get(pos) {
                    Some(b'\n') => pos += 1,
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
        }
    }

    /// Processes one complete line. `src` is the chunk the line lies in (at `base`), or `None`
    /// when the line was assembled from several chunks; `utf8` tells whether it is valid UTF-8
    /// (asked only for the values that are kept).
    fn process_line(&mut self, src: Option<&Bytes>, base: usize, line: &[u8], utf8: impl FnOnce() -> bool) {
        if line.is_empty() {
            self.dispatch();
            return;
        }
        // The two fields that make up nearly every stream are told by their first bytes.
        let (field, value_start) = match line {
            [b'd', b'a', b't', b'a', b':', b' ', ..] => (Field::Data, 6),
            [b'd', b'a', b't', b'a', b':', ..] => (Field::Data, 5),
            [b'e', b'v', b'e', b'n', b't', b':', b' ', ..] => (Field::Event, 7),
            [b'e', b'v', b'e', b'n', b't', b':', ..] => (Field::Event, 6),
            _ => match split_field(line) {
                Some((name, value_start)) => (Field::of(name), value_start),
                None => return, // comment
            },
        };
        let value = &line[value_start..];
        let at = base + value_start;
        match field {
            Field::Data => {
                self.in_event = true;
                self.push_data(src, at, value, utf8());
            }
            Field::Event => {
                self.in_event = true;
                self.event.event_type = match known_event_type(value) {
                    Some(name) => Text::Static(name),
                    None => Text::Shared(self.text(src, at, value, utf8())),
                };
            }
            Field::Id => {
                self.in_event = true;
                if memchr(0, value).is_none() {
                    self.last_id = self.text(src, at, value, utf8());
                }
            }
            Field::Retry => {
                self.in_event = true;
                if !value.is_empty() && value.iter().all(u8::is_ascii_digit) {
                    // Saturates: a value past u64::MAX milliseconds is as good as infinite.
                    let ms = value.iter().fold(0u64, |acc, d| {
                        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
                    });
                    self.retry = Some(ms);
                    self.event_retry = Some(ms);
                }
            }
            Field::Other => {}
        }
    }

    /// "If the field name is `data`: Append the field value to the data buffer, then append a
    /// single U+000A LINE FEED (LF) character to the data buffer." The trailing LF is implied:
    /// the buffer holds the lines joined with LF and `data_lines` counts them.
    fn push_data(&mut self, src: Option<&Bytes>, at: usize, value: &[u8], utf8: bool) {
        let replaced;
        let (value, sliceable) = if utf8 {
            (value, src.is_some())
        } else {
            replaced = String::from_utf8_lossy(value).into_owned();
            (replaced.as_bytes(), false)
        };
        let size = if self.data_lines == 0 {
            value.len()
        } else {
            self.data_len() + 1 + value.len()
        };
        if size > self.limits.max_event {
            self.fail(SseError::EventTooLarge {
                limit: self.limits.max_event,
            });
            return;
        }
        match (self.data_lines, src) {
            (0, Some(chunk)) if sliceable => {
                self.event.data = chunk.slice(at..at + value.len());
                self.single = true;
            }
            _ => {
                ensure_arena(&mut self.data_acc);
                if self.single {
                    self.single = false;
                    self.data_acc
                        .extend_from_slice(&std::mem::take(&mut self.event.data));
                }
                if self.data_lines > 0 {
                    self.data_acc.extend_from_slice(b"\n");
                }
                self.data_acc.extend_from_slice(value);
            }
        }
        self.data_lines += 1;
    }

    /// A field value as UTF-8 [`Bytes`]: a slice of the chunk when possible.
    fn text(&mut self, src: Option<&Bytes>, at: usize, value: &[u8], utf8: bool) -> Bytes {
        if value.is_empty() {
            Bytes::new()
        } else if !utf8 {
            Bytes::from(String::from_utf8_lossy(value).into_owned())
        } else if let Some(chunk) = src {
            chunk.slice(at..at + value.len())
        } else {
            copy_into(&mut self.arena, value)
        }
    }

    /// "Dispatch the event" (WHATWG HTML §9.2.6), steps for web browsers:
    ///
    /// 1. "Set the last event ID string of the event source to the value of the last event ID
    ///    buffer. The buffer does not get reset, so the last event ID string of the event
    ///    source remains set to this value until the next time it is set by the server."
    /// 2. "If the data buffer is an empty string, set the data buffer and the event type buffer
    ///    to the empty string and return."
    /// 3. "If the data buffer's last character is a U+000A LINE FEED (LF) character, then
    ///    remove the last character from the data buffer."
    /// 4. "Let event be the result of creating an event using MessageEvent."
    /// 5. "Initialize event's type attribute to "message", its data attribute to data, [...]
    ///    and its lastEventId attribute to the last event ID string of the event source."
    /// 6. "If the event type buffer has a value other than the empty string, change the type
    ///    of the newly created event to equal the value of the event type buffer."
    /// 7. "Set the data buffer and the event type buffer to the empty string."
    /// 8. "Queue a task which [...] dispatches the newly created event at the EventSource
    ///    object." Here: push it on the queue drained by [`Parser::next_event`].
    fn dispatch(&mut self) {
        // Step 1: `last_id` is both the buffer and the string.
        // Step 2 (a `data_lines` of 0 is the empty data buffer).
        if self.data_lines == 0 {
            self.reset_event();
            return;
        }
        // Step 3: the trailing LF is never stored.
        if !self.single {
            self.event.data = self.data_acc.split().freeze();
        }
        // Steps 4 to 6.
        if self.event.event_type.is_empty() {
            self.event.event_type = Text::Static(MESSAGE);
        }
        // An empty id (most streams) stays the empty `Bytes` of `Event::EMPTY`.
        if !self.last_id.is_empty() {
            self.event.id = Text::Shared(self.last_id.clone());
        }
        self.event.retry = self.event_retry.take();
        // Step 8 (step 7 follows).
        let event = &mut self.event;
        self.queue.push_back(Event {
            event_type: std::mem::take(&mut event.event_type),
            data: std::mem::take(&mut event.data),
            id: std::mem::take(&mut event.id),
            retry: event.retry.take(),
        });
        // Step 7: the type went with the event; the data buffer is emptied here.
        self.clear_data();
    }

    fn reset_event(&mut self) {
        self.event = Event::EMPTY;
        self.clear_data();
    }

    fn clear_data(&mut self) {
        self.data_lines = 0;
        self.single = false;
        self.data_acc.clear();
        self.event_retry = None;
        self.in_event = false;
    }

    fn data_len(&self) -> usize {
        if self.single {
            self.event.data.len()
        } else {
            self.data_acc.len()
        }
    }

    /// Stops the parser for good: records the error and releases every buffer.
    fn fail(&mut self, error: SseError) {
        self.failed = true;
        self.error = Some(error);
        self.reset_event();
        self.line = Vec::new();
        self.line_valid = 0;
        self.data_acc = BytesMut::new();
        self.arena = BytesMut::new();
        self.skip_lf = false;
    }
}

/// The event types of the Anthropic Messages API, handed out as static [`Bytes`] so that the
/// type of a typical event costs no reference counting.
fn known_event_type(value: &[u8]) -> Option<&'static [u8]> {
    ANTHROPIC_EVENT_TYPES.into_iter().find(|name| *name == value)
}

/// The fields the algorithm acts on.
#[derive(Clone, Copy)]
enum Field {
    Data,
    Event,
    Id,
    Retry,
    Other,
}

impl Field {
    fn of(name: &[u8]) -> Self {
        match name {
            b"data" => Self::Data,
            b"event" => Self::Event,
            b"id" => Self::Id,
            b"retry" => Self::Retry,
            _ => Self::Other,
        }
    }
}

/// Gives a collecting buffer its first capacity, so that later reservations reuse it.
fn ensure_arena(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        *buf = BytesMut::with_capacity(ARENA);
    }
}

/// Copies `bytes` into the arena and splits them off as frozen [`Bytes`].
pub(super) fn copy_into(arena: &mut BytesMut, bytes: &[u8]) -> Bytes {
    ensure_arena(arena);
    arena.extend_from_slice(bytes);
    arena.split().freeze()
}

/// Whether `bytes` is valid UTF-8.
fn is_utf8(bytes: &[u8]) -> bool {
    simdutf8::basic::from_utf8(bytes).is_ok()
}

/// The valid UTF-8 run of one chunk, found by a single validation pass: `[start, end)` where
/// `start` skips the (at most three) continuation bytes that finish a character begun in the
/// previous chunk, so `start` is a character start and every line end inside the run is too.
#[derive(Clone, Copy)]
struct Utf8Run {
    start: usize,
    end: usize,
}

impl Utf8Run {
    /// The run of `buf` from `pos`, validated on first use and kept in `slot`.
    fn at(slot: &mut Option<Self>, buf: &[u8], pos: usize) -> Self {
        *slot.get_or_insert_with(|| Self::of(buf, pos))
    }

    fn of(buf: &[u8], pos: usize) -> Self {
        let start = pos
            + buf[pos..]
                .iter()
                .take(3)
                .take_while(|&&b| b & 0xC0 == 0x80)
                .count();
        let rest = &buf[start..];
        // The plain check is the faster one; only a failure asks where the run ends.
        let len = if simdutf8::basic::from_utf8(rest).is_ok() {
            rest.len()
        } else {
            simdutf8::compat::from_utf8(rest).map_or_else(|e| e.valid_up_to(), str::len)
        };
        Self {
            start,
            end: start + len,
        }
    }

    /// Whether `[from, to)`, with `from` at a character start or line start, lies in the run.
    const fn covers(self, from: usize, to: usize) -> bool {
        self.start <= from && to <= self.end
    }

    /// How many bytes from `from` (a line start or line continuation at a character start)
    /// up to `to` are known valid: the run's part of `[from, to)`, if the run contains `from`.
    fn valid_from(self, from: usize, to: usize) -> usize {
        if self.start <= from && from <= self.end {
            to.min(self.end) - from
        } else {
            0
        }
    }
}
