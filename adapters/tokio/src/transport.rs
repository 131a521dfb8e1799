//! The pooled HTTP client keypool sends with.
//!
//! It is hyper-util's pooled client with one addition: a request that dies on a *reused*
//! connection before any response arrives (the server closed the connection while it sat idle
//! in the pool, and the close crossed our request on the wire) is sent once more, through the
//! pool again (the dead connection has left it, so on another one, a new one unless another
//! connection sits idle). hyper-util already does this when it notices the close before writing; this
//! covers the race where it notices after. A request on a fresh connection is never repeated.
//! [`HttpClient::request`] repeats from a copy of the request; a keypool call's exchange
//! ([`Sending`]) only reports the case, and the call's loop sends the same attempt again
//! (`Io::Resend`, `Call::resend`: the same key and attempt number, nothing marked), so that
//! no request is copied up front for a race that is rare.
//!
//! To tell reused from fresh, every connection carries the instant it was made ([`ConnectedAt`]);
//! a connection made before the request started was reused. (A count of connections made,
//! compared before and after, is cheaper — hyper-util copies a connection's extras into every
//! response — but it is not exact: hyper-util races a new connection against the pool for a
//! request that finds no idle one at once, and a connection made that way for the request
//! itself, which then took the pooled one after all, made it look fresh and lost the repeat.)

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
        Sending {
            started: (repeat == Repeat::Possible).then(Instant::now),
            pending: self.inner.request(request),
        }
    }
}

/// Whether a request may still be repeated.
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
    /// it again is due (the module docs).
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
    /// When the request started, unless it is a repeat.
    started: Option<Instant>,
}

impl Future for Sending {
    type Output = Result<http::Response<Incoming>, Unanswered>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let result = std::task::ready!(Pin::new(&mut this.pending).poll(cx));
        Poll::Ready(result.map_err(|e| match this.started {
            Some(started) if died_on_reused_connection(&e, started) => Unanswered::Stale(e),
            _ => Unanswered::Failed(e),
        }))
    }
}

/// Whether a request failed because a pooled connection had been closed by the server: the
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

/// When a connection was made; carried in [`Connected`] extras.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectedAt(pub(crate) Instant);

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
    /// What the stream says (HTTP/2 negotiated, proxied) and when it was made, but not the
    /// stream's own extra, the socket addresses (`HttpInfo`): hyper-util copies a connection's
    /// extras into every response it carries (an allocation each), and nothing reads those.
    fn connected(&self) -> Connected {
        let stream = self.stream.connected();
        let connected = Connected::new()
            .proxy(stream.is_proxied())
            .extra(ConnectedAt(self.at));
        if stream.is_negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
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
