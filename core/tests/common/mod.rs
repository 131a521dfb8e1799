//! Helpers shared by the pool, property and allocation tests.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use keypool_core::{Order, Pool};

/// A recognisable, valid key of 40 characters for position `i`.
pub fn key(i: usize) -> String {
    format!("sk-ant-api03-TESTKEY{i:04}-SECRETPAYLOADxyz{i:04}")
}

/// `n` distinct keys.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(key).collect()
}

/// A pool of `n` keys whose origin is `t0`.
pub fn pool(n: usize, order: Order, t0: Instant) -> Pool {
    Pool::new(keys(n), order, t0).unwrap()
}

/// Milliseconds as a `Duration`.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Seconds as a `Duration`.
pub fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

/// A tiny deterministic generator (splitmix64), so tests need no RNG dependency.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform-ish in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

pub mod model;
