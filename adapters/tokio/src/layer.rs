//! The tower layer: key failover around any HTTP service.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::future::BoxFuture;
use http::uri::{Authority, PathAndQuery, Scheme};
use http_body_util::{BodyExt, Full};
use keypool_core::call::{Attempt, CallConfig, Credential, Request};
use keypool_core::profile::Profile;
use keypool_core::{Pool, Secret};
use tower::{Layer, Service};

use crate::driver::{BoxError, Exchange, Sender, Upstream, UpstreamBody, driver};
use crate::{Body, Error, respond};

/// Adds key failover over a shared [`Pool`] to an HTTP service.
///
/// The wrapped service takes `http::Request<Full<Bytes>>` and answers `http::Response<B>` for
/// any body `B` of [`Bytes`]. The layered service takes `http::Request<ReqBody>`, buffers the
/// body once, runs the call loop and calls the inner service once per attempt (with the
/// request's scheme and authority, the attempt's path, headers and key). It answers
/// `http::Response<`[`Body`]`>`; keypool's own answers are `Err(`[`Error::Call`]`)`.
#[derive(Debug, Clone)]
pub struct KeypoolLayer {
    pool: Arc<Pool>,
    config: CallConfig,
}

impl KeypoolLayer {
    /// A layer on this pool with the default [`CallConfig`].
    pub fn new(pool: Arc<Pool>) -> Self {
        Self {
            pool,
            config: CallConfig::default(),
        }
    }

    /// Policy, commit point, timeouts and profile (the connect timeout is the inner service's
    /// business). Replaces the profile too: call [`profile`](Self::profile) after it.
    pub fn config(mut self, config: CallConfig) -> Self {
        self.config = config;
        self
    }

    /// The upstream API (default [`Profile::anthropic`]), e.g. [`Profile::openai`].
    pub fn profile(mut self, profile: Profile) -> Self {
        self.config.profile = profile;
        self
    }
}

impl<S> Layer<S> for KeypoolLayer {
    type Service = KeypoolService<S>;

    fn layer(&self, inner: S) -> KeypoolService<S> {
        KeypoolService {
            inner,
            pool: self.pool.clone(),
            config: self.config.clone(),
        }
    }
}

/// A request extension: send this request once with the caller's own key (BYOK) instead of
/// the pool's keys.
#[derive(Debug, Clone)]
pub struct Byok(pub Secret);

/// The service made by [`KeypoolLayer`].
#[derive(Debug, Clone)]
pub struct KeypoolService<S> {
    inner: S,
    pool: Arc<Pool>,
    config: CallConfig,
}

impl<S> KeypoolService<S> {
    /// The shared key pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl<S, B, ReqBody> Service<http::Request<ReqBody>> for KeypoolService<S>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Error>>;

    /// Always ready: the inner service's readiness is awaited for each attempt, on a clone.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let inner = self.inner.clone();
        let pool = self.pool.clone();
        let config = self.config.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // A body that cannot be read spends no key.
            let body = body
                .collect()
                .await
                .map_err(|e| Error::RequestBody(e.into()))?
                .to_bytes();
            let credential = match parts.extensions.get::<Byok>() {
                Some(Byok(key)) => Credential::Key(key.clone()),
                None => Credential::Pool(pool),
            };
            let request = Request {
                method: parts.method,
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
                headers: parts.headers,
                body,
            };
            let upstream = ServiceUpstream {
                service: inner,
                scheme: parts.uri.scheme().cloned(),
                authority: parts.uri.authority().cloned(),
            };
            respond(driver(
                Sender::Other(Box::new(upstream)),
                request,
                credential,
                &config,
            ))
            .await
        })
    }
}

/// Sends attempts through the inner service.
struct ServiceUpstream<S> {
    service: S,
    scheme: Option<Scheme>,
    authority: Option<Authority>,
}

impl<S, B> Upstream for ServiceUpstream<S>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn start(&mut self, attempt: Attempt) -> Exchange {
        let mut uri = http::Uri::builder();
        if let (Some(scheme), Some(authority)) = (&self.scheme, &self.authority) {
            uri = uri.scheme(scheme.clone()).authority(authority.clone());
        }
        let headers = attempt.headers;
        let body = Full::new(attempt.body);
        let method = attempt.method;
        let request = uri
            .path_and_query(attempt.path_and_query)
            .build()
            .and_then(|uri| {
                let mut builder = http::Request::builder().method(method).uri(uri);
                if let Some(h) = builder.headers_mut() {
                    *h = headers;
                }
                builder.body(body)
            });
        let mut service = self.service.clone();
        Exchange::Boxed(Box::pin(async move {
            let request = request?;
            poll_fn(|cx| service.poll_ready(cx)).await.map_err(Into::into)?;
            let response = service.call(request).await.map_err(Into::into)?;
            Ok(response.map(|body| UpstreamBody::Boxed(body.map_err(Into::into).boxed_unsync())))
        }))
    }
}
