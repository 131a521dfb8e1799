//! The conformance suite against the `keypool` gateway, through a plain HTTP client.
//!
//! The gateway runs in-process on 127.0.0.1:0 (its own tokio runtime on a background thread)
//! in front of the scenario's mock; the suite's client speaks plain HTTP/1.1 to it, exactly as
//! an SDK would with `ANTHROPIC_BASE_URL`.
//!
//! Every gateway logs at `trace` level into its own buffer (a tracing dispatcher set on each of
//! its runtime threads); the logs, `/metrics` and `/admin/keys` go through the suite's secret
//! check at the end of every scenario.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keypool_conformance::{Adapter, Answer, Setup, StreamAnswer, TestClient, break_named, conformance_suite};
use keypool_core::call::Request;
use keypool_core::sse::Parser;
use keypool_core::{KeySpec, Order, Pool, Secret};
use keypool_gateway::access::AccessPolicy;
use keypool_gateway::config::{Config, KeySource, PoolConfig};
use keypool_gateway::server::{Server, Shared};

struct Gateway;

const ADMIN_TOKEN: &str = "admin-token-conformance-Vb81Nm4Xz6";

/// Where one gateway's log lines go.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

struct GatewayClient {
    addr: SocketAddr,
    /// The idle timeout, to tell which break a message names.
    idle: Duration,
    /// Where the scenario's pool is mounted (`""` for `/`).
    mount: &'static str,
    shared: Arc<Shared>,
    logs: LogBuffer,
    agent: ureq::Agent,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GatewayClient {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Adapter for Gateway {
    type Client = GatewayClient;
    // SPEC §13 lets the gateway remove them (it passes them through today).
    const MAY_REMOVE_IDENTITY_HEADERS: bool = true;
    fn build(setup: &Setup) -> GatewayClient {
        let keys: Vec<KeySpec> = setup.keys.iter().map(|k| KeySpec::new(k.clone())).collect();
        let roots: Vec<Vec<u8>> = setup.ca_der.iter().cloned().collect();
        // An OpenAI world runs behind a gateway that serves both pools: Anthropic at `/` (one
        // key the scenario never reaches) and the scenario's OpenAI pool at `/openai`.
        let openai = setup.config.profile.name() == "openai";
        let (first_keys, first_call, more, mount) = if openai {
            let pool = PoolConfig {
                name: "openai".into(),
                mount: "/openai".into(),
                upstream: setup.base_url.clone(),
                keys: keys.clone(),
                key_source: KeySource::OpenAiEnv,
                order: Order::PrimaryWithFallback,
                call: setup.config.clone(),
                upstream_roots: roots.clone(),
                probe: keypool_core::probe::ProbeConfig::default(),
            };
            let unused = vec![KeySpec::new("sk-ant-api03-unused-anthropic-key-0000")];
            let anthropic = setup
                .config
                .clone()
                .with_profile(keypool_core::Profile::anthropic());
            (unused, anthropic, vec![pool], "/openai")
        } else {
            (keys, setup.config.clone(), Vec::new(), "")
        };
        let config = Config {
            listen: ([127, 0, 0, 1], 0).into(),
            name: "anthropic".into(),
            mount: "/".into(),
            more,
            upstream: setup.base_url.clone(),
            keys: first_keys,
            key_source: KeySource::Env,
            access: AccessPolicy {
                tokens: Vec::new(),
                allow_byok: true,
            },
            admin_token: Some(Secret::new(ADMIN_TOKEN).unwrap()),
            pass_identity_headers: false,
            order: Order::PrimaryWithFallback,
            call: first_call,
            max_body: 1 << 20,
            grace: Duration::from_secs(1),
            upstream_roots: roots,
            state: None,
            probe: keypool_core::probe::ProbeConfig::default(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let logs = LogBuffer::default();
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(logs.clone())
                .finish(),
        );
        let thread = std::thread::spawn(move || {
            let _logging = tracing::dispatcher::set_default(&dispatch);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start(move || {
                    // For the thread's whole life: the guard is never dropped.
                    std::mem::forget(tracing::dispatcher::set_default(&dispatch));
                })
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = Server::bind(config).await.unwrap();
                tx.send((server.local_addr(), server.shared())).unwrap();
                server
                    .serve(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        let (addr, shared) = rx.recv().unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        GatewayClient {
            addr,
            idle: setup.config.timeouts.idle,
            mount,
            shared,
            logs,
            agent,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl GatewayClient {
    fn get(&self, path: &str) -> String {
        let mut response = self
            .agent
            .get(format!("http://{}{path}", self.addr))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .call()
            .unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.body_mut().read_to_string().unwrap()
    }

    /// The gateway's request log lines so far.
    fn request_lines(&self) -> Vec<String> {
        let logs = String::from_utf8_lossy(&self.logs.0.lock().unwrap()).into_owned();
        logs.lines()
            .filter(|l| l.contains("keypool::request"))
            .map(str::to_owned)
            .collect()
    }

    /// The request line that followed the first `before` ones: written as the body ends, so
    /// possibly just after the client read it; waited for, bounded.
    fn request_line(&self, before: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.request_lines().get(before) {
                return line.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no request log line");
            std::thread::yield_now();
        }
    }

    /// The attempts the gateway logged for the request that followed the first `before` ones.
    fn logged_attempts(&self, before: usize) -> Option<usize> {
        let line = self.request_line(before);
        let (_, rest) = line.split_once(" attempts=")?;
        rest.split_whitespace().next()?.parse().ok()
    }

    /// The break the gateway logged for the request that followed the first `before` request
    /// lines: a client sees only a cut body, the gateway's request line says how the call
    /// ended. It is written before the connection is cut; waited for, bounded, all the same.
    fn logged_break(&self, before: usize) -> Option<keypool_core::call::StreamBreak> {
        let line = self.request_line(before);
        assert!(line.contains("outcome=\"upstream_broke\""), "{line}");
        let (_, message) = line.split_once(" error=")?;
        break_named(message.trim(), self.idle)
    }

    /// The status, the headers, the body as far as it came, and the error that broke it.
    fn raw(
        &self,
        request: Request,
        own_key: Option<&str>,
    ) -> (u16, http::HeaderMap, Vec<u8>, Option<String>) {
        let mut builder = http::Request::builder().method(request.method).uri(format!(
            "http://{}{}{}",
            self.addr, self.mount, request.path_and_query
        ));
        // In loopback mode with BYOK allowed, a client credential means "my own key": the
        // request's own credential headers are not sent.
        for (k, v) in &request.headers {
            if !matches!(k.as_str(), "x-api-key" | "authorization" | "api-key") {
                builder = builder.header(k, v);
            }
        }
        if let Some(key) = own_key {
            builder = builder.header("x-api-key", key);
        }
        let response = match self.agent.run(builder.body(request.body.to_vec()).unwrap()) {
            Ok(r) => r,
            Err(e) => {
                return (
                    0,
                    http::HeaderMap::new(),
                    Vec::new(),
                    Some(format!("connection: {e}")),
                );
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        let broke = response
            .into_body()
            .into_reader()
            .read_to_end(&mut body)
            .err()
            .map(|e| format!("body: {e}"));
        (status, headers, body, broke)
    }
}

fn is_keypool_error(headers: &http::HeaderMap, body: &[u8]) -> bool {
    // keypool's own errors carry a request id made by keypool ("req_keypool_..."): in the body
    // (Anthropic's shape) or in x-request-id (OpenAI's shape, whose body has none).
    std::str::from_utf8(body).is_ok_and(|s| s.contains("\"request_id\":\"req_keypool_"))
        || headers
            .get("x-request-id")
            .is_some_and(|v| v.as_bytes().starts_with(b"req_keypool_"))
}

/// Whether an event is keypool's synthesized error event: Anthropic's `api_error`, OpenAI's
/// `data: {"error":{"type":"server_error",…}}` chunk or Responses `event: error`.
fn is_synthesized(event_type: &str, data: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
        return false;
    };
    match event_type {
        "error" => v["error"]["type"] == "api_error" || v["error"]["type"] == "server_error",
        "message" => v["error"]["type"] == "server_error",
        _ => false,
    }
}

impl TestClient for GatewayClient {
    fn pool(&self) -> Arc<Pool> {
        if self.mount.is_empty() {
            self.shared.pool()
        } else {
            self.shared.pool_named("openai").unwrap()
        }
    }
    fn send(&self, request: Request) -> Answer {
        let before = self.request_lines().len();
        let (status, headers, body, cut) = self.raw(request, None);
        let broke = match (status, &cut) {
            (200, Some(_)) => self.logged_break(before),
            _ => None,
        };
        let error = is_keypool_error(&headers, &body)
            .then(|| String::from_utf8_lossy(&body).into_owned())
            .or(cut);
        // A whole delivered answer has its request line (written as the body ends).
        let attempts = (broke.is_none() && error.is_none() && status != 0)
            .then(|| self.logged_attempts(before))
            .flatten();
        Answer {
            status,
            headers,
            body,
            error,
            broke,
            attempts,
        }
    }
    fn send_byok(&self, request: Request, key: &str) -> Answer {
        let (status, headers, body, _) = self.raw(request, Some(key));
        Answer {
            status,
            headers,
            body,
            error: None,
            broke: None,
            attempts: None,
        }
    }
    fn stream(&self, request: Request) -> StreamAnswer {
        // After keypool's error event the gateway aborts the chunked body; the event is what
        // tells the caller, so the read error is not looked at here.
        let (status, headers, body, _) = self.raw(request, None);
        let is_events = headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
        if !is_events {
            let error =
                is_keypool_error(&headers, &body).then(|| String::from_utf8_lossy(&body).into_owned());
            return StreamAnswer {
                status,
                body,
                error,
                ..StreamAnswer::default()
            };
        }
        let mut parser = Parser::new();
        parser.feed(&bytes::Bytes::from(body));
        let _ = parser.finish();
        let mut out = StreamAnswer {
            status,
            ..StreamAnswer::default()
        };
        while let Some(event) = parser.next_event() {
            let event = event.unwrap();
            assert!(out.stream_error.is_none(), "an event after keypool's error event");
            if is_synthesized(event.event_type(), event.data()) {
                let data: serde_json::Value = serde_json::from_str(event.data()).unwrap();
                out.broke = break_named(data["error"]["message"].as_str().unwrap(), self.idle);
                out.stream_error = Some(event.data().to_owned());
            } else {
                out.events
                    .push((event.event_type().to_owned(), event.data().to_owned()));
            }
        }
        out
    }
    fn observations(&self) -> Vec<String> {
        let metrics = self.get("/metrics");
        let admin = self.get("/admin/keys");
        let logs = String::from_utf8_lossy(&self.logs.0.lock().unwrap()).into_owned();
        assert!(
            logs.contains("keypool::request"),
            "the request log lines were captured"
        );
        vec![metrics, admin, logs]
    }
}

conformance_suite!(plain_upstream, Gateway, keypool_conformance::Transport::Plain);
conformance_suite!(tls_upstream, Gateway, keypool_conformance::Transport::Tls);
