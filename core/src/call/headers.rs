//! Header hygiene for forwarded requests and delivered responses.

use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy ones; never forwarded in either
/// direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The headers every attempt of a call sends, before the key is added: hop-by-hop headers,
/// `host` and `content-length` (the adapter sets both for its connection), and
/// `accept-encoding` (keypool reads event streams, so the upstream must answer uncompressed)
/// are removed, and so are the client credential headers `credentials` (the profile's, or none).
pub(crate) fn outbound(mut headers: HeaderMap, credentials: &[HeaderName]) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_ENCODING);
    for name in credentials {
        headers.remove(name);
    }
    headers
}

/// Whether a response is a server-sent event stream.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-custom".parse().unwrap());
        h.insert("x-custom", "1".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert("x-api-key", "client".parse().unwrap());
        h.insert("authorization", "Bearer client".parse().unwrap());
        h.insert("host", "gw".parse().unwrap());
        h.insert("accept-encoding", "gzip".parse().unwrap());
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        let out = outbound(h.clone(), &crate::profile::anthropic::CREDENTIAL_HEADERS);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key("anthropic-version"));
        let out = outbound(h, &[]);
        assert!(out.contains_key("x-api-key") && out.contains_key("authorization"));
    }

    #[test]
    fn event_stream() {
        let mut h = HeaderMap::new();
        assert!(!is_event_stream(&h));
        h.insert(
            "content-type",
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        assert!(is_event_stream(&h));
        h.insert("content-type", "application/json".parse().unwrap());
        assert!(!is_event_stream(&h));
    }
}
