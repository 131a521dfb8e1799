//! `keypool keys list|enable LABEL|disable LABEL`: the admin API for operators without curl.
//!
//! Talks to a running gateway's `/admin` routes with the admin token (sent as
//! `Authorization: Bearer`), prints a table for `list`, and one line naming the problem and the
//! fix for anything that goes wrong. Never prints the token.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Args, Subcommand};

/// Arguments of `keypool keys`.
#[derive(Clone, Args)]
pub struct KeysArgs {
    /// The gateway's base URL.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        default_value = "http://127.0.0.1:8787",
        env = "KEYPOOL_URL"
    )]
    pub url: String,

    /// The gateway's admin token (the one `keypool serve --admin-token` was given).
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "KEYPOOL_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub action: KeysAction,
}

impl std::fmt::Debug for KeysArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeysArgs")
            .field("url", &self.url)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .field("action", &self.action)
            .finish()
    }
}

/// `keypool keys` actions.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysAction {
    /// Every key of every pool: label, state, reason, time left, hint, organisation.
    List,
    /// Put a key back into service (clears a cooldown or a disable).
    Enable {
        /// The key's label (as `keypool keys list` shows it).
        label: String,
    },
    /// Take a key out of service until it is enabled again.
    Disable {
        /// The key's label (as `keypool keys list` shows it).
        label: String,
    },
}

/// Runs `keypool keys`: what to print on success, or the one-line error.
pub fn run(args: &KeysArgs) -> Result<String, String> {
    let token = args
        .admin_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or("no admin token: pass --admin-token TOKEN or set KEYPOOL_ADMIN_TOKEN (the token `keypool serve` was started with)")?;
    let base = args.url.trim().trim_end_matches('/');
    let parsed: http::Uri = base.parse().map_err(|_| {
        format!("invalid --url {base:?}: use the gateway's base URL, e.g. http://127.0.0.1:8787")
    })?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
        return Err(format!(
            "invalid --url {base:?}: it must start with http:// or https:// and name a host, e.g. http://127.0.0.1:8787"
        ));
    }
    match &args.action {
        KeysAction::List => {
            let body = request(base, token, "GET", "/admin/status")?;
            let status: serde_json::Value = serde_json::from_str(&body)
                .map_err(|_| format!("{base} answered /admin/status with something that is not keypool's JSON; is --url a keypool gateway?"))?;
            Ok(table(&status))
        }
        KeysAction::Enable { label } | KeysAction::Disable { label } => {
            let action = if matches!(args.action, KeysAction::Enable { .. }) {
                "enable"
            } else {
                "disable"
            };
            if label.is_empty()
                || !label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(format!(
                    "{label:?} is not a key label (letters, digits, '.', '_', '-'); `keypool keys list` shows the labels"
                ));
            }
            let body = request(base, token, "POST", &format!("/admin/keys/{label}/{action}"))?;
            let changed = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["changed"].as_bool())
                .unwrap_or(false);
            Ok(if changed {
                format!("{label}: {action}d\n")
            } else {
                format!("{label}: already {action}d (nothing changed)\n")
            })
        }
    }
}

/// One admin request; the body of a 2xx answer, else the one-line error.
fn request(base: &str, token: &str, method: &str, path: &str) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(15)))
        .max_redirects(0)
        .build()
        .into();
    let url = format!("{base}{path}");
    let auth = format!("Bearer {token}");
    let result = match method {
        "POST" => agent.post(&url).header("authorization", &auth).send_empty(),
        _ => agent.get(&url).header("authorization", &auth).call(),
    };
    let mut res = result.map_err(|e| unreachable(base, &e))?;
    let status = res.status().as_u16();
    let body = res
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("reading the answer of {base} failed: {e}"))?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Err(match status {
        401 => format!(
            "the gateway at {base} refused the admin token (401): pass the token `keypool serve` was started with (--admin-token or KEYPOOL_ADMIN_TOKEN)"
        ),
        404 if message.contains("admin routes are off") => format!(
            "the admin routes of the gateway at {base} are off: start `keypool serve` with --admin-token (or KEYPOOL_ADMIN_TOKEN)"
        ),
        404 if message.starts_with("no key labelled") => {
            format!("{message}; `keypool keys list` shows the labels")
        }
        _ if message.is_empty() => {
            format!("the gateway at {base} answered {status} to {method} {path}; is --url a keypool gateway?")
        }
        _ => format!("the gateway at {base} answered {status}: {message}"),
    })
}

fn unreachable(base: &str, e: &ureq::Error) -> String {
    let why = match e {
        ureq::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
            std::io::ErrorKind::TimedOut => "timed out".to_owned(),
            _ => io.to_string(),
        },
        ureq::Error::HostNotFound => "host not found".to_owned(),
        ureq::Error::Timeout(_) => "timed out".to_owned(),
        other => other.to_string(),
    };
    format!(
        "cannot reach the gateway at {base} ({why}); is `keypool serve` running there? (--url or KEYPOOL_URL)"
    )
}

/// `list`'s table: one line per key, the columns as wide as their widest cell.
fn table(status: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
    let headers = [
        "POOL",
        "LABEL",
        "STATE",
        "REASON",
        "TIME LEFT",
        "HINT",
        "ORGANISATION",
    ];
    let mut rows: Vec<[String; 7]> = Vec::new();
    for pool in status["pools"].as_array().into_iter().flatten() {
        for k in pool["keys"].as_array().into_iter().flatten() {
            let left = k["seconds_left"]
                .as_f64()
                .map(|s| keypool_core::profile::human_duration(Duration::from_secs_f64(s.max(0.001))))
                .unwrap_or_else(|| "-".into());
            rows.push([
                text(&pool["name"]),
                text(&k["label"]),
                text(&k["state"]),
                match (k["reason"].as_str(), k["cooling_scope"].as_str()) {
                    (Some(r), Some("model_family")) => format!("{r} (model family)"),
                    (Some(r), _) => r.to_owned(),
                    (None, _) => "-".to_owned(),
                },
                left,
                text(&k["hint"]),
                k["organisation"].as_str().unwrap_or("-").to_owned(),
            ]);
        }
    }
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&headers);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(no keys)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lines_up() {
        let status = serde_json::json!({"pools": [{"name": "anthropic", "keys": [
            {"label": "alpha", "state": "available", "reason": null, "seconds_left": null, "hint": "sk-a...aaaa", "organisation": null},
            {"label": "key-0a1b2c", "state": "cooling", "reason": "rate_limited", "seconds_left": 29.5, "hint": "sk-a...bbbb", "organisation": "org-1"},
        ]}]});
        let t = table(&status);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[0].starts_with("POOL       LABEL       STATE      REASON"),
            "{t}"
        );
        assert!(lines[2].contains("cooling    rate_limited  30s"), "{t}");
        let state_col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][state_col..state_col + 9], "available");
    }
}
