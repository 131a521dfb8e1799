//! The Anthropic provider profile: which headers carry credentials, how errors look on the
//! wire, and which in-band error types map to which HTTP status (SPEC §6).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

/// The header keypool writes the pool key into.
pub const KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// Headers that carry a client's own credential. They are removed from pooled calls.
pub const CREDENTIAL_HEADERS: [HeaderName; 2] = [KEY_HEADER, http::header::AUTHORIZATION];

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

/// `retry-after` in whole seconds, rounded up (200 ms → `1`), and `retry-after-ms` rounded up.
pub fn retry_after_headers(retry_after: Duration) -> (HeaderValue, HeaderValue) {
    let nanos = retry_after.as_nanos();
    let secs = nanos.div_ceil(1_000_000_000).max(1);
    let millis = nanos.div_ceil(1_000_000).max(1);
    (HeaderValue::from(secs as u64), HeaderValue::from(millis as u64))
}

/// A human duration for messages: `3s`, `1m 5s`, `250ms`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{}ms", ms.max(1));
    }
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        _ if secs.is_multiple_of(3600) => format!("{}h", secs / 3600),
        _ => format!("{}h {}m", secs / 3600, (secs % 3600).div_ceil(60)),
    }
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
}
