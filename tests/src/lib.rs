//! # keypool-conformance
//!
//! The scenario table of everything a caller can observe from SPEC §3–6, written once and run
//! against every adapter through [`Adapter`] and [`conformance_suite!`]. A new adapter
//! implements the trait in a few lines and inherits the whole suite.
//!
//! Each scenario starts a [`MockServer`] (127.0.0.1, port 0, plain HTTP or TLS), builds a client
//! for a fresh pool, scripts the upstream per key, and checks what the caller saw, what the
//! upstream received (the mock's record) and the pool's state. Every text the suite sees —
//! bodies, headers, error messages, `Debug` output — goes through [`Transcript`], which fails
//! the scenario if any part of a secret longer than its hint appears.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use keypool_core::call::{
    CallConfig, CallError, CommitPoint, Request, StreamBreak, Timeouts, TransportError,
};
use keypool_core::client::{BodyError, ClientError, StreamError};
use keypool_core::sse::Event;
use keypool_core::{KeyState, Pool};
pub use keypool_mock::{Ending, MockServer, Reply, RetryAfter, SseEvent, StreamScript};

/// How a client under test is built.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The upstream base URL (the mock's plain or TLS URL).
    pub base_url: String,
    /// The root certificate to trust, for TLS.
    pub ca_der: Option<Vec<u8>>,
    /// The pool's keys.
    pub keys: Vec<String>,
    /// Policy, commit point, timeouts.
    pub config: CallConfig,
}

/// A blocking (non-streaming) answer as the caller saw it, normalised across adapters: an
/// upstream response delivered as is, or keypool's own error rendered as HTTP.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The HTTP status; 0 when the connection closed before any response head (only a proxy
    /// under test can do that).
    pub status: u16,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Vec<u8>,
    /// For keypool's own answers: the typed error's `Display` and `Debug`; for a delivered
    /// answer whose body broke after the head (reset, EOF inside a chunked body, idle timeout):
    /// the error the body read ended with.
    pub error: Option<String>,
    /// For a delivered answer whose body broke after the head: exactly how, as the core said
    /// ([`CallError::BodyBroken`]).
    pub broke: Option<StreamBreak>,
    /// The upstream attempts the call reported making: the library clients' `CallSummary`
    /// (on the body, or on keypool's own error), the gateway's request log line for a whole
    /// delivered answer. `None` where there is no such report.
    pub attempts: Option<usize>,
}

/// A streaming answer as the caller saw it.
#[derive(Debug, Clone, Default)]
pub struct StreamAnswer {
    /// The HTTP status (200 for a delivered stream).
    pub status: u16,
    /// The events delivered, `(type, data)`, in order. A synthesized error is not among them.
    pub events: Vec<(String, String)>,
    /// Set when the stream broke after commit (keypool's synthesized error), with its message.
    pub stream_error: Option<String>,
    /// Exactly how the stream broke after commit, as the core said ([`CallError::StreamBroken`]).
    pub broke: Option<StreamBreak>,
    /// When no stream was delivered: the error body (upstream's or keypool's).
    pub body: Vec<u8>,
    /// For keypool's own answers: the typed error's `Display` and `Debug`.
    pub error: Option<String>,
}

impl Answer {
    /// keypool's own answer (a client's `Err`), rendered as the gateway would send it.
    pub fn from_client_error(e: &ClientError) -> Self {
        let response = e.to_response().unwrap_or_else(|| panic!("no response for {e:?}"));
        Self {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.body().to_vec(),
            error: Some(format!("{e} / {e:?}")),
            broke: None,
            attempts: e.summary().map(|s| s.attempts),
        }
    }
}

/// How a delivered body or stream broke, from the typed error the core ended it with.
pub fn break_of(error: &CallError) -> Option<StreamBreak> {
    match error {
        CallError::StreamBroken(b) | CallError::BodyBroken(b) => Some(*b),
        _ => None,
    }
}

/// How a delivered body broke, from the `io::Error` a byte reader (`Read`, `AsyncRead`) ended
/// with: it wraps the [`BodyError`].
pub fn break_of_io(error: &std::io::Error) -> Option<StreamBreak> {
    let body = error.get_ref()?.downcast_ref::<BodyError>()?;
    break_of(&body.error)
}

/// Every way a delivered body can break, with the suite's idle timeout.
pub fn every_break(idle: Duration) -> Vec<StreamBreak> {
    use TransportError::{Connect, Dns, Eof, Protocol, Reset, Timeout, Tls};
    [Connect, Dns, Tls, Reset, Eof, Timeout, Protocol]
        .into_iter()
        .map(StreamBreak::Transport)
        .chain([
            StreamBreak::EndedEarly,
            StreamBreak::Idle(idle),
            StreamBreak::EventTooLarge,
        ])
        .collect()
}

/// The break a synthesized `error` event's message names (its rendering by the core), for a
/// client that sees only the wire.
pub fn break_named(message: &str, idle: Duration) -> Option<StreamBreak> {
    every_break(idle).into_iter().find(|b| {
        CallError::StreamBroken(*b).to_string() == message || CallError::BodyBroken(*b).to_string() == message
    })
}

impl StreamAnswer {
    /// A stream the client did not deliver: keypool's own answer, or the upstream's answer that
    /// was not an event stream.
    pub fn from_client_error(e: &ClientError) -> Self {
        let a = Answer::from_client_error(e);
        Self {
            status: a.status,
            body: a.body,
            error: a.error,
            ..Self::default()
        }
    }

    /// An empty delivered stream (status 200), to [`record`](Self::record) items into.
    pub fn delivered() -> Self {
        Self {
            status: 200,
            ..Self::default()
        }
    }

    /// Records one item of a delivered stream: an event, or the one error that ends a stream
    /// that broke after commit (a second error fails the scenario).
    pub fn record(&mut self, item: Result<Event, StreamError>) {
        match item {
            Ok(e) => self.events.push((e.event_type().to_owned(), e.data().to_owned())),
            Err(e) => {
                assert!(self.stream_error.is_none(), "a second error after the first");
                self.stream_error = Some(format!("{e} / {e:?}"));
                self.broke = break_of(&e.error);
            }
        }
    }
}

/// One adapter under test.
pub trait Adapter {
    /// The client type.
    type Client: TestClient;
    /// Whether the adapter's HTTP client reads a connection reset in the middle of a body as
    /// the connection's end, so that the core hears of an EOF ([`TransportError::Eof`]) where
    /// the upstream reset. Only a client that hides the difference may say so.
    const RESET_READS_AS_EOF: bool = false;
    /// Whether the client is a proxy that may remove the upstream's identity headers
    /// (`anthropic-organization-id`, `anthropic-workspace-id`) from its answers, as SPEC §13
    /// lets the gateway do. A library client hands them over unchanged.
    const MAY_REMOVE_IDENTITY_HEADERS: bool = false;
    /// Builds a client for a fresh pool.
    fn build(setup: &Setup) -> Self::Client;
}

/// What the suite needs from a client.
pub trait TestClient {
    /// The pool the client uses.
    fn pool(&self) -> Arc<Pool>;
    /// A call with failover.
    fn send(&self, request: Request) -> Answer;
    /// A call with the caller's own key.
    fn send_byok(&self, request: Request, key: &str) -> Answer;
    /// A streaming call with failover.
    fn stream(&self, request: Request) -> StreamAnswer;
    /// Everything else the client under test lets an operator see — logs, metrics, admin
    /// output — for the secret check at the end of each scenario. None by default.
    fn observations(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Every text a scenario saw, checked for key material.
#[derive(Debug, Default)]
pub struct Transcript {
    texts: Vec<String>,
}

impl Transcript {
    /// Adds a text.
    pub fn push(&mut self, text: impl Into<String>) {
        self.texts.push(text.into());
    }
    /// Adds an answer (body, headers, error).
    pub fn answer(&mut self, a: &Answer) {
        self.push(format!("{a:?}"));
        self.push(String::from_utf8_lossy(&a.body).into_owned());
    }
    /// Adds a stream answer.
    pub fn stream(&mut self, a: &StreamAnswer) {
        self.push(format!("{a:?}"));
    }
    /// Fails if any substring of a secret longer than its hint appears anywhere.
    pub fn assert_no_secret(&self, secrets: &[String]) {
        for secret in secrets {
            let hint = keypool_core::Secret::new(secret.as_str()).unwrap().hint().len();
            // Every window one character longer than the hint must be absent.
            let window = (hint + 1).min(secret.len());
            for text in &self.texts {
                for start in 0..=secret.len() - window {
                    let piece = &secret[start..start + window];
                    if let Some(at) = text.find(piece) {
                        // Show where (logs can be megabytes), with the piece itself masked.
                        let before: String = text[..at].chars().rev().take(150).collect();
                        let after: String = text[at + piece.len()..].chars().take(50).collect();
                        panic!(
                            "secret material {:?}... leaked into: ...{}<SECRET>{after}...",
                            &piece[..3],
                            before.chars().rev().collect::<String>()
                        );
                    }
                }
            }
        }
    }
}

/// A running scenario: the mock, the client, the keys.
pub struct World<C> {
    /// The fake upstream.
    pub mock: MockServer,
    /// The client under test.
    pub client: C,
    /// The pool's keys, in order.
    pub keys: Vec<String>,
    /// Everything the caller saw.
    pub transcript: Transcript,
}

/// Transport of a world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP.
    Plain,
    /// TLS with the mock's generated root.
    Tls,
}

fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sk-ant-api03-K{i}q{}", "Zq7Xw9Lm".repeat(5)))
        .collect()
}

fn openai_keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sk-proj-K{i}q{}", "Vb3Np8Rt".repeat(5)))
        .collect()
}

/// Short timeouts so stall scenarios end quickly (real sockets, real time).
pub fn quick_timeouts() -> Timeouts {
    Timeouts {
        first_byte: Duration::from_millis(600),
        idle: Duration::from_millis(600),
        connect: Duration::from_secs(2),
    }
}

impl<C: TestClient> World<C> {
    /// Starts a mock and a client with `n` keys.
    pub fn new<A: Adapter<Client = C>>(transport: Transport, n: usize, config: CallConfig) -> Self {
        Self::start::<A>(MockServer::start(), keys(n), transport, config)
    }

    /// Starts a mock in OpenAI mode and a client with `n` keys and the OpenAI profile.
    pub fn new_openai<A: Adapter<Client = C>>(transport: Transport, n: usize, config: CallConfig) -> Self {
        let config = config.with_profile(keypool_core::Profile::openai());
        Self::start::<A>(MockServer::start_openai(), openai_keys(n), transport, config)
    }

    fn start<A: Adapter<Client = C>>(
        mock: MockServer,
        keys: Vec<String>,
        transport: Transport,
        config: CallConfig,
    ) -> Self {
        let setup = Setup {
            base_url: match transport {
                Transport::Plain => mock.url(),
                Transport::Tls => mock.tls_url(),
            },
            ca_der: (transport == Transport::Tls).then(|| mock.ca_der()),
            keys: keys.clone(),
            config,
        };
        let client = A::build(&setup);
        Self {
            mock,
            client,
            keys,
            transcript: Transcript::default(),
        }
    }

    /// Key `i`'s secret, for scripting the mock.
    pub fn key(&self, i: usize) -> &str {
        &self.keys[i]
    }

    /// Scripts key `i`.
    pub fn script(&self, i: usize, replies: impl IntoIterator<Item = Reply>) {
        self.mock.script(&self.keys[i], replies);
    }

    /// A blocking call, recorded in the transcript.
    pub fn send(&mut self) -> Answer {
        let a = self.client.send(messages(false));
        self.transcript.answer(&a);
        a
    }

    /// A streaming call, recorded in the transcript.
    pub fn stream(&mut self) -> StreamAnswer {
        self.stream_request(messages(true))
    }

    /// A blocking call of any request, recorded in the transcript.
    pub fn send_request(&mut self, request: Request) -> Answer {
        let a = self.client.send(request);
        self.transcript.answer(&a);
        a
    }

    /// A streaming call of any request, recorded in the transcript.
    pub fn stream_request(&mut self, request: Request) -> StreamAnswer {
        let a = self.client.stream(request);
        self.transcript.stream(&a);
        a
    }

    /// The state of key `i` now.
    pub fn state(&self, i: usize) -> KeyState {
        let pool = self.client.pool();
        let id = pool.key_at(i).expect("no such key in the pool");
        pool.state(id, std::time::Instant::now())
    }

    /// Which keys the upstream saw, in order (index into the pool's keys, or `None` for others).
    pub fn seen(&self) -> Vec<Option<usize>> {
        self.mock
            .requests()
            .iter()
            .map(|r| r.key.as_ref().and_then(|k| self.keys.iter().position(|x| x == k)))
            .collect()
    }

    /// Ends the scenario: checks the transcript (and the mock's record) for secrets.
    pub fn finish(mut self) {
        for r in self.mock.requests() {
            // What the upstream received may contain the key in x-api-key, authorization or
            // api-key; nothing else may.
            let mut headers = r.headers.clone();
            for name in ["x-api-key", "authorization", "api-key"] {
                headers.remove(name);
            }
            self.transcript.push(format!("{headers:?}"));
        }
        for text in self.client.observations() {
            self.transcript.push(text);
        }
        self.transcript.push(format!("{:?}", self.client.pool()));
        self.transcript.push(format!(
            "{:?}",
            self.client.pool().snapshot(std::time::Instant::now())
        ));
        self.transcript.assert_no_secret(&self.keys);
    }
}

/// The request every scenario sends: `POST /v1/messages`, with a client credential that must
/// never reach the upstream on a pooled call.
pub fn messages(stream: bool) -> Request {
    messages_for("claude-sonnet-4-5", stream)
}

/// [`messages`] for another model.
pub fn messages_for(model: &str, stream: bool) -> Request {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":"héllo ✓"}}]}}"#
    );
    let mut r = Request::post_json("/v1/messages", Bytes::from(body));
    r.headers
        .insert("x-api-key", "client-own-credential-0000000000".parse().unwrap());
    r.headers.insert("anthropic-beta", "suite-1".parse().unwrap());
    r
}

/// A config with short timeouts and the given commit point.
pub fn config(commit: CommitPoint) -> CallConfig {
    CallConfig::default()
        .with_commit(commit)
        .with_timeouts(quick_timeouts())
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)))
}

mod limits;
mod openai;

pub use openai::{openai_chat, openai_responses};

/// The scenarios. Each takes the adapter and the transport.
pub mod scenarios {
    use super::*;
    pub use crate::limits::scenarios::*;
    pub use crate::openai::scenarios::*;

    fn first_byte() -> CallConfig {
        config(CommitPoint::FirstByte)
    }

    /// One valid key: one attempt, the upstream's answer delivered.
    pub fn one_key_delivers<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 1, first_byte());
        let a = w.send();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(json(&a.body)["type"], "message");
        assert_eq!(w.seen(), [Some(0)]);
        w.finish();
    }

    /// 429 on k0: failover to k1 at once; the next call goes straight to k1 (cooldown honoured).
    pub fn rate_limit_fails_over_and_cools<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(0, [Reply::rate_limited(RetryAfter::Seconds("5".into()))]);
        let a = w.send();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(w.seen(), [Some(0), Some(1)]);
        assert_eq!(a.attempts, Some(2), "the call reports both attempts");
        assert!(w.state(0).is_cooling());
        let a = w.send();
        assert_eq!(a.status, 200);
        assert_eq!(w.seen(), [Some(0), Some(1), Some(1)]);
        assert_eq!(a.attempts, Some(1));
        w.finish();
    }

    /// 401, 403, 402 and the credit-balance 400 disable the key; the call fails over.
    pub fn key_rejections_disable<A: Adapter>(t: Transport) {
        for (reply, reason) in [
            (Reply::unauthorized(), keypool_core::DisableReason::Unauthorized),
            (Reply::forbidden(), keypool_core::DisableReason::Forbidden),
            (Reply::billing(), keypool_core::DisableReason::Billing),
            (Reply::credit_balance(), keypool_core::DisableReason::Billing),
        ] {
            let mut w = World::new::<A>(t, 2, first_byte());
            w.script(0, [reply]);
            let a = w.send();
            assert_eq!(a.status, 200, "{a:?}");
            assert_eq!(w.state(0), KeyState::Disabled { reason });
            let _ = w.send();
            assert_eq!(w.seen(), [Some(0), Some(1), Some(1)]);
            w.finish();
        }
    }

    /// Every key rate-limited: 429 `rate_limit_error`, `retry-after` = the soonest key.
    pub fn exhaustion_is_429_with_soonest_retry<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 3, first_byte());
        w.script(0, [Reply::rate_limited(RetryAfter::Seconds("5".into()))]);
        w.script(1, [Reply::rate_limited(RetryAfter::Millis("3000".into()))]);
        w.script(2, [Reply::rate_limited(RetryAfter::Seconds("10".into()))]);
        let a = w.send();
        assert_eq!(a.status, 429, "{a:?}");
        let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((2..=3).contains(&retry), "retry-after {retry}");
        let ms: u64 = a.headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
        assert!((2000..=3000).contains(&ms), "retry-after-ms {ms}");
        assert_eq!(a.headers["x-should-retry"], "true");
        let body = json(&a.body);
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert!(body["request_id"].is_string());
        assert!(a.error.is_some());
        assert_eq!(w.seen(), [Some(0), Some(1), Some(2)]);
        // The next call does not reach the upstream at all.
        let a = w.send();
        assert_eq!(a.status, 429);
        assert_eq!(w.mock.request_count(), 3);
        w.finish();
    }

    /// Every key disabled: 502 `api_error`, `x-should-retry: false`.
    pub fn all_disabled_is_502<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(0, [Reply::unauthorized()]);
        w.script(1, [Reply::forbidden()]);
        let a = w.send();
        assert_eq!(a.status, 502, "{a:?}");
        assert_eq!(a.headers["x-should-retry"], "false");
        assert_eq!(json(&a.body)["error"]["type"], "api_error");
        w.finish();
    }

    /// 500 and 529 are the upstream's problem: delivered as they are after one attempt, no mark.
    pub fn upstream_errors_delivered_once<A: Adapter>(t: Transport) {
        for reply in [Reply::server_error(), Reply::overloaded(), Reply::bad_request()] {
            let mut w = World::new::<A>(t, 2, first_byte());
            w.script(0, [reply]);
            let a = w.send();
            assert!(matches!(a.status, 500 | 529 | 400), "{a:?}");
            assert!(a.error.is_none(), "delivered as is: {a:?}");
            assert_eq!(w.seen(), [Some(0)]);
            assert!(w.state(0).is_available());
            w.finish();
        }
    }

    /// The request body and every non-credential header reach the upstream identical on every
    /// attempt; the client's own credential never does.
    pub fn request_replayed_identically<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 3, first_byte());
        w.script(0, [Reply::rate_limited(RetryAfter::Seconds("5".into()))]);
        w.script(1, [Reply::unauthorized()]);
        let a = w.send();
        assert_eq!(a.status, 200);
        let reqs = w.mock.requests();
        assert_eq!(reqs.len(), 3);
        let base = match t {
            Transport::Plain => w.mock.url(),
            Transport::Tls => w.mock.tls_url(),
        };
        let host = base.split_once("://").map_or(base.as_str(), |(_, host)| host);
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(r.body, reqs[0].body);
            assert_eq!(r.body, messages(false).body);
            assert_eq!(r.key.as_deref(), Some(w.key(i)));
            assert!(r.headers.get("authorization").is_none());
            assert_eq!(r.headers["anthropic-beta"], "suite-1");
            assert_eq!(r.headers["anthropic-version"], "2023-06-01");
            assert_eq!(r.method, http::Method::POST);
            assert_eq!(r.uri, "/v1/messages");
            // The upstream's own host, never the caller's (HTTP/2 carries it as `:authority`).
            match r.headers.get("host") {
                Some(sent) => assert_eq!(sent, host),
                None => assert_eq!(r.version, http::Version::HTTP_2, "no host header"),
            }
        }
        w.finish();
    }

    /// BYOK: one attempt with the caller's key, its 429 delivered as is, the pool untouched.
    pub fn byok_passes_through_once<A: Adapter>(t: Transport) {
        let w = World::new::<A>(t, 2, first_byte());
        let own = "sk-ant-api03-callers-own-key-ABCDEFGHIJKL";
        w.mock
            .script(own, [Reply::rate_limited(RetryAfter::Seconds("5".into()))]);
        let a = w.client.send_byok(messages(false), own);
        assert_eq!(a.status, 429, "{a:?}");
        assert_eq!(a.headers["retry-after"], "5");
        let reqs = w.mock.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].key.as_deref(), Some(own));
        assert!(w.state(0).is_available() && w.state(1).is_available());
        w.finish();
    }

    /// A garbage `retry-after` still cools the key, for the default 60 s.
    pub fn garbage_retry_after_uses_default<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(0, [Reply::rate_limited(RetryAfter::Seconds("soon-ish".into()))]);
        let _ = w.send();
        match w.state(0) {
            KeyState::Cooling { until, .. } => {
                let left = until.saturating_duration_since(std::time::Instant::now());
                assert!(
                    left > Duration::from_secs(55) && left <= Duration::from_secs(60),
                    "{left:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        w.finish();
    }

    /// The normal stream arrives whole, ending with `message_stop`.
    pub fn stream_complete<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 1, first_byte());
        w.script(
            0,
            [Reply::stream(StreamScript::new().text_deltas(5).chunk_size(7))],
        );
        let s = w.stream();
        assert_eq!(s.status, 200, "{s:?}");
        assert!(s.stream_error.is_none(), "{s:?}");
        let names: Vec<&str> = s.events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.first(), Some(&"message_start"));
        assert_eq!(names.last(), Some(&"message_stop"));
        assert_eq!(names.iter().filter(|n| **n == "content_block_delta").count(), 5);
        w.finish();
    }

    /// A 429 before the stream's head fails over.
    pub fn stream_fails_over_before_commit<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(0, [Reply::rate_limited(RetryAfter::Seconds("5".into()))]);
        w.script(1, [Reply::stream(StreamScript::new())]);
        let s = w.stream();
        assert_eq!(s.status, 200, "{s:?}");
        assert_eq!(s.events.last().unwrap().0, "message_stop");
        assert_eq!(w.seen(), [Some(0), Some(1)]);
        w.finish();
    }

    /// A reset in the middle of an event: every whole event before it, then one error, then the end.
    pub fn stream_reset_mid_event<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        let events = StreamScript::standard_events("claude-mock", 3);
        let whole: usize = events.iter().take(4).map(|e| e.to_bytes().len()).sum();
        w.script(
            0,
            [Reply::stream(
                StreamScript::with_events(events)
                    .chunk_size(16)
                    .ending(Ending::ResetAfter(whole + 9)),
            )],
        );
        let s = w.stream();
        assert_eq!(s.status, 200, "{s:?}");
        assert_eq!(s.events.len(), 4, "{s:?}");
        assert!(s.stream_error.is_some(), "{s:?}");
        assert_eq!(s.broke, Some(cut_seen::<A>(&w, TransportError::Reset)), "{s:?}");
        assert_eq!(w.seen(), [Some(0)]);
        assert!(w.state(0).is_available());
        w.finish();
    }

    /// A stream that ends before `message_stop` ends with one error.
    pub fn stream_ended_early<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 1, first_byte());
        w.script(0, [Reply::stream(StreamScript::new().ending(Ending::EndEarly))]);
        let s = w.stream();
        assert!(s.stream_error.is_some(), "{s:?}");
        assert_eq!(s.broke, Some(StreamBreak::EndedEarly), "{s:?}");
        assert!(s.events.iter().all(|(n, _)| n != "message_stop"));
        w.finish();
    }

    /// An in-band error after content is relayed unchanged, as an event.
    pub fn stream_in_band_error_after_content_relayed<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(
            0,
            [Reply::stream(StreamScript::error_after_content(
                2,
                "overloaded_error",
                "Overloaded",
            ))],
        );
        let s = w.stream();
        assert_eq!(s.status, 200);
        let last = s.events.last().unwrap();
        assert_eq!(last.0, "error");
        assert_eq!(json(last.1.as_bytes())["error"]["type"], "overloaded_error");
        assert!(s.stream_error.is_none(), "relayed, not synthesized: {s:?}");
        assert_eq!(w.seen(), [Some(0)]);
        w.finish();
    }

    /// First-content: an early in-band `rate_limit_error` fails over with nothing delivered from
    /// the failed attempt.
    pub fn first_content_fails_over_on_in_band_rate_limit<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, config(CommitPoint::first_content()));
        w.script(
            0,
            [Reply::stream(StreamScript::error_before_content(
                "rate_limit_error",
                "slow down",
            ))],
        );
        w.script(1, [Reply::stream(StreamScript::new())]);
        let s = w.stream();
        assert_eq!(s.status, 200, "{s:?}");
        assert_eq!(s.events.iter().filter(|(n, _)| n == "message_start").count(), 1);
        assert!(s.events.iter().all(|(n, _)| n != "error"));
        assert_eq!(w.seen(), [Some(0), Some(1)]);
        assert!(w.state(0).is_cooling());
        w.finish();
    }

    /// First-content: an early in-band `overloaded_error` becomes an HTTP 529.
    pub fn first_content_overloaded_is_529<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, config(CommitPoint::first_content()));
        w.script(
            0,
            [Reply::stream(StreamScript::error_before_content(
                "overloaded_error",
                "Overloaded",
            ))],
        );
        let s = w.stream();
        assert_eq!(s.status, 529, "{s:?}");
        assert!(s.events.is_empty());
        assert_eq!(json(&s.body)["error"]["type"], "overloaded_error");
        assert_eq!(w.seen(), [Some(0)]);
        w.finish();
    }

    /// An upstream that never answers trips the first-byte timeout: 504, no second attempt.
    pub fn stalled_head_times_out<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(0, [Reply::stall_before_head()]);
        let a = w.send();
        assert_eq!(a.status, 504, "{a:?}");
        assert_eq!(json(&a.body)["error"]["type"], "timeout_error");
        assert_eq!(w.seen(), [Some(0)]);
        assert!(w.state(0).is_available());
        w.finish();
    }

    /// A stream that stalls after commit ends with one error after the idle timeout.
    pub fn stalled_stream_times_out<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 1, first_byte());
        w.script(0, [Reply::stream(StreamScript::new().ending(Ending::Stall))]);
        let s = w.stream();
        assert_eq!(s.status, 200);
        assert!(!s.events.is_empty());
        assert!(s.stream_error.is_some(), "{s:?}");
        // The call's own idle timeout, on every adapter (ureq's per-read timeout included).
        assert_eq!(s.broke, Some(StreamBreak::Idle(quick_timeouts().idle)), "{s:?}");
        w.finish();
    }

    /// A connection reset before the head: 502 `api_error`, no second attempt, no mark.
    pub fn reset_before_head_is_502<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(0, [Reply::reset_before_head()]);
        let a = w.send();
        assert_eq!(a.status, 502, "{a:?}");
        assert_eq!(json(&a.body)["error"]["type"], "api_error");
        assert_eq!(w.seen(), [Some(0)]);
        assert!(w.state(0).is_available());
        w.finish();
    }

    // ---- Fault injection (issue #10) ----

    /// How long an exchange may take, at most, in the fault scenarios: every one of them ends
    /// within a few of the suite's short timeouts.
    const FAULT_BUDGET: Duration = Duration::from_secs(8);

    fn assert_one_attempt_no_mark<C: TestClient>(w: &World<C>) {
        assert_eq!(w.seen(), [Some(0)]);
        assert!(w.state(0).is_available(), "{:?}", w.state(0));
    }

    fn assert_gateway_error(status: u16, body: &[u8], expected: u16, error_type: &str) {
        assert_eq!(status, expected, "{}", String::from_utf8_lossy(body));
        let body = json(body);
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], error_type);
    }

    /// The upstream breaks the connection before or inside the response head — reset before
    /// any byte, FIN before any byte, a partial head then RST, a partial head then FIN: 502
    /// `api_error` for a blocking and a streaming call alike, one attempt, no mark.
    pub fn broken_head_is_502<A: Adapter>(t: Transport) {
        for fault in [
            Reply::reset_before_head(),
            Reply::close_before_head(),
            Reply::reset_inside_head(),
            Reply::close_inside_head(),
        ] {
            let mut w = World::new::<A>(t, 2, first_byte());
            w.script(0, [fault.clone()]);
            let started = std::time::Instant::now();
            let a = w.send();
            assert_gateway_error(a.status, &a.body, 502, "api_error");
            assert!(a.error.is_some(), "{a:?}");
            assert_one_attempt_no_mark(&w);
            w.script(0, [fault.clone()]);
            let s = w.stream();
            assert_gateway_error(s.status, &s.body, 502, "api_error");
            assert!(s.events.is_empty() && s.stream_error.is_none(), "{s:?}");
            assert_eq!(w.seen(), [Some(0), Some(0)], "{fault:?}");
            assert!(w.state(0).is_available());
            assert!(started.elapsed() < FAULT_BUDGET, "{:?}", started.elapsed());
            w.finish();
        }
    }

    /// The break a client sees for a cut the mock scripted (`Reset` or `Eof`) in the latest
    /// answer: an HTTP/2 stream can only be reset (`RST_STREAM`), so there an EOF is a reset
    /// too; and an adapter may read a reset as an EOF ([`Adapter::RESET_READS_AS_EOF`]).
    fn cut_seen<A: Adapter>(w: &World<A::Client>, scripted: TransportError) -> StreamBreak {
        let h2 = w
            .mock
            .requests()
            .last()
            .is_some_and(|r| r.version == http::Version::HTTP_2);
        StreamBreak::Transport(match scripted {
            _ if h2 => TransportError::Reset,
            TransportError::Reset if A::RESET_READS_AS_EOF => TransportError::Eof,
            other => other,
        })
    }

    fn stream_cut<A: Adapter>(
        t: Transport,
        ending: impl Fn(usize) -> Ending,
        expect_events: usize,
        broke: TransportError,
    ) {
        let mut w = World::new::<A>(t, 2, first_byte());
        let events = StreamScript::standard_events("claude-mock", 3);
        let whole: usize = events.iter().take(4).map(|e| e.to_bytes().len()).sum();
        w.script(
            0,
            [Reply::stream(
                StreamScript::with_events(events.clone())
                    .chunk_size(11)
                    .ending(ending(whole)),
            )],
        );
        let s = w.stream();
        assert_eq!(s.status, 200, "{s:?}");
        // Whole events only, in order, exactly as sent; then one error, then the end.
        assert_eq!(s.events.len(), expect_events, "{s:?}");
        for (got, sent) in s.events.iter().zip(&events) {
            match sent {
                SseEvent::Event { event, data } => assert_eq!((&got.0, &got.1), (event, data)),
                SseEvent::Raw { .. } | SseEvent::RawBytes { .. } => unreachable!(),
            }
        }
        assert!(s.stream_error.is_some(), "{s:?}");
        assert_eq!(s.broke, Some(cut_seen::<A>(&w, broke)), "{s:?}");
        assert_one_attempt_no_mark(&w);
        w.finish();
    }

    /// A reset exactly between two events: every event before it, then one error.
    pub fn stream_reset_between_events<A: Adapter>(t: Transport) {
        stream_cut::<A>(t, Ending::ResetAfter, 4, TransportError::Reset);
    }

    /// EOF inside a chunked event stream (no final chunk, in the middle of an event): every whole
    /// event before it, then one error.
    pub fn stream_eof_inside_chunked_body<A: Adapter>(t: Transport) {
        stream_cut::<A>(t, |whole| Ending::EofAfter(whole + 9), 4, TransportError::Eof);
    }

    /// EOF exactly between two events of a chunked stream: the same.
    pub fn stream_eof_between_events<A: Adapter>(t: Transport) {
        stream_cut::<A>(t, Ending::EofAfter, 4, TransportError::Eof);
    }

    /// A plain JSON body cut short — EOF inside the chunked body, or a reset — after a 200 head:
    /// the head is delivered, the body read fails (never a silently truncated 200), one
    /// attempt, no mark.
    ///
    /// A proxy that has not sent a byte of the body yet may close the connection instead, before
    /// its own head (status 0): the caller sees a broken exchange either way.
    pub fn plain_body_cut_short_is_an_error<A: Adapter>(t: Transport) {
        for (ending, broke) in [
            (Ending::EofAfter(20), TransportError::Eof),
            (Ending::ResetAfter(20), TransportError::Reset),
        ] {
            let mut w = World::new::<A>(t, 2, first_byte());
            w.script(0, [Reply::ok().chunk_size(8).ending(ending)]);
            let a = w.send();
            assert!(a.status == 200 || a.status == 0, "{a:?}");
            assert!(a.error.is_some(), "a truncated body must be reported: {a:?}");
            if a.status == 200 {
                assert_eq!(a.broke, Some(cut_seen::<A>(&w, broke)), "{ending:?}: {a:?}");
            }
            assert!(a.body.len() <= 20, "{a:?}");
            assert!(serde_json::from_slice::<serde_json::Value>(&a.body).is_err());
            assert_one_attempt_no_mark(&w);
            w.finish();
        }
    }

    fn small_events() -> Vec<SseEvent> {
        vec![
            SseEvent::new("message_start", r#"{"type":"message_start"}"#),
            SseEvent::new(
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0}"#,
            ),
            SseEvent::new("message_stop", r#"{"type":"message_stop"}"#),
        ]
    }

    /// Slow loris: the upstream answers one byte per interval, each gap well under the idle
    /// timeout but the whole answer longer than it — a stream and a JSON body both complete.
    pub fn slow_loris_within_idle_completes<A: Adapter>(t: Transport) {
        let gap = Duration::from_millis(12);
        let mut w = World::new::<A>(t, 1, first_byte());
        let events = small_events();
        let total: usize = events.iter().map(|e| e.to_bytes().len()).sum();
        assert!(gap * u32::try_from(total).unwrap() > quick_timeouts().idle);
        w.script(
            0,
            [Reply::stream(
                StreamScript::with_events(events).chunk_size(1).chunk_delay(gap),
            )],
        );
        let started = std::time::Instant::now();
        let s = w.stream();
        assert!(
            started.elapsed() > quick_timeouts().idle,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(s.status, 200, "{s:?}");
        assert!(s.stream_error.is_none(), "{s:?}");
        let names: Vec<&str> = s.events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["message_start", "content_block_delta", "message_stop"]);

        let body = serde_json::json!({"type": "message", "id": "msg_slow", "content": [{"type": "text", "text": "one byte at a time"}]});
        let len = body.to_string().len();
        assert!(gap * u32::try_from(len).unwrap() > quick_timeouts().idle);
        w.script(
            0,
            [Reply::status(200)
                .json(body.clone())
                .chunk_size(1)
                .chunk_delay(gap)],
        );
        let a = w.send();
        assert_eq!(a.status, 200, "{a:?}");
        assert!(a.error.is_none(), "{a:?}");
        assert_eq!(json(&a.body), body);
        assert_eq!(w.seen(), [Some(0), Some(0)]);
        w.finish();
    }

    /// Slow loris past the idle timeout: one byte, then a gap longer than the idle timeout. The
    /// call ends within the timeouts, with no partial event: either an HTTP error (nothing was
    /// committed) or a stream of whole events closed by one error. One attempt, no mark.
    pub fn slow_loris_over_idle_times_out<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(
            0,
            [Reply::stream(
                StreamScript::with_events(small_events())
                    .chunk_size(1)
                    .chunk_delay(quick_timeouts().idle * 3),
            )],
        );
        let started = std::time::Instant::now();
        let s = w.stream();
        assert!(
            started.elapsed() < quick_timeouts().idle * 3,
            "{:?}",
            started.elapsed()
        );
        if s.status == 200 {
            assert!(s.events.is_empty(), "no event was whole: {s:?}");
            assert!(s.stream_error.is_some(), "{s:?}");
            assert_eq!(s.broke, Some(StreamBreak::Idle(quick_timeouts().idle)), "{s:?}");
        } else {
            assert!(s.events.is_empty() && s.stream_error.is_none(), "{s:?}");
            assert!(matches!(s.status, 502 | 504), "{s:?}");
            assert!(s.error.is_some(), "{s:?}");
        }
        assert_one_attempt_no_mark(&w);
        w.finish();
    }

    /// Invalid UTF-8 inside an event, split across chunks: every event still arrives whole and in
    /// order; the parser replaces the bad byte with U+FFFD.
    pub fn stream_invalid_utf8_replaced<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 1, first_byte());
        let mut bad =
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"text\":\"a".to_vec();
        bad.extend_from_slice(&[0xff, 0xc3]);
        bad.extend_from_slice(b"b\xe2\x9c\x93\"}\n\n");
        let events = vec![
            SseEvent::new("message_start", r#"{"type":"message_start"}"#),
            SseEvent::raw_bytes(&bad),
            SseEvent::new("message_stop", r#"{"type":"message_stop"}"#),
        ];
        w.script(
            0,
            [Reply::stream(StreamScript::with_events(events).chunk_size(5))],
        );
        let s = w.stream();
        assert_eq!(s.status, 200, "{s:?}");
        assert!(s.stream_error.is_none(), "{s:?}");
        let names: Vec<&str> = s.events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["message_start", "content_block_delta", "message_stop"]);
        let data = &s.events[1].1;
        assert!(
            data.starts_with(r#"{"type":"content_block_delta","text":"a"#),
            "{data:?}"
        );
        assert!(data.ends_with("b\u{2713}\"}"), "{data:?}");
        assert!(data.contains('\u{FFFD}'), "{data:?}");
        w.finish();
    }

    /// A 429 with a 100 MB error body: the key still cools and the call fails over at once; the
    /// client reads at most a bounded prefix of the body (the mock stops being able to send long
    /// before 100 MB: the connection is dropped, not drained).
    pub fn huge_error_body_on_429_fails_over_fast<A: Adapter>(t: Transport) {
        const HUNDRED_MB: usize = 100 << 20;
        let mut w = World::new::<A>(t, 2, first_byte());
        let unit = "x".repeat(64 << 10);
        w.script(
            0,
            [Reply::rate_limited(RetryAfter::Seconds("7".into()))
                .body(keypool_mock::Body::Repeated {
                    text: unit,
                    times: HUNDRED_MB >> 16,
                })
                .header("content-type", "application/json")],
        );
        let started = std::time::Instant::now();
        let a = w.send();
        let took = started.elapsed();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(w.seen(), [Some(0), Some(1)]);
        assert!(w.state(0).is_cooling(), "{:?}", w.state(0));
        assert!(took < Duration::from_secs(5), "failover took {took:?}");
        let outcomes = w.mock.wait_for_outcomes(2, FAULT_BUDGET).unwrap();
        let first = outcomes.iter().find(|o| o.request == 0).unwrap();
        assert_ne!(first.end, keypool_mock::OutcomeEnd::Completed, "{first:?}");
        assert!(
            first.bytes_sent < 32 << 20,
            "the client drained the body: {first:?}"
        );
        w.finish();
    }

    /// Classification reads at most 64 KiB of an error body: a 400 whose credit-balance message
    /// starts after that is the request's error, delivered whole and as is, with no mark.
    pub fn classification_reads_at_most_64_kib<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        let message = format!("{}{}", " ".repeat(70 << 10), keypool_mock::CREDIT_BALANCE_MESSAGE);
        w.script(0, [Reply::error(400, "invalid_request_error", &message)]);
        let a = w.send();
        assert_eq!(a.status, 400, "{:?}", a.error);
        assert!(a.error.is_none());
        assert_eq!(json(&a.body)["error"]["message"], message.as_str());
        assert_one_attempt_no_mark(&w);
        w.finish();
        // The same message within the first 64 KiB disables the key.
        let mut w = World::new::<A>(t, 2, first_byte());
        let message = format!("{}{}", " ".repeat(60 << 10), keypool_mock::CREDIT_BALANCE_MESSAGE);
        w.script(0, [Reply::error(400, "invalid_request_error", &message)]);
        assert_eq!(w.send().status, 200);
        assert_eq!(
            w.state(0),
            KeyState::Disabled {
                reason: keypool_core::DisableReason::Billing
            }
        );
        w.finish();
    }

    /// 60 KB of response headers: a 200 is delivered, a 429 still cools its key and fails over.
    pub fn huge_response_headers<A: Adapter>(t: Transport) {
        let pad = |mut r: Reply| {
            for i in 0..60 {
                r = r.header(&format!("x-pad-{i:02}"), &"p".repeat(1000));
            }
            r
        };
        let mut w = World::new::<A>(t, 2, first_byte());
        w.script(0, [pad(Reply::ok())]);
        let a = w.send();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(json(&a.body)["type"], "message");
        assert_eq!(a.headers["x-pad-59"].len(), 1000);
        w.script(0, [pad(Reply::rate_limited(RetryAfter::Seconds("5".into())))]);
        let a = w.send();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(w.seen(), [Some(0), Some(0), Some(1)]);
        assert!(w.state(0).is_cooling());
        w.finish();
    }

    /// Garbage, zero, negative, huge and fractional `retry-after` values each leave the right
    /// cooldown: the default 60 s for the invalid ones, the 1 h cap for the huge one, 2.5 s for
    /// `2.5`.
    pub fn retry_after_values_cool_correctly<A: Adapter>(t: Transport) {
        let secs = Duration::from_secs;
        for (retry, lo, hi) in [
            (RetryAfter::Seconds("soon-ish".into()), secs(55), secs(60)),
            (RetryAfter::Seconds("-5".into()), secs(55), secs(60)),
            (RetryAfter::Seconds("0".into()), secs(55), secs(60)),
            (RetryAfter::Millis("-1500".into()), secs(55), secs(60)),
            (RetryAfter::Seconds("99999999".into()), secs(3590), secs(3600)),
            (RetryAfter::Seconds("1e400".into()), secs(55), secs(3600)),
            (
                RetryAfter::Seconds("2.5".into()),
                Duration::from_millis(1500),
                Duration::from_millis(2500),
            ),
        ] {
            let mut w = World::new::<A>(t, 2, first_byte());
            w.script(0, [Reply::rate_limited(retry.clone())]);
            let a = w.send();
            assert_eq!(a.status, 200, "{retry:?}: {a:?}");
            assert_eq!(w.seen(), [Some(0), Some(1)]);
            match w.state(0) {
                KeyState::Cooling { until, .. } => {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    assert!(left > lo && left <= hi, "{retry:?}: {left:?}");
                }
                other => panic!("{retry:?}: {other:?}"),
            }
            w.finish();
        }
    }

    /// The upstream closes keep-alive connections while they are idle: the next call succeeds
    /// with one attempt on a new connection, no key spent.
    pub fn idle_connections_closed_by_upstream<A: Adapter>(t: Transport) {
        let mut w = World::new::<A>(t, 2, first_byte());
        for round in 0..3 {
            let a = w.send();
            assert_eq!(a.status, 200, "round {round}: {a:?}");
            w.mock.close_idle_connections(FAULT_BUDGET).unwrap();
            let s = w.stream();
            assert_eq!(s.status, 200, "round {round}: {s:?}");
            assert!(s.stream_error.is_none(), "{s:?}");
            w.mock.close_idle_connections(FAULT_BUDGET).unwrap();
        }
        assert_eq!(w.seen(), [Some(0); 6]);
        let reqs = w.mock.requests();
        for pair in reqs.windows(2) {
            assert_ne!(
                pair[0].connection, pair[1].connection,
                "the connection was closed"
            );
        }
        assert!(w.state(0).is_available() && w.state(1).is_available());
        w.finish();
    }
}

/// Instantiates every scenario as a `#[test]` for an adapter type and a [`Transport`].
///
/// ```ignore
/// keypool_conformance::conformance_suite!(plain, MyAdapter, keypool_conformance::Transport::Plain);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $adapter:ty, $transport:expr) => {
        mod $module {
            use super::*;
            $crate::conformance_suite!(@tests $adapter, $transport;
                one_key_delivers,
                rate_limit_fails_over_and_cools,
                key_rejections_disable,
                exhaustion_is_429_with_soonest_retry,
                all_disabled_is_502,
                upstream_errors_delivered_once,
                request_replayed_identically,
                byok_passes_through_once,
                garbage_retry_after_uses_default,
                stream_complete,
                stream_fails_over_before_commit,
                stream_reset_mid_event,
                stream_ended_early,
                stream_in_band_error_after_content_relayed,
                first_content_fails_over_on_in_band_rate_limit,
                first_content_overloaded_is_529,
                stalled_head_times_out,
                stalled_stream_times_out,
                reset_before_head_is_502,
                broken_head_is_502,
                stream_reset_between_events,
                stream_eof_inside_chunked_body,
                stream_eof_between_events,
                plain_body_cut_short_is_an_error,
                slow_loris_within_idle_completes,
                slow_loris_over_idle_times_out,
                stream_invalid_utf8_replaced,
                huge_error_body_on_429_fails_over_fast,
                classification_reads_at_most_64_kib,
                huge_response_headers,
                retry_after_values_cool_correctly,
                idle_connections_closed_by_upstream,
                openai_rate_limit_delay_forms,
                openai_request_too_large_delivered,
                openai_insufficient_quota_disables,
                openai_missing_scope_delivered,
                openai_exhaustion_shape,
                openai_streams_fail_over_before_commit,
                openai_first_content_fails_over_on_in_band_errors,
                openai_streams_end_cleanly,
                openai_stream_breaks_in_its_own_shape,
                limits_rate_limit_cools_the_organisation_for_its_family,
                limits_other_workspaces_are_still_tried,
                limits_spend_cap_rests_the_organisation_until_the_first,
                limits_usage_limit_rests_until_its_date,
                limits_soft_hint_moves_traffic_but_never_refuses,
            );
        }
    };
    (@tests $adapter:ty, $transport:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::scenarios::$name::<$adapter>($transport);
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "secret material")]
    fn transcript_catches_a_partial_secret() {
        let keys = keys(1);
        let mut t = Transcript::default();
        t.push(format!("error: bad key {}", &keys[0][10..30]));
        t.assert_no_secret(&keys);
    }

    #[test]
    fn first_of_next_month_is_utc_midnight_on_the_first() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        // 2027-01-15T08:00:00Z → 2027-02-01; 2024-12-31T23:59:59Z → 2025-01-01;
        // 2024-02-01T00:00:00Z → 2024-03-01.
        assert_eq!(limits::first_of_next_month(at(1_800_000_000)), at(1_801_440_000));
        assert_eq!(limits::first_of_next_month(at(1_735_689_599)), at(1_735_689_600));
        assert_eq!(limits::first_of_next_month(at(1_706_745_600)), at(1_709_251_200));
    }

    #[test]
    fn transcript_allows_hints() {
        let keys = keys(2);
        let mut t = Transcript::default();
        for k in &keys {
            t.push(format!("{:?}", keypool_core::Secret::new(k.as_str()).unwrap()));
        }
        t.assert_no_secret(&keys);
    }
}
