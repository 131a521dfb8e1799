//! Leases in the shared store: at most one replica at a time does something for a key. The
//! gateway takes one before it probes a disabled key (SPEC §11.5: at most one probe per key in
//! flight across replicas): `SET {ns}:probe:{fingerprint} <replica-id> NX PX <ms>`.
//!
//! A lease is only ever taken by a background task, never on the request path. It holds the
//! replica's id (random, made at start) and the key's fingerprint: nothing secret.

use std::hash::{BuildHasher, Hasher};
use std::sync::PoisonError;
use std::time::Duration;

use keypool_core::Fingerprint;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use crate::{Error, RedisState};

/// Takes the lease `KEYS[1]` for the holder `ARGV[1]` for `ARGV[2]` ms: `SET … NX PX`, or, when
/// the holder already has it, a renewal. Returns 0 when `ARGV[1]` holds the lease now, else how
/// many milliseconds the other holder keeps it (at least 1). One key, so one atomic step.
pub const LEASE_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 0
end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then
  return 1
end
return left
";

/// What asking for a lease gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// This replica holds the lease (newly taken, or renewed) for the time asked.
    Acquired,
    /// Another replica holds it for this much longer.
    Held {
        /// Time left on the other replica's lease.
        remaining: Duration,
    },
}

/// A random id for this process (hex), which a lease names as its holder.
pub(crate) fn new_replica_id() -> String {
    // `RandomState` is seeded from the operating system's randomness; two of them (and the
    // process id and start time) make an id that no other replica shares.
    let a = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{a:016x}{:016x}", h.finish())
}

impl RedisState {
    /// This replica's id, as leases name it.
    pub fn replica_id(&self) -> &str {
        &self.inner.replica
    }

    /// The Redis name of the probe lease of `key`: `{namespace}:probe:{fingerprint}`.
    pub fn probe_lease_key(&self, key: Fingerprint) -> String {
        format!("{}:probe:{key}", self.inner.config.namespace())
    }

    /// Takes (or renews) the probe lease of `key` for `ttl`: `Acquired` when this replica may
    /// probe the key, `Held` with the time left when another replica does. Waits at most the
    /// configured [`timeout`](crate::StateConfig::timeout); `Err` when the backend did not
    /// answer (the caller decides: a gateway probes anyway, as it would without a backend).
    pub async fn probe_lease(&self, key: Fingerprint, ttl: Duration) -> Result<Lease, Error> {
        let name = self.probe_lease_key(key);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let timeout = self.inner.config.timeout;
        let attempt = async {
            let mut conn = self.lease_connection().await?;
            let left: i64 = redis::Script::new(LEASE_SCRIPT)
                .key(&name)
                .arg(&self.inner.replica)
                .arg(ttl_ms)
                .invoke_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(left)
        };
        let left = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(left)) => left,
            Ok(Err(e)) => {
                self.forget_lease_connection();
                return Err(Error::Unavailable(e.to_string()));
            }
            Err(_) => {
                self.forget_lease_connection();
                return Err(Error::Unavailable("no answer to the lease in time".into()));
            }
        };
        Ok(match u64::try_from(left) {
            Ok(0) => Lease::Acquired,
            Ok(ms) => Lease::Held {
                remaining: Duration::from_millis(ms),
            },
            // The script never returns less than 0; read it as a lease about to end.
            Err(_) => Lease::Held {
                remaining: Duration::from_millis(1),
            },
        })
    }

    /// The connection leases use (its own, made on first use: leases are rare, and the
    /// driver's connection belongs to its task).
    async fn lease_connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let cached = self
            .inner
            .lease_conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(conn) = cached {
            return Ok(conn);
        }
        let timeout = self.inner.config.timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let conn = self
            .inner
            .config
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self
            .inner
            .lease_conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    fn forget_lease_connection(&self) {
        *self
            .inner
            .lease_conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}
