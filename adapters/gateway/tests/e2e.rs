//! End-to-end tests of the `keypool` binary: real process, real signals, real sockets on
//! 127.0.0.1, a `keypool-mock` upstream. No sleeps: every wait is for an observable event
//! (a log line, a byte, a process exit), bounded by a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keypool_mock::{Ending, MockServer, OutcomeEnd, Reply, RetryAfter, StreamScript};

const K0: &str = "sk-ant-api03-e2e-key-zero-Q8wRtY2uIoP4aSdF";
const K1: &str = "sk-ant-api03-e2e-key-one-Z1xCvB3nMlK5jHgF";
const K2: &str = "sk-ant-api03-e2e-key-two-P0oIuY7tReW9qAsD";
const TOKEN: &str = "team-token-Hs72Kd9Lq3";
const ADMIN: &str = "admin-token-Vb81Nm4Xz6";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keypool")
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keypool-e2e-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.txt");
    std::fs::write(&path, text).unwrap();
    path
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    events: Receiver<String>,
}

impl Gateway {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--grace",
                "10s",
            ])
            .args(args)
            .env_remove("KEYPOOL_KEYS")
            .env_remove("KEYPOOL_CLIENT_TOKENS")
            .env_remove("KEYPOOL_ADMIN_TOKEN")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, events) = channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let line = events
                .recv_timeout(deadline - Instant::now())
                .expect("gateway did not start");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(listen) = v["fields"]["listen"].as_str()
            {
                break listen.parse().unwrap();
            }
        };
        Self {
            child,
            addr,
            lines,
            events,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits for a log line containing `needle`.
    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        if self.lines.lock().unwrap().iter().any(|l| l.contains(needle)) {
            return;
        }
        loop {
            let line = self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap();
            if line.contains(needle) {
                return;
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "gateway did not exit");
            std::thread::yield_now();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

const BODY: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
const STREAM_BODY: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn post(gw: &Gateway, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut req = agent()
        .post(gw.url("/v1/messages"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut res = req.send(body).unwrap();
    (res.status().as_u16(), res.body_mut().read_to_string().unwrap())
}

fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = agent().get(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut res = req.call().unwrap();
    (res.status().as_u16(), res.body_mut().read_to_string().unwrap())
}

fn assert_no_secret(text: &str) {
    for secret in [K0, K1, K2, TOKEN, ADMIN] {
        let hint = 11.min(secret.len());
        for start in 0..secret.len() - hint {
            let piece = &secret[start..=start + hint];
            assert!(!text.contains(piece), "secret material leaked: {}…", &piece[..4]);
        }
    }
}

fn run_config_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(bin())
        .arg("serve")
        .args(args)
        .env_remove("KEYPOOL_KEYS")
        .env_remove("KEYPOOL_CLIENT_TOKENS")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("keypool: error: "), "{stderr}");
    assert_no_secret(&stderr);
    stderr
}

#[test]
fn bad_configuration_exits_with_one_clear_line() {
    let e = run_config_error(&[], &[]);
    assert!(e.contains("KEYPOOL_KEYS") && e.contains("--keys-file"), "{e}");
    let file = temp_file("badline", &format!("ok={K0}\nbad label={K1}\n"));
    let e = run_config_error(&["--keys-file", file.to_str().unwrap()], &[]);
    assert!(e.contains("line 2"), "{e}");
    let e = run_config_error(&["--listen", "0.0.0.0:0"], &[("KEYPOOL_KEYS", K0)]);
    assert!(e.contains("--client-token") && e.contains("127.0.0.1"), "{e}");
    let e = run_config_error(&["--upstream", "ftp://example"], &[("KEYPOOL_KEYS", K0)]);
    assert!(e.contains("--upstream"), "{e}");
    let e = run_config_error(&[], &[("KEYPOOL_KEYS", &format!("{K0},{K0}"))]);
    assert!(e.contains("same key"), "{e}");
}

#[test]
fn help_explains_every_flag_with_defaults() {
    let out = Command::new(bin()).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--upstream",
        "--keys-file",
        "--client-token",
        "--allow-byok",
        "--admin-token",
        "--order",
        "--commit",
        "--hold",
        "--on-401",
        "--on-403",
        "--max-body",
        "--connect-timeout",
        "--first-byte-timeout",
        "--idle-timeout",
        "--grace",
        "[default: 127.0.0.1:8787]",
        "[default: 32MiB]",
    ] {
        assert!(help.contains(flag), "missing {flag} in\n{help}");
    }
    for sub in ["mock-upstream", "demo"] {
        let out = Command::new(bin()).args([sub, "--help"]).output().unwrap();
        assert!(out.status.success());
    }
}

#[test]
fn access_control_byok_admin_and_no_secret_anywhere() {
    let mock = MockServer::start();
    let keys = format!("{K0},{K1}");
    let gw = Gateway::start(
        &[
            "--upstream",
            &mock.url(),
            "--client-token",
            TOKEN,
            "--admin-token",
            ADMIN,
        ],
        &[("KEYPOOL_KEYS", &keys)],
    );
    // No credential, wrong credential (BYOK off): 401, nothing sent upstream.
    let (s, b) = post(&gw, &[], BODY);
    assert_eq!(s, 401);
    assert!(b.contains("authentication_error"));
    let (s, _) = post(&gw, &[("x-api-key", "not-a-token-123")], BODY);
    assert_eq!(s, 401);
    assert_eq!(mock.request_count(), 0);
    // The token, as x-api-key and as a bearer token: served from the pool, token never forwarded.
    assert_eq!(post(&gw, &[("x-api-key", TOKEN)], BODY).0, 200);
    assert_eq!(
        post(&gw, &[("authorization", &format!("Bearer {TOKEN}"))], BODY).0,
        200
    );
    for r in mock.requests() {
        assert_eq!(r.key.as_deref(), Some(K0));
        assert!(r.headers.get("authorization").is_none());
    }
    // Admin routes need the admin token; the client token is not enough.
    assert_eq!(get(&gw, "/admin/keys", &[]).0, 401);
    assert_eq!(get(&gw, "/admin/keys", &[("x-api-key", TOKEN)]).0, 401);
    let (s, admin) = get(&gw, "/admin/keys", &[("x-api-key", ADMIN)]);
    assert_eq!(s, 200, "{admin}");
    assert!(admin.contains("\"state\":\"available\""), "{admin}");
    let (s, metrics) = get(&gw, "/metrics", &[]);
    assert_eq!(s, 200);
    assert!(metrics.contains("keypool_key_state"), "{metrics}");
    let (s, health) = get(&gw, "/healthz", &[]);
    assert_eq!(s, 200);
    assert!(health.contains("\"available\":2"));
    // Operator disable through the admin route; the next call uses k1.
    let label: String = serde_json::from_str::<serde_json::Value>(&admin).unwrap()["keys"][0]["label"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = agent()
        .post(gw.url(&format!("/admin/keys/{label}/disable")))
        .header("x-api-key", ADMIN)
        .send_empty()
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(post(&gw, &[("x-api-key", TOKEN)], BODY).0, 200);
    assert_eq!(mock.requests().last().unwrap().key.as_deref(), Some(K1));
    // A rate-limited and a rejected key leave log lines and metrics, never secrets.
    mock.script(K1, [Reply::rate_limited(RetryAfter::Seconds("30".into()))]);
    let (s, b) = post(&gw, &[("x-api-key", TOKEN)], BODY);
    assert_eq!(s, 429, "{b}");
    let (_, metrics) = get(&gw, "/metrics", &[]);
    let (_, admin) = get(&gw, "/admin/keys", &[("x-api-key", ADMIN)]);
    gw.wait_log("key cooling");
    let everything = format!("{}\n{metrics}\n{admin}\n{b}", gw.logs());
    assert!(
        everything.contains("\"status\":429")
            || everything.contains("status=429")
            || everything.contains("429")
    );
    assert_no_secret(&everything);
}

#[test]
fn byok_is_sent_once_with_the_callers_key() {
    let mock = MockServer::start();
    let gw = Gateway::start(
        &["--upstream", &mock.url(), "--client-token", TOKEN, "--allow-byok"],
        &[("KEYPOOL_KEYS", K0)],
    );
    let own = "sk-ant-api03-callers-own-key-000000000000";
    mock.script(own, [Reply::rate_limited(RetryAfter::Seconds("7".into()))]);
    let (s, _) = post(&gw, &[("x-api-key", own)], BODY);
    assert_eq!(s, 429);
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].key.as_deref(), Some(own));
    let (_, health) = get(&gw, "/healthz", &[]);
    assert!(
        health.contains("\"available\":1"),
        "the pool was not touched: {health}"
    );
}

#[test]
fn sighup_reloads_keys_without_failing_requests() {
    let mock = MockServer::start();
    let file = temp_file("reload", &format!("zero={K0}\none={K1}\n"));
    let gw = Gateway::start(
        &["--upstream", &mock.url(), "--keys-file", file.to_str().unwrap()],
        &[],
    );
    // k0 cools for a minute; calls go to k1.
    mock.script(K0, [Reply::rate_limited(RetryAfter::Seconds("60".into()))]);
    assert_eq!(post(&gw, &[], BODY).0, 200);
    assert_eq!(mock.requests().last().unwrap().key.as_deref(), Some(K1));
    // Requests keep flowing while the file is edited and reloaded.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = gw.url("/v1/messages");
    let flag = stop.clone();
    let load = std::thread::spawn(move || {
        let mut statuses = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let mut res = agent()
                .post(&url)
                .header("content-type", "application/json")
                .send(BODY)
                .unwrap();
            let _ = res.body_mut().read_to_string();
            statuses.push(res.status().as_u16());
        }
        statuses
    });
    std::fs::write(&file, format!("zero={K0}\ntwo={K2}\n")).unwrap();
    gw.signal("-HUP");
    gw.wait_log("reloaded the keys");
    // Wait until the new key has served a request, then stop the load.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mock.requests().iter().any(|r| r.key.as_deref() == Some(K2)) {
        assert!(Instant::now() < deadline, "new key never used");
        std::thread::yield_now();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.join().unwrap();
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let before = mock.request_count();
    assert_eq!(post(&gw, &[], BODY).0, 200);
    let after: Vec<_> = mock.requests()[before..]
        .iter()
        .map(|r| r.key.clone().unwrap())
        .collect();
    // k0 kept its cooldown (not tried), k1 is gone, k2 serves.
    assert_eq!(after, vec![K2.to_owned()]);
    assert!(
        gw.logs().contains("1 kept with their state, 1 added, 1 removed"),
        "{}",
        gw.logs()
    );
}

#[test]
fn sighup_reloads_a_config_file_and_keeps_cooldowns() {
    let mock = MockServer::start();
    let config = |keys: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\n[[pool]]\nname = \"anthropic\"\nupstream = \"{}\"\nkeys = [{keys}]\n",
            mock.url()
        )
    };
    let file = temp_file("reload-config", &config(&format!("\"zero={K0}\", \"one={K1}\"")));
    let gw = Gateway::start(&["--config", file.to_str().unwrap()], &[]);
    // k0 cools for a minute; the call goes to k1.
    mock.script(K0, [Reply::rate_limited(RetryAfter::Seconds("60".into()))]);
    assert_eq!(post(&gw, &[], BODY).0, 200);
    assert_eq!(mock.requests().last().unwrap().key.as_deref(), Some(K1));
    // The file now lists k0 again and a new k2 instead of k1.
    std::fs::write(&file, config(&format!("\"zero={K0}\", \"two={K2}\""))).unwrap();
    gw.signal("-HUP");
    gw.wait_log("reloaded the keys");
    let before = mock.request_count();
    assert_eq!(post(&gw, &[], BODY).0, 200);
    let after: Vec<_> = mock.requests()[before..]
        .iter()
        .map(|r| r.key.clone().unwrap())
        .collect();
    // k0 kept its cooldown across the reload (not tried), k2 serves.
    assert_eq!(after, vec![K2.to_owned()]);
}

#[test]
fn sigterm_lets_a_stream_finish_and_exits_zero() {
    let mock = MockServer::start();
    mock.script(
        K0,
        [Reply::stream(
            StreamScript::new()
                .text_deltas(6)
                .chunk_delay(Duration::from_millis(60)),
        )],
    );
    let mut gw = Gateway::start(&["--upstream", &mock.url()], &[("KEYPOOL_KEYS", K0)]);
    let mut stream = TcpStream::connect(gw.addr).unwrap();
    write!(
        stream,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{STREAM_BODY}",
        STREAM_BODY.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = stream.read(&mut first).unwrap();
    assert!(n > 0);
    gw.signal("-TERM");
    gw.wait_log("shutting down");
    // New connections are refused once the listener is closed.
    assert!(TcpStream::connect(gw.addr).is_err());
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&first[..n]),
        String::from_utf8_lossy(&rest)
    );
    assert!(all.contains("event: message_stop"), "the stream completed: {all}");
    assert_eq!(gw.wait_exit(), 0);
}

#[test]
fn client_disconnect_mid_stream_cancels_upstream() {
    let mock = MockServer::start();
    mock.script(K0, [Reply::stream(StreamScript::new().ending(Ending::Stall))]);
    let gw = Gateway::start(&["--upstream", &mock.url()], &[("KEYPOOL_KEYS", K0)]);
    let mut stream = TcpStream::connect(gw.addr).unwrap();
    write!(
        stream,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{STREAM_BODY}",
        STREAM_BODY.len()
    )
    .unwrap();
    let mut buf = [0u8; 256];
    assert!(stream.read(&mut buf).unwrap() > 0);
    drop(stream);
    let outcomes = mock.wait_for_stream_outcomes(1, Duration::from_secs(10)).unwrap();
    assert_eq!(outcomes[0].end, OutcomeEnd::ClientGone);
    let (_, health) = get(&gw, "/healthz", &[]);
    assert!(health.contains("\"available\":1"), "no mark: {health}");
    // The client really went away: that is what the request line and the metric say.
    gw.wait_log("\"outcome\":\"client_gone\"");
    assert_eq!(outcome_count(&gw, "client_gone"), 1);
    assert_eq!(outcome_count(&gw, "upstream_broke"), 0);
}

/// `keypool_request_outcomes_total{pool="anthropic",outcome=...}` from `/metrics` (0 if absent).
fn outcome_count(gw: &Gateway, outcome: &str) -> u64 {
    let (_, metrics) = get(gw, "/metrics", &[]);
    let series = format!("keypool_request_outcomes_total{{pool=\"anthropic\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Sends a streaming request on a raw connection and reads the answer to its end.
fn stream_to_end(gw: &Gateway) -> String {
    let mut stream = TcpStream::connect(gw.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{STREAM_BODY}",
        STREAM_BODY.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn mid_stream_upstream_reset_is_upstream_broke_not_client_gone() {
    let mock = MockServer::start();
    let events = StreamScript::standard_events("claude-mock", 3);
    let whole: usize = events.iter().take(4).map(|e| e.to_bytes().len()).sum();
    mock.script(
        K0,
        [Reply::stream(
            StreamScript::with_events(events)
                .chunk_size(16)
                .ending(Ending::ResetAfter(whole + 9)),
        )],
    );
    let gw = Gateway::start(&["--upstream", &mock.url()], &[("KEYPOOL_KEYS", K0)]);
    let answer = stream_to_end(&gw);
    // The client was there to the end: it got the whole events and keypool's error event.
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("event: error"), "{answer}");
    assert!(answer.contains("the upstream connection was reset"), "{answer}");
    gw.wait_log("\"outcome\":\"upstream_broke\"");
    assert_eq!(outcome_count(&gw, "upstream_broke"), 1);
    assert_eq!(outcome_count(&gw, "client_gone"), 0);
    assert_eq!(outcome_count(&gw, "complete"), 0);
    assert!(!gw.logs().contains("client_gone"), "{}", gw.logs());
}

#[test]
fn in_band_error_after_content_is_counted_as_upstream_error() {
    let mock = MockServer::start();
    mock.script(
        K0,
        [Reply::stream(StreamScript::error_after_content(
            2,
            "overloaded_error",
            "Overloaded",
        ))],
    );
    let gw = Gateway::start(&["--upstream", &mock.url()], &[("KEYPOOL_KEYS", K0)]);
    let answer = stream_to_end(&gw);
    assert!(answer.contains("overloaded_error"), "{answer}");
    gw.wait_log("\"outcome\":\"upstream_error\"");
    assert_eq!(outcome_count(&gw, "upstream_error"), 1);
}

#[test]
fn oversized_bodies_get_413_without_reaching_upstream() {
    let mock = MockServer::start();
    let gw = Gateway::start(
        &["--upstream", &mock.url(), "--max-body", "1KiB"],
        &[("KEYPOOL_KEYS", K0)],
    );
    let big = "x".repeat(4096);
    let (s, b) = post(&gw, &[], &big);
    assert_eq!(s, 413, "{b}");
    assert!(b.contains("request_too_large"));
    // Chunked, no content-length: cut off at the limit, not buffered whole.
    let mut stream = TcpStream::connect(gw.addr).unwrap();
    stream
        .write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        .unwrap();
    for _ in 0..8 {
        let _ = stream.write_all(b"200\r\n");
        let _ = stream.write_all(&[b'y'; 512]);
        let _ = stream.write_all(b"\r\n");
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(mock.request_count(), 0);
    let (s, b) = get(&gw, "/nope", &[]);
    assert_eq!(s, 404);
    assert!(b.contains("not_found_error"));
}

#[test]
fn demo_runs_without_network_or_keys() {
    let out = Command::new(bin())
        .arg("demo")
        .env_remove("KEYPOOL_KEYS")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("alpha -> bravo"), "{stdout}");
    assert!(stdout.contains("cooling"), "{stdout}");
    assert!(stdout.contains("disabled"), "{stdout}");
    assert!(stdout.contains("429 retry-after"), "{stdout}");
}

#[test]
fn request_log_line_says_complete_for_a_whole_response() {
    let mock = MockServer::start();
    let gw = Gateway::start(&["--upstream", &mock.url()], &[("KEYPOOL_KEYS", K0)]);
    let (s, _) = post(&gw, &[], BODY);
    assert_eq!(s, 200);
    gw.wait_log("\"outcome\":\"complete\"");
    assert!(
        !gw.logs().contains("\"outcome\":\"client_gone\""),
        "{}",
        gw.logs()
    );
    assert_eq!(outcome_count(&gw, "complete"), 1);
}

/// A relayed answer's request line is left to its connection, to be written after the response
/// (README, issue 21 step 16): it must come while the connection stays open, once per request.
#[test]
fn relayed_requests_are_logged_while_their_keep_alive_connection_stays_open() {
    let mock = MockServer::start();
    let gw = Gateway::start(&["--upstream", &mock.url()], &[("KEYPOOL_KEYS", K0)]);
    let mut stream = TcpStream::connect(gw.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for n in 1..=2 {
        write!(
            stream,
            "POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        )
        .unwrap();
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        // The connection is still open: the line must not wait for it to close.
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.logs().matches("\"outcome\":\"complete\"").count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no request line for request {n}:\n{}", gw.logs());
            let _ = gw.events.recv_timeout(left);
        }
    }
    assert_eq!(gw.logs().matches("\"outcome\":\"complete\"").count(), 2);
    assert_eq!(mock.request_count(), 2);
}

#[test]
fn serves_h2c_prior_knowledge_clients() {
    use http_body_util::{BodyExt, Full};
    let mock = MockServer::start();
    let gw = Gateway::start(&["--upstream", &mock.url()], &[("KEYPOOL_KEYS", K0)]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = gw.url("/v1/messages");
    let (version, status, body) = rt.block_on(async move {
        let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http();
        let req = http::Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from_static(BODY.as_bytes())))
            .unwrap();
        let res = client.request(req).await.unwrap();
        let version = res.version();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        // The request line is written once the response is out, while the connection (kept
        // by this client) stays open.
        gw.wait_log("\"outcome\":\"complete\"");
        (version, status, body)
    });
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(status, 200);
    assert!(
        std::str::from_utf8(&body)
            .unwrap()
            .contains("\"type\":\"message\"")
    );
    assert_eq!(mock.request_count(), 1);
}

#[test]
fn mock_upstream_command_serves_a_scenario_and_the_gateway_fails_over_through_it() {
    let dir = std::env::temp_dir().join(format!("keypool-e2e-{}-mock", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenario = dir.join("scenario.toml");
    std::fs::write(
        &scenario,
        format!(
            "[keys.\"{K0}\"]\nscript = [{{ status = 429, retry_after = {{ seconds = \"30\" }}, body = {{ type = \"error\", error_type = \"rate_limit_error\" }} }}]\n"
        ),
    )
    .unwrap();
    let ca = dir.join("ca.pem");
    let mut mock = Command::new(bin())
        .args([
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--scenario",
        ])
        .arg(&scenario)
        .arg("--write-ca")
        .arg(&ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(mock.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // "mock Anthropic API: http://127.0.0.1:PORT (plain), https://localhost:PORT (TLS)"
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_owned();
    assert!(
        std::fs::read_to_string(&ca)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let keys = format!("{K0},{K1}");
    let gw = Gateway::start(&["--upstream", &url], &[("KEYPOOL_KEYS", &keys)]);
    let (s, body) = post(&gw, &[], BODY);
    assert_eq!(s, 200, "{body}");
    let (_, health) = get(&gw, "/healthz", &[]);
    assert!(
        health.contains("\"available\":1"),
        "k0 cools after the scripted 429: {health}"
    );
    let _ = mock.kill();
    let _ = mock.wait();
}
