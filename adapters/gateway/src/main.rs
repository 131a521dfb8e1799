//! `keypool`: API-key failover gateway for the Anthropic Messages API.

use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc, see [`keypool_gateway::allocator`].
#[global_allocator]
static GLOBAL: keypool_gateway::allocator::MiMalloc = keypool_gateway::allocator::MiMalloc;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use keypool_gateway::config::{self, ServeArgs};
use keypool_gateway::config_file::{self, Explicit, Loaded};
use keypool_gateway::{demo, init_logging, keys, keys_cli, mock_upstream, server};

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
    /// Run the gateway. Keys come from KEYPOOL_KEYS (comma- or newline-separated), --keys-file,
    /// or the pool of a --config file.
    #[command(
        after_help = "A flag, or its KEYPOOL_* environment variable, overrides the same \
        setting in the --config file. `keypool check-config FILE` shows the result."
    )]
    Serve(Box<ServeArgs>),
    /// Check a config file: print the effective configuration (secrets masked), or one line
    /// naming the problem and its fix. KEYPOOL_* variables apply as they would to `serve`.
    CheckConfig(CheckConfigArgs),
    /// List the keys of a running gateway, or enable or disable one (its admin API, without
    /// curl). Needs the gateway's admin token.
    #[command(after_help = "Examples:\n  KEYPOOL_ADMIN_TOKEN=... keypool keys list\n  \
        keypool keys --url http://gateway:8787 disable key-3f9a2c")]
    Keys(keypool_gateway::keys_cli::KeysArgs),
    /// Run a scriptable fake Anthropic API (plain HTTP and TLS) for tests and demos.
    MockUpstream(mock_upstream::MockArgs),
    /// Run the gateway against an embedded fake API and show failover happening (no keys or
    /// network needed).
    Demo(demo::DemoArgs),
}

/// Arguments of `keypool check-config`.
#[derive(Debug, Clone, Args)]
struct CheckConfigArgs {
    /// The config file (TOML).
    file: PathBuf,
}

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return clap_error(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match cli.command {
        Command::Serve(args) => {
            let explicit = matches
                .subcommand_matches("serve")
                .map(Explicit::from_matches)
                .unwrap_or_default();
            serve(&args, &explicit)
        }
        Command::CheckConfig(args) => check_config(&args.file),
        Command::Keys(args) => match keys_cli::run(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keypool: error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::MockUpstream(args) => report(mock_upstream::run(&args)),
        Command::Demo(args) => report(demo::run(&args)),
    }
}

/// A bad value for a flag is one line (clap's own is three, with usage); other clap errors
/// (unknown flags, with their suggestions), help and version print as clap prints them.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid value");
            report(Err(first.strip_prefix("error: ").unwrap_or(first).to_owned()))
        }
        _ => {
            let code = e.exit_code();
            let _ = e.print();
            ExitCode::from(u8::try_from(code).unwrap_or(2))
        }
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

/// `keypool check-config FILE`: the same resolution as `keypool serve --config FILE` in this
/// environment, printed with secrets masked.
fn check_config(file: &std::path::Path) -> ExitCode {
    let argv = [
        std::ffi::OsStr::new("keypool"),
        std::ffi::OsStr::new("serve"),
        std::ffi::OsStr::new("--config"),
        file.as_os_str(),
    ];
    let matches = match Cli::command().try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) => return clap_error(e),
    };
    let Some(serve) = matches.subcommand_matches("serve") else {
        return report(Err(
            "internal: check-config could not build serve's arguments".into()
        ));
    };
    let args = match ServeArgs::from_arg_matches(serve) {
        Ok(a) => a,
        Err(e) => return clap_error(e),
    };
    match config_file::resolve(&args, &Explicit::from_matches(serve), &config_file::process_env) {
        Ok(loaded) => {
            print!("{}", config_file::render(&loaded, Some(file)));
            ExitCode::SUCCESS
        }
        Err(e) => report(Err(e.to_string())),
    }
}

fn serve(args: &ServeArgs, explicit: &Explicit) -> ExitCode {
    let loaded: Loaded = match config_file::resolve(args, explicit, &config_file::process_env) {
        Ok(l) => l,
        Err(e) => return report(Err(e.to_string())),
    };
    let _logs = init_logging(loaded.args.log_format);
    if let Some(path) = &args.config {
        tracing::info!(config = %path.display(), keys = %loaded.origins.keys, "configuration loaded");
        for o in &loaded.overridden {
            tracing::info!(config = %path.display(), "the file's {o}");
        }
    }
    for pool in loaded.config.pools() {
        for warning in keys::implausible(&pool.keys) {
            tracing::warn!(pool = %pool.name, "{warning}");
        }
    }
    let config = loaded.config;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(Err(format!("cannot start the async runtime: {e}"))),
    };
    report(runtime.block_on(async move {
        let keys = config.keys.len();
        let upstream = config.upstream.clone();
        let tokens = config.access.tokens.len();
        let pools = config.pools();
        let server = server::Server::bind(config).await?;
        let addr = server.local_addr();
        for pool in &pools {
            tracing::info!(
                pool = %pool.name, provider = pool.call.profile.name(), mount = %pool.mount,
                upstream = %pool.upstream, keys = pool.keys.len(), "serving a pool"
            );
        }
        let hint = pools
            .iter()
            .map(|p| {
                let base = config::client_base_urls(addr);
                match p.call.profile.name() {
                    "anthropic" if p.mount == "/" => format!("ANTHROPIC_BASE_URL={base}"),
                    "anthropic" => format!("ANTHROPIC_BASE_URL={base}{}", p.mount),
                    _ => format!("OPENAI_BASE_URL={base}{}/v1", p.mount.trim_end_matches('/')),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(
            listen = %addr, upstream = %upstream, keys, client_tokens = tokens,
            "keypool is serving; point clients at {hint}"
        );
        let shared = server.shared();
        server.serve(server::signals(shared)).await;
        tracing::info!("stopped");
        Ok(())
    }))
}
