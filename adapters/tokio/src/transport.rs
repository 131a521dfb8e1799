//! The pooled HTTP client keypool sends with.
//!
//! It is hyper-util's pooled client with one addition: a request that dies on a *reused*
//! connection before any response arrives (the server closed the connection while it sat idle
//! in the pool, and the close crossed our request on the wire) is sent once more on a fresh
//! connection. hyper-util already does this when it notices the close before writing; this
//! covers the race where it notices after. A request on a fresh connection is never repeated.
//! [`HttpClient::request`] repeats from a copy of the request; a keypool call's exchange
//! ([`Sending`]) only reports the case, and the call's loop sends the same attempt again
//! (`Io::Resend`, `Call::resend`: the same key and attempt number, nothing marked), so that
//! no request is copied up front for a race that is rare.
//!
//! To tell reused from fresh, the connector counts the connections it has made
//! ([`CountingConnector`]): if none was made while the request ran, it ran on a connection made
//! before it, i.e. a pooled one. A connection made meanwhile for another request makes the
//! answer "maybe fresh", and the request is not repeated (the safe side). The count costs
//! nothing per request; a per-connection stamp in hyper-util's connection extras did, since
//! hyper-util copies those into every response's extensions (a map and a box each).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::driver::BoxError;

type Inner = hyper_util::client::legacy::Client<CountingConnector, Full<Bytes>>;

/// The pooled client (HTTP and HTTPS, HTTP/1.1 and HTTP/2) behind a [`Client`](crate::Client);
/// also a `tower::Service`, e.g. as the inner service of a [`KeypoolLayer`](crate::KeypoolLayer).
/// Cheap to clone (the hyper-util client, its connector and pool handles, sit behind one `Arc`).
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    client: Inner,
    /// The connections the client's connector has made ([`CountingConnector::made`]).
    connections: Arc<AtomicU64>,
}

impl HttpClient {
    /// `client` must use `connector` (whose count tells reused from fresh connections).
    pub(crate) fn new(client: Inner, connector: &CountingConnector) -> Self {
        Self {
            inner: Arc::new(Shared {
                client,
                connections: connector.made.clone(),
            }),
        }
    }

    /// Sends a request; see the module docs for the one retry on a stale connection (made
    /// here from a copy of the request; a keypool call instead sends its attempt again).
    pub async fn request(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        let again = copy_request(&request);
        match self.start(request, Repeat::Possible).await {
            Err(Unanswered::Stale(_)) => self
                .start(again, Repeat::Done)
                .await
                .map_err(Unanswered::into_error),
            other => other.map_err(Unanswered::into_error),
        }
    }

    /// Starts a request: a nameable future, so that a call keeps it in place instead of
    /// boxing it per attempt. It does not repeat the request itself; it reports
    /// [`Unanswered::Stale`] where a repeat is due (unless this already is one).
    pub(crate) fn start(&self, request: http::Request<Full<Bytes>>, repeat: Repeat) -> Sending {
        let connections = match repeat {
            Repeat::Possible => Some((self.clone(), self.inner.connections.load(Ordering::Acquire))),
            Repeat::Done => None,
        };
        Sending {
            pending: self.inner.client.request(request),
            connections,
        }
    }
}

/// Whether a request may still be repeated on a fresh connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// A first send.
    Possible,
    /// The repeat itself.
    Done,
}

/// Why a request has no response.
#[derive(Debug)]
pub(crate) enum Unanswered<E = hyper_util::client::legacy::Error> {
    /// It died on a pooled connection the upstream had closed, before any response: sending
    /// it again on a fresh connection is due (the module docs).
    Stale(E),
    /// Any other failure.
    Failed(E),
}

impl<E> Unanswered<E> {
    pub(crate) fn into_error(self) -> E {
        match self {
            Self::Stale(e) | Self::Failed(e) => e,
        }
    }
}

/// A request on its way.
pub(crate) struct Sending {
    pending: hyper_util::client::legacy::ResponseFuture,
    /// The client and its connection count when the request started, unless this is a repeat.
    connections: Option<(HttpClient, u64)>,
}

impl Future for Sending {
    type Output = Result<http::Response<Incoming>, Unanswered>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let result = std::task::ready!(Pin::new(&mut this.pending).poll(cx));
        Poll::Ready(result.map_err(|e| match this.connections.take() {
            Some((client, before)) if died_on_reused_connection(&client, before, &e) => Unanswered::Stale(e),
            _ => Unanswered::Failed(e),
        }))
    }
}

/// Whether a request failed because a pooled connection had been closed by the server: no
/// connection was made while it ran (so it ran on one made before it; `before` is the count
/// when it started), and that connection ended (EOF or reset) before a response head.
fn died_on_reused_connection(
    client: &HttpClient,
    before: u64,
    e: &hyper_util::client::legacy::Error,
) -> bool {
    !e.is_connect() && client.inner.connections.load(Ordering::Acquire) == before && closed_before_response(e)
}

impl tower::Service<http::Request<Full<Bytes>>> for HttpClient {
    type Response = http::Response<Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Full<Bytes>>) -> Self::Future {
        let client = self.clone();
        Box::pin(async move { client.request(request).await })
    }
}

/// A copy of a buffered request (extensions are not copied; keypool sets none).
fn copy_request(request: &http::Request<Full<Bytes>>) -> http::Request<Full<Bytes>> {
    let mut copy = http::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

fn closed_before_response(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        source = err.source();
    }
    false
}

type Https = HttpsConnector<HttpConnector>;
type HttpsStream = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Wraps the HTTPS connector so that it counts the connections it makes.
#[derive(Clone, Debug)]
pub(crate) struct CountingConnector {
    https: Https,
    made: Arc<AtomicU64>,
}

impl CountingConnector {
    pub(crate) fn new(https: Https) -> Self {
        Self {
            https,
            made: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl tower::Service<http::Uri> for CountingConnector {
    type Response = HttpsStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpsStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::<http::Uri>::poll_ready(&mut self.https, cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = tower::Service::<http::Uri>::call(&mut self.https, uri);
        let made = self.made.clone();
        Box::pin(async move {
            let stream = connecting.await?;
            made.fetch_add(1, Ordering::AcqRel);
            Ok(stream)
        })
    }
}
