//! How a call ended is the core's answer (issue #16, item 4), on simulated time: every way a
//! call can end has its outcome, a plain body is complete at its `content-length`, and the
//! IO layer's own timeout on a delivered body is the idle timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use keypool_core::call::{
    BodyOutput, Call, CallConfig, CallError, CommitPoint, Credential, FailureKind, Outcome, Output, Request,
    StreamBreak, Timeouts, TransportError,
};
use support::*;

fn cfg() -> CallConfig {
    CallConfig::default()
}

fn outcome(n: usize, config: &CallConfig, answers: Vec<Vec<Step>>) -> (Outcome, support::Outcome) {
    let mut sim = Sim::new(n);
    sim.script(0, answers);
    let out = sim.run(config);
    (out.ended.expect("a finished call has an outcome"), out)
}

#[test]
fn every_way_a_call_ends_has_its_outcome() {
    let stream = [MESSAGE_START, BLOCK_START, DELTA].concat();
    let reset = vec![
        sse_head(),
        body(&stream),
        body(&DELTA[..9]),
        Step::Err(TransportError::Reset),
    ];
    let cases: Vec<(&str, CallConfig, Vec<Vec<Step>>, Outcome)> = vec![
        ("plain body", cfg(), vec![ok()], Outcome::Complete),
        ("delivered 500", cfg(), vec![status(500)], Outcome::Complete),
        (
            "whole stream",
            cfg(),
            vec![vec![sse_head(), body(&full_stream()), Step::End]],
            Outcome::Complete,
        ),
        (
            "reset mid-event",
            cfg(),
            vec![reset],
            Outcome::UpstreamBroke(StreamBreak::Transport(TransportError::Reset)),
        ),
        (
            "EOF before message_stop",
            cfg(),
            vec![vec![sse_head(), body(&stream), Step::End]],
            Outcome::UpstreamBroke(StreamBreak::EndedEarly),
        ),
        (
            "plain body cut",
            cfg(),
            vec![vec![head(200), body("{\"par"), Step::Err(TransportError::Eof)]],
            Outcome::UpstreamBroke(StreamBreak::Transport(TransportError::Eof)),
        ),
        (
            "in-band error after content",
            cfg(),
            vec![vec![
                sse_head(),
                body(&[stream.as_str(), &in_band("overloaded_error")].concat()),
                Step::End,
            ]],
            Outcome::UpstreamError,
        ),
        (
            "stalled stream",
            cfg(),
            vec![vec![sse_head(), body(&stream)]],
            Outcome::Timeout,
        ),
        (
            "stalled body",
            cfg(),
            vec![vec![head(200), body("{")]],
            Outcome::Timeout,
        ),
        (
            "every key rate-limited",
            cfg(),
            vec![rate_limited("5")],
            Outcome::Failed(FailureKind::RateLimited),
        ),
        (
            "every key disabled",
            cfg(),
            vec![status(401)],
            Outcome::Failed(FailureKind::AllDisabled),
        ),
        (
            "reset before the head",
            cfg(),
            vec![vec![Step::Err(TransportError::Reset)]],
            Outcome::Failed(FailureKind::Transport),
        ),
        (
            "no head in time",
            cfg(),
            vec![vec![]],
            Outcome::Failed(FailureKind::Timeout),
        ),
        (
            "stream without events",
            cfg(),
            vec![vec![sse_head(), Step::End]],
            Outcome::Failed(FailureKind::EmptyStream),
        ),
        (
            "in-band error before content",
            cfg().with_commit(CommitPoint::first_content()),
            vec![vec![
                sse_head(),
                body(&[MESSAGE_START, &in_band("overloaded_error")].concat()),
            ]],
            Outcome::Failed(FailureKind::InBand),
        ),
    ];
    for (what, config, answers, expected) in cases {
        let (got, out) = outcome(1, &config, answers);
        assert_eq!(got, expected, "{what}: {out:?}");
        // The outcome names what the caller saw: a failure, a break, or a whole body.
        match got {
            Outcome::Failed(_) => assert_eq!(got, Outcome::of_error(&out.fail.unwrap().error), "{what}"),
            Outcome::UpstreamBroke(_) | Outcome::Timeout => {
                assert_eq!(got, Outcome::of_error(&out.abort.unwrap().error), "{what}")
            }
            _ => assert!(out.abort.is_none() && out.fail.is_none(), "{what}"),
        }
    }
}

#[test]
fn outcome_names_are_the_log_and_metric_labels() {
    let names: Vec<&str> = [
        Outcome::Complete,
        Outcome::UpstreamBroke(StreamBreak::EndedEarly),
        Outcome::UpstreamError,
        Outcome::Timeout,
        Outcome::ClientGone,
        Outcome::Failed(FailureKind::RateLimited),
        Outcome::Failed(FailureKind::AllDisabled),
        Outcome::Failed(FailureKind::Transport),
        Outcome::Failed(FailureKind::Timeout),
        Outcome::Failed(FailureKind::EmptyStream),
        Outcome::Failed(FailureKind::InBand),
    ]
    .into_iter()
    .map(Outcome::as_str)
    .collect();
    assert_eq!(
        names,
        [
            "complete",
            "upstream_broke",
            "upstream_error",
            "timeout",
            "client_gone",
            "failed_rate_limited",
            "failed_all_disabled",
            "failed_transport",
            "failed_timeout",
            "failed_empty_stream",
            "failed_in_band",
        ]
    );
}

fn started(sim: &Sim, request: Request) -> Call {
    let mut call = Call::new(
        request,
        Credential::Pool(sim.pool.clone()),
        &cfg(),
        "req",
        sim.now,
    );
    assert!(matches!(call.poll_output(), Output::Send(_)));
    assert!(matches!(call.poll_output(), Output::Wait(Some(_))));
    call
}

fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, value.parse().unwrap());
    }
    map
}

#[test]
fn caller_gone_mid_body_is_client_gone_and_after_the_end_changes_nothing() {
    let sim = Sim::new(1);
    let mut call = started(&sim, Sim::request());
    call.handle_response_head(http::StatusCode::OK, headers(&[]), sim.now, sim.wall);
    assert!(matches!(call.poll_output(), Output::Head(_)));
    call.handle_body(bytes::Bytes::from_static(b"{\"a\""), sim.now);
    assert!(matches!(call.poll_body(), BodyOutput::Body(_)));
    assert_eq!(call.outcome(), None, "still running");
    call.handle_caller_gone();
    assert_eq!(call.outcome(), Some(Outcome::ClientGone));
    assert!(matches!(call.poll_body(), BodyOutput::Done));

    let mut call = started(&sim, Sim::request());
    call.handle_response_head(http::StatusCode::OK, headers(&[]), sim.now, sim.wall);
    call.handle_body_end(sim.now);
    call.handle_caller_gone();
    assert_eq!(call.outcome(), Some(Outcome::Complete));
}

#[test]
fn a_plain_body_is_complete_at_its_content_length() {
    let sim = Sim::new(1);
    let mut call = started(&sim, Sim::request());
    let map = headers(&[("content-length", "10"), ("content-type", "application/json")]);
    call.handle_response_head(http::StatusCode::OK, map, sim.now, sim.wall);
    assert!(matches!(call.poll_output(), Output::Head(h) if h.headers["content-length"] == "10"));
    call.handle_body(bytes::Bytes::from_static(b"{\"ok\":"), sim.now);
    assert!(matches!(call.poll_body(), BodyOutput::Body(b) if b.len() == 6));
    assert!(matches!(call.poll_body(), BodyOutput::Wait(Some(_))));
    call.handle_body(bytes::Bytes::from_static(b"true"), sim.now);
    assert!(matches!(call.poll_body(), BodyOutput::Body(b) if b.as_ref() == b"true"));
    // Complete before the transport reports the end: a server that stops polling the body once
    // it has written content-length bytes still logs a complete call.
    assert!(matches!(call.poll_body(), BodyOutput::Done));
    assert!(call.is_done());
    assert_eq!(call.outcome(), Some(Outcome::Complete));
    assert_eq!(call.poll_timeout(), None);
}

#[test]
fn bodies_that_are_empty_by_their_framing_are_complete_at_the_head() {
    let sim = Sim::new(1);
    let head_request = Request {
        method: http::Method::HEAD,
        ..Sim::request()
    };
    for (request, status, pairs) in [
        (Sim::request(), 200, vec![("content-length", "0")]),
        (head_request, 200, vec![("content-length", "512")]),
        (Sim::request(), 204, vec![]),
    ] {
        let mut call = started(&sim, request);
        let status = http::StatusCode::from_u16(status).unwrap();
        call.handle_response_head(status, headers(&pairs), sim.now, sim.wall);
        assert!(matches!(call.poll_output(), Output::Head(_)));
        assert!(matches!(call.poll_body(), BodyOutput::Done), "{status}");
        assert_eq!(call.outcome(), Some(Outcome::Complete));
    }
}

#[test]
fn no_valid_content_length_waits_for_the_transports_end() {
    let sim = Sim::new(1);
    for pairs in [
        vec![],
        vec![("content-length", "4"), ("transfer-encoding", "chunked")],
        vec![("content-length", "4, 4")],
        vec![("content-length", "-4")],
    ] {
        let mut call = started(&sim, Sim::request());
        call.handle_response_head(http::StatusCode::OK, headers(&pairs), sim.now, sim.wall);
        assert!(matches!(call.poll_output(), Output::Head(_)));
        call.handle_body(bytes::Bytes::from_static(b"abcd"), sim.now);
        assert!(matches!(call.poll_body(), BodyOutput::Body(_)));
        assert!(matches!(call.poll_body(), BodyOutput::Wait(Some(_))), "{pairs:?}");
        call.handle_body_end(sim.now);
        assert!(matches!(call.poll_body(), BodyOutput::Done));
        assert_eq!(call.outcome(), Some(Outcome::Complete));
    }
}

#[test]
fn an_error_body_classified_whole_is_complete_at_its_content_length() {
    // A 400 is read for classification; its body (all of its content-length) comes out with the
    // head and the call is over without waiting for the transport's end.
    let sim = Sim::new(1);
    let mut call = started(&sim, Sim::request());
    let error = r#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#;
    let len = error.len().to_string();
    call.handle_response_head(
        http::StatusCode::BAD_REQUEST,
        headers(&[("content-length", &len)]),
        sim.now,
        sim.wall,
    );
    call.handle_body(bytes::Bytes::from(error), sim.now);
    call.handle_body_end(sim.now);
    assert!(matches!(call.poll_output(), Output::Head(h) if h.status == 400));
    assert!(matches!(call.poll_body(), BodyOutput::Body(b) if b.as_ref() == error.as_bytes()));
    assert!(matches!(call.poll_body(), BodyOutput::Done));
    assert_eq!(call.outcome(), Some(Outcome::Complete));
}

#[test]
fn the_io_layers_timeout_on_a_delivered_body_is_the_idle_timeout() {
    // A blocking adapter enforces the idle timeout as its transport's per-read timeout: what it
    // reports is the call's own idle break, exactly as if the call's timer had fired.
    let idle = Duration::from_millis(600);
    let config = cfg().with_timeouts(Timeouts {
        idle,
        ..Timeouts::default()
    });
    let stream = [MESSAGE_START, BLOCK_START].concat();
    for answer in [
        vec![sse_head(), body(&stream), Step::Err(TransportError::Timeout)],
        vec![head(200), body("{"), Step::Err(TransportError::Timeout)],
    ] {
        let (got, out) = outcome(1, &config, vec![answer]);
        assert_eq!(got, Outcome::Timeout);
        let error = &out.abort.unwrap().error;
        assert!(
            matches!(
                error,
                CallError::StreamBroken(StreamBreak::Idle(d)) | CallError::BodyBroken(StreamBreak::Idle(d)) if *d == idle
            ),
            "{error:?}"
        );
    }
}
