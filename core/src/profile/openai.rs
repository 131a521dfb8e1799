//! The OpenAI profile (SPEC §12), for `https://api.openai.com` and OpenAI-compatible upstreams
//! (Azure OpenAI with the `api-key` header, OpenRouter, Groq, vLLM, … by base URL).
//!
//! - The key goes in `Authorization: Bearer KEY` ([`OPENAI`]) or `api-key: KEY`
//!   ([`AZURE_OPENAI`]); both headers are client credentials and are stripped from pooled calls.
//! - Classification: a 429 is a rate limit (cool the key) unless it is a request too large for
//!   the limit (the request's fault: delivered) or an empty wallet (`insufficient_quota` and the
//!   spend-limit codes: disable, billing); a 401 disables the key unless it says `Missing
//!   scopes:` (a restricted key lacking one endpoint's scope: delivered, the key stays); 402
//!   (OpenAI-compatible upstreams that bill by credit) disables for billing; 403 and 5xx are
//!   delivered.
//! - The retry delay of a 429, first match wins: `retry-after-ms`, `retry-after` (seconds or
//!   HTTP-date), the exhausted dimension's `x-ratelimit-reset-{requests,tokens}` (a Go duration
//!   such as `6m0s`, `10.666s`, `12ms`), the message's `try again in 10.666s` (or Azure's
//!   `retry after 6 seconds`), else the policy's default cooldown.
//! - Two stream APIs ([`Dialect`]s): Chat Completions (unnamed `data:` chunks ending in
//!   `data: [DONE]`, in-band `data: {"error":…}`) and the Responses API (`event: response.*`,
//!   ending in `response.completed`, `response.failed` or `response.incomplete`; in-band
//!   `event: error`). Which one a stream speaks is decided from its first frame: a named
//!   event (or data whose `type` is a `response.*` event) is the Responses API, an unnamed
//!   chunk is Chat Completions; a stream that broke before its first frame is decided by the
//!   request path (`…/responses` is the Responses API). keypool's error event is written in
//!   that API's own shape.
//! - keypool's own errors: `{"error":{"message":…,"type":…,"param":null,"code":…}}`, the
//!   request id in `x-request-id`.
//!
//! For the pool's limits (SPEC §11): the model family is the model id; the scope is
//! `openai-organization` (with `openai-project` inside it), removed from answers to clients;
//! a successful answer whose `x-ratelimit-remaining-*` is 0 hints at the matching reset; the
//! probe is `GET /v1/models`; policy rules see `error.type` and `error.code`.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::{Dialect, EventRole, Provider};
pub use super::{human_duration, retry_after_headers};
use crate::policy::{self, MAX_CLASSIFY_BODY, OnUnauthorized, Policy, Verdict};
use crate::pool::{CoolReason, DisableReason};
use crate::secret::Secret;
use crate::sse::RawEvent;
use crate::walk::Exhausted;

/// The OpenAI API.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com";

/// The header an Azure-style upstream reads the key from.
pub const AZURE_KEY_HEADER: HeaderName = HeaderName::from_static("api-key");

/// Headers that carry a client's own credential. They are removed from pooled calls.
pub const CREDENTIAL_HEADERS: [HeaderName; 2] = [http::header::AUTHORIZATION, AZURE_KEY_HEADER];

/// The response header that carries the request id.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The header naming the organisation a key belongs to.
pub const ORGANIZATION_HEADER: HeaderName = HeaderName::from_static("openai-organization");

/// The header naming the project a key belongs to (a scope inside the organisation).
pub const PROJECT_HEADER: HeaderName = HeaderName::from_static("openai-project");

/// The Chat Completions stream API (`POST /v1/chat/completions`, also legacy completions).
pub const CHAT_COMPLETIONS: Dialect = Dialect("chat.completions");

/// The Responses stream API (`POST /v1/responses`).
pub const RESPONSES: Dialect = Dialect("responses");

/// The error codes (or types) of a 429 or 400 that mean the wallet is empty or a spend limit
/// is reached: retrying with the same organisation's keys never helps (SPEC §11.3). Codes that
/// end in `_spend_limit_exceeded` count too.
pub const BILLING_CODES: [&str; 5] = [
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_usage_limit_exceeded",
    "billing_hard_limit_reached",
    "billing_not_active",
];

/// Where the key goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyHeader {
    /// `Authorization: Bearer KEY` (OpenAI and most compatible upstreams).
    Bearer,
    /// `api-key: KEY` (Azure OpenAI).
    ApiKey,
}

/// The OpenAI API as a [`Provider`]: [`Profile::openai`](super::Profile::openai) and
/// [`Profile::azure_openai`](super::Profile::azure_openai).
#[derive(Debug, Clone, Copy)]
pub struct OpenAi {
    key: KeyHeader,
}

/// OpenAI with Bearer keys.
pub static OPENAI: OpenAi = OpenAi::new(KeyHeader::Bearer);

/// An Azure-style OpenAI upstream with `api-key` keys.
pub static AZURE_OPENAI: OpenAi = OpenAi::new(KeyHeader::ApiKey);

impl OpenAi {
    /// The profile with keys sent in `key`.
    pub const fn new(key: KeyHeader) -> Self {
        Self { key }
    }

    /// Where the key goes.
    pub fn key_header(&self) -> KeyHeader {
        self.key
    }

    /// The cooldown of a rate-limited answer whose error was read into `info`.
    fn delay(&self, policy: &Policy, headers: &HeaderMap, info: &ErrorInfo, wall: SystemTime) -> Duration {
        let d = policy::retry_after(headers, wall)
            .or_else(|| exhausted_reset(headers))
            .or_else(|| message_delay(&info.message));
        policy.bound(d.unwrap_or(policy.default_cooldown))
    }
}

impl Provider for OpenAi {
    fn name(&self) -> &'static str {
        match self.key {
            KeyHeader::Bearer => "openai",
            KeyHeader::ApiKey => "azure-openai",
        }
    }

    /// `https://api.openai.com`; none for Azure-style upstreams (every resource has its own).
    fn default_base_url(&self) -> &'static str {
        match self.key {
            KeyHeader::Bearer => DEFAULT_BASE_URL,
            KeyHeader::ApiKey => "",
        }
    }

    fn request_headers(&self, _headers: &mut HeaderMap) {}

    fn insert_key(&self, headers: &mut HeaderMap, key: &Secret) {
        match self.key {
            KeyHeader::Bearer => {
                let mut value = Vec::with_capacity(key.expose().len() + 7);
                value.extend_from_slice(b"Bearer ");
                value.extend_from_slice(key.expose().as_bytes());
                // Cannot fail: a secret is visible ASCII only (`Secret::new`), and so is
                // `Bearer ` before it.
                let mut v = HeaderValue::from_bytes(&value).unwrap_or_else(|_| HeaderValue::from_static(""));
                v.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, v);
            }
            KeyHeader::ApiKey => {
                headers.insert(AZURE_KEY_HEADER, key.header_value());
            }
        }
    }

    fn credential_headers(&self) -> &'static [HeaderName] {
        static HEADERS: [HeaderName; 2] = CREDENTIAL_HEADERS;
        &HEADERS
    }

    /// `Authorization: Bearer`, else `api-key` (for Azure-style profiles the other way round).
    fn client_credential<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        let api_key = || {
            headers
                .get(AZURE_KEY_HEADER)
                .map(|v| v.as_bytes().trim_ascii())
                .filter(|v| !v.is_empty())
        };
        match self.key {
            KeyHeader::Bearer => super::bearer_token(headers).or_else(api_key),
            KeyHeader::ApiKey => api_key().or_else(|| super::bearer_token(headers)),
        }
    }

    fn credential_help(&self) -> &'static str {
        "Authorization: Bearer or api-key"
    }

    /// A 429 (rate limit, request too large or empty wallet?), a 401 (missing scopes?), and a
    /// 400 when billing failures disable.
    fn needs_body(&self, policy: &Policy, status: StatusCode, _headers: &HeaderMap) -> bool {
        match status.as_u16() {
            429 | 401 => true,
            400 => policy.disable_on_billing,
            _ => false,
        }
    }

    /// The table of SPEC §12; see the [module docs](self).
    fn classify(
        &self,
        policy: &Policy,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        wall: SystemTime,
    ) -> Verdict {
        let code = status.as_u16();
        let info = if self.needs_body(policy, status, headers) {
            ErrorInfo::read(body)
        } else {
            ErrorInfo::default()
        };
        match code {
            402 if policy.disable_on_billing => Verdict::Disable {
                reason: DisableReason::Billing,
            },
            400 | 429 if policy.disable_on_billing && info.is_billing() => Verdict::Disable {
                reason: DisableReason::Billing,
            },
            // The wallet is empty but billing failures are configured not to disable: the
            // answer is the caller's to see, as a 402 would be.
            429 if info.is_billing() => Verdict::Deliver,
            429 if is_request_too_large(&info, headers) => Verdict::Deliver,
            429 => Verdict::CoolDown {
                duration: self.delay(policy, headers, &info, wall),
                reason: CoolReason::RateLimited,
            },
            401 if info.message.contains("Missing scopes:") => Verdict::Deliver,
            401 => match policy.on_unauthorized {
                OnUnauthorized::Disable => Verdict::Disable {
                    reason: DisableReason::Unauthorized,
                },
                OnUnauthorized::CoolFor(duration) => Verdict::CoolDown {
                    duration: policy.bound(duration),
                    reason: CoolReason::Auth,
                },
            },
            // "The engine is currently overloaded": delivered unless the operator asked
            // overloads to cool the key.
            503 => match policy.cool_on_overloaded {
                Some(duration) => Verdict::CoolDown {
                    duration: policy.bound(duration),
                    reason: CoolReason::Overloaded,
                },
                None => Verdict::Deliver,
            },
            _ => Verdict::Deliver,
        }
    }

    /// `retry-after-ms`, `retry-after` (seconds or HTTP-date), the exhausted dimension's
    /// `x-ratelimit-reset-*`, the message's "try again in …", else the default cooldown.
    fn retry_delay(&self, policy: &Policy, headers: &HeaderMap, body: &[u8], wall: SystemTime) -> Duration {
        self.delay(policy, headers, &ErrorInfo::read(body), wall)
    }

    fn event_role(&self, frame: &RawEvent<'_>) -> EventRole {
        if let Some(name) = frame.name() {
            return responses_role(name);
        }
        let data = frame_data(frame.bytes());
        let data = data.trim_ascii_start();
        if data.starts_with(b"[DONE]") {
            return EventRole::End;
        }
        if let Some(kind) = leading_type(data) {
            return responses_role(kind);
        }
        if is_error_object(data) {
            EventRole::Error
        } else if has_content_delta(data) {
            EventRole::Content
        } else if memchr::memmem::find(data, b"\"choices\"").is_some() {
            // A chunk without content: the role chunk, a usage chunk.
            EventRole::Preamble
        } else {
            EventRole::Content
        }
    }

    /// The first frame decides: named events (or `{"type":"response.…"}` data) are the
    /// Responses API, unnamed chunks Chat Completions; without a frame, a path ending in
    /// `/responses` is the Responses API.
    fn stream_dialect(&self, path: &str, first: Option<&RawEvent<'_>>) -> Dialect {
        match first {
            Some(frame) if frame.name().is_some() => RESPONSES,
            Some(frame) => {
                let data = frame_data(frame.bytes());
                match leading_type(data.trim_ascii_start()) {
                    Some(kind) if kind.starts_with("response.") => RESPONSES,
                    _ => CHAT_COMPLETIONS,
                }
            }
            None if path.trim_end_matches('/').ends_with("/responses") => RESPONSES,
            None => CHAT_COMPLETIONS,
        }
    }

    fn in_band_status(&self, data: &[u8]) -> StatusCode {
        ErrorInfo::read(data).status()
    }

    fn error_type(&self, status: StatusCode) -> &'static str {
        error_type_for_status(status)
    }

    fn error_body(&self, status: StatusCode, message: &str, _request_id: Option<&str>) -> Bytes {
        error_body(status, message)
    }

    /// `{"error":{"message":"…",…}}`.
    fn is_error_body(&self, body: &[u8]) -> bool {
        serde_json::from_slice::<Value>(body).is_ok_and(|v| v["error"]["message"].is_string())
    }

    fn error_event(&self, message: &str, dialect: Dialect) -> Bytes {
        if dialect == RESPONSES {
            responses_error_event(message)
        } else {
            chat_error_event(message)
        }
    }

    fn request_id_header(&self) -> HeaderName {
        REQUEST_ID_HEADER
    }

    /// The model id as it is (SPEC §11.2: OpenAI's limits are per model).
    fn model_family<'m>(&self, model: &'m str) -> &'m str {
        model
    }

    /// `openai-organization`, and `openai-project` as the workspace-like scope inside it.
    fn scope<'h>(&self, headers: &'h HeaderMap) -> Option<(&'h str, Option<&'h str>)> {
        let text = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        Some((text(&ORGANIZATION_HEADER)?, text(&PROJECT_HEADER)))
    }

    /// `x-ratelimit-remaining-{requests,tokens}: 0` → the matching `x-ratelimit-reset-*`
    /// (a Go duration, relative to the answer), the later one if both are.
    fn exhaustion_hint(&self, headers: &HeaderMap, _wall: SystemTime) -> Option<Duration> {
        exhausted_reset(headers)
    }

    /// `error.type` and `error.code`.
    fn error_code(&self, body: &[u8]) -> (Option<String>, Option<String>) {
        let body = &body[..body.len().min(MAX_CLASSIFY_BODY)];
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
            return (None, None);
        }
        let info = ErrorInfo::read(body);
        (info.kind, info.code)
    }

    fn identity_headers(&self) -> &'static [HeaderName] {
        static HEADERS: [HeaderName; 2] = [ORGANIZATION_HEADER, PROJECT_HEADER];
        &HEADERS
    }

    fn probe_path(&self) -> &'static str {
        "/v1/models"
    }

    fn exhaustion_headers(&self, exhausted: Exhausted, headers: &mut HeaderMap) {
        match exhausted {
            Exhausted::RateLimited { retry_after } => {
                let (secs, millis) = retry_after_headers(retry_after);
                headers.insert(http::header::RETRY_AFTER, secs);
                headers.insert("retry-after-ms", millis);
                headers.insert("x-should-retry", HeaderValue::from_static("true"));
            }
            Exhausted::AllDisabled => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
    }
}

/// What an OpenAI error body (or in-band error) says: `{"error":{"type","code","message"}}`,
/// a Responses `{"type":"error","code","message"}`, `{"error":"message"}`; for anything that
/// is not JSON, its text as the message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct ErrorInfo {
    kind: Option<String>,
    code: Option<String>,
    message: String,
}

impl ErrorInfo {
    fn read(body: &[u8]) -> Self {
        let body = &body[..body.len().min(MAX_CLASSIFY_BODY)];
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return Self {
                message: String::from_utf8_lossy(body).into_owned(),
                ..Self::default()
            };
        };
        let object = match value.get("error") {
            Some(Value::String(message)) => {
                return Self {
                    message: message.clone(),
                    ..Self::default()
                };
            }
            Some(e @ Value::Object(_)) => e,
            _ => &value,
        };
        let text = |k: &str| match object.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Self {
            kind: text("type"),
            code: text("code"),
            message: text("message").unwrap_or_default(),
        }
    }

    /// Whether the type or code is `name`.
    fn is(&self, name: &str) -> bool {
        self.kind.as_deref() == Some(name) || self.code.as_deref() == Some(name)
    }

    fn is_billing(&self) -> bool {
        BILLING_CODES.iter().any(|c| self.is(c))
            || self
                .code
                .as_deref()
                .is_some_and(|c| c.ends_with("_spend_limit_exceeded"))
    }

    /// The HTTP status of an in-band error (500 when nothing says otherwise).
    fn status(&self) -> StatusCode {
        let kind = self.kind.as_deref();
        if self.is_billing() || self.is("rate_limit_exceeded") || matches!(kind, Some("requests" | "tokens"))
        {
            StatusCode::TOO_MANY_REQUESTS
        } else if self.is("invalid_api_key") || self.is("authentication_error") {
            StatusCode::UNAUTHORIZED
        } else if self.is("server_is_overloaded") || self.is("slow_down") {
            StatusCode::SERVICE_UNAVAILABLE
        } else if kind == Some("invalid_request_error") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The two rate-limit dimensions whose headers OpenAI sends.
static DIMENSIONS: [(HeaderName, HeaderName); 2] = [
    (
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ),
    (
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ),
];

fn remaining(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The reset of the dimension(s) whose `x-ratelimit-remaining-*` is 0 (the later one when both
/// are), as a Go duration.
fn exhausted_reset(headers: &HeaderMap) -> Option<Duration> {
    DIMENSIONS
        .iter()
        .filter(|(left, _)| remaining(headers, left) == Some(0))
        .filter_map(|(_, reset)| parse_go_duration(headers.get(reset)?.to_str().ok()?))
        .max()
}

/// A 429 "Request too large for … on tokens per min (TPM)": the request alone is over the
/// limit, unless the matching `x-ratelimit-remaining-*` is 0 (then it is an ordinary limit).
fn is_request_too_large(info: &ErrorInfo, headers: &HeaderMap) -> bool {
    let message = info.message.to_ascii_lowercase();
    if !message.contains("request too large") {
        return false;
    }
    let requests = message.contains("(rpm)") || message.contains("requests per");
    let (left, _) = &DIMENSIONS[usize::from(!requests)];
    remaining(headers, left) != Some(0)
}

/// The delay an error message asks for: "Please try again in 10.666s", "try again in 20ms",
/// "try again in 6m0s", "Please retry after 6 seconds" (Azure).
pub fn message_delay(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    for marker in ["try again in ", "retry after "] {
        let mut from = 0;
        while let Some(at) = lower[from..].find(marker) {
            let rest = &lower[from + at + marker.len()..];
            if let Some(d) = leading_delay(rest) {
                return Some(d);
            }
            from += at + marker.len();
        }
    }
    None
}

/// A delay at the start of `text`: a Go duration (`10.666s`, `6m0s`), or a decimal and a unit
/// word (`6 seconds`, `1.5 minutes`, `20 ms`).
fn leading_delay(text: &str) -> Option<Duration> {
    let end = text
        .find(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | ')' | '"' | '<' | '\''))
        .unwrap_or(text.len());
    let token = text[..end].trim_end_matches('.');
    if let Some(d) = parse_go_duration(token) {
        return Some(d);
    }
    let unit = text[end..].trim_start();
    let unit_end = unit
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(unit.len());
    let unit_ns: u64 = match &unit[..unit_end] {
        "ms" | "millisecond" | "milliseconds" => 1_000_000,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
        "h" | "hour" | "hours" => 3_600_000_000_000,
        _ => return None,
    };
    policy::parse_decimal(token, unit_ns)
}

/// Parses a Go duration (`time.Duration.String()`): a sequence of decimal numbers each with a
/// unit, `ns`, `us` (`µs`, `μs`), `ms`, `s`, `m`, `h` — `6m0s`, `10.666s`, `12ms`, `1h2m3.5s`.
/// `None` for anything else, for zero and for a negative duration (never a zero cooldown);
/// huge values saturate. Never panics.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    // A Go duration is short; a long value is garbage (and bounds the work).
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    let bytes = s.as_bytes();
    let mut total: u128 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let int_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let int = &s[int_start..i];
        let mut frac = "";
        if i < bytes.len() && bytes[i] == b'.' {
            i += 1;
            let frac_start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            frac = &s[frac_start..i];
        }
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let unit_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_digit() && bytes[i] != b'.' {
            i += 1;
        }
        let unit_ns: u128 = match &s[unit_start..i] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let mut whole: u128 = 0;
        for b in int.bytes() {
            whole = whole.saturating_mul(10).saturating_add(u128::from(b - b'0'));
        }
        total = total.saturating_add(whole.saturating_mul(unit_ns));
        let mut scale = unit_ns;
        for b in frac.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            total = total.saturating_add(u128::from(b - b'0') * scale);
        }
    }
    if total == 0 {
        return None;
    }
    let secs = u64::try_from(total / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder of a division by 10^9 fits in a u32.
    let nanos = u32::try_from(total % 1_000_000_000).unwrap_or(0);
    Some(Duration::new(secs, nanos))
}

/// The role of a Responses API event by its name (or its data's `type`).
fn responses_role(name: &str) -> EventRole {
    match name {
        "error" => EventRole::Error,
        "response.completed" | "response.failed" | "response.incomplete" => EventRole::End,
        "response.created" | "response.in_progress" | "response.queued" => EventRole::Preamble,
        // `response.output_item.added`, `response.output_text.delta` and whatever follows them.
        _ => EventRole::Content,
    }
}

/// The data of a raw frame: its `data` lines joined by `\n` (borrowed when there is one).
fn frame_data(raw: &[u8]) -> Cow<'_, [u8]> {
    let mut lines = raw
        .split(|&b| b == b'\n' || b == b'\r')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .map(|v| v.strip_prefix(b" ").unwrap_or(v));
    let Some(first) = lines.next() else {
        return Cow::Borrowed(&[]);
    };
    match lines.next() {
        None => Cow::Borrowed(first),
        Some(second) => {
            let mut out = first.to_vec();
            for line in std::iter::once(second).chain(lines) {
                out.push(b'\n');
                out.extend_from_slice(line);
            }
            Cow::Owned(out)
        }
    }
}

/// The value of a leading `"type"` field: `{"type":"response.created",…}` → `response.created`.
fn leading_type(data: &[u8]) -> Option<&str> {
    let rest = data.strip_prefix(b"{")?.trim_ascii_start();
    let rest = rest.strip_prefix(b"\"type\"")?.trim_ascii_start();
    let rest = rest.strip_prefix(b":")?.trim_ascii_start();
    let rest = rest.strip_prefix(b"\"")?;
    let end = memchr::memchr(b'"', rest)?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// Whether the data is a JSON object whose first field is `error`: `{"error": {…}}`.
fn is_error_object(data: &[u8]) -> bool {
    data.strip_prefix(b"{")
        .map(<[u8]>::trim_ascii_start)
        .and_then(|rest| rest.strip_prefix(b"\"error\""))
        .map(<[u8]>::trim_ascii_start)
        .is_some_and(|rest| rest.starts_with(b":"))
}

/// Whether a Chat Completions chunk carries content: a non-empty `content`, `refusal` or
/// `reasoning_content` string, or `tool_calls` / `function_call`. A byte scan, not a parse
/// (this runs on every chunk): a key inside a string value is escaped (`\"content\"`) and
/// never matches.
fn has_content_delta(data: &[u8]) -> bool {
    let text = |key: &[u8]| {
        memchr::memmem::find_iter(data, key).any(|at| {
            let value = after_colon(&data[at + key.len()..]);
            value.is_some_and(|v| v.starts_with(b"\"") && !v.starts_with(b"\"\""))
        })
    };
    let structured = |key: &[u8]| {
        memchr::memmem::find_iter(data, key).any(|at| {
            after_colon(&data[at + key.len()..])
                .is_some_and(|v| (v.starts_with(b"[") && !v.starts_with(b"[]")) || v.starts_with(b"{"))
        })
    };
    text(b"\"content\"")
        || text(b"\"refusal\"")
        || text(b"\"reasoning_content\"")
        || structured(b"\"tool_calls\"")
        || structured(b"\"function_call\"")
}

/// What follows `: ` after a key, whitespace skipped.
fn after_colon(rest: &[u8]) -> Option<&[u8]> {
    Some(rest.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start())
}

/// The OpenAI `error.type` of keypool's own errors for an HTTP status.
pub fn error_type_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "rate_limit_exceeded",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// The OpenAI `error.code` of keypool's own errors for an HTTP status (`None`: `null`).
pub fn error_code_for_status(status: StatusCode) -> Option<&'static str> {
    match status.as_u16() {
        401 => Some("invalid_api_key"),
        404 => Some("unknown_url"),
        413 => Some("request_too_large"),
        429 => Some("rate_limit_exceeded"),
        504 => Some("timeout"),
        _ => None,
    }
}

/// OpenAI's error object, its fields in OpenAI's order.
#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorObject<'a>,
}

/// The data of a Responses API `error` event, with the error object SDKs raise from.
#[derive(Serialize)]
struct ErrorEventData<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
    message: &'a str,
    param: Option<&'a str>,
    error: ErrorObject<'a>,
}

/// An OpenAI-shaped error body: `{"error":{"message":…,"type":…,"param":null,"code":…}}`.
pub fn error_body(status: StatusCode, message: &str) -> Bytes {
    let body = ErrorEnvelope {
        error: ErrorObject {
            message,
            kind: error_type_for_status(status),
            param: None,
            code: error_code_for_status(status),
        },
    };
    // Serialising a struct of strings into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// The Chat Completions error chunk keypool writes when a committed stream breaks:
/// `data: {"error":{"message":…,"type":"server_error","param":null,"code":null}}`.
pub fn chat_error_event(message: &str) -> Bytes {
    let data = error_body(StatusCode::BAD_GATEWAY, message);
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The Responses API `error` event keypool writes when a committed stream breaks:
/// `event: error` / `data: {"type":"error","code":"server_error","message":…,"param":null,
/// "error":{…}}` — the event's own fields, and the error object that SDKs raise from.
pub fn responses_error_event(message: &str) -> Bytes {
    let data = ErrorEventData {
        kind: "error",
        code: "server_error",
        message,
        param: None,
        error: ErrorObject {
            message,
            kind: "server_error",
            param: None,
            code: Some("server_error"),
        },
    };
    let mut out = b"event: error\ndata: ".to_vec();
    // Serialising a struct of strings into a Vec cannot fail.
    serde_json::to_writer(&mut out, &data).unwrap_or_default();
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::Framer;

    fn go(s: &str) -> Option<Duration> {
        parse_go_duration(s)
    }

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(go("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go("10.666s"), Some(ms(10_666)));
        assert_eq!(go("12ms"), Some(ms(12)));
        assert_eq!(go("1h2m3.5s"), Some(ms(3_723_500)));
        assert_eq!(go("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(go("300us"), Some(Duration::from_micros(300)));
        assert_eq!(go("300µs"), Some(Duration::from_micros(300)));
        assert_eq!(go("300μs"), Some(Duration::from_micros(300)));
        assert_eq!(go("7ns"), Some(Duration::from_nanos(7)));
        assert_eq!(go(" 1s "), Some(Duration::from_secs(1)));
        assert_eq!(go(".5s"), Some(ms(500)));
        assert_eq!(go("+2s"), Some(Duration::from_secs(2)));
        for bad in [
            "", "0", "0s", "0m0s", "-1s", "5", "s", "1x", "1.2.3s", "1 s", "1d", "1sm", "٣s", "1e3s", ".s",
            "NaN", "inf", "ms",
        ] {
            assert_eq!(go(bad), None, "{bad:?}");
        }
        // Huge values saturate instead of overflowing.
        assert!(go("99999999999999999999999999999h").is_some());
        assert!(go(&"9h".repeat(40)).is_none(), "too long");
    }

    #[test]
    fn message_delays() {
        let ms = Duration::from_millis;
        let m = |s: &str| message_delay(s);
        assert_eq!(
            m(
                "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000. Please try again in 10.666s. Visit https://example.invalid to learn more."
            ),
            Some(ms(10_666))
        );
        assert_eq!(m("Please try again in 20ms."), Some(ms(20)));
        assert_eq!(m("please Try Again In 6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(m("try again in 1.5 seconds"), Some(ms(1500)));
        assert_eq!(
            m(
                "Requests to the ChatCompletions_Create Operation have exceeded token rate limit. Please retry after 6 seconds."
            ),
            Some(Duration::from_secs(6))
        );
        assert_eq!(
            m("try again in a moment. try again in 2s"),
            Some(Duration::from_secs(2))
        );
        for none in [
            "",
            "slow down",
            "try again in",
            "try again in 0s",
            "try again in -1s",
            "retry after soon",
        ] {
            assert_eq!(m(none), None, "{none:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn error(kind: &str, code: Option<&str>, message: &str) -> Vec<u8> {
        serde_json::to_vec(
            &serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        )
        .unwrap()
    }

    fn classify(status: u16, h: &HeaderMap, body: &[u8]) -> Verdict {
        OPENAI.classify(
            &Policy::default(),
            StatusCode::from_u16(status).unwrap(),
            h,
            body,
            SystemTime::UNIX_EPOCH,
        )
    }

    fn cool(d: Duration) -> Verdict {
        Verdict::CoolDown {
            duration: d,
            reason: CoolReason::RateLimited,
        }
    }

    #[test]
    fn rate_limit_delays_first_match_wins() {
        let limited = error(
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached. Please try again in 7s.",
        );
        let all = [
            ("retry-after-ms", "1500"),
            ("retry-after", "3"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "6m0s"),
        ];
        let secs = Duration::from_secs;
        assert_eq!(
            classify(429, &headers(&all), &limited),
            cool(Duration::from_millis(1500))
        );
        assert_eq!(classify(429, &headers(&all[1..]), &limited), cool(secs(3)));
        assert_eq!(classify(429, &headers(&all[2..]), &limited), cool(secs(360)));
        // A reset whose dimension is not exhausted is not the delay.
        let not_exhausted = [
            ("x-ratelimit-remaining-requests", "12"),
            ("x-ratelimit-reset-requests", "6m0s"),
        ];
        assert_eq!(classify(429, &headers(&not_exhausted), &limited), cool(secs(7)));
        // Both exhausted: the later reset.
        let both = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1m30s"),
        ];
        assert_eq!(classify(429, &headers(&both), &limited), cool(secs(90)));
        let garbage = [
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "soon"),
        ];
        assert_eq!(classify(429, &headers(&garbage), &limited), cool(secs(7)));
        assert_eq!(classify(429, &HeaderMap::new(), b"{}"), cool(secs(60)));
        assert_eq!(
            classify(429, &HeaderMap::new(), b"not json at all"),
            cool(secs(60))
        );
        assert_eq!(
            classify(429, &HeaderMap::new(), b"<html>try again in 2s</html>"),
            cool(secs(2))
        );
        // Capped at the policy's maximum.
        assert_eq!(
            classify(429, &headers(&[("retry-after", "99999999")]), &limited),
            cool(secs(3600))
        );
    }

    #[test]
    fn the_table() {
        let none = HeaderMap::new();
        let billing = Verdict::Disable {
            reason: DisableReason::Billing,
        };
        let too_large = error(
            "tokens",
            Some("rate_limit_exceeded"),
            "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 50000.",
        );
        let room = headers(&[("x-ratelimit-remaining-tokens", "29000")]);
        assert_eq!(classify(429, &room, &too_large), Verdict::Deliver);
        assert_eq!(classify(429, &none, &too_large), Verdict::Deliver);
        let empty = headers(&[("x-ratelimit-remaining-tokens", "0"), ("retry-after", "4")]);
        assert_eq!(classify(429, &empty, &too_large), cool(Duration::from_secs(4)));
        for code in [
            "insufficient_quota",
            "credit_balance_exhausted",
            "project_spend_limit_exceeded",
            "organization_usage_limit_exceeded",
        ] {
            let body = error(
                "insufficient_quota",
                Some(code),
                "You exceeded your current quota",
            );
            assert_eq!(classify(429, &none, &body), billing, "{code}");
        }
        let no_billing = Policy {
            disable_on_billing: false,
            ..Policy::default()
        };
        let quota = error("insufficient_quota", Some("insufficient_quota"), "quota");
        let v = OPENAI.classify(
            &no_billing,
            StatusCode::TOO_MANY_REQUESTS,
            &none,
            &quota,
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(v, Verdict::Deliver);
        assert_eq!(
            classify(
                400,
                &none,
                &error("invalid_request_error", Some("billing_hard_limit_reached"), "x")
            ),
            billing
        );
        assert_eq!(
            classify(400, &none, &error("invalid_request_error", None, "bad")),
            Verdict::Deliver
        );
        assert_eq!(classify(402, &none, b""), billing);
        assert_eq!(
            classify(
                401,
                &none,
                &error(
                    "invalid_request_error",
                    Some("invalid_api_key"),
                    "Incorrect API key provided"
                )
            ),
            Verdict::Disable {
                reason: DisableReason::Unauthorized
            }
        );
        let scopes = error(
            "invalid_request_error",
            None,
            "You have insufficient permissions for this operation. Missing scopes: api.responses.write.",
        );
        assert_eq!(classify(401, &none, &scopes), Verdict::Deliver);
        for status in [403, 404, 500, 502, 503, 504] {
            assert_eq!(classify(status, &none, b""), Verdict::Deliver, "{status}");
        }
        let overloaded = Policy {
            cool_on_overloaded: Some(Duration::from_secs(5)),
            ..Policy::default()
        };
        assert!(
            OPENAI
                .classify(
                    &overloaded,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &none,
                    b"",
                    SystemTime::UNIX_EPOCH
                )
                .is_failover()
        );
        assert!(OPENAI.needs_body(&Policy::default(), StatusCode::TOO_MANY_REQUESTS, &none));
        assert!(!OPENAI.needs_body(&Policy::default(), StatusCode::FORBIDDEN, &none));
    }

    fn frames(bytes: &'static [u8]) -> Vec<(EventRole, Dialect)> {
        let mut framer = Framer::new();
        framer.feed(&Bytes::from_static(bytes));
        let mut out = Vec::new();
        while let Some(Ok(frame)) = framer.next_frame() {
            out.push((
                OPENAI.event_role(&frame),
                OPENAI.stream_dialect("/v1/x", Some(&frame)),
            ));
        }
        out
    }

    #[test]
    fn chat_completions_roles() {
        use EventRole::*;
        let got = frames(
            b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":{\"content\":[]}}]}\n\n\
              data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
              data: {\"choices\":[{\"delta\":{\"content\":\"say \\\"content\\\": x\"}}]}\n\n\
              data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\n\n\
              data: {\"choices\":[{\"delta\":{\"tool_calls\":[]}}]}\n\n\
              data: {\"choices\": [{\"delta\": {\"content\" : \"spaced\"}}]}\n\n\
              data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n\
              data: {\"error\":{\"message\":\"x\",\"type\":\"server_error\"}}\n\n\
              data: [DONE]\n\n\
              data: hello\n\n",
        );
        let roles: Vec<EventRole> = got.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            roles,
            [
                Preamble, Content, Content, Content, Preamble, Content, Preamble, Error, End, Content
            ]
        );
        assert!(got.iter().all(|(_, d)| *d == CHAT_COMPLETIONS));
    }

    #[test]
    fn responses_roles() {
        use EventRole::*;
        let got = frames(
            b"event: response.created\ndata: {\"type\":\"response.created\"}\n\n\
              event: response.in_progress\ndata: {\"type\":\"response.in_progress\"}\n\n\
              event: response.output_item.added\ndata: {}\n\n\
              event: response.output_text.delta\ndata: {}\n\n\
              event: response.completed\ndata: {}\n\n\
              event: response.failed\ndata: {}\n\n\
              event: response.incomplete\ndata: {}\n\n\
              event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\"}\n\n\
              data: {\"type\":\"response.completed\"}\n\n",
        );
        let roles: Vec<EventRole> = got.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            roles,
            [Preamble, Preamble, Content, Content, End, End, End, Error, End]
        );
        assert!(got.iter().all(|(_, d)| *d == RESPONSES));
        assert_eq!(OPENAI.stream_dialect("/v1/responses", None), RESPONSES);
        assert_eq!(OPENAI.stream_dialect("/openai/v1/responses/", None), RESPONSES);
        assert_eq!(
            OPENAI.stream_dialect("/v1/chat/completions", None),
            CHAT_COMPLETIONS
        );
    }

    #[test]
    fn in_band_statuses() {
        let s = |d: &[u8]| OPENAI.in_band_status(d).as_u16();
        assert_eq!(s(&error("requests", Some("rate_limit_exceeded"), "x")), 429);
        assert_eq!(
            s(br#"{"type":"error","code":"rate_limit_exceeded","message":"x"}"#),
            429
        );
        assert_eq!(
            s(&error("insufficient_quota", Some("insufficient_quota"), "x")),
            429
        );
        assert_eq!(
            s(&error("invalid_request_error", Some("invalid_api_key"), "x")),
            401
        );
        assert_eq!(s(&error("server_error", Some("server_is_overloaded"), "x")), 503);
        assert_eq!(s(&error("invalid_request_error", None, "x")), 400);
        assert_eq!(s(br#"{"type":"error","code":"server_error","message":"x"}"#), 500);
        assert_eq!(s(b"garbage"), 500);
        assert_eq!(s(br#"{"error":"plain"}"#), 500);
    }

    #[test]
    fn shapes() {
        let b = error_body(StatusCode::TOO_MANY_REQUESTS, "all \"3\" keys");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["message"], "all \"3\" keys");
        assert_eq!(v["error"]["type"], "rate_limit_exceeded");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert!(v["error"]["param"].is_null());
        assert!(v.get("type").is_none());
        assert!(OPENAI.is_error_body(&b));
        assert!(!OPENAI.is_error_body(br#"{"type":"error","error":{"type":"api_error"}}"#));
        assert_eq!(
            serde_json::from_slice::<Value>(&OPENAI.error_body(StatusCode::BAD_GATEWAY, "m", Some("r")))
                .unwrap()["error"]["code"],
            Value::Null
        );

        let chat = OPENAI.error_event("upstream reset", CHAT_COMPLETIONS);
        assert!(chat.starts_with(b"data: {\"error\":{"), "{chat:?}");
        assert!(chat.ends_with(b"}\n\n"));
        let responses = OPENAI.error_event("upstream reset", RESPONSES);
        assert!(responses.starts_with(b"event: error\ndata: {"), "{responses:?}");
        let data: Value = serde_json::from_slice(&responses[19..responses.len() - 2]).unwrap();
        assert_eq!(data["type"], "error");
        assert_eq!(data["message"], "upstream reset");
        assert_eq!(data["error"]["message"], "upstream reset");
        // Both are what the profile itself reads as in-band errors.
        let mut framer = Framer::new();
        framer.feed(&Bytes::from([chat, responses].concat()));
        while let Some(Ok(frame)) = framer.next_frame() {
            assert_eq!(OPENAI.event_role(&frame), EventRole::Error);
        }
    }

    #[test]
    fn keys_and_credentials() {
        let key = Secret::new("sk-proj-0123456789abcdef").unwrap();
        let mut h = HeaderMap::new();
        OPENAI.insert_key(&mut h, &key);
        assert_eq!(h["authorization"], "Bearer sk-proj-0123456789abcdef");
        assert!(h["authorization"].is_sensitive());
        let mut h = HeaderMap::new();
        AZURE_OPENAI.insert_key(&mut h, &key);
        assert_eq!(h["api-key"], "sk-proj-0123456789abcdef");
        assert!(h["api-key"].is_sensitive() && !h.contains_key("authorization"));

        let h = headers(&[("authorization", "Bearer tok"), ("api-key", "azure")]);
        assert_eq!(OPENAI.client_credential(&h), Some(&b"tok"[..]));
        assert_eq!(AZURE_OPENAI.client_credential(&h), Some(&b"azure"[..]));
        let h = headers(&[("api-key", " azure ")]);
        assert_eq!(OPENAI.client_credential(&h), Some(&b"azure"[..]));
        assert_eq!(OPENAI.client_credential(&HeaderMap::new()), None);
        assert_eq!((OPENAI.name(), AZURE_OPENAI.name()), ("openai", "azure-openai"));
        assert_eq!(OPENAI.default_base_url(), DEFAULT_BASE_URL);
        assert_eq!(AZURE_OPENAI.default_base_url(), "");

        let mut h = HeaderMap::new();
        OPENAI.exhaustion_headers(
            Exhausted::RateLimited {
                retry_after: Duration::from_millis(200),
            },
            &mut h,
        );
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["retry-after-ms"], "200");
        assert_eq!(h["x-should-retry"], "true");
    }
}
