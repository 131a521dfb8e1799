//! The call's deadlines: one table, the next deadline is the minimum.

use std::time::{Duration, Instant};

/// The call's timers.
#[derive(Debug, Clone, Copy)]
pub(super) enum Timer {
    Head = 0,
    Idle = 1,
    Hold = 2,
}

/// One deadline per timer; the next deadline is the minimum.
#[derive(Debug, Default)]
pub(super) struct Timers([Option<Instant>; 3]);

impl Timers {
    /// Arms `t` to fire `after` from `now`; a deadline too far away to represent never fires
    /// (a huge configured timeout means "no timeout", never a panic).
    pub(super) fn set(&mut self, t: Timer, now: Instant, after: Duration) {
        self.0[t as usize] = now.checked_add(after);
    }
    pub(super) fn stop(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }
    pub(super) fn clear(&mut self) {
        self.0 = [None; 3];
    }
    pub(super) fn expired(&self, t: Timer, now: Instant) -> bool {
        self.0[t as usize].is_some_and(|at| at <= now)
    }
    pub(super) fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}
