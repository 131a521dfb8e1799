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
    // While it is disabled, the admin view and the status page say when the next probe is due.
    let view = key(&gw, 0);
    let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/status")).unwrap();
    let shown = &status["pools"][0]["keys"][0];
    if view["state"] == "disabled" && shown["state"] == "disabled" {
        assert!(view["next_probe_seconds"].as_f64().is_some(), "{view}");
        assert!(shown["next_probe_s"].as_f64().is_some(), "{shown}");
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
    drop(gw);

    // A disabled key's next probe, in the admin view and on the status page.
    let mock = MockServer::start();
    mock.script(&keys[0], [Reply::unauthorized()]);
    let gw = Gateway::start(&mock.url(), &keys, &["--probe-delay", "1h"]);
    assert_eq!(gw.message(false).0, 200);
    let view = key(&gw, 0);
    let left = view["next_probe_seconds"].as_f64().unwrap();
    assert!(left > 3500.0 && left <= 3600.0, "{view}");
    assert!(view["next_probe"].as_str().unwrap().ends_with('Z'), "{view}");
    let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/status")).unwrap();
    let shown = &status["pools"][0]["keys"][0];
    let left = shown["next_probe_s"].as_f64().unwrap();
    assert!(left > 3500.0 && left <= 3600.0, "{shown}");
    assert!(status["pools"][0]["keys"][1]["next_probe_s"].is_null());
}

/// An answer from `organisation` (and `workspace`).
fn from(organisation: &str, workspace: Option<&str>) -> Reply {
    let reply = Reply::ok().header("anthropic-organization-id", organisation);
    match workspace {
        Some(w) => reply.header("anthropic-workspace-id", w),
        None => reply,
    }
}

/// Waits until the gateway has logged `n` request lines (each comes after whatever the request
/// itself logged).
fn wait_requests_logged(gw: &Gateway, n: usize) {
    wait_for(&format!("{n} request lines"), || {
        log_lines(gw, "request").len() >= n
    });
}

/// When every key of a pool turns out to belong to one organisation, the gateway says so once
/// (a warning), in the admin view and as a gauge; the admin view shows each key's organisation
/// and workspace. A pool with two organisations says nothing.
#[test]
fn the_single_organisation_notice_is_logged_once() {
    const NOTICE: &str = "every key of this pool belongs to one organisation";
    let mock = MockServer::start();
    let keys = support::keys(3);
    for k in &keys {
        mock.set_default(k, from("org-one", Some("wrk-1")));
    }
    let gw = Gateway::start(&mock.url(), &keys, &["--order", "round-robin"]);
    let gauge = "keypool_pool_single_organisation{pool=\"anthropic\"}";
    assert_eq!(metric_line(&gw, gauge).as_deref(), Some(&*format!("{gauge} 0")));
    assert!(admin(&gw)["pools"][0]["single_organisation"].is_null());
    assert!(key(&gw, 0)["organisation"].is_null());
    for _ in 0..9 {
        assert_eq!(gw.message(false).0, 200);
    }
    wait_requests_logged(&gw, 9);
    assert!(
        keys.iter().all(|k| !mock.requests_for(k).is_empty()),
        "every key answered"
    );
    let notices: Vec<serde_json::Value> = gw
        .logs()
        .lines()
        .filter(|l| l.contains(NOTICE))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0]["level"], "WARN");
    assert_eq!(notices[0]["fields"]["organisation"], "org-one");
    assert_eq!(notices[0]["fields"]["pool"], "anthropic");
    let view = admin(&gw);
    assert_eq!(view["pools"][0]["single_organisation"], "org-one");
    let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/status")).unwrap();
    assert_eq!(status["pools"][0]["single_organisation"], "org-one");
    for k in view["keys"].as_array().unwrap() {
        assert_eq!(k["organisation"], "org-one", "{k}");
        assert_eq!(k["workspace"], "wrk-1", "{k}");
    }
    assert_eq!(metric_line(&gw, gauge).as_deref(), Some(&*format!("{gauge} 1")));
    drop(gw);

    // Two organisations: no notice, gauge 0.
    let mock = MockServer::start();
    mock.set_default(&keys[0], from("org-one", None));
    mock.set_default(&keys[1], from("org-one", None));
    mock.set_default(&keys[2], from("org-two", None));
    let gw = Gateway::start(&mock.url(), &keys, &["--order", "round-robin"]);
    for _ in 0..6 {
        assert_eq!(gw.message(false).0, 200);
    }
    wait_requests_logged(&gw, 6);
    assert!(!gw.logs().contains(NOTICE));
    assert!(admin(&gw)["pools"][0]["single_organisation"].is_null());
    assert_eq!(key(&gw, 2)["organisation"], "org-two");
    assert!(key(&gw, 2)["workspace"].is_null());
    assert_eq!(metric_line(&gw, gauge).as_deref(), Some(&*format!("{gauge} 0")));
}

/// The admin view of what the pool learnt: a rate limit on a key of a known organisation
/// cools its organisation's keys for the request's model family only (shown per key as a
/// family cooldown, the key itself available); a spend cap shows as `spend_capped` until 00:00
/// UTC on the 1st of a month; a spend-capped key is not probed (it is cooling, not disabled).
#[test]
fn the_admin_view_shows_family_cooldowns_and_spend_caps() {
    let mock = MockServer::start();
    let keys = support::keys(3);
    mock.set_default(&keys[0], from("org-a", None));
    mock.set_default(&keys[1], from("org-a", None));
    mock.set_default(&keys[2], from("org-b", None));
    let gw = Gateway::start(&mock.url(), &keys, &["--probe-delay", "50ms"]);
    // Key 1 answers first (primary order); keys 2 and 3 answer once when key 1 is cooling.
    mock.script(
        &keys[0],
        [Reply::rate_limited(keypool_mock::RetryAfter::Seconds(
            "30".into(),
        ))],
    );
    assert_eq!(gw.message(false).0, 200);
    // Key 1's organisation was not known at its 429: it cools alone, key-wide.
    let first = key(&gw, 0);
    assert_eq!(first["state"], "cooling", "{first}");
    assert!(first["until"].as_str().unwrap().ends_with('Z'), "{first}");
    // Key 2 answered the call and taught the pool org-a; let key 1 teach it too.
    let label = first["label"].as_str().unwrap().to_owned();
    let (status, _) = gw.request(
        "POST",
        &format!("/admin/keys/{label}/enable"),
        &[("x-api-key", support::ADMIN)],
        b"",
    );
    assert_eq!(status, 200);
    assert_eq!(gw.message(false).0, 200);
    assert_eq!(key(&gw, 0)["organisation"], "org-a");
    // Now a 429 on key 1 (a sonnet request) cools org-a for sonnet: keys 1 and 2.
    mock.script(
        &keys[0],
        [Reply::rate_limited(keypool_mock::RetryAfter::Seconds(
            "30".into(),
        ))],
    );
    assert_eq!(gw.message(false).0, 200, "served by key 3");
    let sonnet = format!("{:016x}", keypool_core::Family::of("sonnet").raw());
    for i in [0, 1] {
        let k = key(&gw, i);
        assert_eq!(k["state"], "available", "{k}");
        let families = k["family_cooldowns"].as_array().unwrap();
        assert_eq!(families.len(), 1, "{k}");
        assert_eq!(families[0]["family"], sonnet.as_str());
        assert_eq!(families[0]["reason"], "rate_limited");
        let left = families[0]["seconds_left"].as_f64().unwrap();
        assert!(left > 20.0 && left <= 30.0, "{k}");
    }
    assert_eq!(key(&gw, 2)["family_cooldowns"].as_array().unwrap().len(), 0);
    assert_eq!(key(&gw, 2)["organisation"], "org-b");

    // A spend cap on key 3 (org-b): a 429 with its error code and no retry-after.
    mock.script(
        &keys[2],
        [Reply::status(429).json(serde_json::json!({
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": "This organization has reached its monthly spend limit.",
                "details": {"error_code": "enforced_spend_limit_reached"}
            }
        }))],
    );
    let (status, _) = gw.message(false);
    assert_eq!(status, 429, "every key is out for sonnet");
    let capped = key(&gw, 2);
    assert_eq!(capped["state"], "spend_capped", "{capped}");
    assert_eq!(capped["reason"], "spend_capped");
    let until = capped["until"].as_str().unwrap();
    assert!(until.ends_with("-01T00:00:00Z"), "{capped}");
    assert!(capped["cooling_seconds_left"].as_f64().unwrap() > 0.0);
    assert!(
        capped["next_probe"].is_null(),
        "a spend cap is not probed: {capped}"
    );
    let metrics = gw.admin_get("/metrics");
    assert!(!metrics.contains("keypool_probes_total{"), "{metrics}");
    gw.assert_no_secret(&keys, &[]);
}

/// A config file's rule makes a 529 (delivered by default) cool the key for 30 s and fail
/// over.
#[test]
fn a_config_file_rule_fails_over_on_529() {
    let mock = MockServer::start();
    let keys = support::keys(2);
    mock.script(&keys[0], [Reply::overloaded()]);
    // Without the rule, the 529 is the client's answer.
    let gw = Gateway::start(&mock.url(), &keys, &[]);
    assert_eq!(gw.message(false).0, 529);
    drop(gw);

    let dir = std::env::temp_dir().join(format!("keypool-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rules.toml");
    std::fs::write(
        &file,
        "[[pool]]\nname = \"anthropic\"\n\n[[pool.rule]]\nstatus = 529\naction = \"cool\"\nfor = \"30s\"\n",
    )
    .unwrap();
    mock.script(&keys[0], [Reply::overloaded()]);
    let gw = Gateway::start(&mock.url(), &keys, &["--config", file.to_str().unwrap()]);
    assert_eq!(gw.message(false).0, 200, "failed over to the second key");
    let first = key(&gw, 0);
    assert_eq!(first["state"], "cooling", "{first}");
    assert_eq!(first["reason"], "overloaded");
    let left = first["cooling_seconds_left"].as_f64().unwrap();
    assert!(left > 25.0 && left <= 30.0, "{first}");
    assert_eq!(mock.requests_for(&keys[1]).len(), 1);
}

/// On one Redis, a disabled key is probed by one replica at a time: the other defers to the
/// lease holder, a failed probe keeps the lease until the next one, and the enable that the
/// successful probe makes reaches both replicas.
#[test]
fn replicas_probe_a_key_one_at_a_time() {
    let redis = keypool_redis::testing::RedisServer::start();
    let mock = MockServer::start();
    let keys = support::keys(2);
    // 401 to the message and to the first probe, 200 from then on.
    mock.script(&keys[0], [Reply::unauthorized(), Reply::unauthorized()]);
    let flags = ["--state", &redis.url(), "--probe-delay", "200ms"];
    let a = Gateway::start(&mock.url(), &keys, &flags);
    let b = Gateway::start(&mock.url(), &keys, &flags);
    for gw in [&a, &b] {
        wait_for("ready", || gw.request("GET", "/healthz", &[], b"").0 == 200);
    }
    assert_eq!(a.message(false).0, 200);
    wait_for("B learns the disable", || key(&b, 0)["state"] == "disabled");
    wait_for("both replicas take the key back", || {
        key(&a, 0)["state"] == "available" && key(&b, 0)["state"] == "available"
    });
    let sent = probes(&mock, &keys[0]);
    assert_eq!(
        sent.len(),
        2,
        "one failed probe and one that succeeded, not one per replica"
    );
    assert!(
        sent[1].received_at.duration_since(sent[0].received_at) >= Duration::from_millis(400),
        "the second probe came before the first one's backoff"
    );
    let deferred = |gw: &Gateway| {
        gw.logs()
            .contains("probe left to the replica that holds the key's lease")
    };
    assert!(deferred(&a) || deferred(&b), "no replica deferred to the other");
    let probed = log_lines(&a, "key probed").len() + log_lines(&b, "key probed").len();
    assert_eq!(probed, 2);
    a.assert_no_secret(&keys, &[]);
    b.assert_no_secret(&keys, &[]);
}

/// The OpenAI pool probes too, with its own key header, at its upstream.
#[test]
fn an_openai_key_comes_back_after_a_successful_probe() {
    let anthropic = MockServer::start();
    let openai = MockServer::start_openai();
    let keys = support::keys(1);
    let openai_keys: Vec<String> = (0..2)
        .map(|i| format!("sk-proj-limits{i}-{}", "Vb7Nm2Qw9Er".repeat(4)))
        .collect();
    openai.script(&openai_keys[0], [Reply::unauthorized()]);
    let gw = Gateway::start_env(
        &anthropic.url(),
        &keys,
        &["--openai-upstream", &openai.url(), "--probe-delay", "100ms"],
        &[("KEYPOOL_OPENAI_KEYS", &openai_keys.join(","))],
    );
    let (status, body) = gw.request(
        "POST",
        "/openai/v1/chat/completions",
        &[("content-type", "application/json")],
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let openai_key = |gw: &Gateway| {
        admin(gw)["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["pool"] == "openai")
            .cloned()
            .unwrap()
    };
    wait_for("the OpenAI key is probed and enabled", || {
        openai_key(&gw)["state"] == "available" && !probes(&openai, &openai_keys[0]).is_empty()
    });
    let sent = probes(&openai, &openai_keys[0]);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].headers["authorization"].to_str().unwrap(),
        format!("Bearer {}", openai_keys[0])
    );
    let probed = log_lines(&gw, "key probed");
    assert_eq!(probed.len(), 1);
    assert_eq!(probed[0]["fields"]["pool"], "openai");
    assert!(anthropic.requests().is_empty());
    let mut secrets = keys.clone();
    secrets.extend(openai_keys);
    gw.assert_no_secret(&secrets, &[]);
}
