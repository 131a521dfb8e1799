//! A pooled connection the upstream closed under a request: the request is sent once more on a
//! fresh connection, and the call never sees the failure (no key marked, no failover). A fresh
//! connection that dies the same way is the upstream's failure: not repeated.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

use http_body_util::BodyExt;
use keypool_tokio::Client;

const KEYS: [&str; 2] = [
    "sk-ant-api03-stale-test-key-one-0000000000000",
    "sk-ant-api03-stale-test-key-two-0000000000000",
];
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

/// Reads one request (head and content-length body); its `x-api-key`, `None` at EOF.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut key = None;
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            match name.to_ascii_lowercase().as_str() {
                "x-api-key" => key = Some(value.trim().to_owned()),
                "content-length" => length = value.trim().parse().unwrap(),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_before_the_head_is_retried_on_a_fresh_one() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Connection 0 answers one request, reads the next and closes without an answer;
    // connection 1 answers. Every request's (connection, key) is recorded.
    let server = thread::spawn(move || {
        let mut seen = Vec::new();
        for (number, answers) in [(0, 1), (1, 1)] {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            for _ in 0..answers {
                seen.push((number, read_request(&mut reader).unwrap()));
                writer.write_all(OK).unwrap();
            }
            if number == 0 {
                seen.push((number, read_request(&mut reader).unwrap()));
                drop(writer);
                drop(reader);
            }
        }
        seen
    });
    let client = Client::builder().keys(KEYS).base_url(url).build().unwrap();
    for round in 0..2 {
        let response = client
            .send(keypool_tokio::messages(
                r#"{"model":"claude-x","max_tokens":8,"messages":[]}"#,
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "round {round}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}", "round {round}");
    }
    let seen = server.join().unwrap();
    assert_eq!(
        seen,
        [
            (0, KEYS[0].to_owned()),
            (0, KEYS[0].to_owned()),
            (1, KEYS[0].to_owned())
        ]
    );
    let now = Instant::now();
    for id in client.pool().ids() {
        assert!(client.pool().state(id, now).is_available(), "{id:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_connection_closed_before_the_head_is_not_repeated() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // The first connection reads the request and closes without an answer. The next one is a
    // repeat (answered, so that the call would succeed) or the test's own empty connection.
    let server = thread::spawn(move || {
        let mut keys = Vec::new();
        for answer in [false, true] {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let Some(key) = read_request(&mut reader) else {
                break;
            };
            keys.push(key);
            if answer {
                writer.write_all(OK).unwrap();
            }
        }
        keys
    });
    let client = Client::builder()
        .keys(KEYS)
        .base_url(format!("http://{addr}"))
        .build()
        .unwrap();
    let result = client
        .send(keypool_tokio::messages(
            r#"{"model":"claude-x","max_tokens":8,"messages":[]}"#,
        ))
        .await;
    // Done with the call: the test's own connection ends the server (closed, no request).
    drop(TcpStream::connect(addr));
    let keys = server.join().unwrap();
    assert_eq!(keys, [KEYS[0]], "sent once");
    let error = result.expect_err("a request that died on a fresh connection is keypool's 502");
    assert_eq!(error.to_response().unwrap().status(), 502, "{error:?}");
    let now = Instant::now();
    for id in client.pool().ids() {
        assert!(client.pool().state(id, now).is_available(), "{id:?}");
    }
}
