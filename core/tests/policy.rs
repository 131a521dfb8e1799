//! Classification of upstream answers and retry-delay parsing (SPEC §4).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use keypool_core::policy::MAX_CLASSIFY_BODY;
use keypool_core::{CoolReason, DisableReason, OnForbidden, OnUnauthorized, Policy, Verdict};

const CREDIT_BODY: &str = r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#;

/// A fixed wall clock: 2026-01-01T00:00:00Z.
fn wall() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn delay(pairs: &[(&str, &str)]) -> Duration {
    Policy::default().retry_delay(&headers(pairs), wall())
}

fn date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

const DEFAULT: Duration = Duration::from_secs(60);
const CAP: Duration = Duration::from_secs(3600);

#[test]
fn retry_after_ms_wins() {
    assert_eq!(delay(&[("retry-after-ms", "1500")]), Duration::from_millis(1500));
    assert_eq!(
        delay(&[("retry-after", "30"), ("retry-after-ms", "1500")]),
        Duration::from_millis(1500)
    );
    assert_eq!(delay(&[("retry-after-ms", "2.5")]), Duration::from_micros(2500));
    assert_eq!(delay(&[("retry-after-ms", " 250 ")]), Duration::from_millis(250));
}

#[test]
fn retry_after_seconds() {
    assert_eq!(delay(&[("retry-after", "30")]), Duration::from_secs(30));
    assert_eq!(delay(&[("retry-after", "2.5")]), Duration::from_millis(2500));
    assert_eq!(delay(&[("retry-after", "0.25")]), Duration::from_millis(250));
    assert_eq!(delay(&[("retry-after", "1")]), Duration::from_secs(1));
}

#[test]
fn retry_after_http_date_against_the_response_date() {
    // The response's own `date` is used, not the (very different) local wall clock.
    let served = wall() - Duration::from_secs(5000);
    let h = [
        ("date", date(served)),
        ("retry-after", date(served + Duration::from_secs(40))),
    ];
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(delay(&h), Duration::from_secs(40));
}

#[test]
fn retry_after_http_date_against_wall_clock_without_date() {
    let at = date(wall() + Duration::from_secs(90));
    assert_eq!(delay(&[("retry-after", &at)]), Duration::from_secs(90));
    // An unparseable `date` header is ignored in favour of the wall clock.
    assert_eq!(
        delay(&[("retry-after", &at), ("date", "yesterday")]),
        Duration::from_secs(90)
    );
    // The obsolete RFC 850 and asctime forms are HTTP-dates too.
    assert_eq!(
        delay(&[("retry-after", "Thursday, 01-Jan-26 00:00:10 GMT")]),
        Duration::from_secs(10)
    );
    assert_eq!(
        delay(&[("retry-after", "Thu Jan  1 00:00:20 2026")]),
        Duration::from_secs(20)
    );
}

#[test]
fn unusable_values_give_the_default() {
    let past = date(wall() - Duration::from_secs(10));
    let same = date(wall());
    for v in [
        past.as_str(),
        same.as_str(),
        "0",
        "0.0",
        "-5",
        "+5",
        "1e3",
        "inf",
        "NaN",
        "garbage",
        "",
        "   ",
        "5 s",
        "0x10",
        ".5",
        "5.",
    ] {
        assert_eq!(delay(&[("retry-after", v)]), DEFAULT, "retry-after: {v:?}");
    }
    assert_eq!(delay(&[]), DEFAULT);
    // A date in the past of the response's own `date` is in the past too.
    let served = wall() + Duration::from_secs(100);
    assert_eq!(
        delay(&[
            ("date", &date(served)),
            ("retry-after", &date(served - Duration::from_secs(1)))
        ]),
        DEFAULT
    );
}

#[test]
fn huge_values_are_capped() {
    assert_eq!(delay(&[("retry-after", "99999999")]), CAP);
    assert_eq!(delay(&[("retry-after", "99999999999999999999999999999")]), CAP);
    assert_eq!(delay(&[("retry-after-ms", "99999999999999999999999999999")]), CAP);
    assert_eq!(delay(&[("retry-after", "3600.000000001")]), CAP);
    assert_eq!(
        delay(&[("retry-after", "3599.5")]),
        Duration::from_millis(3_599_500)
    );
    let far = date(wall() + Duration::from_secs(365 * 24 * 3600));
    assert_eq!(delay(&[("retry-after", &far)]), CAP);
}

#[test]
fn invalid_retry_after_ms_falls_through() {
    for v in ["abc", "0", "-1500", "1,5", "", "1500ms"] {
        assert_eq!(
            delay(&[("retry-after-ms", v), ("retry-after", "30")]),
            Duration::from_secs(30),
            "retry-after-ms: {v:?}"
        );
        assert_eq!(delay(&[("retry-after-ms", v)]), DEFAULT, "retry-after-ms: {v:?}");
    }
}

#[test]
fn tiny_values_are_never_zero() {
    assert_eq!(delay(&[("retry-after-ms", "0.5")]), Duration::from_millis(1));
    assert_eq!(delay(&[("retry-after", "0.000000001")]), Duration::from_millis(1));
    // Below a nanosecond rounds to zero, which is invalid: default.
    assert_eq!(delay(&[("retry-after", "0.0000000001")]), DEFAULT);
}

#[test]
fn opaque_header_bytes_are_ignored() {
    let mut h = HeaderMap::new();
    h.insert(
        "retry-after-ms",
        HeaderValue::from_bytes(b"\xff\xfe1500").unwrap(),
    );
    h.insert("retry-after", HeaderValue::from_bytes(b"\xe3\x80\x80").unwrap());
    assert_eq!(Policy::default().retry_delay(&h, wall()), DEFAULT);
    h.insert("retry-after", HeaderValue::from_static("12"));
    assert_eq!(Policy::default().retry_delay(&h, wall()), Duration::from_secs(12));
}

#[test]
fn configured_default_and_cap() {
    let mut p = Policy::default();
    p.default_cooldown = Duration::from_secs(5);
    p.max_cooldown = Duration::from_secs(20);
    assert_eq!(p.retry_delay(&HeaderMap::new(), wall()), Duration::from_secs(5));
    assert_eq!(
        p.retry_delay(&headers(&[("retry-after", "30")]), wall()),
        Duration::from_secs(20)
    );
    // A default above the cap is capped too.
    p.default_cooldown = Duration::from_secs(50);
    assert_eq!(p.retry_delay(&HeaderMap::new(), wall()), Duration::from_secs(20));
    // A nonsensical configuration still never yields a zero cooldown, nor panics.
    p.default_cooldown = Duration::ZERO;
    p.max_cooldown = Duration::ZERO;
    assert_eq!(p.retry_delay(&HeaderMap::new(), wall()), Duration::from_millis(1));
}

fn classify(p: &Policy, status: u16, h: &[(&str, &str)], body: &str) -> Verdict {
    p.classify(
        StatusCode::from_u16(status).unwrap(),
        &headers(h),
        body.as_bytes(),
        wall(),
    )
}

#[test]
fn default_table() {
    let p = Policy::default();
    for s in [200, 201, 204, 299] {
        assert_eq!(classify(&p, s, &[], ""), Verdict::Deliver, "{s}");
    }
    assert_eq!(
        classify(&p, 429, &[("retry-after", "7")], ""),
        Verdict::CoolDown {
            duration: Duration::from_secs(7),
            reason: CoolReason::RateLimited
        }
    );
    assert_eq!(
        classify(&p, 429, &[], ""),
        Verdict::CoolDown {
            duration: DEFAULT,
            reason: CoolReason::RateLimited
        }
    );
    assert_eq!(
        classify(&p, 401, &[], ""),
        Verdict::Disable {
            reason: DisableReason::Unauthorized
        }
    );
    assert_eq!(
        classify(&p, 403, &[], ""),
        Verdict::Disable {
            reason: DisableReason::Forbidden
        }
    );
    let billing = r#"{"type":"error","error":{"type":"billing_error","message":"billing"}}"#;
    assert_eq!(
        classify(&p, 402, &[], billing),
        Verdict::Disable {
            reason: DisableReason::Billing
        }
    );
    assert_eq!(
        classify(&p, 400, &[], CREDIT_BODY),
        Verdict::Disable {
            reason: DisableReason::Billing
        }
    );
    let plain =
        r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#;
    assert_eq!(classify(&p, 400, &[], plain), Verdict::Deliver);
    for body in [
        "",
        "not json",
        "{}",
        r#"{"error":{}}"#,
        r#"{"error":"credit balance is too low"}"#,
    ] {
        assert_eq!(classify(&p, 400, &[], body), Verdict::Deliver, "{body:?}");
    }
    for s in [404, 405, 408, 409, 413, 422, 500, 502, 503, 504, 529] {
        assert_eq!(
            classify(&p, s, &[("retry-after", "5")], CREDIT_BODY),
            Verdict::Deliver,
            "{s}"
        );
    }
    // Failover verdicts.
    assert!(!Verdict::Deliver.is_failover());
    assert!(classify(&p, 429, &[], "").is_failover());
    assert!(classify(&p, 401, &[], "").is_failover());
}

#[test]
fn a_400_and_a_429_without_a_retry_value_need_the_body() {
    let p = Policy::default();
    let none = HeaderMap::new();
    let mut retry = HeaderMap::new();
    retry.insert("retry-after", "5".parse().unwrap());
    assert!(p.needs_body(StatusCode::BAD_REQUEST, &none));
    // SPEC §11.3: a spend cap is a 429 without a retry value; only its body tells.
    assert!(p.needs_body(StatusCode::TOO_MANY_REQUESTS, &none));
    assert!(!p.needs_body(StatusCode::TOO_MANY_REQUESTS, &retry));
    for s in [200, 401, 402, 403, 404, 500, 529] {
        assert!(!p.needs_body(StatusCode::from_u16(s).unwrap(), &none), "{s}");
    }
    let mut q = Policy::default();
    q.disable_on_billing = false;
    assert!(!q.needs_body(StatusCode::BAD_REQUEST, &none));
}

#[test]
fn credit_balance_is_recognised_within_the_first_64_kib_only() {
    let p = Policy::default();
    // Pretty-printed and with other fields: still recognised.
    let spaced = format!(
        "{{\n  \"request_id\": \"req_1\",\n  \"error\": {{ \"message\": \"Your Credit Balance Is Too Low to go on\", \"type\": \"invalid_request_error\" }}, \"type\": \"error\" }}{}",
        ""
    );
    assert_eq!(
        classify(&p, 400, &[], &spaced),
        Verdict::Disable {
            reason: DisableReason::Billing
        }
    );
    // Past the 64 KiB classification window the body is not looked at.
    let pad = " ".repeat(MAX_CLASSIFY_BODY);
    let late = format!("{pad}{CREDIT_BODY}");
    assert_eq!(classify(&p, 400, &[], &late), Verdict::Deliver);
}

#[test]
fn configurable_rows() {
    let mut p = Policy::default();
    p.on_unauthorized = OnUnauthorized::CoolFor(Duration::from_secs(60));
    assert_eq!(
        classify(&p, 401, &[], ""),
        Verdict::CoolDown {
            duration: Duration::from_secs(60),
            reason: CoolReason::Auth
        }
    );
    p.on_unauthorized = OnUnauthorized::CoolFor(Duration::ZERO);
    assert_eq!(
        classify(&p, 401, &[], ""),
        Verdict::CoolDown {
            duration: Duration::from_millis(1),
            reason: CoolReason::Auth
        }
    );
    p.on_unauthorized = OnUnauthorized::CoolFor(Duration::from_secs(1 << 40));
    assert_eq!(
        classify(&p, 401, &[], ""),
        Verdict::CoolDown {
            duration: CAP,
            reason: CoolReason::Auth
        }
    );

    let mut p = Policy::default();
    p.on_forbidden = OnForbidden::Deliver;
    assert_eq!(classify(&p, 403, &[], ""), Verdict::Deliver);

    let mut p = Policy::default();
    p.disable_on_billing = false;
    assert_eq!(classify(&p, 402, &[], ""), Verdict::Deliver);
    assert_eq!(classify(&p, 400, &[], CREDIT_BODY), Verdict::Deliver);

    let mut p = Policy::default();
    p.cool_on_overloaded = Some(Duration::from_secs(15));
    assert_eq!(
        classify(&p, 529, &[], ""),
        Verdict::CoolDown {
            duration: Duration::from_secs(15),
            reason: CoolReason::Overloaded
        }
    );
    assert_eq!(classify(&p, 500, &[], ""), Verdict::Deliver);
}

/// A configuration whose cap is below the 1 ms floor must not panic (`Duration::clamp` does
/// when min > max); the floor wins, as it does for retry delays.
#[test]
fn a_cap_below_the_floor_never_panics() {
    let mut p = Policy::default();
    p.max_cooldown = Duration::ZERO;
    p.on_unauthorized = OnUnauthorized::CoolFor(Duration::from_secs(60));
    p.cool_on_overloaded = Some(Duration::from_secs(60));
    let one_ms = Duration::from_millis(1);
    assert_eq!(
        classify(&p, 401, &[], ""),
        Verdict::CoolDown {
            duration: one_ms,
            reason: CoolReason::Auth
        }
    );
    assert_eq!(
        classify(&p, 529, &[], ""),
        Verdict::CoolDown {
            duration: one_ms,
            reason: CoolReason::Overloaded
        }
    );
    assert_eq!(
        classify(&p, 429, &[("retry-after", "30")], ""),
        Verdict::CoolDown {
            duration: one_ms,
            reason: CoolReason::RateLimited
        }
    );
}
