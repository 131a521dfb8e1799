//! Pick and mark costs of a 16-key pool, side by side with an uncontended `std::sync::Mutex`
//! lock/unlock measured in the same run (DESIGN.md, Benchmarks: pick ≤ 20 ns, 0 allocations).
//!
//! `cargo bench -p keypool-core --bench pool`; `KEYPOOL_BENCH_QUICK=1` runs a tiny iteration
//! count so CI can smoke it in about a second.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use keypool_core::{CoolReason, DisableReason, Family, Order, Pool};

/// The pick target from DESIGN.md, in nanoseconds.
const PICK_TARGET_NS: f64 = 20.0;

struct Config {
    /// Iterations per sample.
    iters: u64,
    /// Samples per case; the median is reported.
    samples: usize,
}

/// Median nanoseconds per call of `f` over `cfg.samples` samples of `cfg.iters` calls.
fn measure<R>(cfg: &Config, mut f: impl FnMut() -> R) -> f64 {
    // Warm up caches and branch predictors.
    for _ in 0..cfg.iters.min(100_000) {
        black_box(f());
    }
    let mut per_op: Vec<f64> = (0..cfg.samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..cfg.iters {
                black_box(f());
            }
            start.elapsed().as_nanos() as f64 / cfg.iters as f64
        })
        .collect();
    per_op.sort_by(f64::total_cmp);
    per_op[per_op.len() / 2]
}

fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sk-ant-api03-bench-key-{i:04}-xxxxxxxxxxxx"))
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and runs us quickly.
    let quick = std::env::var_os("KEYPOOL_BENCH_QUICK").is_some_and(|v| v == "1")
        || !std::env::args().any(|a| a == "--bench");
    let cfg = if quick {
        Config {
            iters: 20_000,
            samples: 3,
        }
    } else {
        Config {
            iters: 5_000_000,
            samples: 15,
        }
    };

    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    let primary = Pool::new(keys(16), Order::PrimaryWithFallback, t0).unwrap();
    let round_robin = Pool::new(keys(16), Order::RoundRobin, t0).unwrap();
    let skipping = Pool::new(keys(16), Order::PrimaryWithFallback, t0).unwrap();
    let ids: Vec<_> = skipping.ids().collect();
    for &id in &ids[..15] {
        let _ = skipping.cool_down(id, t0, Duration::from_secs(3600), CoolReason::RateLimited);
    }
    let exhausted = Pool::new(keys(16), Order::PrimaryWithFallback, t0).unwrap();
    for (i, id) in exhausted.ids().enumerate() {
        if i % 2 == 0 {
            let _ = exhausted.cool_down(
                id,
                t0,
                Duration::from_secs(60 + i as u64),
                CoolReason::RateLimited,
            );
        } else {
            let _ = exhausted.disable(id, DisableReason::Billing);
        }
    }
    // SPEC §11.2: a pool with family marks (the sonnet family cooling on the first 8 keys) walks
    // for a sonnet request: the pick reads family words too.
    let sonnet = Family::of("sonnet");
    let haiku = Family::of("haiku");
    let families = Pool::new(keys(16), Order::PrimaryWithFallback, t0).unwrap();
    for id in families.ids().take(8) {
        let mark = families.family_cool_mark(
            id,
            sonnet,
            SystemTime::UNIX_EPOCH,
            Duration::from_secs(3600),
            CoolReason::RateLimited,
        );
        let _ = families.apply(&mark, t0, SystemTime::UNIX_EPOCH);
    }
    let marked = Pool::new(keys(16), Order::PrimaryWithFallback, t0).unwrap();
    let mark_id = marked.ids().nth(7).unwrap();
    let mutex = Mutex::new(0u64);

    let mutex_ns = measure(&cfg, || {
        let mut g = mutex.lock().unwrap();
        *g += 1;
        drop(g);
    });

    // The floor under every timed operation: turning `now` into a time since the origin.
    let instant_ns = measure(&cfg, || black_box(now).saturating_duration_since(black_box(t0)));

    let cases: Vec<(&str, f64, Option<f64>)> = vec![
        ("reference: Instant::saturating_duration_since", instant_ns, None),
        (
            "pick: first key available (walk + next_key)",
            measure(&cfg, || primary.walk().next_key(&primary, black_box(now))),
            Some(PICK_TARGET_NS),
        ),
        (
            "pick: round-robin (walk + next_key)",
            measure(&cfg, || round_robin.walk().next_key(&round_robin, black_box(now))),
            Some(PICK_TARGET_NS),
        ),
        (
            "pick: skip 15 cooling keys",
            measure(&cfg, || skipping.walk().next_key(&skipping, black_box(now))),
            Some(PICK_TARGET_NS),
        ),
        (
            "pick with family marks: skip 8 keys cooling for the family",
            measure(&cfg, || {
                families
                    .walk_for(Some(sonnet))
                    .next_key(&families, black_box(now))
            }),
            None,
        ),
        (
            "pick with family marks, another family: first key",
            measure(&cfg, || {
                families.walk_for(Some(haiku)).next_key(&families, black_box(now))
            }),
            None,
        ),
        (
            "exhaustion: 8 cooling + 8 disabled",
            measure(&cfg, || exhausted.walk().next_key(&exhausted, black_box(now))),
            None,
        ),
        (
            "mark: cool_down (Pool::apply: lock, merge)",
            measure(&cfg, || {
                marked.cool_down(
                    black_box(mark_id),
                    black_box(now),
                    black_box(Duration::from_secs(30)),
                    CoolReason::RateLimited,
                )
            }),
            None,
        ),
        (
            "state: one key",
            measure(&cfg, || marked.state(black_box(mark_id), black_box(now))),
            None,
        ),
    ];

    println!();
    println!(
        "keypool pool bench ({}; {} iters x {} samples, median)",
        if quick { "quick" } else { "full" },
        cfg.iters,
        cfg.samples
    );
    println!();
    println!("| operation | ns/op | vs Mutex lock/unlock | target |");
    println!("|---|---:|---:|---|");
    println!("| uncontended std Mutex lock/unlock | {mutex_ns:.2} | 1.00x | (reference) |");
    let mut failed = Vec::new();
    for (name, ns, target) in &cases {
        let verdict = match target {
            Some(t) if ns <= t => format!("<= {t:.0} ns: ok"),
            Some(t) => {
                failed.push(*name);
                format!("<= {t:.0} ns: MISSED")
            }
            None => "-".to_owned(),
        };
        println!("| {name} | {ns:.2} | {:.2}x | {verdict} |", ns / mutex_ns);
    }
    println!();
    if failed.is_empty() {
        println!("all picks within the {PICK_TARGET_NS:.0} ns target");
    } else if quick {
        println!("(quick run: numbers are indicative only) target missed by: {failed:?}");
    } else {
        println!("target missed by: {failed:?}");
    }
}
