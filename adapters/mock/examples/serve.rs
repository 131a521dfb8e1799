//! Runs a mock upstream until stdin closes: `cargo run -p keypool-mock --example serve [SCENARIO.toml]`.
//!
//! Prints the plain and TLS URLs and writes the CA certificate to `keypool-mock-ca.pem` in the
//! temp directory, e.g. for `curl --cacert`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;

use keypool_mock::{MockServer, Scenario};

fn main() {
    let scenario: Scenario = match std::env::args().nth(1) {
        Some(path) => {
            toml::from_str(&std::fs::read_to_string(path).expect("read scenario")).expect("parse scenario")
        }
        None => Scenario::default(),
    };
    let mock = MockServer::start_with(scenario);
    let ca = std::env::temp_dir().join("keypool-mock-ca.pem");
    std::fs::write(&ca, mock.ca_pem()).expect("write CA");
    println!(
        "plain {}\ntls   {}\nca    {}",
        mock.url(),
        mock.tls_url(),
        ca.display()
    );
    // Serve until stdin is closed.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    for r in mock.requests() {
        println!("{r:?}");
    }
}
