//! The mock's OpenAI mode through a raw HTTP/1.1 client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{call, connect};
use keypool_mock::{Ending, Flavor, MockServer, Reply, RetryAfter, Scenario, openai};

const CHAT: &str = r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &str = r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const RESPONSE_STREAM: &str = r#"{"model":"gpt-test","stream":true,"input":"hi"}"#;

fn json(b: &common::BodyRead) -> serde_json::Value {
    serde_json::from_slice(&b.bytes()).unwrap()
}

/// `(event name or "", data)` of each frame.
fn frames(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|b| !b.is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = d.to_owned();
                }
            }
            (name, data)
        })
        .collect()
}

#[test]
fn chat_completions_plain_and_streamed() {
    let mock = MockServer::start_openai();
    assert_eq!(mock.flavor(), Flavor::OpenAi);
    let (h, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT);
    assert_eq!(h.status, 200);
    assert!(h.header("x-request-id").unwrap().starts_with("req_mock_"));
    assert_eq!(h.header("openai-organization"), None);
    assert_eq!(h.header("x-ratelimit-reset-tokens"), Some("30ms"));
    assert!(h.header("request-id").is_none());
    let v = json(&b);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-test");
    assert!(v["choices"][0]["message"]["content"].is_string());

    let (h, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT_STREAM);
    assert!(h.header("content-type").unwrap().starts_with("text/event-stream"));
    let f = frames(&b.text());
    assert!(f.iter().all(|(name, _)| name.is_empty()), "{f:?}");
    assert_eq!(f.last().unwrap().1, "[DONE]");
    let first: serde_json::Value = serde_json::from_str(&f[0].1).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(f.len(), 3 + 3, "role, 3 deltas, finish, [DONE]");
}

#[test]
fn responses_plain_and_streamed_and_models_on_any_prefix() {
    let mock = MockServer::start_openai();
    let (h, b) = call(
        &mock,
        "POST",
        "/openai/v1/responses",
        Some("sk-a"),
        r#"{"model":"m","input":"hi"}"#,
    );
    assert_eq!(h.status, 200);
    let v = json(&b);
    assert_eq!(
        (v["object"].as_str(), v["status"].as_str()),
        (Some("response"), Some("completed"))
    );
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");

    let (_, b) = call(&mock, "POST", "/v1/responses", Some("sk-a"), RESPONSE_STREAM);
    let f = frames(&b.text());
    let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[..3],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added"
        ]
    );
    assert_eq!(names.last(), Some(&"response.completed"));
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "response.output_text.delta")
            .count(),
        3
    );
    for (i, (name, data)) in f.iter().enumerate() {
        let d: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(d["type"], name.as_str());
        assert_eq!(d["sequence_number"], i);
    }

    let (h, b) = call(&mock, "GET", "/v1/models", Some("sk-a"), "");
    assert_eq!(h.status, 200);
    assert_eq!(json(&b)["object"], "list");
    let (h, b) = call(
        &mock,
        "POST",
        "/openai/deployments/gpt/chat/completions?api-version=2024-10-21",
        Some("sk-a"),
        CHAT,
    );
    assert_eq!(
        (h.status, json(&b)["object"].as_str()),
        (200, Some("chat.completion"))
    );
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("sk-a"), CHAT);
    assert_eq!(h.status, 404);
    assert_eq!(json(&b)["error"]["code"], "unknown_url");
    assert_eq!(mock.requests_for("sk-a").len(), 5);
}

#[test]
fn errors_take_openai_shape_with_their_headers() {
    let mock = MockServer::start_openai();
    mock.script(
        "sk-a",
        [
            openai::rate_limited_reset("tokens", "6m0s"),
            openai::rate_limited_message("10.666s"),
            openai::rate_limited_after(RetryAfter::Millis("1500".into())),
            openai::request_too_large(),
            openai::insufficient_quota(),
            openai::missing_scopes("api.responses.write"),
            Reply::rate_limited(RetryAfter::Seconds("5".into())),
        ],
    );
    let (h, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT);
    assert_eq!(h.status, 429);
    assert_eq!(h.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(h.header("x-ratelimit-reset-tokens"), Some("6m0s"));
    let v = json(&b);
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["param"].is_null());
    assert!(v.get("type").is_none());
    let (_, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT);
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("Please try again in 10.666s.")
    );
    let (h, _) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT);
    assert_eq!(h.header("retry-after-ms"), Some("1500"));
    let (h, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT);
    assert_eq!(h.header("x-ratelimit-remaining-tokens"), Some("29000"));
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Request too large")
    );
    let (_, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT);
    assert_eq!(json(&b)["error"]["code"], "insufficient_quota");
    let (h, b) = call(&mock, "POST", "/v1/responses", Some("sk-a"), CHAT);
    assert_eq!(h.status, 401);
    assert!(
        json(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Missing scopes: api.responses.write")
    );
    // The generic constructors write OpenAI's shape in OpenAI mode.
    let (h, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT);
    assert_eq!((h.status, h.header("retry-after")), (429, Some("5")));
    assert!(json(&b)["error"]["message"].is_string());

    let (h, b) = call(&mock, "POST", "/v1/chat/completions", None, CHAT);
    assert_eq!(h.status, 401);
    assert!(json(&b)["error"]["message"].as_str().unwrap().contains("API key"));
}

#[test]
fn keys_from_bearer_or_api_key() {
    let mock = MockServer::start_openai();
    for header in ["authorization: Bearer sk-bearer", "api-key: sk-azure"] {
        let mut c = connect(&mock);
        c.send_raw(&format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{header}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT}",
            CHAT.len()
        ));
        let h = c.read_head().unwrap();
        assert_eq!(h.status, 200, "{header}");
    }
    let keys: Vec<Option<String>> = mock.requests().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, [Some("sk-bearer".to_owned()), Some("sk-azure".to_owned())]);
}

#[test]
fn streams_end_early_before_done_and_carry_in_band_errors() {
    let mock = MockServer::start_openai();
    mock.script(
        "sk-a",
        [
            Reply::stream(openai::stream().ending(Ending::EndEarly)),
            Reply::stream(openai::stream().ending(Ending::EndEarly)),
            Reply::stream(openai::chat_error_before_content(
                "requests",
                Some("rate_limit_exceeded"),
                "Please try again in 2s.",
            )),
            Reply::stream(openai::responses_error_before_content("server_error", "boom")),
        ],
    );
    let (_, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT_STREAM);
    let f = frames(&b.text());
    assert_ne!(f.last().unwrap().1, "[DONE]");
    assert_eq!(f.len(), 5);
    let (_, b) = call(&mock, "POST", "/v1/responses", Some("sk-a"), RESPONSE_STREAM);
    let f = frames(&b.text());
    assert_eq!(f.last().unwrap().0, "response.output_item.done");
    let (_, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT_STREAM);
    let f = frames(&b.text());
    assert_eq!(f.len(), 2);
    assert!(f[1].1.starts_with(r#"{"error":{"#), "{f:?}");
    let (_, b) = call(&mock, "POST", "/v1/responses", Some("sk-a"), RESPONSE_STREAM);
    let f = frames(&b.text());
    assert_eq!(f[2].0, "error");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&f[2].1).unwrap()["code"],
        "server_error"
    );
}

#[test]
fn scenario_files_choose_openai() {
    let scenario: Scenario = toml::from_str(
        r#"
        provider = "openai"
        [keys.sk-a]
        script = [{ status = 429, body = { type = "error", error_type = "insufficient_quota", code = "insufficient_quota" } }]
        "#,
    )
    .unwrap();
    assert_eq!(scenario.provider, Flavor::OpenAi);
    let mock = MockServer::start_with(scenario);
    let (h, b) = call(&mock, "POST", "/v1/chat/completions", Some("sk-a"), CHAT);
    assert_eq!(h.status, 429);
    assert_eq!(json(&b)["error"]["code"], "insufficient_quota");
    assert_eq!(Scenario::openai().provider, Flavor::OpenAi);
}
