//! The driver against a real `redis-server` (started by each test on a free loopback port, and
//! failing — not skipping — when it cannot be): several drivers, each with its own pool, stand
//! for several replicas. Every wait is for a condition, with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use keypool_core::{Change, CoolReason, DisableReason, KeyId, KeyState, Mark, Order, Pool, Transition};
use keypool_redis::testing::RedisServer;
use keypool_redis::value::{Stored, StoredState};
use keypool_redis::{Events, RedisState, StateConfig};

const WAIT: Duration = Duration::from_secs(10);

fn keys() -> Vec<String> {
    (0..3)
        .map(|i| format!("sk-ant-api03-driver{i}-{}", "Zr8Xc1Vb5Nm".repeat(4)))
        .collect()
}

fn pool(order: &[usize]) -> Arc<Pool> {
    let keys = keys();
    Arc::new(
        Pool::new(
            order.iter().map(|&i| keys[i].clone()),
            Order::default(),
            Instant::now(),
        )
        .unwrap(),
    )
}

fn config(redis: &RedisServer) -> StateConfig {
    let mut c = StateConfig::new(&redis.url(), "t").unwrap();
    c.timeout = Duration::from_millis(300);
    c.max_backoff = Duration::from_millis(200);
    c
}

/// Counts marks received from other replicas.
#[derive(Debug, Default)]
struct Count(AtomicUsize);

impl Events for Count {
    fn remote_mark(&self, _: &Arc<Pool>, _: KeyId, _: &Mark, t: Transition) {
        assert_ne!(t, Transition::Unchanged);
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn start(redis: &RedisServer, pool: &Arc<Pool>) -> RedisState {
    RedisState::start(config(redis), pool.clone(), None).unwrap()
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn ready(state: &RedisState) {
    tokio::time::timeout(WAIT, state.ready())
        .await
        .expect("the driver never read the shared state");
}

fn key_of(pool: &Pool, secret_index: usize) -> KeyId {
    let secret = keys()[secret_index].clone();
    pool.ids().find(|&id| pool.secret(id).expose() == secret).unwrap()
}

/// Marks a key on `pool` as a call would (applied locally, then handed to the driver).
fn mark(pool: &Arc<Pool>, state: &RedisState, id: KeyId, change: Change) -> Mark {
    let mark = pool.mark_for(id, change);
    let t = pool.apply(&mark, Instant::now(), SystemTime::now());
    assert_ne!(t, Transition::Unchanged);
    state.publish(&mark);
    mark
}

fn hget(redis: &RedisServer, pool: &Pool, id: KeyId) -> Option<String> {
    let mut c = redis.connection();
    redis::cmd("HGET")
        .arg("t:keys")
        .arg(pool.fingerprint(id).to_string())
        .query(&mut c)
        .unwrap()
}

/// Replicas with the key list in different orders share marks by fingerprint; a disable and
/// an operator enable reach the other replica; the stored value names no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_propagate_between_replicas_by_fingerprint() {
    let redis = RedisServer::start();
    let (pa, pb) = (pool(&[0, 1, 2]), pool(&[2, 0, 1]));
    let count = Arc::new(Count::default());
    let a = start(&redis, &pa);
    let b = RedisState::start(config(&redis), pb.clone(), Some(count.clone())).unwrap();
    ready(&a).await;
    ready(&b).await;
    assert!(a.health().up && b.health().up);

    let (ka, kb) = (key_of(&pa, 1), key_of(&pb, 1));
    assert_ne!(ka.index(), kb.index(), "the orders differ");
    let until =
        keypool_core::WallTime::from_system(SystemTime::now()).saturating_add(Duration::from_secs(30));
    mark(
        &pa,
        &a,
        ka,
        Change::CoolUntil {
            until,
            reason: CoolReason::RateLimited,
        },
    );
    eventually("B sees the cooldown", || {
        pb.state(kb, Instant::now()).is_cooling()
    })
    .await;
    let KeyState::Cooling { until: ub, .. } = pb.state(kb, Instant::now()) else {
        unreachable!()
    };
    let left = ub.saturating_duration_since(Instant::now());
    assert!(
        left > Duration::from_secs(29) && left <= Duration::from_secs(30),
        "{left:?}"
    );
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    let stored = hget(&redis, &pa, ka).unwrap();
    assert!(
        stored.starts_with("v1:0:cooling:") && stored.ends_with(":rate_limited"),
        "{stored}"
    );

    mark(
        &pb,
        &b,
        key_of(&pb, 2),
        Change::Disable {
            reason: DisableReason::Unauthorized,
        },
    );
    eventually("A sees the disable", || {
        pa.state(key_of(&pa, 2), Instant::now()).is_disabled()
    })
    .await;

    // An operator enable on B re-enables key 2 on A.
    let id = key_of(&pb, 2);
    let enable = pb.enable_mark(id);
    assert_eq!(
        pb.apply(&enable, Instant::now(), SystemTime::now()),
        Transition::Entered
    );
    b.publish(&enable);
    eventually("A sees the enable", || {
        pa.state(key_of(&pa, 2), Instant::now()).is_available()
    })
    .await;
    assert_eq!(pa.generation(key_of(&pa, 2)), 1);
    assert_eq!(hget(&redis, &pb, id).unwrap(), "v1:1:available");

    let everything = redis.dump_everything();
    for k in keys() {
        for w in k.as_bytes().windows(5) {
            assert!(
                !everything.contains(std::str::from_utf8(w).unwrap()),
                "key material in Redis"
            );
        }
    }
}

/// A mark made before an enable and arriving after it (a slow replica) changes nothing, in
/// Redis or in any pool; a mark made after the enable does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enable_beats_an_older_mark_arriving_late() {
    let redis = RedisServer::start();
    let (pa, pb, pc) = (pool(&[0, 1, 2]), pool(&[1, 2, 0]), pool(&[2, 1, 0]));
    let (a, b, c) = (start(&redis, &pa), start(&redis, &pb), start(&redis, &pc));
    for s in [&a, &b, &c] {
        ready(s).await;
    }
    let id_a = key_of(&pa, 0);
    // A's call saw a 401 at generation 0, but its mark is slow to leave A.
    let late = pa.mark_for(
        id_a,
        Change::Disable {
            reason: DisableReason::Unauthorized,
        },
    );
    // Meanwhile C's operator enables the key (generation 1) and everyone learns it.
    let id_c = key_of(&pc, 0);
    let enable = pc.enable_mark(id_c);
    let _ = pc.apply(&enable, Instant::now(), SystemTime::now());
    c.publish(&enable);
    eventually("A and B see generation 1", || {
        pa.generation(id_a) == 1 && pb.generation(key_of(&pb, 0)) == 1
    })
    .await;
    // Now the old mark arrives: locally and in Redis it changes nothing.
    assert_eq!(
        pa.apply(&late, Instant::now(), SystemTime::now()),
        Transition::Unchanged
    );
    a.publish(&late);
    let stale_cool = Stored {
        generation: 0,
        state: StoredState::Cooling {
            until_ms: 99_999_999_999_999,
            reason: CoolReason::Overloaded,
        },
    };
    let mut conn = redis.connection();
    let merged: i64 = redis::Script::new(keypool_redis::value::MERGE_SCRIPT)
        .key("t:keys")
        .arg(pa.fingerprint(id_a).to_string())
        .arg(stale_cool.encode())
        .arg("t:marks")
        .arg(0)
        .invoke(&mut conn)
        .unwrap();
    assert_eq!(merged, 0, "an older generation never wins in Redis");
    // Let a full read pass: still available everywhere.
    let synced = a.health().last_sync;
    eventually("a full read after the stale mark", || {
        a.health().last_sync > synced
    })
    .await;
    for (p, s) in [(&pa, 0), (&pb, 0), (&pc, 0)] {
        assert!(p.state(key_of(p, s), Instant::now()).is_available());
    }
    assert_eq!(hget(&redis, &pa, id_a).unwrap(), "v1:1:available");

    // A mark made after the enable (generation 1) does win.
    mark(
        &pb,
        &b,
        key_of(&pb, 0),
        Change::Disable {
            reason: DisableReason::Forbidden,
        },
    );
    eventually("A and C see the new disable", || {
        pa.state(id_a, Instant::now()).is_disabled() && pc.state(id_c, Instant::now()).is_disabled()
    })
    .await;
}

/// Values under the namespace that are not keypool's — in the hash, on the channel, beside the
/// hash — are ignored and counted; marks still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_are_ignored() {
    let redis = RedisServer::start();
    let mut conn = redis.connection();
    let (pa, pb) = (pool(&[0, 1, 2]), pool(&[0, 1, 2]));
    let fp = pa.fingerprint(key_of(&pa, 0)).to_string();
    let _: () = redis::cmd("HSET")
        .arg("t:keys")
        .arg("not-a-fingerprint")
        .arg("v1:0:disabled:operator")
        .arg(&fp)
        .arg("v1:0:disabled:sideways")
        .arg(pa.fingerprint(key_of(&pa, 1)).to_string().to_uppercase())
        .arg("v1:0:disabled:operator")
        .arg("00000000000000000000000000000000")
        .arg(b"\xff\xfe".as_slice())
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("t:other")
        .arg("whatever")
        .query(&mut conn)
        .unwrap();
    let (a, b) = (start(&redis, &pa), start(&redis, &pb));
    ready(&a).await;
    ready(&b).await;
    assert!(a.health().ignored >= 4, "{:?}", a.health());
    for id in pa.ids() {
        assert!(pa.state(id, Instant::now()).is_available());
    }
    for garbage in [
        "",
        "junk",
        "a b c d",
        &format!("{fp} v1:0:disabled:operator"),
        &format!("{fp} v9 1"),
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("t:marks")
            .arg(garbage)
            .query(&mut conn)
            .unwrap();
    }
    let before = b.health().ignored;
    eventually("B ignores the garbage messages", || {
        b.health().ignored >= before + 5
    })
    .await;
    assert!(pb.state(key_of(&pb, 0), Instant::now()).is_available());
    // A mark on the key whose field held garbage replaces the garbage.
    mark(
        &pa,
        &a,
        key_of(&pa, 0),
        Change::Disable {
            reason: DisableReason::Billing,
        },
    );
    eventually("B sees the mark", || {
        pb.state(key_of(&pb, 0), Instant::now()).is_disabled()
    })
    .await;
    assert_eq!(
        hget(&redis, &pa, key_of(&pa, 0)).unwrap(),
        "v1:0:disabled:billing"
    );
    assert!(a.health().up && b.health().up);
}

/// Redis killed: the driver reports down, marks made meanwhile stay local (and never wait);
/// after Redis restarts empty, every replica writes its state back and marks flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_then_reseed_of_an_empty_redis() {
    let mut redis = RedisServer::start();
    let (pa, pb) = (pool(&[0, 1, 2]), pool(&[1, 0, 2]));
    let (a, b) = (start(&redis, &pa), start(&redis, &pb));
    ready(&a).await;
    ready(&b).await;
    mark(
        &pa,
        &a,
        key_of(&pa, 0),
        Change::Disable {
            reason: DisableReason::Forbidden,
        },
    );
    eventually("B sees the first mark", || {
        pb.state(key_of(&pb, 0), Instant::now()).is_disabled()
    })
    .await;

    redis.kill();
    eventually("both drivers report down", || !a.health().up && !b.health().up).await;
    // A mark made while Redis is away: queued, the call path never waits.
    let started = Instant::now();
    mark(
        &pa,
        &a,
        key_of(&pa, 1),
        Change::Disable {
            reason: DisableReason::Unauthorized,
        },
    );
    assert!(started.elapsed() < Duration::from_millis(50));
    assert!(pb.state(key_of(&pb, 1), Instant::now()).is_available());

    redis.restart();
    eventually("both drivers are back", || a.health().up && b.health().up).await;
    eventually("B learns the mark made during the outage", || {
        pb.state(key_of(&pb, 1), Instant::now()).is_disabled()
    })
    .await;
    // Redis was re-seeded with both replicas' state.
    eventually("Redis holds both marks again", || {
        hget(&redis, &pa, key_of(&pa, 0)).as_deref() == Some("v1:0:disabled:forbidden")
            && hget(&redis, &pa, key_of(&pa, 1)).as_deref() == Some("v1:0:disabled:unauthorized")
    })
    .await;
    // And a new mark propagates.
    mark(
        &pb,
        &b,
        key_of(&pb, 2),
        Change::Disable {
            reason: DisableReason::Billing,
        },
    );
    eventually("A sees the new mark", || {
        pa.state(key_of(&pa, 2), Instant::now()).is_disabled()
    })
    .await;
}

/// A key that a replica adds by a reload takes its shared state at the next full read, even
/// though the driver saw its value before the reload (when the pool did not have it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_by_a_reload_takes_the_shared_state() {
    let redis = RedisServer::start();
    let (pa, pb) = (pool(&[0, 1]), pool(&[0]));
    let (a, b) = (start(&redis, &pa), start(&redis, &pb));
    ready(&a).await;
    ready(&b).await;
    mark(
        &pa,
        &a,
        key_of(&pa, 1),
        Change::Disable {
            reason: DisableReason::Forbidden,
        },
    );
    eventually("the mark is in Redis", || {
        hget(&redis, &pa, key_of(&pa, 1)).is_some()
    })
    .await;
    let synced = b.health().last_sync;
    eventually("B reads the hash after the mark", || {
        b.health().last_sync > synced
    })
    .await;
    let reloaded = pb.reload([keys()[0].clone(), keys()[1].clone()]).unwrap();
    eventually("the reloaded pool learns key 1's state", || {
        reloaded.state(key_of(&reloaded, 1), Instant::now()).is_disabled()
    })
    .await;
}

/// The probe lease of a key is one replica's at a time: the other is told how long it stays
/// taken, the holder renews it, and once it runs out the other replica takes it. Redis holds
/// the replica's id under `{ns}:probe:{fingerprint}`, nothing of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_lease_is_one_replicas_at_a_time() {
    use keypool_redis::Lease;
    let redis = RedisServer::start();
    let (pa, pb) = (pool(&[0, 1, 2]), pool(&[2, 0, 1]));
    let (a, b) = (start(&redis, &pa), start(&redis, &pb));
    assert_ne!(a.replica_id(), b.replica_id());
    let fp = pa.fingerprint(key_of(&pa, 1));
    assert_eq!(a.probe_lease_key(fp), format!("t:probe:{fp}"));
    let ttl = Duration::from_secs(30);
    assert_eq!(a.probe_lease(fp, ttl).await.unwrap(), Lease::Acquired);
    match b.probe_lease(fp, ttl).await.unwrap() {
        Lease::Held { remaining } => assert!(remaining <= ttl && remaining > ttl / 2, "{remaining:?}"),
        Lease::Acquired => panic!("two replicas hold one lease"),
    }
    // The holder renews (here: shortens) its own lease.
    assert_eq!(
        a.probe_lease(fp, Duration::from_millis(200)).await.unwrap(),
        Lease::Acquired
    );
    let mut c = redis.connection();
    let holder: String = redis::cmd("GET")
        .arg(format!("t:probe:{fp}"))
        .query(&mut c)
        .unwrap();
    assert_eq!(holder, a.replica_id());
    for secret in keys() {
        assert!(!holder.contains(&secret[..12]));
    }
    // Another key's lease is free.
    let other = pa.fingerprint(key_of(&pa, 2));
    assert_eq!(b.probe_lease(other, ttl).await.unwrap(), Lease::Acquired);
    // Once A's lease runs out, B takes it.
    let deadline = Instant::now() + WAIT;
    loop {
        match b.probe_lease(fp, ttl).await.unwrap() {
            Lease::Acquired => break,
            Lease::Held { remaining } => {
                assert!(Instant::now() < deadline, "A's lease never ran out");
                assert!(remaining <= Duration::from_millis(200), "{remaining:?}");
                tokio::time::sleep(remaining).await;
            }
        }
    }
    assert!(matches!(
        a.probe_lease(fp, ttl).await.unwrap(),
        Lease::Held { .. }
    ));
}

/// Without an answering backend a lease is an error (the caller decides what to do), after
/// the configured timeout at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_without_a_backend_is_an_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = StateConfig::new(&format!("redis://127.0.0.1:{port}"), "t").unwrap();
    config.timeout = Duration::from_millis(300);
    let p = pool(&[0]);
    let state = RedisState::start(config, p.clone(), None).unwrap();
    let started = Instant::now();
    let e = state
        .probe_lease(p.fingerprint(key_of(&p, 0)), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, keypool_redis::Error::Unavailable(_)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
