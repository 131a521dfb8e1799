//! What an operator sees (SPEC §13, issue 20), at the real `keypool` binary in front of a
//! `keypool-mock` upstream: every request the gateway answers itself is logged once and counted
//! and carries a request id; the first-content 529 and 502 say what happened; key transitions
//! are logged both ways and attempts at debug level; identity headers stay with the gateway;
//! the admin routes take the token from a browser's Basic auth for reads only.
//!
//! No sleeps: every wait is for a log line or a state, bounded by a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use keypool_mock::{MockServer, Reply, RetryAfter, SseEvent, StreamScript};
use support::{ADMIN, Gateway, keys, message_body, parse_response};

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "client-token-operator-Zq81Lm";

/// A raw response: the status line as sent, the headers, the body.
struct Raw {
    status_line: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Writes `head` and `body` on a fresh connection and reads the answer to EOF.
fn raw(gw: &Gateway, head: &str, body: &[u8]) -> Raw {
    let mut s = gw.connect();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let status_line = String::from_utf8_lossy(&bytes)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let r = parse_response(&bytes).unwrap_or_else(|| panic!("no response to {head:?}: {bytes:?}"));
    Raw {
        status_line,
        status: r.status,
        headers: r.headers,
        body: String::from_utf8_lossy(&r.body).into_owned(),
    }
}

fn request(gw: &Gateway, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Raw {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    raw(gw, &head, body.as_bytes())
}

/// The log lines (JSON) of one target, as parsed objects.
fn lines_of(gw: &Gateway, target: &str) -> Vec<serde_json::Value> {
    gw.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == target)
        .collect()
}

/// The request log lines with this request id, once there is one (the support gateway hands a
/// line to `wait_log` before it adds it to `logs`, so this polls `logs` itself).
fn request_lines(gw: &Gateway, id: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines: Vec<_> = lines_of(gw, "keypool::request")
            .into_iter()
            .filter(|l| l["fields"]["request_id"] == id)
            .collect();
        if !lines.is_empty() {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no request line with {id}:\n{}",
            gw.logs()
        );
        std::thread::yield_now();
    }
}

/// The value of one sample in the Prometheus text, 0 when absent.
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn base64(input: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.as_bytes().chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// 401 (client token), 404 (`/`, `/v1`), 413, a malformed request and an admin 401: each is
/// logged once, with method, path, status, outcome and the request id its body and header
/// carry, and counted in `keypool_gateway_responses_total`.
#[test]
fn every_gateway_answered_status_is_logged_once_counted_and_carries_a_request_id() {
    let mock = MockServer::start();
    let keys = keys(1);
    let gw = Gateway::start(
        &mock.url(),
        &keys,
        &["--client-token", TOKEN, "--max-body", "1KiB"],
    );
    let big = "x".repeat(4096);
    type Case<'a> = (u16, &'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            401,
            "POST",
            "/v1/messages",
            vec![("x-api-key", "not-the-token")],
            "{}",
        ),
        (401, "POST", "/v1/messages", vec![], "{}"),
        (404, "GET", "/", vec![], ""),
        (404, "GET", "/v1", vec![("x-api-key", TOKEN)], ""),
        (413, "POST", "/v1/messages", vec![("x-api-key", TOKEN)], &big),
        (401, "GET", "/admin/keys", vec![], ""),
    ];
    for (status, method, path, headers, body) in &cases {
        let r = request(&gw, method, path, headers, body);
        assert_eq!(r.status, *status, "{method} {path}: {}", r.body);
        let json = r.json();
        let id = json["request_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no request_id in {json}"));
        assert!(id.starts_with("req_"), "{id}");
        assert_eq!(r.header("request-id"), Some(id), "{method} {path}");
        let lines = request_lines(&gw, id);
        assert_eq!(lines.len(), 1, "{method} {path}: {lines:?}");
        let f = &lines[0]["fields"];
        assert_eq!(f["status"], *status);
        assert_eq!(f["method"], *method);
        assert_eq!(f["path"], *path);
        assert_eq!(lines[0]["level"], "INFO");
        assert!(f["error"].is_string(), "{f}");
    }

    // A request hyper cannot parse never reaches a handler: hyper answers 400 and the gateway
    // logs and counts it when the connection ends.
    let r = raw(&gw, "GET / HTTP/1.1\r\nhost gw\r\n\r\n", b"");
    assert_eq!(r.status, 400, "{}", r.status_line);
    gw.wait_log(&["malformed request"], WAIT);

    let metrics = gw.admin_get("/metrics");
    let count = |route: &str, status: u16| {
        sample(
            &metrics,
            &format!("keypool_gateway_responses_total{{route=\"{route}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(count("api", 401), 2.0, "{metrics}");
    assert_eq!(count("unknown", 404), 2.0, "{metrics}");
    assert_eq!(count("api", 413), 1.0, "{metrics}");
    assert_eq!(count("admin", 401), 1.0, "{metrics}");
    assert_eq!(count("malformed", 400), 1.0, "{metrics}");
    assert_eq!(mock.request_count(), 0, "nothing reached the upstream");
    // The status page counts the API requests among them (not the admin one, not the one that
    // never parsed).
    let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/status")).unwrap();
    let sum = |series: &str| -> u64 {
        status["per_minute"][series]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum("requests"), 5, "{status}");
    assert_eq!(sum("client_429"), 0, "{status}");
    gw.assert_no_secret(&keys, &[TOKEN, ADMIN]);
}

/// Under `--commit first-content`, an early in-band `overloaded_error` is answered
/// `529 Overloaded` (not `529 <none>`) with the request id in its body and a log line that
/// names the status; a stream that ends after `message_start` says it ended before its first
/// content, not before its first event.
#[test]
fn first_content_529_and_502_say_what_happened() {
    let mock = MockServer::start();
    let keys = keys(1);
    let model = "claude-sonnet-4-5";
    let message_start = StreamScript::standard_events(model, 1).remove(0);
    assert_eq!(message_start.name(), Some("message_start"));
    mock.script(
        &keys[0],
        [
            Reply::stream(StreamScript::with_events(vec![
                message_start.clone(),
                SseEvent::error("overloaded_error", "Overloaded"),
            ])),
            Reply::stream(StreamScript::with_events(vec![message_start])),
        ],
    );
    let gw = Gateway::start(&mock.url(), &keys, &["--commit", "first-content"]);
    let body = message_body(true);
    let headers = [("content-type", "application/json")];

    let r = request(&gw, "POST", "/v1/messages", &headers, &body);
    assert_eq!(r.status_line, "HTTP/1.1 529 Overloaded");
    let json = r.json();
    assert_eq!(json["error"]["type"], "overloaded_error", "{json}");
    let id = json["request_id"].as_str().expect("request_id");
    assert_eq!(r.header("request-id"), Some(id));
    let line = request_lines(&gw, id).remove(0);
    assert_eq!(line["fields"]["status"], 529);
    let logs = gw.logs();
    assert!(!logs.contains("<unknown status code>"), "{logs}");
    let error = line["fields"]["error"].as_str().unwrap();
    assert!(
        error.contains("in-band error") && error.contains("529"),
        "{error}"
    );

    let r = request(&gw, "POST", "/v1/messages", &headers, &body);
    assert_eq!(r.status, 502, "{}", r.body);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("before its first content event"), "{message}");
    assert!(!message.contains("first event"), "{message}");
}

/// A 429 logs the key cooling and, once its retry-after is over, the cooldown ending (the
/// sweeper); a 401 and the operator's disable and enable log as transitions too; each attempt
/// that failed over has a debug line with the key, the status and the verdict; request lines
/// print latency_ms with at most three decimals.
#[test]
fn key_transitions_are_logged_both_ways_and_attempts_at_debug() {
    let mock = MockServer::start();
    let raw_keys = keys(2);
    let labelled = vec![format!("k0={}", raw_keys[0]), format!("k1={}", raw_keys[1])];
    mock.script(
        &raw_keys[0],
        [
            Reply::rate_limited(RetryAfter::Seconds("1".into())),
            Reply::unauthorized(),
        ],
    );
    let gw = Gateway::start(&mock.url(), &labelled, &[]);
    let started = Instant::now();
    let (status, _) = gw.message(false);
    assert_eq!(status, 200);
    gw.wait_log(&["attempt failed over", "\"key\":\"k0\"", "\"status\":429"], WAIT);
    gw.wait_log(&["key cooling", "\"key\":\"k0\"", "rate_limited"], WAIT);
    gw.wait_log(&["attempt answered", "\"key\":\"k1\"", "\"status\":200"], WAIT);
    // Nobody marks the key again: the end of its cooldown is noticed by the clock.
    gw.wait_log(&["key cooldown over", "\"key\":\"k0\""], WAIT);
    assert!(started.elapsed() >= Duration::from_millis(900), "ended early");

    let (status, _) = gw.message(false);
    assert_eq!(status, 200);
    gw.wait_log(
        &["key disabled", "\"key\":\"k0\"", "unauthorized", "\"status\":401"],
        WAIT,
    );

    let (status, _) = gw.request("POST", "/admin/keys/k1/disable", &[("x-api-key", ADMIN)], b"");
    assert_eq!(status, 200);
    gw.wait_log(&["key disabled", "\"key\":\"k1\"", "operator"], WAIT);
    let (status, _) = gw.request("POST", "/admin/keys/k1/enable", &[("x-api-key", ADMIN)], b"");
    assert_eq!(status, 200);
    gw.wait_log(&["key enabled", "\"key\":\"k1\"", "\"by\":\"operator\""], WAIT);

    for line in lines_of(&gw, "keypool::key") {
        let level = line["level"].as_str().unwrap();
        assert!(level == "INFO" || level == "WARN", "{line}");
    }
    for line in lines_of(&gw, "keypool::attempt") {
        assert_eq!(line["level"], "DEBUG", "{line}");
    }
    let metrics = gw.admin_get("/metrics");
    for (key, reason) in [
        ("k0", "rate_limited"),
        ("k0", "cooldown_over"),
        ("k0", "unauthorized"),
        ("k1", "operator"),
        ("k1", "enabled"),
    ] {
        let name =
            format!("keypool_key_transitions_total{{pool=\"anthropic\",key=\"{key}\",reason=\"{reason}\"}}");
        assert_eq!(sample(&metrics, &name), 1.0, "{name}\n{metrics}");
    }
    let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/status")).unwrap();
    let events: Vec<&str> = status["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["enabled", "disabled", "disabled", "cooldown_over", "cooling"],
        "newest first: {status}"
    );
    let sum = |series: &str| -> u64 {
        status["per_minute"][series]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (sum("requests"), sum("upstream_429"), sum("client_429")),
        (2, 1, 0),
        "{status}"
    );

    let mut seen = 0;
    for line in gw.logs().lines().filter(|l| l.contains("\"latency_ms\":")) {
        let value = line.split("\"latency_ms\":").nth(1).unwrap();
        let number: String = value
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 3, "latency_ms={number} in {line}");
        seen += 1;
    }
    assert!(seen >= 2);
    gw.assert_no_secret(&raw_keys, &[]);
}

/// The upstream's organisation and workspace headers identify the pool's owner: clients do not
/// see them unless the operator asks; the rate-limit headers always pass; the status view shows
/// the organisation to the admin.
#[test]
fn identity_headers_stay_with_the_gateway_unless_asked() {
    let mock = MockServer::start();
    let keys = keys(1);
    mock.set_fallback(
        Reply::ok()
            .header("anthropic-organization-id", "org-operator-test-1")
            .header("anthropic-workspace-id", "wrkspc-operator-test-1"),
    );
    let body = message_body(false);
    let headers = [("content-type", "application/json")];
    for (extra, passed) in [(&[][..], false), (&["--pass-identity-headers"][..], true)] {
        let gw = Gateway::start(&mock.url(), &keys, extra);
        let r = request(&gw, "POST", "/v1/messages", &headers, &body);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("anthropic-organization-id").is_some(),
            passed,
            "{extra:?}"
        );
        assert_eq!(r.header("anthropic-workspace-id").is_some(), passed, "{extra:?}");
        assert!(
            r.header("anthropic-ratelimit-requests-remaining").is_some(),
            "rate-limit headers pass: {:?}",
            r.headers
        );
        let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/status")).unwrap();
        assert_eq!(
            status["pools"][0]["keys"][0]["organisation"], "org-operator-test-1",
            "{status}"
        );
    }
}

/// A browser gets a Basic auth challenge for `/admin` and may answer it with any user name and
/// the admin token as the password, for reading; changing a key needs the token as `x-api-key`
/// or `Bearer` (a browser attaches Basic credentials to requests other sites make it send).
#[test]
fn admin_takes_basic_auth_from_browsers_for_reads_only() {
    let mock = MockServer::start();
    let keys = keys(2);
    let gw = Gateway::start(&mock.url(), &keys, &[]);
    let r = request(&gw, "GET", "/admin", &[], "");
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic realm=\"keypool\"")),
        "{:?}",
        r.headers
    );
    let basic = format!("Basic {}", base64(&format!("operator:{ADMIN}")));
    let wrong = format!("Basic {}", base64("operator:not-the-token"));
    let r = request(&gw, "GET", "/admin", &[("authorization", &wrong)], "");
    assert_eq!(r.status, 401);

    let r = request(&gw, "GET", "/admin", &[("authorization", &basic)], "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let csp = r.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert!(r.body.contains("/admin/status"));
    // The SVG namespace is a name, not an address the page loads.
    let page = r.body.replace("\"http://www.w3.org/2000/svg\"", "");
    for external in [
        "http://", "https://", "//cdn", "<link", "src=\"", "@import", "url(",
    ] {
        assert!(
            !page.contains(external),
            "the page loads nothing from elsewhere: {external}"
        );
    }

    let r = request(&gw, "GET", "/admin/status", &[("authorization", &basic)], "");
    assert_eq!(r.status, 200);
    let status = r.json();
    assert_eq!(
        status["pools"][0]["keys"].as_array().unwrap().len(),
        2,
        "{status}"
    );
    let label = status["pools"][0]["keys"][0]["label"]
        .as_str()
        .unwrap()
        .to_owned();

    let path = format!("/admin/keys/{label}/disable");
    let r = request(&gw, "POST", &path, &[("authorization", &basic)], "");
    assert_eq!(r.status, 401, "Basic auth does not change keys");
    let bearer = format!("Bearer {ADMIN}");
    let r = request(&gw, "POST", &path, &[("authorization", &bearer)], "");
    assert_eq!(r.status, 200, "{}", r.body);
    gw.assert_no_secret(&keys, &[r.body.as_str()]);
}

/// A rate limit of a key whose organisation is known cools every key of that organisation for
/// the request's model family: one upstream answer, counted once and logged as one attempt,
/// however many keys it marks; the status view shows each of them cooling for one model family.
#[test]
fn an_organisation_wide_limit_is_one_upstream_answer() {
    let mock = MockServer::start();
    let raw_keys = keys(2);
    let labelled = vec![format!("k0={}", raw_keys[0]), format!("k1={}", raw_keys[1])];
    let org = ("anthropic-organization-id", "org-shared-operator-1");
    for k in &raw_keys {
        mock.set_default(k, Reply::ok().header(org.0, org.1));
        mock.script(
            k,
            [
                Reply::ok().header(org.0, org.1),
                Reply::rate_limited(RetryAfter::Seconds("30".into())).header(org.0, org.1),
            ],
        );
    }
    let gw = Gateway::start(&mock.url(), &labelled, &["--order", "round-robin"]);
    // Each key answers once, so the pool knows both belong to the organisation.
    assert_eq!(gw.message(false).0, 200);
    assert_eq!(gw.message(false).0, 200);
    // The next key's 429 cools both for the family: nothing is left to try.
    let (status, body) = gw.message(false);
    assert_eq!(status, 429, "{body}");
    assert_eq!(mock.request_count(), 3);
    gw.wait_log(&["key marked with the organisation of the attempted key"], WAIT);
    let metrics = gw.admin_get("/metrics");
    assert_eq!(
        sample(&metrics, "keypool_upstream_responses_total{status=\"429\"}"),
        1.0,
        "{metrics}"
    );
    let status: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/status")).unwrap();
    for k in status["pools"][0]["keys"].as_array().unwrap() {
        assert_eq!(k["state"], "cooling", "{status}");
        assert_eq!(k["cooling_scope"], "model_family", "{status}");
        assert_eq!(k["organisation"], org.1, "{status}");
    }
    let sum = |series: &str| -> u64 {
        status["per_minute"][series]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (sum("requests"), sum("upstream_429"), sum("client_429")),
        (3, 1, 1),
        "{status}"
    );
}
