//! Connections: TCP from `async-net` with `TCP_NODELAY`, TLS from `futures-rustls`, and a small
//! idle pool for keep-alive reuse. Everything is `futures-io`, so it runs on any executor whose
//! IO is driven by `async-io` (async-std, smol).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_io::Timer;
use async_net::TcpStream;
use futures_io::{AsyncRead, AsyncWrite};
use futures_lite::{AsyncReadExt, future};
use futures_rustls::TlsConnector;
use futures_rustls::client::TlsStream;
use keypool_core::call::TransportError;
use rustls::pki_types::{CertificateDer, ServerName};

/// How many idle connections are kept for reuse.
const MAX_IDLE: usize = 4;
/// How long an idle connection is kept.
const IDLE_FOR: Duration = Duration::from_secs(30);

/// One upstream connection.
#[derive(Debug)]
pub(crate) enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_close(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// Where connections go, and the TLS settings; owns the idle pool.
pub(crate) struct Connector {
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl Connector {
    /// A connector for `host:port`, with TLS when `https` (web PKI roots plus `extra_roots`).
    pub(crate) fn new(
        https: bool,
        host: &str,
        port: u16,
        extra_roots: &[Vec<u8>],
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let tls = if https {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            for der in extra_roots {
                roots
                    .add(CertificateDer::from(der.clone()))
                    .map_err(|e| format!("invalid root certificate: {e}"))?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS configuration: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
                .map_err(|_| format!("invalid TLS server name {host:?}"))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection the server has not closed, if any.
    pub(crate) async fn reuse(&self) -> Option<Conn> {
        loop {
            let (mut conn, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.pop()?
            };
            if since.elapsed() > IDLE_FOR {
                continue;
            }
            // A live idle connection has nothing to read: EOF, an error or unexpected bytes mean
            // the server closed it (or broke it) while it sat in the pool.
            let mut probe = [0u8; 1];
            if future::poll_once(conn.read(&mut probe)).await.is_none() {
                return Some(conn);
            }
        }
    }

    /// Puts a connection whose last response was read to its end back into the pool.
    pub(crate) fn release(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(_, since)| since.elapsed() <= IDLE_FOR);
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push((conn, Instant::now()));
    }

    /// A new connection: DNS, TCP (`TCP_NODELAY`), TLS, all within the connect timeout.
    pub(crate) async fn connect(&self) -> Result<Conn, TransportError> {
        let deadline = Instant::now() + self.connect_timeout;
        let addrs = async_net::resolve((self.host.trim_start_matches('[').trim_end_matches(']'), self.port));
        let addrs = match future::or(async { Some(addrs.await) }, expire(deadline)).await {
            Some(Ok(addrs)) if !addrs.is_empty() => addrs,
            Some(_) => return Err(TransportError::Dns),
            None => return Err(TransportError::Connect),
        };
        let tcp = future::or(
            async {
                for addr in addrs {
                    match TcpStream::connect(addr).await {
                        Ok(stream) => return Some(Ok(stream)),
                        Err(_) => continue,
                    }
                }
                Some(Err(TransportError::Connect))
            },
            expire(deadline),
        )
        .await;
        let tcp = match tcp {
            Some(Ok(tcp)) => tcp,
            Some(Err(e)) => return Err(e),
            None => return Err(TransportError::Connect),
        };
        // Whole events go out as soon as they are written: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &self.tls else {
            return Ok(Conn::Plain(tcp));
        };
        let handshake = connector.connect(name.clone(), tcp);
        match future::or(async { Some(handshake.await) }, expire(deadline)).await {
            Some(Ok(tls)) => Ok(Conn::Tls(Box::new(tls))),
            Some(Err(_)) => Err(TransportError::Tls),
            None => Err(TransportError::Connect),
        }
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |idle| idle.len());
        f.debug_struct("Connector")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("idle", &idle)
            .finish_non_exhaustive()
    }
}

/// Resolves to `None` at `deadline`.
async fn expire<T>(deadline: Instant) -> Option<T> {
    Timer::at(deadline).await;
    None
}
