//! The failover state machine of one upstream call (SPEC §3, §5).
//!
//! A [`Call`] makes every decision; an adapter only moves bytes and reads clocks. The adapter
//! feeds what happens through the `handle_*` methods and, after each of them (and once after
//! [`Call::new`]), drains the outputs of the call's phase.
//!
//! **Before a response head is delivered**, drain [`Call::poll_output`] until it returns
//! [`Output::Wait`], [`Output::Head`] or [`Output::Fail`]:
//!
//! 1. [`Output::Send`] — start this attempt upstream. Any previous exchange is over: drop it
//!    (or drain it in the background for connection reuse).
//! 2. [`Output::Mark`] — the call marked a key (already applied to the pool): hand the portable
//!    [`Mark`] to a state backend, log it, count it ([`Call::report`]). It always comes before
//!    the `Send` of the attempt that follows it.
//! 3. [`Output::Head`] — give this response head to the caller. The body phase begins: from now
//!    on drain [`Call::poll_body`] instead.
//! 4. [`Output::Fail`] — answer the caller with this error response instead of any head. The
//!    call is over; stop reading the upstream.
//! 5. [`Output::Wait`] — read the next input of the current exchange (its head, or the start of
//!    its body), and call [`Call::handle_timeout`] if the given deadline passes first.
//!
//! **After the head**, drain [`Call::poll_body`] until it returns [`BodyOutput::Wait`] or the
//! call is over:
//!
//! 1. [`BodyOutput::Body`] — give these bytes (never empty) to the caller. For an event stream
//!    they are always whole events, every complete event of the upstream chunk at once.
//! 2. [`BodyOutput::Abort`] — the delivered body broke: write the event (if any), then end the
//!    body (with an error for a plain body). The call is over.
//! 3. [`BodyOutput::Wait`] — read the next body input of the exchange, and call
//!    [`Call::handle_timeout`] if the given deadline passes first.
//! 4. [`BodyOutput::Done`] — the body is complete; the call is over. Stop reading the upstream.
//!
//! Each method returns only what its phase can produce. Out of its phase a method has nothing
//! for the caller: `poll_output` after a head or a failure says `Wait`, `poll_body` before a
//! head says `Wait` and after a failure `Done`. Once the call is over, [`Call::outcome`] says
//! how it ended.
//!
//! Key marks are made by the call itself, through [`Pool::apply`](crate::Pool::apply), the moment a verdict is known
//! (so the very next pick, of this call or any other, sees them), and handed out once as
//! [`Output::Mark`]. A mark carries the key's generation at the time its request was sent, so an
//! operator's enable that came in between wins over it.

mod config;
mod error;
mod events;
pub(crate) mod headers;
mod io;
mod outcome;
mod queue;
mod relay;
mod timer;

use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};

use queue::Queue;

pub use config::{CallConfig, CommitPoint, Credential, MarkSink, Timeouts};
pub use error::{CallError, StreamBreak, TimeoutPhase, TransportError};
pub use io::{Abort, Attempt, BodyKind, BodyOutput, CallSummary, Failure, Head, KeyMark, Output, Request};
pub use outcome::{FailureKind, Outcome};

use events::{EndEvent, Kind, event_data, kind};
use io::request_family;
use relay::Joiner;
use timer::{Timer, Timers};

use crate::mark::{Change, Family, Mark, Target};
use crate::policy::{MAX_CLASSIFY_BODY, Verdict};
use crate::pool::{CoolReason, DisableReason, KeyId};
use crate::profile::Dialect;
use crate::sse::{Framer, Limits};
use crate::walk::Walker;

#[derive(Debug)]
enum State {
    /// An attempt is in flight; waiting for its head.
    AwaitHead,
    /// A head that may be a key failure, waiting for (up to 64 KiB of) its body.
    Classify {
        status: StatusCode,
        headers: HeaderMap,
        buf: BytesMut,
    },
    /// An event stream before its commit point.
    Holding(Box<Holding>),
    /// A delivered plain body; `left`: the bytes its `content-length` still promises.
    Plain { left: Option<u64> },
    /// A committed event stream; `end`: the latest event after which the body may end cleanly.
    Streaming {
        framer: Box<Framer>,
        end: Option<EndEvent>,
        /// The stream's dialect, once its first non-blank frame was seen.
        dialect: Option<Dialect>,
    },
    /// Over.
    Finished,
}

#[derive(Debug)]
struct Holding {
    headers: HeaderMap,
    framer: Framer,
    held: Vec<Bytes>,
    /// The stream's dialect, once its first non-blank frame was seen.
    dialect: Option<Dialect>,
}

/// The failover state machine of one upstream call. See the [module docs](self).
#[derive(Debug)]
pub struct Call {
    credential: Credential,
    config: CallConfig,
    walker: Option<Walker>,
    /// The request's model family (SPEC §11.2), once read: `Some(None)` for a request without
    /// a model.
    family: Option<Option<Family>>,
    method: Method,
    path_and_query: PathAndQuery,
    headers: headers::Outbound,
    body: Bytes,
    attempts: usize,
    key: Option<KeyId>,
    /// The generation of `key` when its attempt was sent.
    key_generation: u64,
    state: State,
    timers: Timers,
    /// Both clocks read together at the latest response head: `wall_at` derives the wall time
    /// of a later `now` from them.
    clocks: (Instant, SystemTime),
    /// Outputs before the head ([`Call::poll_output`]).
    outputs: Queue<Output>,
    /// Outputs after the head ([`Call::poll_body`]).
    body_outputs: Queue<BodyOutput>,
    /// How the call ended, once it has.
    outcome: Option<Outcome>,
    request_id: RequestId,
}

/// A call's request id: given, or made from the wall time of the call's start the first time an
/// error response needs it (most calls never do).
#[derive(Debug)]
enum RequestId {
    Given(String),
    Deferred {
        wall: SystemTime,
        made: std::sync::OnceLock<String>,
    },
}

impl Call {
    /// Starts a call; the first [`Output::Send`] (or an exhaustion [`Output::Fail`]) is ready.
    pub fn new(
        request: Request,
        credential: Credential,
        config: &CallConfig,
        request_id: impl Into<String>,
        now: Instant,
    ) -> Self {
        Self::start(
            request,
            credential,
            config,
            RequestId::Given(request_id.into()),
            now,
        )
    }

    /// [`new`](Self::new) with a request id of the form of
    /// [`client::request_id`](crate::client::request_id), for the wall time `wall` of the call's
    /// start, made only if an error response needs it.
    pub fn new_at(
        request: Request,
        credential: Credential,
        config: &CallConfig,
        wall: SystemTime,
        now: Instant,
    ) -> Self {
        let id = RequestId::Deferred {
            wall,
            made: std::sync::OnceLock::new(),
        };
        Self::start(request, credential, config, id, now)
    }

    fn start(
        request: Request,
        credential: Credential,
        config: &CallConfig,
        request_id: RequestId,
        now: Instant,
    ) -> Self {
        let strip: &'static [http::HeaderName] = match credential {
            Credential::Passthrough => &[],
            Credential::Pool(_) | Credential::Key(_) => config.profile.credential_headers(),
        };
        // The request's model family matters to a walk only once the pool has family state;
        // until then it is read on the first rate limit, when a mark needs it.
        let family = match &credential {
            Credential::Pool(pool) if pool.extras() != 0 => {
                Some(request_family(&config.profile, &request.body))
            }
            _ => None,
        };
        let walker = match &credential {
            Credential::Pool(pool) => Some(pool.walk_for(family.flatten())),
            Credential::Key(_) | Credential::Passthrough => None,
        };
        let mut call = Self {
            credential,
            config: config.clone(),
            walker,
            family,
            method: request.method,
            path_and_query: request.path_and_query,
            headers: headers::Outbound::new(request.headers, strip),
            body: request.body,
            attempts: 0,
            key: None,
            key_generation: 0,
            state: State::AwaitHead,
            timers: Timers::default(),
            clocks: (now, SystemTime::UNIX_EPOCH),
            outputs: Queue::default(),
            body_outputs: Queue::default(),
            outcome: None,
            request_id,
        };
        call.next_attempt(now);
        call
    }

    /// How many attempts have been sent.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// The pool key of the latest attempt (the one that answered, once a head is delivered).
    pub fn key(&self) -> Option<KeyId> {
        self.key
    }

    /// How the call ended: `None` while it runs. Set the moment the call is over — its last
    /// output queued, or the caller gone — and never changed after.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// Hands a mark from [`Output::Mark`] to the configured [`MarkSink`], if any: what a
    /// driver does with every mark.
    pub fn report(&self, mark: &KeyMark) {
        if let (Some(sink), Credential::Pool(pool)) = (&self.config.marks, &self.credential) {
            sink.mark(pool, mark);
        }
    }

    /// The request id used in error bodies.
    pub fn request_id(&self) -> &str {
        match &self.request_id {
            RequestId::Given(id) => id,
            RequestId::Deferred { wall, made } => made.get_or_init(|| crate::client::request_id(*wall)),
        }
    }

    /// Whether the call is over and every output has been drained.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Finished) && self.outputs.is_empty() && self.body_outputs.is_empty()
    }

    /// The next thing to do before a head is delivered. Drain until [`Output::Wait`],
    /// [`Output::Head`] or [`Output::Fail`]; after those two, drain [`poll_body`](Self::poll_body)
    /// (after a head) or stop (after a failure). Past its phase it says `Wait`.
    pub fn poll_output(&mut self) -> Output {
        match self.outputs.pop_front() {
            Some(out) => out,
            None => Output::Wait(self.poll_timeout()),
        }
    }

    /// The next thing to do after the head: drain until [`BodyOutput::Wait`], or until
    /// [`BodyOutput::Abort`] or [`BodyOutput::Done`] end the call. Before a head it says `Wait`;
    /// once the call is over (a failure included), `Done`.
    pub fn poll_body(&mut self) -> BodyOutput {
        if let Some(out) = self.body_outputs.pop_front() {
            return out;
        }
        match self.state {
            State::Finished => BodyOutput::Done,
            _ => BodyOutput::Wait(self.poll_timeout()),
        }
    }

    /// What the call has done so far: attempts and the key of the latest attempt. After a head
    /// or a failure is delivered this is final (no attempt follows). The marks it made came out
    /// as [`Output::Mark`].
    pub fn summary(&self) -> CallSummary {
        CallSummary {
            attempts: self.attempts,
            key: self.key,
        }
    }

    /// The request's model family, read from its body the first time it is needed.
    fn family(&mut self) -> Option<Family> {
        if let Some(family) = self.family {
            return family;
        }
        let family = request_family(&self.config.profile, &self.body);
        self.family = Some(family);
        if let Some(walker) = &mut self.walker {
            walker.set_family(family);
        }
        family
    }

    /// Learns the key's organisation from an answer (SPEC §11.1) and, from a success's
    /// rate-limit headers, makes it (and its organisation's keys for this family) less preferred
    /// until the exhausted dimension resets (SPEC §11.4).
    fn learn(&mut self, status: StatusCode, headers: &HeaderMap, now: Instant, wall: SystemTime) {
        let (Credential::Pool(pool), Some(key)) = (&self.credential, self.key) else {
            return;
        };
        if pool.scope(key).is_none()
            && let Some((organisation, workspace)) = self.config.profile.scope(headers)
        {
            pool.learn_scope(key, organisation, workspace);
        }
        if !status.is_success() || !self.config.policy.hints {
            return;
        }
        let Some(reset) = self.config.profile.exhaustion_hint(headers, wall) else {
            return;
        };
        let pool = pool.clone();
        let family = self.family();
        let Some(until) = now.checked_add(reset) else {
            return;
        };
        let keys = if family.is_some() {
            pool.same_scope(key)
        } else {
            vec![key]
        };
        for k in keys {
            let _ = pool.hint(k, family, until, now);
        }
    }

    /// The wall-clock time at `now`, from the clocks read at the latest head.
    fn wall_at(&self, now: Instant) -> SystemTime {
        let (then, wall) = self.clocks;
        wall.checked_add(now.saturating_duration_since(then))
            .unwrap_or(wall)
    }

    /// The earliest deadline at which [`handle_timeout`](Self::handle_timeout) must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Finished => None,
            _ => self.timers.next(),
        }
    }

    /// The response head of the current attempt arrived. `wall` is the wall-clock time, used only
    /// for an HTTP-date `retry-after` without a `date` header.
    pub fn handle_response_head(
        &mut self,
        status: StatusCode,
        headers: HeaderMap,
        now: Instant,
        wall: SystemTime,
    ) {
        if !matches!(self.state, State::AwaitHead) {
            return;
        }
        self.clocks = (now, wall);
        self.timers.stop(Timer::Head);
        self.timers.set(Timer::Idle, now, self.config.timeouts.idle);
        if !matches!(self.credential, Credential::Pool(_)) {
            return self.deliver(status, headers, now);
        }
        self.learn(status, &headers, now, wall);
        if self.config.needs_body(status, &headers) {
            self.state = State::Classify {
                status,
                headers,
                buf: BytesMut::new(),
            };
            return;
        }
        match self.config.classify(status, &headers, b"", wall) {
            Verdict::Deliver => self.deliver(status, headers, now),
            verdict => self.fail_over(status, verdict, now),
        }
    }

    /// Body bytes of the current attempt arrived.
    pub fn handle_body(&mut self, chunk: Bytes, now: Instant) {
        match &mut self.state {
            State::AwaitHead | State::Finished => return,
            State::Classify { buf, .. } => {
                buf.extend_from_slice(&chunk);
                if buf.len() >= MAX_CLASSIFY_BODY {
                    self.classify_body(false, now);
                    return;
                }
            }
            State::Plain { .. } => self.plain_bytes(chunk),
            State::Holding(h) => {
                h.framer.feed(&chunk);
                self.pump_holding(&chunk, now);
            }
            State::Streaming { framer, end, dialect } => {
                let mut out = Joiner::within(chunk.clone());
                framer.feed(&chunk);
                loop {
                    match framer.next_frame() {
                        Some(Ok(frame)) => {
                            let kind = kind(&self.config.profile, &frame);
                            if dialect.is_none() && kind != Kind::Blank {
                                *dialect = Some(
                                    self.config
                                        .profile
                                        .stream_dialect(self.path_and_query.path(), Some(&frame)),
                                );
                            }
                            if let Some(ends) = kind.end_event() {
                                *end = Some(ends);
                            }
                            out.push(frame.into_bytes());
                        }
                        Some(Err(_)) => {
                            if let Some(bytes) = out.finish() {
                                self.body_outputs.push_back(BodyOutput::Body(bytes));
                            }
                            return self.abort(StreamBreak::EventTooLarge);
                        }
                        None => break,
                    }
                }
                if let Some(bytes) = out.finish() {
                    self.body_outputs.push_back(BodyOutput::Body(bytes));
                }
            }
        }
        if !matches!(self.state, State::Finished | State::AwaitHead) {
            self.timers.set(Timer::Idle, now, self.config.timeouts.idle);
        }
    }

    /// The body of the current attempt ended cleanly (per its HTTP framing).
    pub fn handle_body_end(&mut self, now: Instant) {
        match &mut self.state {
            State::AwaitHead | State::Finished => {}
            State::Classify { .. } => self.classify_body(true, now),
            State::Plain { .. } => self.finish(Outcome::Complete),
            State::Holding(_) => self.fail(CallError::EmptyStream),
            State::Streaming {
                end: Some(EndEvent::Stop),
                ..
            } => self.finish(Outcome::Complete),
            State::Streaming {
                end: Some(EndEvent::Error),
                ..
            } => self.finish(Outcome::UpstreamError),
            State::Streaming { end: None, .. } => self.abort(StreamBreak::EndedEarly),
        }
    }

    /// The current exchange failed at the transport level.
    pub fn handle_transport_error(&mut self, error: TransportError, now: Instant) {
        match &self.state {
            State::Finished => {}
            State::AwaitHead | State::Holding(_) => {
                let err = match error {
                    TransportError::Timeout => CallError::Timeout {
                        phase: TimeoutPhase::Head,
                        after: self.config.timeouts.first_byte,
                    },
                    other => CallError::Transport(other),
                };
                self.fail(err);
            }
            State::Classify { .. } => {
                // Classify on what arrived; if the key is not at fault the answer is lost.
                if !self.classify_partial(now) {
                    self.fail(CallError::Transport(error));
                }
            }
            // The IO layer's own timeout while reading a delivered body is the idle timeout
            // (a blocking adapter enforces it as a per-read timeout), like a head's above.
            State::Plain { .. } | State::Streaming { .. } if error == TransportError::Timeout => {
                self.abort(StreamBreak::Idle(self.config.timeouts.idle));
            }
            State::Plain { .. } | State::Streaming { .. } => self.abort(StreamBreak::Transport(error)),
        }
    }

    /// Call when `now` has reached [`poll_timeout`](Self::poll_timeout) (or the deadline of
    /// [`Output::Wait`]). Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let idle = self.config.timeouts.idle;
        if self.timers.expired(Timer::Head, now) {
            self.timers.stop(Timer::Head);
            if matches!(self.state, State::AwaitHead) {
                self.fail(CallError::Timeout {
                    phase: TimeoutPhase::Head,
                    after: self.config.timeouts.first_byte,
                });
            }
        }
        if self.timers.expired(Timer::Hold, now) {
            self.timers.stop(Timer::Hold);
            if matches!(self.state, State::Holding(_)) {
                self.commit(Joiner::default(), None);
            }
        }
        if self.timers.expired(Timer::Idle, now) {
            self.timers.stop(Timer::Idle);
            match self.state {
                State::AwaitHead | State::Finished => {}
                State::Classify { .. } => {
                    if !self.classify_partial(now) {
                        self.fail(CallError::Timeout {
                            phase: TimeoutPhase::Idle,
                            after: idle,
                        });
                    }
                }
                State::Holding(_) => self.fail(CallError::Timeout {
                    phase: TimeoutPhase::Idle,
                    after: idle,
                }),
                State::Plain { .. } | State::Streaming { .. } => self.abort(StreamBreak::Idle(idle)),
            }
        }
    }

    /// The caller went away: stop everything. No key is marked for an abandoned call. A call
    /// that was not over yet ends as [`Outcome::ClientGone`].
    pub fn handle_caller_gone(&mut self) {
        self.outputs.clear();
        self.body_outputs.clear();
        self.finish(Outcome::ClientGone);
    }

    /// Picks the next key (or ends the call with the exhaustion error) and queues the attempt.
    fn next_attempt(&mut self, now: Instant) {
        let key = match (&self.credential, &mut self.walker) {
            (Credential::Pool(pool), Some(walker)) => match walker.next_key(pool, now) {
                Ok(id) => Some(id),
                Err(exhausted) => {
                    let keys = pool.len();
                    return self.fail(CallError::Exhausted { exhausted, keys });
                }
            },
            _ => None,
        };
        self.attempts += 1;
        self.key = key;
        if let (Credential::Pool(pool), Some(id)) = (&self.credential, key) {
            self.key_generation = pool.generation(id);
        }
        self.state = State::AwaitHead;
        self.timers.clear();
        self.timers.set(Timer::Head, now, self.config.timeouts.first_byte);
        let attempt = self.current_attempt();
        self.outputs.push_back(Output::Send(attempt));
    }

    /// The current attempt's request: the call's headers with the attempt's key.
    fn current_attempt(&self) -> Attempt {
        // Made with room for the headers still to come — the key (here), `host` and
        // `content-length` (the adapter and its HTTP client) — rather than cloned: a clone has
        // no spare room, and each of those would grow it (a reallocation and a copy each).
        let mut headers = self.headers.to_map(3);
        match (&self.credential, self.key) {
            (Credential::Pool(pool), Some(id)) => {
                self.config.profile.insert_key(&mut headers, pool.secret(id));
            }
            (Credential::Key(secret), _) => {
                self.config.profile.insert_key(&mut headers, secret);
            }
            _ => {}
        }
        Attempt {
            number: self.attempts,
            key: self.key,
            method: self.method.clone(),
            path_and_query: self.path_and_query.clone(),
            headers,
            body: self.body.clone(),
        }
    }

    /// The attempt that awaits its head, once more, for a transport whose copy of it died where
    /// the upstream cannot have taken it up: written to a pooled connection that the upstream
    /// had already closed (the close crossed the request on the wire). Sending it again on
    /// another connection is the same attempt — the same key and number, and nothing about the
    /// call changes — not a second one; a transport does it at most once per attempt (the
    /// client loop, [`ClientCall`](crate::client::ClientCall), makes sure). `None` when no
    /// attempt awaits its head.
    pub fn resend(&self) -> Option<Attempt> {
        matches!(self.state, State::AwaitHead).then(|| self.current_attempt())
    }

    /// Marks the current key per `verdict` — and, when the answer speaks for its organisation
    /// (SPEC §11), every key known to share it — then moves on (BYOK never gets here).
    ///
    /// - a rate limit on a key whose organisation is known cools every key of the same
    ///   organisation and workspace for the request's model family (key-wide for a request
    ///   without a model); a key whose organisation is unknown cools alone, key-wide;
    /// - a spend cap and a billing disable are the organisation's: every key of it;
    /// - everything else marks the key alone.
    fn fail_over(&mut self, status: StatusCode, verdict: Verdict, now: Instant) {
        let (Credential::Pool(pool), Some(key)) = (&self.credential, self.key) else {
            return;
        };
        let pool = pool.clone();
        let wall = self.wall_at(now);
        let (change, family, keys) = match verdict {
            Verdict::Deliver => return,
            Verdict::CoolDown {
                duration,
                reason: reason @ CoolReason::RateLimited,
            } if pool.scope(key).is_some() => {
                let change = pool.cool_mark(key, wall, duration, reason).change;
                (change, self.family(), pool.same_scope(key))
            }
            Verdict::CoolDown {
                duration,
                reason: reason @ CoolReason::SpendCapped,
            } => (
                pool.cool_mark(key, wall, duration, reason).change,
                None,
                pool.same_organisation(key),
            ),
            Verdict::Disable {
                reason: reason @ DisableReason::Billing,
            } => (Change::Disable { reason }, None, pool.same_organisation(key)),
            Verdict::CoolDown { duration, reason } => (
                pool.cool_mark(key, wall, duration, reason).change,
                None,
                vec![key],
            ),
            Verdict::Disable { reason } => (Change::Disable { reason }, None, vec![key]),
        };
        for k in keys {
            let mut mark = Mark {
                change,
                status: Some(status.as_u16()),
                // The key of this attempt at the generation its request was sent with; the
                // others as they are now.
                generation: if k == key {
                    self.key_generation
                } else {
                    pool.generation(k)
                },
                ..pool.mark_for(k, change)
            };
            if let Some(family) = family {
                mark.target = Target::KeyFamily(mark.key(), family);
            }
            let transition = pool.apply(&mark, now, wall);
            self.outputs.push_back(Output::Mark(KeyMark {
                key: k,
                attempted: key,
                mark,
                status,
                verdict,
                transition,
            }));
        }
        self.next_attempt(now);
    }

    /// Classifies a buffered error body. `ended`: the whole body is in the buffer.
    fn classify_body(&mut self, ended: bool, now: Instant) {
        let State::Classify { status, headers, buf } = std::mem::replace(&mut self.state, State::Finished)
        else {
            return;
        };
        let verdict = self.config.classify(status, &headers, &buf, self.clocks.1);
        if verdict.is_failover() {
            return self.fail_over(status, verdict, now);
        }
        self.deliver_plain_with(status, headers, buf.freeze());
        if ended {
            self.finish(Outcome::Complete);
        }
    }

    /// Delivers bytes of a plain body. A body that has all its `content-length` promised is
    /// complete, even if the transport has not reported its end yet.
    fn plain_bytes(&mut self, chunk: Bytes) {
        let State::Plain { left } = &mut self.state else {
            return;
        };
        if let Some(left) = left {
            *left = left.saturating_sub(chunk.len() as u64);
        }
        let complete = *left == Some(0);
        if !chunk.is_empty() {
            self.body_outputs.push_back(BodyOutput::Body(chunk));
        }
        if complete {
            self.finish(Outcome::Complete);
        }
    }

    /// After a broken error body: fails over if what arrived shows a key failure.
    fn classify_partial(&mut self, now: Instant) -> bool {
        let State::Classify { status, headers, buf } = &self.state else {
            return false;
        };
        let verdict = self.config.classify(*status, headers, buf, self.clocks.1);
        let status = *status;
        if verdict.is_failover() {
            self.fail_over(status, verdict, now);
            true
        } else {
            false
        }
    }

    fn deliver(&mut self, status: StatusCode, headers: HeaderMap, now: Instant) {
        if status.is_success() && headers::is_event_stream(&headers) {
            let mut limits = Limits::new();
            if let Some(max) = self.config.max_event_size {
                limits = limits.with_max_event(max);
            }
            let framer = Framer::with_limits(limits);
            if let CommitPoint::FirstContent { hold } = self.config.commit {
                self.timers.set(Timer::Hold, now, hold);
            }
            self.state = State::Holding(Box::new(Holding {
                headers,
                framer,
                held: Vec::new(),
                dialect: None,
            }));
        } else {
            self.deliver_plain(status, headers);
        }
    }

    /// Delivers the head of a plain body; a body that is empty by its framing is complete.
    fn deliver_plain(&mut self, status: StatusCode, headers: HeaderMap) {
        self.deliver_plain_with(status, headers, Bytes::new());
    }

    /// Delivers the head of a plain body and `first`, the bytes that arrived with it (an error
    /// body buffered for classification), as [`plain_bytes`](Self::plain_bytes) would: all of
    /// them, even past an empty body's framing, before the call is complete.
    fn deliver_plain_with(&mut self, status: StatusCode, headers: HeaderMap, first: Bytes) {
        let left = self.body_length(status, &headers);
        let headers = self.response_headers(headers, BodyKind::Plain);
        self.outputs.push_back(Output::Head(Head {
            status,
            headers,
            kind: BodyKind::Plain,
        }));
        self.state = State::Plain { left };
        self.plain_bytes(first);
    }

    /// How many body bytes a delivered plain response promises (RFC 9112 §6.3): none after a
    /// `HEAD` or for a status without a body, else its `content-length` unless a
    /// `transfer-encoding` overrides it. `None` when there is no valid length: the body then
    /// ends when the transport says so.
    fn body_length(&self, status: StatusCode, headers: &HeaderMap) -> Option<u64> {
        if self.method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Some(0);
        }
        if headers.contains_key(http::header::TRANSFER_ENCODING) {
            return None;
        }
        let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        let text = value.to_str().ok()?;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    }

    /// Runs the framer of a stream that is not committed yet; `chunk` is the one just fed.
    fn pump_holding(&mut self, chunk: &Bytes, now: Instant) {
        let first_content = matches!(self.config.commit, CommitPoint::FirstContent { .. });
        loop {
            let State::Holding(h) = &mut self.state else {
                return;
            };
            let frame = match h.framer.next_frame() {
                None => return,
                Some(Err(_)) => return self.fail(CallError::Transport(TransportError::Protocol)),
                Some(Ok(frame)) => frame,
            };
            let kind = kind(&self.config.profile, &frame);
            if h.dialect.is_none() && kind != Kind::Blank {
                h.dialect = Some(
                    self.config
                        .profile
                        .stream_dialect(self.path_and_query.path(), Some(&frame)),
                );
            }
            let ends = kind.end_event();
            if !first_content {
                let mut out = Joiner::within(chunk.clone());
                out.push(frame.into_bytes());
                return self.commit(out, ends);
            }
            match kind {
                Kind::Preamble | Kind::Blank => h.held.push(frame.into_bytes()),
                Kind::Error => {
                    let data = event_data(frame.into_bytes());
                    return self.in_band_error(&data, now);
                }
                _ => {
                    let mut out = Joiner::within(chunk.clone());
                    out.push(frame.into_bytes());
                    return self.commit(out, ends);
                }
            }
        }
    }

    /// An in-band error before commit (first-content mode): classified like an HTTP error.
    fn in_band_error(&mut self, data: &[u8], now: Instant) {
        let status = self.config.profile.in_band_status(data);
        let State::Holding(h) = &self.state else { return };
        let verdict = match &self.credential {
            Credential::Pool(_) => self.config.classify(status, &h.headers, data, self.clocks.1),
            Credential::Key(_) | Credential::Passthrough => Verdict::Deliver,
        };
        if verdict.is_failover() {
            return self.fail_over(status, verdict, now);
        }
        self.fail(CallError::InBand {
            status,
            body: Bytes::copy_from_slice(data),
        });
    }

    /// Delivers the head and every held and ready event; the stream is committed. `ends`: the
    /// event that committed it ends the stream (the profile's end event, or an in-band error).
    fn commit(&mut self, mut out: Joiner, ends: Option<EndEvent>) {
        let State::Holding(h) = std::mem::replace(&mut self.state, State::Finished) else {
            return;
        };
        let Holding {
            headers,
            mut framer,
            held,
            mut dialect,
        } = *h;
        self.timers.stop(Timer::Hold);
        let headers = self.response_headers(headers, BodyKind::EventStream);
        self.outputs.push_back(Output::Head(Head {
            status: StatusCode::OK,
            headers,
            kind: BodyKind::EventStream,
        }));
        let mut all = Joiner::within_chunk_of(&out);
        for bytes in held {
            all.push(bytes);
        }
        if let Some(bytes) = out.finish() {
            all.push(bytes);
        }
        let mut end = ends;
        let mut too_large = false;
        loop {
            match framer.next_frame() {
                Some(Ok(frame)) => {
                    let kind = kind(&self.config.profile, &frame);
                    if dialect.is_none() && kind != Kind::Blank {
                        dialect = Some(
                            self.config
                                .profile
                                .stream_dialect(self.path_and_query.path(), Some(&frame)),
                        );
                    }
                    if let Some(ends) = kind.end_event() {
                        end = Some(ends);
                    }
                    all.push(frame.into_bytes());
                }
                Some(Err(_)) => {
                    too_large = true;
                    break;
                }
                None => break,
            }
        }
        if let Some(bytes) = all.finish() {
            self.body_outputs.push_back(BodyOutput::Body(bytes));
        }
        self.state = State::Streaming {
            framer: Box::new(framer),
            end,
            dialect,
        };
        if too_large {
            self.abort(StreamBreak::EventTooLarge);
        }
    }

    fn response_headers(&self, mut headers: HeaderMap, kind: BodyKind) -> HeaderMap {
        headers::strip_hop_by_hop(&mut headers);
        if kind == BodyKind::EventStream {
            // keypool may append an error event: the upstream length no longer holds.
            headers.remove(http::header::CONTENT_LENGTH);
        }
        headers
    }

    fn fail(&mut self, error: CallError) {
        let response = error.to_response_for(&self.config.profile, self.request_id());
        let summary = self.summary();
        let outcome = Outcome::of_error(&error);
        self.outputs.push_back(Output::Fail(Failure {
            error,
            response,
            summary,
        }));
        self.finish(outcome);
    }

    fn abort(&mut self, why: StreamBreak) {
        let (error, event) = match self.state {
            State::Streaming { dialect, .. } => {
                let profile = &self.config.profile;
                let dialect =
                    dialect.unwrap_or_else(|| profile.stream_dialect(self.path_and_query.path(), None));
                let error = CallError::StreamBroken(why);
                let event = error.to_event_for(profile, dialect);
                (error, Some(event))
            }
            _ => (CallError::BodyBroken(why), None),
        };
        let outcome = Outcome::of_error(&error);
        self.body_outputs
            .push_back(BodyOutput::Abort(Abort { error, event }));
        self.finish(outcome);
    }

    /// The call is over; the first outcome decided is the one that stays.
    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Finished;
        self.timers.clear();
        self.outcome.get_or_insert(outcome);
    }
}
