//! # keypool-ureq
//!
//! A blocking Anthropic client with API-key pool failover, for synchronous programs. It is a
//! thin loop around [`keypool_core::call::Call`]: the core decides which key to use, what an
//! answer means and what the caller sees; this crate sends requests with [`ureq`], reads the
//! clock, and hands the results back.
//!
//! ```no_run
//! use keypool_ureq::Client;
//!
//! let client = Client::builder()
//!     .keys(["sk-ant-api03-first-key...", "sk-ant-api03-second-key..."])
//!     .build()?;
//! let body = r#"{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hi"}]}"#;
//! let response = client.send(keypool_ureq::messages(body))?;
//! println!("{} {}", response.status(), std::io::read_to_string(response.into_body())?);
//!
//! // Streaming: parsed events; a stream that breaks after commit ends in one `Err`.
//! let stream = r#"{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
//! for event in client.stream(keypool_ureq::messages(stream))? {
//!     let event = event?;
//!     println!("{}: {}", event.event_type(), event.data());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Timeouts come from [`Timeouts`]: `connect` for the TCP and TLS connect, `first_byte` for the
//! response head, `idle` for each read of the body (ureq's per-read timeout). The first-content
//! hold timer of [`CommitPoint::FirstContent`] is checked between reads.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Method;
use keypool_core::call::{Attempt, Call, CallConfig, Failure, Output, Request, StreamBreak, TransportError};
use keypool_core::sse::{Event, Parser};
use keypool_core::{KeySpec, Order, Pool, PoolError, Secret};

pub use keypool_core::call::{CallError, CallSummary, CommitPoint, Credential, Timeouts};
pub use keypool_core::{Policy, sse};

/// The README's Rust examples, compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The Anthropic API.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// A `POST /v1/messages` request with a JSON body and `anthropic-version: 2023-06-01`.
pub fn messages(body: impl Into<Bytes>) -> Request {
    Request::post_json("/v1/messages", body)
}

/// What can go wrong. `Display` never contains a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// keypool answered instead of the upstream: every key is out, the upstream could not be
    /// reached or timed out, or an in-band error before commit. [`Error::to_response`] renders
    /// the Anthropic-shaped HTTP response.
    #[error("{}", .0.error)]
    Call(Box<Failure>),
    /// `stream` got an answer that is not an event stream (an upstream 4xx/5xx, delivered as is).
    #[error("the upstream answered {} instead of an event stream", .0.status())]
    Status(Box<http::Response<Bytes>>),
    /// Reading a delivered response failed.
    #[error("reading the response failed: {0}")]
    Io(#[from] io::Error),
    /// The client configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The key list is invalid.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl Error {
    /// The Anthropic-shaped HTTP response for this error, as the gateway would send it.
    pub fn to_response(&self) -> Option<http::Response<Bytes>> {
        match self {
            Self::Call(failure) => Some(failure.response.clone()),
            Self::Status(response) => Some((**response).clone()),
            _ => None,
        }
    }

    /// The typed keypool error, when keypool answered.
    pub fn call_error(&self) -> Option<&CallError> {
        match self {
            Self::Call(failure) => Some(&failure.error),
            _ => None,
        }
    }

    /// What the call did before keypool answered (attempts, key marks), when keypool answered.
    pub fn summary(&self) -> Option<&CallSummary> {
        match self {
            Self::Call(failure) => Some(&failure.summary),
            _ => None,
        }
    }
}

/// A committed stream broke: the upstream reset, ended early, went idle or sent an oversized event.
/// keypool's synthesized `error` event is turned into this.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct StreamError {
    /// What happened.
    pub error: CallError,
}

/// Builds a [`Client`].
#[derive(Debug, Default)]
pub struct ClientBuilder {
    keys: Vec<KeySpec>,
    order: Order,
    base_url: Option<String>,
    config: CallConfig,
    root_certs_der: Vec<Vec<u8>>,
}

impl ClientBuilder {
    /// The pool's keys, in order (the first is the primary).
    pub fn keys<K: Into<KeySpec>>(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.keys = keys.into_iter().map(Into::into).collect();
        self
    }
    /// How walks pick their first key (default: primary with fallback).
    pub fn order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }
    /// The upstream (default `https://api.anthropic.com`).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }
    /// Policy, commit point and timeouts.
    pub fn config(mut self, config: CallConfig) -> Self {
        self.config = config;
        self
    }
    /// Trust this root certificate (DER) instead of the built-in web PKI roots.
    pub fn root_cert_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.root_certs_der.push(der.into());
        self
    }
    /// Builds the client. Fails on an invalid key list or base URL.
    pub fn build(self) -> Result<Client, Error> {
        let pool = Pool::new(self.keys, self.order, Instant::now())?;
        Self::with_pool(Arc::new(pool), self.base_url, self.config, self.root_certs_der)
    }
    /// Builds a client on an existing (shared) pool; the builder's keys are ignored.
    pub fn build_with_pool(self, pool: Arc<Pool>) -> Result<Client, Error> {
        Self::with_pool(pool, self.base_url, self.config, self.root_certs_der)
    }

    fn with_pool(
        pool: Arc<Pool>,
        base_url: Option<String>,
        config: CallConfig,
        roots: Vec<Vec<u8>>,
    ) -> Result<Client, Error> {
        let base = base_url.unwrap_or_else(|| DEFAULT_BASE_URL.to_owned());
        let base = base.trim_end_matches('/').to_owned();
        let uri: http::Uri = base
            .parse()
            .map_err(|_| Error::Config(format!("invalid base URL {base:?}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(Error::Config(format!(
                "base URL {base:?} must be http:// or https:// with a host"
            )));
        }
        let t = config.timeouts;
        let mut tls = ureq::tls::TlsConfig::builder();
        if !roots.is_empty() {
            let certs: Vec<ureq::tls::Certificate<'static>> = roots
                .into_iter()
                .map(|der| ureq::tls::Certificate::from_der(&der).to_owned())
                .collect();
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(t.connect))
            .timeout_recv_response(Some(t.first_byte))
            .timeout_per_read(Some(t.idle))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Client {
            inner: Arc::new(Inner {
                agent,
                base,
                pool,
                config,
            }),
        })
    }
}

#[derive(Debug)]
struct Inner {
    agent: ureq::Agent,
    base: String,
    pool: Arc<Pool>,
    config: CallConfig,
}

/// A blocking client with key failover. Cheap to clone; clones share the pool and connections.
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
    /// timeout) are `Err(Error::Call)`.
    pub fn send(&self, request: Request) -> Result<http::Response<Body>, Error> {
        self.send_as(request, Credential::Pool(self.inner.pool.clone()))
    }

    /// Sends a request once with the caller's own key (BYOK); the pool is not touched.
    pub fn send_byok(&self, request: Request, key: Secret) -> Result<http::Response<Body>, Error> {
        self.send_as(request, Credential::Key(key))
    }

    /// Opens a streaming call and returns its parsed events. An answer that is not an event
    /// stream is `Err(Error::Status)` (or `Err(Error::Call)` when keypool answered).
    pub fn stream(&self, request: Request) -> Result<EventStream, Error> {
        self.stream_as(request, Credential::Pool(self.inner.pool.clone()))
    }

    /// [`stream`](Self::stream) with the caller's own key (BYOK).
    pub fn stream_byok(&self, request: Request, key: Secret) -> Result<EventStream, Error> {
        self.stream_as(request, Credential::Key(key))
    }

    fn send_as(&self, request: Request, credential: Credential) -> Result<http::Response<Body>, Error> {
        let mut driver = Driver::new(self.inner.clone(), request, credential);
        match driver.next_output() {
            Output::Head(head) => {
                let summary = driver.call.summary();
                let mut response = http::Response::new(Body {
                    driver,
                    pending: Bytes::new(),
                    done: false,
                });
                *response.status_mut() = head.status;
                *response.headers_mut() = head.headers;
                response.extensions_mut().insert(summary);
                Ok(response)
            }
            Output::Fail(failure) => Err(Error::Call(Box::new(failure))),
            other => Err(unexpected(&other)),
        }
    }

    fn stream_as(&self, request: Request, credential: Credential) -> Result<EventStream, Error> {
        let response = self.send_as(request, credential)?;
        let is_events = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !(response.status().is_success() && is_events) {
            let (parts, mut body) = response.into_parts();
            let mut bytes = Vec::new();
            body.read_to_end(&mut bytes)?;
            return Err(Error::Status(Box::new(http::Response::from_parts(
                parts,
                Bytes::from(bytes),
            ))));
        }
        Ok(EventStream {
            body: response.into_body(),
            parser: Parser::new(),
            done: false,
        })
    }
}

/// A response body that streams from the upstream through the call state machine.
#[derive(Debug)]
pub struct Body {
    driver: Driver,
    pending: Bytes,
    done: bool,
}

impl Body {
    /// The next chunk of the body: `Ok(None)` at its end. A stream that broke after commit
    /// yields its synthesized `error` event and then `Err` with the [`StreamError`].
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        loop {
            if self.done {
                return Ok(None);
            }
            match self.driver.next_output() {
                Output::Body(bytes) if bytes.is_empty() => {}
                Output::Body(bytes) => return Ok(Some(bytes)),
                Output::Abort(abort) => {
                    self.done = true;
                    return Err(BodyError {
                        error: abort.error,
                        event: abort.event,
                    });
                }
                Output::Done => self.done = true,
                // A second head or a failure cannot follow a delivered head; treat it as a broken body.
                Output::Head(_) | Output::Fail(_) | Output::Send(_) | Output::Wait(_) => {
                    self.done = true;
                    return Err(BodyError {
                        error: CallError::BodyBroken(StreamBreak::Transport(TransportError::Protocol)),
                        event: None,
                    });
                }
            }
        }
    }
}

/// A delivered body broke (see [`Body::next_chunk`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct BodyError {
    /// What happened.
    pub error: CallError,
    /// For an event stream: the synthesized `error` event keypool appends.
    pub event: Option<Bytes>,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            match self.next_chunk() {
                Ok(Some(bytes)) => self.pending = bytes,
                Ok(None) => return Ok(0),
                Err(e) => match e.event {
                    // An event stream read as bytes ends with keypool's error event.
                    Some(event) => self.pending = event,
                    None => return Err(io::Error::other(e)),
                },
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        let _ = self.pending.split_to(n);
        Ok(n)
    }
}

/// The parsed events of a streaming call. Ends after `message_stop`, or with one
/// `Err(StreamError)` when the stream broke after commit.
#[derive(Debug)]
pub struct EventStream {
    body: Body,
    parser: Parser,
    done: bool,
}

impl EventStream {
    /// The key pool id that answered.
    pub fn key(&self) -> Option<keypool_core::KeyId> {
        self.body.driver.call.key()
    }
}

impl Iterator for EventStream {
    type Item = Result<Event, StreamError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(event) = self.parser.next_event() {
                return match event {
                    Ok(event) => Some(Ok(event)),
                    Err(_) => {
                        self.done = true;
                        Some(Err(StreamError {
                            error: CallError::StreamBroken(StreamBreak::EventTooLarge),
                        }))
                    }
                };
            }
            if self.done {
                return None;
            }
            match self.body.next_chunk() {
                Ok(Some(bytes)) => self.parser.feed(bytes),
                Ok(None) => {
                    self.done = true;
                    let _ = self.parser.finish();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(StreamError { error: e.error }));
                }
            }
        }
    }
}

/// The loop: runs the call until it has something for the caller.
struct Driver {
    inner: Arc<Inner>,
    call: Call,
    reader: Option<ureq::BodyReader<'static>>,
    buf: Vec<u8>,
}

impl Driver {
    fn new(inner: Arc<Inner>, request: Request, credential: Credential) -> Self {
        let call = Call::new(request, credential, &inner.config, request_id(), Instant::now());
        Self {
            inner,
            call,
            reader: None,
            buf: vec![0; 16 * 1024],
        }
    }

    fn next_output(&mut self) -> Output {
        loop {
            match self.call.poll_output() {
                Output::Send(attempt) => self.send(attempt),
                Output::Wait(deadline) => self.read(deadline),
                Output::Done => {
                    self.reader = None;
                    return Output::Done;
                }
                other => return other,
            }
        }
    }

    fn send(&mut self, attempt: Attempt) {
        self.reader = None;
        let url = format!("{}{}", self.inner.base, attempt.path_and_query);
        let mut builder = http::Request::builder().method(attempt.method.clone()).uri(url);
        if let Some(headers) = builder.headers_mut() {
            *headers = attempt.headers;
        }
        let result = match builder.body(attempt.body.as_ref()) {
            Ok(request) if attempt.method == Method::GET || attempt.method == Method::HEAD => {
                let (parts, _) = request.into_parts();
                self.inner.agent.run(http::Request::from_parts(parts, ()))
            }
            Ok(request) => self.inner.agent.run(request),
            Err(_) => Err(ureq::Error::BadUri("invalid request".into())),
        };
        let now = Instant::now();
        match result {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                self.reader = Some(body.into_reader());
                self.call
                    .handle_response_head(parts.status, parts.headers, now, SystemTime::now());
            }
            Err(e) => self.call.handle_transport_error(transport_error(&e), now),
        }
    }

    fn read(&mut self, deadline: Option<Instant>) {
        let now = Instant::now();
        if deadline.is_some_and(|at| now >= at) {
            return self.call.handle_timeout(now);
        }
        let Some(reader) = self.reader.as_mut() else {
            return self.call.handle_transport_error(TransportError::Eof, now);
        };
        let read = reader.read(&mut self.buf);
        let now = Instant::now();
        match read {
            Ok(0) => self.call.handle_body_end(now),
            Ok(n) => self.call.handle_body(Bytes::copy_from_slice(&self.buf[..n]), now),
            Err(e) => self.call.handle_transport_error(io_transport_error(&e), now),
        }
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("call", &self.call)
            .field("reading", &self.reader.is_some())
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

fn unexpected(output: &Output) -> Error {
    Error::Config(format!("internal: unexpected call output {output:?}"))
}

fn transport_error(e: &ureq::Error) -> TransportError {
    match e {
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => TransportError::Connect,
        ureq::Error::Timeout(_) => TransportError::Timeout,
        ureq::Error::HostNotFound => TransportError::Dns,
        ureq::Error::ConnectionFailed => TransportError::Connect,
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => TransportError::Tls,
        ureq::Error::Protocol(_) | ureq::Error::LargeResponseHeader(..) => TransportError::Protocol,
        ureq::Error::Io(io) => io_transport_error(io),
        _ => TransportError::Protocol,
    }
}

fn io_transport_error(e: &io::Error) -> TransportError {
    if let Some(inner) = e.get_ref().and_then(|x| x.downcast_ref::<ureq::Error>()) {
        return transport_error(inner);
    }
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => TransportError::Timeout,
        io::ErrorKind::ConnectionRefused => TransportError::Connect,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
            TransportError::Reset
        }
        io::ErrorKind::UnexpectedEof => TransportError::Eof,
        io::ErrorKind::InvalidData => TransportError::Protocol,
        _ => TransportError::Reset,
    }
}

/// A request id for keypool's own error bodies: unique in the process, no randomness needed.
fn request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    format!("req_keypool_{t:x}{n:04x}")
}
