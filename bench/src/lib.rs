//! # keypool-bench
//!
//! The gateway benchmark (issue #9): `gateway-bench` starts, as separate processes, a fast
//! upstream ([`upstream`]), a bare hyper forwarder ([`forwarder`], also the `bare-forwarder`
//! binary) and the release `keypool serve`, and measures the three paths side by side, rounds
//! interleaved. This library holds the two helper servers, so that `gateway-bench` can run them
//! as child processes of its own executable (always the code of the same build).

use std::convert::Infallible;
use std::future::Future;

use http::{Request, Response};
use hyper::body::Incoming;

pub mod forwarder;
pub mod upstream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP/1.1 connections accepted on `listener` (with `TCP_NODELAY`) with `handle`, forever.
pub(crate) async fn accept_loop<H, Fut, B>(listener: tokio::net::TcpListener, handle: H)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn(handle.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Parses `--flag value` pairs of a helper server's command line.
pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}
