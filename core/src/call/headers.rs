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

/// Removes every header whose name is `unwanted`. The names are scanned (a comparison or two
/// each) instead of hashing every unwanted name for a removal that mostly finds nothing; only
/// the names found are removed.
fn remove_where(headers: &mut HeaderMap, unwanted: impl Fn(&HeaderName) -> bool) {
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

/// Removes hop-by-hop headers, including every header named in `Connection`. Most responses
/// carry none (`Connection` among them): one scan of the names, no lookup, settles that.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    strip_connection_named(headers);
    remove_where(headers, is_hop_by_hop);
}

/// Removes the headers that `Connection` names (the hop-by-hop ones are removed by name).
fn strip_connection_named(headers: &mut HeaderMap) {
    for name in &connection_named(headers) {
        headers.remove(name);
    }
}

/// The headers every attempt of a call sends, before the key is added: the client's, less
/// hop-by-hop headers (and every header `Connection` names), `host` and `content-length` (the
/// adapter sets both for its connection), `accept-encoding` (keypool reads event streams, so
/// the upstream must answer uncompressed) and the client credential headers (the profile's, or
/// none).
///
/// The client's map is kept as it came and filtered as each attempt copies it: removing the
/// unwanted names up front would hash and remove each of them (usually three: `host`,
/// `content-length`, a credential) only for the attempt to copy the map once more anyway. Its
/// `Debug` shows the forwarded names alone, never a value: the client's credential stays in
/// the map.
pub(crate) struct Outbound {
    /// As the client sent them.
    headers: HeaderMap,
    /// The client credential headers not to forward.
    credentials: &'static [HeaderName],
    /// The headers `Connection` names (usually none: no allocation).
    connection_named: Vec<HeaderName>,
}

impl Outbound {
    pub(crate) fn new(headers: HeaderMap, credentials: &'static [HeaderName]) -> Self {
        Self {
            connection_named: connection_named(&headers),
            headers,
            credentials,
        }
    }

    /// Whether an attempt forwards headers named `name`.
    fn forwards(&self, name: &HeaderName) -> bool {
        !(is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::ACCEPT_ENCODING
            || self.credentials.contains(name)
            || self.connection_named.contains(name))
    }

    /// A new map of the forwarded headers, with room for `more` headers still to come.
    pub(crate) fn to_map(&self, more: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.headers.len() + more);
        for (name, value) in &self.headers {
            if self.forwards(name) {
                map.append(name.clone(), value.clone());
            }
        }
        map
    }
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.headers.keys().filter(|name| self.forwards(name)))
            .finish()
    }
}

/// The names `Connection` lists (its values are comma-separated names). A message rarely
/// carries `Connection` (HTTP/1.1 keep-alive is the default, HTTP/2 forbids it): a scan of the
/// names, no lookup, settles that, and then nothing is allocated.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    if !headers.keys().any(|name| name == header::CONNECTION) {
        return Vec::new();
    }
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// Whether a response is a server-sent event stream: its `content-type` is
/// `text/event-stream` (any case), with or without parameters. Read as bytes: every answer is
/// asked, and most say `application/json`, which the first byte settles.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    const MIME: &[u8] = b"text/event-stream";
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let value = value.as_bytes().trim_ascii_start();
    let Some((mime, rest)) = value.split_at_checked(MIME.len()) else {
        return false;
    };
    mime.eq_ignore_ascii_case(MIME) && matches!(rest.trim_ascii_start().first(), None | Some(b';'))
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
        static CREDENTIALS: [HeaderName; 2] = crate::profile::anthropic::CREDENTIAL_HEADERS;
        let outbound = Outbound::new(h.clone(), &CREDENTIALS);
        let out = outbound.to_map(0);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key("anthropic-version"));
        // Its Debug names what is forwarded, and shows no value (the client's key is in it).
        let debug = format!("{outbound:?}");
        assert_eq!(debug, r#"["anthropic-version"]"#);
        let out = Outbound::new(h, &[]).to_map(0);
        assert!(out.contains_key("x-api-key") && out.contains_key("authorization"));
        assert!(!out.contains_key("x-custom") && !out.contains_key("connection"));
    }

    #[test]
    fn a_response_loses_its_hop_by_hop_headers_and_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-trace", "1".parse().unwrap());
        let untouched = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, untouched);
        h.insert("connection", "x-trace".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("content-type"));
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
        for (value, stream) in [
            ("text/event-stream", true),
            (" TEXT/Event-Stream ", true),
            ("text/event-stream ;charset=utf-8", true),
            ("text/event-streams", false),
            ("text/event-stream-x; a=b", false),
            ("text/event", false),
            ("", false),
            ("text/plain; x=text/event-stream", false),
        ] {
            h.insert("content-type", value.parse().unwrap());
            assert_eq!(is_event_stream(&h), stream, "{value:?}");
        }
    }
}
