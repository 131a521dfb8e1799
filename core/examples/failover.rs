//! Failover on simulated time, with no network and no real keys.
//!
//! A three-key pool meets a rate limit, a revoked key and exhaustion. The upstream is a script
//! inside this program; the `Call` state machine makes every decision, exactly as it does inside
//! the real adapters.
//!
//! ```sh
//! cargo run -p keypool-core --example failover
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use keypool_core::call::{Call, CallConfig, Credential, Output, Request};
use keypool_core::{KeyState, Order, Pool};

/// What the fake upstream answers for each key, in order (then 200).
fn answer(key: usize, per_key: &mut [VecDeque<(u16, &'static str)>]) -> (u16, &'static str) {
    per_key[key].pop_front().unwrap_or((200, ""))
}

fn main() {
    let start = Instant::now();
    let mut now = start;
    let keys = [
        ("team-a", "sk-ant-api03-demo-key-aaaaaaaaaaaaaaaa"),
        ("team-b", "sk-ant-api03-demo-key-bbbbbbbbbbbbbbbb"),
        ("team-c", "sk-ant-api03-demo-key-cccccccccccccccc"),
    ];
    let pool = Arc::new(
        Pool::new(
            keys.iter().map(|(l, k)| keypool_core::KeySpec::labelled(*l, *k)),
            Order::PrimaryWithFallback,
            start,
        )
        .unwrap(),
    );
    let config = CallConfig::default();
    // team-a: 429 for 30 s; team-b: fine once, then revoked; team-c: fine, then 429 for 90 s.
    let mut script: Vec<VecDeque<(u16, &str)>> = vec![
        VecDeque::from([(429, "30")]),
        VecDeque::from([(200, ""), (401, "")]),
        VecDeque::from([(200, ""), (429, "90")]),
    ];

    println!(
        "{:<6} {:>7}  {:<28} {:<8} key states after",
        "call", "t", "attempts", "result"
    );
    for (n, advance) in [0u64, 1, 2, 3, 40, 60].into_iter().enumerate() {
        now += Duration::from_secs(advance);
        let request = Request::post_json("/v1/messages", r#"{"model":"claude-sonnet-4-5","max_tokens":64}"#);
        let mut call = Call::new(
            request,
            Credential::Pool(pool.clone()),
            &config,
            format!("req_{n}"),
            now,
        );
        let mut attempts = Vec::new();
        let mut result = String::new();
        let mut said = None;
        loop {
            match call.poll_output() {
                Output::Send(attempt) => {
                    let key = attempt.key.unwrap().index();
                    let (status, retry_after) = answer(key, &mut script);
                    attempts.push(format!("{}:{status}", pool.label(attempt.key.unwrap())));
                    let mut headers = HeaderMap::new();
                    if !retry_after.is_empty() {
                        headers.insert("retry-after", retry_after.parse().unwrap());
                    }
                    call.handle_response_head(
                        StatusCode::from_u16(status).unwrap(),
                        headers,
                        now,
                        SystemTime::now(),
                    );
                    call.handle_body(Bytes::from_static(b"{}"), now);
                    call.handle_body_end(now);
                }
                // The body follows from `poll_body`; this example only shows the answer.
                Output::Head(head) => {
                    result = head.status.to_string();
                    break;
                }
                Output::Fail(failure) => {
                    let retry = failure
                        .response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_owned());
                    result = format!(
                        "{} (retry-after {})",
                        failure.response.status(),
                        retry.unwrap_or("-".into())
                    );
                    said = Some(failure.error.to_string());
                    break;
                }
                Output::Mark(mark) => println!(
                    "    key {} answered {}: {:?} ({:?})",
                    pool.label(mark.key),
                    mark.status,
                    mark.verdict,
                    mark.transition
                ),
                // The script answers every attempt as it is sent: nothing to wait for.
                Output::Wait(_) => break,
            }
        }
        let states: Vec<String> = pool
            .snapshot(now)
            .into_iter()
            .map(|k| match k.state {
                KeyState::Available => format!("{}=ok", k.label),
                KeyState::Cooling { until, .. } => {
                    format!(
                        "{}=cooling {}s",
                        k.label,
                        until.saturating_duration_since(now).as_secs()
                    )
                }
                KeyState::Disabled { reason } => format!("{}=disabled ({reason:?})", k.label),
            })
            .collect();
        println!(
            "{:<6} {:>6}s  {:<28} {:<8} {}",
            n + 1,
            (now - start).as_secs(),
            attempts.join(" -> "),
            result,
            states.join("  ")
        );
        if let Some(said) = said {
            println!("{}keypool answered: {said}", " ".repeat(16));
        }
    }
}
