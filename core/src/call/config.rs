//! What a call needs besides the request: whose key, the commit point, the timers, the policy,
//! the profile, and where its marks go.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use super::KeyMark;
use crate::policy::{Policy, Verdict};
use crate::pool::Pool;
use crate::profile::Profile;
use crate::secret::Secret;

/// Whose key the call uses.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Keys from the pool, with failover.
    Pool(Arc<Pool>),
    /// The caller's own key (BYOK), sent once in the profile's key header; the pool is never
    /// touched.
    Key(Secret),
    /// The caller's own credential headers, kept as they are and sent once (gateway BYOK).
    Passthrough,
}

/// When a streaming call stops being able to fail over (SPEC §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitPoint {
    /// The moment the first whole event is forwarded (default).
    #[default]
    FirstByte,
    /// `message_start` and `ping` are held back until the first `content_block_start` (or any
    /// other event), or until `hold` has passed since the response head.
    FirstContent {
        /// The longest time events are held.
        hold: Duration,
    },
}

impl CommitPoint {
    /// The default hold time of [`CommitPoint::FirstContent`].
    pub const DEFAULT_HOLD: Duration = Duration::from_secs(2);

    /// `FirstContent` with the default hold time.
    pub fn first_content() -> Self {
        Self::FirstContent {
            hold: Self::DEFAULT_HOLD,
        }
    }
}

/// The call's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From sending an attempt to its response head (default 600 s: a non-streaming answer
    /// only arrives when the whole message is generated).
    pub first_byte: Duration,
    /// Longest gap between two body chunks (default 120 s).
    pub idle: Duration,
    /// For the adapter's connector: the longest TCP + TLS connect (default 10 s). The call does
    /// not time this itself; a connect timeout arrives as
    /// [`TransportError::Connect`](super::TransportError::Connect).
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            first_byte: Duration::from_secs(600),
            idle: Duration::from_secs(120),
            connect: Duration::from_secs(10),
        }
    }
}

/// Where an adapter's driver hands the marks its calls make ([`Output::Mark`](super::Output::Mark),
/// through [`Call::report`](super::Call::report)): logs, metrics, a state backend that shares them with other processes.
/// Called on the request path: it must not block (queue, don't write to a socket).
pub trait MarkSink: Send + Sync + std::fmt::Debug {
    /// A call on `pool` made `mark` (already applied to the pool).
    fn mark(&self, pool: &Arc<Pool>, mark: &KeyMark);
}

/// Everything a call needs besides the request: cheap to copy, shared by all calls of a client.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CallConfig {
    /// How upstream answers are classified.
    pub policy: Policy,
    /// The commit point of streaming calls.
    pub commit: CommitPoint,
    /// Timers.
    pub timeouts: Timeouts,
    /// Largest SSE event accepted (default 16 MiB).
    pub max_event_size: Option<usize>,
    /// Receives every mark the calls make (none by default).
    pub marks: Option<Arc<dyn MarkSink>>,
    /// The upstream API: key header, classification table, event roles, error shapes
    /// (default: [`Profile::anthropic`]).
    pub profile: Profile,
}

impl CallConfig {
    /// Sets the commit point.
    pub fn with_commit(mut self, commit: CommitPoint) -> Self {
        self.commit = commit;
        self
    }
    /// Sets the policy.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }
    /// Sets the timers.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }
    /// Sets the sink that receives every mark.
    pub fn with_mark_sink(mut self, sink: Arc<dyn MarkSink>) -> Self {
        self.marks = Some(sink);
        self
    }
    /// Sets the provider profile.
    pub fn with_profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }
    /// Whether classifying `status` needs the error body: the profile's table, or a policy rule.
    pub(super) fn needs_body(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        self.policy.needs_body_with(&*self.profile, status, headers)
    }
    /// The operator's rules, then the profile's table.
    pub(super) fn classify(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        wall: SystemTime,
    ) -> Verdict {
        self.policy
            .classify_with(&*self.profile, status, headers, body, wall)
    }
}
