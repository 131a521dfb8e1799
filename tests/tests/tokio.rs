//! The conformance suite against the tokio client and the tower layer (around the hyper-util
//! client), over plain HTTP and TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use keypool_conformance::{Adapter, Answer, Setup, StreamAnswer, TestClient, break_of, conformance_suite};
use keypool_core::call::Request;
use keypool_core::{Order, Pool, Secret};
use keypool_tokio::{Body, Byok, Client, Error, EventStream, HttpClient, KeypoolLayer, KeypoolService};
use tokio::runtime::Runtime;
use tower::{Layer, Service};

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client(setup: &Setup, pool: Option<Arc<Pool>>) -> Client {
    let mut b = Client::builder()
        .keys(setup.keys.clone())
        .base_url(setup.base_url.clone())
        .config(setup.config.clone());
    if let Some(ca) = &setup.ca_der {
        b = b.root_cert_der(ca.clone());
    }
    match pool {
        Some(pool) => b.build_with_pool(pool).unwrap(),
        None => b.build().unwrap(),
    }
}

async fn answer(result: Result<http::Response<Body>, Error>) -> Answer {
    match result {
        Ok(response) => {
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let mut body = response.into_body();
            let attempts = Some(body.summary().attempts);
            let mut bytes = Vec::new();
            let mut error = None;
            let mut broke = None;
            loop {
                match body.next_chunk().await {
                    Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                    Ok(None) => break,
                    Err(e) => {
                        // An event stream read as bytes ends with keypool's error event; a plain
                        // body that breaks after the head is reported.
                        match &e.event {
                            Some(event) => bytes.extend_from_slice(event),
                            None => error = Some(format!("body: {e} / {e:?}")),
                        }
                        broke = break_of(&e.error);
                        break;
                    }
                }
            }
            Answer {
                status,
                headers,
                body: bytes,
                error,
                broke,
                attempts,
            }
        }
        Err(e) => Answer::from_client_error(&e),
    }
}

async fn stream_answer(result: Result<EventStream, Error>) -> StreamAnswer {
    match result {
        Ok(mut events) => {
            let mut out = StreamAnswer::delivered();
            while let Some(event) = events.next_event().await {
                out.record(event)
            }
            out
        }
        Err(e) => StreamAnswer::from_client_error(&e),
    }
}

struct Tokio;

struct TokioClient {
    rt: Runtime,
    client: Client,
}

impl Adapter for Tokio {
    type Client = TokioClient;
    fn build(setup: &Setup) -> TokioClient {
        TokioClient {
            rt: runtime(),
            client: client(setup, None),
        }
    }
}

impl TestClient for TokioClient {
    fn pool(&self) -> Arc<Pool> {
        self.client.pool().clone()
    }
    fn send(&self, request: Request) -> Answer {
        self.rt
            .block_on(async { answer(self.client.send(request).await).await })
    }
    fn send_byok(&self, request: Request, key: &str) -> Answer {
        let key = Secret::new(key).unwrap();
        self.rt
            .block_on(async { answer(self.client.send_byok(request, key).await).await })
    }
    fn stream(&self, request: Request) -> StreamAnswer {
        self.rt
            .block_on(async { stream_answer(self.client.stream(request).await).await })
    }
}

/// The layer around the hyper-util client.
struct Tower;

struct TowerClient {
    rt: Runtime,
    base: String,
    pool: Arc<Pool>,
    service: KeypoolService<HttpClient>,
}

impl Adapter for Tower {
    type Client = TowerClient;
    fn build(setup: &Setup) -> TowerClient {
        let pool =
            Arc::new(Pool::new(setup.keys.clone(), Order::default(), std::time::Instant::now()).unwrap());
        // Only for its hyper-util client (TLS roots, connector); it never sends itself.
        let http = client(setup, Some(pool.clone())).http_client().clone();
        let service = KeypoolLayer::new(pool.clone())
            .config(setup.config.clone())
            .layer(http);
        TowerClient {
            rt: runtime(),
            base: setup.base_url.trim_end_matches('/').to_owned(),
            pool,
            service,
        }
    }
}

impl TowerClient {
    fn request(&self, request: Request, byok: Option<&str>) -> http::Request<Full<Bytes>> {
        let mut r = http::Request::builder()
            .method(request.method)
            .uri(format!("{}{}", self.base, request.path_and_query))
            .body(Full::new(request.body))
            .unwrap();
        *r.headers_mut() = request.headers;
        if let Some(key) = byok {
            r.extensions_mut().insert(Byok(Secret::new(key).unwrap()));
        }
        r
    }
}

impl TestClient for TowerClient {
    fn pool(&self) -> Arc<Pool> {
        self.pool.clone()
    }
    fn send(&self, request: Request) -> Answer {
        let request = self.request(request, None);
        let mut service = self.service.clone();
        self.rt
            .block_on(async move { answer(service.call(request).await).await })
    }
    fn send_byok(&self, request: Request, key: &str) -> Answer {
        let request = self.request(request, Some(key));
        let mut service = self.service.clone();
        self.rt
            .block_on(async move { answer(service.call(request).await).await })
    }
    fn stream(&self, request: Request) -> StreamAnswer {
        let request = self.request(request, None);
        let mut service = self.service.clone();
        self.rt.block_on(async move {
            match service.call(request).await {
                Ok(response) => {
                    let is_events = response
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("text/event-stream"));
                    if response.status().is_success() && is_events {
                        stream_answer(Ok(EventStream::from(response.into_body()))).await
                    } else {
                        let a = answer(Ok(response)).await;
                        StreamAnswer {
                            status: a.status,
                            body: a.body,
                            error: Some(format!("the upstream answered {}", a.status)),
                            ..StreamAnswer::default()
                        }
                    }
                }
                Err(e) => stream_answer(Err(e)).await,
            }
        })
    }
}

conformance_suite!(plain, Tokio, keypool_conformance::Transport::Plain);
conformance_suite!(tls, Tokio, keypool_conformance::Transport::Tls);
conformance_suite!(layer_plain, Tower, keypool_conformance::Transport::Plain);
conformance_suite!(layer_tls, Tower, keypool_conformance::Transport::Tls);
