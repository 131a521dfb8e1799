//! The OpenAI profile drives the call (SPEC §12): classification, retry delays, both stream APIs,
//! the commit point, and keypool's own errors in OpenAI's shapes. Simulated time throughout.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use keypool_core::call::{
    CallConfig, CallError, CommitPoint, Credential, Request, StreamBreak, TransportError,
};
use keypool_core::profile::Profile;
use keypool_core::{CoolReason, DisableReason, KeyState, Secret};
use support::*;

fn openai() -> CallConfig {
    CallConfig::default().with_profile(Profile::openai())
}

fn request(path: &'static str, stream: bool) -> Request {
    let body = format!(r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[]}}"#);
    let mut r = Request::post_json_for(&Profile::openai(), path, body);
    r.headers
        .insert("authorization", "Bearer client-token-abcdefgh".parse().unwrap());
    r.headers.insert("api-key", "client-azure-key".parse().unwrap());
    r.headers.insert("openai-beta", "assistants=v2".parse().unwrap());
    r
}

fn chat(stream: bool) -> Request {
    request("/v1/chat/completions", stream)
}

fn run(sim: &mut Sim, req: Request, config: &CallConfig) -> Outcome {
    let cred = Credential::Pool(sim.pool.clone());
    sim.run_with(req, cred, config)
}

fn error(status: u16, headers: &[(&'static str, &str)], kind: &str, code: &str, message: &str) -> Vec<Step> {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let mut h = headers.to_vec();
    h.push(("content-type", "application/json"));
    vec![head_h(status, &h), body_json(&body), Step::End]
}

fn body_json(v: &serde_json::Value) -> Step {
    body(&v.to_string())
}

fn cooling_for(sim: &Sim, k: usize) -> Duration {
    let id = sim.pool.key_at(k).unwrap();
    match sim.pool.state(id, sim.now) {
        KeyState::Cooling { until, reason } => {
            assert_eq!(reason, CoolReason::RateLimited);
            until - sim.now
        }
        other => panic!("key {k} is {other:?}"),
    }
}

const ROLE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
const CONTENT: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
const DONE: &str = "data: [DONE]\n\n";
const CREATED: &str =
    "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0}\n\n";
const IN_PROGRESS: &str =
    "event: response.in_progress\ndata: {\"type\":\"response.in_progress\",\"sequence_number\":1}\n\n";
const ITEM_ADDED: &str = "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"sequence_number\":2}\n\n";
const TEXT_DELTA: &str = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\",\"sequence_number\":3}\n\n";
const COMPLETED: &str =
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":4}\n\n";

#[test]
fn the_key_goes_in_a_bearer_header_and_client_credentials_are_stripped() {
    let mut sim = Sim::new(1);
    let out = run(&mut sim, chat(false), &openai());
    let sent = &out.sent[0].headers;
    let key = sim.pool.secret(out.sent[0].key.unwrap()).expose().to_owned();
    assert_eq!(sent["authorization"], format!("Bearer {key}").as_str());
    assert!(sent["authorization"].is_sensitive());
    assert!(!sent.contains_key("api-key") && !sent.contains_key("anthropic-version"));
    assert_eq!(sent["openai-beta"], "assistants=v2");

    let azure = CallConfig::default().with_profile(Profile::azure_openai());
    let mut sim = Sim::new(1);
    let out = run(&mut sim, chat(false), &azure);
    let sent = &out.sent[0].headers;
    let key = sim.pool.secret(out.sent[0].key.unwrap()).expose().to_owned();
    assert_eq!(sent["api-key"], key.as_str());
    assert!(!sent.contains_key("authorization"));
}

#[test]
fn a_rate_limit_cools_for_each_delay_form_and_fails_over() {
    let secs = Duration::from_secs;
    let limited = "Rate limit reached for gpt-4o-mini in organization org-test on requests per min (RPM): Limit 3, Used 3, Requested 1.";
    type Case = (Vec<(&'static str, &'static str)>, String, Duration);
    let cases: Vec<Case> = vec![
        (
            vec![("retry-after-ms", "1500")],
            limited.into(),
            Duration::from_millis(1500),
        ),
        (vec![("retry-after", "7")], limited.into(), secs(7)),
        (
            vec![
                ("retry-after", "Thu, 01 Jan 2026 00:00:30 GMT"),
                ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ],
            limited.into(),
            secs(30),
        ),
        (
            vec![
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "6m0s"),
            ],
            limited.into(),
            secs(360),
        ),
        (
            vec![
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "2m3.5s"),
            ],
            limited.into(),
            Duration::from_millis(123_500),
        ),
        (
            vec![],
            format!("{limited} Please try again in 10.666s."),
            Duration::from_millis(10_666),
        ),
        (
            vec![],
            format!("{limited} Please try again in 20ms."),
            Duration::from_millis(20),
        ),
        (vec![("retry-after", "garbage")], limited.into(), secs(60)),
    ];
    for (headers, message, want) in cases {
        let mut sim = Sim::new(2);
        sim.script(
            0,
            vec![error(429, &headers, "requests", "rate_limit_exceeded", &message)],
        );
        let out = run(&mut sim, chat(false), &openai());
        assert_eq!(
            (out.keys(), out.status()),
            (vec![Some(0), Some(1)], 200),
            "{headers:?}"
        );
        assert_eq!(cooling_for(&sim, 0), want, "{headers:?} {message}");
        assert_eq!(out.marks.len(), 1);
        assert_eq!(out.marks[0].status.as_u16(), 429);
    }
}

#[test]
fn request_too_large_is_delivered_without_failover() {
    let mut sim = Sim::new(2);
    let message = "Request too large for gpt-4o in organization org-test on tokens per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced in order to run successfully.";
    sim.script(
        0,
        vec![error(
            429,
            &[
                ("x-ratelimit-remaining-tokens", "30000"),
                ("x-ratelimit-reset-tokens", "0s"),
            ],
            "tokens",
            "rate_limit_exceeded",
            message,
        )],
    );
    let out = run(&mut sim, chat(false), &openai());
    assert_eq!((out.keys(), out.status()), (vec![Some(0)], 429));
    assert!(out.body_str().contains("Request too large"));
    assert!(out.marks.is_empty());
    assert!(
        sim.pool
            .state(sim.pool.key_at(0).unwrap(), sim.now)
            .is_available()
    );
}

#[test]
fn insufficient_quota_disables_for_billing() {
    for code in [
        "insufficient_quota",
        "credit_balance_exhausted",
        "project_spend_limit_exceeded",
    ] {
        let mut sim = Sim::new(2);
        sim.script(
            0,
            vec![error(
                429,
                &[],
                "insufficient_quota",
                code,
                "You exceeded your current quota, please check your plan and billing details.",
            )],
        );
        let out = run(&mut sim, chat(false), &openai());
        assert_eq!(
            (out.keys(), out.status()),
            (vec![Some(0), Some(1)], 200),
            "{code}"
        );
        assert_eq!(
            sim.pool.state(sim.pool.key_at(0).unwrap(), sim.now),
            KeyState::Disabled {
                reason: DisableReason::Billing
            }
        );
    }
}

#[test]
fn a_missing_scope_is_delivered_and_the_key_stays_available() {
    let mut sim = Sim::new(2);
    let message = "You have insufficient permissions for this operation. Missing scopes: api.responses.write. Check that you have the correct role in your organization.";
    sim.script(0, vec![error(401, &[], "invalid_request_error", "", message)]);
    let out = run(&mut sim, request("/v1/responses", false), &openai());
    assert_eq!((out.keys(), out.status()), (vec![Some(0)], 401));
    assert!(
        sim.pool
            .state(sim.pool.key_at(0).unwrap(), sim.now)
            .is_available()
    );

    // Any other 401 disables the key.
    let mut sim = Sim::new(2);
    sim.script(
        0,
        vec![error(
            401,
            &[],
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided: sk-proj-****abcd.",
        )],
    );
    let out = run(&mut sim, chat(false), &openai());
    assert_eq!((out.keys(), out.status()), (vec![Some(0), Some(1)], 200));
    assert_eq!(
        sim.pool.state(sim.pool.key_at(0).unwrap(), sim.now),
        KeyState::Disabled {
            reason: DisableReason::Unauthorized
        }
    );
}

#[test]
fn forbidden_and_server_errors_are_delivered() {
    for status in [403, 500, 503] {
        let mut sim = Sim::new(2);
        sim.script(0, vec![error(status, &[], "invalid_request_error", "", "nope")]);
        let out = run(&mut sim, chat(false), &openai());
        assert_eq!((out.keys(), out.status()), (vec![Some(0)], status));
        assert!(out.marks.is_empty());
    }
}

#[test]
fn exhaustion_is_an_openai_shaped_429_with_the_three_headers() {
    let mut sim = Sim::new(2);
    sim.script(
        0,
        vec![error(
            429,
            &[("retry-after", "5")],
            "requests",
            "rate_limit_exceeded",
            "x",
        )],
    );
    sim.script(
        1,
        vec![error(
            429,
            &[("retry-after-ms", "2500")],
            "tokens",
            "rate_limit_exceeded",
            "x",
        )],
    );
    let out = run(&mut sim, chat(false), &openai());
    assert_eq!(out.status(), 429);
    let json = out.fail_json();
    assert_eq!(json["error"]["code"], "rate_limit_exceeded");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 configured keys")
    );
    assert!(json["error"]["param"].is_null());
    assert!(json.get("type").is_none());
    assert_eq!(out.fail_header("retry-after").as_deref(), Some("3"));
    assert_eq!(out.fail_header("retry-after-ms").as_deref(), Some("2500"));
    assert_eq!(out.fail_header("x-should-retry").as_deref(), Some("true"));
    assert_eq!(out.fail_header("x-request-id").as_deref(), Some("req_test"));

    // Every key disabled: 502 with x-should-retry: false.
    let mut sim = Sim::new(1);
    sim.script(
        0,
        vec![error(
            401,
            &[],
            "invalid_request_error",
            "invalid_api_key",
            "bad key",
        )],
    );
    let out = run(&mut sim, chat(false), &openai());
    assert_eq!(out.status(), 502);
    assert_eq!(out.fail_json()["error"]["type"], "server_error");
    assert_eq!(out.fail_header("x-should-retry").as_deref(), Some("false"));
}

#[test]
fn chat_streams_end_cleanly_at_done_and_break_into_an_error_chunk() {
    let stream = [ROLE, CONTENT, DONE].concat();
    let mut sim = Sim::new(1);
    sim.script(0, vec![vec![sse_head(), body(&stream), Step::End]]);
    let out = run(&mut sim, chat(true), &openai());
    assert!(out.abort.is_none(), "{:?}", out.abort);
    assert_eq!(out.body_str(), stream);

    for end in [Step::End, Step::Err(TransportError::Reset)] {
        let mut sim = Sim::new(1);
        sim.script(0, vec![vec![sse_head(), body(&[ROLE, CONTENT].concat()), end]]);
        let out = run(&mut sim, chat(true), &openai());
        assert!(out.abort.is_some());
        let body = out.body_str();
        let tail = body.strip_prefix(&[ROLE, CONTENT].concat()).unwrap();
        assert!(tail.starts_with("data: {\"error\":{\"message\":"), "{tail}");
        assert!(tail.ends_with("}\n\n") && !tail.contains("event:"), "{tail}");
    }
}

#[test]
fn responses_streams_end_cleanly_at_completed_and_break_into_an_error_event() {
    let stream = [CREATED, IN_PROGRESS, ITEM_ADDED, TEXT_DELTA, COMPLETED].concat();
    let mut sim = Sim::new(1);
    sim.script(0, vec![vec![sse_head(), body(&stream), Step::End]]);
    let out = run(&mut sim, request("/v1/responses", true), &openai());
    assert!(out.abort.is_none(), "{:?}", out.abort);
    assert_eq!(out.body_str(), stream);

    let partial = [CREATED, IN_PROGRESS, ITEM_ADDED, TEXT_DELTA].concat();
    let mut sim = Sim::new(1);
    sim.script(
        0,
        vec![vec![sse_head(), body(&partial), Step::Err(TransportError::Reset)]],
    );
    // The stream decides, not the path: a Responses stream on an odd path still gets its shape.
    let out = run(&mut sim, request("/v1/some/proxy/path", true), &openai());
    let abort = out.abort.clone().unwrap();
    assert_eq!(
        abort.error,
        CallError::StreamBroken(StreamBreak::Transport(TransportError::Reset))
    );
    let tail = out.body_str().strip_prefix(&partial).unwrap().to_owned();
    assert!(tail.starts_with("event: error\ndata: {"), "{tail}");
    let data: serde_json::Value =
        serde_json::from_str(tail["event: error\ndata: ".len()..].trim_end()).unwrap();
    assert_eq!(data["type"], "error");
    assert!(data["message"].as_str().unwrap().contains("reset"));
}

#[test]
fn a_stream_that_broke_before_any_event_is_shaped_by_the_request_path() {
    // First-content mode: the hold timer commits a stream that sent nothing; it then ends.
    let config = openai().with_commit(CommitPoint::FirstContent {
        hold: Duration::from_millis(100),
    });
    for (path, shape) in [
        ("/v1/responses", "event: error\ndata: {"),
        ("/v1/chat/completions", "data: {\"error\":"),
    ] {
        let mut sim = Sim::new(1);
        sim.script(
            0,
            vec![vec![
                sse_head(),
                Step::Advance(Duration::from_millis(200)),
                Step::End,
            ]],
        );
        let out = run(&mut sim, request(path, true), &config);
        assert!(out.abort.is_some(), "{path}");
        assert!(out.body_str().starts_with(shape), "{path}: {}", out.body_str());
    }
}

#[test]
fn streams_fail_over_before_commit_on_an_in_band_rate_limit() {
    let config = openai().with_commit(CommitPoint::first_content());
    let chat_error = "data: {\"error\":{\"message\":\"Rate limit reached. Please try again in 3s.\",\"type\":\"requests\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}\n\n";
    let mut sim = Sim::new(2);
    sim.script(
        0,
        vec![vec![sse_head(), body(&[ROLE, chat_error].concat()), Step::End]],
    );
    sim.script(
        1,
        vec![vec![sse_head(), body(&[ROLE, CONTENT, DONE].concat()), Step::End]],
    );
    let out = run(&mut sim, chat(true), &config);
    assert_eq!(out.keys(), vec![Some(0), Some(1)]);
    assert_eq!(out.body_str(), [ROLE, CONTENT, DONE].concat());
    assert_eq!(cooling_for(&sim, 0), Duration::from_secs(3));

    let responses_error = "event: error\ndata: {\"type\":\"error\",\"code\":\"rate_limit_exceeded\",\"message\":\"Rate limit reached. Please try again in 4s.\",\"param\":null,\"sequence_number\":2}\n\n";
    let good = [CREATED, IN_PROGRESS, ITEM_ADDED, TEXT_DELTA, COMPLETED].concat();
    let mut sim = Sim::new(2);
    sim.script(
        0,
        vec![vec![
            sse_head(),
            body(&[CREATED, IN_PROGRESS, responses_error].concat()),
            Step::End,
        ]],
    );
    sim.script(1, vec![vec![sse_head(), body(&good), Step::End]]);
    let out = run(&mut sim, request("/v1/responses", true), &config);
    assert_eq!(out.keys(), vec![Some(0), Some(1)]);
    assert_eq!(out.body_str(), good);
    assert_eq!(cooling_for(&sim, 0), Duration::from_secs(4));

    // An in-band server error before content is delivered as an HTTP error in OpenAI's shape.
    let mut sim = Sim::new(2);
    let server = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"param\":null}\n\n";
    sim.script(
        0,
        vec![vec![sse_head(), body(&[CREATED, server].concat()), Step::End]],
    );
    let out = run(&mut sim, request("/v1/responses", true), &config);
    assert_eq!((out.keys(), out.status()), (vec![Some(0)], 500));
    assert!(out.fail_json()["error"]["message"].is_string());
}

#[test]
fn byok_sends_the_callers_key_once_as_bearer() {
    let mut sim = Sim::new(2);
    sim.script_byok(vec![error(
        429,
        &[("retry-after", "5")],
        "requests",
        "rate_limit_exceeded",
        "x",
    )]);
    let own = Secret::new("sk-proj-own-key-0123456789").unwrap();
    let out = sim.run_with(chat(false), Credential::Key(own), &openai());
    assert_eq!((out.sent.len(), out.status()), (1, 429));
    assert_eq!(
        out.sent[0].headers["authorization"],
        "Bearer sk-proj-own-key-0123456789"
    );
    assert!(out.marks.is_empty());
}

#[test]
fn a_builder_takes_the_profile_and_its_default_base_url() {
    use keypool_core::client::{ClientAdapter, ClientBuilder, ClientError, ClientSettings};

    #[derive(Debug)]
    struct Fake(ClientSettings);
    impl ClientAdapter for Fake {
        fn now() -> std::time::Instant {
            std::time::Instant::now()
        }
        fn from_settings(settings: ClientSettings) -> Result<Self, ClientError> {
            Ok(Self(settings))
        }
    }
    let keys = ["sk-proj-first-key-0123456789", "sk-proj-second-key-0123456789"];
    let built = ClientBuilder::<Fake>::default()
        .keys(keys)
        .profile(Profile::openai())
        .build()
        .unwrap();
    assert_eq!(built.0.config.profile.name(), "openai");
    assert_eq!(built.0.upstream.host(), "api.openai.com");
    let azure = ClientBuilder::<Fake>::default()
        .keys(keys)
        .profile(Profile::azure_openai())
        .build()
        .unwrap_err();
    assert!(azure.to_string().contains("base_url"), "{azure}");
    let azure = ClientBuilder::<Fake>::default()
        .keys(keys)
        .profile(Profile::azure_openai())
        .base_url("https://my-resource.openai.azure.com/openai")
        .build()
        .unwrap();
    assert_eq!(azure.0.upstream.prefix(), "/openai");
}

/// A 200 that names the key's organisation.
fn ok_from(org: &str) -> Vec<Step> {
    vec![
        head_h(
            200,
            &[("content-type", "application/json"), ("openai-organization", org)],
        ),
        body("{}"),
        Step::End,
    ]
}

fn ask(model: &str) -> Request {
    request_for(model)
}

fn request_for(model: &str) -> Request {
    let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
    Request::post_json_for(&Profile::openai(), "/v1/chat/completions", body)
}

/// Keys 0..n answer once each with their organisation, so the pool knows them.
fn introduce(sim: &mut Sim, orgs: &[&str]) {
    for (k, org) in orgs.iter().enumerate() {
        for earlier in 0..k {
            let id = sim.pool.key_at(earlier).unwrap();
            let _ = sim
                .pool
                .cool_down(id, sim.now, Duration::from_millis(1), CoolReason::Auth);
        }
        sim.script(k, vec![ok_from(org)]);
        let out = run(sim, ask("gpt-4o-mini"), &openai());
        assert_eq!(out.keys().last().copied(), Some(Some(k)));
        sim.advance(Duration::from_millis(2));
    }
}

#[test]
fn organisations_scope_rate_limits_per_model_and_billing_disables() {
    let mut sim = Sim::new(3);
    introduce(&mut sim, &["org-a", "org-a", "org-b"]);
    assert_eq!(
        sim.pool
            .scope(sim.pool.key_at(0).unwrap())
            .map(|s| s.organisation.to_string()),
        Some("org-a".to_owned())
    );
    // A 429 on gpt-4o cools org-a for gpt-4o: k1 is skipped, k2 answers.
    sim.script(
        0,
        vec![error(
            429,
            &[("retry-after", "30"), ("openai-organization", "org-a")],
            "tokens",
            "rate_limit_exceeded",
            "slow down",
        )],
    );
    let out = run(&mut sim, ask("gpt-4o"), &openai());
    assert_eq!(out.keys(), vec![Some(0), Some(2)]);
    // Another model (the family is the model id, gpt-4o-mini is not gpt-4o) still uses k0.
    assert_eq!(run(&mut sim, ask("gpt-4o-mini"), &openai()).keys(), vec![Some(0)]);
    assert_eq!(run(&mut sim, ask("gpt-4o"), &openai()).keys(), vec![Some(2)]);

    // An empty wallet disables the whole organisation for billing.
    sim.script(
        0,
        vec![error(
            429,
            &[("openai-organization", "org-a")],
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota",
        )],
    );
    let out = run(&mut sim, ask("gpt-4o-mini"), &openai());
    assert_eq!(out.keys(), vec![Some(0), Some(2)]);
    for k in [0, 1] {
        assert_eq!(
            sim.pool.state(sim.pool.key_at(k).unwrap(), sim.now),
            KeyState::Disabled {
                reason: DisableReason::Billing
            },
            "key {k}"
        );
    }
}

#[test]
fn identity_and_hints_come_from_openai_headers() {
    let p = Profile::openai();
    let mut h = http::HeaderMap::new();
    h.insert("openai-organization", "org-x".parse().unwrap());
    h.insert("openai-project", "proj_1".parse().unwrap());
    assert_eq!(p.scope(&h), Some(("org-x", Some("proj_1"))));
    assert_eq!(p.model_family("gpt-4o-2024-08-06"), "gpt-4o-2024-08-06");
    let names: Vec<&str> = p.identity_headers().iter().map(|n| n.as_str()).collect();
    assert_eq!(names, ["openai-organization", "openai-project"]);
    h.insert("x-ratelimit-remaining-tokens", "0".parse().unwrap());
    h.insert("x-ratelimit-reset-tokens", "1m30s".parse().unwrap());
    h.insert("x-ratelimit-remaining-requests", "7".parse().unwrap());
    h.insert("x-ratelimit-reset-requests", "2h".parse().unwrap());
    assert_eq!(
        p.exhaustion_hint(&h, std::time::SystemTime::UNIX_EPOCH),
        Some(Duration::from_secs(90))
    );
    let body = br#"{"error":{"message":"x","type":"insufficient_quota","param":null,"code":"project_spend_limit_exceeded"}}"#;
    assert_eq!(
        p.error_code(body),
        (
            Some("insufficient_quota".to_owned()),
            Some("project_spend_limit_exceeded".to_owned())
        )
    );
    assert_eq!(p.error_code(b"nope"), (None, None));
    assert_eq!(p.probe_path(), "/v1/models");
}
