//! Sending the same attempt once more when its exchange died on a stale pooled connection
//! (`Io::Resend`, `Call::resend`): the same key, number and headers, nothing marked, at most
//! once per attempt.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use http::{HeaderMap, StatusCode};
use keypool_core::call::{Attempt, CallConfig, Credential, Output, Request, TransportError};
use keypool_core::client::{BlockingTransport, ClientCall, Clocks, Io, Transport};
use keypool_core::{Order, Pool};

const KEYS: [&str; 2] = [
    "sk-ant-api03-resend-test-key-one-000000000000",
    "sk-ant-api03-resend-test-key-two-000000000000",
];

/// What each exchange reports, in order; and every attempt it was given, with how.
struct Scripted {
    exchanges: VecDeque<Vec<Io>>,
    sent: Sent,
}

type Sent = Arc<Mutex<Vec<(&'static str, usize, String)>>>;

impl Scripted {
    fn record(&mut self, how: &'static str, attempt: &Attempt) -> VecDeque<Io> {
        let key = attempt.headers["x-api-key"].to_str().unwrap().to_owned();
        self.sent.lock().unwrap().push((how, attempt.number, key));
        self.exchanges
            .pop_front()
            .expect("an exchange more than scripted")
            .into()
    }
}

impl Transport for Scripted {
    type Exchange = VecDeque<Io>;
    const CLOCKS: Clocks = Clocks {
        now: Instant::now,
        wall: SystemTime::now,
    };

    fn start(&mut self, attempt: Attempt) -> VecDeque<Io> {
        self.record("start", &attempt)
    }

    fn resend(&mut self, attempt: Attempt) -> VecDeque<Io> {
        self.record("resend", &attempt)
    }
}

impl BlockingTransport for Scripted {
    fn next_io(&mut self, exchange: &mut VecDeque<Io>, _deadline: Option<Instant>) -> Io {
        exchange.pop_front().unwrap_or(Io::Error(TransportError::Eof))
    }
}

fn ok() -> Vec<Io> {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    vec![
        Io::Head(StatusCode::OK, headers),
        Io::Chunk(bytes::Bytes::from_static(b"{}")),
        Io::End,
    ]
}

fn call(exchanges: Vec<Vec<Io>>) -> (ClientCall<Scripted>, Arc<Pool>, Sent) {
    let pool = Arc::new(Pool::new(KEYS, Order::default(), Instant::now()).unwrap());
    let sent = Sent::default();
    let transport = Scripted {
        exchanges: exchanges.into(),
        sent: sent.clone(),
    };
    let request = Request::post_json("/v1/messages", r#"{"model":"claude-x","max_tokens":8}"#);
    let call = ClientCall::new(
        transport,
        request,
        Credential::Pool(pool.clone()),
        &CallConfig::default(),
    );
    (call, pool, sent)
}

fn all_available(pool: &Pool) -> bool {
    let now = Instant::now();
    pool.ids().all(|id| pool.state(id, now).is_available())
}

#[test]
fn a_stale_exchange_is_sent_again_as_the_same_attempt() {
    let (mut call, pool, sent) = call(vec![vec![Io::Resend(TransportError::Eof)], ok()]);
    let response = call.response_blocking().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(call.next_chunk_blocking().unwrap().unwrap(), "{}");
    assert_eq!(call.next_chunk_blocking().unwrap(), None);
    assert_eq!(call.summary().attempts, 1);
    assert_eq!(
        *sent.lock().unwrap(),
        [
            ("start", 1, KEYS[0].to_owned()),
            ("resend", 1, KEYS[0].to_owned())
        ]
    );
    assert!(all_available(&pool));
}

#[test]
fn a_second_stale_report_for_one_attempt_is_its_failure() {
    let (mut call, pool, sent) = call(vec![
        vec![Io::Resend(TransportError::Reset)],
        vec![Io::Resend(TransportError::Reset)],
    ]);
    let error = call.response_blocking().unwrap_err();
    assert_eq!(error.to_response().unwrap().status(), 502, "{error:?}");
    assert_eq!(call.summary().attempts, 1, "not a failover");
    assert_eq!(sent.lock().unwrap().len(), 2);
    assert!(all_available(&pool), "a transport failure marks no key");
}

#[test]
fn resend_is_the_awaited_attempt_and_nothing_else() {
    let pool = Arc::new(Pool::new(KEYS, Order::default(), Instant::now()).unwrap());
    let request = Request::post_json("/v1/messages", r#"{"model":"claude-x","max_tokens":8}"#);
    let now = Instant::now();
    let mut call = keypool_core::call::Call::new(
        request,
        Credential::Pool(pool),
        &CallConfig::default(),
        "req_1",
        now,
    );
    let Output::Send(sent) = call.poll_output() else {
        panic!("the first attempt")
    };
    let again = call.resend().unwrap();
    assert_eq!(
        (
            again.number,
            again.key,
            &again.method,
            &again.path_and_query,
            &again.headers,
            &again.body
        ),
        (
            sent.number,
            sent.key,
            &sent.method,
            &sent.path_and_query,
            &sent.headers,
            &sent.body
        )
    );
    assert!(
        matches!(call.poll_output(), Output::Wait(_)),
        "the call goes on waiting"
    );
    call.handle_response_head(StatusCode::OK, HeaderMap::new(), now, SystemTime::now());
    assert!(call.resend().is_none(), "the head is in");
}
