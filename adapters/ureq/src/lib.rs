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
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::Method;
use keypool_core::call::{Attempt, Call, CallConfig, Output, Request, StreamBreak, TransportError};
use keypool_core::client::{
    ClientAdapter, ClientSettings, EventAssembler, Step, Upstream, is_event_stream_response, request_id,
};
use keypool_core::sse::Event;
use keypool_core::{Pool, Secret};

pub use keypool_core::call::{CallError, CallSummary, CommitPoint, Credential, Timeouts};
pub use keypool_core::client::{BodyError, ClientError as Error, DEFAULT_BASE_URL, StreamError};
pub use keypool_core::{Policy, sse};

/// The README's Rust examples, compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// A `POST /v1/messages` request with a JSON body and `anthropic-version: 2023-06-01`.
pub fn messages(body: impl Into<Bytes>) -> Request {
    Request::post_json("/v1/messages", body)
}

/// Builds a [`Client`]: `Client::builder().keys([...]).base_url(...).config(...).build()`.
///
/// Root certificates given with `root_cert_der` replace the built-in web PKI roots in this
/// adapter (ureq takes one root store), where the async adapters add them.
pub type ClientBuilder = keypool_core::client::ClientBuilder<Client>;

impl ClientAdapter for Client {
    fn now() -> Instant {
        Instant::now()
    }

    fn from_settings(settings: ClientSettings) -> Result<Self, Error> {
        let t = settings.config.timeouts;
        let mut tls = ureq::tls::TlsConfig::builder();
        if !settings.root_certs_der.is_empty() {
            let certs: Vec<ureq::tls::Certificate<'static>> = settings
                .root_certs_der
                .iter()
                .map(|der| ureq::tls::Certificate::from_der(der).to_owned())
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
        Ok(Self {
            inner: Arc::new(Inner {
                agent,
                upstream: settings.upstream,
                pool: settings.pool,
                config: settings.config,
            }),
        })
    }
}

#[derive(Debug)]
struct Inner {
    agent: ureq::Agent,
    upstream: Upstream,
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
        if !is_event_stream_response(&response) {
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
            events: EventAssembler::new(),
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
                Output::Head(_) | Output::Fail(_) | Output::Send(_) | Output::Mark(_) | Output::Wait(_) => {
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
    events: EventAssembler,
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
            match self.events.step() {
                Step::Item(item) => return Some(item),
                Step::End => return None,
                Step::NeedBody => self.events.handle_body(self.body.next_chunk()),
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
            reader: None,
            buf: vec![0; 16 * 1024],
        }
    }

    fn next_output(&mut self) -> Output {
        loop {
            match self.call.poll_output() {
                Output::Send(attempt) => self.send(attempt),
                Output::Mark(mark) => self.call.report(&mark),
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
        let url = self.inner.upstream.url(&attempt.path_and_query);
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
