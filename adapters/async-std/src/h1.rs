//! HTTP/1.1 framing, sans-IO: request encoding, response head parsing (`httparse`) and the
//! response body decoder (content-length, chunked with extensions and trailers, close-delimited).
//!
//! Nothing here touches a socket; the connection code feeds bytes in and takes bytes out, and the
//! unit tests (and the `response_decoder` fuzz target) feed the same bytes split anywhere.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use keypool_core::call::{Attempt, TransportError};

/// The largest response head accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most headers a response head may carry.
const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The largest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;

/// The request bytes of an attempt: head and body in one buffer, written with one `write_all`.
/// `prefix` is the base URL's path (empty, or `/something` without a trailing slash).
pub(crate) fn encode_request(attempt: &Attempt, host: &str, prefix: &str) -> Bytes {
    let mut out = Vec::with_capacity(256 + attempt.body.len());
    out.extend_from_slice(attempt.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(attempt.path_and_query.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &attempt.headers {
        // The adapter owns the framing headers of its own connection.
        if name == header::HOST || name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !attempt.body.is_empty() || !(attempt.method == Method::GET || attempt.method == Method::HEAD) {
        out.extend_from_slice(format!("content-length: {}\r\n", attempt.body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&attempt.body);
    Bytes::from(out)
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    /// The status.
    pub(crate) status: StatusCode,
    /// The headers as received.
    pub(crate) headers: HeaderMap,
    /// How the body is framed.
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request once the body is read to its end.
    pub(crate) keep_alive: bool,
}

/// Parses a response head from the front of `buf`. `Ok(None)`: more bytes needed. On success the
/// head's bytes are removed from `buf` (what is left is the start of the body). Interim `1xx`
/// responses are skipped.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    is_head_request: bool,
) -> Result<Option<ResponseHead>, TransportError> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut slots);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(TransportError::Protocol),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(TransportError::Protocol),
        };
        let code = response.code.ok_or(TransportError::Protocol)?;
        let status = StatusCode::from_u16(code).map_err(|_| TransportError::Protocol)?;
        let http11 = response.version == Some(1);
        let mut headers = HeaderMap::with_capacity(response.headers.len());
        for h in response.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| TransportError::Protocol)?;
            let value = HeaderValue::from_bytes(h.value).map_err(|_| TransportError::Protocol)?;
            headers.append(name, value);
        }
        let _ = buf.split_to(len);
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        let framing = framing(status, &headers, is_head_request)?;
        let close = has_token(&headers, header::CONNECTION, "close");
        let keep_alive = !matches!(framing, Framing::Close)
            && if http11 {
                !close
            } else {
                has_token(&headers, header::CONNECTION, "keep-alive")
            };
        return Ok(Some(ResponseHead {
            status,
            headers,
            framing,
            keep_alive,
        }));
    }
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 9112 §6.3: how the length of a response body is determined.
fn framing(
    status: StatusCode,
    headers: &HeaderMap,
    is_head_request: bool,
) -> Result<Framing, TransportError> {
    if is_head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            // Any other final coding: the body runs to the end of the connection.
            _ => Framing::Close,
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.to_str().map_err(|_| TransportError::Protocol)?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(TransportError::Protocol);
            }
            let n: u64 = part.parse().map_err(|_| TransportError::Protocol)?;
            if length.is_some_and(|l| l != n) {
                return Err(TransportError::Protocol);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Exactly this many bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Everything until the server closes the connection.
    Close,
}

/// What the decoder produced from the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Body bytes (never empty).
    Data(Bytes),
    /// The body is complete; bytes after it (if any) are left in the input.
    End,
    /// Every input byte was consumed; read more.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Hex digits of a chunk size (`seen`: at least one digit read).
    Size { size: u64, seen: bool },
    /// Whitespace after the size, before `;` or the line end.
    SizeSpace { size: u64 },
    /// A chunk extension, skipped up to the line end.
    Extension { size: u64 },
    /// A CR ended the size line; LF must follow.
    SizeLf { size: u64 },
    /// Chunk data left to read.
    Data { left: u64 },
    /// After the chunk data: CR (or a bare LF).
    DataCr,
    /// After the chunk data and CR: LF.
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// A CR ended a trailer line; LF must follow.
    TrailerLf,
    /// A CR at the start of a line; LF must follow and ends the body.
    EndLf,
    /// The body is complete.
    Done,
}

/// An incremental response body decoder. Feed it the bytes read so far with [`decode`](Self::decode);
/// call [`finish`](Self::finish) when the connection reaches EOF.
#[derive(Debug, Clone)]
pub(crate) struct BodyDecoder {
    state: State,
    /// Bytes of the current chunk-size line, or of the trailers, to bound them.
    line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunked),
    Close,
}

impl BodyDecoder {
    /// A decoder for this framing.
    pub(crate) fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::Size { size: 0, seen: false }),
            Framing::Close => State::Close,
        };
        Self { state, line: 0 }
    }

    /// Whether the whole body has been decoded.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, State::Length(0) | State::Chunked(Chunked::Done))
    }

    /// Decodes from the front of `input`, removing what it consumed. Returns body bytes as soon
    /// as there are any, [`Decoded::End`] once the body is complete, or [`Decoded::NeedMore`]
    /// when `input` is used up. A malformed chunked body is [`TransportError::Protocol`].
    pub(crate) fn decode(&mut self, input: &mut BytesMut) -> Result<Decoded, TransportError> {
        match &mut self.state {
            State::Length(0) => Ok(Decoded::End),
            State::Length(left) => {
                if input.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(input.len());
                *left -= n as u64;
                Ok(Decoded::Data(input.split_to(n).freeze()))
            }
            State::Close if input.is_empty() => Ok(Decoded::NeedMore),
            State::Close => Ok(Decoded::Data(input.split().freeze())),
            State::Chunked(_) => self.decode_chunked(input),
        }
    }

    fn decode_chunked(&mut self, input: &mut BytesMut) -> Result<Decoded, TransportError> {
        let State::Chunked(mut state) = self.state else {
            return Err(TransportError::Protocol);
        };
        let result = loop {
            if let Chunked::Data { left } = state {
                if input.is_empty() {
                    break Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                let left = left - n as u64;
                state = if left == 0 {
                    Chunked::DataCr
                } else {
                    Chunked::Data { left }
                };
                break Ok(Decoded::Data(input.split_to(n).freeze()));
            }
            if state == Chunked::Done {
                break Ok(Decoded::End);
            }
            let Some(&b) = input.first() else {
                break Ok(Decoded::NeedMore);
            };
            let _ = input.split_to(1);
            match self.step(state, b) {
                Ok(next) => state = next,
                Err(e) => break Err(e),
            }
        };
        self.state = State::Chunked(state);
        result
    }

    /// One control byte of the chunked framing.
    fn step(&mut self, state: Chunked, b: u8) -> Result<Chunked, TransportError> {
        use Chunked::*;
        let bad = Err(TransportError::Protocol);
        if matches!(
            state,
            Size { .. } | SizeSpace { .. } | Extension { .. } | SizeLf { .. }
        ) {
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return bad;
            }
        }
        if matches!(state, TrailerStart | TrailerLine | TrailerLf | EndLf) {
            self.line += 1;
            if self.line > MAX_TRAILERS {
                return bad;
            }
        }
        let size_line_end = |size: u64, line: &mut usize| {
            *line = 0;
            if size == 0 {
                TrailerStart
            } else {
                Data { left: size }
            }
        };
        Ok(match (state, b) {
            (Size { size, .. }, b) if b.is_ascii_hexdigit() => {
                let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                if size > (u64::MAX >> 4) {
                    return bad;
                }
                Size {
                    size: size << 4 | digit,
                    seen: true,
                }
            }
            (Size { seen: false, .. }, _) => return bad,
            (Size { size, .. } | SizeSpace { size }, b' ' | b'\t') => SizeSpace { size },
            (Size { size, .. } | SizeSpace { size }, b';') => Extension { size },
            (Size { size, .. } | SizeSpace { size } | Extension { size }, b'\r') => SizeLf { size },
            (Size { size, .. } | SizeSpace { size } | Extension { size }, b'\n') => {
                size_line_end(size, &mut self.line)
            }
            (Size { .. } | SizeSpace { .. }, _) => return bad,
            (Extension { size }, b) if b == b'\t' || (b >= 0x20 && b != 0x7f) || b >= 0x80 => {
                Extension { size }
            }
            (Extension { .. }, _) => return bad,
            (SizeLf { size }, b'\n') => size_line_end(size, &mut self.line),
            (SizeLf { .. }, _) => return bad,
            (DataCr, b'\r') => DataLf,
            (DataCr | DataLf, b'\n') => Size { size: 0, seen: false },
            (DataCr | DataLf, _) => return bad,
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart | EndLf, b'\n') => Done,
            (EndLf, _) => return bad,
            (TrailerLine, b'\r') => TrailerLf,
            (TrailerLine | TrailerLf, b'\n') => TrailerStart,
            (TrailerStart | TrailerLine, b) if b == b'\t' || b >= 0x20 => TrailerLine,
            (TrailerStart | TrailerLine | TrailerLf, _) => return bad,
            (Data { .. } | Done, _) => return bad,
        })
    }

    /// The connection reached EOF. `Ok(())` when that ends the body (close-delimited, or already
    /// complete); a body cut short is [`TransportError::Eof`], never a silent short body.
    pub(crate) fn finish(&self) -> Result<(), TransportError> {
        match self.state {
            State::Close => Ok(()),
            _ if self.is_done() => Ok(()),
            _ => Err(TransportError::Eof),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Decodes `parts` fed one after another; returns the body and how it ended.
    fn run(framing: Framing, parts: &[&[u8]]) -> (Vec<u8>, Result<bool, TransportError>, Vec<u8>) {
        let mut d = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            buf.extend_from_slice(part);
            loop {
                match d.decode(&mut buf) {
                    Ok(Decoded::Data(b)) => {
                        assert!(!b.is_empty());
                        body.extend_from_slice(&b);
                    }
                    Ok(Decoded::End) => {
                        // What follows the body stays unread, whatever the split.
                        let mut rest = buf.to_vec();
                        rest.extend(parts[i + 1..].iter().flat_map(|p| p.iter()));
                        return (body, Ok(true), rest);
                    }
                    Ok(Decoded::NeedMore) => break,
                    Err(e) => return (body, Err(e), Vec::new()),
                }
            }
        }
        let end = d.finish().map(|()| false);
        (body, end, buf.to_vec())
    }

    /// Every split into two parts, and one byte at a time, give the same result as one piece.
    fn invariant(framing: Framing, wire: &[u8]) -> (Vec<u8>, Result<bool, TransportError>, Vec<u8>) {
        let whole = run(framing, &[wire]);
        for i in 0..=wire.len() {
            assert_eq!(run(framing, &[&wire[..i], &wire[i..]]), whole, "split at {i}");
        }
        for i in 0..=wire.len() {
            for j in i..=wire.len() {
                assert_eq!(
                    run(framing, &[&wire[..i], &wire[i..j], &wire[j..]]),
                    whole,
                    "split at {i}, {j}"
                );
            }
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(run(framing, &bytes), whole, "byte at a time");
        whole
    }

    const CHUNKED: &[u8] = b"5\r\nhello\r\n7;name=value;x=\"q;\"\r\n, world\r\n0\r\n\r\n";

    #[test]
    fn chunked_with_extensions() {
        let (body, end, rest) = invariant(Framing::Chunked, CHUNKED);
        assert_eq!(body, b"hello, world");
        assert_eq!(end, Ok(true));
        assert!(rest.is_empty());
    }

    #[test]
    fn chunked_with_trailers_and_pipelined_rest() {
        let wire = b"A \t;ext\r\n0123456789\r\n1\r\n!\r\n0\r\nx-trailer: one\r\nx-two: 2\r\n\r\nHTTP/1.1";
        let (body, end, rest) = invariant(Framing::Chunked, wire);
        assert_eq!(body, b"0123456789!");
        assert_eq!(end, Ok(true));
        assert_eq!(rest, b"HTTP/1.1");
    }

    #[test]
    fn chunked_bare_lf_and_upper_hex() {
        let (body, end, _) = invariant(Framing::Chunked, b"1F\n0123456789abcdef0123456789abcde\n0\n\n");
        assert_eq!(body.len(), 31);
        assert_eq!(end, Ok(true));
    }

    #[test]
    fn chunked_truncated_anywhere_is_eof() {
        for cut in 0..CHUNKED.len() {
            let (body, end, _) = run(Framing::Chunked, &[&CHUNKED[..cut]]);
            assert_eq!(end, Err(TransportError::Eof), "cut at {cut}");
            assert!(b"hello, world".starts_with(&body));
        }
    }

    #[test]
    fn chunked_malformed_is_protocol() {
        for wire in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\rX",
            b"5 5\r\n",
            b"5;\x01\r\n",
            b"0\r\n\rX",
            b"0\r\nbad\x01trailer\r\n",
            b"10000000000000000\r\n",
        ] {
            let (_, end, _) = invariant(Framing::Chunked, wire);
            assert_eq!(
                end,
                Err(TransportError::Protocol),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn chunked_long_lines_are_bounded() {
        let mut wire = b"1;".to_vec();
        wire.extend(std::iter::repeat_n(b'a', MAX_CHUNK_LINE + 10));
        assert_eq!(run(Framing::Chunked, &[&wire]).1, Err(TransportError::Protocol));
        let mut wire = b"0\r\n".to_vec();
        wire.extend(std::iter::repeat_n(b'a', MAX_TRAILERS + 10));
        assert_eq!(run(Framing::Chunked, &[&wire]).1, Err(TransportError::Protocol));
    }

    #[test]
    fn content_length() {
        let (body, end, rest) = invariant(Framing::Length(5), b"helloEXTRA");
        assert_eq!(
            (body.as_slice(), end, rest.as_slice()),
            (&b"hello"[..], Ok(true), &b"EXTRA"[..])
        );
        let (body, end, _) = invariant(Framing::Length(8), b"hello");
        assert_eq!((body.as_slice(), end), (&b"hello"[..], Err(TransportError::Eof)));
        assert_eq!(run(Framing::Length(0), &[b""]).1, Ok(true));
    }

    #[test]
    fn close_delimited() {
        let (body, end, _) = invariant(Framing::Close, b"all of it\r\n0\r\n\r\n");
        assert_eq!(
            (body.as_slice(), end),
            (&b"all of it\r\n0\r\n\r\n"[..], Ok(false))
        );
    }

    fn head(wire: &[u8]) -> Result<Option<ResponseHead>, TransportError> {
        parse_head(&mut BytesMut::from(wire), false)
    }

    #[test]
    fn heads() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.status.as_u16(), h.framing, h.keep_alive),
            (200, Framing::Length(3), true)
        );
        let h = head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.status.as_u16(), h.framing), (204, Framing::Length(0)));
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert_eq!(head(bad).unwrap_err(), TransportError::Protocol);
        }
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"[..]);
        assert_eq!(
            parse_head(&mut buf, true).unwrap().unwrap().framing,
            Framing::Length(0)
        );
    }

    #[test]
    fn request_encoding() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("k"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let attempt = Attempt {
            number: 1,
            key: None,
            method: Method::POST,
            path_and_query: "/v1/messages?x=1".parse().unwrap(),
            headers,
            body: Bytes::from_static(b"{}"),
        };
        assert_eq!(
            &encode_request(&attempt, "localhost:8080", "/base")[..],
            b"POST /base/v1/messages?x=1 HTTP/1.1\r\nhost: localhost:8080\r\nx-api-key: k\r\ncontent-length: 2\r\n\r\n{}"
        );
    }
}
