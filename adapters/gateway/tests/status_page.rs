//! The status page in a real browser (issue 20): Debian's `chromium` driven through
//! `chromedriver` with `fantoccini`, against the real `keypool` binary and a `keypool-mock`
//! upstream. The page loads with the admin token (HTTP Basic auth, as a browser sends it), shows
//! every key, shows a key turning `cooling` within 2 s of a 429 with its countdown going down,
//! shows `disabled` after a 401, fits 390 px and 1440 px wide windows, and is photographed into
//! the target directory (`keypool-status-screenshot.png`, `keypool-status-screenshot-390.png`).
//!
//! The test fails, never skips, when the browser cannot start: `.ci/run` installs `chromium` and
//! `chromium-driver`. Every wait polls the page's DOM until a condition holds or a deadline
//! passes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use keypool_mock::{MockServer, Reply, RetryAfter};
use serde_json::{Value, json};
use support::{ADMIN, Gateway, keys};

/// A `chromedriver` this test started, in a process group of its own: dropping it ends the
/// driver and every browser process it started, whatever state the test ended in.
struct Driver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver ({e}): the status page test needs Debian's chromium and \
                     chromium-driver (apt-get install -y chromium chromium-driver; .ci/run installs them)"
                )
            });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("started successfully") => break,
                Ok(_) => {}
                Err(_) => panic!("chromedriver did not start within 20 s"),
            }
        }
        let profile = std::env::temp_dir().join(format!("keypool-chromium-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        Self { child, port, profile }
    }

    /// The browser's capabilities: headless chromium with the flags this machine needs (without
    /// the background-networking ones it tries to reach the network and fails noisily).
    fn capabilities(&self) -> serde_json::Map<String, Value> {
        let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("no chromium binary: apt-get install -y chromium chromium-driver");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    "--window-size=1440,900",
                    format!("--user-data-dir={}", self.profile.display()),
                ],
            },
        });
        caps.as_object().unwrap().clone()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group's id is the driver's pid (process_group(0)): this ends the driver and the
        // browser processes it started, and nothing else.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Evaluates `script` (a function body) in the page.
async fn eval(client: &Client, script: &str) -> Value {
    client.execute(script, vec![]).await.unwrap()
}

/// Polls `script` until `ok` holds for its value, or panics at the deadline with `what`.
async fn wait_until(
    client: &Client,
    script: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = eval(client, script).await;
        if ok(&v) {
            return v;
        }
        if Instant::now() >= deadline {
            let page = eval(client, "return document.body.innerText").await;
            panic!("{what} within {within:?}; last value {v}; the page shows:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The state and seconds left of the row of `label`.
fn row_script(label: &str) -> String {
    format!(
        r#"const r = document.querySelector('tr[data-key="{label}"]');
           if (!r) return null;
           const left = r.querySelector('.left');
           return {{ state: r.dataset.state, left: left && left.dataset.seconds ? Number(left.dataset.seconds) : null }};"#
    )
}

fn post(gw: &Gateway) {
    let (status, body) = gw.message(false);
    assert_eq!(status, 200, "{body}");
}

/// Resizes the window to `width` and the page's full height, and writes a PNG screenshot.
async fn screenshot(client: &Client, width: u32, path: &PathBuf) {
    client.set_window_size(width, 900).await.unwrap();
    let height = eval(client, "return document.documentElement.scrollHeight").await;
    let height = height.as_u64().unwrap_or(900).clamp(600, 4000) as u32;
    client.set_window_size(width, height).await.unwrap();
    let png = client.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(path, png).unwrap();
}

#[test]
fn status_page_shows_every_key_and_follows_their_states_live() {
    let mock = MockServer::start();
    // Keys with distinct ends, so that their hints differ as real keys' do.
    let raw: Vec<String> = keys(3)
        .iter()
        .zip(["Xq4T", "m8Rw", "Jc2p"])
        .map(|(k, end)| format!("{k}{end}"))
        .collect();
    let labels = ["alpha", "bravo", "charlie"];
    let labelled: Vec<String> = labels.iter().zip(&raw).map(|(l, k)| format!("{l}={k}")).collect();
    // Each key's answers name its organisation, as the Anthropic API's do.
    for (key, org) in raw.iter().zip(["org-7f3a1c", "org-2b9e44", "org-2b9e44"]) {
        mock.set_default(key, Reply::ok().header("anthropic-organization-id", org));
    }
    let gw = Gateway::start(&mock.url(), &labelled, &[]);
    for _ in 0..5 {
        post(&gw);
    }

    let driver = Driver::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    rt.block_on(async {
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(driver.capabilities())
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .unwrap_or_else(|e| panic!("the browser did not start: {e}"));

        // The token goes in as a browser sends it: Basic auth, any user, the token as password.
        client
            .goto(&format!("http://operator:{ADMIN}@{}/admin", gw.addr))
            .await
            .unwrap();
        let rows = wait_until(
            &client,
            "return Array.from(document.querySelectorAll('tr[data-key]')).map(r => r.dataset.key)",
            Duration::from_secs(10),
            "every key shown",
            |v| v.as_array().is_some_and(|a| a.len() == 3),
        )
        .await;
        assert_eq!(rows, json!(labels), "in pool order");
        let live = eval(&client, "return document.getElementById('conn').textContent").await;
        assert_eq!(live, "live");
        let org = eval(
            &client,
            r#"return document.querySelector('tr[data-key="alpha"] td[data-th="Organisation"]').textContent"#,
        )
        .await;
        assert_eq!(org, "org-7f3a1c");

        // A 429 for alpha: the next request fails over to bravo, and alpha turns cooling.
        mock.script(&raw[0], [Reply::rate_limited(RetryAfter::Seconds("45".into()))]);
        post(&gw);
        let answered = Instant::now();
        let first = wait_until(
            &client,
            &row_script("alpha"),
            Duration::from_secs(2),
            "alpha shown cooling",
            |v| v["state"] == "cooling",
        )
        .await;
        assert!(answered.elapsed() < Duration::from_secs(2));
        let left = first["left"].as_f64().expect("a countdown");
        assert!(left > 40.0 && left <= 45.0, "{first}");
        wait_until(
            &client,
            &row_script("alpha"),
            Duration::from_secs(3),
            "alpha's countdown going down",
            |v| v["left"].as_f64().is_some_and(|l| l < left - 0.25),
        )
        .await;

        // A 401 for bravo: the next request goes to charlie, and bravo turns disabled.
        mock.script(&raw[1], [Reply::unauthorized()]);
        post(&gw);
        wait_until(
            &client,
            &row_script("bravo"),
            Duration::from_secs(2),
            "bravo shown disabled",
            |v| v["state"] == "disabled",
        )
        .await;
        // Its first probe is due in 10 minutes (the default --probe-delay).
        let probe = eval(
            &client,
            r#"return document.querySelector('tr[data-key="bravo"] td[data-th="Probe"]').textContent"#,
        )
        .await;
        assert!(probe.as_str().is_some_and(|p| p.starts_with("first in ")), "{probe}");
        // Two organisations: no single-organisation note.
        let note = eval(&client, "return document.querySelectorAll('.single-org').length").await;
        assert_eq!(note, 0);
        let charlie = eval(&client, &row_script("charlie")).await;
        assert_eq!(charlie["state"], "available", "{charlie}");
        let events = wait_until(
            &client,
            "return Array.from(document.querySelectorAll('#transitions li[data-event]')).map(li => li.dataset.key + ' ' + li.dataset.event)",
            Duration::from_secs(2),
            "the transitions listed",
            |v| v.as_array().is_some_and(|a| a.len() >= 2),
        )
        .await;
        assert_eq!(events[0], "bravo disabled", "{events}");
        assert!(events.as_array().unwrap().contains(&json!("alpha cooling")), "{events}");
        let bars = eval(&client, "return document.querySelectorAll('#chart-requests rect').length").await;
        assert_eq!(bars, 60, "one bar per minute");
        let error = eval(&client, "return getComputedStyle(document.getElementById('error')).display").await;
        assert_eq!(error, "none", "the page shows no error");

        screenshot(&client, 1440, &target.join("keypool-status-screenshot.png")).await;

        // A phone: nothing is wider than the screen.
        client.set_window_size(390, 844).await.unwrap();
        let widths = wait_until(
            &client,
            "return [window.innerWidth, document.documentElement.scrollWidth]",
            Duration::from_secs(2),
            "a 390 px wide window",
            |v| v[0].as_u64().is_some_and(|w| w <= 400),
        )
        .await;
        if widths[1].as_u64().unwrap() > widths[0].as_u64().unwrap() {
            let wide = eval(
                &client,
                "return Array.from(document.querySelectorAll('body *'))
                   .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
                   .slice(0, 8).map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))",
            )
            .await;
            panic!("the page scrolls sideways at 390 px: {widths}; too wide: {wide}");
        }
        let shown = eval(&client, &row_script("bravo")).await;
        assert_eq!(shown["state"], "disabled");
        screenshot(&client, 390, &target.join("keypool-status-screenshot-390.png")).await;

        client.close().await.unwrap();
    });
    drop(driver);
    gw.assert_no_secret(&raw, &[]);
}
