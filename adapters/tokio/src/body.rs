//! The delivered body and the parsed event stream.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use keypool_core::call::{CallSummary, Outcome};
use keypool_core::client::{AsyncBody, AsyncEvents, BodyError, StreamError};
use keypool_core::sse::Event;

use crate::driver::{Driver, Tokio};

/// A response body that streams from the upstream through the call state machine.
///
/// Implements [`http_body::Body`]; [`Body::next_chunk`] reads it without any body utilities.
/// Dropping it cancels the upstream request (its connection is closed) and marks no key.
#[derive(Debug)]
pub struct Body(pub(crate) AsyncBody<Tokio>);

impl Body {
    pub(crate) fn new(driver: Box<Driver>) -> Self {
        Self(AsyncBody::new(driver))
    }

    /// The key pool id that answered (`None` for BYOK).
    pub fn key(&self) -> Option<keypool_core::KeyId> {
        self.0.key()
    }

    /// How the call ended: `None` while it runs. A body dropped before then ends its call as
    /// [`Outcome::ClientGone`].
    pub fn outcome(&self) -> Option<Outcome> {
        self.0.outcome()
    }

    /// What the call did to get this body: its attempts and the key that answered (the
    /// gateway's request log and metrics read it here).
    pub fn summary(&self) -> CallSummary {
        self.0.summary()
    }

    /// The next chunk of the body: `Ok(None)` at its end. A stream that broke after commit
    /// yields `Err` with the [`CallError`](crate::CallError) and keypool's synthesized `error`
    /// event.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.0.next_chunk().await
    }

    /// Poll form of [`Body::next_chunk`].
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>> {
        self.0.poll_chunk(cx)
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
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The parsed events of a streaming call, as a [`futures_core::Stream`]. Ends after
/// `message_stop`, or with one `Err(StreamError)` when the stream broke after commit.
/// Dropping it cancels the upstream request and marks no key.
#[derive(Debug)]
pub struct EventStream(AsyncEvents<Tokio>);

impl EventStream {
    pub(crate) fn new(events: AsyncEvents<Tokio>) -> Self {
        Self(events)
    }

    /// The key pool id that answered.
    pub fn key(&self) -> Option<keypool_core::KeyId> {
        self.0.key()
    }

    /// What the call did to get this stream: its attempts and the key that answered.
    pub fn summary(&self) -> CallSummary {
        self.0.summary()
    }

    /// The next event, without any stream utilities: `None` at the end.
    pub async fn next_event(&mut self) -> Option<Result<Event, StreamError>> {
        poll_fn(|cx| self.0.poll_event(cx)).await
    }
}

impl futures_core::Stream for EventStream {
    type Item = Result<Event, StreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.poll_event(cx)
    }
}

impl From<Body> for EventStream {
    /// Parses the events of a delivered `text/event-stream` body (for example one from the
    /// [`KeypoolLayer`](crate::KeypoolLayer)).
    fn from(body: Body) -> Self {
        Self(AsyncEvents::new(body.0))
    }
}
