//! What the mock says about limits (SPEC §11): organisations and workspaces per key, rate-limit
//! headers, the spend cap, the usage-limit 400, the probe endpoint and revoked keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{MESSAGE, call};
use keypool_mock::{
    Dimension, KeyScript, MockServer, RateLimit, Reply, RetryAfter, SPEND_LIMIT_CODE, Scenario, openai,
    usage_limit_message,
};

fn json(b: &common::BodyRead) -> serde_json::Value {
    serde_json::from_slice(&b.bytes()).unwrap()
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SSZ`, strictly.
fn parse_rfc3339(s: &str) -> SystemTime {
    assert_eq!(s.len(), 20, "{s:?}");
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    assert_eq!(
        (&s[4..5], &s[7..8], &s[10..11], &s[19..]),
        ("-", "-", "T", "Z"),
        "{s:?}"
    );
    let days = days_from_civil(n(0..4), n(5..7), n(8..10));
    let secs = days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19);
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
}

#[test]
fn answers_name_the_keys_organisation_and_workspace() {
    let mock = MockServer::start();
    mock.set_organization("k1", "org-a", Some("ws-1"));
    mock.set_organization("k2", "org-a", None);
    mock.script("k1", [Reply::rate_limited(RetryAfter::Seconds("5".into()))]);
    // Every answer to the key names it: a 429, a 200, a model list, even a 404.
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k1"), MESSAGE);
    assert_eq!(h.status, 429);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-a"));
    assert_eq!(h.header("anthropic-workspace-id"), Some("ws-1"));
    for (method, path) in [
        ("POST", "/v1/messages"),
        ("GET", "/v1/models"),
        ("GET", "/v1/nope"),
    ] {
        let (h, _) = call(&mock, method, path, Some("k1"), MESSAGE);
        assert_eq!(h.header("anthropic-organization-id"), Some("org-a"), "{path}");
    }
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k2"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-a"));
    assert_eq!(h.header("anthropic-workspace-id"), None);
    // No organisation unless scripted.
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k3"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), None);
    // A reply can name another one, with or without the key's.
    mock.script("k1", [Reply::ok().organization("org-z").workspace("ws-z")]);
    mock.script("k3", [Reply::ok().organization("org-y")]);
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k1"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-z"));
    assert_eq!(h.header("anthropic-workspace-id"), Some("ws-z"));
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k3"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-y"));
    // Even without the automatic headers; an explicit header still wins.
    mock.script(
        "k1",
        [
            Reply::ok().without_auto_headers(),
            Reply::ok().header("anthropic-organization-id", "org-raw"),
        ],
    );
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k1"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-a"));
    assert_eq!(h.header("request-id"), None);
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k1"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-raw"));
    mock.clear_organization("k1");
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k1"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), None);
    assert_eq!(h.header("anthropic-workspace-id"), None);
}

#[test]
fn openai_mode_names_organisation_and_project() {
    let mock = MockServer::start_openai();
    mock.set_organization("sk-a", "org-a", Some("proj_1"));
    let chat = r#"{"model":"gpt-test","messages":[]}"#;
    let (h, _) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), chat);
    assert_eq!(h.header("openai-organization"), Some("org-a"));
    assert_eq!(h.header("openai-project"), Some("proj_1"));
    assert_eq!(h.header("anthropic-organization-id"), None);
    // The old way still works: a reply's own header.
    mock.script(
        "sk-b",
        [openai::insufficient_quota().header("openai-organization", "org-b")],
    );
    let (h, _) = call(&mock, "POST", "/v1/chat/completions", Some("sk-b"), chat);
    assert_eq!((h.status, h.header("openai-organization")), (429, Some("org-b")));
    // Scripted rate limits in OpenAI's form: Go-duration resets, requests and tokens only.
    mock.script(
        "sk-a",
        [Reply::ok()
            .exhausted(Dimension::Tokens, Duration::from_secs(30))
            .exhausted(Dimension::InputTokens, Duration::from_secs(30))],
    );
    let (h, _) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), chat);
    assert_eq!(h.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(h.header("x-ratelimit-reset-tokens"), Some("30s"));
    assert_eq!(h.header("x-ratelimit-remaining-requests"), Some("4999"));
    assert!(h.headers.iter().all(|(k, _)| !k.contains("input")), "{h:?}");
}

#[test]
fn rate_limit_headers_are_scriptable() {
    let mock = MockServer::start();
    let before = SystemTime::now();
    mock.script(
        "k",
        [
            Reply::ok().exhausted(Dimension::Tokens, Duration::from_secs(30)),
            Reply::ok().without_auto_headers().rate_limit(RateLimit {
                limit: Some(50),
                ..RateLimit::new(Dimension::Requests, 7, Duration::from_secs(5))
            }),
        ],
    );
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    let after = SystemTime::now();
    assert_eq!(h.header("anthropic-ratelimit-tokens-remaining"), Some("0"));
    assert_eq!(h.header("anthropic-ratelimit-tokens-limit"), Some("400000"));
    let reset = parse_rfc3339(h.header("anthropic-ratelimit-tokens-reset").unwrap());
    // Whole seconds, truncated.
    assert!(
        reset + Duration::from_secs(1) > before + Duration::from_secs(30),
        "{reset:?}"
    );
    assert!(reset <= after + Duration::from_secs(30), "{reset:?}");
    // The other dimensions keep their automatic values (never exhausted on a 200).
    assert_eq!(h.header("anthropic-ratelimit-requests-remaining"), Some("3999"));
    assert_eq!(
        h.header("anthropic-ratelimit-output-tokens-remaining"),
        Some("79999")
    );
    // Without the automatic headers: only what was scripted.
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert_eq!(h.header("anthropic-ratelimit-requests-remaining"), Some("7"));
    assert_eq!(h.header("anthropic-ratelimit-requests-limit"), Some("50"));
    assert!(h.header("anthropic-ratelimit-requests-reset").is_some());
    assert_eq!(h.header("anthropic-ratelimit-tokens-remaining"), None);
    // A later one of the same dimension replaces an earlier one.
    let r = Reply::ok()
        .exhausted(Dimension::Tokens, Duration::from_secs(30))
        .rate_limit(RateLimit::new(Dimension::Tokens, 9, Duration::from_secs(1)));
    assert_eq!(
        r.rate_limits,
        [RateLimit::new(Dimension::Tokens, 9, Duration::from_secs(1))]
    );
}

#[test]
fn spend_cap_and_usage_limit_replies() {
    let mock = MockServer::start();
    mock.set_organization("k", "org-a", None);
    let regain = UNIX_EPOCH + Duration::from_secs(1_800_403_200 + 3_599); // 2027-01-20T00:59:59Z
    mock.script("k", [Reply::spend_capped(), Reply::usage_limited(regain)]);
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert_eq!(h.status, 429);
    assert_eq!(h.header("retry-after"), None);
    assert_eq!(h.header("retry-after-ms"), None);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-a"));
    let v = json(&b);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["details"]["error_code"], SPEND_LIMIT_CODE);
    assert!(v["request_id"].as_str().unwrap().starts_with("req_mock_"));
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert_eq!(h.status, 400);
    let v = json(&b);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "You have reached your specified API usage limits. You will regain access on 2027-01-20 at 00:59 UTC."
    );
    assert_eq!(v["error"]["message"], usage_limit_message(regain).as_str());
    // Other Anthropic errors carry no details.
    mock.script("k", [Reply::overloaded()]);
    let (_, b) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert!(json(&b)["error"].get("details").is_none());
}

#[test]
fn probes_and_revoked_keys() {
    let mock = MockServer::start();
    mock.set_organization("k", "org-a", None);
    // The probe keypool sends for a disabled key: one model, 200.
    let (h, b) = call(&mock, "GET", "/v1/models?limit=1", Some("k"), "");
    assert_eq!(h.status, 200);
    let v = json(&b);
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["has_more"], true);
    assert_eq!(v["first_id"], v["last_id"]);
    let (_, b) = call(&mock, "GET", "/v1/models?after_id=x&limit=20", Some("k"), "");
    assert_eq!(json(&b)["data"].as_array().unwrap().len(), 2);
    assert_eq!(json(&b)["has_more"], false);
    // Revoked: 401 everywhere, no organisation, the script waits.
    mock.script("k", [Reply::overloaded()]);
    mock.revoke("k");
    for (method, path, body) in [
        ("GET", "/v1/models?limit=1", ""),
        ("POST", "/v1/messages", MESSAGE),
    ] {
        let (h, b) = call(&mock, method, path, Some("k"), body);
        assert_eq!(h.status, 401, "{path}");
        assert_eq!(json(&b)["error"]["type"], "authentication_error");
        assert_eq!(h.header("anthropic-organization-id"), None);
    }
    mock.restore("k");
    assert_eq!(
        call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE).0.status,
        529
    );
    let (h, _) = call(&mock, "GET", "/v1/models?limit=1", Some("k"), "");
    assert_eq!(
        (h.status, h.header("anthropic-organization-id")),
        (200, Some("org-a"))
    );
    let paths: Vec<String> = mock.requests_for("k").iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths[0], "/v1/models?limit=1");
    // OpenAI mode: OpenAI's invalid_api_key.
    let mock = MockServer::start_openai();
    mock.revoke("sk-a");
    let (h, b) = call(&mock, "GET", "/v1/models", Some("sk-a"), "");
    assert_eq!(h.status, 401);
    assert_eq!(json(&b)["error"]["code"], "invalid_api_key");
}

#[test]
fn limits_load_from_a_scenario_file() {
    let text = r#"
        [keys.k1]
        organization = "org-a"
        workspace = "ws-1"
        script = [
            { rate_limits = [{ dimension = "tokens", remaining = 0, reset_in_secs = 30 }] },
            { status = 429, body = { type = "error", error_type = "rate_limit_error", code = "enforced_spend_limit_reached" } },
            { organization = "org-b", rate_limits = [{ dimension = "input_tokens", limit = 10, remaining = 1, reset_in_secs = 2 }] },
        ]

        [keys.k2]
        revoked = true
    "#;
    let scenario: Scenario = toml::from_str(text).unwrap();
    assert_eq!(
        scenario.keys["k2"],
        KeyScript {
            revoked: true,
            ..KeyScript::default()
        }
    );
    let back: Scenario = toml::from_str(&toml::to_string(&scenario).unwrap()).unwrap();
    assert_eq!(back, scenario);
    let mock = MockServer::start_with(scenario);
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k1"), MESSAGE);
    assert_eq!(h.header("anthropic-ratelimit-tokens-remaining"), Some("0"));
    assert_eq!(h.header("anthropic-workspace-id"), Some("ws-1"));
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("k1"), MESSAGE);
    assert_eq!(h.status, 429);
    assert_eq!(json(&b)["error"]["details"]["error_code"], SPEND_LIMIT_CODE);
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("k1"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-b"));
    assert_eq!(h.header("anthropic-ratelimit-input-tokens-limit"), Some("10"));
    assert_eq!(
        call(&mock, "GET", "/v1/models?limit=1", Some("k2"), "").0.status,
        401
    );
}
