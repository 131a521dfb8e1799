//! The loop every client adapter runs, written once: an adapter implements [`Transport`] (start
//! an attempt, report the next input of its exchange, read its clocks) and [`ClientCall`] does
//! the rest — report marks, hand the response head or keypool's error to the caller, pump the
//! body, end the exchange when the call is over, and tell the call when its caller went away.

use std::future::Future;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::{BodyError, ClientError};
use crate::call::{
    Attempt, BodyOutput, Call, CallConfig, CallSummary, Credential, Head, Outcome, Output, Request,
    TransportError,
};
use crate::pool::KeyId;

/// What the current exchange produced: one input of the call.
#[derive(Debug)]
pub enum Io {
    /// The response head.
    Head(StatusCode, HeaderMap),
    /// Body bytes (an empty chunk is fine: it delivers nothing).
    Chunk(Bytes),
    /// The body ended per its HTTP framing.
    End,
    /// The exchange failed. For a `std::io` error, `TransportError::from(error.kind())`.
    Error(TransportError),
    /// The exchange died before its head where the upstream cannot have taken the request up
    /// (a pooled connection it had closed while idle; see [`Call::resend`]): the attempt is
    /// sent once more with [`Transport::resend`]. A second one for the same attempt is the
    /// failure it carries.
    Resend(TransportError),
    /// The deadline the call gave passed before anything else happened.
    TimedOut,
}

/// An adapter's clocks (the core never reads one).
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    /// The monotonic clock: deadlines, cooldowns.
    pub now: fn() -> Instant,
    /// The wall clock: request ids, HTTP-date `retry-after` values.
    pub wall: fn() -> SystemTime,
}

/// How an adapter reaches the upstream: what a client adapter does besides [`ClientCall`].
pub trait Transport {
    /// One upstream exchange: an attempt's request and its response, as far as they got.
    type Exchange;

    /// The adapter's clocks.
    const CLOCKS: Clocks;

    /// Starts an attempt. Its IO may happen here or lazily in `next_io`.
    fn start(&mut self, attempt: Attempt) -> Self::Exchange;

    /// Sends an attempt once more after its exchange reported [`Io::Resend`]; the new exchange
    /// must not report `Resend` again (it would count as its failure). Only transports that
    /// report `Resend` need more than the default, [`start`](Self::start).
    fn resend(&mut self, attempt: Attempt) -> Self::Exchange {
        self.start(attempt)
    }

    /// The call completed with this exchange's body read as far as its framing promised (for
    /// example all of its `content-length`), possibly before the transport reported the end:
    /// finish reading it so that its connection can be reused. The default drops it.
    fn release(&mut self, exchange: Self::Exchange) {
        drop(exchange);
    }
}

/// An async transport: [`ClientCall::response`] and [`ClientCall::next_chunk`] await its IO.
pub trait AsyncTransport: Transport {
    /// The next input of `exchange`, or [`Io::TimedOut`] once `deadline` has passed. Dropping
    /// the future must lose nothing: the next call resumes where this one stopped.
    fn next_io<'a>(
        &'a mut self,
        exchange: &'a mut Self::Exchange,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Io> + Send + 'a;
}

/// A blocking transport: [`ClientCall::response_blocking`] and
/// [`ClientCall::next_chunk_blocking`] block on its IO.
pub trait BlockingTransport: Transport {
    /// The next input of `exchange`, or [`Io::TimedOut`] once `deadline` has passed.
    fn next_io(&mut self, exchange: &mut Self::Exchange, deadline: Option<Instant>) -> Io;
}

/// What the loop does next.
enum Next<R> {
    /// Read the next input of the exchange, until the deadline.
    Wait(Option<Instant>),
    /// Hand this to the caller.
    Ready(R),
}

/// One call driven over an adapter's transport. Dropping it before the call is over tells the
/// call its caller went away ([`Call::handle_caller_gone`]: no key is marked, the outcome is
/// [`Outcome::ClientGone`]) and drops the exchange, which cancels the upstream request.
pub struct ClientCall<T: Transport> {
    call: Call,
    transport: T,
    /// The current exchange: none before the first attempt and once the call is over.
    exchange: Option<T::Exchange>,
    /// Whether the current attempt was sent once more ([`Io::Resend`]).
    resent: bool,
}

impl<T: Transport> ClientCall<T> {
    /// Starts a call (with a fresh request id) over `transport`.
    pub fn new(transport: T, request: Request, credential: Credential, config: &CallConfig) -> Self {
        let call = Call::new_at(request, credential, config, (T::CLOCKS.wall)(), (T::CLOCKS.now)());
        Self {
            call,
            transport,
            exchange: None,
            resent: false,
        }
    }

    /// The call.
    pub fn call(&self) -> &Call {
        &self.call
    }

    /// The pool key of the latest attempt (the one that answered, once there is a response).
    pub fn key(&self) -> Option<KeyId> {
        self.call.key()
    }

    /// What the call has done so far ([`Call::summary`]): final once the head is delivered.
    pub fn summary(&self) -> CallSummary {
        self.call.summary()
    }

    /// How the call ended, once it has ([`Call::outcome`]).
    pub fn outcome(&self) -> Option<Outcome> {
        self.call.outcome()
    }

    /// Drains the call before a head: starts attempts, reports marks.
    fn poll_response(&mut self) -> Next<Result<http::Response<()>, ClientError>> {
        loop {
            match self.call.poll_output() {
                Output::Send(attempt) => {
                    // The previous exchange is over: dropping it closes its connection.
                    self.exchange = None;
                    self.exchange = Some(self.transport.start(attempt));
                    self.resent = false;
                }
                Output::Mark(mark) => self.call.report(&mark),
                Output::Wait(deadline) => return Next::Wait(deadline),
                Output::Head(head) => return Next::Ready(Ok(self.delivered(head))),
                Output::Fail(failure) => {
                    self.exchange = None;
                    return Next::Ready(Err(ClientError::Call(Box::new(failure))));
                }
            }
        }
    }

    /// The delivered response head. What the call did to get it is
    /// [`summary`](Self::summary), which the adapters' bodies carry on; it is not put in the
    /// response's extensions, which would cost every response a map and a box.
    fn delivered(&self, head: Head) -> http::Response<()> {
        let mut response = http::Response::new(());
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        response
    }

    /// Drains the call after the head: the next chunk, or the body's end.
    fn poll_body(&mut self) -> Next<Result<Option<Bytes>, BodyError>> {
        match self.call.poll_body() {
            BodyOutput::Body(bytes) => Next::Ready(Ok(Some(bytes))),
            BodyOutput::Wait(deadline) => Next::Wait(deadline),
            BodyOutput::Abort(abort) => {
                self.exchange = None;
                Next::Ready(Err(BodyError {
                    error: abort.error,
                    event: abort.event,
                }))
            }
            BodyOutput::Done => {
                if let Some(exchange) = self.exchange.take()
                    && self.call.outcome() == Some(Outcome::Complete)
                {
                    self.transport.release(exchange);
                }
                Next::Ready(Ok(None))
            }
        }
    }

    /// The next chunk of the delivered body if the call has it without waiting for its
    /// exchange (a chunk already in hand, or the end), else `None`: then
    /// [`next_chunk`](Self::next_chunk) must wait. Lets a body skip setting up an asynchronous
    /// read when nothing needs to be awaited (for example the end after a whole body).
    pub fn try_next_chunk(&mut self) -> Option<Result<Option<Bytes>, BodyError>> {
        match self.poll_body() {
            Next::Ready(r) => Some(r),
            Next::Wait(_) => None,
        }
    }

    /// Hands an input of the exchange to the call, with the time it arrived.
    fn handle(&mut self, io: Io) {
        let now = (T::CLOCKS.now)();
        match io {
            Io::Head(status, headers) => {
                let wall = (T::CLOCKS.wall)();
                self.call.handle_response_head(status, headers, now, wall);
            }
            Io::Chunk(bytes) => self.call.handle_body(bytes, now),
            Io::End => self.call.handle_body_end(now),
            Io::Error(e) => self.call.handle_transport_error(e, now),
            Io::Resend(e) => match self.call.resend() {
                Some(attempt) if !self.resent => {
                    self.resent = true;
                    self.exchange = None;
                    self.exchange = Some(self.transport.resend(attempt));
                }
                _ => self.call.handle_transport_error(e, now),
            },
            Io::TimedOut => self.call.handle_timeout(now),
        }
    }
}

impl<T: AsyncTransport> ClientCall<T> {
    /// Runs the call to its answer: the delivered response head (read the body with
    /// [`next_chunk`](Self::next_chunk)), or keypool's own error as [`ClientError::Call`].
    pub async fn response(&mut self) -> Result<http::Response<()>, ClientError> {
        self.run(Self::poll_response).await
    }

    /// The next chunk of the delivered body: `Ok(None)` at its end (and ever after), `Err` once
    /// when it broke.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.run(Self::poll_body).await
    }

    async fn run<R>(&mut self, poll: fn(&mut Self) -> Next<R>) -> R {
        loop {
            match poll(self) {
                Next::Ready(r) => return r,
                Next::Wait(deadline) => {
                    let io = match self.exchange.as_mut() {
                        Some(exchange) => self.transport.next_io(exchange, deadline).await,
                        None => Io::Error(TransportError::Eof),
                    };
                    self.handle(io);
                }
            }
        }
    }
}

impl<T: BlockingTransport> ClientCall<T> {
    /// [`response`](Self::response), blocking.
    pub fn response_blocking(&mut self) -> Result<http::Response<()>, ClientError> {
        self.run_blocking(Self::poll_response)
    }

    /// [`next_chunk`](Self::next_chunk), blocking.
    pub fn next_chunk_blocking(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.run_blocking(Self::poll_body)
    }

    fn run_blocking<R>(&mut self, poll: fn(&mut Self) -> Next<R>) -> R {
        loop {
            match poll(self) {
                Next::Ready(r) => return r,
                Next::Wait(deadline) => {
                    let io = match self.exchange.as_mut() {
                        Some(exchange) => self.transport.next_io(exchange, deadline),
                        None => Io::Error(TransportError::Eof),
                    };
                    self.handle(io);
                }
            }
        }
    }
}

impl<T: Transport> Drop for ClientCall<T> {
    fn drop(&mut self) {
        if !self.call.is_done() {
            self.call.handle_caller_gone();
        }
    }
}

impl<T: Transport> std::fmt::Debug for ClientCall<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCall")
            .field("call", &self.call)
            .field("exchanging", &self.exchange.is_some())
            .finish_non_exhaustive()
    }
}
