//! `keypool keys list|enable|disable` against a real gateway (issue 20): a readable table, the
//! operator's changes reaching the pool, and one clear line for each way it can go wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::{Command, Output};

use keypool_mock::{MockServer, Reply};
use support::{ADMIN, Gateway, keys};

/// Runs `keypool keys ARGS` with a clean environment; (exit code, stdout, stderr).
fn keys_cmd(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keypool"));
    cmd.arg("keys")
        .args(args)
        .env_remove("KEYPOOL_ADMIN_TOKEN")
        .env_remove("KEYPOOL_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

fn one_error_line(stderr: &str, needle: &str) {
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("keypool: error: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(!stderr.contains(ADMIN), "the token is never printed");
}

#[test]
fn list_disable_enable_and_clear_errors() {
    let mock = MockServer::start();
    let raw = keys(3);
    let labelled = vec![
        format!("alpha={}", raw[0]),
        format!("bravo={}", raw[1]),
        raw[2].clone(),
    ];
    mock.script(&raw[0], [Reply::unauthorized()]);
    let gw = Gateway::start(&mock.url(), &labelled, &[]);
    let url = format!("http://{}", gw.addr);
    let (status, _) = gw.message(false);
    assert_eq!(status, 200);

    // list: one header line and one line per key, columns aligned.
    let (code, out, err) = keys_cmd(&["--url", &url, "list"], &[("KEYPOOL_ADMIN_TOKEN", ADMIN)]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].starts_with("POOL") && lines[0].contains("LABEL") && lines[0].contains("STATE"),
        "{out}"
    );
    let state_col = lines[0].find("STATE").unwrap();
    let row = |label: &str| {
        *lines
            .iter()
            .find(|l| l.split_whitespace().nth(1) == Some(label))
            .unwrap_or_else(|| panic!("{label} in {out}"))
    };
    assert!(row("alpha")[state_col..].starts_with("disabled"), "{out}");
    assert!(row("alpha").contains("unauthorized"), "{out}");
    assert!(row("bravo")[state_col..].starts_with("available"), "{out}");
    let third = lines[3].split_whitespace().nth(1).unwrap();
    assert!(third.starts_with("key-"), "a default label: {out}");
    support::assert_no_secret(&out, &raw);

    // disable, then enable, with the token as a flag and the options after the action.
    let (code, out, err) = keys_cmd(&["disable", "bravo", "--url", &url, "--admin-token", ADMIN], &[]);
    assert_eq!((code, out.as_str()), (0, "bravo: disabled\n"), "{err}");
    let (code, out, _) = keys_cmd(&["disable", "bravo", "--url", &url, "--admin-token", ADMIN], &[]);
    assert_eq!(
        (code, out.as_str()),
        (0, "bravo: already disabled (nothing changed)\n")
    );
    let admin: serde_json::Value = serde_json::from_str(&gw.admin_get("/admin/keys")).unwrap();
    let bravo = admin["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == "bravo")
        .unwrap();
    assert_eq!(bravo["state"], "disabled", "{admin}");
    let (code, out, err) = keys_cmd(
        &["--url", &url, "enable", "alpha"],
        &[("KEYPOOL_ADMIN_TOKEN", ADMIN)],
    );
    assert_eq!((code, out.as_str()), (0, "alpha: enabled\n"), "{err}");
    let (_, out, _) = keys_cmd(
        &["list"],
        &[("KEYPOOL_ADMIN_TOKEN", ADMIN), ("KEYPOOL_URL", &url)],
    );
    let state_col = out.lines().next().unwrap().find("STATE").unwrap();
    let alpha = out.lines().find(|l| l.contains(" alpha ")).unwrap();
    assert!(alpha[state_col..].starts_with("available"), "{out}");

    // Errors: unknown label, wrong token, no token, nothing listening, not a URL.
    let (code, out, err) = keys_cmd(
        &["--url", &url, "enable", "charlie"],
        &[("KEYPOOL_ADMIN_TOKEN", ADMIN)],
    );
    assert_ne!(code, 0);
    assert!(out.is_empty());
    one_error_line(
        &err,
        "no key labelled \"charlie\"; `keypool keys list` shows the labels",
    );
    let (code, _, err) = keys_cmd(
        &["--url", &url, "list"],
        &[("KEYPOOL_ADMIN_TOKEN", "wrong-token")],
    );
    assert_ne!(code, 0);
    one_error_line(&err, "refused the admin token (401)");
    let (code, _, err) = keys_cmd(&["--url", &url, "list"], &[]);
    assert_ne!(code, 0);
    one_error_line(&err, "no admin token: pass --admin-token");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, _, err) = keys_cmd(
        &["--url", &format!("http://{closed}"), "list"],
        &[("KEYPOOL_ADMIN_TOKEN", ADMIN)],
    );
    assert_ne!(code, 0);
    one_error_line(&err, "cannot reach the gateway at http://127.0.0.1:");
    let (code, _, err) = keys_cmd(
        &["--url", "127.0.0.1:8787", "list"],
        &[("KEYPOOL_ADMIN_TOKEN", ADMIN)],
    );
    assert_ne!(code, 0);
    one_error_line(&err, "invalid --url");
}

#[test]
fn a_gateway_without_admin_routes_says_how_to_turn_them_on() {
    let mock = MockServer::start();
    let raw = keys(1);
    // The support gateway always has an admin token; start one without.
    let mut child = Command::new(env!("CARGO_BIN_EXE_keypool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--upstream", &mock.url()])
        .env("KEYPOOL_KEYS", &raw[0])
        .env_remove("KEYPOOL_ADMIN_TOKEN")
        .env_remove("KEYPOOL_CLIENT_TOKENS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok);
    let addr = lines
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).ok()?;
            v["fields"]["listen"].as_str().map(str::to_owned)
        })
        .expect("the gateway did not start");
    // Keep reading its log, so that it never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let (code, _, err) = keys_cmd(
        &["--url", &format!("http://{addr}"), "list"],
        &[("KEYPOOL_ADMIN_TOKEN", ADMIN)],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_ne!(code, 0);
    one_error_line(&err, "admin routes of the gateway at http://127.0.0.1:");
    assert!(err.contains("--admin-token"), "{err}");
}
