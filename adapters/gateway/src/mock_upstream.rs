//! `keypool mock-upstream`: the fake Anthropic API of `keypool-mock`, from the command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use keypool_mock::{MockServer, Scenario};

/// Flags of `keypool mock-upstream`.
#[derive(Debug, Clone, Args)]
pub struct MockArgs {
    /// Plain HTTP address.
    #[arg(long, default_value = "127.0.0.1:8788")]
    pub listen: SocketAddr,
    /// TLS address (certificate generated at start; see --write-ca).
    #[arg(long, default_value = "127.0.0.1:8789")]
    pub tls_listen: SocketAddr,
    /// Scenario file (TOML, or JSON when it ends in .json): per-key scripted replies, defaults,
    /// streams that stall, reset or end early. Without it every key gets normal answers.
    #[arg(long, value_name = "PATH")]
    pub scenario: Option<PathBuf>,
    /// Write the generated CA certificate (PEM) here, for clients of the TLS port.
    #[arg(long, value_name = "PATH")]
    pub write_ca: Option<PathBuf>,
}

/// Loads a scenario file.
pub fn load_scenario(path: &std::path::Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --scenario {}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| format!("--scenario {}: {e}", path.display()))
    } else {
        toml::from_str(&text).map_err(|e| format!("--scenario {}: {e}", path.display()))
    }
}

/// Runs the mock until SIGINT/SIGTERM.
pub fn run(args: &MockArgs) -> Result<(), String> {
    let scenario = match &args.scenario {
        Some(path) => load_scenario(path)?,
        None => Scenario::default(),
    };
    let mock = MockServer::try_start_on(args.listen, args.tls_listen, scenario).map_err(|e| {
        format!(
            "cannot start the mock upstream on {} / {}: {e}",
            args.listen, args.tls_listen
        )
    })?;
    if let Some(path) = &args.write_ca {
        std::fs::write(path, mock.ca_pem()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    println!(
        "mock Anthropic API: {} (plain), {} (TLS)",
        mock.url(),
        mock.tls_url()
    );
    println!("stop with Ctrl-C");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    });
    println!("{} requests served", mock.request_count());
    Ok(())
}
