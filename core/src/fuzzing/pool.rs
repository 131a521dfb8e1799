//! Fuzz bodies for the pool, the walker and retry-delay parsing.
//!
//! [`pool_ops`] applies a vector of operations to a pool of 1–8 keys and to a plain reference
//! model side by side, checking SPEC §8 invariants 1–3 (and full agreement with the model)
//! after every step; [`retry_delay`] feeds arbitrary header bytes to
//! [`Policy::retry_delay`] and to the OpenAI profile's retry delay and classification
//! (`x-ratelimit-*` Go-duration resets, "try again in" messages, error bodies), and the Go
//! duration and message parsers alone. All panic on any violation.
//!
//! The pool needs an origin `Instant`, and core never reads a clock, so the fuzz target passes
//! one in.

use std::time::{Duration, Instant, SystemTime};

use arbitrary::{Arbitrary, Unstructured};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::mark::{Change, Family, Mark, WallTime};
use crate::policy::{OnForbidden, OnUnauthorized, Policy, Verdict};
use crate::pool::{CoolReason, DisableReason, KeyId, KeyState, Order, Pool, Transition};
use crate::walk::{Exhausted, MIN_RETRY_AFTER, Walker};

const MAX_DEADLINE_NS: u64 = Pool::MAX_DEADLINE_NS;
/// The wall clock at the pool's origin, for HTTP-dates: 2026-01-01T00:00:00Z.
const WALL_ORIGIN_SECS: u64 = 1_767_225_600;

#[derive(Debug, Arbitrary)]
enum RetryValue {
    Secs(u32),
    Millis(u32),
    Decimal(u16, u16),
    /// An HTTP-date this many seconds from the wall clock (negative: in the past).
    Date(i32),
    Raw(Vec<u8>),
}

impl RetryValue {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Self::Secs(v) | Self::Millis(v) => v.to_string().into_bytes(),
            Self::Decimal(a, b) => format!("{a}.{b}").into_bytes(),
            Self::Date(off) => httpdate::fmt_http_date(wall_at(*off)).into_bytes(),
            Self::Raw(b) => b.clone(),
        }
    }
}

/// The wall clock `offset_secs` from [`WALL_ORIGIN_SECS`], kept after 1970 (HTTP-dates cannot
/// express earlier times, and `httpdate` panics formatting them).
fn wall_at(offset_secs: i32) -> SystemTime {
    let offset_secs = offset_secs.max(-1_000_000_000);
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(WALL_ORIGIN_SECS);
    let d = Duration::from_secs(u64::from(offset_secs.unsigned_abs()));
    if offset_secs >= 0 { base + d } else { base - d }
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A new walk, for a request of one of three model families or of none.
    NewWalk {
        family: Option<u8>,
    },
    /// A family-scoped cooldown (SPEC §11.2).
    FamilyCool {
        key: u8,
        family: u8,
        millis: u32,
        generation: Option<u8>,
    },
    /// A soft hint (SPEC §11.4), key-wide or for a family.
    Hint {
        key: u8,
        family: Option<u8>,
        millis: u32,
    },
    Pick {
        walker: u8,
    },
    /// An upstream answer for a key, classified and applied as a call would.
    Mark {
        key: u8,
        status: u16,
        credit_body: bool,
        retry_after_ms: Option<RetryValue>,
        retry_after: Option<RetryValue>,
        date: Option<i32>,
        policy: u8,
        configured: u32,
    },
    Cool {
        key: u8,
        nanos: u64,
        scale: u8,
        reason: u8,
    },
    Disable {
        key: u8,
        reason: u8,
    },
    Enable {
        key: u8,
    },
    /// A portable mark as another replica made it (SPEC §9): an arbitrary generation, a
    /// cooldown until some wall-clock time (seconds from now, possibly in the past), a disable
    /// or an enable.
    Portable {
        key: u8,
        kind: u8,
        generation: u8,
        secs: i16,
        reason: u8,
    },
    Advance(u32),
    AdvanceYears(u8),
}

fn cool_reason(r: u8) -> CoolReason {
    match r % 4 {
        0 => CoolReason::RateLimited,
        1 => CoolReason::Auth,
        2 => CoolReason::Overloaded,
        _ => CoolReason::SpendCapped,
    }
}

fn disable_reason(r: u8) -> DisableReason {
    match r % 4 {
        0 => DisableReason::Unauthorized,
        1 => DisableReason::Forbidden,
        2 => DisableReason::Billing,
        _ => DisableReason::Operator,
    }
}

/// Ties (equal deadlines, two disables) resolve to the higher of these ranks, so that marks
/// commute; the pool does the same through `fetch_max`.
fn cool_rank(r: CoolReason) -> u8 {
    match r {
        CoolReason::RateLimited => 0,
        CoolReason::Auth => 1,
        CoolReason::Overloaded => 2,
        CoolReason::SpendCapped => 3,
    }
}

fn disable_rank(r: DisableReason) -> u8 {
    match r {
        DisableReason::Unauthorized => 0,
        DisableReason::Forbidden => 1,
        DisableReason::Billing => 2,
        DisableReason::Operator => 3,
    }
}

/// One key in the model: a deadline that is kept after it passes (0 = never marked), or
/// disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MKey {
    Timed { until: u64, reason: CoolReason },
    Disabled(DisableReason),
}

const FRESH: MKey = MKey::Timed {
    until: 0,
    reason: CoolReason::RateLimited,
};

/// The model's families (the fuzz input picks among them).
const FAMILIES: [&str; 3] = ["opus", "sonnet", "haiku"];

struct Model {
    keys: Vec<MKey>,
    /// Family deadlines per key (0 = never), in the pool's time base.
    fam: Vec<[u64; 3]>,
    /// Hint deadlines per key: key-wide, then one per family.
    hints: Vec<[u64; 4]>,
    /// Generations: raised by enables, and by marks of a newer generation (which clear first).
    gens: Vec<u64>,
    cursor: usize,
    order: Order,
}

impl Model {
    fn state(&self, i: usize, now: u64) -> Option<(u64, CoolReason)> {
        match self.keys[i] {
            MKey::Timed { until, reason } if until > now => Some((until, reason)),
            _ => None,
        }
    }

    fn is_free(&self, i: usize, now: u64) -> bool {
        matches!(self.keys[i], MKey::Timed { until, .. } if until <= now)
    }

    fn cool_down(&mut self, i: usize, now: u64, dur: Duration, reason: CoolReason) -> Transition {
        let dur = u64::try_from(dur.as_nanos()).unwrap_or(u64::MAX);
        let deadline = now.saturating_add(dur).min(MAX_DEADLINE_NS);
        if deadline <= now {
            return Transition::Unchanged;
        }
        match self.keys[i] {
            MKey::Disabled(_) => Transition::Unchanged,
            MKey::Timed { until, reason: old } => {
                if deadline > until || (deadline == until && cool_rank(reason) > cool_rank(old)) {
                    self.keys[i] = MKey::Timed {
                        until: deadline,
                        reason,
                    };
                }
                if until <= now {
                    Transition::Entered
                } else if until < deadline {
                    Transition::Extended
                } else {
                    Transition::Unchanged
                }
            }
        }
    }

    fn disable(&mut self, i: usize, reason: DisableReason) -> Transition {
        match self.keys[i] {
            MKey::Disabled(old) => {
                if disable_rank(reason) > disable_rank(old) {
                    self.keys[i] = MKey::Disabled(reason);
                }
                Transition::Unchanged
            }
            MKey::Timed { .. } => {
                self.keys[i] = MKey::Disabled(reason);
                Transition::Entered
            }
        }
    }

    /// A portable mark of generation `generation`; `deadline` is its wall-clock deadline in the
    /// pool's time base (`None` when it is not a cooldown), `disable` its reason if it disables.
    fn portable(
        &mut self,
        i: usize,
        generation: u64,
        deadline: Option<u64>,
        disable: Option<DisableReason>,
        cool: CoolReason,
        now: u64,
    ) -> Transition {
        if generation < self.gens[i] {
            return Transition::Unchanged;
        }
        let before = self.keys[i];
        let was = self.state(i, now);
        let was_disabled = matches!(before, MKey::Disabled(_));
        if generation > self.gens[i] {
            self.gens[i] = generation;
            self.keys[i] = FRESH;
            self.fam[i] = [0; 3];
        }
        if let Some(reason) = disable {
            let _ = self.disable(i, reason);
        }
        if let Some(deadline) = deadline.filter(|&d| d > now)
            && let MKey::Timed { until, reason } = self.keys[i]
            && (deadline > until || (deadline == until && cool_rank(cool) > cool_rank(reason)))
        {
            self.keys[i] = MKey::Timed {
                until: deadline,
                reason: cool,
            };
        }
        let is = self.state(i, now);
        let is_disabled = matches!(self.keys[i], MKey::Disabled(_));
        match (was, is) {
            _ if was_disabled && is_disabled => Transition::Unchanged,
            (Some((a, _)), Some((b, _))) if !was_disabled && !is_disabled && b > a => Transition::Extended,
            (Some((a, _)), Some((b, _))) if !was_disabled && !is_disabled && b == a => Transition::Unchanged,
            (None, None) if !was_disabled && !is_disabled => Transition::Unchanged,
            _ => Transition::Entered,
        }
    }

    /// A family cooldown of generation `generation` until `deadline`. Its transition is judged
    /// by what requests of the family see (the key's state or the family's, the later one).
    fn family_cool(&mut self, i: usize, f: usize, generation: u64, deadline: u64, now: u64) -> Transition {
        if generation < self.gens[i] {
            return Transition::Unchanged;
        }
        let prev = self.effective(i, Some(f), now);
        if generation > self.gens[i] {
            self.gens[i] = generation;
            self.keys[i] = FRESH;
            self.fam[i] = [0; 3];
        }
        if deadline > now {
            self.fam[i][f] = self.fam[i][f].max(deadline);
        }
        let next = self.effective(i, Some(f), now);
        match (prev, next) {
            (Err(Some(a)), Err(Some(b))) if b > a => Transition::Extended,
            // Shorter only after a newer generation cleared the key: a new cooldown.
            (Err(Some(a)), Err(Some(b))) if b < a => Transition::Entered,
            (Err(Some(_)), Err(Some(_))) | (Err(None), Err(None)) | (Ok(()), Ok(())) => Transition::Unchanged,
            _ => Transition::Entered,
        }
    }

    /// A hint until `until` on slot `slot` (0 key-wide, 1.. a family).
    fn hint(&mut self, i: usize, slot: usize, until: u64, now: u64) -> bool {
        // The pool's time base ends about 146 years after its origin.
        let (until, now) = (until.min(MAX_DEADLINE_NS), now.min(MAX_DEADLINE_NS));
        if until <= now {
            return false;
        }
        let current = self.hints[i][slot];
        if current > now && until < current.saturating_add(2_000_000_000) {
            return false;
        }
        self.hints[i][slot] = current.max(until);
        current < until
    }

    /// Key `i` as a walk for `family` sees it: free, or its effective deadline (`None` when
    /// disabled).
    fn effective(&self, i: usize, family: Option<usize>, now: u64) -> Result<(), Option<u64>> {
        match self.keys[i] {
            MKey::Disabled(_) => Err(None),
            MKey::Timed { until, .. } => {
                let d = until.max(family.map_or(0, |f| self.fam[i][f]));
                if d <= now { Ok(()) } else { Err(Some(d)) }
            }
        }
    }

    fn enable(&mut self, i: usize, now: u64) -> Transition {
        let was_free = self.is_free(i, now);
        self.keys[i] = FRESH;
        self.fam[i] = [0; 3];
        self.gens[i] += 1;
        if was_free {
            Transition::Unchanged
        } else {
            Transition::Entered
        }
    }

    fn walk_start(&mut self) -> usize {
        match self.order {
            Order::PrimaryWithFallback => 0,
            Order::RoundRobin => {
                let s = self.cursor % self.keys.len();
                self.cursor += 1;
                s
            }
        }
    }

    fn next_key(
        &self,
        start: usize,
        tried: &mut [bool],
        now: u64,
        family: Option<usize>,
    ) -> Result<usize, Exhausted> {
        let n = self.keys.len();
        let hinted = |i: usize| self.hints[i][0] > now || family.is_some_and(|f| self.hints[i][f + 1] > now);
        // Keys without a hint first (SPEC §11.4), then any.
        for preferred in [true, false] {
            for step in 0..n {
                let i = (start + step) % n;
                if !tried[i] && self.effective(i, family, now).is_ok() && !(preferred && hinted(i)) {
                    tried[i] = true;
                    return Ok(i);
                }
            }
        }
        if self.keys.iter().all(|k| matches!(k, MKey::Disabled(_))) {
            return Err(Exhausted::AllDisabled);
        }
        let mut soonest: Option<Duration> = None;
        for i in 0..n {
            let d = match self.effective(i, family, now) {
                Err(Some(until)) => Duration::from_nanos(until - now),
                Ok(()) => MIN_RETRY_AFTER,
                Err(None) => continue,
            };
            soonest = Some(soonest.map_or(d, |s| s.min(d)));
        }
        Err(Exhausted::RateLimited {
            retry_after: soonest.unwrap_or(MIN_RETRY_AFTER),
        })
    }
}

struct Walk {
    real: Walker,
    family: Option<usize>,
    start: usize,
    tried: Vec<bool>,
    yielded: Vec<usize>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The pool's word for a key, in the model's terms (the state seen from the origin shows the
/// raw deadline even after it has passed).
fn raw(pool: &Pool, id: KeyId) -> MKey {
    match pool.state(id, pool.origin()) {
        KeyState::Available => FRESH,
        KeyState::Cooling { until, reason } => MKey::Timed {
            until: ns(until.saturating_duration_since(pool.origin())),
            reason,
        },
        KeyState::Disabled { reason } => MKey::Disabled(reason),
    }
}

fn same(a: MKey, b: MKey) -> bool {
    match (a, b) {
        (MKey::Timed { until: 0, .. }, MKey::Timed { until: 0, .. }) => true,
        _ => a == b,
    }
}

fn policy_for(selector: u8, configured: u32) -> Policy {
    let mut p = Policy::default();
    let d = Duration::from_millis(u64::from(configured));
    if selector & 1 != 0 {
        p.on_unauthorized = OnUnauthorized::CoolFor(d);
    }
    if selector & 2 != 0 {
        p.on_forbidden = OnForbidden::Deliver;
    }
    if selector & 4 != 0 {
        p.disable_on_billing = false;
    }
    if selector & 8 != 0 {
        p.cool_on_overloaded = Some(d / 3);
    }
    if selector & 16 != 0 {
        p.max_cooldown = d / 7;
    }
    if selector & 32 != 0 {
        p.default_cooldown = d / 5;
    }
    p
}

const CREDIT_BODY: &[u8] = br#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#;

/// Applies arbitrary operations to a pool of 1–8 keys and to the reference model, checking
/// SPEC §8 invariants 1–3 after each one. `origin` is any instant (the target reads the clock
/// so that core does not have to). Panics on a violation.
pub fn pool_ops(data: &[u8], origin: Instant) {
    let mut u = Unstructured::new(data);
    let (Ok(n), Ok(round_robin)) = (u.int_in_range(1usize..=8), u.arbitrary::<bool>()) else {
        return;
    };
    let order = if round_robin {
        Order::RoundRobin
    } else {
        Order::PrimaryWithFallback
    };
    let specs = (0..n).map(|i| format!("sk-ant-api03-fuzz-{i:02}-0123456789abcdef"));
    let Ok(pool) = Pool::new(specs, order, origin) else {
        panic!("a valid key list was rejected");
    };
    let ids: Vec<KeyId> = pool.ids().collect();
    let mut model = Model {
        keys: vec![FRESH; n],
        fam: vec![[0; 3]; n],
        hints: vec![[0; 4]; n],
        gens: vec![0; n],
        cursor: 0,
        order,
    };
    let mut walks: Vec<Walk> = Vec::new();
    let mut elapsed = Duration::ZERO;
    // Every state change as the portable mark it was, with the clock readings it was applied
    // at: replayed in reverse order into a fresh pool at the end (SPEC invariants 9 and 10).
    let mut log: Vec<(Mark, Instant, SystemTime)> = Vec::new();

    for _ in 0..512 {
        let Ok(op) = u.arbitrary::<Op>() else { break };
        let now = origin + elapsed;
        let now_ns = ns(elapsed);
        let before: Vec<MKey> = ids.iter().map(|&id| raw(&pool, id)).collect();
        let mut enabled = None;
        match op {
            Op::NewWalk { family } => {
                if walks.len() == 8 {
                    walks.remove(0);
                }
                let family = family.map(|f| usize::from(f) % 3);
                walks.push(Walk {
                    real: pool.walk_for(family.map(|f| Family::of(FAMILIES[f]))),
                    family,
                    start: model.walk_start(),
                    tried: vec![false; n],
                    yielded: Vec::new(),
                });
            }
            Op::Pick { walker } => {
                if walks.is_empty() {
                    continue;
                }
                let len = walks.len();
                let w = &mut walks[usize::from(walker) % len];
                let got = w.real.next_key(&pool, now);
                let want = model.next_key(w.start, &mut w.tried, now_ns, w.family);
                assert_eq!(got.map(KeyId::index), want, "walker disagrees with the model");
                match got {
                    Ok(k) => {
                        // Invariant 1.
                        assert!(!w.yielded.contains(&k.index()), "key yielded twice");
                        assert!(
                            pool.state(k, now).is_available(),
                            "yielded a key that is not available"
                        );
                        w.yielded.push(k.index());
                        assert_eq!(w.real.attempts(), w.yielded.len());
                    }
                    Err(Exhausted::AllDisabled) => {
                        // Invariant 3.
                        assert!(ids.iter().all(|&id| pool.state(id, now).is_disabled()));
                    }
                    Err(Exhausted::RateLimited { retry_after }) => {
                        assert!(retry_after > Duration::ZERO);
                        assert!(!ids.iter().all(|&id| pool.state(id, now).is_disabled()));
                    }
                }
            }
            Op::Mark {
                key,
                status,
                credit_body,
                retry_after_ms,
                retry_after,
                date,
                policy,
                configured,
            } => {
                let k = usize::from(key) % n;
                let Ok(status) = StatusCode::from_u16(100 + status % 900) else {
                    panic!("status codes 100..=999 are valid");
                };
                let mut headers = HeaderMap::new();
                let values = [
                    ("retry-after-ms", retry_after_ms.map(|v| v.bytes())),
                    ("retry-after", retry_after.map(|v| v.bytes())),
                    (
                        "date",
                        date.map(|d| httpdate::fmt_http_date(wall_at(d)).into_bytes()),
                    ),
                ];
                for (name, value) in values {
                    if let Some(Ok(v)) = value.map(|v| HeaderValue::from_bytes(&v)) {
                        headers.insert(name, v);
                    }
                }
                let policy = policy_for(policy, configured);
                let body: &[u8] = if credit_body { CREDIT_BODY } else { b"{}" };
                let wall = wall_at(0) + elapsed;
                // The OpenAI table on the same answer: any cooldown is within the bounds.
                if let Verdict::CoolDown { duration, .. } =
                    crate::profile::Profile::openai().classify(&policy, status, &headers, body, wall)
                {
                    assert!(duration >= Duration::from_millis(1));
                    assert!(duration <= policy.max_cooldown.max(Duration::from_millis(1)));
                }
                match policy.classify(status, &headers, body, wall) {
                    Verdict::Deliver => {}
                    Verdict::CoolDown { duration, reason } => {
                        assert!(duration >= Duration::from_millis(1));
                        assert!(duration <= policy.max_cooldown.max(Duration::from_millis(1)));
                        let mark = pool.cool_mark(ids[k], wall, duration, reason);
                        let got = pool.apply(&mark, now, wall);
                        log.push((mark, now, wall));
                        assert_eq!(got, model.cool_down(k, now_ns, duration, reason));
                    }
                    Verdict::Disable { reason } => {
                        let mark = pool.mark_for(ids[k], Change::Disable { reason });
                        log.push((mark, now, wall));
                        assert_eq!(pool.apply(&mark, now, wall), model.disable(k, reason));
                    }
                }
            }
            Op::Cool {
                key,
                nanos,
                scale,
                reason,
            } => {
                let k = usize::from(key) % n;
                let dur = match scale % 4 {
                    0 => Duration::from_nanos(nanos % 10_000_000_000),
                    1 => Duration::from_nanos(nanos),
                    2 => Duration::from_secs(nanos),
                    _ => Duration::MAX,
                };
                let reason = cool_reason(reason);
                let wall = wall_at(0) + elapsed;
                // A wall-clock deadline saturates in 2554, but the pool clamps any deadline to
                // about 146 years after its origin first, so the two agree.
                let mark = pool.cool_mark(ids[k], wall, dur, reason);
                log.push((mark, now, wall));
                let got = pool.apply(&mark, now, wall);
                assert_eq!(got, model.cool_down(k, now_ns, dur, reason));
            }
            Op::Disable { key, reason } => {
                let k = usize::from(key) % n;
                let reason = disable_reason(reason);
                let mark = pool.mark_for(ids[k], Change::Disable { reason });
                log.push((mark, now, wall_at(0) + elapsed));
                assert_eq!(pool.disable(ids[k], reason), model.disable(k, reason));
            }
            Op::Enable { key } => {
                let k = usize::from(key) % n;
                enabled = Some(k);
                let mark = pool.enable_mark(ids[k]);
                log.push((mark, now, wall_at(0) + elapsed));
                assert_eq!(
                    pool.apply(&mark, now, wall_at(0) + elapsed),
                    model.enable(k, now_ns)
                );
            }
            Op::FamilyCool {
                key,
                family,
                millis,
                generation,
            } => {
                let k = usize::from(key) % n;
                let f = usize::from(family) % 3;
                let wall = wall_at(0) + elapsed;
                let d = Duration::from_millis(u64::from(millis % 200_000));
                let mut mark =
                    pool.family_cool_mark(ids[k], Family::of(FAMILIES[f]), wall, d, CoolReason::RateLimited);
                if let Some(g) = generation {
                    mark.generation = u64::from(g % 4);
                }
                if mark.generation > model.gens[k] {
                    enabled = Some(k); // a newer generation clears first: an enable
                }
                log.push((mark, now, wall));
                let deadline = now_ns.saturating_add(ns(d)).min(MAX_DEADLINE_NS);
                let want = model.family_cool(k, f, mark.generation, deadline, now_ns);
                assert_eq!(pool.apply(&mark, now, wall), want, "{mark:?}");
            }
            Op::Hint { key, family, millis } => {
                let k = usize::from(key) % n;
                let f = family.map(|f| usize::from(f) % 3);
                let until = now + Duration::from_millis(u64::from(millis % 100_000));
                let got = pool.hint(ids[k], f.map(|f| Family::of(FAMILIES[f])), until, now);
                let want = model.hint(
                    k,
                    f.map_or(0, |f| f + 1),
                    now_ns.saturating_add(ns(until - now)),
                    now_ns,
                );
                assert_eq!(got, want, "hint");
            }
            Op::Portable {
                key,
                kind,
                generation,
                secs,
                reason,
            } => {
                let k = usize::from(key) % n;
                let generation = u64::from(generation % 4);
                let wall = wall_at(0) + elapsed;
                let (change, deadline, disable) = match kind % 3 {
                    0 => {
                        let until = wall_at(i32::from(secs)) + elapsed;
                        let until = WallTime::from_system(until);
                        let left = until.saturating_since(WallTime::from_system(wall));
                        let deadline = now_ns.saturating_add(ns(left)).min(MAX_DEADLINE_NS);
                        let reason = cool_reason(reason);
                        (Change::CoolUntil { until, reason }, Some(deadline), None)
                    }
                    1 => {
                        let reason = disable_reason(reason);
                        (Change::Disable { reason }, None, Some(reason))
                    }
                    _ => (Change::Enable, None, None),
                };
                if generation > model.gens[k] {
                    enabled = Some(k); // a newer generation clears first: an enable
                }
                let mark = Mark {
                    generation,
                    ..pool.mark_for(ids[k], change)
                };
                log.push((mark, now, wall));
                let cool = match change {
                    Change::CoolUntil { reason, .. } => reason,
                    _ => CoolReason::RateLimited,
                };
                let want = model.portable(k, generation, deadline, disable, cool, now_ns);
                assert_eq!(pool.apply(&mark, now, wall), want, "{mark:?}");
            }
            Op::Advance(ms) => elapsed += Duration::from_millis(u64::from(ms % 100_000)),
            Op::AdvanceYears(y) => elapsed += Duration::from_secs(u64::from(y) * 365 * 24 * 3600),
        }

        let now = origin + elapsed;
        let now_ns = ns(elapsed);
        for (i, &id) in ids.iter().enumerate() {
            let after = raw(&pool, id);
            assert!(
                same(after, model.keys[i]),
                "key {i}: pool {after:?}, model {:?}",
                model.keys[i]
            );
            assert_eq!(pool.state(id, now).is_available(), model.is_free(i, now_ns));
            assert_eq!(pool.generation(id), model.gens[i], "key {i}: generation");
            // Invariant 2.
            if enabled != Some(i) {
                match (before[i], after) {
                    (MKey::Disabled(_), after) => {
                        assert!(
                            matches!(after, MKey::Disabled(_)),
                            "disabled key revived without enable"
                        );
                    }
                    (MKey::Timed { until: a, .. }, MKey::Timed { until: b, .. }) => {
                        assert!(b >= a, "cooldown deadline decreased");
                    }
                    (MKey::Timed { .. }, MKey::Disabled(_)) => {}
                }
            }
        }
    }
    // Invariants 9 and 10: the same marks applied in reverse order (each with the clock readings
    // it was made with) leave a fresh pool in the same state.
    let Ok(replay) = Pool::new(
        (0..n).map(|i| format!("sk-ant-api03-fuzz-{i:02}-0123456789abcdef")),
        order,
        origin,
    ) else {
        panic!("a valid key list was rejected");
    };
    for (mark, now, wall) in log.iter().rev() {
        let _ = replay.apply(mark, *now, *wall);
    }
    for &id in &ids {
        assert_eq!(
            raw(&replay, id),
            raw(&pool, id),
            "key {id:?} differs after a reverse replay"
        );
        assert_eq!(replay.generation(id), pool.generation(id));
        let mut a = replay.family_cooldowns(id, origin);
        let mut b = pool.family_cooldowns(id, origin);
        a.sort_by_key(|(f, ..)| *f);
        b.sort_by_key(|(f, ..)| *f);
        assert_eq!(a, b, "key {id:?}: family cooldowns differ after a reverse replay");
    }
}

/// The headers the retry-delay fuzz body fills with arbitrary bytes: the standard retry headers
/// and OpenAI's rate-limit headers.
const RETRY_HEADERS: [&str; 7] = [
    "retry-after-ms",
    "retry-after",
    "date",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// Arbitrary bytes for `retry-after-ms`, `retry-after`, `date` and OpenAI's
/// `x-ratelimit-{remaining,reset}-{requests,tokens}`, an arbitrary error body (raw, or an OpenAI
/// error whose message is arbitrary), and an arbitrary wall clock and cap: never panics, every
/// delay is within [1 ms, cap] (1 ms if the cap is below it), and a 429 that cools does so for
/// exactly the retry delay.
pub fn retry_delay(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut headers = HeaderMap::new();
    for name in RETRY_HEADERS {
        let Ok(bytes) = <Option<&[u8]>>::arbitrary(&mut u) else {
            return;
        };
        if let Some(Ok(v)) = bytes.map(HeaderValue::from_bytes) {
            headers.insert(name, v);
        }
    }
    let (Ok(wall_secs), Ok(cap_ms), Ok(default_ms), Ok(wrap), Ok(text)) = (
        u.arbitrary::<u32>(),
        u.arbitrary::<u32>(),
        u.arbitrary::<u32>(),
        u.arbitrary::<bool>(),
        <&str>::arbitrary(&mut u),
    ) else {
        return;
    };
    // The parsers alone, on the raw text.
    let _ = crate::profile::openai::parse_go_duration(text);
    let _ = crate::profile::openai::message_delay(text);
    let body = if wrap {
        serde_json::json!({"error": {"message": text, "type": "requests", "param": null, "code": "rate_limit_exceeded"}})
            .to_string()
            .into_bytes()
    } else {
        text.as_bytes().to_vec()
    };
    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(wall_secs) * 4);
    let configured = Policy {
        max_cooldown: Duration::from_millis(u64::from(cap_ms)),
        default_cooldown: Duration::from_millis(u64::from(default_ms)),
        ..Policy::default()
    };
    for policy in [Policy::default(), configured] {
        let d = policy.retry_delay(&headers, wall);
        assert!(
            d >= Duration::from_millis(1),
            "zero or sub-millisecond delay {d:?}"
        );
        assert!(
            d <= policy.max_cooldown.max(Duration::from_millis(1)),
            "delay {d:?} above the cap {:?}",
            policy.max_cooldown
        );
        let v = policy.classify(StatusCode::TOO_MANY_REQUESTS, &headers, b"", wall);
        assert_eq!(
            v,
            Verdict::CoolDown {
                duration: d,
                reason: CoolReason::RateLimited
            }
        );

        let openai = crate::profile::Profile::openai();
        let d = openai.retry_delay(&policy, &headers, &body, wall);
        assert!(d >= Duration::from_millis(1), "OpenAI: zero delay {d:?}");
        assert!(
            d <= policy.max_cooldown.max(Duration::from_millis(1)),
            "OpenAI: delay {d:?} above the cap {:?}",
            policy.max_cooldown
        );
        match openai.classify(&policy, StatusCode::TOO_MANY_REQUESTS, &headers, &body, wall) {
            Verdict::CoolDown { duration, reason } => {
                assert_eq!((duration, reason), (d, CoolReason::RateLimited));
            }
            // "Request too large" is delivered; an arbitrary text never names a billing code
            // inside this wrapped body, but a raw body may.
            Verdict::Deliver => {}
            Verdict::Disable { reason } => assert_eq!(reason, DisableReason::Billing),
        }
        let _ = openai.exhaustion_hint(&headers, wall);
        let _ = openai.in_band_status(&body);
    }
}
