//! Property tests of the failover state machine of one call, on simulated time (issue #4
//! acceptance 8; SPEC §8 invariants 4, 5, 6 and 8).
//!
//! Every key of a pool gets a random upstream behaviour: a random status with random retry
//! headers, a JSON body or an event stream of random events cut into random chunks, in-band
//! errors before or after content, transport errors and silences at random points. The call is
//! driven like an adapter would drive it, and after every input the pool is compared with what
//! the call reported through [`Output::Mark`].
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use keypool_core::call::{
    Abort, Attempt, BodyOutput, Call, CallConfig, CallError, CommitPoint, Credential, Failure, Head, KeyMark,
    Outcome, Output, StreamBreak, TransportError,
};
use keypool_core::{CoolReason, DisableReason, KeyId, KeyState, Policy, Pool, Secret, Verdict};
use proptest::prelude::*;
use support::{BLOCK_START, MESSAGE_START, MESSAGE_STOP, PING, Sim, Step};

const CREDIT_MESSAGE: &str = "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.";

// ---------------------------------------------------------------------------------------------
// The upstream model

/// What an event means to the commit point.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EvKind {
    /// `message_start`, `ping`, comments, stray blank lines: held back in first-content mode.
    Held,
    /// Anything else that is not an error.
    Content,
    /// An `error` event with this data.
    Error(String),
}

/// One whole upstream event, byte for byte (LF or CR LF line ends, LF blank line).
#[derive(Debug, Clone)]
struct Ev {
    bytes: String,
    kind: EvKind,
}

#[derive(Debug, Clone)]
enum Body {
    /// Plain bytes (JSON or garbage).
    Plain(Vec<u8>),
    /// Whole events, then possibly a strict prefix of one more event (a cut stream).
    Events { events: Vec<Ev>, partial: String },
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Self::Plain(b) => b.clone(),
            Self::Events { events, partial } => {
                let mut out: Vec<u8> = events.iter().flat_map(|e| e.bytes.bytes()).collect();
                out.extend_from_slice(partial.as_bytes());
                out
            }
        }
    }
}

/// How an answer ends after its body.
#[derive(Debug, Clone, Copy)]
enum Tail {
    End,
    Err(TransportError),
    /// Nothing more: the call's idle timer has to end it.
    Silence,
}

/// One upstream answer to one attempt.
#[derive(Debug, Clone)]
enum Answer {
    /// No head: a transport error, or silence (`None`) until the first-byte timeout.
    NoHead(Option<TransportError>),
    Resp {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Body,
        /// Cut points (fractions of the body) and the time that passes before each chunk.
        cuts: Vec<(prop::sample::Index, Duration)>,
        tail: Tail,
    },
}

impl Answer {
    fn head_map(&self) -> Option<(StatusCode, HeaderMap)> {
        let Self::Resp { status, headers, .. } = self else {
            return None;
        };
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, v.parse().unwrap());
        }
        Some((StatusCode::from_u16(*status).unwrap(), map))
    }

    fn steps(&self) -> VecDeque<Step> {
        let (status, headers, body, cuts, tail) = match self {
            Self::NoHead(Some(e)) => return VecDeque::from([Step::Err(*e)]),
            Self::NoHead(None) => return VecDeque::new(),
            Self::Resp {
                status,
                headers,
                body,
                cuts,
                tail,
            } => (status, headers, body, cuts, tail),
        };
        let mut steps = VecDeque::from([Step::Head(*status, headers.clone())]);
        let bytes = body.bytes();
        let mut points: Vec<(usize, Duration)> =
            cuts.iter().map(|(i, d)| (i.index(bytes.len() + 1), *d)).collect();
        points.sort_by_key(|p| p.0);
        let mut at = 0;
        for (cut, delay) in points.into_iter().chain([(bytes.len(), Duration::ZERO)]) {
            if !delay.is_zero() {
                steps.push_back(Step::Advance(delay));
            }
            if cut > at {
                steps.push_back(Step::Body(Bytes::copy_from_slice(&bytes[at..cut])));
                at = cut;
            }
        }
        match tail {
            Tail::End => steps.push_back(Step::End),
            Tail::Err(e) => steps.push_back(Step::Err(*e)),
            Tail::Silence => {}
        }
        steps
    }

    fn events(&self) -> Option<&[Ev]> {
        match self {
            Self::Resp {
                body: Body::Events { events, .. },
                ..
            } => Some(events),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn transport_error() -> impl Strategy<Value = TransportError> {
    prop::sample::select(vec![
        TransportError::Connect,
        TransportError::Dns,
        TransportError::Tls,
        TransportError::Reset,
        TransportError::Eof,
        TransportError::Timeout,
        TransportError::Protocol,
    ])
}

fn retry_headers() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let ms = prop::sample::select(vec![
        "0",
        "1",
        "250",
        "1500.5",
        "-3",
        "abc",
        "",
        "99999999999999999999",
    ]);
    let secs = prop::sample::select(vec![
        "0",
        "1",
        "5",
        "2.5",
        "-1",
        "x",
        "1e3",
        "999999999999",
        // SPEC §4 HTTP-dates around the simulated wall clock (2027-01-15T08:00:00Z).
        "Fri, 15 Jan 2027 08:00:30 GMT",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Fri, 15 Jan 2027 07:59:59 GMT",
    ]);
    let date = prop::sample::select(vec![
        "Fri, 15 Jan 2027 08:00:00 GMT",
        "Fri, 15 Jan 2027 08:00:20 GMT",
        "junk",
    ]);
    prop::collection::vec(
        prop_oneof![
            ms.prop_map(|v| ("retry-after-ms", v.to_owned())),
            secs.prop_map(|v| ("retry-after", v.to_owned())),
            date.prop_map(|v| ("date", v.to_owned())),
        ],
        0..3,
    )
}

fn error_data() -> impl Strategy<Value = String> {
    let kinds = prop::sample::select(vec![
        "rate_limit_error",
        "overloaded_error",
        "authentication_error",
        "permission_error",
        "billing_error",
        "invalid_request_error",
        "api_error",
        "not_found_error",
        "some_future_error",
    ]);
    prop_oneof![
        6 => kinds.prop_map(|k| format!(
            "{{\"type\":\"error\",\"error\":{{\"type\":\"{k}\",\"message\":\"upstream said no\"}}}}"
        )),
        1 => Just(format!(
            "{{\"type\":\"error\",\"error\":{{\"type\":\"invalid_request_error\",\"message\":\"{CREDIT_MESSAGE}\"}}}}"
        )),
        1 => Just("oops, not json".to_owned()),
        1 => Just("{}".to_owned()),
    ]
}

fn event() -> impl Strategy<Value = Ev> {
    let held = |s: &str| Ev {
        bytes: s.to_owned(),
        kind: EvKind::Held,
    };
    let content = |s: String| Ev {
        bytes: s,
        kind: EvKind::Content,
    };
    prop_oneof![
        3 => Just(held(MESSAGE_START)),
        2 => Just(held(PING)),
        1 => Just(held(": keep-alive\n\n")),
        1 => Just(held("\n")),
        1 => Just(held("event: ping\r\ndata: {}\r\n\n")),
        3 => Just(content(BLOCK_START.to_owned())),
        4 => "[a-z ]{0,12}".prop_map(move |t| content(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"text\":\"{t}\"}}}}\n\n"
        ))),
        1 => Just(content("data: {\"unnamed\":true}\r\n\n".to_owned())),
        2 => Just(content(MESSAGE_STOP.to_owned())),
        2 => error_data().prop_map(|data| Ev {
            bytes: format!("event: error\ndata: {data}\n\n"),
            kind: EvKind::Error(data),
        }),
    ]
}

/// A stream that fails in-band before any content (a key failure in first-content mode when
/// the error is a key error), followed by whatever.
fn failing_events() -> impl Strategy<Value = Vec<Ev>> {
    let held = prop::sample::select(vec![MESSAGE_START, PING, ": keep-alive\n\n"]).prop_map(|s| Ev {
        bytes: s.to_owned(),
        kind: EvKind::Held,
    });
    let error = error_data().prop_map(|data| Ev {
        bytes: format!("event: error\ndata: {data}\n\n"),
        kind: EvKind::Error(data),
    });
    (
        prop::collection::vec(held, 0..3),
        error,
        prop::collection::vec(event(), 0..3),
    )
        .prop_map(|(mut events, error, rest)| {
            events.push(error);
            events.extend(rest);
            events
        })
}

fn events_body() -> impl Strategy<Value = Body> {
    (
        prop_oneof![2 => prop::collection::vec(event(), 0..8), 1 => failing_events()],
        prop::option::weighted(0.3, (event(), any::<prop::sample::Index>())),
    )
        .prop_map(|(events, partial)| {
            let partial = match partial {
                // A strict, non-empty prefix of an event is never a whole event.
                Some((ev, i)) if ev.bytes.len() > 1 => ev.bytes[..1 + i.index(ev.bytes.len() - 1)].to_owned(),
                _ => String::new(),
            };
            Body::Events { events, partial }
        })
}

fn plain_body(status: u16) -> BoxedStrategy<Body> {
    let credit = format!(
        "{{\"type\":\"error\",\"error\":{{\"type\":\"invalid_request_error\",\"message\":\"{CREDIT_MESSAGE}\"}}}}"
    );
    let generic = prop_oneof![
        Just(b"{\"ok\":true}".to_vec()),
        Just(b"{\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"x\"}}".to_vec()),
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    if status == 400 {
        prop_oneof![2 => Just(credit.into_bytes()), 1 => generic]
            .prop_map(Body::Plain)
            .boxed()
    } else {
        generic.prop_map(Body::Plain).boxed()
    }
}

fn delay() -> impl Strategy<Value = Duration> {
    prop_oneof![
        24 => Just(Duration::ZERO),
        4 => Just(Duration::from_millis(1)),
        4 => Just(Duration::from_secs(1)),
        // Past the default first-content hold time.
        2 => Just(Duration::from_secs(3)),
        // Past the default idle timeout.
        1 => Just(Duration::from_secs(150)),
    ]
}

fn tail() -> impl Strategy<Value = Tail> {
    prop_oneof![
        5 => Just(Tail::End),
        2 => transport_error().prop_map(Tail::Err),
        1 => Just(Tail::Silence),
    ]
}

fn answer() -> impl Strategy<Value = Answer> {
    let status = prop::sample::select(vec![
        200u16, 200, 200, 400, 400, 401, 402, 403, 404, 429, 429, 429, 429, 500, 529,
    ]);
    let resp = (status, any::<u8>()).prop_flat_map(|(status, ct)| {
        // Mostly event streams for 2xx, mostly JSON otherwise.
        let stream = if status == 200 { ct % 4 != 0 } else { ct % 8 == 0 };
        let content_type = if stream {
            "text/event-stream; charset=utf-8"
        } else {
            "application/json"
        };
        let body = if stream {
            events_body().boxed()
        } else {
            plain_body(status)
        };
        (
            retry_headers(),
            body,
            prop::collection::vec((any::<prop::sample::Index>(), delay()), 0..6),
            tail(),
        )
            .prop_map(move |(mut headers, body, cuts, tail)| {
                headers.push(("content-type", content_type.to_owned()));
                Answer::Resp {
                    status,
                    headers,
                    body,
                    cuts,
                    tail,
                }
            })
    });
    let stream = (
        retry_headers(),
        events_body(),
        prop::collection::vec((any::<prop::sample::Index>(), delay()), 0..6),
        tail(),
    )
        .prop_map(|(mut headers, body, cuts, tail)| {
            headers.push(("content-type", "text/event-stream".to_owned()));
            Answer::Resp {
                status: 200,
                headers,
                body,
                cuts,
                tail,
            }
        });
    prop_oneof![
        8 => resp,
        4 => stream,
        1 => transport_error().prop_map(|e| Answer::NoHead(Some(e))),
        1 => Just(Answer::NoHead(None)),
    ]
}

fn config() -> impl Strategy<Value = CallConfig> {
    let commit = prop_oneof![
        Just(CommitPoint::FirstByte),
        prop::sample::select(vec![0u64, 500, 2000, 10_000]).prop_map(|ms| CommitPoint::FirstContent {
            hold: Duration::from_millis(ms)
        }),
    ];
    let max_event = prop_oneof![4 => Just(None), 1 => (20usize..200).prop_map(Some)];
    (commit, max_event).prop_map(|(commit, max_event)| {
        let mut config = CallConfig::default().with_commit(commit);
        config.max_event_size = max_event;
        config
    })
}

#[derive(Debug, Clone)]
enum Start {
    Available,
    Cooling(Duration),
    Disabled,
}

fn start_state() -> impl Strategy<Value = Start> {
    prop_oneof![
        6 => Just(Start::Available),
        2 => (1u64..7200).prop_map(|s| Start::Cooling(Duration::from_secs(s))),
        2 => Just(Start::Disabled),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Cred {
    Pool,
    Key,
    Passthrough,
}

// ---------------------------------------------------------------------------------------------
// The driver

/// Pool state as stored (independent of `now`): a cooldown shows its deadline even when over.
fn raw(pool: &Pool) -> Vec<KeyState> {
    pool.ids().map(|id| pool.state(id, pool.origin())).collect()
}

/// Order in which a key's stored state may only grow.
fn rank(s: &KeyState) -> (u8, Option<Instant>) {
    match s {
        KeyState::Available => (0, None),
        KeyState::Cooling { until, .. } => (1, Some(*until)),
        KeyState::Disabled { .. } => (2, None),
    }
}

/// One attempt as the upstream saw it.
#[derive(Debug)]
struct Tried {
    key: Option<KeyId>,
    answer: Answer,
    /// Body bytes the upstream fed to the call for this attempt.
    fed: Vec<u8>,
    /// Key marks made for this attempt, with the simulated time they were made at.
    marks: Vec<KeyMark>,
    marked_at: Option<Instant>,
    /// The simulated time of the Send.
    sent_at: Instant,
}

#[derive(Debug, Default)]
struct Trace {
    tried: Vec<Tried>,
    head: Option<Head>,
    /// Upstream body bytes delivered (without a synthesized error event).
    body: Vec<u8>,
    fail: Option<Failure>,
    abort: Option<Abort>,
    /// How the call said it ended.
    outcome: Option<Outcome>,
}

/// One output of either phase, as this driver sees it.
enum Seen {
    Send(Attempt),
    Head(Head),
    Fail(Failure),
    Body(Bytes),
    Abort(Abort),
    Wait(Option<Instant>),
    Done,
}

/// Drives one call to its end like an adapter, checking the output order, that every Send goes
/// to a key that is available at that moment, and that the pool only changes through reported
/// marks (monotonically).
fn drive(sim: &mut Sim, call: &mut Call, answer_for: &mut dyn FnMut(Option<KeyId>) -> Answer) -> Trace {
    let mut t = Trace::default();
    let mut current: VecDeque<Step> = VecDeque::new();
    let mut before = raw(&sim.pool);
    let mut done = false;
    let mut held: Option<Seen> = None;
    for _ in 0..10_000 {
        // Marks made by the last input (they come out first), and the pool change they explain.
        let mut marks = Vec::new();
        if !done {
            held = Some(if t.fail.is_some() {
                // A failure ends the call: each phase's method says there is nothing more.
                assert!(matches!(call.poll_output(), Output::Wait(None)));
                assert!(matches!(call.poll_body(), BodyOutput::Done));
                Seen::Done
            } else if t.head.is_none() {
                loop {
                    match call.poll_output() {
                        Output::Mark(m) => marks.push(m),
                        Output::Send(a) => break Seen::Send(a),
                        Output::Head(h) => break Seen::Head(h),
                        Output::Fail(f) => break Seen::Fail(f),
                        Output::Wait(deadline) => break Seen::Wait(deadline),
                    }
                }
            } else {
                match call.poll_body() {
                    BodyOutput::Body(b) => Seen::Body(b),
                    BodyOutput::Abort(a) => Seen::Abort(a),
                    BodyOutput::Wait(deadline) => Seen::Wait(deadline),
                    BodyOutput::Done => {
                        assert!(matches!(call.poll_body(), BodyOutput::Done));
                        Seen::Done
                    }
                }
            });
        }
        let after = raw(&sim.pool);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert!(rank(a) >= rank(b), "key {i} went back from {b:?} to {a:?}");
            let marked = marks
                .iter()
                .any(|m| m.key.index() == i && m.transition != keypool_core::Transition::Unchanged);
            assert_eq!(a != b, marked, "key {i}: {b:?} -> {a:?} with marks {marks:?}");
        }
        for m in &marks {
            let last = t.tried.last_mut().expect("a mark before any attempt");
            assert_eq!(
                Some(m.key),
                last.key,
                "mark of a key that is not the current attempt's"
            );
            last.marks.push(m.clone());
            last.marked_at = Some(sim.now);
        }
        before = after;
        if done {
            break;
        }
        let Some(output) = held.take() else { break };
        match output {
            Seen::Send(a) => {
                assert!(
                    t.head.is_none() && t.fail.is_none(),
                    "attempt after the answer: {a:?}"
                );
                assert_eq!(a.number, t.tried.len() + 1);
                if let Some(k) = a.key {
                    let state = sim.pool.state(k, sim.now);
                    assert!(state.is_available(), "sent to {k:?} while {state:?}");
                    assert!(t.tried.iter().all(|p| p.key != Some(k)), "key {k:?} tried twice");
                }
                let answer = answer_for(a.key);
                current = answer.steps();
                t.tried.push(Tried {
                    key: a.key,
                    answer,
                    fed: Vec::new(),
                    marks: Vec::new(),
                    marked_at: None,
                    sent_at: sim.now,
                });
            }
            Seen::Head(h) => {
                assert!(t.head.is_none() && t.fail.is_none(), "second answer");
                t.head = Some(h);
            }
            Seen::Body(b) => {
                assert!(t.head.is_some() && t.abort.is_none(), "body out of place");
                assert!(!b.is_empty(), "empty body chunk");
                t.body.extend_from_slice(&b);
            }
            Seen::Fail(f) => {
                assert!(t.head.is_none() && t.fail.is_none(), "fail after an answer");
                t.fail = Some(f);
            }
            Seen::Abort(a) => {
                assert!(t.head.is_some() && t.abort.is_none(), "abort out of place");
                t.abort = Some(a);
            }
            Seen::Done => {
                assert!(call.is_done());
                assert!(call.poll_timeout().is_none());
                assert!(call.outcome().is_some(), "a call over without an outcome");
                t.outcome = call.outcome();
                done = true;
            }
            Seen::Wait(deadline) => match current.pop_front() {
                Some(Step::Head(code, hs)) => {
                    let mut map = HeaderMap::new();
                    for (k, v) in hs {
                        map.append(k, v.parse().unwrap());
                    }
                    call.handle_response_head(StatusCode::from_u16(code).unwrap(), map, sim.now, sim.wall);
                }
                Some(Step::Body(b)) => {
                    t.tried.last_mut().unwrap().fed.extend_from_slice(&b);
                    call.handle_body(b, sim.now);
                }
                Some(Step::End) => call.handle_body_end(sim.now),
                Some(Step::Err(e)) => call.handle_transport_error(e, sim.now),
                Some(Step::Advance(d)) => {
                    sim.now += d;
                    if deadline.is_some_and(|at| at <= sim.now) {
                        call.handle_timeout(sim.now);
                    }
                }
                None => {
                    let at = deadline.expect("a waiting call with a silent upstream has no deadline");
                    assert!(at >= sim.now, "deadline in the past");
                    sim.now = at;
                    call.handle_timeout(sim.now);
                }
            },
        }
    }
    assert!(done, "call did not finish");
    t
}

// ---------------------------------------------------------------------------------------------
// Checks

/// The status of an Anthropic in-band error event's data.
fn in_band_status(data: &str) -> StatusCode {
    let kind = keypool_core::anthropic::in_band_error_type(data.as_bytes());
    keypool_core::anthropic::status_for_error_type(kind.as_deref().unwrap_or("api_error"))
}

fn is_anthropic_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
        v["type"] == "error" && v["error"]["type"].is_string() && v["error"]["message"].is_string()
    })
}

/// Every property of one finished call.
fn check_call(
    sim: &Sim,
    cred: Cred,
    config: &CallConfig,
    keys: usize,
    t: &Trace,
) -> Result<(), TestCaseError> {
    let policy = Policy::default();
    let n = t.tried.len();
    // Exactly one answer.
    prop_assert!(t.head.is_some() != t.fail.is_some(), "no answer or two answers");
    // SPEC §8.4.
    match cred {
        Cred::Pool => prop_assert!(n <= keys, "{n} attempts for {keys} keys"),
        Cred::Key | Cred::Passthrough => {
            prop_assert_eq!(n, 1);
            prop_assert!(t.tried[0].key.is_none() && t.tried[0].marks.is_empty());
        }
    }
    // SPEC §8.5: only key failures mark, and only a marked attempt is followed by another.
    for (i, a) in t.tried.iter().enumerate() {
        prop_assert!(a.marks.len() <= 1, "{:?}", a.marks);
        let last = i + 1 == n;
        let Some(mark) = a.marks.first() else {
            prop_assert!(last, "attempt {} was not marked but another followed", i + 1);
            if let (Cred::Pool, Some((status, headers))) = (cred, a.answer.head_map()) {
                let verdict = policy.classify(status, &headers, &a.fed, sim.wall);
                prop_assert_eq!(verdict, Verdict::Deliver, "a key failure was not failed over");
            }
            continue;
        };
        prop_assert!(
            !last
                || matches!(
                    t.fail.as_ref().map(|f| &f.error),
                    Some(CallError::Exhausted { .. })
                ),
            "the last attempt was marked but the call did not end exhausted"
        );
        let (status, headers) = a.answer.head_map().expect("a mark without a response head");
        let expected = if mark.status == status {
            policy.classify(status, &headers, &a.fed, sim.wall)
        } else {
            // An in-band error before commit, in first-content mode.
            prop_assert!(
                matches!(config.commit, CommitPoint::FirstContent { .. }),
                "in-band mark in first-byte mode"
            );
            prop_assert!(status.is_success());
            let data = a
                .answer
                .events()
                .unwrap_or_default()
                .iter()
                .find_map(|e| match &e.kind {
                    EvKind::Error(d) => Some(d.clone()),
                    _ => None,
                })
                .expect("an in-band mark without an error event");
            prop_assert_eq!(mark.status, in_band_status(&data));
            policy.classify(mark.status, &headers, data.as_bytes(), sim.wall)
        };
        prop_assert!(expected.is_failover());
        prop_assert_eq!(mark.verdict, expected);
        // Each key is tried once per call, from an available state.
        prop_assert_eq!(mark.transition, keypool_core::Transition::Entered);
        let state = sim.pool.state(mark.key, sim.pool.origin());
        match expected {
            Verdict::CoolDown { duration, reason } => {
                prop_assert_eq!(
                    state,
                    KeyState::Cooling {
                        until: a.marked_at.unwrap() + duration,
                        reason
                    }
                )
            }
            Verdict::Disable { reason } => prop_assert_eq!(state, KeyState::Disabled { reason }),
            Verdict::Deliver => unreachable!(),
        }
    }
    // The outcome is the core's account of how the call ended.
    let expected = match (&t.fail, &t.abort) {
        (Some(f), _) => Outcome::of_error(&f.error),
        (None, Some(a)) => Outcome::of_error(&a.error),
        (None, None) => t.outcome.unwrap_or(Outcome::ClientGone),
    };
    prop_assert_eq!(t.outcome, Some(expected));
    prop_assert!(
        matches!(
            expected,
            Outcome::Failed(_) | Outcome::UpstreamBroke(_) | Outcome::Timeout | Outcome::Complete
        ) || (expected == Outcome::UpstreamError
            && t.head.as_ref().map(|h| h.kind) == Some(keypool_core::call::BodyKind::EventStream)),
        "outcome {expected:?}"
    );
    // Failures are Anthropic-shaped.
    if let Some(f) = &t.fail {
        prop_assert!(
            is_anthropic_error(f.response.body()),
            "fail body {:?}",
            String::from_utf8_lossy(f.response.body())
        );
        prop_assert_eq!(f.response.status(), f.error.status());
    }
    // SPEC §8.6: the delivered body comes from the answering attempt only.
    if let Some(head) = &t.head {
        let a = t.tried.last().unwrap();
        match head.kind {
            keypool_core::call::BodyKind::Plain => {
                prop_assert_eq!(&t.body, &a.fed, "plain body differs from the upstream's");
                prop_assert!(t.abort.as_ref().is_none_or(|ab| ab.event.is_none()));
            }
            keypool_core::call::BodyKind::EventStream => {
                let events = a.answer.events().expect("an event stream without events");
                let mut whole = Vec::new();
                let mut complete = 0;
                let mut prefixes = vec![Vec::new()];
                for e in events {
                    whole.extend_from_slice(e.bytes.as_bytes());
                    if whole.len() <= a.fed.len() {
                        complete = prefixes.len();
                    }
                    prefixes.push(whole.clone());
                }
                let k = prefixes.iter().position(|p| *p == t.body);
                prop_assert!(
                    k.is_some(),
                    "delivered bytes are not whole upstream events: {:?}",
                    String::from_utf8_lossy(&t.body)
                );
                let too_large = matches!(
                    t.abort.as_ref().map(|a| &a.error),
                    Some(CallError::StreamBroken(StreamBreak::EventTooLarge))
                );
                if !too_large {
                    prop_assert_eq!(k, Some(complete), "a complete event was held back");
                }
                if let Some(ab) = &t.abort {
                    let ev = ab.event.as_ref().expect("a broken stream without an error event");
                    let text = std::str::from_utf8(ev).unwrap();
                    let data = text
                        .strip_prefix("event: error\ndata: ")
                        .and_then(|d| d.strip_suffix("\n\n"))
                        .expect("not one SSE error event");
                    prop_assert!(!data.contains('\n'));
                    prop_assert!(is_anthropic_error(data.as_bytes()));
                }
            }
        }
    }
    Ok(())
}

fn setup_pool(sim: &Sim, starts: &[Start]) {
    for (id, s) in sim.pool.ids().zip(starts) {
        match s {
            Start::Available => {}
            Start::Cooling(d) => {
                let _ = sim.pool.cool_down(id, sim.now, *d, CoolReason::RateLimited);
            }
            Start::Disabled => {
                let _ = sim.pool.disable(id, DisableReason::Operator);
            }
        }
    }
}

fn credential(sim: &Sim, cred: Cred) -> Credential {
    match cred {
        Cred::Pool => Credential::Pool(sim.pool.clone()),
        Cred::Key => Credential::Key(Secret::new("sk-ant-caller-own-key-000000000").unwrap()),
        Cred::Passthrough => Credential::Passthrough,
    }
}

fn cred() -> impl Strategy<Value = Cred> {
    prop_oneof![6 => Just(Cred::Pool), 1 => Just(Cred::Key), 1 => Just(Cred::Passthrough)]
}

/// Keys, their starting states and their answers (one per key, plus the BYOK answer).
fn pool_case() -> impl Strategy<Value = (Vec<Start>, Vec<Answer>, Answer)> {
    (1usize..=6).prop_flat_map(|n| {
        (
            prop::collection::vec(start_state(), n),
            prop::collection::vec(answer(), n),
            answer(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// One call against random per-key upstream behaviour.
    #[test]
    fn one_call((starts, answers, byok) in pool_case(), cred in cred(), config in config()) {
        let mut sim = Sim::new(starts.len());
        setup_pool(&sim, &starts);
        let before = raw(&sim.pool);
        let mut call = Call::new(Sim::request(), credential(&sim, cred), &config, "req_prop", sim.now);
        let mut answer_for = |key: Option<KeyId>| match key {
            Some(k) => answers[k.index()].clone(),
            None => byok.clone(),
        };
        let t = drive(&mut sim, &mut call, &mut answer_for);
        check_call(&sim, cred, &config, starts.len(), &t)?;
        let marked: Vec<usize> = t.tried.iter().filter(|a| !a.marks.is_empty()).filter_map(|a| a.key).map(KeyId::index).collect();
        for (i, (b, a)) in before.iter().zip(raw(&sim.pool)).enumerate() {
            if !marked.contains(&i) {
                prop_assert_eq!(b, &a, "key {} changed without a mark", i);
            }
        }
        // Keys that were cooling or disabled at the start were never tried.
        for a in &t.tried {
            if let Some(k) = a.key {
                prop_assert!(matches!(starts[k.index()], Start::Available) || matches!(starts[k.index()], Start::Cooling(d) if d <= a.sent_at - sim.pool.origin()));
            }
        }
    }

    /// Several calls in sequence on one pool while simulated time moves on.
    #[test]
    fn calls_in_sequence(
        n in 1usize..=5,
        calls in prop::collection::vec(
            (prop::collection::vec(answer(), 5), cred(), config(),
             prop::sample::select(vec![0u64, 0, 1, 5, 30, 61, 600, 3601])),
            1..6,
        ),
    ) {
        let mut sim = Sim::new(n);
        for (answers, cred, config, gap) in calls {
            sim.advance(Duration::from_secs(gap));
            let before = raw(&sim.pool);
            let start = sim.now;
            let mut call = Call::new(Sim::request(), credential(&sim, cred), &config, "req_prop", sim.now);
            let mut answer_for = |key: Option<KeyId>| answers[key.map_or(0, KeyId::index)].clone();
            let t = drive(&mut sim, &mut call, &mut answer_for);
            check_call(&sim, cred, &config, n, &t)?;
            // Keys cooling or disabled when the call started are only tried once free again.
            for a in &t.tried {
                let Some(k) = a.key else { continue };
                match &before[k.index()] {
                    KeyState::Available => {}
                    KeyState::Cooling { until, .. } => prop_assert!(*until <= a.sent_at, "{until:?} {start:?}"),
                    KeyState::Disabled { .. } => prop_assert!(false, "disabled key {k:?} tried"),
                }
            }
        }
    }
}
