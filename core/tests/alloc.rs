//! The hot path allocates nothing: a pick (walk + `next_key`) and a mark, counted by a global
//! allocator that tallies the allocations of the calling thread.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode};
use keypool_core::{CoolReason, DisableReason, Exhausted, Order, Policy, Verdict};

struct Counting;

thread_local! {
    // `const` and `Cell<u64>`: no lazy initialisation and no destructor, so touching it from
    // inside the allocator cannot allocate or recurse.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// addition is bumping a thread-local counter, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: as above; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations<R>(f: impl FnOnce() -> R) -> (u64, R) {
    let before = ALLOCS.with(Cell::get);
    let r = black_box(f());
    (ALLOCS.with(Cell::get) - before, r)
}

#[test]
fn the_counter_counts() {
    let (n, v) = allocations(|| vec![1u8; 16]);
    assert_eq!(n, 1);
    drop(v);
}

#[test]
fn a_pick_with_family_marks_and_hints_allocates_nothing() {
    let t0 = Instant::now();
    let pool = common::pool(16, Order::PrimaryWithFallback, t0);
    let sonnet = keypool_core::Family::of("sonnet");
    let ids: Vec<_> = pool.ids().collect();
    for &id in &ids[..8] {
        let mark = pool.family_cool_mark(
            id,
            sonnet,
            std::time::SystemTime::UNIX_EPOCH,
            Duration::from_secs(30),
            CoolReason::RateLimited,
        );
        let (n, _) = allocations(|| pool.apply(&mark, t0, std::time::SystemTime::UNIX_EPOCH));
        assert_eq!(n, 0, "family mark");
    }
    let (n, _) = allocations(|| pool.hint(ids[8], Some(sonnet), t0 + Duration::from_secs(9), t0));
    assert_eq!(n, 0, "hint");
    let (n, k) = allocations(|| pool.walk_for(Some(sonnet)).next_key(&pool, t0));
    assert_eq!(k.map(|k| k.index()), Ok(9));
    assert_eq!(n, 0, "pick with family marks and a hint");
}

#[test]
fn a_pick_allocates_nothing() {
    let t0 = Instant::now();
    for order in [Order::PrimaryWithFallback, Order::RoundRobin] {
        let pool = common::pool(16, order, t0);
        // The first key is available.
        let (n, k) = allocations(|| pool.walk().next_key(&pool, t0));
        assert!(k.is_ok());
        assert_eq!(n, 0, "pick of the first available key ({order:?})");

        // 15 keys cooling: the pick skips them all.
        let ids: Vec<_> = pool.ids().collect();
        for &id in &ids[..15] {
            let _ = pool.cool_down(id, t0, Duration::from_secs(30), CoolReason::RateLimited);
        }
        let (n, k) = allocations(|| {
            let mut walk = pool.walk();
            walk.next_key(&pool, t0 + Duration::from_secs(1))
        });
        assert_eq!(k.map(|k| k.index()), Ok(15));
        assert_eq!(n, 0, "pick skipping 15 cooling keys ({order:?})");

        // Exhaustion, with the reason computed in the same scan.
        let _ = pool.disable(ids[15], DisableReason::Billing);
        let (n, e) = allocations(|| pool.walk().next_key(&pool, t0 + Duration::from_secs(1)));
        assert!(matches!(e, Err(Exhausted::RateLimited { .. })));
        assert_eq!(n, 0, "exhaustion ({order:?})");

        // A full walk over every key.
        for &id in &ids {
            let _ = pool.enable(id, t0);
        }
        let (n, count) = allocations(|| {
            let mut walk = pool.walk();
            let mut count = 0;
            while walk.next_key(&pool, t0).is_ok() {
                count += 1;
            }
            count
        });
        assert_eq!(count, 16);
        assert_eq!(n, 0, "a walk over all 16 keys ({order:?})");
    }
}

#[test]
fn a_mark_allocates_nothing() {
    let t0 = Instant::now();
    let pool = common::pool(16, Order::PrimaryWithFallback, t0);
    let id = pool.ids().nth(3).unwrap();
    let (n, _) = allocations(|| {
        let a = pool.cool_down(id, t0, Duration::from_secs(5), CoolReason::RateLimited);
        let b = pool.cool_down(id, t0, Duration::from_secs(50), CoolReason::RateLimited);
        let c = pool.cool_down(id, t0, Duration::from_secs(1), CoolReason::RateLimited);
        (a, b, c)
    });
    assert_eq!(n, 0, "cool_down");
    let (n, _) = allocations(|| pool.state(id, t0));
    assert_eq!(n, 0, "state");
    let (n, _) = allocations(|| pool.disable(id, DisableReason::Unauthorized));
    assert_eq!(n, 0, "disable");
    let (n, _) = allocations(|| pool.enable(id, t0));
    assert_eq!(n, 0, "enable");
}

#[test]
fn classifying_a_429_allocates_nothing() {
    let policy = Policy::default();
    let mut headers = HeaderMap::new();
    headers.insert(
        "retry-after",
        HeaderValue::from_static("Thu, 01 Jan 2026 00:00:40 GMT"),
    );
    headers.insert("date", HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT"));
    let wall = SystemTime::UNIX_EPOCH;
    let (n, v) = allocations(|| policy.classify(StatusCode::TOO_MANY_REQUESTS, &headers, b"", wall));
    assert_eq!(
        v,
        Verdict::CoolDown {
            duration: Duration::from_secs(40),
            reason: CoolReason::RateLimited
        }
    );
    assert_eq!(n, 0, "classify 429 with HTTP-dates");
    headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
    let (n, _) = allocations(|| policy.classify(StatusCode::TOO_MANY_REQUESTS, &headers, b"", wall));
    assert_eq!(n, 0, "classify 429 with retry-after-ms");
}
