//! `gateway-bench`: the keypool gateway measured side by side with a bare hyper forwarder and
//! the upstream itself, in one run on one machine (issue #9, DESIGN.md "Benchmarks").
//!
//! ```text
//! cargo build --release -p keypool-gateway -p keypool-bench
//! target/release/gateway-bench [--quick] [--json PATH] [--keypool PATH] [--streams N]
//! ```
//!
//! It starts three processes: the upstream (`keypool_bench::upstream`, this executable in
//! another role), the bare forwarder (`keypool_bench::forwarder`, the `bare-forwarder`
//! executable next to this one) and `keypool serve` (default: `keypool` next to this
//! executable, i.e. the same cargo profile). The forwarder runs from an executable of its own,
//! like the gateway, so that neither shares code pages (the tokio runtime, hyper, http) with
//! the upstream and the load client, which run this one. Every measurement
//! runs the three paths — direct to the upstream, through the bare forwarder, through the
//! gateway — in interleaved rounds (the order rotates each round), after a warm-up that is not
//! counted. Nothing is hard-coded: every figure in the table is measured in this run.

// A benchmark binary: failing loudly on a broken invariant is what it should do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keypool_bench::upstream::{
    FAIL_FIRST_HEADER, KEY_INDEX_HEADER, KEYS, STALL_HEADER, STREAM_HEADER, wall_nanos,
};
use serde_json::json;
use tokio::task::JoinSet;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const REQUEST_BODY: &str = r#"{"model":"claude-bench","max_tokens":64,"messages":[{"role":"user","content":"Hello, how are you today?"}]}"#;
/// Longest wait for any single response or body frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The open-loop load never has more requests than this in flight (beyond: counted as errors).
const MAX_IN_FLIGHT: usize = 1024;

/// Sizes of one run.
#[derive(Debug, Clone)]
struct Plan {
    warmup: usize,
    rounds: usize,
    c1_per_round: usize,
    c32_per_round: usize,
    rates: Vec<u32>,
    rate_step: Duration,
    ttfe_per_round: usize,
    stream_events: u64,
    stream_interval_us: u64,
    failover_per_round: usize,
    failover_spacing: Duration,
    open_streams: usize,
    cpu_rounds: usize,
    cpu_per_round: usize,
}

impl Plan {
    fn full(open_streams: usize) -> Self {
        Self {
            warmup: 1000,
            rounds: 8,
            c1_per_round: 1000,
            c32_per_round: 4000,
            rates: vec![
                1000, 2000, 3000, 4000, 5000, 6000, 8000, 10_000, 12_000, 15_000, 20_000,
            ],
            rate_step: Duration::from_millis(1000),
            ttfe_per_round: 50,
            stream_events: 250,
            stream_interval_us: 2000,
            failover_per_round: 100,
            failover_spacing: Duration::from_millis(3),
            open_streams,
            cpu_rounds: 12,
            cpu_per_round: 15_000,
        }
    }

    fn quick() -> Self {
        Self {
            warmup: 20,
            rounds: 1,
            c1_per_round: 50,
            c32_per_round: 320,
            rates: vec![500, 1000],
            rate_step: Duration::from_millis(100),
            ttfe_per_round: 10,
            stream_events: 20,
            stream_interval_us: 1000,
            failover_per_round: 10,
            failover_spacing: Duration::from_millis(3),
            open_streams: 50,
            cpu_rounds: 1,
            cpu_per_round: 500,
        }
    }
}

/// The three ways to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct = 0,
    Bare = 1,
    Gateway = 2,
}

const ALL: [Via; 3] = [Via::Direct, Via::Bare, Via::Gateway];

/// The paths of a round, rotated so that no path always runs first.
fn order(round: usize) -> [Via; 3] {
    let mut o = ALL;
    o.rotate_left(round % 3);
    o
}

/// Whether the round-2 gateway runs right before the gateway in this round (else right after
/// it). The two alternate because the one that runs second runs the binary its twin has just
/// run: while the round-2 gateway always ran second it came out below the gateway in most
/// target rows though it does more work (README, "the order of the benchmark itself").
fn round2_first(round: usize) -> bool {
    round % 2 == 1
}

/// A child process, killed and reaped when dropped (also on panic).
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command, addr: SocketAddr) -> Result<Self, String> {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let mut proc = Self { name, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if StdStream::connect(addr).is_ok() {
                return Ok(proc);
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Err(format!("{name} exited before listening on {addr}: {status}"));
            }
            if Instant::now() > deadline {
                return Err(format!("{name} did not listen on {addr} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.name;
    }
}

fn free_addr() -> Result<SocketAddr, String> {
    let listener = StdListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener.local_addr().map_err(|e| e.to_string())
}

/// Resident set size of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After the command name: field 3 (state) is index 0; utime is field 14, stime field 15.
    field(11) + field(12)
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "?".into())
}

/// What is sent on one request besides the JSON body.
#[derive(Debug, Clone, Copy, Default)]
struct Extra {
    stream: Option<(u64, u64)>,
    stall: bool,
    fail_first: bool,
}

fn request(uri: &Uri, extra: Extra) -> Request<Full<Bytes>> {
    let mut builder = Request::post(uri.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header("anthropic-version", "2023-06-01")
        // The gateway strips client credentials in loopback mode; direct and bare send this key.
        .header("x-api-key", KEYS[1]);
    if let Some((n, us)) = extra.stream {
        builder = builder.header(STREAM_HEADER, format!("{n},{us}"));
    }
    if extra.stall {
        builder = builder.header(STALL_HEADER, "1");
    }
    if extra.fail_first {
        builder = builder.header(FAIL_FIRST_HEADER, "1");
    }
    builder
        .body(Full::new(Bytes::from_static(REQUEST_BODY.as_bytes())))
        .unwrap()
}

/// One non-streaming request, body read to its end: its latency and the serving key index.
async fn one(client: &HttpClient, uri: &Uri, extra: Extra) -> Result<(Duration, Option<u8>), String> {
    let started = Instant::now();
    let work = async {
        let response = client
            .request(request(uri, extra))
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let key = response
            .headers()
            .get(KEY_INDEX_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?;
        if !status.is_success() || body.to_bytes().is_empty() {
            return Err(format!("status {status}"));
        }
        Ok(key)
    };
    let key = tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| "timed out".to_owned())??;
    Ok((started.elapsed(), key))
}

/// Latencies (ns) and error count.
#[derive(Debug, Default, Clone)]
struct Samples {
    ns: Vec<u64>,
    errors: usize,
}

impl Samples {
    fn add(&mut self, other: Self) {
        self.ns.extend(other.ns);
        self.errors += other.errors;
    }
    /// The `p`-th percentile in µs (nearest rank).
    fn pct(&mut self, p: f64) -> f64 {
        if self.ns.is_empty() {
            return f64::NAN;
        }
        self.ns.sort_unstable();
        let rank = ((p / 100.0) * self.ns.len() as f64).ceil() as usize;
        self.ns[rank.clamp(1, self.ns.len()) - 1] as f64 / 1000.0
    }
}

/// `n` requests over `c` connections, each connection one request at a time.
async fn closed_loop(client: &HttpClient, uri: &Uri, c: usize, n: usize, extra: Extra) -> Samples {
    let mut set = JoinSet::new();
    for worker in 0..c {
        let count = n / c + usize::from(worker < n % c);
        let (client, uri) = (client.clone(), uri.clone());
        set.spawn(async move {
            let mut s = Samples {
                ns: Vec::with_capacity(count),
                errors: 0,
            };
            for _ in 0..count {
                match one(&client, &uri, extra).await {
                    Ok((d, _)) => s.ns.push(d.as_nanos() as u64),
                    Err(_) => s.errors += 1,
                }
            }
            s
        });
    }
    let mut all = Samples::default();
    while let Some(s) = set.join_next().await {
        all.add(s.unwrap_or(Samples {
            ns: vec![],
            errors: n,
        }));
    }
    all
}

/// Requests offered at `rate` per second for `span`, whatever the answers (latency from the
/// moment each is sent; the schedule is kept in 1 ms batches by the tokio timer).
async fn open_loop(client: &HttpClient, uri: &Uri, rate: u32, span: Duration) -> Samples {
    let n = (f64::from(rate) * span.as_secs_f64()) as usize;
    let start = tokio::time::Instant::now();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    let mut refused = 0;
    for i in 0..n {
        let at = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
        tokio::time::sleep_until(at).await;
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            refused += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, uri, in_flight) = (client.clone(), uri.clone(), in_flight.clone());
        set.spawn(async move {
            let r = one(&client, &uri, Extra::default()).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            r.map(|(d, _)| d.as_nanos() as u64)
        });
    }
    let mut all = Samples {
        ns: Vec::with_capacity(n),
        errors: refused,
    };
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(ns)) => all.ns.push(ns),
            _ => all.errors += 1,
        }
    }
    all
}

/// One timed stream: time to first event and, per delta, arrival wall time − the upstream's
/// send wall time (ns).
async fn stream_once(
    client: &HttpClient,
    uri: &Uri,
    events: u64,
    interval_us: u64,
) -> Result<(u64, Vec<i64>), String> {
    let started = Instant::now();
    let extra = Extra {
        stream: Some((events, interval_us)),
        ..Extra::default()
    };
    let work = async {
        let response = client
            .request(request(uri, extra))
            .await
            .map_err(|e| e.to_string())?;
        let is_sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if !response.status().is_success() || !is_sse {
            return Err(format!("status {}", response.status()));
        }
        let mut body = response.into_body();
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut first = None;
        let mut delays = Vec::with_capacity(events as usize);
        let mut stopped = false;
        while let Some(frame) = tokio::time::timeout(REQUEST_TIMEOUT, body.frame())
            .await
            .map_err(|_| "stream timed out".to_owned())?
        {
            let frame = frame.map_err(|e| e.to_string())?;
            let Ok(data) = frame.into_data() else { continue };
            let wall = wall_nanos();
            let arrived = started.elapsed();
            buf.extend_from_slice(&data);
            let mut from = 0;
            while let Some(end) = find(&buf[from..], b"\n\n") {
                let event = &buf[from..from + end];
                from += end + 2;
                first.get_or_insert(arrived);
                if event.starts_with(b"event: content_block_delta") {
                    let sent = number_after(event, b"\"t\":").ok_or("event without t")?;
                    delays.push((wall as i128 - sent as i128) as i64);
                } else if event.starts_with(b"event: message_stop") {
                    stopped = true;
                } else if event.starts_with(b"event: error") {
                    return Err("error event".into());
                }
            }
            buf.drain(..from);
        }
        if !stopped || delays.len() as u64 != events {
            return Err(format!("stream incomplete: {} of {events} deltas", delays.len()));
        }
        Ok((first.unwrap_or_default().as_nanos() as u64, delays))
    };
    tokio::time::timeout(REQUEST_TIMEOUT * 4, work)
        .await
        .map_err(|_| "stream timed out".to_owned())?
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn number_after(event: &[u8], key: &[u8]) -> Option<u128> {
    let at = find(event, key)? + key.len();
    let digits = event[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&event[at..at + digits]).ok()?.parse().ok()
}

/// Opens `n` streams that stall after their first delta; returns the open bodies once every one
/// has delivered that delta.
async fn open_stalled(client: &HttpClient, uri: &Uri, n: usize) -> Result<Vec<Incoming>, String> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (client, uri) = (client.clone(), uri.clone());
        set.spawn(async move {
            let extra = Extra {
                stream: Some((1, 0)),
                stall: true,
                ..Extra::default()
            };
            let work = async {
                let response = client
                    .request(request(&uri, extra))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut body = response.into_body();
                let mut seen = Vec::new();
                while find(&seen, b"content_block_delta").is_none() {
                    let frame = body.frame().await.ok_or("ended")?.map_err(|e| e.to_string())?;
                    if let Ok(data) = frame.into_data() {
                        seen.extend_from_slice(&data);
                    }
                }
                Ok::<_, String>(body)
            };
            tokio::time::timeout(REQUEST_TIMEOUT * 2, work)
                .await
                .map_err(|_| "stalled stream did not start".to_owned())?
        });
    }
    let mut bodies = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        bodies.push(r.map_err(|e| e.to_string())??);
    }
    Ok(bodies)
}

/// One line of the table.
#[derive(Debug, Clone)]
struct Row {
    metric: String,
    unit: &'static str,
    values: [Option<f64>; 3],
    ratio: String,
    target: String,
    met: Option<bool>,
    /// The gateway in its round-2 configuration (state on Redis, two pools, organisations
    /// learnt, hints on): its figure, ratio and verdict against the same target.
    round2: Option<(f64, String, Option<bool>)>,
}

impl Row {
    fn new(metric: impl Into<String>, unit: &'static str, values: [Option<f64>; 3]) -> Self {
        Self {
            metric: metric.into(),
            unit,
            values,
            ratio: "-".into(),
            target: "-".into(),
            met: None,
            round2: None,
        }
    }
    fn judge(mut self, ratio: String, target: impl Into<String>, met: Option<bool>) -> Self {
        self.ratio = ratio;
        self.target = target.into();
        self.met = met;
        self
    }
}

/// Added latency of the round-2 gateway `r` over the bare forwarder's: the same ratio and target.
fn with_round2_added(row: Row, r: Option<f64>, judged: bool) -> Row {
    let (Some(r), Some(d), Some(b)) = (r, row.values[0], row.values[1]) else {
        return row;
    };
    let (ra, ba) = (r - d, b - d);
    let ratio = format!("{:.2}× (+{ra:.1} vs +{ba:.1})", ra / ba);
    Row {
        round2: Some((r, ratio, judged.then_some(ra <= 1.25 * ba))),
        ..row
    }
}

/// Added latency of the gateway over the bare forwarder's, both over direct: the ratio column
/// and the 1.25× target.
fn added_row(metric: String, d: f64, b: f64, g: f64, judged: bool) -> Row {
    let (ga, ba) = (g - d, b - d);
    let row = Row::new(metric, "µs", [Some(d), Some(b), Some(g)]);
    let ratio = format!("{:.2}× (+{ga:.1} vs +{ba:.1})", ga / ba);
    if judged {
        row.judge(ratio, "added ≤ 1.25× bare's", Some(ga <= 1.25 * ba))
    } else {
        row.judge(ratio, "-", None)
    }
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.is_nan() => "n/a".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

struct Env {
    client: HttpClient,
    uris: [Uri; 3],
    pids: [u32; 3],
    /// The round-2 gateway: its URI and process id.
    round2: Option<(Uri, u32)>,
}

impl Env {
    fn uri(&self, via: Via) -> &Uri {
        &self.uris[via as usize]
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Role: this executable also runs the upstream as a child process.
    if args.get(1).map(String::as_str) == Some("--role-upstream") {
        return upstream_role(args.get(2).map(|a| a.parse()));
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn upstream_role(listen: Option<Result<SocketAddr, std::net::AddrParseError>>) -> ExitCode {
    let Some(Ok(listen)) = listen else {
        return ExitCode::from(2);
    };
    match keypool_bench::upstream::run(listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

const USAGE: &str =
    "usage: gateway-bench [--quick] [--json PATH] [--keypool PATH] [--streams N] [--no-round2]

The gateway column runs `keypool serve` with its defaults and one pool; the round-2 column
(unless --no-round2) runs a second `keypool serve` with shared state on a redis-server this
tool starts on 127.0.0.1 (redis-server must be installed), an Anthropic and an OpenAI pool,
organisations learnt from the answers and rate-limit hints on. Afterwards it runs the sibling
`state-bench` for the multi-replica figures.";

fn run(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = keypool_bench::flag(args, "--json").map(PathBuf::from);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let keypool = keypool_bench::flag(args, "--keypool")
        .map(PathBuf::from)
        .unwrap_or_else(|| exe.with_file_name("keypool"));
    if !keypool.exists() {
        return Err(format!(
            "{} not found: build the gateway in the same profile first (cargo build [--release] -p \
             keypool-gateway) or pass --keypool PATH",
            keypool.display()
        ));
    }
    let bare_forwarder = exe.with_file_name("bare-forwarder");
    if !bare_forwarder.exists() {
        return Err(format!(
            "{} not found: build the benchmark tools in the same profile first (cargo build \
             [--release] -p keypool-bench)",
            bare_forwarder.display()
        ));
    }
    let streams = match keypool_bench::flag(args, "--streams") {
        Some(n) => n
            .parse()
            .map_err(|_| format!("{USAGE}\n--streams {n}: not a number"))?,
        None => 1000,
    };
    let plan = if quick { Plan::quick() } else { Plan::full(streams) };
    let load_before = loadavg();
    let run_started = Instant::now();

    let upstream_addr = free_addr()?;
    let bare_addr = free_addr()?;
    let gateway_addr = free_addr()?;
    let upstream_url = format!("http://{upstream_addr}");
    let upstream = Proc::spawn(
        "upstream",
        Command::new(&exe)
            .arg("--role-upstream")
            .arg(upstream_addr.to_string()),
        upstream_addr,
    )?;
    let bare = Proc::spawn(
        "bare forwarder",
        Command::new(&bare_forwarder).args(["--listen", &bare_addr.to_string(), "--upstream", &upstream_url]),
        bare_addr,
    )?;
    let gateway = Proc::spawn(
        "keypool serve",
        Command::new(&keypool)
            .args([
                "serve",
                "--listen",
                &gateway_addr.to_string(),
                "--upstream",
                &upstream_url,
            ])
            .args(["--grace", "1s"])
            .env("KEYPOOL_KEYS", KEYS.join(","))
            .env_remove("RUST_LOG")
            .env_remove("KEYPOOL_LISTEN")
            .env_remove("KEYPOOL_UPSTREAM"),
        gateway_addr,
    )?;
    // The round-2 configuration: shared state on Redis, both pools, the same upstream (which
    // names an organisation and sends rate-limit headers on every answer).
    let round2_wanted = !args.iter().any(|a| a == "--no-round2");
    let redis = round2_wanted.then(keypool_redis::testing::RedisServer::start);
    let round2_addr = free_addr()?;
    let round2 = match &redis {
        Some(redis) => Some(Proc::spawn(
            "keypool serve (round 2)",
            Command::new(&keypool)
                .args([
                    "serve",
                    "--listen",
                    &round2_addr.to_string(),
                    "--upstream",
                    &upstream_url,
                    "--openai-upstream",
                    &upstream_url,
                    "--state",
                    &redis.url(),
                ])
                .args(["--grace", "1s"])
                .env("KEYPOOL_KEYS", KEYS.join(","))
                .env("KEYPOOL_OPENAI_KEYS", KEYS.join(","))
                .env_remove("RUST_LOG")
                .env_remove("KEYPOOL_LISTEN")
                .env_remove("KEYPOOL_UPSTREAM")
                .env_remove("KEYPOOL_OPENAI_UPSTREAM"),
            round2_addr,
        )?),
        None => None,
    };
    std::thread::sleep(Duration::from_millis(200));
    let idle_start = [None, Some(rss(bare.pid())), Some(rss(gateway.pid()))];

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let uri = |a: SocketAddr| -> Uri { format!("http://{a}/v1/messages").parse().unwrap() };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let env = Env {
        client: Client::builder(TokioExecutor::new()).build(connector),
        uris: [uri(upstream_addr), uri(bare_addr), uri(gateway_addr)],
        pids: [upstream.pid(), bare.pid(), gateway.pid()],
        round2: round2.as_ref().map(|p| (uri(round2_addr), p.pid())),
    };
    if let Some((uri, _)) = &env.round2 {
        // Ready once the shared state has been read (`/healthz` answers 503 until then).
        let health: Uri = uri
            .to_string()
            .replace("/v1/messages", "/healthz")
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = runtime.block_on(async {
                let request = Request::get(health.clone())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                matches!(env.client.request(request).await, Ok(r) if r.status().is_success())
            });
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err("the round-2 gateway did not read its shared state within 10 s".into());
            }
            runtime.block_on(tokio::time::sleep(Duration::from_millis(20)));
        }
    }
    let mut rows = runtime.block_on(measure(&env, &plan, quick))?;

    // Memory rows come from outside the async measurement (idle-at-start was read above).
    let mib = |b: Option<u64>| b.map(|b| b as f64 / (1024.0 * 1024.0));
    let idle_row = |name: &str, v: [Option<u64>; 3]| {
        let g = mib(v[2]).unwrap_or(f64::NAN);
        Row::new(name, "MiB", [None, mib(v[1]), mib(v[2])]).judge(
            format!("{:.2}× bare", g / mib(v[1]).unwrap_or(f64::NAN)),
            "≤ 15 MiB",
            Some(g <= 15.0),
        )
    };
    // Idle after the load: the client's keep-alive connections are closed first (dropping the
    // client and its runtime), as they would be once clients went away; then 2.5 s without
    // traffic, in which keypool gives freed heap memory back to the OS.
    drop(env);
    drop(runtime);
    std::thread::sleep(if quick {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(2500)
    });
    let idle_after = [None, Some(rss(bare.pid())), Some(rss(gateway.pid()))];
    // Informational: what stays is mostly the pooled idle upstream connections the load opened
    // (hyper-util keeps them 90 s), in both forwarders; the idle target is the row above.
    let after = idle_row("RSS idle, after the load (client connections closed)", idle_after);
    rows.insert(
        rows.len() - 2,
        Row {
            target: "-".into(),
            met: None,
            ..after
        },
    );
    rows.insert(rows.len() - 3, idle_row("RSS idle, after start", idle_start));
    drop(round2);
    drop(redis);
    drop(gateway);
    drop(bare);
    drop(upstream);
    let load_after = loadavg();
    let elapsed = run_started.elapsed();

    let headers = [
        "metric",
        "unit",
        "direct",
        "bare fwd",
        "gateway",
        "ratio",
        "target",
        "met?",
        "gateway, round 2",
        "ratio",
        "met?",
    ];
    let verdict = |met: Option<bool>| match met {
        Some(true) => "yes".to_owned(),
        Some(false) => "NO".to_owned(),
        None => "-".to_owned(),
    };
    let table: Vec<[String; 11]> = rows
        .iter()
        .map(|r| {
            let (r2, r2_ratio, r2_met) = match &r.round2 {
                Some((v, ratio, met)) => (fmt_value(Some(*v)), ratio.clone(), verdict(*met)),
                None => ("-".into(), "-".into(), "-".into()),
            };
            [
                r.metric.clone(),
                r.unit.to_owned(),
                fmt_value(r.values[0]),
                fmt_value(r.values[1]),
                fmt_value(r.values[2]),
                r.ratio.clone(),
                r.target.clone(),
                verdict(r.met),
                r2,
                r2_ratio,
                r2_met,
            ]
        })
        .collect();
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!(
        "gateway-bench{}: {nproc} CPUs ({}), load average {load_before} before, {load_after} after; {:.1} s",
        if quick { " --quick" } else { "" },
        cpu_model(),
        elapsed.as_secs_f64()
    );
    println!();
    print_markdown(&headers, &table);

    if let Some(path) = json_path {
        let rows_json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let v = |x: Option<f64>| x.filter(|x| x.is_finite());
                json!({
                    "metric": r.metric, "unit": r.unit,
                    "direct": v(r.values[0]), "bare": v(r.values[1]), "gateway": v(r.values[2]),
                    "ratio": r.ratio, "target": r.target, "met": r.met,
                    "round2": r.round2.as_ref().map(|(v, ratio, met)| json!({"value": v, "ratio": ratio, "met": met})),
                })
            })
            .collect();
        let doc = json!({
            "quick": quick,
            "nproc": nproc,
            "cpu_model": cpu_model(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "seconds": elapsed.as_secs_f64(),
            "keypool": keypool.display().to_string(),
            "plan": format!("{plan:?}"),
            "rows": rows_json,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        write(&path, &text)?;
    }
    if round2_wanted {
        // The multi-replica figures (mark propagation, 429s with three replicas) come from
        // state-bench, built next to this tool.
        let state_bench = exe.with_file_name("state-bench");
        println!();
        let status = Command::new(&state_bench)
            .args(quick.then_some("--quick"))
            .status()
            .map_err(|e| format!("cannot run {}: {e}", state_bench.display()))?;
        if !status.success() {
            return Err(format!("{} failed: {status}", state_bench.display()));
        }
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn print_markdown<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    let mut width = headers.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    line(width.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        line(row.to_vec());
    }
}

async fn measure(env: &Env, plan: &Plan, quick: bool) -> Result<Vec<Row>, String> {
    let client = &env.client;
    let mut rows = Vec::new();
    let mut errors_total = 0usize;

    // Warm-up (not counted): connections, allocator, caches.
    for via in ALL {
        let s = closed_loop(client, env.uri(via), 32, plan.warmup, Extra::default()).await;
        if s.errors > 0 {
            return Err(format!(
                "warm-up via {via:?}: {} of {} requests failed",
                s.errors, plan.warmup
            ));
        }
        let _ = closed_loop(client, env.uri(via), 1, plan.warmup / 4, Extra::default()).await;
    }

    // Memory per open stream, measured first: after the high-concurrency phases below the
    // allocator already holds room for many connections, and new streams would cost no RSS.
    let mut per_stream = [None; 3];
    for via in [Via::Bare, Via::Gateway] {
        let pid = env.pids[via as usize];
        let before = rss(pid);
        let bodies = open_stalled(client, env.uri(via), plan.open_streams).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let with = rss(pid);
        drop(bodies);
        per_stream[via as usize] = Some((with as f64 - before as f64) / plan.open_streams as f64 / 1024.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Non-streaming latency at c=1 and c=32.
    for (c, per_round) in [(1, plan.c1_per_round), (32, plan.c32_per_round)] {
        let mut s: [Samples; 3] = Default::default();
        let mut r2 = Samples::default();
        for round in 0..plan.rounds {
            for via in order(round) {
                // The round-2 gateway next to the gateway, so both see the same machine (see
                // `round2_first`).
                let r2_uri = env
                    .round2
                    .as_ref()
                    .filter(|_| via == Via::Gateway)
                    .map(|(uri, _)| uri);
                if let Some(uri) = r2_uri.filter(|_| round2_first(round)) {
                    r2.add(closed_loop(client, uri, c, per_round, Extra::default()).await);
                }
                s[via as usize].add(closed_loop(client, env.uri(via), c, per_round, Extra::default()).await);
                if let Some(uri) = r2_uri.filter(|_| !round2_first(round)) {
                    r2.add(closed_loop(client, uri, c, per_round, Extra::default()).await);
                }
            }
        }
        errors_total += r2.errors;
        for (via, x) in ALL.iter().zip(&s) {
            errors_total += x.errors;
            if x.errors > 0 {
                eprintln!("non-streaming c={c} via {via:?}: {} errors", x.errors);
            }
        }
        for p in [50.0, 90.0, 99.0] {
            let [d, b, g] = [s[0].pct(p), s[1].pct(p), s[2].pct(p)];
            let row = added_row(
                format!("non-streaming c={c}, latency p{p:.0}"),
                d,
                b,
                g,
                p != 90.0,
            );
            let r = env.round2.is_some().then(|| r2.pct(p));
            rows.push(with_round2_added(row, r, p != 90.0));
        }
    }

    // Highest offered rate with p99 < 5 ms and no errors.
    let mut best: [Option<u32>; 3] = [None; 3];
    let mut alive = [true; 3];
    for (step, &rate) in plan.rates.iter().enumerate() {
        for via in order(step) {
            if !alive[via as usize] {
                continue;
            }
            let mut s = open_loop(client, env.uri(via), rate, plan.rate_step).await;
            if s.errors == 0 && s.pct(99.0) < 5000.0 {
                best[via as usize] = Some(rate);
            } else {
                alive[via as usize] = false;
            }
            // Let the queues drain before the next path.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let top = plan.rates.last().copied().unwrap_or(0);
    let rate_value = |r: Option<u32>| Some(r.map_or(0.0, f64::from));
    let capped = best.contains(&Some(top));
    rows.push(
        Row::new(
            if capped {
                format!("max rate, p99 < 5 ms, 0 errors (≥ means the top step {top}/s passed)")
            } else {
                "max rate, p99 < 5 ms, 0 errors".to_owned()
            },
            "req/s",
            best.map(rate_value),
        )
        .judge(
            match (best[1], best[2]) {
                (Some(bare), Some(gateway)) => format!("{:.2}× bare", f64::from(gateway) / f64::from(bare)),
                // No step passed for the forwarder (or for the gateway): there is no ratio.
                (None, _) => "- (no step passed for bare)".to_owned(),
                (Some(_), None) => "- (no step passed for the gateway)".to_owned(),
            },
            "-",
            None,
        ),
    );

    // Streaming: time to first event (short streams) and per-event delivery (paced streams).
    let mut ttfe: [Samples; 3] = Default::default();
    let mut per_event: [Samples; 3] = Default::default();
    let mut signed_min = [i64::MAX; 3];
    for round in 0..plan.rounds {
        for via in order(round) {
            for _ in 0..plan.ttfe_per_round {
                match stream_once(client, env.uri(via), 1, 0).await {
                    Ok((first, _)) => ttfe[via as usize].ns.push(first),
                    Err(_) => ttfe[via as usize].errors += 1,
                }
            }
        }
        for via in order(round) {
            match stream_once(client, env.uri(via), plan.stream_events, plan.stream_interval_us).await {
                Ok((_, delays)) => {
                    for d in delays {
                        signed_min[via as usize] = signed_min[via as usize].min(d);
                        per_event[via as usize].ns.push(d.max(0) as u64);
                    }
                }
                Err(e) => {
                    eprintln!("stream via {via:?}: {e}");
                    per_event[via as usize].errors += 1;
                }
            }
        }
    }
    for x in ttfe.iter().chain(&per_event) {
        errors_total += x.errors;
    }
    for p in [50.0, 99.0] {
        let [d, b, g] = [ttfe[0].pct(p), ttfe[1].pct(p), ttfe[2].pct(p)];
        rows.push(added_row(
            format!("streaming, time to first event p{p:.0}"),
            d,
            b,
            g,
            false,
        ));
    }
    for p in [50.0, 99.0] {
        let [d, b, g] = [per_event[0].pct(p), per_event[1].pct(p), per_event[2].pct(p)];
        let row = Row::new(
            format!(
                "streaming, event delivery (upstream write → client read) p{p:.0}, 1 event / {} µs",
                plan.stream_interval_us
            ),
            "µs",
            [Some(d), Some(b), Some(g)],
        );
        let added = g - b;
        rows.push(if p == 99.0 {
            row.judge(
                format!("+{added:.1} µs vs bare"),
                "≤ +10 µs vs bare",
                Some(added <= 10.0),
            )
        } else {
            row.judge(format!("+{added:.1} µs vs bare"), "-", None)
        });
    }

    // Failover: key 0 answers 429 (cool-down 1 ms), key 1 serves; vs the plain gateway request
    // and one direct round trip, all sent one at a time with the same spacing.
    let mut direct = Samples::default();
    let mut normal = Samples::default();
    let mut failover = Samples::default();
    let mut wrong_key = 0;
    for round in 0..plan.rounds {
        for kind in order(round) {
            for _ in 0..plan.failover_per_round {
                tokio::time::sleep(plan.failover_spacing).await;
                let (uri, extra, into) = match kind {
                    Via::Direct => (env.uri(Via::Direct), Extra::default(), &mut direct),
                    Via::Bare => (env.uri(Via::Gateway), Extra::default(), &mut normal),
                    Via::Gateway => (
                        env.uri(Via::Gateway),
                        Extra {
                            fail_first: true,
                            ..Extra::default()
                        },
                        &mut failover,
                    ),
                };
                match one(client, uri, extra).await {
                    Ok((d, key)) => {
                        if kind == Via::Gateway && key != Some(1) {
                            wrong_key += 1;
                        }
                        into.ns.push(d.as_nanos() as u64);
                    }
                    Err(_) => into.errors += 1,
                }
            }
        }
    }
    if wrong_key > 0 {
        eprintln!("failover: {wrong_key} answers did not come from key 1 (no failover happened)");
    }
    errors_total += direct.errors + normal.errors + failover.errors + wrong_key;
    for p in [50.0, 99.0] {
        let rtt = direct.pct(p);
        let plain = normal.pct(p);
        let extra = failover.pct(p) - plain;
        rows.push(
            Row::new(
                format!(
                    "failover 429 → next key: extra latency p{p:.0} (direct = one round trip; gateway = failover − plain {plain:.1})"
                ),
                "µs",
                [Some(rtt), None, Some(extra)],
            )
            .judge(
                format!("{:.2}× round trip", extra / rtt),
                format!("≤ round trip + 50 = {:.1}", rtt + 50.0),
                Some(extra <= rtt + 50.0),
            ),
        );
    }

    // CPU per request at c=8: the proxies' utime + stime; direct column: the upstream's own.
    // Each round measures every path once, back to back; a path's figure is the median of its
    // rounds, a ratio the median of the rounds' own ratios (gateway ÷ bare of the same round),
    // so that a burst of noise from the VM in one round moves neither.
    let tick_ns = 1e9 / clock_ticks_per_second() as f64;
    let per_req = |ticks: u64, served: usize| ticks as f64 * tick_ns / 1000.0 / served.max(1) as f64;
    let mut per_round: Vec<[f64; 3]> = Vec::new();
    let mut r2_per_round: Vec<f64> = Vec::new();
    for round in 0..plan.cpu_rounds {
        let mut this = [0.0; 3];
        for via in order(round) {
            let r2 = env.round2.as_ref().filter(|_| via == Via::Gateway);
            let mut measure_r2 = async |errors: &mut usize| {
                if let Some((uri, pid)) = r2 {
                    let before = cpu_ticks(*pid);
                    let s = closed_loop(client, uri, 8, plan.cpu_per_round, Extra::default()).await;
                    r2_per_round.push(per_req(cpu_ticks(*pid) - before, s.ns.len()));
                    *errors += s.errors;
                }
            };
            if round2_first(round) {
                measure_r2(&mut errors_total).await;
            }
            let pid = env.pids[via as usize];
            let before = cpu_ticks(pid);
            let s = closed_loop(client, env.uri(via), 8, plan.cpu_per_round, Extra::default()).await;
            this[via as usize] = per_req(cpu_ticks(pid) - before, s.ns.len());
            errors_total += s.errors;
            if !round2_first(round) {
                measure_r2(&mut errors_total).await;
            }
        }
        per_round.push(this);
    }
    let column = |i: usize| median(per_round.iter().map(|r| r[i]).collect());
    let cpu = [column(0), column(1), column(2)];
    let ratio = median(per_round.iter().map(|r| r[2] / r[1]).collect());
    let rounds: Vec<String> = per_round.iter().map(|r| format!("{:.2}", r[2] / r[1])).collect();
    let mut row = Row::new(
        format!(
            "CPU per request at c=8, median of {} interleaved rounds (direct column: the upstream's own)",
            plan.cpu_rounds
        ),
        "µs",
        cpu.map(Some),
    )
    .judge(
        format!("{ratio:.2}× bare (rounds {})", rounds.join(" ")),
        "≤ 1.25× bare",
        Some(ratio <= 1.25),
    );
    if env.round2.is_some() {
        let r = median(r2_per_round.clone());
        let ratio = median(
            r2_per_round
                .iter()
                .zip(&per_round)
                .map(|(r2, r)| r2 / r[1])
                .collect(),
        );
        row.round2 = Some((r, format!("{ratio:.2}× bare"), Some(ratio <= 1.25)));
    }
    rows.push(row);

    let (b, g) = (
        per_stream[1].unwrap_or(f64::NAN),
        per_stream[2].unwrap_or(f64::NAN),
    );
    rows.push(
        Row::new(
            format!("RSS per open stream ({} stalled streams)", plan.open_streams),
            "KiB",
            [None, Some(b), Some(g)],
        )
        .judge(format!("{:.2}× bare", g / b), "≤ 64 KiB", Some(g <= 64.0)),
    );
    // The caller inserts the two idle rows before the last two.
    rows.push(Row::new(
        "errors (all phases)",
        "",
        [None, None, Some(errors_total as f64)],
    ));

    if quick && errors_total > 0 {
        return Err(format!("{errors_total} requests failed in the smoke run"));
    }
    Ok(rows)
}

/// The median of `values` (the mean of the middle two for an even count; NaN when empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![1.58, 1.14, 9.0, 1.27, 1.2]), 1.27);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
