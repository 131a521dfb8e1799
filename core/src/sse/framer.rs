//! [`Framer`]: cuts a byte stream into whole raw events without interpreting them.

use std::collections::VecDeque;
use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::parser::copy_into;
use super::{BOM, Limits, LineEnds, SseError, known_event_line};

/// Initial capacity of the buffers for frames that span chunks. The two buffers take turns
/// (one holds the frame being collected, the other the last one completed); a frame taken out
/// is split off, and the space is reclaimed once the consumer drops it, so a steady stream
/// allocates at most once per this many bytes of spanning frames kept.
const ARENA: usize = 16 * 1024;

/// One whole event as it appeared in the input: its lines and its terminating blank line,
/// byte for byte. Lent by [`Framer::next_frame`] until the framer is used again; looking at it
/// costs nothing, and [`into_bytes`](Self::into_bytes) keeps it.
pub struct RawEvent<'a> {
    src: Src<'a>,
    /// Where the value of the last `event` field lies in the frame; empty when there is no
    /// such field or its value is empty.
    name: Range<usize>,
}

/// Where a lent frame's bytes are.
enum Src<'a> {
    /// A range of the chunk it lay in.
    Chunk(&'a Bytes, Range<usize>),
    /// All of the framer's buffer for the last frame that spanned chunks.
    Done(&'a mut BytesMut),
    /// Its own bytes (a frame the consumer did not take before the next feed).
    Owned(Bytes),
}

impl RawEvent<'_> {
    /// The raw bytes, terminating blank line included.
    #[must_use]
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        match &self.src {
            Src::Chunk(chunk, range) => &chunk[range.clone()],
            Src::Done(buf) => buf,
            Src::Owned(bytes) => bytes,
        }
    }

    /// Takes the raw bytes out: a slice of the fed chunk when the frame lay inside one, else
    /// the framer's copy of it split off its buffer. Neither copies.
    #[must_use]
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        match self.src {
            Src::Chunk(chunk, range) => chunk.slice(range),
            Src::Done(buf) => buf.split().freeze(),
            Src::Owned(bytes) => bytes,
        }
    }

    /// The value of the event's last `event` field, as the [`Parser`](super::Parser) would
    /// read it (one leading space removed). `None` when there is no such field, when its value
    /// is empty (both mean type `message`), or when it is not valid UTF-8.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        if self.name.is_empty() {
            return None;
        }
        std::str::from_utf8(&self.bytes()[self.name.clone()]).ok()
    }

    /// Whether [`name`](Self::name) is `name`; compares bytes, no UTF-8 check.
    #[must_use]
    #[inline]
    pub fn is_named(&self, name: &str) -> bool {
        !self.name.is_empty() && &self.bytes()[self.name.clone()] == name.as_bytes()
    }
}

impl PartialEq for RawEvent<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes() && self.name() == other.name()
    }
}

impl Eq for RawEvent<'_> {}

/// A frame cut from the last chunk fed, not yet handed out.
#[derive(Debug)]
struct Cut {
    /// Where it lies in `Framer::chunk` (unless it is the spanning frame in `Framer::done`).
    range: Range<usize>,
    name: Range<usize>,
}

/// A complete line as the framer sees it.
enum Line {
    /// The blank line that ends a frame.
    Blank,
    /// An `event` field: the frame range of its value (empty for an empty value).
    Event(Range<usize>),
    /// Anything else.
    Other,
}

impl std::fmt::Debug for RawEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawEvent")
            .field("name", &self.name())
            .field("bytes", &self.bytes().escape_ascii().to_string())
            .finish()
    }
}

/// Cuts a `text/event-stream` byte stream into whole raw events ([`RawEvent`]).
///
/// An event ends with its blank line (the line end of that blank line included), so every
/// blank line ends one frame: a comment block or a lone extra blank line is a frame too. Line
/// ends are CR LF, LF or CR, exactly as for the [`Parser`](super::Parser), so parsing the
/// concatenated frames gives the same events as parsing the input.
///
/// Frames are lent: [`next_frame`](Self::next_frame) hands out a [`RawEvent`] that borrows the
/// framer, so reading a frame's name and bytes costs no reference counting; a consumer that
/// keeps a frame takes it out with [`RawEvent::into_bytes`]. A frame that lies inside one fed
/// chunk is a range of it (the framer holds that chunk until the next feed); only a frame that
/// spans chunks is copied (once). Frames not handed out before the next feed are taken out
/// then, so none is lost however the calls interleave.
///
/// A frame is cut as soon as its blank line is complete: when that blank line ends with a CR
/// that is the last byte of a chunk, an LF at the start of the next chunk completes the CR LF
/// and becomes the first byte of the next frame (the byte stream stays identical; nothing
/// waits for the next chunk).
///
/// ```
/// use bytes::Bytes;
/// use keypool_core::sse::Framer;
///
/// let mut framer = Framer::new();
/// let mut kept = Vec::new();
/// for chunk in [&b"event: ping\ndata: {}\n\nevent: message_st"[..], b"op\ndata: {}\n\n"] {
///     framer.feed(&Bytes::copy_from_slice(chunk));
///     while let Some(frame) = framer.next_frame() {
///         let frame = frame?;
///         if !frame.is_named("ping") {
///             kept.push(frame.into_bytes());
///         }
///     }
/// }
/// assert_eq!(kept, [&b"event: message_stop\ndata: {}\n\n"[..]]);
/// # Ok::<(), keypool_core::sse::SseError>(())
/// ```
///
/// The size limit is [`Limits::max_event`] on the raw size of a frame; past it the framer fails
/// with [`SseError::EventTooLarge`] (terminal, see [`SseError`]).
#[derive(Debug)]
pub struct Framer {
    max_event: usize,
    line_ends: LineEnds,
    /// The current frame's bytes from earlier chunks.
    acc: BytesMut,
    /// Start of the current line, relative to the current frame.
    line_start: usize,
    /// The last chunk ended with CR: an LF at the start of the next one belongs to it.
    skip_lf: bool,
    /// The current frame starts with the LF completing a CR LF of the previous frame.
    lead_lf: bool,
    /// No frame has been emitted yet in this stream (a BOM may start the first line).
    at_stream_start: bool,
    /// Value range of the last `event` field of the current frame (empty: none).
    name: Range<usize>,
    /// The last frame that spanned chunks, once complete.
    done: BytesMut,
    /// The chunk the last feed cut frames from; held only until the next feed.
    chunk: Bytes,
    /// The frames cut by the last feed; `cuts[next_cut..]` are not handed out yet.
    cuts: Vec<Cut>,
    next_cut: usize,
    /// `cuts[0]` is the frame that spanned chunks, whose bytes are all of `done`.
    spanned: bool,
    /// Frames of earlier feeds that were not handed out before the next feed, with their own
    /// bytes; they come before `cuts`.
    owned: VecDeque<(Bytes, Range<usize>)>,
    /// Copies of `feed_slice` input.
    arena: BytesMut,
    error: Option<SseError>,
    failed: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new()
    }
}

impl Framer {
    /// A framer with the default limit (16 MiB per event).
    #[must_use]
    pub fn new() -> Self {
        Self::with_limits(Limits::new())
    }

    /// A framer with the given limits (only [`Limits::max_event`] applies).
    #[must_use]
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            max_event: limits.max_event(),
            line_ends: LineEnds::new(),
            acc: BytesMut::new(),
            line_start: 0,
            skip_lf: false,
            lead_lf: false,
            at_stream_start: true,
            name: 0..0,
            done: BytesMut::new(),
            chunk: Bytes::new(),
            cuts: Vec::new(),
            next_cut: 0,
            spanned: false,
            owned: VecDeque::new(),
            arena: BytesMut::new(),
            error: None,
            failed: false,
        }
    }

    /// Cuts a chunk of the stream. The chunk is borrowed: the framer keeps a handle on it
    /// only when a whole frame lies inside it. Ignored after an error.
    pub fn feed(&mut self, chunk: &Bytes) {
        if self.failed || chunk.is_empty() {
            return;
        }
        self.settle();
        let buf: &[u8] = chunk;
        let mut pos = 0;
        if self.skip_lf {
            self.skip_lf = false;
            if buf[0] == b'\n' {
                // The LF of a CR LF: part of the previous line end.
                pos = 1;
                if self.acc.is_empty() && self.line_start == 0 {
                    self.lead_lf = true;
                }
                self.line_start += 1;
            }
        }
        // Chunk index where the not yet copied part of the current frame starts. Invariant:
        // chunk index `j >= frame_start` is at frame offset `acc.len() + j - frame_start`.
        let mut frame_start = 0;
        if self.line_start < self.acc.len() {
            // A line began in an earlier chunk: finish it in `acc`, where its start is.
            let Some(offset) = self.line_ends.find(&buf[pos..]) else {
                self.hold(buf, 0);
                return;
            };
            let (end, next) = self.line_end(buf, pos + offset);
            if self.acc.len() + next > self.max_event {
                self.fail();
                return;
            }
            // Only an `event` field (or a BOM before the first one) needs the line whole; any
            // other line stays where it is, to be copied with the rest of its frame.
            if matches!(self.acc[self.line_start], b'e' | 0xEF) {
                self.acc.extend_from_slice(&buf[..next]);
                frame_start = next;
                let line_start = self.line_start;
                let line_end = self.acc.len() - (next - end);
                let line = &self.acc[line_start..line_end];
                match self.classify(line, line_start) {
                    Line::Blank => self.emit(chunk, frame_start, next),
                    Line::Event(name) => self.name = name,
                    Line::Other => {}
                }
            }
            pos = next;
        }
        // Every line from here on starts in this chunk.
        while pos < buf.len() {
            // A blank line (every third line of a typical stream) needs no search.
            // Nor does the `event` line of a known type (every third line again).
            let found = match buf[pos] {
                b'\n' | b'\r' => Some(pos),
                b'e' => match known_event_line(&buf[pos..]) {
                    Some((end, _)) => Some(pos + end),
                    None => self.find_line_end(buf, pos),
                },
                _ => self.find_line_end(buf, pos),
            };
            let Some(end) = found else { break };
            let (end, next) = self.line_end(buf, end);
            let frame_len = self.acc.len() + next - frame_start;
            if frame_len > self.max_event {
                self.fail();
                return;
            }
            let line_start = frame_len - (next - pos);
            match self.classify(&buf[pos..end], line_start) {
                Line::Blank => {
                    self.emit(chunk, frame_start, next);
                    frame_start = next;
                }
                Line::Event(name) => self.name = name,
                Line::Other => {}
            }
            pos = next;
        }
        self.line_start = self.acc.len() + pos - frame_start;
        self.hold(buf, frame_start);
    }

    /// The end of the line that starts at `pos`, which is not blank.
    #[inline(always)]
    fn find_line_end(&self, buf: &[u8], pos: usize) -> Option<usize> {
        self.line_ends
            .find(&buf[pos + 1..])
            .map(|offset| pos + 1 + offset)
    }

    /// The line end found at `end` (a CR or LF): returns `(end, next)` where `next` is the
    /// index after the line end. A CR that ends the chunk may be the first half of a CR LF.
    #[inline(always)]
    fn line_end(&mut self, buf: &[u8], end: usize) -> (usize, usize) {
        let mut next = end + 1;
        if buf[end] == b'\r' {
            match buf.get(next) {
                Some(b'\n') => next += 1,
                Some(_) => {}
                None => self.skip_lf = true,
            }
        }
        (end, next)
    }

    /// Queues the current frame, which ends at chunk index `next`.
    #[inline(always)]
    fn emit(&mut self, chunk: &Bytes, frame_start: usize, next: usize) {
        if self.acc.is_empty() {
            if self.chunk.is_empty() {
                self.chunk = chunk.clone();
            }
        } else {
            // The frame spanned chunks (only the first of a feed can): its buffer becomes
            // `done`, and the old `done` (a frame already handed out) is reused.
            self.acc.extend_from_slice(&chunk[frame_start..next]);
            std::mem::swap(&mut self.acc, &mut self.done);
            self.acc.clear();
            self.spanned = true;
        }
        self.cuts.push(Cut {
            range: frame_start..next,
            name: std::mem::take(&mut self.name),
        });
        self.line_start = 0;
        self.lead_lf = false;
        self.at_stream_start = false;
    }

    /// Before a feed: frames of the last one not handed out yet get their own bytes (their
    /// chunk and `done` are about to be reused), and the last chunk is let go.
    fn settle(&mut self) {
        if self.next_cut < self.cuts.len() {
            for (i, cut) in self.cuts.drain(..).enumerate().skip(self.next_cut) {
                let bytes = if i == 0 && self.spanned {
                    self.done.split().freeze()
                } else {
                    self.chunk.slice(cut.range)
                };
                self.owned.push_back((bytes, cut.name));
            }
        }
        self.cuts.clear();
        self.next_cut = 0;
        self.spanned = false;
        if !self.chunk.is_empty() {
            self.chunk = Bytes::new();
        }
    }

    /// Keeps `buf[frame_start..]`, the start of a frame whose end has not arrived, in `acc`.
    fn hold(&mut self, buf: &[u8], frame_start: usize) {
        let rest = buf.len() - frame_start;
        if self.acc.len() + rest > self.max_event {
            self.fail();
            return;
        }
        if rest > 0 {
            if self.acc.capacity() == 0 {
                self.acc = BytesMut::with_capacity(rest.max(ARENA));
            }
            self.acc.extend_from_slice(&buf[frame_start..]);
        }
    }

    /// Cuts a chunk given as a slice; the bytes are copied once into a reused buffer.
    pub fn feed_slice(&mut self, chunk: &[u8]) {
        if self.failed || chunk.is_empty() {
            return;
        }
        let chunk = copy_into(&mut self.arena, chunk);
        self.feed(&chunk);
    }

    /// The next whole event, or the error that stopped the framer (once), or `None` when more
    /// input is needed. The event is lent until the framer is used again.
    #[must_use]
    #[inline]
    pub fn next_frame(&mut self) -> Option<Result<RawEvent<'_>, SseError>> {
        if !self.owned.is_empty() {
            let (bytes, name) = self.owned.pop_front()?;
            return Some(Ok(RawEvent {
                src: Src::Owned(bytes),
                name,
            }));
        }
        let i = self.next_cut;
        let Some(cut) = self.cuts.get(i) else {
            return self.error.take().map(Err);
        };
        let name = cut.name.clone();
        let src = if i == 0 && self.spanned {
            Src::Done(&mut self.done)
        } else {
            Src::Chunk(&self.chunk, cut.range.clone())
        };
        self.next_cut = i + 1;
        Some(Ok(RawEvent { src, name }))
    }

    /// Ends the stream. Returns the bytes after the last whole event (a partial event the
    /// stream was cut in), or `None` if there are none. The LF that completes a CR LF after
    /// the last event does not count as left over. Whole events already cut stay queued. The
    /// framer is then ready for a new stream.
    pub fn finish(&mut self) -> Option<Bytes> {
        let only_lead_lf = self.lead_lf && self.acc.len() == 1;
        let left = if self.acc.is_empty() || only_lead_lf {
            None
        } else {
            Some(self.acc.split().freeze())
        };
        self.acc.clear();
        self.line_start = 0;
        self.skip_lf = false;
        self.lead_lf = false;
        self.at_stream_start = true;
        self.name = 0..0;
        left
    }

    /// Whether the framer stopped on an error (it then ignores input).
    #[must_use]
    pub const fn is_failed(&self) -> bool {
        self.failed
    }

    /// Bytes held for the event in progress (never more than [`Limits::max_event`]).
    #[must_use]
    pub fn buffered_len(&self) -> usize {
        self.acc.len()
    }

    /// What `line` (starting at frame offset `start`, line end excluded) means for framing.
    #[inline(always)]
    fn classify(&self, line: &[u8], start: usize) -> Line {
        let skip = if self.at_stream_start && start == 0 && line.starts_with(BOM) {
            BOM.len()
        } else {
            0
        };
        let line = &line[skip..];
        // Only blank lines and `event` fields matter; any other line costs one comparison.
        let value = match line {
            [] => return Line::Blank,
            [b'e', b'v', b'e', b'n', b't'] => 5,
            [b'e', b'v', b'e', b'n', b't', b':', b' ', ..] => 7,
            [b'e', b'v', b'e', b'n', b't', b':', ..] => 6,
            _ => return Line::Other,
        };
        if value == line.len() {
            return Line::Event(0..0);
        }
        Line::Event(start + skip + value..start + skip + line.len())
    }

    fn fail(&mut self) {
        self.failed = true;
        self.error = Some(SseError::EventTooLarge {
            limit: self.max_event,
        });
        self.acc = BytesMut::new();
        self.arena = BytesMut::new();
        self.name = 0..0;
    }
}
