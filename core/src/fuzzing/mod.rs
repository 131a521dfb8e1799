//! Fuzz entry points, one function per cargo-fuzz target (hidden; feature `fuzzing`).
//!
//! The target files under `fuzz/fuzz_targets/` are one line each and call into here, so the
//! bodies are compiled (and linted) by normal CI builds with `--features fuzzing`.
pub mod call;
pub mod pool;
pub mod sse;
