//! OpenAI key failover with the async-std / smol client (run on smol here;
//! `async_std::task::block_on` works the same): Chat Completions (plain and streamed) and a
//! streamed Responses API call, against an embedded fake OpenAI API (no network, no real keys
//! needed), or against a real OpenAI(-compatible) upstream when `KEYPOOL_OPENAI_KEYS` is set.
//!
//! ```sh
//! cargo run -p keypool-async-std --example async_std_openai
//! KEYPOOL_OPENAI_KEYS=sk-proj-...,sk-proj-... cargo run -p keypool-async-std --example async_std_openai   # the real API
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use futures_lite::{AsyncReadExt, StreamExt};
use keypool_async_std::{Client, Profile};
use keypool_core::call::Request;
use keypool_core::{KeySpec, KeyState};
use keypool_mock::{MockServer, Reply, openai};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mock;
    let (keys, base_url): (Vec<KeySpec>, Option<String>) = match std::env::var("KEYPOOL_OPENAI_KEYS") {
        Ok(list) => (
            list.split([',', '\n'])
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(KeySpec::new)
                .collect(),
            // None: the profile's default, https://api.openai.com.
            std::env::var("KEYPOOL_OPENAI_UPSTREAM").ok(),
        ),
        Err(_) => {
            let names = ["alpha", "bravo", "charlie"];
            let keys: Vec<String> = names
                .iter()
                .map(|n| format!("sk-proj-demo-{n}-00000000000000"))
                .collect();
            mock = MockServer::start_openai();
            // alpha's token bucket is empty for 6 minutes, bravo's organisation is out of credit,
            // charlie is fine.
            mock.script(&keys[0], [openai::rate_limited_reset("tokens", "6m0s")]);
            mock.set_default(&keys[1], openai::insufficient_quota());
            mock.set_default(&keys[2], Reply::ok());
            println!("embedded fake OpenAI API at {}", mock.url());
            let labelled = names.iter().zip(keys).map(|(l, k)| KeySpec::labelled(*l, k));
            (labelled.collect(), Some(mock.url()))
        }
    };
    let mut builder = Client::builder().keys(keys).profile(Profile::openai());
    if let Some(url) = base_url {
        builder = builder.base_url(url);
    }
    let client = builder.build()?;
    let openai = Profile::openai();

    smol::block_on(async {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}]}"#;
        match client
            .send(Request::post_json_for(&openai, "/v1/chat/completions", body))
            .await
        {
            Ok(response) => {
                let status = response.status();
                let mut text = String::new();
                response.into_body().read_to_string(&mut text).await?;
                println!("chat completion: {status}, {} bytes of JSON", text.len());
            }
            Err(e) => println!("chat completion: keypool answered: {e}"),
        }

        let streams = [
            (
                "/v1/chat/completions",
                r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hi"}]}"#,
            ),
            (
                "/v1/responses",
                r#"{"model":"gpt-4o-mini","stream":true,"input":"Say hi"}"#,
            ),
        ];
        for (path, body) in streams {
            match client.stream(Request::post_json_for(&openai, path, body)).await {
                Ok(mut events) => {
                    let mut seen = Vec::new();
                    while let Some(event) = events.next().await {
                        match event {
                            // Chat Completions chunks have no event name; Responses events do.
                            Ok(e) if e.event_type() == "message" => {
                                seen.push(e.data().chars().take(12).collect())
                            }
                            Ok(e) => seen.push(e.event_type().to_owned()),
                            Err(e) => println!("{path}: the stream broke after commit: {e}"),
                        }
                    }
                    println!(
                        "{path} streamed {} events, the last: {:?}",
                        seen.len(),
                        seen.last()
                    );
                }
                Err(e) => println!("{path}: {e}"),
            }
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
