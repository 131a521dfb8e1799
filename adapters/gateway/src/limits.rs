//! What the pool knows about limits (SPEC §11), as the gateway shows it to operators: each
//! key's organisation and workspace, its model-family cooldowns, a spend cap with its deadline,
//! soft hints and the next probe (the admin view), and the notice that every key of a pool
//! belongs to one organisation (logged once per pool, in the admin view and as
//! `keypool_pool_single_organisation`).
//!
//! Organisation and workspace ids are not secrets, but they identify the pool's owner: they
//! appear in the admin view and the log only, never in an answer to a client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use keypool_core::{CoolReason, KeyId, KeyState, Pool};

/// The organisation every key of `pool` belongs to, when the pool has more than one key and
/// their organisations are all known and the same (with one key there is nothing to fail over
/// to anyway).
pub(crate) fn single_organisation(pool: &Pool) -> Option<&str> {
    if pool.len() < 2 {
        return None;
    }
    pool.single_organisation()
}

/// Says once per pool that its keys all belong to one organisation.
#[derive(Debug, Default)]
pub(crate) struct SingleOrganisation {
    said: AtomicBool,
}

impl SingleOrganisation {
    /// Looks at `pool` after an answer (which may have taught it a key's organisation) and logs
    /// the notice the first time every key turns out to share one. Cheap: one load once said.
    pub(crate) fn check(&self, pool_name: &str, pool: &Pool) {
        if self.said.load(Ordering::Relaxed) {
            return;
        }
        if let Some(organisation) = single_organisation(pool)
            && !self.said.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                target: "keypool::pool", pool = %pool_name, organisation, keys = pool.len(),
                "every key of this pool belongs to one organisation: they share its rate limits, \
                 so failing over on a 429 buys little; keys of other organisations add capacity"
            );
        }
    }
}

/// The state name of a key in the admin view: `available`, `cooling`, `spend_capped` or
/// `disabled`.
pub(crate) fn state_name(state: &KeyState) -> &'static str {
    match state {
        KeyState::Available => "available",
        KeyState::Cooling {
            reason: CoolReason::SpendCapped,
            ..
        } => "spend_capped",
        KeyState::Cooling { .. } => "cooling",
        KeyState::Disabled { .. } => "disabled",
    }
}

/// What the admin view adds to a key (SPEC §11): organisation, workspace, the deadline of a
/// cooldown or spend cap, model-family cooldowns, whether a soft hint is on, the next probe.
pub(crate) fn key_view(
    pool: &Pool,
    id: KeyId,
    next_probe: Option<Instant>,
    now: Instant,
    wall: SystemTime,
) -> serde_json::Map<String, serde_json::Value> {
    let at = |t: Instant| wall.checked_add(t.saturating_duration_since(now)).unwrap_or(wall);
    let scope = pool.scope(id);
    let until = match pool.state(id, now) {
        KeyState::Cooling { until, .. } => Some(rfc3339(at(until))),
        _ => None,
    };
    let families: Vec<serde_json::Value> = pool
        .family_cooldowns(id, now)
        .into_iter()
        .map(|(family, until, reason)| {
            serde_json::json!({
                "family": format!("{:016x}", family.raw()),
                "until": rfc3339(at(until)),
                "seconds_left": until.saturating_duration_since(now).as_secs_f64(),
                "reason": reason.as_str(),
            })
        })
        .collect();
    let mut view = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        view.insert(k.to_owned(), v);
    };
    put("organisation", scope.map(|s| &*s.organisation).into());
    put("workspace", scope.and_then(|s| s.workspace.as_deref()).into());
    put("until", until.into());
    put("family_cooldowns", families.into());
    put("hinted", (!pool.hints(id, now).is_empty()).into());
    put("next_probe", next_probe.map(|t| rfc3339(at(t))).into());
    put(
        "next_probe_seconds",
        next_probe
            .map(|t| t.saturating_duration_since(now).as_secs_f64())
            .into(),
    );
    view
}

/// `2025-08-01T00:00:00Z` (UTC, whole seconds).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    keypool_core::civil::format_rfc3339(t)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn dates_are_rfc3339_utc() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_754_006_400), "2025-08-01T00:00:00Z");
        assert_eq!(at(1_767_225_599), "2025-12-31T23:59:59Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00Z");
    }
}
