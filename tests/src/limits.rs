//! What the pool learns about the upstream's limits (SPEC §11), seen through every adapter and
//! the gateway: organisations and workspaces named by the mock, family-scoped cooldowns, spend
//! caps, soft hints from the rate-limit headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first instant of the month after the one `t` is in (00:00 UTC on the 1st).
pub(crate) fn first_of_next_month(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (y, m, _) = civil_from_days(i64::try_from(secs / 86_400).unwrap());
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let days = u64::try_from(days_from_civil(y, m, 1)).unwrap();
    UNIX_EPOCH + Duration::from_secs(days * 86_400)
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// How far apart two wall times are.
fn apart(a: SystemTime, b: SystemTime) -> Duration {
    a.duration_since(b).unwrap_or_else(|e| e.duration())
}

pub(crate) mod scenarios {
    use std::time::{Duration, Instant, SystemTime};

    use keypool_core::call::{CallConfig, CommitPoint};
    use keypool_core::{CoolReason, DisableReason, Family, KeyState};
    use keypool_mock::{Dimension, Reply, RetryAfter};

    use super::{apart, first_of_next_month};
    use crate::{Adapter, TestClient, Transport, World, config, messages_for};

    const SONNET: &str = "claude-sonnet-4-5";
    const HAIKU: &str = "claude-haiku-4-5";
    const ORGANIZATION: &str = "anthropic-organization-id";
    const WORKSPACE: &str = "anthropic-workspace-id";

    fn first_byte() -> CallConfig {
        config(CommitPoint::FirstByte)
    }

    /// A world with one key per scope `(organisation, workspace)`, which the mock names on every
    /// answer to the key, and in which every key has answered once, so the pool knows them all.
    fn world<A: Adapter>(t: Transport, scopes: &[(&str, Option<&str>)]) -> World<A::Client> {
        let mut w = World::new::<A>(t, scopes.len(), first_byte());
        for (i, (organisation, workspace)) in scopes.iter().enumerate() {
            w.mock.set_organization(w.key(i), organisation, *workspace);
        }
        introduce::<A>(&mut w, scopes);
        w
    }

    /// Lets each key answer one haiku request (the keys before it are disabled through the pool
    /// for the moment, then enabled again), and checks that the pool learnt each key's scope and
    /// that the caller saw the upstream's identity headers unchanged — a library client hands
    /// them over as they came; a proxy may remove them (SPEC §13), never change them.
    fn introduce<A: Adapter>(w: &mut World<A::Client>, scopes: &[(&str, Option<&str>)]) {
        let pool = w.client.pool();
        for (i, (organisation, workspace)) in scopes.iter().enumerate() {
            if i > 0 {
                let _ = pool.disable(pool.key_at(i - 1).unwrap(), DisableReason::Unauthorized);
            }
            let a = w.send_request(messages_for(HAIKU, false));
            assert_eq!(a.status, 200, "key {i}: {a:?}");
            assert_eq!(w.seen().last(), Some(&Some(i)));
            for (name, sent) in [(ORGANIZATION, Some(*organisation)), (WORKSPACE, *workspace)] {
                let seen = a.headers.get(name).map(|v| v.to_str().unwrap());
                if A::MAY_REMOVE_IDENTITY_HEADERS {
                    assert!(seen.is_none() || seen == sent, "{name}: {seen:?}, sent {sent:?}");
                } else {
                    assert_eq!(seen, sent, "{name}");
                }
            }
        }
        for (i, (organisation, workspace)) in scopes.iter().enumerate() {
            let id = pool.key_at(i).unwrap();
            let _ = pool.enable(id, Instant::now());
            let scope = pool
                .scope(id)
                .unwrap_or_else(|| panic!("key {i}: no organisation learnt"));
            assert_eq!(&*scope.organisation, *organisation);
            assert_eq!(scope.workspace.as_deref(), *workspace);
            assert!(w.state(i).is_available());
        }
        assert_eq!(w.seen(), (0..scopes.len()).map(Some).collect::<Vec<_>>());
    }

    /// The keys the upstream saw since request `from`.
    fn seen_since<C: TestClient>(w: &World<C>, from: usize) -> Vec<Option<usize>> {
        w.seen()[from..].to_vec()
    }

    /// Key `i`'s state for requests of `family` now.
    fn family_state<C: TestClient>(w: &World<C>, i: usize, family: &str) -> KeyState {
        let pool = w.client.pool();
        pool.family_state(pool.key_at(i).unwrap(), Family::of(family), Instant::now())
    }

    /// Keys k0, k1 of one organisation and k2 of another, each named once: a 429 on k0 for a
    /// sonnet request cools k0 and k1 for sonnet (k1 is not tried), and the call fails over to
    /// k2; later sonnet requests, blocking and streamed, go to k2 only, while a haiku request
    /// still uses k0 — whose key-wide state never changed.
    pub fn limits_rate_limit_cools_the_organisation_for_its_family<A: Adapter>(t: Transport) {
        let mut w = world::<A>(t, &[("org-a", None), ("org-a", None), ("org-b", None)]);
        let from = w.seen().len();
        w.script(0, [Reply::rate_limited(RetryAfter::Seconds("30".into()))]);
        let a = w.send_request(messages_for(SONNET, false));
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(seen_since(&w, from), [Some(0), Some(2)]);
        for i in [0, 1] {
            assert!(family_state(&w, i, "sonnet").is_cooling(), "key {i}");
            assert!(family_state(&w, i, "haiku").is_available(), "key {i}");
            assert!(w.state(i).is_available(), "key {i}: {:?}", w.state(i));
        }
        assert!(family_state(&w, 2, "sonnet").is_available());
        let from = w.seen().len();
        assert_eq!(w.send_request(messages_for(SONNET, false)).status, 200);
        assert_eq!(
            w.send_request(messages_for("claude-sonnet-4-5-20250929", false))
                .status,
            200
        );
        let s = w.stream_request(messages_for(SONNET, true));
        assert_eq!(s.status, 200, "{s:?}");
        assert!(s.stream_error.is_none(), "{s:?}");
        assert_eq!(seen_since(&w, from), [Some(2); 3]);
        let from = w.seen().len();
        let a = w.send_request(messages_for(HAIKU, false));
        assert_eq!(a.status, 200, "{a:?}");
        let haiku = seen_since(&w, from);
        assert!(matches!(haiku[..], [Some(0 | 1)]), "{haiku:?}");
        w.finish();
    }

    /// A 429 on k0 (organisation A, workspace 1) rests k2 (the same workspace) for that family,
    /// but k1 — another workspace of the same organisation — is still tried, and serves.
    pub fn limits_other_workspaces_are_still_tried<A: Adapter>(t: Transport) {
        let mut w = world::<A>(
            t,
            &[
                ("org-a", Some("ws-1")),
                ("org-a", Some("ws-2")),
                ("org-a", Some("ws-1")),
            ],
        );
        let from = w.seen().len();
        w.script(0, [Reply::rate_limited(RetryAfter::Seconds("30".into()))]);
        let a = w.send_request(messages_for(SONNET, false));
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(seen_since(&w, from), [Some(0), Some(1)]);
        assert!(family_state(&w, 2, "sonnet").is_cooling());
        assert!(family_state(&w, 1, "sonnet").is_available());
        let from = w.seen().len();
        assert_eq!(w.send_request(messages_for(SONNET, false)).status, 200);
        assert_eq!(seen_since(&w, from), [Some(1)]);
        w.finish();
    }

    /// Key `i` is spend-capped until `want` (up to a few seconds: the state is kept as an
    /// instant, made from the wall clock when the answer came).
    fn assert_spend_capped<C: TestClient>(w: &World<C>, i: usize, want: &[SystemTime]) {
        match w.state(i) {
            KeyState::Cooling {
                until,
                reason: CoolReason::SpendCapped,
            } => {
                let at = SystemTime::now() + until.saturating_duration_since(Instant::now());
                assert!(
                    want.iter().any(|&want| apart(at, want) < Duration::from_secs(5)),
                    "key {i} capped until {at:?}, want {want:?}"
                );
            }
            other => panic!("key {i}: {other:?}"),
        }
    }

    /// A spend-cap 429 (no `retry-after`, `error.details.error_code =
    /// "enforced_spend_limit_reached"`) on k0 fails over to k2, and leaves k0 and k1 — its whole
    /// organisation — spend-capped until 00:00 UTC on the 1st of next month, for every family.
    pub fn limits_spend_cap_rests_the_organisation_until_the_first<A: Adapter>(t: Transport) {
        let mut w = world::<A>(t, &[("org-a", None), ("org-a", None), ("org-b", None)]);
        let from = w.seen().len();
        w.script(0, [Reply::spend_capped()]);
        let before = SystemTime::now();
        let a = w.send_request(messages_for(SONNET, false));
        let after = SystemTime::now();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(seen_since(&w, from), [Some(0), Some(2)]);
        // Around midnight on the last day of a month either 1st is right.
        let want = [first_of_next_month(before), first_of_next_month(after)];
        assert_spend_capped(&w, 0, &want);
        assert_spend_capped(&w, 1, &want);
        assert!(w.state(2).is_available(), "{:?}", w.state(2));
        let from = w.seen().len();
        assert_eq!(w.send_request(messages_for(HAIKU, false)).status, 200);
        assert_eq!(seen_since(&w, from), [Some(2)]);
        w.finish();
    }

    /// The 400 "You have reached your specified API usage limits … You will regain access on
    /// DATE at HH:MM UTC" fails over and spend-caps the organisation until that minute.
    pub fn limits_usage_limit_rests_until_its_date<A: Adapter>(t: Transport) {
        let mut w = world::<A>(t, &[("org-a", None), ("org-a", None), ("org-b", None)]);
        let from = w.seen().len();
        let regain = SystemTime::now() + Duration::from_secs(3 * 86_400);
        // The message names the minute.
        let secs = regain.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let minute = SystemTime::UNIX_EPOCH + Duration::from_secs(secs - secs % 60);
        w.script(0, [Reply::usage_limited(regain)]);
        let a = w.send_request(messages_for(SONNET, false));
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(seen_since(&w, from), [Some(0), Some(2)]);
        assert_spend_capped(&w, 0, &[minute]);
        assert_spend_capped(&w, 1, &[minute]);
        assert!(w.state(2).is_available());
        w.finish();
    }

    /// A 200 on k0 that says its tokens are used up (`anthropic-ratelimit-tokens-remaining: 0`
    /// until 30 s later) makes k0 and k1 (its organisation) less preferred for sonnet: the next
    /// sonnet request goes to k2, a haiku request still to k0. When k2 then answers 429, the
    /// call still succeeds — on the hinted k0: a hint never refuses, and never touches the hard
    /// state. The rate-limit headers reach the caller unchanged (SPEC §13).
    pub fn limits_soft_hint_moves_traffic_but_never_refuses<A: Adapter>(t: Transport) {
        let mut w = world::<A>(t, &[("org-a", None), ("org-a", None), ("org-b", None)]);
        let from = w.seen().len();
        w.script(
            0,
            [Reply::ok().exhausted(Dimension::Tokens, Duration::from_secs(30))],
        );
        let a = w.send_request(messages_for(SONNET, false));
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.headers["anthropic-ratelimit-tokens-remaining"], "0");
        assert!(a.headers.contains_key("anthropic-ratelimit-tokens-reset"));
        let pool = w.client.pool();
        let sonnet = Some(Family::of("sonnet"));
        for i in [0, 1] {
            let id = pool.key_at(i).unwrap();
            assert!(pool.is_hinted_at(id, sonnet, Instant::now()), "key {i}");
            assert!(w.state(i).is_available(), "key {i}: {:?}", w.state(i));
        }
        assert!(!pool.is_hinted_at(pool.key_at(2).unwrap(), sonnet, Instant::now()));
        assert_eq!(w.send_request(messages_for(SONNET, false)).status, 200);
        assert_eq!(w.send_request(messages_for(HAIKU, false)).status, 200);
        assert_eq!(seen_since(&w, from), [Some(0), Some(2), Some(0)]);
        // Every unhinted key for sonnet is cooling: the hinted ones still serve.
        let from = w.seen().len();
        w.script(2, [Reply::rate_limited(RetryAfter::Seconds("30".into()))]);
        let a = w.send_request(messages_for(SONNET, false));
        assert_eq!(a.status, 200, "{a:?}");
        let tried = seen_since(&w, from);
        assert!(matches!(tried[..], [Some(2), Some(0 | 1)]), "{tried:?}");
        assert!(w.state(0).is_available() && w.state(1).is_available());
        w.finish();
    }
}
