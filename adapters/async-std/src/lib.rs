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

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use futures_io::AsyncRead;
use futures_lite::{AsyncReadExt, AsyncWriteExt, future};
use http::Method;
use keypool_core::call::{Attempt, CallConfig, Credential, Outcome, Request, TransportError};
use keypool_core::client::{
    AsyncBody, AsyncEvents, AsyncTransport, ClientAdapter, ClientCall, ClientSettings, Clocks, Io, Transport,
};
use keypool_core::sse::Event;
use keypool_core::{KeyId, Pool, Secret};

pub use keypool_core::call::{CallError, CallSummary, CommitPoint, Timeouts};
pub use keypool_core::client::{BodyError, ClientError as Error, DEFAULT_BASE_URL, StreamError};
pub use keypool_core::profile::Profile;
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
                // The core's `host` value (no user information, no default port), as every
                // adapter sends it; made from a `String`, so it is valid UTF-8.
                host_header: String::from_utf8_lossy(up.host_header().as_bytes()).into_owned(),
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
        let mut call = Box::new(ClientCall::new(
            Net(self.inner.clone()),
            request,
            credential,
            &self.inner.config,
        ));
        let response = call.response().await?;
        Ok(response.map(|()| Body(AsyncBody::new(call))))
    }

    async fn stream_as(&self, request: Request, credential: Credential) -> Result<EventStream, Error> {
        let response = self.send_as(request, credential).await?;
        let events = AsyncEvents::from_response(response.map(|body| body.0)).await?;
        Ok(EventStream(events))
    }
}

/// A response body that streams from the upstream through the call state machine: a
/// [`Stream`] of chunks, and an [`AsyncRead`] of bytes.
#[derive(Debug)]
pub struct Body(AsyncBody<Net>);

impl Body {
    /// The next chunk of the body: `Ok(None)` at its end. A stream that broke after commit
    /// yields `Err` with keypool's synthesized `error` event and the [`CallError`].
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.0.next_chunk().await
    }

    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<KeyId> {
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
}

impl Stream for Body {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.poll_chunk(cx).map(Result::transpose)
    }
}

impl AsyncRead for Body {
    /// Bytes as the caller would forward them: an event stream that broke ends with keypool's
    /// `error` event; a plain body that broke fails with an `io::Error` wrapping [`BodyError`].
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self.get_mut().0.poll_read(cx, buf)
    }
}

/// The parsed events of a streaming call: a [`Stream`] that ends after `message_stop`, or with
/// one `Err(StreamError)` when the stream broke after commit.
#[derive(Debug)]
pub struct EventStream(AsyncEvents<Net>);

impl EventStream {
    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<KeyId> {
        self.0.key()
    }

    /// What the call did to get this stream: its attempts and the key that answered.
    pub fn summary(&self) -> CallSummary {
        self.0.summary()
    }
}

impl Stream for EventStream {
    type Item = Result<Event, StreamError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.poll_event(cx)
    }
}

/// Starts exchanges on the client's connections and reads them under the call's deadline.
struct Net(Arc<Inner>);

impl Transport for Net {
    type Exchange = Exchange;

    /// Encodes the request; its IO happens in `next_io`, under the call's deadline.
    fn start(&mut self, attempt: Attempt) -> Exchange {
        let bytes = h1::encode_request(&attempt, &self.0.host_header, &self.0.prefix);
        Exchange::new(bytes, attempt.method == Method::HEAD, true)
    }

    /// After [`Io::Resend`]: the attempt again, on a new connection only (so it is not reported
    /// stale again).
    fn resend(&mut self, attempt: Attempt) -> Exchange {
        let bytes = h1::encode_request(&attempt, &self.0.host_header, &self.0.prefix);
        Exchange::new(bytes, attempt.method == Method::HEAD, false)
    }

    fn release(&mut self, mut exchange: Exchange) {
        exchange.release(&self.0.connector);
    }

    const CLOCKS: Clocks = Clocks {
        now: Instant::now,
        wall: SystemTime::now,
    };
}

impl AsyncTransport for Net {
    /// The next read races an `async_io::Timer` for the deadline.
    async fn next_io(&mut self, exchange: &mut Exchange, deadline: Option<Instant>) -> Io {
        let connector = &self.0.connector;
        match deadline {
            None => exchange.next(connector).await,
            Some(at) => {
                future::or(exchange.next(connector), async {
                    async_io::Timer::at(at).await;
                    Io::TimedOut
                })
                .await
            }
        }
    }
}

/// One request and its response on one connection. Every `await` in [`next`](Self::next) may be
/// cancelled by the call's timer: state changes only after an operation completed, and reads
/// lose no bytes when dropped, so the next call resumes where this one stopped.
struct Exchange {
    request: Bytes,
    is_head: bool,
    /// Whether a pooled connection may carry the request (not when it is sent again).
    may_reuse: bool,
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
    fn new(request: Bytes, is_head: bool, may_reuse: bool) -> Self {
        Self {
            request,
            is_head,
            may_reuse,
            phase: Phase::Open,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }

    async fn next(&mut self, connector: &Connector) -> Io {
        loop {
            match &mut self.phase {
                Phase::Open => match open(connector, &self.request, self.may_reuse).await {
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
                        // closed by the server while idle: the call sends the attempt once more
                        // (`Transport::resend`, on a new connection).
                        Ok(0) | Err(_) if *reused && buf.is_empty() => {
                            let error = match read {
                                Ok(_) => TransportError::Eof,
                                Err(e) => e.kind().into(),
                            };
                            self.phase = Phase::Over;
                            return Io::Resend(error);
                        }
                        Ok(0) => return self.fail(TransportError::Eof),
                        Ok(n) => buf.extend_from_slice(&self.scratch[..n]),
                        Err(e) => return self.fail(e.kind().into()),
                    }
                }
                Phase::Body {
                    conn, buf, decoder, ..
                } => {
                    match decoder.decode(buf) {
                        Ok(Decoded::Data(bytes)) => return Io::Chunk(bytes),
                        Ok(Decoded::End) => {
                            self.body_read(connector);
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
                        Err(e) => return self.fail(e.kind().into()),
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

    /// The call completed: a body already read to its framing's end gives its connection back
    /// to the pool (a content-length body is complete before its end is decoded).
    fn release(&mut self, connector: &Connector) {
        if let Phase::Body { buf, decoder, .. } = &mut self.phase
            && decoder.decode(buf) == Ok(Decoded::End)
        {
            self.body_read(connector);
        }
    }

    /// The body was read to its end: the exchange is over, and a connection that may carry
    /// another request (and holds no bytes beyond the body) goes back to the pool.
    fn body_read(&mut self, connector: &Connector) {
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
        .map_err(|e| TransportError::from(e.kind()))?;
    Ok((conn, false))
}

async fn write(conn: &mut Conn, bytes: &[u8]) -> io::Result<()> {
    conn.write_all(bytes).await?;
    conn.flush().await
}
