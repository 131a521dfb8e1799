//! `keypool`: API-key failover gateway for the Anthropic Messages API.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keypool_gateway::config::ServeArgs;
use keypool_gateway::{demo, init_logging, mock_upstream, server};

/// API-key failover gateway for the Anthropic Messages API.
///
/// Point any Anthropic client at it (ANTHROPIC_BASE_URL=http://127.0.0.1:8787): rate-limited keys
/// cool down, rejected keys are disabled, and calls move on to the next key at once.
#[derive(Debug, Parser)]
#[command(name = "keypool", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway. Keys come from KEYPOOL_KEYS (comma- or newline-separated) or --keys-file.
    Serve(Box<ServeArgs>),
    /// Run a scriptable fake Anthropic API (plain HTTP and TLS) for tests and demos.
    MockUpstream(mock_upstream::MockArgs),
    /// Run the gateway against an embedded fake API and show failover happening (no keys or
    /// network needed).
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::MockUpstream(args) => report(mock_upstream::run(&args)),
        Command::Demo(args) => report(demo::run(&args)),
    }
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keypool: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let env_keys = std::env::var("KEYPOOL_KEYS").ok();
    let config = match args.validate(env_keys.as_deref()) {
        Ok(c) => c,
        Err(e) => return report(Err(e.to_string())),
    };
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(Err(format!("cannot start the async runtime: {e}"))),
    };
    report(runtime.block_on(async move {
        let keys = config.keys.len();
        let upstream = config.upstream.clone();
        let tokens = config.access.tokens.len();
        let server = server::Server::bind(config).await?;
        tracing::info!(
            listen = %server.local_addr(), upstream = %upstream, keys, client_tokens = tokens,
            "keypool is serving; point clients at ANTHROPIC_BASE_URL=http://{}", server.local_addr()
        );
        let shared = server.shared();
        server.serve(server::signals(shared)).await;
        tracing::info!("stopped");
        Ok(())
    }))
}
