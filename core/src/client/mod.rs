//! What every client adapter shares: the builder, the upstream URL, the error types, request
//! ids, and the runtime-free half of the loop. An adapter implements [`ClientAdapter`] (how to
//! read its clock, how to make its HTTP client from the [`ClientSettings`]) and [`Transport`]
//! (how to start an attempt and read what its exchange produced, blocking or async), and gets
//! the rest from here — the call loop ([`ClientCall`]), the body pump and its end
//! ([`AsyncBody`], [`BlockingBody`]), the parsed events ([`AsyncEvents`], [`BlockingEvents`])
//! — so the blocking, tokio and async-std clients cannot drift apart.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::uri::PathAndQuery;

use crate::call::{CallConfig, CallError, CallSummary, Failure, Outcome};
use crate::pool::{KeySpec, Order, Pool, PoolError};

mod body;
mod drive;

pub use body::{AsyncBody, AsyncEvents, BlockingBody, BlockingEvents, Events, forwarded};
pub use drive::{AsyncTransport, BlockingTransport, ClientCall, Clocks, Io, Transport};

/// The Anthropic API, the default profile's base URL. A builder without a base URL uses its
/// profile's ([`Provider::default_base_url`](crate::profile::Provider::default_base_url)).
pub const DEFAULT_BASE_URL: &str = crate::profile::anthropic::DEFAULT_BASE_URL;

/// What can go wrong in a client call. `Display` never contains a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// keypool answered instead of the upstream: every key is out, the upstream could not be
    /// reached or timed out, or an in-band error before commit. [`ClientError::to_response`]
    /// gives the HTTP response, rendered by the call's profile.
    #[error("{}", .0.error)]
    Call(Box<Failure>),
    /// `stream` got an answer that is not an event stream (an upstream 4xx/5xx, delivered as is).
    #[error("the upstream answered {} instead of an event stream", .0.status())]
    Status(Box<http::Response<Bytes>>),
    /// A delivered body broke while it was being read whole.
    #[error("reading the response failed: {0}")]
    Body(#[from] BodyError),
    /// Reading a delivered response failed at the IO level.
    #[error("reading the response failed: {0}")]
    Io(#[from] std::io::Error),
    /// The request body could not be read (tower layer); no key was spent.
    #[error("reading the request body failed: {0}")]
    RequestBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The client configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The key list is invalid.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl ClientError {
    /// The HTTP response for this error (in the profile's shape), as the gateway would send it.
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

    /// How the call ended, when keypool answered ([`Outcome::Failed`]).
    pub fn outcome(&self) -> Option<Outcome> {
        self.call_error().map(Outcome::of_error)
    }
}

/// A delivered body broke.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct BodyError {
    /// What happened.
    pub error: CallError,
    /// For an event stream: the synthesized `error` event keypool appends.
    pub event: Option<Bytes>,
}

/// A committed stream broke: the upstream reset, ended early, went idle or sent an oversized
/// event. keypool's synthesized `error` event is turned into this.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct StreamError {
    /// What happened.
    pub error: CallError,
}

/// The upstream base URL, checked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    base: String,
    https: bool,
    host: String,
    port: u16,
    authority: String,
    prefix: String,
    /// The scheme and authority, parsed once: [`uri`](Self::uri) shares them with every URI.
    parts: (http::uri::Scheme, http::uri::Authority),
    /// The `host` header of every attempt, made once.
    host_header: http::HeaderValue,
}

impl Upstream {
    /// Parses `http://host[:port][/prefix]` or `https://...`; a trailing `/` is ignored.
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let base = url.trim().trim_end_matches('/').to_owned();
        let uri: http::Uri = base
            .parse()
            .map_err(|_| ClientError::Config(format!("invalid base URL {base:?}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(ClientError::Config(format!(
                    "base URL {base:?} must be http:// or https://"
                )));
            }
        };
        let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
            return Err(ClientError::Config(format!("base URL {base:?} has no host")));
        };
        if uri.query().is_some() {
            return Err(ClientError::Config(format!(
                "base URL {base:?} must not have a query"
            )));
        }
        // `host[:port]` without any user information, the port only when it is not the
        // scheme's default (as hyper-util would write it, here once instead of per request).
        let host_header = match uri.port_u16() {
            Some(port) if port != if https { 443 } else { 80 } => format!("{host}:{port}"),
            _ => host.to_owned(),
        };
        let host_header = http::HeaderValue::try_from(host_header)
            .map_err(|_| ClientError::Config(format!("base URL {base:?} has an invalid host")))?;
        let parts = (
            if https {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            authority.clone(),
        );
        Ok(Self {
            https,
            parts,
            host_header,
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            base,
        })
    }
    /// Whether the scheme is `https`.
    pub fn is_https(&self) -> bool {
        self.https
    }
    /// The host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }
    /// The port (the scheme's default when absent).
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The authority as written (`[user@]host[:port]`); the `host` header is [`host_header`](Self::host_header).
    pub fn authority(&self) -> &str {
        &self.authority
    }
    /// The value of the `host` header for this upstream: `host[:port]`, the port only when it
    /// is not the scheme's default, without user information.
    pub fn host_header(&self) -> &http::HeaderValue {
        &self.host_header
    }
    /// The path prefix without a trailing `/` (usually empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The full URL of an attempt.
    pub fn url(&self, path_and_query: &PathAndQuery) -> String {
        format!("{}{}", self.base, path_and_query)
    }
    /// The URI of an attempt ([`url`](Self::url) as a `Uri`). Without a path prefix it shares
    /// the bytes of the base and of `path_and_query` instead of formatting and parsing a string.
    pub fn uri(&self, path_and_query: &PathAndQuery) -> Result<http::Uri, ClientError> {
        let invalid = || ClientError::Config(format!("invalid URL {:?}", self.url(path_and_query)));
        let path_and_query = if self.prefix.is_empty() {
            path_and_query.clone()
        } else {
            PathAndQuery::try_from(format!("{}{}", self.prefix, path_and_query)).map_err(|_| invalid())?
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.parts.0.clone());
        parts.authority = Some(self.parts.1.clone());
        parts.path_and_query = Some(path_and_query);
        http::Uri::from_parts(parts).map_err(|_| invalid())
    }
}

/// Everything an adapter needs to make its client, checked.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientSettings {
    /// The shared pool.
    pub pool: Arc<Pool>,
    /// The upstream.
    pub upstream: Upstream,
    /// Policy, commit point, timeouts.
    pub config: CallConfig,
    /// Extra root certificates (DER) to trust for the upstream.
    pub root_certs_der: Vec<Vec<u8>>,
}

/// An adapter's client type, made by [`ClientBuilder`].
pub trait ClientAdapter: Sized {
    /// Reads the adapter's monotonic clock (the core never does).
    fn now() -> Instant;
    /// Makes the client from checked settings.
    fn from_settings(settings: ClientSettings) -> Result<Self, ClientError>;
}

/// Builds an adapter's client: `Client::builder().keys([...]).base_url(...).build()`.
pub struct ClientBuilder<C> {
    keys: Vec<KeySpec>,
    order: Order,
    base_url: Option<String>,
    config: CallConfig,
    root_certs_der: Vec<Vec<u8>>,
    client: PhantomData<fn() -> C>,
}

impl<C> Default for ClientBuilder<C> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            order: Order::default(),
            base_url: None,
            config: CallConfig::default(),
            root_certs_der: Vec::new(),
            client: PhantomData,
        }
    }
}

impl<C> std::fmt::Debug for ClientBuilder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("keys", &self.keys)
            .field("order", &self.order)
            .field("base_url", &self.base_url)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C: ClientAdapter> ClientBuilder<C> {
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
    /// The upstream (default: the profile's, `https://api.anthropic.com` for Anthropic).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }
    /// Policy, commit point, timeouts and provider profile. Replaces the whole configuration,
    /// the profile included: call [`profile`](Self::profile) after it to change only that.
    pub fn config(mut self, config: CallConfig) -> Self {
        self.config = config;
        self
    }
    /// The upstream API (default [`Profile::anthropic`](crate::profile::Profile::anthropic)):
    /// how keys are sent, answers classified and errors shaped, and the default base URL —
    /// `Client::builder().profile(Profile::openai())` talks to `https://api.openai.com`.
    pub fn profile(mut self, profile: crate::profile::Profile) -> Self {
        self.config.profile = profile;
        self
    }
    /// Also trust this root certificate (DER), e.g. a private CA or a test upstream's.
    pub fn root_cert_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.root_certs_der.push(der.into());
        self
    }
    /// Builds the client with a new pool of the builder's keys. Fails on an invalid key list,
    /// base URL or root certificate.
    pub fn build(self) -> Result<C, ClientError> {
        let mut this = self;
        let keys = std::mem::take(&mut this.keys);
        let pool = Pool::new(keys, this.order, C::now())?;
        this.build_with_pool(Arc::new(pool))
    }
    /// Builds a client on an existing (shared) pool; the builder's keys are ignored.
    pub fn build_with_pool(self, pool: Arc<Pool>) -> Result<C, ClientError> {
        let profile = &self.config.profile;
        let url = match self.base_url.as_deref() {
            Some(url) => url,
            None if profile.default_base_url().is_empty() => {
                return Err(ClientError::Config(format!(
                    "the {} profile has no default base URL; set base_url(...)",
                    profile.name()
                )));
            }
            None => profile.default_base_url(),
        };
        let upstream = Upstream::parse(url)?;
        C::from_settings(ClientSettings {
            pool,
            upstream,
            config: self.config,
            root_certs_der: self.root_certs_der,
        })
    }
}

/// What a client's event stream does next ([`EventAssembler::step`]).
#[derive(Debug)]
#[must_use]
pub enum Step {
    /// Hand this to the caller: an event, or the one error that ends a broken stream.
    Item(Result<crate::sse::Event, StreamError>),
    /// Read the next body chunk and pass the result to [`EventAssembler::handle_body`].
    NeedBody,
    /// The stream is over.
    End,
}

/// Turns a delivered event-stream body into parsed events for a client's `stream()`, so every
/// adapter ends streams the same way: an oversized event ends it with one error, the body's end
/// flushes the parser, and a body that broke after commit yields one [`StreamError`].
///
/// The adapter's loop: `match assembler.step() { Item(i) => return Some(i), End => return None,
/// NeedBody => assembler.handle_body(body.next_chunk()) }`.
#[derive(Debug, Default)]
pub struct EventAssembler {
    parser: crate::sse::Parser,
    broken: Option<StreamError>,
    done: bool,
}

impl EventAssembler {
    /// A new assembler with the default SSE limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// What to do next.
    pub fn step(&mut self) -> Step {
        if let Some(error) = self.broken.take() {
            return Step::Item(Err(error));
        }
        if let Some(event) = self.parser.next_event() {
            return Step::Item(event.map_err(|_| {
                self.done = true;
                StreamError {
                    error: CallError::StreamBroken(crate::call::StreamBreak::EventTooLarge),
                }
            }));
        }
        if self.done { Step::End } else { Step::NeedBody }
    }

    /// The result of reading the next body chunk: bytes, the end, or the body's break.
    pub fn handle_body(&mut self, read: Result<Option<Bytes>, BodyError>) {
        match read {
            Ok(Some(bytes)) => self.parser.feed(&bytes),
            Ok(None) => {
                self.done = true;
                let _ = self.parser.finish();
            }
            Err(e) => {
                self.done = true;
                self.broken = Some(StreamError { error: e.error });
            }
        }
    }
}

/// A request id for keypool's own error bodies (`req_keypool_...`): unique in the process, no
/// randomness needed. `wall` is the adapter's wall clock.
pub fn request_id(wall: SystemTime) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = wall
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    // Formatted by hand: this runs for every call, and `format!` costs more than the rest.
    let mut id = String::with_capacity(PREFIX.len() + 32);
    id.push_str(PREFIX);
    push_hex(&mut id, t, 1);
    push_hex(&mut id, n, 4);
    id
}

const PREFIX: &str = "req_keypool_";

/// Appends `value` in lower-case hex, at least `min_digits` digits (as `{value:0min_digits$x}`).
fn push_hex(out: &mut String, value: u64, min_digits: usize) {
    let digits = (64 - value.leading_zeros() as usize).div_ceil(4).max(min_digits);
    for i in (0..digits).rev() {
        let nibble = value.checked_shr(4 * i as u32).unwrap_or(0) & 0xf;
        out.push(char::from(b"0123456789abcdef"[nibble as usize]));
    }
}

/// Whether a delivered response is an event stream that `stream` can parse.
pub fn is_event_stream_response<B>(response: &http::Response<B>) -> bool {
    response.status().is_success() && crate::call::headers::is_event_stream(response.headers())
}

fn is_event_stream_parts(parts: &http::response::Parts) -> bool {
    parts.status.is_success() && crate::call::headers::is_event_stream(&parts.headers)
}

/// A `stream` answer that is not an event stream, read whole.
fn status_error(parts: http::response::Parts, body: Bytes) -> ClientError {
    ClientError::Status(Box::new(http::Response::from_parts(parts, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("https://api.anthropic.com/").unwrap();
        assert!(u.is_https());
        assert_eq!(
            (u.host(), u.port(), u.authority(), u.prefix()),
            ("api.anthropic.com", 443, "api.anthropic.com", "")
        );
        assert_eq!(
            u.url(&PathAndQuery::from_static("/v1/messages?x=1")),
            "https://api.anthropic.com/v1/messages?x=1"
        );
        assert_eq!(
            u.uri(&PathAndQuery::from_static("/v1/messages?x=1")).unwrap(),
            "https://api.anthropic.com/v1/messages?x=1"
        );
        let u = Upstream::parse("http://127.0.0.1:8080/proxy").unwrap();
        assert_eq!((u.port(), u.prefix()), (8080, "/proxy"));
        assert_eq!(
            u.url(&PathAndQuery::from_static("/v1/models")),
            "http://127.0.0.1:8080/proxy/v1/models"
        );
        assert_eq!(
            u.uri(&PathAndQuery::from_static("/v1/models?a=b")).unwrap(),
            "http://127.0.0.1:8080/proxy/v1/models?a=b"
        );
        let v6 = Upstream::parse("http://[::1]:9/").unwrap();
        assert_eq!(
            v6.uri(&PathAndQuery::from_static("/v1/x")).unwrap(),
            "http://[::1]:9/v1/x"
        );
        for bad in ["ftp://x", "not a url", "http://", "/v1", "https://h/?q=1"] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_host_header_names_host_and_non_default_port_only() {
        for (url, host) in [
            ("https://api.anthropic.com/", "api.anthropic.com"),
            ("https://api.openai.com:443/v1", "api.openai.com"),
            ("http://127.0.0.1:8080/proxy", "127.0.0.1:8080"),
            ("http://example.com:80", "example.com"),
            ("https://example.com:80", "example.com:80"),
            ("http://[::1]:9/", "[::1]:9"),
            ("http://user:secret@upstream.test:8443", "upstream.test:8443"),
        ] {
            let u = Upstream::parse(url).unwrap();
            assert_eq!(u.host_header(), host, "{url}");
        }
    }

    #[test]
    fn event_assembler_ends_streams_the_same_way_for_every_adapter() {
        let mut a = EventAssembler::new();
        assert!(matches!(a.step(), Step::NeedBody));
        a.handle_body(Ok(Some(Bytes::from_static(
            b"event: ping\ndata: {}\n\nevent: x\nda",
        ))));
        assert!(matches!(a.step(), Step::Item(Ok(e)) if e.event_type() == "ping"));
        assert!(matches!(a.step(), Step::NeedBody));
        let broke = BodyError {
            error: CallError::StreamBroken(crate::call::StreamBreak::EndedEarly),
            event: None,
        };
        a.handle_body(Err(broke));
        assert!(matches!(a.step(), Step::Item(Err(_))));
        assert!(matches!(a.step(), Step::End));
        let mut b = EventAssembler::new();
        b.handle_body(Ok(Some(Bytes::from_static(b"data: 1\n\ndata: unterminated"))));
        b.handle_body(Ok(None));
        assert!(matches!(b.step(), Step::Item(Ok(e)) if e.data() == "1"));
        assert!(matches!(b.step(), Step::End));
    }

    #[test]
    fn request_ids_are_hex_as_format_would_write_them() {
        for (value, min) in [
            (0u64, 1usize),
            (0, 4),
            (0xabc, 4),
            (0x1_2345, 4),
            (u64::MAX, 1),
            (7, 1),
        ] {
            let mut out = String::new();
            push_hex(&mut out, value, min);
            assert_eq!(out, format!("{value:0min$x}"));
        }
        let wall = UNIX_EPOCH + std::time::Duration::from_micros(0x1234_5678_9abc);
        let id = request_id(wall);
        assert!(id.starts_with("req_keypool_123456789abc"), "{id}");
        let counter = &id["req_keypool_123456789abc".len()..];
        assert!(
            counter.len() >= 4 && counter.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
    }

    #[test]
    fn request_ids_are_unique() {
        let a = request_id(SystemTime::UNIX_EPOCH);
        let b = request_id(SystemTime::UNIX_EPOCH);
        assert!(a.starts_with("req_keypool_"));
        assert_ne!(a, b);
    }
}
