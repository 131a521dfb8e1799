//! How a call ended: the core's answer, for logs and metrics (SPEC §13).

use super::error::{CallError, StreamBreak};
use crate::walk::Exhausted;

/// How a call ended ([`Call::outcome`](super::Call::outcome)). Decided by the call itself at the
/// moment it ends, never inferred from how far a caller read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The delivered response reached its end: a plain body its framing's end (or its
    /// `content-length`), an event stream its end after `message_stop`.
    Complete,
    /// The delivered body broke: a reset, an EOF or an end before `message_stop`, an oversized
    /// event. Never [`StreamBreak::Idle`]: that is [`Outcome::Timeout`].
    UpstreamBroke(StreamBreak),
    /// The stream relayed an in-band `error` event after its commit point and ended with it.
    UpstreamError,
    /// The delivered body sent nothing within the idle timeout.
    Timeout,
    /// The caller went away before the end ([`Call::handle_caller_gone`](super::Call::handle_caller_gone)).
    ClientGone,
    /// keypool answered with its own error response instead of an upstream head.
    Failed(FailureKind),
}

/// What kind of error response keypool answered with ([`Outcome::Failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// Every key is cooling (429 `rate_limit_error`).
    RateLimited,
    /// Every key is disabled (502).
    AllDisabled,
    /// The upstream could not be reached, or broke before the head or the first event (502).
    Transport,
    /// No head within the first-byte timeout, or no event before the idle timeout (504).
    Timeout,
    /// An event stream that ended before its first event (502).
    EmptyStream,
    /// An in-band `error` event before the commit point, answered as the matching HTTP error.
    InBand,
}

impl Outcome {
    /// How a call that ends with `error` ended: a failure for errors answered instead of a head,
    /// a break (or the idle timeout) for errors after one.
    pub fn of_error(error: &CallError) -> Self {
        let kind = match error {
            CallError::StreamBroken(StreamBreak::Idle(_)) | CallError::BodyBroken(StreamBreak::Idle(_)) => {
                return Self::Timeout;
            }
            CallError::StreamBroken(why) | CallError::BodyBroken(why) => return Self::UpstreamBroke(*why),
            CallError::Exhausted {
                exhausted: Exhausted::RateLimited { .. },
                ..
            } => FailureKind::RateLimited,
            CallError::Exhausted {
                exhausted: Exhausted::AllDisabled,
                ..
            } => FailureKind::AllDisabled,
            CallError::Transport(_) => FailureKind::Transport,
            CallError::Timeout { .. } => FailureKind::Timeout,
            CallError::EmptyStream => FailureKind::EmptyStream,
            CallError::InBand { .. } => FailureKind::InBand,
        };
        Self::Failed(kind)
    }

    /// The outcome's name in logs and metric labels: `complete`, `upstream_broke`,
    /// `upstream_error`, `timeout`, `client_gone`, or `failed_` and the [`FailureKind`]
    /// (`failed_rate_limited`, `failed_all_disabled`, `failed_transport`, `failed_timeout`,
    /// `failed_empty_stream`, `failed_in_band`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::UpstreamBroke(_) => "upstream_broke",
            Self::UpstreamError => "upstream_error",
            Self::Timeout => "timeout",
            Self::ClientGone => "client_gone",
            Self::Failed(FailureKind::RateLimited) => "failed_rate_limited",
            Self::Failed(FailureKind::AllDisabled) => "failed_all_disabled",
            Self::Failed(FailureKind::Transport) => "failed_transport",
            Self::Failed(FailureKind::Timeout) => "failed_timeout",
            Self::Failed(FailureKind::EmptyStream) => "failed_empty_stream",
            Self::Failed(FailureKind::InBand) => "failed_in_band",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
