//! What can go wrong in a call, as typed errors that render to Anthropic-shaped responses.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::anthropic;
use crate::walk::Exhausted;

/// A transport failure reported by an adapter (the single input enum for every runtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportError {
    /// The TCP connection could not be made (refused, unreachable, connect timeout).
    Connect,
    /// The upstream host name did not resolve.
    Dns,
    /// The TLS handshake failed.
    Tls,
    /// The connection was reset.
    Reset,
    /// The connection closed before the response (head or body) was complete.
    Eof,
    /// A timeout enforced by the adapter's IO layer (for example while connecting).
    Timeout,
    /// The upstream broke the HTTP protocol (a malformed head, a bad chunk).
    Protocol,
}

impl TransportError {
    fn describe(self) -> &'static str {
        match self {
            Self::Connect => "could not connect to the upstream",
            Self::Dns => "could not resolve the upstream host",
            Self::Tls => "the TLS handshake with the upstream failed",
            Self::Reset => "the upstream connection was reset",
            Self::Eof => "the upstream closed the connection early",
            Self::Timeout => "the upstream did not answer in time",
            Self::Protocol => "the upstream sent a malformed HTTP response",
        }
    }
}

/// Which of the call's timers expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutPhase {
    /// No response head within the first-byte timeout.
    Head,
    /// No body data within the idle timeout.
    Idle,
}

/// Why a stream stopped before `message_stop`, after it was committed to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamBreak {
    /// A transport failure.
    Transport(TransportError),
    /// The body ended cleanly but before `message_stop`.
    EndedEarly,
    /// No data within the idle timeout.
    Idle(Duration),
    /// An event exceeded the size limit.
    EventTooLarge,
}

/// Everything keypool itself can answer instead of an upstream response. Render with
/// [`to_response`](Self::to_response); the message never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No key was left (SPEC §6): `429 rate_limit_error` or `502 api_error`.
    #[error("{}", exhausted_message(*.exhausted, *.keys))]
    Exhausted {
        /// Why no key is left.
        exhausted: Exhausted,
        /// How many keys the pool has.
        keys: usize,
    },
    /// The upstream could not be reached, or failed before the response head or the first event:
    /// `502 api_error`.
    #[error("{}", .0.describe())]
    Transport(TransportError),
    /// The upstream did not answer in time: `504 timeout_error`.
    #[error("the upstream did not answer within {}", anthropic::human_duration(*.after))]
    Timeout {
        /// Which timer.
        phase: TimeoutPhase,
        /// Its length.
        after: Duration,
    },
    /// The upstream opened an event stream but it ended or broke before its first event:
    /// `502 api_error`.
    #[error("the upstream event stream ended before its first event")]
    EmptyStream,
    /// An in-band `error` event arrived before commit and is delivered as the matching HTTP error
    /// (for example `overloaded_error` as 529). The body is the event's data, unchanged when it
    /// is an Anthropic error object; anything else is replaced by one that keypool renders, so
    /// the caller always gets the Anthropic shape (SPEC §6).
    #[error("the upstream answered with an in-band {status} error before any content")]
    InBand {
        /// The HTTP status matching the event's `error.type`.
        status: StatusCode,
        /// The event's data (an Anthropic error object).
        body: Bytes,
    },
    /// A committed stream broke; the caller got whole events and one synthesized `error` event.
    #[error("{}", break_message(*.0))]
    StreamBroken(StreamBreak),
    /// A delivered (non-stream) body broke after its head was sent.
    #[error("the upstream response body broke: {}", break_message(*.0))]
    BodyBroken(StreamBreak),
}

fn exhausted_message(exhausted: Exhausted, keys: usize) -> String {
    let all = if keys == 1 {
        "the only configured key is".to_owned()
    } else {
        format!("all {keys} configured keys are")
    };
    match exhausted {
        Exhausted::RateLimited { retry_after } => format!(
            "{all} rate-limited or unavailable; the first frees up in {}",
            anthropic::human_duration(retry_after)
        ),
        Exhausted::AllDisabled => {
            format!("{all} disabled (rejected by the upstream or by an operator); re-enable or replace a key")
        }
    }
}

fn break_message(b: StreamBreak) -> String {
    match b {
        StreamBreak::Transport(t) => format!("{}; the response is incomplete", t.describe()),
        StreamBreak::EndedEarly => "the upstream stream ended before message_stop".to_owned(),
        StreamBreak::Idle(d) => format!(
            "the upstream stream sent nothing for {}; the response is incomplete",
            anthropic::human_duration(d)
        ),
        StreamBreak::EventTooLarge => {
            "the upstream sent an event larger than the configured limit".to_owned()
        }
    }
}

/// Whether `body` is an Anthropic error object:
/// `{"type":"error","error":{"type":"...","message":"..."}}`.
fn is_error_object(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
        v["type"] == "error" && v["error"]["type"].is_string() && v["error"]["message"].is_string()
    })
}

impl CallError {
    /// The HTTP status of the rendered response.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Exhausted {
                exhausted: Exhausted::RateLimited { .. },
                ..
            } => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::InBand { status, .. } => *status,
            Self::Exhausted { .. }
            | Self::Transport(_)
            | Self::EmptyStream
            | Self::StreamBroken(_)
            | Self::BodyBroken(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Anthropic's `error.type` for this error.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InBand { status, .. } => anthropic::error_type_for_status(*status),
            _ => anthropic::error_type_for_status(self.status()),
        }
    }

    /// The Anthropic-shaped HTTP response for this error (SPEC §6), with `request_id` in the body
    /// and in the `request-id` header.
    pub fn to_response(&self, request_id: &str) -> Response<Bytes> {
        let body = match self {
            Self::InBand { body, .. } if is_error_object(body) => body.clone(),
            _ => anthropic::error_body(self.error_type(), &self.to_string(), Some(request_id)),
        };
        let mut res = Response::new(body);
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("request-id", v);
        }
        match self {
            Self::Exhausted {
                exhausted: Exhausted::RateLimited { retry_after },
                ..
            } => {
                let (secs, millis) = anthropic::retry_after_headers(*retry_after);
                h.insert(header::RETRY_AFTER, secs);
                h.insert("retry-after-ms", millis);
                h.insert("x-should-retry", HeaderValue::from_static("true"));
            }
            Self::Exhausted { .. } => {
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        res
    }

    /// The SSE `error` event written after the last whole event when a committed stream breaks.
    pub fn to_event(&self) -> Bytes {
        anthropic::error_event(&self.to_string())
    }
}
