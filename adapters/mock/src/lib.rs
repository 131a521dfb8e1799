//! keypool-mock: a scriptable fake Anthropic Messages API upstream.
//!
//! TODO docs
#![forbid(unsafe_code)]

mod anthropic;
mod io;
mod script;
mod server;
mod tls;

pub use script::{
    Body, CREDIT_BALANCE_MESSAGE, Ending, Fault, KeyScript, Reply, RetryAfter, Scenario, SseEvent,
    StreamScript,
};
pub use server::{MockServer, Outcome, OutcomeEnd, Recorded, WaitTimeout, key_hint};
