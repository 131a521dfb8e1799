//! A delivered body, read through its call: as chunks, as bytes (`Read`-style, the way a caller
//! forwards them), and as parsed events. [`AsyncBody`] for async adapters, [`BlockingBody`] for
//! blocking ones; both end the same way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::drive::{AsyncTransport, BlockingTransport, ClientCall};
use super::{BodyError, ClientError, EventAssembler, Step, StreamError};
use crate::call::{CallSummary, Outcome};
use crate::pool::KeyId;
use crate::sse::Event;

/// One read of the next chunk, owning the call while it runs.
type Read<T> = Pin<Box<dyn Future<Output = (Box<ClientCall<T>>, Result<Option<Bytes>, BodyError>)> + Send>>;

/// Where an async body's call is: ready for the next read, or inside the read in progress.
enum Pump<T: AsyncTransport> {
    Idle(Box<ClientCall<T>>),
    Busy(Read<T>),
}

/// A delivered body of an async adapter. Each read owns the call while it runs (so the body
/// can be polled from anywhere, with no borrow of itself); dropping the body mid-read drops
/// the call, which tells it the caller went away.
pub struct AsyncBody<T: AsyncTransport> {
    /// `None` only while switching between idle and busy.
    pump: Option<Pump<T>>,
    /// Bytes taken from a chunk but not yet read by [`poll_read`](Self::poll_read).
    pending: Bytes,
    /// Final once the head is delivered; kept here so that it can be read while a read runs.
    summary: CallSummary,
}

impl<T> AsyncBody<T>
where
    T: AsyncTransport + Send + 'static,
    T::Exchange: Send,
{
    /// The body of a call whose [`response`](ClientCall::response) was delivered.
    pub fn new(call: Box<ClientCall<T>>) -> Self {
        Self {
            summary: call.summary(),
            pump: Some(Pump::Idle(call)),
            pending: Bytes::new(),
        }
    }

    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<KeyId> {
        self.summary.key
    }

    /// What the call did to get this body: its attempts and the key that answered.
    pub fn summary(&self) -> CallSummary {
        self.summary.clone()
    }

    /// How the call ended: `None` while it runs (also while a read is in progress). A body
    /// dropped then ends its call as [`Outcome::ClientGone`].
    pub fn outcome(&self) -> Option<Outcome> {
        match &self.pump {
            Some(Pump::Idle(call)) => call.outcome(),
            Some(Pump::Busy(_)) | None => None,
        }
    }

    /// Whether the body is over: its call ended and every chunk was read.
    pub fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && matches!(&self.pump, Some(Pump::Idle(call)) if call.call().is_done())
    }

    /// The next chunk: `Ok(None)` at the end (and ever after), `Err` once when the body broke.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            match self.pump.take() {
                Some(Pump::Idle(mut call)) => {
                    // Nothing to wait for: no read to set up.
                    if let Some(ready) = call.try_next_chunk() {
                        self.pump = Some(Pump::Idle(call));
                        return Poll::Ready(ready);
                    }
                    self.pump = Some(Pump::Busy(Box::pin(async move {
                        let read = call.next_chunk().await;
                        (call, read)
                    })));
                }
                Some(Pump::Busy(mut read)) => {
                    let Poll::Ready((call, chunk)) = read.as_mut().poll(cx) else {
                        self.pump = Some(Pump::Busy(read));
                        return Poll::Pending;
                    };
                    self.pump = Some(Pump::Idle(call));
                    return Poll::Ready(chunk);
                }
                // Only if a read panicked: the call is gone with it.
                None => return Poll::Ready(Ok(None)),
            }
        }
    }

    /// The next chunk, awaited.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// Reads bytes as a caller forwards them (see [`forwarded`]).
    pub fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.pending.is_empty() {
            let chunk = match self.poll_chunk(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(chunk) => chunk,
            };
            self.pending = forwarded(chunk)?;
        }
        Poll::Ready(Ok(copy_out(&mut self.pending, buf)))
    }

    /// The rest of the body in one buffer.
    pub async fn collect(&mut self) -> Result<Bytes, BodyError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }
}

impl<T: AsyncTransport> std::fmt::Debug for AsyncBody<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("AsyncBody");
        match &self.pump {
            Some(Pump::Idle(call)) => d.field("call", call),
            _ => d.field("call", &"reading"),
        };
        d.field("pending", &self.pending.len())
            .field("key", &self.summary.key)
            .finish()
    }
}

/// A delivered body of a blocking adapter.
pub struct BlockingBody<T: BlockingTransport> {
    call: ClientCall<T>,
    /// Bytes taken from a chunk but not yet read by [`read`](io::Read::read).
    pending: Bytes,
}

impl<T: BlockingTransport> BlockingBody<T> {
    /// The body of a call whose [`response_blocking`](ClientCall::response_blocking) was
    /// delivered.
    pub fn new(call: ClientCall<T>) -> Self {
        Self {
            call,
            pending: Bytes::new(),
        }
    }

    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<KeyId> {
        self.call.key()
    }

    /// What the call did to get this body: its attempts and the key that answered.
    pub fn summary(&self) -> CallSummary {
        self.call.summary()
    }

    /// How the call ended: `None` while it runs. A body dropped then ends its call as
    /// [`Outcome::ClientGone`].
    pub fn outcome(&self) -> Option<Outcome> {
        self.call.outcome()
    }

    /// The next chunk: `Ok(None)` at the end (and ever after), `Err` once when the body broke.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        self.call.next_chunk_blocking()
    }

    /// The rest of the body in one buffer.
    pub fn collect(&mut self) -> Result<Bytes, BodyError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk()? {
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }
}

impl<T: BlockingTransport> io::Read for BlockingBody<T> {
    /// Bytes as a caller forwards them (see [`forwarded`]).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            self.pending = forwarded(self.call.next_chunk_blocking())?;
        }
        Ok(copy_out(&mut self.pending, buf))
    }
}

/// A chunk read as bytes the way a caller forwards them: an event stream that broke ends with
/// keypool's `error` event; a plain body that broke is an `io::Error` wrapping the
/// [`BodyError`]. Empty at the end.
pub fn forwarded(chunk: Result<Option<Bytes>, BodyError>) -> io::Result<Bytes> {
    match chunk {
        Ok(bytes) => Ok(bytes.unwrap_or_default()),
        Err(BodyError {
            event: Some(event), ..
        }) => Ok(event),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// Copies the front of `pending` into `buf`; how many bytes.
fn copy_out(pending: &mut Bytes, buf: &mut [u8]) -> usize {
    let n = buf.len().min(pending.len());
    buf[..n].copy_from_slice(&pending[..n]);
    let _ = pending.split_to(n);
    n
}

/// The parsed events of a delivered event-stream body `B`. End after the upstream's end, or
/// with one `Err(StreamError)` when the stream broke after commit.
#[derive(Debug)]
pub struct Events<B> {
    body: B,
    events: EventAssembler,
}

/// The parsed events of an async adapter's event stream.
pub type AsyncEvents<T> = Events<AsyncBody<T>>;

/// The parsed events of a blocking adapter's event stream: an iterator.
pub type BlockingEvents<T> = Events<BlockingBody<T>>;

impl<T> Events<AsyncBody<T>>
where
    T: AsyncTransport + Send + 'static,
    T::Exchange: Send,
{
    /// Parses the events of `body`.
    pub fn new(body: AsyncBody<T>) -> Self {
        Self {
            body,
            events: EventAssembler::new(),
        }
    }

    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<KeyId> {
        self.body.key()
    }

    /// What the call did to get this stream: its attempts and the key that answered.
    pub fn summary(&self) -> CallSummary {
        self.body.summary()
    }

    /// The next event: `None` at the end.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, StreamError>>> {
        loop {
            match self.events.step() {
                Step::Item(item) => return Poll::Ready(Some(item)),
                Step::End => return Poll::Ready(None),
                Step::NeedBody => match self.body.poll_chunk(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(read) => self.events.handle_body(read),
                },
            }
        }
    }

    /// A streaming call's answer: its events when it is an event stream, else
    /// [`ClientError::Status`] with the whole answer.
    pub async fn from_response(response: http::Response<AsyncBody<T>>) -> Result<Self, ClientError> {
        let (parts, mut body) = response.into_parts();
        if !super::is_event_stream_parts(&parts) {
            let bytes = body.collect().await?;
            return Err(super::status_error(parts, bytes));
        }
        Ok(Self::new(body))
    }
}

impl<T: BlockingTransport> Events<BlockingBody<T>> {
    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<KeyId> {
        self.body.key()
    }

    /// What the call did to get this stream: its attempts and the key that answered.
    pub fn summary(&self) -> CallSummary {
        self.body.summary()
    }

    /// A streaming call's answer: its events when it is an event stream, else
    /// [`ClientError::Status`] with the whole answer.
    pub fn from_response(response: http::Response<BlockingBody<T>>) -> Result<Self, ClientError> {
        let (parts, mut body) = response.into_parts();
        if !super::is_event_stream_parts(&parts) {
            let bytes = body.collect()?;
            return Err(super::status_error(parts, bytes));
        }
        Ok(Self {
            body,
            events: EventAssembler::new(),
        })
    }
}

impl<T: BlockingTransport> Iterator for Events<BlockingBody<T>> {
    type Item = Result<Event, StreamError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.events.step() {
                Step::Item(item) => return Some(item),
                Step::End => return None,
                Step::NeedBody => self.events.handle_body(self.body.next_chunk()),
            }
        }
    }
}

impl<T: BlockingTransport> std::fmt::Debug for BlockingBody<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingBody")
            .field("call", &self.call)
            .field("pending", &self.pending.len())
            .finish()
    }
}
