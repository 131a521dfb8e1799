//! # keypool-redis
//!
//! Shares a keypool [`Pool`]'s key state — cooldowns, disabled keys, operator enables — with
//! every other process that uses the same Redis (or Valkey) and namespace (SPEC §10). A driver
//! like the runtime adapters: the core knows nothing of Redis; this crate forwards the marks a
//! pool makes and applies the marks other processes made.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use keypool_core::{Order, Pool, call::CallConfig};
//! use keypool_redis::{RedisState, StateConfig};
//!
//! let pool = Arc::new(Pool::new(["sk-ant-...1", "sk-ant-...2"], Order::default(), std::time::Instant::now())?);
//! let state = RedisState::start(StateConfig::new("redis://127.0.0.1:6379", "keypool")?, pool.clone(), None)?;
//! // Every mark the client's calls make goes to Redis, in the background.
//! let client = keypool_tokio::Client::builder()
//!     .config(CallConfig::default().with_mark_sink(Arc::new(state.clone())))
//!     .build_with_pool(pool)?;
//! state.ready().await; // optional: the shared state has been read once
//! # Ok(()) }
//! ```
//!
//! ## How it works
//!
//! - **Store.** One hash per namespace, `{ns}:keys`, field = the key's fingerprint, value = its
//!   `(generation, state)` (see [`value`]). Every write goes through one single-key script
//!   ([`value::MERGE_SCRIPT`], `EVALSHA`) that keeps the maximum and, only when the new value
//!   wins, stores it and publishes it on `{ns}:marks`. No read-modify-write from the client, so
//!   concurrent writers cannot lose a mark or shorten a deadline.
//! - **The request path never waits on Redis.** [`MarkSink::mark`] (and [`RedisState::publish`])
//!   put the mark in a queue that keeps one entry per fingerprint (the maximum), and return. A
//!   background task writes the queue out, pipelined.
//! - **Receiving.** The task subscribes to `{ns}:marks` and applies every value it did not
//!   already have through [`Pool::apply`] (a stored "available at generation g" is an enable at
//!   g); as a backstop it reads the whole hash every [`StateConfig::full_read_every`] (1 s).
//!   Deadlines are absolute Unix milliseconds, so replicas agree up to their clock skew.
//! - **Start.** A new connection first subscribes, then writes the local state (whatever this
//!   process learnt meanwhile: a max-merge, so this never lowers anything), then reads the whole
//!   hash. [`Health::ready`] turns true after the first such read.
//! - **Degraded mode.** Any failure or timeout ([`StateConfig::timeout`]) ends the connection:
//!   one warning, [`Health::up`] false, reconnect with backoff; the pool keeps serving from local
//!   state. On return the local state is written again (including every mark made meanwhile)
//!   and the hash re-read. Values that are not keypool's are ignored with a rate-limited warning.
//!
//! - **Leases.** [`RedisState::probe_lease`] takes `{ns}:probe:{fingerprint}` for one replica
//!   (`SET … NX PX`), so that a disabled key is probed by one replica at a time (SPEC §11.5).
//!
//! Nothing secret is stored or published: fingerprints, deadlines, reasons and generations only
//! (and a lease's holder, a random replica id).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keypool_core::call::{KeyMark, MarkSink};
use keypool_core::{KeyId, KeyState, Mark, Pool, Transition};
use tokio::sync::{Notify, watch};

mod driver;
mod lease;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
pub mod value;

pub use lease::{LEASE_SCRIPT, Lease};
use value::{Field, Stored, StoredState};

/// Why a state backend cannot be set up. Messages never contain the URL's password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL is not a `redis://` or `rediss://` URL redis-rs accepts.
    #[error("invalid state URL {url}: {why} (use redis://HOST:PORT[/DB] or rediss://...)")]
    Url {
        /// The URL with its credentials masked.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The namespace is empty, too long or has characters other than letters, digits, `.`,
    /// `_`, `-` and `:`.
    #[error("invalid state namespace {0:?}: use 1-64 ASCII letters, digits, '.', '_', '-' or ':'")]
    Namespace(String),
    /// [`RedisState::start`] was called outside a tokio runtime.
    #[error("the Redis state driver needs a tokio runtime: start it from inside one")]
    NoRuntime,
    /// The backend did not answer a request made outside the driver (a lease).
    #[error("the state backend did not answer: {0}")]
    Unavailable(String),
}

/// Where and how to share state.
#[derive(Clone)]
pub struct StateConfig {
    client: redis::Client,
    shown: String,
    namespace: String,
    /// Longest wait for any one Redis operation (connect, write, read) before the backend
    /// counts as down. Default 1 s.
    pub timeout: Duration,
    /// Period of the backstop full read. Default 1 s.
    pub full_read_every: Duration,
    /// First reconnect delay (doubles up to `max_backoff`). Default 50 ms.
    pub min_backoff: Duration,
    /// Longest reconnect delay. Default 2 s.
    pub max_backoff: Duration,
    /// Shifts the wall clock this driver uses by this many milliseconds: a skewed replica, for
    /// tests of clock skew. 0 (the default) everywhere else.
    #[doc(hidden)]
    pub clock_offset_ms: i64,
}

impl std::fmt::Debug for StateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateConfig")
            .field("url", &self.shown)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// The URL with its credentials (everything between `://` and the last `@`) masked: a password
/// may hold `/` or `@` when the user did not percent-encode it, so no finer split is trusted.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

impl StateConfig {
    /// A configuration for `url` (`redis://[:PASSWORD@]HOST:PORT[/DB]`, `rediss://` for TLS)
    /// and `namespace` (every Redis name this driver uses starts with `{namespace}:`).
    pub fn new(url: &str, namespace: &str) -> Result<Self, Error> {
        let shown = redact(url);
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(Error::Url {
                url: shown,
                why: "the scheme must be redis:// or rediss://".into(),
            });
        }
        let ns_ok = (1..=64).contains(&namespace.len())
            && namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
        if !ns_ok {
            return Err(Error::Namespace(namespace.chars().take(80).collect()));
        }
        if url.starts_with("rediss://") {
            // redis-rs builds its TLS config with the process default provider; the workspace
            // compiles rustls with ring only. Already installed (by us or the embedder) is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(url).map_err(|e| Error::Url {
            url: shown.clone(),
            // redis-rs's parse errors describe the problem, not the URL.
            why: e.to_string(),
        })?;
        Ok(Self {
            client,
            shown,
            namespace: namespace.to_owned(),
            timeout: Duration::from_secs(1),
            full_read_every: Duration::from_secs(1),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            clock_offset_ms: 0,
        })
    }

    /// The URL, password masked.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The hash that holds every key's state: `{namespace}:keys`.
    pub fn hash_key(&self) -> String {
        format!("{}:keys", self.namespace)
    }

    /// The channel new values are published on: `{namespace}:marks`.
    pub fn channel(&self) -> String {
        format!("{}:marks", self.namespace)
    }
}

/// Told about what the driver does, for logs and metrics. Every method has a no-op default.
pub trait Events: Send + Sync + std::fmt::Debug {
    /// A value from another process changed `key`'s local state (`transition` is never
    /// `Unchanged`).
    fn remote_mark(&self, pool: &Arc<Pool>, key: KeyId, mark: &Mark, transition: Transition) {
        let _ = (pool, key, mark, transition);
    }
    /// A published value arrived `lag` after it was queued by its publisher (on the
    /// publisher's clock: includes the skew between the two clocks).
    fn propagation(&self, lag: Duration) {
        let _ = lag;
    }
}

/// The backend's health, for `/healthz`, metrics and admin views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// The backend answers: the last operation succeeded.
    pub up: bool,
    /// The whole shared state has been read at least once.
    pub ready: bool,
    /// The last successful full read.
    pub last_sync: Option<SystemTime>,
    /// Lag of the latest value received (see [`Events::propagation`]).
    pub last_lag: Option<Duration>,
    /// Values written that won the merge.
    pub written: u64,
    /// Values received that changed local state.
    pub applied: u64,
    /// Foreign or malformed values ignored.
    pub ignored: u64,
}

/// One pending write: the largest value queued for a fingerprint, and when the oldest of the
/// marks it stands for was queued (Unix µs on the driver's clock).
#[derive(Debug, Clone, Copy)]
struct Pending {
    value: Stored,
    since_us: u64,
}

/// Writes waiting for the background task: one entry per fingerprint.
#[derive(Debug, Default)]
struct Queue {
    pending: HashMap<Field, Pending>,
    /// A mark was refused because the queue was full: write the whole local state next time.
    overflowed: bool,
}

/// How many distinct fingerprints may wait. A pool has far fewer keys; past this, marks are
/// not queued one by one but the whole local state is written at the next chance.
const QUEUE_CAPACITY: usize = 4096;

impl Queue {
    fn push(&mut self, key: Field, value: Stored, since_us: u64) {
        if let Some(p) = self.pending.get_mut(&key) {
            p.value = p.value.merge(value);
            p.since_us = p.since_us.min(since_us);
        } else if self.pending.len() < QUEUE_CAPACITY {
            self.pending.insert(key, Pending { value, since_us });
        } else {
            self.overflowed = true;
        }
    }
}

struct Inner {
    config: StateConfig,
    hash_key: String,
    channel: String,
    pool: Arc<Pool>,
    events: Option<Arc<dyn Events>>,
    queue: Mutex<Queue>,
    wake: Notify,
    up: AtomicBool,
    ready: watch::Sender<bool>,
    /// Unix ms of the last full read; 0 = none yet.
    last_sync_ms: AtomicU64,
    /// µs; `u64::MAX` = none yet.
    last_lag_us: AtomicU64,
    written: AtomicU64,
    applied: AtomicU64,
    ignored: AtomicU64,
    /// The last value seen in Redis (read, received or written) per fingerprint: values equal
    /// to it are not applied again.
    seen: Mutex<Seen>,
    /// This process's id, the holder named by its leases.
    replica: String,
    /// The connection leases use, once made.
    lease_conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl Inner {
    /// The driver's wall clock (shifted in clock-skew tests).
    fn wall(&self) -> SystemTime {
        value::shift_time(SystemTime::now(), self.config.clock_offset_ms)
    }

    fn wall_us(&self) -> u64 {
        self.wall()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    fn enqueue(&self, mark: &Mark) {
        let value = Stored::from_mark(mark, self.config.clock_offset_ms);
        let since = self.wall_us();
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Field::of(mark), value, since);
        self.wake.notify_one();
    }

    /// The local state of every key, as stored values (what a reconnect writes). Deadlines
    /// round down here: a value read from Redis and applied converts back to exactly itself or
    /// one millisecond less, which the merge then leaves alone instead of re-publishing.
    fn local_state(&self) -> Vec<(Field, Stored)> {
        let pool = self.pool.live();
        let now = Instant::now();
        let wall_ms = self
            .wall()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let to_ms = |until: Instant| {
            wall_ms
                .saturating_add(
                    u64::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX),
                )
                .min(value::MAX_NUMBER)
        };
        let families: Vec<(Field, Stored)> = pool
            .ids()
            .flat_map(|id| {
                let generation = pool.generation(id).min(value::MAX_NUMBER);
                let key = pool.fingerprint(id);
                pool.family_cooldowns(id, now)
                    .into_iter()
                    .map(move |(family, until, reason)| {
                        let stored = Stored {
                            generation,
                            state: StoredState::Cooling {
                                until_ms: to_ms(until),
                                reason,
                            },
                        };
                        (
                            Field {
                                key,
                                family: Some(family),
                            },
                            stored,
                        )
                    })
            })
            .collect();
        pool.snapshot(now)
            .into_iter()
            .map(|k| {
                let state = match k.state {
                    KeyState::Available => StoredState::Available,
                    KeyState::Cooling { until, reason } => StoredState::Cooling {
                        until_ms: wall_ms
                            .saturating_add(
                                u64::try_from(until.saturating_duration_since(now).as_millis())
                                    .unwrap_or(u64::MAX),
                            )
                            .min(value::MAX_NUMBER),
                        reason,
                    },
                    KeyState::Disabled { reason } => StoredState::Disabled { reason },
                };
                let stored = Stored {
                    generation: k.generation.min(value::MAX_NUMBER),
                    state,
                };
                (Field::key(k.fingerprint), stored)
            })
            .chain(families)
            .collect()
    }

    /// Applies a value read or received for `key`, unless it is the one last seen.
    fn receive(&self, key: Field, value: Stored) {
        let pool = self.pool.live();
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            // A reload replaced the pool: its added keys (and re-added ones) have not seen
            // anything yet, so everything is applied once more.
            let live = Arc::as_ptr(&pool) as usize;
            if seen.pool != live {
                seen.pool = live;
                seen.values.clear();
            }
            if seen.values.get(&key) == Some(&value) {
                return;
            }
            seen.values.insert(key, value);
        }
        let Some(id) = pool.find_fingerprint(key.key) else {
            return; // another pool's key (or one this process does not have)
        };
        let mark = value.to_mark(key);
        let transition = pool.apply(&mark, Instant::now(), self.wall());
        if transition != Transition::Unchanged {
            self.applied.fetch_add(1, Ordering::Relaxed);
            if let Some(events) = &self.events {
                events.remote_mark(&pool, id, &mark, transition);
            }
        }
    }
}

/// The values last seen per fingerprint, valid for one pool of the reload chain.
#[derive(Debug, Default)]
struct Seen {
    /// The address of the pool they were applied to.
    pool: usize,
    values: HashMap<Field, Stored>,
}

/// A handle on a running state driver: cheap to clone; the driver stops when the last handle
/// is dropped. It is also the [`MarkSink`] to put in the client's `CallConfig`.
#[derive(Clone)]
pub struct RedisState {
    inner: Arc<Inner>,
    _task: Arc<driver::TaskGuard>,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("config", &self.inner.config)
            .field("health", &self.health())
            .finish()
    }
}

impl RedisState {
    /// Starts the driver for `pool` (and every pool that replaces it on a reload) in the
    /// current tokio runtime. Returns at once: the first connection and read happen in the
    /// background (see [`ready`](Self::ready)); until then the pool serves from local state.
    pub fn start(
        config: StateConfig,
        pool: Arc<Pool>,
        events: Option<Arc<dyn Events>>,
    ) -> Result<Self, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let inner = Arc::new(Inner {
            hash_key: config.hash_key(),
            channel: config.channel(),
            config,
            pool,
            events,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            up: AtomicBool::new(false),
            ready: watch::Sender::new(false),
            last_sync_ms: AtomicU64::new(0),
            last_lag_us: AtomicU64::new(u64::MAX),
            written: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            seen: Mutex::new(Seen::default()),
            replica: lease::new_replica_id(),
            lease_conn: Mutex::new(None),
        });
        let task = runtime.spawn(driver::run(inner.clone()));
        Ok(Self {
            inner,
            _task: Arc::new(driver::TaskGuard(task)),
        })
    }

    /// Queues `mark` (already applied to the local pool) for every other process. Never
    /// blocks; use it for marks made outside a call (operator enable/disable).
    pub fn publish(&self, mark: &Mark) {
        self.inner.enqueue(mark);
    }

    /// The backend's health now.
    pub fn health(&self) -> Health {
        let i = &self.inner;
        let sync = i.last_sync_ms.load(Ordering::Relaxed);
        let lag = i.last_lag_us.load(Ordering::Relaxed);
        Health {
            up: i.up.load(Ordering::Relaxed),
            ready: *i.ready.borrow(),
            last_sync: (sync > 0).then(|| UNIX_EPOCH + Duration::from_millis(sync)),
            last_lag: (lag != u64::MAX).then(|| Duration::from_micros(lag)),
            written: i.written.load(Ordering::Relaxed),
            applied: i.applied.load(Ordering::Relaxed),
            ignored: i.ignored.load(Ordering::Relaxed),
        }
    }

    /// Resolves once the shared state has been read (at once if it has).
    pub async fn ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        // Err only if the sender is gone, which `self` prevents.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// The configuration.
    pub fn config(&self) -> &StateConfig {
        &self.inner.config
    }
}

impl MarkSink for RedisState {
    fn mark(&self, _pool: &Arc<Pool>, mark: &KeyMark) {
        // A mark that changed nothing locally adds nothing: what it lost to is either shared
        // already or queued (and a reconnect writes the whole local state anyway).
        if mark.transition != Transition::Unchanged {
            self.inner.enqueue(&mark.mark);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(redact("redis://127.0.0.1:6379/2"), "redis://127.0.0.1:6379/2");
        assert_eq!(redact("redis://:s3cret@host:6379"), "redis://***@host:6379");
        assert_eq!(redact("rediss://user:pa/ss@w@host/0"), "rediss://***@host/0");
        assert_eq!(redact("host:6379"), "<not a URL>");
        let e = StateConfig::new("redis://:hunter2@host:notaport", "ns").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(StateConfig::new("redis://host", "bad ns").is_err());
        assert!(StateConfig::new("redis://host:1/3", "team-a:prod").is_ok());
    }
}
