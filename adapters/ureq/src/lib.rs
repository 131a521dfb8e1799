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
//! response head, `idle` for each read of the body (ureq's per-read timeout: a stalled body ends
//! as the call's idle timeout, [`StreamBreak::Idle`](keypool_core::call::StreamBreak::Idle)).
//! The first-content hold timer of [`CommitPoint::FirstContent`] is checked between reads.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::Method;
use keypool_core::call::{Attempt, CallConfig, Request, TransportError};
use keypool_core::client::{
    BlockingBody, BlockingEvents, BlockingTransport, ClientAdapter, ClientCall, ClientSettings, Clocks, Io,
    Transport, Upstream,
};
use keypool_core::sse::Event;
use keypool_core::{Pool, Secret};

pub use keypool_core::call::{CallError, CallSummary, CommitPoint, Credential, Outcome, Timeouts};
pub use keypool_core::client::{BodyError, ClientError as Error, DEFAULT_BASE_URL, StreamError};
pub use keypool_core::profile::Profile;
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
        let transport = Ureq {
            inner: self.inner.clone(),
            buf: vec![0; 16 * 1024],
        };
        let mut call = ClientCall::new(transport, request, credential, &self.inner.config);
        let response = call.response_blocking()?;
        Ok(response.map(|()| Body(BlockingBody::new(call))))
    }

    fn stream_as(&self, request: Request, credential: Credential) -> Result<EventStream, Error> {
        let response = self.send_as(request, credential)?;
        BlockingEvents::from_response(response.map(|body| body.0)).map(EventStream)
    }
}

/// A response body that streams from the upstream through the call state machine.
#[derive(Debug)]
pub struct Body(BlockingBody<Ureq>);

impl Body {
    /// The next chunk of the body: `Ok(None)` at its end. A stream that broke after commit
    /// yields its synthesized `error` event and then `Err` with the [`StreamError`].
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        self.0.next_chunk()
    }

    /// How the call ended: `None` while it runs. A body dropped before then ends its call as
    /// [`Outcome::ClientGone`].
    pub fn outcome(&self) -> Option<Outcome> {
        self.0.outcome()
    }

    /// The pool key that answered (`None` for BYOK).
    pub fn key(&self) -> Option<keypool_core::KeyId> {
        self.0.key()
    }

    /// What the call did to get this body: its attempts and the key that answered (the
    /// gateway's request log and metrics read it here).
    pub fn summary(&self) -> CallSummary {
        self.0.summary()
    }
}

impl Read for Body {
    /// Bytes as the caller would forward them: an event stream that broke ends with keypool's
    /// `error` event; a plain body that broke fails with an `io::Error` wrapping [`BodyError`].
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// The parsed events of a streaming call. Ends after `message_stop`, or with one
/// `Err(StreamError)` when the stream broke after commit.
#[derive(Debug)]
pub struct EventStream(BlockingEvents<Ureq>);

impl EventStream {
    /// The key pool id that answered.
    pub fn key(&self) -> Option<keypool_core::KeyId> {
        self.0.key()
    }

    /// What the call did to get this stream: its attempts and the key that answered.
    pub fn summary(&self) -> CallSummary {
        self.0.summary()
    }
}

impl Iterator for EventStream {
    type Item = Result<Event, StreamError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
}

/// Sends attempts with the client's agent and reads their bodies.
struct Ureq {
    inner: Arc<Inner>,
    buf: Vec<u8>,
}

/// One attempt: sent on the first read (ureq sends and reads the head in one blocking call),
/// then its body.
enum Exchange {
    Unsent(Attempt),
    Reading(ureq::BodyReader<'static>),
}

impl Transport for Ureq {
    type Exchange = Exchange;

    fn start(&mut self, attempt: Attempt) -> Exchange {
        Exchange::Unsent(attempt)
    }

    fn release(&mut self, exchange: Exchange) {
        // ureq gives a connection back to its pool on the read that finds the body complete
        // (a body read to its content-length is; that read does no IO).
        if let Exchange::Reading(mut reader) = exchange {
            let _ = reader.read(&mut [0; 1]);
        }
    }

    const CLOCKS: Clocks = Clocks {
        now: Instant::now,
        wall: SystemTime::now,
    };
}

impl BlockingTransport for Ureq {
    fn next_io(&mut self, exchange: &mut Exchange, deadline: Option<Instant>) -> Io {
        let reader = match exchange {
            Exchange::Unsent(attempt) => {
                let sent = send(&self.inner, attempt);
                return match sent {
                    Ok(response) => {
                        let (parts, body) = response.into_parts();
                        *exchange = Exchange::Reading(body.into_reader());
                        Io::Head(parts.status, parts.headers)
                    }
                    Err(e) => Io::Error(transport_error(&e)),
                };
            }
            Exchange::Reading(reader) => reader,
        };
        // Between reads, a deadline that passed meanwhile (the caller took its time) fires
        // first; a read itself is bounded by ureq's per-read timeout.
        if deadline.is_some_and(|at| Instant::now() >= at) {
            return Io::TimedOut;
        }
        match reader.read(&mut self.buf) {
            Ok(0) => Io::End,
            Ok(n) => Io::Chunk(Bytes::copy_from_slice(&self.buf[..n])),
            Err(e) => Io::Error(io_transport_error(&e)),
        }
    }
}

/// Sends an attempt and reads its response head.
fn send(inner: &Inner, attempt: &Attempt) -> Result<http::Response<ureq::Body>, ureq::Error> {
    let url = inner.upstream.url(&attempt.path_and_query);
    let mut builder = http::Request::builder().method(attempt.method.clone()).uri(url);
    if let Some(headers) = builder.headers_mut() {
        *headers = attempt.headers.clone();
    }
    match builder.body(attempt.body.as_ref()) {
        Ok(request) if attempt.method == Method::GET || attempt.method == Method::HEAD => {
            let (parts, _) = request.into_parts();
            inner.agent.run(http::Request::from_parts(parts, ()))
        }
        Ok(request) => inner.agent.run(request),
        Err(_) => Err(ureq::Error::BadUri("invalid request".into())),
    }
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
    match e.get_ref().and_then(|x| x.downcast_ref::<ureq::Error>()) {
        Some(inner) => transport_error(inner),
        None => e.kind().into(),
    }
}
