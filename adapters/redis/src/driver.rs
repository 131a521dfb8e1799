//! The background task: connect, write the local state, read the shared state, then write
//! queued marks, apply published values and re-read every second, until something fails; then
//! back off and start over. Only this task ever waits on Redis.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

use crate::value::{Field, MERGE_SCRIPT, Stored};
use crate::{Inner, Pending};

/// Aborts the driver task when the last [`RedisState`](crate::RedisState) handle goes.
pub(crate) struct TaskGuard(pub(crate) JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a connection ended. Never holds the URL (redis-rs errors do not carry it).
#[derive(Debug)]
enum End {
    Redis(redis::RedisError),
    Timeout(&'static str),
    Closed,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Redis(e) => write!(f, "{e}"),
            Self::Timeout(what) => write!(f, "no answer to {what} in time"),
            Self::Closed => f.write_str("the subscription connection closed"),
        }
    }
}

impl From<redis::RedisError> for End {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

/// Rate limit of the warning about foreign values.
const IGNORED_WARNING_EVERY: Duration = Duration::from_secs(60);

pub(crate) async fn run(inner: Arc<Inner>) {
    let mut backoff = inner.config.min_backoff;
    // `None` until the first attempt ends: the first failure warns too.
    let mut was_up: Option<bool> = None;
    let mut warned_ignored: Option<Instant> = None;
    loop {
        let mut synced = false;
        let end = session(&inner, &mut synced, &mut was_up, &mut warned_ignored).await;
        inner.up.store(false, Ordering::Relaxed);
        if was_up != Some(false) {
            tracing::warn!(
                target: "keypool::state",
                backend = %inner.config.url(), error = %end,
                "state backend unreachable: serving from local state, marks are kept and shared when it returns"
            );
        } else {
            tracing::debug!(target: "keypool::state", error = %end, "state backend still unreachable");
        }
        was_up = Some(false);
        if synced {
            backoff = inner.config.min_backoff;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(inner.config.max_backoff);
    }
}

/// Runs `fut` with the configured timeout.
async fn within<T>(
    inner: &Inner,
    what: &'static str,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, End> {
    match tokio::time::timeout(inner.config.timeout, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(End::Timeout(what)),
    }
}

async fn session(
    inner: &Arc<Inner>,
    synced: &mut bool,
    was_up: &mut Option<bool>,
    warned_ignored: &mut Option<Instant>,
) -> End {
    let client = &inner.config.client;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(inner.config.timeout))
        .set_response_timeout(Some(inner.config.timeout));
    let mut conn = match within(
        inner,
        "connect",
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return e,
    };
    // Subscribe before reading, so that nothing published in between is missed.
    let mut pubsub = match within(inner, "connect", client.get_async_pubsub()).await {
        Ok(p) => p,
        Err(e) => return e,
    };
    if let Err(e) = within(inner, "SUBSCRIBE", pubsub.subscribe(&inner.channel)).await {
        return e;
    }
    let mut messages = pubsub.into_on_message();
    let sha: String = match within(
        inner,
        "SCRIPT LOAD",
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(MERGE_SCRIPT)
            .query_async(&mut conn),
    )
    .await
    {
        Ok(sha) => sha,
        Err(e) => return e,
    };
    // Whatever this process knows (marks made while the backend was away included) goes out
    // first: a max-merge, so it never lowers what others wrote. Then read everything.
    requeue_local_state(inner);
    if let Err(e) = flush(inner, &mut conn, &sha).await {
        return e;
    }
    let count = match full_read(inner, &mut conn, warned_ignored).await {
        Ok(n) => n,
        Err(e) => return e,
    };
    *synced = true;
    inner.up.store(true, Ordering::Relaxed);
    inner.ready.send_replace(true);
    match was_up {
        Some(false) => tracing::info!(
            target: "keypool::state", backend = %inner.config.url(), keys = count,
            "state backend reachable again: local marks written, shared state re-read"
        ),
        _ => tracing::info!(
            target: "keypool::state", backend = %inner.config.url(), namespace = %inner.config.namespace(), keys = count,
            "shared key state read"
        ),
    }
    *was_up = Some(true);

    let mut tick = tokio::time::interval(inner.config.full_read_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        tokio::select! {
            message = futures_next(&mut messages) => match message {
                Some(m) => on_message(inner, m.get_payload_bytes(), warned_ignored),
                None => return End::Closed,
            },
            () = inner.wake.notified() => {
                if let Err(e) = flush(inner, &mut conn, &sha).await {
                    return e;
                }
            }
            _ = tick.tick() => {
                if let Err(e) = full_read(inner, &mut conn, warned_ignored).await {
                    return e;
                }
            }
        }
    }
}

/// The next item of a stream (what `StreamExt::next` does).
async fn futures_next<S: futures_core::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *s).poll_next(cx)).await
}

fn lock_queue(inner: &Inner) -> std::sync::MutexGuard<'_, crate::Queue> {
    inner
        .queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Queues the whole local state (merged with what is already queued).
fn requeue_local_state(inner: &Inner) {
    let since = inner.wall_us();
    let local = inner.local_state();
    let mut queue = lock_queue(inner);
    queue.overflowed = false;
    for (key, value) in local {
        // A never-marked key adds nothing to the store.
        if value != Stored::FRESH {
            queue.push(key, value, since);
        }
    }
}

/// Writes every queued value through the merge script, in one pipeline. On failure the values
/// go back in the queue (the next connection writes the whole local state anyway).
async fn flush(inner: &Inner, conn: &mut MultiplexedConnection, sha: &str) -> Result<(), End> {
    let overflowed = std::mem::take(&mut lock_queue(inner).overflowed);
    if overflowed {
        requeue_local_state(inner);
    }
    let batch = std::mem::take(&mut lock_queue(inner).pending);
    if batch.is_empty() {
        return Ok(());
    }
    let batch: Vec<(Field, Pending)> = batch.into_iter().collect();
    let mut pipe = redis::pipe();
    for (key, p) in &batch {
        pipe.cmd("EVALSHA")
            .arg(sha)
            .arg(1)
            .arg(&inner.hash_key)
            .arg(key.to_string())
            .arg(p.value.encode())
            .arg(&inner.channel)
            .arg(p.since_us);
    }
    match within(inner, "EVALSHA", pipe.query_async::<Vec<i64>>(conn)).await {
        Ok(results) => {
            let mut seen = inner
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ((key, p), result) in batch.iter().zip(results) {
                if result != 0 {
                    inner.written.fetch_add(1, Ordering::Relaxed);
                    // Our own value comes back on the channel: nothing to apply then.
                    seen.values.insert(*key, p.value);
                }
            }
            Ok(())
        }
        Err(e) => {
            let mut queue = lock_queue(inner);
            for (key, p) in batch {
                queue.push(key, p.value, p.since_us);
            }
            Err(e)
        }
    }
}

/// Reads the whole hash and applies what is new; queues the local state of keys the store has
/// lost (a flushed or replaced Redis that kept the connection). Returns how many fields it read.
async fn full_read(
    inner: &Inner,
    conn: &mut MultiplexedConnection,
    warned_ignored: &mut Option<Instant>,
) -> Result<usize, End> {
    let all: HashMap<Vec<u8>, Vec<u8>> = within(
        inner,
        "HGETALL",
        redis::cmd("HGETALL").arg(&inner.hash_key).query_async(conn),
    )
    .await?;
    let mut ignored = 0u64;
    let mut present = Vec::with_capacity(all.len());
    for (field, value) in &all {
        match parse_entry(field, value) {
            Some((key, stored)) => {
                present.push(key);
                inner.receive(key, stored);
            }
            None => ignored += 1,
        }
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    inner.last_sync_ms.store(now_ms.max(1), Ordering::Relaxed);
    if ignored > 0 {
        note_ignored(inner, ignored, warned_ignored);
    }
    let lost: Vec<(Field, Stored)> = inner
        .local_state()
        .into_iter()
        .filter(|(key, value)| *value != Stored::FRESH && !present.contains(key))
        .collect();
    if !lost.is_empty() {
        let since = inner.wall_us();
        let mut queue = lock_queue(inner);
        for (key, value) in lost {
            queue.push(key, value, since);
        }
        drop(queue);
        inner.wake.notify_one();
    }
    Ok(all.len())
}

fn parse_entry(field: &[u8], value: &[u8]) -> Option<(Field, Stored)> {
    let field = std::str::from_utf8(field).ok()?;
    // Only the canonical (lowercase) spelling is ours.
    if field.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let key: Field = field.parse().ok()?;
    let value = Stored::decode(std::str::from_utf8(value).ok()?)?;
    Some((key, value))
}

/// A published `"{fingerprint} {value} {stamp_us}"`.
fn on_message(inner: &Inner, payload: &[u8], warned_ignored: &mut Option<Instant>) {
    let parsed = std::str::from_utf8(payload).ok().and_then(|text| {
        let mut parts = text.split(' ');
        let (field, value, stamp) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (key, stored) = parse_entry(field.as_bytes(), value.as_bytes())?;
        Some((key, stored, stamp.parse::<u64>().ok()?))
    });
    let Some((key, stored, stamp_us)) = parsed else {
        note_ignored(inner, 1, warned_ignored);
        return;
    };
    let lag = Duration::from_micros(inner.wall_us().saturating_sub(stamp_us));
    inner.last_lag_us.store(
        u64::try_from(lag.as_micros()).unwrap_or(u64::MAX - 1),
        Ordering::Relaxed,
    );
    if let Some(events) = &inner.events {
        events.propagation(lag);
    }
    inner.receive(key, stored);
}

/// Counts foreign values; warns at most once a minute (never with the value: it is not ours
/// and could be anything).
fn note_ignored(inner: &Inner, n: u64, warned: &mut Option<Instant>) {
    let total = inner.ignored.fetch_add(n, Ordering::Relaxed) + n;
    if warned.is_none_or(|at| at.elapsed() >= IGNORED_WARNING_EVERY) {
        *warned = Some(Instant::now());
        tracing::warn!(
            target: "keypool::state",
            namespace = %inner.config.namespace(), ignored_total = total,
            "ignored values under the state namespace that are not keypool's (not a fingerprint, or not a v1 value); they are left as they are"
        );
    }
}
