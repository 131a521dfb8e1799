//! # keypool-core
//!
//! The sans-IO heart of keypool: a pool of API keys with lock-free shared state, the walk of
//! one upstream call over it, the classification of upstream answers (through a provider
//! profile: Anthropic, OpenAI), SSE parsing, the failover state machine of a whole call, and
//! what the pool learns about the upstream's limits (organisations, model families, spend caps,
//! rate-limit hints, probes of disabled keys).
//!
//! Nothing in this crate does IO, spawns a thread, or reads a clock. Every function that
//! depends on time takes `now: Instant` (and, where an HTTP-date needs it, a wall-clock
//! `SystemTime`). Adapters read the clock, move the bytes, and hand the results back.
//!
//! ## The run loop
//!
//! An adapter drives one [`call::Call`] per upstream call: feed it what happened, drain what to
//! do — [`call::Call::poll_output`] until the response head (or keypool's own answer), then
//! [`call::Call::poll_body`] until the body is over. This is the whole loop, for a blocking
//! client (the IO functions are the adapter's own; [`client::ClientCall`] is this loop, written
//! once for every client adapter):
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::{Instant, SystemTime};
//! use bytes::Bytes;
//! use http::{HeaderMap, StatusCode};
//! use keypool_core::call::{Attempt, BodyOutput, Call, CallConfig, Credential, Output, Request, TransportError};
//! use keypool_core::{Order, Pool};
//!
//! /// What the adapter's HTTP client reports for the current exchange.
//! enum Io { Head(StatusCode, HeaderMap), Chunk(Bytes), End, Error(TransportError), TimedOut }
//! fn start_request(_attempt: Attempt) { /* open the upstream request */ }
//! fn next_io(_deadline: Option<Instant>) -> Io { unimplemented!("read head or body, until the deadline") }
//! fn to_caller(_what: &dyn std::fmt::Debug) { /* head, body bytes, error response, abort */ }
//!
//! /// The adapter's two clocks (the core never reads one).
//! const CLOCKS: (fn() -> Instant, fn() -> SystemTime) = (Instant::now, SystemTime::now);
//!
//! /// Hands what happened to the call, with the adapter's clocks.
//! fn feed(call: &mut Call, io: Io) {
//!     let (now, wall) = (CLOCKS.0(), CLOCKS.1());
//!     match io {
//!         Io::Head(status, headers) => call.handle_response_head(status, headers, now, wall),
//!         Io::Chunk(bytes) => call.handle_body(bytes, now),
//!         Io::End => call.handle_body_end(now),
//!         Io::Error(e) => call.handle_transport_error(e, now),
//!         Io::TimedOut => call.handle_timeout(now),
//!     }
//! }
//!
//! let pool = Arc::new(Pool::new(["sk-ant-api03-first-key-000000000000"], Order::default(), CLOCKS.0())?);
//! let config = CallConfig::default();
//! let request = Request::post_json("/v1/messages", r#"{"model":"claude-sonnet-4-5","max_tokens":64}"#);
//! let mut call = Call::new(request, Credential::Pool(pool), &config, "req_01", CLOCKS.0());
//! // Before the head: attempts, marks, and the answer.
//! loop {
//!     match call.poll_output() {
//!         Output::Send(attempt) => start_request(attempt),
//!         Output::Wait(deadline) => feed(&mut call, next_io(deadline)),
//!         // Already applied to the pool; a state backend would publish `mark.mark`.
//!         Output::Mark(mark) => eprintln!("key {:?}: {:?} ({:?})", mark.key, mark.verdict, mark.transition),
//!         Output::Head(head) => break to_caller(&head),
//!         Output::Fail(failure) => break to_caller(&failure),
//!     }
//! }
//! // After the head: the body. (After a failure the call is over: `poll_body` says `Done`.)
//! loop {
//!     match call.poll_body() {
//!         BodyOutput::Body(bytes) => to_caller(&bytes),
//!         BodyOutput::Wait(deadline) => feed(&mut call, next_io(deadline)),
//!         BodyOutput::Abort(abort) => break to_caller(&abort),
//!         BodyOutput::Done => break,
//!     }
//! }
//! eprintln!("the call ended: {:?}", call.outcome());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Providers
//!
//! Everything an upstream API decides (how a key is sent, which client credentials are
//! stripped, the classification table, retry-delay sources, what an SSE event means, the shape
//! of keypool's own errors) is asked of one value, [`CallConfig::profile`](call::CallConfig::profile):
//! a [`Profile`] implementing [`Provider`]. [`Profile::anthropic`] is the default; the call
//! machine, pool, walker and adapters hold no provider literals (`.ci/provider-literals`).
//!
//! ## Marks: in and out
//!
//! A key is known outside its process by its [`Fingerprint`] (a truncated SHA-256 of the key;
//! [`KeyId`] is a local index that never leaves the process), and every change of key state is
//! a [`Mark`]: which key (or which key for which model [`Family`]), what (cool until an absolute
//! [`WallTime`], disable with a reason, enable), why (the upstream status), and the key's
//! generation. There is one way in, [`Pool::apply`], which merges by a lexicographic maximum of
//! `(generation, state)`, so marks commute and an operator's enable (generation + 1) beats every
//! mark made before it wherever it arrives. There is one way out of a call,
//! [`call::Output::Mark`]: the call applies each mark locally at once (the next pick sees it)
//! and hands it to its driver, which gives it to a [`call::MarkSink`] — logs, metrics, and a
//! state backend such as `keypool-redis` that shares it with other processes, which apply it
//! with [`Pool::apply`] in turn. A reloaded pool forwards marks made on the pool it replaced.
//!
//! ## The pool on its own
//!
//! ```
//! use std::time::{Duration, Instant, SystemTime};
//! use http::{HeaderMap, StatusCode};
//! use keypool_core::{Exhausted, Order, Policy, Pool, Verdict};
//!
//! let start = Instant::now;
//! let start = start(); // the adapter reads the clock, never the core
//! let pool = Pool::new(["sk-ant-key-one-0000000001", "sk-ant-key-two-0000000002"], Order::default(), start)?;
//! let policy = Policy::default();
//!
//! // One upstream call: walk the keys until one is not the problem.
//! let mut walk = pool.walk();
//! let k0 = walk.next_key(&pool, start).unwrap();
//! // ... the upstream answers 429 with `retry-after: 5` ...
//! let mut headers = HeaderMap::new();
//! headers.insert("retry-after", "5".parse()?);
//! match policy.classify(StatusCode::TOO_MANY_REQUESTS, &headers, b"", SystemTime::UNIX_EPOCH) {
//!     Verdict::CoolDown { duration, reason } => {
//!         let _ = pool.cool_down(k0, start, duration, reason);
//!     }
//!     other => unreachable!("{other:?}"),
//! }
//! let k1 = walk.next_key(&pool, start).unwrap();
//! assert_ne!(k0, k1);
//! # let _ = pool.cool_down(k1, start, Duration::from_secs(9), keypool_core::CoolReason::RateLimited);
//! // Nothing left for this call: the soonest key frees up in 5 s.
//! assert_eq!(walk.next_key(&pool, start), Err(Exhausted::RateLimited { retry_after: Duration::from_secs(5) }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod call;
pub mod civil;
pub mod client;
pub mod mark;
pub mod policy;
pub mod pool;
pub mod probe;
pub mod profile;
pub mod secret;
pub mod sse;
pub mod walk;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

pub use mark::{Change, Family, Fingerprint, Mark, Target, WallTime};
pub use policy::{Action, OnForbidden, OnUnauthorized, Policy, PolicyError, Rule, Verdict};
pub use pool::{
    CoolReason, DisableReason, FAMILY_SLOTS, FamilySlot, KeyId, KeySnapshot, KeySpec, KeyState, Order, Pool,
    PoolError, Scope, Transition,
};
pub use profile::{EventRole, Profile, Provider};
/// The Anthropic profile's building blocks, at their round-1 path.
pub use profile::{anthropic, openai};
pub use secret::{Secret, SecretError};
pub use walk::{Exhausted, Walker};
