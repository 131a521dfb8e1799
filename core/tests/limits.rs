//! What the pool learns about the upstream's limits (SPEC §11), through whole calls on simulated
//! time: organisations and workspaces, model families, spend caps, soft hints, policy rules.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use http::uri::PathAndQuery;
use keypool_core::call::{CallConfig, Credential, Request};
use keypool_core::{Action, CoolReason, DisableReason, Family, KeyState, Policy, Rule};
use support::*;

fn cfg() -> CallConfig {
    CallConfig::default()
}

fn ask(model: &str) -> Request {
    let mut r = Request::post_json(
        "/v1/messages",
        format!("{{\"model\":\"{model}\",\"max_tokens\":5,\"messages\":[]}}"),
    );
    r.headers
        .insert("x-api-key", "client-credential-123456789".parse().unwrap());
    r
}

const SONNET: &str = "claude-sonnet-4-5-20250929";
const HAIKU: &str = "claude-haiku-4-5";

/// A 200 that names the key's organisation and workspace.
fn ok_from(org: &str, workspace: Option<&str>) -> Vec<Step> {
    let mut h = vec![
        ("content-type", "application/json"),
        ("anthropic-organization-id", org),
    ];
    if let Some(w) = workspace {
        h.push(("anthropic-workspace-id", w));
    }
    vec![head_h(200, &h), body("{\"ok\":true}"), Step::End]
}

/// A 429 rate limit that names the organisation.
fn limited_from(org: &str, workspace: Option<&str>, retry_after: &str) -> Vec<Step> {
    let mut h = vec![
        ("content-type", "application/json"),
        ("retry-after", retry_after),
        ("anthropic-organization-id", org),
    ];
    if let Some(w) = workspace {
        h.push(("anthropic-workspace-id", w));
    }
    vec![
        head_h(429, &h),
        body(r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#),
        Step::End,
    ]
}

/// Runs one request and returns the keys it tried, in order.
fn run(sim: &mut Sim, request: Request) -> (Vec<Option<usize>>, u16) {
    let out = sim.run_with(request, Credential::Pool(sim.pool.clone()), &cfg());
    (out.keys(), out.status())
}

/// Lets keys 0..n each answer once with its organisation, so the pool knows them all.
fn introduce(sim: &mut Sim, orgs: &[(&str, Option<&str>)]) {
    for (k, (org, ws)) in orgs.iter().enumerate() {
        // Keys before `k` are made to rest for a moment so that `k` answers.
        for earlier in 0..k {
            let id = sim.pool.key_at(earlier).unwrap();
            let _ = sim
                .pool
                .cool_down(id, sim.now, Duration::from_millis(1), CoolReason::Auth);
        }
        sim.script(k, vec![ok_from(org, *ws)]);
        let (keys, status) = run(sim, ask(HAIKU));
        assert_eq!((keys.last().copied(), status), (Some(Some(k)), 200));
        sim.advance(Duration::from_millis(2));
    }
    for k in 0..orgs.len() {
        assert!(
            sim.pool.scope(sim.pool.key_at(k).unwrap()).is_some(),
            "key {k} unknown"
        );
    }
}

#[test]
fn a_rate_limit_cools_the_organisation_for_that_family_only() {
    // k0, k1 in organisation A; k2 in B.
    let mut sim = Sim::new(3);
    introduce(&mut sim, &[("org-a", None), ("org-a", None), ("org-b", None)]);
    sim.script(0, vec![limited_from("org-a", None, "30")]);
    let out = sim.run_with(ask(SONNET), Credential::Pool(sim.pool.clone()), &cfg());
    // k1 shares k0's organisation: it is not tried; k2 answers.
    assert_eq!((out.keys(), out.status()), (vec![Some(0), Some(2)], 200));
    // One answer, two marks: k0's own, and k1's for sharing k0's organisation.
    let marked: Vec<(usize, usize)> = out
        .marks
        .iter()
        .map(|m| (m.key.index(), m.attempted.index()))
        .collect();
    assert_eq!(marked, vec![(0, 0), (1, 0)]);
    // Later sonnet requests go to k2 only...
    for _ in 0..3 {
        assert_eq!(run(&mut sim, ask("claude-sonnet-4-5")).0, vec![Some(2)]);
    }
    // ...while a haiku request still uses k0 (another family), and so does a request without a
    // model (key-scoped marks only).
    assert_eq!(run(&mut sim, ask(HAIKU)).0, vec![Some(0)]);
    let mut models = Request::post_json("/v1/models", "");
    models.method = Method::GET;
    models.path_and_query = PathAndQuery::from_static("/v1/models");
    assert_eq!(run(&mut sim, models).0, vec![Some(0)]);
    // The family cooldown is a hard one: after 30 s it is over.
    let k0 = sim.pool.key_at(0).unwrap();
    assert!(sim.pool.state(k0, sim.now).is_available());
    assert!(
        sim.pool
            .family_state(k0, Family::of("sonnet"), sim.now)
            .is_cooling()
    );
    sim.advance(Duration::from_secs(30));
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(0)]);
}

#[test]
fn keys_of_another_workspace_of_the_organisation_are_still_tried() {
    let mut sim = Sim::new(3);
    introduce(
        &mut sim,
        &[
            ("org-a", Some("ws-1")),
            ("org-a", Some("ws-2")),
            ("org-a", Some("ws-1")),
        ],
    );
    sim.script(0, vec![limited_from("org-a", Some("ws-1"), "30")]);
    // k2 shares k0's workspace and rests; k1 (another workspace) is tried.
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(0), Some(1)]);
    let k2 = sim.pool.key_at(2).unwrap();
    assert!(
        sim.pool
            .family_state(k2, Family::of("sonnet"), sim.now)
            .is_cooling()
    );
}

#[test]
fn a_key_whose_organisation_is_unknown_cools_alone_and_key_wide() {
    let mut sim = Sim::new(2);
    sim.script(0, vec![rate_limited("30")]);
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(0), Some(1)]);
    let k0 = sim.pool.key_at(0).unwrap();
    assert!(sim.pool.state(k0, sim.now).is_cooling());
    assert!(
        sim.pool
            .state(sim.pool.key_at(1).unwrap(), sim.now)
            .is_available()
    );
}

fn first_of_next_month_after(wall: SystemTime) -> Duration {
    // sim.wall is 2027-01-15T08:00:00Z (1_800_000_000): the next 1st is 2027-02-01.
    let next = UNIX_EPOCH + Duration::from_secs(1_801_440_000);
    next.duration_since(wall).unwrap()
}

#[test]
fn a_spend_cap_rests_the_organisation_until_the_first_of_next_month() {
    let mut sim = Sim::new(3);
    introduce(&mut sim, &[("org-a", None), ("org-a", None), ("org-b", None)]);
    let cap = vec![
        head_h(
            429,
            &[
                ("content-type", "application/json"),
                ("anthropic-organization-id", "org-a"),
            ],
        ),
        body(
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your spend limit.","details":{"error_code":"enforced_spend_limit_reached"}}}"#,
        ),
        Step::End,
    ];
    sim.script(0, vec![cap]);
    let (keys, status) = run(&mut sim, ask(SONNET));
    assert_eq!((keys, status), (vec![Some(0), Some(2)], 200));
    let left = first_of_next_month_after(sim.wall);
    for k in [0, 1] {
        let id = sim.pool.key_at(k).unwrap();
        match sim.pool.state(id, sim.now) {
            KeyState::Cooling { until, reason } => {
                assert_eq!(reason, CoolReason::SpendCapped);
                let d = until - sim.now;
                assert!(d.abs_diff(left) < Duration::from_secs(1), "{d:?} vs {left:?}");
            }
            other => panic!("key {k}: {other:?}"),
        }
    }
    // Every family, not only sonnet; still out a day before the 1st.
    sim.advance(left - Duration::from_secs(86_400));
    assert_eq!(run(&mut sim, ask(HAIKU)).0, vec![Some(2)]);
    sim.advance(Duration::from_secs(86_401));
    assert_eq!(run(&mut sim, ask(HAIKU)).0, vec![Some(0)]);
}

#[test]
fn the_usage_limit_400_rests_the_key_until_its_date() {
    let mut sim = Sim::new(2);
    let limit = vec![
        head_h(400, &[("content-type", "application/json")]),
        body(
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"You have reached your specified API usage limits. You will regain access on 2027-01-20 at 00:00 UTC."}}"#,
        ),
        Step::End,
    ];
    sim.script(0, vec![limit]);
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(0), Some(1)]);
    let k0 = sim.pool.key_at(0).unwrap();
    let want = UNIX_EPOCH + Duration::from_secs(1_800_403_200); // 2027-01-20T00:00:00Z
    match sim.pool.state(k0, sim.now) {
        KeyState::Cooling {
            until,
            reason: CoolReason::SpendCapped,
        } => assert_eq!(until - sim.now, want.duration_since(sim.wall).unwrap()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_exhausted_key_is_preferred_last_but_still_used() {
    let mut sim = Sim::new(3);
    // k0 answers with requests-remaining 0 until 20 s later.
    let reset = httpdate_plus(sim.wall, 20);
    let exhausted = vec![
        head_h(
            200,
            &[
                ("content-type", "application/json"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", &reset),
            ],
        ),
        body("{}"),
        Step::End,
    ];
    sim.script(0, vec![exhausted]);
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(0)]);
    // The hint moves traffic to the other keys...
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(1)]);
    // ...but when they are out, the hinted key still takes the call: a hint never refuses.
    for k in [1, 2] {
        let id = sim.pool.key_at(k).unwrap();
        let _ = sim
            .pool
            .cool_down(id, sim.now, Duration::from_secs(60), CoolReason::RateLimited);
    }
    assert_eq!(run(&mut sim, ask(SONNET)), (vec![Some(0)], 200));
    // The hint never touched the hard state.
    assert!(
        sim.pool
            .state(sim.pool.key_at(0).unwrap(), sim.now)
            .is_available()
    );
    // Switched off, hints are not learnt.
    let mut off = Sim::new(2);
    off.script(
        0,
        vec![vec![
            head_h(
                200,
                &[
                    ("anthropic-ratelimit-tokens-remaining", "0"),
                    ("anthropic-ratelimit-tokens-reset", &reset),
                ],
            ),
            Step::End,
        ]],
    );
    let mut policy = Policy::default();
    policy.hints = false;
    let config = CallConfig::default().with_policy(policy);
    let _ = off.run_with(ask(SONNET), Credential::Pool(off.pool.clone()), &config);
    let again = off.run_with(ask(SONNET), Credential::Pool(off.pool.clone()), &config);
    assert_eq!(again.keys(), vec![Some(0)]);
}

/// An RFC 3339 timestamp `secs` after `wall`.
fn httpdate_plus(wall: SystemTime, secs: u64) -> String {
    keypool_core::civil::format_rfc3339(wall + Duration::from_secs(secs))
}

#[test]
fn policy_rules_come_before_the_provider_table() {
    let mut sim = Sim::new(2);
    sim.script(0, vec![status(529)]);
    let mut policy = Policy::default();
    policy.rules.push(Rule {
        status: 529,
        error_type: None,
        code: None,
        action: Action::CoolFor(Duration::from_secs(30)),
    });
    policy.rules.push(Rule {
        status: 400,
        error_type: Some("invalid_request_error".into()),
        code: Some("quota_gone".into()),
        action: Action::Disable(DisableReason::Billing),
    });
    assert_eq!(policy.validate(), Ok(()));
    let config = CallConfig::default().with_policy(policy.clone());
    let out = sim.run_with(ask(SONNET), Credential::Pool(sim.pool.clone()), &config);
    assert_eq!(out.keys(), vec![Some(0), Some(1)]);
    assert!(matches!(
        sim.pool.state(sim.pool.key_at(0).unwrap(), sim.now),
        KeyState::Cooling {
            reason: CoolReason::Overloaded,
            ..
        }
    ));
    // A rule on type and code reads the body; other 400s keep the provider's table.
    let quota = vec![
        head_h(400, &[]),
        body(
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"x","details":{"error_code":"quota_gone"}}}"#,
        ),
        Step::End,
    ];
    let mut sim = Sim::new(2);
    sim.script(0, vec![quota, status(400)]);
    let out = sim.run_with(ask(SONNET), Credential::Pool(sim.pool.clone()), &config);
    assert_eq!(out.keys(), vec![Some(0), Some(1)]);
    assert!(sim.pool.state(sim.pool.key_at(0).unwrap(), sim.now).is_disabled());
    // Invalid tables are refused with the rule's number.
    let mut bad = policy.clone();
    bad.rules.push(Rule {
        status: 529,
        error_type: Some("overloaded_error".into()),
        code: None,
        action: Action::Deliver,
    });
    assert_eq!(
        bad.validate().unwrap_err().to_string(),
        "rule #3 never applies: rule #1 matches every answer it would"
    );
    bad.rules = vec![Rule {
        status: 700,
        error_type: None,
        code: None,
        action: Action::Deliver,
    }];
    assert!(bad.validate().unwrap_err().to_string().contains("rule #1"));
}

#[test]
fn a_disabled_key_comes_back_after_a_successful_probe() {
    use keypool_core::probe::{ProbeConfig, ProbeResult, Prober};
    let mut sim = Sim::new(2);
    sim.script(0, vec![status(401)]);
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(0), Some(1)]);
    let k0 = sim.pool.key_at(0).unwrap();
    assert!(sim.pool.state(k0, sim.now).is_disabled());
    let mut prober = Prober::new(ProbeConfig::default());
    prober.handle_pool(&sim.pool, sim.now);
    let profile = keypool_core::Profile::anthropic();
    // First probe after 10 minutes (0 ms of real time): the key is still revoked.
    let at = prober.poll_timeout().unwrap();
    assert_eq!(at - sim.now, Duration::from_secs(600));
    sim.now = at;
    let probe = prober.poll_probe(&sim.pool, &profile, sim.now).unwrap();
    assert_eq!(probe.key, k0);
    assert_eq!(
        probe.attempt.headers.get("x-api-key").map(|v| v.as_bytes()),
        Some(sim.pool.secret(k0).expose().as_bytes())
    );
    let r = prober.handle_result(
        &sim.pool,
        &probe,
        Some(http::StatusCode::UNAUTHORIZED),
        sim.now,
        sim.wall,
    );
    assert!(matches!(r, ProbeResult::Failed { next } if next - sim.now == Duration::from_secs(1200)));
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(1)]);
    // Twenty minutes later the operator has restored the key upstream: the probe enables it.
    sim.now = prober.poll_timeout().unwrap();
    let probe = prober.poll_probe(&sim.pool, &profile, sim.now).unwrap();
    let r = prober.handle_result(&sim.pool, &probe, Some(http::StatusCode::OK), sim.now, sim.wall);
    let ProbeResult::Enabled { mark, transition } = r else {
        panic!("{r:?}")
    };
    assert_eq!(transition, keypool_core::Transition::Entered);
    assert_eq!(mark.change, keypool_core::Change::Enable);
    assert_eq!(run(&mut sim, ask(SONNET)).0, vec![Some(0)]);
    prober.handle_pool(&sim.pool, sim.now);
    assert_eq!(prober.poll_timeout(), None);
}

/// A family cooldown of a disabled key changes nothing requests of that family see, so it is
/// no transition (as a key-wide cooldown of a disabled key is none); of an available key it is.
#[test]
fn a_family_cooldown_of_a_disabled_key_is_no_transition() {
    use keypool_core::{Change, Order, Pool, Transition};
    let now = std::time::Instant::now();
    let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let pool = Pool::new(["sk-ant-a", "sk-ant-b"], Order::PrimaryWithFallback, now).unwrap();
    let (a, b) = (pool.key_at(0).unwrap(), pool.key_at(1).unwrap());
    let sonnet = Family::of("sonnet");
    let disable = pool.mark_for(
        b,
        Change::Disable {
            reason: DisableReason::Unauthorized,
        },
    );
    assert_eq!(pool.apply(&disable, now, wall), Transition::Entered);
    for (id, expected) in [(a, Transition::Entered), (b, Transition::Unchanged)] {
        let mark = pool.family_cool_mark(id, sonnet, wall, Duration::from_secs(60), CoolReason::RateLimited);
        assert_eq!(pool.apply(&mark, now, wall), expected, "{id:?}");
    }
    assert!(pool.family_state(a, sonnet, now).is_cooling());
    assert!(matches!(
        pool.family_state(b, sonnet, now),
        KeyState::Disabled { .. }
    ));
    assert!(pool.state(a, now).is_available());
}
