//! # keypool-tokio
//!
//! An async Anthropic client with API-key pool failover, on tokio and a pooled hyper-util
//! client (HTTP/1.1 and HTTP/2 by ALPN, rustls with the ring provider), and a tower
//! [`KeypoolLayer`] that adds the same failover to any HTTP service. Both are thin loops around
//! [`keypool_core::call::Call`]: the core decides which key to use, what an answer means and
//! what the caller sees; this crate starts requests, awaits the next head or body frame (or the
//! call's deadline), reads the clock, and hands the results back.
//!
//! ```no_run
//! use keypool_tokio::Client;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::builder()
//!     .keys(["sk-ant-api03-first-key...", "sk-ant-api03-second-key..."])
//!     .build()?;
//! let body = r#"{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hi"}]}"#;
//! let response = client.send(keypool_tokio::messages(body)).await?;
//! let status = response.status();
//! let mut body = response.into_body();
//! while let Some(chunk) = body.next_chunk().await? {
//!     println!("{status}: {}", String::from_utf8_lossy(&chunk));
//! }
//!
//! // Streaming: parsed events; a stream that breaks after commit ends in one `Err`.
//! let stream = r#"{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
//! let mut events = client.stream(keypool_tokio::messages(stream)).await?;
//! while let Some(event) = events.next_event().await {
//!     let event = event?;
//!     println!("{}: {}", event.event_type(), event.data());
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The tower layer, around any service that takes `http::Request<Full<Bytes>>` (here the
//! hyper-util client of a [`Client`]):
//!
//! ```no_run
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use keypool_core::{Order, Pool};
//! use keypool_tokio::{Client, KeypoolLayer};
//! use tower::{Layer, Service};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Arc::new(Pool::new(["sk-ant-api03-first-key..."], Order::default(), std::time::Instant::now())?);
//! let http = Client::builder().build_with_pool(pool.clone())?.http_client().clone();
//! let mut service = KeypoolLayer::new(pool).layer(http);
//! let request = http::Request::post("https://api.anthropic.com/v1/messages")
//!     .header("content-type", "application/json")
//!     .header("anthropic-version", "2023-06-01")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"claude-sonnet-4-5","max_tokens":64}"#)))?;
//! let response = service.call(request).await?;
//! println!("{}", response.status());
//! # Ok(())
//! # }
//! ```
//!
//! Timeouts come from [`Timeouts`]: `connect` for the TCP and TLS connect (the connector's own
//! timeout), `first_byte` for the response head and `idle` for each body frame (the call's
//! deadlines, awaited with `tokio::time::sleep_until`).
//!
//! Cancel safety: dropping a `send`/`stream` future, a [`Body`] or an [`EventStream`] drops
//! the upstream response, which closes its connection (HTTP/1.1) or resets its stream
//! (HTTP/2); no key is marked for it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use keypool_core::call::{Attempt, CallConfig, Request};
use keypool_core::client::{AsyncEvents, ClientAdapter, ClientSettings, Upstream as UpstreamUrl};
use keypool_core::{Pool, Secret};

mod body;
mod driver;
mod layer;
mod transport;

pub use body::{Body, EventStream};
pub use driver::BoxError;
pub use keypool_core::call::{CallError, CallSummary, CommitPoint, Credential, Outcome, Timeouts};
pub use keypool_core::client::{BodyError, ClientError as Error, DEFAULT_BASE_URL, StreamError};
pub use keypool_core::profile::Profile;
pub use keypool_core::{Policy, sse};
pub use layer::{Byok, KeypoolLayer, KeypoolService};
pub use transport::HttpClient;

use driver::{Driver, Exchange, Sender, Upstream, driver};
use transport::Repeat;

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
        let connector = https_connector(settings.config.timeouts.connect, settings.root_certs_der)?;
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // Take response heads as large over HTTP/2 as over HTTP/1.1 (hyper's HTTP/2 default
            // is 16 KiB, which turns a 20 KiB head into a reset).
            .http2_max_header_list_size(256 << 10)
            .build(transport::StampedConnector(connector));
        let http = HttpClient::new(http);
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                upstream: settings.upstream,
                pool: settings.pool,
                config: settings.config,
            }),
        })
    }
}

/// TCP with `TCP_NODELAY` and the connect timeout, then TLS (ring, web PKI roots plus `extra`)
/// for `https`, offering HTTP/2 and HTTP/1.1 by ALPN.
fn https_connector(
    connect: std::time::Duration,
    extra: Vec<Vec<u8>>,
) -> Result<HttpsConnector<HttpConnector>, Error> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for der in extra {
        roots
            .add(rustls::pki_types::CertificateDer::from(der))
            .map_err(|e| Error::Config(format!("invalid root certificate: {e}")))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect));
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp))
}

#[derive(Debug)]
struct Inner {
    http: HttpClient,
    upstream: UpstreamUrl,
    pool: Arc<Pool>,
    config: CallConfig,
}

/// Sends attempts with the client's hyper-util client.
pub(crate) struct ClientUpstream(Arc<Inner>);

impl Upstream for ClientUpstream {
    fn start(&mut self, attempt: Attempt) -> Exchange {
        self.send(attempt, Repeat::Possible)
    }

    fn resend(&mut self, attempt: Attempt) -> Exchange {
        self.send(attempt, Repeat::Done)
    }
}

impl ClientUpstream {
    fn send(&self, attempt: Attempt, repeat: Repeat) -> Exchange {
        let uri = match self.0.upstream.uri(&attempt.path_and_query) {
            Ok(uri) => uri,
            Err(e) => return Exchange::Boxed(Box::pin(async move { Err(e.into()) })),
        };
        let mut request = http::Request::new(Full::new(attempt.body));
        *request.method_mut() = attempt.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = attempt.headers;
        // The core strips the client's `host`; set here from the value made once, hyper-util
        // would otherwise format one per request.
        request
            .headers_mut()
            .insert(http::header::HOST, self.0.upstream.host_header().clone());
        Exchange::Client(self.0.http.start(request, repeat))
    }
}

/// An async client with key failover. Cheap to clone; clones share the pool and connections.
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

    /// The underlying pooled hyper-util client (no failover), e.g. as the inner service of a
    /// [`KeypoolLayer`].
    pub fn http_client(&self) -> &HttpClient {
        &self.inner.http
    }

    /// Sends a request with failover over the pool and returns the delivered response, whose
    /// body streams from the upstream. keypool's own answers (exhaustion, transport failure,
    /// timeout) are `Err(Error::Call)`.
    pub async fn send(&self, request: Request) -> Result<http::Response<Body>, Error> {
        self.send_with(request, Credential::Pool(self.inner.pool.clone()))
            .await
    }

    /// Sends a request once with the caller's own key (BYOK); the pool is not touched.
    pub async fn send_byok(&self, request: Request, key: Secret) -> Result<http::Response<Body>, Error> {
        self.send_with(request, Credential::Key(key)).await
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

    /// Sends a request with an explicit credential: a (possibly different, e.g. reloaded) pool,
    /// the caller's key, or the caller's own credential headers passed through. This is what the
    /// gateway uses. The body carries the [`CallSummary`] ([`Body::summary`]).
    ///
    /// The call runs right here, not in a further `async fn`: each such layer would keep its
    /// own copy of the request and be moved whole into the caller's future.
    pub async fn send_with(
        &self,
        request: Request,
        credential: Credential,
    ) -> Result<http::Response<Body>, Error> {
        let upstream = Sender::Client(ClientUpstream(self.inner.clone()));
        let mut driver = driver(upstream, request, credential, &self.inner.config);
        let response = driver.response().await?;
        Ok(response.map(|()| Body::new(driver)))
    }

    async fn stream_as(&self, request: Request, credential: Credential) -> Result<EventStream, Error> {
        let response = self.send_with(request, credential).await?;
        let events = AsyncEvents::from_response(response.map(|body| body.0)).await?;
        Ok(EventStream::new(events))
    }
}

/// Runs the call to its answer: the response, whose body streams on, or keypool's own error.
async fn respond(mut driver: Box<Driver>) -> Result<http::Response<Body>, Error> {
    let response = driver.response().await?;
    Ok(response.map(|()| Body::new(driver)))
}
