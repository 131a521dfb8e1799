//! WHATWG event-stream vectors for `keypool_core::sse`, one test each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sse_support;

use bytes::Bytes;
use keypool_core::sse::{Event, Framer, Limits, Parser, SseError};
use sse_support::take_frames;

/// Parses `chunks` in order and returns the events (errors included) and what `finish` said.
fn parse_chunks(chunks: &[&[u8]]) -> (Vec<Result<Event, SseError>>, bool) {
    let mut parser = Parser::new();
    let mut out = Vec::new();
    for chunk in chunks {
        parser.feed(&Bytes::copy_from_slice(chunk));
        out.extend(std::iter::from_fn(|| parser.next_event()));
    }
    let discarded = parser.finish();
    out.extend(std::iter::from_fn(|| parser.next_event()));
    (out, discarded)
}

/// `(type, data)` of every event; panics on an error.
fn parse(input: &[u8]) -> Vec<(String, String)> {
    parse_chunks(&[input])
        .0
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            (e.event_type().to_owned(), e.data().to_owned())
        })
        .collect()
}

fn msg(data: &str) -> (String, String) {
    ("message".to_owned(), data.to_owned())
}

fn events(input: &[u8]) -> Vec<Event> {
    parse_chunks(&[input]).0.into_iter().map(Result::unwrap).collect()
}

#[test]
fn lf_line_ends() {
    assert_eq!(parse(b"data: a\n\ndata: b\n\n"), [msg("a"), msg("b")]);
}

#[test]
fn crlf_line_ends() {
    assert_eq!(parse(b"data: a\r\n\r\ndata: b\r\n\r\n"), [msg("a"), msg("b")]);
}

#[test]
fn cr_line_ends() {
    assert_eq!(parse(b"data: a\r\rdata: b\r\r"), [msg("a"), msg("b")]);
}

#[test]
fn mixed_line_ends() {
    assert_eq!(parse(b"data: a\rdata: b\ndata: c\r\n\n"), [msg("a\nb\nc")]);
}

#[test]
fn cr_lf_split_across_chunks_is_one_line_end() {
    // If the LF after the CR were a second line end, the first event would be dispatched early
    // and the second `data` line would start a new event.
    let (out, _) = parse_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
    let out: Vec<_> = out.into_iter().map(|e| e.unwrap().data().to_owned()).collect();
    assert_eq!(out, ["a\nb"]);
}

#[test]
fn cr_then_other_byte_in_next_chunk() {
    let (out, _) = parse_chunks(&[b"data: a\r", b"\rdata: b\n\n"]);
    let out: Vec<_> = out.into_iter().map(|e| e.unwrap().data().to_owned()).collect();
    assert_eq!(out, ["a", "b"]);
}

#[test]
fn bom_at_stream_start_is_stripped() {
    assert_eq!(parse(b"\xEF\xBB\xBFdata: a\n\n"), [msg("a")]);
}

#[test]
fn bom_split_across_chunks() {
    let (out, _) = parse_chunks(&[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"]);
    assert_eq!(
        out.into_iter()
            .map(|e| e.unwrap().data().to_owned())
            .collect::<Vec<_>>(),
        ["a"]
    );
}

#[test]
fn bom_only_at_stream_start() {
    // A second BOM is part of the field name, so the line is an unknown field.
    assert_eq!(
        parse(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\ndata: b\n\n"),
        [msg("b")]
    );
    // Later in the stream it is ordinary data.
    assert_eq!(parse(b"data: \xEF\xBB\xBFx\n\n"), [msg("\u{FEFF}x")]);
}

#[test]
fn partial_bom_is_data() {
    // EF BB followed by something else is invalid UTF-8 in the field name: an unknown field.
    assert_eq!(parse(b"\xEF\xBBdata: a\n\ndata: b\n\n"), [msg("b")]);
}

#[test]
fn comments_are_ignored() {
    assert_eq!(parse(b": hello\ndata: a\n: more\n\n:\n\n"), [msg("a")]);
}

#[test]
fn field_without_colon() {
    // `data` alone appends an empty line; an unknown colon-less field is ignored.
    assert_eq!(parse(b"data\n\n"), [msg("")]);
    assert_eq!(parse(b"data\ndata\n\n"), [msg("\n")]);
    assert_eq!(parse(b"foo\ndata: x\n\n"), [msg("x")]);
    // `event` without a colon resets the type to the default.
    assert_eq!(parse(b"event: a\nevent\ndata: x\n\n"), [msg("x")]);
}

#[test]
fn data_without_space() {
    assert_eq!(parse(b"data:a\n\n"), [msg("a")]);
}

#[test]
fn data_with_two_spaces_keeps_one() {
    assert_eq!(parse(b"data:  a\n\n"), [msg(" a")]);
    assert_eq!(parse(b"event:  x\ndata\n\n"), [(" x".to_owned(), String::new())]);
}

#[test]
fn several_data_lines_join_with_lf() {
    assert_eq!(parse(b"data: a\ndata: b\ndata: c\n\n"), [msg("a\nb\nc")]);
}

#[test]
fn empty_data_lines() {
    assert_eq!(parse(b"data:\n\n"), [msg("")]);
    assert_eq!(parse(b"data:\ndata:\n\n"), [msg("\n")]);
    assert_eq!(parse(b"data: a\ndata:\n\n"), [msg("a\n")]);
}

#[test]
fn no_data_no_dispatch() {
    // An event with an empty data buffer is not dispatched, and its type does not leak.
    assert_eq!(parse(b"event: ping\n\ndata: x\n\n"), [msg("x")]);
    assert_eq!(parse(b"id: 1\n\n\n\n"), []);
}

#[test]
fn event_type() {
    assert_eq!(
        parse(b"event: ping\ndata: {}\n\n"),
        [("ping".to_owned(), "{}".to_owned())]
    );
    assert_eq!(parse(b"event:\ndata: x\n\n"), [msg("x")]);
    assert_eq!(
        parse(b"event: a\nevent: b\ndata: x\n\n"),
        [("b".to_owned(), "x".to_owned())]
    );
}

#[test]
fn id_persists_across_events() {
    let out = events(b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n");
    let ids: Vec<_> = out.iter().map(Event::id).collect();
    assert_eq!(ids, ["1", "1", ""]);
}

#[test]
fn id_with_nul_is_ignored() {
    let mut parser = Parser::new();
    parser.feed_slice(b"id: 7\ndata: a\n\nid: 8\x009\ndata: b\n\n");
    let ids: Vec<_> = std::iter::from_fn(|| parser.next_event())
        .map(|e| e.unwrap().id().to_owned())
        .collect();
    assert_eq!(ids, ["7", "7"]);
    assert_eq!(parser.last_event_id(), "7");
}

#[test]
fn id_without_data_still_sets_last_event_id() {
    let mut parser = Parser::new();
    parser.feed_slice(b"id: 42\n\n");
    assert!(parser.next_event().is_none());
    assert_eq!(parser.last_event_id(), "42");
}

#[test]
fn retry_digits_only() {
    let out =
        events(b"retry: 1500\ndata: a\n\nretry: 15x\ndata: b\n\nretry: -1\ndata: c\n\nretry:\ndata: d\n\n");
    let retries: Vec<_> = out.iter().map(Event::retry).collect();
    assert_eq!(retries, [Some(1500), None, None, None]);
    let mut parser = Parser::new();
    parser.feed_slice(b"retry: 1500\n\nretry: 1e3\n\nretry:  20\n\n");
    assert_eq!(parser.retry(), Some(1500));
}

#[test]
fn unknown_fields_are_ignored() {
    assert_eq!(parse(b"foo: bar\nDATA: x\ndata : y\ndata: z\n\n"), [msg("z")]);
}

#[test]
fn unterminated_last_event_is_dropped() {
    let (out, discarded) = parse_chunks(&[b"data: a\n\ndata: b\n"]);
    assert_eq!(
        out.into_iter()
            .map(|e| e.unwrap().data().to_owned())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert!(discarded);
    let (out, discarded) = parse_chunks(&[b"data: a\n\ndata: b"]);
    assert_eq!(out.len(), 1);
    assert!(discarded);
    let (_, discarded) = parse_chunks(&[b"data: a\n\n"]);
    assert!(!discarded);
}

#[test]
fn invalid_utf8_is_replaced() {
    let out = events(b"event: a\xFFb\nid: \xC3\ndata: x\xF0\x9F\x98y\ndata: \xE2\x82\xAC\n\n");
    assert_eq!(out[0].event_type(), "a\u{FFFD}b");
    assert_eq!(out[0].id(), "\u{FFFD}");
    assert_eq!(out[0].data(), "x\u{FFFD}y\n\u{20AC}");
}

#[test]
fn utf8_split_across_chunks() {
    let (out, _) = parse_chunks(&[b"data: \xE2", b"\x82", b"\xAC\n\n"]);
    assert_eq!(out[0].as_ref().unwrap().data(), "\u{20AC}");
}

#[test]
fn utf8_is_checked_from_the_first_line_that_keeps_a_value() {
    // The UTF-8 check of a chunk starts at the first line whose value is kept; lines before it
    // (blank, comment, known event type) are not checked, and bytes after it still are.
    let input: &[u8] = b"\n: \xFF\nevent: ping\ndata: \xC3\xA9\n\n\x80\xBF: x\ndata: a\xFFb\n\nevent: \xE2\x82\xAC\ndata: \xE2\x82\n\n";
    let want = [
        ("ping", "\u{e9}"),
        ("message", "a\u{FFFD}b"),
        ("\u{20AC}", "\u{FFFD}"),
    ];
    for size in 1..=input.len() {
        let chunks: Vec<&[u8]> = input.chunks(size).collect();
        let (out, _) = parse_chunks(&chunks);
        let got: Vec<_> = out
            .into_iter()
            .map(|e| {
                let e = e.unwrap();
                (e.event_type().to_owned(), e.data().to_owned())
            })
            .collect();
        assert_eq!(
            got,
            want.map(|(t, d)| (t.to_owned(), d.to_owned())),
            "chunks of {size} bytes"
        );
    }
}

#[test]
fn single_line_data_is_not_copied() {
    let chunk = Bytes::from_static(b"event: x\ndata: hello\n\n");
    let mut parser = Parser::new();
    parser.feed(&chunk);
    let event = parser.next_event().unwrap().unwrap();
    let range = chunk.as_ptr() as usize..chunk.as_ptr() as usize + chunk.len();
    assert!(range.contains(&(event.data_bytes().as_ptr() as usize)));
}

#[test]
fn oversized_line_is_a_typed_error_with_bounded_memory() {
    let limit = 1024;
    let mut parser = Parser::with_limits(Limits::new().with_max_line(limit));
    parser.feed_slice(b"data: ok\n\n");
    let chunk = vec![b'x'; 100];
    parser.feed_slice(b"data: ");
    for _ in 0..100 {
        parser.feed_slice(&chunk);
        assert!(parser.buffered_len() <= limit, "{}", parser.buffered_len());
    }
    assert_eq!(parser.next_event().unwrap().unwrap().data(), "ok");
    assert_eq!(parser.next_event(), Some(Err(SseError::LineTooLong { limit })));
    assert_eq!(parser.next_event(), None);
    assert!(parser.is_failed());
    assert_eq!(parser.buffered_len(), 0);
    // Terminal: later input is ignored.
    parser.feed_slice(b"\n\ndata: more\n\n");
    assert_eq!(parser.next_event(), None);
}

#[test]
fn oversized_line_in_one_chunk() {
    let mut parser = Parser::with_limits(Limits::new().with_max_line(8));
    parser.feed_slice(b"data: 12\n\ndata: 123\n\n");
    assert_eq!(parser.next_event().unwrap().unwrap().data(), "12");
    assert_eq!(parser.next_event(), Some(Err(SseError::LineTooLong { limit: 8 })));
}

#[test]
fn oversized_event_is_a_typed_error_with_bounded_memory() {
    let limit = 1000;
    let mut parser = Parser::with_limits(Limits::new().with_max_event(limit));
    let line = format!("data: {}\n", "y".repeat(99));
    for _ in 0..20 {
        parser.feed_slice(line.as_bytes());
        assert!(parser.buffered_len() <= limit, "{}", parser.buffered_len());
    }
    assert_eq!(parser.next_event(), Some(Err(SseError::EventTooLarge { limit })));
    assert_eq!(parser.buffered_len(), 0);
    // 10 lines of 99 bytes joined by 9 LFs are 999 bytes: that fits.
    let mut parser = Parser::with_limits(Limits::new().with_max_event(limit));
    parser.feed_slice(line.repeat(10).as_bytes());
    parser.feed_slice(b"\n");
    assert_eq!(parser.next_event().unwrap().unwrap().data().len(), 999);
}

#[test]
fn oversized_frame_is_a_typed_error_with_bounded_memory() {
    let limit = 1000;
    let mut framer = Framer::with_limits(Limits::new().with_max_event(limit));
    framer.feed_slice(b"data: ok\n\n");
    for _ in 0..50 {
        framer.feed_slice(b"data: 0123456789012345678901234567890123456789\n");
        assert!(framer.buffered_len() <= limit);
    }
    assert_eq!(framer.next_frame().unwrap().unwrap().bytes(), b"data: ok\n\n");
    assert_eq!(framer.next_frame(), Some(Err(SseError::EventTooLarge { limit })));
    assert_eq!(framer.next_frame(), None);
    assert_eq!(framer.buffered_len(), 0);
}

#[test]
fn framer_cuts_whole_events_and_names_them() {
    let input = b"event: message_start\r\ndata: {}\r\n\r\n: c\n\nevent:ping\rdata: {}\r\revent\ndata\n\n";
    let mut framer = Framer::new();
    for b in input {
        framer.feed_slice(std::slice::from_ref(b));
    }
    let frames = take_frames(&mut framer);
    let names: Vec<_> = frames.iter().map(|(_, name)| name.as_deref()).collect();
    assert_eq!(names, [Some("message_start"), None, Some("ping"), None]);
    let joined: Vec<u8> = frames.iter().flat_map(|(bytes, _)| bytes.to_vec()).collect();
    assert_eq!(joined, input);
    assert_eq!(framer.finish(), None);

    let mut framer = Framer::new();
    framer.feed_slice(input);
    let first = framer.next_frame().unwrap().unwrap();
    assert!(first.is_named("message_start"));
    assert!(!first.is_named("message_stop"));
    let second = framer.next_frame().unwrap().unwrap();
    assert!(!second.is_named(""), "a frame without a name is not named \"\"");
}

#[test]
fn framer_reports_trailing_partial_event() {
    let mut framer = Framer::new();
    framer.feed_slice(b"data: a\n\nevent: message_delta\ndata: {");
    assert_eq!(framer.next_frame().unwrap().unwrap().bytes(), b"data: a\n\n");
    assert_eq!(
        framer.finish().as_deref(),
        Some(&b"event: message_delta\ndata: {"[..])
    );
}

#[test]
fn framer_cr_lf_split_after_frame_end() {
    let mut framer = Framer::new();
    framer.feed_slice(b"data: a\r\n\r");
    framer.feed_slice(b"\n");
    assert_eq!(framer.next_frame().unwrap().unwrap().bytes(), b"data: a\r\n\r");
    assert_eq!(
        framer.finish(),
        None,
        "the LF completing the CR LF is not a partial event"
    );
}

#[test]
fn framer_bom_first_line() {
    let mut framer = Framer::new();
    framer.feed_slice(b"\xEF\xBB\xBFevent: x\ndata: 1\n\n");
    assert_eq!(framer.next_frame().unwrap().unwrap().name(), Some("x"));
}

/// An Anthropic-shaped stream, with an `event` line that is not the first line of its event
/// and one that is overridden by a later one.
const STREAM: &[u8] = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"h\xc3\xa9llo \xf0\x9f\x99\x82\"}}\n\n\
: keep-alive\n\n\
data: {\"type\":\"ping\"}\nevent: ping\n\n\
event: a\ndata: x\nevent: message_stop\nid: 7\n\n";

/// [`STREAM`] with each of the three line ends, with and without a BOM.
fn stream_variants() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for end in [&b"\n"[..], b"\r\n", b"\r"] {
        let lines: Vec<u8> = STREAM.split(|&b| b == b'\n').collect::<Vec<_>>().join(end);
        out.push(lines.clone());
        out.push([&b"\xEF\xBB\xBF"[..], &lines].concat());
    }
    out
}

#[test]
fn framer_gives_the_same_frames_and_names_at_every_chunk_size() {
    for input in stream_variants() {
        let cut = |size: usize| {
            let mut framer = Framer::new();
            let mut frames = Vec::new();
            for chunk in input.chunks(size) {
                framer.feed(&Bytes::copy_from_slice(chunk));
                frames.extend(take_frames(&mut framer));
            }
            assert_eq!(framer.finish(), None);
            let (frames, names): (Vec<Bytes>, Vec<_>) = frames.into_iter().unzip();
            let joined: Vec<u8> = frames.concat();
            (names, joined)
        };
        let (names, joined) = cut(input.len());
        let want = [
            Some("message_start"),
            Some("content_block_delta"),
            None,
            Some("ping"),
            Some("message_stop"),
        ];
        assert_eq!(names, want.map(|n| n.map(str::to_owned)));
        assert_eq!(joined, input);
        for size in 1..input.len() {
            // A CR LF cut after its CR moves the LF to the next frame (or, after the last
            // frame, leaves it over): the bytes stay the same.
            let (got_names, got) = cut(size);
            assert_eq!(got_names, names, "chunks of {size} bytes");
            let lf_left_over = input.ends_with(b"\r\n") && got == input[..input.len() - 1];
            assert!(got == input || lf_left_over, "chunks of {size} bytes");
        }
    }
}

#[test]
fn parser_gives_the_same_events_at_every_chunk_size() {
    for input in stream_variants() {
        let parse_in = |size: usize| {
            let chunks: Vec<&[u8]> = input.chunks(size).collect();
            parse_chunks(&chunks)
        };
        let (whole, discarded) = parse_in(input.len());
        assert!(!discarded);
        let got: Vec<_> = whole
            .iter()
            .map(|e| {
                let e = e.as_ref().unwrap();
                (e.event_type().to_owned(), e.id().to_owned())
            })
            .collect();
        let want = [
            ("message_start", ""),
            ("content_block_delta", ""),
            ("ping", ""),
            ("message_stop", "7"),
        ];
        assert_eq!(got, want.map(|(t, i)| (t.to_owned(), i.to_owned())));
        assert_eq!(
            whole[1].as_ref().unwrap().data(),
            "{\"type\":\"content_block_delta\",\"delta\":{\"text\":\"h\u{e9}llo \u{1F642}\"}}"
        );
        for size in 1..input.len() {
            assert_eq!(parse_in(size), (whole.clone(), false), "chunks of {size} bytes");
        }
    }
}
