//! End-to-end tests of the mock through a raw HTTP/1.1 client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::{MESSAGE, STREAM_MESSAGE, call, connect, connect_tls, parse_events};
use keypool_mock::{
    CREDIT_BALANCE_MESSAGE, Ending, MockServer, OutcomeEnd, Reply, RetryAfter, Scenario, SseEvent,
    StreamScript,
};

const WAIT: Duration = Duration::from_secs(5);

fn error_type(body: &common::BodyRead) -> String {
    let v: serde_json::Value = serde_json::from_slice(&body.bytes()).unwrap();
    assert_eq!(v["type"], "error");
    assert!(v["request_id"].as_str().unwrap().starts_with("req_"));
    v["error"]["type"].as_str().unwrap().to_owned()
}

#[test]
fn per_key_scripts_run_in_order_then_default_then_fallback() {
    let mock = MockServer::start();
    mock.script(
        "key-a",
        [Reply::status(429).header("retry-after", "5"), Reply::ok()],
    );
    mock.set_default("key-b", Reply::unauthorized());

    let (h, _) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!(h.status, 429);
    assert_eq!(h.header("retry-after"), Some("5"));
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-type"), Some("application/json"));
    let msg: serde_json::Value = serde_json::from_slice(&b.bytes()).unwrap();
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["model"], "claude-test");
    assert_eq!(msg["content"][0]["type"], "text");
    // Queue used up, no default for key-a: the fallback (ok).
    assert_eq!(
        call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE)
            .0
            .status,
        200
    );
    // key-b: its default, every time.
    for _ in 0..2 {
        let (h, b) = call(&mock, "POST", "/v1/messages", Some("key-b"), MESSAGE);
        assert_eq!(h.status, 401);
        assert_eq!(error_type(&b), "authentication_error");
    }
    // A key never configured gets the fallback; change it.
    mock.set_fallback(Reply::overloaded());
    assert_eq!(
        call(&mock, "POST", "/v1/messages", Some("key-c"), MESSAGE)
            .0
            .status,
        529
    );
    // No key at all: 401.
    let (h, b) = call(&mock, "POST", "/v1/messages", None, MESSAGE);
    assert_eq!(h.status, 401);
    assert_eq!(error_type(&b), "authentication_error");

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 7);
    let keys: Vec<_> = reqs.iter().map(|r| r.key.as_deref()).collect();
    assert_eq!(
        keys,
        [
            Some("key-a"),
            Some("key-a"),
            Some("key-a"),
            Some("key-b"),
            Some("key-b"),
            Some("key-c"),
            None
        ]
    );
    let a = mock.requests_for("key-a");
    assert_eq!(a.len(), 3);
    assert_eq!(a[0].method, http::Method::POST);
    assert_eq!(a[0].uri, "/v1/messages");
    assert_eq!(a[0].body.as_ref(), MESSAGE.as_bytes());
    assert_eq!(a[0].headers["anthropic-version"], "2023-06-01");
    assert!(a[0].received_at <= a[1].received_at);
    assert!(!a[0].tls);
    // Debug never shows the key or its header.
    let dbg = format!("{:?}", a[0]);
    assert!(!dbg.contains("key-a"), "{dbg}");

    mock.reset();
    assert!(mock.requests().is_empty());
    assert_eq!(
        call(&mock, "POST", "/v1/messages", Some("key-b"), MESSAGE)
            .0
            .status,
        200
    );
}

#[test]
fn bearer_token_counts_as_the_key() {
    let mock = MockServer::start();
    mock.script("tok-1", [Reply::forbidden()]);
    let mut c = connect(&mock);
    c.send_raw(&format!(
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\nauthorization: Bearer tok-1\r\ncontent-length: {}\r\n\r\n{MESSAGE}",
        MESSAGE.len()
    ));
    let h = c.read_head().unwrap();
    assert_eq!(h.status, 403);
    assert_eq!(mock.requests()[0].key.as_deref(), Some("tok-1"));
}

#[test]
fn error_constructors_are_anthropic_shaped() {
    let mock = MockServer::start();
    let cases = [
        (Reply::rate_limited(RetryAfter::None), 429, "rate_limit_error"),
        (Reply::unauthorized(), 401, "authentication_error"),
        (Reply::forbidden(), 403, "permission_error"),
        (Reply::billing(), 402, "billing_error"),
        (Reply::credit_balance(), 400, "invalid_request_error"),
        (Reply::server_error(), 500, "api_error"),
        (Reply::overloaded(), 529, "overloaded_error"),
        (Reply::bad_request(), 400, "invalid_request_error"),
    ];
    let n = cases.len();
    mock.script("k", cases.iter().map(|c| c.0.clone()));
    let mut client = connect(&mock);
    for (_, status, kind) in &cases {
        let (h, b) = client.call("POST", "/v1/messages", Some("k"), MESSAGE);
        assert_eq!(h.status, *status);
        assert_eq!(h.header("content-type"), Some("application/json"));
        let rid = h.header("request-id").unwrap().to_owned();
        let v: serde_json::Value = serde_json::from_slice(&b.bytes()).unwrap();
        assert_eq!(v["request_id"], rid.as_str());
        assert_eq!(error_type(&b), *kind);
        if *kind == "invalid_request_error" && v["error"]["message"] == CREDIT_BALANCE_MESSAGE {
            assert_eq!(*status, 400);
        }
    }
    let credit = &mock.requests()[4];
    assert_eq!(mock.requests().len(), n);
    assert_eq!(credit.key.as_deref(), Some("k"));
}

#[test]
fn retry_after_variants_are_sent_raw() {
    let mock = MockServer::start();
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    mock.script(
        "k",
        [
            Reply::rate_limited(RetryAfter::Seconds("-5".into())),
            Reply::rate_limited(RetryAfter::Millis("1500".into())),
            Reply::rate_limited(RetryAfter::HttpDate(date)),
            Reply::rate_limited(RetryAfter::Both {
                seconds: "abc".into(),
                millis: "2.5".into(),
            }),
            Reply::rate_limited(RetryAfter::None),
            Reply::rate_limited(RetryAfter::HttpDateIn(30)).header("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
        ],
    );
    let mut c = connect(&mock);
    let mut heads = Vec::new();
    for _ in 0..6 {
        heads.push(c.call("POST", "/v1/messages", Some("k"), MESSAGE).0);
    }
    assert_eq!(heads[0].header("retry-after"), Some("-5"));
    assert_eq!(heads[0].header("retry-after-ms"), None);
    assert_eq!(heads[1].header("retry-after-ms"), Some("1500"));
    assert_eq!(heads[1].header("retry-after"), None);
    assert_eq!(
        heads[2].header("retry-after"),
        Some("Wed, 18 May 2033 03:33:20 GMT")
    );
    assert_eq!(heads[3].header("retry-after"), Some("abc"));
    assert_eq!(heads[3].header("retry-after-ms"), Some("2.5"));
    assert_eq!(heads[4].header("retry-after"), None);
    assert_eq!(
        heads[4].header("anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    let in30 = httpdate::parse_http_date(heads[5].header("retry-after").unwrap()).unwrap();
    assert!(in30 > SystemTime::now() + Duration::from_secs(20));
    assert_eq!(heads[5].header("date"), Some("Thu, 01 Jan 2026 00:00:00 GMT"));
}

#[test]
fn other_endpoints_and_unknown_paths() {
    let mock = MockServer::start();
    mock.script("k", [Reply::overloaded()]);
    // An unknown path does not consume the script.
    let (h, b) = call(&mock, "POST", "/v1/nope", Some("k"), "{}");
    assert_eq!(h.status, 404);
    assert_eq!(error_type(&b), "not_found_error");
    assert_eq!(
        call(&mock, "POST", "/v1/messages/count_tokens", Some("k"), MESSAGE)
            .0
            .status,
        529
    );
    let (h, b) = call(&mock, "POST", "/v1/messages/count_tokens", Some("k"), MESSAGE);
    assert_eq!(h.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&b.bytes()).unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 0);
    let (h, b) = call(&mock, "GET", "/v1/models", Some("k"), "");
    assert_eq!(h.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&b.bytes()).unwrap();
    assert_eq!(v["data"][0]["type"], "model");
    assert_eq!(mock.requests().len(), 4);
    assert_eq!(mock.requests()[0].path(), "/v1/nope");
}

#[test]
fn stream_has_anthropic_event_shapes_one_chunk_per_event() {
    let mock = MockServer::start();
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("k"), STREAM_MESSAGE);
    assert_eq!(h.status, 200);
    assert!(h.header("content-type").unwrap().starts_with("text/event-stream"));
    assert!(h.header("request-id").is_some());
    assert!(h.header("anthropic-ratelimit-requests-limit").is_some());
    assert!(h.is_chunked());
    assert!(b.complete, "{:?}", b.error);
    let events = parse_events(&b.text());
    let names: Vec<_> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    assert_eq!(events[0].1["message"]["model"], "claude-test");
    assert_eq!(events[3].1["delta"]["type"], "text_delta");
    // One HTTP chunk per event.
    assert_eq!(b.chunks.len(), events.len());
    for c in &b.chunks {
        assert!(c.ends_with(b"\n\n"));
    }
    let outcomes = mock.wait_for_stream_outcomes(1, WAIT).unwrap();
    assert_eq!(outcomes[0].end, OutcomeEnd::Completed);
    assert_eq!(outcomes[0].bytes_sent, b.bytes().len());
    assert_eq!(outcomes[0].key.as_deref(), Some("k"));
}

#[test]
fn stream_chunk_sizes_are_exact_frames() {
    let mock = MockServer::start();
    let whole = call(&mock, "POST", "/v1/messages", Some("k"), STREAM_MESSAGE)
        .1
        .bytes();
    for size in [1usize, 7, 128] {
        mock.script("k", [Reply::stream(StreamScript::new().chunk_size(size))]);
        let (_, b) = call(&mock, "POST", "/v1/messages", Some("k"), STREAM_MESSAGE);
        assert!(b.complete);
        assert_eq!(b.bytes().len(), whole.len());
        let (last, rest) = b.chunks.split_last().unwrap();
        assert!(rest.iter().all(|c| c.len() == size), "size {size}");
        assert!(!last.is_empty() && last.len() <= size);
        assert_eq!(b.chunks.len(), whole.len().div_ceil(size));
    }
}

#[test]
fn stream_reply_streams_even_without_the_flag_and_custom_events() {
    let mock = MockServer::start();
    let events = vec![
        SseEvent::new("message_start", r#"{"type":"message_start","message":{}}"#),
        SseEvent::error("overloaded_error", "Overloaded"),
    ];
    mock.script(
        "k",
        [
            Reply::stream(StreamScript::with_events(events)),
            Reply::stream(StreamScript::error_after_content(2, "api_error", "boom")),
            Reply::stream(StreamScript::error_before_content(
                "rate_limit_error",
                "slow down",
            )),
        ],
    );
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert!(h.header("content-type").unwrap().starts_with("text/event-stream"));
    let ev = parse_events(&b.text());
    assert_eq!(ev[1].1["error"]["type"], "overloaded_error");

    let ev = parse_events(&call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE).1.text());
    let names: Vec<_> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "error"
        ]
    );
    let ev = parse_events(&call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE).1.text());
    let names: Vec<_> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["message_start", "ping", "error"]);
    assert_eq!(ev[2].1["error"]["type"], "rate_limit_error");
}

#[test]
fn reset_after_n_bytes_breaks_the_body() {
    let mock = MockServer::start();
    mock.script(
        "k",
        [Reply::stream(
            StreamScript::new().chunk_size(16).ending(Ending::ResetAfter(50)),
        )],
    );
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("k"), STREAM_MESSAGE);
    assert_eq!(h.status, 200);
    assert!(!b.complete);
    let kind = b.error.as_ref().unwrap().kind();
    assert_eq!(kind, std::io::ErrorKind::ConnectionReset, "{:?}", b.error);
    assert_eq!(b.bytes().len(), 50);
    let o = mock.wait_for_stream_outcomes(1, WAIT).unwrap();
    assert_eq!(o[0].end, OutcomeEnd::Aborted);
    assert_eq!(o[0].bytes_sent, 50);
}

#[test]
fn eof_after_n_bytes_breaks_the_body_over_tls() {
    let mock = MockServer::start();
    mock.script(
        "k",
        [Reply::stream(StreamScript::new().ending(Ending::EofAfter(100)))],
    );
    let mut c = connect_tls(&mock);
    let (_, b) = c.call("POST", "/v1/messages", Some("k"), STREAM_MESSAGE);
    assert!(!b.complete);
    // rustls reports the missing close_notify as UnexpectedEof.
    assert_eq!(
        b.error.as_ref().unwrap().kind(),
        std::io::ErrorKind::UnexpectedEof,
        "{:?}",
        b.error
    );
    assert_eq!(b.bytes().len(), 100);
}

#[test]
fn end_early_ends_cleanly_without_message_stop() {
    let mock = MockServer::start();
    mock.script("k", [Reply::stream(StreamScript::new().ending(Ending::EndEarly))]);
    let (_, b) = call(&mock, "POST", "/v1/messages", Some("k"), STREAM_MESSAGE);
    assert!(b.complete);
    let ev = parse_events(&b.text());
    assert_eq!(ev.last().unwrap().0, "message_delta");
    assert!(ev.iter().all(|(n, _)| n != "message_stop"));
    assert_eq!(
        mock.wait_for_stream_outcomes(1, WAIT).unwrap()[0].end,
        OutcomeEnd::Completed
    );
}

#[test]
fn slow_json_body_in_chunks() {
    let mock = MockServer::start();
    mock.script(
        "k",
        [Reply::ok().chunk_size(10).chunk_delay(Duration::from_millis(1))],
    );
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert_eq!(h.status, 200);
    assert!(b.complete);
    let v: serde_json::Value = serde_json::from_slice(&b.bytes()).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(
        mock.wait_for_outcomes(1, WAIT).unwrap()[0].end,
        OutcomeEnd::Completed
    );
}

#[test]
fn tls_works_with_the_ca() {
    let mock = MockServer::start();
    assert!(mock.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(mock.tls_url().starts_with("https://localhost:"));
    let mut c = connect_tls(&mock);
    let (h, b) = c.call("POST", "/v1/messages", Some("k"), MESSAGE);
    assert_eq!(h.status, 200);
    assert!(b.complete);
    // Keep-alive: a second request on the same TLS connection, streaming this time.
    let (h, b) = c.call("POST", "/v1/messages", Some("k"), STREAM_MESSAGE);
    assert_eq!(h.status, 200);
    assert_eq!(parse_events(&b.text()).last().unwrap().0, "message_stop");
    let reqs = mock.requests();
    assert!(reqs.iter().all(|r| r.tls));
    assert_eq!(reqs[0].connection, reqs[1].connection);
}

#[test]
fn dropping_a_stalled_stream_is_seen_as_cancelled() {
    let mock = MockServer::start();
    mock.script("k", [Reply::stream(StreamScript::new().ending(Ending::Stall))]);
    mock.script(
        "t",
        [Reply::stream(StreamScript::new().ending(Ending::StallAfter(10)))],
    );
    for tls in [false, true] {
        let (mut c, key) = if tls {
            (connect_tls(&mock), "t")
        } else {
            (connect(&mock), "k")
        };
        c.send("POST", "/v1/messages", Some(key), STREAM_MESSAGE);
        let h = c.read_head().unwrap();
        assert_eq!(h.status, 200);
        // Read the first chunk, then go away mid-stream.
        assert!(c.read_chunk().unwrap().is_some());
        drop(c);
    }
    let outcomes = mock.wait_for_stream_outcomes(2, WAIT).unwrap();
    assert!(
        outcomes.iter().all(|o| o.end == OutcomeEnd::ClientGone),
        "{outcomes:?}"
    );
    assert_eq!(mock.cancelled_streams(), 2);
}

#[test]
fn head_faults() {
    let mock = MockServer::start();
    mock.script(
        "k",
        [
            Reply::reset_before_head(),
            Reply::close_before_head(),
            Reply::stall_before_head(),
        ],
    );
    for _ in 0..2 {
        let mut c = connect(&mock);
        c.send("POST", "/v1/messages", Some("k"), MESSAGE);
        assert!(c.read_head().is_err());
    }
    let mut c = connect(&mock);
    c.send("POST", "/v1/messages", Some("k"), MESSAGE);
    mock.wait_for_requests(3, WAIT).unwrap();
    drop(c);
    let o = mock.wait_for_outcomes(3, WAIT).unwrap();
    let ends: Vec<_> = o.iter().map(|o| o.end).collect();
    assert_eq!(
        ends,
        [OutcomeEnd::Aborted, OutcomeEnd::Aborted, OutcomeEnd::ClientGone]
    );
}

#[test]
fn scenario_loads_from_toml_and_json() {
    let text = r#"
        fallback = { status = 200 }

        [keys.key-a]
        script = [
            { status = 429, retry_after = { seconds = "5" }, body = { type = "error", error_type = "rate_limit_error" } },
            { body = { type = "stream", text_deltas = 5, chunk_size = 7, ending = { reset_after = 40 } } },
        ]
        default = { status = 401, body = { type = "error", error_type = "authentication_error", message = "bad key" } }

        [keys.key-b]
        script = [{ fault = "stall_before_head" }, { status = 529, headers = [["x-why", "busy"]] }]
    "#;
    let scenario: Scenario = toml::from_str(text).unwrap();
    let json = serde_json::to_string(&scenario).unwrap();
    assert_eq!(serde_json::from_str::<Scenario>(&json).unwrap(), scenario);
    let back: Scenario = toml::from_str(&toml::to_string(&scenario).unwrap()).unwrap();
    assert_eq!(back, scenario);

    let mock = MockServer::start_with(scenario);
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!((h.status, h.header("retry-after")), (429, Some("5")));
    assert_eq!(error_type(&b), "rate_limit_error");
    let (_, b) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!(b.bytes().len(), 40);
    assert!(b.chunks.iter().all(|c| c.len() <= 7));
    assert!(b.error.is_some());
    assert_eq!(
        call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE)
            .0
            .status,
        401
    );
}

#[test]
fn the_documented_scenario_file_parses_and_runs() {
    let scenario: Scenario = toml::from_str(include_str!("../scenario.example.toml")).unwrap();
    assert_eq!(scenario.keys["key-a"].script.len(), 6);
    let mock = MockServer::start_with(scenario);
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!(h.status, 429);
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!(h.header("x-note"), Some("dated"));
    assert!(h.header("retry-after").unwrap().ends_with(" GMT"));
    let (_, b) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!(b.bytes().len(), 40);
    let (_, b) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!(parse_events(&b.text())[1].1["error"]["type"], "overloaded_error");
    let mut c = connect(&mock);
    c.send("POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert!(c.read_head().is_err());
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE);
    assert_eq!(h.status, 200);
    assert!(b.complete);
    assert_eq!(
        call(&mock, "POST", "/v1/messages", Some("key-a"), MESSAGE)
            .0
            .status,
        401
    );
    assert_eq!(
        call(&mock, "POST", "/v1/messages", Some("key-b"), MESSAGE)
            .0
            .status,
        529
    );
    assert_eq!(call(&mock, "POST", "/v1/messages", None, MESSAGE).0.status, 401);
    assert_eq!(
        call(&mock, "POST", "/v1/messages", Some("other"), MESSAGE)
            .0
            .status,
        200
    );
    // What the upstream says about limits.
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("key-c"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-a"));
    assert_eq!(h.header("anthropic-workspace-id"), Some("ws-1"));
    assert_eq!(h.header("anthropic-ratelimit-tokens-remaining"), Some("0"));
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("key-c"), MESSAGE);
    assert_eq!((h.status, h.header("retry-after")), (429, None));
    let v: serde_json::Value = serde_json::from_slice(&b.bytes()).unwrap();
    assert_eq!(
        v["error"]["details"]["error_code"],
        keypool_mock::SPEND_LIMIT_CODE
    );
    let (h, b) = call(&mock, "POST", "/v1/messages", Some("key-c"), MESSAGE);
    assert_eq!(h.status, 400);
    assert!(b.text().contains("regain access on 2027-02-01 at 00:00 UTC"));
    let (h, _) = call(&mock, "POST", "/v1/messages", Some("key-c"), MESSAGE);
    assert_eq!(h.header("anthropic-organization-id"), Some("org-b"));
    let (h, _) = call(&mock, "GET", "/v1/models?limit=1", Some("key-d"), "");
    assert_eq!(h.status, 401);
}

#[test]
fn shutdown_closes_open_streams() {
    let mock = MockServer::start();
    mock.set_fallback(Reply::stream(StreamScript::new().ending(Ending::Stall)));
    let mut c = connect(&mock);
    c.send("POST", "/v1/messages", Some("k"), STREAM_MESSAGE);
    assert_eq!(c.read_head().unwrap().status, 200);
    assert!(c.read_chunk().unwrap().is_some());
    let addr = mock.addr();
    mock.shutdown();
    // The stalled stream ends with an error instead of hanging, and the port is closed.
    let h = common::Head {
        status: 200,
        headers: vec![("transfer-encoding".into(), "chunked".into())],
    };
    let rest = c.read_body(&h);
    assert!(!rest.complete && rest.error.is_some());
    assert!(std::net::TcpStream::connect(addr).is_err());
}

/// The async waits must not block the runtime: here the client that drops the stream runs on the
/// same single-threaded runtime as the wait.
#[tokio::test(flavor = "current_thread")]
async fn async_wait_sees_a_dropped_stream_on_the_same_runtime() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = MockServer::start();
    mock.set_fallback(Reply::stream(StreamScript::new().ending(Ending::Stall)));
    let addr = mock.addr();
    let client = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ncontent-length: {}\r\n\r\n{STREAM_MESSAGE}",
            STREAM_MESSAGE.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Dropped here, mid-stream.
    });
    let reqs = mock.wait_for_requests_async(1, WAIT).await.unwrap();
    assert_eq!(reqs[0].key.as_deref(), Some("k"));
    client.await.unwrap();
    let o = mock.wait_for_stream_outcomes_async(1, WAIT).await.unwrap();
    assert_eq!(o[0].end, OutcomeEnd::ClientGone);
    // A wait that cannot be satisfied times out instead of hanging.
    let err = mock
        .wait_for_outcomes_async(5, Duration::from_millis(20))
        .await
        .unwrap_err();
    assert_eq!((err.have, err.wanted), (1, 5));
}

#[test]
fn partial_head_faults_cut_the_head() {
    use std::io::{Read, Write};
    let mock = MockServer::start();
    mock.script("k", [Reply::close_inside_head(), Reply::reset_inside_head()]);
    // FIN after part of a head: the client reads a status line and some headers, then EOF.
    let mut raw = std::net::TcpStream::connect(mock.addr()).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        raw,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ncontent-length: {}\r\n\r\n{MESSAGE}",
        MESSAGE.len()
    )
    .unwrap();
    let mut got = Vec::new();
    raw.read_to_end(&mut got).unwrap();
    let got = String::from_utf8(got).unwrap();
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
    assert!(!got.contains("\r\n\r\n"), "the head never ends: {got:?}");
    // RST after part of a head: whatever arrives, the head is never complete.
    let mut c = connect(&mock);
    c.send("POST", "/v1/messages", Some("k"), MESSAGE);
    assert!(c.read_head().is_err());
    let o = mock.wait_for_outcomes(2, WAIT).unwrap();
    assert!(o.iter().all(|o| o.end == OutcomeEnd::Aborted), "{o:?}");
}

#[test]
fn repeated_body_is_written_in_copies() {
    let mock = MockServer::start();
    let body = keypool_mock::Body::Repeated {
        text: "abc".into(),
        times: 100_000,
    };
    mock.script(
        "k",
        [
            Reply::status(429).body(body.clone()),
            Reply::status(429).body(body).ending(Ending::EndAfter(7)),
        ],
    );
    let (head, read) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert_eq!(head.status, 429);
    assert_eq!(head.header("content-length"), Some("300000"));
    assert_eq!(read.text(), "abc".repeat(100_000));
    let (head, read) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert!(head.is_chunked() && read.complete);
    assert_eq!(read.text(), "abcabca");
}

#[test]
fn raw_bytes_events_are_written_verbatim() {
    let mock = MockServer::start();
    let events = vec![SseEvent::raw_bytes(b"data: \xff\xfe\n\n")];
    mock.script("k", [Reply::stream(StreamScript::with_events(events))]);
    let (_, read) = call(&mock, "POST", "/v1/messages", Some("k"), STREAM_MESSAGE);
    assert_eq!(read.bytes(), b"data: \xff\xfe\n\n");
}

#[test]
fn close_idle_connections_drops_kept_alive_connections() {
    let mock = MockServer::start();
    let mut c = connect(&mock);
    let (head, _) = c.call("POST", "/v1/messages", Some("k"), MESSAGE);
    assert_eq!(head.status, 200);
    assert_eq!(mock.open_connections(), 1);
    mock.close_idle_connections(WAIT).unwrap();
    assert_eq!(mock.open_connections(), 0);
    // The kept-alive connection is closed: the next read sees EOF.
    assert!(c.read_head().is_err());
    // A new connection works as before.
    let (head, _) = call(&mock, "POST", "/v1/messages", Some("k"), MESSAGE);
    assert_eq!(head.status, 200);
}

#[test]
fn outcome_debug_shows_hints_only() {
    let mock = MockServer::start();
    let key = "sk-ant-api03-outcome-debug-key-0123456789";
    let _ = call(&mock, "POST", "/v1/messages", Some(key), MESSAGE);
    let o = mock.wait_for_outcomes(1, WAIT).unwrap();
    let shown = format!("{o:?}");
    assert!(!shown.contains("outcome-debug"), "{shown}");
    assert!(shown.contains("sk-a"), "{shown}");
}
