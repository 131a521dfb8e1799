//! A `keypool serve` child process for the fault and soak tests: started on 127.0.0.1:0 with
//! `RUST_LOG=trace` and JSON logs, its stderr collected, killed on drop. Plus a tiny raw HTTP/1.1
//! client, memory readings from `/proc`, and the secret check.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The admin token every test gateway gets.
pub const ADMIN: &str = "admin-token-faults-Qp3Lm8Zx2Wv7";

/// Keys with long, distinct secrets (so that any leak of more than a hint is caught).
pub fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sk-ant-api03-faults{i}-{}", "Hj4Kq9Ws2Ty".repeat(4)))
        .collect()
}

/// A running gateway.
pub struct Gateway {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    events: Receiver<String>,
}

impl Gateway {
    /// Starts `keypool serve` in front of `upstream` with these keys and extra flags.
    pub fn start(upstream: &str, keys: &[String], extra: &[&str]) -> Self {
        Self::start_with_env(upstream, keys, extra, &[])
    }

    /// [`start`](Self::start) with extra environment variables.
    pub fn start_env(upstream: &str, keys: &[String], extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with_env(upstream, keys, extra, env)
    }

    /// As [`Gateway::start`], with extra environment variables.
    pub fn start_with_env(upstream: &str, keys: &[String], extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keypool"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--log-format", "json", "--grace", "2s"])
            .args(["--upstream", upstream, "--admin-token", ADMIN])
            .args(extra)
            .env("KEYPOOL_KEYS", keys.join(","))
            .env_remove("KEYPOOL_CLIENT_TOKENS")
            .env_remove("KEYPOOL_ADMIN_TOKEN")
            .env("RUST_LOG", "trace")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, events) = channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                sink.lock().unwrap().push(line);
            }
        });
        let mut gw = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines,
            events,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        gw.addr = loop {
            let line = gw
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the gateway did not start");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(listen) = v["fields"]["listen"].as_str()
            {
                break listen.parse().unwrap();
            }
        };
        gw
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the gateway exited: {status}\n{}", self.tail());
        }
    }

    /// Every log line so far.
    pub fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits (bounded) for a log line containing every needle.
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) {
        let matches = |l: &str| needles.iter().all(|n| l.contains(n));
        if self.lines.lock().unwrap().iter().any(|l| matches(l)) {
            return;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) if matches(&line) => return,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needles:?} within {timeout:?}"),
            }
        }
    }

    /// `VmRSS` (now) and `VmHWM` (peak) in KiB, from `/proc/PID/status`.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Open file descriptors of the gateway process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A raw connection to the gateway, with read and write timeouts.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// One request on a fresh connection (`connection: close`); the status and the body.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let mut s = self.connect();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let response = parse_response(&raw).unwrap_or_else(|| panic!("bad response: {raw:?}"));
        (
            response.status,
            String::from_utf8_lossy(&response.body).into_owned(),
        )
    }

    /// `GET` with the admin token.
    pub fn admin_get(&self, path: &str) -> String {
        let (status, body) = self.request("GET", path, &[("x-api-key", ADMIN)], b"");
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// A normal pooled `POST /v1/messages`.
    pub fn message(&self, stream: bool) -> (u16, String) {
        self.request(
            "POST",
            "/v1/messages",
            &[("content-type", "application/json")],
            message_body(stream).as_bytes(),
        )
    }

    /// Logs, metrics and admin output must hold no secret material; no panic was logged.
    pub fn assert_no_secret(&self, secrets: &[String], also: &[&str]) {
        let mut texts = vec![
            self.logs(),
            self.admin_get("/metrics"),
            self.admin_get("/admin/keys"),
        ];
        texts.extend(also.iter().map(|s| (*s).to_owned()));
        for text in &texts {
            assert!(!text.contains("panicked"), "a panic: {text}");
            assert_no_secret(text, secrets);
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails if any piece of a secret one character longer than its hint (SPEC §2) appears in
/// `text`.
pub fn assert_no_secret(text: &str, secrets: &[String]) {
    for secret in secrets {
        let hint = keypool_core::Secret::new(secret.as_str()).unwrap().hint().len();
        let window = (hint + 1).min(secret.len());
        for start in 0..=secret.len() - window {
            let piece = &secret[start..start + window];
            assert!(!text.contains(piece), "secret material {}… leaked", &piece[..3]);
        }
    }
}

/// The JSON of a `POST /v1/messages`.
pub fn message_body(stream: bool) -> String {
    format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":16,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Response {
    /// The status.
    pub status: u16,
    /// Lower-cased header names and values.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked (as far as it came).
    pub body: Vec<u8>,
    /// Whether the body ended per its framing (final chunk, full length, or EOF for neither).
    pub complete: bool,
}

/// Parses a whole HTTP/1.1 response as read until EOF; `None` if the head is incomplete.
pub fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let mut rest = &raw[end + 4..];
    let mut body = Vec::new();
    let complete;
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
                complete = false;
                break;
            };
            let size = std::str::from_utf8(&rest[..line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                complete = true;
                break;
            }
            if rest.len() < size + 2 {
                body.extend_from_slice(&rest[..size.min(rest.len())]);
                complete = false;
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.extend_from_slice(&rest[..len.min(rest.len())]);
        complete = rest.len() >= len;
    } else {
        body.extend_from_slice(rest);
        complete = true;
    }
    Some(Response {
        status,
        headers,
        body,
        complete,
    })
}

/// The soft limit on open files of this process (`Max open files` in `/proc/self/limits`).
pub fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}
