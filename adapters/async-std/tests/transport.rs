//! The HTTP/1.1 transport: keep-alive reuse against the mock, a pooled connection the server
//! closed, and body framings from a hand-written server on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use futures_lite::{AsyncReadExt, StreamExt};
use keypool_async_std::{CallError, Client, messages};
use keypool_core::call::{StreamBreak, TransportError};
use keypool_mock::{MockServer, Reply, StreamScript};

const KEYS: [&str; 2] = [
    "sk-ant-api03-transport-test-key-one-00000000",
    "sk-ant-api03-transport-test-key-two-00000000",
];
const BODY: &str = r#"{"model":"claude-x","max_tokens":8,"messages":[]}"#;

fn client(base_url: &str, ca: Option<Vec<u8>>) -> Client {
    let mut b = Client::builder().keys(KEYS).base_url(base_url);
    if let Some(ca) = ca {
        b = b.root_cert_der(ca);
    }
    b.build().unwrap()
}

async fn send_text(client: &Client) -> (u16, String) {
    let response = client.send(messages(BODY)).await.unwrap();
    let status = response.status().as_u16();
    let mut text = String::new();
    response.into_body().read_to_string(&mut text).await.unwrap();
    (status, text)
}

fn keep_alive_against_mock(tls: bool) {
    let mock = MockServer::start();
    mock.script(
        KEYS[0],
        [
            Reply::ok(),
            Reply::ok(),
            Reply::stream(StreamScript::new()),
            Reply::ok(),
        ],
    );
    let (url, ca) = if tls {
        (mock.tls_url(), Some(mock.ca_der()))
    } else {
        (mock.url(), None)
    };
    let client = client(&url, ca);
    smol::block_on(async {
        assert_eq!(send_text(&client).await.0, 200);
        assert_eq!(send_text(&client).await.0, 200);
        let events: Vec<_> = client
            .stream(messages(
                r#"{"model":"claude-x","max_tokens":8,"stream":true,"messages":[]}"#,
            ))
            .await
            .unwrap()
            .collect()
            .await;
        assert!(events.iter().all(Result::is_ok));
        assert_eq!(send_text(&client).await.0, 200);
    });
    let connections: Vec<u64> = mock.requests().iter().map(|r| r.connection).collect();
    assert_eq!(connections.len(), 4);
    assert!(
        connections.iter().all(|c| *c == connections[0]),
        "{connections:?}"
    );
}

#[test]
fn keep_alive_reuses_one_connection_plain() {
    keep_alive_against_mock(false);
}

#[test]
fn keep_alive_reuses_one_connection_tls() {
    keep_alive_against_mock(true);
}

/// A hand-written upstream: each accepted connection is served by the next handler.
struct Server {
    addr: SocketAddr,
    /// `(connection number, x-api-key)` of every request read, in order.
    seen: Arc<Mutex<Vec<(usize, String)>>>,
    thread: Option<thread::JoinHandle<()>>,
}

type Handler = Box<dyn FnOnce(&mut Conn) + Send>;

struct Conn {
    stream: TcpStream,
    number: usize,
    seen: Arc<Mutex<Vec<(usize, String)>>>,
}

impl Conn {
    /// Reads one request (head and content-length body); `false` at EOF.
    fn read_request(&mut self) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match self.stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        let head = String::from_utf8(head).unwrap();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let length: usize = header("content-length:").parse().unwrap_or(0);
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).unwrap();
        self.seen
            .lock()
            .unwrap()
            .push((self.number, header("x-api-key:")));
        true
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }
}

impl Server {
    fn start(handlers: Vec<Handler>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let thread = thread::spawn(move || {
            for (number, handler) in handlers.into_iter().enumerate() {
                let (stream, _) = listener.accept().unwrap();
                let mut conn = Conn {
                    stream,
                    number,
                    seen: record.clone(),
                };
                handler(&mut conn);
            }
        });
        Self {
            addr,
            seen,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn finish(mut self) -> Vec<(usize, String)> {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.seen.lock().unwrap().clone()
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

/// The server answers one request with keep-alive and closes the idle socket: the next call
/// notices before reuse and opens a new connection. One request per call, no key marked.
#[test]
fn idle_connection_closed_by_the_server_is_not_reused() {
    let server = Server::start(vec![
        Box::new(|c: &mut Conn| {
            assert!(c.read_request());
            c.write(OK);
            // Then close the idle connection.
        }),
        Box::new(|c: &mut Conn| {
            assert!(c.read_request());
            c.write(OK);
            assert!(!c.read_request());
        }),
    ]);
    let client = client(&server.url(), None);
    async_std::task::block_on(async {
        assert_eq!(send_text(&client).await, (200, "{}".to_owned()));
        async_io::Timer::after(Duration::from_millis(100)).await;
        assert_eq!(send_text(&client).await, (200, "{}".to_owned()));
    });
    drop(client);
    let seen = server.finish();
    assert_eq!(seen, [(0, KEYS[0].to_owned()), (1, KEYS[0].to_owned())]);
}

/// The server reads the second request on the kept-alive connection and closes it without an
/// answer: the call sends the same attempt again on a fresh connection (`Io::Resend`), and no
/// key is marked (no failover to the second key).
#[test]
fn reused_connection_failing_before_the_head_is_retried_fresh() {
    let server = Server::start(vec![
        Box::new(|c: &mut Conn| {
            assert!(c.read_request());
            c.write(OK);
            assert!(c.read_request());
            // Close without answering.
        }),
        Box::new(|c: &mut Conn| {
            assert!(c.read_request());
            c.write(OK);
            assert!(!c.read_request());
        }),
    ]);
    let client = client(&server.url(), None);
    smol::block_on(async {
        assert_eq!(send_text(&client).await.0, 200);
        assert_eq!(send_text(&client).await.0, 200);
    });
    let pool = client.pool().clone();
    drop(client);
    let seen = server.finish();
    assert_eq!(
        seen,
        [
            (0, KEYS[0].to_owned()),
            (0, KEYS[0].to_owned()),
            (1, KEYS[0].to_owned())
        ]
    );
    let now = std::time::Instant::now();
    assert!(pool.snapshot(now).iter().all(|k| k.state.is_available()));
}

/// A fresh connection that fails before the head is not retried: the call reports it (502).
#[test]
fn fresh_connection_closed_before_the_head_is_a_502() {
    let server = Server::start(vec![Box::new(|c: &mut Conn| {
        assert!(c.read_request());
    })]);
    let client = client(&server.url(), None);
    let err = smol::block_on(client.send(messages(BODY))).unwrap_err();
    assert_eq!(err.to_response().unwrap().status(), 502);
    drop(client);
    assert_eq!(server.finish().len(), 1);
}

/// Chunked bodies with extensions and trailers, and the connection reused after each.
#[test]
fn chunked_with_extensions_and_trailers_keeps_the_connection() {
    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
        4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nx-trailer: yes\r\n\r\n";
    let server = Server::start(vec![Box::new(move |c: &mut Conn| {
        for _ in 0..3 {
            assert!(c.read_request());
            c.write(answer);
        }
        assert!(!c.read_request());
    })]);
    let client = client(&server.url(), None);
    async_std::task::block_on(async {
        for _ in 0..3 {
            assert_eq!(send_text(&client).await, (200, r#"{"a":1}"#.to_owned()));
        }
    });
    drop(client);
    assert_eq!(server.finish().len(), 3);
}

/// A chunked body cut before its last chunk is a broken body, never a short one.
#[test]
fn truncated_chunked_body_is_an_error() {
    let server = Server::start(vec![Box::new(|c: &mut Conn| {
        assert!(c.read_request());
        c.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n");
    })]);
    let client = client(&server.url(), None);
    smol::block_on(async {
        let mut body = client.send(messages(BODY)).await.unwrap().into_body();
        assert_eq!(body.next_chunk().await.unwrap().unwrap(), "hello");
        let err = body.next_chunk().await.unwrap_err();
        assert_eq!(
            err.error,
            CallError::BodyBroken(StreamBreak::Transport(TransportError::Eof))
        );
    });
    drop(client);
    server.finish();
}

/// A body delimited by the end of the connection.
#[test]
fn connection_close_body() {
    let server = Server::start(vec![Box::new(|c: &mut Conn| {
        assert!(c.read_request());
        c.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nall of it");
    })]);
    let client = client(&server.url(), None);
    let answer = smol::block_on(send_text(&client));
    assert_eq!(answer, (200, "all of it".to_owned()));
    drop(client);
    server.finish();
}
