//! Dropping a streaming call mid-stream closes the upstream exchange and marks no key.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use keypool_core::KeyState;
use keypool_mock::{Ending, MockServer, OutcomeEnd, Reply, StreamScript};
use keypool_tokio::Client;

fn stream_request() -> keypool_core::call::Request {
    keypool_tokio::messages(
        r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
    )
}

async fn drop_mid_stream(tls: bool) {
    let mock = MockServer::start();
    let keys = [format!("sk-ant-api03-D0x{}", "Pq2Wd4Nz".repeat(5))];
    mock.set_default(
        &keys[0],
        Reply::stream(StreamScript::new().text_deltas(5).ending(Ending::Stall)),
    );
    let mut builder = Client::builder().keys(keys.clone());
    builder = if tls {
        builder.base_url(mock.tls_url()).root_cert_der(mock.ca_der())
    } else {
        builder.base_url(mock.url())
    };
    let client = builder.build().unwrap();

    let mut events = client.stream(stream_request()).await.unwrap();
    let mut deltas = 0;
    while deltas < 2 {
        let event = events.next_event().await.expect("more events").unwrap();
        if event.event_type() == "content_block_delta" {
            deltas += 1;
        }
    }
    drop(events);

    let outcomes = mock
        .wait_for_stream_outcomes_async(1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].end, OutcomeEnd::ClientGone);
    let now = Instant::now();
    for id in client.pool().ids() {
        assert_eq!(client.pool().state(id, now), KeyState::Available);
    }
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_closes_the_upstream_plain() {
    drop_mid_stream(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_closes_the_upstream_tls() {
    drop_mid_stream(true).await;
}

/// Dropping the `send` future while the head is awaited cancels the request too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_pending_send_marks_nothing() {
    let mock = MockServer::start();
    let keys = [format!("sk-ant-api03-D1x{}", "Pq2Wd4Nz".repeat(5))];
    mock.set_default(&keys[0], Reply::stall_before_head());
    let client = Client::builder()
        .keys(keys.clone())
        .base_url(mock.url())
        .build()
        .unwrap();
    let call = client.send(stream_request());
    let cancelled = tokio::select! {
        _ = call => false,
        _ = mock.wait_for_requests_async(1, Duration::from_secs(10)) => true,
    };
    assert!(cancelled);
    let outcomes = mock
        .wait_for_outcomes_async(1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(outcomes[0].end, OutcomeEnd::ClientGone);
    for id in client.pool().ids() {
        assert_eq!(client.pool().state(id, Instant::now()), KeyState::Available);
    }
}
