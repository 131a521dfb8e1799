//! Anthropic-shaped bodies: messages, event sequences, errors, model lists.

use serde_json::json;

use crate::script::SseEvent;

/// Words the mock "generates", cycled through the text deltas.
const WORDS: [&str; 8] = [
    "Hello",
    " from",
    " the",
    " keypool",
    " mock",
    " upstream",
    ",",
    " friend.",
];

/// The text of delta `i`.
pub(crate) fn delta_text(i: usize) -> &'static str {
    WORDS[i % WORDS.len()]
}

/// The full text of a non-streamed answer.
pub(crate) fn message_text() -> String {
    WORDS.concat()
}

pub(crate) fn message(id: &str, model: &str) -> serde_json::Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": message_text()}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 12, "output_tokens": WORDS.len()},
    })
}

pub(crate) fn standard_events(id: &str, model: &str, text_deltas: usize) -> Vec<SseEvent> {
    let mut ev = Vec::with_capacity(text_deltas + 6);
    let start = json!({
        "type": "message_start",
        "message": {
            "id": id, "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 1},
        },
    });
    ev.push(SseEvent::new("message_start", &start.to_string()));
    let cbs =
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
    ev.push(SseEvent::new("content_block_start", &cbs.to_string()));
    ev.push(SseEvent::ping());
    for i in 0..text_deltas {
        let d = json!({
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": delta_text(i)},
        });
        ev.push(SseEvent::new("content_block_delta", &d.to_string()));
    }
    ev.push(SseEvent::new(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ));
    let md = json!({
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": text_deltas.max(1)},
    });
    ev.push(SseEvent::new("message_delta", &md.to_string()));
    ev.push(SseEvent::new("message_stop", r#"{"type":"message_stop"}"#));
    ev
}

/// `{"type":"error","error":{"type","message"[,"details":{"error_code"}]},"request_id"}`.
pub(crate) fn error_body(
    error_type: &str,
    error_code: Option<&str>,
    message: &str,
    request_id: &str,
) -> serde_json::Value {
    let mut error = json!({"type": error_type, "message": message});
    if let Some(code) = error_code {
        error["details"] = json!({"error_code": code});
    }
    json!({
        "type": "error",
        "error": error,
        "request_id": request_id,
    })
}

/// A default message for an error type, used when a script gives none.
pub(crate) fn default_error_message(error_type: &str) -> &'static str {
    match error_type {
        "rate_limit_error" => "Rate limited",
        "authentication_error" => "invalid x-api-key",
        "permission_error" => "Permission denied",
        "billing_error" => "Billing error",
        "not_found_error" => "Not found",
        "overloaded_error" => "Overloaded",
        "api_error" => "Internal server error",
        _ => "Invalid request",
    }
}

/// The model list; its first `limit` models when a limit is given (the probe keypool sends for a
/// disabled key is `GET /v1/models?limit=1`).
pub(crate) fn models(limit: Option<usize>) -> serde_json::Value {
    let model = |(id, name): &(&str, &str)| json!({"type": "model", "id": id, "display_name": name, "created_at": "2025-01-01T00:00:00Z"});
    let all = [
        ("claude-mock-1", "Claude Mock 1"),
        ("claude-mock-fast", "Claude Mock Fast"),
    ];
    let n = limit.unwrap_or(all.len()).clamp(1, all.len());
    let shown = &all[..n];
    json!({
        "data": shown.iter().map(model).collect::<Vec<_>>(),
        "has_more": n < all.len(),
        "first_id": shown.first().map(|m| m.0),
        "last_id": shown.last().map(|m| m.0),
    })
}

pub(crate) fn count_tokens(request_body: &[u8]) -> serde_json::Value {
    json!({"input_tokens": (request_body.len() / 4).max(1)})
}
