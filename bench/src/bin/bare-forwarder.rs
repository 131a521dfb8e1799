//! `bare-forwarder --listen ADDR --upstream http://HOST:PORT`: the limit the gateway is measured
//! against — a minimal hyper server and hyper-util client that only forward bytes (see
//! `keypool_bench::forwarder`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let listen = keypool_bench::flag(&args, "--listen").unwrap_or_else(|| "127.0.0.1:8790".into());
    let Some(upstream) = keypool_bench::flag(&args, "--upstream") else {
        eprintln!("usage: bare-forwarder --listen ADDR --upstream http://HOST:PORT");
        return ExitCode::from(2);
    };
    let result = listen
        .parse()
        .map_err(|e| format!("--listen {listen}: {e}"))
        .and_then(|addr| keypool_bench::forwarder::run(addr, &upstream));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare-forwarder: {e}");
            ExitCode::from(2)
        }
    }
}
