//! SSE benchmark: keypool's parser and framer against the peer crates and the `memchr` limit
//! loops, on one Anthropic-shaped stream generated here, fed line-aligned, in 128 B and in
//! 16 KiB chunks. Prints MB/s, events/s, the ratios, and allocations per event (counting
//! global allocator). The framer runs twice: looking at each lent frame's name (what the
//! limit loop's count stands for), and also taking every frame out as `Bytes` (what a relay
//! that forwards each frame pays); only the first has a target.
//!
//! `cargo bench -p keypool-core --bench sse`; `KEYPOOL_BENCH_QUICK=1` runs one pass of each.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use keypool_core::sse::{Framer, Parser};

/// Counts every allocation and reallocation; forwards to the system allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------- corpus

/// Deterministic xorshift, so every run measures the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the",
    "request",
    "pool",
    "key",
    "rate",
    "limit",
    "stream",
    "event",
    "token",
    "model",
    "answer",
    "because",
    "Claude",
    "function",
    "returns",
    "value",
    "error",
    "\\n",
    "retry",
    "header",
    "and",
    "of",
    "to",
    "a",
    "in",
    "élan",
    "naïve",
    "—",
    "“quoted”",
    "✓",
    "🙂",
];

fn text_piece(rng: &mut Rng) -> String {
    let n = 1 + rng.below(6);
    let mut s = String::new();
    for _ in 0..n {
        s.push_str(WORDS[rng.below(WORDS.len())]);
        s.push(' ');
    }
    s
}

fn json_piece(rng: &mut Rng) -> String {
    // Partial JSON as the API streams it for tool input, escaped inside a JSON string.
    let pieces = [
        "{\\\"loc",
        "ation\\\": \\\"San Fra",
        "ncisco, CA\\\", ",
        "\\\"unit\\\": \\\"fahr",
        "enheit\\\"}",
        "[1, 2, ",
        "\\\"query\\\": \\\"rate limit",
        " backoff\\\"",
    ];
    pieces[rng.below(pieces.len())].to_owned()
}

/// An Anthropic Messages API stream: several messages, each with text and tool-use blocks of
/// many deltas, pings in between. About 2 MB.
fn corpus() -> Bytes {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = String::new();
    let mut ev = |name: &str, data: &str| {
        out.push_str("event: ");
        out.push_str(name);
        out.push_str("\ndata: ");
        out.push_str(data);
        out.push_str("\n\n");
    };
    let mut msg = 0;
    while out_len_guess(msg) < 2_000_000 {
        msg += 1;
        ev(
            "message_start",
            &format!(
                r#"{{"type":"message_start","message":{{"id":"msg_01XFDUDYJgAACzvnptvVoYE{msg}","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}}}}"#
            ),
        );
        ev("ping", r#"{"type": "ping"}"#);
        for index in 0..4 {
            if index % 2 == 0 {
                ev(
                    "content_block_start",
                    &format!(
                        r#"{{"type":"content_block_start","index":{index},"content_block":{{"type":"text","text":""}}}}"#
                    ),
                );
                for i in 0..120 {
                    let text = text_piece(&mut rng);
                    ev(
                        "content_block_delta",
                        &format!(
                            r#"{{"type":"content_block_delta","index":{index},"delta":{{"type":"text_delta","text":"{text}"}}}}"#
                        ),
                    );
                    if i % 40 == 39 {
                        ev("ping", r#"{"type": "ping"}"#);
                    }
                }
            } else {
                ev(
                    "content_block_start",
                    &format!(
                        r#"{{"type":"content_block_start","index":{index},"content_block":{{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{{}}}}}}"#
                    ),
                );
                for _ in 0..40 {
                    let json = json_piece(&mut rng);
                    ev(
                        "content_block_delta",
                        &format!(
                            r#"{{"type":"content_block_delta","index":{index},"delta":{{"type":"input_json_delta","partial_json":"{json}"}}}}"#
                        ),
                    );
                }
            }
            ev(
                "content_block_stop",
                &format!(r#"{{"type":"content_block_stop","index":{index}}}"#),
            );
        }
        ev(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":1532}}"#,
        );
        ev("message_stop", r#"{"type":"message_stop"}"#);
    }
    Bytes::from(out)
}

/// One message is about 60 KB; stop after enough of them.
fn out_len_guess(messages: usize) -> usize {
    messages * 60_000
}

/// Chunkings of the corpus, all slices of the one buffer (slicing allocates nothing).
fn chunks(corpus: &Bytes, size: Option<usize>) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < corpus.len() {
        let end = match size {
            Some(size) => (pos + size).min(corpus.len()),
            None => pos + memchr::memchr(b'\n', &corpus[pos..]).map_or(corpus.len() - pos, |i| i + 1),
        };
        out.push(corpus.slice(pos..end));
        pos = end;
    }
    out
}

// ---------------------------------------------------------------- contenders

/// Every contender returns the number of events (or lines, frames) it produced.
type Run = fn(&[Bytes]) -> usize;

fn ours_parser(chunks: &[Bytes]) -> usize {
    let mut parser = Parser::new();
    let mut n = 0;
    for chunk in chunks {
        parser.feed(chunk);
        while let Some(event) = parser.next_event() {
            let event = event.unwrap();
            black_box(event.data_bytes());
            n += 1;
        }
    }
    n
}

/// The framer reading every frame's name; `KEEP`: also taking every frame out as `Bytes`, as a
/// relay that forwards each frame does.
fn ours_framer<const KEEP: bool>(chunks: &[Bytes]) -> usize {
    let mut framer = Framer::new();
    let mut n = 0;
    for chunk in chunks {
        framer.feed(chunk);
        while let Some(frame) = framer.next_frame() {
            let frame = frame.unwrap();
            black_box(frame.is_named("message_stop"));
            if KEEP {
                black_box(frame.into_bytes());
            }
            n += 1;
        }
    }
    n
}

fn byte_stream(chunks: &[Bytes]) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + '_ {
    futures::stream::iter(chunks.iter().cloned().map(Ok))
}

fn eventsource_stream(chunks: &[Bytes]) -> usize {
    use eventsource_stream::Eventsource;
    futures::executor::block_on(async {
        let mut stream = byte_stream(chunks).eventsource();
        let mut n = 0;
        while let Some(event) = stream.next().await {
            black_box(event.unwrap().data);
            n += 1;
        }
        n
    })
}

fn sseer(chunks: &[Bytes]) -> usize {
    futures::executor::block_on(async {
        let mut stream = sseer::EventStream::new(byte_stream(chunks));
        let mut n = 0;
        while let Some(event) = stream.next().await {
            black_box(event.unwrap());
            n += 1;
        }
        n
    })
}

fn sse_stream(chunks: &[Bytes]) -> usize {
    futures::executor::block_on(async {
        let mut stream = sse_stream::SseByteStream::new(byte_stream(chunks));
        let mut n = 0;
        while let Some(event) = stream.next().await {
            black_box(event.unwrap());
            n += 1;
        }
        n
    })
}

/// The limit for a line parser: find every line end, do nothing else.
fn memchr_lines(chunks: &[Bytes]) -> usize {
    let mut n = 0;
    for chunk in chunks {
        let mut pos = 0;
        while let Some(i) = memchr::memchr2(b'\n', b'\r', &chunk[pos..]) {
            pos += i + 1;
            n += 1;
        }
    }
    black_box(n)
}

/// The limit for a framer: find every `\n\n` (ignoring ones split across chunks).
fn memmem_frames(chunks: &[Bytes]) -> usize {
    let finder = memchr::memmem::Finder::new(b"\n\n");
    let mut n = 0;
    for chunk in chunks {
        n += finder.find_iter(chunk).count();
    }
    black_box(n)
}

// ---------------------------------------------------------------- harness

struct Measured {
    secs: f64,
    count: usize,
}

/// Best time of a pass over `chunks`, repeated for about `budget`.
fn measure(run: Run, chunks: &[Bytes], budget: Duration, quick: bool) -> Measured {
    let count = run(chunks); // warm-up
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut passes = 0;
    while passes < 1 || (!quick && (start.elapsed() < budget || passes < 3)) {
        let t = Instant::now();
        black_box(run(chunks));
        best = best.min(t.elapsed().as_secs_f64());
        passes += 1;
    }
    Measured { secs: best, count }
}

fn allocs_per_event(run: Run, chunks: &[Bytes]) -> f64 {
    let events = run(chunks); // warm-up: buffers reach their steady size
    let before = ALLOCS.load(Ordering::Relaxed);
    run(chunks);
    let after = ALLOCS.load(Ordering::Relaxed);
    (after - before) as f64 / events.max(1) as f64
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let quick = std::env::var_os("KEYPOOL_BENCH_QUICK").is_some_and(|v| v != "0");
    let budget = Duration::from_millis(if quick { 0 } else { 700 });
    let corpus = corpus();
    let mb = corpus.len() as f64 / 1e6;
    println!(
        "SSE corpus: {:.2} MB, {} events (Anthropic-shaped){}",
        mb,
        ours_parser(std::slice::from_ref(&corpus)),
        if quick { "  [quick mode: 1 pass each]" } else { "" }
    );

    let contenders: [(&str, Run); 8] = [
        ("keypool Parser", ours_parser),
        ("eventsource-stream 0.2", eventsource_stream),
        ("sseer 0.3", sseer),
        ("sse-stream 0.3", sse_stream),
        ("memchr2 line loop (limit)", memchr_lines),
        ("keypool Framer", ours_framer::<false>),
        ("keypool Framer, frames kept", ours_framer::<true>),
        ("memmem \\n\\n loop (limit)", memmem_frames),
    ];
    // `KEYPOOL_BENCH_PROFILE=<name part>`: loop one contender on 128 B chunks for a profiler;
    // `KEYPOOL_BENCH_CHUNK=<bytes>` picks another chunk size (`line`: line-aligned).
    if let Ok(only) = std::env::var("KEYPOOL_BENCH_PROFILE") {
        let size = match std::env::var("KEYPOOL_BENCH_CHUNK").as_deref() {
            Ok("line") => None,
            Ok(bytes) => Some(
                bytes
                    .parse()
                    .expect("KEYPOOL_BENCH_CHUNK: a byte count or `line`"),
            ),
            Err(_) => Some(128),
        };
        let chunks = chunks(&corpus, size);
        let (name, run) = contenders
            .iter()
            .find(|(name, _)| name.contains(only.as_str()))
            .expect("no such contender");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            black_box(run(&chunks));
        }
        println!("profiled {name}");
        return;
    }
    let mut misses = Vec::new();
    for (label, size) in [
        ("line-aligned", None),
        ("128 B chunks", Some(128)),
        ("16 KiB chunks", Some(16 * 1024)),
    ] {
        let chunks = chunks(&corpus, size);
        println!("\n{label} ({} chunks)", chunks.len());
        println!(
            "  {:<28} {:>9} {:>12} {:>9}  {:>13}",
            "contender", "MB/s", "events/s", "count", "ours / this"
        );
        let results: Vec<(&str, Measured)> = contenders
            .iter()
            .map(|(name, run)| (*name, measure(*run, &chunks, budget, quick)))
            .collect();
        let parser_secs = results[0].1.secs;
        let framer_secs = results[5].1.secs;
        for (i, (name, m)) in results.iter().enumerate() {
            let ours = if i >= 5 { framer_secs } else { parser_secs };
            let ratio = m.secs / ours;
            println!(
                "  {:<28} {:>9.0} {:>12.0} {:>9}  {:>12.2}x",
                name,
                mb / m.secs,
                m.count as f64 / m.secs,
                m.count,
                ratio
            );
        }
        let ratio = |i: usize, ours: f64| results[i].1.secs / ours;
        let mut check = |what: &str, got: f64, want: f64| {
            let ok = got >= want;
            println!(
                "  target {what}: {got:.2}x (want >= {want}x) {}",
                if ok { "ok" } else { "MISS" }
            );
            if !ok {
                misses.push(format!("{label}: {what}"));
            }
        };
        if size == Some(128) {
            check("parser vs eventsource-stream", ratio(1, parser_secs), 4.0);
            check("parser vs sseer", ratio(2, parser_secs), 1.2);
        }
        check("parser vs memchr2 line loop", ratio(4, parser_secs), 0.35);
        check("framer vs memmem loop", ratio(7, framer_secs), 0.5);
        println!(
            "  (not a target) framer with frames kept vs memmem loop: {:.2}x",
            ratio(7, results[6].1.secs)
        );
    }

    println!("\nallocations per event, steady state (128 B chunks / 16 KiB chunks)");
    let c128 = chunks(&corpus, Some(128));
    let c16k = chunks(&corpus, Some(16 * 1024));
    for (name, run) in contenders.iter().filter(|(name, _)| !name.contains("limit")) {
        let a = allocs_per_event(*run, &c128);
        let b = allocs_per_event(*run, &c16k);
        println!("  {name:<28} {a:>8.4} {b:>8.4}");
        if name.starts_with("keypool") && a.max(b) > 0.02 {
            misses.push(format!("{name}: {:.4} allocations per event > 0.02", a.max(b)));
        }
    }
    if misses.is_empty() {
        println!("\nall targets met");
    } else {
        println!("\ntargets missed: {}", misses.join("; "));
    }
}
