//! Shared key state across gateway replicas (issue #17, SPEC §10): several `keypool serve`
//! processes on one real `redis-server` (each test starts its own on a free loopback port with
//! persistence off, and fails — never skips — when it cannot), in front of a `keypool-mock`
//! upstream. Every wait is for an observable condition (an admin view, a metric, a log line, a
//! Redis value) with a deadline; no sleep makes a test pass. Each test ends by scanning every
//! key and value in its Redis for key material.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keypool_mock::{MockServer, Reply, RetryAfter};
use keypool_redis::testing::RedisServer;
use support::{ADMIN, Gateway};

const WAIT: Duration = Duration::from_secs(15);

/// Keys with long, distinct secrets and distinct hints (so default labels are the same on
/// every replica, whatever the order of its key list).
fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sk-ant-api03-shared{i}-{}-end{i}x", "Hj4Kq9Ws2Ty".repeat(3)))
        .collect()
}

/// A replica on `redis` with `keys` in this order.
fn replica(mock: &MockServer, redis: &RedisServer, keys: &[String]) -> Gateway {
    replica_env(mock, redis, keys, &[])
}

fn replica_env(mock: &MockServer, redis: &RedisServer, keys: &[String], env: &[(&str, &str)]) -> Gateway {
    let gw = Gateway::start_env(&mock.url(), keys, &["--state", &redis.url()], env);
    wait_for(&format!("replica {} ready", gw.addr), || {
        gw.request("GET", "/healthz", &[], b"").0 == 200
    });
    gw
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fingerprint(key: &str) -> String {
    keypool_core::Fingerprint::of(&keypool_core::Secret::new(key).unwrap()).to_string()
}

/// The admin view of `key` (found by fingerprint: the test keys share their hints).
fn key_view(gw: &Gateway, key: &str) -> serde_json::Value {
    let fp = fingerprint(key);
    let admin: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/keys")).unwrap();
    admin["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["fingerprint"] == fp.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no key {fp} in {admin}"))
}

fn state_of(gw: &Gateway, key: &str) -> String {
    key_view(gw, key)["state"].as_str().unwrap().to_owned()
}

fn metric(gw: &Gateway, name: &str) -> Option<f64> {
    gw.admin_get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// No key material in Redis (every key and value), in the logs, metrics or admin views.
fn assert_clean(redis: &RedisServer, keys: &[String], gateways: &[&Gateway]) {
    let everything = redis.dump_everything();
    for key in keys {
        let hint = keypool_core::Secret::new(key.as_str()).unwrap().hint().to_owned();
        assert!(!everything.contains(&hint), "a hint in Redis");
        for piece in key.as_bytes().windows(5) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !everything.contains(piece),
                "key material {}… in Redis",
                &piece[..2]
            );
        }
    }
    for gw in gateways {
        gw.assert_no_secret(keys, &[]);
    }
}

/// A 429 on replica A cools the key on B and C too: they skip it without asking the upstream.
#[test]
fn a_rate_limit_on_one_replica_is_skipped_by_the_others() {
    let redis = RedisServer::start();
    let mock = MockServer::start();
    let keys = keys(2);
    mock.set_default(&keys[0], Reply::rate_limited(RetryAfter::Seconds("30".into())));
    let [a, b, c] = [0, 1, 2].map(|_| replica(&mock, &redis, &keys));

    assert_eq!(a.message(false).0, 200);
    assert_eq!(mock.requests_for(&keys[0]).len(), 1);
    for gw in [&b, &c] {
        wait_for("the cooldown reaches B and C", || {
            state_of(gw, &keys[0]) == "cooling"
        });
        let left = key_view(gw, &keys[0])["cooling_seconds_left"].as_f64().unwrap();
        assert!(left > 25.0 && left <= 30.0, "{left}");
    }
    for gw in [&b, &c, &a] {
        assert_eq!(gw.message(false).0, 200);
    }
    assert_eq!(
        mock.requests_for(&keys[0]).len(),
        1,
        "B and C skipped the cooling key"
    );
    assert_eq!(mock.requests_for(&keys[1]).len(), 4);
    // The mark arrived from the shared state: logged and counted on B like a local one.
    b.wait_log(&["key state changed", "shared", "rate_limited"], WAIT);
    assert!(metric(&b, "keypool_state_propagation_seconds_count").unwrap() >= 1.0);
    assert_eq!(metric(&b, "keypool_state_backend_up"), Some(1.0));
    assert_clean(&redis, &keys, &[&a, &b, &c]);
}

/// Replicas with the key list in different orders: a 401 on A disables the key on B and C; an
/// operator enable on C re-enables it everywhere, and the key serves again.
#[test]
fn a_disable_and_an_enable_reach_every_replica_whatever_the_key_order() {
    let redis = RedisServer::start();
    let mock = MockServer::start();
    let keys = keys(3);
    mock.script(&keys[0], [Reply::unauthorized()]);
    let order = |o: [usize; 3]| o.map(|i| keys[i].clone()).to_vec();
    let a = replica(&mock, &redis, &order([0, 1, 2]));
    let b = replica(&mock, &redis, &order([2, 0, 1]));
    let c = replica(&mock, &redis, &order([1, 2, 0]));

    assert_eq!(a.message(false).0, 200);
    for gw in [&b, &c] {
        wait_for("the disable reaches B and C", || {
            state_of(gw, &keys[0]) == "disabled"
        });
        assert_eq!(key_view(gw, &keys[0])["reason"], "unauthorized");
    }
    let label = key_view(&c, &keys[0])["label"].as_str().unwrap().to_owned();
    let (status, body) = c.request(
        "POST",
        &format!("/admin/keys/{label}/enable"),
        &[("x-api-key", ADMIN)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"changed\":true"), "{body}");
    for gw in [&a, &b, &c] {
        wait_for("the enable reaches every replica", || {
            state_of(gw, &keys[0]) == "available"
        });
    }
    // A (whose first key is key 0) uses it again.
    let before = mock.requests_for(&keys[0]).len();
    assert_eq!(a.message(false).0, 200);
    assert_eq!(mock.requests_for(&keys[0]).len(), before + 1);
    // An operator disable on B reaches A.
    let (status, _) = b.request(
        "POST",
        &format!("/admin/keys/{label}/disable"),
        &[("x-api-key", ADMIN)],
        b"",
    );
    assert_eq!(status, 200);
    wait_for("the operator disable reaches A", || {
        state_of(&a, &keys[0]) == "disabled"
    });
    assert_eq!(key_view(&a, &keys[0])["reason"], "operator");
    assert_clean(&redis, &keys, &[&a, &b, &c]);
}

/// One pooled `POST /v1/messages` to `addr`; the status (0 if the exchange broke).
fn message_to(addr: SocketAddr) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let body = support::message_body(false);
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()))
        .is_err()
    {
        return 0;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    support::parse_response(&raw).map_or(0, |r| r.status)
}

/// Sends requests to every gateway from two threads until `stop`; counts failures and the
/// requests done.
fn load(
    gateways: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
) -> (
    Vec<std::thread::JoinHandle<()>>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
) {
    let failed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let threads = (0..2)
        .map(|t| {
            let (gateways, stop, failed, done) =
                (gateways.clone(), stop.clone(), failed.clone(), done.clone());
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    if message_to(gateways[i % gateways.len()]) != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    (threads, failed, done)
}

const UNREACHABLE: &str = "state backend unreachable: serving from local state";

/// Redis SIGKILLed under load: no client request fails, each replica warns once and exports
/// the gauge at 0; after redis-server restarts empty the replicas re-seed it (marks made before
/// and during the outage) and a new mark propagates.
#[test]
fn redis_killed_under_load_then_restarted_empty() {
    let mut redis = RedisServer::start();
    let mock = MockServer::start();
    let keys = keys(4);
    mock.script(&keys[0], [Reply::unauthorized()]);
    let a = replica(&mock, &redis, &keys);
    let b = replica(&mock, &redis, &keys);
    assert_eq!(a.message(false).0, 200);
    wait_for("the first disable reaches B", || {
        state_of(&b, &keys[0]) == "disabled"
    });

    let stop = Arc::new(AtomicBool::new(false));
    let (threads, failed, done) = load(vec![a.addr, b.addr], stop.clone());
    wait_for("load is flowing", || done.load(Ordering::Relaxed) >= 20);
    redis.kill();
    for gw in [&a, &b] {
        gw.wait_log(&[UNREACHABLE], WAIT);
        wait_for("the gauge drops to 0", || {
            metric(gw, "keypool_state_backend_up") == Some(0.0)
        });
    }
    // A mark made during the outage: B's next calls of key 1 get a 403.
    mock.set_default(&keys[1], Reply::forbidden());
    wait_for("key 1 disabled locally on a replica", || {
        state_of(&a, &keys[1]) == "disabled" || state_of(&b, &keys[1]) == "disabled"
    });
    let during = done.load(Ordering::Relaxed);
    wait_for("load keeps flowing while Redis is down", || {
        done.load(Ordering::Relaxed) >= during + 20
    });
    assert_eq!(
        a.request("GET", "/healthz", &[], b"").0,
        200,
        "a replica that has read the state stays ready"
    );

    redis.restart();
    for gw in [&a, &b] {
        wait_for("the gauge returns to 1", || {
            metric(gw, "keypool_state_backend_up") == Some(1.0)
        });
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "client requests failed because of Redis"
    );
    // The empty Redis was re-seeded with both disables, and both replicas agree.
    wait_for("Redis is re-seeded", || {
        let mut conn = redis.connection();
        let v0: Option<String> = redis::cmd("HGET")
            .arg("keypool:keys")
            .arg(fingerprint(&keys[0]))
            .query(&mut conn)
            .unwrap();
        let v1: Option<String> = redis::cmd("HGET")
            .arg("keypool:keys")
            .arg(fingerprint(&keys[1]))
            .query(&mut conn)
            .unwrap();
        v0.as_deref() == Some("v1:0:disabled:unauthorized")
            && v1.as_deref() == Some("v1:0:disabled:forbidden")
    });
    for gw in [&a, &b] {
        wait_for("both replicas know both disables", || {
            state_of(gw, &keys[0]) == "disabled" && state_of(gw, &keys[1]) == "disabled"
        });
    }
    // A new mark propagates.
    mock.set_default(&keys[2], Reply::rate_limited(RetryAfter::Seconds("30".into())));
    assert_eq!(b.message(false).0, 200);
    wait_for("the new mark reaches A", || state_of(&a, &keys[2]) == "cooling");
    for gw in [&a, &b] {
        let warnings = gw.logs().lines().filter(|l| l.contains(UNREACHABLE)).count();
        assert_eq!(warnings, 1, "one warning per outage, not one per request");
        gw.wait_log(&["state backend reachable again"], WAIT);
    }
    assert_clean(&redis, &keys, &[&a, &b]);
}

/// Redis SIGSTOPped (it keeps its sockets and answers nothing): requests, including ones that
/// make marks, still complete while it is stopped; the backend reports down; after SIGCONT the
/// marks made meanwhile reach the other replica.
#[test]
fn redis_stopped_requests_still_served() {
    let redis = RedisServer::start();
    let mock = MockServer::start();
    let keys = keys(3);
    let a = replica(&mock, &redis, &keys);
    let b = replica(&mock, &redis, &keys);
    redis.stop();
    mock.script(&keys[0], [Reply::rate_limited(RetryAfter::Seconds("30".into()))]);
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let started = Instant::now();
        let (status, body) = gw.message(false);
        assert_eq!(status, 200, "{body}");
        // A generous bound that still proves nothing waited for Redis's 1 s timeout per call.
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "a request waited {:?}",
            started.elapsed()
        );
    }
    assert!(!redis.ping(), "Redis is still stopped");
    for gw in [&a, &b] {
        wait_for("the backend reports down", || {
            metric(gw, "keypool_state_backend_up") == Some(0.0)
        });
    }
    // Still served while stopped, after the backend was noticed down.
    assert_eq!(a.message(false).0, 200);
    assert_eq!(b.message(false).0, 200);
    redis.resume();
    wait_for("the mark made while Redis was stopped reaches B", || {
        state_of(&b, &keys[0]) == "cooling"
    });
    assert_clean(&redis, &keys, &[&a, &b]);
}

/// Values under the namespace that are not keypool's are ignored (with a warning): the
/// replicas start, read, serve and share marks as usual.
#[test]
fn garbage_under_the_namespace_is_ignored() {
    let redis = RedisServer::start();
    let mock = MockServer::start();
    let keys = keys(2);
    let fingerprint = fingerprint(&keys[0]);
    let mut conn = redis.connection();
    let _: () = redis::cmd("HSET")
        .arg("keypool:keys")
        .arg(&fingerprint)
        .arg("disabled forever")
        .arg("junk-field")
        .arg("v1:0:disabled:operator")
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("keypool:marks")
        .arg("not a channel")
        .query(&mut conn)
        .unwrap();
    let a = replica(&mock, &redis, &keys);
    let b = replica(&mock, &redis, &keys);
    a.wait_log(&["ignored values under the state namespace"], WAIT);
    let _: i64 = redis::cmd("PUBLISH")
        .arg("keypool:marks")
        .arg(format!("{fingerprint} v1:0:disabled:whatever 1"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(state_of(&a, &keys[0]), "available");
    assert_eq!(a.message(false).0, 200);
    assert_eq!(mock.requests_for(&keys[0]).len(), 1, "the key is in use");
    mock.script(&keys[0], [Reply::billing()]);
    assert_eq!(a.message(false).0, 200);
    wait_for("the mark still reaches B", || {
        state_of(&b, &keys[0]) == "disabled"
    });
    let admin: serde_json::Value = serde_json::from_str(&b.admin_get("/admin/keys")).unwrap();
    assert!(
        admin["state_backend"]["ignored"].as_u64().unwrap() >= 1,
        "{admin}"
    );
    assert_eq!(admin["state_backend"]["up"], true);
    assert_clean(&redis, &keys, &[&a, &b]);
}

/// Two replicas whose wall clocks differ by 3 s agree on deadlines up to those 3 s.
#[test]
fn skewed_clocks_keep_deadlines_within_the_skew() {
    let redis = RedisServer::start();
    let mock = MockServer::start();
    let keys = keys(2);
    let a = replica_env(&mock, &redis, &keys, &[("KEYPOOL_TEST_CLOCK_OFFSET_MS", "3000")]);
    let b = replica(&mock, &redis, &keys);
    mock.script(&keys[0], [Reply::rate_limited(RetryAfter::Seconds("20".into()))]);
    assert_eq!(a.message(false).0, 200);
    wait_for("A's cooldown reaches B", || state_of(&b, &keys[0]) == "cooling");
    let on_a = key_view(&a, &keys[0])["cooling_seconds_left"].as_f64().unwrap();
    let on_b = key_view(&b, &keys[0])["cooling_seconds_left"].as_f64().unwrap();
    assert!(
        (on_a - 20.0).abs() < 1.0,
        "A's own cooldown is its retry-after: {on_a}"
    );
    assert!((on_b - on_a).abs() <= 3.0 + 0.5, "A {on_a} vs B {on_b}");
    assert!(
        on_b > on_a,
        "A's clock is ahead, so B sees a later deadline: {on_a} vs {on_b}"
    );

    mock.script(&keys[1], [Reply::rate_limited(RetryAfter::Seconds("20".into()))]);
    assert_eq!(b.message(false).0, 429, "both keys out on B");
    wait_for("B's cooldown reaches A", || state_of(&a, &keys[1]) == "cooling");
    let on_a = key_view(&a, &keys[1])["cooling_seconds_left"].as_f64().unwrap();
    let on_b = key_view(&b, &keys[1])["cooling_seconds_left"].as_f64().unwrap();
    assert!(
        (on_b - on_a).abs() <= 3.0 + 0.5 && on_a < on_b,
        "A {on_a} vs B {on_b}"
    );
    assert_clean(&redis, &keys, &[&a, &b]);
}

/// `--state` with a bad URL or namespace is refused at start with one line (no password).
#[test]
fn bad_state_configuration_is_one_line() {
    for (flags, needle) in [
        (
            vec!["--state", "http://user:hunter2secret@127.0.0.1:1"],
            "redis://",
        ),
        (
            vec![
                "--state",
                "redis://127.0.0.1:6379",
                "--state-namespace",
                "no spaces",
            ],
            "namespace",
        ),
        (
            vec!["--state", "redis://:hunter2/sec@ret@127.0.0.1:port"],
            "redis://***@127.0.0.1:port",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keypool"))
            .arg("serve")
            .args(&flags)
            .env("KEYPOOL_KEYS", "sk-ant-api03-abcdefghijklmnop")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(needle), "{stderr}");
        assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

/// A replica whose Redis is not there yet serves from local state but is not ready; it turns
/// ready once Redis appears.
#[test]
fn not_ready_until_the_shared_state_is_read() {
    let mut redis = RedisServer::start();
    let mock = MockServer::start();
    let keys = keys(2);
    redis.kill();
    let gw = Gateway::start(&mock.url(), &keys, &["--state", &redis.url()]);
    let (status, body) = gw.request("GET", "/healthz", &[], b"");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"status\":\"starting\""), "{body}");
    assert_eq!(gw.message(false).0, 200, "requests are served meanwhile");
    redis.restart();
    wait_for("ready once Redis is there", || {
        gw.request("GET", "/healthz", &[], b"").0 == 200
    });
    assert_clean(&redis, &keys, &[&gw]);
}
