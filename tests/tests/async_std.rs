//! The conformance suite against the futures-io client (keypool-async-std), run on the
//! async-std executor and on smol, over plain HTTP and TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use keypool_async_std::{Client, Error};
use keypool_conformance::{Adapter, Answer, Setup, StreamAnswer, TestClient, break_of_io, conformance_suite};
use keypool_core::Pool;
use keypool_core::call::Request;
use smol::io::AsyncReadExt;
use smol::stream::StreamExt;

/// How a test drives a future to completion.
trait Executor {
    fn block_on<T>(future: impl Future<Output = T>) -> T;
}

struct AsyncStd;

impl Executor for AsyncStd {
    fn block_on<T>(future: impl Future<Output = T>) -> T {
        async_std::task::block_on(future)
    }
}

struct Smol;

impl Executor for Smol {
    fn block_on<T>(future: impl Future<Output = T>) -> T {
        smol::block_on(future)
    }
}

struct FuturesIo<E>(PhantomData<E>);

struct FuturesIoClient<E> {
    client: Client,
    executor: PhantomData<E>,
}

impl<E: Executor> Adapter for FuturesIo<E> {
    type Client = FuturesIoClient<E>;
    fn build(setup: &Setup) -> FuturesIoClient<E> {
        let mut b = Client::builder()
            .keys(setup.keys.clone())
            .base_url(setup.base_url.clone())
            .config(setup.config.clone());
        if let Some(ca) = &setup.ca_der {
            b = b.root_cert_der(ca.clone());
        }
        FuturesIoClient {
            client: b.build().unwrap(),
            executor: PhantomData,
        }
    }
}

async fn answer(result: Result<http::Response<keypool_async_std::Body>, Error>) -> Answer {
    match result {
        Ok(response) => {
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let mut body = Vec::new();
            // A body that breaks after the head is reported, with what arrived before it.
            let mut reader = response.into_body();
            let attempts = Some(reader.summary().attempts);
            let broken = reader.read_to_end(&mut body).await.err();
            Answer {
                status,
                headers,
                body,
                error: broken.as_ref().map(|e| format!("body: {e} / {e:?}")),
                broke: broken.as_ref().and_then(break_of_io),
                attempts,
            }
        }
        Err(e) => Answer::from_client_error(&e),
    }
}

impl<E: Executor> TestClient for FuturesIoClient<E> {
    fn pool(&self) -> Arc<Pool> {
        self.client.pool().clone()
    }
    fn send(&self, request: Request) -> Answer {
        E::block_on(async { answer(self.client.send(request).await).await })
    }
    fn send_byok(&self, request: Request, key: &str) -> Answer {
        let key = keypool_core::Secret::new(key).unwrap();
        E::block_on(async { answer(self.client.send_byok(request, key).await).await })
    }
    fn stream(&self, request: Request) -> StreamAnswer {
        E::block_on(async {
            match self.client.stream(request).await {
                Ok(mut events) => {
                    let mut out = StreamAnswer::delivered();
                    while let Some(event) = events.next().await {
                        out.record(event)
                    }
                    out
                }
                Err(e) => StreamAnswer::from_client_error(&e),
            }
        })
    }
}

conformance_suite!(
    async_std_plain,
    FuturesIo<AsyncStd>,
    keypool_conformance::Transport::Plain
);
conformance_suite!(
    async_std_tls,
    FuturesIo<AsyncStd>,
    keypool_conformance::Transport::Tls
);
conformance_suite!(smol_plain, FuturesIo<Smol>, keypool_conformance::Transport::Plain);
conformance_suite!(smol_tls, FuturesIo<Smol>, keypool_conformance::Transport::Tls);
