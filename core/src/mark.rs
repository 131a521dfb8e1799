//! Key identity and portable marks (SPEC §9).
//!
//! A key is known outside its process by its [`Fingerprint`]: a truncated SHA-256 of a domain
//! tag and the secret. It is the same in every process, in every order of the key list and after
//! every reload, it cannot be turned back into the key, and it shares nothing with the hint.
//!
//! A [`Mark`] is one change of one key's state as a value: which key, what (cool until an
//! absolute wall-clock deadline, disable with a reason, or enable), why (the upstream status),
//! and the key's *generation*. Every change of key state goes through
//! [`Pool::apply`](crate::Pool::apply): a call's verdict, an operator's enable or disable, a
//! mark received from another replica, a probe.
//!
//! ## Why marks commute
//!
//! A key's state is the pair `(generation, word)`, where the word orders states as "available <
//! cooling until `t` (later is larger) < disabled". Applying a mark is the lexicographic maximum
//! of the pair and the mark's own pair, and a maximum does not care about order. A cooldown or a
//! disable carries the generation the key had when its request was sent, so it only ever raises
//! the word within that generation. An [`Change::Enable`] carries a generation one above the
//! key's, and its word is "available": it wins over every mark of older generations, whenever
//! they arrive, and loses to every mark made after it (which carries the new generation).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::pool::{CoolReason, DisableReason};
use crate::secret::Secret;

/// Domain tag of the fingerprint hash, so a fingerprint is never the plain SHA-256 of a key that
/// some other system might also publish.
const FINGERPRINT_TAG: &[u8] = b"keypool/key-fingerprint/v1\0";

/// The stable identity of a key: the first 128 bits of `SHA-256(tag || secret)`.
///
/// Safe to log, publish and store (it is not reversible to the key and contains no part of it);
/// `Display` is 32 lowercase hex digits.
///
/// ```
/// use keypool_core::{Fingerprint, Secret};
/// let a = Fingerprint::of(&Secret::new("sk-ant-api03-abcdefgh").unwrap());
/// let b = Fingerprint::of(&Secret::new("sk-ant-api03-abcdefgh").unwrap());
/// assert_eq!(a, b);
/// assert_eq!(a.to_string().len(), 32);
/// assert_eq!(a.to_string().parse::<Fingerprint>(), Ok(a));
/// assert!(!a.to_string().contains("abcd"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    /// The fingerprint of a key.
    pub fn of(secret: &Secret) -> Self {
        let mut hash = Sha256::new();
        hash.update(FINGERPRINT_TAG);
        hash.update(secret.expose().as_bytes());
        let digest = hash.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        Self(out)
    }

    /// A fingerprint from its 16 bytes (as stored by a state backend).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a fingerprint is 32 hexadecimal digits")]
pub struct FingerprintError;

impl std::str::FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return Err(FingerprintError);
        }
        let mut out = [0u8; 16];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or(FingerprintError)?;
            let lo = hex_digit(pair[1]).ok_or(FingerprintError)?;
            out[i] = hi << 4 | lo;
        }
        Ok(Self(out))
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A wall-clock instant: nanoseconds since the Unix epoch (until the year 2554).
///
/// Marks carry absolute wall-clock deadlines so that every process agrees on them up to its
/// clock skew. Nanoseconds keep a local mark exact (a cooldown of `d` made and applied with the
/// same clock readings ends exactly `d` later); a shared store keeps milliseconds
/// ([`unix_millis_ceil`](Self::unix_millis_ceil)), which can only lengthen a cooldown by less
/// than a millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WallTime(u64);

impl WallTime {
    /// The Unix epoch.
    pub const EPOCH: Self = Self(0);

    /// A `SystemTime` as a wall time; times before the epoch are the epoch, times after 2554 the
    /// latest representable instant.
    pub fn from_system(t: SystemTime) -> Self {
        let nanos = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Self(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Milliseconds since the epoch as a wall time.
    pub fn from_unix_millis(ms: u64) -> Self {
        Self(ms.saturating_mul(1_000_000))
    }

    /// Nanoseconds since the epoch.
    pub fn unix_nanos(self) -> u64 {
        self.0
    }

    /// Milliseconds since the epoch, rounded up (a deadline never moves earlier).
    pub fn unix_millis_ceil(self) -> u64 {
        self.0.div_ceil(1_000_000)
    }

    /// As a `SystemTime`.
    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.0)
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// How long after `earlier` this is; zero if it is not later.
    pub fn saturating_since(self, earlier: Self) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// What a mark does to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// The key rests until `until` (a no-op if it is already cooling longer or is disabled, or
    /// if `until` has passed).
    CoolUntil {
        /// The wall-clock deadline.
        until: WallTime,
        /// Why.
        reason: CoolReason,
    },
    /// The key takes no traffic until it is enabled.
    Disable {
        /// Why.
        reason: DisableReason,
    },
    /// The key is available again: clears a cooldown or a disabled state. The mark's generation
    /// must be above the key's (see [`Pool::enable_mark`](crate::Pool::enable_mark)).
    Enable,
}

/// Which state a mark changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// One key, by its fingerprint: every request skips it.
    Key(Fingerprint),
    /// One key for one model family (SPEC §11.2): only requests of that family skip it. A
    /// family mark can only cool (disabling is always key-wide); an enable of the key clears its
    /// family marks too.
    KeyFamily(Fingerprint, Family),
}

/// A model family (SPEC §11.2: `opus`, `sonnet`, `haiku`, or a model id without its date), by a
/// 64-bit hash of its name, so that every process names it the same way and marks stay small.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Family(u64);

impl Family {
    /// The family called `name` (e.g. `sonnet`).
    pub fn of(name: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"keypool/model-family/v1\0");
        hash.update(name.as_bytes());
        let digest = hash.finalize();
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest[..8]);
        Self::from_raw(u64::from_be_bytes(out))
    }

    /// A family from its raw value (as stored by a state backend). Zero is reserved; it is
    /// read as one.
    pub fn from_raw(raw: u64) -> Self {
        Self(raw.max(1))
    }

    /// The raw value (never zero).
    pub fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Family({:016x})", self.0)
    }
}

/// One change of key state, as a value that can leave the process (SPEC §9).
///
/// Contains no secret, no hint and no label: only the fingerprint, the change, the upstream
/// status that caused it and the generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark {
    /// Which key.
    pub target: Target,
    /// What happens to it.
    pub change: Change,
    /// The upstream status that caused it, if an upstream answer did.
    pub status: Option<u16>,
    /// The key's generation this mark belongs to (see the [module docs](self)).
    pub generation: u64,
}

impl Mark {
    /// The fingerprint of the key the mark is about.
    pub fn key(&self) -> Fingerprint {
        match self.target {
            Target::Key(fp) | Target::KeyFamily(fp, _) => fp,
        }
    }

    /// The model family the mark is scoped to, if it is.
    pub fn family(&self) -> Option<Family> {
        match self.target {
            Target::Key(_) => None,
            Target::KeyFamily(_, family) => Some(family),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_hex_and_distinct() {
        let a = Fingerprint::of(&Secret::new("sk-ant-api03-aaaaaaaaaaaaaaaa").unwrap());
        let b = Fingerprint::of(&Secret::new("sk-ant-api03-aaaaaaaaaaaaaaab").unwrap());
        assert_ne!(a, b);
        // A fixed vector, so that a change of the derivation (which would split replicas of
        // different versions) cannot go unnoticed.
        assert_eq!(a.to_string(), "659050111a6e0bfd7f3ad5245bc0e328");
        assert_eq!(format!("{a:?}"), format!("Fingerprint({a})"));
        assert_eq!("659050111A6E0BFD7F3AD5245BC0E328".parse::<Fingerprint>(), Ok(a));
        for bad in [
            "",
            "f2c7",
            "g2c7d0c3a5e3a1f3cd1bb4b1c7e0b8b4",
            "659050111a6e0bfd7f3ad5245bc0e328ff",
        ] {
            assert_eq!(bad.parse::<Fingerprint>(), Err(FingerprintError), "{bad}");
        }
    }

    #[test]
    fn wall_times() {
        let t = WallTime::from_system(UNIX_EPOCH + Duration::from_nanos(1_500_000_001));
        assert_eq!(t.unix_nanos(), 1_500_000_001);
        assert_eq!(t.unix_millis_ceil(), 1501);
        assert_eq!(WallTime::from_unix_millis(1501).unix_nanos(), 1_501_000_000);
        assert_eq!(t.to_system(), UNIX_EPOCH + Duration::from_nanos(1_500_000_001));
        assert_eq!(
            WallTime::from_system(UNIX_EPOCH - Duration::from_secs(1)),
            WallTime::EPOCH
        );
        assert_eq!(t.saturating_add(Duration::MAX).unix_nanos(), u64::MAX);
        assert_eq!(WallTime::EPOCH.saturating_since(t), Duration::ZERO);
        assert_eq!(
            t.saturating_since(WallTime::EPOCH),
            Duration::from_nanos(1_500_000_001)
        );
    }
}
