//! Probes of disabled keys (SPEC §11.5), as a state machine: which key to probe when, what to
//! send, and what an answer means. The driver (the gateway) sends the probe, reads the clock, and
//! hands the answer back.
//!
//! A key disabled by the upstream (401, 403, billing) is probed after `first_delay` (default
//! 10 min), then after twice as long each time a probe fails, up to `max_delay` (default 24 h). A
//! probe is one request that spends no tokens ([`Provider::probe_path`](crate::profile::Provider::probe_path),
//! `GET /v1/models?limit=1`) sent with the key; a 2xx enables the key through an ordinary enable
//! [`Mark`], which a state backend shares like any other. Keys an operator disabled are never
//! probed: the operator decides when they come back.
//!
//! ```
//! use std::time::{Duration, Instant, SystemTime};
//! use http::StatusCode;
//! use keypool_core::probe::{ProbeConfig, Prober, ProbeResult};
//! use keypool_core::{DisableReason, Order, Pool, Profile};
//!
//! let clock = Instant::now; // the driver's clock; the core never reads one
//! let t0 = clock();
//! let pool = Pool::new(["sk-ant-api03-first-key-000000000000"], Order::default(), t0)?;
//! let id = pool.key_at(0).unwrap();
//! let _ = pool.disable(id, DisableReason::Unauthorized);
//! let mut prober = Prober::new(ProbeConfig::default());
//! prober.handle_pool(&pool, t0);
//! assert!(prober.poll_probe(&pool, &Profile::anthropic(), t0).is_none()); // not yet
//! let later = prober.poll_timeout().unwrap();
//! assert_eq!(later, t0 + Duration::from_secs(600));
//! let probe = prober.poll_probe(&pool, &Profile::anthropic(), later).unwrap();
//! // ... the driver sends `probe.attempt` upstream; the key works again ...
//! let result = prober.handle_result(&pool, &probe, Some(StatusCode::OK), later, SystemTime::UNIX_EPOCH);
//! assert!(matches!(result, ProbeResult::Enabled { .. }));
//! assert!(pool.state(id, later).is_available());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};

use crate::call::Attempt;
use crate::mark::{Fingerprint, Mark};
use crate::pool::{DisableReason, KeyId, KeyState, Pool, Transition};
use crate::profile::Profile;

/// When probes happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Delay before the first probe of a newly disabled key; zero turns probes off.
    pub first_delay: Duration,
    /// The longest delay between two probes of a key (the doubling stops there).
    pub max_delay: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_secs(600),
            max_delay: Duration::from_secs(24 * 3600),
        }
    }
}

/// One probe to send.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The key probed.
    pub key: KeyId,
    /// Its fingerprint (for a cross-replica lease).
    pub fingerprint: Fingerprint,
    /// The key's generation when the probe was made: an operator action in between makes the
    /// answer stale.
    pub generation: u64,
    /// What to send (with the key already in its headers).
    pub attempt: Attempt,
}

/// What a probe's answer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum ProbeResult {
    /// The key answered 2xx and is enabled again; publish `mark`.
    Enabled {
        /// The enable mark, already applied.
        mark: Mark,
        /// What it did to the key.
        transition: Transition,
    },
    /// The key still fails; the next probe is at `next`.
    Failed {
        /// When the key is probed again.
        next: Instant,
    },
    /// The key changed meanwhile (an operator acted, a mark arrived): nothing done.
    Stale,
}

#[derive(Debug, Clone, Copy)]
struct Schedule {
    next: Instant,
    delay: Duration,
    in_flight: bool,
}

/// The probe schedule of one pool. See the [module docs](self).
#[derive(Debug, Default)]
pub struct Prober {
    config: ProbeConfig,
    keys: HashMap<Fingerprint, Schedule>,
}

/// Whether a key in this state is one the upstream rejected (so a probe may bring it back).
fn probe_worthy(state: KeyState) -> bool {
    matches!(
        state,
        KeyState::Disabled {
            reason: DisableReason::Unauthorized | DisableReason::Forbidden | DisableReason::Billing
        }
    )
}

impl Prober {
    /// A prober with this schedule.
    pub fn new(config: ProbeConfig) -> Self {
        Self {
            config,
            keys: HashMap::new(),
        }
    }

    /// Whether probes are on.
    pub fn is_enabled(&self) -> bool {
        !self.config.first_delay.is_zero()
    }

    /// Looks at the pool: schedules keys the upstream disabled since the last look, forgets keys
    /// that are no longer disabled (enabled, or gone in a reload). Call it after every mark, or
    /// on a timer.
    pub fn handle_pool(&mut self, pool: &Pool, now: Instant) {
        if !self.is_enabled() {
            self.keys.clear();
            return;
        }
        let mut seen = Vec::new();
        for id in pool.ids() {
            if probe_worthy(pool.state(id, now)) {
                let fp = pool.fingerprint(id);
                seen.push(fp);
                self.keys.entry(fp).or_insert_with(|| Schedule {
                    next: now.checked_add(self.config.first_delay).unwrap_or(now),
                    delay: self.config.first_delay,
                    in_flight: false,
                });
            }
        }
        self.keys.retain(|fp, _| seen.contains(fp));
    }

    /// When the next probe is due (`None`: nothing to probe).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.keys.values().filter(|s| !s.in_flight).map(|s| s.next).min()
    }

    /// The next probe due at `now`, if any; it stays in flight until
    /// [`handle_result`](Self::handle_result).
    pub fn poll_probe(&mut self, pool: &Pool, profile: &Profile, now: Instant) -> Option<Probe> {
        let (fp, schedule) = self
            .keys
            .iter_mut()
            .filter(|(_, s)| !s.in_flight && s.next <= now)
            .min_by_key(|(_, s)| s.next)?;
        let key = pool.find_fingerprint(*fp)?;
        schedule.in_flight = true;
        let mut headers = HeaderMap::new();
        profile.request_headers(&mut headers);
        profile.insert_key(&mut headers, pool.secret(key));
        Some(Probe {
            key,
            fingerprint: *fp,
            generation: pool.generation(key),
            attempt: Attempt {
                number: 1,
                key: Some(key),
                method: Method::GET,
                path_and_query: PathAndQuery::from_static(profile.probe_path()),
                headers,
                body: Bytes::new(),
            },
        })
    }

    /// The answer of a probe: its status, or `None` when it could not be sent or got no answer.
    /// `now` and `wall` are the driver's two clocks.
    pub fn handle_result(
        &mut self,
        pool: &Pool,
        probe: &Probe,
        status: Option<StatusCode>,
        now: Instant,
        wall: SystemTime,
    ) -> ProbeResult {
        let Some(schedule) = self.keys.get_mut(&probe.fingerprint) else {
            return ProbeResult::Stale;
        };
        schedule.in_flight = false;
        let still = pool
            .find_fingerprint(probe.fingerprint)
            .filter(|&id| pool.generation(id) == probe.generation && probe_worthy(pool.state(id, now)));
        let Some(id) = still else {
            self.keys.remove(&probe.fingerprint);
            return ProbeResult::Stale;
        };
        if status.is_some_and(|s| s.is_success()) {
            self.keys.remove(&probe.fingerprint);
            let mark = pool.enable_mark(id);
            let transition = pool.apply(&mark, now, wall);
            return ProbeResult::Enabled { mark, transition };
        }
        schedule.delay = schedule.delay.saturating_mul(2).min(self.config.max_delay);
        schedule.next = now.checked_add(schedule.delay).unwrap_or(now);
        ProbeResult::Failed { next: schedule.next }
    }

    /// Puts a probe back without an answer (e.g. another replica holds the lease): it is due
    /// again after `after`.
    pub fn handle_deferred(&mut self, probe: &Probe, now: Instant, after: Duration) {
        if let Some(s) = self.keys.get_mut(&probe.fingerprint) {
            s.in_flight = false;
            s.next = now.checked_add(after).unwrap_or(now);
        }
    }

    /// The next probe time of `id`, if it is scheduled (for status pages).
    pub fn next_probe(&self, pool: &Pool, id: KeyId) -> Option<Instant> {
        self.keys.get(&pool.fingerprint(id)).map(|s| s.next)
    }
}
