//! A deliberately raw HTTP/1.1 client (std sockets, rustls for TLS) so the tests see exactly
//! what the mock writes: each chunk of a chunked body, a missing final chunk, a reset.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use keypool_mock::MockServer;
use rustls::pki_types::{CertificateDer, ServerName};

pub enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

pub struct Client {
    conn: BufReader<Conn>,
}

#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
}

/// A whole body as read.
#[derive(Debug)]
pub struct BodyRead {
    /// Chunked: each chunk's payload; content-length: one item.
    pub chunks: Vec<Vec<u8>>,
    /// Whether the body ended cleanly (final chunk / full length).
    pub complete: bool,
    /// The read error that ended it, if any (EOF inside the body counts as UnexpectedEof).
    pub error: Option<io::Error>,
}

impl BodyRead {
    pub fn bytes(&self) -> Vec<u8> {
        self.chunks.concat()
    }
    pub fn text(&self) -> String {
        String::from_utf8(self.bytes()).unwrap()
    }
}

fn tcp(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

pub fn connect(mock: &MockServer) -> Client {
    Client {
        conn: BufReader::new(Conn::Plain(tcp(mock.addr()))),
    }
}

pub fn connect_tls(mock: &MockServer) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(mock.ca_der())).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let stream = rustls::StreamOwned::new(conn, tcp(mock.tls_addr()));
    Client {
        conn: BufReader::new(Conn::Tls(Box::new(stream))),
    }
}

impl Client {
    pub fn send(&mut self, method: &str, path: &str, key: Option<&str>, body: &str) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n",
            body.len()
        );
        if let Some(k) = key {
            req.push_str(&format!("x-api-key: {k}\r\n"));
        }
        req.push_str("anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n\r\n");
        req.push_str(body);
        let w = self.conn.get_mut();
        w.write_all(req.as_bytes()).unwrap();
        w.flush().unwrap();
    }

    pub fn send_raw(&mut self, raw: &str) {
        let w = self.conn.get_mut();
        w.write_all(raw.as_bytes()).unwrap();
        w.flush().unwrap();
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        let n = self.conn.read_line(&mut line)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof"));
        }
        if !line.ends_with("\r\n") {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof inside a line"));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    pub fn read_head(&mut self) -> io::Result<Head> {
        let status_line = self.line()?;
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let l = self.line()?;
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Ok(Head { status, headers })
    }

    /// One chunk of a chunked body: `Some(payload)`, or `None` for the final chunk.
    pub fn read_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let size_line = self.line()?;
        let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
        if size == 0 {
            self.line()?;
            return Ok(None);
        }
        let mut buf = vec![0; size];
        self.conn.read_exact(&mut buf)?;
        let mut crlf = [0; 2];
        self.conn.read_exact(&mut crlf)?;
        assert_eq!(&crlf, b"\r\n");
        Ok(Some(buf))
    }

    pub fn read_body(&mut self, head: &Head) -> BodyRead {
        let mut out = BodyRead {
            chunks: Vec::new(),
            complete: false,
            error: None,
        };
        if head.is_chunked() {
            loop {
                match self.read_chunk() {
                    Ok(Some(c)) => out.chunks.push(c),
                    Ok(None) => {
                        out.complete = true;
                        break;
                    }
                    Err(e) => {
                        out.error = Some(e);
                        break;
                    }
                }
            }
        } else {
            let len: usize = head.header("content-length").map_or(0, |v| v.parse().unwrap());
            let mut buf = vec![0; len];
            match self.conn.read_exact(&mut buf) {
                Ok(()) => {
                    out.chunks.push(buf);
                    out.complete = true;
                }
                Err(e) => out.error = Some(e),
            }
        }
        out
    }

    /// Sends a request and reads the whole answer.
    pub fn call(&mut self, method: &str, path: &str, key: Option<&str>, body: &str) -> (Head, BodyRead) {
        self.send(method, path, key, body);
        let head = self.read_head().unwrap();
        let body = self.read_body(&head);
        (head, body)
    }
}

/// Sends one request on a fresh plain connection and reads the whole answer.
pub fn call(mock: &MockServer, method: &str, path: &str, key: Option<&str>, body: &str) -> (Head, BodyRead) {
    connect(mock).call(method, path, key, body)
}

pub const MESSAGE: &str =
    r#"{"model":"claude-test","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
pub const STREAM_MESSAGE: &str =
    r#"{"model":"claude-test","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// Splits an SSE body into (event name, data) pairs; panics on anything not shaped
/// `event: NAME\ndata: JSON\n\n`.
pub fn parse_events(text: &str) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let mut lines = block.lines();
        let name = lines.next().unwrap().strip_prefix("event: ").unwrap().to_owned();
        let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
        assert!(lines.next().is_none(), "one data line per event");
        out.push((name, serde_json::from_str(data).unwrap()));
    }
    out
}
