//! SPEC invariant 10: marks and enables made concurrently on several replicas, delivered to the
//! store and back in any order, leave every replica and the store in the same state; an enable
//! is undone only by a mark made after it.
//!
//! `replicas_converge` runs the store's merge as its Rust twin ([`Stored::merge`]) under
//! proptest; `script_matches_its_rust_twin` runs the real script in a real `redis-server`
//! against the twin on random sequences, malformed stored values included.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keypool_core::{Change, CoolReason, DisableReason, Fingerprint, KeyState, Order, Pool};
use keypool_redis::value::{MERGE_SCRIPT, Stored, StoredState};
use proptest::prelude::*;

const KEYS: usize = 3;
const REPLICAS: usize = 3;

fn secrets() -> Vec<String> {
    (0..KEYS)
        .map(|i| format!("sk-ant-api03-conv{i}-{}", "Pq2Ws4Ed6Rf".repeat(3)))
        .collect()
}

/// What a replica does to a key.
#[derive(Debug, Clone, Copy)]
enum Act {
    Cool(u64, CoolReason),
    Disable(DisableReason),
    Enable,
}

/// One step of the world.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Replica `r` makes a mark on key `k` (applied locally at once; in flight to the store).
    Make { r: usize, k: usize, act: Act },
    /// The store merges in-flight mark number `i` (modulo the count).
    Deliver(usize),
    /// Replica `r` receives the store's current value of key `k` (a publish or a full read).
    Receive { r: usize, k: usize },
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        (
            1u64..5,
            prop_oneof![
                Just(CoolReason::RateLimited),
                Just(CoolReason::Auth),
                Just(CoolReason::Overloaded)
            ]
        )
            .prop_map(|(s, r)| Act::Cool(s * 1000, r)),
        prop_oneof![
            Just(DisableReason::Unauthorized),
            Just(DisableReason::Forbidden),
            Just(DisableReason::Billing),
            Just(DisableReason::Operator)
        ]
        .prop_map(Act::Disable),
        Just(Act::Enable),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..REPLICAS, 0..KEYS, act()).prop_map(|(r, k, act)| Step::Make { r, k, act }),
        any::<usize>().prop_map(Step::Deliver),
        (0..REPLICAS, 0..KEYS).prop_map(|(r, k)| Step::Receive { r, k }),
    ]
}

/// A replica's view of key `k` as a stored value, at the fixed clock readings of the test.
fn view(pool: &Pool, k: usize, now: Instant, wall_ms: u64) -> Stored {
    let fp = Fingerprint::of(&keypool_core::Secret::new(secrets()[k].as_str()).unwrap());
    let id = pool.find_fingerprint(fp).unwrap();
    let state = match pool.state(id, now) {
        KeyState::Available => StoredState::Available,
        KeyState::Cooling { until, reason } => StoredState::Cooling {
            until_ms: wall_ms + u64::try_from(until.duration_since(now).as_millis()).unwrap(),
            reason,
        },
        KeyState::Disabled { reason } => StoredState::Disabled { reason },
    };
    Stored {
        generation: pool.generation(id),
        state,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn replicas_converge(steps in proptest::collection::vec(step(), 1..60), orders in proptest::collection::vec(0usize..6, REPLICAS)) {
        let origin = Instant::now();
        let now = origin + Duration::from_secs(1);
        let wall = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let wall_ms = 1_700_000_000_000;
        let permutations = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        let keys = secrets();
        let pools: Vec<Arc<Pool>> = orders
            .iter()
            .map(|&o| Arc::new(Pool::new(permutations[o].iter().map(|&i| keys[i].clone()), Order::default(), origin).unwrap()))
            .collect();
        let fps: Vec<Fingerprint> = keys.iter().map(|k| Fingerprint::of(&keypool_core::Secret::new(k.as_str()).unwrap())).collect();
        let mut store: HashMap<Fingerprint, Stored> = HashMap::new();
        let mut in_flight: Vec<Stored> = Vec::new();
        let mut in_flight_keys: Vec<Fingerprint> = Vec::new();
        let mut made: Vec<(Fingerprint, Stored)> = Vec::new();
        let receive = |pool: &Pool, fp: Fingerprint, value: Stored| {
            let _ = pool.apply(&value.to_mark(keypool_redis::value::Field::key(fp)), now, wall);
        };
        for s in steps {
            match s {
                Step::Make { r, k, act } => {
                    let pool = &pools[r];
                    let id = pool.find_fingerprint(fps[k]).unwrap();
                    let mark = match act {
                        Act::Cool(ms, reason) => pool.cool_mark(id, wall, Duration::from_millis(ms), reason),
                        Act::Disable(reason) => pool.mark_for(id, Change::Disable { reason }),
                        Act::Enable => pool.enable_mark(id),
                    };
                    let _ = pool.apply(&mark, now, wall);
                    let value = Stored::from_mark(&mark, 0);
                    in_flight.push(value);
                    in_flight_keys.push(fps[k]);
                    made.push((fps[k], value));
                }
                Step::Deliver(i) if !in_flight.is_empty() => {
                    let i = i % in_flight.len();
                    let (fp, value) = (in_flight_keys.remove(i), in_flight.remove(i));
                    let merged = store.get(&fp).map_or(value, |s| s.merge(value));
                    store.insert(fp, merged);
                }
                Step::Deliver(_) => {}
                Step::Receive { r, k } => {
                    if let Some(&v) = store.get(&fps[k]) {
                        receive(&pools[r], fps[k], v);
                    }
                }
            }
        }
        // Deliver the rest, then every replica gets the final values (the backstop read).
        for (fp, value) in in_flight_keys.into_iter().zip(in_flight) {
            let merged = store.get(&fp).map_or(value, |s| s.merge(value));
            store.insert(fp, merged);
        }
        for pool in &pools {
            for (&fp, &v) in &store {
                receive(pool, fp, v);
            }
        }
        for (k, &fp) in fps.iter().enumerate() {
            // The store holds the maximum of every mark made for the key, whatever the order.
            let expected = made.iter().filter(|(f, _)| *f == fp).map(|&(_, v)| v).reduce(Stored::merge);
            prop_assert_eq!(store.get(&fp).copied(), expected);
            let expected = expected.unwrap_or(Stored::FRESH);
            for pool in &pools {
                prop_assert_eq!(view(pool, k, now, wall_ms), expected, "key {}", k);
            }
            // An enable is undone only by a mark made after it: a mark of its generation or a
            // later one (a generation exists only once an enable made it).
            let newest_enable = made
                .iter()
                .filter(|(f, v)| *f == fp && v.state == StoredState::Available && v.generation > 0)
                .map(|(_, v)| v.generation)
                .max();
            if let Some(g) = newest_enable {
                let undone = made.iter().any(|(f, v)| *f == fp && v.generation >= g && v.state != StoredState::Available);
                prop_assert_eq!(expected.state != StoredState::Available, undone);
            }
        }
    }
}

/// A small deterministic generator (the test must not depend on a crate for randomness).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_value(rng: &mut Rng) -> Stored {
    let generation = rng.below(3);
    let state = match rng.below(3) {
        0 => StoredState::Available,
        1 => StoredState::Cooling {
            until_ms: 1_700_000_000_000 + rng.below(4),
            reason: [CoolReason::RateLimited, CoolReason::Auth, CoolReason::Overloaded]
                [rng.below(3) as usize],
        },
        _ => StoredState::Disabled {
            reason: [
                DisableReason::Unauthorized,
                DisableReason::Forbidden,
                DisableReason::Billing,
                DisableReason::Operator,
            ][rng.below(4) as usize],
        },
    };
    Stored { generation, state }
}

/// The script in a real Redis keeps exactly what the Rust twin keeps, publishes exactly when
/// the value changed, and writes over a malformed stored value.
#[test]
fn script_matches_its_rust_twin() {
    let redis = keypool_redis::testing::RedisServer::start();
    let mut conn = redis.connection();
    let script = redis::Script::new(MERGE_SCRIPT);
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let fields: Vec<String> = (0..4u8)
        .map(|i| Fingerprint::from_bytes([i; 16]).to_string())
        .collect();
    let mut twin: HashMap<String, Stored> = HashMap::new();
    for round in 0..3000 {
        let field = &fields[rng.below(4) as usize];
        if rng.below(50) == 0 {
            // Someone writes garbage over the field.
            let _: () = redis::cmd("HSET")
                .arg("s:keys")
                .arg(field)
                .arg("garbage:1")
                .query(&mut conn)
                .unwrap();
            twin.remove(field);
        }
        let value = random_value(&mut rng);
        let stored_before: Option<String> = redis::cmd("HGET")
            .arg("s:keys")
            .arg(field)
            .query(&mut conn)
            .unwrap();
        let result: i64 = script
            .key("s:keys")
            .arg(field)
            .arg(value.encode())
            .arg("s:marks")
            .arg(round)
            .invoke(&mut conn)
            .unwrap();
        let expected = match (twin.get(field), &stored_before) {
            (Some(old), _) if !value.beats(old) => 0,
            // The twin has nothing, Redis has something: the garbage written above.
            (None, Some(_)) => 2,
            _ => 1,
        };
        assert_eq!(
            result,
            expected,
            "seed {seed}, round {round}: {:?} onto {stored_before:?}",
            value.encode()
        );
        let merged = twin.get(field).map_or(value, |old| old.merge(value));
        twin.insert(field.clone(), merged);
        let now: String = redis::cmd("HGET")
            .arg("s:keys")
            .arg(field)
            .query(&mut conn)
            .unwrap();
        assert_eq!(Stored::decode(&now), Some(merged), "seed {seed}, round {round}");
    }
    // A malformed new value is refused and changes nothing.
    let before: String = redis::cmd("HGET")
        .arg("s:keys")
        .arg(&fields[0])
        .query(&mut conn)
        .unwrap();
    let refused: redis::RedisResult<i64> = script
        .key("s:keys")
        .arg(&fields[0])
        .arg("v1:9:disabled:nope")
        .arg("s:marks")
        .arg(0)
        .invoke(&mut conn);
    assert!(refused.is_err());
    let after: String = redis::cmd("HGET")
        .arg("s:keys")
        .arg(&fields[0])
        .query(&mut conn)
        .unwrap();
    assert_eq!(before, after);
}
