//! The failover state machine of one call, on simulated time (issue #4 acceptance 1–7).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use keypool_core::call::{CallConfig, CallError, CommitPoint, Credential, StreamBreak};
use keypool_core::{CoolReason, DisableReason, KeyState, Secret};
use support::*;

fn cfg() -> CallConfig {
    CallConfig::default()
}

fn first_content() -> CallConfig {
    CallConfig::default().with_commit(CommitPoint::first_content())
}

#[test]
fn one_valid_key_one_attempt() {
    let mut sim = Sim::new(1);
    let out = sim.run(&cfg());
    assert_eq!(out.sent.len(), 1);
    assert_eq!(out.status(), 200);
    assert_eq!(out.body_str(), "{\"ok\":true}");
}

#[test]
fn rate_limited_key_fails_over_and_cools() {
    let mut sim = Sim::new(2);
    sim.script(0, vec![rate_limited("5")]);
    let out = sim.run(&cfg());
    assert_eq!(out.keys(), [Some(0), Some(1)]);
    assert_eq!(out.status(), 200);
    let until = sim.now + Duration::from_secs(5);
    assert_eq!(
        sim.pool.state(sim.pool.key_at(0).unwrap(), sim.now),
        KeyState::Cooling {
            until,
            reason: CoolReason::RateLimited
        }
    );
}

#[test]
fn unauthorized_key_is_disabled() {
    let mut sim = Sim::new(2);
    sim.script(0, vec![status(401)]);
    let out = sim.run(&cfg());
    assert_eq!(out.keys(), [Some(0), Some(1)]);
    assert_eq!(out.status(), 200);
    assert_eq!(
        sim.pool.state(sim.pool.key_at(0).unwrap(), sim.now),
        KeyState::Disabled {
            reason: DisableReason::Unauthorized
        }
    );
}

#[test]
fn non_key_failures_are_delivered_once_without_marks() {
    for code in [500, 529, 400, 404, 413, 503] {
        let mut sim = Sim::new(2);
        sim.script(0, vec![status(code)]);
        let out = sim.run(&cfg());
        assert_eq!(out.sent.len(), 1, "{code}");
        assert_eq!(out.status(), code);
        assert_eq!(out.body_str(), "{\"type\":\"error\"}");
        for id in sim.pool.ids() {
            assert_eq!(sim.pool.state(id, sim.now), KeyState::Available, "{code}");
        }
    }
}

#[test]
fn credit_balance_400_disables_with_billing() {
    let mut sim = Sim::new(2);
    let credit = r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#;
    sim.script(
        0,
        vec![vec![
            head(400),
            body(&credit[..40]),
            body(&credit[40..]),
            Step::End,
        ]],
    );
    let out = sim.run(&cfg());
    assert_eq!(out.keys(), [Some(0), Some(1)]);
    assert_eq!(out.status(), 200);
    assert_eq!(
        sim.pool.state(sim.pool.key_at(0).unwrap(), sim.now),
        KeyState::Disabled {
            reason: DisableReason::Billing
        }
    );
}

#[test]
fn exhaustion_reports_the_soonest_key() {
    let mut sim = Sim::new(3);
    sim.script(0, vec![rate_limited("5")])
        .script(1, vec![rate_limited("3")])
        .script(2, vec![rate_limited("10")]);
    let out = sim.run(&cfg());
    assert_eq!(out.sent.len(), 3);
    assert_eq!(out.status(), 429);
    assert_eq!(out.fail_header("retry-after").as_deref(), Some("3"));
    assert_eq!(out.fail_header("retry-after-ms").as_deref(), Some("3000"));
    assert_eq!(out.fail_header("x-should-retry").as_deref(), Some("true"));
    let json = out.fail_json();
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "rate_limit_error");
    assert_eq!(json["request_id"], "req_test");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 configured keys")
    );
}

#[test]
fn exhaustion_rounds_retry_after_up() {
    let mut sim = Sim::new(1);
    sim.script(
        0,
        vec![vec![head_h(429, &[("retry-after-ms", "200")]), Step::End]],
    );
    let out = sim.run(&cfg());
    assert_eq!(out.fail_header("retry-after").as_deref(), Some("1"));
    assert_eq!(out.fail_header("retry-after-ms").as_deref(), Some("200"));
}

#[test]
fn all_disabled_is_502() {
    let mut sim = Sim::new(3);
    for k in 0..3 {
        sim.script(k, vec![status(401)]);
    }
    let out = sim.run(&cfg());
    assert_eq!(out.sent.len(), 3);
    assert_eq!(out.status(), 502);
    assert_eq!(out.fail_header("x-should-retry").as_deref(), Some("false"));
    assert_eq!(out.fail_json()["error"]["type"], "api_error");
    // The next call does not even try.
    let out = sim.run(&cfg());
    assert_eq!(out.sent.len(), 0);
    assert_eq!(out.status(), 502);
}

#[test]
fn body_and_headers_identical_on_every_attempt_and_client_credentials_never_sent() {
    let mut sim = Sim::new(3);
    sim.script(0, vec![rate_limited("5")])
        .script(1, vec![status(403)]);
    let out = sim.run(&cfg());
    assert_eq!(out.sent.len(), 3);
    let first = &out.sent[0];
    for (i, a) in out.sent.iter().enumerate() {
        assert_eq!(a.body, first.body);
        assert_eq!(a.method, first.method);
        assert_eq!(a.path_and_query, first.path_and_query);
        let key = sim.pool.secret(sim.pool.key_at(i).unwrap());
        assert_eq!(
            a.headers.get("x-api-key").unwrap().to_str().unwrap(),
            key.expose()
        );
        assert!(a.headers.get("authorization").is_none());
        assert!(a.headers.get("connection").is_none());
        let mut h = a.headers.clone();
        let mut f = first.headers.clone();
        h.remove("x-api-key");
        f.remove("x-api-key");
        assert_eq!(h, f);
        assert_eq!(h.get("anthropic-beta").unwrap(), "tools-2024");
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
    }
}

#[test]
fn byok_one_attempt_delivered_as_is_pool_untouched() {
    let mut sim = Sim::new(2);
    sim.script_byok(vec![rate_limited("5")]);
    let secret = Secret::new("sk-ant-caller-own-key-000000000").unwrap();
    let out = sim.run_with(Sim::request(), Credential::Key(secret.clone()), &cfg());
    assert_eq!(out.sent.len(), 1);
    assert_eq!(out.sent[0].key, None);
    assert_eq!(
        out.sent[0].headers.get("x-api-key").unwrap().to_str().unwrap(),
        secret.expose()
    );
    assert!(out.sent[0].headers.get("authorization").is_none());
    assert_eq!(out.status(), 429);
    assert_eq!(
        out.head.as_ref().unwrap().headers.get("retry-after").unwrap(),
        "5"
    );
    for id in sim.pool.ids() {
        assert_eq!(sim.pool.state(id, sim.now), KeyState::Available);
    }
    // Passthrough keeps the caller's own headers.
    sim.script_byok(vec![status(401)]);
    let out = sim.run_with(Sim::request(), Credential::Passthrough, &cfg());
    assert_eq!(out.sent.len(), 1);
    assert_eq!(out.status(), 401);
    assert!(out.sent[0].headers.get("authorization").is_some());
    assert!(
        sim.pool
            .ids()
            .all(|id| sim.pool.state(id, sim.now).is_available())
    );
}

#[test]
fn marks_hold_for_the_next_calls_and_each_call_fails_over_on_its_own() {
    let mut sim = Sim::new(3);
    sim.script(0, vec![rate_limited("60")]);
    let first = sim.run(&cfg());
    assert_eq!(first.keys(), [Some(0), Some(1)]);
    sim.advance(Duration::from_secs(1));
    let second = sim.run(&cfg());
    assert_eq!(second.keys(), [Some(1)]);
    // An agent's third call meets a 429 on k1 and fails over by itself.
    sim.script(1, vec![ok(), rate_limited("30")]);
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.run(&cfg()).keys(), [Some(1)]);
    let third = sim.run(&cfg());
    assert_eq!(third.keys(), [Some(1), Some(2)]);
    assert_eq!(third.status(), 200);
    // Once k0's minute is over it is the primary again.
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.run(&cfg()).keys(), [Some(0)]);
}

#[test]
fn stream_429_before_head_fails_over() {
    let mut sim = Sim::new(2);
    sim.script(0, vec![rate_limited("5")]);
    sim.script(1, vec![vec![sse_head(), body(&full_stream()), Step::End]]);
    let out = sim.run(&cfg());
    assert_eq!(out.keys(), [Some(0), Some(1)]);
    assert_eq!(out.status(), 200);
    assert_eq!(out.body_str(), full_stream());
    assert!(out.abort.is_none());
}

#[test]
fn stream_transport_error_before_first_byte_is_a_502_response() {
    for steps in [
        vec![Step::Err(keypool_core::call::TransportError::Reset)],
        vec![sse_head(), Step::Err(keypool_core::call::TransportError::Reset)],
        vec![
            sse_head(),
            body("event: message_st"),
            Step::Err(keypool_core::call::TransportError::Eof),
        ],
        vec![sse_head(), Step::End],
    ] {
        let mut sim = Sim::new(2);
        sim.script(0, vec![steps.clone()]);
        let out = sim.run(&cfg());
        assert_eq!(out.sent.len(), 1, "{steps:?}");
        assert!(out.head.is_none(), "{steps:?}");
        assert_eq!(out.status(), 502, "{steps:?}");
        assert!(out.body.is_empty());
        assert_eq!(out.fail_json()["error"]["type"], "api_error");
        assert!(
            sim.pool
                .ids()
                .all(|id| sim.pool.state(id, sim.now).is_available())
        );
    }
}

#[test]
fn stream_reset_mid_event_delivers_whole_events_then_one_error() {
    let mut sim = Sim::new(2);
    let events = [MESSAGE_START, BLOCK_START, DELTA].concat();
    let cut = &DELTA[..10];
    sim.script(
        0,
        vec![vec![
            sse_head(),
            body(&events[..7]),
            body(&format!("{}{cut}", &events[7..])),
            Step::Err(keypool_core::call::TransportError::Reset),
        ]],
    );
    let out = sim.run(&cfg());
    assert_eq!(out.sent.len(), 1);
    assert_eq!(out.status(), 200);
    let body = out.body_str();
    assert!(body.starts_with(&events), "{body}");
    let tail = &body[events.len()..];
    assert!(
        tail.starts_with("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\""),
        "{tail}"
    );
    assert_eq!(body.matches("event: error").count(), 1);
    assert!(tail.ends_with("\n\n"));
    assert!(matches!(
        out.abort.as_ref().unwrap().error,
        CallError::StreamBroken(StreamBreak::Transport(_))
    ));
}

#[test]
fn stream_ending_before_message_stop_gets_an_error_event() {
    let mut sim = Sim::new(1);
    sim.script(
        0,
        vec![vec![
            sse_head(),
            body(&[MESSAGE_START, BLOCK_START].concat()),
            Step::End,
        ]],
    );
    let out = sim.run(&cfg());
    assert!(out.body_str().ends_with("\n\n"));
    assert_eq!(out.body_str().matches("event: error").count(), 1);
    assert!(matches!(
        out.abort.as_ref().unwrap().error,
        CallError::StreamBroken(StreamBreak::EndedEarly)
    ));
}

#[test]
fn stream_committed_by_its_last_event_ends_cleanly() {
    // First-byte commit on an in-band error as the first event; first-content commit on a
    // `message_stop` right after `message_start`: the event that commits the stream also ends
    // it, so the end of the body is clean and nothing is appended.
    let error = in_band("overloaded_error");
    for (config, events) in [
        (cfg(), error.clone()),
        (first_content(), [MESSAGE_START, MESSAGE_STOP].concat()),
    ] {
        let mut sim = Sim::new(1);
        sim.script(0, vec![vec![sse_head(), body(&events), Step::End]]);
        let out = sim.run(&config);
        assert_eq!(out.status(), 200);
        assert_eq!(out.body_str(), events);
        assert!(out.abort.is_none(), "{:?}", out.abort);
    }
}

#[test]
fn stream_idle_timeout_after_commit_gets_an_error_event() {
    let mut sim = Sim::new(1);
    sim.script(
        0,
        vec![vec![sse_head(), body(&[MESSAGE_START, BLOCK_START].concat())]],
    );
    let start = sim.now;
    let out = sim.run(&cfg());
    assert_eq!(sim.now - start, keypool_core::call::Timeouts::default().idle);
    assert!(matches!(
        out.abort.as_ref().unwrap().error,
        CallError::StreamBroken(StreamBreak::Idle(_))
    ));
    assert_eq!(out.body_str().matches("event: error").count(), 1);
}

#[test]
fn in_band_error_after_content_is_relayed_unchanged() {
    let mut sim = Sim::new(2);
    let stream = [MESSAGE_START, BLOCK_START, DELTA, &in_band("overloaded_error")].concat();
    sim.script(0, vec![vec![sse_head(), body(&stream), Step::End]]);
    let out = sim.run(&cfg());
    assert_eq!(out.sent.len(), 1);
    assert_eq!(out.body_str(), stream);
    assert!(out.abort.is_none());
}

#[test]
fn first_content_rate_limit_fails_over_with_zero_bytes_delivered() {
    let mut sim = Sim::new(2);
    let failed = [MESSAGE_START, &in_band("rate_limit_error")].concat();
    sim.script(0, vec![vec![sse_head(), body(&failed), Step::End]]);
    sim.script(1, vec![vec![sse_head(), body(&full_stream()), Step::End]]);
    let out = sim.run(&first_content());
    assert_eq!(out.keys(), [Some(0), Some(1)]);
    assert_eq!(out.body_str(), full_stream());
    assert!(sim.pool.state(sim.pool.key_at(0).unwrap(), sim.now).is_cooling());
}

#[test]
fn first_content_overloaded_becomes_http_529() {
    let mut sim = Sim::new(2);
    let err = in_band("overloaded_error");
    sim.script(
        0,
        vec![vec![
            sse_head(),
            body(&[MESSAGE_START, PING, &err].concat()),
            Step::End,
        ]],
    );
    let out = sim.run(&first_content());
    assert_eq!(out.sent.len(), 1);
    assert!(out.head.is_none());
    assert_eq!(out.status(), 529);
    assert_eq!(out.fail_json()["error"]["type"], "overloaded_error");
    assert!(
        sim.pool
            .ids()
            .all(|id| sim.pool.state(id, sim.now).is_available())
    );
}

#[test]
fn first_content_hold_time_commits_the_held_events() {
    let mut sim = Sim::new(2);
    sim.script(
        0,
        vec![vec![
            sse_head(),
            body(&[MESSAGE_START, PING].concat()),
            Step::Advance(Duration::from_secs(3)),
            body(&[BLOCK_START, DELTA, MESSAGE_STOP].concat()),
            Step::End,
        ]],
    );
    let out = sim.run(&first_content());
    assert_eq!(out.status(), 200);
    assert_eq!(
        out.body_str(),
        [MESSAGE_START, PING, BLOCK_START, DELTA, MESSAGE_STOP].concat()
    );
}

#[test]
fn first_content_holds_then_commits_on_content() {
    let mut sim = Sim::new(1);
    let s = full_stream();
    let steps: Vec<Step> = std::iter::once(sse_head())
        .chain(
            s.as_bytes()
                .chunks(5)
                .map(|c| body(std::str::from_utf8(c).unwrap())),
        )
        .chain([Step::End])
        .collect();
    sim.script(0, vec![steps]);
    let out = sim.run(&first_content());
    assert_eq!(out.body_str(), s);
    assert!(out.abort.is_none());
}

#[test]
fn timeout_before_head_is_504_and_not_retried() {
    let mut sim = Sim::new(2);
    sim.script(0, vec![vec![]]);
    let out = sim.run(&cfg());
    assert_eq!(out.sent.len(), 1);
    assert_eq!(out.status(), 504);
    assert_eq!(out.fail_json()["error"]["type"], "timeout_error");
}

#[test]
fn caller_gone_marks_nothing() {
    let sim = Sim::new(2);
    let mut call = keypool_core::call::Call::new(
        Sim::request(),
        Credential::Pool(sim.pool.clone()),
        &cfg(),
        "req",
        sim.now,
    );
    assert!(matches!(call.poll_output(), keypool_core::call::Output::Send(_)));
    call.handle_caller_gone();
    assert!(call.is_done());
    assert_eq!(call.outcome(), Some(keypool_core::call::Outcome::ClientGone));
    assert!(matches!(
        call.poll_output(),
        keypool_core::call::Output::Wait(None)
    ));
    assert!(
        sim.pool
            .ids()
            .all(|id| sim.pool.state(id, sim.now).is_available())
    );
}

#[test]
fn debug_output_never_contains_secrets() {
    let mut sim = Sim::new(2);
    sim.script(0, vec![rate_limited("5")]);
    let mut call = keypool_core::call::Call::new(
        Sim::request(),
        Credential::Pool(sim.pool.clone()),
        &cfg(),
        "req",
        sim.now,
    );
    let dbg = format!("{call:?}");
    let out = sim.drive(&mut call);
    let all = format!("{dbg} {out:?} {call:?}");
    for key in keys(2) {
        assert!(!all.contains(&key[6..]), "secret leaked");
    }
    assert!(!all.contains("client-credential-123456789"));
}

#[test]
fn first_content_malformed_in_band_error_still_fails_with_an_anthropic_body() {
    // Found by call_prop: the event's data used to become the response body as it was.
    for data in [
        "oops, not json",
        "{}",
        "{\"error\":{\"type\":\"overloaded_error\"}}",
    ] {
        let mut sim = Sim::new(2);
        let stream = format!("{MESSAGE_START}event: error\ndata: {data}\n\n");
        sim.script(0, vec![vec![sse_head(), body(&stream), Step::End]]);
        let out = sim.run(&first_content());
        assert_eq!(out.sent.len(), 1, "{data}");
        assert!(out.head.is_none());
        let json = out.fail_json();
        assert_eq!(json["type"], "error", "{data}");
        assert!(
            json["error"]["type"].is_string() && json["error"]["message"].is_string(),
            "{data}"
        );
        assert_eq!(json["request_id"], "req_test");
    }
    // A well-formed one is still relayed byte for byte, with the call's request id added.
    let mut sim = Sim::new(1);
    let err = in_band("overloaded_error");
    sim.script(0, vec![vec![sse_head(), body(&err), Step::End]]);
    let out = sim.run(&first_content());
    assert_eq!(out.status(), 529);
    let data = err.strip_prefix("event: error\ndata: ").unwrap().trim_end();
    let expected = format!(
        "{},\"request_id\":\"req_test\"}}",
        data.strip_suffix('}').unwrap()
    );
    assert_eq!(
        out.fail.as_ref().unwrap().response.body().as_ref(),
        expected.as_bytes()
    );
}

#[test]
fn timeouts_too_long_to_schedule_never_fire_and_never_panic() {
    // A huge timeout (meaning "never") used to overflow `now + timeout` and panic.
    let timeouts = keypool_core::call::Timeouts {
        first_byte: Duration::MAX,
        idle: Duration::MAX,
        connect: Duration::MAX,
    };
    let config = CallConfig::default()
        .with_timeouts(timeouts)
        .with_commit(CommitPoint::FirstContent { hold: Duration::MAX });
    let sim = Sim::new(1);
    let mut call = keypool_core::call::Call::new(
        Sim::request(),
        Credential::Pool(sim.pool.clone()),
        &config,
        "req",
        sim.now,
    );
    assert!(matches!(call.poll_output(), keypool_core::call::Output::Send(_)));
    assert!(matches!(
        call.poll_output(),
        keypool_core::call::Output::Wait(None)
    ));
    call.handle_response_head(
        http::StatusCode::OK,
        [(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        )]
        .into_iter()
        .collect(),
        sim.now,
        sim.wall,
    );
    call.handle_body(bytes::Bytes::from_static(MESSAGE_START.as_bytes()), sim.now);
    assert!(matches!(
        call.poll_output(),
        keypool_core::call::Output::Wait(None)
    ));
    assert_eq!(call.poll_timeout(), None);
    call.handle_timeout(sim.now + Duration::from_secs(1_000_000_000));
    assert!(matches!(
        call.poll_output(),
        keypool_core::call::Output::Wait(None)
    ));
}

#[test]
fn summary_reports_attempts_and_key_and_marks_come_out_once_each() {
    let mut sim = Sim::new(3);
    sim.script(0, vec![rate_limited("5")])
        .script(1, vec![status(401)]);
    let mut call = keypool_core::call::Call::new(
        Sim::request(),
        Credential::Pool(sim.pool.clone()),
        &cfg(),
        "req",
        sim.now,
    );
    let out = sim.drive(&mut call);
    assert_eq!(out.status(), 200);
    let summary = call.summary();
    assert_eq!(summary.attempts, 3);
    assert_eq!(summary.key, Some(sim.pool.key_at(2).unwrap()));
    let marked: Vec<(usize, u16)> = out
        .marks
        .iter()
        .map(|m| (m.key.index(), m.status.as_u16()))
        .collect();
    assert_eq!(marked, [(0, 429), (1, 401)]);
    // Each is a portable mark for the key's fingerprint, at the generation the attempt saw.
    for m in &out.marks {
        assert_eq!(m.mark.key(), sim.pool.fingerprint(m.key));
        assert_eq!(m.mark.status, Some(m.status.as_u16()));
        assert_eq!(m.mark.generation, 0);
    }
    assert!(matches!(call.poll_body(), keypool_core::call::BodyOutput::Done));
}

#[test]
fn a_call_that_began_before_a_reload_marks_the_key_in_the_new_pool() {
    use keypool_core::call::{Call, Output};
    let sim = Sim::new(2);
    let mut call = Call::new(
        Sim::request(),
        Credential::Pool(sim.pool.clone()),
        &cfg(),
        "req",
        sim.now,
    );
    let Output::Send(first) = call.poll_output() else {
        panic!("no first attempt")
    };
    assert_eq!(first.key.map(|k| k.index()), Some(0));
    // SIGHUP: the key list is reloaded in another order with a new key, while the call waits.
    let k = support::keys(3);
    let new = sim
        .pool
        .reload([k[2].clone(), k[1].clone(), k[0].clone()])
        .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("retry-after", "30".parse().unwrap());
    call.handle_response_head(http::StatusCode::TOO_MANY_REQUESTS, headers, sim.now, sim.wall);
    let Output::Mark(mark) = call.poll_output() else {
        panic!("no mark")
    };
    assert_eq!(mark.mark.key(), new.fingerprint(new.key_at(2).unwrap()));
    // The key is cooling in the new pool (now at position 2), which new calls walk.
    assert_eq!(
        new.state(new.key_at(2).unwrap(), sim.now),
        KeyState::Cooling {
            until: sim.now + Duration::from_secs(30),
            reason: CoolReason::RateLimited
        }
    );
    assert!(new.state(new.key_at(1).unwrap(), sim.now).is_available());
    assert_eq!(new.walk().next_key(&new, sim.now).map(|k| k.index()), Ok(0));
}

#[test]
fn fingerprints_do_not_depend_on_the_order_of_the_key_list() {
    let k = support::keys(3);
    let t0 = std::time::Instant::now();
    let a = keypool_core::Pool::new(k.clone(), keypool_core::Order::default(), t0).unwrap();
    let b = keypool_core::Pool::new(
        [k[2].clone(), k[0].clone(), k[1].clone()],
        keypool_core::Order::RoundRobin,
        t0,
    )
    .unwrap();
    for id in a.ids() {
        let fp = a.fingerprint(id);
        let there = b.find_fingerprint(fp).unwrap();
        assert_eq!(b.secret(there), a.secret(id));
        assert_eq!(fp, keypool_core::Fingerprint::of(a.secret(id)));
    }
}
