//! Probes of disabled keys (SPEC §11.5): the schedule and what an answer does.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant, SystemTime};

use http::{Method, StatusCode};
use keypool_core::probe::{ProbeConfig, ProbeResult, Prober};
use keypool_core::{DisableReason, Order, Pool, Profile};

fn pool(t0: Instant) -> Pool {
    Pool::new(
        [
            "sk-ant-api03-probe-key-0000000000",
            "sk-ant-api03-probe-key-1111111111",
        ],
        Order::default(),
        t0,
    )
    .unwrap()
}

#[test]
fn a_failed_probe_backs_off_doubling_up_to_the_cap() {
    let t0 = Instant::now();
    let p = pool(t0);
    let id = p.key_at(0).unwrap();
    let _ = p.disable(id, DisableReason::Billing);
    let mut prober = Prober::new(ProbeConfig {
        first_delay: Duration::from_secs(600),
        max_delay: Duration::from_secs(3000),
    });
    prober.handle_pool(&p, t0);
    let profile = Profile::anthropic();
    let mut now = t0;
    let mut gaps = Vec::new();
    for _ in 0..5 {
        let at = prober.poll_timeout().unwrap();
        gaps.push((at - now).as_secs());
        now = at;
        let probe = prober.poll_probe(&p, &profile, now).unwrap();
        assert_eq!(probe.attempt.method, Method::GET);
        assert_eq!(probe.attempt.path_and_query.as_str(), "/v1/models?limit=1");
        assert!(
            prober.poll_probe(&p, &profile, now).is_none(),
            "one probe in flight per key"
        );
        let r = prober.handle_result(
            &p,
            &probe,
            Some(StatusCode::UNAUTHORIZED),
            now,
            SystemTime::UNIX_EPOCH,
        );
        assert!(matches!(r, ProbeResult::Failed { .. }));
    }
    assert_eq!(gaps, [600, 1200, 2400, 3000, 3000]);
    assert!(p.state(id, now).is_disabled());
}

#[test]
fn operator_disables_are_never_probed_and_stale_answers_do_nothing() {
    let t0 = Instant::now();
    let p = pool(t0);
    let (a, b) = (p.key_at(0).unwrap(), p.key_at(1).unwrap());
    let _ = p.disable(a, DisableReason::Operator);
    let _ = p.disable(b, DisableReason::Unauthorized);
    let mut prober = Prober::new(ProbeConfig::default());
    prober.handle_pool(&p, t0);
    let at = prober.poll_timeout().unwrap();
    let probe = prober.poll_probe(&p, &Profile::anthropic(), at).unwrap();
    assert_eq!(probe.key, b);
    // The operator enables and disables the key while the probe is out: the answer is stale.
    let _ = p.enable(b, at);
    let _ = p.disable(b, DisableReason::Unauthorized);
    let r = prober.handle_result(&p, &probe, Some(StatusCode::OK), at, SystemTime::UNIX_EPOCH);
    assert_eq!(r, ProbeResult::Stale);
    assert!(p.state(b, at).is_disabled());
    // Probes off: nothing is ever scheduled.
    let mut off = Prober::new(ProbeConfig {
        first_delay: Duration::ZERO,
        ..ProbeConfig::default()
    });
    off.handle_pool(&p, at);
    assert_eq!(off.poll_timeout(), None);
}
