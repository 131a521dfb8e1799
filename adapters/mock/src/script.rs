//! The script types: what the mock answers, and how it delivers the answer.
//!
//! Every type here is plain data that derives `Serialize` / `Deserialize`, so a whole
//! [`Scenario`] can be loaded from a TOML or JSON file (see the crate docs for the format).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The message of the 400 `invalid_request_error` Anthropic sends when the credit balance is
/// too low. keypool treats it as a billing failure of the key (SPEC §4).
pub const CREDIT_BALANCE_MESSAGE: &str = "Your credit balance is too low to access the Anthropic API. \
     Please go to Plans & Billing to upgrade or purchase credits.";

/// One scripted answer to one request.
///
/// Built with the constructors ([`Reply::ok`], [`Reply::status`], [`Reply::rate_limited`], …) and
/// refined with the builder methods, which take and return `self`:
///
/// ```
/// use keypool_mock::{Reply, RetryAfter};
/// let r = Reply::rate_limited(RetryAfter::Seconds("5".into())).header("x-extra", "1");
/// assert_eq!(r.status, 429);
/// ```
///
/// Headers are written in this order, a later one replacing an earlier one of the same name:
/// the automatic ones (`content-type` for the body, `request-id`, the `anthropic-ratelimit-*`
/// set; off with [`Reply::without_auto_headers`]), then `retry-after` / `retry-after-ms` from
/// [`Reply::retry_after`], then the explicit [`Reply::header`]s. hyper adds `date` unless
/// a `date` header is given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Reply {
    /// The HTTP status code (default 200).
    pub status: u16,
    /// Extra response headers, in order, as `(name, value)` pairs.
    pub headers: Vec<(String, String)>,
    /// The `retry-after` / `retry-after-ms` headers to send (default none).
    pub retry_after: RetryAfter,
    /// The response body.
    pub body: Body,
    /// Whether to add `content-type`, `request-id` and `anthropic-ratelimit-*` (default true).
    pub auto_headers: bool,
    /// Delay before the response head is sent, in milliseconds (default 0).
    pub head_delay_ms: u64,
    /// A transport fault instead of an answer (default none).
    pub fault: Option<Fault>,
    /// For bodies other than [`Body::Stream`]: the size of each written chunk in bytes; `None`
    /// (default) writes the body in one piece. An automatic SSE answer uses it too.
    pub chunk_size: Option<usize>,
    /// For bodies other than [`Body::Stream`]: delay between two chunks, in milliseconds.
    pub chunk_delay_ms: u64,
    /// For bodies other than [`Body::Stream`]: how the body ends (default complete).
    pub ending: Ending,
}

impl Default for Reply {
    fn default() -> Self {
        Self::ok()
    }
}

impl Reply {
    /// 200 with the endpoint's normal answer: a Message (or, when the request JSON has
    /// `"stream": true`, the normal SSE event sequence) for `POST /v1/messages`, a token count for
    /// `/v1/messages/count_tokens`, a model list for `GET /v1/models`.
    pub fn ok() -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            retry_after: RetryAfter::None,
            body: Body::Auto,
            auto_headers: true,
            head_delay_ms: 0,
            fault: None,
            chunk_size: None,
            chunk_delay_ms: 0,
            ending: Ending::Complete,
        }
    }

    /// Any status with an empty body (200 keeps the endpoint's normal body, as [`Reply::ok`]);
    /// set a body with [`Reply::body`], [`Reply::json`], [`Reply::text`] or [`Reply::error_body`].
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: if status == 200 { Body::Auto } else { Body::Empty },
            ..Self::ok()
        }
    }

    /// An Anthropic-shaped error: `status` with
    /// `{"type":"error","error":{"type":error_type,"message":message},"request_id":"req_..."}`.
    pub fn error(status: u16, error_type: &str, message: &str) -> Self {
        Self::status(status).error_body(error_type, message)
    }

    /// 429 `rate_limit_error` with the given retry headers.
    pub fn rate_limited(retry_after: RetryAfter) -> Self {
        Self::error(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        )
        .retry_after(retry_after)
    }

    /// 401 `authentication_error` ("invalid x-api-key").
    pub fn unauthorized() -> Self {
        Self::error(401, "authentication_error", "invalid x-api-key")
    }

    /// 403 `permission_error`.
    pub fn forbidden() -> Self {
        Self::error(
            403,
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        )
    }

    /// 402 `billing_error`.
    pub fn billing() -> Self {
        Self::error(
            402,
            "billing_error",
            "Your account has a billing issue. Please check Plans & Billing.",
        )
    }

    /// 400 `invalid_request_error` whose message says the credit balance is too low
    /// ([`CREDIT_BALANCE_MESSAGE`]).
    pub fn credit_balance() -> Self {
        Self::error(400, "invalid_request_error", CREDIT_BALANCE_MESSAGE)
    }

    /// 500 `api_error`.
    pub fn server_error() -> Self {
        Self::error(500, "api_error", "Internal server error")
    }

    /// 529 `overloaded_error`.
    pub fn overloaded() -> Self {
        Self::error(529, "overloaded_error", "Overloaded")
    }

    /// 400 plain `invalid_request_error` (the request's fault, not the key's).
    pub fn bad_request() -> Self {
        Self::error(400, "invalid_request_error", "messages: field required")
    }

    /// 200 with a `text/event-stream` body as scripted, whatever the request's `stream` flag.
    pub fn stream(script: StreamScript) -> Self {
        Self {
            body: Body::Stream(script),
            ..Self::ok()
        }
    }

    /// Accept the request, then reset the connection (TCP RST) without any answer.
    pub fn reset_before_head() -> Self {
        Self {
            fault: Some(Fault::ResetBeforeHead),
            ..Self::ok()
        }
    }

    /// Accept the request, then close the connection cleanly (FIN) without any answer.
    pub fn close_before_head() -> Self {
        Self {
            fault: Some(Fault::CloseBeforeHead),
            ..Self::ok()
        }
    }

    /// Accept the request and never answer (until the client goes away or the server stops).
    pub fn stall_before_head() -> Self {
        Self {
            fault: Some(Fault::StallBeforeHead),
            ..Self::ok()
        }
    }

    /// Accept the request, write part of a response head, then reset the connection
    /// ([`Fault::PartialHeadThenReset`]).
    pub fn reset_inside_head() -> Self {
        Self {
            fault: Some(Fault::PartialHeadThenReset),
            ..Self::ok()
        }
    }

    /// Accept the request, write part of a response head, then close the connection cleanly
    /// ([`Fault::PartialHeadThenClose`]).
    pub fn close_inside_head() -> Self {
        Self {
            fault: Some(Fault::PartialHeadThenClose),
            ..Self::ok()
        }
    }

    /// Adds a response header (sent after, and replacing, any automatic header of that name).
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the retry headers.
    #[must_use]
    pub fn retry_after(mut self, retry_after: RetryAfter) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Sets the body.
    #[must_use]
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// Sets a JSON body (`content-type: application/json`).
    #[must_use]
    pub fn json(self, value: serde_json::Value) -> Self {
        self.body(Body::Json { json: value })
    }

    /// Sets a text body (`content-type: text/plain; charset=utf-8` unless a header says else).
    #[must_use]
    pub fn text(self, text: &str) -> Self {
        self.body(Body::Text {
            text: text.to_owned(),
        })
    }

    /// Sets an Anthropic-shaped error body.
    #[must_use]
    pub fn error_body(self, error_type: &str, message: &str) -> Self {
        self.body(Body::Error {
            error_type: error_type.to_owned(),
            message: message.to_owned(),
            code: None,
        })
    }

    /// Turns the automatic headers off (see the type docs).
    #[must_use]
    pub fn without_auto_headers(mut self) -> Self {
        self.auto_headers = false;
        self
    }

    /// Waits this long before sending the response head.
    #[must_use]
    pub fn head_delay(mut self, delay: Duration) -> Self {
        self.head_delay_ms = millis(delay);
        self
    }

    /// Writes a non-[`Body::Stream`] body in chunks of `bytes` bytes, each its own write.
    #[must_use]
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = Some(bytes);
        self
    }

    /// Waits this long between two chunks of a non-[`Body::Stream`] body.
    #[must_use]
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay_ms = millis(delay);
        self
    }

    /// Sets how a non-[`Body::Stream`] body ends.
    #[must_use]
    pub fn ending(mut self, ending: Ending) -> Self {
        self.ending = ending;
        self
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The retry headers of a reply. The strings are sent raw, so tests can send garbage such as
/// `"-5"`, `"abc"`, `"2.5"` or `"99999999"`.
///
/// In a scenario file: `"none"`, `{ seconds = "5" }`, `{ millis = "1500" }`,
/// `{ http_date = "Sun, 06 Nov 1994 08:49:37 GMT" }`, `{ http_date_in = 30 }`,
/// `{ both = { seconds = "5", millis = "5000" } }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryAfter {
    /// No retry header.
    #[default]
    None,
    /// `retry-after: <value>` (meant as delay-seconds).
    Seconds(String),
    /// `retry-after-ms: <value>`.
    Millis(String),
    /// `retry-after: <HTTP-date>` for this instant.
    #[serde(with = "http_date_serde")]
    HttpDate(SystemTime),
    /// `retry-after: <HTTP-date>` this many seconds after the moment the reply is sent.
    HttpDateIn(u64),
    /// Both `retry-after` (seconds) and `retry-after-ms`.
    Both {
        /// The `retry-after` value.
        seconds: String,
        /// The `retry-after-ms` value.
        millis: String,
    },
}

mod http_date_serde {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&httpdate::fmt_http_date(*t))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        httpdate::parse_http_date(&s).map_err(serde::de::Error::custom)
    }
}

/// A transport-level fault in place of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Read the request, then reset the connection (TCP RST) without answering.
    ResetBeforeHead,
    /// Read the request, then close the connection cleanly (FIN) without answering.
    CloseBeforeHead,
    /// Read the request and never answer; the connection stays open until the client leaves or
    /// the server shuts down.
    StallBeforeHead,
    /// Read the request, write the first part of a response head (`HTTP/1.1 200 OK` and a few
    /// header lines, no blank line), then reset the connection (TCP RST). HTTP/1.1 only: the bytes
    /// go straight to the socket, beneath TLS on the TLS port (where the client then sees a broken
    /// record instead); on HTTP/2 it acts as [`Fault::CloseBeforeHead`].
    PartialHeadThenReset,
    /// As [`Fault::PartialHeadThenReset`], but the connection is closed cleanly (FIN) after the
    /// partial head.
    PartialHeadThenClose,
}

/// A response body.
///
/// In a scenario file the variant is named by `type`:
/// `{ type = "auto" }`, `{ type = "empty" }`, `{ type = "text", text = "..." }`,
/// `{ type = "json", json = {...} }`,
/// `{ type = "error", error_type = "overloaded_error", message = "Overloaded" }`,
/// `{ type = "stream", text_deltas = 5, chunk_size = 7, ending = "end_early" }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    /// The endpoint's normal answer (see [`Reply::ok`]).
    Auto,
    /// No body.
    Empty,
    /// A text body.
    Text {
        /// The text.
        text: String,
    },
    /// A JSON body.
    Json {
        /// The JSON value.
        json: serde_json::Value,
    },
    /// An error body in the server's provider shape: Anthropic's with a fresh `request_id`,
    /// or OpenAI's (`{"error":{"message","type","param","code"}}`) in OpenAI mode.
    Error {
        /// `error.type`, e.g. `rate_limit_error` (OpenAI: `requests`, `insufficient_quota`, …).
        error_type: String,
        /// `error.message`.
        #[serde(default)]
        message: String,
        /// OpenAI's `error.code` (e.g. `rate_limit_exceeded`); not written in Anthropic mode.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
    /// A `text/event-stream` body.
    Stream(StreamScript),
    /// `text` repeated `times` times (`content-type: text/plain; charset=utf-8` unless a header
    /// says else), for huge bodies that cost the mock one copy of `text`: each repetition is
    /// written as its own chunk (`chunk_size` is ignored; `chunk_delay_ms` and `ending` apply).
    Repeated {
        /// The repeated text.
        text: String,
        /// How many times.
        times: usize,
    },
}

/// How a body ends once its scripted bytes (or part of them) are written.
///
/// The *early cut* of a body: for an SSE stream, everything before a final end event
/// (`message_stop`, `data: [DONE]`, `response.completed`, see [`SseEvent::is_end`]);
/// for any other body, its first half. Byte counts are of the body payload (not counting the
/// HTTP/1.1 chunk framing) and are clamped to its length.
///
/// In a scenario file: `"complete"`, `"end_early"`, `"stall"`, `{ reset_after = 100 }`, ….
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// Write everything, then end the body cleanly.
    #[default]
    Complete,
    /// Write the early cut, then end the body cleanly (for SSE: no `message_stop`).
    EndEarly,
    /// Write the early cut, then stop sending but keep the connection open until the client goes
    /// away or the server shuts down.
    Stall,
    /// Write this many bytes, then stall.
    StallAfter(usize),
    /// Write this many bytes, then end the body cleanly (a body with `content-length` is not
    /// used in that case, so the client sees a clean chunked end).
    EndAfter(usize),
    /// Write this many bytes, wait until they are flushed to the socket, then abort the
    /// connection with a TCP reset (HTTP/1.1: no final chunk; HTTP/2: `RST_STREAM`).
    ResetAfter(usize),
    /// Write this many bytes, wait until they are flushed, then close the connection without the
    /// final chunk (the client sees EOF inside a chunked body; over TLS without `close_notify`).
    EofAfter(usize),
}

/// The script of one `text/event-stream` body.
///
/// ```
/// use keypool_mock::{Ending, SseEvent, StreamScript};
/// let s = StreamScript::new().text_deltas(10).chunk_size(7).ending(Ending::ResetAfter(100));
/// let custom = StreamScript::with_events(vec![SseEvent::error("overloaded_error", "Overloaded")]);
/// # let _ = (s, custom);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamScript {
    /// The events to send; `None` (default) sends the normal Anthropic sequence (see
    /// [`StreamScript::standard_events`]) for the request's model with `text_deltas` deltas.
    pub events: Option<Vec<SseEvent>>,
    /// Number of `content_block_delta` events of the normal sequence (default 3).
    pub text_deltas: usize,
    /// Size of each written chunk in bytes, each flushed as its own HTTP/1.1 chunk; `None`
    /// (default) writes one chunk per event.
    pub chunk_size: Option<usize>,
    /// Delay between two chunks in milliseconds (default 0).
    pub chunk_delay_ms: u64,
    /// How the stream ends (default complete).
    pub ending: Ending,
}

impl Default for StreamScript {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamScript {
    /// The normal Anthropic sequence with 3 text deltas, one chunk per event, ending complete.
    pub fn new() -> Self {
        Self {
            events: None,
            text_deltas: 3,
            chunk_size: None,
            chunk_delay_ms: 0,
            ending: Ending::Complete,
        }
    }

    /// A stream of exactly these events.
    pub fn with_events(events: Vec<SseEvent>) -> Self {
        Self {
            events: Some(events),
            ..Self::new()
        }
    }

    /// The normal sequence with an in-band `error` event after `message_start` and `ping`, before
    /// any content block (then the stream ends).
    pub fn error_before_content(error_type: &str, message: &str) -> Self {
        let all = Self::standard_events("claude-mock", 0);
        let mut events: Vec<SseEvent> = all.into_iter().take(1).collect();
        events.push(SseEvent::ping());
        events.push(SseEvent::error(error_type, message));
        Self::with_events(events)
    }

    /// The normal sequence up to and including `text_deltas` deltas, then an in-band `error`
    /// event (then the stream ends).
    pub fn error_after_content(text_deltas: usize, error_type: &str, message: &str) -> Self {
        let mut events = Self::standard_events("claude-mock", text_deltas);
        events.truncate(3 + text_deltas);
        events.push(SseEvent::error(error_type, message));
        Self::with_events(events)
    }

    /// Sets the number of text deltas of the normal sequence.
    #[must_use]
    pub fn text_deltas(mut self, n: usize) -> Self {
        self.text_deltas = n;
        self
    }

    /// Writes the body in chunks of `bytes` bytes (at least 1), each flushed separately.
    #[must_use]
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = Some(bytes);
        self
    }

    /// Waits this long between two chunks.
    #[must_use]
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay_ms = millis(delay);
        self
    }

    /// Sets how the stream ends.
    #[must_use]
    pub fn ending(mut self, ending: Ending) -> Self {
        self.ending = ending;
        self
    }

    /// The normal Anthropic event sequence: `message_start`, `content_block_start`, `ping`,
    /// `text_deltas` × `content_block_delta` (`text_delta`), `content_block_stop`,
    /// `message_delta`, `message_stop`. Use it as a base for custom sequences.
    pub fn standard_events(model: &str, text_deltas: usize) -> Vec<SseEvent> {
        crate::anthropic::standard_events("msg_mock_0", model, text_deltas)
    }
}

/// One item of an SSE body.
///
/// In a scenario file: `{ event = "ping", data = "{\"type\": \"ping\"}" }` or
/// `{ raw = "data: x\r\n\r\n" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SseEvent {
    /// `event: NAME\ndata: DATA\n\n`; a multi-line `data` becomes one `data:` line per line, an
    /// empty `event` writes no `event:` line.
    Event {
        /// The event name.
        event: String,
        /// The data (usually JSON text).
        data: String,
    },
    /// Bytes written as they are (for malformed or unusual framing: CRLF, comments, …).
    Raw {
        /// The text written verbatim.
        raw: String,
    },
    /// Arbitrary bytes written as they are, e.g. invalid UTF-8.
    RawBytes {
        /// The bytes written verbatim.
        raw_bytes: Vec<u8>,
    },
}

impl SseEvent {
    /// An event with this name and data.
    pub fn new(event: &str, data: &str) -> Self {
        Self::Event {
            event: event.to_owned(),
            data: data.to_owned(),
        }
    }

    /// Verbatim text.
    pub fn raw(text: &str) -> Self {
        Self::Raw { raw: text.to_owned() }
    }

    /// Verbatim bytes (need not be UTF-8).
    pub fn raw_bytes(bytes: &[u8]) -> Self {
        Self::RawBytes {
            raw_bytes: bytes.to_vec(),
        }
    }

    /// `event: ping` / `data: {"type": "ping"}`.
    pub fn ping() -> Self {
        Self::new("ping", r#"{"type": "ping"}"#)
    }

    /// An in-band error event:
    /// `event: error` / `data: {"type":"error","error":{"type":ERROR_TYPE,"message":MESSAGE}}`.
    pub fn error(error_type: &str, message: &str) -> Self {
        let data = serde_json::json!({"type": "error", "error": {"type": error_type, "message": message}});
        Self::new("error", &data.to_string())
    }

    /// Whether this item ends a stream cleanly: `message_stop`, `response.completed`,
    /// `response.failed`, `response.incomplete`, or an unnamed `[DONE]`.
    pub fn is_end(&self) -> bool {
        match self {
            Self::Event { event, data } => {
                matches!(
                    event.as_str(),
                    "message_stop" | "response.completed" | "response.failed" | "response.incomplete"
                ) || (event.is_empty() && data == "[DONE]")
            }
            Self::Raw { .. } | Self::RawBytes { .. } => false,
        }
    }

    /// The event name, if this is not a raw item.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Event { event, .. } => Some(event),
            Self::Raw { .. } | Self::RawBytes { .. } => None,
        }
    }

    /// The bytes written for this item.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Raw { raw } => raw.as_bytes().to_vec(),
            Self::RawBytes { raw_bytes } => raw_bytes.clone(),
            Self::Event { event, data } => {
                let mut out = String::with_capacity(event.len() + data.len() + 16);
                if !event.is_empty() {
                    out.push_str("event: ");
                    out.push_str(event);
                    out.push('\n');
                }
                for line in data.split('\n') {
                    out.push_str("data: ");
                    out.push_str(line);
                    out.push('\n');
                }
                out.push('\n');
                out.into_bytes()
            }
        }
    }
}

/// A whole scripted setup, loadable from a file: the fallback reply, the reply to requests
/// without a key, and per-key scripts. See the crate docs for the file format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Which API the server fakes (default Anthropic); see [`crate::openai`].
    pub provider: Flavor,
    /// The reply for a key with no script left and no default; `None` means [`Reply::ok`].
    pub fallback: Option<Reply>,
    /// The reply to a request with neither `x-api-key` nor `authorization: Bearer`; `None` means
    /// 401 `authentication_error` ("x-api-key header is required").
    pub missing_key: Option<Reply>,
    /// Per-key scripts, by the full key string.
    pub keys: BTreeMap<String, KeyScript>,
}

impl Scenario {
    /// An empty scenario in OpenAI mode.
    pub fn openai() -> Self {
        Self {
            provider: Flavor::OpenAi,
            ..Self::default()
        }
    }
}

/// Which API a [`MockServer`](crate::MockServer) fakes. In a scenario file:
/// `provider = "anthropic"` (default) or `provider = "openai"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// The Anthropic Messages API.
    #[default]
    Anthropic,
    /// The OpenAI API: Chat Completions, Responses, models ([`crate::openai`]).
    #[serde(rename = "openai")]
    OpenAi,
}

/// The script of one key: a queue of replies consumed one per request, then a default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyScript {
    /// Request n of the key (counting from 0 since the script was set) gets `script[n]`.
    pub script: Vec<Reply>,
    /// The reply once the script is used up; `None` means the scenario's fallback.
    pub default: Option<Reply>,
}
