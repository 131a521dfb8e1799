//! What a key's shared state looks like in Redis, and how two states merge.
//!
//! One hash per namespace, `{ns}:keys`: field = the key's [`Fingerprint`] (32 lowercase hex
//! digits), value = its state at the highest generation seen:
//!
//! | value                               | state                                          |
//! |-------------------------------------|------------------------------------------------|
//! | `v1:{gen}:available`                | available (what an enable at `gen` leaves)     |
//! | `v1:{gen}:cooling:{until_ms}:{why}` | cooling until `until_ms` (Unix milliseconds)   |
//! | `v1:{gen}:disabled:{why}`           | disabled                                       |
//!
//! A family-scoped state (SPEC §11.2) has the field `{fingerprint}/{family}`.
//!
//! `why` is `rate_limited`, `auth`, `overloaded` or `spend_capped` for a cooldown and `unauthorized`,
//! `forbidden`, `billing` or `operator` for a disable; numbers are 1 to 15 decimal digits (exact
//! in Lua's doubles). Nothing else is stored: no key, no hint, no label.
//!
//! Two states merge by the lexicographic maximum of `(generation, kind, until, reason)`, with
//! kinds ordered available < cooling < disabled and reasons in the order of the pool's state
//! word ([`keypool_core::Pool`]): the same order the pool merges in, so the store and every
//! replica agree on the maximum whatever the order of delivery. [`MERGE_SCRIPT`] is the merge as
//! Redis runs it (one key, atomic); [`Stored::merge`] is its Rust twin, which the tests check
//! against the real script.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keypool_core::{Change, CoolReason, DisableReason, Family, Fingerprint, Mark, Target, WallTime};

/// A field of the hash: a key (`{fingerprint}`), or a key for one model family
/// (`{fingerprint}/{family}`, the family as 16 hex digits of its hash; SPEC §11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Field {
    /// The key.
    pub key: Fingerprint,
    /// The model family the state is scoped to, if any.
    pub family: Option<Family>,
}

impl Field {
    /// The field a mark writes.
    pub fn of(mark: &Mark) -> Self {
        Self {
            key: mark.key(),
            family: mark.family(),
        }
    }

    /// The key-wide field of a key.
    pub fn key(key: Fingerprint) -> Self {
        Self { key, family: None }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.family {
            None => write!(f, "{}", self.key),
            Some(family) => write!(f, "{}/{:016x}", self.key, family.raw()),
        }
    }
}

impl std::str::FromStr for Field {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (key, family) = match s.split_once('/') {
            None => (s, None),
            Some((key, family)) => {
                if family.len() != 16 {
                    return Err(());
                }
                let raw = u64::from_str_radix(family, 16).map_err(|_| ())?;
                if raw == 0 {
                    return Err(());
                }
                (key, Some(Family::from_raw(raw)))
            }
        };
        Ok(Self {
            key: key.parse().map_err(|_| ())?,
            family,
        })
    }
}

/// The largest number a value may carry: 15 decimal digits, exact as a Lua double.
pub const MAX_NUMBER: u64 = 999_999_999_999_999;

/// One key's shared state: a generation and what the key does in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stored {
    /// Raised by every operator enable (see [`keypool_core::mark`]).
    pub generation: u64,
    /// The state within that generation.
    pub state: StoredState,
}

/// The state part of a [`Stored`] value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredState {
    /// Nothing holds the key back (after an enable, or never marked).
    Available,
    /// The key rests until `until_ms` (Unix milliseconds; a past deadline means available).
    Cooling {
        /// The deadline.
        until_ms: u64,
        /// Why.
        reason: CoolReason,
    },
    /// The key takes no traffic until an enable of a higher generation.
    Disabled {
        /// Why.
        reason: DisableReason,
    },
}

fn cool_name(r: CoolReason) -> &'static str {
    r.as_str()
}

fn cool_rank(r: CoolReason) -> u8 {
    match r {
        CoolReason::RateLimited => 0,
        CoolReason::Auth => 1,
        CoolReason::Overloaded => 2,
        CoolReason::SpendCapped => 3,
    }
}

fn disable_name(r: DisableReason) -> &'static str {
    r.as_str()
}

fn disable_rank(r: DisableReason) -> u8 {
    match r {
        DisableReason::Unauthorized => 0,
        DisableReason::Forbidden => 1,
        DisableReason::Billing => 2,
        DisableReason::Operator => 3,
    }
}

fn cool_from(name: &str) -> Option<CoolReason> {
    [
        CoolReason::RateLimited,
        CoolReason::Auth,
        CoolReason::Overloaded,
        CoolReason::SpendCapped,
    ]
    .into_iter()
    .find(|&r| cool_name(r) == name)
}

fn disable_from(name: &str) -> Option<DisableReason> {
    [
        DisableReason::Unauthorized,
        DisableReason::Forbidden,
        DisableReason::Billing,
        DisableReason::Operator,
    ]
    .into_iter()
    .find(|&r| disable_name(r) == name)
}

/// 1 to 15 ASCII digits, as the script's `%d+` with its length check.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 15 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl Stored {
    /// The state of a key nobody has marked: generation 0, available.
    pub const FRESH: Self = Self {
        generation: 0,
        state: StoredState::Available,
    };

    /// The merge order: `(generation, kind, until, reason)`.
    fn rank(&self) -> (u64, u8, u64, u8) {
        match self.state {
            StoredState::Available => (self.generation, 0, 0, 0),
            StoredState::Cooling { until_ms, reason } => (self.generation, 1, until_ms, cool_rank(reason)),
            StoredState::Disabled { reason } => (self.generation, 2, 0, disable_rank(reason)),
        }
    }

    /// The larger of two states (what [`MERGE_SCRIPT`] keeps); commutative and associative.
    pub fn merge(self, other: Self) -> Self {
        if other.rank() > self.rank() { other } else { self }
    }

    /// Whether `self` is strictly above `other` in the merge order.
    pub fn beats(&self, other: &Self) -> bool {
        self.rank() > other.rank()
    }

    /// The value as stored in Redis.
    pub fn encode(&self) -> String {
        let g = self.generation.min(MAX_NUMBER);
        match self.state {
            StoredState::Available => format!("v1:{g}:available"),
            StoredState::Cooling { until_ms, reason } => {
                format!(
                    "v1:{g}:cooling:{}:{}",
                    until_ms.min(MAX_NUMBER),
                    cool_name(reason)
                )
            }
            StoredState::Disabled { reason } => format!("v1:{g}:disabled:{}", disable_name(reason)),
        }
    }

    /// Parses a stored value; `None` for anything that is not exactly this encoding (a foreign
    /// or damaged value, which the caller ignores).
    pub fn decode(value: &str) -> Option<Self> {
        let rest = value.strip_prefix("v1:")?;
        let (g, rest) = rest.split_once(':')?;
        let generation = number(g)?;
        let state = if rest == "available" {
            StoredState::Available
        } else if let Some(rest) = rest.strip_prefix("cooling:") {
            let (until, why) = rest.split_once(':')?;
            StoredState::Cooling {
                until_ms: number(until)?,
                reason: cool_from(why)?,
            }
        } else {
            StoredState::Disabled {
                reason: disable_from(rest.strip_prefix("disabled:")?)?,
            }
        };
        Some(Self { generation, state })
    }

    /// The stored form of a mark, on a wall clock `offset_ms` ahead of the one the mark was
    /// made with (0 outside clock-skew tests). Deadlines round up to whole milliseconds, so the
    /// store never shortens a cooldown.
    pub fn from_mark(mark: &Mark, offset_ms: i64) -> Self {
        let state = match mark.change {
            Change::CoolUntil { until, reason } => StoredState::Cooling {
                until_ms: shift(until.unix_millis_ceil(), offset_ms).min(MAX_NUMBER),
                reason,
            },
            Change::Disable { reason } => StoredState::Disabled { reason },
            Change::Enable => StoredState::Available,
        };
        Self {
            generation: mark.generation.min(MAX_NUMBER),
            state,
        }
    }

    /// The mark that brings a replica's pool up to this state: a cooldown or a disable at this
    /// generation, or (for "available") an enable at it, which clears older marks and changes
    /// nothing at an equal generation.
    pub fn to_mark(&self, field: Field) -> Mark {
        let change = match self.state {
            StoredState::Available => Change::Enable,
            StoredState::Cooling { until_ms, reason } => Change::CoolUntil {
                until: WallTime::from_unix_millis(until_ms),
                reason,
            },
            StoredState::Disabled { reason } => Change::Disable { reason },
        };
        let target = match field.family {
            // A family state only ever cools (SPEC §11.2); anything else there is read as its
            // generation alone.
            Some(family) => Target::KeyFamily(field.key, family),
            None => Target::Key(field.key),
        };
        let change = match (field.family, change) {
            (Some(_), Change::Disable { .. }) => Change::Enable,
            (_, change) => change,
        };
        Mark {
            target,
            change,
            status: None,
            generation: self.generation,
        }
    }
}

/// Moves a Unix-millisecond reading by `offset_ms`, saturating.
pub(crate) fn shift(ms: u64, offset_ms: i64) -> u64 {
    if offset_ms >= 0 {
        ms.saturating_add(offset_ms.unsigned_abs())
    } else {
        ms.saturating_sub(offset_ms.unsigned_abs())
    }
}

/// `SystemTime` moved by `offset_ms`.
pub(crate) fn shift_time(t: SystemTime, offset_ms: i64) -> SystemTime {
    let d = Duration::from_millis(offset_ms.unsigned_abs());
    let moved = if offset_ms >= 0 {
        t.checked_add(d)
    } else {
        t.checked_sub(d)
    };
    moved.unwrap_or(UNIX_EPOCH)
}

/// The merge as one atomic, single-key Redis script.
///
/// `KEYS[1]` the namespace's hash; `ARGV[1]` the fingerprint, `ARGV[2]` the new value (see the
/// [module docs](self)), `ARGV[3]` the channel, `ARGV[4]` the publisher's wall clock in
/// microseconds (for the receivers' lag). Keeps the larger of the stored and the new value; only
/// when that is the new one, writes it and publishes `"{fingerprint} {value} {stamp}"`. Returns
/// 0 (kept), 1 (written) or 2 (written over a malformed value). A malformed new value is an
/// error and changes nothing.
pub const MERGE_SCRIPT: &str = r"
local COOL = {rate_limited = 0, auth = 1, overloaded = 2, spend_capped = 3}
local OFF = {unauthorized = 0, forbidden = 1, billing = 2, operator = 3}
local function num(s)
  if s == nil or #s == 0 or #s > 15 or string.find(s, '^%d+$') == nil then return nil end
  return tonumber(s)
end
local function parse(v)
  if type(v) ~= 'string' then return nil end
  local g, rest = string.match(v, '^v1:([^:]*):(.*)$')
  g = num(g)
  if g == nil then return nil end
  if rest == 'available' then return {g, 0, 0, 0} end
  local u, why = string.match(rest, '^cooling:([^:]*):(.*)$')
  u = num(u)
  if u ~= nil and COOL[why] ~= nil then return {g, 1, u, COOL[why]} end
  why = string.match(rest, '^disabled:(.*)$')
  if why ~= nil and OFF[why] ~= nil then return {g, 2, 0, OFF[why]} end
  return nil
end
local new = parse(ARGV[2])
if new == nil then return redis.error_reply('keypool: malformed value') end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local old = parse(raw)
if old ~= nil then
  local higher = false
  for i = 1, 4 do
    if new[i] ~= old[i] then
      higher = new[i] > old[i]
      break
    end
  end
  if not higher then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[4])
if raw and old == nil then return 2 end
return 1
";

#[cfg(test)]
mod tests {
    use super::*;

    fn all_states() -> Vec<StoredState> {
        let mut out = vec![StoredState::Available];
        for until_ms in [0, 1_700_000_000_000, MAX_NUMBER] {
            for reason in [CoolReason::RateLimited, CoolReason::Auth, CoolReason::Overloaded] {
                out.push(StoredState::Cooling { until_ms, reason });
            }
        }
        for reason in [
            DisableReason::Unauthorized,
            DisableReason::Forbidden,
            DisableReason::Billing,
            DisableReason::Operator,
        ] {
            out.push(StoredState::Disabled { reason });
        }
        out
    }

    #[test]
    fn encoding_round_trips() {
        for generation in [0, 1, 42, MAX_NUMBER] {
            for state in all_states() {
                let s = Stored { generation, state };
                assert_eq!(Stored::decode(&s.encode()), Some(s), "{}", s.encode());
            }
        }
        assert_eq!(Stored::FRESH.encode(), "v1:0:available");
        assert_eq!(
            Stored::decode("v1:3:cooling:1700000000123:rate_limited"),
            Some(Stored {
                generation: 3,
                state: StoredState::Cooling {
                    until_ms: 1_700_000_000_123,
                    reason: CoolReason::RateLimited
                }
            })
        );
    }

    #[test]
    fn foreign_values_do_not_decode() {
        for bad in [
            "",
            "v1",
            "v2:0:available",
            "v1::available",
            "v1:+1:available",
            "v1:-1:available",
            "v1:1000000000000000:available",
            "v1:0:available:",
            "v1:0:cooling:12",
            "v1:0:cooling:12:slow",
            "v1:0:cooling::auth",
            "v1:0:disabled",
            "v1:0:disabled:operator:",
            "v1:0:disabled:Operator",
            "sk-ant-api03-whatever",
            "{\"until\":1}",
        ] {
            assert_eq!(Stored::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn merge_order() {
        let at = |generation, state| Stored { generation, state };
        let cool = |until_ms, reason| StoredState::Cooling { until_ms, reason };
        let off = |reason| StoredState::Disabled { reason };
        // Generation first.
        assert!(at(2, StoredState::Available).beats(&at(1, off(DisableReason::Operator))));
        // Then disabled > cooling > available.
        assert!(
            at(1, off(DisableReason::Unauthorized)).beats(&at(1, cool(u64::MAX, CoolReason::Overloaded)))
        );
        assert!(at(1, cool(0, CoolReason::RateLimited)).beats(&at(1, StoredState::Available)));
        // Then the later deadline, then the reason code.
        assert!(at(1, cool(11, CoolReason::RateLimited)).beats(&at(1, cool(10, CoolReason::Overloaded))));
        assert!(at(1, cool(10, CoolReason::Auth)).beats(&at(1, cool(10, CoolReason::RateLimited))));
        assert!(at(1, off(DisableReason::Operator)).beats(&at(1, off(DisableReason::Billing))));
        let a = at(1, off(DisableReason::Forbidden));
        assert!(!a.beats(&a));
        assert_eq!(a.merge(a), a);
    }

    #[test]
    fn family_fields_round_trip_and_only_cool() {
        let fp = Fingerprint::from_bytes([7; 16]);
        let sonnet = Family::of("sonnet");
        let field = Field {
            key: fp,
            family: Some(sonnet),
        };
        let text = field.to_string();
        assert_eq!(text.len(), 32 + 1 + 16);
        assert_eq!(text.parse::<Field>(), Ok(field));
        assert_eq!(fp.to_string().parse::<Field>(), Ok(Field::key(fp)));
        for bad in [
            "",
            "x/y",
            &format!("{fp}/"),
            &format!("{fp}/0000000000000000"),
            &format!("{fp}/123"),
        ] {
            assert!(bad.parse::<Field>().is_err(), "{bad}");
        }
        let cool = Stored {
            generation: 2,
            state: StoredState::Cooling {
                until_ms: 5_000,
                reason: CoolReason::SpendCapped,
            },
        };
        let mark = cool.to_mark(field);
        assert_eq!(mark.target, Target::KeyFamily(fp, sonnet));
        assert_eq!(Stored::decode(&cool.encode()), Some(cool));
        // A family field never disables: anything else stored there is its generation alone.
        let odd = Stored {
            generation: 3,
            state: StoredState::Disabled {
                reason: DisableReason::Operator,
            },
        };
        assert_eq!(odd.to_mark(field).change, Change::Enable);
    }

    #[test]
    fn marks_convert_both_ways() {
        let fp = Fingerprint::from_bytes([7; 16]);
        let mark = Mark {
            target: Target::Key(fp),
            change: Change::CoolUntil {
                until: WallTime::from_unix_millis(1_000).saturating_add(Duration::from_nanos(1)),
                reason: CoolReason::RateLimited,
            },
            status: Some(429),
            generation: 4,
        };
        let stored = Stored::from_mark(&mark, 0);
        // Rounded up, never shortened.
        assert_eq!(
            stored.state,
            StoredState::Cooling {
                until_ms: 1_001,
                reason: CoolReason::RateLimited
            }
        );
        assert_eq!(
            Stored::from_mark(&mark, -500).state,
            StoredState::Cooling {
                until_ms: 501,
                reason: CoolReason::RateLimited
            }
        );
        let back = stored.to_mark(Field::key(fp));
        assert_eq!(back.generation, 4);
        assert_eq!(back.key(), fp);
        let enable = Stored {
            generation: 5,
            state: StoredState::Available,
        };
        assert_eq!(enable.to_mark(Field::key(fp)).change, Change::Enable);
        assert_eq!(shift(5, -10), 0);
        assert_eq!(shift(u64::MAX, 10), u64::MAX);
    }
}
