//! The gateway's HTTP server: routes, access control, forwarding with failover, admin,
//! health, metrics, reload and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keypool_core::call::{
    CallError, CallSummary, Credential, KeyMark, MarkSink, Outcome, Request as CallRequest,
};
use keypool_core::{DisableReason, Exhausted, KeyState, Pool, Profile, Transition};
use tokio::net::TcpListener;

use crate::access::{self, Access};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::status::{self, Activity, KeyChange};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the gateway shares between connections.
pub struct Shared {
    config: Config,
    pool: RwLock<Arc<Pool>>,
    client: keypool_tokio::Client,
    metrics: Arc<Metrics>,
    /// Recent transitions, per-minute counts and probes, for the status page.
    activity: Arc<Activity>,
}

/// Logs and counts every mark the gateway's calls make, as they are made.
#[derive(Debug)]
struct MarkLog {
    metrics: Arc<Metrics>,
    activity: Arc<Activity>,
    pool: &'static str,
}

impl MarkSink for MarkLog {
    fn mark(&self, pool: &Arc<Pool>, mark: &KeyMark) {
        // One upstream answer, however many keys of its organisation it marks.
        if mark.key == mark.attempted {
            self.metrics.upstream_status(mark.status.as_u16());
        }
        self.activity.mark(&self.metrics, self.pool, pool, mark);
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("pool", &self.pool())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Builds the shared state: the pool and the upstream client.
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let pool = Pool::new(config.keys.clone(), config.order, Instant::now()).map_err(|e| e.to_string())?;
        let pool = Arc::new(pool);
        let metrics = Arc::new(Metrics::new());
        let activity = Arc::new(Activity::new(Instant::now()));
        let sink = Arc::new(MarkLog {
            metrics: metrics.clone(),
            activity: activity.clone(),
            pool: config.call.profile.name(),
        });
        let mut builder = keypool_tokio::Client::builder()
            .base_url(config.upstream.clone())
            .config(config.call.clone().with_mark_sink(sink));
        for der in &config.upstream_roots {
            builder = builder.root_cert_der(der.clone());
        }
        let client = builder.build_with_pool(pool.clone()).map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            config,
            pool: RwLock::new(pool),
            client,
            metrics,
            activity,
        }))
    }

    /// What the status page shows besides the pool.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// The pool's name in logs, metrics and the admin view: its provider's (`anthropic`).
    pub fn pool_name(&self) -> &'static str {
        self.config.call.profile.name()
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The current pool (replaced on reload).
    pub fn pool(&self) -> Arc<Pool> {
        match self.pool.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the keys (key file or config file) and swaps in a pool that keeps the state of
    /// kept keys.
    pub fn reload(&self) -> Result<String, String> {
        let keys = self.config.key_source.reload().map_err(|e| e.to_string())?;
        for warning in crate::keys::implausible(&keys) {
            tracing::warn!("{warning}");
        }
        let old = self.pool();
        let new = old.reload(keys).map_err(|e| format!("invalid key list: {e}"))?;
        let kept = new
            .ids()
            .filter(|&id| old.find_fingerprint(new.fingerprint(id)).is_some())
            .count();
        let summary = format!(
            "{} keys ({} kept with their state, {} added, {} removed)",
            new.len(),
            kept,
            new.len() - kept,
            old.len() - kept
        );
        match self.pool.write() {
            Ok(mut p) => *p = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
        Ok(summary)
    }
}

/// The body the gateway sends: a keypool body relayed from upstream, or a whole buffer.
pub enum GatewayBody {
    /// A whole response made by the gateway.
    Full(Option<Bytes>),
    /// An upstream body, relayed through the call state machine.
    Relay {
        /// The body.
        body: keypool_tokio::Body,
        /// For the end-of-request log line and metrics, written once the call has ended.
        log: Option<Box<RequestLog>>,
    },
}

impl std::fmt::Debug for GatewayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayBody")
    }
}

/// What is logged when a relayed response ends. It holds what it needs cheaply (the request
/// URI shares its bytes; the key is an id into the pool) and makes strings only when the line
/// is actually written.
pub struct RequestLog {
    shared: Arc<Shared>,
    method: Method,
    uri: http::Uri,
    status: u16,
    attempts: usize,
    key: KeyLabel,
    started: Instant,
    /// The request id of keypool's own error response, if it made one.
    request_id: Option<String>,
}

/// Which key answered, for the request log.
enum KeyLabel {
    Pool(Arc<Pool>, keypool_core::KeyId),
    Byok,
    None,
}

impl KeyLabel {
    fn new(pool: Option<&Arc<Pool>>, key: Option<keypool_core::KeyId>) -> Self {
        match (pool, key) {
            (Some(pool), Some(id)) => Self::Pool(pool.clone(), id),
            (None, _) => Self::Byok,
            (Some(_), None) => Self::None,
        }
    }
}

impl std::fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pool(pool, id) => f.write_str(pool.label(*id)),
            Self::Byok => f.write_str("byok"),
            Self::None => f.write_str("-"),
        }
    }
}

impl RequestLog {
    /// Logs and counts the request, with how its call ended (the core's [`Outcome`]) and, when
    /// something went wrong, what.
    fn emit(self, outcome: Outcome, error: Option<&dyn std::fmt::Display>) {
        let elapsed = self.started.elapsed();
        self.shared.metrics.finished(elapsed);
        // The one pool is named by its provider until pools get names of their own.
        let pool = self.shared.config.call.profile.provider().name();
        self.shared.metrics.outcome(pool, outcome.as_str());
        tracing::info!(
            target: "keypool::request",
            method = %self.method,
            path = %short(self.uri.path()),
            status = self.status,
            attempts = self.attempts,
            key = %self.key,
            latency_ms = status::latency_ms(elapsed),
            outcome = outcome.as_str(),
            request_id = self.request_id.as_deref(),
            error = error.map(tracing::field::display),
            "request"
        );
    }

    /// Logs a relayed response whose call ended: how, and what broke if the upstream did.
    fn ended(self, outcome: Outcome) {
        match outcome {
            Outcome::UpstreamBroke(why) => self.emit(outcome, Some(&CallError::BodyBroken(why))),
            _ => self.emit(outcome, None),
        }
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        if let Self::Relay { log, body } = self
            && let Some(log) = log.take()
        {
            // A body dropped before its call ended (the client went away, or hyper stopped
            // polling) ends the call now: dropping it tells the core so, and that is its outcome.
            log.ended(body.outcome().unwrap_or(Outcome::ClientGone));
        }
    }
}

impl http_body::Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Relay { body, log } => {
                let frame = Pin::new(&mut *body).poll_frame(cx);
                // Once the call has ended (its last frame is out), log how.
                if frame.is_ready()
                    && let Some(outcome) = body.outcome()
                    && let Some(log) = log.take()
                {
                    log.ended(outcome);
                }
                frame.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Relay { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Relay { body, .. } => body.size_hint(),
        }
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<GatewayBody> {
    let mut res = Response::new(GatewayBody::Full(Some(body.into())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// An error made by the gateway itself, in the shape of the profile of the pool it belongs to,
/// with a request id (logged by [`handle`]).
fn error(profile: &Profile, status: StatusCode, message: &str) -> Response<GatewayBody> {
    status::error_response(profile, status, message).map(|b| GatewayBody::Full(Some(b)))
}

fn json(value: &serde_json::Value) -> Response<GatewayBody> {
    full(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

/// Handles one request. A response the gateway makes itself is logged and counted here (a
/// relayed one when its body ends, see [`RequestLog`]).
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<GatewayBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut res = route(shared.clone(), req).await;
    let profile = &shared.config.call.profile;
    status::reason_phrase(profile, &mut res);
    shared.activity.answered(uri.path(), started, res.status());
    if matches!(res.body(), GatewayBody::Full(_)) {
        status::log_answered(&shared.metrics, profile, &method, uri.path(), started, &mut res);
    }
    res
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<GatewayBody> {
    let path = req.uri().path();
    if path.starts_with("/v1/") {
        return forward(shared, req).await;
    }
    match (req.method(), path) {
        (&Method::GET, "/healthz") => health(&shared),
        (&Method::GET, "/metrics") => {
            let text = shared.metrics.render(&shared.pool(), Instant::now());
            full(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        (_, p) if p == "/admin" || p.starts_with("/admin/") => admin(&shared, &req),
        _ => error(
            &shared.config.call.profile,
            StatusCode::NOT_FOUND,
            &format!("no route for {} {}", req.method(), short(path)),
        ),
    }
}

fn short(path: &str) -> String {
    path.chars().take(100).collect()
}

fn health(shared: &Shared) -> Response<GatewayBody> {
    let pool = shared.pool();
    let now = Instant::now();
    let available = pool
        .ids()
        .filter(|&id| pool.state(id, now).is_available())
        .count();
    json(&serde_json::json!({"status": "ok", "keys": pool.len(), "available": available}))
}

fn admin(shared: &Shared, req: &Request<Incoming>) -> Response<GatewayBody> {
    let profile = &shared.config.call.profile;
    let Some(token) = &shared.config.admin_token else {
        return error(
            profile,
            StatusCode::NOT_FOUND,
            "admin routes are off: start keypool with --admin-token",
        );
    };
    let basic = status::basic_allowed(req.method())
        .then(|| status::basic_password(req.headers()))
        .flatten();
    let presented = access::presented(profile, req.headers()).or(basic.as_deref());
    if !presented.is_some_and(|t| token.ct_eq(t)) {
        // Browsers answer the challenge with Basic auth: any user name, the token as password.
        let message = format!(
            "admin routes need the admin token in {} (in a browser: as the password of Basic auth)",
            profile.credential_help()
        );
        let mut res = error(profile, StatusCode::UNAUTHORIZED, &message);
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(status::REALM));
        return res;
    }
    let pool = shared.pool();
    let now = Instant::now();
    let parts: Vec<&str> = req.uri().path().trim_end_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["", "admin"]) => status::page_response().map(|b| GatewayBody::Full(Some(b))),
        (&Method::GET, ["", "admin", "status"]) => json(&status::status_json(
            &shared.activity,
            shared.pool_name(),
            &shared.config.upstream,
            &pool,
            now,
        )),
        (&Method::GET, ["", "admin", "keys"]) => {
            let keys: Vec<serde_json::Value> = pool
                .snapshot(now)
                .into_iter()
                .map(|k| {
                    let (state, reason, seconds) = match k.state {
                        KeyState::Available => ("available", None, None),
                        KeyState::Cooling { until, reason } => (
                            "cooling",
                            Some(format!("{reason:?}")),
                            Some(until.saturating_duration_since(now).as_secs_f64()),
                        ),
                        KeyState::Disabled { reason } => ("disabled", Some(format!("{reason:?}")), None),
                    };
                    serde_json::json!({
                        "label": k.label, "hint": k.hint, "state": state,
                        "reason": reason.map(|r| snake(&r)), "cooling_seconds_left": seconds,
                    })
                })
                .collect();
            json(&serde_json::json!({ "keys": keys }))
        }
        (&Method::POST, ["", "admin", "keys", label, action @ ("enable" | "disable")]) => {
            let Some(id) = pool.find(label) else {
                return error(
                    profile,
                    StatusCode::NOT_FOUND,
                    &format!("no key labelled {:?}", short(label)),
                );
            };
            let t = if *action == "enable" {
                pool.enable(id, now)
            } else {
                pool.disable(id, DisableReason::Operator)
            };
            if t == Transition::Entered {
                let change = if *action == "enable" {
                    KeyChange::Enabled { by: "operator" }
                } else {
                    KeyChange::Disabled {
                        reason: "operator",
                        status: None,
                    }
                };
                shared
                    .activity
                    .key_changed(&shared.metrics, shared.pool_name(), pool.label(id), change);
            }
            json(&serde_json::json!({"label": label, "changed": t == Transition::Entered}))
        }
        _ => error(
            profile,
            StatusCode::NOT_FOUND,
            "admin routes: GET /admin (status page), GET /admin/status, GET /admin/keys, POST /admin/keys/{label}/enable|disable",
        ),
    }
}

fn snake(debug: &str) -> String {
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

async fn forward(shared: Arc<Shared>, req: Request<Incoming>) -> Response<GatewayBody> {
    let started = Instant::now();
    let profile = &shared.config.call.profile;
    let credential = match shared.config.access.decide_for(profile, req.headers()) {
        Access::Pool => Credential::Pool(shared.pool()),
        Access::Byok => Credential::Passthrough,
        Access::Denied(why) => return error(profile, StatusCode::UNAUTHORIZED, &why),
    };
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let max = shared.config.max_body;
    if body.size_hint().lower() > max as u64 {
        return too_large(profile, max);
    }
    let body = match read_body_apart(body, max).await {
        Ok(bytes) => bytes,
        Err(BodyRead::TooLarge) => return too_large(profile, max),
        Err(BodyRead::Broken) => {
            return error(
                profile,
                StatusCode::BAD_REQUEST,
                "the request body ended before it was complete; nothing was sent upstream",
            );
        }
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = parts.uri.clone();
    let request = CallRequest {
        method: parts.method.clone(),
        path_and_query,
        headers: parts.headers,
        body,
    };
    let pool = match &credential {
        Credential::Pool(p) => Some(p.clone()),
        _ => None,
    };
    let result = shared.client.send_with(request, credential).await;
    let ttfb = started.elapsed();
    let summary = match &result {
        Ok(res) => res.extensions().get::<CallSummary>().cloned(),
        Err(e) => e.summary().cloned(),
    }
    .unwrap_or_default();
    if pool.is_some() {
        shared.metrics.attempts(summary.attempts);
    }
    if let Ok(response) = &result {
        shared.metrics.upstream_status(response.status().as_u16());
    }
    let key_label = KeyLabel::new(pool.as_ref(), summary.key);
    match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            shared.metrics.response(parts.status.as_u16(), ttfb);
            if parts.status == StatusCode::TOO_MANY_REQUESTS {
                shared.activity.upstream_429(started);
            }
            tracing::debug!(
                target: "keypool::attempt", key = %key_label, status = parts.status.as_u16(), attempt = summary.attempts,
                verdict = "deliver", next = "relay to the client", "attempt answered"
            );
            if !shared.config.pass_identity_headers {
                for name in profile.identity_headers() {
                    parts.headers.remove(name);
                }
            }
            let log = RequestLog {
                shared: shared.clone(),
                method,
                uri,
                status: parts.status.as_u16(),
                attempts: summary.attempts,
                key: key_label,
                started,
                request_id: None,
            };
            Response::from_parts(
                parts,
                GatewayBody::Relay {
                    body,
                    log: Some(Box::new(log)),
                },
            )
        }
        Err(e) => {
            let Some(response) = e.to_response() else {
                return error(
                    profile,
                    StatusCode::BAD_GATEWAY,
                    "the gateway could not complete the request",
                );
            };
            if let Some(CallError::Exhausted { exhausted, .. }) = e.call_error() {
                shared.metrics.exhausted(match exhausted {
                    Exhausted::RateLimited { .. } => "rate_limited",
                    Exhausted::AllDisabled => "all_disabled",
                });
            }
            let status = response.status().as_u16();
            shared.metrics.response(status, ttfb);
            let request_id = response
                .headers()
                .get(profile.request_id_header())
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let log = RequestLog {
                shared: shared.clone(),
                method,
                uri,
                status,
                attempts: summary.attempts,
                key: key_label,
                started,
                request_id,
            };
            if let Some(outcome) = e.outcome() {
                log.emit(outcome, Some(&e));
            }
            let (mut parts, body) = response.into_parts();
            parts.extensions.insert(status::AlreadyLogged);
            Response::from_parts(parts, GatewayBody::Full(Some(body)))
        }
    }
}

/// Reads the request body (see [`read_body`]) in a task of its own.
///
/// Taking a chunk from hyper's body channel wakes the connection task that fed it. Read from
/// inside that task (this handler runs in it), that is a self-wake: tokio then re-queues the
/// task as a yield and wakes an idle worker thread to come and take it, which costs every
/// request a cross-thread hand-off (two futex calls, an eventfd write, a context switch: about
/// 8 µs of CPU and 20 µs of latency at one request at a time, measured with gateway-bench).
/// From a task of its own the same wake just schedules the connection task next on this
/// thread. The task is aborted if the request is dropped (client gone).
async fn read_body_apart(body: Incoming, max: usize) -> Result<Bytes, BodyRead> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    struct AbortOnDrop(tokio::task::JoinHandle<Result<Bytes, BodyRead>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(tokio::spawn(read_body(body, max)));
    (&mut task.0).await.unwrap_or(Err(BodyRead::Broken))
}

/// Why a request body could not be read.
enum BodyRead {
    TooLarge,
    Broken,
}

/// Reads a whole request body of at most `max` bytes. A body of one frame (the usual JSON
/// request) is taken without copying. Reading stops as soon as the body says it is complete
/// (its content-length is in): one more poll would only ask the connection for more data and
/// wake this very task, which costs a cross-thread wake-up per request.
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, BodyRead> {
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else { break };
        let Ok(data) = frame.map_err(|_| BodyRead::Broken)?.into_data() else {
            continue; // trailers: nothing to forward in a buffered body
        };
        len = len.saturating_add(data.len());
        if len > max {
            return Err(BodyRead::TooLarge);
        }
        match first.take() {
            None if rest.is_empty() => first = Some(data),
            None => rest.extend_from_slice(&data),
            Some(head) => {
                rest.reserve(len);
                rest.extend_from_slice(&head);
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(rest)))
}

fn too_large(profile: &Profile, max: usize) -> Response<GatewayBody> {
    error(
        profile,
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than this gateway's limit of {max} bytes (--max-body)"),
    )
}

/// How many connections the kernel may hold for the gateway before it accepts them. The usual
/// default (128) drops the SYNs of a burst of clients, each of which then waits a 1 s
/// retransmission; the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A bound, not yet serving gateway.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

impl Server {
    /// Binds the listen address.
    pub async fn bind(config: Config) -> Result<Self, String> {
        let listen = config.listen;
        let shared = Shared::new(config)?;
        let listener = listen_on(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        Ok(Self { listener, shared })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The shared state (pool, reload).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests and
    /// streams finish for up to the grace period.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Self { listener, shared } = self;
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let releaser = tokio::spawn(crate::memory::release_when_quiet(shared.clone()));
        let sweeper = {
            let pools = shared.clone();
            tokio::spawn(status::sweep(
                shared.activity.clone(),
                shared.metrics.clone(),
                shared.pool_name(),
                move || pools.pool(),
            ))
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let metrics = shared.metrics.clone();
                    let shared = shared.clone();
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn.into_owned());
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            status::connection_error(&metrics, &*e);
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        releaser.abort();
        sweeper.abort();
        let grace = shared.config.grace;
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: no new connections; waiting for in-flight requests"
        );
        if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
            tracing::warn!("grace period over; closing the remaining connections");
        }
    }
}

/// Resolves on SIGTERM or SIGINT; re-reads the keys on every SIGHUP meanwhile.
pub async fn signals(shared: Arc<Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop keypool with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => match shared.reload() {
                Ok(summary) => tracing::info!("reloaded the keys: {summary}"),
                Err(e) => tracing::error!("keys not reloaded, the previous keys stay in use: {e}"),
            },
        }
    }
}
