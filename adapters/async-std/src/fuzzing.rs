//! Fuzz entry points (cargo-fuzz targets in `fuzz/` call these), compiled with the `fuzzing`
//! feature so that ordinary builds check they still compile.

use bytes::BytesMut;

use crate::h1::{self, BodyDecoder, Decoded, Framing};

/// Decodes `data` as a response: the first byte picks the body framing (or a whole response
/// with a head), the second a split size. Checks that feeding the same bytes whole and in
/// pieces gives the same body and the same ending, and that a body never ends silently short.
pub fn response_decoder(data: &[u8]) {
    let [mode, step, rest @ ..] = data else {
        return;
    };
    let step = usize::from(*step % 17) + 1;
    let framing = match mode % 4 {
        0 => Framing::Chunked,
        1 => Framing::Close,
        2 => Framing::Length(step as u64 * 3),
        _ => {
            // A whole head: parsing it must never panic, and it consumes only what it parsed.
            let mut buf = BytesMut::from(rest);
            if let Ok(Some(_)) = h1::parse_head(&mut buf, mode & 4 != 0) {
                assert!(buf.len() < rest.len());
            }
            return;
        }
    };
    let whole = decode(framing, &[rest]);
    let pieces: Vec<&[u8]> = rest.chunks(step).collect();
    assert_eq!(decode(framing, &pieces), whole, "split every {step} bytes");
    let bytes: Vec<&[u8]> = rest.chunks(1).collect();
    assert_eq!(decode(framing, &bytes), whole, "byte at a time");
    if let (body, Ok(true)) = &whole {
        assert!(body.len() <= rest.len());
        if let Framing::Length(n) = framing {
            assert_eq!(body.len() as u64, n);
        }
    }
}

/// The body, and how it ended: `Ok(true)` complete, `Ok(false)` ended by EOF (close-delimited),
/// `Err` broken.
fn decode(framing: Framing, parts: &[&[u8]]) -> (Vec<u8>, Result<bool, keypool_core::call::TransportError>) {
    let mut decoder = BodyDecoder::new(framing);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    for part in parts {
        buf.extend_from_slice(part);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(bytes)) => {
                    assert!(!bytes.is_empty(), "empty data");
                    body.extend_from_slice(&bytes);
                }
                Ok(Decoded::End) => return (body, Ok(true)),
                Ok(Decoded::NeedMore) => break,
                Err(e) => return (body, Err(e)),
            }
        }
    }
    let end = decoder.finish().map(|()| false);
    assert!(
        framing == Framing::Close || end.is_err(),
        "EOF accepted before the end"
    );
    (body, end)
}
