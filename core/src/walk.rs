//! The walk of one upstream call over the pool (SPEC §3).

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::mark::Family;
use crate::pool::{KeyId, Pool};

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
    #[inline]
    fn new(len: usize) -> Self {
        if len <= 64 {
            Self::Inline(0)
        } else {
            Self::Heap(vec![0; len.div_ceil(64)].into_boxed_slice())
        }
    }
}

/// A set of key indices; implemented for the inline word and the heap words of [`Tried`], so
/// that the scan is compiled once per representation with no per-key `match`.
trait Bits {
    fn has(&self, i: usize) -> bool;
    fn set(&mut self, i: usize);
}

impl Bits for u64 {
    #[inline(always)]
    fn has(&self, i: usize) -> bool {
        *self & (1 << i) != 0
    }
    #[inline(always)]
    fn set(&mut self, i: usize) {
        *self |= 1 << i;
    }
}

impl Bits for [u64] {
    #[inline(always)]
    fn has(&self, i: usize) -> bool {
        self[i / 64] & (1 << (i % 64)) != 0
    }
    #[inline(always)]
    fn set(&mut self, i: usize) {
        self[i / 64] |= 1 << (i % 64);
    }
}

/// What a pass that yielded nothing saw, gathered while it looked (no second scan).
struct Seen {
    /// Earliest deadline bits among keys that are not free (ns since the origin); above
    /// `Pool::MAX_DEADLINE_NS` if none of them is cooling.
    soonest: u64,
    disabled: usize,
    /// A key that this walker already yielded is available again.
    tried_free: bool,
}

impl Seen {
    /// Looks at key `i`'s word: `true` if the walker should yield it. One predictable branch
    /// per key: a disabled word's deadline bits lie above every real deadline, so it can join
    /// the minimum unconditionally (see [`exhausted`](Self::exhausted)).
    #[inline(always)]
    fn visit<B: Bits + ?Sized>(&mut self, tried: &mut B, i: usize, word: u64, now_ns: u64) -> bool {
        if Pool::is_free(word, now_ns) {
            if !tried.has(i) {
                tried.set(i);
                return true;
            }
            self.tried_free = true;
        } else {
            self.disabled += usize::from(Pool::is_disabled_word(word));
            self.soonest = self.soonest.min(Pool::deadline_of(word));
        }
        false
    }

    /// The exhaustion this pass found, for a pool of `len` keys.
    #[cold]
    fn exhausted(&self, len: usize, now_ns: u64) -> Exhausted {
        if self.disabled == len {
            return Exhausted::AllDisabled;
        }
        // Not all disabled, so some key is cooling or was tried and is free again; a free one
        // "frees up now" and counts as `MIN_RETRY_AFTER`, even next to longer cooldowns.
        // Disabled words joined the minimum with deadline bits above every real deadline.
        let cooling =
            (self.soonest <= Pool::MAX_DEADLINE_NS).then(|| Duration::from_nanos(self.soonest - now_ns));
        let free = self.tried_free.then_some(MIN_RETRY_AFTER);
        let retry_after = match (cooling, free) {
            (Some(c), Some(f)) => c.min(f),
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => {
                debug_assert!(false, "neither cooling nor free, yet not all disabled");
                MIN_RETRY_AFTER
            }
        };
        Exhausted::RateLimited { retry_after }
    }
}

/// One pass over the keys in walk order (`start..`, then `..start`) with the effective word of
/// each from `word_at`: the first key to yield, or what was seen. The general form of [`scan`],
/// for walks that must also look at family words (the effective word is the maximum).
#[inline]
fn scan_with<B: Bits + ?Sized>(
    tried: &mut B,
    len: usize,
    start: usize,
    now_ns: u64,
    word_at: impl Fn(usize) -> u64,
) -> Result<usize, Seen> {
    let mut seen = Seen {
        soonest: u64::MAX,
        disabled: 0,
        tried_free: false,
    };
    for i in (start..len).chain(0..start) {
        if seen.visit(tried, i, word_at(i), now_ns) {
            return Ok(i);
        }
    }
    Err(seen)
}

/// The first untried key in walk order that is free and carries no soft hint, if any: the
/// preferred pass of a walk while hints exist (SPEC §11.4). It records nothing: the pass that
/// may find nothing is the plain one after it.
#[inline]
fn preferred<B: Bits + ?Sized>(
    tried: &B,
    len: usize,
    start: usize,
    now_ns: u64,
    word_at: impl Fn(usize) -> u64,
    hinted: impl Fn(usize) -> bool,
) -> Option<usize> {
    (start..len)
        .chain(0..start)
        .find(|&i| !tried.has(i) && Pool::is_free(word_at(i), now_ns) && !hinted(i))
}

/// One pass over `words` in walk order (`start..`, then `..start`): the first key to yield,
/// or what was seen.
#[inline(always)]
fn scan<B: Bits + ?Sized>(
    tried: &mut B,
    words: &[AtomicU64],
    start: usize,
    now_ns: u64,
) -> Result<usize, Seen> {
    let mut seen = Seen {
        soonest: u64::MAX,
        disabled: 0,
        tried_free: false,
    };
    let (before, from) = words.split_at(start);
    for (k, word) in from.iter().enumerate() {
        if seen.visit(tried, start + k, word.load(Ordering::Acquire), now_ns) {
            return Ok(start + k);
        }
    }
    for (i, word) in before.iter().enumerate() {
        if seen.visit(tried, i, word.load(Ordering::Acquire), now_ns) {
            return Ok(i);
        }
    }
    Err(seen)
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
    /// The request's model family, if it has one.
    family: Option<Family>,
}

impl Pool {
    /// Starts a walk over the keys for one upstream call (SPEC §3), for a request without a
    /// model family: family-scoped cooldowns do not apply to it.
    #[inline]
    pub fn walk(&self) -> Walker {
        self.walk_for(None)
    }

    /// Starts a walk for a request of `family` (SPEC §11.2): keys cooling for that family are
    /// skipped like keys cooling for every request.
    #[inline]
    pub fn walk_for(&self, family: Option<Family>) -> Walker {
        Walker::new(self.walk_start(), self.len(), family)
    }
}

impl Walker {
    #[inline]
    pub(crate) fn new(start: usize, len: usize, family: Option<Family>) -> Self {
        Self {
            start,
            len,
            tried: Tried::new(len),
            attempts: 0,
            family,
        }
    }

    /// Sets the model family of the walk's request (SPEC §11.2), e.g. once the request has been
    /// read; the next [`next_key`](Self::next_key) skips keys cooling for it.
    pub fn set_family(&mut self, family: Option<Family>) {
        self.family = family;
    }

    /// How many keys this walker has yielded.
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// The next key to try, or why there is none.
    ///
    /// `pool` must be the pool that created the walker.
    #[inline]
    pub fn next_key(&mut self, pool: &Pool, now: Instant) -> Result<KeyId, Exhausted> {
        let words = pool.words();
        debug_assert_eq!(words.len(), self.len, "walker used with another pool");
        // Guards against a walker used with another pool: wrong answers, but no panic.
        let words = &words[..self.len.min(words.len())];
        let start = if self.start < words.len() { self.start } else { 0 };
        let now_ns = pool.ns_of(now);
        let found = if pool.extras() == 0 {
            // The common case: no family mark and no hint was ever made.
            match &mut self.tried {
                Tried::Inline(bits) => scan(bits, words, start, now_ns),
                Tried::Heap(bits) => scan(&mut **bits, words, start, now_ns),
            }
        } else {
            self.scan_extras(pool, words.len(), start, now_ns)
        };
        match found {
            Ok(i) => {
                self.attempts += 1;
                Ok(KeyId(i))
            }
            Err(seen) => Err(seen.exhausted(words.len(), now_ns)),
        }
    }

    /// A pass that also looks at the walk's family words and prefers keys without hints.
    #[cold]
    fn scan_extras(&mut self, pool: &Pool, len: usize, start: usize, now_ns: u64) -> Result<usize, Seen> {
        let words = pool.words();
        let family = self.family.and_then(|f| pool.family_slot(f));
        let word_at = |i: usize| {
            let word = words[i].load(Ordering::Acquire);
            match family {
                Some(slot) => word.max(pool.family_word(i, slot)),
                None => word,
            }
        };
        let hinted = |i: usize| pool.is_hinted(i, family, now_ns);
        let first = match &self.tried {
            Tried::Inline(bits) => preferred(bits, len, start, now_ns, word_at, hinted),
            Tried::Heap(bits) => preferred(&**bits, len, start, now_ns, word_at, hinted),
        };
        match (first, &mut self.tried) {
            (Some(i), Tried::Inline(bits)) => {
                bits.set(i);
                Ok(i)
            }
            (Some(i), Tried::Heap(bits)) => {
                bits.set(i);
                Ok(i)
            }
            (None, Tried::Inline(bits)) => scan_with(bits, len, start, now_ns, word_at),
            (None, Tried::Heap(bits)) => scan_with(&mut **bits, len, start, now_ns, word_at),
        }
    }
}
