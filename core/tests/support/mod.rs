//! A scripted, simulated-time upstream that drives a `Call` the way an adapter would.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use keypool_core::call::{
    Abort, Attempt, BodyOutput, Call, CallConfig, Credential, Failure, Head, KeyMark, Output, Request,
    TransportError,
};
use keypool_core::{KeyId, Order, Pool};

/// One thing the upstream does.
#[derive(Debug, Clone)]
pub enum Step {
    Head(u16, Vec<(&'static str, String)>),
    Body(Bytes),
    End,
    Err(TransportError),
    /// Time passes before the next step.
    Advance(Duration),
}

pub fn head(status: u16) -> Step {
    Step::Head(status, vec![])
}
pub fn head_h(status: u16, h: &[(&'static str, &str)]) -> Step {
    Step::Head(status, h.iter().map(|(k, v)| (*k, (*v).to_owned())).collect())
}
pub fn sse_head() -> Step {
    head_h(200, &[("content-type", "text/event-stream")])
}
pub fn body(b: &str) -> Step {
    Step::Body(Bytes::copy_from_slice(b.as_bytes()))
}

/// A whole answer: 200 JSON.
pub fn ok() -> Vec<Step> {
    vec![
        head_h(200, &[("content-type", "application/json")]),
        body("{\"ok\":true}"),
        Step::End,
    ]
}
pub fn status(code: u16) -> Vec<Step> {
    vec![
        head_h(code, &[("content-type", "application/json")]),
        body("{\"type\":\"error\"}"),
        Step::End,
    ]
}
pub fn rate_limited(retry_after: &str) -> Vec<Step> {
    vec![
        head_h(429, &[("retry-after", retry_after)]),
        body("{}"),
        Step::End,
    ]
}

pub const MESSAGE_START: &str = "event: message_start\ndata: {\"type\":\"message_start\"}\n\n";
pub const PING: &str = "event: ping\ndata: {\"type\": \"ping\"}\n\n";
pub const BLOCK_START: &str = "event: content_block_start\ndata: {\"type\":\"content_block_start\"}\n\n";
pub const DELTA: &str =
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n";
pub const MESSAGE_STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

pub fn in_band(kind: &str) -> String {
    format!(
        "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"message\":\"x\"}}}}\n\n"
    )
}

pub fn full_stream() -> String {
    [MESSAGE_START, PING, BLOCK_START, DELTA, DELTA, MESSAGE_STOP].concat()
}

/// What the caller saw, and what the upstream received.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: Vec<Attempt>,
    pub head: Option<Head>,
    pub body: Vec<u8>,
    pub fail: Option<Failure>,
    pub abort: Option<Abort>,
    pub marks: Vec<KeyMark>,
    pub outputs_after_done: usize,
    /// How the call said it ended.
    pub ended: Option<keypool_core::call::Outcome>,
}

impl Outcome {
    pub fn status(&self) -> u16 {
        match (&self.head, &self.fail) {
            (Some(h), _) => h.status.as_u16(),
            (None, Some(f)) => f.response.status().as_u16(),
            _ => 0,
        }
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn fail_header(&self, name: &str) -> Option<String> {
        let f = self.fail.as_ref()?;
        Some(f.response.headers().get(name)?.to_str().unwrap().to_owned())
    }
    pub fn fail_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.fail.as_ref().unwrap().response.body()).unwrap()
    }
    pub fn keys(&self) -> Vec<Option<usize>> {
        self.sent.iter().map(|a| a.key.map(KeyId::index)).collect()
    }
}

/// The scripted upstream and the simulated clock.
pub struct Sim {
    pub pool: Arc<Pool>,
    pub now: Instant,
    pub wall: SystemTime,
    scripts: HashMap<usize, VecDeque<Vec<Step>>>,
    byok: VecDeque<Vec<Step>>,
}

pub fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sk-ant-api03-test-key-number-{i:04}-SECRET"))
        .collect()
}

impl Sim {
    pub fn new(n: usize) -> Self {
        Self::with_order(n, Order::PrimaryWithFallback)
    }
    pub fn with_order(n: usize, order: Order) -> Self {
        let now = Instant::now();
        Self {
            pool: Arc::new(Pool::new(keys(n), order, now).unwrap()),
            now,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            scripts: HashMap::new(),
            byok: VecDeque::new(),
        }
    }
    /// The next answers of key `k`, in order; a key without a script answers `ok()`.
    pub fn script(&mut self, k: usize, answers: Vec<Vec<Step>>) -> &mut Self {
        self.scripts.entry(k).or_default().extend(answers);
        self
    }
    pub fn script_byok(&mut self, answers: Vec<Vec<Step>>) -> &mut Self {
        self.byok.extend(answers);
        self
    }
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub fn request() -> Request {
        let mut r = Request::post_json("/v1/messages", "{\"model\":\"claude\",\"max_tokens\":5}");
        r.headers
            .insert("x-api-key", "client-credential-123456789".parse().unwrap());
        r.headers
            .insert("authorization", "Bearer client-token-abcdefgh".parse().unwrap());
        r.headers.insert("anthropic-beta", "tools-2024".parse().unwrap());
        r.headers.insert("connection", "keep-alive".parse().unwrap());
        r
    }

    pub fn run(&mut self, config: &CallConfig) -> Outcome {
        let cred = Credential::Pool(self.pool.clone());
        self.run_with(Self::request(), cred, config)
    }

    pub fn run_with(&mut self, request: Request, cred: Credential, config: &CallConfig) -> Outcome {
        let mut call = Call::new(request, cred, config, "req_test", self.now);
        self.drive(&mut call)
    }

    pub fn drive(&mut self, call: &mut Call) -> Outcome {
        let mut out = Outcome::default();
        let mut current: VecDeque<Step> = VecDeque::new();
        for _ in 0..100_000 {
            // Before the head the call says what `poll_output` can; after it, `poll_body`.
            let deadline = if out.head.is_none() {
                match call.poll_output() {
                    Output::Send(a) => {
                        let script = match a.key {
                            Some(k) => self.scripts.get_mut(&k.index()).and_then(VecDeque::pop_front),
                            None => self.byok.pop_front(),
                        };
                        current = script.unwrap_or_else(ok).into();
                        out.sent.push(a);
                        continue;
                    }
                    Output::Mark(m) => {
                        assert!(out.fail.is_none(), "mark after the answer");
                        out.marks.push(m);
                        continue;
                    }
                    Output::Head(h) => {
                        assert!(out.fail.is_none(), "head after a failure");
                        out.head = Some(h);
                        continue;
                    }
                    Output::Fail(f) => {
                        out.fail = Some(f);
                        assert!(call.is_done());
                        assert!(matches!(call.poll_output(), Output::Wait(None)));
                        assert!(matches!(call.poll_body(), BodyOutput::Done));
                        out.ended = call.outcome();
                        return out;
                    }
                    Output::Wait(deadline) => deadline,
                }
            } else {
                match call.poll_body() {
                    BodyOutput::Body(b) => {
                        assert!(!b.is_empty(), "an empty body chunk");
                        assert!(out.abort.is_none(), "body after the abort");
                        out.body.extend_from_slice(&b);
                        continue;
                    }
                    BodyOutput::Abort(a) => {
                        if let Some(ev) = &a.event {
                            out.body.extend_from_slice(ev);
                        }
                        out.abort = Some(a);
                        continue;
                    }
                    BodyOutput::Done => {
                        assert!(call.is_done());
                        assert!(matches!(call.poll_body(), BodyOutput::Done));
                        out.ended = call.outcome();
                        return out;
                    }
                    BodyOutput::Wait(deadline) => deadline,
                }
            };
            match current.pop_front() {
                Some(Step::Head(code, hs)) => {
                    let mut map = HeaderMap::new();
                    for (k, v) in hs {
                        map.append(k, v.parse().unwrap());
                    }
                    call.handle_response_head(StatusCode::from_u16(code).unwrap(), map, self.now, self.wall);
                }
                Some(Step::Body(b)) => call.handle_body(b, self.now),
                Some(Step::End) => call.handle_body_end(self.now),
                Some(Step::Err(e)) => call.handle_transport_error(e, self.now),
                Some(Step::Advance(d)) => {
                    self.now += d;
                    if deadline.is_some_and(|at| at <= self.now) {
                        call.handle_timeout(self.now);
                    }
                }
                None => {
                    // The upstream is silent: simulated time jumps to the next deadline.
                    let at = deadline.expect("a silent upstream with no deadline would hang");
                    self.now = self.now.max(at);
                    call.handle_timeout(self.now);
                }
            }
        }
        panic!("call did not finish");
    }
}
