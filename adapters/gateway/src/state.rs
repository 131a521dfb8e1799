//! Shared key state across replicas (`--state redis://...`, SPEC §10): the glue between the
//! gateway and [`keypool_redis`]. Without `--state` none of this runs and state is in-process.
//!
//! What the gateway does with a backend: every mark its calls make goes to the driver (beside
//! the log), operator enable/disable publish their marks, marks from other replicas are logged
//! and counted like local ones, `/healthz` is 503 until the shared state has been read once,
//! and `/metrics` and `/admin/keys` show the backend's health.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use keypool_core::call::{KeyMark, MarkSink};
use keypool_core::{Change, DisableReason, KeyId, Mark, Pool, Transition};
use keypool_redis::{Events, Health, RedisState, StateConfig};

use crate::config::ConfigError;
use crate::metrics::{Metrics, StateMetrics};
use crate::probe::Probes;

/// Test-only: shifts the wall clock the state driver uses by this many milliseconds, to run
/// replicas whose clocks disagree on one machine. Not a flag: nobody should set it in
/// production.
const CLOCK_OFFSET_ENV: &str = "KEYPOOL_TEST_CLOCK_OFFSET_MS";

/// Validates `--state` / `--state-namespace` (messages never show the URL's password).
pub fn config(url: &str, namespace: &str) -> Result<StateConfig, ConfigError> {
    let mut config = StateConfig::new(url, namespace).map_err(|e| ConfigError(format!("--state: {e}")))?;
    if let Ok(offset) = std::env::var(CLOCK_OFFSET_ENV) {
        config.clock_offset_ms = offset.trim().parse().map_err(|_| {
            ConfigError(format!(
                "{CLOCK_OFFSET_ENV} must be a whole number of milliseconds"
            ))
        })?;
    }
    Ok(config)
}

/// A running state backend.
#[derive(Debug)]
pub struct Backend {
    driver: RedisState,
    metrics: StateMetrics,
}

/// Starts the driver for `pool` when a backend is configured (inside the tokio runtime); marks
/// from other replicas wake the pool's probe task.
pub(crate) fn start(
    config: Option<&StateConfig>,
    pool: &Arc<Pool>,
    metrics: &Arc<Metrics>,
    state_metrics: Option<StateMetrics>,
    pool_name: &str,
    probes: &Arc<Probes>,
) -> Result<Option<Backend>, String> {
    let (Some(config), Some(state_metrics)) = (config, state_metrics) else {
        return Ok(None);
    };
    let events = Arc::new(RemoteLog {
        pool: pool_name.to_owned(),
        metrics: metrics.clone(),
        state: state_metrics.clone(),
        probes: probes.clone(),
    });
    let driver = RedisState::start(config.clone(), pool.clone(), Some(events)).map_err(|e| e.to_string())?;
    tracing::info!(
        target: "keypool::state", backend = %config.url(), namespace = %config.namespace(),
        "sharing key state through Redis; /healthz says ready once it has been read"
    );
    Ok(Some(Backend {
        driver,
        metrics: state_metrics,
    }))
}

impl Backend {
    /// The driver (leases, publishing marks made outside calls).
    pub(crate) fn driver(&self) -> &RedisState {
        &self.driver
    }
}

/// The sink for the calls' marks: the log, then the backend when there is one.
pub(crate) fn sink(log: Arc<dyn MarkSink>, backend: Option<&Backend>) -> Arc<dyn MarkSink> {
    match backend {
        Some(b) => Arc::new(Tee {
            log,
            driver: b.driver.clone(),
        }),
        None => log,
    }
}

#[derive(Debug)]
struct Tee {
    log: Arc<dyn MarkSink>,
    driver: RedisState,
}

impl MarkSink for Tee {
    fn mark(&self, pool: &Arc<Pool>, mark: &KeyMark) {
        self.log.mark(pool, mark);
        self.driver.mark(pool, mark);
    }
}

/// An operator's enable or disable: made as a mark, applied here, shared with every replica.
pub(crate) fn operator(
    backend: Option<&Backend>,
    pool: &Pool,
    id: KeyId,
    enable: bool,
    now: Instant,
) -> Transition {
    let mark = if enable {
        pool.enable_mark(id)
    } else {
        pool.mark_for(
            id,
            Change::Disable {
                reason: DisableReason::Operator,
            },
        )
    };
    let transition = pool.apply(&mark, now, SystemTime::now());
    if let Some(b) = backend {
        b.driver.publish(&mark);
    }
    transition
}

/// Whether the gateway is ready (the shared state has been read once; always without a
/// backend), and the backend's health as JSON for `/healthz`, which anyone may read: no URL
/// (`null` without a backend).
pub(crate) fn health(backend: Option<&Backend>) -> (bool, serde_json::Value) {
    let Some(b) = backend else {
        return (true, serde_json::Value::Null);
    };
    let h = b.driver.health();
    let json = serde_json::json!({"backend": "redis", "up": h.up, "ready": h.ready});
    (h.ready, json)
}

/// The backend's whole health for the admin view (`null` without a backend).
pub(crate) fn admin_view(backend: Option<&Backend>) -> serde_json::Value {
    backend.map_or(serde_json::Value::Null, |b| {
        health_json(&b.driver, &b.driver.health())
    })
}

fn health_json(driver: &RedisState, h: &Health) -> serde_json::Value {
    let age = h.last_sync.map(|t| {
        SystemTime::now()
            .duration_since(t)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    });
    serde_json::json!({
        "backend": "redis",
        "url": driver.config().url(),
        "namespace": driver.config().namespace(),
        "up": h.up,
        "ready": h.ready,
        "last_sync_seconds_ago": age,
        "last_propagation_ms": h.last_lag.map(|d| d.as_secs_f64() * 1000.0),
        "written": h.written,
        "applied": h.applied,
        "ignored": h.ignored,
    })
}

/// Sets the backend gauges before `/metrics` renders.
pub(crate) fn refresh_metrics(backend: Option<&Backend>) {
    if let Some(b) = backend {
        let h = b.driver.health();
        b.metrics.up.set(i64::from(h.up));
        if let Some(t) = h.last_sync {
            let age = SystemTime::now().duration_since(t).unwrap_or(Duration::ZERO);
            b.metrics.last_sync_age.set(age.as_secs_f64());
        }
    }
}

/// Logs and counts marks that arrive from other replicas, like the calls' own.
#[derive(Debug)]
struct RemoteLog {
    pool: String,
    metrics: Arc<Metrics>,
    state: StateMetrics,
    probes: Arc<Probes>,
}

impl Events for RemoteLog {
    fn remote_mark(&self, pool: &Arc<Pool>, key: KeyId, mark: &Mark, transition: Transition) {
        let label = pool.label(key);
        let reason = match mark.change {
            Change::CoolUntil { reason, .. } => reason.as_str().to_owned(),
            Change::Disable { reason } => reason.as_str().to_owned(),
            Change::Enable => "enabled".to_owned(),
        };
        self.metrics.transition(&self.pool, label, &reason);
        tracing::warn!(
            target: "keypool::key", pool = %self.pool, key = %label, reason = %reason, transition = ?transition,
            source = "shared", generation = mark.generation, "key state changed"
        );
        // Disabled here: schedule its probe; enabled: forget it.
        self.probes.wake();
    }

    fn propagation(&self, lag: Duration) {
        self.state.propagation.observe(lag.as_secs_f64());
    }
}
