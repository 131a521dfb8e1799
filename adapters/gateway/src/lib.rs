//! # keypool-gateway
//!
//! The `keypool` binary: an HTTP proxy that a team runs once and points every Anthropic client
//! at (`ANTHROPIC_BASE_URL=http://127.0.0.1:8787`). Every `/v1/...` request is forwarded with
//! key failover by the same core as the library clients; see `keypool serve --help`.
//!
//! The library half exists so the binary's parts can be tested and embedded: [`server::Server`]
//! binds and serves a validated [`config::Config`].

pub mod access;
pub mod allocator;
pub mod config;
pub mod config_file;
pub mod demo;
pub mod keys;
pub mod keys_cli;
mod limits;
pub mod log_format;
pub mod log_writer;
pub mod memory;
pub mod metrics;
pub mod mock_upstream;
mod own_wakes;
mod probe;
pub mod server;
pub mod state;
pub mod status;

/// Sets up logging to stderr (`RUST_LOG` filters; default `info`), batched under load (see
/// [`log_writer`]). Keep the returned guard until the process ends: dropping it writes out the
/// lines still buffered.
pub fn init_logging(format: config::LogFormat) -> log_writer::LogFlush {
    // Colour codes only for a terminal: in a file, a pipe or the journal they are noise (and
    // cost time on every line).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init(format, Box::new(std::io::stderr()), ansi)
}

/// [`init_logging`] to another destination (tests, benchmarks), without colours.
pub fn init_logging_to(
    format: config::LogFormat,
    out: Box<dyn std::io::Write + Send>,
) -> log_writer::LogFlush {
    init(format, out, false)
}

fn init(format: config::LogFormat, out: Box<dyn std::io::Write + Send>, ansi: bool) -> log_writer::LogFlush {
    let (writer, flush) = log_writer::LogWriter::new(out);
    let direct = writer.clone();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = match format {
        config::LogFormat::Text => builder.event_format(log_format::TextFormat::default()).try_init(),
        config::LogFormat::Json => builder.json().try_init(),
    };
    // Request lines bypass `tracing` only when its subscriber is this one, writing plain text.
    if installed.is_ok() && format == config::LogFormat::Text && !ansi {
        log_format::write_request_lines_to(direct);
    }
    flush
}
