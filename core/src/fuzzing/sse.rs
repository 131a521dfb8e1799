//! Fuzz bodies for `keypool_core::sse`: chunking invariance under small limits, framer/parser
//! agreement, and the encode -> parse round trip.

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};

use crate::sse::{EncodeError, Encoder, Event, Framer, Limits, Parser, SseError};

/// Small limits so that the fuzzer reaches them.
const LIMITS: Limits = Limits::new().with_max_line(64).with_max_event(256);

type Outcome = (Vec<Result<Event, SseError>>, bool);

fn parse<'a>(limits: Limits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut parser = Parser::with_limits(limits);
    let mut out = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        if i % 2 == 0 {
            parser.feed(&Bytes::copy_from_slice(chunk));
        } else {
            parser.feed_slice(chunk);
        }
        assert!(
            parser.buffered_len() <= limits.max_line() + limits.max_event(),
            "parser buffers {} bytes",
            parser.buffered_len()
        );
        out.extend(std::iter::from_fn(|| parser.next_event()));
    }
    let discarded = parser.finish();
    out.extend(std::iter::from_fn(|| parser.next_event()));
    (out, discarded)
}

/// Splits `data` into a header that picks chunk sizes and the stream itself.
fn chunks(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = usize::from(n % 8).min(rest.len());
    let (sizes, input) = rest.split_at(n);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < input.len() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(input.len(), |&s| usize::from(s) + 1);
        let end = (pos + size).min(input.len());
        out.push(&input[pos..end]);
        pos = end;
        i += 1;
    }
    (out, input)
}

/// Frames with their names, whether the framer failed, and the leftover.
type Framed = (Vec<(Bytes, Option<String>)>, bool, Option<Bytes>);

/// Cuts `chunked` with a framer (events up to 1 KiB). `late`: after each
/// feed take only as many frames as the chunk's length modulo 3 (the rest wait across the next
/// feeds), keeping every other one and only copying what the others show.
fn cut(chunked: &[&[u8]], late: bool) -> Framed {
    let mut framer = Framer::with_limits(Limits::new().with_max_event(1024));
    let mut frames = Vec::new();
    let mut failed = false;
    let mut take = |framer: &mut Framer, most: usize| {
        for _ in 0..most {
            let Some(frame) = framer.next_frame() else {
                break;
            };
            match frame {
                Ok(frame) => {
                    let name = frame.name().map(str::to_owned);
                    let bytes = if late && frames.len() % 2 == 1 {
                        Bytes::copy_from_slice(frame.bytes())
                    } else {
                        frame.into_bytes()
                    };
                    frames.push((bytes, name));
                }
                Err(SseError::EventTooLarge { .. }) => failed = true,
                Err(other) => panic!("unexpected framer error {other:?}"),
            }
        }
    };
    for chunk in chunked {
        framer.feed_slice(chunk);
        assert!(framer.buffered_len() <= 1024);
        take(&mut framer, if late { chunk.len() % 3 } else { usize::MAX });
    }
    let left = framer.finish();
    take(&mut framer, usize::MAX);
    (frames, failed, left)
}

/// Arbitrary bytes, split at points taken from the input: the same events as a one-shot
/// parse (small limits included), bounded buffers, and frames that parse to the same events.
pub fn sse(data: &[u8]) {
    let (chunked, input) = chunks(data);
    for limits in [LIMITS, Limits::new()] {
        let whole = parse(limits, [input]);
        assert_eq!(parse(limits, chunked.iter().copied()), whole);
        assert_eq!(parse(limits, input.chunks(1)), whole);
    }

    let (frames, failed, left) = cut(&chunked, false);
    // Frames taken late (across later feeds) or only looked at are the same frames.
    assert_eq!(cut(&chunked, true), (frames.clone(), failed, left.clone()));
    let frames: Vec<Bytes> = frames.into_iter().map(|(bytes, _)| bytes).collect();
    let joined: Vec<u8> = frames.concat();
    assert!(input.starts_with(&joined));
    if !failed {
        let mut all = joined.clone();
        all.extend_from_slice(left.as_deref().unwrap_or_default());
        assert!(all == input || (input.ends_with(b"\r\n") && all == input[..input.len() - 1]));
    }
    let (want, _) = parse(Limits::new(), [input]);
    let (got, _) = parse(Limits::new(), [&joined[..]]);
    assert_eq!(got[..], want[..got.len()]);
    if !failed {
        // Whatever the leftover holds, it completes no event.
        assert_eq!(got.len(), want.len());
    }
}

#[derive(Debug, Arbitrary)]
struct FuzzEvent {
    event_type: String,
    data: String,
    id: String,
    retry: Option<u64>,
}

/// Events built from the input: encoding either fails for the documented reasons or parses
/// back to the same events.
pub fn sse_roundtrip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(events) = Vec::<FuzzEvent>::arbitrary(&mut u) else {
        return;
    };
    let mut encoder = Encoder::new();
    let mut out = BytesMut::new();
    let mut want = Vec::new();
    for e in events {
        let mut event = Event::new(e.data.clone())
            .with_event_type(e.event_type.clone())
            .with_id(e.id.clone());
        if let Some(retry) = e.retry {
            event = event.with_retry(retry);
        }
        let newline = |s: &str| s.contains(['\r', '\n']);
        match encoder.encode(&event, &mut out) {
            Ok(()) => {
                assert!(!newline(&e.event_type) && !newline(&e.id) && !e.id.contains('\0'));
                let data = e.data.replace("\r\n", "\n").replace('\r', "\n");
                let mut expected = Event::new(data).with_event_type(e.event_type).with_id(e.id);
                if let Some(retry) = e.retry {
                    expected = expected.with_retry(retry);
                }
                want.push(expected);
            }
            Err(EncodeError::NewlineInEventType) => assert!(newline(&e.event_type)),
            Err(EncodeError::NewlineInId) => assert!(newline(&e.id)),
            Err(EncodeError::NulInId) => assert!(e.id.contains('\0')),
        }
    }
    let split = u.arbitrary::<usize>().unwrap_or(0) % (out.len() + 1);
    let (got, discarded) = parse(Limits::new(), [&out[..split], &out[split..]]);
    assert!(!discarded);
    let got: Vec<Event> = got
        .into_iter()
        .map(|e| e.unwrap_or_else(|err| panic!("no limit is reached, got {err}")))
        .collect();
    assert_eq!(got, want);
}
