//! The pooled HTTP client keypool sends with.
//!
//! It is hyper-util's pooled client with one addition: a request that dies on a *reused*
//! connection before any response arrives (the server closed the connection while it sat idle
//! in the pool, and the close crossed our request on the wire) is sent once more on a fresh
//! connection. hyper-util already does this when it notices the close before writing; this
//! covers the race where it notices after. A request on a fresh connection is never repeated,
//! and the call state machine never sees the dead connection, so no key is spent on it. To
//! tell reused from fresh, every connection carries the instant it was made ([`ConnectedAt`]);
//! a connection made before the request started was reused.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::driver::BoxError;

type Inner = hyper_util::client::legacy::Client<StampedConnector, Full<Bytes>>;

/// The pooled client (HTTP and HTTPS, HTTP/1.1 and HTTP/2) behind a [`Client`](crate::Client);
/// also a `tower::Service`, e.g. as the inner service of a [`KeypoolLayer`](crate::KeypoolLayer).
/// Cheap to clone (the hyper-util client, its connector and pool handles, sit behind one `Arc`).
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

impl HttpClient {
    pub(crate) fn new(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
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
        let started = Instant::now();
        let again = copy_request(&request);
        Sending {
            pending: self.inner.request(request),
            again: Some((self.clone(), again)),
            started,
        }
    }
}

/// A request on its way: the exchange, and until it has answered, what a repeat on a fresh
/// connection needs.
pub(crate) struct Sending {
    pending: hyper_util::client::legacy::ResponseFuture,
    /// The client and a copy of the request, while a repeat is still possible.
    again: Option<(HttpClient, http::Request<Full<Bytes>>)>,
    started: Instant,
}

impl Future for Sending {
    type Output = Result<http::Response<Incoming>, hyper_util::client::legacy::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let result = std::task::ready!(Pin::new(&mut this.pending).poll(cx));
            match result {
                Err(e) if died_on_reused_connection(&e, this.started) => match this.again.take() {
                    // Once, on a fresh connection (the module docs).
                    Some((client, request)) => this.pending = client.inner.request(request),
                    None => return Poll::Ready(Err(e)),
                },
                other => {
                    this.again = None;
                    return Poll::Ready(other);
                }
            }
        }
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

/// Whether the request failed because a pooled connection had been closed by the server: the
/// connection predates the request, and it ended (EOF or reset) before a response head.
fn died_on_reused_connection(e: &hyper_util::client::legacy::Error, started: Instant) -> bool {
    if e.is_connect() {
        return false;
    }
    let reused = e.connect_info().is_some_and(|info| {
        let mut extensions = http::Extensions::new();
        info.get_extras(&mut extensions);
        extensions.get::<ConnectedAt>().is_some_and(|at| at.0 < started)
    });
    reused && closed_before_response(e)
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

/// When a connection was made; carried in [`Connected`] extras.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectedAt(pub(crate) Instant);

type Https = HttpsConnector<HttpConnector>;
type HttpsStream = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Wraps the HTTPS connector so that every connection records when it was made.
#[derive(Clone, Debug)]
pub(crate) struct StampedConnector(pub(crate) Https);

impl tower::Service<http::Uri> for StampedConnector {
    type Response = Stamped;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stamped, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::<http::Uri>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = tower::Service::<http::Uri>::call(&mut self.0, uri);
        Box::pin(async move {
            let stream = connecting.await?;
            Ok(Stamped {
                stream,
                at: Instant::now(),
            })
        })
    }
}

/// A connection and the instant it was made.
#[derive(Debug)]
pub(crate) struct Stamped {
    stream: HttpsStream,
    at: Instant,
}

impl Connection for Stamped {
    fn connected(&self) -> Connected {
        self.stream.connected().extra(ConnectedAt(self.at))
    }
}

impl Read for Stamped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl Write for Stamped {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
}
