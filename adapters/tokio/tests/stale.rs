//! A pooled connection the upstream closed under a request: the request is sent once more on
//! another connection, and the call never sees the failure (no key marked, no failover). A fresh
//! connection that dies the same way is the upstream's failure: not repeated.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
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

/// What the upstream of the reused-connection test saw: per request, its connection, whether
/// that connection had carried a request before, the key, and whether it was answered.
type Seen = Arc<Mutex<Vec<(usize, bool, String, bool)>>>;

/// Serves every connection on a thread of its own: the first request that arrives on a reused
/// connection is read and the connection closed without an answer (the close crossing the
/// request, as when an upstream drops an idle keep-alive connection); every other request is
/// answered. Connections are numbered in the order they are accepted.
fn closing_upstream(listener: TcpListener, seen: Seen) {
    thread::spawn(move || {
        for (number, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            let seen = seen.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut reused = false;
                while let Some(key) = read_request(&mut reader) {
                    let mut seen = seen.lock().unwrap();
                    let close = reused && !seen.iter().any(|&(_, _, _, answered)| !answered);
                    seen.push((number, reused, key, !close));
                    drop(seen);
                    if close {
                        return;
                    }
                    writer.write_all(OK).unwrap();
                    reused = true;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_before_the_head_is_sent_again_on_another() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Seen::default();
    closing_upstream(listener, seen.clone());
    let client = Client::builder().keys(KEYS).base_url(url).build().unwrap();
    // A request normally takes the pooled connection of the one before; when the pool raced a
    // new connection and that won, the request ran on a fresh one and the close did not happen
    // yet: one more round (bounded).
    let mut round = 0;
    while !seen.lock().unwrap().iter().any(|&(_, _, _, answered)| !answered) {
        assert!(round < 10, "no request ran on a reused connection: {seen:?}");
        let response = client
            .send(keypool_tokio::messages(
                r#"{"model":"claude-x","max_tokens":8,"messages":[]}"#,
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "round {round}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}", "round {round}");
        round += 1;
    }
    let seen = seen.lock().unwrap().clone();
    // The closed request was sent once more, with the same key, on a connection of its own.
    let closed = seen.iter().position(|&(_, _, _, answered)| !answered).unwrap();
    let (on, reused, key, _) = &seen[closed];
    assert!(reused);
    let (again_on, _, again_key, answered) = seen.get(closed + 1).expect("sent again");
    assert_eq!((again_key, *answered), (key, true), "{seen:?}");
    assert!(again_on != on, "on another connection: {seen:?}");
    assert_eq!(seen.len(), closed + 2, "nothing else: {seen:?}");
    assert!(
        seen.iter().all(|(_, _, k, _)| k == KEYS[0]),
        "no failover: {seen:?}"
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
