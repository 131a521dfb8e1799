//! The benchmark's upstream: a fast fake `/v1/messages` on a single-threaded tokio runtime.
//!
//! - Without extra headers: `200` with a small Messages JSON body, at once.
//! - [`STREAM_HEADER`]` = "N,US"`: an event stream of `message_start`, `N` `content_block_delta`
//!   events `US` microseconds apart, and `message_stop`. Every event carries `"t":` the wall
//!   clock (ns since the Unix epoch) at the moment it was handed to hyper, so a client on the
//!   same machine can time each event's delivery. With [`STALL_HEADER`] the stream stops after
//!   its deltas and stays open (bounded: it ends after 10 minutes).
//! - [`FAIL_FIRST_HEADER`] and the first bench key ([`KEYS`]`[0]`): `429 rate_limit_error` with
//!   `retry-after: 0.001`, so the key is available again a millisecond later.
//!
//! Every answer carries [`KEY_INDEX_HEADER`]: the index in [`KEYS`] of the key that was sent;
//! and, as a real upstream does, the key's organisation (one per key) and rate-limit headers
//! (far from exhausted).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;

/// `N,US`: stream `N` deltas, `US` microseconds apart.
pub const STREAM_HEADER: &str = "x-bench-stream";
/// Keep the stream open after its deltas.
pub const STALL_HEADER: &str = "x-bench-stall";
/// Answer 429 when the first bench key is used.
pub const FAIL_FIRST_HEADER: &str = "x-bench-429";
/// Response header: the index of the key the request carried (`-` for none or unknown).
pub const KEY_INDEX_HEADER: &str = "x-bench-key-index";
/// The fake keys the gateway is given, in order.
pub const KEYS: [&str; 3] = ["sk-bench-key-0", "sk-bench-key-1", "sk-bench-key-2"];

const ORGANIZATION_HEADER: &str = "anthropic-organization-id";
const RATE_LIMIT_HEADERS: [(&str, &str); 4] = [
    ("anthropic-ratelimit-requests-limit", "4000"),
    ("anthropic-ratelimit-requests-remaining", "3999"),
    ("anthropic-ratelimit-requests-reset", "2099-01-01T00:00:00Z"),
    ("anthropic-ratelimit-tokens-remaining", "399000"),
];

const MESSAGE: &str = r#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-bench","content":[{"type":"text","text":"Hello! How can I help you today?"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":10}}"#;
const RATE_LIMITED: &str =
    r#"{"type":"error","error":{"type":"rate_limit_error","message":"bench: rate limited"}}"#;
/// How long a stalled stream stays open at most.
const STALL_LIMIT: Duration = Duration::from_secs(600);

type OutBody = Either<Full<Bytes>, SseBody>;

/// Runs the upstream on `listen` until killed.
pub fn run(listen: SocketAddr) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        crate::accept_loop(listener, handle).await;
        Ok(())
    })
}

async fn handle(req: Request<Incoming>) -> Result<Response<OutBody>, Infallible> {
    let (parts, body) = req.into_parts();
    // Read the request body to its end, as a real upstream would.
    let _ = body.collect().await;
    let key = parts
        .headers
        .get("x-api-key")
        .and_then(|v| KEYS.iter().position(|k| v.as_bytes() == k.as_bytes()));
    let key_header = match key {
        Some(i) => HeaderValue::from(i),
        None => HeaderValue::from_static("-"),
    };
    let mut response = if parts.headers.contains_key(FAIL_FIRST_HEADER) && key == Some(0) {
        let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(
            RATE_LIMITED.as_bytes(),
        ))));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("0.001"));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    } else if let Some((events, interval)) = parts.headers.get(STREAM_HEADER).and_then(stream_spec) {
        let stall = parts.headers.contains_key(STALL_HEADER);
        let mut r = Response::new(Either::Right(SseBody::new(events, interval, stall)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(MESSAGE.as_bytes()))));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    response.headers_mut().insert(KEY_INDEX_HEADER, key_header);
    // What a real upstream sends on every answer: the key's organisation (keypool learns it)
    // and its rate-limit state, far from exhausted (keypool reads it for hints).
    let headers = response.headers_mut();
    // One organisation per key: keys of one organisation share its rate limits (a 429 on one
    // rests the others), which the failover measurement must not hit.
    let organisation = match key {
        Some(0) => "org-bench-0",
        Some(1) => "org-bench-1",
        _ => "org-bench-2",
    };
    headers.insert(ORGANIZATION_HEADER, HeaderValue::from_static(organisation));
    for (name, value) in RATE_LIMIT_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    Ok(response)
}

fn stream_spec(value: &HeaderValue) -> Option<(u64, Duration)> {
    let (n, us) = value.to_str().ok()?.split_once(',')?;
    Some((
        n.trim().parse().ok()?,
        Duration::from_micros(us.trim().parse().ok()?),
    ))
}

/// Nanoseconds since the Unix epoch, the timestamp the events carry.
pub fn wall_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

enum Phase {
    Start,
    Deltas,
    Stop,
    Stalled(Pin<Box<tokio::time::Sleep>>),
    Done,
}

/// The paced event stream (see the [module docs](self)).
pub struct SseBody {
    phase: Phase,
    sent: u64,
    events: u64,
    interval: Option<tokio::time::Interval>,
    stall: bool,
}

impl std::fmt::Debug for SseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseBody")
            .field("sent", &self.sent)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl SseBody {
    fn new(events: u64, interval: Duration, stall: bool) -> Self {
        let interval = (!interval.is_zero()).then(|| {
            let start = tokio::time::Instant::now() + interval;
            tokio::time::interval_at(start, interval)
        });
        Self {
            phase: Phase::Start,
            sent: 0,
            events,
            interval,
            stall,
        }
    }
}

fn frame(text: String) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
    Poll::Ready(Some(Ok(Frame::data(Bytes::from(text)))))
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Start => {
                    this.phase = Phase::Deltas;
                    return frame(format!(
                        "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_bench\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-bench\",\"usage\":{{\"input_tokens\":12,\"output_tokens\":1}}}},\"t\":{}}}\n\n",
                        wall_nanos()
                    ));
                }
                Phase::Deltas if this.sent == this.events => {
                    this.phase = if this.stall {
                        Phase::Stalled(Box::pin(tokio::time::sleep(STALL_LIMIT)))
                    } else {
                        Phase::Stop
                    };
                }
                Phase::Deltas => {
                    if let Some(interval) = &mut this.interval {
                        let _ = ready!(interval.poll_tick(cx));
                    }
                    this.sent += 1;
                    return frame(format!(
                        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" token\"}},\"seq\":{},\"t\":{}}}\n\n",
                        this.sent,
                        wall_nanos()
                    ));
                }
                Phase::Stop => {
                    this.phase = Phase::Done;
                    return frame("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned());
                }
                Phase::Stalled(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    this.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(None),
            }
        }
    }
}
