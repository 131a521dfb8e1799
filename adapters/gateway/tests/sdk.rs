//! End-to-end with real clients (SPEC §12): the official `openai` and `anthropic` Python SDKs,
//! installed from PyPI into a virtual environment under `target/` (made once, reused), drive
//! one gateway that serves both pools in front of the mock. Each call meets a first-key 429 the
//! SDK never sees (the SDKs run with `max_retries=0`), and an OpenAI stream that resets
//! mid-way reaches the SDK as an `APIError`.
//!
//! This test fails, never skips, when Python or the SDKs cannot be installed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use keypool_mock::{Ending, MockServer, Reply, RetryAfter, openai};
use support::Gateway;

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
    }
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// The venv's python with `openai` and `anthropic` importable; installs them when missing.
fn python() -> PathBuf {
    let venv = target_dir().join("py/venv");
    let python = venv.join("bin/python");
    let ready = || {
        python.exists()
            && Command::new(&python)
                .args(["-c", "import openai, anthropic"])
                .status()
                .is_ok_and(|s| s.success())
    };
    if !ready() {
        run(
            Command::new("python3").args(["-m", "venv", venv.to_str().unwrap()]),
            "python3 -m venv (install python3 and python3-venv)",
        );
        run(
            Command::new(&python).args(["-m", "pip", "install", "--quiet", "openai", "anthropic"]),
            "pip install openai anthropic",
        );
        assert!(ready(), "the SDKs are not importable after installing them");
    }
    python
}

#[test]
fn the_official_sdks_use_one_gateway_for_both_pools() {
    let python = python();

    let anthropic_keys: Vec<String> = (0..2)
        .map(|i| format!("sk-ant-api03-sdk{i}-{}", "Rt5Yu8Io2Pa".repeat(4)))
        .collect();
    let openai_keys: Vec<String> = (0..2)
        .map(|i| format!("sk-proj-sdk{i}-{}", "Gh7Jk3Lz9Xc".repeat(4)))
        .collect();
    let limited = || RetryAfter::Millis("1".into());

    let anthropic_mock = MockServer::start();
    anthropic_mock.script(
        &anthropic_keys[0],
        [Reply::rate_limited(limited()), Reply::rate_limited(limited())],
    );
    let openai_mock = MockServer::start_openai();
    openai_mock.script(
        &openai_keys[0],
        [
            openai::rate_limited_after(limited()),
            openai::rate_limited_after(limited()),
            openai::rate_limited_after(limited()),
            // The last call: the stream commits, then the connection resets.
            Reply::stream(openai::stream().text_deltas(6).ending(Ending::ResetAfter(600))),
        ],
    );

    let openai_url = openai_mock.url();
    let gateway = Gateway::start_with_env(
        &anthropic_mock.url(),
        &anthropic_keys,
        &["--openai-upstream", &openai_url],
        &[("KEYPOOL_OPENAI_KEYS", &openai_keys.join(","))],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/clients.py");
    let out = run(
        Command::new(&python)
            .arg(&script)
            .arg(format!("http://{}", gateway.addr)),
        "the SDK script",
    );
    for step in [
        "ok chat.completions.create\n",
        "ok chat.completions.create(stream=True)",
        "ok responses.create(stream=True)",
        "ok messages.create",
        "ok messages.stream",
        "ok mid-stream reset raised APIError",
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }

    // Every call met a first-key 429 and was served by the second key.
    let seen = |mock: &MockServer, keys: &[String]| -> Vec<usize> {
        mock.requests()
            .iter()
            .map(|r| keys.iter().position(|k| Some(k) == r.key.as_ref()).unwrap())
            .collect()
    };
    assert_eq!(seen(&openai_mock, &openai_keys), [0, 1, 0, 1, 0, 1, 0]);
    assert_eq!(seen(&anthropic_mock, &anthropic_keys), [0, 1, 0, 1]);
    let paths: Vec<String> = openai_mock.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths[4], "/v1/responses");
    assert!(paths.iter().all(|p| p.starts_with("/v1/")), "{paths:?}");
    let mut secrets = anthropic_keys.clone();
    secrets.extend(openai_keys.iter().cloned());
    support::assert_no_secret(&gateway.logs(), &secrets);
    support::assert_no_secret(&out, &secrets);
}
