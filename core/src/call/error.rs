//! What can go wrong in a call, as typed errors that a provider profile renders as responses.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::profile::{Dialect, Profile, human_duration};
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
    /// A timeout enforced by the adapter's IO layer. It stands for the call's own timer of the
    /// phase it fires in: before a head the first-byte timeout, while a delivered body is read
    /// the idle timeout ([`StreamBreak::Idle`]).
    Timeout,
    /// The upstream broke the HTTP protocol (a malformed head, a bad chunk).
    Protocol,
}

/// What an IO error of the adapter's transport means to the call (the one mapping every adapter
/// uses for `std::io` errors).
impl From<std::io::ErrorKind> for TransportError {
    fn from(kind: std::io::ErrorKind) -> Self {
        use std::io::ErrorKind;
        match kind {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Self::Timeout,
            ErrorKind::ConnectionRefused => Self::Connect,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => Self::Reset,
            ErrorKind::UnexpectedEof => Self::Eof,
            ErrorKind::InvalidData => Self::Protocol,
            _ => Self::Reset,
        }
    }
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

/// Why a stream stopped before its end event (Anthropic: `message_stop`), after it was committed
/// to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamBreak {
    /// A transport failure.
    Transport(TransportError),
    /// The body ended cleanly but before the end event.
    EndedEarly,
    /// No data within the idle timeout.
    Idle(Duration),
    /// An event exceeded the size limit.
    EventTooLarge,
}

/// Everything keypool itself can answer instead of an upstream response. Render with
/// [`to_response_for`](Self::to_response_for) (a call renders with its profile); the message
/// never contains a secret.
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
    #[error("the upstream did not answer within {}", human_duration(*.after))]
    Timeout {
        /// Which timer.
        phase: TimeoutPhase,
        /// Its length.
        after: Duration,
    },
    /// The upstream opened an event stream but it ended before its first content event (it may
    /// have sent preamble events, such as Anthropic's `message_start`, that the `first-content`
    /// commit point held back): `502 api_error`.
    #[error("the upstream event stream ended before its first content event")]
    EmptyStream,
    /// An in-band error event arrived before commit and is delivered as the matching HTTP error
    /// (for example Anthropic's `overloaded_error` as 529). The body is the event's data,
    /// unchanged when it is the profile's error object; anything else is replaced by one that
    /// keypool renders, so the caller always gets the profile's shape (SPEC §6).
    #[error(
        "the upstream sent an in-band error event before any content (answered as HTTP {})",
        .status.as_u16()
    )]
    InBand {
        /// The HTTP status matching the event's error type.
        status: StatusCode,
        /// The event's data (usually the profile's error object).
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
            human_duration(retry_after)
        ),
        Exhausted::AllDisabled => {
            format!("{all} disabled (rejected by the upstream or by an operator); re-enable or replace a key")
        }
    }
}

fn break_message(b: StreamBreak) -> String {
    match b {
        StreamBreak::Transport(t) => format!("{}; the response is incomplete", t.describe()),
        StreamBreak::EndedEarly => "the upstream stream ended before its final event".to_owned(),
        StreamBreak::Idle(d) => format!(
            "the upstream stream sent nothing for {}; the response is incomplete",
            human_duration(d)
        ),
        StreamBreak::EventTooLarge => {
            "the upstream sent an event larger than the configured limit".to_owned()
        }
    }
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

    /// Anthropic's `error.type` for this error ([`error_type_for`](Self::error_type_for) with the
    /// default profile).
    pub fn error_type(&self) -> &'static str {
        self.error_type_for(&Profile::anthropic())
    }

    /// The profile's error type for this error.
    pub fn error_type_for(&self, profile: &Profile) -> &'static str {
        profile.error_type(self.status())
    }

    /// The Anthropic-shaped HTTP response for this error (SPEC §6):
    /// [`to_response_for`](Self::to_response_for) with the default profile.
    pub fn to_response(&self, request_id: &str) -> Response<Bytes> {
        self.to_response_for(&Profile::anthropic(), request_id)
    }

    /// The HTTP response for this error in the profile's shape (SPEC §6), with `request_id` in
    /// the body and in the profile's request-id header. An in-band error keeps its body when it
    /// already is the profile's error object, with the request id added
    /// ([`Provider::with_request_id`](crate::profile::Provider::with_request_id)).
    pub fn to_response_for(&self, profile: &Profile, request_id: &str) -> Response<Bytes> {
        let body = match self {
            Self::InBand { body, .. } if profile.is_error_body(body) => {
                profile.with_request_id(body, request_id)
            }
            _ => profile.error_body(self.status(), &self.to_string(), Some(request_id)),
        };
        let mut res = Response::new(body);
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert(profile.request_id_header(), v);
        }
        if let Self::Exhausted { exhausted, .. } = self {
            profile.exhaustion_headers(*exhausted, h);
        }
        res
    }

    /// The Anthropic SSE `error` event written after the last whole event when a committed
    /// stream breaks: [`to_event_for`](Self::to_event_for) with the default profile.
    pub fn to_event(&self) -> Bytes {
        self.to_event_for(&Profile::anthropic(), Dialect::DEFAULT)
    }

    /// The profile's SSE error event for this error, in the stream's dialect
    /// ([`Provider::stream_dialect`](crate::profile::Provider::stream_dialect)).
    pub fn to_event_for(&self, profile: &Profile, dialect: Dialect) -> Bytes {
        profile.error_event(&self.to_string(), dialect)
    }
}
