//! The limit: a bare hyper forwarder. A hyper HTTP/1.1 server and a pooled hyper-util client,
//! `TCP_NODELAY` on both sockets, the multi-threaded tokio runtime with its default worker
//! count (as `keypool serve`). It rewrites the URI to the upstream and streams the request and
//! response bodies through: no keys, no parsing, no logging.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type Upstream = Client<HttpConnector, Incoming>;
type OutBody = Either<Incoming, Full<Bytes>>;

/// Runs the forwarder on `listen`, forwarding to `upstream` (`http://host:port`), until killed.
pub fn run(listen: SocketAddr, upstream: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let base: Arc<str> = Arc::from(upstream.trim_end_matches('/'));
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
        crate::accept_loop(listener, move |req| forward(client.clone(), base.clone(), req)).await;
        Ok(())
    })
}

async fn forward(
    client: Upstream,
    base: Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<OutBody>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{base}{path}").parse() else {
        return Ok(bad_gateway());
    };
    parts.uri = uri;
    parts.headers.remove(header::HOST);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => Ok(response.map(Either::Left)),
        Err(_) => Ok(bad_gateway()),
    }
}

fn bad_gateway() -> Response<OutBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(b"bad gateway"))));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
