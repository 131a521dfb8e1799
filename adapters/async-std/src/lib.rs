//! # keypool-async-std
//!
//! An async Anthropic client with API-key pool failover for programs on async-std or smol. It
//! is built on their shared foundations — `futures-io` streams, `async-io` timers and reactor,
//! `async-net` TCP, `futures-rustls` TLS — so it runs on either executor (async-std is in
//! maintenance mode and points to smol). Like every keypool adapter it is a thin loop around
//! [`keypool_core::call::Call`]: the core decides which key to use, what an answer means and
//! what the caller sees; this crate moves bytes over HTTP/1.1, reads the clock, and hands the
//! results back.
//!
//! ```no_run
//! use futures_lite::{AsyncReadExt, StreamExt};
//! use keypool_async_std::Client;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::builder()
//!     .keys(["sk-ant-api03-first-key...", "sk-ant-api03-second-key..."])
//!     .build()?;
//! let body = r#"{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hi"}]}"#;
//! let response = client.send(keypool_async_std::messages(body)).await?;
//! let status = response.status();
//! let mut text = String::new();
//! response.into_body().read_to_string(&mut text).await?;
//! println!("{status} {text}");
//!
//! // Streaming: parsed events; a stream that breaks after commit ends in one `Err`.
//! let stream = r#"{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
//! let mut events = client.stream(keypool_async_std::messages(stream)).await?;
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     println!("{}: {}", event.event_type(), event.data());
//! }
//! # Ok(())
//! # }
//! // On async-std: `async_std::task::block_on(run())`; on smol: `smol::block_on(run())`.
//! ```
//!
//! Timeouts come from [`Timeouts`]: `connect` bounds DNS, TCP and TLS of a new connection
//! (it fails as a connect error). The first-byte, idle and first-content hold deadlines belong to
//! the core: when it says `Wait(deadline)`, the next read races an `async_io::Timer` for that
//! instant, and a timer that fires is reported with `handle_timeout(now)`.
//!
//! Connections are HTTP/1.1 with keep-alive: a connection whose response was read to its end
//! goes back to a small idle pool (4 connections, 30 s). A pooled connection the server closed
//! while idle is noticed before reuse (a readable EOF); if writing the request or reading the
//! first byte of the answer still fails on a reused connection, the request is sent once more on
//! a fresh one — inside the transport, before the call sees a head or an error, so no key is
//! spent on a stale socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use futures_io::AsyncRead;
use futures_lite::{AsyncReadExt, AsyncWriteExt, future};
use http::{HeaderMap, Method, StatusCode};
use keypool_core::call::{
    Attempt, Call, CallConfig, Credential, Output, Request, StreamBreak, TransportError,
};
use keypool_core::client::{
    ClientAdapter, ClientSettings, EventAssembler, Step as EventStep, is_event_stream_response, request_id,
};
use keypool_core::sse::Event;
use keypool_core::{KeyId, Pool, Secret};

pub use keypool_core::call::{CallError, CallSummary, CommitPoint, Timeouts};
pub use keypool_core::client::{BodyError, ClientError as Error, DEFAULT_BASE_URL, StreamError};
pub use keypool_core::{Policy, sse};

mod conn;
mod h1;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

use conn::{Conn, Connector};
use h1::{BodyDecoder, Decoded};

/// A `POST /v1/messages` request with a JSON body and `anthropic-version: 2023-06-01`.
pub fn messages(body: impl Into<Bytes>) -> Request {
    Request::post_json("/v1/messages", body)
}

/// Builds a [`Client`]: `Client::builder().keys([...]).base_url(...).config(...).build()`.
pub type ClientBuilder = keypool_core::client::ClientBuilder<Client>;

impl ClientAdapter for Client {
    fn now() -> Instant {
        Instant::now()
    }

    fn from_settings(settings: ClientSettings) -> Result<Self, Error> {
        let up = &settings.upstream;
        let connector = Connector::new(
            up.is_https(),
            up.host(),
            up.port(),
            &settings.root_certs_der,
            settings.config.timeouts.connect,
        )
        .map_err(Error::Config)?;
        Ok(Self {
            inner: Arc::new(Inner {
                connector,
                host_header: up.authority().to_owned(),
                prefix: up.prefix().to_owned(),
                pool: settings.pool,
                config: settings.config,
            }),
        })
    }
}

#[derive(Debug)]
struct Inner {
    connector: Connector,
    host_header: String,
    prefix: String,
    pool: Arc<Pool>,
    config: CallConfig,
}

/// An async client with key failover. Cheap to clone; clones share the pool and connections.
/// Its futures are `Send` and need no particular executor: async-std, smol, or any executor
/// with the `async-io` reactor running (it starts itself on first use).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The shared key pool (for state, snapshots, `enable`).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.inner.pool
    }

    /// Sends a request with failover over the pool and returns the delivered response, whose
    /// body streams from the upstream. keypool's own answers (exhaustion, transport failure,
    /// timeout) are `Err(Error::Call)`. Dropping the future or the body cancels the upstream
    /// request.
    pub async fn send(&self, request: Request) -> Result<http::Response<Body>, Error> {
        self.send_as(request, Credential::Pool(self.inner.pool.clone()))
            .await
    }

    /// Sends a request once with the caller's own key (BYOK); the pool is not touched.
    pub async fn send_byok(&self, request: Request, key: Secret) -> Result<http::Response<Body>, Error> {
        self.send_as(request, Credential::Key(key)).await
    }

    /// Opens a streaming call and returns its parsed events. An answer that is not an event
    /// stream is `Err(Error::Status)` (or `Err(Error::Call)` when keypool answered).
    pub async fn stream(&self, request: Request) -> Result<EventStream, Error> {
        self.stream_as(request, Credential::Pool(self.inner.pool.clone()))
            .await
    }

    /// [`stream`](Self::stream) with the caller's own key (BYOK).
    pub async fn stream_byok(&self, request: Request, key: Secret) -> Result<EventStream, Error> {
        self.stream_as(request, Credential::Key(key)).await
    }

    async fn send_as(&self, request: Request, credential: Credential) -> Result<http::Response<Body>, Error> {
        let mut driver = Box::new(Driver::new(self.inner.clone(), request, credential));
        match driver.next_output().await {
            Output::Head(head) => {
                let key = driver.call.key();
                let mut response = http::Response::new(Body {
                    state: BodyState::Ready(driver),
                    pending: Bytes::new(),
                    key,
                });
                *response.status_mut() = head.status;
                *response.headers_mut() = head.headers;
                Ok(response)
            }
            Output::Fail(failure) => Err(Error::Call(Box::new(failure))),
            other => Err(unexpected(&other)),
        }
    }

    async fn stream_as(&self, request: Request, credential: Credential) -> Result<EventStream, Error> {
        let response = self.send_as(request, credential).await?;
        if !is_event_stream_response(&response) {
            let (parts, mut body) = response.into_parts();
            let mut bytes = Vec::new();
            body.read_to_end(&mut bytes).await?;
            return Err(Error::Status(Box::new(http::Response::from_parts(
                parts,
                Bytes::from(bytes),
            ))));
        }
        Ok(EventStream {
            body: response.into_body(),
            events: EventAssembler::new(),
        })
    }
}

/// One step of the loop, run by a [`Body`] that owns its driver while the step is in flight.
type Step = Pin<Box<dyn Future<Output = (Box<Driver>, Output)> + Send>>;

enum BodyState {
    Ready(Box<Driver>),
    Busy(Step),
    Done,
}

/// A response body that streams from the upstream through the call state machine: a
/// [`Stream`] of chunks, and an [`AsyncRead`] of bytes.
pub struct Body {
    state: BodyState,
    pending: Bytes,
    key: Option<KeyId>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            BodyState::Ready(driver) => format!("{driver:?}"),
            BodyState::Busy(_) => "reading".to_owned(),
            BodyState::Done => "done".to_owned(),
        };
        f.debug_struct("Body")
            .field("state", &state)
            .field("pending", &self.pending.len())
            .field("key", &self.key)
            .finish()
    }
}

impl Body {
    /// The next chunk of the body: `Ok(None)` at its end. A stream that broke after commit
    /// yields `Err` with keypool's synthesized `error` event and the [`CallError`].
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        future::poll_fn(|cx| self.poll_chunk(cx)).await.transpose()
    }

    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<KeyId> {
        self.key
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Some(Ok(std::mem::take(&mut self.pending))));
        }
        loop {
            match std::mem::replace(&mut self.state, BodyState::Done) {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Ready(mut driver) => {
                    self.state = BodyState::Busy(Box::pin(async move {
                        let output = driver.next_output().await;
                        (driver, output)
                    }));
                }
                BodyState::Busy(mut step) => {
                    let Poll::Ready((driver, output)) = step.as_mut().poll(cx) else {
                        self.state = BodyState::Busy(step);
                        return Poll::Pending;
                    };
                    match output {
                        Output::Body(bytes) if bytes.is_empty() => self.state = BodyState::Ready(driver),
                        Output::Body(bytes) => {
                            self.state = BodyState::Ready(driver);
                            return Poll::Ready(Some(Ok(bytes)));
                        }
                        Output::Abort(abort) => {
                            return Poll::Ready(Some(Err(BodyError {
                                error: abort.error,
                                event: abort.event,
                            })));
                        }
                        Output::Done => return Poll::Ready(None),
                        // A second head or a failure cannot follow a delivered head; treat it as a broken body.
                        Output::Head(_)
                        | Output::Fail(_)
                        | Output::Send(_)
                        | Output::Mark(_)
                        | Output::Wait(_) => {
                            return Poll::Ready(Some(Err(BodyError {
                                error: CallError::BodyBroken(StreamBreak::Transport(
                                    TransportError::Protocol,
                                )),
                                event: None,
                            })));
                        }
                    }
                }
            }
        }
    }
}

impl Stream for Body {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_chunk(cx)
    }
}

impl AsyncRead for Body {
    /// Bytes as the caller would forward them: an event stream that broke ends with keypool's
    /// `error` event; a plain body that broke fails with an `io::Error` wrapping [`BodyError`].
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match this.poll_chunk(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(0)),
                Poll::Ready(Some(Ok(bytes))) => this.pending = bytes,
                Poll::Ready(Some(Err(e))) => match e.event {
                    Some(event) => this.pending = event,
                    None => return Poll::Ready(Err(io::Error::other(e))),
                },
            }
        }
        let n = buf.len().min(this.pending.len());
        buf[..n].copy_from_slice(&this.pending[..n]);
        let _ = this.pending.split_to(n);
        Poll::Ready(Ok(n))
    }
}

/// The parsed events of a streaming call: a [`Stream`] that ends after `message_stop`, or with
/// one `Err(StreamError)` when the stream broke after commit.
#[derive(Debug)]
pub struct EventStream {
    body: Body,
    events: EventAssembler,
}

impl EventStream {
    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<KeyId> {
        self.body.key
    }
}

impl Stream for EventStream {
    type Item = Result<Event, StreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.events.step() {
                EventStep::Item(item) => return Poll::Ready(Some(item)),
                EventStep::End => return Poll::Ready(None),
                EventStep::NeedBody => match this.body.poll_chunk(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(read) => this.events.handle_body(read.transpose()),
                },
            }
        }
    }
}

/// What the current exchange produced.
enum Io {
    Head(StatusCode, HeaderMap),
    Chunk(Bytes),
    End,
    Error(TransportError),
}

/// The loop: runs the call until it has something for the caller.
struct Driver {
    inner: Arc<Inner>,
    call: Call,
    exchange: Option<Exchange>,
}

impl Driver {
    fn new(inner: Arc<Inner>, request: Request, credential: Credential) -> Self {
        let call = Call::new(
            request,
            credential,
            &inner.config,
            request_id(SystemTime::now()),
            Instant::now(),
        );
        Self {
            inner,
            call,
            exchange: None,
        }
    }

    async fn next_output(&mut self) -> Output {
        loop {
            match self.call.poll_output() {
                Output::Send(attempt) => self.send(&attempt),
                Output::Mark(mark) => self.call.report(&mark),
                Output::Wait(deadline) => self.read(deadline).await,
                Output::Done => {
                    self.exchange = None;
                    return Output::Done;
                }
                other => return other,
            }
        }
    }

    /// Starts an exchange; its IO happens in [`read`](Self::read), under the call's deadline.
    fn send(&mut self, attempt: &Attempt) {
        let bytes = h1::encode_request(attempt, &self.inner.host_header, &self.inner.prefix);
        self.exchange = Some(Exchange::new(bytes, attempt.method == Method::HEAD));
    }

    async fn read(&mut self, deadline: Option<Instant>) {
        let Some(exchange) = self.exchange.as_mut() else {
            return self
                .call
                .handle_transport_error(TransportError::Eof, Instant::now());
        };
        let connector = &self.inner.connector;
        let io = match deadline {
            None => Some(exchange.next(connector).await),
            Some(at) => {
                future::or(async { Some(exchange.next(connector).await) }, async {
                    async_io::Timer::at(at).await;
                    None
                })
                .await
            }
        };
        let now = Instant::now();
        match io {
            None => self.call.handle_timeout(now),
            Some(Io::Head(status, headers)) => {
                self.call
                    .handle_response_head(status, headers, now, SystemTime::now())
            }
            Some(Io::Chunk(bytes)) => self.call.handle_body(bytes, now),
            Some(Io::End) => self.call.handle_body_end(now),
            Some(Io::Error(e)) => self.call.handle_transport_error(e, now),
        }
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("call", &self.call)
            .field("exchanging", &self.exchange.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.call.is_done() {
            self.call.handle_caller_gone();
        }
    }
}

/// One request and its response on one connection. Every `await` in [`next`](Self::next) may be
/// cancelled by the call's timer: state changes only after an operation completed, and reads
/// lose no bytes when dropped, so the next call resumes where this one stopped.
struct Exchange {
    request: Bytes,
    is_head: bool,
    phase: Phase,
    scratch: Box<[u8]>,
}

enum Phase {
    /// Not connected yet (or a timer cancelled the connect or the write).
    Open,
    /// The request is written; reading the response head.
    Head { conn: Conn, reused: bool, buf: BytesMut },
    /// Reading the body.
    Body {
        conn: Conn,
        buf: BytesMut,
        decoder: BodyDecoder,
        keep_alive: bool,
    },
    /// The exchange is over (its connection was pooled or dropped).
    Over,
}

impl Exchange {
    fn new(request: Bytes, is_head: bool) -> Self {
        Self {
            request,
            is_head,
            phase: Phase::Open,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }

    async fn next(&mut self, connector: &Connector) -> Io {
        loop {
            match &mut self.phase {
                Phase::Open => match open(connector, &self.request, true).await {
                    Ok((conn, reused)) => {
                        self.phase = Phase::Head {
                            conn,
                            reused,
                            buf: BytesMut::new(),
                        }
                    }
                    Err(e) => return self.fail(e),
                },
                Phase::Head { conn, reused, buf } => {
                    match h1::parse_head(buf, self.is_head) {
                        Ok(Some(head)) => {
                            let Phase::Head { conn, buf, .. } =
                                std::mem::replace(&mut self.phase, Phase::Over)
                            else {
                                return self.fail(TransportError::Protocol);
                            };
                            self.phase = Phase::Body {
                                conn,
                                buf,
                                decoder: BodyDecoder::new(head.framing),
                                keep_alive: head.keep_alive,
                            };
                            return Io::Head(head.status, head.headers);
                        }
                        Ok(None) => {}
                        Err(e) => return self.fail(e),
                    }
                    let read = conn.read(&mut self.scratch).await;
                    match read {
                        // A reused connection that fails before the first byte of the head was
                        // closed by the server while idle: send once more on a fresh connection.
                        Ok(0) | Err(_) if *reused && buf.is_empty() => {
                            match open(connector, &self.request, false).await {
                                Ok((conn, _)) => {
                                    self.phase = Phase::Head {
                                        conn,
                                        reused: false,
                                        buf: BytesMut::new(),
                                    }
                                }
                                Err(e) => return self.fail(e),
                            }
                        }
                        Ok(0) => return self.fail(TransportError::Eof),
                        Ok(n) => buf.extend_from_slice(&self.scratch[..n]),
                        Err(e) => return self.fail(io_transport_error(&e)),
                    }
                }
                Phase::Body {
                    conn, buf, decoder, ..
                } => {
                    match decoder.decode(buf) {
                        Ok(Decoded::Data(bytes)) => return Io::Chunk(bytes),
                        Ok(Decoded::End) => {
                            if let Phase::Body {
                                conn,
                                buf,
                                keep_alive: true,
                                ..
                            } = std::mem::replace(&mut self.phase, Phase::Over)
                                && buf.is_empty()
                            {
                                connector.release(conn);
                            }
                            return Io::End;
                        }
                        Ok(Decoded::NeedMore) => {}
                        Err(e) => return self.fail(e),
                    }
                    let read = conn.read(&mut self.scratch).await;
                    match read {
                        Ok(0) => {
                            let end = decoder.finish();
                            self.phase = Phase::Over;
                            return match end {
                                Ok(()) => Io::End,
                                Err(e) => Io::Error(e),
                            };
                        }
                        Ok(n) => buf.extend_from_slice(&self.scratch[..n]),
                        Err(e) => return self.fail(io_transport_error(&e)),
                    }
                }
                Phase::Over => return Io::Error(TransportError::Eof),
            }
        }
    }

    fn fail(&mut self, error: TransportError) -> Io {
        self.phase = Phase::Over;
        Io::Error(error)
    }
}

/// A connection with the request written on it: a pooled one when `may_reuse` and one is idle
/// (falling back to a fresh one if the write fails), else a fresh one. `true` when reused.
async fn open(
    connector: &Connector,
    request: &[u8],
    may_reuse: bool,
) -> Result<(Conn, bool), TransportError> {
    if may_reuse
        && let Some(mut conn) = connector.reuse().await
        && write(&mut conn, request).await.is_ok()
    {
        return Ok((conn, true));
    }
    let mut conn = connector.connect().await?;
    write(&mut conn, request)
        .await
        .map_err(|e| io_transport_error(&e))?;
    Ok((conn, false))
}

async fn write(conn: &mut Conn, bytes: &[u8]) -> io::Result<()> {
    conn.write_all(bytes).await?;
    conn.flush().await
}

fn unexpected(output: &Output) -> Error {
    Error::Config(format!("internal: unexpected call output {output:?}"))
}

fn io_transport_error(e: &io::Error) -> TransportError {
    match e.kind() {
        io::ErrorKind::TimedOut => TransportError::Timeout,
        io::ErrorKind::ConnectionRefused => TransportError::Connect,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
            TransportError::Reset
        }
        io::ErrorKind::UnexpectedEof => TransportError::Eof,
        io::ErrorKind::InvalidData => TransportError::Protocol,
        _ => TransportError::Reset,
    }
}
