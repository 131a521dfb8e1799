//! API-key secrets, their printable hints, and labels (SPEC §2).
//!
//! A [`Secret`] is the only type in keypool that holds raw key material. It has no `Display`,
//! its `Debug` prints the [hint](Secret::hint), and the header value it produces is marked
//! sensitive so that `http`'s own `Debug` hides it too.

use std::fmt;

use http::HeaderValue;

/// An API key (or a client credential). Never printed: `Debug` shows only the hint.
///
/// ```
/// use keypool_core::Secret;
/// let key = Secret::new("sk-ant-api03-abcdefgh").unwrap();
/// assert_eq!(format!("{key:?}"), "Secret(sk-a...efgh)");
/// assert_eq!(key.hint(), "sk-a...efgh");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret {
    value: Box<str>,
    hint: Box<str>,
    /// The key as a sensitive header value, made once: every attempt sends a copy of it, which
    /// shares these bytes instead of copying them.
    header: HeaderValue,
}

/// Why a string cannot be a key. Never carries the secret itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The key is empty or only white space.
    #[error("the key is empty or blank")]
    Blank,
    /// The key contains a byte that cannot appear in an HTTP header value (a control character,
    /// a line break, or a non-visible-ASCII character).
    #[error("the key contains a character that is not allowed in an HTTP header value")]
    NotHeaderValue,
}

impl Secret {
    /// Wraps a key after checking that it can be sent as a header value.
    ///
    /// Leading and trailing white space is an error rather than silently trimmed, because a key
    /// file with a stray space is a mistake the operator should hear about... except that a
    /// key made only of white space is reported as [`SecretError::Blank`].
    pub fn new(value: impl Into<String>) -> Result<Self, SecretError> {
        let value: String = value.into();
        if value.trim().is_empty() {
            return Err(SecretError::Blank);
        }
        // Visible ASCII only: keys are tokens, and this keeps them valid header values.
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecretError::NotHeaderValue);
        }
        let hint = hint_of(&value).into_boxed_str();
        // Cannot fail: visible ASCII only (checked above) is always a valid header value.
        let mut header = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(value.as_bytes()))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        header.set_sensitive(true);
        Ok(Self {
            value: value.into_boxed_str(),
            hint,
            header,
        })
    }

    /// The printable hint (SPEC §2): up to 4 characters at each end for keys of 20 or more
    /// characters, 2 for 10–19, 1 for 5–9, and `...` alone below 5.
    pub fn hint(&self) -> &str {
        &self.hint
    }

    /// The raw key. Call this only to write it into a request header.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The key as a header value, marked sensitive (HPACK never indexes it and `Debug` hides it).
    pub fn header_value(&self) -> HeaderValue {
        self.header.clone()
    }

    /// Compares with a presented credential in time that does not depend on where they differ.
    pub fn ct_eq(&self, presented: &[u8]) -> bool {
        ct_eq(self.value.as_bytes(), presented)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.hint)
    }
}

/// Constant-time equality of two byte strings (the length is not hidden).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // Keep the optimiser from short-circuiting the loop above.
    std::hint::black_box(diff) == 0
}

/// The hint rule of SPEC §2.
fn hint_of(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let n = chars.len();
    let keep = match n {
        20.. => 4,
        10..=19 => 2,
        5..=9 => 1,
        _ => 0,
    };
    let mut out = String::with_capacity(2 * keep + 3);
    out.extend(&chars[..keep]);
    out.push_str("...");
    out.extend(&chars[n - keep..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_rule() {
        let h = |s: &str| Secret::new(s).unwrap().hint().to_owned();
        assert_eq!(h("sk-ant-api03-abcdefgh"), "sk-a...efgh");
        assert_eq!(h("0123456789abcdefghi"), "01...hi");
        assert_eq!(h("0123456789"), "01...89");
        assert_eq!(h("012345678"), "0...8");
        assert_eq!(h("01234"), "0...4");
        assert_eq!(h("0123"), "...");
        assert_eq!(h("a"), "...");
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(Secret::new(""), Err(SecretError::Blank));
        assert_eq!(Secret::new("  \t "), Err(SecretError::Blank));
        assert_eq!(Secret::new("ab\ncd"), Err(SecretError::NotHeaderValue));
        assert_eq!(Secret::new(" abc"), Err(SecretError::NotHeaderValue));
        assert_eq!(Secret::new("abcé"), Err(SecretError::NotHeaderValue));
    }

    #[test]
    fn debug_and_header_hide_the_key() {
        let s = Secret::new("sk-ant-api03-SECRETSECRETSECRET-xyz").unwrap();
        let dbg = format!("{s:?} {:?}", s.header_value());
        assert!(!dbg.contains("SECRET"), "{dbg}");
        assert!(s.header_value().is_sensitive());
        assert_eq!(s.header_value().to_str().unwrap(), s.expose());
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        let s = Secret::new("token-123456").unwrap();
        assert!(s.ct_eq(b"token-123456"));
        assert!(!s.ct_eq(b"token-123457"));
    }
}
