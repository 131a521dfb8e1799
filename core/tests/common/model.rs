//! A plain reference model of the pool and its walkers: a `Vec` of key states and, per walker,
//! a start and a set of tried keys. Time is nanoseconds since the pool's origin.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use keypool_core::walk::MIN_RETRY_AFTER;
use keypool_core::{CoolReason, DisableReason, Exhausted, Order, Transition};

/// The latest deadline the pool can hold, in ns after its origin (about 146 years); a
/// cooldown reaching past it ends there. Mirrors `pool.rs`.
pub const MAX_DEADLINE_NS: u64 = (u64::MAX - 3 - 1) >> 2;

/// One key's state. `until` keeps an expired deadline, as the pool's word does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MState {
    /// Cooling until `until` (available once `now >= until`); `until == 0`: never marked.
    Timed {
        until: u64,
        reason: CoolReason,
    },
    Disabled(DisableReason),
}

/// Ties between equal deadlines (or two disables) are settled by a fixed order of reasons, so
/// that marks commute; the model follows the same order.
pub fn cool_rank(r: CoolReason) -> u8 {
    match r {
        CoolReason::RateLimited => 0,
        CoolReason::Auth => 1,
        CoolReason::Overloaded => 2,
        CoolReason::SpendCapped => 3,
    }
}

pub fn disable_rank(r: DisableReason) -> u8 {
    match r {
        DisableReason::Unauthorized => 0,
        DisableReason::Forbidden => 1,
        DisableReason::Billing => 2,
        DisableReason::Operator => 3,
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub keys: Vec<MState>,
    pub order: Order,
    pub cursor: usize,
}

#[derive(Debug, Clone)]
pub struct MWalker {
    pub start: usize,
    pub tried: Vec<bool>,
}

/// What the model says a key looks like at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Available,
    Cooling(u64, CoolReason),
    Disabled(DisableReason),
}

impl Model {
    pub fn new(n: usize, order: Order) -> Self {
        Self {
            keys: vec![
                MState::Timed {
                    until: 0,
                    reason: CoolReason::RateLimited
                };
                n
            ],
            order,
            cursor: 0,
        }
    }

    pub fn seen(&self, i: usize, now: u64) -> Seen {
        match self.keys[i] {
            MState::Disabled(r) => Seen::Disabled(r),
            MState::Timed { until, reason } if until > now => Seen::Cooling(until, reason),
            MState::Timed { .. } => Seen::Available,
        }
    }

    pub fn cool_down(&mut self, i: usize, now: u64, dur: Duration, reason: CoolReason) -> Transition {
        let dur = u64::try_from(dur.as_nanos()).unwrap_or(u64::MAX);
        let deadline = now.saturating_add(dur).min(MAX_DEADLINE_NS);
        if deadline <= now {
            return Transition::Unchanged;
        }
        match self.keys[i] {
            MState::Disabled(_) => Transition::Unchanged,
            MState::Timed { until, reason: old } => {
                let cooling = until > now;
                if deadline > until || (deadline == until && cool_rank(reason) > cool_rank(old)) {
                    self.keys[i] = MState::Timed {
                        until: deadline,
                        reason,
                    };
                }
                if !cooling {
                    Transition::Entered
                } else if until < deadline {
                    Transition::Extended
                } else {
                    Transition::Unchanged
                }
            }
        }
    }

    pub fn disable(&mut self, i: usize, reason: DisableReason) -> Transition {
        match self.keys[i] {
            MState::Disabled(old) => {
                if disable_rank(reason) > disable_rank(old) {
                    self.keys[i] = MState::Disabled(reason);
                }
                Transition::Unchanged
            }
            MState::Timed { .. } => {
                self.keys[i] = MState::Disabled(reason);
                Transition::Entered
            }
        }
    }

    pub fn enable(&mut self, i: usize, now: u64) -> Transition {
        let was = self.seen(i, now);
        self.keys[i] = MState::Timed {
            until: 0,
            reason: CoolReason::RateLimited,
        };
        if was == Seen::Available {
            Transition::Unchanged
        } else {
            Transition::Entered
        }
    }

    pub fn walk(&mut self) -> MWalker {
        let n = self.keys.len();
        let start = match self.order {
            Order::PrimaryWithFallback => 0,
            Order::RoundRobin => {
                let s = self.cursor % n;
                self.cursor += 1;
                s
            }
        };
        MWalker {
            start,
            tried: vec![false; n],
        }
    }

    /// SPEC §3: the first untried available key in walk order; else `AllDisabled` when every key
    /// is disabled, else `RateLimited` with the soonest cooling deadline, a tried key that is
    /// free again counting as `MIN_RETRY_AFTER`.
    pub fn next_key(&self, w: &mut MWalker, now: u64) -> Result<usize, Exhausted> {
        let n = self.keys.len();
        let order = (0..n).map(|s| (w.start + s) % n);
        for i in order.clone() {
            if !w.tried[i] && self.seen(i, now) == Seen::Available {
                w.tried[i] = true;
                return Ok(i);
            }
        }
        if (0..n).all(|i| matches!(self.seen(i, now), Seen::Disabled(_))) {
            return Err(Exhausted::AllDisabled);
        }
        let retry_after = (0..n)
            .filter_map(|i| match self.seen(i, now) {
                Seen::Cooling(until, _) => Some(Duration::from_nanos(until - now)),
                Seen::Available => Some(MIN_RETRY_AFTER),
                Seen::Disabled(_) => None,
            })
            .min()
            .unwrap();
        Err(Exhausted::RateLimited { retry_after })
    }
}
