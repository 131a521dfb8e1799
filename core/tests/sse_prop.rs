//! Properties of `keypool_core::sse`: chunking invariance, framer/parser agreement, and the
//! encode -> parse round trip. Strategies live here (proptest is a dev-dependency only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sse_support;

use bytes::Bytes;
use keypool_core::sse::{Encoder, Event, Framer, Limits, Parser, SseError};
use proptest::prelude::*;
use sse_support::take_frames;

/// Pieces that SSE streams are made of, including every awkward byte.
fn token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(b"data".to_vec()),
        2 => Just(b"event".to_vec()),
        1 => Just(b"id".to_vec()),
        1 => Just(b"retry".to_vec()),
        4 => Just(b":".to_vec()),
        3 => Just(b" ".to_vec()),
        4 => Just(b"\n".to_vec()),
        2 => Just(b"\r".to_vec()),
        2 => Just(b"\r\n".to_vec()),
        1 => Just(b"\xEF\xBB\xBF".to_vec()),
        1 => Just(b"\0".to_vec()),
        1 => Just(b"\xFF".to_vec()),
        1 => Just(b"\xE2\x82".to_vec()),
        1 => Just("\u{20AC}".as_bytes().to_vec()),
        2 => "[0-9]{1,3}".prop_map(String::into_bytes),
        3 => "[a-z_{}\"]{1,6}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 1..4),
    ]
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(token(), 0..60).prop_map(|t| t.concat())
}

/// A stream plus split points (offsets into it, any order, duplicates allowed).
fn chunked_stream() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    stream().prop_flat_map(|s| {
        let len = s.len();
        (Just(s), proptest::collection::vec(0..=len, 0..12))
    })
}

fn split<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.to_vec();
    cuts.push(0);
    cuts.push(input.len());
    cuts.sort_unstable();
    cuts.windows(2).map(|w| &input[w[0]..w[1]]).collect()
}

type Outcome = (Vec<Result<Event, SseError>>, bool);

fn parse_chunks<'a>(limits: Limits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut parser = Parser::with_limits(limits);
    let mut out = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        // Alternate the two entry points; they must agree.
        if i % 2 == 0 {
            parser.feed(&Bytes::copy_from_slice(chunk));
        } else {
            parser.feed_slice(chunk);
        }
        assert!(parser.buffered_len() <= limits.max_line() + limits.max_event());
        out.extend(std::iter::from_fn(|| parser.next_event()));
    }
    let discarded = parser.finish();
    out.extend(std::iter::from_fn(|| parser.next_event()));
    (out, discarded)
}

fn small_limits() -> Limits {
    Limits::new().with_max_line(24).with_max_event(40)
}

fn event() -> impl Strategy<Value = Event> {
    let text = "[a-z_ :\u{e9}\u{1F600}]{0,8}";
    (
        prop_oneof![Just(String::new()), Just("message".to_owned()), text],
        "(\\PC|\n|\r|\r\n| ){0,40}",
        prop_oneof![Just(String::new()), "[ a-z0-9:\u{e9}]{0,6}"],
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(ty, data, id, retry)| {
            let e = Event::new(data).with_event_type(ty).with_id(id);
            match retry {
                Some(r) => e.with_retry(r),
                None => e,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_chunking_gives_the_same_events((input, cuts) in chunked_stream()) {
        for limits in [Limits::new(), small_limits()] {
            let whole = parse_chunks(limits, [&input[..]]);
            prop_assert_eq!(&parse_chunks(limits, split(&input, &cuts)), &whole);
            prop_assert_eq!(&parse_chunks(limits, input.chunks(1)), &whole);
        }
    }

    #[test]
    fn parsing_the_frames_gives_the_parser_events((input, cuts) in chunked_stream()) {
        let mut framer = Framer::new();
        let mut frames = Vec::new();
        for chunk in split(&input, &cuts) {
            framer.feed(&Bytes::copy_from_slice(chunk));
            frames.extend(take_frames(&mut framer));
        }
        let left = framer.finish();
        let mut joined: Vec<u8> = frames.iter().flat_map(|(bytes, _)| bytes.to_vec()).collect();
        // Frames are byte-identical to the input; the leftover is the rest (modulo the LF that
        // completes a final CR LF).
        prop_assert!(input.starts_with(&joined));
        joined.extend(left.as_deref().unwrap_or_default());
        prop_assert!(joined == input || (input.ends_with(b"\r\n") && joined == input[..input.len() - 1]));

        let (want, _) = parse_chunks(Limits::new(), [&input[..]]);
        let (mut got, _) = parse_chunks(Limits::new(), frames.iter().map(|(bytes, _)| &bytes[..]));
        // The parse of the input may still dispatch nothing more from the leftover.
        got.truncate(want.len());
        prop_assert_eq!(&got, &want);

        // The name the framer reports is the type the parser dispatches.
        // (Skipped for a frame that a fresh parser would start with a BOM, and for names that
        // are not UTF-8, which the framer reports as `None`.)
        for (bytes, name) in frames.iter().filter(|(bytes, _)| !bytes.starts_with(b"\xEF\xBB\xBF")) {
            let mut parser = Parser::new();
            parser.feed(bytes);
            if let Some(Ok(event)) = parser.next_event().filter(|e| !matches!(e, Ok(e) if e.event_type().contains('\u{FFFD}'))) {
                prop_assert_eq!(name.as_deref().unwrap_or("message"), event.event_type());
            }
        }
    }

    #[test]
    fn frames_are_the_same_however_late_and_however_taken(
        (input, cuts) in chunked_stream(),
        plan in proptest::collection::vec(0u8..6, 0..64),
    ) {
        let chunks = split(&input, &cuts);
        let mut framer = Framer::new();
        let mut want = Vec::new();
        for chunk in &chunks {
            framer.feed(&Bytes::copy_from_slice(chunk));
            want.extend(take_frames(&mut framer));
        }
        let want_left = framer.finish();

        // After each feed take none, one or two of the frames (the rest wait across the next
        // feed), each either taken out or only looked at.
        let mut framer = Framer::new();
        let mut got = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            framer.feed(&Bytes::copy_from_slice(chunk));
            let step = plan.get(i).copied().unwrap_or(0);
            for _ in 0..step % 3 {
                let Some(frame) = framer.next_frame() else { break };
                let frame = frame.unwrap();
                let name = frame.name().map(str::to_owned);
                let bytes = if step < 3 {
                    frame.into_bytes()
                } else {
                    Bytes::copy_from_slice(frame.bytes())
                };
                got.push((bytes, name));
            }
        }
        let left = framer.finish();
        got.extend(take_frames(&mut framer));
        prop_assert_eq!(got, want);
        prop_assert_eq!(left, want_left);
    }

    #[test]
    fn one_frame_per_blank_line_also_one_byte_at_a_time(input in stream()) {
        let cut = |chunks: Vec<&[u8]>| {
            let mut framer = Framer::new();
            let mut frames = Vec::new();
            for chunk in chunks {
                framer.feed_slice(chunk);
                frames.extend(take_frames(&mut framer));
            }
            frames.len()
        };
        prop_assert_eq!(cut(input.chunks(1).collect()), cut(vec![&input[..]]));
    }

    #[test]
    fn encode_then_parse_is_identity(events in proptest::collection::vec(event(), 0..8), cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
        let mut encoder = Encoder::new();
        let mut out = bytes::BytesMut::new();
        for e in &events {
            encoder.encode(e, &mut out).unwrap();
        }
        let cuts: Vec<usize> = cuts.iter().map(|c| c % (out.len() + 1)).collect();
        let (got, discarded) = parse_chunks(Limits::new(), split(&out, &cuts));
        prop_assert!(!discarded);
        let want: Vec<Event> = events
            .iter()
            .map(|e| {
                let data = e.data().replace("\r\n", "\n").replace('\r', "\n");
                let mut n = Event::new(data).with_event_type(e.event_type()).with_id(e.id());
                if let Some(r) = e.retry() {
                    n = n.with_retry(r);
                }
                n
            })
            .collect();
        let got: Vec<Event> = got.into_iter().map(Result::unwrap).collect();
        prop_assert_eq!(got, want);
    }
}
