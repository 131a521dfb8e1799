//! OpenAI mode: the bodies of the fake OpenAI API (Chat Completions, the Responses API, the
//! model list, errors) and ready-made replies for every OpenAI failure keypool classifies.
//!
//! A server in OpenAI mode ([`MockServer::start_openai`](crate::MockServer::start_openai), or
//! `provider = "openai"` in a scenario file) serves `POST …/chat/completions`,
//! `POST …/responses` and `GET …/models` (any path prefix, so Azure-style and `/openai/v1`
//! paths work too), reads the key from `authorization: Bearer` or `api-key`, writes OpenAI's
//! error shape (`{"error":{"message","type","param","code"}}`) for [`Body::Error`], and sends
//! `x-request-id` and the `x-ratelimit-*` headers (never an exhausted one unless scripted). It
//! sends no `openai-organization` unless a reply adds it ([`Reply::header`]): a known
//! organisation makes keypool cool every key of it.
//!
//! ```
//! use keypool_mock::{MockServer, openai};
//!
//! let mock = MockServer::start_openai();
//! mock.script("sk-a", [openai::rate_limited_reset("tokens", "6m0s"), openai::insufficient_quota()]);
//! mock.script("sk-b", [keypool_mock::Reply::stream(openai::stream().ending(keypool_mock::Ending::ResetAfter(200)))]);
//! ```

use serde_json::json;

use crate::anthropic::{delta_text, message_text};
use crate::script::{Body, Reply, RetryAfter, SseEvent, StreamScript};

/// The message of a 429 `rate_limit_exceeded` (without a "try again" part).
pub const RATE_LIMIT_MESSAGE: &str = "Rate limit reached for gpt-mock-1 in organization org-mock on requests per min (RPM): Limit 3, Used 3, Requested 1.";

/// The message of a 429 "Request too large".
pub const REQUEST_TOO_LARGE_MESSAGE: &str = "Request too large for gpt-mock-1 in organization org-mock on tokens per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced in order to run successfully.";

/// The message of a 429 `insufficient_quota`.
pub const INSUFFICIENT_QUOTA_MESSAGE: &str =
    "You exceeded your current quota, please check your plan and billing details.";

/// The creation time of every mock object (2023-11-14).
const CREATED: u64 = 1_700_000_000;

/// An OpenAI-shaped error reply: `status` with
/// `{"error":{"message":message,"type":kind,"param":null,"code":code}}`.
pub fn error(status: u16, kind: &str, code: Option<&str>, message: &str) -> Reply {
    Reply::status(status).body(Body::Error {
        error_type: kind.to_owned(),
        message: message.to_owned(),
        code: code.map(str::to_owned),
    })
}

/// 429 `rate_limit_exceeded` with no delay of its own (the key cools for the default
/// cooldown); add one with [`Reply::retry_after`] or [`Reply::header`], or use the other
/// `rate_limited_*` constructors.
pub fn rate_limited() -> Reply {
    error(429, "requests", Some("rate_limit_exceeded"), RATE_LIMIT_MESSAGE)
}

/// 429 `rate_limit_exceeded` whose delay is the reset of an exhausted dimension:
/// `x-ratelimit-remaining-{dimension}: 0` and `x-ratelimit-reset-{dimension}: reset` (a Go
/// duration such as `6m0s`). `dimension` is `requests` or `tokens`.
pub fn rate_limited_reset(dimension: &str, reset: &str) -> Reply {
    rate_limited()
        .header(&format!("x-ratelimit-remaining-{dimension}"), "0")
        .header(&format!("x-ratelimit-reset-{dimension}"), reset)
}

/// 429 `rate_limit_exceeded` whose message says how long to wait: `Please try again in
/// {delay}.` (`delay` such as `10.666s` or `20ms`).
pub fn rate_limited_message(delay: &str) -> Reply {
    let message = format!("{RATE_LIMIT_MESSAGE} Please try again in {delay}.");
    error(429, "requests", Some("rate_limit_exceeded"), &message)
}

/// 429 `rate_limit_exceeded` with `retry-after` / `retry-after-ms` as given.
pub fn rate_limited_after(retry_after: RetryAfter) -> Reply {
    rate_limited().retry_after(retry_after)
}

/// 429 "Request too large" (tokens per minute): the request is over the limit by itself;
/// `x-ratelimit-remaining-tokens` is well above 0.
pub fn request_too_large() -> Reply {
    error(
        429,
        "tokens",
        Some("rate_limit_exceeded"),
        REQUEST_TOO_LARGE_MESSAGE,
    )
    .header("x-ratelimit-remaining-tokens", "29000")
}

/// 429 `insufficient_quota`: the organisation is out of credit.
pub fn insufficient_quota() -> Reply {
    error(
        429,
        "insufficient_quota",
        Some("insufficient_quota"),
        INSUFFICIENT_QUOTA_MESSAGE,
    )
}

/// 429 `insufficient_quota` with another billing code (`credit_balance_exhausted`,
/// `project_spend_limit_exceeded`, `organization_usage_limit_exceeded`, …).
pub fn billing(code: &str) -> Reply {
    error(429, "insufficient_quota", Some(code), INSUFFICIENT_QUOTA_MESSAGE)
}

/// 401 `invalid_api_key`.
pub fn invalid_api_key() -> Reply {
    error(
        401,
        "invalid_request_error",
        Some("invalid_api_key"),
        "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
    )
}

/// 401 "Missing scopes: `scope`": a restricted key that lacks this endpoint's scope.
pub fn missing_scopes(scope: &str) -> Reply {
    let message = format!(
        "You have insufficient permissions for this operation. Missing scopes: {scope}. Check that you have the correct role in your organization (Reader, Writer, Owner) and project (Member, Owner), and if you're using a restricted API key, that it has the necessary scopes."
    );
    error(401, "invalid_request_error", None, &message)
}

/// 403 `unsupported_country_region_territory`.
pub fn forbidden() -> Reply {
    error(
        403,
        "request_forbidden",
        Some("unsupported_country_region_territory"),
        "Country, region, or territory not supported",
    )
}

/// 500 `server_error`.
pub fn server_error() -> Reply {
    error(
        500,
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    )
}

/// 503 "The engine is currently overloaded".
pub fn overloaded() -> Reply {
    error(
        503,
        "server_error",
        Some("server_is_overloaded"),
        "The engine is currently overloaded, please try again later.",
    )
}

/// A stream script with the endpoint's normal events (Chat Completions chunks or Responses
/// API events, by the request path): set its ending, chunking and delays.
pub fn stream() -> StreamScript {
    StreamScript::new()
}

/// The normal Chat Completions chunks: the role chunk, `text_deltas` content chunks, the
/// finish chunk, then `data: [DONE]`.
pub fn chat_events(model: &str, text_deltas: usize) -> Vec<SseEvent> {
    chat_chunks("chatcmpl-mock-0", model, text_deltas)
}

/// The normal Responses API events: `response.created`, `response.in_progress`,
/// `response.output_item.added`, `response.content_part.added`, `text_deltas` ×
/// `response.output_text.delta`, the `.done` events and `response.completed`.
pub fn responses_events(model: &str, text_deltas: usize) -> Vec<SseEvent> {
    response_events("resp_mock_0", model, text_deltas)
}

/// An in-band Chat Completions error chunk: `data: {"error":{…}}` (no event name).
pub fn chat_error_event(kind: &str, code: Option<&str>, message: &str) -> SseEvent {
    SseEvent::new("", &error_body(kind, code, message).to_string())
}

/// An in-band Responses API error: `event: error` /
/// `data: {"type":"error","code":code,"message":message,"param":null,"sequence_number":n}`.
pub fn responses_error_event(code: &str, message: &str, sequence_number: u64) -> SseEvent {
    let data = json!({"type": "error", "code": code, "message": message, "param": null, "sequence_number": sequence_number});
    SseEvent::new("error", &data.to_string())
}

/// Chat Completions: the role chunk, then an in-band error chunk (then the stream ends).
pub fn chat_error_before_content(kind: &str, code: Option<&str>, message: &str) -> StreamScript {
    let mut events = chat_events("gpt-mock-1", 0);
    events.truncate(1);
    events.push(chat_error_event(kind, code, message));
    StreamScript::with_events(events)
}

/// Responses API: `response.created`, `response.in_progress`, then an in-band `error` event
/// (then the stream ends).
pub fn responses_error_before_content(code: &str, message: &str) -> StreamScript {
    let mut events = responses_events("gpt-mock-1", 0);
    events.truncate(2);
    events.push(responses_error_event(code, message, 2));
    StreamScript::with_events(events)
}

pub(crate) fn error_body(kind: &str, code: Option<&str>, message: &str) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// A default message for an error type, used when a script gives none.
pub(crate) fn default_error_message(kind: &str) -> &'static str {
    match kind {
        "requests" | "tokens" | "rate_limit_exceeded" => RATE_LIMIT_MESSAGE,
        "insufficient_quota" => INSUFFICIENT_QUOTA_MESSAGE,
        "server_error" => "The server had an error while processing your request.",
        _ => "Invalid request",
    }
}

pub(crate) fn not_found(method: &http::Method, path: &str) -> Reply {
    error(
        404,
        "invalid_request_error",
        Some("unknown_url"),
        &format!("Invalid URL ({method} {path})"),
    )
}

pub(crate) fn missing_key() -> Reply {
    error(
        401,
        "invalid_request_error",
        None,
        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
    )
}

pub(crate) fn chat_completion(id: &str, model: &str) -> serde_json::Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": message_text(), "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    })
}

pub(crate) fn chat_chunks(id: &str, model: &str, text_deltas: usize) -> Vec<SseEvent> {
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        let c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        SseEvent::new("", &c.to_string())
    };
    let mut events = Vec::with_capacity(text_deltas + 3);
    events.push(chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    ));
    for i in 0..text_deltas {
        events.push(chunk(json!({"content": delta_text(i)}), None));
    }
    events.push(chunk(json!({}), Some("stop")));
    events.push(SseEvent::new("", "[DONE]"));
    events
}

fn response_object(id: &str, model: &str, status: &str, output: serde_json::Value) -> serde_json::Value {
    json!({
        "id": id,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "tool_choice": "auto",
        "tools": [],
        "usage": if status == "completed" {
            json!({"input_tokens": 12, "output_tokens": 8, "total_tokens": 20})
        } else {
            serde_json::Value::Null
        },
    })
}

fn output_message(id: &str, status: &str, text: Option<&str>) -> serde_json::Value {
    let content = match text {
        Some(t) => json!([{"type": "output_text", "text": t, "annotations": []}]),
        None => json!([]),
    };
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

pub(crate) fn response(id: &str, model: &str) -> serde_json::Value {
    let item = output_message(&format!("msg_{id}"), "completed", Some(&message_text()));
    response_object(id, model, "completed", json!([item]))
}

pub(crate) fn response_events(id: &str, model: &str, text_deltas: usize) -> Vec<SseEvent> {
    let item_id = format!("msg_{id}");
    let text: String = (0..text_deltas).map(delta_text).collect();
    let mut seq = 0u64;
    let mut events = Vec::with_capacity(text_deltas + 8);
    let mut push = |name: &str, mut data: serde_json::Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(seq);
        seq += 1;
        events.push(SseEvent::new(name, &data.to_string()));
    };
    let in_progress = response_object(id, model, "in_progress", json!([]));
    push("response.created", json!({"response": in_progress}));
    push("response.in_progress", json!({"response": in_progress}));
    push(
        "response.output_item.added",
        json!({"output_index": 0, "item": output_message(&item_id, "in_progress", None)}),
    );
    let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
    push(
        "response.content_part.added",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part("")}),
    );
    for i in 0..text_deltas {
        push(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta_text(i)}),
        );
    }
    push(
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
    );
    push(
        "response.content_part.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part(&text)}),
    );
    let done = output_message(&item_id, "completed", Some(&text));
    push(
        "response.output_item.done",
        json!({"output_index": 0, "item": done.clone()}),
    );
    push(
        "response.completed",
        json!({"response": response_object(id, model, "completed", json!([done]))}),
    );
    events
}

pub(crate) fn models() -> serde_json::Value {
    let model =
        |id: &str| json!({"id": id, "object": "model", "created": CREATED, "owned_by": "keypool-mock"});
    json!({"object": "list", "data": [model("gpt-mock-1"), model("gpt-mock-mini")]})
}
