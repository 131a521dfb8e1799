//! Header hygiene for forwarded requests and delivered responses.

use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy ones; never forwarded in either
/// direction.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether `name` is hop-by-hop (or `Upgrade`), whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::UPGRADE
}

/// Removes every header whose name is `unwanted`. A map usually holds none or a few of them,
/// so its names are scanned once (a comparison or two each) instead of hashing every unwanted
/// name for a removal that mostly finds nothing; only the names found are removed.
fn remove_where(headers: &mut HeaderMap, unwanted: impl Fn(&HeaderName) -> bool) {
    // Most maps hold none (a response) or three (a request: host, content-length, a key).
    if !headers.keys().any(&unwanted) {
        return;
    }
    loop {
        let mut found: [Option<HeaderName>; 4] = Default::default();
        let mut more = false;
        let mut slots = found.iter_mut();
        for name in headers.keys().filter(|name| unwanted(name)) {
            match slots.next() {
                Some(slot) => *slot = Some(name.clone()),
                None => {
                    more = true;
                    break;
                }
            }
        }
        for name in found.iter().flatten() {
            headers.remove(name);
        }
        if !more {
            return;
        }
    }
}

/// Removes hop-by-hop headers, including every header named in `Connection`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_connection_named(headers);
    remove_where(headers, is_hop_by_hop);
}

/// Removes the headers that `Connection` names (the hop-by-hop ones are removed by name).
fn strip_connection_named(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CONNECTION) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
}

/// The headers every attempt of a call sends, before the key is added: hop-by-hop headers,
/// `host` and `content-length` (the adapter sets both for its connection), and
/// `accept-encoding` (keypool reads event streams, so the upstream must answer uncompressed)
/// are removed, and so are the client credential headers `credentials` (the profile's, or none).
pub(crate) fn outbound(mut headers: HeaderMap, credentials: &[HeaderName]) -> HeaderMap {
    strip_connection_named(&mut headers);
    remove_where(&mut headers, |name| {
        is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::ACCEPT_ENCODING
            || credentials.contains(name)
    });
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
        h.append("accept-encoding", "br".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        let out = outbound(h.clone(), &crate::profile::anthropic::CREDENTIAL_HEADERS);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key("anthropic-version"));
        let out = outbound(h, &[]);
        assert!(out.contains_key("x-api-key") && out.contains_key("authorization"));
    }

    #[test]
    fn more_unwanted_names_than_one_scan_holds_are_all_removed() {
        let mut h = HeaderMap::new();
        for i in 0..20 {
            h.insert(
                HeaderName::from_bytes(format!("x-drop-{i}").as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
            h.insert(
                HeaderName::from_bytes(format!("x-keep-{i}").as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
        }
        remove_where(&mut h, |name| name.as_str().starts_with("x-drop-"));
        assert_eq!(h.len(), 20);
        assert!(h.keys().all(|k| k.as_str().starts_with("x-keep-")));
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
