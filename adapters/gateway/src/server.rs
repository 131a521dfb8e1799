//! The gateway's HTTP server: routes, access control, forwarding with failover, admin,
//! health, metrics, reload and graceful shutdown.
//!
//! It serves several pools at once (SPEC §12), each at its mount path: a request for
//! `{mount}/v1/...` goes to that pool's upstream as `/v1/...`, with its provider's profile
//! deciding keys, classification and error shapes; logs, metrics and the admin view carry the
//! pool's name.

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
use keypool_core::call::{CallError, Credential, KeyMark, MarkSink, Outcome, Request as CallRequest};
use keypool_core::{Exhausted, KeyState, Pool, Profile, Transition};
use tokio::net::TcpListener;

use crate::access::{self, Access};
use crate::config::{Config, PoolConfig};
use crate::metrics::Metrics;
use crate::status::{self, Activity, KeyChange};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the gateway shares between connections.
pub struct Shared {
    config: Config,
    pools: Vec<Served>,
    metrics: Arc<Metrics>,
    /// Recent transitions, per-minute counts and probes, for the status page.
    activity: Arc<Activity>,
}

/// One pool being served: its configuration, its keys (replaced on reload) and its client.
struct Served {
    config: PoolConfig,
    /// Its name, for metric labels (shared, not copied, per request).
    label: Arc<String>,
    pool: RwLock<Arc<Pool>>,
    client: keypool_tokio::Client,
    /// The shared state backend (`--state`) for this pool, if any.
    state: Option<crate::state::Backend>,
    /// Its probe schedule (SPEC §11.5).
    probes: Arc<crate::probe::Probes>,
    /// Whether the single-organisation notice has been logged (SPEC §11.1).
    single_organisation: crate::limits::SingleOrganisation,
    /// Its call-outcome counters.
    outcomes: crate::metrics::PoolOutcomes,
}

impl Served {
    fn pool(&self) -> Arc<Pool> {
        match self.pool.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    fn profile(&self) -> &Profile {
        &self.config.call.profile
    }

    /// The path this pool forwards for `path`, if it is under the mount.
    fn strip<'p>(&self, path: &'p str) -> Option<&'p str> {
        let mount = self.config.mount.as_str();
        if mount == "/" {
            return Some(path);
        }
        let rest = path.strip_prefix(mount)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }
}

/// Logs and counts every mark the gateway's calls make, as they are made.
#[derive(Debug)]
struct MarkLog {
    pool: String,
    metrics: Arc<Metrics>,
    activity: Arc<Activity>,
}

impl MarkSink for MarkLog {
    fn mark(&self, pool: &Arc<Pool>, mark: &KeyMark) {
        // One upstream answer, however many keys of its organisation it marks.
        if mark.key == mark.attempted {
            self.metrics.upstream_status(mark.status.as_u16());
        }
        self.activity.mark(&self.metrics, &self.pool, pool, mark);
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
    /// Builds the shared state: each pool and its upstream client.
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        config.check_pools().map_err(|e| e.to_string())?;
        let mut metrics = Metrics::new();
        let state_metrics = config.state.as_ref().map(|_| metrics.register_state());
        let metrics = Arc::new(metrics);
        let activity = Arc::new(Activity::new(Instant::now()));
        let mut pools = Vec::new();
        for pc in config.pools() {
            let pool = Pool::new(pc.keys.clone(), pc.order, Instant::now())
                .map_err(|e| format!("pool {:?}: {e}", pc.name))?;
            let pool = Arc::new(pool);
            let probes = crate::probe::Probes::new(pc.probe);
            // Every pool shares state through the same namespace: fields are fingerprints, so
            // a pool's driver applies its own keys and passes over the others'.
            let state = crate::state::start(
                config.state.as_ref(),
                &pool,
                &metrics,
                state_metrics.clone(),
                &pc.name,
                &probes,
            )?;
            let log = Arc::new(MarkLog {
                pool: pc.name.clone(),
                metrics: metrics.clone(),
                activity: activity.clone(),
            });
            let sink = crate::state::sink(crate::probe::waking(log, &probes), state.as_ref());
            let mut builder = keypool_tokio::Client::builder()
                .base_url(pc.upstream.clone())
                .config(pc.call.clone().with_mark_sink(sink));
            for der in &pc.upstream_roots {
                builder = builder.root_cert_der(der.clone());
            }
            let client = builder
                .build_with_pool(pool.clone())
                .map_err(|e| format!("pool {:?}: {e}", pc.name))?;
            let label = Arc::new(pc.name.clone());
            pools.push(Served {
                outcomes: metrics.pool_outcomes(&label),
                label,
                config: pc,
                pool: RwLock::new(pool),
                client,
                state,
                probes,
                single_organisation: crate::limits::SingleOrganisation::default(),
            });
        }
        Ok(Arc::new(Self {
            config,
            pools,
            metrics,
            activity,
        }))
    }

    /// What the status page shows besides the pools.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Each pool served, by name, as it is now (for the sweeper of cooldowns).
    fn named_pools(&self) -> Vec<(String, Arc<Pool>)> {
        self.pools
            .iter()
            .map(|p| (p.name().to_owned(), p.pool()))
            .collect()
    }

    /// Starts one probe task per pool (SPEC §11.5); they run until aborted.
    fn start_probes(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.pools.len())
            .filter_map(|i| {
                let served = self.pools.get(i)?;
                let shared = self.clone();
                // `i` stays in bounds: the pools are fixed when `Shared` is made.
                let task = crate::probe::Task {
                    name: served.label.clone(),
                    probes: served.probes.clone(),
                    profile: served.profile().clone(),
                    client: served.client.clone(),
                    backend: served.state.as_ref().map(|b| b.driver().clone()),
                    metrics: self.metrics.clone(),
                    activity: self.activity.clone(),
                    current: Box::new(move || shared.pools[i].pool()),
                };
                Some(tokio::spawn(task.run()))
            })
            .collect()
    }

    /// The current pool (replaced on reload) of the pool named `name`.
    pub fn pool_named(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools.iter().find(|p| p.name() == name).map(Served::pool)
    }

    /// The names of the pools served, in order.
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.iter().map(|p| p.name().to_owned()).collect()
    }

    /// The pool serving `path` (the longest mount it is under) and the path to forward.
    fn route<'p>(&self, path: &'p str) -> Option<(&Served, &'p str)> {
        self.pools
            .iter()
            .filter_map(|p| Some((p, p.strip(path)?)))
            .max_by_key(|(p, _)| p.config.mount.len())
    }

    /// The profile for an answer about `path`: its pool's, else the first pool's.
    fn profile_for(&self, path: &str) -> &Profile {
        match self.route(path) {
            Some((p, _)) => p.profile(),
            None => &self.config.call.profile,
        }
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The current pool (replaced on reload) of the first pool served.
    pub fn pool(&self) -> Arc<Pool> {
        // Cannot be out of bounds: `Config::pools` always starts with the first pool, and
        // `Shared::new` serves every one of them.
        self.pools[0].pool()
    }

    /// Re-reads every pool's keys (key file or config file) and swaps in pools that keep the
    /// state of kept keys. Pools whose keys came from the environment keep theirs; it is an
    /// error only when no pool can be reloaded, or one fails.
    pub fn reload(&self) -> Result<String, String> {
        let mut done = Vec::new();
        let mut skipped = Vec::new();
        for served in &self.pools {
            if matches!(
                served.config.key_source,
                crate::config::KeySource::Env | crate::config::KeySource::OpenAiEnv
            ) {
                skipped.push(served);
                continue;
            }
            done.push(format!("{}: {}", served.name(), Self::reload_one(served)?));
        }
        if done.is_empty()
            && let Some(first) = skipped.first()
        {
            return Err(first
                .config
                .key_source
                .reload()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default());
        }
        Ok(done.join("; "))
    }

    fn reload_one(served: &Served) -> Result<String, String> {
        let keys = served.config.key_source.reload().map_err(|e| e.to_string())?;
        for warning in crate::keys::implausible(&keys) {
            tracing::warn!(pool = %served.name(), "{warning}");
        }
        let old = served.pool();
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
        match served.pool.write() {
            Ok(mut p) => *p = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
        Ok(summary)
    }
}

/// The body the gateway sends: a keypool body relayed from upstream, or a whole buffer.
// The relayed variant, the large one, is the body of nearly every response: boxing its request
// log to shrink the rare one would cost every request an allocation.
#[allow(clippy::large_enum_variant)]
pub enum GatewayBody {
    /// A whole response made by the gateway.
    Full(Option<Bytes>),
    /// An upstream body, relayed through the call state machine.
    Relay {
        /// The body.
        body: keypool_tokio::Body,
        /// For the end-of-request log line and metrics, written once the call has ended.
        log: Option<RequestLog>,
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
    pool: usize,
    method: Method,
    uri: http::Uri,
    status: u16,
    attempts: usize,
    key: KeyLabel,
    started: Instant,
    /// The request id of keypool's own error response, if it made one.
    request_id: Option<String>,
    /// Where the connection takes the work left once this response is written (`None`: do
    /// it when the call ends).
    after: Option<AfterWrite>,
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

impl KeyLabel {
    fn as_str(&self) -> &str {
        match self {
            Self::Pool(pool, id) => pool.label(*id),
            Self::Byok => "byok",
            Self::None => "-",
        }
    }
}

impl std::fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RequestLog {
    /// Logs and counts the request, with how its call ended (the core's [`Outcome`]) and, when
    /// something went wrong, what.
    fn emit(self, outcome: Outcome, error: Option<&dyn std::fmt::Display>) {
        let elapsed = self.count(outcome);
        self.write_line(outcome, elapsed, error);
    }

    /// Counts the request in the metrics; returns its latency.
    fn count(&self, outcome: Outcome) -> Duration {
        let elapsed = self.started.elapsed();
        self.shared.metrics.finished(elapsed);
        match self.shared.pools.get(self.pool) {
            Some(served) => served.outcomes.inc(outcome.as_str()),
            None => self
                .shared
                .metrics
                .outcome(&Arc::new("-".to_owned()), outcome.as_str()),
        }
        elapsed
    }

    /// Writes the request line.
    fn write_line(&self, outcome: Outcome, elapsed: Duration, error: Option<&dyn std::fmt::Display>) {
        let served = self.shared.pools.get(self.pool);
        crate::log_format::RequestLine {
            pool: served.map_or("-", |s| s.label.as_str()),
            method: &self.method,
            path: short(self.uri.path()),
            status: self.status,
            attempts: self.attempts,
            key: self.key.as_str(),
            latency_ms: status::latency_ms(elapsed),
            outcome: outcome.as_str(),
            request_id: self.request_id.as_deref(),
            error,
        }
        .emit();
    }

    /// Logs a relayed response whose call ended: how, and what broke if the upstream did.
    fn ended(self, outcome: Outcome) {
        let elapsed = self.count(outcome);
        self.ended_line(outcome, elapsed);
    }

    /// The request line of a relayed response whose call ended.
    fn ended_line(&self, outcome: Outcome, elapsed: Duration) {
        match outcome {
            Outcome::UpstreamBroke(why) => {
                self.write_line(outcome, elapsed, Some(&CallError::BodyBroken(why)));
            }
            _ => self.write_line(outcome, elapsed, None),
        }
    }
}

/// What a connection does once the response in hand is written: the request line of a relayed
/// response whose call has ended, and dropping that call.
///
/// A plain relayed answer ends its call in the same poll that hands hyper its last body frame,
/// and hyper writes that frame (and, at one request at a time, the whole response) only after
/// the poll. Formatting the request line and tearing down the call (its upstream body, its
/// state machine, its box) there would put them between the upstream's answer and the
/// client's: about 3k instructions and a few hundred cache lines per request, measured in the
/// README (issue 21). So the body counts the request at once (metrics are current when the
/// client has its answer), and leaves the line and the drop to its connection, which does
/// them right after hyper's poll returns, the response written. Nothing is lost: what a
/// connection has not done yet is done when it is dropped (each [`Ended`] writes its line
/// when dropped).
///
/// The entries are kept in a vector that is cleared in place, so a connection allocates for
/// them once, not per request.
#[derive(Clone, Default)]
pub(crate) struct AfterWrite(Arc<std::sync::Mutex<Vec<Ended>>>);

/// A relayed response's end, left to its connection: writes the request line when dropped,
/// then drops the call.
struct Ended {
    log: RequestLog,
    outcome: Outcome,
    elapsed: Duration,
    /// The finished body, to be dropped after the line.
    _call: GatewayBody,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.log.ended_line(self.outcome, self.elapsed);
    }
}

impl AfterWrite {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Ended>> {
        // Poisoned only by a panic while an entry was dropped (its line written): the pending
        // entries are still sound; carry on with them.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, ended: Ended) {
        self.lock().push(ended);
    }

    /// Does what the connection was left (called after each poll of the connection). The
    /// entries are dropped where they lie, not moved out first: an entry is a few hundred
    /// bytes, and this runs after every poll.
    fn run(&self) {
        self.lock().clear();
    }

    /// Serves `conn`, doing what its responses leave after every poll of it, with the
    /// connection's wakes of itself kept inside its poll ([`OwnWakes`](crate::own_wakes)).
    async fn serve<F: Future>(self, conn: F) -> F::Output {
        let mut conn = std::pin::pin!(conn);
        crate::own_wakes::OwnWakes::new(std::future::poll_fn(|cx| {
            let polled = conn.as_mut().poll(cx);
            self.run();
            polled
        }))
        .await
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
        let this = self.get_mut();
        let (body, log) = match this {
            Self::Full(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Relay { body, log } => (body, log),
        };
        let frame = Pin::new(&mut *body).poll_frame(cx);
        // Once the call has ended (its last frame is out), log how.
        if frame.is_ready()
            && let Some(outcome) = body.outcome()
            && let Some(mut log) = log.take()
        {
            let last = !matches!(frame, Poll::Ready(Some(Ok(_)))) || body.is_end_stream();
            match log.after.take() {
                // The body is done: count it now, leave the line and the call's teardown to
                // the connection (see `AfterWrite`).
                Some(after) if last => {
                    let elapsed = log.count(outcome);
                    let call = std::mem::replace(this, Self::Full(None));
                    after.push(Ended {
                        log,
                        outcome,
                        elapsed,
                        _call: call,
                    });
                }
                _ => log.ended(outcome),
            }
        }
        frame.map_err(Into::into)
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
/// relayed one when its call ends, see [`RequestLog`]).
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<GatewayBody> {
    match answer(shared, req, None).await {
        Ok(res) => res,
        Err(never) => match never {},
    }
}

/// [`handle`] as the connection's service calls it. The forwarding path is awaited here
/// directly, not through further `async fn` layers: every layer keeps its own copy of the
/// request and is moved whole (its full size, kilobytes) into the layer above it.
async fn answer(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    after: Option<AfterWrite>,
) -> Result<Response<GatewayBody>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let pool = forwarded(&shared, uri.path());
    let mut res = match pool {
        Some((index, rest_len)) => forward(shared.clone(), index, rest_len, req, after).await,
        None => route(&shared, &req),
    };
    let profile = match pool.and_then(|(index, _)| shared.pools.get(index)) {
        Some(served) => served.profile(),
        None => shared.profile_for(uri.path()),
    };
    status::reason_phrase(profile, &mut res);
    shared.activity.answered(uri.path(), started, res.status());
    if matches!(res.body(), GatewayBody::Full(_)) {
        status::log_answered(&shared.metrics, profile, &method, uri.path(), started, &mut res);
    }
    Ok(res)
}

/// The pool that serves `path` under `/v1/` (its index) and the length of the path upstream.
fn forwarded(shared: &Shared, path: &str) -> Option<(usize, usize)> {
    let (served, rest) = shared.route(path)?;
    if !rest.starts_with("/v1/") {
        return None;
    }
    let index = shared
        .pools
        .iter()
        .position(|p| std::ptr::eq(p, served))
        .unwrap_or(0);
    Some((index, rest.len()))
}

/// The gateway's own routes (everything [`forwarded`] does not take).
fn route(shared: &Shared, req: &Request<Incoming>) -> Response<GatewayBody> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => health(shared),
        (&Method::GET, "/metrics") => {
            for served in &shared.pools {
                crate::state::refresh_metrics(served.state.as_ref());
            }
            let pools: Vec<(&str, Arc<Pool>)> = shared.pools.iter().map(|p| (p.name(), p.pool())).collect();
            let text = shared.metrics.render(&pools, Instant::now());
            full(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        (_, p) if p == "/admin" || p.starts_with("/admin/") => admin(shared, req),
        _ => error(
            shared.profile_for(path),
            StatusCode::NOT_FOUND,
            &format!("no route for {} {}", req.method(), short(path)),
        ),
    }
}

/// At most the first 100 characters of `path`, for messages and logs.
fn short(path: &str) -> &str {
    // At most 100 bytes is at most 100 characters: nothing to count.
    if path.len() <= 100 {
        return path;
    }
    match path.char_indices().nth(100) {
        Some((end, _)) => &path[..end],
        None => path,
    }
}

fn health(shared: &Shared) -> Response<GatewayBody> {
    let now = Instant::now();
    let mut ready = true;
    let mut backend = serde_json::Value::Null;
    let (mut keys, mut available) = (0, 0);
    let mut pools = Vec::new();
    for served in &shared.pools {
        let pool = served.pool();
        let up = pool
            .ids()
            .filter(|&id| pool.state(id, now).is_available())
            .count();
        keys += pool.len();
        available += up;
        let (up_to_date, view) = crate::state::health(served.state.as_ref());
        ready &= up_to_date;
        if backend.is_null() {
            backend = view;
        }
        pools.push(serde_json::json!({
            "name": served.name(), "mount": served.config.mount, "provider": served.profile().name(),
            "keys": pool.len(), "available": up,
        }));
    }
    let status = if ready { "ok" } else { "starting" };
    let mut res = json(&serde_json::json!({
        "status": status, "keys": keys, "available": available, "pools": pools, "state_backend": backend,
    }));
    if !ready {
        // Not ready until the shared state has been read (SPEC §10).
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    res
}

fn admin(shared: &Shared, req: &Request<Incoming>) -> Response<GatewayBody> {
    let profile = &shared.config.call.profile;
    // The token may come in any pool's credential header (x-api-key, Authorization, api-key).
    let presented = |t: &keypool_core::Secret| {
        shared
            .pools
            .iter()
            .any(|p| access::presented(p.profile(), req.headers()).is_some_and(|v| t.ct_eq(v)))
    };
    let Some(token) = &shared.config.admin_token else {
        return error(
            profile,
            StatusCode::NOT_FOUND,
            "admin routes are off: start keypool with --admin-token",
        );
    };
    // A browser answers the challenge with Basic auth (any user name, the token as password),
    // accepted for reads only.
    let basic = status::basic_allowed(req.method())
        .then(|| status::basic_password(req.headers()))
        .flatten();
    if !presented(token) && !basic.is_some_and(|b| token.ct_eq(&b)) {
        let message = format!(
            "admin routes need the admin token in {} (in a browser: as the password of Basic auth)",
            profile.credential_help()
        );
        let mut res = error(profile, StatusCode::UNAUTHORIZED, &message);
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(status::REALM));
        return res;
    }
    let now = Instant::now();
    let parts: Vec<&str> = req.uri().path().trim_end_matches('/').split('/').collect();
    // `/admin/keys/{label}/…` looks in every pool (the first that has the label);
    // `/admin/pools/{pool}/keys/{label}/…` in one.
    let (named, parts): (Option<&str>, Vec<&str>) = match parts.as_slice() {
        ["", "admin", "pools", pool, rest @ ..] => (
            Some(*pool),
            ["", "admin"].into_iter().chain(rest.iter().copied()).collect(),
        ),
        _ => (None, parts),
    };
    let pools: Vec<&Served> = shared
        .pools
        .iter()
        .filter(|p| named.is_none_or(|n| n == p.name()))
        .collect();
    if pools.is_empty() {
        return error(
            profile,
            StatusCode::NOT_FOUND,
            &format!("no pool named {:?}", short(named.unwrap_or_default())),
        );
    }
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["", "admin"]) => status::page_response().map(|b| GatewayBody::Full(Some(b))),
        (&Method::GET, ["", "admin", "status"]) => {
            let views: Vec<status::PoolView<'_>> = pools
                .iter()
                .map(|served| status::PoolView {
                    name: served.name(),
                    mount: &served.config.mount,
                    provider: served.profile().name(),
                    upstream: &served.config.upstream,
                    next_probes: served.probes.scheduled(&served.pool(), now),
                    pool: served.pool(),
                })
                .collect();
            json(&status::status_json(&shared.activity, &views, now))
        }
        (&Method::GET, ["", "admin", "keys"]) => {
            let wall = std::time::SystemTime::now();
            let keys: Vec<serde_json::Value> = pools
                .iter()
                .flat_map(|served| {
                    let pool = served.pool();
                    pool.snapshot(now)
                        .into_iter()
                        .map(move |k| (served, pool.clone(), k))
                })
                .map(|(served, pool, k)| {
                    let (reason, seconds) = match k.state {
                        KeyState::Available => (None, None),
                        KeyState::Cooling { until, reason } => (
                            Some(reason.as_str()),
                            Some(until.saturating_duration_since(now).as_secs_f64()),
                        ),
                        KeyState::Disabled { reason } => (Some(reason.as_str()), None),
                    };
                    let mut key = serde_json::json!({
                        "pool": served.name(), "label": k.label, "hint": k.hint,
                        "fingerprint": k.fingerprint.to_string(), "generation": k.generation,
                        "state": crate::limits::state_name(&k.state),
                        "reason": reason, "cooling_seconds_left": seconds,
                    });
                    // Only a disabled key has a next probe (an enabled one leaves the schedule
                    // when the probe task next looks).
                    let next_probe = k
                        .state
                        .is_disabled()
                        .then(|| served.probes.next_probe(&pool, k.id))
                        .flatten();
                    if let Some(key) = key.as_object_mut() {
                        key.extend(crate::limits::key_view(&pool, k.id, next_probe, now, wall));
                    }
                    key
                })
                .collect();
            let state = pools.first().map_or(serde_json::Value::Null, |served| {
                crate::state::admin_view(served.state.as_ref())
            });
            let pools: Vec<serde_json::Value> = pools
                .iter()
                .map(|served| {
                    let pool = served.pool();
                    serde_json::json!({
                        "name": served.name(),
                        "single_organisation": crate::limits::single_organisation(&pool),
                    })
                })
                .collect();
            json(&serde_json::json!({ "keys": keys, "pools": pools, "state_backend": state }))
        }
        (&Method::POST, ["", "admin", "keys", label, action @ ("enable" | "disable")]) => {
            let found = pools.iter().find_map(|served| {
                let pool = served.pool();
                let id = pool.find(label)?;
                Some((served, pool, id))
            });
            let Some((served, pool, id)) = found else {
                return error(
                    profile,
                    StatusCode::NOT_FOUND,
                    &format!("no key labelled {:?}", short(label)),
                );
            };
            let pool_name = served.name();
            let t = crate::state::operator(served.state.as_ref(), &pool, id, *action == "enable", now);
            served.probes.wake();
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
                    .key_changed(&shared.metrics, pool_name, pool.label(id), change);
            }
            json(&serde_json::json!({"pool": pool_name, "label": label, "changed": t == Transition::Entered}))
        }
        _ => error(
            profile,
            StatusCode::NOT_FOUND,
            "admin routes: GET /admin (status page), GET /admin/status, GET /admin/keys, POST /admin/keys/{label}/enable|disable (also under /admin/pools/{pool}/)",
        ),
    }
}

/// Forwards a request for pool `index`; the last `rest_len` bytes of its path are the path
/// upstream (the mount path is cut off).
async fn forward(
    shared: Arc<Shared>,
    index: usize,
    rest_len: usize,
    req: Request<Incoming>,
    after: Option<AfterWrite>,
) -> Response<GatewayBody> {
    let started = Instant::now();
    let Some(served) = shared.pools.get(index) else {
        return error(
            &shared.config.call.profile,
            StatusCode::NOT_FOUND,
            "no pool serves this path",
        );
    };
    let profile = served.profile();
    let credential = match shared.config.access.decide_for(profile, req.headers()) {
        Access::Pool => Credential::Pool(served.pool()),
        Access::Byok => Credential::Passthrough,
        Access::Denied(why) => return error(profile, StatusCode::UNAUTHORIZED, &why),
    };
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let max = shared.config.max_body;
    if body.size_hint().lower() > max as u64 {
        return too_large(profile, max);
    }
    let body = match read_body(body, max).await {
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
    let path_and_query = match parts.uri.path_and_query() {
        Some(pq) if served.config.mount == "/" => pq.clone(),
        Some(pq) => {
            let path = pq.path();
            let rest = &path[path.len().saturating_sub(rest_len)..];
            let joined = match pq.query() {
                Some(q) => format!("{rest}?{q}"),
                None => rest.to_owned(),
            };
            joined
                .parse()
                .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"))
        }
        None => http::uri::PathAndQuery::from_static("/"),
    };
    let uri = parts.uri;
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
    let result = served.client.send_with(request, credential).await;
    let ttfb = started.elapsed();
    if let Some(pool) = &pool {
        served.single_organisation.check(served.name(), pool);
    }
    let summary = match &result {
        Ok(res) => res.body().summary(),
        Err(e) => e.summary().cloned().unwrap_or_default(),
    };
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
                target: "keypool::attempt", pool = %served.name(), key = %key_label, status = parts.status.as_u16(),
                attempt = summary.attempts, verdict = "deliver", next = "relay to the client", "attempt answered"
            );
            if !shared.config.pass_identity_headers {
                for name in profile.identity_headers() {
                    parts.headers.remove(name);
                }
            }
            let log = RequestLog {
                shared: shared.clone(),
                pool: index,
                method,
                uri,
                status: parts.status.as_u16(),
                attempts: summary.attempts,
                key: key_label,
                started,
                request_id: None,
                after,
            };
            Response::from_parts(parts, GatewayBody::Relay { body, log: Some(log) })
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
                shared.metrics.exhausted(
                    served.name(),
                    match exhausted {
                        Exhausted::RateLimited { .. } => "rate_limited",
                        Exhausted::AllDisabled => "all_disabled",
                    },
                );
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
                pool: index,
                method,
                uri,
                status,
                attempts: summary.attempts,
                key: key_label,
                started,
                request_id,
                after: None,
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

/// Why a request body could not be read.
enum BodyRead {
    TooLarge,
    Broken,
}

/// Reads a whole request body of at most `max` bytes. A body of one frame (the usual JSON
/// request) is taken without copying. Reading stops as soon as the body says it is complete
/// (its content-length is in): one more poll would only ask the connection for more data.
///
/// Over HTTP/1.1 this runs in the connection's own task, and taking a chunk wakes the
/// connection (hyper's body channel wakes its sender): the connection keeps that wake inside
/// its poll ([`OwnWakes`](crate::own_wakes)) instead of handing itself back to the scheduler.
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
                move || pools.named_pools(),
            ))
        };
        let probes = shared.start_probes();
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
                    let after = AfterWrite::default();
                    let service = {
                        let after = after.clone();
                        hyper::service::service_fn(move |req| {
                            answer(shared.clone(), req, Some(after.clone()))
                        })
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn.into_owned());
                    tokio::spawn(async move {
                        if let Err(e) = after.serve(conn).await {
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
        probes.iter().for_each(tokio::task::JoinHandle::abort);
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

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn short_keeps_the_first_hundred_characters() {
        let ascii = "a".repeat(150);
        assert_eq!(short(&ascii), &ascii[..100]);
        assert_eq!(short("/v1/messages"), "/v1/messages");
        // 60 two-byte characters: 120 bytes, all kept.
        let wide = "é".repeat(60);
        assert_eq!(short(&wide), wide);
        let wider = "é".repeat(150);
        assert_eq!(short(&wider).chars().count(), 100);
        assert_eq!(short(&wider), &wider[..200]);
    }
}
