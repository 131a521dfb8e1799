//! Pool, walker and mark behaviour (SPEC §2–3), on simulated time.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{key, ms, pool, secs};
use keypool_core::walk::MIN_RETRY_AFTER;
use keypool_core::{
    CoolReason, DisableReason, Exhausted, KeyId, KeySpec, KeyState, Order, Policy, Pool, PoolError, Secret,
    SecretError, Transition,
};

const RL: CoolReason = CoolReason::RateLimited;

fn id(pool: &Pool, i: usize) -> KeyId {
    pool.ids().nth(i).unwrap()
}

/// Every key a fresh walk yields at `now`, in order, and how it ends.
fn drain(pool: &Pool, now: Instant) -> (Vec<usize>, Exhausted) {
    let mut walk = pool.walk();
    let mut seen = Vec::new();
    loop {
        match walk.next_key(pool, now) {
            Ok(k) => seen.push(k.index()),
            Err(e) => return (seen, e),
        }
    }
}

#[test]
fn walk_yields_in_order_then_exhausts() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    let mut walk = p.walk();
    // Each key fails with a 429 as the call goes, as a real call would mark them.
    let delays = [secs(7), secs(4), secs(9)];
    for (i, d) in delays.into_iter().enumerate() {
        let k = walk.next_key(&p, t0).unwrap();
        assert_eq!(k.index(), i);
        assert_eq!(walk.attempts(), i + 1);
        assert_eq!(p.cool_down(k, t0, d, RL), Transition::Entered);
    }
    assert_eq!(
        walk.next_key(&p, t0),
        Err(Exhausted::RateLimited { retry_after: secs(4) })
    );
    // Exhaustion is stable: asking again gives the same answer and yields nothing.
    assert_eq!(
        walk.next_key(&p, t0 + secs(1)),
        Err(Exhausted::RateLimited { retry_after: secs(3) })
    );
    assert_eq!(walk.attempts(), 3);
}

#[test]
fn walker_never_yields_a_key_twice_even_when_unmarked() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    let (seen, end) = drain(&p, t0);
    assert_eq!(seen, [0, 1, 2]);
    // Every key was tried and is free again: the documented "frees up now" answer.
    assert_eq!(
        end,
        Exhausted::RateLimited {
            retry_after: MIN_RETRY_AFTER
        }
    );
}

#[test]
fn a_cooling_first_key_is_skipped() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    let _ = p.cool_down(id(&p, 0), t0, secs(10), RL);
    let (seen, _) = drain(&p, t0 + secs(5));
    assert_eq!(seen, [1, 2]);
    // Once the cooldown has passed the primary takes traffic again, with no action needed.
    let (seen, _) = drain(&p, t0 + secs(10));
    assert_eq!(seen, [0, 1, 2]);
}

#[test]
fn a_disabled_key_is_skipped() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    let _ = p.disable(id(&p, 1), DisableReason::Forbidden);
    let (seen, _) = drain(&p, t0);
    assert_eq!(seen, [0, 2]);
}

#[test]
fn cooldown_ends_exactly_at_its_deadline() {
    let t0 = Instant::now();
    let p = pool(1, Order::PrimaryWithFallback, t0);
    let k = id(&p, 0);
    let at = t0 + secs(3);
    assert_eq!(p.cool_down(k, at, secs(30), RL), Transition::Entered);
    let until = at + secs(30);
    let almost = at + ms(29_999);
    assert_eq!(p.state(k, almost), KeyState::Cooling { until, reason: RL });
    assert_eq!(
        p.walk().next_key(&p, almost),
        Err(Exhausted::RateLimited { retry_after: ms(1) })
    );
    // One nanosecond before: still cooling, and the retry delay is exactly that nanosecond.
    let just_before = until - Duration::from_nanos(1);
    assert!(p.state(k, just_before).is_cooling());
    assert_eq!(
        p.walk().next_key(&p, just_before),
        Err(Exhausted::RateLimited {
            retry_after: Duration::from_nanos(1)
        })
    );
    assert_eq!(p.state(k, until), KeyState::Available);
    assert_eq!(p.walk().next_key(&p, until), Ok(k));
}

#[test]
fn exhaustion_reports_the_soonest_cooldown() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    for (i, d) in [secs(5), secs(3), secs(10)].into_iter().enumerate() {
        let _ = p.cool_down(id(&p, i), t0, d, RL);
    }
    assert_eq!(
        drain(&p, t0),
        (vec![], Exhausted::RateLimited { retry_after: secs(3) })
    );
    assert_eq!(
        drain(&p, t0 + ms(2_500)),
        (vec![], Exhausted::RateLimited { retry_after: ms(500) })
    );
    // After the 3 s key frees up, the next soonest is the 5 s key.
    assert_eq!(drain(&p, t0 + secs(3)).0, [1]);
    let mut walk = p.walk();
    let k = walk.next_key(&p, t0 + secs(4)).unwrap();
    assert_eq!(k.index(), 1);
    let _ = p.cool_down(k, t0 + secs(4), secs(2), RL);
    assert_eq!(
        walk.next_key(&p, t0 + secs(4)),
        Err(Exhausted::RateLimited { retry_after: secs(1) })
    );
}

#[test]
fn cooling_and_disabled_is_rate_limited() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    let _ = p.disable(id(&p, 0), DisableReason::Unauthorized);
    let _ = p.cool_down(id(&p, 1), t0, secs(20), RL);
    let _ = p.disable(id(&p, 2), DisableReason::Billing);
    assert_eq!(
        drain(&p, t0 + secs(5)),
        (
            vec![],
            Exhausted::RateLimited {
                retry_after: secs(15)
            }
        )
    );
}

#[test]
fn all_disabled_is_all_disabled() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    for (i, r) in [
        DisableReason::Unauthorized,
        DisableReason::Forbidden,
        DisableReason::Billing,
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(p.disable(id(&p, i), r), Transition::Entered);
    }
    assert_eq!(drain(&p, t0), (vec![], Exhausted::AllDisabled));
    assert_eq!(drain(&p, t0 + secs(1_000_000)), (vec![], Exhausted::AllDisabled));
}

#[test]
fn a_key_tried_and_disabled_in_the_same_walk_counts_as_disabled() {
    let t0 = Instant::now();
    let p = pool(2, Order::PrimaryWithFallback, t0);
    let mut walk = p.walk();
    let a = walk.next_key(&p, t0).unwrap();
    let _ = p.disable(a, DisableReason::Unauthorized);
    let b = walk.next_key(&p, t0).unwrap();
    let _ = p.disable(b, DisableReason::Forbidden);
    assert_eq!(walk.next_key(&p, t0), Err(Exhausted::AllDisabled));
}

#[test]
fn cooldowns_only_grow() {
    let t0 = Instant::now();
    let p = pool(2, Order::PrimaryWithFallback, t0);
    let (a, b) = (id(&p, 0), id(&p, 1));

    assert_eq!(p.cool_down(a, t0, secs(60), RL), Transition::Entered);
    assert_eq!(p.cool_down(a, t0, secs(10), RL), Transition::Unchanged);
    assert_eq!(p.cool_down(a, t0 + secs(30), secs(30), RL), Transition::Unchanged);
    assert_eq!(
        p.state(a, t0),
        KeyState::Cooling {
            until: t0 + secs(60),
            reason: RL
        }
    );

    assert_eq!(p.cool_down(b, t0, secs(10), RL), Transition::Entered);
    assert_eq!(p.cool_down(b, t0, secs(60), RL), Transition::Extended);
    assert_eq!(
        p.state(b, t0),
        KeyState::Cooling {
            until: t0 + secs(60),
            reason: RL
        }
    );

    // A mark after an expired cooldown enters a new one.
    assert_eq!(p.cool_down(b, t0 + secs(61), secs(1), RL), Transition::Entered);
    // A zero cooldown never marks anything.
    assert_eq!(
        p.cool_down(a, t0 + secs(100), Duration::ZERO, RL),
        Transition::Unchanged
    );
    assert_eq!(p.state(a, t0 + secs(100)), KeyState::Available);
}

#[test]
fn cooldown_reason_is_kept() {
    let t0 = Instant::now();
    let p = pool(1, Order::PrimaryWithFallback, t0);
    let k = id(&p, 0);
    let _ = p.cool_down(k, t0, secs(5), CoolReason::Auth);
    assert_eq!(
        p.state(k, t0),
        KeyState::Cooling {
            until: t0 + secs(5),
            reason: CoolReason::Auth
        }
    );
    let _ = p.cool_down(k, t0, secs(6), CoolReason::Overloaded);
    assert_eq!(
        p.state(k, t0),
        KeyState::Cooling {
            until: t0 + secs(6),
            reason: CoolReason::Overloaded
        }
    );
}

#[test]
fn huge_cooldowns_saturate_instead_of_overflowing() {
    let t0 = Instant::now();
    let p = pool(1, Order::PrimaryWithFallback, t0);
    let k = id(&p, 0);
    assert_eq!(p.cool_down(k, t0, Duration::MAX, RL), Transition::Entered);
    let later = t0 + secs(100 * 365 * 24 * 3600);
    assert!(p.state(k, later).is_cooling());
    assert!(matches!(
        p.walk().next_key(&p, later),
        Err(Exhausted::RateLimited { .. })
    ));
    assert_eq!(p.cool_down(k, later, Duration::MAX, RL), Transition::Unchanged);
    // A `now` before the origin counts as the origin.
    let p = pool(1, Order::PrimaryWithFallback, t0 + secs(10));
    assert_eq!(p.cool_down(k, t0, secs(5), RL), Transition::Entered);
    assert_eq!(
        p.state(k, t0),
        KeyState::Cooling {
            until: t0 + secs(15),
            reason: RL
        }
    );
}

#[test]
fn disabled_is_terminal_until_enabled() {
    let t0 = Instant::now();
    let p = pool(2, Order::PrimaryWithFallback, t0);
    let k = id(&p, 0);
    assert_eq!(p.disable(k, DisableReason::Unauthorized), Transition::Entered);
    assert_eq!(p.disable(k, DisableReason::Unauthorized), Transition::Unchanged);
    // Never cooled again, however long the cooldown.
    assert_eq!(p.cool_down(k, t0, secs(10), RL), Transition::Unchanged);
    assert_eq!(p.cool_down(k, t0, Duration::MAX, RL), Transition::Unchanged);
    let far = t0 + secs(50 * 365 * 24 * 3600);
    for now in [t0, t0 + secs(11), far] {
        assert_eq!(
            p.state(k, now),
            KeyState::Disabled {
                reason: DisableReason::Unauthorized
            }
        );
        assert_eq!(drain(&p, now).0, [1]);
    }
    assert_eq!(p.enable(k, far), Transition::Entered);
    assert_eq!(p.state(k, far), KeyState::Available);
    assert_eq!(p.enable(k, far), Transition::Unchanged);
    assert_eq!(drain(&p, far).0, [0, 1]);
}

#[test]
fn enable_clears_a_cooldown() {
    let t0 = Instant::now();
    let p = pool(1, Order::PrimaryWithFallback, t0);
    let k = id(&p, 0);
    let _ = p.cool_down(k, t0, secs(3600), RL);
    assert_eq!(p.enable(k, t0 + secs(1)), Transition::Entered);
    assert_eq!(p.state(k, t0 + secs(1)), KeyState::Available);
    // After enable, marks work as on a fresh key.
    assert_eq!(p.cool_down(k, t0 + secs(1), secs(1), RL), Transition::Entered);
    // Enabling a key whose cooldown has already expired changes nothing.
    assert_eq!(p.enable(k, t0 + secs(2)), Transition::Unchanged);
}

#[test]
fn disabling_a_cooling_key_disables_it() {
    let t0 = Instant::now();
    let p = pool(1, Order::PrimaryWithFallback, t0);
    let k = id(&p, 0);
    let _ = p.cool_down(k, t0, secs(3600), RL);
    assert_eq!(p.disable(k, DisableReason::Operator), Transition::Entered);
    assert_eq!(
        p.state(k, t0),
        KeyState::Disabled {
            reason: DisableReason::Operator
        }
    );
    // Enable clears both: the cooldown from before the disable does not come back.
    assert_eq!(p.enable(k, t0), Transition::Entered);
    assert_eq!(p.state(k, t0), KeyState::Available);
}

#[test]
fn primary_with_fallback_always_starts_at_the_first_key() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    for _ in 0..5 {
        assert_eq!(p.walk().next_key(&p, t0).unwrap().index(), 0);
    }
}

#[test]
fn round_robin_walks_start_one_key_further_each_time() {
    let t0 = Instant::now();
    let p = pool(3, Order::RoundRobin, t0);
    assert_eq!(p.order(), Order::RoundRobin);
    let expected = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2], [1, 2, 0]];
    for want in expected {
        assert_eq!(drain(&p, t0).0, want);
    }
    // Skipping still works from a rotated start.
    let _ = p.cool_down(id(&p, 0), t0, secs(1), RL);
    assert_eq!(drain(&p, t0).0, [2, 1]);
}

#[test]
fn a_mark_by_another_call_is_seen_by_a_walk_in_progress() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    let mut mine = p.walk();
    assert_eq!(mine.next_key(&p, t0).unwrap().index(), 0);
    // Another call marks k1 while this walk is between attempts.
    let mut theirs = p.walk();
    let _ = theirs.next_key(&p, t0).unwrap();
    let k1 = theirs.next_key(&p, t0).unwrap();
    let _ = p.cool_down(k1, t0, secs(2), RL);
    assert_eq!(mine.next_key(&p, t0).unwrap().index(), 2);
}

#[test]
fn construction_errors_name_positions() {
    let t0 = Instant::now();
    let new = |ks: Vec<KeySpec>| Pool::new(ks, Order::default(), t0).map(|_| ());
    assert_eq!(
        Pool::new(Vec::<String>::new(), Order::default(), t0).map(|_| ()),
        Err(PoolError::Empty)
    );
    assert_eq!(
        new(vec![key(0).into(), "".into()]),
        Err(PoolError::Blank { position: 2 })
    );
    assert_eq!(
        new(vec![key(0).into(), key(1).into(), " \t ".into()]),
        Err(PoolError::Blank { position: 3 })
    );
    for bad in ["sk-ant\nx", "sk ant", "sk-ant-é", " sk-ant", "sk-ant\0"] {
        assert_eq!(
            new(vec![key(0).into(), key(1).into(), bad.into()]),
            Err(PoolError::NotHeaderValue { position: 3 }),
            "{bad:?}"
        );
    }
    assert_eq!(
        new(vec![key(0).into(), key(1).into(), key(0).into()]),
        Err(PoolError::Duplicate { first: 1, second: 3 })
    );
    let too_long = "a".repeat(65);
    for bad in ["", "team a", "team/a", "é", too_long.as_str()] {
        assert_eq!(
            new(vec![KeySpec::new(key(0)), KeySpec::labelled(bad, key(1))]),
            Err(PoolError::BadLabel { position: 2 }),
            "{bad:?}"
        );
    }
    assert!(new(vec![KeySpec::labelled("a".repeat(64), key(0))]).is_ok());
    assert!(new(vec![KeySpec::labelled("Team_a.1-x", key(0))]).is_ok());
    assert_eq!(
        new(vec![
            KeySpec::labelled("team-a", key(0)),
            KeySpec::new(key(1)),
            KeySpec::labelled("team-a", key(2)),
        ]),
        Err(PoolError::DuplicateLabel {
            label: "team-a".into(),
            first: 1,
            second: 3
        })
    );
    // The messages count from 1 as well, and never contain a key.
    let msg = PoolError::Duplicate { first: 1, second: 3 }.to_string();
    assert!(msg.contains("#1") && msg.contains("#3"), "{msg}");
    let msg = PoolError::NotHeaderValue { position: 4 }.to_string();
    assert!(msg.contains("#4"), "{msg}");
}

#[test]
fn labels_default_to_fingerprints_and_stay_unique() {
    let t0 = Instant::now();
    let p = Pool::new(
        vec![
            KeySpec::labelled("team-a", key(0)),
            KeySpec::new("sk-ant-api03-abcdefgh"),
            KeySpec::new("abc"),
            KeySpec::new("xyz"),
        ],
        Order::default(),
        t0,
    )
    .unwrap();
    assert_eq!(p.len(), 4);
    assert!(!p.is_empty());
    assert_eq!(p.label(id(&p, 0)), "team-a");
    // A default label is `key-` and the fingerprint's first hex digits: stable, URL-safe, and
    // not the provider prefix every key starts with.
    let fp = p.fingerprint(id(&p, 1)).to_string();
    assert_eq!(p.label(id(&p, 1)), format!("key-{}", &fp[..6]));
    assert!(!p.label(id(&p, 1)).contains("sk-"));
    assert_ne!(p.label(id(&p, 2)), p.label(id(&p, 3)));
    assert_eq!(p.find("team-a"), Some(id(&p, 0)));
    assert_eq!(p.find(&format!("key-{}", &fp[..6])), Some(id(&p, 1)));
    assert_eq!(p.find("nope"), None);
    assert_eq!(p.secret(id(&p, 1)).expose(), "sk-ant-api03-abcdefgh");
}

#[test]
fn reload_keeps_state_of_kept_keys() {
    let t0 = Instant::now();
    let p = std::sync::Arc::new(
        Pool::new(
            vec![
                KeySpec::labelled("a", key(0)),
                KeySpec::labelled("b", key(1)),
                KeySpec::labelled("c", key(2)),
            ],
            Order::PrimaryWithFallback,
            t0,
        )
        .unwrap(),
    );
    let _ = p.cool_down(id(&p, 1), t0, secs(30), RL);
    let _ = p.disable(id(&p, 2), DisableReason::Billing);
    let _ = p.cool_down(id(&p, 0), t0, secs(5), RL);

    // k0 dropped, k2 and k1 kept (reordered, relabelled), one new key.
    let q = p
        .reload(vec![
            KeySpec::labelled("c2", key(2)),
            KeySpec::new(key(9)),
            KeySpec::labelled("b", key(1)),
        ])
        .unwrap();
    let now = t0 + secs(1);
    assert_eq!(q.origin(), p.origin());
    assert_eq!(q.order(), p.order());
    assert_eq!(
        q.state(id(&q, 0), now),
        KeyState::Disabled {
            reason: DisableReason::Billing
        }
    );
    assert_eq!(q.state(id(&q, 1), now), KeyState::Available);
    assert_eq!(
        q.state(id(&q, 2), now),
        KeyState::Cooling {
            until: t0 + secs(30),
            reason: RL
        }
    );
    assert_eq!(q.label(id(&q, 0)), "c2");
    assert_eq!(drain(&q, now).0, [1]);
    // The old pool is untouched by marks on the new one.
    let _ = q.disable(id(&q, 1), DisableReason::Operator);
    assert_eq!(
        p.state(id(&p, 0), now),
        KeyState::Cooling {
            until: t0 + secs(5),
            reason: RL
        }
    );
    // A reload with an invalid list is an error, and names the position in the new list.
    assert_eq!(
        p.reload(vec![key(0), key(0)]).map(|_| ()),
        Err(PoolError::Duplicate { first: 1, second: 2 })
    );
}

#[test]
fn a_mark_on_a_replaced_pool_reaches_its_replacement() {
    // A call that began before a reload holds the old pool; its marks must land in the new one
    // (by fingerprint, whatever the new order), and in the one after that.
    let t0 = Instant::now();
    let p = std::sync::Arc::new(Pool::new(vec![key(0), key(1)], Order::default(), t0).unwrap());
    let q = p.reload(vec![key(3), key(1), key(0)]).unwrap();
    let r = q.reload(vec![key(0), key(1)]).unwrap();
    assert!(std::sync::Arc::ptr_eq(&p.live(), &r));
    let t = p.cool_down(id(&p, 1), t0, secs(30), RL);
    assert_eq!(t, Transition::Entered);
    let cooling = KeyState::Cooling {
        until: t0 + secs(30),
        reason: RL,
    };
    assert_eq!(q.state(id(&q, 1), t0), cooling);
    assert_eq!(r.state(id(&r, 1), t0), cooling);
    // Keys the new pool does not have are simply not marked there.
    let _ = p.disable(id(&p, 0), DisableReason::Billing);
    assert!(q.state(id(&q, 2), t0).is_disabled());
    assert!(r.state(id(&r, 0), t0).is_disabled());
    assert!(q.state(id(&q, 0), t0).is_available());
    // Reloading a replaced pool chains after the newest one.
    let s = p.reload(vec![key(1)]).unwrap();
    assert!(std::sync::Arc::ptr_eq(&r.live(), &s));
    assert_eq!(s.state(id(&s, 0), t0), cooling);
}

#[test]
fn snapshot_lists_labels_hints_and_states() {
    let t0 = Instant::now();
    let p = Pool::new(
        vec![
            KeySpec::labelled("a", "sk-ant-api03-abcdefgh"),
            KeySpec::new("sk-ant-api03-ijklmnop"),
        ],
        Order::default(),
        t0,
    )
    .unwrap();
    let _ = p.cool_down(id(&p, 0), t0, secs(5), RL);
    let snap = p.snapshot(t0 + secs(1));
    assert_eq!(snap.len(), 2);
    assert_eq!(snap[0].id, id(&p, 0));
    assert_eq!(snap[0].label, "a");
    assert_eq!(snap[0].hint, "sk-a...efgh");
    assert_eq!(
        snap[0].state,
        KeyState::Cooling {
            until: t0 + secs(5),
            reason: RL
        }
    );
    assert_eq!(
        snap[1].label,
        format!("key-{}", &p.fingerprint(id(&p, 1)).to_string()[..6])
    );
    assert_eq!(snap[1].hint, "sk-a...mnop");
    assert_eq!(snap[1].state, KeyState::Available);
    assert!(p.snapshot(t0 + secs(5)).iter().all(|k| k.state.is_available()));
}

#[test]
fn state_predicates() {
    let t0 = Instant::now();
    let c = KeyState::Cooling {
        until: t0,
        reason: RL,
    };
    let d = KeyState::Disabled {
        reason: DisableReason::Billing,
    };
    assert!(KeyState::Available.is_available() && !KeyState::Available.is_cooling());
    assert!(c.is_cooling() && !c.is_available() && !c.is_disabled());
    assert!(d.is_disabled() && !d.is_available() && !d.is_cooling());
}

/// Eight threads mark one key at once with random deadlines: the key ends at the maximum, and
/// exactly one mark saw the key enter its cooldown.
#[test]
fn concurrent_marks_leave_the_maximum() {
    use std::sync::{Arc, Barrier};
    let t0 = Instant::now();
    for round in 0..20u64 {
        let p = Arc::new(pool(2, Order::PrimaryWithFallback, t0));
        let k = id(&p, 0);
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let (p, barrier) = (Arc::clone(&p), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let mut rng = common::SplitMix(round * 1000 + t);
                    // Distinct per thread: the low bits carry the thread number.
                    let durs: Vec<Duration> = (0..500)
                        .map(|_| Duration::from_nanos(rng.range(1, 1 << 40) * 8 + t + 1))
                        .collect();
                    barrier.wait();
                    durs.iter()
                        .map(|&d| (d, p.cool_down(k, t0, d, RL)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<(Duration, Transition)> =
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let max = results.iter().map(|r| r.0).max().unwrap();
        assert_eq!(
            p.state(k, t0),
            KeyState::Cooling {
                until: t0 + max,
                reason: RL
            }
        );
        let entered = results.iter().filter(|r| r.1 == Transition::Entered).count();
        assert_eq!(entered, 1, "exactly one mark finds the key available");
        // The mark that set the maximum changed the state (its deadline is unique).
        let (_, t) = results.iter().find(|r| r.0 == max).unwrap();
        assert_ne!(*t, Transition::Unchanged);
        // A mark that changed nothing must not have been above every mark that did change it
        // before... at least: the changing marks' maximum is the final deadline.
        let changed_max = results
            .iter()
            .filter(|r| r.1 != Transition::Unchanged)
            .map(|r| r.0)
            .max()
            .unwrap();
        assert_eq!(changed_max, max);
        // The other key was never touched.
        assert_eq!(p.state(id(&p, 1), t0), KeyState::Available);
    }
}

#[test]
fn debug_never_shows_a_secret() {
    let t0 = Instant::now();
    let secrets = [
        "sk-ant-api03-Zq8RvLx3Kp0Wm5Tn9Yb2Hc7Jd4Fg6AAAAAAAAAAAAAAAAAA-uVwXyZ".to_owned(),
        "sk-ant-api03-Qm2Wn4Er6Ty8Ui0Op1As3Df5Gh7Jk9Lz0Xc2Vb4Nm6Qw8Er0Ty-AAAA".to_owned(),
        "sk-ant-admin01-Pl9Ok8Ij7Uh6Yg5Tf4Rd3Es2Wa1Qz0Xs9Cd8Vf7Bg6Nh5Mj4K".to_owned(),
    ];
    let pool = Pool::new(
        vec![
            KeySpec::labelled("team-a", secrets[0].clone()),
            KeySpec::new(secrets[1].clone()),
            KeySpec::new(secrets[2].clone()),
        ],
        Order::RoundRobin,
        t0,
    )
    .unwrap();
    let _ = pool.cool_down(id(&pool, 0), t0, secs(5), RL);
    let _ = pool.disable(id(&pool, 1), DisableReason::Billing);
    let mut walk = pool.walk();
    let picked = walk.next_key(&pool, t0).unwrap();
    let exhausted = walk.next_key(&pool, t0).unwrap_err();
    let verdict = Policy::default().classify(
        http::StatusCode::TOO_MANY_REQUESTS,
        &http::HeaderMap::new(),
        b"",
        SystemTime::UNIX_EPOCH,
    );
    let errors: Vec<String> = [
        Pool::new(vec![secrets[0].clone(), secrets[0].clone()], Order::default(), t0).unwrap_err(),
        Pool::new(
            vec![
                KeySpec::labelled("x", secrets[0].clone()),
                KeySpec::labelled("bad label", secrets[1].clone()),
            ],
            Order::default(),
            t0,
        )
        .unwrap_err(),
        Pool::new(
            vec![format!("{} ", secrets[0]), secrets[1].clone()],
            Order::default(),
            t0,
        )
        .unwrap_err(),
        Pool::new(
            vec![
                KeySpec::new(secrets[0].clone()),
                KeySpec::labelled(
                    format!(
                        "key-{}",
                        &keypool_core::Fingerprint::of(&Secret::new(secrets[0].clone()).unwrap()).to_string()
                            [..6]
                    ),
                    secrets[1].clone(),
                ),
            ],
            Order::default(),
            t0,
        )
        .unwrap_err(),
    ]
    .iter()
    .map(|e| format!("{e:?} {e}"))
    .chain(
        [SecretError::Blank, SecretError::NotHeaderValue]
            .iter()
            .map(|e| format!("{e:?} {e}")),
    )
    .collect();
    let specs: Vec<KeySpec> = secrets
        .iter()
        .map(|s| KeySpec::labelled("l", s.clone()))
        .chain([KeySpec::new(format!("{}\n", secrets[2]))])
        .collect();

    let mut outputs = vec![
        format!("{pool:?}"),
        format!("{pool:#?}"),
        format!("{picked:?}"),
        format!("{walk:?}"),
        format!("{exhausted:?}"),
        format!("{verdict:?}"),
        format!("{:?}", pool.snapshot(t0)),
        format!("{:#?}", pool.snapshot(t0)),
        format!("{specs:?}"),
        format!("{:?}", Secret::new(secrets[0].clone()).unwrap()),
        format!("{:?}", pool.secret(id(&pool, 2))),
        format!("{:?}", pool.secret(id(&pool, 2)).header_value()),
    ];
    outputs.extend(errors);
    for out in &outputs {
        for secret in &secrets {
            // The hint shows 4 characters at each end of a long key; no longer run may appear.
            let window = 5;
            for start in 0..=secret.len() - window {
                let piece = &secret[start..start + window];
                assert!(!out.contains(piece), "{piece:?} of a secret leaked into {out}");
            }
        }
    }
    // Sanity: the outputs do carry the hints.
    assert!(outputs[0].contains("team-a"), "{}", outputs[0]);
    assert!(outputs[6].contains("sk-a...Mj4K"), "{}", outputs[6]);
}

/// A key that was tried, cooled briefly and is free again by the end of the walk "frees up
/// now" (`MIN_RETRY_AFTER`), even when another key is cooling for longer: the caller should
/// retry at once, not after the longer cooldown.
#[test]
fn a_tried_key_that_is_free_again_counts_as_freeing_up_now() {
    let t0 = Instant::now();
    let p = pool(2, Order::PrimaryWithFallback, t0);
    let mut walk = p.walk();
    let a = walk.next_key(&p, t0).unwrap();
    let _ = p.cool_down(a, t0, ms(1), RL);
    let b = walk.next_key(&p, t0).unwrap();
    let _ = p.cool_down(b, t0, secs(10), RL);
    assert_eq!(
        walk.next_key(&p, t0 + ms(5)),
        Err(Exhausted::RateLimited {
            retry_after: MIN_RETRY_AFTER
        })
    );
    // A cooling key closer than 1 ms still wins the minimum.
    let p = pool(2, Order::PrimaryWithFallback, t0);
    let mut walk = p.walk();
    let _ = walk.next_key(&p, t0).unwrap();
    let b = walk.next_key(&p, t0).unwrap();
    let _ = p.cool_down(b, t0, Duration::from_micros(300), RL);
    assert_eq!(
        walk.next_key(&p, t0 + Duration::from_micros(100)),
        Err(Exhausted::RateLimited {
            retry_after: Duration::from_micros(200)
        })
    );
}

#[test]
fn hints_are_listed_key_wide_and_per_family() {
    let t0 = Instant::now();
    let p = pool(3, Order::PrimaryWithFallback, t0);
    let k = id(&p, 0);
    assert!(p.hints(k, t0).is_empty());
    let sonnet = keypool_core::Family::of("sonnet");
    assert!(p.hint(k, Some(sonnet), t0 + secs(10), t0));
    assert!(p.hint(k, None, t0 + secs(5), t0));
    let mut h = p.hints(k, t0);
    h.sort_by_key(|(f, _)| f.is_some());
    assert_eq!(h, vec![(None, t0 + secs(5)), (Some(sonnet), t0 + secs(10))]);
    assert_eq!(p.hints(k, t0 + secs(6)), vec![(Some(sonnet), t0 + secs(10))]);
    assert!(p.hints(id(&p, 1), t0).is_empty());
}
