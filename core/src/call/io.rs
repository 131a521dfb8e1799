//! What goes into a call and what comes out of it: the request, the attempts it sends, and the
//! outputs of its two phases (before a response head, [`Output`]; after it, [`BodyOutput`]).

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};

use std::time::Instant;

use super::CallError;
use crate::mark::{Family, Mark};
use crate::policy::Verdict;
use crate::pool::{KeyId, Transition};
use crate::profile::Profile;

/// The caller's request, buffered once and replayed byte-identical to every attempt.
#[derive(Debug, Clone)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub path_and_query: PathAndQuery,
    /// The caller's headers (hop-by-hop and credential headers are dealt with by the call).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Request {
    /// A `POST` of a JSON body to `path` (e.g. `/v1/messages`) with `anthropic-version: 2023-06-01`
    /// and `content-type: application/json`: [`post_json_for`](Self::post_json_for) the default
    /// profile.
    pub fn post_json(path: &'static str, body: impl Into<Bytes>) -> Self {
        Self::post_json_for(&Profile::anthropic(), path, body)
    }

    /// A `POST` of a JSON body to `path` with `content-type: application/json` and the headers
    /// the profile's API asks for ([`Provider::request_headers`](crate::profile::Provider::request_headers)).
    pub fn post_json_for(profile: &Profile, path: &'static str, body: impl Into<Bytes>) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        profile.request_headers(&mut headers);
        Self {
            method: Method::POST,
            path_and_query: PathAndQuery::from_static(path),
            headers,
            body: body.into(),
        }
    }
}

/// One attempt to send upstream.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// 1 for the first attempt of the call.
    pub number: usize,
    /// The pool key used, `None` for BYOK.
    pub key: Option<KeyId>,
    /// The method.
    pub method: Method,
    /// Path and query to append to the upstream base URL.
    pub path_and_query: PathAndQuery,
    /// The exact headers to send (add only `host` and `content-length`).
    pub headers: HeaderMap,
    /// The body, the same bytes on every attempt.
    pub body: Bytes,
}

/// How the body of a delivered response is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// Bytes as they come.
    Plain,
    /// Whole server-sent events.
    EventStream,
}

/// A response head to deliver to the caller.
#[derive(Debug, Clone)]
pub struct Head {
    /// Status.
    pub status: StatusCode,
    /// Headers, hop-by-hop headers removed.
    pub headers: HeaderMap,
    /// Whether the body is an event stream.
    pub kind: BodyKind,
}

/// The delivered body broke.
#[derive(Debug, Clone)]
pub struct Abort {
    /// What happened.
    pub error: CallError,
    /// For an event stream, the `error` event to write after the last whole event.
    pub event: Option<Bytes>,
}

/// The call ends with an error response made by keypool.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The typed error.
    pub error: CallError,
    /// Its rendering by the call's profile.
    pub response: http::Response<Bytes>,
    /// What the call did before failing (attempts, marks), for logs and metrics.
    pub summary: CallSummary,
}

/// What the adapter must do before a response head is delivered. See the
/// [module docs](super) for the drain order.
#[derive(Debug)]
#[must_use = "every output must be acted on"]
pub enum Output {
    /// Send this attempt upstream.
    Send(Attempt),
    /// The call marked a key (already applied to the pool).
    Mark(KeyMark),
    /// Deliver this response head; the body's outputs follow from [`Call::poll_body`](super::Call::poll_body).
    Head(Head),
    /// Answer with this error response; the call is over.
    Fail(Failure),
    /// Wait for the next input of the current exchange, or until the deadline.
    Wait(Option<Instant>),
}

/// What the adapter must do after a response head is delivered. See the
/// [module docs](super) for the drain order.
#[derive(Debug)]
#[must_use = "every output must be acted on"]
pub enum BodyOutput {
    /// Deliver these body bytes (never empty).
    Body(Bytes),
    /// End the delivered body early; the call is over.
    Abort(Abort),
    /// Wait for the next body input of the current exchange, or until the deadline.
    Wait(Option<Instant>),
    /// The body is complete; the call is over.
    Done,
}

/// A key mark made by the call: the portable [`Mark`] for a state backend, and what it meant
/// locally, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMark {
    /// The key, in the pool the call walks.
    pub key: KeyId,
    /// The key whose attempt got the answer: `key` itself, unless the answer spoke for its
    /// whole organisation and this mark is for another key known to share it (SPEC §11).
    pub attempted: KeyId,
    /// The mark as applied (fingerprint, change, status, generation).
    pub mark: Mark,
    /// The upstream status that caused it (for in-band errors, the matching status).
    pub status: StatusCode,
    /// The verdict applied.
    pub verdict: Verdict,
    /// What it did to the key's state.
    pub transition: Transition,
}

/// What one call did, for logs and metrics ([`Call::summary`](super::Call::summary)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallSummary {
    /// Upstream attempts made.
    pub attempts: usize,
    /// The pool key of the latest attempt (the one that answered, if any answered).
    pub key: Option<KeyId>,
}

/// The model family of a request (SPEC §11.2): its JSON body's top-level `model`, named by the
/// profile. `None` for a request without one (e.g. `GET /v1/models`) or a body that is not a
/// JSON object.
pub(super) fn request_family(profile: &Profile, body: &[u8]) -> Option<Family> {
    #[derive(serde::Deserialize)]
    struct Model<'a> {
        #[serde(borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let model = serde_json::from_slice::<Model<'_>>(body).ok()?.model?;
    Some(Family::of(profile.model_family(&model)))
}
