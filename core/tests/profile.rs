//! The provider profile is the call's only source of provider knowledge (SPEC §12): a test-only
//! provider shaped like a Chat Completions API (Bearer keys, `data: [DONE]`, in-band
//! `data: {"error":...}` chunks, its own error bodies) drives the same call machine.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use keypool_core::call::{CallConfig, CallError, CommitPoint, Credential, Request, StreamBreak};
use keypool_core::profile::{self, EventRole, Profile, Provider};
use keypool_core::sse::RawEvent;
use keypool_core::{CoolReason, Exhausted, KeyState, Policy, Secret, Verdict};
use support::*;

/// A Chat-Completions-shaped provider, enough of one to exercise every seam.
#[derive(Debug)]
struct Chat;

static CHAT: Chat = Chat;
static CHAT_CREDENTIALS: [HeaderName; 2] = [http::header::AUTHORIZATION, HeaderName::from_static("api-key")];

fn chat_error(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    let v = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

impl Provider for Chat {
    fn name(&self) -> &'static str {
        "chat"
    }
    fn default_base_url(&self) -> &'static str {
        "https://chat.example"
    }
    fn request_headers(&self, _headers: &mut HeaderMap) {}
    fn insert_key(&self, headers: &mut HeaderMap, key: &Secret) {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose())).unwrap();
        v.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, v);
    }
    fn credential_headers(&self) -> &'static [HeaderName] {
        &CHAT_CREDENTIALS
    }
    fn client_credential<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        profile::bearer_token(headers)
    }
    fn credential_help(&self) -> &'static str {
        "Authorization: Bearer"
    }
    fn needs_body(&self, _policy: &Policy, status: StatusCode, _headers: &HeaderMap) -> bool {
        status == StatusCode::TOO_MANY_REQUESTS
    }
    fn classify(
        &self,
        policy: &Policy,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        wall: SystemTime,
    ) -> Verdict {
        match status.as_u16() {
            // The request's fault, not the key's: deliver.
            429 if body.windows(17).any(|w| w == b"Request too large") => Verdict::Deliver,
            429 => Verdict::CoolDown {
                duration: self.retry_delay(policy, headers, body, wall),
                reason: CoolReason::RateLimited,
            },
            _ => Verdict::Deliver,
        }
    }
    fn retry_delay(&self, policy: &Policy, headers: &HeaderMap, _body: &[u8], wall: SystemTime) -> Duration {
        policy.retry_delay(headers, wall)
    }
    fn event_role(&self, frame: &RawEvent<'_>) -> EventRole {
        let bytes = frame.bytes();
        if bytes.starts_with(b"data: [DONE]") {
            EventRole::End
        } else if bytes.starts_with(b"data: {\"error\"") {
            EventRole::Error
        } else if bytes.windows(9).any(|w| w == b"\"content\"") {
            EventRole::Content
        } else {
            EventRole::Preamble
        }
    }
    fn in_band_status(&self, data: &[u8]) -> StatusCode {
        if data.windows(19).any(|w| w == b"rate_limit_exceeded") {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
    fn error_type(&self, status: StatusCode) -> &'static str {
        match status.as_u16() {
            429 => "rate_limit_exceeded",
            _ => "server_error",
        }
    }
    fn error_body(&self, status: StatusCode, message: &str, _request_id: Option<&str>) -> Bytes {
        let code = (status == StatusCode::TOO_MANY_REQUESTS).then_some("rate_limit_exceeded");
        chat_error(message, self.error_type(status), code)
    }
    fn is_error_body(&self, body: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v["error"]["message"].is_string())
    }
    fn error_event(&self, message: &str, _dialect: profile::Dialect) -> Bytes {
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(&chat_error(message, "server_error", None));
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
    fn request_id_header(&self) -> HeaderName {
        HeaderName::from_static("x-request-id")
    }
    fn exhaustion_headers(&self, exhausted: Exhausted, headers: &mut HeaderMap) {
        if let Exhausted::RateLimited { retry_after } = exhausted {
            let (secs, millis) = profile::retry_after_headers(retry_after);
            headers.insert(http::header::RETRY_AFTER, secs);
            headers.insert("retry-after-ms", millis);
        }
    }
}

fn chat() -> CallConfig {
    CallConfig::default().with_profile(Profile::new(&CHAT))
}

fn chat_request() -> Request {
    let mut r = Request::post_json_for(&Profile::new(&CHAT), "/v1/chat/completions", "{}");
    r.headers
        .insert("authorization", "Bearer client-token-abcdefgh".parse().unwrap());
    r.headers.insert("api-key", "client-azure-key".parse().unwrap());
    r
}

const ROLE: &str = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n";
const CONTENT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
const DONE: &str = "data: [DONE]\n\n";

#[test]
fn the_default_profile_is_anthropic() {
    assert_eq!(CallConfig::default().profile.name(), "anthropic");
    assert_eq!(
        Profile::default().default_base_url(),
        keypool_core::client::DEFAULT_BASE_URL
    );
    let e = CallError::Transport(keypool_core::call::TransportError::Reset);
    let (a, b) = (
        e.to_response("req_1"),
        e.to_response_for(&Profile::anthropic(), "req_1"),
    );
    assert_eq!(
        (a.status(), a.headers(), a.body()),
        (b.status(), b.headers(), b.body())
    );
    assert_eq!(
        e.to_event(),
        e.to_event_for(&Profile::anthropic(), profile::Dialect::DEFAULT)
    );
    assert_eq!(e.error_type(), "api_error");
}

#[test]
fn the_key_goes_where_the_profile_writes_it_and_its_credentials_are_stripped() {
    let mut sim = Sim::new(1);
    let out = sim.run_with(chat_request(), Credential::Pool(sim.pool.clone()), &chat());
    let sent = &out.sent[0].headers;
    let key = sim.pool.secret(out.sent[0].key.unwrap()).expose().to_owned();
    assert_eq!(sent["authorization"], format!("Bearer {key}").as_str());
    assert!(sent["authorization"].is_sensitive());
    assert!(!sent.contains_key("api-key") && !sent.contains_key("x-api-key"));
    assert!(
        !sent.contains_key("anthropic-version"),
        "post_json_for adds the profile's headers only"
    );
}

#[test]
fn the_profile_classifies_with_the_body_it_asks_for() {
    let mut sim = Sim::new(2);
    sim.script(
        0,
        vec![vec![
            head_h(429, &[("retry-after", "7")]),
            body("{\"error\":{\"message\":\"slow down\"}}"),
            Step::End,
        ]],
    );
    let out = sim.run_with(chat_request(), Credential::Pool(sim.pool.clone()), &chat());
    assert_eq!((out.keys(), out.status()), (vec![Some(0), Some(1)], 200));
    let first = out.sent[0].key.unwrap();
    assert!(matches!(sim.pool.state(first, sim.now), KeyState::Cooling { .. }));

    // The request's own fault: delivered, no failover.
    let mut sim = Sim::new(2);
    sim.script(
        0,
        vec![vec![
            head(429),
            body("{\"error\":{\"message\":\"Request too large\"}}"),
            Step::End,
        ]],
    );
    let out = sim.run_with(chat_request(), Credential::Pool(sim.pool.clone()), &chat());
    assert_eq!((out.keys(), out.status()), (vec![Some(0)], 429));
}

#[test]
fn done_without_an_event_name_is_a_clean_end() {
    let mut sim = Sim::new(1);
    let stream = [ROLE, CONTENT, DONE].concat();
    sim.script(0, vec![vec![sse_head(), body(&stream), Step::End]]);
    let out = sim.run_with(chat_request(), Credential::Pool(sim.pool.clone()), &chat());
    assert!(out.abort.is_none(), "{:?}", out.abort);
    assert_eq!(out.body_str(), stream);

    // Without it the stream ended early, and the synthesized error is the profile's.
    let mut sim = Sim::new(1);
    sim.script(
        0,
        vec![vec![sse_head(), body(&[ROLE, CONTENT].concat()), Step::End]],
    );
    let out = sim.run_with(chat_request(), Credential::Pool(sim.pool.clone()), &chat());
    let abort = out.abort.unwrap();
    assert_eq!(abort.error, CallError::StreamBroken(StreamBreak::EndedEarly));
    let event = abort.event.unwrap();
    assert!(event.starts_with(b"data: {\"error\":{"), "{event:?}");
    assert!(event.ends_with(b"}\n\n"));
}

#[test]
fn an_in_band_error_chunk_before_content_fails_over() {
    let config = chat().with_commit(CommitPoint::first_content());
    let mut sim = Sim::new(2);
    let error = "data: {\"error\":{\"message\":\"x\",\"type\":\"rate_limit_exceeded\"}}\n\n";
    sim.script(
        0,
        vec![vec![sse_head(), body(&[ROLE, error].concat()), Step::End]],
    );
    sim.script(
        1,
        vec![vec![sse_head(), body(&[ROLE, CONTENT, DONE].concat()), Step::End]],
    );
    let out = sim.run_with(chat_request(), Credential::Pool(sim.pool.clone()), &config);
    assert_eq!(out.keys(), vec![Some(0), Some(1)]);
    assert_eq!(out.body_str(), [ROLE, CONTENT, DONE].concat());
    assert!(out.abort.is_none());

    // BYOK: the same chunk is delivered as the matching HTTP error, its body kept.
    let mut sim = Sim::new(1);
    sim.script_byok(vec![vec![sse_head(), body(&[ROLE, error].concat()), Step::End]]);
    let byok = Credential::Key(Secret::new("sk-own-key-0123456789").unwrap());
    let out = sim.run_with(chat_request(), byok, &config);
    assert_eq!(out.status(), 429);
    assert_eq!(out.fail_json()["error"]["type"], "rate_limit_exceeded");
}

#[test]
fn keypool_errors_take_the_profile_shape() {
    let mut sim = Sim::new(1);
    sim.script(
        0,
        vec![vec![head_h(429, &[("retry-after", "3")]), body("{}"), Step::End]],
    );
    let out = sim.run_with(chat_request(), Credential::Pool(sim.pool.clone()), &chat());
    assert_eq!(out.status(), 429);
    let json = out.fail_json();
    assert_eq!(json["error"]["type"], "rate_limit_exceeded");
    assert_eq!(json["error"]["code"], "rate_limit_exceeded");
    assert!(json.get("type").is_none());
    assert_eq!(out.fail_header("x-request-id").as_deref(), Some("req_test"));
    assert_eq!(out.fail_header("request-id"), None);
    assert_eq!(out.fail_header("retry-after").as_deref(), Some("3"));
    assert_eq!(out.fail_header("x-should-retry"), None);
}
