//! `state-bench`: shared key state on Redis (issue #17, DESIGN.md "Benchmarks"), measured in one
//! run on one machine against a `redis-server` it starts on loopback.
//!
//! ```text
//! cargo build --release -p keypool-gateway -p keypool-bench
//! target/release/state-bench [--quick] [--keypool PATH]
//! ```
//!
//! 1. **Mark propagation** between two replicas: two `keypool-redis` drivers, each with its own
//!    pool and Redis connections (as two gateways have), in this process so that one clock
//!    times both ends: from handing a mark to replica A's driver to replica B's pool having
//!    applied it. Alternating disables and enables of one key.
//! 2. **Upstream 429s** caused by one key rate-limited for 30 s: three `keypool serve` replicas
//!    (primary-with-fallback order, so every replica tries that key first) behind a
//!    round-robin client (1, then 8 requests in flight), 300 requests; with in-process state
//!    (each replica learns on its own) and with `--state redis`.
//! 3. **Gateway latency** at concurrency 1, one `keypool serve` with `--state redis` and one
//!    without, in interleaved rounds against the same upstream (`keypool-mock`, in process).
//!
//! Every figure is measured in this run; the table prints ours, the reference and the ratio.

// A benchmark binary: failing loudly on a broken invariant is what it should do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use keypool_core::{Change, DisableReason, KeyId, Mark, Order, Pool, Transition};
use keypool_mock::{MockServer, Reply, RetryAfter};
use keypool_redis::testing::RedisServer;
use keypool_redis::{Events, RedisState, StateConfig};

const USAGE: &str = "usage: state-bench [--quick] [--keypool PATH]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let keypool = args
        .iter()
        .position(|a| a == "--keypool")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("keypool"));
    if !keypool.exists() {
        eprintln!(
            "state-bench: no keypool binary at {} (cargo build --release -p keypool-gateway, or --keypool PATH)",
            keypool.display()
        );
        return ExitCode::from(2);
    }
    let redis = RedisServer::start();
    let mut rows = Vec::new();
    rows.extend(propagation(&redis, if quick { 100 } else { 2000 }));
    for in_flight in [1, 8] {
        rows.push(rate_limit_429s(
            &keypool,
            &redis,
            if quick { 60 } else { 300 },
            in_flight,
        ));
    }
    rows.push(latency(
        &keypool,
        &redis,
        if quick { 2 } else { 10 },
        if quick { 100 } else { 1000 },
    ));
    println!(
        "\nstate-bench{} — {} — redis-server on 127.0.0.1, {}",
        if quick { " --quick" } else { "" },
        keypool.display(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| format!(
                "loadavg {}",
                l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
            ))
            .unwrap_or_default()
    );
    println!("\n| what | with Redis | reference | ratio | target |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.ours, r.reference, r.ratio, r.target
        );
    }
    ExitCode::SUCCESS
}

struct Row {
    what: String,
    ours: String,
    reference: String,
    ratio: String,
    target: String,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------------------------
// 1. Propagation between two drivers.

/// Tells the waiting benchmark when B applied a mark from A.
#[derive(Debug)]
struct Arrivals(Mutex<Sender<Instant>>);

impl Events for Arrivals {
    fn remote_mark(&self, _: &Arc<Pool>, _: KeyId, _: &Mark, _: Transition) {
        let _ = self.0.lock().unwrap().send(Instant::now());
    }
}

fn propagation(redis: &RedisServer, n: usize) -> Vec<Row> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let keys = ["sk-ant-api03-bench-propagation-aaaaaaaaaaaa"];
    let pa = Arc::new(Pool::new(keys, Order::default(), Instant::now()).unwrap());
    let pb = Arc::new(Pool::new(keys, Order::default(), Instant::now()).unwrap());
    let (tx, rx): (Sender<Instant>, Receiver<Instant>) = channel();
    let config = || StateConfig::new(&redis.url(), "bench-propagation").unwrap();
    let (a, b) = runtime.block_on(async {
        let a = RedisState::start(config(), pa.clone(), None).unwrap();
        let b = RedisState::start(config(), pb.clone(), Some(Arc::new(Arrivals(Mutex::new(tx))))).unwrap();
        a.ready().await;
        b.ready().await;
        (a, b)
    });
    let id = pa.key_at(0).unwrap();
    let mut lags = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let mark = if i % 2 == 0 {
            pa.mark_for(
                id,
                Change::Disable {
                    reason: DisableReason::Operator,
                },
            )
        } else {
            pa.enable_mark(id)
        };
        let _ = pa.apply(&mark, Instant::now(), SystemTime::now());
        let sent = Instant::now();
        a.publish(&mark);
        let arrived = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a mark did not arrive within 5 s");
        if i >= n / 10 {
            lags.push(arrived - sent); // the first tenth warms up
        }
    }
    drop((a, b));
    lags.sort();
    let target = Duration::from_millis(10);
    let p99 = quantile(&lags, 0.99);
    vec![
        Row {
            what: format!("mark propagation A → B, p50 ({n} marks)"),
            ours: ms(quantile(&lags, 0.5)),
            reference: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
        },
        Row {
            what: format!("mark propagation A → B, p99 ({n} marks)"),
            ours: ms(p99),
            reference: format!("{} (limit)", ms(target)),
            ratio: format!("{:.2}×", p99.as_secs_f64() / target.as_secs_f64()),
            target: format!("≤ 10 ms {}", if p99 <= target { "✓" } else { "✗" }),
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Gateway processes and a keep-alive HTTP/1.1 client.

struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway(keypool: &PathBuf, upstream: &str, keys: &[String], extra: &[&str]) -> Gateway {
    let mut child = Command::new(keypool)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--upstream",
            upstream,
        ])
        .args(extra)
        .env("KEYPOOL_KEYS", keys.join(","))
        .env_remove("KEYPOOL_STATE")
        .env_remove("KEYPOOL_CLIENT_TOKENS")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = channel();
    let stderr = child.stderr.take().unwrap();
    // Drains the log for the gateway's lifetime (a full pipe would stall it).
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(listen) = v["fields"]["listen"].as_str()
            {
                let _ = tx.send(listen.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the gateway did not start")
        .parse()
        .unwrap();
    let gw = Gateway { child, addr };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = Conn::new(gw.addr);
    while c.get("/healthz") != 200 {
        assert!(Instant::now() < deadline, "the gateway never became ready");
        std::thread::sleep(Duration::from_millis(10));
        c = Conn::new(gw.addr);
    }
    gw
}

const BODY: &str = r#"{"model":"claude-bench","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;

/// One keep-alive connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    fn get(&mut self, path: &str) -> u16 {
        let head = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
        self.exchange(head.as_bytes())
    }

    fn message(&mut self) -> u16 {
        let req = format!(
            "POST /v1/messages HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        self.exchange(req.as_bytes())
    }

    /// Writes a request, reads one whole response (content-length framed); the status.
    fn exchange(&mut self, request: &[u8]) -> u16 {
        self.stream.write_all(request).unwrap();
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "the gateway closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .unwrap()
            .to_ascii_lowercase();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while self.buf.len() < head_end + len {
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "the gateway closed the connection mid-body");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        status
    }
}

fn bench_keys(n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| format!("sk-ant-api03-bench-{tag}{i}-{}", "x".repeat(24)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 2. Upstream 429s with three replicas.

fn count_429s(
    keypool: &PathBuf,
    redis: Option<&RedisServer>,
    namespace: &str,
    requests: usize,
    in_flight: usize,
) -> usize {
    let mock = MockServer::start();
    let keys = bench_keys(3, namespace);
    mock.set_default(&keys[0], Reply::rate_limited(RetryAfter::Seconds("30".into())));
    let url = redis.map(RedisServer::url);
    let mut extra = Vec::new();
    if let Some(url) = &url {
        extra.extend(["--state", url.as_str(), "--state-namespace", namespace]);
    }
    let replicas: Vec<Gateway> = (0..3)
        .map(|_| gateway(keypool, &mock.url(), &keys, &extra))
        .collect();
    let addrs: Vec<SocketAddr> = replicas.iter().map(|g| g.addr).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..in_flight)
        .map(|_| {
            let (addrs, next) = (addrs.clone(), next.clone());
            std::thread::spawn(move || {
                let mut conns: Vec<Conn> = addrs.iter().map(|&a| Conn::new(a)).collect();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return;
                    }
                    // Round robin over the replicas.
                    let n = conns.len();
                    assert_eq!(conns[i % n].message(), 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    mock.requests_for(&keys[0]).len()
}

fn rate_limit_429s(keypool: &PathBuf, redis: &RedisServer, requests: usize, in_flight: usize) -> Row {
    let local = count_429s(keypool, None, &format!("local{in_flight}"), requests, in_flight);
    let shared = count_429s(
        keypool,
        Some(redis),
        &format!("shared{in_flight}"),
        requests,
        in_flight,
    );
    Row {
        what: format!(
            "upstream 429s, 1 key limited for 30 s, 3 replicas, round-robin client, {requests} requests, {in_flight} in flight"
        ),
        ours: shared.to_string(),
        reference: format!("{local} (in-process state)"),
        ratio: format!("{:.2}×", shared as f64 / local as f64),
        // The first 429 plus the requests already sent while its mark propagates: with one in
        // flight, the next request can leave before the mark has arrived; with 8, the whole
        // first wave reaches the key before any 429 is back (with in-process state too).
        target: format!(
            "1 + in flight during propagation (≤ {}) {}",
            1 + in_flight,
            if shared <= 1 + in_flight { "✓" } else { "✗" }
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Latency with and without --state.

fn latency(keypool: &PathBuf, redis: &RedisServer, rounds: usize, per_round: usize) -> Row {
    let mock = MockServer::start();
    let keys = bench_keys(2, "latency");
    let url = redis.url();
    let plain = gateway(keypool, &mock.url(), &keys, &[]);
    let shared = gateway(
        keypool,
        &mock.url(),
        &keys,
        &["--state", &url, "--state-namespace", "latency"],
    );
    let (mut c_plain, mut c_shared) = (Conn::new(plain.addr), Conn::new(shared.addr));
    for _ in 0..per_round.min(200) {
        assert_eq!(c_plain.message(), 200);
        assert_eq!(c_shared.message(), 200);
    }
    let (mut t_plain, mut t_shared) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which runs first.
        for which in [round % 2, (round + 1) % 2] {
            let (conn, out) = if which == 0 {
                (&mut c_plain, &mut t_plain)
            } else {
                (&mut c_shared, &mut t_shared)
            };
            for _ in 0..per_round {
                let t = Instant::now();
                assert_eq!(conn.message(), 200);
                out.push(t.elapsed());
            }
        }
    }
    t_plain.sort();
    t_shared.sort();
    let (p, s) = (quantile(&t_plain, 0.5), quantile(&t_shared, 0.5));
    let ratio = s.as_secs_f64() / p.as_secs_f64();
    Row {
        what: format!("gateway latency p50, c=1 ({} requests each)", t_plain.len()),
        ours: ms(s),
        reference: format!("{} (in-process state)", ms(p)),
        ratio: format!("{ratio:.3}×"),
        target: format!("≤ 1.05× {}", if ratio <= 1.05 { "✓" } else { "✗" }),
    }
}
