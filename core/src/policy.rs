//! The operator's knobs of the classification table ([`Policy`]), the [`Verdict`] it produces,
//! and retry-delay parsing (SPEC §4). The table itself belongs to the provider profile
//! ([`crate::profile`]); [`Policy::classify`] is the Anthropic one.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use crate::pool::{CoolReason, DisableReason};
use crate::profile::Provider;
use crate::profile::anthropic::Anthropic;

/// Classification reads at most this much of an error body.
pub const MAX_CLASSIFY_BODY: usize = 64 * 1024;

/// The shortest cooldown a verdict ever carries, whatever the retry value or configuration.
const MIN_COOLDOWN: Duration = Duration::from_millis(1);

/// What to do with one upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Not the key's fault (or a success): hand the answer to the caller as it is.
    Deliver,
    /// The key must rest for `duration`; try the next key.
    CoolDown {
        /// How long the key rests.
        duration: Duration,
        /// Why.
        reason: CoolReason,
    },
    /// The key is unusable until an operator enables it; try the next key.
    Disable {
        /// Why.
        reason: DisableReason,
    },
}

impl Verdict {
    /// Whether this verdict moves the call on to the next key.
    pub fn is_failover(&self) -> bool {
        !matches!(self, Self::Deliver)
    }
}

/// What a 401 does to the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnauthorized {
    /// Disable the key (default).
    Disable,
    /// Cool the key for this long (for setups where 401s are transient).
    CoolFor(Duration),
}

/// What a 403 does to the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnForbidden {
    /// Disable the key (default).
    Disable,
    /// Deliver the 403 to the caller, as a request problem, without touching the key.
    Deliver,
}

/// The configurable rows of SPEC §4. `Policy::default()` is the documented default table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Policy {
    /// What a 401 does (default: disable).
    pub on_unauthorized: OnUnauthorized,
    /// What a 403 does (default: disable).
    pub on_forbidden: OnForbidden,
    /// Whether a 402 and the credit-balance 400 disable the key (default: yes).
    pub disable_on_billing: bool,
    /// If set, a 529 `overloaded_error` cools the key for this long and fails over instead of
    /// being delivered (default: unset, 529 is delivered).
    pub cool_on_overloaded: Option<Duration>,
    /// Cooldown of a 429 without a usable retry value (default 60 s).
    pub default_cooldown: Duration,
    /// Upper bound on any cooldown from a retry value (default 1 hour).
    pub max_cooldown: Duration,
    /// The operator's own rows (SPEC §11.6), tried before the provider's table: the first rule
    /// whose status, error type and code match decides. Empty by default.
    pub rules: Vec<Rule>,
    /// Whether successful answers' rate-limit headers make exhausted keys less preferred
    /// (SPEC §11.4; default: yes).
    pub hints: bool,
}

/// One row of an operator's classification table (SPEC §11.6): for answers with this status
/// (and, when given, this error type and code), do this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The HTTP status (100–599).
    pub status: u16,
    /// The error type the body must carry (Anthropic `error.type`, OpenAI `error.type`).
    pub error_type: Option<String>,
    /// The error code the body must carry (Anthropic `error.details.error_code`, OpenAI
    /// `error.code`).
    pub code: Option<String>,
    /// What to do.
    pub action: Action,
}

/// What a [`Rule`] does with a matching answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Cool the key for the answer's retry delay (the provider's sources, else the default
    /// cooldown); fail over.
    CoolRetryDelay,
    /// Cool the key for this long; fail over.
    CoolFor(Duration),
    /// Disable the key; fail over.
    Disable(DisableReason),
    /// Hand the answer to the caller as it is.
    Deliver,
}

/// Why a policy is not valid. Each names the rule (1-based) and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A rule's status is not an HTTP status.
    #[error("rule #{rule}: status {status} is not an HTTP status (use 100-599)")]
    Status {
        /// 1-based rule number.
        rule: usize,
        /// The status given.
        status: u16,
    },
    /// A rule cools for no time.
    #[error("rule #{rule}: a cooldown must be longer than 0 (or use the retry delay)")]
    ZeroCooldown {
        /// 1-based rule number.
        rule: usize,
    },
    /// A rule can never match because an earlier one catches every answer it would.
    #[error("rule #{rule} never applies: rule #{earlier} matches every answer it would")]
    Shadowed {
        /// 1-based rule number.
        rule: usize,
        /// The earlier rule.
        earlier: usize,
    },
    /// A success status is given an action other than delivering it.
    #[error("rule #{rule}: a {status} is a success; only `deliver` makes sense for it")]
    Success {
        /// 1-based rule number.
        rule: usize,
        /// The status given.
        status: u16,
    },
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            on_unauthorized: OnUnauthorized::Disable,
            on_forbidden: OnForbidden::Disable,
            disable_on_billing: true,
            cool_on_overloaded: None,
            default_cooldown: Duration::from_secs(60),
            max_cooldown: Duration::from_secs(3600),
            rules: Vec::new(),
            hints: true,
        }
    }
}

impl Policy {
    /// Whether classifying `status` with the Anthropic table needs the (first 64 KiB of the)
    /// error body. When `false`, [`classify`](Self::classify) ignores its `body` argument.
    ///
    /// A call asks its profile instead: [`Provider::needs_body`].
    pub fn needs_body(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        self.needs_body_with(&Anthropic, status, headers)
    }

    /// [`needs_body`](Self::needs_body) with `provider`'s table: the provider needs the body, or
    /// a rule for `status` names an error type or code.
    pub fn needs_body_with(&self, provider: &dyn Provider, status: StatusCode, headers: &HeaderMap) -> bool {
        provider.needs_body(self, status, headers)
            || self
                .rules
                .iter()
                .any(|r| r.status == status.as_u16() && (r.error_type.is_some() || r.code.is_some()))
    }

    /// Classifies an answer: the first matching [rule](Self::rules), else `provider`'s table.
    pub fn classify_with(
        &self,
        provider: &dyn Provider,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        wall: SystemTime,
    ) -> Verdict {
        if let Some(action) = self.rule_for(provider, status, body) {
            return match action {
                Action::Deliver => Verdict::Deliver,
                Action::Disable(reason) => Verdict::Disable { reason },
                Action::CoolFor(d) => Verdict::CoolDown {
                    duration: self.bound(d),
                    reason: cool_reason_for(status),
                },
                Action::CoolRetryDelay => Verdict::CoolDown {
                    duration: provider.retry_delay(self, headers, body, wall),
                    reason: cool_reason_for(status),
                },
            };
        }
        provider.classify(self, status, headers, body, wall)
    }

    /// The action of the first rule that matches, if any. The body is read only when a rule for
    /// this status names an error type or code.
    fn rule_for(&self, provider: &dyn Provider, status: StatusCode, body: &[u8]) -> Option<Action> {
        let mut for_status = self
            .rules
            .iter()
            .filter(|r| r.status == status.as_u16())
            .peekable();
        for_status.peek()?;
        let mut parsed: Option<(Option<String>, Option<String>)> = None;
        for rule in for_status {
            if rule.error_type.is_none() && rule.code.is_none() {
                return Some(rule.action);
            }
            let (kind, code) = parsed.get_or_insert_with(|| provider.error_code(body));
            let matches = |want: &Option<String>, got: &Option<String>| want.is_none() || want == got;
            if matches(&rule.error_type, kind) && matches(&rule.code, code) {
                return Some(rule.action);
            }
        }
        None
    }

    /// Checks the rules: statuses are HTTP statuses, cooldowns are not zero, no rule is hidden
    /// by an earlier one, a success is only ever delivered.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (i, rule) in self.rules.iter().enumerate() {
            let n = i + 1;
            if !(100..=599).contains(&rule.status) {
                return Err(PolicyError::Status {
                    rule: n,
                    status: rule.status,
                });
            }
            if (200..300).contains(&rule.status) && rule.action != Action::Deliver {
                return Err(PolicyError::Success {
                    rule: n,
                    status: rule.status,
                });
            }
            if rule.action == Action::CoolFor(Duration::ZERO) {
                return Err(PolicyError::ZeroCooldown { rule: n });
            }
            let covers = |wide: &Option<String>, narrow: &Option<String>| wide.is_none() || wide == narrow;
            if let Some(earlier) = self.rules[..i].iter().position(|e| {
                e.status == rule.status
                    && covers(&e.error_type, &rule.error_type)
                    && covers(&e.code, &rule.code)
            }) {
                return Err(PolicyError::Shadowed {
                    rule: n,
                    earlier: earlier + 1,
                });
            }
        }
        Ok(())
    }

    /// Classifies one upstream answer with the Anthropic table (SPEC §4), the default profile's.
    ///
    /// `body` is a prefix of the error body (only looked at when [`needs_body`](Self::needs_body);
    /// at most [`MAX_CLASSIFY_BODY`] bytes of it are read), `wall_now` the wall-clock time, used
    /// only for an HTTP-date `retry-after` when the response has no `date` header. A call asks
    /// its profile instead: [`Provider::classify`].
    pub fn classify(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        wall_now: SystemTime,
    ) -> Verdict {
        self.classify_with(&Anthropic, status, headers, body, wall_now)
    }

    /// The cooldown a 429 asks for (SPEC §4), first match wins:
    /// `retry-after-ms`, `retry-after` in seconds, `retry-after` as an HTTP-date (against the
    /// response `date`, else `wall_now`), else [`default_cooldown`](Self::default_cooldown);
    /// capped at [`max_cooldown`](Self::max_cooldown). Never zero, never panics.
    pub fn retry_delay(&self, headers: &HeaderMap, wall_now: SystemTime) -> Duration {
        self.bound(retry_after(headers, wall_now).unwrap_or(self.default_cooldown))
    }

    /// Caps a cooldown at [`max_cooldown`](Self::max_cooldown), then floors it at 1 ms, so no
    /// configuration can produce a zero cooldown. Not `Duration::clamp`: that panics when a
    /// `max_cooldown` below 1 ms is configured. Profiles bound every cooldown they return.
    pub fn bound(&self, d: Duration) -> Duration {
        d.min(self.max_cooldown).max(MIN_COOLDOWN)
    }
}

/// The delay the standard retry headers ask for, unbounded, first match wins: `retry-after-ms`
/// (milliseconds, decimal allowed), `retry-after` in seconds (decimal allowed), `retry-after` as
/// an HTTP-date (against the response `date`, else `wall_now`). `None` when none is usable
/// (absent, garbage, zero, negative, in the past). Profiles start their retry delays here.
pub fn retry_after(headers: &HeaderMap, wall_now: SystemTime) -> Option<Duration> {
    header_str(headers, "retry-after-ms")
        .and_then(|v| parse_decimal(v, 1_000_000))
        .or_else(|| {
            let v = header_str(headers, "retry-after")?;
            parse_decimal(v, 1_000_000_000).or_else(|| {
                let at = httpdate::parse_http_date(v).ok()?;
                let base = header_str(headers, "date")
                    .and_then(|d| httpdate::parse_http_date(d).ok())
                    .unwrap_or(wall_now);
                at.duration_since(base).ok().filter(|d| !d.is_zero())
            })
        })
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// Parses a strictly positive decimal (`30`, `2.5`, `0.25`) given `unit_ns` nanoseconds per
/// unit. Signs, exponents, `inf`, empty parts and zero are rejected; huge values saturate.
pub(crate) fn parse_decimal(s: &str, unit_ns: u64) -> Option<Duration> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u64 = 0;
    for b in int.bytes() {
        nanos = nanos.saturating_mul(10).saturating_add(u64::from(b - b'0'));
    }
    nanos = nanos.saturating_mul(unit_ns);
    if let Some(frac) = frac {
        if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Fractional digits beyond a nanosecond are dropped.
        let mut scale = unit_ns;
        for b in frac.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos = nanos.saturating_add(u64::from(b - b'0') * scale);
        }
    }
    (nanos > 0).then(|| Duration::from_nanos(nanos))
}

/// Why a rule's cooldown rests the key, from the status it matched.
fn cool_reason_for(status: StatusCode) -> CoolReason {
    match status.as_u16() {
        401 | 403 => CoolReason::Auth,
        500..=599 => CoolReason::Overloaded,
        _ => CoolReason::RateLimited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        let s = |v| parse_decimal(v, 1_000_000_000);
        assert_eq!(s("30"), Some(Duration::from_secs(30)));
        assert_eq!(s("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(s("0.000000001"), Some(Duration::from_nanos(1)));
        assert_eq!(s("0.0000000001"), None);
        for bad in [
            "", "0", "0.0", "-5", "+5", "1e3", "inf", "NaN", ".5", "5.", "1.2.3", " 5", "٣",
        ] {
            assert_eq!(s(bad), None, "{bad:?}");
        }
        assert!(s("99999999999999999999999").is_some());
        assert_eq!(
            parse_decimal("1500", 1_000_000),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_decimal("0.5", 1_000_000), Some(Duration::from_micros(500)));
    }
}
