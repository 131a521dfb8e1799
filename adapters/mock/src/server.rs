//! The server: listeners, the runtime thread, scripts, records and the request handler.

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::io::{After, ConnCtl, ExchangeGuard, MockBody, Tracked, read_body};
use crate::script::{
    Body, Ending, Fault, Flavor, KeyScript, Reply, RetryAfter, Scenario, SseEvent, StreamScript,
};
use crate::tls;
use crate::{anthropic, openai};

type BoxError = Box<dyn StdError + Send + Sync>;

/// A running fake Anthropic upstream, listening on `127.0.0.1` on one plain HTTP port and one
/// TLS port (HTTP/1.1, and HTTP/2 by prior knowledge or ALPN `h2`).
///
/// It runs on its own tokio runtime on a background thread, so blocking tests and async tests
/// (on any runtime) can use it alike. Dropping it (or [`MockServer::shutdown`]) stops it.
///
/// Replies are chosen per request: a request on a known endpoint whose key has a scripted reply
/// left takes the next one; otherwise it gets the key's default, else the fallback
/// ([`Reply::ok`] unless set). A request without a key gets the missing-key reply (401 unless
/// set). An unknown path gets 404 `not_found_error` and consumes nothing. Every request is
/// recorded, unknown paths included.
pub struct MockServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls_addr: SocketAddr,
    ca_pem: String,
    ca_der: Vec<u8>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for MockServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.addr)
            .field("tls_addr", &self.tls_addr)
            .finish()
    }
}

/// A request the mock received.
#[derive(Clone)]
pub struct Recorded {
    /// Position in [`MockServer::requests`] (0-based, in order of arrival).
    pub index: usize,
    /// The key, from `x-api-key` or else `authorization: Bearer …`.
    pub key: Option<String>,
    /// The method.
    pub method: Method,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub uri: String,
    /// The HTTP version.
    pub version: Version,
    /// The request headers.
    pub headers: HeaderMap,
    /// The whole request body.
    pub body: Bytes,
    /// When the request head and body had been read.
    pub received_at: Instant,
    /// The same moment, as wall time.
    pub received_wall: SystemTime,
    /// Which connection it came on (numbered from 0 per server, both ports together).
    pub connection: u64,
    /// Whether it came on the TLS port.
    pub tls: bool,
    /// The `request-id` the mock answers with.
    pub request_id: String,
}

impl Recorded {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or("")
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// Whether the body is JSON with `"stream": true`.
    pub fn is_stream_request(&self) -> bool {
        self.json()
            .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
            .unwrap_or(false)
    }
}

impl fmt::Debug for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let redact = k == "x-api-key" || k == "authorization";
                (
                    k.as_str(),
                    if redact {
                        "<redacted>"
                    } else {
                        v.to_str().unwrap_or("<binary>")
                    },
                )
            })
            .collect();
        f.debug_struct("Recorded")
            .field("index", &self.index)
            .field("key", &self.key.as_deref().map(key_hint))
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("headers", &headers)
            .field("body_len", &self.body.len())
            .field("connection", &self.connection)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// A short, non-secret hint of a key for logs: its first 4 and last 2 characters (a key of 8
/// characters or fewer: at most its first 2, and never more than a third of it).
pub fn key_hint(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        let head: String = chars.iter().take((chars.len() / 3).min(2)).collect();
        format!("{head}…")
    } else {
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[chars.len() - 2..].iter().collect();
        format!("{head}…{tail}")
    }
}

/// How one exchange (a request and its answer) ended, seen from the server. Its `Debug` shows
/// the key's hint only, like [`Recorded`]'s.
#[derive(Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Index of the request in [`MockServer::requests`].
    pub request: usize,
    /// The request's key.
    pub key: Option<String>,
    /// Whether the answer was a `text/event-stream` body.
    pub streaming: bool,
    /// Body bytes handed to the connection (payload only, no chunk framing).
    pub bytes_sent: usize,
    /// How it ended.
    pub end: OutcomeEnd,
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("request", &self.request)
            .field("key", &self.key.as_deref().map(key_hint))
            .field("streaming", &self.streaming)
            .field("bytes_sent", &self.bytes_sent)
            .field("end", &self.end)
            .finish()
    }
}

/// The end of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeEnd {
    /// The scripted body was written to its scripted clean end (complete, end-early, end-after).
    Completed,
    /// The mock aborted it as scripted (a reset or close, before or within the body).
    Aborted,
    /// The client went away (or reset the stream) before the scripted end: the connection broke,
    /// so the body or the pending answer was dropped. Stalls always end this way or by shutdown.
    ClientGone,
    /// The server shut down before the scripted end.
    ServerShutdown,
}

/// A wait that timed out; carries how many items there were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitTimeout {
    /// How many items had been recorded when the wait gave up.
    pub have: usize,
    /// How many were awaited.
    pub wanted: usize,
}

impl fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out waiting for {} records, have {}",
            self.wanted, self.have
        )
    }
}

impl StdError for WaitTimeout {}

struct KeyState {
    queue: VecDeque<Reply>,
    default: Option<Reply>,
}

struct State {
    flavor: Flavor,
    fallback: Reply,
    missing_key: Reply,
    keys: HashMap<String, KeyState>,
    requests: Vec<Recorded>,
    outcomes: Vec<Outcome>,
    next_request_id: u64,
    /// Connections being served now.
    open_connections: usize,
}

impl State {
    fn new(flavor: Flavor) -> Self {
        Self {
            flavor,
            fallback: Reply::ok(),
            missing_key: missing_key_reply(flavor),
            keys: HashMap::new(),
            requests: Vec::new(),
            outcomes: Vec::new(),
            next_request_id: 0,
            open_connections: 0,
        }
    }

    fn key(&mut self, key: &str) -> &mut KeyState {
        self.keys.entry(key.to_owned()).or_insert_with(|| KeyState {
            queue: VecDeque::new(),
            default: None,
        })
    }

    fn load(&mut self, scenario: Scenario) {
        self.flavor = scenario.provider;
        self.fallback = scenario.fallback.unwrap_or_else(Reply::ok);
        self.missing_key = scenario
            .missing_key
            .unwrap_or_else(|| missing_key_reply(scenario.provider));
        self.keys.clear();
        for (k, KeyScript { script, default }) in scenario.keys {
            self.keys.insert(
                k,
                KeyState {
                    queue: script.into(),
                    default,
                },
            );
        }
    }

    fn choose(&mut self, key: Option<&str>) -> Reply {
        let Some(key) = key else {
            return self.missing_key.clone();
        };
        if let Some(ks) = self.keys.get_mut(key) {
            if let Some(r) = ks.queue.pop_front() {
                return r;
            }
            if let Some(d) = &ks.default {
                return d.clone();
            }
        }
        self.fallback.clone()
    }
}

fn missing_key_reply(flavor: Flavor) -> Reply {
    match flavor {
        Flavor::Anthropic => Reply::error(401, "authentication_error", "x-api-key header is required"),
        Flavor::OpenAi => openai::missing_key(),
    }
}

/// State shared by the handle and the server thread.
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    shutting_down: AtomicBool,
    next_conn: AtomicU64,
    /// Async waiters, woken on every new record.
    wakers: Mutex<Vec<Waker>>,
    /// Bumped to ask every connection to close once idle.
    close_idle: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn record_outcome(&self, request: usize, streaming: bool, bytes_sent: usize, end: OutcomeEnd) {
        let mut st = self.lock();
        let key = st.requests.get(request).and_then(|r| r.key.clone());
        st.outcomes.push(Outcome {
            request,
            key,
            streaming,
            bytes_sent,
            end,
        });
        drop(st);
        self.notify();
    }

    /// Wakes blocking and async waiters; call after releasing the state lock.
    fn notify(&self) {
        self.changed.notify_all();
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(PoisonError::into_inner));
        for w in wakers {
            w.wake();
        }
    }

    fn wait<T>(
        &self,
        timeout: Duration,
        wanted: usize,
        count: impl Fn(&State) -> usize,
        out: impl Fn(&State) -> T,
    ) -> Result<T, WaitTimeout> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let have = count(&st);
            if have >= wanted {
                return Ok(out(&st));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitTimeout { have, wanted });
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// An async wait on the records, runtime-agnostic: woken by new records, and by a timer thread
/// at the deadline.
struct WaitFuture<'a, T> {
    shared: &'a Shared,
    deadline: Instant,
    wanted: usize,
    count: fn(&State) -> usize,
    out: fn(&State) -> T,
    timer_started: bool,
}

impl<T> Future for WaitFuture<'_, T> {
    type Output = Result<T, WaitTimeout>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let st = self.shared.lock();
        let have = (self.count)(&st);
        if have >= self.wanted {
            return Poll::Ready(Ok((self.out)(&st)));
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Poll::Ready(Err(WaitTimeout {
                have,
                wanted: self.wanted,
            }));
        }
        // Registered while the state lock is held, so no record can slip in unnoticed.
        self.shared
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(cx.waker().clone());
        drop(st);
        if !self.timer_started {
            self.timer_started = true;
            let waker = cx.waker().clone();
            let left = self.deadline - now;
            std::thread::spawn(move || {
                std::thread::sleep(left);
                waker.wake();
            });
        }
        Poll::Pending
    }
}

fn count_requests(s: &State) -> usize {
    s.requests.len()
}

fn all_requests(s: &State) -> Vec<Recorded> {
    s.requests.clone()
}

fn count_outcomes(s: &State) -> usize {
    s.outcomes.len()
}

fn all_outcomes(s: &State) -> Vec<Outcome> {
    s.outcomes.clone()
}

fn count_stream_outcomes(s: &State) -> usize {
    s.outcomes.iter().filter(|o| o.streaming).count()
}

fn stream_outcomes(s: &State) -> Vec<Outcome> {
    s.outcomes.iter().filter(|o| o.streaming).cloned().collect()
}

impl MockServer {
    /// Starts a server with the default setup (every key gets [`Reply::ok`]); returns once it
    /// listens.
    ///
    /// # Panics
    /// If it cannot bind a loopback port or start its thread; see [`MockServer::try_start`].
    pub fn start() -> Self {
        Self::start_with(Scenario::default())
    }

    /// Starts a server set up with `scenario`.
    ///
    /// # Panics
    /// If it cannot bind a loopback port or start its thread; see [`MockServer::try_start_with`].
    pub fn start_with(scenario: Scenario) -> Self {
        match Self::try_start_with(scenario) {
            Ok(s) => s,
            Err(e) => panic!("keypool-mock: cannot start: {e}"),
        }
    }

    /// Starts a server in OpenAI mode ([`crate::openai`]) where every key gets [`Reply::ok`].
    ///
    /// # Panics
    /// If it cannot bind a loopback port or start its thread.
    pub fn start_openai() -> Self {
        Self::start_with(Scenario::openai())
    }

    /// Which API the server fakes now.
    pub fn flavor(&self) -> Flavor {
        self.shared.lock().flavor
    }

    /// Starts a server with the default setup, reporting failure.
    pub fn try_start() -> std::io::Result<Self> {
        Self::try_start_with(Scenario::default())
    }

    /// Starts a server set up with `scenario`, reporting failure.
    pub fn try_start_with(scenario: Scenario) -> std::io::Result<Self> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::try_start_on(loopback, loopback, scenario)
    }

    /// Starts a server on chosen addresses (port 0 picks a free port), e.g. for
    /// `keypool mock-upstream --listen`.
    pub fn try_start_on(plain: SocketAddr, tls: SocketAddr, scenario: Scenario) -> std::io::Result<Self> {
        let plain = StdTcpListener::bind(plain)?;
        let tls_listener = StdTcpListener::bind(tls)?;
        plain.set_nonblocking(true)?;
        tls_listener.set_nonblocking(true)?;
        let addr = plain.local_addr()?;
        let tls_addr = tls_listener.local_addr()?;
        let material = tls::generate().map_err(std::io::Error::other)?;
        let acceptor = TlsAcceptor::from(Arc::new(material.config));

        let mut state = State::new(scenario.provider);
        state.load(scenario);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            shutting_down: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            wakers: Mutex::new(Vec::new()),
            close_idle: tokio::sync::watch::Sender::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("keypool-mock".into())
            .spawn(move || {
                let res =
                    runtime.block_on(accept_loop(thread_shared, plain, tls_listener, acceptor, stop_rx));
                if let Err(e) = res {
                    eprintln!("keypool-mock: server stopped: {e}");
                }
                // Dropping the runtime drops every connection task (and records their outcomes).
                drop(runtime);
            })?;
        Ok(Self {
            shared,
            addr,
            tls_addr,
            ca_pem: material.ca_pem,
            ca_der: material.ca_der,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://localhost:PORT` (no trailing slash); trust [`MockServer::ca_pem`] to use it. The
    /// certificate is also valid for `127.0.0.1`.
    pub fn tls_url(&self) -> String {
        format!("https://localhost:{}", self.tls_addr.port())
    }

    /// The plain HTTP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS address.
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr
    }

    /// The CA certificate that signed the server certificate, PEM-encoded.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The CA certificate, DER-encoded.
    pub fn ca_der(&self) -> Vec<u8> {
        self.ca_der.clone()
    }

    /// Appends replies to `key`'s queue: the key's next requests get them in order.
    pub fn script(&self, key: &str, replies: impl IntoIterator<Item = Reply>) {
        self.shared.lock().key(key).queue.extend(replies);
    }

    /// Sets the reply `key` gets once its queue is used up.
    pub fn set_default(&self, key: &str, reply: Reply) {
        self.shared.lock().key(key).default = Some(reply);
    }

    /// Sets the reply for keys with no queue left and no default (initially [`Reply::ok`]).
    pub fn set_fallback(&self, reply: Reply) {
        self.shared.lock().fallback = reply;
    }

    /// Sets the reply to requests without a key (initially 401 `authentication_error`).
    pub fn set_missing_key(&self, reply: Reply) {
        self.shared.lock().missing_key = reply;
    }

    /// Replaces all scripts, defaults and the fallback with `scenario` (records are kept).
    pub fn load(&self, scenario: Scenario) {
        self.shared.lock().load(scenario);
    }

    /// Clears scripts, defaults, the fallback and all records.
    pub fn reset(&self) {
        let mut st = self.shared.lock();
        let next = st.next_request_id;
        let open = st.open_connections;
        *st = State::new(st.flavor);
        st.next_request_id = next;
        st.open_connections = open;
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The requests that carried `key`, in order.
    pub fn requests_for(&self, key: &str) -> Vec<Recorded> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .cloned()
            .collect()
    }

    /// How many requests were received.
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// How every finished exchange ended, in the order they ended.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.shared.lock().outcomes.clone()
    }

    /// The outcomes of `text/event-stream` answers only.
    pub fn stream_outcomes(&self) -> Vec<Outcome> {
        self.shared
            .lock()
            .outcomes
            .iter()
            .filter(|o| o.streaming)
            .cloned()
            .collect()
    }

    /// How many streamed answers ended because the client went away.
    pub fn cancelled_streams(&self) -> usize {
        self.shared
            .lock()
            .outcomes
            .iter()
            .filter(|o| o.streaming && o.end == OutcomeEnd::ClientGone)
            .count()
    }

    /// Blocks until at least `n` requests were received (or `timeout` passes); returns them.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Result<Vec<Recorded>, WaitTimeout> {
        self.shared.wait(timeout, n, count_requests, all_requests)
    }

    /// Blocks until at least `n` exchanges ended (or `timeout` passes); returns their outcomes.
    pub fn wait_for_outcomes(&self, n: usize, timeout: Duration) -> Result<Vec<Outcome>, WaitTimeout> {
        self.shared.wait(timeout, n, count_outcomes, all_outcomes)
    }

    /// Blocks until at least `n` streamed answers ended (or `timeout` passes); returns their
    /// outcomes. This is how a test waits for the mock to notice that a client dropped a stream.
    ///
    /// In an async test, prefer [`MockServer::wait_for_stream_outcomes_async`]: blocking the
    /// test's runtime thread can keep the client's own connection tasks from closing the socket.
    pub fn wait_for_stream_outcomes(&self, n: usize, timeout: Duration) -> Result<Vec<Outcome>, WaitTimeout> {
        self.shared
            .wait(timeout, n, count_stream_outcomes, stream_outcomes)
    }

    fn wait_async<T>(
        &self,
        n: usize,
        timeout: Duration,
        count: fn(&State) -> usize,
        out: fn(&State) -> T,
    ) -> impl Future<Output = Result<T, WaitTimeout>> + Send + '_
    where
        T: Send + 'static,
    {
        WaitFuture {
            shared: &self.shared,
            deadline: Instant::now() + timeout,
            wanted: n,
            count,
            out,
            timer_started: false,
        }
    }

    /// [`MockServer::wait_for_requests`] without blocking the thread; works on any async runtime.
    pub fn wait_for_requests_async(
        &self,
        n: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Recorded>, WaitTimeout>> + Send + '_ {
        self.wait_async(n, timeout, count_requests, all_requests)
    }

    /// [`MockServer::wait_for_outcomes`] without blocking the thread; works on any async runtime.
    pub fn wait_for_outcomes_async(
        &self,
        n: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Outcome>, WaitTimeout>> + Send + '_ {
        self.wait_async(n, timeout, count_outcomes, all_outcomes)
    }

    /// [`MockServer::wait_for_stream_outcomes`] without blocking the thread; works on any async
    /// runtime.
    pub fn wait_for_stream_outcomes_async(
        &self,
        n: usize,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Outcome>, WaitTimeout>> + Send + '_ {
        self.wait_async(n, timeout, count_stream_outcomes, stream_outcomes)
    }

    /// How many client connections are open now (both ports).
    pub fn open_connections(&self) -> usize {
        self.shared.lock().open_connections
    }

    /// Closes every client connection once it is idle — at once for a keep-alive connection
    /// waiting for its next request, after the answer for one with an exchange in flight (HTTP/1.1
    /// closes with FIN, HTTP/2 sends GOAWAY) — and blocks until no connection is open, or
    /// `timeout` passes. This is how a test makes an upstream drop the connections a client
    /// keeps pooled.
    pub fn close_idle_connections(&self, timeout: Duration) -> Result<(), WaitTimeout> {
        self.shared.close_idle.send_modify(|generation| *generation += 1);
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.open_connections == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitTimeout {
                    have: st.open_connections,
                    wanted: 0,
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Stops the server: closes the listeners and every open connection, and waits for its thread.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    plain: StdTcpListener,
    tls_listener: StdTcpListener,
    acceptor: TlsAcceptor,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let plain = TcpListener::from_std(plain)?;
    let tls_listener = TcpListener::from_std(tls_listener)?;
    loop {
        let (stream, tls) = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = plain.accept() => (r, false),
            r = tls_listener.accept() => (r, true),
        };
        let Ok((stream, _peer)) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let ctl = ConnCtl::new(shared.next_conn.fetch_add(1, Ordering::Relaxed), tls);
        let io = Tracked::new(stream, ctl.clone());
        let shared = shared.clone();
        if tls {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls_io) = acceptor.accept(io).await {
                    serve(tls_io, shared, ctl).await;
                }
            });
        } else {
            tokio::spawn(serve(io, shared, ctl));
        }
    }
}

async fn serve<I>(io: I, shared: Arc<Shared>, ctl: Arc<ConnCtl>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = OpenConnection::new(shared.clone());
    let mut close_idle = shared.close_idle.subscribe();
    close_idle.mark_unchanged();
    let svc = service_fn(move |req| handle(shared.clone(), ctl.clone(), req));
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // A broken or aborted connection is a normal end here.
    tokio::select! {
        _ = conn.as_mut() => return,
        changed = close_idle.changed() => {
            if changed.is_ok() {
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    let _ = conn.await;
}

/// Counts a connection as open while it lives.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: Arc<Shared>) -> Self {
        shared.lock().open_connections += 1;
        Self(shared)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.open_connections = st.open_connections.saturating_sub(1);
        drop(st);
        self.0.notify();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Messages,
    CountTokens,
    Models,
    ChatCompletions,
    Responses,
    OpenAiModels,
}

/// OpenAI mode: the endpoint by the end of the path, so that `/v1/…`, `/openai/v1/…` and
/// Azure's `/openai/deployments/NAME/…` all work.
fn route_openai(method: &Method, path: &str) -> Result<Endpoint, Box<Reply>> {
    let path = path.trim_end_matches('/');
    let (endpoint, allowed) = if path.ends_with("/chat/completions") {
        (Endpoint::ChatCompletions, Method::POST)
    } else if path.ends_with("/responses") {
        (Endpoint::Responses, Method::POST)
    } else if path.ends_with("/models") {
        (Endpoint::OpenAiModels, Method::GET)
    } else {
        return Err(Box::new(openai::not_found(method, path)));
    };
    if *method == allowed {
        Ok(endpoint)
    } else {
        Err(Box::new(openai::error(
            405,
            "invalid_request_error",
            None,
            &format!("Method {method} not allowed on {path}"),
        )))
    }
}

fn route(flavor: Flavor, method: &Method, path: &str) -> Result<Endpoint, Box<Reply>> {
    if flavor == Flavor::OpenAi {
        return route_openai(method, path);
    }
    let (endpoint, allowed) = match path {
        "/v1/messages" => (Endpoint::Messages, Method::POST),
        "/v1/messages/count_tokens" => (Endpoint::CountTokens, Method::POST),
        "/v1/models" => (Endpoint::Models, Method::GET),
        _ => {
            return Err(Box::new(Reply::error(
                404,
                "not_found_error",
                &format!("Not found: {path}"),
            )));
        }
    };
    if *method == allowed {
        Ok(endpoint)
    } else {
        Err(Box::new(Reply::error(
            405,
            "invalid_request_error",
            &format!("Method {method} not allowed on {path}"),
        )))
    }
}

fn extract_key(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.to_owned());
    }
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|auth| auth.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    bearer.or_else(|| {
        // Azure-style upstreams.
        let v = headers.get("api-key")?.to_str().ok()?;
        Some(v.trim().to_owned())
    })
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnCtl>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, BoxError> {
    let (parts, body) = req.into_parts();
    let body = read_body(body).await?;
    let key = extract_key(&parts.headers);
    let flavor = shared.lock().flavor;
    let routed = route(flavor, &parts.method, parts.uri.path());
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let http1 = matches!(
        parts.version,
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    );

    let (index, request_id, reply) = {
        let mut st = shared.lock();
        let index = st.requests.len();
        st.next_request_id += 1;
        let request_id = format!("req_mock_{:016x}", st.next_request_id);
        let reply = match &routed {
            Ok(_) => st.choose(key.as_deref()),
            Err(r) => (**r).clone(),
        };
        let now = Instant::now();
        st.requests.push(Recorded {
            index,
            key,
            method: parts.method,
            uri,
            version: parts.version,
            headers: parts.headers,
            body: body.clone(),
            received_at: now,
            received_wall: SystemTime::now(),
            connection: conn.id,
            tls: conn.tls,
            request_id: request_id.clone(),
        });
        (index, request_id, reply)
    };
    shared.notify();

    let mut guard = ExchangeGuard {
        shared: shared.clone(),
        request: index,
        streaming: false,
        bytes_sent: 0,
        end: None,
    };
    if reply.head_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(reply.head_delay_ms)).await;
    }
    match reply.fault {
        None => {}
        Some(Fault::ResetBeforeHead) => {
            if http1 {
                conn.set_reset();
            }
            guard.end = Some(OutcomeEnd::Aborted);
            return Err("keypool-mock: scripted reset before head".into());
        }
        Some(Fault::CloseBeforeHead) => {
            guard.end = Some(OutcomeEnd::Aborted);
            return Err("keypool-mock: scripted close before head".into());
        }
        Some(fault @ (Fault::PartialHeadThenReset | Fault::PartialHeadThenClose)) => {
            if http1 {
                conn.set_tail(Bytes::from_static(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_mock_partial\r\ncontent-le",
                ));
                if fault == Fault::PartialHeadThenReset {
                    conn.set_reset();
                }
            }
            guard.end = Some(OutcomeEnd::Aborted);
            return Err("keypool-mock: scripted partial head".into());
        }
        Some(Fault::StallBeforeHead) => {
            // Never answers; dropped (and recorded by the guard) when the client goes away.
            std::future::pending::<()>().await;
        }
    }
    let endpoint = routed.unwrap_or(match flavor {
        Flavor::Anthropic => Endpoint::Messages,
        Flavor::OpenAi => Endpoint::ChatCompletions,
    });
    Ok(build_response(
        &reply,
        flavor,
        endpoint,
        &body,
        &request_id,
        conn,
        http1,
        guard,
    ))
}

/// A rendered body, before the ending is applied.
struct Rendered {
    payload: Bytes,
    content_type: Option<&'static str>,
    /// SSE: the end offset of each event.
    event_bounds: Option<Vec<usize>>,
    /// Where [`Ending::EndEarly`] and [`Ending::Stall`] cut.
    early_cut: usize,
    chunk_size: Option<usize>,
    chunk_delay_ms: u64,
    ending: Ending,
    /// The payload stands for this many copies of itself ([`Body::Repeated`]), one chunk each.
    repeat: usize,
}

fn render_sse(events: &[SseEvent], script: &StreamScript) -> Rendered {
    let mut payload = Vec::new();
    let mut bounds = Vec::with_capacity(events.len());
    let mut early_cut = 0;
    for (i, e) in events.iter().enumerate() {
        let is_last_stop = i + 1 == events.len() && e.is_end();
        if !is_last_stop {
            early_cut = payload.len() + e.to_bytes().len();
        }
        payload.extend_from_slice(&e.to_bytes());
        bounds.push(payload.len());
    }
    Rendered {
        payload: payload.into(),
        content_type: Some("text/event-stream; charset=utf-8"),
        event_bounds: Some(bounds),
        early_cut,
        chunk_size: script.chunk_size,
        chunk_delay_ms: script.chunk_delay_ms,
        ending: script.ending,
        repeat: 1,
    }
}

fn render_json(value: &serde_json::Value, reply: &Reply) -> Rendered {
    render_plain(Bytes::from(value.to_string()), Some("application/json"), reply)
}

fn render_plain(payload: Bytes, content_type: Option<&'static str>, reply: &Reply) -> Rendered {
    Rendered {
        early_cut: payload.len() / 2,
        payload,
        content_type,
        event_bounds: None,
        chunk_size: reply.chunk_size,
        chunk_delay_ms: reply.chunk_delay_ms,
        ending: reply.ending,
        repeat: 1,
    }
}

fn render(
    reply: &Reply,
    flavor: Flavor,
    endpoint: Endpoint,
    request_body: &[u8],
    request_id: &str,
) -> Rendered {
    let request_json: Option<serde_json::Value> = serde_json::from_slice(request_body).ok();
    let model = request_json
        .as_ref()
        .and_then(|v| v.get("model").and_then(serde_json::Value::as_str))
        .unwrap_or("claude-mock-1")
        .to_owned();
    let serial = request_id.trim_start_matches("req_mock_");
    let message_id = format!("msg_mock_{serial}");
    let chat_id = format!("chatcmpl-mock-{serial}");
    let response_id = format!("resp_mock_{serial}");
    let stream_script = |script: &StreamScript| match &script.events {
        Some(events) => render_sse(events, script),
        None => {
            let events = match (endpoint, flavor) {
                (Endpoint::Responses, _) => openai::response_events(&response_id, &model, script.text_deltas),
                (Endpoint::ChatCompletions, _) | (_, Flavor::OpenAi) => {
                    openai::chat_chunks(&chat_id, &model, script.text_deltas)
                }
                (_, Flavor::Anthropic) => anthropic::standard_events(&message_id, &model, script.text_deltas),
            };
            render_sse(&events, script)
        }
    };
    let wants_stream = request_json
        .as_ref()
        .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    let auto_stream = || {
        let script = StreamScript {
            chunk_size: reply.chunk_size,
            chunk_delay_ms: reply.chunk_delay_ms,
            ending: reply.ending,
            ..StreamScript::new()
        };
        stream_script(&script)
    };
    match &reply.body {
        Body::Auto => match endpoint {
            Endpoint::ChatCompletions if wants_stream => auto_stream(),
            Endpoint::ChatCompletions => render_json(&openai::chat_completion(&chat_id, &model), reply),
            Endpoint::Responses if wants_stream => auto_stream(),
            Endpoint::Responses => render_json(&openai::response(&response_id, &model), reply),
            Endpoint::OpenAiModels => render_json(&openai::models(), reply),
            Endpoint::Messages if wants_stream => auto_stream(),
            Endpoint::Messages => render_json(&anthropic::message(&message_id, &model), reply),
            Endpoint::CountTokens => render_json(&anthropic::count_tokens(request_body), reply),
            Endpoint::Models => render_json(&anthropic::models(), reply),
        },
        Body::Empty => render_plain(Bytes::new(), None, reply),
        Body::Text { text } => render_plain(
            Bytes::from(text.clone()),
            Some("text/plain; charset=utf-8"),
            reply,
        ),
        Body::Json { json } => render_json(json, reply),
        Body::Error {
            error_type,
            message,
            code,
        } => match flavor {
            Flavor::Anthropic => {
                let message = if message.is_empty() {
                    anthropic::default_error_message(error_type)
                } else {
                    message
                };
                render_json(&anthropic::error_body(error_type, message, request_id), reply)
            }
            Flavor::OpenAi => {
                let message = if message.is_empty() {
                    openai::default_error_message(error_type)
                } else {
                    message
                };
                render_json(&openai::error_body(error_type, code.as_deref(), message), reply)
            }
        },
        Body::Stream(script) => stream_script(script),
        Body::Repeated { text, times } => {
            let mut r = render_plain(
                Bytes::from(text.clone()),
                Some("text/plain; charset=utf-8"),
                reply,
            );
            r.repeat = *times;
            r.early_cut = text.len().saturating_mul(*times) / 2;
            r.chunk_size = None;
            r
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn build_response(
    reply: &Reply,
    flavor: Flavor,
    endpoint: Endpoint,
    request_body: &[u8],
    request_id: &str,
    conn: Arc<ConnCtl>,
    http1: bool,
    mut guard: ExchangeGuard,
) -> Response<MockBody> {
    let rendered = render(reply, flavor, endpoint, request_body, request_id);
    let len = rendered.payload.len().saturating_mul(rendered.repeat);
    let (cut, after) = match rendered.ending {
        Ending::Complete => (len, After::End),
        Ending::EndEarly => (rendered.early_cut, After::End),
        Ending::Stall => (rendered.early_cut, After::Stall),
        Ending::StallAfter(n) => (n.min(len), After::Stall),
        Ending::EndAfter(n) => (n.min(len), After::End),
        Ending::ResetAfter(n) => (n.min(len), After::Reset),
        Ending::EofAfter(n) => (n.min(len), After::Eof),
    };
    let sse = rendered.event_bounds.is_some();
    guard.streaming = sse;
    let exact_len = !sse && rendered.ending == Ending::Complete;

    let headers = match response_headers(reply, flavor, rendered.content_type, request_id) {
        Ok(h) => h,
        Err(msg) => return script_error(&msg, conn, http1, guard),
    };
    let Ok(status) = StatusCode::from_u16(reply.status) else {
        return script_error(&format!("invalid status {}", reply.status), conn, http1, guard);
    };
    let delay = Duration::from_millis(rendered.chunk_delay_ms);
    let body = if rendered.repeat == 1 {
        MockBody::new(
            rendered.payload.slice(..cut),
            rendered.chunk_size,
            rendered.event_bounds,
            delay,
            after,
            exact_len,
            conn,
            http1,
            guard,
        )
    } else {
        // Copies of one buffer (cheap clones), the last one cut short if the ending says so.
        let unit = rendered.payload;
        let mut chunks = VecDeque::new();
        let mut left = cut;
        while left > 0 && !unit.is_empty() {
            let n = left.min(unit.len());
            chunks.push_back(unit.slice(..n));
            left -= n;
        }
        MockBody::with_chunks(chunks, cut as u64, delay, after, exact_len, conn, http1, guard)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// A 500 saying the script itself is broken (bad header or status).
fn script_error(msg: &str, conn: Arc<ConnCtl>, http1: bool, guard: ExchangeGuard) -> Response<MockBody> {
    let body = format!("keypool-mock: invalid script: {msg}");
    let body = MockBody::new(
        Bytes::from(body),
        None,
        None,
        Duration::ZERO,
        After::End,
        true,
        conn,
        http1,
        guard,
    );
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn response_headers(
    reply: &Reply,
    flavor: Flavor,
    content_type: Option<&'static str>,
    request_id: &str,
) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    let value = |v: &str| HeaderValue::from_str(v).map_err(|_| format!("invalid header value {v:?}"));
    if reply.auto_headers && flavor == Flavor::OpenAi {
        if let Some(ct) = content_type {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        // Never an exhausted dimension, and no `openai-organization` (which would make the
        // pool scope its cooldowns to the organisation): a reply that wants one says so.
        for (name, v) in [
            ("x-request-id", request_id),
            ("openai-processing-ms", "1"),
            ("openai-version", "2020-10-01"),
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-limit-tokens", "2000000"),
            ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-remaining-tokens", "1999000"),
            ("x-ratelimit-reset-requests", "12ms"),
            ("x-ratelimit-reset-tokens", "30ms"),
        ] {
            h.insert(HeaderName::from_static(name), value(v)?);
        }
    } else if reply.auto_headers {
        if let Some(ct) = content_type {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        h.insert("request-id", value(request_id)?);
        let reset = rfc3339(SystemTime::now() + Duration::from_secs(60));
        let limited = reply.status == 429;
        for (name, limit) in [
            ("requests", 4000u64),
            ("tokens", 400_000),
            ("input-tokens", 200_000),
            ("output-tokens", 80_000),
        ] {
            let remaining = if limited { 0 } else { limit - 1 };
            h.insert(ratelimit_name(name, "limit")?, value(&limit.to_string())?);
            h.insert(ratelimit_name(name, "remaining")?, value(&remaining.to_string())?);
            h.insert(ratelimit_name(name, "reset")?, value(&reset)?);
        }
    }
    let (seconds, millis) = match &reply.retry_after {
        RetryAfter::None => (None, None),
        RetryAfter::Seconds(s) => (Some(s.clone()), None),
        RetryAfter::Millis(m) => (None, Some(m.clone())),
        RetryAfter::HttpDate(t) => (Some(httpdate::fmt_http_date(*t)), None),
        RetryAfter::HttpDateIn(secs) => (
            Some(httpdate::fmt_http_date(
                SystemTime::now() + Duration::from_secs(*secs),
            )),
            None,
        ),
        RetryAfter::Both { seconds, millis } => (Some(seconds.clone()), Some(millis.clone())),
    };
    if let Some(s) = seconds {
        h.insert(http::header::RETRY_AFTER, value(&s)?);
    }
    if let Some(m) = millis {
        h.insert("retry-after-ms", value(&m)?);
    }
    let mut explicit: Vec<HeaderName> = Vec::new();
    for (name, v) in &reply.headers {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))?;
        let v = value(v)?;
        if explicit.contains(&name) {
            h.append(name, v);
        } else {
            h.insert(name.clone(), v);
            explicit.push(name);
        }
    }
    Ok(h)
}

fn ratelimit_name(what: &str, field: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(format!("anthropic-ratelimit-{what}-{field}").as_bytes())
        .map_err(|e| e.to_string())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a wall time (UTC).
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_dates() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn key_hint_hides_the_key() {
        assert_eq!(key_hint("sk-ant-api03-abcdefgh"), "sk-a…gh");
        assert_eq!(key_hint("key-a"), "k…");
        assert_eq!(key_hint("zz"), "…");
    }

    #[test]
    fn bearer_and_x_api_key() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer tok-1"));
        assert_eq!(extract_key(&h).as_deref(), Some("tok-1"));
        h.insert("x-api-key", HeaderValue::from_static("key-x"));
        assert_eq!(extract_key(&h).as_deref(), Some("key-x"));
    }
}
