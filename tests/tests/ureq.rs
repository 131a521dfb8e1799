//! The conformance suite against the blocking ureq client, over plain HTTP and TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use keypool_conformance::{Adapter, Answer, Setup, StreamAnswer, TestClient, break_of_io, conformance_suite};
use keypool_core::Pool;
use keypool_core::call::Request;
use keypool_ureq::{Client, Error};

struct Ureq;

struct UreqClient(Client);

impl Adapter for Ureq {
    type Client = UreqClient;
    /// ureq takes a reset while it reads a body for the connection's end and then reports the
    /// body cut short (`UnexpectedEof`): the difference does not reach keypool.
    const RESET_READS_AS_EOF: bool = true;
    fn build(setup: &Setup) -> UreqClient {
        let mut b = Client::builder()
            .keys(setup.keys.clone())
            .base_url(setup.base_url.clone())
            .config(setup.config.clone());
        if let Some(ca) = &setup.ca_der {
            b = b.root_cert_der(ca.clone());
        }
        UreqClient(b.build().unwrap())
    }
}

fn answer(result: Result<http::Response<keypool_ureq::Body>, Error>) -> Answer {
    match result {
        Ok(response) => {
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let mut body = Vec::new();
            // A body that breaks after the head is reported, with what arrived before it.
            let mut reader = response.into_body();
            let attempts = Some(reader.summary().attempts);
            let broken = std::io::Read::read_to_end(&mut reader, &mut body).err();
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

impl TestClient for UreqClient {
    fn pool(&self) -> Arc<Pool> {
        self.0.pool().clone()
    }
    fn send(&self, request: Request) -> Answer {
        answer(self.0.send(request))
    }
    fn send_byok(&self, request: Request, key: &str) -> Answer {
        answer(self.0.send_byok(request, keypool_core::Secret::new(key).unwrap()))
    }
    fn stream(&self, request: Request) -> StreamAnswer {
        match self.0.stream(request) {
            Ok(events) => {
                let mut out = StreamAnswer::delivered();
                for event in events {
                    out.record(event)
                }
                out
            }
            Err(e) => StreamAnswer::from_client_error(&e),
        }
    }
}

conformance_suite!(plain, Ureq, keypool_conformance::Transport::Plain);
conformance_suite!(tls, Ureq, keypool_conformance::Transport::Tls);
