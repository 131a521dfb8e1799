//! Prometheus metrics (SPEC §7), labelled by key label, never by key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keypool_core::{KeyState, Pool};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabel {
    pool: String,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    pool: String,
    key: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    pool: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    pool: Arc<String>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    pool: String,
    key: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

/// A counter family by HTTP status whose counters, once made, are kept by status: counting a
/// request is then one atomic add, not a lookup that hashes the label under a lock.
struct ByStatus {
    family: Family<StatusLabel, Counter>,
    counters: Box<[std::sync::OnceLock<Counter>]>,
}

impl ByStatus {
    fn new(family: Family<StatusLabel, Counter>) -> Self {
        Self {
            family,
            counters: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    fn inc(&self, status: u16) {
        let make = || self.family.get_or_create(&StatusLabel { status }).clone();
        match self.counters.get(usize::from(status)) {
            Some(cell) => cell.get_or_init(make).inc(),
            None => make().inc(),
        };
    }
}

/// A pool's call-outcome counters, each kept once made (in the first free slot, by outcome
/// name): counting a call's end is then a short scan and one atomic add, not a lookup that hashes
/// the labels under a lock. Two threads making the same outcome's counter at once may fill two
/// slots; both hold the same counter of the family, so nothing is counted twice or lost.
#[derive(Debug)]
pub struct PoolOutcomes {
    family: Family<OutcomeLabels, Counter>,
    pool: Arc<String>,
    slots: [std::sync::OnceLock<(&'static str, Counter)>; 16],
}

impl PoolOutcomes {
    /// Counts a call of this pool that ended with `outcome` (the core's
    /// [`Outcome`](keypool_core::call::Outcome) name).
    pub fn inc(&self, outcome: &'static str) {
        let make = || {
            self.family
                .get_or_create(&OutcomeLabels {
                    pool: self.pool.clone(),
                    outcome,
                })
                .clone()
        };
        for slot in &self.slots {
            let (name, counter) = slot.get_or_init(|| (outcome, make()));
            if *name == outcome {
                counter.inc();
                return;
            }
        }
        make().inc();
    }
}

/// Metrics of the shared state backend (`--state`), registered only when one is configured.
#[derive(Debug, Clone)]
pub struct StateMetrics {
    /// 1 while the backend answers, 0 while the gateway serves from local state alone.
    pub up: Gauge,
    /// Seconds since the last full read of the shared state.
    pub last_sync_age: Gauge<f64, AtomicU64>,
    /// Time from a mark being queued on one replica to its arrival here.
    pub propagation: Histogram,
}

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    key_state: Family<KeyLabel, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    attempts: Histogram,
    exhaustions: Family<KindLabel, Counter>,
    upstream_status: ByStatus,
    responses: ByStatus,
    outcomes: Family<OutcomeLabels, Counter>,
    gateway_responses: Family<RouteStatusLabels, Counter>,
    probes: Family<ProbeLabels, Counter>,
    single_organisation: Family<PoolLabel, Gauge>,
    latency: Histogram,
    ttfb: Histogram,
    /// Requests finished so far (the count of `latency`, readable without rendering).
    finished: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keypool");
        let key_state = Family::<KeyLabel, Gauge>::default();
        registry.register(
            "key_state",
            "State of each key (by pool and key label): 0 available, 1 cooling, 2 disabled",
            key_state.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "key_transitions",
            "Key state transitions by pool, key and reason: going out (rate_limited, overloaded, auth, spend_capped, unauthorized, forbidden, billing, operator) and coming back (cooldown_over, enabled, probe_succeeded)",
            transitions.clone(),
        );
        let attempts = Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0]);
        registry.register(
            "attempts_per_request",
            "Upstream attempts per pooled request",
            attempts.clone(),
        );
        let exhaustions = Family::<KindLabel, Counter>::default();
        registry.register(
            "exhaustions",
            "Requests answered because no key was left, by pool and kind",
            exhaustions.clone(),
        );
        let upstream_status = Family::<StatusLabel, Counter>::default();
        registry.register(
            "upstream_responses",
            "Upstream response heads by status",
            upstream_status.clone(),
        );
        let responses = Family::<StatusLabel, Counter>::default();
        registry.register(
            "responses",
            "Responses sent to clients by status",
            responses.clone(),
        );
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "request_outcomes",
            "Forwarded requests by pool and how their call ended: complete, upstream_broke, upstream_error, timeout, client_gone, or failed_ and the kind of keypool's own error",
            outcomes.clone(),
        );
        let gateway_responses = Family::<RouteStatusLabels, Counter>::default();
        registry.register(
            "gateway_responses",
            "Responses the gateway made itself without asking the upstream (401 client token, 404, 413, malformed requests, admin, health and metrics), by route (api, unknown, admin, healthz, metrics, malformed) and status",
            gateway_responses.clone(),
        );
        let probes = Family::<ProbeLabels, Counter>::default();
        registry.register(
            "probes",
            "Probes of disabled keys by pool, key and result (enabled, failed, stale)",
            probes.clone(),
        );
        let single_organisation = Family::<PoolLabel, Gauge>::default();
        registry.register(
            "pool_single_organisation",
            "1 when every key of the pool is known to belong to one organisation (failing over on 429 buys little there), else 0",
            single_organisation.clone(),
        );
        let latency = Histogram::new(latency_buckets());
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response",
            latency.clone(),
        );
        let ttfb = Histogram::new(latency_buckets());
        registry.register(
            "time_to_first_byte_seconds",
            "Time from request to the response head",
            ttfb.clone(),
        );
        Self {
            registry,
            key_state,
            transitions,
            attempts,
            exhaustions,
            upstream_status: ByStatus::new(upstream_status),
            responses: ByStatus::new(responses),
            outcomes,
            gateway_responses,
            probes,
            single_organisation,
            latency,
            ttfb,
            finished: AtomicU64::new(0),
        }
    }

    /// Registers the state backend's metrics (call once, before sharing `self`).
    pub fn register_state(&mut self) -> StateMetrics {
        let m = StateMetrics {
            up: Gauge::default(),
            last_sync_age: Gauge::default(),
            propagation: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
        };
        self.registry.register(
            "state_backend_up",
            "1 while the shared state backend (Redis) answers, 0 while serving from local state",
            m.up.clone(),
        );
        self.registry.register(
            "state_last_sync_age_seconds",
            "Seconds since the shared state was last read in full",
            m.last_sync_age.clone(),
        );
        self.registry.register(
            "state_propagation_seconds",
            "Time from a mark being queued on another replica to its arrival here (includes clock skew)",
            m.propagation.clone(),
        );
        m
    }

    /// A key changed state.
    pub fn transition(&self, pool: &str, label: &str, reason: &str) {
        self.transitions
            .get_or_create(&TransitionLabels {
                pool: pool.to_owned(),
                key: label.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A pooled request is answered after `attempts` upstream attempts.
    pub fn attempts(&self, attempts: usize) {
        self.attempts.observe(attempts as f64);
    }

    /// No key was left.
    pub fn exhausted(&self, pool: &str, kind: &'static str) {
        self.exhaustions
            .get_or_create(&KindLabel {
                pool: pool.to_owned(),
                kind,
            })
            .inc();
    }

    /// An upstream head arrived.
    pub fn upstream_status(&self, status: u16) {
        self.upstream_status.inc(status);
    }

    /// A response head went to the client after `ttfb`.
    pub fn response(&self, status: u16, ttfb: Duration) {
        self.responses.inc(status);
        self.ttfb.observe(ttfb.as_secs_f64());
    }

    /// A forwarded request's call ended with `outcome` (the core's
    /// [`Outcome`](keypool_core::call::Outcome) name).
    pub fn outcome(&self, pool: &Arc<String>, outcome: &'static str) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                pool: pool.clone(),
                outcome,
            })
            .inc();
    }

    /// The outcome counters of the pool named `pool`, for [`PoolOutcomes::inc`].
    pub fn pool_outcomes(&self, pool: &Arc<String>) -> PoolOutcomes {
        PoolOutcomes {
            family: self.outcomes.clone(),
            pool: pool.clone(),
            slots: Default::default(),
        }
    }

    /// The gateway answered a request on `route` itself with `status`.
    pub fn gateway_response(&self, route: &'static str, status: u16) {
        self.gateway_responses
            .get_or_create(&RouteStatusLabels { route, status })
            .inc();
    }

    /// A probe of `key` in `pool` ended with `result` (`enabled`, `failed`, `stale`).
    pub fn probe(&self, pool: &str, key: &str, result: &'static str) {
        self.probes
            .get_or_create(&ProbeLabels {
                pool: pool.to_owned(),
                key: key.to_owned(),
                result,
            })
            .inc();
    }

    /// A response body ended after `total`.
    pub fn finished(&self, total: Duration) {
        self.latency.observe(total.as_secs_f64());
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests have finished since start.
    pub fn finished_count(&self) -> u64 {
        self.finished.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition, with key states read from each named pool at `now`.
    pub fn render(&self, pools: &[(&str, Arc<Pool>)], now: Instant) -> String {
        self.key_state.clear();
        for (name, pool) in pools {
            self.single_organisation
                .get_or_create(&PoolLabel {
                    pool: (*name).to_owned(),
                })
                .set(i64::from(crate::limits::single_organisation(pool).is_some()));
            for key in pool.snapshot(now) {
                let value = match key.state {
                    KeyState::Available => 0,
                    KeyState::Cooling { .. } => 1,
                    KeyState::Disabled { .. } => 2,
                };
                self.key_state
                    .get_or_create(&KeyLabel {
                        pool: (*name).to_owned(),
                        key: key.label,
                    })
                    .set(value);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, starts: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(starts))
    }

    #[test]
    fn cached_counters_count_into_their_families() {
        let metrics = Metrics::new();
        let a = metrics.pool_outcomes(&Arc::new("a".to_owned()));
        let b = metrics.pool_outcomes(&Arc::new("b".to_owned()));
        for _ in 0..3 {
            a.inc("complete");
        }
        a.inc("timeout");
        b.inc("complete");
        // The uncached path counts into the same series.
        metrics.outcome(&Arc::new("a".to_owned()), "complete");
        // More distinct outcomes than slots still count.
        let names: Vec<&'static str> = (0..20)
            .map(|i| &*Box::leak(format!("x{i}").into_boxed_str()))
            .collect();
        for name in &names {
            a.inc(name);
        }
        a.inc(names[19]);
        for status in [200, 200, 429, 999] {
            metrics.upstream_status(status);
        }
        let text = metrics.render(&[], Instant::now());
        let count = |starts: &str| {
            line(&text, starts)
                .unwrap_or_else(|| panic!("no {starts} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        for (series, expected) in [
            (
                r#"keypool_request_outcomes_total{pool="a",outcome="complete"}"#,
                "4",
            ),
            (
                r#"keypool_request_outcomes_total{pool="a",outcome="timeout"}"#,
                "1",
            ),
            (
                r#"keypool_request_outcomes_total{pool="b",outcome="complete"}"#,
                "1",
            ),
            (r#"keypool_request_outcomes_total{pool="a",outcome="x19"}"#, "2"),
            (r#"keypool_request_outcomes_total{pool="a",outcome="x0"}"#, "1"),
            (r#"keypool_upstream_responses_total{status="200"}"#, "2"),
            (r#"keypool_upstream_responses_total{status="429"}"#, "1"),
            (r#"keypool_upstream_responses_total{status="999"}"#, "1"),
        ] {
            assert_eq!(count(series), expected, "{series}");
        }
    }
}
