//! A real `redis-server` for tests: started on 127.0.0.1 on a free port with persistence off,
//! killed on drop. Panics with an install hint when the binary is missing: tests that need it
//! fail, they never skip. (Behind the `testing` feature; not part of the driver's API.)
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

const HINT: &str = "redis-server is needed by this test and could not be started: install the Debian package \
     `redis-server` (apt-get install -y redis-server), or run `bash tests/run`, which installs it";

impl RedisServer {
    /// Starts a server on a free loopback port; panics (with an install hint) if it cannot.
    pub fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Some(server) = Self::try_on(port) {
                return server;
            }
        }
        panic!("{HINT} (it did not come up on any of 5 free ports)");
    }

    fn try_on(port: u16) -> Option<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "yes"])
            .args(["--loglevel", "warning", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => panic!("{HINT} ({e})"),
        };
        let mut server = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if server.ping() {
                return Some(server);
            }
            if let Some(child) = server.child.as_mut()
                && child.try_wait().ok().flatten().is_some()
            {
                server.child = None;
                return None; // the port was taken meanwhile: try another
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Starts a fresh, empty server on the same port after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(mut s) = Self::try_on(self.port) {
                self.child = s.child.take();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id (while running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`stop`](Self::stop).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("redis-server is not running");
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    /// A synchronous connection (for test assertions and fixtures).
    pub fn connection(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).unwrap();
        client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    /// Whether the server answers `PING` within 200 ms.
    pub fn ping(&self) -> bool {
        let Ok(mut s) =
            TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_millis(200))
        else {
            return false;
        };
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Every key in the server and every value (strings, hash fields and values, list, set and
    /// sorted-set members), as text: what a leak scan looks at.
    pub fn dump_everything(&self) -> String {
        let mut conn = self.connection();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        let mut out = String::new();
        for key in keys {
            out.push_str(&key);
            out.push('\n');
            let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
            let values: Vec<Vec<u8>> = match kind.as_str() {
                "string" => vec![redis::cmd("GET").arg(&key).query(&mut conn).unwrap()],
                "hash" => redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap(),
                "list" => redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query(&mut conn)
                    .unwrap(),
                "set" => redis::cmd("SMEMBERS").arg(&key).query(&mut conn).unwrap(),
                "zset" => redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query(&mut conn)
                    .unwrap(),
                other => panic!("unexpected Redis type {other} for {key}"),
            };
            for v in values {
                out.push_str(&String::from_utf8_lossy(&v));
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // A stopped process ignores nothing but SIGKILL; resume it anyway so nothing lingers.
            let _ = Command::new("kill").args(["-CONT", &pid.to_string()]).status();
        }
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}
