//! Who may use the gateway, and with whose key (SPEC §7 "Access control").

use std::borrow::Cow;

use http::HeaderMap;
use keypool_core::{Profile, Secret};

/// How a request is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// From the pool (the client's credential, if any, is stripped by the call).
    Pool,
    /// With the client's own credential, once (bring your own key).
    Byok,
    /// Refused: `401 authentication_error` with this message.
    Denied(Cow<'static, str>),
}

/// The gateway's client tokens and BYOK switch.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Tokens that are served from the pool. Empty: loopback mode.
    pub tokens: Vec<Secret>,
    /// Whether a credential that is not a client token is forwarded as the caller's own key.
    pub allow_byok: bool,
}

/// The credential a client presented, where the profile's clients put it (Anthropic:
/// `x-api-key`, else `Authorization: Bearer`).
pub fn presented<'h>(profile: &Profile, headers: &'h HeaderMap) -> Option<&'h [u8]> {
    profile.client_credential(headers)
}

impl AccessPolicy {
    /// Decides how to serve a request with these headers, for a pool of the default profile:
    /// [`decide_for`](Self::decide_for) with [`Profile::anthropic`].
    pub fn decide(&self, headers: &HeaderMap) -> Access {
        self.decide_for(&Profile::anthropic(), headers)
    }

    /// Decides how to serve a request with these headers, for a pool of this profile.
    pub fn decide_for(&self, profile: &Profile, headers: &HeaderMap) -> Access {
        if self.tokens.is_empty() && !self.allow_byok {
            // Open to every client, always with the pool: what a client presents is not read.
            return Access::Pool;
        }
        let credential = presented(profile, headers);
        if self.tokens.is_empty() {
            return match credential {
                Some(_) if self.allow_byok => Access::Byok,
                _ => Access::Pool,
            };
        }
        let Some(credential) = credential else {
            return Access::Denied(Cow::Owned(format!(
                "this gateway needs a client token in {}",
                profile.credential_help()
            )));
        };
        // Compare against every token, so timing does not tell which one matched.
        let matched = self.tokens.iter().fold(false, |acc, t| acc | t.ct_eq(credential));
        match (matched, self.allow_byok) {
            (true, _) => Access::Pool,
            (false, true) => Access::Byok,
            (false, false) => Access::Denied(Cow::Borrowed("the client token is not valid for this gateway")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn loopback_mode() {
        let p = AccessPolicy::default();
        assert_eq!(p.decide(&headers(&[])), Access::Pool);
        assert_eq!(p.decide(&headers(&[("x-api-key", "whatever")])), Access::Pool);
        let p = AccessPolicy {
            allow_byok: true,
            ..p
        };
        assert_eq!(p.decide(&headers(&[("x-api-key", "own-key")])), Access::Byok);
        assert_eq!(p.decide(&headers(&[])), Access::Pool);
    }

    #[test]
    fn tokens() {
        let p = AccessPolicy {
            tokens: vec![
                Secret::new("team-token-1").unwrap(),
                Secret::new("team-token-2").unwrap(),
            ],
            allow_byok: false,
        };
        assert_eq!(p.decide(&headers(&[("x-api-key", "team-token-2")])), Access::Pool);
        assert_eq!(
            p.decide(&headers(&[("authorization", "Bearer team-token-1")])),
            Access::Pool
        );
        assert!(matches!(p.decide(&headers(&[])), Access::Denied(_)));
        assert!(matches!(
            p.decide(&headers(&[("x-api-key", "other")])),
            Access::Denied(_)
        ));
        let p = AccessPolicy {
            allow_byok: true,
            ..p
        };
        assert_eq!(p.decide(&headers(&[("x-api-key", "sk-own")])), Access::Byok);
        assert!(matches!(p.decide(&headers(&[])), Access::Denied(_)));
    }
}
