//! The text log format, written directly.
//!
//! The lines are exactly `tracing_subscriber`'s default ("full") format without colours —
//! `2026-12-07T06:04:51.123456Z  INFO keypool::request: request pool="default" status=200 …` —
//! but made without its per-piece styling wrappers and with the date and time of day formatted
//! once a second instead of for every line: the request log line is written for every request,
//! and through the stock formatter it cost as much CPU as the rest of the gateway's own work on
//! a request. Lines inside spans and coloured output (a terminal) go to the stock formatter.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::SystemTime as StockTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The default text format, fast path for lines outside spans.
#[derive(Debug, Default)]
pub struct TextFormat {
    stock: Format<Full, StockTime>,
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() || ctx.event_scope().is_some() {
            return self.stock.format_event(ctx, writer, event);
        }
        write_timestamp(&mut writer, SystemTime::now())?;
        let meta = event.metadata();
        writer.write_str(level(meta.level()))?;
        writer.write_char(' ')?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = Fields {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// Where request lines are written directly, when the text format and the gateway's writer are
/// the global subscriber's (set once by `init_logging`).
static DIRECT: OnceLock<crate::log_writer::LogWriter> = OnceLock::new();

/// Request lines are written directly to `writer` from now on (text format, no colours).
pub(crate) fn write_request_lines_to(writer: crate::log_writer::LogWriter) {
    let _ = DIRECT.set(writer);
}

/// The request log line (`keypool::request`, `request`) of a forwarded request: its fields, in
/// the order they are written.
#[derive(Clone, Copy)]
pub struct RequestLine<'a> {
    /// The pool's name.
    pub pool: &'a str,
    /// The request method.
    pub method: &'a http::Method,
    /// The request path (already cut to its first 100 characters).
    pub path: &'a str,
    /// The response status.
    pub status: u16,
    /// Upstream attempts.
    pub attempts: usize,
    /// The key that answered (its label), `byok` or `-`.
    pub key: &'a str,
    /// Request to end of response, in ms.
    pub latency_ms: f64,
    /// How the call ended.
    pub outcome: &'a str,
    /// The request id of keypool's own error response, if it made one.
    pub request_id: Option<&'a str>,
    /// What went wrong, if anything.
    pub error: Option<&'a dyn fmt::Display>,
}

impl std::fmt::Debug for RequestLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestLine")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl RequestLine<'_> {
    /// Logs the line. In the text format the line is written directly, the same bytes the
    /// formatter would write, without `tracing`'s per-field dispatch (one line per request is
    /// the gateway's largest cost after the HTTP work itself); otherwise it is a `tracing` event.
    pub fn emit(&self) {
        if let Some(writer) = DIRECT.get() {
            if tracing::enabled!(target: "keypool::request", Level::INFO) {
                thread_local! {
                    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
                }
                LINE.with(|line| {
                    let mut line = line.borrow_mut();
                    line.clear();
                    if self.write_text(&mut line, SystemTime::now()).is_ok() {
                        writer.write_request(line.as_bytes());
                    }
                });
            }
            return;
        }
        tracing::info!(
            target: "keypool::request",
            pool = self.pool,
            method = %self.method,
            path = %self.path,
            status = self.status,
            attempts = self.attempts,
            key = %self.key,
            latency_ms = self.latency_ms,
            outcome = self.outcome,
            request_id = self.request_id,
            error = self.error.map(tracing::field::display),
            "request"
        );
    }

    /// The line as the text format writes the event [`emit`](Self::emit) makes.
    fn write_text(&self, out: &mut String, now: SystemTime) -> fmt::Result {
        write_timestamp(&mut Writer::new(out), now)?;
        out.push_str(" INFO keypool::request: request pool=");
        write_quoted(out, self.pool)?;
        for (name, value) in [(" method=", self.method.as_str()), (" path=", self.path)] {
            out.push_str(name);
            out.push_str(value);
        }
        out.push_str(" status=");
        out.push_str(itoa::Buffer::new().format(self.status));
        out.push_str(" attempts=");
        out.push_str(itoa::Buffer::new().format(self.attempts));
        out.push_str(" key=");
        out.push_str(self.key);
        out.push_str(" latency_ms=");
        write_ms(out, self.latency_ms)?;
        out.push_str(" outcome=");
        write_quoted(out, self.outcome)?;
        if let Some(id) = self.request_id {
            out.push_str(" request_id=");
            write_quoted(out, id)?;
        }
        if let Some(error) = self.error {
            write!(out, " error={error}")?;
        }
        out.push('\n');
        Ok(())
    }
}

/// A latency in ms as `Debug` writes the `f64`: for a whole number of microseconds (what the
/// request log records) that is the exact decimal, its trailing zeros cut but one kept
/// (`0.273`, `12.0`), written here without the float formatter. Anything else goes to it.
fn write_ms(out: &mut String, ms: f64) -> fmt::Result {
    let micros = (ms * 1000.0).round();
    // Exact below 2^53, and far below the range where `Debug` switches to an exponent.
    if !(0.0..1e12).contains(&micros) || micros / 1000.0 != ms {
        return write!(out, "{ms:?}");
    }
    // In range and whole (checked above): the cast is exact.
    let micros = micros as u64;
    out.push_str(itoa::Buffer::new().format(micros / 1000));
    out.push('.');
    let fraction = micros % 1000;
    if fraction == 0 {
        out.push('0');
    } else {
        let digits = [fraction / 100, fraction / 10 % 10, fraction % 10];
        let used = if !fraction.is_multiple_of(10) {
            3
        } else if !fraction.is_multiple_of(100) {
            2
        } else {
            1
        };
        for d in &digits[..used] {
            // A single decimal digit.
            out.push(char::from(b'0' + *d as u8));
        }
    }
    Ok(())
}

/// `value` as `Debug` writes a string: quoted, escaped; without the formatter for plain text.
fn write_quoted(out: &mut String, value: &str) -> fmt::Result {
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(value);
        out.push('"');
        Ok(())
    } else {
        write!(out, "{value:?}")
    }
}

/// The level as the stock format writes it: five characters wide.
fn level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ ` (UTC, microseconds), as the stock format writes it. The part
/// up to the seconds is made once per second per thread.
fn write_timestamp(writer: &mut Writer<'_>, now: SystemTime) -> fmt::Result {
    thread_local! {
        /// The second last formatted, and `YYYY-MM-DDTHH:MM:SS.` for it.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, micros) = (since.as_secs(), since.subsec_micros());
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            // `format_rfc3339` writes `YYYY-MM-DDTHH:MM:SSZ`: keep all but the `Z`.
            let mut text = keypool_core::civil::format_rfc3339(now);
            text.pop();
            text.push('.');
            *cached = (secs, text);
        }
        writer.write_str(&cached.1)
    })?;
    let mut digits = [b'0'; 6];
    let mut rest = micros;
    for d in digits.iter_mut().rev() {
        // `rest % 10` is a single digit: the cast cannot truncate.
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    // ASCII digits only.
    writer.write_str(std::str::from_utf8(&digits).unwrap_or("000000"))?;
    writer.write_str("Z ")
}

/// Writes an event's fields the way the stock format's field visitor does: `message` bare,
/// others `name=value` (strings quoted, as `Debug` writes them), separated by spaces.
struct Fields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(' ');
        }
        let name = field.name();
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else if self.start(field) {
            self.result = write!(self.writer, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            let mut buffer = itoa::Buffer::new();
            self.result = self.writer.write_str(buffer.format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            let mut buffer = itoa::Buffer::new();
            self.result = self.writer.write_str(buffer.format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // As the stock format: the error, then its sources as a list, escaped.
        let sanitize = self.writer.sanitizes_ansi_escapes();
        let mut shown = String::new();
        let _ = write!(Escaping::new(&mut shown, sanitize), "{value}");
        if let Some(source) = value.source() {
            let _ = write!(shown, " {}.sources=[", field.name());
            let mut next = Some(source);
            let mut first = true;
            while let Some(e) = next {
                if !std::mem::take(&mut first) {
                    shown.push_str(", ");
                }
                let _ = write!(Escaping::new(&mut shown, sanitize), "{e}");
                next = e.source();
            }
            shown.push(']');
        }
        self.record_debug(field, &format_args!("{shown}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.result = if field.name() == "message" {
                // As the stock format: control characters that could steer a terminal escaped.
                let sanitize = self.writer.sanitizes_ansi_escapes();
                write!(Escaping::new(&mut *self.writer, sanitize), "{value:?}")
            } else {
                write!(self.writer, "{value:?}")
            };
        }
    }
}

/// Writes through to `inner`, escaping what the stock format escapes in messages: ESC, BEL,
/// BS, FF, DEL and the C1 controls.
struct Escaping<W> {
    inner: W,
    sanitize: bool,
}

impl<W: fmt::Write> Escaping<W> {
    fn new(inner: W, sanitize: bool) -> Self {
        Self { inner, sanitize }
    }
}

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let plain = |c: char| {
            !matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        };
        if !self.sanitize || s.chars().all(plain) {
            return self.inner.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\x1b' => self.inner.write_str("\\x1b")?,
                '\x07' => self.inner.write_str("\\x07")?,
                '\x08' => self.inner.write_str("\\x08")?,
                '\x0c' => self.inner.write_str("\\x0c")?,
                '\x7f' => self.inner.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.inner, "\\u{{{:x}}}", u32::from(c))?,
                c => self.inner.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Self;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Outer;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&Inner)
        }
    }
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner \"quoted\"")
        }
    }
    impl std::error::Error for Inner {}

    /// Every kind of field the gateway logs, and a few it does not.
    fn emit() {
        let path = "/v1/messages";
        let none: Option<&str> = None;
        tracing::info!(
            target: "keypool::request",
            pool = "default",
            method = %http::Method::POST,
            path = %path,
            status = 200u16,
            attempts = 1usize,
            key = %"key-abc123",
            latency_ms = 0.4f64,
            outcome = "complete",
            request_id = Some("req_1"),
            error = none.map(tracing::field::display),
            "request"
        );
        tracing::warn!(pool = "p", "a \"warning\" with {} args", 2);
        tracing::error!(count = -3i64, flag = true, list = ?vec![1, 2], "x");
        tracing::info!(r#type = "raw", latency_ms = 12.0f64, "raw names");
        let e: &(dyn std::error::Error + 'static) = &Outer;
        tracing::warn!(error = e, "with sources");
        let e: &(dyn std::error::Error + 'static) = &Inner;
        tracing::warn!(error = e, "without sources");
        tracing::debug!("filtered out at info");
        tracing::info!(message = "explicit message", n = 1u64);
        tracing::info!(text = "line\nbreak\ttab");
        tracing::info!("escape \x1b[31m red \u{9b} c1 \x07 bell");
        tracing::info!(value = "escape \x1b[31m in a field", "and {}", "\x7f in args");
    }

    fn run(fast: bool) -> String {
        let capture = Capture::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(Level::INFO)
            .with_writer(capture.clone());
        if fast {
            tracing::subscriber::with_default(builder.event_format(TextFormat::default()).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        let bytes = capture.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// Drops each line's timestamp (its first word).
    fn untimed(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_owned())
            .collect()
    }

    #[test]
    fn writes_what_the_stock_format_writes() {
        let (fast, stock) = (run(true), run(false));
        assert_eq!(untimed(&fast), untimed(&stock), "fast:\n{fast}\nstock:\n{stock}");
        assert_eq!(fast.lines().count(), 10, "{fast}");
        for line in fast.lines() {
            let stamp = line.split(' ').next().unwrap();
            assert_eq!(stamp.len(), "2026-12-07T06:04:51.123456Z".len(), "{line}");
            assert!(keypool_core::civil::parse_rfc3339(stamp).is_some(), "{line}");
        }
    }

    #[test]
    fn a_request_line_written_directly_is_the_event_the_formatter_writes() {
        let method = http::Method::POST;
        let key = "key-abc123";
        let broke = "the upstream \"reset\" the stream\nmid-body";
        let lines = [
            RequestLine {
                pool: "anthropic",
                method: &method,
                path: "/v1/messages",
                status: 200,
                attempts: 1,
                key,
                latency_ms: 0.273,
                outcome: "complete",
                request_id: None,
                error: None,
            },
            RequestLine {
                pool: "team \"a\"",
                method: &http::Method::GET,
                path: "/openai/v1/models?x=1",
                status: 529,
                attempts: 3,
                key: "-",
                latency_ms: 12.0,
                outcome: "upstream_broke",
                request_id: Some("req_keypool_1a2b0001"),
                error: Some(&broke),
            },
        ];
        for line in lines {
            let capture = Capture::default();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(capture.clone())
                .event_format(TextFormat::default())
                .finish();
            // No direct writer installed in this test binary: `emit` makes the event.
            assert!(DIRECT.get().is_none());
            tracing::subscriber::with_default(subscriber, || line.emit());
            let through_tracing = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
            let mut direct = String::new();
            line.write_text(&mut direct, SystemTime::now()).unwrap();
            assert_eq!(
                untimed(&direct),
                untimed(&through_tracing),
                "{direct}\n{through_tracing}"
            );
            assert!(direct.ends_with('\n'));
        }
    }

    #[test]
    fn latencies_are_written_as_debug_writes_them() {
        let mut values: Vec<f64> = (0..200_000u64).map(|us| us as f64 / 1000.0).collect();
        values.extend([
            1e9 + 0.001,
            86_400_000.5,
            0.0005,
            1e-7,
            1e15,
            1e17,
            -1.0,
            f64::NAN,
            0.1 + 0.2,
        ]);
        for us in [1_234_567_891u64, 999_999_999_999, 3_600_000_000] {
            values.push(us as f64 / 1000.0);
        }
        for v in values {
            let mut ours = String::new();
            write_ms(&mut ours, v).unwrap();
            assert_eq!(ours, format!("{v:?}"), "{v}");
        }
    }

    #[test]
    fn timestamps_are_written_to_the_microsecond() {
        for (secs, micros, expected) in [
            (0u64, 0u32, "1970-01-01T00:00:00.000000Z "),
            (1_765_080_291, 7, "2025-12-07T04:04:51.000007Z "),
            (1_765_080_291, 999_999, "2025-12-07T04:04:51.999999Z "),
            (4_102_444_800, 123_456, "2100-01-01T00:00:00.123456Z "),
        ] {
            // Nanoseconds below the microsecond are cut, as the stock format does.
            let t = UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000 + 999);
            let mut ours = String::new();
            write_timestamp(&mut Writer::new(&mut ours), t).unwrap();
            assert_eq!(ours, expected);
        }
    }
}
