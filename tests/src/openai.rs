//! The OpenAI scenarios (SPEC §12): the same worlds, a mock in OpenAI mode, a client with the
//! OpenAI profile.

use bytes::Bytes;
use keypool_core::call::Request;
use keypool_core::profile::Profile;

/// `POST /v1/chat/completions` with a client credential (`Authorization: Bearer …` and
/// `api-key`) that must never reach the upstream on a pooled call.
pub fn openai_chat(stream: bool) -> Request {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"héllo ✓"}}]}}"#
    );
    with_client_credential(Request::post_json_for(
        &Profile::openai(),
        "/v1/chat/completions",
        Bytes::from(body),
    ))
}

/// `POST /v1/responses`, with the same client credential.
pub fn openai_responses(stream: bool) -> Request {
    let body = format!(r#"{{"model":"gpt-4o-mini","stream":{stream},"input":"héllo ✓"}}"#);
    with_client_credential(Request::post_json_for(
        &Profile::openai(),
        "/v1/responses",
        Bytes::from(body),
    ))
}

fn with_client_credential(mut r: Request) -> Request {
    r.headers.insert(
        "authorization",
        "Bearer client-own-credential-0000000000".parse().unwrap(),
    );
    r.headers
        .insert("api-key", "client-own-credential-1111111111".parse().unwrap());
    r.headers.insert("openai-beta", "suite-1".parse().unwrap());
    r
}

pub(crate) mod scenarios {
    use std::time::{Duration, Instant};

    use keypool_core::call::{CallConfig, CommitPoint};
    use keypool_core::sse::Parser;
    use keypool_core::{DisableReason, KeyState};
    use keypool_mock::{Ending, Reply, RetryAfter, openai};

    use super::{openai_chat, openai_responses};
    use crate::{Adapter, Answer, TestClient, Transport, World, config, json};

    fn first_byte() -> CallConfig {
        config(CommitPoint::FirstByte)
    }

    /// Every attempt carried the pool key as `Authorization: Bearer`, never the client's.
    fn assert_bearer_keys<C: TestClient>(w: &World<C>) {
        for r in w.mock.requests() {
            let key = r.key.clone().unwrap();
            assert!(
                w.keys.contains(&key),
                "the upstream saw a key that is not the pool's"
            );
            assert_eq!(r.headers["authorization"], format!("Bearer {key}").as_str());
            assert!(r.headers.get("api-key").is_none());
            assert!(r.headers.get("anthropic-version").is_none());
            assert_eq!(r.headers["openai-beta"], "suite-1");
        }
    }

    fn remaining(w: &World<impl TestClient>, k: usize) -> Option<Duration> {
        match w.state(k) {
            KeyState::Cooling { until, .. } => Some(until.saturating_duration_since(Instant::now())),
            _ => None,
        }
    }

    /// A 429 `rate_limit_exceeded` cools the key for the delay of each form (`retry-after-ms`,
    /// `retry-after` seconds and HTTP-date, the exhausted dimension's Go-duration reset, the
    /// message's "try again in", else the default) and fails over at once.
    pub fn openai_rate_limit_delay_forms<A: Adapter>(t: Transport) {
        let secs = Duration::from_secs;
        let cases = [
            (
                openai::rate_limited_after(RetryAfter::Millis("45000".into())),
                secs(45),
            ),
            (
                openai::rate_limited_after(RetryAfter::Seconds("30".into())),
                secs(30),
            ),
            (openai::rate_limited_after(RetryAfter::HttpDateIn(120)), secs(120)),
            (openai::rate_limited_reset("requests", "6m0s"), secs(360)),
            (
                openai::rate_limited_reset("tokens", "1m30.5s"),
                Duration::from_millis(90_500),
            ),
            (
                openai::rate_limited_message("10.666s"),
                Duration::from_millis(10_666),
            ),
            (openai::rate_limited(), secs(60)),
        ];
        for (reply, want) in cases {
            let what = format!("{:?} {:?}", reply.headers, reply.retry_after);
            let mut w = World::new_openai::<A>(t, 2, first_byte());
            w.script(0, [reply]);
            let a = w.send_request(openai_chat(false));
            assert_eq!(a.status, 200, "{what}: {a:?}");
            assert_eq!(json(&a.body)["object"], "chat.completion");
            assert_eq!(w.seen(), [Some(0), Some(1)], "{what}");
            let left = remaining(&w, 0).unwrap_or_else(|| panic!("{what}: {:?}", w.state(0)));
            // An HTTP-date has whole seconds; everything else is exact up to the test's own time.
            let slack = secs(3);
            assert!(
                left <= want && left + slack > want,
                "{what}: {left:?}, want {want:?}"
            );
            assert_bearer_keys(&w);
            w.finish();
        }
    }

    /// A 429 "Request too large" (tokens remaining) is the request's fault: delivered as is after
    /// one attempt, the key untouched.
    pub fn openai_request_too_large_delivered<A: Adapter>(t: Transport) {
        let mut w = World::new_openai::<A>(t, 2, first_byte());
        w.script(0, [openai::request_too_large()]);
        let a = w.send_request(openai_chat(false));
        assert_eq!(a.status, 429, "{a:?}");
        assert!(a.error.is_none(), "delivered as is: {a:?}");
        let body = json(&a.body);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Request too large")
        );
        assert_eq!(w.seen(), [Some(0)]);
        assert!(w.state(0).is_available());
        w.finish();
    }

    /// 429 `insufficient_quota` (and the spend-limit codes) disable the key for billing; the call
    /// fails over and the next one goes straight to the next key.
    pub fn openai_insufficient_quota_disables<A: Adapter>(t: Transport) {
        for reply in [
            openai::insufficient_quota(),
            openai::billing("project_spend_limit_exceeded"),
        ] {
            let mut w = World::new_openai::<A>(t, 2, first_byte());
            w.script(0, [reply]);
            let a = w.send_request(openai_chat(false));
            assert_eq!(a.status, 200, "{a:?}");
            assert_eq!(
                w.state(0),
                KeyState::Disabled {
                    reason: DisableReason::Billing
                }
            );
            let _ = w.send_request(openai_responses(false));
            assert_eq!(w.seen(), [Some(0), Some(1), Some(1)]);
            w.finish();
        }
    }

    /// A 401 "Missing scopes: …" is delivered as is and the key stays available (it serves other
    /// endpoints); any other 401 disables it.
    pub fn openai_missing_scope_delivered<A: Adapter>(t: Transport) {
        let mut w = World::new_openai::<A>(t, 2, first_byte());
        w.script(0, [openai::missing_scopes("api.responses.write")]);
        let a = w.send_request(openai_responses(false));
        assert_eq!(a.status, 401, "{a:?}");
        assert!(a.error.is_none(), "delivered as is: {a:?}");
        assert!(
            json(&a.body)["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Missing scopes:")
        );
        assert!(w.state(0).is_available());
        let a = w.send_request(openai_chat(false));
        assert_eq!(a.status, 200);
        assert_eq!(w.seen(), [Some(0), Some(0)]);

        w.script(0, [openai::invalid_api_key()]);
        assert_eq!(w.send_request(openai_chat(false)).status, 200);
        assert_eq!(
            w.state(0),
            KeyState::Disabled {
                reason: DisableReason::Unauthorized
            }
        );
        w.finish();
    }

    /// Every key rate-limited: keypool's 429 in OpenAI's shape (`code: rate_limit_exceeded`)
    /// with `retry-after`, `retry-after-ms` and `x-should-retry: true`.
    pub fn openai_exhaustion_shape<A: Adapter>(t: Transport) {
        let mut w = World::new_openai::<A>(t, 3, first_byte());
        w.script(0, [openai::rate_limited_after(RetryAfter::Seconds("5".into()))]);
        w.script(1, [openai::rate_limited_reset("tokens", "3s")]);
        w.script(2, [openai::rate_limited_message("10.666s")]);
        let a = w.send_request(openai_chat(false));
        assert_eq!(a.status, 429, "{a:?}");
        let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((2..=3).contains(&retry), "retry-after {retry}");
        let ms: u64 = a.headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
        assert!((2000..=3000).contains(&ms), "retry-after-ms {ms}");
        assert_eq!(a.headers["x-should-retry"], "true");
        assert!(a.headers.contains_key("x-request-id"));
        let body = json(&a.body);
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("3 configured keys")
        );
        assert!(body["error"]["param"].is_null());
        assert!(body.get("type").is_none(), "not Anthropic's shape: {body}");
        assert!(a.error.is_some());
        assert_eq!(w.seen(), [Some(0), Some(1), Some(2)]);

        // Every key disabled: 502, x-should-retry: false, still OpenAI's shape.
        let mut w = World::new_openai::<A>(t, 1, first_byte());
        w.script(0, [openai::invalid_api_key()]);
        let a = w.send_request(openai_chat(false));
        assert_eq!(a.status, 502, "{a:?}");
        assert_eq!(a.headers["x-should-retry"], "false");
        assert_eq!(json(&a.body)["error"]["type"], "server_error");
        w.finish();
    }

    fn last_event(s: &crate::StreamAnswer) -> (&str, &str) {
        let (name, data) = s.events.last().expect("no events");
        (name.as_str(), data.as_str())
    }

    /// A 429 before a stream's head fails over, for both stream APIs; the caller sees one whole
    /// stream, from the next key.
    pub fn openai_streams_fail_over_before_commit<A: Adapter>(t: Transport) {
        let mut w = World::new_openai::<A>(t, 3, first_byte());
        w.script(0, [openai::rate_limited_reset("requests", "20s")]);
        let s = w.stream_request(openai_chat(true));
        assert_eq!(s.status, 200, "{s:?}");
        assert!(s.stream_error.is_none(), "{s:?}");
        assert_eq!(last_event(&s), ("message", "[DONE]"));
        assert_eq!(w.seen(), [Some(0), Some(1)]);

        // k0 still cools; k1's organisation is out of credit: the Responses stream comes from k2.
        w.script(1, [openai::insufficient_quota()]);
        let s = w.stream_request(openai_responses(true));
        assert_eq!(s.status, 200, "{s:?}");
        assert!(s.stream_error.is_none(), "{s:?}");
        assert_eq!(s.events[0].0, "response.created");
        assert_eq!(last_event(&s).0, "response.completed");
        assert_eq!(w.seen(), [Some(0), Some(1), Some(1), Some(2)]);
        assert_bearer_keys(&w);
        w.finish();
    }

    /// With the first-content commit point, an in-band rate limit before any content fails over
    /// for both stream APIs; the failed attempt's events never reach the caller.
    pub fn openai_first_content_fails_over_on_in_band_errors<A: Adapter>(t: Transport) {
        let cfg = config(CommitPoint::first_content());
        let mut w = World::new_openai::<A>(t, 2, cfg.clone());
        w.script(
            0,
            [Reply::stream(openai::chat_error_before_content(
                "requests",
                Some("rate_limit_exceeded"),
                "Rate limit reached. Please try again in 7s.",
            ))],
        );
        let s = w.stream_request(openai_chat(true));
        assert_eq!(s.status, 200, "{s:?}");
        assert!(s.stream_error.is_none(), "{s:?}");
        assert_eq!(last_event(&s), ("message", "[DONE]"));
        assert_eq!(s.events.iter().filter(|(_, d)| d.contains("\"role\"")).count(), 1);
        assert_eq!(w.seen(), [Some(0), Some(1)]);
        assert!(remaining(&w, 0).is_some_and(|d| d <= Duration::from_secs(7)));
        w.finish();

        let mut w = World::new_openai::<A>(t, 2, cfg);
        w.script(
            0,
            [Reply::stream(openai::responses_error_before_content(
                "rate_limit_exceeded",
                "Rate limit reached. Please try again in 9s.",
            ))],
        );
        let s = w.stream_request(openai_responses(true));
        assert_eq!(s.status, 200, "{s:?}");
        let names: Vec<&str> = s.events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.iter().filter(|n| **n == "response.created").count(), 1);
        assert!(!names.contains(&"error"), "{names:?}");
        assert_eq!(names.last(), Some(&"response.completed"));
        assert_eq!(w.seen(), [Some(0), Some(1)]);
        assert!(remaining(&w, 0).is_some_and(|d| d <= Duration::from_secs(9)));
        w.finish();
    }

    /// `data: [DONE]` and `response.completed` end a stream cleanly; a stream that ends before
    /// them is broken (the caller is told).
    pub fn openai_streams_end_cleanly<A: Adapter>(t: Transport) {
        let mut w = World::new_openai::<A>(t, 1, first_byte());
        let s = w.stream_request(openai_chat(true));
        assert!(s.stream_error.is_none(), "{s:?}");
        assert_eq!(last_event(&s), ("message", "[DONE]"));
        let s = w.stream_request(openai_responses(true));
        assert!(s.stream_error.is_none(), "{s:?}");
        assert_eq!(last_event(&s).0, "response.completed");

        w.script(
            0,
            [
                Reply::stream(openai::stream().ending(Ending::EndEarly)),
                Reply::stream(openai::stream().ending(Ending::EndEarly)),
            ],
        );
        let s = w.stream_request(openai_chat(true));
        assert!(s.stream_error.is_some(), "ended before [DONE]: {s:?}");
        assert_ne!(last_event(&s).1, "[DONE]");
        let s = w.stream_request(openai_responses(true));
        assert!(s.stream_error.is_some(), "ended before response.completed: {s:?}");
        assert_eq!(w.seen(), [Some(0); 4]);
        assert!(w.state(0).is_available());
        w.finish();
    }

    /// The events of an answer body read as bytes: `(type, data)`.
    fn body_events(a: &Answer) -> Vec<(String, String)> {
        let mut parser = Parser::new();
        parser.feed(&bytes::Bytes::from(a.body.clone()));
        let _ = parser.finish();
        let mut out = Vec::new();
        while let Some(Ok(e)) = parser.next_event() {
            out.push((e.event_type().to_owned(), e.data().to_owned()));
        }
        out
    }

    /// A committed stream that resets mid-event: the caller gets the whole events before it and
    /// then keypool's error event in the API's own shape — a `data: {"error":…}` chunk for
    /// Chat Completions, an `event: error` for the Responses API. One attempt, no mark.
    pub fn openai_stream_breaks_in_its_own_shape<A: Adapter>(t: Transport) {
        let mut w = World::new_openai::<A>(t, 2, first_byte());
        w.script(
            0,
            [
                Reply::stream(openai::stream().ending(Ending::ResetAfter(400))),
                Reply::stream(openai::stream().ending(Ending::ResetAfter(900))),
            ],
        );
        let a = w.send_request(openai_chat(true));
        assert_eq!(a.status, 200, "{a:?}");
        let events = body_events(&a);
        let (name, data) = events.last().unwrap();
        assert_eq!(name, "message", "{events:?}");
        let v = json(data.as_bytes());
        assert!(
            v["error"]["message"].as_str().unwrap().contains("incomplete"),
            "{v}"
        );
        assert_eq!(v["error"]["type"], "server_error");
        assert!(
            events[..events.len() - 1]
                .iter()
                .all(|(_, d)| json(d.as_bytes())["object"] == "chat.completion.chunk")
        );
        assert!(!String::from_utf8_lossy(&a.body).contains("[DONE]"));

        let a = w.send_request(openai_responses(true));
        assert_eq!(a.status, 200, "{a:?}");
        let events = body_events(&a);
        let (name, data) = events.last().unwrap();
        assert_eq!(name, "error", "{events:?}");
        let v = json(data.as_bytes());
        assert_eq!(v["type"], "error");
        assert!(v["message"].as_str().unwrap().contains("incomplete"), "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(
            events[..events.len() - 1]
                .iter()
                .all(|(n, _)| n.starts_with("response."))
        );
        assert_eq!(w.seen(), [Some(0), Some(0)]);
        assert!(w.state(0).is_available() && w.state(1).is_available());
        w.finish();
    }
}
