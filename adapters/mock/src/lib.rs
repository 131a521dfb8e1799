//! keypool-mock: a scriptable fake Anthropic Messages API upstream, and in OpenAI mode a fake
//! OpenAI API (Chat Completions, Responses, models: see [`openai`]).
//!
//! A [`MockServer`] listens on `127.0.0.1` on a plain HTTP port and a TLS port (certificate for
//! `localhost` and `127.0.0.1`, signed by a CA made at start: trust [`MockServer::ca_pem`] or
//! [`MockServer::ca_der`]). It serves HTTP/1.1, and HTTP/2 by prior knowledge or ALPN `h2`:
//!
//! - `POST /v1/messages`: a Message object, or, when the request JSON has `"stream": true`,
//!   the normal SSE sequence (`message_start`, `content_block_start`, `ping`,
//!   `content_block_delta`…, `content_block_stop`, `message_delta`, `message_stop`, each written
//!   `event: NAME\ndata: JSON\n\n`);
//! - `POST /v1/messages/count_tokens`, `GET /v1/models`;
//! - anything else: 404 `{"type":"error","error":{"type":"not_found_error",...}}`.
//!
//! Answers carry `request-id` and `anthropic-ratelimit-*` headers. The key is read from
//! `x-api-key`, else `authorization: Bearer …`. What each request gets is scripted per key and
//! per request number ([`MockServer::script`], [`MockServer::set_default`],
//! [`MockServer::set_fallback`]), from plain [`Reply`] values: any status, headers and body,
//! Anthropic-shaped errors, slow or broken bodies ([`Ending`]), streams with custom events, chunk
//! sizes, delays and faults ([`StreamScript`]), bodies of any size at the cost of one copy of
//! a repeated piece ([`Body::Repeated`]), bytes that are not UTF-8 ([`SseEvent::raw_bytes`]),
//! and transport faults before or inside the head ([`Reply::reset_before_head`],
//! [`Reply::close_before_head`], [`Reply::reset_inside_head`], [`Reply::close_inside_head`],
//! [`Reply::stall_before_head`]). [`MockServer::close_idle_connections`] drops the keep-alive
//! connections a client holds in its pool.
//!
//! Every request is recorded ([`MockServer::requests`]), and so is how every answer ended
//! ([`MockServer::outcomes`]): completed, aborted as scripted, or cut short because the client
//! went away — which is how a test checks that dropping a stream closes the upstream connection
//! ([`MockServer::wait_for_stream_outcomes`], [`MockServer::cancelled_streams`]).
//!
//! The server runs on its own tokio runtime on a background thread, so it serves blocking tests
//! and async tests on any runtime alike. The `wait_for_*` methods block the calling thread
//! (briefly: the server side reacts within milliseconds).
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Write};
//! use keypool_mock::{MockServer, Reply, RetryAfter};
//!
//! let mock = MockServer::start();
//! mock.script("key-a", [Reply::rate_limited(RetryAfter::Seconds("5".into())), Reply::ok()]);
//! mock.set_default("key-b", Reply::unauthorized());
//!
//! // Any HTTP client works; a raw one keeps the example dependency-free.
//! let body = r#"{"model":"claude-x","max_tokens":8,"messages":[]}"#;
//! let mut conn = std::net::TcpStream::connect(mock.addr()).unwrap();
//! write!(
//!     conn,
//!     "POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nx-api-key: key-a\r\n\
//!      content-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
//!     body.len()
//! )
//! .unwrap();
//! let mut answer = String::new();
//! conn.read_to_string(&mut answer).unwrap();
//! assert!(answer.starts_with("HTTP/1.1 429"));
//! assert!(answer.contains("retry-after: 5"));
//! assert!(answer.contains(r#""type":"rate_limit_error""#));
//!
//! let reqs = mock.requests_for("key-a");
//! assert_eq!(reqs.len(), 1);
//! assert_eq!(reqs[0].path(), "/v1/messages");
//! ```
//!
//! # Scenario files
//!
//! A [`Scenario`] (and every type in it) is `serde`-serializable, so a whole setup can live in a
//! TOML or JSON file and be started with [`MockServer::start_with`] (the gateway's
//! `keypool mock-upstream` does this). Every field is optional; an omitted reply field takes the
//! value of [`Reply::ok`] (status 200, the endpoint's normal body, automatic headers).
//!
//! ```toml
#![doc = include_str!("../scenario.example.toml")]
//! ```
//!
//! The reply fields: `status` (u16), `headers` (list of `[name, value]`), `retry_after`
//! (see [`RetryAfter`]), `body` (see [`Body`]; an `error` body with no `message` gets a stock
//! one), `auto_headers` (bool), `head_delay_ms`, `fault` (see [`Fault`]), and for non-stream
//! bodies `chunk_size`, `chunk_delay_ms`, `ending` (see [`Ending`]). Stream bodies take
//! `events` (see [`SseEvent`]), `text_deltas`, `chunk_size`, `chunk_delay_ms`, `ending`.
#![forbid(unsafe_code)]

mod anthropic;
mod io;
pub mod openai;
mod script;
mod server;
mod tls;

pub use script::{
    Body, CREDIT_BALANCE_MESSAGE, Ending, Fault, Flavor, KeyScript, Reply, RetryAfter, Scenario, SseEvent,
    StreamScript,
};
pub use server::{MockServer, Outcome, OutcomeEnd, Recorded, WaitTimeout, key_hint};
