//! The walk of one upstream call over the pool (SPEC §3).

use std::time::{Duration, Instant};

use crate::pool::{KeyId, Pool, RawState};

/// The smallest `retry_after` an exhaustion reports. A key that was tried and has already
/// freed up again by the time the walk ends (a very short cooldown, or an operator enable)
/// counts as "frees up now", which still has to be a positive delay on the wire.
pub const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// Why a walk has no key left to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Exhausted {
    /// At least one key is cooling (or was tried and failed): the soonest frees up after
    /// `retry_after` (strictly positive).
    RateLimited {
        /// Time until the soonest cooling key frees up.
        retry_after: Duration,
    },
    /// Every key is disabled.
    AllDisabled,
}

/// Which keys a walker has yielded: a bit per key, inline for pools of up to 64 keys.
#[derive(Debug, Clone)]
enum Tried {
    Inline(u64),
    Heap(Box<[u64]>),
}

impl Tried {
    fn new(len: usize) -> Self {
        if len <= 64 {
            Self::Inline(0)
        } else {
            Self::Heap(vec![0; len.div_ceil(64)].into_boxed_slice())
        }
    }
    fn contains(&self, i: usize) -> bool {
        match self {
            Self::Inline(bits) => bits & (1 << i) != 0,
            Self::Heap(words) => words[i / 64] & (1 << (i % 64)) != 0,
        }
    }
    fn insert(&mut self, i: usize) {
        match self {
            Self::Inline(bits) => *bits |= 1 << i,
            Self::Heap(words) => words[i / 64] |= 1 << (i % 64),
        }
    }
}

/// Yields the keys of one upstream call, each at most once, skipping keys that are cooling or
/// disabled when it looks at them.
///
/// Every [`next_key`](Self::next_key) looks at each key's state word once, in walk order. When
/// no key can be yielded, the reason comes from the states read in that same pass, so a key
/// that frees up meanwhile cannot make the answer inconsistent (there is no second scan).
#[derive(Debug, Clone)]
pub struct Walker {
    start: usize,
    len: usize,
    tried: Tried,
    attempts: usize,
}

impl Walker {
    pub(crate) fn new(start: usize, len: usize) -> Self {
        Self {
            start,
            len,
            tried: Tried::new(len),
            attempts: 0,
        }
    }

    /// How many keys this walker has yielded.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// The next key to try, or why there is none.
    ///
    /// `pool` must be the pool that created the walker.
    pub fn next_key(&mut self, pool: &Pool, now: Instant) -> Result<KeyId, Exhausted> {
        debug_assert_eq!(pool.len(), self.len, "walker used with another pool");
        let now_ns = pool.ns_of(now);
        let mut soonest: Option<u64> = None;
        let mut disabled = 0usize;
        let mut tried_free = false;
        for step in 0..self.len {
            let mut i = self.start + step;
            if i >= self.len {
                i -= self.len;
            }
            let id = KeyId(i);
            let tried = self.tried.contains(i);
            match pool.decode(pool.word(id), now_ns) {
                RawState::Available if !tried => {
                    self.tried.insert(i);
                    self.attempts += 1;
                    return Ok(id);
                }
                RawState::Available => tried_free = true,
                RawState::Cooling(deadline) => {
                    soonest = Some(soonest.map_or(deadline, |s| s.min(deadline)));
                }
                RawState::Disabled(_) => disabled += 1,
            }
        }
        if disabled == self.len {
            return Err(Exhausted::AllDisabled);
        }
        // Not all disabled, so some key is cooling or was tried and is free again; a free one
        // "frees up now" and counts as `MIN_RETRY_AFTER`, even next to longer cooldowns.
        let cooling = soonest.map(|deadline| Duration::from_nanos(deadline - now_ns));
        let free = tried_free.then_some(MIN_RETRY_AFTER);
        let retry_after = match (cooling, free) {
            (Some(c), Some(f)) => c.min(f),
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => {
                debug_assert!(false, "neither cooling nor free, yet not all disabled");
                MIN_RETRY_AFTER
            }
        };
        Err(Exhausted::RateLimited { retry_after })
    }
}
