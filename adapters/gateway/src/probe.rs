//! Probes of disabled keys (SPEC §11.5): per served pool, one task drives the core's
//! [`Prober`]. It wakes when the next probe is due, and when a mark may have disabled or enabled
//! a key (the calls' marks, marks from other replicas, an operator's action); it sends each due
//! probe — `GET /v1/models?limit=1` with the key, as a one-shot own-key request that never marks
//! the pool — and hands the status back. A success enables the key with an ordinary enable mark,
//! which the state backend shares like an operator's; every result is logged, counted
//! (`keypool_probes_total{pool,key,result}`) and kept for the status page
//! ([`Activity::probe`]).
//!
//! With `--state redis`, a replica probes a key only while it holds the key's lease
//! (`{ns}:probe:{fingerprint}`): the others put their probe off until the lease ends. A failed
//! probe keeps the lease until its next probe is due, so the replicas share one schedule. When
//! the backend does not answer, the replica probes on its own, as it would without one.
//!
//! Keys that cool (rate limits, spend caps) are never probed: only keys the upstream disabled.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use keypool_core::call::{Credential, KeyMark, MarkSink, Request as CallRequest};
use keypool_core::probe::{Probe, ProbeConfig, ProbeResult, Prober};
use keypool_core::{KeyId, Pool, Profile, Transition, Verdict};
use keypool_redis::{Lease, RedisState};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::status::Activity;

/// The longest a probe may take, lease included; also the lease a probe in flight holds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Slack added to another replica's lease before trying again, so that it has run out.
const LEASE_SLACK: Duration = Duration::from_millis(20);

/// One pool's probe schedule, shared by its probe task, its mark sinks (which wake the task)
/// and the admin view (which shows the next probe of each key).
#[derive(Debug)]
pub(crate) struct Probes {
    prober: Mutex<Prober>,
    wake: Notify,
    enabled: bool,
}

impl Probes {
    /// A schedule with this configuration (`first_delay` zero: probes off).
    pub(crate) fn new(config: ProbeConfig) -> Arc<Self> {
        let prober = Prober::new(config);
        Arc::new(Self {
            enabled: prober.is_enabled(),
            prober: Mutex::new(prober),
            wake: Notify::new(),
        })
    }

    fn prober(&self) -> MutexGuard<'_, Prober> {
        self.prober.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the probe task to look at the pool again (a key may have been disabled or
    /// enabled). Never blocks.
    pub(crate) fn wake(&self) {
        if self.enabled {
            self.wake.notify_one();
        }
    }

    /// The disabled keys of `pool` that are scheduled, with their next probe.
    pub(crate) fn scheduled(&self, pool: &Pool, now: Instant) -> Vec<(KeyId, Instant)> {
        if !self.enabled {
            return Vec::new();
        }
        let prober = self.prober();
        pool.ids()
            .filter(|&id| pool.state(id, now).is_disabled())
            .filter_map(|id| Some((id, prober.next_probe(pool, id)?)))
            .collect()
    }

    /// When key `id` of `pool` is probed next, if it is scheduled.
    pub(crate) fn next_probe(&self, pool: &Pool, id: KeyId) -> Option<Instant> {
        if !self.enabled {
            return None;
        }
        self.prober().next_probe(pool, id)
    }
}

/// A mark sink that wakes the probe task when a call disables a key, then passes the mark on.
#[derive(Debug)]
struct Waking {
    inner: Arc<dyn MarkSink>,
    probes: Arc<Probes>,
}

impl MarkSink for Waking {
    fn mark(&self, pool: &Arc<Pool>, mark: &KeyMark) {
        self.inner.mark(pool, mark);
        if mark.transition != Transition::Unchanged && matches!(mark.verdict, Verdict::Disable { .. }) {
            self.probes.wake();
        }
    }
}

/// `inner`, and a wake-up of the probe task for every key a call disables.
pub(crate) fn waking(inner: Arc<dyn MarkSink>, probes: &Arc<Probes>) -> Arc<dyn MarkSink> {
    if !probes.enabled {
        return inner;
    }
    Arc::new(Waking {
        inner,
        probes: probes.clone(),
    })
}

/// What one pool's probe task works with.
pub(crate) struct Task {
    /// The pool's name (logs, metrics).
    pub(crate) name: Arc<String>,
    /// Its schedule.
    pub(crate) probes: Arc<Probes>,
    /// Its provider.
    pub(crate) profile: Profile,
    /// Its upstream client; probes are sent with `Credential::Key`, which never marks the pool.
    pub(crate) client: keypool_tokio::Client,
    /// The shared state backend, for leases and to share an enable.
    pub(crate) backend: Option<RedisState>,
    /// The gateway's metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// What the status page keeps (probes, transitions); it also logs and counts them.
    pub(crate) activity: Arc<Activity>,
    /// The pool as it is now (reloads replace it).
    pub(crate) current: Box<dyn Fn() -> Arc<Pool> + Send + Sync>,
}

/// What became of a probe before its answer was read.
enum Sent {
    /// The upstream's status, or `None`: no answer (transport failure, timeout).
    Answered(Option<StatusCode>),
    /// Another replica holds the key's lease for this long.
    Deferred(Duration),
}

impl Task {
    /// Runs until aborted (when the server stops): probes every key that is due, then sleeps
    /// until the next one is due or a mark wakes it.
    pub(crate) async fn run(self) {
        if !self.probes.enabled {
            return;
        }
        let task = Arc::new(self);
        // Probes in flight; dropping the set (when this task is aborted) aborts them.
        let mut inflight = JoinSet::new();
        loop {
            let pool = (task.current)();
            let now = Instant::now();
            let (due, next) = {
                let mut prober = task.probes.prober();
                prober.handle_pool(&pool, now);
                let mut due = Vec::new();
                while let Some(probe) = prober.poll_probe(&pool, &task.profile, now) {
                    due.push(probe);
                }
                (due, prober.poll_timeout())
            };
            for probe in due {
                let label = pool.label(probe.key).to_owned();
                let secret = pool.secret(probe.key).clone();
                inflight.spawn(task.clone().probe(probe, label, secret));
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                () = task.probes.wake.notified() => {}
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
            }
        }
    }

    /// One probe: the lease (with a backend), the request, the answer's effect.
    async fn probe(self: Arc<Self>, probe: Probe, label: String, secret: keypool_core::Secret) {
        let sent = self.send(&probe, secret).await;
        let now = Instant::now();
        let status = match sent {
            Sent::Deferred(remaining) => {
                self.probes
                    .prober()
                    .handle_deferred(&probe, now, remaining + LEASE_SLACK);
                tracing::debug!(
                    target: "keypool::key", pool = %self.name, key = %label,
                    next_in_s = round_ms(remaining + LEASE_SLACK),
                    "probe left to the replica that holds the key's lease"
                );
                return;
            }
            Sent::Answered(status) => status,
        };
        let pool = (self.current)();
        let result = self
            .probes
            .prober()
            .handle_result(&pool, &probe, status, now, SystemTime::now());
        // Logged ("key probed"), counted (keypool_probes_total, and a probe_succeeded
        // transition for an enable) and kept for the status page.
        match pool.find_fingerprint(probe.fingerprint) {
            Some(id) => self
                .activity
                .probe(&self.metrics, &self.name, &pool, id, status, &result, now),
            None => tracing::debug!(
                target: "keypool::key", pool = %self.name, key = %label,
                "probe answered for a key a reload removed"
            ),
        }
        match result {
            ProbeResult::Enabled { mark, .. } => {
                // Shared like an operator's enable: every replica takes the key back.
                if let Some(backend) = &self.backend {
                    backend.publish(&mark);
                }
            }
            ProbeResult::Failed { next } => {
                // Keep the lease until the next probe is due: the other replicas wait as long.
                if let Some(backend) = &self.backend {
                    let hold = next.saturating_duration_since(Instant::now());
                    if !hold.is_zero()
                        && let Err(e) = backend.probe_lease(probe.fingerprint, hold).await
                    {
                        tracing::debug!(target: "keypool::key", pool = %self.name, key = %label, error = %e, "probe lease not extended");
                    }
                }
            }
            ProbeResult::Stale => {}
        }
        // The schedule changed: let the task look at it again.
        self.probes.wake();
    }

    async fn send(&self, probe: &Probe, secret: keypool_core::Secret) -> Sent {
        if let Some(backend) = &self.backend {
            match backend.probe_lease(probe.fingerprint, PROBE_TIMEOUT).await {
                Ok(Lease::Acquired) => {}
                Ok(Lease::Held { remaining }) => return Sent::Deferred(remaining),
                Err(e) => tracing::debug!(
                    target: "keypool::key", pool = %self.name, error = %e,
                    "probing without a lease: the state backend did not answer"
                ),
            }
        }
        let attempt = &probe.attempt;
        let request = CallRequest {
            method: attempt.method.clone(),
            path_and_query: attempt.path_and_query.clone(),
            headers: attempt.headers.clone(),
            body: attempt.body.clone(),
        };
        // An own-key call: one attempt, delivered as it is, no mark on the pool.
        let call = self.client.send_with(request, Credential::Key(secret));
        match tokio::time::timeout(PROBE_TIMEOUT, call).await {
            // The body (a model list) is not needed; dropping it ends the call.
            Ok(Ok(response)) => Sent::Answered(Some(response.status())),
            Ok(Err(_)) | Err(_) => Sent::Answered(None),
        }
    }
}

/// Seconds, to the millisecond, for logs.
fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
