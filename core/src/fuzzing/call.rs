//! `call_ops`: a vector of operations applied to 1–4 concurrent calls on one shared pool of 1–5
//! keys, with SPEC §8 invariants 1–6 checked after every operation (DESIGN style rule 9).
//!
//! A violation panics on purpose (that is how libFuzzer learns about it), so `assert!` is the
//! tool here.

use std::time::{Duration, Instant, SystemTime};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::call::{
    BodyKind, BodyOutput, Call, CallConfig, CommitPoint, Credential, Outcome, Output, Request, Timeouts,
    TransportError,
};
use crate::pool::{KeyId, KeyState, Order, Pool, Transition};
use crate::secret::Secret;

/// Statuses that matter to the policy, picked more often than a raw `u16` would.
const STATUSES: [u16; 12] = [200, 201, 400, 401, 402, 403, 404, 413, 429, 500, 503, 529];

const CREDIT: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#;

#[derive(Debug, Arbitrary)]
enum Status {
    Table(u8),
    Raw(u16),
}

impl Status {
    fn code(&self) -> StatusCode {
        let code = match self {
            Self::Table(i) => STATUSES[usize::from(*i) % STATUSES.len()],
            Self::Raw(n) => 100 + n % 900,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::OK)
    }
}

#[derive(Debug, Arbitrary)]
enum Retry {
    Ms(u32),
    Secs(u32),
    Decimal(u32, u16),
    /// An HTTP-date this many seconds from the simulated wall clock (negative: in the past).
    Date(i32),
    /// Any bytes in `retry-after` (or in `retry-after-ms` when the flag is set).
    Raw(bool, Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum ContentType {
    EventStream,
    EventStreamParams,
    Json,
    None,
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum ErrorType {
    RateLimit,
    Overloaded,
    Authentication,
    Permission,
    Billing,
    InvalidRequest,
    Credit,
    Api,
    Garbage,
}

#[derive(Debug, Arbitrary)]
enum Event {
    MessageStart,
    Ping,
    Comment,
    Blank,
    BlockStart,
    Delta(u8),
    MessageStop,
    Error(ErrorType),
    /// A whole event with a CR LF blank line (the framer may cut it between CR and LF).
    Crlf,
    /// Raw bytes followed by a blank line.
    Raw(Vec<u8>),
}

impl Event {
    fn write(&self, out: &mut Vec<u8>) {
        let text: &[u8] = match self {
            Self::MessageStart => b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n",
            Self::Ping => b"event: ping\ndata: {\"type\": \"ping\"}\n\n",
            Self::Comment => b": keep-alive\n\n",
            Self::Blank => b"\n",
            Self::BlockStart => b"event: content_block_start\ndata: {\"type\":\"content_block_start\"}\n\n",
            Self::Delta(n) => {
                out.extend_from_slice(b"event: content_block_delta\ndata: {\"text\":\"");
                out.extend(std::iter::repeat_n(b'a', usize::from(*n)));
                b"\"}\n\n"
            }
            Self::MessageStop => b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            Self::Error(kind) => {
                let data = match kind {
                    ErrorType::RateLimit => {
                        r#"{"type":"error","error":{"type":"rate_limit_error","message":"x"}}"#
                    }
                    ErrorType::Overloaded => {
                        r#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#
                    }
                    ErrorType::Authentication => {
                        r#"{"type":"error","error":{"type":"authentication_error","message":"x"}}"#
                    }
                    ErrorType::Permission => {
                        r#"{"type":"error","error":{"type":"permission_error","message":"x"}}"#
                    }
                    ErrorType::Billing => {
                        r#"{"type":"error","error":{"type":"billing_error","message":"x"}}"#
                    }
                    ErrorType::InvalidRequest => {
                        r#"{"type":"error","error":{"type":"invalid_request_error","message":"x"}}"#
                    }
                    ErrorType::Credit => CREDIT,
                    ErrorType::Api => r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
                    ErrorType::Garbage => "not json",
                };
                out.extend_from_slice(b"event: error\ndata: ");
                out.extend_from_slice(data.as_bytes());
                b"\n\n"
            }
            Self::Crlf => b"event: content_block_delta\r\ndata: {}\r\n\r\n",
            Self::Raw(bytes) => {
                out.extend_from_slice(bytes);
                b"\n\n"
            }
        };
        out.extend_from_slice(text);
    }
}

#[derive(Debug, Arbitrary)]
enum Transport {
    Connect,
    Dns,
    Tls,
    Reset,
    Eof,
    Timeout,
    Protocol,
}

impl Transport {
    fn error(&self) -> TransportError {
        match self {
            Self::Connect => TransportError::Connect,
            Self::Dns => TransportError::Dns,
            Self::Tls => TransportError::Tls,
            Self::Reset => TransportError::Reset,
            Self::Eof => TransportError::Eof,
            Self::Timeout => TransportError::Timeout,
            Self::Protocol => TransportError::Protocol,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// Starts a new call (up to 4 are kept); `byok` 0–1: own key / passthrough, else the pool.
    NewCall {
        byok: u8,
        config: Config,
    },
    /// Makes another call the current one.
    Switch(u8),
    /// The response head of the current call's attempt.
    Head {
        status: Status,
        retry: Option<Retry>,
        date: Option<i32>,
        content_type: ContentType,
        /// The organisation (one of three) and workspace (one of two) the answer names.
        org: Option<(u8, Option<bool>)>,
        /// A rate-limit dimension at 0, resetting this many seconds later (SPEC §11.4).
        exhausted: Option<u8>,
        /// A `content-length` header: a plain body is complete once it has delivered this many
        /// bytes.
        length: Option<u16>,
    },
    /// Body bytes, in two chunks cut at `split`.
    Body {
        data: Vec<u8>,
        split: u16,
    },
    /// Whole events (plus `tail` bytes of a cut one), in two chunks cut at `split`.
    Events {
        events: Vec<Event>,
        tail: Vec<u8>,
        split: u16,
    },
    /// A 400 whose body is the credit-balance error.
    CreditBody,
    End,
    Transport(Transport),
    Advance {
        millis: u32,
    },
    /// A clock jump of any size (skipped when the instant cannot represent it).
    Jump {
        secs: u64,
    },
    /// Time jumps to the current call's deadline, which is then handled.
    Timeout,
    /// The transport asks for the awaited attempt again (a stale pooled connection).
    Resend,
    CallerGone,
    /// An operator re-enables a key.
    Enable(u8),
}

#[derive(Debug, Arbitrary)]
enum Span {
    Default,
    Millis(u32),
    Never,
}

impl Span {
    fn or(&self, default: Duration) -> Duration {
        match self {
            Self::Default => default,
            Self::Millis(ms) => Duration::from_millis(u64::from(*ms)),
            Self::Never => Duration::MAX,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Config {
    first_content: Option<Span>,
    first_byte: Span,
    idle: Span,
    max_event: Option<u16>,
}

impl Config {
    fn build(&self) -> CallConfig {
        let defaults = Timeouts::default();
        let timeouts = Timeouts {
            first_byte: self.first_byte.or(defaults.first_byte),
            idle: self.idle.or(defaults.idle),
            connect: defaults.connect,
        };
        let commit = match &self.first_content {
            None => CommitPoint::FirstByte,
            Some(hold) => CommitPoint::FirstContent {
                hold: hold.or(CommitPoint::DEFAULT_HOLD),
            },
        };
        let mut config = CallConfig::default().with_commit(commit).with_timeouts(timeouts);
        config.max_event_size = self.max_event.map(usize::from);
        config
    }
}

/// One call and what the fuzzer knows about it.
struct Tracked {
    call: Call,
    byok: bool,
    keys: Vec<KeyId>,
    /// The current attempt got a response head with this status.
    head: Option<StatusCode>,
    /// The current attempt was marked (so a next attempt is allowed).
    marked: bool,
    /// Body bytes given to the current attempt after its head.
    fed: Vec<u8>,
    /// The head delivered to the caller.
    delivered: Option<BodyKind>,
    /// Body bytes delivered to the caller (a synthesized error event excluded).
    body: Vec<u8>,
    failed: bool,
    aborted: bool,
    gone: bool,
    done: bool,
}

struct World {
    pool: std::sync::Arc<Pool>,
    origin: Instant,
    now: Instant,
    calls: Vec<Tracked>,
    current: usize,
    next_id: u32,
}

/// Where events end in an event stream (the framer cuts there): after every blank line, and
/// for a blank line ended by CR LF also between the CR and the LF.
fn event_ends(bytes: &[u8]) -> Vec<usize> {
    const BOM: &[u8] = "\u{feff}".as_bytes();
    let mut ends = vec![0];
    let mut line_start = if bytes.starts_with(BOM) { BOM.len() } else { 0 };
    let mut i = line_start;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' || b == b'\r' {
            let blank = i == line_start;
            let mut next = i + 1;
            if blank {
                ends.push(next);
            }
            if b == b'\r' && bytes.get(next) == Some(&b'\n') {
                next += 1;
                if blank {
                    ends.push(next);
                }
            }
            line_start = next;
            i = next;
        } else {
            i += 1;
        }
    }
    ends
}

fn is_anthropic_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| {
        v["type"] == "error" && v["error"]["type"].is_string() && v["error"]["message"].is_string()
    })
}

/// The stored state of every key, independent of `now`.
fn raw(pool: &Pool) -> Vec<KeyState> {
    pool.ids().map(|id| pool.state(id, pool.origin())).collect()
}

fn rank(s: &KeyState) -> (u8, Option<Instant>) {
    match s {
        KeyState::Available => (0, None),
        KeyState::Cooling { until, .. } => (1, Some(*until)),
        // A disabled key's reason may change; only being disabled is monotone.
        KeyState::Disabled { .. } => (2, None),
    }
}

impl World {
    fn wall(&self) -> SystemTime {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        base.checked_add(self.now - self.origin).unwrap_or(base)
    }

    fn new_call(&mut self, byok: u8, config: &Config) {
        if self.calls.len() == 4 {
            let Some(i) = self.calls.iter().position(|c| c.done) else {
                return;
            };
            self.calls.remove(i);
        }
        let credential = match byok {
            0 => match Secret::new("sk-ant-caller-own-key-000000000") {
                Ok(secret) => Credential::Key(secret),
                Err(_) => Credential::Passthrough,
            },
            1 => Credential::Passthrough,
            _ => Credential::Pool(self.pool.clone()),
        };
        let byok = !matches!(credential, Credential::Pool(_));
        // Three model families, and requests without a model (SPEC §11.2).
        let request = match self.next_id % 4 {
            0 => Request::post_json(
                "/v1/messages",
                "{\"model\":\"claude-sonnet-4-5\",\"stream\":true}",
            ),
            1 => Request::post_json("/v1/messages", "{\"model\":\"claude-haiku-4-5\",\"stream\":true}"),
            2 => Request::post_json("/v1/messages", "{\"model\":\"claude\",\"stream\":true}"),
            _ => Request::post_json("/v1/models", ""),
        };
        self.next_id += 1;
        let call = Call::new(
            request,
            credential,
            &config.build(),
            format!("req_{}", self.next_id),
            self.now,
        );
        self.calls.push(Tracked {
            call,
            byok,
            keys: Vec::new(),
            head: None,
            marked: false,
            fed: Vec::new(),
            delivered: None,
            body: Vec::new(),
            failed: false,
            aborted: false,
            gone: false,
            done: false,
        });
        self.current = self.calls.len() - 1;
    }

    /// Drains the current call's marks and outputs, checking every invariant on the way.
    fn drain(&mut self) -> Vec<(KeyId, Transition)> {
        let n = self.pool.len();
        let now = self.now;
        let pool = &self.pool;
        let Some(t) = self.calls.get_mut(self.current) else {
            return Vec::new();
        };
        let mut marks = Vec::new();
        // Before the head: what `poll_output` can say.
        while t.delivered.is_none() && !t.failed {
            match t.call.poll_output() {
                Output::Send(a) => {
                    // §8.4 and §8.6: bounded attempts, none after the answer.
                    assert!(t.delivered.is_none() && !t.failed, "an attempt after the answer");
                    assert!(
                        t.keys.is_empty() || t.marked,
                        "a second attempt without a key failure"
                    );
                    assert!(!t.byok || a.number == 1, "a second BYOK attempt");
                    match a.key {
                        Some(k) => {
                            assert!(!t.byok);
                            // §8.1: each key once, and only while it is available.
                            assert!(!t.keys.contains(&k), "{k:?} tried twice");
                            let state = pool.state(k, now);
                            assert!(state.is_available(), "sent to {k:?} while {state:?}");
                            t.keys.push(k);
                            assert!(t.keys.len() <= n, "more attempts than keys");
                        }
                        None => {
                            assert!(t.byok, "a pooled attempt without a key");
                            t.keys.clear();
                        }
                    }
                    assert_eq!(a.number, t.keys.len().max(1));
                    t.head = None;
                    t.marked = false;
                    t.fed.clear();
                }
                // §8.5: only key failures mark, and only the key of the current attempt.
                Output::Mark(mark) => {
                    assert!(!t.byok, "a BYOK call marked {mark:?}");
                    let Some(&current) = t.keys.last() else {
                        panic!("a mark before any attempt: {mark:?}");
                    };
                    if mark.key == current {
                        assert!(!t.marked, "two marks for one attempt's key");
                        t.marked = true;
                    } else {
                        // SPEC §11: an answer that speaks for the organisation marks the other
                        // keys known to belong to it, never a key of another one.
                        let Some(scope) = pool.scope(current) else {
                            panic!("a mark of another key while the organisation is unknown: {mark:?}");
                        };
                        assert_eq!(
                            pool.scope(mark.key).map(|s| &s.organisation),
                            Some(&scope.organisation),
                            "a mark of a key of another organisation"
                        );
                    }
                    assert!(
                        mark.verdict.is_failover(),
                        "a mark that is not a key failure: {mark:?}"
                    );
                    let Some(head) = t.head else {
                        panic!("a mark without a response head: {mark:?}");
                    };
                    assert!(
                        head == mark.status || head.is_success(),
                        "mark status {} for a {head} head",
                        mark.status
                    );
                    match mark.mark.family() {
                        None => marks.push((mark.key, mark.transition)),
                        // A family mark leaves the key-wide state alone; a change shows for the
                        // family.
                        Some(family) => {
                            if mark.transition != Transition::Unchanged {
                                assert!(pool.family_state(mark.key, family, now).is_cooling());
                            }
                        }
                    }
                    // The mark is a portable value naming the same key, at the attempt's generation.
                    assert_eq!(mark.mark.key(), pool.fingerprint(mark.key));
                }
                Output::Head(h) => {
                    assert!(t.delivered.is_none() && !t.failed, "a second answer");
                    assert!(t.head.is_some(), "a head delivered before the upstream's");
                    t.delivered = Some(h.kind);
                }
                Output::Fail(f) => {
                    assert!(t.delivered.is_none() && !t.failed, "a failure after the answer");
                    assert!(
                        is_anthropic_error(f.response.body()),
                        "not an Anthropic error body"
                    );
                    t.failed = true;
                }
                Output::Wait(_) => break,
            }
        }
        // After the head: what `poll_body` can say.
        while t.delivered.is_some() && !t.done {
            match t.call.poll_body() {
                BodyOutput::Body(b) => {
                    assert!(!b.is_empty(), "an empty body chunk");
                    assert!(!t.aborted, "body after the abort");
                    t.body.extend_from_slice(&b);
                }
                BodyOutput::Abort(a) => {
                    assert!(t.delivered.is_some() && !t.aborted, "abort out of place");
                    t.aborted = true;
                    match (t.delivered, &a.event) {
                        (Some(BodyKind::EventStream), Some(ev)) => {
                            let data = ev
                                .strip_prefix(b"event: error\ndata: ")
                                .and_then(|d| d.strip_suffix(b"\n\n"));
                            assert!(
                                data.is_some_and(|d| !d.contains(&b'\n') && is_anthropic_error(d)),
                                "not one synthesized error event"
                            );
                        }
                        (Some(BodyKind::Plain), None) => {}
                        (kind, event) => panic!("abort of a {kind:?} body with {event:?}"),
                    }
                }
                BodyOutput::Wait(_) => break,
                BodyOutput::Done => break,
            }
        }
        if t.call.is_done() && !t.done {
            assert!(
                t.gone || t.failed || t.delivered.is_some(),
                "ended without an answer"
            );
            // The outcome is the core's account of what the caller saw.
            match t.call.outcome() {
                Some(Outcome::Failed(_)) => assert!(t.failed, "a failure outcome without a failure"),
                Some(Outcome::ClientGone) => assert!(t.gone, "client_gone while the caller was there"),
                Some(Outcome::UpstreamBroke(_) | Outcome::Timeout) => {
                    assert!(t.aborted, "a broken outcome without an abort")
                }
                Some(Outcome::Complete) => assert!(
                    t.delivered.is_some() && !t.aborted,
                    "complete without a whole body"
                ),
                Some(Outcome::UpstreamError) => assert!(
                    t.delivered == Some(BodyKind::EventStream) && !t.aborted,
                    "upstream_error outside a whole event stream"
                ),
                None => panic!("a call over without an outcome"),
            }
            t.done = true;
        }
        // §8.6: the caller got exactly the upstream's bytes, in whole events for a stream.
        match t.delivered {
            Some(BodyKind::Plain) => assert!(t.fed == t.body, "plain body differs from the upstream's"),
            Some(BodyKind::EventStream) => {
                assert!(t.fed.starts_with(&t.body), "stream bytes not from the upstream");
                assert!(
                    event_ends(&t.fed).contains(&t.body.len()),
                    "stream cut inside an event"
                );
            }
            None => assert!(t.body.is_empty()),
        }
        marks
    }

    fn apply(&mut self, op: Op) {
        let before = raw(&self.pool);
        let mut enabled = None;
        let now = self.now;
        let wall = self.wall();
        if let Op::NewCall { byok, config } = &op {
            self.new_call(*byok, config);
        }
        let n_calls = self.calls.len();
        let Some(t) = self.calls.get_mut(self.current) else {
            return;
        };
        let live = !t.done;
        match op {
            Op::NewCall { .. } => {}
            Op::Switch(i) => self.current = usize::from(i) % n_calls,
            Op::Head {
                status,
                retry,
                date,
                content_type,
                org,
                exhausted,
                length,
            } => {
                let status = status.code();
                let mut headers = HeaderMap::new();
                let mut put =
                    |name: &'static str, value: Result<HeaderValue, http::header::InvalidHeaderValue>| {
                        if let Ok(v) = value {
                            headers.append(HeaderName::from_static(name), v);
                        }
                    };
                let date_of = |offset: i32| {
                    let at = if offset >= 0 {
                        wall.checked_add(Duration::from_secs(offset.unsigned_abs().into()))
                    } else {
                        wall.checked_sub(Duration::from_secs(offset.unsigned_abs().into()))
                    };
                    // HTTP-dates exist from 1970 to 9999 (httpdate panics outside).
                    let secs = at
                        .unwrap_or(wall)
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                        .min(253_402_300_799);
                    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
                    HeaderValue::from_str(&httpdate::fmt_http_date(at))
                };
                match retry {
                    None => {}
                    Some(Retry::Ms(ms)) => put("retry-after-ms", HeaderValue::from_str(&ms.to_string())),
                    Some(Retry::Secs(s)) => put("retry-after", HeaderValue::from_str(&s.to_string())),
                    Some(Retry::Decimal(a, b)) => {
                        put("retry-after", HeaderValue::from_str(&format!("{a}.{b}")))
                    }
                    Some(Retry::Date(offset)) => put("retry-after", date_of(offset)),
                    Some(Retry::Raw(ms, bytes)) => put(
                        if ms { "retry-after-ms" } else { "retry-after" },
                        HeaderValue::from_bytes(&bytes),
                    ),
                }
                if let Some(offset) = date {
                    put("date", date_of(offset));
                }
                if let Some((o, ws)) = org {
                    put(
                        "anthropic-organization-id",
                        HeaderValue::from_str(&format!("org-{}", o % 3)),
                    );
                    if let Some(ws) = ws {
                        put(
                            "anthropic-workspace-id",
                            HeaderValue::from_str(&format!("ws-{}", u8::from(ws))),
                        );
                    }
                }
                if let Some(secs) = exhausted {
                    put("anthropic-ratelimit-tokens-remaining", HeaderValue::from_str("0"));
                    let at = wall
                        .checked_add(Duration::from_secs(u64::from(secs)))
                        .unwrap_or(wall);
                    put(
                        "anthropic-ratelimit-tokens-reset",
                        HeaderValue::from_str(&crate::civil::format_rfc3339(at)),
                    );
                }
                let ct = match content_type {
                    ContentType::EventStream => Some(HeaderValue::from_static("text/event-stream")),
                    ContentType::EventStreamParams => {
                        Some(HeaderValue::from_static("Text/Event-Stream ; charset=utf-8"))
                    }
                    ContentType::Json => Some(HeaderValue::from_static("application/json")),
                    ContentType::None => None,
                    ContentType::Raw(bytes) => HeaderValue::from_bytes(&bytes).ok(),
                };
                if let Some(ct) = ct {
                    put("content-type", Ok(ct));
                }
                if let Some(length) = length {
                    put("content-length", Ok(HeaderValue::from(length)));
                }
                if live && t.head.is_none() {
                    t.head = Some(status);
                }
                t.call.handle_response_head(status, headers, now, wall);
            }
            Op::Body { data, split } => feed(t, Bytes::from(data), split, now),
            Op::Events { events, tail, split } => {
                let mut bytes = Vec::new();
                for e in &events {
                    e.write(&mut bytes);
                }
                bytes.extend_from_slice(&tail);
                feed(t, Bytes::from(bytes), split, now);
            }
            Op::CreditBody => feed(t, Bytes::from_static(CREDIT.as_bytes()), u16::MAX, now),
            Op::End => t.call.handle_body_end(now),
            Op::Transport(e) => t.call.handle_transport_error(e.error(), now),
            Op::Advance { millis } => {
                if let Some(at) = now.checked_add(Duration::from_millis(u64::from(millis))) {
                    self.now = at;
                }
            }
            Op::Jump { secs } => {
                if let Some(at) = now.checked_add(Duration::from_secs(secs)) {
                    self.now = at;
                }
            }
            Op::Timeout => {
                if let Some(at) = t.call.poll_timeout() {
                    self.now = self.now.max(at);
                }
                t.call.handle_timeout(self.now);
            }
            Op::Resend => {
                // The same attempt (key and number) as the last one sent; `resend` takes the
                // call by shared reference, so nothing about it changes.
                if let Some(a) = t.call.resend() {
                    assert!(t.delivered.is_none() && !t.failed, "a resend after the answer");
                    assert_eq!(a.key, t.keys.last().copied().filter(|_| !t.byok));
                    assert_eq!(a.number, t.keys.len().max(1));
                }
            }
            Op::CallerGone => {
                t.gone = true;
                t.call.handle_caller_gone();
            }
            Op::Enable(k) => {
                let Some(id) = self.pool.key_at(usize::from(k) % self.pool.len()) else {
                    return;
                };
                let _ = self.pool.enable(id, now);
                enabled = Some(id.index());
            }
        }
        let marks = self.drain();
        // §8.2: the pool changes only through marks, and cooldowns never shrink.
        let after = raw(&self.pool);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if enabled == Some(i) {
                continue;
            }
            assert!(rank(a) >= rank(b), "key {i} went back from {b:?} to {a:?}");
            let marked = marks
                .iter()
                .any(|(k, tr)| k.index() == i && *tr != Transition::Unchanged);
            assert_eq!(
                rank(a) != rank(b),
                marked,
                "key {i}: {b:?} -> {a:?}, marks {marks:?}"
            );
        }
    }
}

/// Feeds `bytes` to the call in two chunks, recording them as the current attempt's body.
fn feed(t: &mut Tracked, bytes: Bytes, split: u16, now: Instant) {
    let at = usize::from(split).min(bytes.len());
    for chunk in [bytes.slice(..at), bytes.slice(at..)] {
        if chunk.is_empty() {
            continue;
        }
        // Bytes before the head or after the end are ignored by the call.
        if t.head.is_some() && t.call.outcome().is_none() {
            t.fed.extend_from_slice(&chunk);
        }
        t.call.handle_body(chunk, now);
    }
}

/// The `call_ops` fuzz target. `origin` is the pool's origin; all later instants are derived
/// from it (the core never reads a clock).
pub fn call_ops(data: &[u8], origin: Instant) {
    let mut u = Unstructured::new(data);
    let Ok(keys) = u.int_in_range(1..=5usize) else {
        return;
    };
    let order = if u.arbitrary::<bool>().unwrap_or(false) {
        Order::RoundRobin
    } else {
        Order::PrimaryWithFallback
    };
    let secrets = (0..keys).map(|i| format!("sk-ant-api03-fuzz-key-{i:04}-SECRET"));
    let Ok(pool) = Pool::new(secrets, order, origin) else {
        return;
    };
    let Ok(config) = u.arbitrary::<Config>() else {
        return;
    };
    let mut world = World {
        pool: std::sync::Arc::new(pool),
        origin,
        now: origin,
        calls: Vec::new(),
        current: 0,
        next_id: 0,
    };
    world.apply(Op::NewCall { byok: 2, config });
    while let Ok(op) = u.arbitrary::<Op>() {
        world.apply(op);
        if u.is_empty() {
            break;
        }
    }
}
