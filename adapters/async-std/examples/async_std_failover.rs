//! Key failover with the async-std / smol client, against an embedded fake Anthropic API (no
//! network, no real keys needed), or against a real upstream when `KEYPOOL_KEYS` is set. Runs on
//! smol here; `async_std::task::block_on` works the same.
//!
//! ```sh
//! cargo run -p keypool-async-std --example async_std_failover
//! KEYPOOL_KEYS=sk-ant-...,sk-ant-... cargo run -p keypool-async-std --example async_std_failover   # the real API
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use futures_lite::{AsyncReadExt, StreamExt};
use keypool_async_std::{Client, messages};
use keypool_core::{KeySpec, KeyState};
use keypool_mock::{MockServer, Reply, RetryAfter, StreamScript};

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
            std::env::var("KEYPOOL_UPSTREAM")
                .unwrap_or_else(|_| keypool_async_std::DEFAULT_BASE_URL.to_owned()),
        ),
        None => {
            let names = ["alpha", "bravo", "charlie"];
            let keys: Vec<String> = names
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
            let labelled = names.iter().zip(keys).map(|(l, k)| KeySpec::labelled(*l, k));
            (labelled.collect(), mock.url())
        }
    };
    let client = Client::builder().keys(keys).base_url(base_url).build()?;

    smol::block_on(async {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Say hi"}]}"#;
        match client.send(messages(body)).await {
            Ok(response) => {
                let status = response.status();
                let mut text = String::new();
                response.into_body().read_to_string(&mut text).await?;
                println!("non-streaming call: {status}, {} bytes of JSON", text.len());
            }
            Err(e) => println!("call: keypool answered: {e}"),
        }

        let stream = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Say hi"}]}"#;
        match client.stream(messages(stream)).await {
            Ok(mut events) => {
                let mut names = Vec::new();
                while let Some(event) = events.next().await {
                    match event {
                        Ok(e) => names.push(e.event_type().to_owned()),
                        Err(e) => println!("stream broke after commit: {e}"),
                    }
                }
                println!("streaming call: {} events: {}", names.len(), names.join(", "));
            }
            Err(e) => println!("streaming call: {e}"),
        }
        Ok::<(), std::io::Error>(())
    })?;

    println!("\nkey states:");
    let now = std::time::Instant::now();
    for key in client.pool().snapshot(now) {
        let state = match key.state {
            KeyState::Available => "available".to_owned(),
            KeyState::Cooling { until, reason } => {
                format!(
                    "cooling ({reason:?}) for {}s",
                    until.saturating_duration_since(now).as_secs() + 1
                )
            }
            KeyState::Disabled { reason } => format!("disabled ({reason:?})"),
        };
        println!("  {:<16} {state}", key.label);
    }
    Ok(())
}
