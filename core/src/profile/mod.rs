//! Provider profiles (SPEC §12): everything an upstream API decides, behind one value.
//!
//! A [`Profile`] is held in [`CallConfig::profile`](crate::call::CallConfig::profile) and says
//! how a key is written into a request, which client credential headers are removed, how an
//! answer is classified (with the operator's [`Policy`] knobs), where a retry delay comes from,
//! what an SSE event means for the call (preamble, content, clean end, in-band error), how an
//! in-band error maps to an HTTP status, and how keypool's own errors look on the wire. The call
//! machine, the pool, the walker, the client glue and the adapters ask the profile and contain
//! no provider literals (CI checks this: `.ci/provider-literals`).
//!
//! [`Profile::anthropic`] is the default. A new provider is one file in this folder that
//! implements [`Provider`], plus a mock mode.

pub mod anthropic;
pub mod openai;

use std::fmt;
use std::ops::Deref;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::policy::{Policy, Verdict};
use crate::secret::Secret;
use crate::sse::RawEvent;
use crate::walk::Exhausted;

/// What one server-sent event means for a call (the commit point and the end of a stream).
///
/// A frame without an `event` field and without data lines (a comment or a stray blank line) is
/// never asked about: the call holds it with the preamble and it decides nothing on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventRole {
    /// Held back under the `first-content` commit point until content arrives (Anthropic:
    /// `message_start`, `ping`).
    Preamble,
    /// Commits the stream: content, or any event the profile does not single out.
    Content,
    /// Ends the stream cleanly: the end of the body after it is a clean end (Anthropic:
    /// `message_stop`).
    End,
    /// An in-band error. Before commit it is classified like an HTTP error with the status of
    /// [`Provider::in_band_status`]; after commit it is relayed and ends the stream.
    Error,
}

/// Which of a provider's streaming APIs a stream speaks, by the provider's own name for it
/// (OpenAI: `chat.completions` or `responses`; a provider with one stream API has only
/// [`Dialect::DEFAULT`]). A call asks [`Provider::stream_dialect`] once per stream, and keypool's
/// error event for that stream is written in it ([`Provider::error_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dialect(pub &'static str);

impl Dialect {
    /// The provider's only (or main) stream API.
    pub const DEFAULT: Self = Self("");
}

impl Default for Dialect {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Everything provider-specific. Implemented once per upstream API; see [`anthropic::Anthropic`].
///
/// Methods that read an answer get the operator's [`Policy`] (the configurable rows of SPEC §4)
/// and apply it to the provider's own table.
pub trait Provider: fmt::Debug + Send + Sync + 'static {
    /// A short lowercase name for logs and configuration (`anthropic`).
    fn name(&self) -> &'static str;

    /// The upstream base URL when none is configured; empty when the provider has none (every
    /// upstream has its own, e.g. an Azure resource).
    fn default_base_url(&self) -> &'static str;

    /// Adds the headers a request built by [`Request::post_json`](crate::call::Request::post_json)
    /// carries besides `content-type` (Anthropic: `anthropic-version`).
    fn request_headers(&self, headers: &mut HeaderMap);

    /// Writes a key into the headers of an attempt.
    fn insert_key(&self, headers: &mut HeaderMap, key: &Secret);

    /// Headers that carry a client's own credential. They are removed from pooled calls.
    fn credential_headers(&self) -> &'static [HeaderName];

    /// The credential a client presented, if any (for a gateway's client tokens and BYOK).
    fn client_credential<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]>;

    /// Where a client puts its credential, for messages: `x-api-key or Authorization: Bearer`.
    fn credential_help(&self) -> &'static str;

    /// Whether classifying `status` with these headers needs the (first 64 KiB of the) error
    /// body. When `false`, [`classify`](Self::classify) ignores its `body` argument.
    fn needs_body(&self, policy: &Policy, status: StatusCode, headers: &HeaderMap) -> bool;

    /// Classifies one upstream answer (SPEC §4). `body` is a prefix of the error body, at most
    /// [`MAX_CLASSIFY_BODY`](crate::policy::MAX_CLASSIFY_BODY) bytes of it are read; `wall` is
    /// the wall-clock time, for an HTTP-date retry value without a `date` header. Every
    /// cooldown is bounded by [`Policy::bound`].
    fn classify(
        &self,
        policy: &Policy,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        wall: SystemTime,
    ) -> Verdict;

    /// The cooldown a rate-limited answer asks for, from the provider's retry-delay sources,
    /// bounded by [`Policy::bound`]; [`Policy::default_cooldown`] when there is none.
    fn retry_delay(&self, policy: &Policy, headers: &HeaderMap, body: &[u8], wall: SystemTime) -> Duration;

    /// What an event means for the call. Gets the whole raw frame, so that a role can depend on
    /// the data as well as on the event name.
    fn event_role(&self, frame: &RawEvent<'_>) -> EventRole;

    /// The HTTP status matching an in-band error event's data (a 5xx when it cannot be read).
    fn in_band_status(&self, data: &[u8]) -> StatusCode;

    /// The provider's error type for an HTTP status (Anthropic: `error.type`).
    fn error_type(&self, status: StatusCode) -> &'static str;

    /// keypool's own error body for `status`, in the provider's shape.
    fn error_body(&self, status: StatusCode, message: &str, request_id: Option<&str>) -> Bytes;

    /// Whether `body` already is an error object in the provider's shape (an in-band error
    /// delivered as an HTTP error keeps its body then).
    fn is_error_body(&self, body: &[u8]) -> bool;

    /// Which stream API a stream speaks, from the request's path (without the query) and the
    /// stream's first frame (`None` when the stream was committed before any frame arrived).
    /// Asked once per stream, at its first frame, or when it breaks before one. Default:
    /// [`Dialect::DEFAULT`].
    fn stream_dialect(&self, path: &str, first: Option<&RawEvent<'_>>) -> Dialect {
        let _ = (path, first);
        Dialect::DEFAULT
    }

    /// The SSE event keypool writes after the last whole event when a committed stream breaks,
    /// in the stream's dialect ([`stream_dialect`](Self::stream_dialect)).
    fn error_event(&self, message: &str, dialect: Dialect) -> Bytes;

    /// The response header that carries keypool's request id in its own error responses.
    fn request_id_header(&self) -> HeaderName;

    /// Adds the headers of an exhaustion response (SPEC §6: `retry-after`, `retry-after-ms`,
    /// `x-should-retry`).
    fn exhaustion_headers(&self, exhausted: Exhausted, headers: &mut HeaderMap);

    /// The model family of a request for `model` (SPEC §11.2): rate limits apply per family.
    /// Default: the model id without a date suffix ([`strip_date_suffix`]).
    fn model_family<'m>(&self, model: &'m str) -> &'m str {
        strip_date_suffix(model)
    }

    /// The organisation (and workspace) an answer names in its headers (SPEC §11.1). Default:
    /// none.
    fn scope<'h>(&self, headers: &'h HeaderMap) -> Option<(&'h str, Option<&'h str>)> {
        let _ = headers;
        None
    }

    /// From a successful answer's rate-limit headers: when a dimension is exhausted (its
    /// `remaining` is 0), how long until it resets (SPEC §11.4), the longest if several are.
    /// Default: none.
    fn exhaustion_hint(&self, headers: &HeaderMap, wall: SystemTime) -> Option<Duration> {
        let _ = (headers, wall);
        None
    }

    /// The error type and code of an error body, for the operator's policy rules (SPEC §11.6).
    /// Default: neither.
    fn error_code(&self, body: &[u8]) -> (Option<String>, Option<String>) {
        let _ = body;
        (None, None)
    }

    /// Answer headers that identify the pool's owner (organisation, workspace); removed from
    /// responses to clients by default (SPEC §13). Default: none.
    fn identity_headers(&self) -> &'static [HeaderName] {
        &[]
    }

    /// The reason phrase of a status that has no standard one, for an HTTP/1.1 status line
    /// (Anthropic: `529 Overloaded`); `None` for a standard status, or when the provider has
    /// none (a server then writes no phrase). Default: none.
    fn reason_phrase(&self, status: StatusCode) -> Option<&'static str> {
        let _ = status;
        None
    }

    /// An error body in the provider's shape ([`is_error_body`](Self::is_error_body)) with
    /// keypool's request id added where the provider's own error bodies carry one, unless it
    /// already has one: what an in-band error answered as an HTTP error is sent as. Default: the
    /// body unchanged.
    fn with_request_id(&self, body: &Bytes, request_id: &str) -> Bytes {
        let _ = request_id;
        body.clone()
    }

    /// Path and query of the probe that tests a disabled key without spending tokens
    /// (SPEC §11.5), sent with `GET`.
    fn probe_path(&self) -> &'static str {
        "/v1/models?limit=1"
    }
}

/// A model id without a trailing date: `claude-3-5-sonnet-20241022` → `claude-3-5-sonnet`,
/// `gpt-4o-2024-08-06` → `gpt-4o`; ids without one are returned as they are.
pub fn strip_date_suffix(model: &str) -> &str {
    let b = model.as_bytes();
    let all_digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    // `-YYYYMMDD`
    if b.len() > 9 && b[b.len() - 9] == b'-' && all_digits(&b[b.len() - 8..]) {
        return &model[..b.len() - 9];
    }
    // `-YYYY-MM-DD`
    if b.len() > 11 {
        let t = &b[b.len() - 11..];
        if t[0] == b'-'
            && t[5] == b'-'
            && t[8] == b'-'
            && all_digits(&t[1..5])
            && all_digits(&t[6..8])
            && all_digits(&t[9..])
        {
            return &model[..b.len() - 11];
        }
    }
    model
}

/// A provider profile: one cheap, shareable value. `Profile::default()` is
/// [`Profile::anthropic`]. Dereferences to the [`Provider`].
#[derive(Clone)]
pub struct Profile(&'static dyn Provider);

impl Profile {
    /// The Anthropic Messages API (SPEC §4–§6).
    pub fn anthropic() -> Self {
        Self(&anthropic::Anthropic)
    }

    /// The OpenAI API (SPEC §12), and OpenAI-compatible upstreams by base URL: the key goes in
    /// `Authorization: Bearer`.
    pub fn openai() -> Self {
        Self(&openai::OPENAI)
    }

    /// An Azure-style OpenAI upstream: as [`openai`](Self::openai), but the key goes in
    /// `api-key`. It has no default base URL (set the resource's).
    pub fn azure_openai() -> Self {
        Self(&openai::AZURE_OPENAI)
    }

    /// The built-in profile of this name (`anthropic`, `openai`, `azure-openai`), for
    /// configuration files and flags.
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "anthropic" => Some(Self::anthropic()),
            "openai" => Some(Self::openai()),
            "azure-openai" => Some(Self::azure_openai()),
            _ => None,
        }
    }

    /// A profile of any provider.
    pub fn new(provider: &'static dyn Provider) -> Self {
        Self(provider)
    }

    /// The provider.
    pub fn provider(&self) -> &'static dyn Provider {
        self.0
    }
}

impl Default for Profile {
    fn default() -> Self {
        Self::anthropic()
    }
}

impl Deref for Profile {
    type Target = dyn Provider;

    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Profile").field(&self.0.name()).finish()
    }
}

/// `retry-after` in whole seconds, rounded up (200 ms → `1`), and `retry-after-ms` rounded up.
pub fn retry_after_headers(retry_after: Duration) -> (HeaderValue, HeaderValue) {
    let nanos = retry_after.as_nanos();
    let secs = nanos.div_ceil(1_000_000_000).max(1);
    let millis = nanos.div_ceil(1_000_000).max(1);
    (HeaderValue::from(secs as u64), HeaderValue::from(millis as u64))
}

/// The token of an `Authorization: Bearer TOKEN` header (`bearer` accepted too), trimmed;
/// `None` when absent or empty.
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let auth = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let token = auth
        .strip_prefix(b"Bearer ")
        .or_else(|| auth.strip_prefix(b"bearer "))?;
    Some(token.trim_ascii()).filter(|t| !t.is_empty())
}

/// A human duration for messages: `3s`, `1m 5s`, `250ms`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{}ms", ms.max(1));
    }
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        _ if secs.is_multiple_of(3600) => format!("{}h", secs / 3600),
        _ => format!("{}h {}m", secs / 3600, (secs % 3600).div_ceil(60)),
    }
}
