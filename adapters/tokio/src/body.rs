//! The delivered body and the parsed event stream.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::future::BoxFuture;
use http_body::{Frame, SizeHint};
use keypool_core::call::{CallError, Output, StreamBreak, TransportError};
use keypool_core::client::{BodyError, EventAssembler, Step, StreamError};
use keypool_core::sse::Event;

use crate::driver::Driver;

/// Where the body's driver is: ready for the next step, or inside the step in progress.
enum Pump {
    Idle(Box<Driver>),
    Busy(BoxFuture<'static, (Box<Driver>, Output)>),
    /// Only while switching between the two.
    Empty,
}

/// A response body that streams from the upstream through the call state machine.
///
/// Implements [`http_body::Body`]; [`Body::next_chunk`] reads it without any body utilities.
/// Dropping it cancels the upstream request (its connection is closed) and marks no key.
pub struct Body {
    pump: Pump,
    done: bool,
}

impl Body {
    pub(crate) fn new(driver: Box<Driver>) -> Self {
        Self {
            pump: Pump::Idle(driver),
            done: false,
        }
    }

    /// The key pool id that answered (`None` for BYOK, or while a read is in progress).
    pub fn key(&self) -> Option<keypool_core::KeyId> {
        match &self.pump {
            Pump::Idle(driver) => driver.call.key(),
            Pump::Busy(_) | Pump::Empty => None,
        }
    }

    /// The next chunk of the body: `Ok(None)` at its end. A stream that broke after commit
    /// yields `Err` with the [`CallError`] and keypool's synthesized `error` event.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// Poll form of [`Body::next_chunk`].
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(None));
            }
            let output = match std::mem::replace(&mut self.pump, Pump::Empty) {
                Pump::Idle(mut driver) => {
                    self.pump = Pump::Busy(Box::pin(async move {
                        let output = driver.next_output().await;
                        (driver, output)
                    }));
                    continue;
                }
                Pump::Busy(mut step) => match step.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.pump = Pump::Busy(step);
                        return Poll::Pending;
                    }
                    Poll::Ready((driver, output)) => {
                        self.pump = Pump::Idle(driver);
                        output
                    }
                },
                Pump::Empty => return Poll::Ready(Ok(None)),
            };
            match output {
                Output::Body(bytes) if bytes.is_empty() => {}
                Output::Body(bytes) => return Poll::Ready(Ok(Some(bytes))),
                Output::Abort(abort) => {
                    self.done = true;
                    return Poll::Ready(Err(BodyError {
                        error: abort.error,
                        event: abort.event,
                    }));
                }
                Output::Done => self.done = true,
                // A second head or a failure cannot follow a delivered head; treat it as a broken body.
                Output::Head(_) | Output::Fail(_) | Output::Send(_) | Output::Mark(_) | Output::Wait(_) => {
                    self.done = true;
                    return Poll::Ready(Err(BodyError {
                        error: CallError::BodyBroken(StreamBreak::Transport(TransportError::Protocol)),
                        event: None,
                    }));
                }
            }
        }
    }

    /// Reads the rest of the body into one buffer.
    pub(crate) async fn collect_bytes(&mut self) -> Result<Bytes, BodyError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Body");
        if let Pump::Idle(driver) = &self.pump {
            d.field("driver", driver);
        }
        d.field("done", &self.done).finish_non_exhaustive()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    /// Data frames; an event stream that broke after commit ends with keypool's `error` event
    /// as its last data frame, a plain body that broke ends with `Err`.
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut().poll_chunk(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => match e.event {
                Some(event) => Poll::Ready(Some(Ok(Frame::data(event)))),
                None => Poll::Ready(Some(Err(e))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The parsed events of a streaming call, as a [`futures_core::Stream`]. Ends after
/// `message_stop`, or with one `Err(StreamError)` when the stream broke after commit.
/// Dropping it cancels the upstream request and marks no key.
#[derive(Debug)]
pub struct EventStream {
    body: Body,
    events: EventAssembler,
}

impl EventStream {
    pub(crate) fn new(body: Body) -> Self {
        Self {
            body,
            events: EventAssembler::new(),
        }
    }

    /// The key pool id that answered.
    pub fn key(&self) -> Option<keypool_core::KeyId> {
        self.body.key()
    }

    /// The next event, without any stream utilities: `None` at the end.
    pub async fn next_event(&mut self) -> Option<Result<Event, StreamError>> {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, StreamError>>> {
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
}

impl futures_core::Stream for EventStream {
    type Item = Result<Event, StreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}

impl From<Body> for EventStream {
    /// Parses the events of a delivered `text/event-stream` body (for example one from the
    /// [`KeypoolLayer`](crate::KeypoolLayer)).
    fn from(body: Body) -> Self {
        Self::new(body)
    }
}
