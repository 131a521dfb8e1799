//! The pooled HTTP client keypool sends with.
//!
//! It is hyper-util's pooled client with one addition: a request that dies on a *reused*
//! connection before any response arrives (the server closed the connection while it sat idle
//! in the pool, and the close crossed our request on the wire) is sent once more on a fresh
//! connection. hyper-util already does this when it notices the close before writing; this
//! covers the race where it notices after. A request on a fresh connection is never repeated,
//! and the call state machine never sees the dead connection, so no key is spent on it.
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

    /// Sends a request; see the module docs for the one retry on a stale connection.
    pub async fn request(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        self.start(request).await
    }

    /// Starts a request ([`request`](Self::request) as a nameable future, so that a call keeps
    /// it in place instead of boxing it per attempt).
    pub(crate) fn start(&self, request: http::Request<Full<Bytes>>) -> Sending {
        let connections = self.inner.connections.load(Ordering::Acquire);
        let again = copy_request(&request);
        Sending {
            pending: self.inner.client.request(request),
            again: Some((self.clone(), again)),
            connections,
        }
    }
}

/// A request on its way: the exchange, and until it has answered, what a repeat on a fresh
/// connection needs.
pub(crate) struct Sending {
    pending: hyper_util::client::legacy::ResponseFuture,
    /// The client and a copy of the request, while a repeat is still possible.
    again: Option<(HttpClient, http::Request<Full<Bytes>>)>,
    /// The client's connection count when the request started.
    connections: u64,
}

impl Future for Sending {
    type Output = Result<http::Response<Incoming>, hyper_util::client::legacy::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let result = std::task::ready!(Pin::new(&mut this.pending).poll(cx));
            match (result, this.again.take()) {
                (Err(e), Some((client, request))) if this.died_on_reused_connection(&client, &e) => {
                    // Once, on a fresh connection (the module docs).
                    this.pending = client.inner.client.request(request);
                }
                (other, _) => return Poll::Ready(other),
            }
        }
    }
}

impl Sending {
    /// Whether the request failed because a pooled connection had been closed by the server:
    /// no connection was made while it ran (so it ran on one made before it), and that
    /// connection ended (EOF or reset) before a response head.
    fn died_on_reused_connection(&self, client: &HttpClient, e: &hyper_util::client::legacy::Error) -> bool {
        !e.is_connect()
            && client.inner.connections.load(Ordering::Acquire) == self.connections
            && closed_before_response(e)
    }
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
