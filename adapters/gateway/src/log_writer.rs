//! Where log lines go: stderr, the request log in batches while the gateway is busy.
//!
//! Writing every request's log line to stderr as it is made costs each request a `write`
//! system call, and, with two worker threads logging at once, a wait on the stderr lock (a
//! `futex` call each way): together more than the rest of the request log. So a request line
//! (target `keypool::request`) made while request lines are coming thick and fast is only
//! appended to a buffer, and a flusher thread writes the buffer out every [`LINGER`] — one
//! `write` for the lines of that time.
//!
//! Every other line (a key cooling, a probe, a warning) is written at once, after whatever
//! request lines are buffered, so lines keep their order. A request line made while the gateway
//! is quiet (the flusher found nothing to write for a whole [`LINGER`]) is written at once too,
//! and wakes the flusher to collect the lines that follow. So a lone line appears immediately,
//! a request line under load at most [`LINGER`] late, and nothing is dropped: a buffer that
//! grows past [`MAX_BUFFERED`] (stderr not keeping up) is written out by the thread that fills
//! it, which waits for stderr as every line used to. [`LogFlush`] writes out what is left when
//! the process ends normally; a process killed with SIGKILL loses at most the last [`LINGER`]
//! of request lines.
//!
//! Locks are always taken destination first, then buffer (or the buffer alone).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the flusher lets lines collect before it writes them out.
pub const LINGER: Duration = Duration::from_millis(5);

/// Buffered bytes beyond which the thread that adds a line writes the buffer out itself.
pub const MAX_BUFFERED: usize = 256 << 10;

/// What the writers and the flusher share.
struct Shared {
    buffer: Mutex<Buffer>,
    /// Wakes the flusher out of its idle wait.
    wake: Condvar,
    /// The destination. Taken before the buffer is emptied into it, so batches keep their order.
    out: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    /// The flusher is collecting lines (it will write the buffer out within [`LINGER`]).
    collecting: bool,
    /// No more lines will come: the flusher writes what is left and ends.
    closed: bool,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a line was being appended leaves at worst a partial line: keep logging.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Adds one write (tracing hands over one whole line per event); `batch` for request lines.
    fn write(&self, line: &[u8], batch: bool) {
        {
            let mut buffer = lock(&self.buffer);
            if batch && !buffer.closed {
                if buffer.collecting {
                    buffer.bytes.extend_from_slice(line);
                    if buffer.bytes.len() < MAX_BUFFERED {
                        return;
                    }
                    // stderr is not keeping up: write the batch here, as the flusher would.
                    drop(buffer);
                    return self.write_out(None);
                }
                // Quiet until now: this line is written at once, below, and the flusher
                // collects the ones that follow.
                buffer.collecting = true;
                self.wake.notify_one();
            }
        }
        self.write_out(Some(line));
    }

    /// Writes whatever is buffered, then `line`.
    fn write_out(&self, line: Option<&[u8]>) {
        let mut out = lock(&self.out);
        let batch = std::mem::take(&mut lock(&self.buffer).bytes);
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
        }
        if let Some(line) = line {
            let _ = out.write_all(line);
        }
    }

    /// Writes out whatever is buffered.
    fn flush(&self) {
        self.write_out(None);
        let _ = lock(&self.out).flush();
    }

    /// The flusher thread: waits until request lines come, then writes them out every
    /// [`LINGER`] until a whole [`LINGER`] passes without one.
    fn run(&self) {
        // The batch being written; swapped with the buffer so that both keep their capacity.
        let mut batch = Vec::new();
        loop {
            {
                let mut buffer = lock(&self.buffer);
                while !buffer.collecting && !buffer.closed {
                    buffer = self.wake.wait(buffer).unwrap_or_else(PoisonError::into_inner);
                }
                if buffer.closed {
                    return;
                }
            }
            std::thread::sleep(LINGER);
            let mut out = lock(&self.out);
            {
                let mut buffer = lock(&self.buffer);
                if buffer.bytes.is_empty() {
                    // A whole LINGER without a line: the next one is written at once.
                    buffer.collecting = false;
                    continue;
                }
                std::mem::swap(&mut buffer.bytes, &mut batch);
            }
            let _ = out.write_all(&batch);
            batch.clear();
            // A burst's worth is kept; more is given back.
            batch.shrink_to(MAX_BUFFERED);
        }
    }
}

/// The log destination, for `tracing_subscriber::fmt().with_writer(..)`.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogWriter")
    }
}

/// Writes out the lines still buffered when dropped (at the end of `main`) and stops the
/// flusher.
#[must_use = "dropping it at once stops the batching; keep it until the process ends"]
pub struct LogFlush {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogFlush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogFlush")
    }
}

impl LogWriter {
    /// A writer to `out`, with its flusher thread. If the thread cannot be started, every
    /// line is written at once.
    pub fn new(out: Box<dyn Write + Send>) -> (Self, LogFlush) {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer::default()),
            wake: Condvar::new(),
            out: Mutex::new(out),
        });
        let flusher = shared.clone();
        let started = std::thread::Builder::new()
            .name("keypool-log".into())
            .spawn(move || flusher.run());
        if started.is_err() {
            lock(&shared.buffer).closed = true;
        }
        (
            Self {
                shared: shared.clone(),
            },
            LogFlush { shared },
        )
    }

    /// A writer to stderr.
    pub fn stderr() -> (Self, LogFlush) {
        Self::new(Box::new(io::stderr()))
    }
}

impl Drop for LogFlush {
    fn drop(&mut self) {
        lock(&self.shared.buffer).closed = true;
        self.shared.wake.notify_one();
        self.shared.flush();
    }
}

/// One event's writes.
#[derive(Debug)]
pub struct Line<'a> {
    writer: &'a LogWriter,
    /// A request line: batched under load.
    batch: bool,
}

impl LogWriter {
    fn line(&self, batch: bool) -> Line<'_> {
        Line { writer: self, batch }
    }

    /// Adds a whole request line (batched under load), made without `tracing`.
    pub(crate) fn write_request(&self, line: &[u8]) {
        self.shared.write(line, true);
    }
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.shared.write(buf, self.batch);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The target of the request log, the one line per request that is batched under load.
const REQUEST_TARGET: &str = "keypool::request";

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        self.line(false)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        self.line(meta.target() == REQUEST_TARGET)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    /// A destination that records what reached it and how many writes did.
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicUsize>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn text(sink: &Sink) -> String {
        String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_lone_line_is_written_at_once() {
        let sink = Sink::default();
        let (writer, _flush) = LogWriter::new(Box::new(sink.clone()));
        writer.line(true).write_all(b"one\n").unwrap();
        assert_eq!(text(&sink), "one\n");
    }

    #[test]
    fn lines_in_a_burst_keep_their_order_and_are_written_together() {
        let sink = Sink::default();
        let (writer, flush) = LogWriter::new(Box::new(sink.clone()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        writer
                            .line(true)
                            .write_all(format!("{t} {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        drop(flush);
        let all = text(&sink);
        assert_eq!(all.lines().count(), 8000, "every line arrives once");
        for t in 0..4 {
            let mine: Vec<usize> = all
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|i| i.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..2000).collect::<Vec<_>>(), "thread {t}'s lines in order");
        }
        // 8000 lines from four threads took far fewer writes than lines.
        let writes = sink.writes.load(Ordering::SeqCst);
        assert!(writes < 8000, "{writes} writes for 8000 lines");
    }

    #[test]
    fn buffered_lines_arrive_without_another_line_and_at_the_end() {
        let sink = Sink::default();
        let (writer, flush) = LogWriter::new(Box::new(sink.clone()));
        writer.line(true).write_all(b"first\n").unwrap();
        // The flusher is collecting now: this one is buffered, and must still come out.
        writer.line(true).write_all(b"second\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !text(&sink).contains("second") {
            assert!(Instant::now() < deadline, "the buffered line never arrived");
            std::thread::yield_now();
        }
        assert_eq!(text(&sink), "first\nsecond\n");
        writer.line(true).write_all(b"third\n").unwrap();
        drop(flush);
        assert!(text(&sink).ends_with("third\n"), "{}", text(&sink));
        // After the flush guard is gone, lines are written directly.
        writer.line(true).write_all(b"late\n").unwrap();
        assert!(text(&sink).ends_with("late\n"));
    }

    #[test]
    fn other_lines_are_written_at_once_after_the_buffered_ones() {
        let sink = Sink::default();
        let (writer, _flush) = LogWriter::new(Box::new(sink.clone()));
        writer.line(true).write_all(b"request 1\n").unwrap();
        writer.line(true).write_all(b"request 2\n").unwrap();
        writer.make_writer().write_all(b"key cooling\n").unwrap();
        // Written before the call returned, after the request line buffered before it.
        assert_eq!(text(&sink), "request 1\nrequest 2\nkey cooling\n");
    }

    #[test]
    fn a_full_buffer_is_written_by_the_thread_that_fills_it() {
        let sink = Sink::default();
        let (writer, _flush) = LogWriter::new(Box::new(sink.clone()));
        writer.line(true).write_all(b"start\n").unwrap();
        let big = vec![b'x'; MAX_BUFFERED];
        writer.line(true).write_all(&big).unwrap();
        assert!(
            text(&sink).len() > MAX_BUFFERED,
            "written before the writer returned"
        );
    }
}
