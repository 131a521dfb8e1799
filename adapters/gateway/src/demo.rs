//! `keypool demo`: the gateway against an embedded fake API, with scripted requests, showing
//! what happens to each key. Needs no network and no keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keypool_core::{KeySpec, KeyState, Order};
use keypool_mock::{MockServer, Reply, RetryAfter};

use crate::access::AccessPolicy;
use crate::config::{Config, KeySource};
use crate::server::{Server, Shared};

/// Flags of `keypool demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Show the gateway's own log lines too.
    #[arg(long)]
    pub verbose: bool,
}

const KEYS: [(&str, &str); 3] = [
    ("alpha", "sk-ant-api03-demo-alpha-0000000000000000"),
    ("bravo", "sk-ant-api03-demo-bravo-0000000000000000"),
    ("charlie", "sk-ant-api03-demo-charlie-000000000000000"),
];

/// One scripted step: what it shows, how the mock is scripted first, whether it streams.
type Step = (&'static str, Box<dyn Fn(&MockServer)>, bool);

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<(), String> {
    let _logs = args
        .verbose
        .then(|| crate::init_logging(crate::config::LogFormat::Text));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(demo())
}

fn state_line(shared: &Shared) -> String {
    let pool = shared.pool();
    let now = Instant::now();
    pool.snapshot(now)
        .into_iter()
        .map(|k| match k.state {
            KeyState::Available => format!("{}: ok", k.label),
            KeyState::Cooling { until, .. } => {
                format!(
                    "{}: cooling {}s",
                    k.label,
                    until.saturating_duration_since(now).as_secs() + 1
                )
            }
            KeyState::Disabled { reason } => format!("{}: disabled ({reason:?})", k.label),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn demo() -> Result<(), String> {
    let mock = MockServer::try_start().map_err(|e| format!("cannot start the embedded mock: {e}"))?;
    let config = Config {
        name: "anthropic".into(),
        mount: "/".into(),
        more: Vec::new(),
        listen: ([127, 0, 0, 1], 0).into(),
        upstream: mock.url(),
        keys: KEYS.iter().map(|(l, k)| KeySpec::labelled(*l, *k)).collect(),
        key_source: KeySource::Env,
        access: AccessPolicy::default(),
        admin_token: None,
        pass_identity_headers: false,
        order: Order::PrimaryWithFallback,
        call: keypool_core::call::CallConfig::default(),
        max_body: 1 << 20,
        grace: Duration::from_secs(2),
        upstream_roots: Vec::new(),
        state: None,
        probe: keypool_core::probe::ProbeConfig::default(),
    };
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    let shared: Arc<Shared> = server.shared();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));

    println!(
        "keypool demo: gateway on http://{addr}, fake Anthropic API on {}\n",
        mock.url()
    );
    println!("keys: alpha (primary), bravo, charlie\n");
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let steps: Vec<Step> = vec![
        ("all keys healthy", Box::new(|_| {}), false),
        (
            "alpha is rate-limited (retry-after: 20)",
            Box::new(|m| m.script(KEYS[0].1, [Reply::rate_limited(RetryAfter::Seconds("20".into()))])),
            false,
        ),
        (
            "alpha is still cooling: straight to bravo",
            Box::new(|_| {}),
            false,
        ),
        (
            "bravo's key is revoked (401)",
            Box::new(|m| m.set_default(KEYS[1].1, Reply::unauthorized())),
            false,
        ),
        ("a streaming call", Box::new(|_| {}), true),
        (
            "charlie is rate-limited too: no key left",
            Box::new(|m| m.script(KEYS[2].1, [Reply::rate_limited(RetryAfter::Seconds("45".into()))])),
            false,
        ),
    ];
    println!(
        "{:<3} {:<44} {:<24} {:<22} keys after",
        "#", "what happens", "upstream saw", "client got"
    );
    for (i, (what, script, stream)) in steps.iter().enumerate() {
        script(&mock);
        let before = mock.request_count();
        let body = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        let req = http::Request::post(format!("http://{addr}/v1/messages"))
            .header("content-type", "application/json")
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let res = client
            .request(req)
            .await
            .map_err(|e| format!("request to the gateway failed: {e}"))?;
        let status = res.status();
        let retry = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let got = if *stream {
            let events = bytes.windows(7).filter(|w| w == b"event: ").count();
            format!("{status} ({events} events)")
        } else if let Some(retry) = retry {
            format!("{} retry-after {retry}", status.as_u16())
        } else {
            status.to_string()
        };
        let seen: Vec<String> = mock.requests()[before..]
            .iter()
            .map(|r| {
                let key = r.key.as_deref().unwrap_or("");
                let label = KEYS.iter().find(|(_, k)| *k == key).map_or("?", |(l, _)| *l);
                label.to_owned()
            })
            .collect();
        let seen = if seen.is_empty() {
            "(nothing: no key left)".to_owned()
        } else {
            seen.join(" -> ")
        };
        println!(
            "{:<3} {:<44} {:<24} {:<22} {}",
            i + 1,
            what,
            seen,
            got,
            state_line(&shared)
        );
    }
    println!("\nThe gateway answered the last call itself with Anthropic's 429 shape and the time until");
    println!("the first key frees up, so SDKs back off correctly. Try `keypool serve --help` next.");
    let _ = stop.send(());
    let _ = serving.await;
    Ok(())
}
