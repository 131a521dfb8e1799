//! Soak (issue #10): 1,000 concurrent streams through the real `keypool` binary (with
//! `RUST_LOG=trace`) while the mock upstream answers with random 429s before the head and random
//! resets in the middle of streams.
//!
//! Every scripted event carries its stream's id, a sequence number and a checksum of its text
//! (`{"stream":R,"seq":N,"text":"...","sum":S}`). Each stream must arrive as a gap-free,
//! duplicate-free, in-order prefix of one scripted stream — events of one upstream answer only,
//! never a mix — ending either in `message_stop` (then the whole script) or in exactly one error
//! event from keypool. The run is bounded to well under a minute so `cargo test` runs it; it
//! prints streams, events, duration and the gateway's peak RSS.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{Read, Write};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keypool_mock::{Ending, MockServer, Reply, RetryAfter, SseEvent, StreamScript};
use support::{Gateway, keys, message_body, parse_response};

const STREAMS: usize = 1_000;

/// xorshift64*: a fixed seed makes every run script the same upstream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// FNV-1a over the stream id, the sequence number and the text.
fn checksum(stream: u64, seq: u64, text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{stream}:{seq}:{text}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The events of scripted stream `id`: the usual Anthropic sequence with `deltas` deltas.
fn script_events(id: u64, deltas: usize, rng: &mut Rng) -> Vec<SseEvent> {
    let mut names = vec!["message_start", "content_block_start", "ping"];
    names.extend(std::iter::repeat_n("content_block_delta", deltas));
    names.extend(["content_block_stop", "message_delta", "message_stop"]);
    names
        .iter()
        .enumerate()
        .map(|(seq, name)| {
            let len = usize::try_from(rng.below(48)).unwrap();
            let text: String = (0..len)
                .map(|i| {
                    char::from(b'a' + u8::try_from((rng.next() >> 7) % 26).unwrap()).to_string()
                        + ["", " "][i % 2]
                })
                .collect();
            let seq = seq as u64;
            let data = serde_json::json!({
                "type": name, "stream": id, "seq": seq, "text": text, "sum": checksum(id, seq, &text),
            });
            SseEvent::new(name, &data.to_string())
        })
        .collect()
}

/// What a scripted stream looks like; kept to check what arrives.
struct Scripted {
    events: usize,
}

fn stream_reply(id: u64, rng: &mut Rng, reset: bool) -> (Reply, Scripted) {
    let deltas = 5 + usize::try_from(rng.below(20)).unwrap();
    let events = script_events(id, deltas, rng);
    let total: usize = events.iter().map(|e| e.to_bytes().len()).sum();
    let count = events.len();
    let mut script = StreamScript::with_events(events)
        .chunk_size(5 + usize::try_from(rng.below(200)).unwrap())
        .chunk_delay(Duration::from_millis(rng.below(3)));
    if reset {
        script = script.ending(Ending::ResetAfter(
            1 + usize::try_from(rng.below(total as u64 - 1)).unwrap(),
        ));
    }
    (Reply::stream(script), Scripted { events: count })
}

/// One stream as the client saw it.
#[derive(Debug, Default)]
struct Seen {
    status: u16,
    events: Vec<(String, serde_json::Value)>,
    error_events: usize,
}

fn run_stream(gw_addr: std::net::SocketAddr, start: &Barrier) -> Seen {
    let body = message_body(true);
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    start.wait();
    let mut s = std::net::TcpStream::connect(gw_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    // The gateway closes after keypool's error event without the final chunk: EOF or reset.
    let _ = s.read_to_end(&mut raw);
    let r =
        parse_response(&raw).unwrap_or_else(|| panic!("no response: {:?}", String::from_utf8_lossy(&raw)));
    let mut seen = Seen {
        status: r.status,
        ..Seen::default()
    };
    let is_events = r
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream"));
    if !is_events {
        // Nothing was committed: an ordinary HTTP error.
        seen.events
            .push(("http".into(), serde_json::from_slice(&r.body).unwrap()));
        return seen;
    }
    let text = String::from_utf8(r.body).unwrap();
    let mut rest = text.as_str();
    while let Some(end) = rest.find("\n\n") {
        let block = &rest[..end];
        rest = &rest[end + 2..];
        let mut name = "message";
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                name = v;
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        let value: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(seen.error_events, 0, "an event after keypool's error event");
        if name == "error" {
            seen.error_events += 1;
        } else {
            seen.events.push((name.to_owned(), value));
        }
    }
    assert!(rest.is_empty(), "a partial event was delivered: {rest:?}");
    seen
}

#[test]
fn thousand_concurrent_streams_with_429s_and_resets() {
    let mock = MockServer::start();
    let keys = keys(3);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut scripted = std::collections::HashMap::new();
    let (mut rate_limits, mut resets) = (0, 0);
    // Each key answers at most one request per stream. k0 and k1 answer 429 (cooling 5 ms) one
    // time in five; k2 never does, so no call runs out of keys. One stream in seven is reset.
    for (k, key) in keys.iter().enumerate() {
        let mut replies = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            if k < 2 && rng.below(5) == 0 {
                rate_limits += 1;
                replies.push(Reply::rate_limited(RetryAfter::Millis("5".into())));
                continue;
            }
            let id = scripted.len() as u64;
            let reset = rng.below(7) == 0;
            resets += usize::from(reset);
            let (reply, s) = stream_reply(id, &mut rng, reset);
            scripted.insert(id, s);
            replies.push(reply);
        }
        mock.script(key, replies);
    }
    mock.set_fallback(Reply::server_error());
    let mut gw = Gateway::start(&mock.url(), &keys, &["--idle-timeout", "10s"]);
    let (rss_idle, _) = gw.memory_kib();

    let start = Arc::new(Barrier::new(STREAMS + 1));
    let addr = gw.addr;
    let clients: Vec<_> = (0..STREAMS)
        .map(|_| {
            let start = start.clone();
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || run_stream(addr, &start))
                .unwrap()
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let seen: Vec<Seen> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let took = began.elapsed();

    let (mut events, mut complete, mut broken, mut refused) = (0, 0, 0, 0);
    let mut used = std::collections::HashSet::new();
    for s in &seen {
        if s.status != 200 {
            // A reset before the first whole event, so before the commit point: 502 api_error,
            // nothing of the stream delivered (SPEC §5.2).
            assert_eq!(s.status, 502, "{s:?}");
            assert_eq!(s.events[0].1["error"]["type"], "api_error", "{s:?}");
            refused += 1;
            continue;
        }
        // Events of exactly one scripted stream, each once, in order, with intact checksums.
        let id = s.events.first().map(|(_, v)| v["stream"].as_u64().unwrap());
        for (i, (name, v)) in s.events.iter().enumerate() {
            assert_eq!(v["type"], name.as_str());
            assert_eq!(
                v["stream"].as_u64(),
                id,
                "events of two upstream answers mixed: {s:?}"
            );
            assert_eq!(
                v["seq"].as_u64(),
                Some(i as u64),
                "lost, duplicated or reordered: {s:?}"
            );
            let text = v["text"].as_str().unwrap();
            assert_eq!(v["sum"].as_u64(), Some(checksum(id.unwrap(), i as u64, text)));
        }
        if let Some(id) = id {
            assert!(used.insert(id), "stream {id} delivered twice");
        }
        events += s.events.len();
        match s.events.last() {
            Some((name, _)) if name == "message_stop" => {
                assert_eq!(s.error_events, 0);
                assert_eq!(s.events.len(), scripted[&id.unwrap()].events);
                complete += 1;
            }
            _ => {
                assert_eq!(
                    s.error_events, 1,
                    "a broken stream ends in exactly one error: {s:?}"
                );
                broken += 1;
            }
        }
    }
    let (_, peak) = gw.memory_kib();
    let requests = mock.request_count();
    eprintln!(
        "soak: {STREAMS} streams ({complete} complete, {broken} ended by one error event, {refused} reset \
         before their first event: 502), {events} events, \
         {requests} upstream requests ({rate_limits} scripted 429s, {resets} scripted resets), in {took:?}; \
         gateway RSS {rss_idle} KiB idle, peak {peak} KiB"
    );
    assert_eq!(complete + broken + refused, STREAMS);
    assert!(broken > 0 && requests > STREAMS, "the faults were exercised");
    assert!(took < Duration::from_secs(60), "{took:?}");
    gw.assert_alive();
    gw.wait_log(&["keypool::request"], Duration::from_secs(5));
    gw.assert_no_secret(&keys, &[]);
}
