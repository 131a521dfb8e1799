//! The shared pool of keys and their state (SPEC §2).
//!
//! Each key's state is one `AtomicU64`:
//!
//! | word                                   | state                                   |
//! |----------------------------------------|-----------------------------------------|
//! | `deadline_ns << 2 \| cool_reason`      | cooling until `origin + deadline_ns`; available once that has passed (`0` = never marked) |
//! | `DISABLED_FLOOR + disable_reason`      | disabled                                |
//!
//! Every change of state goes through [`Pool::apply`] (portable [`Mark`]s) or the local
//! conveniences built on the same internal step: a later deadline wins, a disabled word is above
//! every deadline, so marks are monotone and commute (SPEC §8.9). Beside the word each key has a
//! generation that only an enable raises (see [`crate::mark`]); the pair `(generation, word)` is
//! merged by lexicographic maximum. Writers take a short lock so that the pair moves as one;
//! picks never take it: a walk only loads the words.
//!
//! The words sit in one dense array, apart from the secrets and labels, so that a walk over 16
//! keys reads two cache lines. Times are clamped to `MAX_DEADLINE_NS`, which keeps every
//! disabled word's deadline bits above any `now`: "available" is the one comparison
//! `word >> 2 <= now_ns` (`Pool::is_free`).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::mark::{Change, Family, Fingerprint, Mark, Target, WallTime};
use crate::secret::{Secret, SecretError};

const REASON_BITS: u32 = 2;
const REASON_MASK: u64 = (1 << REASON_BITS) - 1;
/// Words at or above this value mean "disabled"; the low two bits carry the reason.
const DISABLED_FLOOR: u64 = u64::MAX - REASON_MASK;
/// How many model families a pool keeps family-scoped state for (SPEC §11.2). A family mark
/// beyond that falls back to the key-wide word (the key rests for every family: the safe side).
pub const FAMILY_SLOTS: usize = 16;
/// `extras` bit: some family word was set at least once.
const EXTRA_FAMILY: u8 = 1;
/// `extras` bit: some soft hint was set at least once.
const EXTRA_HINT: u8 = 2;
/// A hint whose reset moves by less than this changes nothing (SPEC §11.4: resets jitter).
const HINT_JITTER_NS: u64 = 2_000_000_000;

/// The latest deadline a word can hold (about 146 years after the pool's origin).
const MAX_DEADLINE_NS: u64 = (DISABLED_FLOOR - 1) >> REASON_BITS;
// `Pool::is_free` relies on this: a disabled word is never free, whatever the (clamped) `now`.
const _: () = assert!(DISABLED_FLOOR >> REASON_BITS > MAX_DEADLINE_NS);

/// Index of a key in its pool (0-based, in configuration order). A local handle only: it never
/// leaves the process (marks name keys by [`Fingerprint`]). Ids come from the pool
/// ([`Pool::ids`], [`Pool::key_at`], [`Pool::find`], walks), so they are in range for the pool
/// that made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub(crate) usize);

impl KeyId {
    /// The 0-based position of the key in the pool.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Why a key is cooling down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoolReason {
    /// The upstream answered 429.
    RateLimited,
    /// The upstream rejected the key (401) and the policy cools instead of disabling.
    Auth,
    /// The upstream was overloaded and the policy was configured to cool the key.
    Overloaded,
    /// The organisation reached its spend cap (SPEC §11.3): out until the date the upstream
    /// gave, or 00:00 UTC on the 1st of next month. Shown as the state `spend_capped`.
    SpendCapped,
}

impl CoolReason {
    /// The snake-case name logs, metrics, admin views and state backends use (`rate_limited`,
    /// `auth`, `overloaded`, `spend_capped`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Auth => "auth",
            Self::Overloaded => "overloaded",
            Self::SpendCapped => "spend_capped",
        }
    }
}

/// Why a key is disabled. Disabled keys take no traffic until [`Pool::enable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisableReason {
    /// 401: the key is not valid.
    Unauthorized,
    /// 403: the key may not use this API.
    Forbidden,
    /// 402, or the credit-balance 400: the organisation is out of credit.
    Billing,
    /// An operator disabled the key by hand.
    Operator,
}

impl DisableReason {
    /// The snake-case name (`unauthorized`, `forbidden`, `billing`, `operator`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::Billing => "billing",
            Self::Operator => "operator",
        }
    }
}

/// The state of one key at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// The key may be used.
    Available,
    /// The key may be used again at `until`.
    Cooling {
        /// The moment the key becomes available again.
        until: Instant,
        /// Why it cools.
        reason: CoolReason,
    },
    /// The key takes no traffic until it is enabled again.
    Disabled {
        /// Why it was disabled.
        reason: DisableReason,
    },
}

impl KeyState {
    /// Whether a walker may yield the key.
    pub fn is_available(&self) -> bool {
        matches!(self, Self::Available)
    }
    /// Whether the key is cooling down.
    pub fn is_cooling(&self) -> bool {
        matches!(self, Self::Cooling { .. })
    }
    /// Whether the key is disabled.
    pub fn is_disabled(&self) -> bool {
        matches!(self, Self::Disabled { .. })
    }
}

/// What a mark did to a key's state, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use = "a transition tells whether the key's state changed; log or count it"]
pub enum Transition {
    /// The key entered the new state (e.g. available → cooling, → disabled, → available).
    Entered,
    /// The key was already cooling and its deadline moved later.
    Extended,
    /// Nothing changed (an earlier deadline, an already disabled key, ...).
    Unchanged,
}

/// How walks pick their first key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Every walk starts at the first key: a healthy primary takes all traffic, which keeps
    /// the upstream's organisation-scoped prompt cache warm.
    #[default]
    PrimaryWithFallback,
    /// Each new walk starts one key further than the previous one.
    RoundRobin,
}

/// One key as configured.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// The operator's name for the key (e.g. `team-a`); when absent, `key-` and the first hex
    /// digits of the key's fingerprint (`key-3f9a2c`).
    pub label: Option<String>,
    /// The key itself.
    pub secret: String,
}

impl KeySpec {
    /// A key without a label.
    pub fn new(secret: impl Into<String>) -> Self {
        Self {
            label: None,
            secret: secret.into(),
        }
    }
    /// A key with a label.
    pub fn labelled(label: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            label: Some(label.into()),
            secret: secret.into(),
        }
    }
}

impl fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = Secret::new(self.secret.as_str()).map(|s| s.hint().to_owned());
        f.debug_struct("KeySpec")
            .field("label", &self.label)
            .field("secret", &hint.as_deref().unwrap_or("<invalid>"))
            .finish()
    }
}

impl<S: Into<String>> From<S> for KeySpec {
    fn from(secret: S) -> Self {
        Self::new(secret)
    }
}

/// Why a pool cannot be built. Positions count from 1, as a person reading a key list does;
/// no variant ever carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// No keys were given.
    #[error("the pool needs at least one key, and none was given")]
    Empty,
    /// The key at `position` is empty or white space only.
    #[error("key #{position} is empty or blank")]
    Blank {
        /// 1-based position of the key.
        position: usize,
    },
    /// The key at `position` cannot be sent as an HTTP header value.
    #[error(
        "key #{position} contains a character that is not allowed in an HTTP header value (spaces, line breaks and non-ASCII are not)"
    )]
    NotHeaderValue {
        /// 1-based position of the key.
        position: usize,
    },
    /// The same key appears twice.
    #[error("key #{second} is the same key as key #{first}")]
    Duplicate {
        /// 1-based position of the first occurrence.
        first: usize,
        /// 1-based position of the repeat.
        second: usize,
    },
    /// A label is empty or has characters other than ASCII letters, digits, `.`, `_`, `-`.
    #[error("key #{position} has an invalid label (use 1-64 ASCII letters, digits, '.', '_' or '-')")]
    BadLabel {
        /// 1-based position of the key.
        position: usize,
    },
    /// Two keys carry the same label.
    #[error("key #{second} has the same label as key #{first} ({label:?})")]
    DuplicateLabel {
        /// The label (never a secret: labels are operator names or hints).
        label: String,
        /// 1-based position of the first key with it.
        first: usize,
        /// 1-based position of the repeat.
        second: usize,
    },
}

struct Entry {
    secret: Secret,
    fingerprint: Fingerprint,
    label: Box<str>,
}

/// An ordered, non-empty set of keys with shared, lock-free state.
///
/// Share it as `Arc<Pool>`; every method takes `&self`. The pool never reads a clock: every
/// method that depends on time takes `now`, measured from the `origin` given to [`Pool::new`].
pub struct Pool {
    keys: Box<[Entry]>,
    /// One state word per key, same order as `keys`.
    words: Box<[AtomicU64]>,
    /// One generation per key, same order; written only under `writer`.
    generations: Box<[AtomicU64]>,
    /// Serialises writers, so that a key's generation and word change together. Never taken by
    /// a pick.
    writer: Mutex<()>,
    by_fingerprint: HashMap<Fingerprint, usize>,
    /// Family-scoped cooldowns: `FAMILY_SLOTS` words per key, in the encoding of `words` (never
    /// disabled), merged with the key's word in the same generation.
    family_words: Box<[AtomicU64]>,
    /// The families that have a slot, by raw hash (0 = free). Insert-only, under `writer`.
    families: [AtomicU64; FAMILY_SLOTS],
    /// Soft hints (SPEC §11.4), local to the process: per key, one key-wide deadline and one per
    /// family slot, in ns since the origin. Never part of the hard state.
    hints: Box<[AtomicU64]>,
    /// `EXTRA_*` bits: lets walks skip family words and hints while none was ever set.
    extras: AtomicU8,
    /// The organisation and workspace of each key, once an answer named them (SPEC §11.1).
    scopes: Box<[OnceLock<Scope>]>,
    origin: Instant,
    order: Order,
    cursor: AtomicUsize,
    /// The pool that replaced this one on a reload: marks applied here are applied there too,
    /// so a call that began before the reload marks the key in the new pool.
    successor: OnceLock<Arc<Self>>,
}

/// The organisation (and workspace) a key belongs to, as its answers named them (SPEC §11.1).
/// Organisation and workspace ids are not secrets, but they identify the pool's owner: keypool
/// shows them to operators only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// The organisation id.
    pub organisation: Box<str>,
    /// The workspace id, if the upstream names one.
    pub workspace: Option<Box<str>>,
}

/// A family that has a slot in a pool ([`Pool::family_slot`]): what a walk for that family checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilySlot(pub(crate) u8);

/// One key as seen by [`Pool::snapshot`]: no secret, only its label and hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    /// The key's id.
    pub id: KeyId,
    /// Its label.
    pub label: String,
    /// Its hint.
    pub hint: String,
    /// Its fingerprint.
    pub fingerprint: Fingerprint,
    /// Its generation (raised by every enable).
    pub generation: u64,
    /// Its state at the snapshot's `now`.
    pub state: KeyState,
}

/// The label of a key configured without one: `key-` and the first 6 hex digits of its
/// fingerprint (more while that collides with an earlier label). Stable across processes and
/// reloads, safe in URLs, logs and metrics, and unlike the hint it does not begin with the
/// provider's key prefix that every key shares.
fn default_label(fingerprint: Fingerprint, taken: impl Fn(&str) -> bool) -> String {
    let hex = fingerprint.to_string();
    (6..=hex.len())
        .map(|n| format!("key-{}", &hex[..n]))
        .find(|l| !taken(l))
        .unwrap_or_else(|| format!("key-{hex}"))
}

fn valid_label(label: &str) -> bool {
    (1..=64).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Pool {
    /// Builds a pool. `origin` is any instant not later than the first `now` the pool will see
    /// (usually the adapter's clock reading at start-up).
    pub fn new<K: Into<KeySpec>>(
        keys: impl IntoIterator<Item = K>,
        order: Order,
        origin: Instant,
    ) -> Result<Self, PoolError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, spec) in keys.into_iter().enumerate() {
            let spec: KeySpec = spec.into();
            let position = i + 1;
            let secret = Secret::new(spec.secret).map_err(|e| match e {
                SecretError::Blank => PoolError::Blank { position },
                SecretError::NotHeaderValue => PoolError::NotHeaderValue { position },
            })?;
            if let Some(first) = entries.iter().position(|e| e.secret == secret) {
                return Err(PoolError::Duplicate {
                    first: first + 1,
                    second: position,
                });
            }
            let label = match spec.label {
                Some(label) if valid_label(&label) => label,
                Some(_) => return Err(PoolError::BadLabel { position }),
                None => default_label(Fingerprint::of(&secret), |l| {
                    entries.iter().any(|e| *e.label == *l)
                }),
            };
            if let Some(first) = entries.iter().position(|e| *e.label == *label) {
                return Err(PoolError::DuplicateLabel {
                    label,
                    first: first + 1,
                    second: position,
                });
            }
            entries.push(Entry {
                fingerprint: Fingerprint::of(&secret),
                secret,
                label: label.into_boxed_str(),
            });
        }
        if entries.is_empty() {
            return Err(PoolError::Empty);
        }
        let by_fingerprint = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.fingerprint, i))
            .collect();
        let n = entries.len();
        Ok(Self {
            words: entries.iter().map(|_| AtomicU64::new(0)).collect(),
            generations: entries.iter().map(|_| AtomicU64::new(0)).collect(),
            family_words: (0..n * FAMILY_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            families: std::array::from_fn(|_| AtomicU64::new(0)),
            hints: (0..n * (1 + FAMILY_SLOTS)).map(|_| AtomicU64::new(0)).collect(),
            extras: AtomicU8::new(0),
            scopes: (0..n).map(|_| OnceLock::new()).collect(),
            keys: entries.into_boxed_slice(),
            writer: Mutex::new(()),
            by_fingerprint,
            origin,
            order,
            cursor: AtomicUsize::new(0),
            successor: OnceLock::new(),
        })
    }

    /// Builds the pool that replaces this one when the key list is reloaded: every key that is
    /// also in `self` (same fingerprint) keeps its state and generation, and from now on every
    /// mark applied to `self` (by a call that began before the reload) is applied to the new
    /// pool as well. A pool is replaced at most once; reloading a replaced pool reloads its
    /// successor.
    pub fn reload<K: Into<KeySpec>>(
        self: &Arc<Self>,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Arc<Self>, PoolError> {
        let mut current = self.live();
        let next = Arc::new(Self::new(keys, current.order, current.origin)?);
        // Forward first, copy second: a mark that lands on the old pool meanwhile reaches the new
        // one either way, and the copy is a merge (maximum), so the order does not matter.
        while let Err(taken) = current.successor.set(next.clone()) {
            // Another reload replaced `current` meanwhile: chain after its replacement.
            drop(taken);
            current = current.live();
        }
        for (i, entry) in current.keys.iter().enumerate() {
            if let Some(&j) = next.by_fingerprint.get(&entry.fingerprint) {
                let _lock = current.writer.lock().unwrap_or_else(PoisonError::into_inner);
                let generation = current.generations[i].load(Ordering::Acquire);
                let word = current.words[i].load(Ordering::Acquire);
                let families: Vec<(Family, u64)> = (0..FAMILY_SLOTS)
                    .filter_map(|f| {
                        let family = current.families[f].load(Ordering::Acquire);
                        let word = current.family_words[i * FAMILY_SLOTS + f].load(Ordering::Acquire);
                        (family != 0 && word != 0).then(|| (Family::from_raw(family), word))
                    })
                    .collect();
                drop(_lock);
                next.merge(j, generation, Raise::Word(word), None);
                for (family, word) in families {
                    next.merge(j, generation, Raise::Word(word), Some(family));
                }
                if let Some(scope) = current.scopes[i].get() {
                    let _ = next.scopes[j].set(scope.clone());
                }
            }
        }
        Ok(next)
    }

    /// The newest pool in this pool's reload chain (itself if it was never replaced).
    pub fn live(self: &Arc<Self>) -> Arc<Self> {
        let mut p = self.clone();
        while let Some(next) = p.successor.get() {
            p = next.clone();
        }
        p
    }

    /// Number of keys (at least 1).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always `false`: a pool has at least one key. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The instant the pool measures deadlines from.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// How walks choose their first key.
    pub fn order(&self) -> Order {
        self.order
    }

    /// Every key id, in configuration order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = KeyId> + use<> {
        (0..self.keys.len()).map(KeyId)
    }

    /// The key with this label.
    pub fn find(&self, label: &str) -> Option<KeyId> {
        self.keys.iter().position(|e| &*e.label == label).map(KeyId)
    }

    /// The key with this fingerprint.
    pub fn find_fingerprint(&self, fingerprint: Fingerprint) -> Option<KeyId> {
        self.by_fingerprint.get(&fingerprint).copied().map(KeyId)
    }

    /// The key at 0-based position `index`, if the pool has that many keys.
    pub fn key_at(&self, index: usize) -> Option<KeyId> {
        (index < self.keys.len()).then_some(KeyId(index))
    }

    /// The key's fingerprint: its identity across processes and reloads.
    pub fn fingerprint(&self, id: KeyId) -> Fingerprint {
        self.keys[id.0].fingerprint
    }

    /// The key's generation, raised by every enable. A mark made from an answer to a request
    /// sent at generation `g` carries `g`, so an enable in between makes it stale.
    pub fn generation(&self, id: KeyId) -> u64 {
        self.generations[id.0].load(Ordering::Acquire)
    }

    /// The key's secret, to be written into a request header.
    pub fn secret(&self, id: KeyId) -> &Secret {
        &self.keys[id.0].secret
    }

    /// The key's label.
    pub fn label(&self, id: KeyId) -> &str {
        &self.keys[id.0].label
    }

    /// Where the next walk starts, per the pool's [`Order`] (a walk is started by
    /// [`Pool::walk`]).
    #[inline]
    pub(crate) fn walk_start(&self) -> usize {
        match self.order {
            Order::PrimaryWithFallback => 0,
            Order::RoundRobin => self.cursor.fetch_add(1, Ordering::Relaxed) % self.keys.len(),
        }
    }

    /// The slot of `family`, if any mark or hint was ever made for it in this pool.
    #[inline]
    pub fn family_slot(&self, family: Family) -> Option<FamilySlot> {
        if self.extras.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.families
            .iter()
            .position(|f| f.load(Ordering::Acquire) == family.raw())
            .map(|i| FamilySlot(i as u8))
    }

    /// The slot of `family`, made if it has none (under `writer`); `None` when every slot is
    /// taken by other families.
    fn family_slot_or_insert(&self, family: Family) -> Option<usize> {
        for (i, f) in self.families.iter().enumerate() {
            match f.load(Ordering::Acquire) {
                0 => {
                    f.store(family.raw(), Ordering::Release);
                    return Some(i);
                }
                raw if raw == family.raw() => return Some(i),
                _ => {}
            }
        }
        None
    }

    /// `EXTRA_*` bits (walks read them once).
    #[inline]
    pub(crate) fn extras(&self) -> u8 {
        self.extras.load(Ordering::Acquire)
    }

    /// The family words of `slot`, one per key, as `(key word, family word)` readers need them.
    #[inline]
    pub(crate) fn family_word(&self, i: usize, slot: FamilySlot) -> u64 {
        self.family_words[i * FAMILY_SLOTS + usize::from(slot.0)].load(Ordering::Acquire)
    }

    /// Whether key `i` carries a soft hint at `now_ns`, key-wide or for `slot`.
    #[inline]
    pub(crate) fn is_hinted(&self, i: usize, slot: Option<FamilySlot>, now_ns: u64) -> bool {
        let base = i * (1 + FAMILY_SLOTS);
        self.hints[base].load(Ordering::Acquire) > now_ns
            || slot.is_some_and(|s| self.hints[base + 1 + usize::from(s.0)].load(Ordering::Acquire) > now_ns)
    }

    /// `now` in ns since the origin, clamped to `0..=MAX_DEADLINE_NS`. Clamping changes no
    /// answer (no deadline is later than `MAX_DEADLINE_NS`), and keeps [`is_free`](Self::is_free)
    /// a single comparison.
    #[inline]
    fn now_ns(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.origin);
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
            .min(MAX_DEADLINE_NS)
    }

    #[inline]
    pub(crate) fn word(&self, id: KeyId) -> u64 {
        self.words[id.0].load(Ordering::Acquire)
    }

    /// The latest deadline a word can hold, in ns since the origin.
    pub(crate) const MAX_DEADLINE_NS: u64 = MAX_DEADLINE_NS;

    /// Whether a word means "disabled".
    #[inline]
    pub(crate) fn is_disabled_word(word: u64) -> bool {
        word >= DISABLED_FLOOR
    }

    /// The deadline bits of a word, in ns since the origin: the deadline of a cooling (or
    /// expired) word, `MAX_DEADLINE_NS + 1` for a disabled one.
    #[inline]
    pub(crate) fn deadline_of(word: u64) -> u64 {
        word >> REASON_BITS
    }

    /// The state words, in key order.
    #[inline]
    pub(crate) fn words(&self) -> &[AtomicU64] {
        &self.words
    }

    /// Whether a word means "available" at `now_ns` (a value from [`now_ns`](Self::now_ns)):
    /// its deadline has passed. A disabled word's deadline bits are `MAX_DEADLINE_NS + 1`,
    /// later than any clamped `now_ns`.
    #[inline]
    pub(crate) fn is_free(word: u64, now_ns: u64) -> bool {
        word >> REASON_BITS <= now_ns
    }

    /// Decodes a state word as seen at `now_ns`.
    pub(crate) fn decode(&self, word: u64, now_ns: u64) -> RawState {
        if word >= DISABLED_FLOOR {
            RawState::Disabled(word - DISABLED_FLOOR)
        } else if word >> REASON_BITS > now_ns {
            RawState::Cooling(word >> REASON_BITS)
        } else {
            RawState::Available
        }
    }

    #[inline]
    pub(crate) fn ns_of(&self, now: Instant) -> u64 {
        self.now_ns(now)
    }

    /// The state of a key at `now`.
    pub fn state(&self, id: KeyId, now: Instant) -> KeyState {
        self.decode_state(self.word(id), now)
    }

    fn decode_state(&self, word: u64, now: Instant) -> KeyState {
        match self.decode(word, self.now_ns(now)) {
            RawState::Available => KeyState::Available,
            RawState::Cooling(deadline) => KeyState::Cooling {
                until: self.origin + Duration::from_nanos(deadline),
                reason: cool_reason(word & REASON_MASK),
            },
            RawState::Disabled(code) => KeyState::Disabled {
                reason: disable_reason(code),
            },
        }
    }

    /// Applies a mark (SPEC §9) and returns what it did to the key: the one way key state
    /// changes. `now` and `wall` are readings of the adapter's two clocks taken together; they
    /// convert the mark's wall-clock deadline into the pool's monotonic time base.
    ///
    /// A mark for a key this pool does not have changes nothing. A mark of an older generation
    /// than the key's changes nothing (an enable came after it); a mark of a newer generation
    /// clears the key first (it was made after an enable this pool has not seen yet). When the
    /// pool was replaced by a reload, the mark is applied to the replacement too, and the
    /// transition returned is the replacement's.
    pub fn apply(&self, mark: &Mark, now: Instant, wall: SystemTime) -> Transition {
        let here = match self.by_fingerprint.get(&mark.key()) {
            Some(&i) => self.apply_at(i, mark, now, wall),
            None => Transition::Unchanged,
        };
        match self.successor.get() {
            Some(next) => next.apply(mark, now, wall),
            None => here,
        }
    }

    fn apply_at(&self, i: usize, mark: &Mark, now: Instant, wall: SystemTime) -> Transition {
        let now_ns = self.now_ns(now);
        let raise = match mark.change {
            Change::CoolUntil { until, reason } => {
                let left = until.saturating_since(WallTime::from_system(wall));
                let left_ns = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
                let deadline = now_ns.saturating_add(left_ns).min(MAX_DEADLINE_NS);
                if deadline <= now_ns {
                    // Already over: nothing to apply (but a newer generation still counts).
                    Raise::Nothing
                } else {
                    Raise::Word((deadline << REASON_BITS) | cool_code(reason))
                }
            }
            Change::Disable { reason } => Raise::Word(DISABLED_FLOOR + disable_code(reason)),
            Change::Enable => Raise::Nothing,
        };
        // Disabling is always key-wide (SPEC §11.2); so is an enable.
        let family = match mark.change {
            Change::CoolUntil { .. } => mark.family(),
            Change::Disable { .. } | Change::Enable => None,
        };
        let (prev, next) = self.merge(i, mark.generation, raise, family);
        transition(self.decode(prev, now_ns), self.decode(next, now_ns))
    }

    /// Merges `(generation, raise)` into key `i`'s state by lexicographic maximum — into its
    /// word, or into its word for `family` — and returns that word before and after; for a
    /// family, the state requests of that family see (the later of the key's word and the
    /// family's, as [`family_state`](Self::family_state) reads it), so that a family cooldown
    /// of a disabled key changes nothing, as a key-wide one does not. The only code that writes
    /// a state word, a family word or a generation.
    ///
    /// A key's state is `(generation, word, family words)`: a newer generation clears all of
    /// them first; within a generation each word only grows.
    fn merge(&self, i: usize, generation: u64, raise: Raise, family: Option<Family>) -> (u64, u64) {
        let _lock = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.generations[i].load(Ordering::Acquire);
        // No slot left for the family: the key rests for every family (the safe side).
        let slot = family.and_then(|f| self.family_slot_or_insert(f));
        let cell = match slot {
            Some(slot) => &self.family_words[i * FAMILY_SLOTS + slot],
            None => &self.words[i],
        };
        let prev = cell.load(Ordering::Acquire);
        if generation < current {
            return (prev, prev);
        }
        let key_prev = self.words[i].load(Ordering::Acquire);
        let base = if generation > current {
            self.generations[i].store(generation, Ordering::Release);
            self.words[i].store(0, Ordering::Release);
            for w in &self.family_words[i * FAMILY_SLOTS..(i + 1) * FAMILY_SLOTS] {
                w.store(0, Ordering::Release);
            }
            0
        } else {
            prev
        };
        let next = match raise {
            Raise::Word(word) => base.max(word),
            Raise::Nothing => base,
        };
        if slot.is_some() && next != 0 {
            self.extras.fetch_or(EXTRA_FAMILY, Ordering::AcqRel);
        }
        cell.store(next, Ordering::Release);
        match slot {
            Some(_) => (
                key_prev.max(prev),
                self.words[i].load(Ordering::Acquire).max(next),
            ),
            None => (prev, next),
        }
    }

    /// The mark that cools `id` for requests of `family` only, for `duration` from `wall`.
    pub fn family_cool_mark(
        &self,
        id: KeyId,
        family: Family,
        wall: SystemTime,
        duration: Duration,
        reason: CoolReason,
    ) -> Mark {
        Mark {
            target: Target::KeyFamily(self.fingerprint(id), family),
            ..self.cool_mark(id, wall, duration, reason)
        }
    }

    /// The state of `id` for requests of `family`: its key-wide state, or its family cooldown
    /// when that is the later one.
    pub fn family_state(&self, id: KeyId, family: Family, now: Instant) -> KeyState {
        let Some(slot) = self.family_slot(family) else {
            return self.state(id, now);
        };
        let word = self.word(id).max(self.family_word(id.0, slot));
        self.decode_state(word, now)
    }

    /// Every family cooldown of `id` that is running at `now`: `(family, until, reason)`.
    pub fn family_cooldowns(&self, id: KeyId, now: Instant) -> Vec<(Family, Instant, CoolReason)> {
        let now_ns = self.now_ns(now);
        (0..FAMILY_SLOTS)
            .filter_map(|f| {
                let family = self.families[f].load(Ordering::Acquire);
                let word = self.family_words[id.0 * FAMILY_SLOTS + f].load(Ordering::Acquire);
                match self.decode(word, now_ns) {
                    RawState::Cooling(deadline) if family != 0 => Some((
                        Family::from_raw(family),
                        self.origin + Duration::from_nanos(deadline),
                        cool_reason(word & REASON_MASK),
                    )),
                    _ => None,
                }
            })
            .collect()
    }

    /// A soft hint (SPEC §11.4): `id` is less preferred — for every request, or for requests of
    /// `family` — until `until`. Walks try keys without a hint first but still use a hinted key
    /// when no other key is available; a hint never refuses a call and never touches the hard
    /// state. A reset that moves by less than 2 s changes nothing. Returns whether it changed.
    /// Hints are local to the process (each replica reads its own answers' headers).
    pub fn hint(&self, id: KeyId, family: Option<Family>, until: Instant, now: Instant) -> bool {
        let now_ns = self.now_ns(now);
        let until_ns = self.now_ns(until);
        if until_ns <= now_ns {
            return false;
        }
        let offset = match family {
            None => 0,
            Some(f) => {
                let _lock = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
                match self.family_slot_or_insert(f) {
                    Some(slot) => 1 + slot,
                    None => 0,
                }
            }
        };
        let cell = &self.hints[id.0 * (1 + FAMILY_SLOTS) + offset];
        let current = cell.load(Ordering::Acquire);
        if current > now_ns && until_ns < current.saturating_add(HINT_JITTER_NS) {
            return false;
        }
        self.extras.fetch_or(EXTRA_HINT, Ordering::AcqRel);
        cell.fetch_max(until_ns, Ordering::AcqRel) < until_ns
    }

    /// Every soft hint `id` carries at `now`: `(None, until)` for a key-wide one, `(Some(family),
    /// until)` for a family's (for admin views).
    pub fn hints(&self, id: KeyId, now: Instant) -> Vec<(Option<Family>, Instant)> {
        let now_ns = self.now_ns(now);
        let base = id.0 * (1 + FAMILY_SLOTS);
        (0..=FAMILY_SLOTS)
            .filter_map(|slot| {
                let until = self.hints[base + slot].load(Ordering::Acquire);
                if until <= now_ns {
                    return None;
                }
                let family = match slot {
                    0 => None,
                    s => match self.families[s - 1].load(Ordering::Acquire) {
                        0 => return None,
                        raw => Some(Family::from_raw(raw)),
                    },
                };
                Some((family, self.origin + Duration::from_nanos(until)))
            })
            .collect()
    }

    /// Whether `id` carries a soft hint at `now` (key-wide, or for `family`).
    pub fn is_hinted_at(&self, id: KeyId, family: Option<Family>, now: Instant) -> bool {
        let slot = family.and_then(|f| self.family_slot(f));
        self.is_hinted(id.0, slot, self.now_ns(now))
    }

    /// Records the organisation and workspace an answer of `id` named (SPEC §11.1). The first
    /// answer that names them wins; returns whether this one taught the pool something new.
    pub fn learn_scope(&self, id: KeyId, organisation: &str, workspace: Option<&str>) -> bool {
        let cell = &self.scopes[id.0];
        if cell.get().is_some() {
            return false;
        }
        cell.set(Scope {
            organisation: organisation.into(),
            workspace: workspace.map(Into::into),
        })
        .is_ok()
    }

    /// The organisation and workspace of `id`, once learnt.
    pub fn scope(&self, id: KeyId) -> Option<&Scope> {
        self.scopes[id.0].get()
    }

    /// The keys known to share `id`'s organisation and workspace (SPEC §11.1), `id` included;
    /// just `id` while its organisation is unknown. A key of the same organisation whose
    /// workspace differs (or is unknown while `id`'s is known) is not among them.
    pub fn same_scope(&self, id: KeyId) -> Vec<KeyId> {
        let Some(scope) = self.scope(id) else {
            return vec![id];
        };
        self.ids().filter(|&k| self.scope(k) == Some(scope)).collect()
    }

    /// The keys known to share `id`'s organisation, whatever their workspace, `id` included;
    /// just `id` while its organisation is unknown. A spend cap or an empty wallet is the
    /// organisation's (SPEC §11.3).
    pub fn same_organisation(&self, id: KeyId) -> Vec<KeyId> {
        let Some(scope) = self.scope(id) else {
            return vec![id];
        };
        self.ids()
            .filter(|&k| {
                self.scope(k)
                    .is_some_and(|s| s.organisation == scope.organisation)
            })
            .collect()
    }

    /// The one organisation every key of the pool belongs to, once every key's organisation is
    /// known and they are all the same (SPEC §11.1: failing over on 429 buys little then).
    pub fn single_organisation(&self) -> Option<&str> {
        let first = self.scopes.first()?.get()?;
        self.scopes
            .iter()
            .all(|s| s.get().is_some_and(|s| s.organisation == first.organisation))
            .then_some(&*first.organisation)
    }

    /// The mark that cools `id` for `duration` from the clock readings `(now, wall)`: used with
    /// [`apply`](Self::apply) and the same readings, the key cools for exactly `duration`.
    pub fn cool_mark(&self, id: KeyId, wall: SystemTime, duration: Duration, reason: CoolReason) -> Mark {
        self.mark_for(
            id,
            Change::CoolUntil {
                until: WallTime::from_system(wall).saturating_add(duration),
                reason,
            },
        )
    }

    /// A mark of `change` for `id` at the key's current generation.
    pub fn mark_for(&self, id: KeyId, change: Change) -> Mark {
        Mark {
            target: Target::Key(self.fingerprint(id)),
            change,
            status: None,
            generation: self.generation(id),
        }
    }

    /// The operator's enable of `id`: a mark one generation above the key's, which overrides
    /// every mark made before it, wherever and whenever it is applied.
    pub fn enable_mark(&self, id: KeyId) -> Mark {
        Mark {
            target: Target::Key(self.fingerprint(id)),
            change: Change::Enable,
            status: None,
            generation: self.generation(id).saturating_add(1),
        }
    }

    /// Cools `id` down for `duration` from `now`, unless it is already cooling longer or is
    /// disabled. Cooldowns only grow. (A local convenience over [`apply`](Self::apply).)
    pub fn cool_down(&self, id: KeyId, now: Instant, duration: Duration, reason: CoolReason) -> Transition {
        // Any wall reading works here: the mark is made and applied with the same one.
        let wall = SystemTime::UNIX_EPOCH;
        self.apply(&self.cool_mark(id, wall, duration, reason), now, wall)
    }

    /// Disables `id` until [`enable`](Self::enable). Disabling a disabled key changes nothing.
    pub fn disable(&self, id: KeyId, reason: DisableReason) -> Transition {
        let mark = self.mark_for(id, Change::Disable { reason });
        // A disable needs no clock: any readings give the same result.
        self.apply(&mark, self.origin, SystemTime::UNIX_EPOCH)
    }

    /// Makes `id` available again, clearing a disabled state or a cooldown (operator action).
    pub fn enable(&self, id: KeyId, now: Instant) -> Transition {
        self.apply(&self.enable_mark(id), now, SystemTime::UNIX_EPOCH)
    }

    /// Every key's label, hint and state at `now`, for metrics and admin views.
    pub fn snapshot(&self, now: Instant) -> Vec<KeySnapshot> {
        self.ids()
            .map(|id| KeySnapshot {
                id,
                label: self.label(id).to_owned(),
                hint: self.secret(id).hint().to_owned(),
                fingerprint: self.fingerprint(id),
                generation: self.generation(id),
                state: self.state(id, now),
            })
            .collect()
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("keys", &self.keys.iter().map(|e| &*e.label).collect::<Vec<_>>())
            .field("order", &self.order)
            .finish_non_exhaustive()
    }
}

/// What a mark does to a state word.
#[derive(Debug, Clone, Copy)]
enum Raise {
    /// Raise the word to at least this.
    Word(u64),
    /// Nothing beyond the generation (an enable, or a cooldown that is already over).
    Nothing,
}

/// The transition from one decoded state to the next (SPEC §2 vocabulary).
fn transition(prev: RawState, next: RawState) -> Transition {
    match (prev, next) {
        (RawState::Cooling(a), RawState::Cooling(b)) if b > a => Transition::Extended,
        // Shorter only after an enable of a newer generation: a new cooldown.
        (RawState::Cooling(a), RawState::Cooling(b)) if b < a => Transition::Entered,
        (RawState::Cooling(_), RawState::Cooling(_))
        | (RawState::Disabled(_), RawState::Disabled(_))
        | (RawState::Available, RawState::Available) => Transition::Unchanged,
        _ => Transition::Entered,
    }
}

/// A state word decoded against a `now`, in the pool's nanosecond time base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawState {
    Available,
    /// Deadline in ns since the origin (strictly after `now`).
    Cooling(u64),
    /// Disable reason code.
    Disabled(u64),
}

fn cool_code(r: CoolReason) -> u64 {
    match r {
        CoolReason::RateLimited => 0,
        CoolReason::Auth => 1,
        CoolReason::Overloaded => 2,
        CoolReason::SpendCapped => 3,
    }
}

fn cool_reason(code: u64) -> CoolReason {
    match code {
        1 => CoolReason::Auth,
        2 => CoolReason::Overloaded,
        3 => CoolReason::SpendCapped,
        _ => CoolReason::RateLimited,
    }
}

fn disable_code(r: DisableReason) -> u64 {
    match r {
        DisableReason::Unauthorized => 0,
        DisableReason::Forbidden => 1,
        DisableReason::Billing => 2,
        DisableReason::Operator => 3,
    }
}

fn disable_reason(code: u64) -> DisableReason {
    match code {
        0 => DisableReason::Unauthorized,
        1 => DisableReason::Forbidden,
        2 => DisableReason::Billing,
        _ => DisableReason::Operator,
    }
}
