//! The Anthropic profile (SPEC §4–§6): the `x-api-key` header, the credential headers to strip,
//! the classification table with the credit-balance rule, the retry-delay headers, the event
//! names of the Messages API, in-band error types and the error shapes keypool writes.
//!
//! The free functions and constants are the building blocks of [`Anthropic`], public so that
//! library users can produce the same wire format.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::{Dialect, EventRole, Provider};
pub use super::{human_duration, retry_after_headers};
use crate::policy::{MAX_CLASSIFY_BODY, OnForbidden, OnUnauthorized, Policy, Verdict};
use crate::pool::{CoolReason, DisableReason};
use crate::secret::Secret;
use crate::sse::RawEvent;
use crate::walk::Exhausted;

/// The Anthropic API.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// The API version [`Request::post_json`](crate::call::Request::post_json) asks for.
pub const VERSION: HeaderValue = HeaderValue::from_static("2023-06-01");

/// The header that names the API version.
pub const VERSION_HEADER: HeaderName = HeaderName::from_static("anthropic-version");

/// The header keypool writes the pool key into.
pub const KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// Headers that carry a client's own credential. They are removed from pooled calls.
pub const CREDENTIAL_HEADERS: [HeaderName; 2] = [KEY_HEADER, http::header::AUTHORIZATION];

/// The event types of the Messages API, the most frequent first. The SSE parser and framer know
/// these lines without searching for their ends.
pub(crate) const EVENT_TYPES: [&[u8]; 8] = [
    b"content_block_delta",
    b"ping",
    b"content_block_start",
    b"content_block_stop",
    b"message_start",
    b"message_delta",
    b"message_stop",
    b"error",
];

/// The Anthropic Messages API as a [`Provider`]; [`Profile::anthropic`](super::Profile::anthropic).
#[derive(Debug, Clone, Copy, Default)]
pub struct Anthropic;

impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn default_base_url(&self) -> &'static str {
        DEFAULT_BASE_URL
    }

    fn request_headers(&self, headers: &mut HeaderMap) {
        headers.insert(VERSION_HEADER, VERSION);
    }

    fn insert_key(&self, headers: &mut HeaderMap, key: &Secret) {
        headers.insert(KEY_HEADER, key.header_value());
    }

    fn credential_headers(&self) -> &'static [HeaderName] {
        static HEADERS: [HeaderName; 2] = CREDENTIAL_HEADERS;
        &HEADERS
    }

    /// `x-api-key` (when present, even if empty), else `Authorization: Bearer`.
    fn client_credential<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        if let Some(v) = headers.get(KEY_HEADER) {
            return Some(v.as_bytes()).filter(|v| !v.is_empty());
        }
        super::bearer_token(headers)
    }

    fn credential_help(&self) -> &'static str {
        "x-api-key or Authorization: Bearer"
    }

    /// The credit-balance and spend-limit 400s, and a 429 without a retry value (a spend cap
    /// carries none, SPEC §11.3).
    fn needs_body(&self, policy: &Policy, status: StatusCode, headers: &HeaderMap) -> bool {
        match status.as_u16() {
            400 => policy.disable_on_billing,
            429 => !has_retry_value(headers),
            _ => false,
        }
    }

    /// The table of SPEC §4: 429 cools (retry delay), 401 and 403 per the policy, 402 and the
    /// credit-balance 400 disable (billing), 529 per the policy, everything else is delivered.
    fn classify(
        &self,
        policy: &Policy,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        wall: SystemTime,
    ) -> Verdict {
        match status.as_u16() {
            429 if !has_retry_value(headers)
                && error_detail_code(body).as_deref() == Some(SPEND_LIMIT_CODE) =>
            {
                spend_capped_until(crate::civil::first_of_next_month(wall), wall)
            }
            429 => Verdict::CoolDown {
                duration: self.retry_delay(policy, headers, body, wall),
                reason: CoolReason::RateLimited,
            },
            401 => match policy.on_unauthorized {
                OnUnauthorized::Disable => Verdict::Disable {
                    reason: DisableReason::Unauthorized,
                },
                OnUnauthorized::CoolFor(duration) => Verdict::CoolDown {
                    duration: policy.bound(duration),
                    reason: CoolReason::Auth,
                },
            },
            403 => match policy.on_forbidden {
                OnForbidden::Disable => Verdict::Disable {
                    reason: DisableReason::Forbidden,
                },
                OnForbidden::Deliver => Verdict::Deliver,
            },
            402 if policy.disable_on_billing => Verdict::Disable {
                reason: DisableReason::Billing,
            },
            400 if policy.disable_on_billing && is_credit_balance_error(body) => Verdict::Disable {
                reason: DisableReason::Billing,
            },
            400 if policy.disable_on_billing => match usage_limit_until(body) {
                Some(until) => spend_capped_until(until, wall),
                None => Verdict::Deliver,
            },
            529 => match policy.cool_on_overloaded {
                Some(duration) => Verdict::CoolDown {
                    duration: policy.bound(duration),
                    reason: CoolReason::Overloaded,
                },
                None => Verdict::Deliver,
            },
            _ => Verdict::Deliver,
        }
    }

    /// `retry-after-ms`, `retry-after` (seconds or HTTP-date): [`Policy::retry_delay`].
    fn retry_delay(&self, policy: &Policy, headers: &HeaderMap, _body: &[u8], wall: SystemTime) -> Duration {
        policy.retry_delay(headers, wall)
    }

    fn event_role(&self, frame: &RawEvent<'_>) -> EventRole {
        match frame.name() {
            Some("message_start" | "ping") => EventRole::Preamble,
            Some("message_stop") => EventRole::End,
            Some("error") => EventRole::Error,
            _ => EventRole::Content,
        }
    }

    /// The status of the event's `error.type` ([`status_for_error_type`]); unreadable data is
    /// `api_error`, a 500.
    fn in_band_status(&self, data: &[u8]) -> StatusCode {
        let error_type = in_band_error_type(data);
        status_for_error_type(error_type.as_deref().unwrap_or("api_error"))
    }

    fn error_type(&self, status: StatusCode) -> &'static str {
        error_type_for_status(status)
    }

    fn error_body(&self, status: StatusCode, message: &str, request_id: Option<&str>) -> Bytes {
        error_body(error_type_for_status(status), message, request_id)
    }

    /// `{"type":"error","error":{"type":"...","message":"..."}}`.
    fn is_error_body(&self, body: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
            v["type"] == "error" && v["error"]["type"].is_string() && v["error"]["message"].is_string()
        })
    }

    fn error_event(&self, message: &str, _dialect: Dialect) -> Bytes {
        error_event(message)
    }

    /// `529 Overloaded` (the status of `overloaded_error`).
    fn reason_phrase(&self, status: StatusCode) -> Option<&'static str> {
        (status.as_u16() == 529).then_some("Overloaded")
    }

    /// The top-level `request_id` of Anthropic's error bodies, added when missing: the upstream's
    /// bytes are kept as they are and `,"request_id":"..."` goes before the closing brace.
    fn with_request_id(&self, body: &Bytes, request_id: &str) -> Bytes {
        #[derive(Deserialize)]
        struct Id<'a> {
            #[serde(borrow, default)]
            request_id: Option<std::borrow::Cow<'a, str>>,
        }
        let has_id = match serde_json::from_slice::<Id<'_>>(body) {
            Ok(id) => id.request_id.is_some_and(|id| !id.is_empty()),
            Err(_) => return body.clone(),
        };
        let text = body.trim_ascii_end();
        let (Some(head), false) = (text.strip_suffix(b"}"), has_id) else {
            return body.clone();
        };
        let Ok(id) = serde_json::to_string(request_id) else {
            return body.clone();
        };
        let mut out = Vec::with_capacity(text.len() + id.len() + 16);
        out.extend_from_slice(head);
        out.extend_from_slice(b",\"request_id\":");
        out.extend_from_slice(id.as_bytes());
        out.push(b'}');
        Bytes::from(out)
    }

    fn request_id_header(&self) -> HeaderName {
        HeaderName::from_static("request-id")
    }

    /// `claude-opus-*` → `opus`, `claude-sonnet-*` → `sonnet`, `claude-haiku-*` → `haiku` (also
    /// the older `claude-3-5-sonnet-…` naming); other ids without their date suffix.
    fn model_family<'m>(&self, model: &'m str) -> &'m str {
        if let Some(rest) = model.strip_prefix("claude-") {
            for family in ["opus", "sonnet", "haiku"] {
                if rest.split('-').any(|part| part == family) {
                    // `family` is one of three static names; return the slice of `model` that
                    // spells it, so the lifetime is the model's.
                    if let Some(at) = model.find(family) {
                        return &model[at..at + family.len()];
                    }
                }
            }
        }
        super::strip_date_suffix(model)
    }

    fn scope<'h>(&self, headers: &'h HeaderMap) -> Option<(&'h str, Option<&'h str>)> {
        let text = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        Some((text(&ORGANIZATION_HEADER)?, text(&WORKSPACE_HEADER)))
    }

    /// `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-remaining: 0` → the
    /// matching `-reset` (RFC 3339), measured from the answer's `date` (else `wall`).
    fn exhaustion_hint(&self, headers: &HeaderMap, wall: SystemTime) -> Option<Duration> {
        // Every answer is looked at: one pass over its names finds whether any dimension is
        // exhausted at all, before any lookup or date parsing.
        let any = headers.iter().any(|(name, value)| {
            let name = name.as_str();
            name.starts_with("anthropic-ratelimit-")
                && name.ends_with("-remaining")
                && value.as_bytes().trim_ascii() == b"0"
        });
        if !any {
            return None;
        }
        let mut exhausted = RATE_LIMIT_DIMENSIONS
            .iter()
            .filter(|(remaining, _)| {
                headers
                    .get(remaining)
                    .is_some_and(|v| v.as_bytes().trim_ascii() == b"0")
            })
            .peekable();
        exhausted.peek()?;
        let base = headers
            .get(http::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
            .unwrap_or(wall);
        exhausted
            .filter_map(|(_, reset)| {
                let at = crate::civil::parse_rfc3339(headers.get(reset)?.to_str().ok()?)?;
                at.duration_since(base).ok().filter(|d| !d.is_zero())
            })
            .max()
    }

    /// `error.type` and `error.details.error_code`.
    fn error_code(&self, body: &[u8]) -> (Option<String>, Option<String>) {
        let v: serde_json::Value = match serde_json::from_slice(&body[..body.len().min(MAX_CLASSIFY_BODY)]) {
            Ok(v) => v,
            Err(_) => return (None, None),
        };
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        (
            text(&v["error"]["type"]),
            text(&v["error"]["details"]["error_code"]),
        )
    }

    fn identity_headers(&self) -> &'static [HeaderName] {
        static HEADERS: [HeaderName; 2] = [ORGANIZATION_HEADER, WORKSPACE_HEADER];
        &HEADERS
    }

    fn exhaustion_headers(&self, exhausted: Exhausted, headers: &mut HeaderMap) {
        match exhausted {
            Exhausted::RateLimited { retry_after } => {
                let (secs, millis) = retry_after_headers(retry_after);
                headers.insert(http::header::RETRY_AFTER, secs);
                headers.insert("retry-after-ms", millis);
                headers.insert("x-should-retry", HeaderValue::from_static("true"));
            }
            Exhausted::AllDisabled => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
    }
}

/// The header that names a key's organisation.
const ORGANIZATION_HEADER: HeaderName = HeaderName::from_static("anthropic-organization-id");
/// The header that names a key's workspace.
const WORKSPACE_HEADER: HeaderName = HeaderName::from_static("anthropic-workspace-id");
/// `error.details.error_code` of a 429 that is a spend cap, not a rate limit (SPEC §11.3).
const SPEND_LIMIT_CODE: &str = "enforced_spend_limit_reached";
/// The rate-limit dimensions: `(remaining header, reset header)`.
static RATE_LIMIT_DIMENSIONS: [(HeaderName, HeaderName); 4] = [
    (
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
    ),
    (
        HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-reset"),
    ),
];

/// Whether a 429 says when to retry (then it is a rate limit, whatever its body).
fn has_retry_value(headers: &HeaderMap) -> bool {
    headers.contains_key("retry-after-ms") || headers.contains_key(http::header::RETRY_AFTER)
}

/// `error.details.error_code` of an error body.
fn error_detail_code(body: &[u8]) -> Option<String> {
    Anthropic.error_code(body).1
}

/// The spend-cap verdict: the key (and its organisation) rests until `until`, however far away
/// (not capped by the policy's maximum cooldown: the upstream will not serve it before).
fn spend_capped_until(until: SystemTime, wall: SystemTime) -> Verdict {
    Verdict::CoolDown {
        duration: until
            .duration_since(wall)
            .unwrap_or_default()
            .max(Duration::from_secs(1)),
        reason: CoolReason::SpendCapped,
    }
}

/// The date of a 400 "You have reached your specified … API usage limits … You will regain
/// access on DATE" (SPEC §11.3).
fn usage_limit_until(body: &[u8]) -> Option<SystemTime> {
    let v: serde_json::Value = serde_json::from_slice(&body[..body.len().min(MAX_CLASSIFY_BODY)]).ok()?;
    let message = v["error"]["message"].as_str()?;
    let lower = message.to_ascii_lowercase();
    if !(lower.contains("usage limits") && lower.contains("regain access")) {
        return None;
    }
    crate::civil::find_date(message)
}

/// Whether a 400 body is Anthropic's "credit balance is too low" error.
fn is_credit_balance_error(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        error: Inner<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(borrow, default)]
        message: std::borrow::Cow<'a, str>,
    }
    let body = &body[..body.len().min(MAX_CLASSIFY_BODY)];
    serde_json::from_slice::<Envelope<'_>>(body)
        .map(|e| {
            e.error
                .message
                .to_ascii_lowercase()
                .contains("credit balance is too low")
        })
        .unwrap_or(false)
}

/// Anthropic's `error.type` for an HTTP status.
pub fn error_type_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// The HTTP status of an Anthropic `error.type` (for in-band stream errors that keypool
/// turns into HTTP responses before commit). Unknown types are `500 api_error`.
pub fn status_for_error_type(error_type: &str) -> StatusCode {
    let code = match error_type {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    };
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Serialize, Deserialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    message: std::borrow::Cow<'a, str>,
}

/// An Anthropic-shaped error body:
/// `{"type":"error","error":{"type":..., "message":...},"request_id":...}`.
pub fn error_body(error_type: &str, message: &str, request_id: Option<&str>) -> Bytes {
    let body = ErrorEnvelope {
        kind: "error",
        error: ErrorDetail {
            kind: error_type.into(),
            message: message.into(),
        },
        request_id,
    };
    // Serialising a struct of strings into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// One SSE `error` event with `api_error`, as keypool writes it when a committed stream breaks.
pub fn error_event(message: &str) -> Bytes {
    let data = error_body("api_error", message, None);
    let mut out = Vec::with_capacity(data.len() + 22);
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The `error.type` of an in-band error event's data (`{"type":"error","error":{"type":...}}`).
pub fn in_band_error_type(data: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        error: ErrorDetail<'a>,
    }
    serde_json::from_slice::<Envelope<'_>>(data)
        .ok()
        .map(|e| e.error.kind.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        let (s, ms) = retry_after_headers(Duration::from_millis(200));
        assert_eq!((s.to_str().unwrap(), ms.to_str().unwrap()), ("1", "200"));
        let (s, ms) = retry_after_headers(Duration::from_secs(3));
        assert_eq!((s.to_str().unwrap(), ms.to_str().unwrap()), ("3", "3000"));
        let (s, ms) = retry_after_headers(Duration::from_nanos(3_000_000_001));
        assert_eq!((s.to_str().unwrap(), ms.to_str().unwrap()), ("4", "3001"));
    }

    #[test]
    fn bodies() {
        let b = error_body("rate_limit_error", "all \"3\" keys", Some("req_1"));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["message"], "all \"3\" keys");
        assert_eq!(v["request_id"], "req_1");
        let e = error_event("upstream reset");
        assert!(e.starts_with(b"event: error\ndata: {\"type\":\"error\""));
        assert!(e.ends_with(b"}\n\n"));
        assert_eq!(
            in_band_error_type(br#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#)
                .as_deref(),
            Some("overloaded_error")
        );
        assert_eq!(in_band_error_type(b"nope"), None);
        assert_eq!(status_for_error_type("overloaded_error").as_u16(), 529);
        assert_eq!(human_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(human_duration(Duration::from_millis(2100)), "3s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m 5s");
        assert_eq!(human_duration(Duration::from_secs(3600)), "1h");
        // The longest duration renders without overflow (found by the call_ops fuzzer).
        assert!(human_duration(Duration::MAX).ends_with('m'));
    }

    #[test]
    fn in_band_bodies_get_a_request_id_and_529_a_phrase() {
        let p = Anthropic;
        let upstream = Bytes::from_static(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        let v: serde_json::Value =
            serde_json::from_slice(&p.with_request_id(&upstream, "req_keypool_1")).unwrap();
        assert_eq!(v["request_id"], "req_keypool_1");
        assert_eq!(v["error"]["message"], "Overloaded");
        assert_eq!(
            p.with_request_id(&upstream, "req_keypool_1"),
            Bytes::from_static(
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_keypool_1"}"#
            )
        );
        let own = error_body("api_error", "x", Some("req_upstream"));
        assert_eq!(p.with_request_id(&own, "req_keypool_2"), own);
        assert_eq!(
            p.with_request_id(&Bytes::from_static(b"nope"), "r"),
            Bytes::from_static(b"nope")
        );
        assert_eq!(
            p.reason_phrase(StatusCode::from_u16(529).unwrap()),
            Some("Overloaded")
        );
        assert_eq!(p.reason_phrase(StatusCode::OK), None);
    }

    #[test]
    fn provider() {
        use crate::sse::Framer;
        let p = Anthropic;
        let mut framer = Framer::new();
        framer.feed(&Bytes::from_static(
            b"event: message_start\ndata: {}\n\nevent: ping\ndata: {}\n\nevent: content_block_start\ndata: {}\n\nevent: message_stop\ndata: {}\n\nevent: error\ndata: {}\n\ndata: {}\n\n",
        ));
        let mut roles = Vec::new();
        while let Some(Ok(frame)) = framer.next_frame() {
            roles.push(p.event_role(&frame));
        }
        use EventRole::*;
        assert_eq!(roles, [Preamble, Preamble, Content, End, Error, Content]);

        let mut h = HeaderMap::new();
        assert_eq!(p.client_credential(&h), None);
        h.insert("authorization", "Bearer  tok ".parse().unwrap());
        assert_eq!(p.client_credential(&h), Some(&b"tok"[..]));
        h.insert("x-api-key", "".parse().unwrap());
        assert_eq!(
            p.client_credential(&h),
            None,
            "an empty x-api-key wins over Authorization"
        );
        h.insert("x-api-key", "key".parse().unwrap());
        assert_eq!(p.client_credential(&h), Some(&b"key"[..]));

        let mut h = HeaderMap::new();
        p.insert_key(&mut h, &Secret::new("sk-ant-0123456789").unwrap());
        assert!(h[KEY_HEADER].is_sensitive());
        let overloaded = br#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#;
        assert_eq!(p.in_band_status(overloaded).as_u16(), 529);
        assert_eq!(p.in_band_status(b"garbage").as_u16(), 500);
        assert!(p.is_error_body(overloaded));
        assert!(!p.is_error_body(br#"{"error":{"message":"x"}}"#));
        assert_eq!(
            p.error_body(StatusCode::TOO_MANY_REQUESTS, "m", None),
            error_body("rate_limit_error", "m", None)
        );
    }
}
