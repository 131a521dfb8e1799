//! What an operator sees beyond the pool itself (SPEC §13): the status page and its JSON, the
//! recent key state transitions, requests and 429s per minute, the last probe of each key, the
//! log line and count of every request the gateway answers itself, and the sweeper task that
//! notices cooldowns ending.
//!
//! Every key state change goes through [`Activity::key_changed`]: one info (or warn) line with
//! target `keypool::key`, one count in `keypool_key_transitions_total`, one entry in the ring of
//! recent transitions the status page shows. Nothing here ever holds a key or a token.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use keypool_core::call::KeyMark;
use keypool_core::probe::ProbeResult;
use keypool_core::{
    CoolReason, DisableReason, Family, Fingerprint, KeyId, KeyState, Pool, Profile, Transition, Verdict,
};

use crate::metrics::Metrics;

/// The status page: one self-contained HTML file (no external assets), embedded in the binary.
pub const PAGE: &str = include_str!("status.html");

/// How many recent key state transitions the status page can show.
pub const RECENT_TRANSITIONS: usize = 50;

/// How many minutes of request and 429 counts are kept.
pub const MINUTES: usize = 60;

// ---------------------------------------------------------------------------------------------
// Per-minute counters

/// Counts per minute over the last [`MINUTES`] minutes, lock-free: one word per minute slot
/// holds the minute it counts (high 32 bits) and its count (low 32 bits), so a slot that still
/// holds an older minute is reset by the first count of the new one, in the same atomic step.
#[derive(Debug)]
pub struct PerMinute {
    slots: [AtomicU64; MINUTES],
}

impl Default for PerMinute {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl PerMinute {
    /// Counts one event in `minute` (minutes since the [`Activity`] began; the first is 0).
    pub fn add(&self, minute: u32) {
        let slot = &self.slots[minute as usize % MINUTES];
        let stamp = u64::from(minute.wrapping_add(1)) << 32;
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let next = if current & !u64::from(u32::MAX) == stamp {
                // Saturates at u32::MAX a minute (70 million a second): never wraps into the stamp.
                current + u64::from(current as u32 != u32::MAX)
            } else {
                stamp | 1
            };
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// The counts of the [`MINUTES`] minutes up to and including `minute`, oldest first (minutes
    /// before the first are 0).
    pub fn read(&self, minute: u32) -> Vec<u32> {
        (0..MINUTES as u32)
            .rev()
            .map(|ago| match minute.checked_sub(ago) {
                Some(m) => {
                    let word = self.slots[m as usize % MINUTES].load(Ordering::Relaxed);
                    let stamp = u64::from(m.wrapping_add(1)) << 32;
                    if word & !u64::from(u32::MAX) == stamp {
                        word as u32
                    } else {
                        0
                    }
                }
                None => 0,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Key state changes

/// A change of one key's state, as logged, counted and shown.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyChange {
    /// The key started cooling (`extended`: it was cooling and its deadline moved later).
    Cooling {
        /// Whether the key was already cooling.
        extended: bool,
        /// Why (`rate_limited`, `overloaded`, `auth`, `spend_capped`).
        reason: &'static str,
        /// For how long from now.
        duration: Duration,
        /// The upstream status that caused it, if one did.
        status: Option<u16>,
        /// Whether the cooldown is for one model family only.
        family: bool,
    },
    /// The cooldown is over: the key takes traffic again (for that model family, if `family`).
    CooldownOver {
        /// Why it had cooled.
        reason: &'static str,
        /// Whether it was a model family's cooldown.
        family: bool,
    },
    /// The key was disabled.
    Disabled {
        /// Why (`unauthorized`, `forbidden`, `billing`, `operator`).
        reason: &'static str,
        /// The upstream status that caused it, if one did.
        status: Option<u16>,
    },
    /// The key was enabled again.
    Enabled {
        /// By whom: `operator` or `probe`.
        by: &'static str,
    },
}

impl KeyChange {
    /// The change a call's mark made, if it made one.
    pub fn of_mark(mark: &KeyMark) -> Option<Self> {
        let status = Some(mark.status.as_u16());
        let extended = match mark.transition {
            Transition::Unchanged => return None,
            Transition::Extended => true,
            Transition::Entered => false,
        };
        match mark.verdict {
            Verdict::CoolDown { duration, reason } => Some(Self::Cooling {
                extended,
                reason: cool_reason(reason),
                duration,
                status,
                family: mark.mark.family().is_some(),
            }),
            Verdict::Disable { reason } => Some(Self::Disabled {
                reason: disable_reason(reason),
                status,
            }),
            Verdict::Deliver => None,
        }
    }

    /// The state the key is in after the change.
    pub fn state(&self) -> &'static str {
        match self {
            Self::Cooling { .. } => "cooling",
            Self::CooldownOver { .. } | Self::Enabled { .. } => "available",
            Self::Disabled { .. } => "disabled",
        }
    }

    /// What happened, in one word: `cooling`, `extended`, `cooldown_over`, `disabled`,
    /// `enabled`.
    pub fn event(&self) -> &'static str {
        match self {
            Self::Cooling { extended: false, .. } => "cooling",
            Self::Cooling { extended: true, .. } => "extended",
            Self::CooldownOver { .. } => "cooldown_over",
            Self::Disabled { .. } => "disabled",
            Self::Enabled { .. } => "enabled",
        }
    }

    /// The `reason` label of `keypool_key_transitions_total`: the cause for a key going out
    /// (`rate_limited`, `overloaded`, `auth`, `spend_capped`, `unauthorized`, `forbidden`,
    /// `billing`, `operator`), and `cooldown_over`, `enabled` (by an operator) or
    /// `probe_succeeded` for a key coming back.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Self::Cooling { reason, .. } | Self::Disabled { reason, .. } => reason,
            Self::CooldownOver { .. } => "cooldown_over",
            Self::Enabled { by: "probe" } => "probe_succeeded",
            Self::Enabled { .. } => "enabled",
        }
    }
}

/// The snake-case name of a cool reason, as logs, metrics and the admin API show it.
pub fn cool_reason(reason: CoolReason) -> &'static str {
    reason.as_str()
}

/// The snake-case name of a disable reason.
pub fn disable_reason(reason: DisableReason) -> &'static str {
    reason.as_str()
}

/// One entry of the recent transitions.
#[derive(Debug, Clone)]
struct Recorded {
    at: SystemTime,
    pool: String,
    key: String,
    change: KeyChange,
}

/// The last probe of a key.
#[derive(Debug, Clone)]
struct ProbeRecord {
    at: SystemTime,
    result: &'static str,
    status: Option<u16>,
    /// When the next probe is due, if one is.
    next: Option<SystemTime>,
    count: u64,
}

/// What the gateway remembers for operators: recent transitions, counts per minute, probes.
/// Shared by the request path (one atomic add per request) and the sweeper.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    started: SystemTime,
    requests: PerMinute,
    upstream_429: PerMinute,
    client_429: PerMinute,
    recent: Mutex<VecDeque<Recorded>>,
    probes: Mutex<HashMap<(String, Fingerprint), ProbeRecord>>,
    /// Wakes the sweeper when a call marks a key (a new deadline to watch).
    wake: tokio::sync::Notify,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep using it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds with millisecond precision, for logs and JSON (`1.5`, not `1.5000000000000002`).
pub fn round_ms(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

/// Milliseconds with microsecond precision, for the request log's `latency_ms`.
pub fn latency_ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl Activity {
    /// Starts counting at `origin`.
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            started: SystemTime::now(),
            requests: PerMinute::default(),
            upstream_429: PerMinute::default(),
            client_429: PerMinute::default(),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_TRANSITIONS)),
            probes: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn minute(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.origin).as_secs() / 60).unwrap_or(u32::MAX)
    }

    /// A client request that arrived at `at` on `path` was answered with `status`: counted per
    /// minute for API requests (`/v1/...` and unknown routes; not `/metrics`, `/healthz` or
    /// `/admin`), and as a 429 to a client when it was one.
    pub fn answered(&self, path: &str, at: Instant, status: StatusCode) {
        if matches!(route_of(path), "api" | "unknown") {
            let minute = self.minute(at);
            self.requests.add(minute);
            if status == StatusCode::TOO_MANY_REQUESTS {
                self.client_429.add(minute);
            }
        }
    }

    /// The upstream answered 429 to one attempt.
    pub fn upstream_429(&self, at: Instant) {
        self.upstream_429.add(self.minute(at));
    }

    /// A key of `pool` changed state: logs it (target `keypool::key`), counts it and keeps it for
    /// the status page.
    pub fn key_changed(&self, metrics: &Metrics, pool: &str, key: &str, change: KeyChange) {
        metrics.transition(pool, key, change.metric_reason());
        match &change {
            KeyChange::Cooling {
                extended,
                reason,
                duration,
                status,
                family,
            } => tracing::info!(
                target: "keypool::key", pool, key, reason, status, for_s = round_ms(*duration),
                scope = if *family { "model_family" } else { "key" },
                "{}",
                if *extended { "key cooling extended" } else { "key cooling" }
            ),
            KeyChange::CooldownOver { reason, family } => tracing::info!(
                target: "keypool::key", pool, key, reason,
                scope = if *family { "model_family" } else { "key" },
                "key cooldown over: available again"
            ),
            KeyChange::Disabled { reason, status } => tracing::warn!(
                target: "keypool::key", pool, key, reason, status, "key disabled"
            ),
            KeyChange::Enabled { by } => tracing::info!(target: "keypool::key", pool, key, by, "key enabled"),
        }
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_TRANSITIONS {
            recent.pop_back();
        }
        recent.push_front(Recorded {
            at: SystemTime::now(),
            pool: pool.to_owned(),
            key: key.to_owned(),
            change,
        });
    }

    /// A call marked a key: counts an upstream 429, logs and records the change if there was
    /// one, wakes the sweeper. What the gateway's mark sink does with every mark.
    pub fn mark(&self, metrics: &Metrics, pool_name: &str, pool: &Pool, mark: &KeyMark) {
        let label = pool.label(mark.key);
        if mark.key == mark.attempted {
            if mark.status == StatusCode::TOO_MANY_REQUESTS {
                self.upstream_429(Instant::now());
            }
            tracing::debug!(
                target: "keypool::attempt",
                pool = pool_name,
                key = label,
                status = mark.status.as_u16(),
                verdict = verdict_name(&mark.verdict),
                next = "next key",
                "attempt failed over"
            );
        } else {
            tracing::debug!(
                target: "keypool::attempt",
                pool = pool_name,
                key = label,
                attempted = pool.label(mark.attempted),
                status = mark.status.as_u16(),
                verdict = verdict_name(&mark.verdict),
                "key marked with the organisation of the attempted key"
            );
        }
        if let Some(change) = KeyChange::of_mark(mark) {
            self.key_changed(metrics, pool_name, label, change);
            self.wake.notify_one();
        }
    }

    /// A probe of key `id` of `pool` was answered (`status`, `None` for a transport failure)
    /// with this result: logs it, counts it in `keypool_probes_total{pool,key,result}`, keeps it
    /// for the status page, and records the enable it made, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn probe(
        &self,
        metrics: &Metrics,
        pool_name: &str,
        pool: &Pool,
        id: KeyId,
        status: Option<StatusCode>,
        result: &ProbeResult,
        now: Instant,
    ) {
        let label = pool.label(id);
        let wall = SystemTime::now();
        let status = status.map(|s| s.as_u16());
        let (name, next) = match result {
            ProbeResult::Enabled { .. } => ("enabled", None),
            ProbeResult::Failed { next } => ("failed", wall.checked_add(next.saturating_duration_since(now))),
            ProbeResult::Stale => ("stale", None),
        };
        metrics.probe(pool_name, label, name);
        tracing::info!(
            target: "keypool::key", pool = pool_name, key = label, result = name, status,
            next_in_s = next.and_then(|n| n.duration_since(wall).ok()).map(round_ms),
            "key probed"
        );
        {
            let mut probes = lock(&self.probes);
            let key = (pool_name.to_owned(), pool.fingerprint(id));
            let count = probes.get(&key).map_or(0, |p| p.count) + 1;
            probes.insert(
                key,
                ProbeRecord {
                    at: wall,
                    result: name,
                    status,
                    next,
                    count,
                },
            );
        }
        if let ProbeResult::Enabled {
            transition: Transition::Entered,
            ..
        } = result
        {
            self.key_changed(metrics, pool_name, label, KeyChange::Enabled { by: "probe" });
        }
    }

    /// The recent transitions, newest first, as JSON.
    fn recent_json(&self, now: SystemTime) -> Vec<serde_json::Value> {
        lock(&self.recent)
            .iter()
            .map(|r| {
                let (reason, status, seconds, family) = match &r.change {
                    KeyChange::Cooling {
                        reason,
                        duration,
                        status,
                        family,
                        ..
                    } => (Some(*reason), *status, Some(round_ms(*duration)), *family),
                    KeyChange::CooldownOver { reason, family } => (Some(*reason), None, None, *family),
                    KeyChange::Disabled { reason, status } => (Some(*reason), *status, None, false),
                    KeyChange::Enabled { by } => (Some(*by), None, None, false),
                };
                serde_json::json!({
                    "at_ms": unix_ms(r.at),
                    "ago_s": round_ms(now.duration_since(r.at).unwrap_or_default()),
                    "pool": r.pool,
                    "key": r.key,
                    "event": r.change.event(),
                    "state": r.change.state(),
                    "reason": reason,
                    "status": status,
                    "seconds": seconds,
                    "model_family": family,
                })
            })
            .collect()
    }
}

fn verdict_name(v: &Verdict) -> String {
    match v {
        Verdict::Deliver => "deliver".into(),
        Verdict::CoolDown { reason, duration } => {
            format!("cool {} for {}s", cool_reason(*reason), round_ms(*duration))
        }
        Verdict::Disable { reason } => format!("disable ({})", disable_reason(*reason)),
    }
}

// ---------------------------------------------------------------------------------------------
// The sweeper

/// What the sweeper knows of a cooldown: key-wide (`None`) or for one model family.
type WatchKey = (Fingerprint, Option<Family>);

/// A running cooldown, as the sweeper last saw it.
#[derive(Debug, Clone, Copy)]
struct Watched {
    until: Instant,
    reason: CoolReason,
}

/// A cooldown that ended by the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ended {
    key: KeyId,
    family: bool,
    reason: CoolReason,
}

/// One look at the pool: the cooldowns (key-wide and per model family) running at `now`
/// replace `watched`, and those that were running and are now over by their deadline are
/// returned. A cooldown that went before its deadline (an operator enabled or disabled the
/// key, a reload removed it) is not: whoever did that logged it.
fn sweep_step(watched: &mut HashMap<WatchKey, Watched>, pool: &Pool, now: Instant) -> Vec<Ended> {
    let mut running = HashMap::new();
    let mut ids = HashMap::new();
    for id in pool.ids() {
        let fp = pool.fingerprint(id);
        ids.insert(fp, id);
        match pool.state(id, now) {
            KeyState::Disabled { .. } => continue,
            KeyState::Cooling { until, reason } => {
                running.insert((fp, None), Watched { until, reason });
            }
            KeyState::Available => {}
        }
        for (family, until, reason) in pool.family_cooldowns(id, now) {
            running.insert((fp, Some(family)), Watched { until, reason });
        }
    }
    let mut ended = Vec::new();
    for (key, w) in watched.drain() {
        if running.contains_key(&key) || w.until > now {
            continue;
        }
        if let Some(&id) = ids.get(&key.0)
            && !pool.state(id, now).is_disabled()
        {
            ended.push(Ended {
                key: id,
                family: key.1.is_some(),
                reason: w.reason,
            });
        }
    }
    *watched = running;
    ended
}

/// Watches the cooldowns of the pools that `pools()` returns (name and current pool) and logs,
/// counts and records each one that ends (a cooldown ends by the clock, so no mark announces it).
/// Wakes at the earliest deadline, when `activity` is told of a new mark, and at least every
/// second (marks can also arrive from elsewhere: a state backend, a reload).
pub async fn sweep(
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    pools: impl Fn() -> Vec<(String, Arc<Pool>)>,
) {
    let mut watched: HashMap<String, HashMap<WatchKey, Watched>> = HashMap::new();
    loop {
        let now = Instant::now();
        let current = pools();
        watched.retain(|name, _| current.iter().any(|(n, _)| n == name));
        for (name, pool) in &current {
            let mine = watched.entry(name.clone()).or_default();
            for e in sweep_step(mine, pool, now) {
                activity.key_changed(
                    &metrics,
                    name,
                    pool.label(e.key),
                    KeyChange::CooldownOver {
                        reason: cool_reason(e.reason),
                        family: e.family,
                    },
                );
            }
        }
        let tick = now + Duration::from_secs(1);
        let next = watched
            .values()
            .flat_map(HashMap::values)
            .map(|w| w.until)
            .min()
            .map_or(tick, |t| t.min(tick));
        tokio::select! {
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {}
            () = activity.wake.notified() => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The admin view

/// Everything the status page shows, as JSON (`GET /admin/status`). Never a secret: labels,
/// hints, fingerprint prefixes, states, organisation ids (which identify the pool's owner and
/// are shown to admins only).
pub fn status_json(activity: &Activity, pools: &[PoolView<'_>], now: Instant) -> serde_json::Value {
    let wall = SystemTime::now();
    let probes = lock(&activity.probes).clone();
    let pools: Vec<serde_json::Value> = pools
        .iter()
        .map(|view| pool_json(view, &probes, wall, now))
        .collect();
    let minute = activity.minute(now);
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now_ms": unix_ms(wall),
        "uptime_s": round_ms(now.saturating_duration_since(activity.origin)),
        "started_ms": unix_ms(activity.started),
        "pools": pools,
        "transitions": activity.recent_json(wall),
        "per_minute": {
            "minutes": MINUTES,
            "current_minute_s": round_ms(Duration::from_secs(now.saturating_duration_since(activity.origin).as_secs() % 60)),
            "requests": activity.requests.read(minute),
            "upstream_429": activity.upstream_429.read(minute),
            "client_429": activity.client_429.read(minute),
        },
    })
}

/// One served pool, as the status view shows it.
#[derive(Debug)]
pub struct PoolView<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its mount path.
    pub mount: &'a str,
    /// Its provider's name.
    pub provider: &'a str,
    /// Its upstream base URL.
    pub upstream: &'a str,
    /// Its keys.
    pub pool: Arc<Pool>,
    /// When its disabled keys are probed next (SPEC §11.5).
    pub next_probes: Vec<(KeyId, Instant)>,
}

fn pool_json(
    view: &PoolView<'_>,
    probes: &HashMap<(String, Fingerprint), ProbeRecord>,
    wall: SystemTime,
    now: Instant,
) -> serde_json::Value {
    let pool = &view.pool;
    let mut counts = [0usize; 3];
    let keys: Vec<serde_json::Value> = pool
        .ids()
        .map(|id| {
            let state = pool.state(id, now);
            let families = pool.family_cooldowns(id, now);
            // The longest cooldown of a model family, shown when the key is otherwise available
            // (a rate limit of a key whose organisation is known cools it for the request's
            // model family only; requests for other families still use it).
            let family = families
                .iter()
                .max_by_key(|(_, until, _)| *until)
                .map(|(_, until, reason)| (until.saturating_duration_since(now), *reason));
            let (name, reason, left, scope) = match (state, family) {
                (KeyState::Available, None) => ("available", None, None, None),
                (KeyState::Available, Some((left, reason))) => (
                    "cooling",
                    Some(cool_reason(reason)),
                    Some(left),
                    Some("model_family"),
                ),
                (
                    KeyState::Cooling {
                        until,
                        reason: CoolReason::SpendCapped,
                    },
                    _,
                ) => (
                    "spend_capped",
                    Some("spend_capped"),
                    Some(until.saturating_duration_since(now)),
                    Some("key"),
                ),
                (KeyState::Cooling { until, reason }, _) => (
                    "cooling",
                    Some(cool_reason(reason)),
                    Some(until.saturating_duration_since(now)),
                    Some("key"),
                ),
                (KeyState::Disabled { reason }, _) => ("disabled", Some(disable_reason(reason)), None, None),
            };
            counts[match name {
                "available" => 0,
                "disabled" => 2,
                _ => 1,
            }] += 1;
            let fingerprint = pool.fingerprint(id).to_string();
            let organisation = pool.scope(id);
            let probe = probes
                .get(&(view.name.to_owned(), pool.fingerprint(id)))
                .map(|p| {
                    serde_json::json!({
                        "at_ms": unix_ms(p.at),
                        "ago_s": round_ms(wall.duration_since(p.at).unwrap_or_default()),
                        "result": p.result,
                        "status": p.status,
                        "next_in_s": p.next.map(|n| round_ms(n.duration_since(wall).unwrap_or_default())),
                        "count": p.count,
                    })
                });
            serde_json::json!({
                "label": pool.label(id),
                "hint": pool.secret(id).hint(),
                "fingerprint": &fingerprint[..fingerprint.len().min(12)],
                "state": name,
                "reason": reason,
                "seconds_left": left.map(round_ms),
                "cooling_scope": scope,
                "model_family_cooldowns": families.len(),
                "organisation": organisation.map(|s| &*s.organisation),
                "workspace": organisation.and_then(|s| s.workspace.as_deref()),
                "hinted": !pool.hints(id, now).is_empty(),
                "probe": probe,
                "next_probe_s": view
                    .next_probes
                    .iter()
                    .find(|(k, _)| *k == id)
                    .map(|(_, at)| round_ms(at.saturating_duration_since(now))),
            })
        })
        .collect();
    serde_json::json!({
        "name": view.name,
        "mount": view.mount,
        "provider": view.provider,
        "upstream": view.upstream,
        "single_organisation": crate::limits::single_organisation(pool),
        "keys": keys,
        "available": counts[0],
        "cooling": counts[1],
        "disabled": counts[2],
    })
}

// ---------------------------------------------------------------------------------------------
// Admin authentication for browsers

/// The password of an `Authorization: Basic` header (any user name), for browsers: the status
/// page asks for the admin token as the password.
pub fn basic_password(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64_decode(rest.trim_ascii())?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec()).filter(|p| !p.is_empty())
}

/// Standard base64 (RFC 4648 §4, padding optional); `None` for anything else.
fn base64_decode(input: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let input = match input {
        [rest @ .., b'=', b'='] | [rest @ .., b'='] if input.len().is_multiple_of(4) => rest,
        _ => input,
    };
    if input.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3 + 2);
    for chunk in input.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        let bits = chunk.len() * 6;
        acc <<= 24 - bits;
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..1 + bits / 8]);
    }
    Some(out)
}

/// The realm browsers show when they ask for the admin token.
pub const REALM: &str = "Basic realm=\"keypool\", charset=\"UTF-8\"";

/// Whether `Authorization: Basic` may carry the admin token for this request: only for reading
/// (`GET`, `HEAD`). A browser attaches cached Basic credentials to any request to the gateway,
/// including a form another site posts, so state-changing admin routes need the token as
/// `x-api-key` or `Authorization: Bearer`, which no other site can make a browser send.
pub fn basic_allowed(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// Headers of the status page: no caching, no framing, nothing loaded from anywhere.
pub fn page_response() -> Response<Bytes> {
    let mut res = Response::new(Bytes::from_static(PAGE.as_bytes()));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    res
}

// ---------------------------------------------------------------------------------------------
// Requests the gateway answers itself

/// Which of the gateway's routes a request went to, for `keypool_gateway_responses_total`.
pub fn route_of(path: &str) -> &'static str {
    match path {
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        p if p == "/admin" || p.starts_with("/admin/") => "admin",
        p if p.starts_with("/v1/") => "api",
        _ => "unknown",
    }
}

/// What the gateway noted on a response it made itself: the message of an error, for the log.
#[derive(Debug, Clone)]
pub struct Answered {
    /// The error message (never a secret), `None` for a success.
    pub message: Option<String>,
}

/// A response the gateway made itself that is logged elsewhere (a call's own error response
/// already has its request line).
#[derive(Debug, Clone, Copy)]
pub struct AlreadyLogged;

/// An error response in the profile's shape, with a fresh request id in its body and in the
/// profile's request-id header.
pub fn error_response(profile: &Profile, status: StatusCode, message: &str) -> Response<Bytes> {
    let request_id = keypool_core::client::request_id(SystemTime::now());
    let mut res = Response::new(profile.error_body(status, message, Some(&request_id)));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert(profile.request_id_header(), v);
    }
    res.extensions_mut().insert(Answered {
        message: Some(message.to_owned()),
    });
    res
}

/// Gives a status without a standard reason phrase the profile's (`529 Overloaded`), so an
/// HTTP/1.1 status line never reads `529 <none>`.
pub fn reason_phrase<B>(profile: &Profile, res: &mut Response<B>) {
    let status = res.status();
    if status.canonical_reason().is_none()
        && let Some(phrase) = profile.reason_phrase(status)
        && let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(phrase.as_bytes())
    {
        res.extensions_mut().insert(phrase);
    }
}

/// Logs and counts a response the gateway made itself (not one relayed from the upstream, not
/// a call's error response, which [`AlreadyLogged`] marks): one request line with method, path,
/// status, outcome `gateway`, request id and latency, at info level, or at debug level for
/// successful `/healthz`, `/metrics` and `/admin` reads (scrapes and status-page polls would
/// drown the log); and one count in `keypool_gateway_responses_total{route,status}`.
pub fn log_answered<B>(
    metrics: &Metrics,
    profile: &Profile,
    method: &Method,
    path: &str,
    started: Instant,
    res: &mut Response<B>,
) {
    if res.extensions().get::<AlreadyLogged>().is_some() {
        return;
    }
    let status = res.status().as_u16();
    let route = route_of(path);
    metrics.gateway_response(route, status);
    let header_name = profile.request_id_header();
    let request_id = match res.headers().get(&header_name) {
        Some(v) => v.to_str().unwrap_or("-").to_owned(),
        None => {
            let id = keypool_core::client::request_id(SystemTime::now());
            if let Ok(v) = HeaderValue::from_str(&id) {
                res.headers_mut().insert(header_name, v);
            }
            id
        }
    };
    let message = res.extensions_mut().remove::<Answered>().and_then(|a| a.message);
    let path: String = path.chars().take(100).collect();
    let latency_ms = latency_ms(started.elapsed());
    let quiet = res.status().is_success() && route != "api" && route != "unknown" && *method == Method::GET;
    if quiet {
        tracing::debug!(
            target: "keypool::request", method = %method, path = %path, status, attempts = 0, key = "-",
            latency_ms, outcome = "gateway", request_id = %request_id, "request"
        );
    } else {
        tracing::info!(
            target: "keypool::request", method = %method, path = %path, status, attempts = 0, key = "-",
            latency_ms, outcome = "gateway", request_id = %request_id, error = message.as_deref(), "request"
        );
    }
}

/// Logs and counts a connection hyper closed with an error. A request hyper could not parse
/// (a malformed request line or header, a header section too large) was answered by hyper
/// itself, before any handler saw it: `400` (`431` for headers too large), with no body.
pub fn connection_error(metrics: &Metrics, error: &(dyn std::error::Error + 'static)) {
    let hyper_error = error.downcast_ref::<hyper::Error>();
    match hyper_error {
        Some(e) if e.is_parse() || e.is_parse_too_large() => {
            let status: u16 = if e.is_parse_too_large() { 431 } else { 400 };
            metrics.gateway_response("malformed", status);
            tracing::info!(
                target: "keypool::request", status, outcome = "malformed", error = %e,
                "malformed request: answered by the HTTP layer and the connection closed"
            );
        }
        _ => tracing::debug!(target: "keypool::request", error = %error, "connection ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_minute_counts_roll_over() {
        let c = PerMinute::default();
        c.add(0);
        c.add(0);
        c.add(2);
        let r = c.read(2);
        assert_eq!(r.len(), MINUTES);
        assert_eq!(&r[MINUTES - 3..], &[2, 0, 1]);
        // Sixty minutes later the slot of minute 2 counts minute 62 afresh.
        c.add(62);
        let r = c.read(62);
        assert_eq!(r[MINUTES - 1], 1);
        assert_eq!(r.iter().sum::<u32>(), 1, "{r:?}");
        assert_eq!(c.read(200).iter().sum::<u32>(), 0);
    }

    #[test]
    fn the_sweeper_reports_cooldowns_that_end_by_the_clock_only() {
        use keypool_core::Order;
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let pool = Pool::new(
            [
                "sk-ant-api03-sweep-key-zero-000000000",
                "sk-ant-api03-sweep-key-one-1111111111",
            ],
            Order::default(),
            t0,
        )
        .unwrap();
        let (a, b) = (pool.key_at(0).unwrap(), pool.key_at(1).unwrap());
        let _ = pool.cool_down(a, t0, Duration::from_secs(5), CoolReason::RateLimited);
        let _ = pool.cool_down(b, t0, Duration::from_secs(5), CoolReason::Overloaded);
        let mut watched = HashMap::new();
        assert_eq!(sweep_step(&mut watched, &pool, t0), vec![]);
        // b is enabled by an operator before its deadline: not a cooldown that ended.
        let _ = pool.enable(b, t0 + Duration::from_secs(1));
        assert_eq!(
            sweep_step(&mut watched, &pool, t0 + Duration::from_secs(1)),
            vec![]
        );
        assert_eq!(
            sweep_step(&mut watched, &pool, t0 + Duration::from_millis(4999)),
            vec![]
        );
        let ended = sweep_step(&mut watched, &pool, t0 + Duration::from_secs(5));
        assert_eq!(
            ended,
            vec![Ended {
                key: a,
                family: false,
                reason: CoolReason::RateLimited
            }]
        );
        assert_eq!(
            sweep_step(&mut watched, &pool, t0 + Duration::from_secs(6)),
            vec![]
        );
        // A model family's cooldown ends the same way.
        let now = t0 + Duration::from_secs(10);
        let mark = pool.family_cool_mark(
            a,
            Family::of("sonnet"),
            wall + Duration::from_secs(10),
            Duration::from_secs(3),
            CoolReason::RateLimited,
        );
        let _ = pool.apply(&mark, now, wall + Duration::from_secs(10));
        assert_eq!(sweep_step(&mut watched, &pool, now), vec![]);
        let ended = sweep_step(&mut watched, &pool, now + Duration::from_secs(3));
        assert_eq!(
            ended,
            vec![Ended {
                key: a,
                family: true,
                reason: CoolReason::RateLimited
            }]
        );
    }

    #[test]
    fn basic_auth_password() {
        let mut h = HeaderMap::new();
        // "anyone:s3cret token" (RFC 7617 allows any bytes after the first colon)
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YW55b25lOnMzY3JldCB0b2tlbg=="),
        );
        assert_eq!(basic_password(&h).as_deref(), Some(&b"s3cret token"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("basic OnRva2Vu")); // ":token"
        assert_eq!(basic_password(&h).as_deref(), Some(&b"token"[..]));
        for bad in [
            "Basic !!!!",
            "Basic dXNlcg==",
            "Bearer dXNlcjpwdw==",
            "Basic",
            "Basic dXNlcjo=",
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert_eq!(basic_password(&h), None, "{bad}");
        }
        assert_eq!(base64_decode(b"YQ").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode(b"YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode(b"YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(base64_decode(b"Y"), None);
    }

    #[test]
    fn rounding() {
        assert_eq!(latency_ms(Duration::from_nanos(5_165_353)), 5.165);
        assert_eq!(latency_ms(Duration::from_nanos(5_165_353)).to_string(), "5.165");
        assert_eq!(round_ms(Duration::from_millis(1500)).to_string(), "1.5");
    }

    #[test]
    fn routes() {
        assert_eq!(route_of("/v1/messages"), "api");
        assert_eq!(route_of("/v1"), "unknown");
        assert_eq!(route_of("/"), "unknown");
        assert_eq!(route_of("/admin"), "admin");
        assert_eq!(route_of("/admin/keys"), "admin");
        assert_eq!(route_of("/administrator"), "unknown");
    }
}
