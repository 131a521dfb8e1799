//! What the gateway does with what the pool knows about limits (issue 18, SPEC §11): probes of
//! disabled keys (back after a successful probe, backing off after a failed one, one replica at
//! a time on a shared Redis), the single-organisation notice, the admin view's organisations,
//! and policy rules from a config file. Real `keypool serve` processes in front of a
//! `keypool-mock` upstream; every wait is for a condition (an admin view, a metric, a log line,
//! a recorded request) with a deadline, and timings are read from the mock's recorded request
//! times, never from sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use keypool_mock::{MockServer, Recorded, Reply};
use support::Gateway;

const WAIT: Duration = Duration::from_secs(15);

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn admin(gw: &Gateway) -> serde_json::Value {
    serde_json::from_str(&gw.admin_get("/admin/keys")).unwrap()
}

/// The admin view of the `i`-th key (keys are listed in pool order).
fn key(gw: &Gateway, i: usize) -> serde_json::Value {
    admin(gw)["keys"][i].clone()
}

/// The probes the mock received from `key`, in order.
fn probes(mock: &MockServer, key: &str) -> Vec<Recorded> {
    mock.requests_for(key)
        .into_iter()
        .filter(|r| r.path() == "/v1/models")
        .collect()
}

/// The JSON log lines whose message is `message`.
fn log_lines(gw: &Gateway, message: &str) -> Vec<serde_json::Value> {
    gw.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

fn metric_line(gw: &Gateway, prefix: &str) -> Option<String> {
    gw.admin_get("/metrics")
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_owned)
}

/// A key the upstream disabled (401) comes back by itself: after `--probe-delay`, one
/// `GET /v1/models?limit=1` with the key answers 200, the key is enabled, logged and counted,
/// and takes traffic again.
#[test]
fn a_disabled_key_comes_back_after_a_successful_probe() {
    let mock = MockServer::start();
    let keys = support::keys(2);
    // The first answer (a message) is 401; every later one, the probe included, is 200.
    mock.script(&keys[0], [Reply::unauthorized()]);
    let gw = Gateway::start(&mock.url(), &keys, &["--probe-delay", "200ms"]);
    assert_eq!(gw.message(false).0, 200, "failed over to the second key");
    let label = key(&gw, 0)["label"].as_str().unwrap().to_owned();
    let disabled = key(&gw, 0);
    assert!(
        disabled["state"] == "disabled" || disabled["state"] == "available",
        "{disabled}"
    );
    wait_for("the probe enables the first key", || {
        key(&gw, 0)["state"] == "available" && !probes(&mock, &keys[0]).is_empty()
    });
    let sent = probes(&mock, &keys[0]);
    assert_eq!(sent.len(), 1, "one probe");
    assert_eq!(sent[0].uri, "/v1/models?limit=1");
    assert_eq!(sent[0].method, http::Method::GET);
    let message = &mock.requests_for(&keys[0])[0];
    assert!(
        sent[0].received_at.duration_since(message.received_at) >= Duration::from_millis(200),
        "probed before --probe-delay"
    );
    assert!(key(&gw, 0)["next_probe"].is_null());
    let probed = log_lines(&gw, "key probed");
    assert_eq!(probed.len(), 1, "{probed:?}");
    assert_eq!(probed[0]["fields"]["result"], "enabled");
    assert_eq!(probed[0]["fields"]["key"], label.as_str());
    assert_eq!(probed[0]["fields"]["status"], 200);
    assert_eq!(probed[0]["level"], "INFO");
    let counted = metric_line(&gw, "keypool_probes_total{").unwrap_or_default();
    assert!(
        counted.contains(&format!("key=\"{label}\""))
            && counted.contains("result=\"enabled\"")
            && counted.ends_with(" 1"),
        "{counted}"
    );
    assert!(
        gw.admin_get("/metrics").contains(&format!(
            "keypool_key_transitions_total{{pool=\"anthropic\",key=\"{label}\",reason=\"probe_succeeded\"}} 1"
        )),
        "the enable is a counted transition"
    );
    // The key takes traffic again (primary order: it is first).
    let before = mock.requests_for(&keys[0]).len();
    assert_eq!(gw.message(false).0, 200);
    assert_eq!(mock.requests_for(&keys[0]).len(), before + 1);
    gw.assert_no_secret(&keys, &[]);
}

/// A failed probe backs off: the next one comes twice as late, and the log says when.
#[test]
fn a_failed_probe_backs_off() {
    let mock = MockServer::start();
    let keys = support::keys(2);
    // 401 to the message, then two failed probes (401, 403), then 200.
    mock.script(
        &keys[0],
        [Reply::unauthorized(), Reply::unauthorized(), Reply::forbidden()],
    );
    let gw = Gateway::start(&mock.url(), &keys, &["--probe-delay", "200ms"]);
    assert_eq!(gw.message(false).0, 200);
    // While it is disabled, the admin view says when the next probe is due.
    let view = key(&gw, 0);
    if view["state"] == "disabled" {
        assert!(view["next_probe_seconds"].as_f64().is_some(), "{view}");
    }
    wait_for("three probes, the last one enabling the key", || {
        probes(&mock, &keys[0]).len() == 3 && key(&gw, 0)["state"] == "available"
    });
    let message = mock.requests_for(&keys[0])[0].received_at;
    let at: Vec<Instant> = probes(&mock, &keys[0]).iter().map(|r| r.received_at).collect();
    let gaps = [
        at[0].duration_since(message),
        at[1].duration_since(at[0]),
        at[2].duration_since(at[1]),
    ];
    assert!(gaps[0] >= Duration::from_millis(200), "{gaps:?}");
    assert!(
        gaps[1] >= Duration::from_millis(400),
        "the second probe did not wait twice as long: {gaps:?}"
    );
    assert!(
        gaps[2] >= Duration::from_millis(800),
        "the third probe did not wait four times as long: {gaps:?}"
    );
    let probed = log_lines(&gw, "key probed");
    let results: Vec<(&str, Option<f64>)> = probed
        .iter()
        .map(|l| {
            (
                l["fields"]["result"].as_str().unwrap(),
                l["fields"]["next_in_s"].as_f64(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [("failed", Some(0.4)), ("failed", Some(0.8)), ("enabled", None)]
    );
    assert_eq!(probed[1]["fields"]["status"], 403);
    let metrics = gw.admin_get("/metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("keypool_probes_total{")
            && l.contains("result=\"failed\"")
            && l.ends_with(" 2")),
        "{metrics}"
    );
}

/// `--probe-delay 0s` never probes; a key an operator disabled is never probed either.
#[test]
fn no_probes_when_off_or_for_an_operators_disable() {
    let mock = MockServer::start();
    let keys = support::keys(3);
    mock.script(&keys[0], [Reply::unauthorized()]);
    let gw = Gateway::start(&mock.url(), &keys, &["--probe-delay", "0s"]);
    assert_eq!(gw.message(false).0, 200);
    assert_eq!(key(&gw, 0)["state"], "disabled");
    assert!(key(&gw, 0)["next_probe"].is_null());
    drop(gw);

    let mock = MockServer::start();
    let gw = Gateway::start(&mock.url(), &keys, &["--probe-delay", "50ms"]);
    let label = key(&gw, 1)["label"].as_str().unwrap().to_owned();
    let (status, body) = gw.request(
        "POST",
        &format!("/admin/keys/{label}/disable"),
        &[("x-api-key", support::ADMIN)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    // Then a 401 on key 1: the call skips the operator's key 2 and ends on key 3.
    mock.script(&keys[0], [Reply::unauthorized()]);
    assert_eq!(gw.message(false).0, 200);
    assert!(mock.requests_for(&keys[1]).is_empty());
    wait_for("key 1 probed and enabled", || key(&gw, 0)["state"] == "available");
    assert_eq!(log_lines(&gw, "key probed").len(), 1);
    assert!(
        probes(&mock, &keys[1]).is_empty(),
        "an operator's disable was probed"
    );
    let operators = key(&gw, 1);
    assert_eq!(operators["state"], "disabled");
    assert!(operators["next_probe"].is_null(), "{operators}");
}
