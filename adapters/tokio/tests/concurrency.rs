//! 500 concurrent calls on one pool against an upstream where some keys always answer 429.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use keypool_core::call::CallError;
use keypool_core::{Exhausted, KeyState, Order};
use keypool_mock::{MockServer, Reply, RetryAfter};
use keypool_tokio::{Client, Error};

const CALLS: usize = 500;

fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sk-ant-api03-C{i:02}x{}", "Rt5Yu8Io".repeat(5)))
        .collect()
}

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn retry_after(rng: &mut Rng) -> RetryAfter {
    match rng.next() % 5 {
        0 => RetryAfter::Seconds("30".into()),
        1 => RetryAfter::Millis("45000".into()),
        2 => RetryAfter::HttpDateIn(90),
        3 => RetryAfter::Both {
            seconds: "20".into(),
            millis: "20000".into(),
        },
        _ => RetryAfter::None,
    }
}

/// Runs `CALLS` calls at once; returns how each ended.
async fn run_all(client: &Client) -> Vec<Result<(u16, usize), Error>> {
    let mut tasks = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"model":"claude-sonnet-4-5","max_tokens":8,"n":{i}}}"#);
            let response = client.send(keypool_tokio::messages(body)).await?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            let mut len = 0;
            while let Some(chunk) = body.next_chunk().await? {
                len += chunk.len();
            }
            Ok((status, len))
        }));
    }
    let mut out = Vec::with_capacity(CALLS);
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// Every key the mock answered 429 for is cooling; every other key is available.
fn check_states(client: &Client, mock: &MockServer, keys: &[String], limited: &[bool]) {
    let now = Instant::now();
    let ids: Vec<_> = client.pool().ids().collect();
    for (i, key) in keys.iter().enumerate() {
        let state = client.pool().state(ids[i], now);
        let answered_429 = limited[i] && !mock.requests_for(key).is_empty();
        if answered_429 {
            assert!(matches!(state, KeyState::Cooling { .. }), "key {i}: {state:?}");
        } else {
            assert_eq!(state, KeyState::Available, "key {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_pool() {
    let mock = MockServer::start();
    let keys = keys(10);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut limited = vec![false; keys.len()];
    for (i, key) in keys.iter().enumerate() {
        // The last key always answers, so every call of the first round is delivered.
        if i + 1 < keys.len() && rng.next() % 10 < 6 {
            limited[i] = true;
            mock.set_default(key, Reply::rate_limited(retry_after(&mut rng)));
        } else {
            mock.set_default(key, Reply::ok());
        }
    }
    assert!(limited.iter().any(|l| *l) && limited.iter().any(|l| !*l));
    let client = Client::builder()
        .keys(keys.clone())
        .order(Order::RoundRobin)
        .base_url(mock.url())
        .build()
        .unwrap();

    // Round 1: some keys always 429, the others answer: every call is delivered.
    for (i, result) in run_all(&client).await.into_iter().enumerate() {
        let (status, len) = result.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(status, 200, "call {i}");
        assert!(len > 0, "call {i}");
    }
    check_states(&client, &mock, &keys, &limited);

    // Round 2: every key answers 429: each call ends in a delivered answer (none can be) or
    // keypool's exhaustion error.
    for (i, key) in keys.iter().enumerate() {
        if !limited[i] {
            limited[i] = true;
            mock.set_default(key, Reply::rate_limited(RetryAfter::Seconds("10".into())));
        }
    }
    for (i, result) in run_all(&client).await.into_iter().enumerate() {
        let e = result.expect_err("every key is rate-limited");
        match e.call_error() {
            Some(CallError::Exhausted {
                exhausted: Exhausted::RateLimited { retry_after },
                keys: 10,
            }) => assert!(
                *retry_after > Duration::ZERO && *retry_after <= Duration::from_secs(120),
                "call {i}: {retry_after:?}"
            ),
            other => panic!("call {i}: {other:?} ({e})"),
        }
        let response = e.to_response().unwrap();
        assert_eq!(response.status(), 429, "call {i}");
        assert!(response.headers().contains_key("retry-after"), "call {i}");
    }
    check_states(&client, &mock, &keys, &limited);
}
