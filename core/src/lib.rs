//! # keypool-core
//!
//! The sans-IO heart of keypool: a pool of Anthropic API keys with lock-free shared state, the
//! walk of one upstream call over it, the classification of upstream answers, and (in later
//! modules) SSE parsing and the failover state machine of a whole call.
//!
//! Nothing in this crate does IO, spawns a thread, or reads a clock. Every function that
//! depends on time takes `now: Instant` (and, where an HTTP-date needs it, a wall-clock
//! `SystemTime`). Adapters read the clock, move the bytes, and hand the results back.
//!
//! ```
//! use std::time::{Duration, Instant, SystemTime};
//! use http::{HeaderMap, StatusCode};
//! use keypool_core::{Exhausted, Order, Policy, Pool, Verdict};
//!
//! let start = Instant::now();
//! let pool = Pool::new(["sk-ant-key-one-0000000001", "sk-ant-key-two-0000000002"], Order::default(), start)?;
//! let policy = Policy::default();
//!
//! // One upstream call: walk the keys until one is not the problem.
//! let mut walk = pool.walk();
//! let k0 = walk.next_key(&pool, start).unwrap();
//! // ... the upstream answers 429 with `retry-after: 5` ...
//! let mut headers = HeaderMap::new();
//! headers.insert("retry-after", "5".parse()?);
//! match policy.classify(StatusCode::TOO_MANY_REQUESTS, &headers, b"", SystemTime::now()) {
//!     Verdict::CoolDown { duration, reason } => {
//!         let _ = pool.cool_down(k0, start, duration, reason);
//!     }
//!     other => unreachable!("{other:?}"),
//! }
//! let k1 = walk.next_key(&pool, start).unwrap();
//! assert_ne!(k0, k1);
//! // Nothing left for this call: the soonest key frees up in 5 s.
//! # let _ = pool.cool_down(k1, start, Duration::from_secs(9), keypool_core::CoolReason::RateLimited);
//! assert_eq!(walk.next_key(&pool, start), Err(Exhausted::RateLimited { retry_after: Duration::from_secs(5) }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod anthropic;
pub mod call;
pub mod policy;
pub mod pool;
pub mod secret;
pub mod sse;
pub mod walk;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

pub use policy::{OnForbidden, OnUnauthorized, Policy, Verdict};
pub use pool::{
    CoolReason, DisableReason, KeyId, KeySnapshot, KeySpec, KeyState, Order, Pool, PoolError, Transition,
};
pub use secret::{Secret, SecretError};
pub use walk::{Exhausted, Walker};
