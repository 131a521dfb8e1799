//! Connection plumbing: a socket wrapper that counts flushes and can turn its close into a TCP
//! reset, and the response body that writes scripted chunks and endings.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::server::{OutcomeEnd, Shared};

/// State shared between one connection's socket wrapper and the bodies written on it.
#[derive(Debug)]
pub(crate) struct ConnCtl {
    pub(crate) id: u64,
    pub(crate) tls: bool,
    /// Completed `poll_flush` calls on the socket.
    flushes: AtomicU64,
    /// Bodies waiting for the next flush.
    waiters: Mutex<Vec<Waker>>,
    /// Close with a TCP reset (SO_LINGER 0) and refuse further writes.
    reset: AtomicBool,
    /// Bytes written straight to the socket when the connection is dropped (a partial head).
    tail: Mutex<Option<Bytes>>,
}

impl ConnCtl {
    pub(crate) fn new(id: u64, tls: bool) -> Arc<Self> {
        Arc::new(Self {
            id,
            tls,
            flushes: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            reset: AtomicBool::new(false),
            tail: Mutex::new(None),
        })
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }

    fn on_flush(&self) {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
        for w in waiters {
            w.wake();
        }
    }

    fn wait_flush(&self, cx: &Context<'_>) {
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(cx.waker().clone());
    }

    /// From now on, writes fail and closing the socket sends a TCP reset.
    pub(crate) fn set_reset(&self) {
        self.reset.store(true, Ordering::Release);
    }

    /// When the connection is dropped, write `bytes` to the socket (beneath TLS, if any) first.
    pub(crate) fn set_tail(&self, bytes: Bytes) {
        *self.tail.lock().unwrap_or_else(PoisonError::into_inner) = Some(bytes);
    }

    fn is_reset(&self) -> bool {
        self.reset.load(Ordering::Acquire)
    }
}

/// The TCP socket of one connection, under TLS if any.
pub(crate) struct Tracked {
    inner: TcpStream,
    ctl: Arc<ConnCtl>,
}

impl Tracked {
    pub(crate) fn new(inner: TcpStream, ctl: Arc<ConnCtl>) -> Self {
        Self { inner, ctl }
    }

    fn reset_error() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, "keypool-mock: scripted reset")
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let tail = self
            .ctl
            .tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(tail) = tail {
            // A few bytes into an idle socket's send buffer: a non-blocking write takes them all.
            let _ = self.inner.try_write(&tail);
        }
        if self.ctl.is_reset() {
            // SO_LINGER 0: close() sends RST instead of FIN and does not block.
            let _ = socket2::SockRef::from(&self.inner).set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ctl.is_reset() {
            return Poll::Ready(Err(Self::reset_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.ctl.is_reset() {
            return Poll::Ready(Err(Self::reset_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.ctl.is_reset() {
            return Poll::Ready(Err(Self::reset_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ctl.is_reset() {
            return Poll::Ready(Err(Self::reset_error()));
        }
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = r {
            self.ctl.on_flush();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ctl.is_reset() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Records how one exchange ended, when dropped.
pub(crate) struct ExchangeGuard {
    pub(crate) shared: Arc<Shared>,
    pub(crate) request: usize,
    pub(crate) streaming: bool,
    pub(crate) bytes_sent: usize,
    /// Set when the exchange reached its scripted end.
    pub(crate) end: Option<OutcomeEnd>,
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        let end = self.end.unwrap_or_else(|| {
            if self.shared.is_shutting_down() {
                OutcomeEnd::ServerShutdown
            } else {
                OutcomeEnd::ClientGone
            }
        });
        self.shared
            .record_outcome(self.request, self.streaming, self.bytes_sent, end);
    }
}

/// What happens after the last chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum After {
    End,
    Stall,
    Reset,
    Eof,
}

/// The error a body returns to make hyper drop the connection (or reset the HTTP/2 stream).
#[derive(Debug)]
pub(crate) struct ScriptedAbort;

impl std::fmt::Display for ScriptedAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("keypool-mock: scripted abort")
    }
}

impl std::error::Error for ScriptedAbort {}

/// A response body written as scripted chunks, with delays and a scripted end.
pub(crate) struct MockBody {
    chunks: VecDeque<Bytes>,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    sent_any: bool,
    after: After,
    /// Exact length, when the body is sent whole with a clean end (gives `content-length`).
    exact: Option<u64>,
    conn: Arc<ConnCtl>,
    /// HTTP/1: a reset closes the whole connection.
    http1: bool,
    /// The flush count when the last chunk was handed to hyper.
    flush_mark: Option<u64>,
    guard: ExchangeGuard,
}

impl MockBody {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        payload: Bytes,
        chunk_size: Option<usize>,
        event_bounds: Option<Vec<usize>>,
        delay: Duration,
        after: After,
        exact_len: bool,
        conn: Arc<ConnCtl>,
        http1: bool,
        guard: ExchangeGuard,
    ) -> Self {
        let len = payload.len() as u64;
        let chunks = split(payload, chunk_size, event_bounds);
        Self::with_chunks(chunks, len, delay, after, exact_len, conn, http1, guard)
    }

    /// A body of ready-made chunks (`len` bytes in all), written one per frame.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn with_chunks(
        chunks: VecDeque<Bytes>,
        len: u64,
        delay: Duration,
        after: After,
        exact_len: bool,
        conn: Arc<ConnCtl>,
        http1: bool,
        guard: ExchangeGuard,
    ) -> Self {
        let exact = (exact_len && after == After::End).then_some(len);
        Self {
            chunks,
            delay,
            sleep: None,
            sent_any: false,
            after,
            exact,
            conn,
            http1,
            flush_mark: None,
            guard,
        }
    }
}

/// Cuts a payload into chunks of `chunk_size` bytes, else at the event bounds, else not at all.
fn split(payload: Bytes, chunk_size: Option<usize>, event_bounds: Option<Vec<usize>>) -> VecDeque<Bytes> {
    let mut chunks = VecDeque::new();
    match (chunk_size, event_bounds) {
        (Some(size), _) => {
            let size = size.max(1);
            let mut at = 0;
            while at < payload.len() {
                let end = (at + size).min(payload.len());
                chunks.push_back(payload.slice(at..end));
                at = end;
            }
        }
        (None, Some(bounds)) => {
            let mut at = 0;
            for b in bounds.into_iter().chain(std::iter::once(payload.len())) {
                let b = b.min(payload.len());
                if b > at {
                    chunks.push_back(payload.slice(at..b));
                    at = b;
                }
            }
        }
        (None, None) => {
            if !payload.is_empty() {
                chunks.push_back(payload.clone());
            }
        }
    }
    chunks
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = ScriptedAbort;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ScriptedAbort>>> {
        let this = &mut *self;
        if this.flush_mark.is_none() {
            this.flush_mark = Some(this.conn.flushes());
        }
        if !this.chunks.is_empty() {
            if this.sent_any && !this.delay.is_zero() {
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.delay)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            if let Some(chunk) = this.chunks.pop_front() {
                this.sent_any = true;
                this.guard.bytes_sent += chunk.len();
                this.flush_mark = Some(this.conn.flushes());
                if this.chunks.is_empty() && this.after == After::End {
                    this.guard.end = Some(OutcomeEnd::Completed);
                }
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
        match this.after {
            After::End => {
                this.guard.end = Some(OutcomeEnd::Completed);
                Poll::Ready(None)
            }
            After::Stall => Poll::Pending,
            After::Reset | After::Eof => {
                // Abort only once every byte handed out has been flushed to the socket, so the
                // client is sure to receive them before the connection goes away.
                let mark = this.flush_mark.unwrap_or(0);
                if this.conn.flushes() <= mark {
                    this.conn.wait_flush(cx);
                    if this.conn.flushes() <= mark {
                        return Poll::Pending;
                    }
                }
                if this.after == After::Reset && this.http1 {
                    this.conn.set_reset();
                }
                this.guard.end = Some(OutcomeEnd::Aborted);
                Poll::Ready(Some(Err(ScriptedAbort)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.after == After::End && self.guard.end.is_some()
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Reads a whole request body.
pub(crate) async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, hyper::Error> {
    Ok(body.collect().await?.to_bytes())
}
