//! Key failover with the blocking client, against an embedded fake Anthropic API (no network,
//! no real keys needed), or against a real upstream when `KEYPOOL_KEYS` is set.
//!
//! ```sh
//! cargo run -p keypool-ureq --example ureq_failover
//! KEYPOOL_KEYS=sk-ant-...,sk-ant-... cargo run -p keypool-ureq --example ureq_failover   # the real API
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Read;

use keypool_core::{KeySpec, KeyState};
use keypool_mock::{MockServer, Reply, RetryAfter, StreamScript};
use keypool_ureq::{Client, messages};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let real_keys = std::env::var("KEYPOOL_KEYS").ok();
    let mock;
    let (keys, base_url): (Vec<KeySpec>, String) = match real_keys {
        Some(list) => (
            list.split([',', '\n'])
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(KeySpec::new)
                .collect(),
            std::env::var("KEYPOOL_UPSTREAM").unwrap_or_else(|_| keypool_ureq::DEFAULT_BASE_URL.to_owned()),
        ),
        None => {
            let keys: Vec<String> = ["alpha", "bravo", "charlie"]
                .iter()
                .map(|n| format!("sk-ant-api03-demo-{n}-0000000000000000"))
                .collect();
            mock = MockServer::start();
            // alpha is rate-limited for 30 s, bravo's key was revoked, charlie is fine.
            mock.script(&keys[0], [Reply::rate_limited(RetryAfter::Seconds("30".into()))]);
            mock.set_default(&keys[1], Reply::unauthorized());
            mock.script(
                &keys[2],
                [Reply::ok(), Reply::stream(StreamScript::new().text_deltas(4))],
            );
            println!("embedded fake Anthropic API at {}", mock.url());
            let labelled = ["alpha", "bravo", "charlie"]
                .iter()
                .zip(keys)
                .map(|(l, k)| KeySpec::labelled(*l, k));
            (labelled.collect(), mock.url())
        }
    };
    let client = Client::builder().keys(keys).base_url(base_url).build()?;

    let body =
        r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Say hi"}]}"#;
    match client.send(messages(body)) {
        Ok(response) => {
            let status = response.status();
            let mut text = String::new();
            response.into_body().read_to_string(&mut text)?;
            println!("blocking call: {status}, {} bytes of JSON", text.len());
        }
        Err(e) => println!("blocking call: keypool answered: {e}"),
    }

    let stream = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Say hi"}]}"#;
    match client.stream(messages(stream)) {
        Ok(events) => {
            let mut names = Vec::new();
            for event in events {
                match event {
                    Ok(e) => names.push(e.event_type().to_owned()),
                    Err(e) => println!("stream broke after commit: {e}"),
                }
            }
            println!("streaming call: {} events: {}", names.len(), names.join(", "));
        }
        Err(e) => println!("streaming call: {e}"),
    }

    println!("\nkey states:");
    for key in client.pool().snapshot(std::time::Instant::now()) {
        let state = match key.state {
            KeyState::Available => "available".to_owned(),
            KeyState::Cooling { until, reason } => format!(
                "cooling ({reason:?}) for {}s",
                until
                    .saturating_duration_since(std::time::Instant::now())
                    .as_secs()
                    + 1
            ),
            KeyState::Disabled { reason } => format!("disabled ({reason:?})"),
        };
        println!("  {:<16} {state}", key.label);
    }
    Ok(())
}
