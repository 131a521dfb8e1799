//! Who may use the gateway, and with whose key (SPEC §7 "Access control").

use http::HeaderMap;
use keypool_core::Secret;

/// How a request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// From the pool (the client's credential, if any, is stripped by the call).
    Pool,
    /// With the client's own credential, once (bring your own key).
    Byok,
    /// Refused: `401 authentication_error` with this message.
    Denied(&'static str),
}

/// The gateway's client tokens and BYOK switch.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Tokens that are served from the pool. Empty: loopback mode.
    pub tokens: Vec<Secret>,
    /// Whether a credential that is not a client token is forwarded as the caller's own key.
    pub allow_byok: bool,
}

/// The credential a client presented: `x-api-key`, else `Authorization: Bearer`.
pub fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.as_bytes()).filter(|v| !v.is_empty());
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let token = auth
        .strip_prefix(b"Bearer ")
        .or_else(|| auth.strip_prefix(b"bearer "))?;
    Some(token.trim_ascii()).filter(|t| !t.is_empty())
}

impl AccessPolicy {
    /// Decides how to serve a request with these headers.
    pub fn decide(&self, headers: &HeaderMap) -> Access {
        let credential = presented(headers);
        if self.tokens.is_empty() {
            return match credential {
                Some(_) if self.allow_byok => Access::Byok,
                _ => Access::Pool,
            };
        }
        let Some(credential) = credential else {
            return Access::Denied("this gateway needs a client token in x-api-key or Authorization: Bearer");
        };
        // Compare against every token, so timing does not tell which one matched.
        let matched = self.tokens.iter().fold(false, |acc, t| acc | t.ct_eq(credential));
        match (matched, self.allow_byok) {
            (true, _) => Access::Pool,
            (false, true) => Access::Byok,
            (false, false) => Access::Denied("the client token is not valid for this gateway"),
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
