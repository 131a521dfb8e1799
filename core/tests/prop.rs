//! Property tests of the pool, the walker and retry-delay parsing against a plain reference
//! model (SPEC §8 invariants 1, 2, 3 and 9).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::model::{MState, MWalker, Model, Seen};
use http::{HeaderMap, HeaderValue, StatusCode};
use keypool_core::{
    CoolReason, DisableReason, Exhausted, KeyId, KeyState, OnForbidden, OnUnauthorized, Order, Policy, Pool,
    Verdict, Walker,
};
use proptest::prelude::*;

const CREDIT_BODY: &[u8] = br#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#;
const YEAR: u64 = 365 * 24 * 3600;

/// 2026-01-01T00:00:00Z, the wall clock at the pool's origin.
fn wall_origin() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn cool_reason() -> impl Strategy<Value = CoolReason> {
    prop_oneof![
        Just(CoolReason::RateLimited),
        Just(CoolReason::Auth),
        Just(CoolReason::Overloaded)
    ]
}

fn disable_reason() -> impl Strategy<Value = DisableReason> {
    prop_oneof![
        Just(DisableReason::Unauthorized),
        Just(DisableReason::Forbidden),
        Just(DisableReason::Billing),
        Just(DisableReason::Operator),
    ]
}

/// Cooldowns: mostly seconds-scale, some sub-millisecond, some absurd.
fn delay() -> impl Strategy<Value = Duration> {
    prop_oneof![
        6 => (0u64..120_000).prop_map(Duration::from_millis),
        2 => (0u64..2_000_000).prop_map(Duration::from_nanos),
        1 => any::<u64>().prop_map(Duration::from_nanos),
        1 => (0u64..500 * YEAR).prop_map(Duration::from_secs),
        1 => Just(Duration::MAX),
    ]
}

/// Clock jumps: mostly small, sometimes huge (past the pool's ~146-year deadline range).
fn advance() -> impl Strategy<Value = Duration> {
    prop_oneof![
        8 => (0u64..5_000_000_000).prop_map(Duration::from_nanos),
        2 => (0u64..90).prop_map(Duration::from_secs),
        1 => (0u64..200 * YEAR).prop_map(Duration::from_secs),
    ]
}

/// A header value for `retry-after` or `retry-after-ms`: numbers, HTTP-dates relative to the
/// wall clock, and junk.
fn retry_value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..100_000).prop_map(|n| n.to_string()),
        (0u64..1000, 0u64..1000).prop_map(|(a, b)| format!("{a}.{b}")),
        (-100_000i64..100_000).prop_map(|s| {
            let at = if s >= 0 {
                wall_origin() + Duration::from_secs(s.unsigned_abs())
            } else {
                wall_origin() - Duration::from_secs(s.unsigned_abs())
            };
            httpdate::fmt_http_date(at)
        }),
        "[ -~]{0,12}",
        Just("99999999999999999999999".to_owned()),
    ]
}

#[derive(Debug, Clone, Default)]
struct RetryHeaders {
    ms: Option<String>,
    after: Option<String>,
    date: Option<String>,
}

fn retry_headers() -> impl Strategy<Value = RetryHeaders> {
    (
        proptest::option::of(retry_value()),
        proptest::option::of(retry_value()),
        proptest::option::of((-100_000i64..100_000).prop_map(|s| {
            httpdate::fmt_http_date(if s >= 0 {
                wall_origin() + Duration::from_secs(s.unsigned_abs())
            } else {
                wall_origin() - Duration::from_secs(s.unsigned_abs())
            })
        })),
    )
        .prop_map(|(ms, after, date)| RetryHeaders { ms, after, date })
}

impl RetryHeaders {
    fn to_map(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, v) in [
            ("retry-after-ms", &self.ms),
            ("retry-after", &self.after),
            ("date", &self.date),
        ] {
            if let Some(Ok(v)) = v.as_deref().map(HeaderValue::from_str) {
                h.insert(name, v);
            }
        }
        h
    }
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(delay()),
        delay(),
    )
        .prop_map(|(cool_401, deliver_403, billing, overloaded, unauth)| {
            let mut p = Policy::default();
            if cool_401 {
                p.on_unauthorized = OnUnauthorized::CoolFor(unauth);
            }
            if deliver_403 {
                p.on_forbidden = OnForbidden::Deliver;
            }
            p.disable_on_billing = billing;
            p.cool_on_overloaded = overloaded;
            p
        })
}

fn status() -> impl Strategy<Value = (u16, bool)> {
    (
        prop::sample::select(vec![
            200u16, 201, 400, 401, 402, 403, 404, 413, 429, 429, 429, 500, 503, 529,
        ]),
        any::<bool>(),
    )
}

#[derive(Debug, Clone)]
enum Op {
    NewWalk,
    Pick {
        walker: usize,
    },
    /// An upstream answer for `key`, classified by a policy and applied to the pool.
    Mark {
        key: usize,
        status: u16,
        credit_body: bool,
        headers: RetryHeaders,
        policy: Box<Policy>,
    },
    Cool {
        key: usize,
        dur: Duration,
        reason: CoolReason,
    },
    Disable {
        key: usize,
        reason: DisableReason,
    },
    Enable {
        key: usize,
    },
    Advance(Duration),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::NewWalk),
        6 => (0usize..8).prop_map(|walker| Op::Pick { walker }),
        4 => (0usize..16, status(), retry_headers(), policy()).prop_map(
            |(key, (status, credit_body), headers, policy)| Op::Mark {
                key,
                status,
                credit_body,
                headers,
                policy: Box::new(policy),
            }
        ),
        3 => (0usize..16, delay(), cool_reason()).prop_map(|(key, dur, reason)| Op::Cool { key, dur, reason }),
        1 => (0usize..16, disable_reason()).prop_map(|(key, reason)| Op::Disable { key, reason }),
        1 => (0usize..16).prop_map(|key| Op::Enable { key }),
        3 => advance().prop_map(Op::Advance),
    ]
}

fn order() -> impl Strategy<Value = Order> {
    prop_oneof![Just(Order::PrimaryWithFallback), Just(Order::RoundRobin)]
}

// ---------------------------------------------------------------------------------------------
// The harness

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The pool's state word as seen from the origin: the raw deadline (even if expired) or the
/// disabled reason, in the model's terms.
fn raw(pool: &Pool, id: KeyId) -> MState {
    match pool.state(id, pool.origin()) {
        KeyState::Available => MState::Timed {
            until: 0,
            reason: CoolReason::RateLimited,
        },
        KeyState::Cooling { until, reason } => MState::Timed {
            until: ns(until - pool.origin()),
            reason,
        },
        KeyState::Disabled { reason } => MState::Disabled(reason),
    }
}

fn seen(pool: &Pool, id: KeyId, now: Instant) -> Seen {
    match pool.state(id, now) {
        KeyState::Available => Seen::Available,
        KeyState::Cooling { until, reason } => Seen::Cooling(ns(until - pool.origin()), reason),
        KeyState::Disabled { reason } => Seen::Disabled(reason),
    }
}

fn same_raw(a: MState, b: MState) -> bool {
    // A never-marked key and an enabled key are both word 0, whatever the model's reason.
    match (a, b) {
        (MState::Timed { until: 0, .. }, MState::Timed { until: 0, .. }) => true,
        _ => a == b,
    }
}

struct Walk {
    real: Walker,
    model: MWalker,
    yielded: Vec<usize>,
    exhausted: bool,
}

fn run(n: usize, order: Order, ops: &[Op]) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let pool = common::pool(n, order, t0);
    let ids: Vec<KeyId> = pool.ids().collect();
    let mut model = Model::new(n, order);
    let mut walks: Vec<Walk> = Vec::new();
    let mut elapsed = Duration::ZERO;

    for op in ops {
        let now = t0 + elapsed;
        let now_ns = ns(elapsed);
        let before: Vec<MState> = ids.iter().map(|&id| raw(&pool, id)).collect();
        let mut enabled: Option<usize> = None;
        match op {
            Op::NewWalk => {
                if walks.len() == 8 {
                    walks.remove(0);
                }
                walks.push(Walk {
                    real: pool.walk(),
                    model: model.walk(),
                    yielded: Vec::new(),
                    exhausted: false,
                });
            }
            Op::Pick { walker } => {
                if walks.is_empty() {
                    continue;
                }
                let i = walker % walks.len();
                let w = &mut walks[i];
                let got = w.real.next_key(&pool, now);
                let want = model.next_key(&mut w.model, now_ns);
                prop_assert_eq!(got.map(KeyId::index), want, "walker {} at {:?}", i, elapsed);
                match got {
                    Ok(k) => {
                        // Invariant 1.
                        prop_assert!(!w.yielded.contains(&k.index()), "key {} yielded twice", k.index());
                        prop_assert!(pool.state(k, now).is_available());
                        w.yielded.push(k.index());
                        prop_assert_eq!(w.real.attempts(), w.yielded.len());
                        prop_assert!(w.yielded.len() <= n);
                    }
                    Err(e) => {
                        w.exhausted = true;
                        // Invariant 3, stated directly as well as through the model.
                        let states: Vec<KeyState> = ids.iter().map(|&id| pool.state(id, now)).collect();
                        match e {
                            Exhausted::AllDisabled => {
                                prop_assert!(states.iter().all(KeyState::is_disabled));
                            }
                            Exhausted::RateLimited { retry_after } => {
                                prop_assert!(retry_after > Duration::ZERO);
                                prop_assert!(!states.iter().all(KeyState::is_disabled));
                                let soonest = states
                                    .iter()
                                    .filter_map(|s| match s {
                                        KeyState::Cooling { until, .. } => Some(*until - now),
                                        _ => None,
                                    })
                                    .min();
                                let any_free = states.iter().any(KeyState::is_available);
                                let expect = match (soonest, any_free) {
                                    (Some(s), true) => s.min(keypool_core::walk::MIN_RETRY_AFTER),
                                    (Some(s), false) => s,
                                    (None, _) => keypool_core::walk::MIN_RETRY_AFTER,
                                };
                                prop_assert_eq!(retry_after, expect);
                            }
                        }
                    }
                }
            }
            Op::Mark {
                key,
                status,
                credit_body,
                headers,
                policy,
            } => {
                let k = key % n;
                let body: &[u8] = if *credit_body { CREDIT_BODY } else { b"{}" };
                let verdict = policy.classify(
                    StatusCode::from_u16(*status).unwrap(),
                    &headers.to_map(),
                    body,
                    wall_origin() + elapsed,
                );
                match verdict {
                    Verdict::Deliver => {}
                    Verdict::CoolDown { duration, reason } => {
                        prop_assert!(duration >= Duration::from_millis(1));
                        prop_assert!(duration <= policy.max_cooldown);
                        let got = pool.cool_down(ids[k], now, duration, reason);
                        prop_assert_eq!(got, model.cool_down(k, now_ns, duration, reason));
                    }
                    Verdict::Disable { reason } => {
                        let got = pool.disable(ids[k], reason);
                        prop_assert_eq!(got, model.disable(k, reason));
                    }
                }
            }
            Op::Cool { key, dur, reason } => {
                let k = key % n;
                let got = pool.cool_down(ids[k], now, *dur, *reason);
                prop_assert_eq!(got, model.cool_down(k, now_ns, *dur, *reason));
            }
            Op::Disable { key, reason } => {
                let k = key % n;
                prop_assert_eq!(pool.disable(ids[k], *reason), model.disable(k, *reason));
            }
            Op::Enable { key } => {
                let k = key % n;
                enabled = Some(k);
                prop_assert_eq!(pool.enable(ids[k], now), model.enable(k, now_ns));
            }
            Op::Advance(d) => elapsed += *d,
        }

        // The whole state agrees with the model, both as raw words and as seen at `now`.
        let now = t0 + elapsed;
        let now_ns = ns(elapsed);
        for (i, &id) in ids.iter().enumerate() {
            prop_assert!(
                same_raw(raw(&pool, id), model.keys[i]),
                "key {}: pool {:?}, model {:?}",
                i,
                raw(&pool, id),
                model.keys[i]
            );
            prop_assert_eq!(seen(&pool, id, now), model.seen(i, now_ns), "key {}", i);
            // Invariant 2: deadlines never decrease, disabled stays disabled, except by enable.
            if enabled != Some(i) {
                match (before[i], raw(&pool, id)) {
                    (MState::Disabled(_), after) => {
                        prop_assert!(matches!(after, MState::Disabled(_)), "key {} revived", i);
                    }
                    (MState::Timed { until: a, .. }, MState::Timed { until: b, .. }) => {
                        prop_assert!(b >= a, "key {}: deadline went from {} to {}", i, a, b);
                    }
                    (MState::Timed { .. }, MState::Disabled(_)) => {}
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Invariants 1–3 over random sequences of walks, picks, classified marks, raw cooldowns,
    /// disables, enables and clock jumps, against the reference model.
    #[test]
    fn pool_matches_model(n in 1usize..=8, order in order(), ops in prop::collection::vec(op(), 1..80)) {
        run(n, order, &ops)?;
    }

    /// Larger pools (walker bitsets above 64 keys spill to the heap).
    #[test]
    fn big_pool_matches_model(n in 60usize..=70, order in order(), ops in prop::collection::vec(op(), 1..200)) {
        run(n, order, &ops)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Invariant 9: marks commute

#[derive(Debug, Clone)]
enum Mark {
    Cool {
        key: usize,
        at: Duration,
        dur: Duration,
        reason: CoolReason,
    },
    Disable {
        key: usize,
        reason: DisableReason,
    },
}

fn mark() -> impl Strategy<Value = Mark> {
    prop_oneof![
        6 => (0usize..4, (0u64..20).prop_map(Duration::from_secs), delay(), cool_reason())
            .prop_map(|(key, at, dur, reason)| Mark::Cool { key, at, dur, reason }),
        // Equal deadlines with different reasons are the interesting ties.
        2 => (0usize..4, (0u64..3).prop_map(Duration::from_secs), (1u64..3).prop_map(Duration::from_secs), cool_reason())
            .prop_map(|(key, at, dur, reason)| Mark::Cool { key, at, dur, reason }),
        1 => (0usize..4, disable_reason()).prop_map(|(key, reason)| Mark::Disable { key, reason }),
    ]
}

fn apply(pool: &Pool, marks: &[Mark]) {
    let ids: Vec<KeyId> = pool.ids().collect();
    for m in marks {
        match *m {
            Mark::Cool { key, at, dur, reason } => {
                let _ = pool.cool_down(ids[key], pool.origin() + at, dur, reason);
            }
            Mark::Disable { key, reason } => {
                let _ = pool.disable(ids[key], reason);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Invariant 9: the same marks in any order leave the same state.
    #[test]
    fn marks_commute(
        (marks, shuffled) in prop::collection::vec(mark(), 0..24)
            .prop_flat_map(|m| (Just(m.clone()), Just(m).prop_shuffle()))
    ) {
        let t0 = Instant::now();
        let a = common::pool(4, Order::PrimaryWithFallback, t0);
        let b = common::pool(4, Order::PrimaryWithFallback, t0);
        apply(&a, &marks);
        apply(&b, &shuffled);
        // The state seen from the origin shows the raw word: deadline and reason, or disabled.
        for id in a.ids() {
            prop_assert_eq!(a.state(id, t0), b.state(id, t0));
            for probe in [1u64, 5, 30, 3600, 10 * YEAR] {
                let now = t0 + Duration::from_secs(probe);
                prop_assert_eq!(a.state(id, now), b.state(id, now));
            }
        }
        // And both agree with the model applied in the original order.
        let mut model = Model::new(4, Order::PrimaryWithFallback);
        for m in &marks {
            match *m {
                Mark::Cool { key, at, dur, reason } => {
                    let _ = model.cool_down(key, ns(at), dur, reason);
                }
                Mark::Disable { key, reason } => {
                    let _ = model.disable(key, reason);
                }
            }
        }
        for (i, id) in a.ids().enumerate() {
            prop_assert!(same_raw(raw(&a, id), model.keys[i]), "{:?} vs {:?}", raw(&a, id), model.keys[i]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Retry delays

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Whatever the headers, the delay is within [1 ms, cap] and nothing panics.
    #[test]
    fn retry_delay_is_always_in_range(h in retry_headers(), cap_ms in prop_oneof![Just(3_600_000u64), 0u64..100_000]) {
        let mut p = Policy::default();
        p.max_cooldown = Duration::from_millis(cap_ms);
        let d = p.retry_delay(&h.to_map(), wall_origin());
        prop_assert!(d >= Duration::from_millis(1));
        prop_assert!(d <= p.max_cooldown.max(Duration::from_millis(1)));
    }

    /// Arbitrary bytes in the three headers never panic.
    #[test]
    fn retry_delay_survives_any_bytes(
        ms in prop::collection::vec(any::<u8>(), 0..40),
        after in prop::collection::vec(any::<u8>(), 0..40),
        date in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut h = HeaderMap::new();
        for (name, v) in [("retry-after-ms", ms), ("retry-after", after), ("date", date)] {
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                h.insert(name, v);
            }
        }
        let d = Policy::default().retry_delay(&h, wall_origin());
        prop_assert!(d >= Duration::from_millis(1) && d <= Duration::from_secs(3600));
    }

    /// Integer and decimal seconds and milliseconds parse exactly (below the cap).
    #[test]
    fn decimal_values_parse_exactly(int in 0u64..4000, frac in 0u32..1000, digits in 1usize..=3, ms_header in any::<bool>()) {
        let frac = frac % 10u32.pow(u32::try_from(digits).unwrap());
        let text = format!("{int}.{frac:0digits$}");
        let unit_ns: u64 = if ms_header { 1_000_000 } else { 1_000_000_000 };
        let exact = int * unit_ns + u64::from(frac) * (unit_ns / 10u64.pow(u32::try_from(digits).unwrap()));
        let mut h = HeaderMap::new();
        h.insert(if ms_header { "retry-after-ms" } else { "retry-after" }, HeaderValue::from_str(&text).unwrap());
        let d = Policy::default().retry_delay(&h, wall_origin());
        let want = if exact == 0 {
            Duration::from_secs(60)
        } else {
            Duration::from_nanos(exact).clamp(Duration::from_millis(1), Duration::from_secs(3600))
        };
        prop_assert_eq!(d, want, "{}", text);
    }

    /// An HTTP-date `offset` seconds after the response `date` (or the wall clock) gives
    /// `offset` seconds; one in the past, or now, gives the default.
    #[test]
    fn http_dates_measure_from_the_response_date(offset in -10_000i64..10_000, with_date in any::<bool>(), skew in 0u64..100_000) {
        let base = if with_date { wall_origin() - Duration::from_secs(skew) } else { wall_origin() };
        let at = if offset >= 0 {
            base + Duration::from_secs(offset.unsigned_abs())
        } else {
            base - Duration::from_secs(offset.unsigned_abs())
        };
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap());
        if with_date {
            h.insert("date", HeaderValue::from_str(&httpdate::fmt_http_date(base)).unwrap());
        }
        let d = Policy::default().retry_delay(&h, wall_origin());
        let want = if offset > 0 {
            Duration::from_secs(offset.unsigned_abs()).min(Duration::from_secs(3600))
        } else {
            Duration::from_secs(60)
        };
        prop_assert_eq!(d, want);
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzz regressions (the bodies live in `keypool_core::fuzzing`, behind the `fuzzing` feature)

/// The `call_ops` body over its committed seed corpus, and over arbitrary bytes: no invariant
/// it checks (SPEC §8.1–8.6, outputs by phase, outcomes) may fail.
#[cfg(feature = "fuzzing")]
#[test]
fn fuzz_call_ops_seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/call_ops");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let input = std::fs::read(entry.unwrap().path()).unwrap();
        keypool_core::fuzzing::call::call_ops(&input, Instant::now());
        seeds += 1;
    }
    assert!(seeds > 0, "no seeds in {}", dir.display());
}

#[cfg(feature = "fuzzing")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn fuzz_call_ops_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        keypool_core::fuzzing::call::call_ops(&input, Instant::now());
    }
}

/// `pool_ops` once panicked inside its own harness: an HTTP-date offset before 1970 made
/// `httpdate::fmt_http_date` panic. The harness now keeps dates after the epoch.
#[cfg(feature = "fuzzing")]
#[test]
fn fuzz_pool_ops_regressions() {
    const PRE_EPOCH_DATE: &[u8] = &[
        0x1f, 0xfa, 0xd6, 0x25, 0xb1, 0x55, 0xa6, 0xa5, 0xa7, 0x6d, 0xae, 0x2e, 0xc3, 0xf7, 0x76, 0xa2, 0xb1,
        0x84, 0x98, 0xee, 0xef, 0x59, 0xab, 0x9e, 0xa0, 0xd7, 0xa6, 0x7d, 0xeb, 0x17, 0x5a, 0xd3, 0x24, 0x65,
        0x74, 0x95, 0xcb, 0x93, 0xb7, 0xd6, 0x06, 0xf1, 0x14, 0x63, 0x22, 0x62, 0x75, 0x06, 0x89, 0xd0, 0x17,
        0xc5, 0xe5, 0x67, 0x04, 0xf6, 0x64, 0x50, 0x42, 0x60, 0x02, 0x71, 0xa2, 0x21, 0xf5, 0x8a, 0x13, 0xec,
        0x9a, 0x86, 0x30, 0x6c, 0x6a, 0xfa, 0xe9, 0x0e, 0xbe, 0x6b, 0x08, 0xaa, 0x89, 0xe8, 0x70, 0x66, 0x83,
        0xa1, 0x7a, 0xd0, 0xb8, 0x51, 0xa6, 0x96, 0x4c, 0xf6, 0x2f, 0x67, 0x12, 0x28, 0x0c, 0x0f, 0x40, 0x10,
        0x6c, 0x79, 0x5b, 0x43, 0x23, 0x53, 0x42, 0x0a, 0x9c, 0xb3, 0x46, 0xce, 0x1e, 0x34, 0x27, 0x73, 0x44,
        0x36, 0xc9, 0x53, 0x95, 0x6c, 0x1d, 0xbb, 0x25, 0xd3, 0x24, 0x65, 0x74, 0x95, 0xcb, 0x93, 0xd1, 0x49,
        0xe1, 0x3d, 0xd2, 0xac, 0x2d, 0x0d, 0x90, 0x9a, 0xcb, 0x6c, 0xcb, 0x1a, 0x91, 0xba, 0x4f, 0x0a, 0x35,
        0xe3, 0xa2, 0xc9, 0x34, 0xa8, 0x3b, 0xda, 0x59, 0xcb, 0x5b, 0x39, 0xd9, 0xe6, 0x73, 0x96, 0x45, 0x94,
        0xd0, 0xf7, 0xbd, 0xfb, 0xa1, 0x67, 0xb3, 0xb5, 0x24, 0xb6, 0x5a, 0x34, 0xcc, 0x86, 0x1f, 0x53, 0xd6,
        0xbe, 0xf4, 0x95, 0xf6, 0x9c, 0x16, 0x17, 0x3e, 0x3c, 0x4b, 0x0b, 0xc0, 0x1e,
    ];
    for input in [
        PRE_EPOCH_DATE,
        b"",
        b"\x02\x00\x00\x01\x00\x01\x00\x01\x00\x01\x00",
    ] {
        keypool_core::fuzzing::pool::pool_ops(input, Instant::now());
    }
}

#[cfg(feature = "fuzzing")]
#[test]
fn fuzz_retry_delay_smoke() {
    for input in [&b""[..], b"\x01\x041500\x01\x0230\x00", &[0xff; 64]] {
        keypool_core::fuzzing::pool::retry_delay(input);
    }
    // Pseudo-random inputs spliced with the OpenAI forms (Go durations, "try again in").
    let pieces: [&[u8]; 8] = [
        b"6m0s",
        b"10.666s",
        b"12ms",
        b"1h2m3.5s",
        b"0",
        b"Please try again in 20ms.",
        b"Request too large",
        b"insufficient_quota",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..3000 {
        let mut input = Vec::new();
        for _ in 0..24 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                input.extend_from_slice(pieces[(x >> 8) as usize % pieces.len()]);
            } else {
                input.push((x >> 16) as u8);
            }
        }
        keypool_core::fuzzing::pool::retry_delay(&input);
    }
}

// ---------------------------------------------------------------------------------------------
// Invariant 10 (SPEC §9): portable marks from several replicas, enables included, converge

/// One portable mark as some replica made it: a key, what happened, and the generation the key
/// had there. Wall-clock deadlines are seconds after [`wall_origin`].
fn portable() -> impl Strategy<Value = (usize, u8, u64, u64, u8)> {
    (0usize..3, 0u8..4, 0u64..4, 0u64..40, 0u8..4)
}

fn to_mark(
    pool: &Pool,
    (key, kind, generation, secs, reason): (usize, u8, u64, u64, u8),
) -> keypool_core::Mark {
    let id = pool.key_at(key).unwrap();
    let change = match kind {
        0 => keypool_core::Change::CoolUntil {
            until: keypool_core::WallTime::from_system(wall_origin() + Duration::from_secs(secs)),
            reason: [CoolReason::RateLimited, CoolReason::Auth, CoolReason::Overloaded]
                [usize::from(reason % 3)],
        },
        1 => keypool_core::Change::Disable {
            reason: [
                DisableReason::Unauthorized,
                DisableReason::Forbidden,
                DisableReason::Billing,
                DisableReason::Operator,
            ][usize::from(reason)],
        },
        2 => keypool_core::Change::Enable,
        // A family-scoped cooldown (SPEC §11.2), for one of two families.
        _ => {
            let mark = pool.family_cool_mark(
                id,
                keypool_core::Family::of(if reason % 2 == 0 { "sonnet" } else { "haiku" }),
                wall_origin(),
                Duration::from_secs(secs),
                CoolReason::RateLimited,
            );
            return keypool_core::Mark { generation, ..mark };
        }
    };
    keypool_core::Mark {
        generation,
        status: None,
        ..pool.mark_for(id, change)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Marks and enables of several replicas, delivered to two pools in any two orders (and some
    /// delivered twice), leave both pools in the same state: same generation, same deadline and
    /// reason, same disabled state.
    #[test]
    fn portable_marks_converge_in_any_order(
        (marks, shuffled) in prop::collection::vec(portable(), 0..30)
            .prop_flat_map(|m| (Just(m.clone()), Just(m).prop_shuffle())),
        repeat in 0usize..30,
    ) {
        let t0 = Instant::now();
        let a = common::pool(3, Order::PrimaryWithFallback, t0);
        let b = common::pool(3, Order::PrimaryWithFallback, t0);
        for m in &marks {
            let _ = a.apply(&to_mark(&a, *m), t0, wall_origin());
        }
        for m in &shuffled {
            let _ = b.apply(&to_mark(&b, *m), t0, wall_origin());
        }
        if let Some(m) = marks.get(repeat) {
            // Delivered twice: idempotent.
            let _ = b.apply(&to_mark(&b, *m), t0, wall_origin());
        }
        for id in a.ids() {
            prop_assert_eq!(a.generation(id), b.generation(id));
            for probe in [0u64, 1, 5, 30, 3600] {
                let now = t0 + Duration::from_secs(probe);
                prop_assert_eq!(a.state(id, now), b.state(id, now));
                for f in ["sonnet", "haiku"] {
                    let f = keypool_core::Family::of(f);
                    prop_assert_eq!(a.family_state(id, f, now), b.family_state(id, f, now));
                }
            }
        }
    }

    /// An enable wins over every mark made before it (an older generation), whether that mark
    /// arrives before or after it, and loses to every mark made after it.
    #[test]
    fn an_enable_is_undone_only_by_a_later_mark(
        older in prop::collection::vec(portable(), 0..10),
        later in prop::option::of(portable()),
        enable_first in any::<bool>(),
    ) {
        let t0 = Instant::now();
        let p = common::pool(3, Order::PrimaryWithFallback, t0);
        let id = p.key_at(0).unwrap();
        // Every older mark is for key 0 at generation 0; the enable is generation 1.
        let older: Vec<_> = older.into_iter().map(|(_, k, _, s, r)| (0, if k == 2 { 3 } else { k }, 0, s, r)).collect();
        let enable = p.enable_mark(id);
        prop_assert_eq!(enable.generation, 1);
        if enable_first {
            let _ = p.apply(&enable, t0, wall_origin());
        }
        for m in &older {
            let _ = p.apply(&to_mark(&p, *m), t0, wall_origin());
        }
        if !enable_first {
            let _ = p.apply(&enable, t0, wall_origin());
        }
        prop_assert_eq!(p.state(id, t0), KeyState::Available);
        if let Some((_, kind, _, secs, reason)) = later {
            let m = to_mark(&p, (0, kind % 2, 1, secs.max(1), reason));
            let _ = p.apply(&m, t0, wall_origin());
            prop_assert!(!p.state(id, t0).is_available());
            // The enable arriving again (late duplicate) does not undo the later mark.
            let _ = p.apply(&enable, t0, wall_origin());
            prop_assert!(!p.state(id, t0).is_available());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SPEC §11.2 and §11.4: family-scoped cooldowns and soft hints

#[derive(Debug, Clone)]
enum Scoped {
    /// A hard cooldown of `key`, for every request (`family: None`) or one family.
    Cool {
        key: usize,
        family: Option<u8>,
        secs: u64,
    },
    Disable {
        key: usize,
    },
    /// A soft hint on `key`, key-wide or for one family.
    Hint {
        key: usize,
        family: Option<u8>,
        secs: u64,
    },
}

fn scoped() -> impl Strategy<Value = Scoped> {
    prop_oneof![
        3 => (0usize..5, prop::option::of(0u8..3), 0u64..20).prop_map(|(key, family, secs)| Scoped::Cool { key, family, secs }),
        1 => (0usize..5).prop_map(|key| Scoped::Disable { key }),
        3 => (0usize..5, prop::option::of(0u8..3), 0u64..20).prop_map(|(key, family, secs)| Scoped::Hint { key, family, secs }),
    ]
}

fn family(f: u8) -> keypool_core::Family {
    keypool_core::Family::of(["opus", "sonnet", "haiku"][usize::from(f)])
}

/// Applies the hard marks (and, if `hints`, the hints) to a fresh 5-key pool.
fn scoped_pool(t0: Instant, ops: &[Scoped], hints: bool) -> Pool {
    let p = common::pool(5, Order::PrimaryWithFallback, t0);
    for op in ops {
        match *op {
            Scoped::Cool { key, family: f, secs } => {
                let id = p.key_at(key).unwrap();
                let d = Duration::from_secs(secs);
                let mark = match f {
                    Some(f) => p.family_cool_mark(id, family(f), wall_origin(), d, CoolReason::RateLimited),
                    None => p.cool_mark(id, wall_origin(), d, CoolReason::RateLimited),
                };
                let _ = p.apply(&mark, t0, wall_origin());
            }
            Scoped::Disable { key } => {
                let _ = p.disable(p.key_at(key).unwrap(), DisableReason::Forbidden);
            }
            Scoped::Hint { key, family: f, secs } if hints => {
                let _ = p.hint(
                    p.key_at(key).unwrap(),
                    f.map(family),
                    t0 + Duration::from_secs(secs),
                    t0,
                );
            }
            Scoped::Hint { .. } => {}
        }
    }
    p
}

/// Every key a walk for `f` yields at `now`, and how it ended.
fn walk_all(p: &Pool, f: Option<u8>, now: Instant) -> (Vec<usize>, Exhausted) {
    let mut w = p.walk_for(f.map(family));
    let mut keys = Vec::new();
    loop {
        match w.next_key(p, now) {
            Ok(k) => keys.push(k.index()),
            Err(e) => return (keys, e),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A walk never yields a key that is hard-cooled for its family (or key-wide), hints never
    /// change which keys a walk yields nor how it ends (only the order: unhinted keys first),
    /// and family marks commute.
    #[test]
    fn family_marks_and_hints(
        (ops, shuffled) in prop::collection::vec(scoped(), 0..20).prop_flat_map(|o| (Just(o.clone()), Just(o).prop_shuffle())),
        f in prop::option::of(0u8..3),
        at in 0u64..25,
    ) {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(at);
        let hinted = scoped_pool(t0, &ops, true);
        let plain = scoped_pool(t0, &ops, false);
        let (keys, end) = walk_all(&hinted, f, now);
        let (plain_keys, plain_end) = walk_all(&plain, f, now);
        for &k in &keys {
            let id = hinted.key_at(k).unwrap();
            prop_assert!(hinted.state(id, now).is_available(), "key {k} is cooling key-wide");
            if let Some(f) = f {
                prop_assert!(hinted.family_state(id, family(f), now).is_available(), "key {k} is cooling for its family");
            }
        }
        let mut a = keys.clone();
        let mut b = plain_keys.clone();
        a.sort_unstable();
        b.sort_unstable();
        prop_assert_eq!(a, b, "hints changed which keys are used");
        prop_assert_eq!(end, plain_end, "hints changed how the walk ends");
        prop_assert_eq!(&plain_keys, &{ let mut k = plain_keys.clone(); k.sort_unstable(); k }, "primary order");
        // Unhinted keys first.
        let is_hinted: Vec<bool> = keys.iter().map(|&k| hinted.is_hinted_at(hinted.key_at(k).unwrap(), f.map(family), now)).collect();
        prop_assert!(is_hinted.windows(2).all(|w| !w[0] || w[1]), "a hinted key before an unhinted one: {keys:?} {is_hinted:?}");
        // The same hard marks in another order give the same walks.
        let other = scoped_pool(t0, &shuffled, false);
        for g in [None, Some(0), Some(1), Some(2)] {
            prop_assert_eq!(walk_all(&other, g, now), walk_all(&plain, g, now));
        }
    }
}
