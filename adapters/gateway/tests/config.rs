//! Configuration of the `keypool` binary: `--config` files, `check-config`, and the flag
//! problems of issue 20 (listen host names, byte-order marks, bare durations, empty
//! `KEYPOOL_KEYS`, the banner for `0.0.0.0`, `--help` and implausible keys). Real processes; no
//! sleeps: every wait is for a log line or a process exit, bounded by a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use support::assert_no_secret;

const K0: &str = "sk-ant-api03-config-key-zero-Qm4Rt7Yu2Io9PaSdF3gH";
const K1: &str = "sk-ant-api03-config-key-one-Zx5Cv8Bn1Ml6KjHg4fDs";
const TOKEN: &str = "team-tok-Hs72Kd9Lq3WmZp";
const ADMIN: &str = "adm-Vb81Nm4Xz6PqLk0";
const SHORT_KEY: &str = "zq9x";

fn secrets() -> Vec<String> {
    [K0, K1, TOKEN, ADMIN].map(str::to_owned).to_vec()
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keypool")
}

/// A fresh directory for one test's files.
fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keypool-config-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `keypool ARGS` with none of the gateway's variables inherited, plus `env`.
fn keypool(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for var in [
        "KEYPOOL_KEYS",
        "KEYPOOL_CONFIG",
        "KEYPOOL_LISTEN",
        "KEYPOOL_UPSTREAM",
        "KEYPOOL_CLIENT_TOKENS",
        "KEYPOOL_ADMIN_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    keypool(args, env).output().unwrap()
}

/// Runs a command that must fail with exactly one line on stderr, and returns that line.
fn one_line_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run(args, env);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: not one line:\n{stderr}");
    assert!(stderr.starts_with("keypool: error: "), "{stderr}");
    assert_no_secret(&stderr, &secrets());
    stderr.trim_end().to_owned()
}

/// A `keypool serve` process, killed on drop.
struct Serve {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Serve {
    /// Starts `keypool serve ARGS` with JSON logs and waits (bounded) for its start-up line.
    fn start(args: &[&str], env: &[(&str, &str)]) -> (Self, SocketAddr, serde_json::Value) {
        let mut child = keypool(&["serve"], env)
            .args(["--log-format", "json"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut serve = Self {
            child,
            lines,
            seen: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let Ok(line) = serve
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                panic!("the gateway did not start:\n{}", serve.seen.join("\n"));
            };
            serve.seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(listen) = v["fields"]["listen"].as_str()
            {
                let addr = listen.parse().unwrap();
                return (serve, addr, v);
            }
        }
    }

    /// Every line logged before the start-up line (and that line).
    fn startup_logs(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("x-api-key", t);
    }
    let mut res = req.call().unwrap();
    (res.status().as_u16(), res.body_mut().read_to_string().unwrap())
}

// ---- check-config ---------------------------------------------------------------------------

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("keypool.example.toml")
}

#[test]
fn check_config_accepts_the_example_file() {
    let example = example();
    let out = run(&["check-config", example.to_str().unwrap()], &[]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    for expected in [
        "listen = \"127.0.0.1:8787\"",
        "[state]",
        "backend = \"memory\"",
        "[[pool]]",
        "provider = \"anthropic\"",
        "mount = \"/\"",
        "upstream = \"https://api.anthropic.com\"",
        "hold = \"2s\"",
        "2 keys from [[pool]] \"anthropic\" keys_file",
        "\"team-a (sk-a...0000)\"",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in\n{stdout}");
    }
    // The placeholders of keys.example.txt appear by hint only.
    assert!(!stdout.contains("REPLACE-WITH"), "{stdout}");
    // Its output is itself what the file says: every setting the example sets is shown.
    let text = std::fs::read_to_string(&example).unwrap();
    for line in text.lines().filter(|l| !l.starts_with('#') && l.contains(" = ")) {
        let key = line.split(" = ").next().unwrap().trim();
        if key != "keys_file" {
            assert!(
                stdout.contains(&format!("{key} = ")),
                "{key} not shown:\n{stdout}"
            );
        }
    }
}

#[test]
fn check_config_masks_every_secret() {
    let d = dir("masks");
    write(&d, "admin-token", &format!("{ADMIN}\n"));
    let file = write(
        &d,
        "keypool.toml",
        &format!(
            "listen = \"0.0.0.0:8787\"\n\
             client_tokens_env = \"MY_TOKENS\"\n\
             admin_token_file = \"admin-token\"\n\
             [[pool]]\n\
             name = \"main\"\n\
             keys = [\"team-a={K0}\", \"{K1}\", \"{SHORT_KEY}\"]\n"
        ),
    );
    let out = run(
        &["check-config", file.to_str().unwrap()],
        &[("MY_TOKENS", &format!("{TOKEN},another-token-Yt5Re3Wq"))],
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_no_secret(&stdout, &secrets());
    assert!(!stdout.contains("another-token"), "{stdout}");
    assert!(!stdout.contains(SHORT_KEY), "{stdout}");
    assert!(
        stdout.contains("client_tokens = [\"***\", \"***\"]  # from client_tokens_env = \"MY_TOKENS\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("admin_token = \"***\"  # from admin_token_file"),
        "{stdout}"
    );
    assert!(stdout.contains("\"team-a (sk-a...F3gH)\""), "{stdout}");
    assert!(stdout.contains("name = \"main\""), "{stdout}");
    assert!(
        stdout.contains("# warning: key #3 is shorter than 20 characters"),
        "{stdout}"
    );
}

#[test]
fn check_config_rejects_broken_files_with_one_line() {
    let d = dir("broken");
    write(&d, "keys.txt", &format!("{K0}\n"));
    let cases: &[(&str, &[&str])] = &[
        // unknown setting: named, with the likely fix
        (
            "keys_file = \"keys.txt\"\nlistn = \"127.0.0.1:1\"\n",
            &["line 2", "`listn`", "did you mean `listen`"],
        ),
        (
            "keys_file = \"keys.txt\"\nmax-body = \"1MiB\"\n",
            &["`max-body`", "`max_body`"],
        ),
        (
            "[[pool]]\nkeys_file = \"keys.txt\"\nkeyz = []\n",
            &["line 3", "`keyz`"],
        ),
        // durations need a unit
        (
            "keys_file = \"keys.txt\"\nhold = 2\n",
            &["line 2", "hold", "\"2s\""],
        ),
        (
            "keys_file = \"keys.txt\"\nidle_timeout = \"2\"\n",
            &["idle_timeout", "2s"],
        ),
        // values spelt as on the command line
        (
            "keys_file = \"keys.txt\"\norder = \"rr\"\n",
            &["order", "round-robin"],
        ),
        // several pools, each at its own mount; redis is not in this build
        (
            "[[pool]]\nkeys_file = \"keys.txt\"\n[[pool]]\nname = \"b\"\nkeys_file = \"keys.txt\"\n",
            &["same name or mount (\"/\")", "give each pool its own"],
        ),
        (
            "[[pool]]\nprovider = \"gemini\"\nkeys_file = \"keys.txt\"\n",
            &["provider = \"gemini\" is unknown", "\"openai\""],
        ),
        (
            "[[pool]]\nkeys_file = \"keys.txt\"\n[[pool]]\nprovider = \"openai\"\n",
            &["[[pool]] \"openai\" has no keys", "keys_file"],
        ),
        ("[pool]\nkeys_file = \"keys.txt\"\n", &["[[pool]] (two brackets)"]),
        (
            "keys_file = \"keys.txt\"\n[state]\nbackend = \"redis\"\nurl = \"http://:hunter2-pw@cache:6379\"\n",
            &["url must start with redis://"],
        ),
        (
            "keys_file = \"keys.txt\"\n[state]\nurl = \"redis://cache\"\n",
            &["only used by backend = \"redis\""],
        ),
        // secrets: missing, doubled, malformed: never echoed
        (
            "[[pool]]\nkeys_env = \"KEYPOOL_TEST_UNSET_VAR\"\n",
            &["KEYPOOL_TEST_UNSET_VAR is not set", "export it"],
        ),
        (
            "keys_file = \"keys.txt\"\nadmin_token = \"x\"\nadmin_token_env = \"Y\"\n",
            &["admin_token is given more than one way", "keep one"],
        ),
        (&format!("keys = \"{K0}\"\n"), &["keys", "write a list"]),
        (
            &format!("keys = [\"{K1}\", 7]\n"),
            &["a secret must be a quoted string"],
        ),
        (
            &format!("keys = [\"{K0}\",\n  \"{K1}\",\n  \"{K1}\"]\n"),
            &["same key"],
        ),
        ("keys = []\n", &["keys is empty", "keys = ["]),
        (
            &format!("client_tokens = \"{TOKEN}\"\nkeys_file = \"keys.txt\"\n"),
            &["write a list"],
        ),
        (
            &format!("admin_token = [\"{ADMIN}\"]\nkeys_file = \"keys.txt\"\n"),
            &["admin_token", "quoted string"],
        ),
        // everything else: no keys, a bad listen address, a syntax error
        ("listen = \"127.0.0.1:8787\"\n", &["no keys", "keys_file = "]),
        (
            "keys_file = \"keys.txt\"\nlisten = \"0.0.0.0:8787\"\n",
            &["without client tokens", "client_tokens_env"],
        ),
        (
            "keys_file = \"keys.txt\"\nupstream = \"ftp://x\"\n",
            &["invalid upstream", "https://"],
        ),
        (&format!("keys = [\"{K0}\"\n"), &["line"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let file = write(&d, &format!("broken-{i}.toml"), text);
        let line = one_line_error(&["check-config", file.to_str().unwrap()], &[]);
        assert!(
            line.contains(&format!("broken-{i}.toml")),
            "the file is not named: {line}"
        );
        for needle in *needles {
            assert!(line.contains(needle), "case {i}: {needle:?} not in: {line}");
        }
        assert!(!line.contains("hunter2"), "{line}");
    }
    let line = one_line_error(&["check-config", d.join("missing.toml").to_str().unwrap()], &[]);
    assert!(line.contains("cannot read config file"), "{line}");
}

/// Probe settings and policy rules (SPEC §11.5, §11.6): `check-config` shows them as the file
/// would write them, and a broken rule is one line naming the file, the pool, the rule and the
/// fix.
#[test]
fn check_config_shows_probes_and_rules_and_rejects_a_broken_rule() {
    let d = dir("rules");
    write(&d, "keys.txt", &format!("{K0}\n"));
    let good = "probe_delay = \"5m\"\n\
                [[pool]]\nname = \"main\"\nkeys_file = \"keys.txt\"\nprobe_max_delay = \"6h\"\nhints = false\n\
                [[pool.rule]]\nstatus = 529\naction = \"cool\"\nfor = \"30s\"\n\
                [[pool.rule]]\nstatus = 429\nerror_type = \"rate_limit_error\"\naction = \"cool\"\n\
                [[pool.rule]]\nstatus = 400\ncode = \"spent\"\naction = \"disable\"\nreason = \"billing\"\n\
                [[pool.rule]]\nstatus = 500\naction = \"deliver\"\n";
    let file = write(&d, "good.toml", good);
    let out = run(&["check-config", file.to_str().unwrap()], &[]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "probe_delay = \"5m\"\nprobe_max_delay = \"6h\"\nhints = false\n",
        "[[pool.rule]]\nstatus = 529\naction = \"cool\"\nfor = \"30s\"\n",
        "[[pool.rule]]\nstatus = 429\nerror_type = \"rate_limit_error\"\naction = \"cool\"  # for the answer's retry delay\n",
        "[[pool.rule]]\nstatus = 400\ncode = \"spent\"\naction = \"disable\"\nreason = \"billing\"\n",
        "[[pool.rule]]\nstatus = 500\naction = \"deliver\"\n",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in\n{stdout}");
    }
    // The defaults, and the flags over the file.
    let plain = write(&d, "plain.toml", "keys_file = \"keys.txt\"\n");
    let out = run(&["check-config", plain.to_str().unwrap()], &[]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("probe_delay = \"10m\"\nprobe_max_delay = \"24h\"\nhints = true\n"),
        "{stdout}"
    );
    assert!(stdout.contains("# no [[pool.rule]]"), "{stdout}");

    let rule = |body: &str| {
        format!(
            "[[pool]]\nname = \"main\"\nkeys_file = \"keys.txt\"\n[[pool.rule]]\nstatus = 529\naction = \"cool\"\n{body}"
        )
    };
    let cases: &[(String, &[&str])] = &[
        (
            rule("[[pool.rule]]\nstatus = 529\naction = \"deliver\"\n"),
            &[
                "[[pool]] \"main\" rule #2 never applies",
                "rule #1",
                "remove it, or move it above rule #1",
            ],
        ),
        (
            rule("[[pool.rule]]\nstatus = 700\naction = \"deliver\"\n"),
            &["rule #2", "status 700", "100-599"],
        ),
        (
            rule("[[pool.rule]]\nstatus = 403\naction = \"disable\"\n"),
            &["rule #2", "needs a reason", "reason = \"unauthorized\""],
        ),
        (
            rule("[[pool.rule]]\nstatus = 403\naction = \"deliver\"\nfor = \"1s\"\n"),
            &["rule #2", "`for` goes with action = \"cool\" only"],
        ),
        (rule("for = \"0s\"\n"), &["rule #1", "longer than 0"]),
        (
            rule("[[pool.rule]]\nstatus = 200\naction = \"cool\"\n"),
            &["rule #2", "only `deliver`"],
        ),
        (
            rule("[[pool.rule]]\nstatus = 500\naction = \"retry\"\n"),
            &["line 9", "\"retry\"", "\"cool\", \"disable\", \"deliver\""],
        ),
        (
            rule("[[pool.rule]]\nstatus = 500\naction = \"cool\"\nfro = \"1s\"\n"),
            &["line 10", "`fro`", "did you mean `for`"],
        ),
        (
            rule("[[pool.rule]]\naction = \"cool\"\n"),
            &["line 7", "needs `status`"],
        ),
        (
            "keys_file = \"keys.txt\"\nprobe_delay = \"1h\"\nprobe_max_delay = \"10m\"\n".into(),
            &["probe_max_delay", "shorter than probe_delay", "0s"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let file = write(&d, &format!("broken-{i}.toml"), text);
        let line = one_line_error(&["check-config", file.to_str().unwrap()], &[]);
        assert!(
            line.contains(&format!("broken-{i}.toml")),
            "the file is not named: {line}"
        );
        for needle in *needles {
            assert!(line.contains(needle), "case {i}: {needle:?} not in: {line}");
        }
    }
    // `--no-hints` beats the file; `--probe-delay 0s` turns probes off.
    let file = write(&d, "hints.toml", "keys_file = \"keys.txt\"\nhints = true\n");
    let (gw, _, _) = Serve::start(
        &[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-hints",
            "--probe-delay",
            "0s",
        ],
        &[],
    );
    let logs = gw.startup_logs();
    assert!(
        logs.contains("the file's hints (overridden by --no-hints)"),
        "{logs}"
    );
}

#[test]
fn the_command_line_and_environment_override_the_file() {
    let d = dir("precedence");
    write(&d, "keys.txt", &format!("from-file={K0}\n"));
    let file = write(
        &d,
        "keypool.toml",
        "listen = \"127.0.0.1:7001\"\norder = \"round-robin\"\nhold = \"5s\"\n\
         [[pool]]\nkeys_file = \"keys.txt\"\ncommit = \"first-content\"\nhold = \"3s\"\n",
    );
    let f = file.to_str().unwrap();
    // The pool table beats the top level; the file beats the defaults.
    let out = String::from_utf8(run(&["check-config", f], &[]).stdout).unwrap();
    for expected in [
        "listen = \"127.0.0.1:7001\"",
        "order = \"round-robin\"",
        "commit = \"first-content\"",
        "hold = \"3s\"",
        "from-file (sk-a",
    ] {
        assert!(out.contains(expected), "missing {expected:?}:\n{out}");
    }
    // An environment variable beats the file, and the note says so.
    let out = String::from_utf8(
        run(
            &["check-config", f],
            &[
                ("KEYPOOL_LISTEN", "localhost:7002"),
                ("KEYPOOL_KEYS", &format!("from-env={K1}")),
            ],
        )
        .stdout,
    )
    .unwrap();
    assert!(out.contains("listen = \"127.0.0.1:7002\""), "{out}");
    assert!(
        out.contains("from-env (sk-a") && !out.contains("from-file"),
        "{out}"
    );
    assert!(
        out.contains("# note: the file's listen (overridden by --listen / KEYPOOL_LISTEN)"),
        "{out}"
    );
    assert!(
        out.contains("# note: the file's keys (overridden by --keys-file / KEYPOOL_KEYS)"),
        "{out}"
    );
    // An empty KEYPOOL_KEYS does not silently empty the pool.
    let line = one_line_error(&["check-config", f], &[("KEYPOOL_KEYS", "")]);
    assert!(line.contains("KEYPOOL_KEYS is set but has no keys"), "{line}");
}

#[test]
fn serve_runs_from_a_config_file_with_secrets_from_env_and_files() {
    let d = dir("serve");
    write(&d, "admin-token", &format!("{ADMIN}\n"));
    let file = write(
        &d,
        "keypool.toml",
        "listen = \"localhost:0\"\nadmin_token_file = \"admin-token\"\n\
         [[pool]]\nname = \"main\"\nkeys_env = \"POOL_KEYS\"\nupstream = \"http://127.0.0.1:9\"\n",
    );
    let keys = format!("first={K0},second={K1}");
    let (gw, addr, banner) = Serve::start(&["--config", file.to_str().unwrap()], &[("POOL_KEYS", &keys)]);
    assert!(addr.ip().is_loopback(), "{addr}");
    assert!(banner["fields"]["keys"] == 2, "{banner}");
    let (status, body) = get(addr, "/admin/keys", Some(ADMIN));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"first\"") && body.contains("\"second\""),
        "{body}"
    );
    assert_no_secret(&body, &secrets());
    assert_no_secret(&gw.startup_logs(), &secrets());
}

#[test]
fn serve_runs_two_pools_from_a_config_file_and_from_the_openai_shortcut() {
    let mock = keypool_mock::MockServer::start_openai();
    let d = dir("two-pools");
    let file = write(
        &d,
        "keypool.toml",
        &format!(
            "listen = \"localhost:0\"\nadmin_token_env = \"ADMIN\"\n\
             [[pool]]\nname = \"claude\"\nkeys_env = \"A_KEYS\"\nupstream = \"http://127.0.0.1:9\"\n\
             [[pool]]\nname = \"gpt\"\nprovider = \"openai\"\nmount = \"/oai/\"\nkeys_env = \"O_KEYS\"\nupstream = \"{}\"\n",
            mock.url()
        ),
    );
    let env = [("A_KEYS", K0), ("O_KEYS", K1), ("ADMIN", ADMIN)];
    let (gw, addr, _) = Serve::start(&["--config", file.to_str().unwrap()], &env);
    let (status, body) = get(addr, "/admin/keys", Some(ADMIN));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pools: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["pool"].as_str().unwrap())
        .collect();
    assert_eq!(pools, ["claude", "gpt"]);
    // The OpenAI pool answers under its mount, with the key as Bearer, the mount cut off.
    let (status, body) = get(addr, "/oai/v1/models", None);
    assert_eq!(status, 200, "{body}");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/v1/models");
    assert_eq!(seen[0].key.as_deref(), Some(K1));
    let (_, metrics) = get(addr, "/metrics", None);
    assert!(metrics.contains("pool=\"gpt\""), "{metrics}");
    let (status, _) = get(addr, "/oai/nope", None);
    assert_eq!(status, 404);
    assert_no_secret(&gw.startup_logs(), &secrets());
    drop(gw);

    // Without a config file: KEYPOOL_OPENAI_KEYS alone serves OpenAI at /openai.
    let upstream = mock.url();
    let env = [
        ("KEYPOOL_OPENAI_KEYS", K1),
        ("KEYPOOL_OPENAI_UPSTREAM", upstream.as_str()),
    ];
    let (gw, addr, _) = Serve::start(&["--listen", "127.0.0.1:0"], &env);
    let (status, body) = get(addr, "/openai/v1/models", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.requests()[1].uri, "/v1/models");
    let (status, _) = get(addr, "/v1/models", None);
    assert_eq!(status, 404, "no pool at /");
    drop(gw);
}

#[test]
fn reloading_a_config_file_reads_its_keys_again() {
    let d = dir("reload");
    write(&d, "keys.txt", &format!("a={K0}\n"));
    let file = write(&d, "keypool.toml", "[[pool]]\nkeys_file = \"keys.txt\"\n");
    let source = keypool_gateway::config::KeySource::ConfigFile(file.clone());
    let keys = source.reload().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].label.as_deref(), Some("a"));
    // The file now names other keys, inline.
    write(
        &d,
        "keypool.toml",
        &format!("[[pool]]\nkeys = [\"b={K1}\", \"c={K0}\"]\n"),
    );
    let keys = source.reload().unwrap();
    let labels: Vec<_> = keys.iter().map(|k| k.label.clone().unwrap()).collect();
    assert_eq!(labels, ["b", "c"]);
    // A broken file is refused with one line (the server then keeps the previous keys).
    write(
        &d,
        "keypool.toml",
        "[[pool]]\nkeys_file = \"keys.txt\"\nhold = 2\n",
    );
    let e = source.reload().unwrap_err().to_string();
    assert!(
        e.contains("keypool.toml line 3: hold") && !e.contains('\n'),
        "{e}"
    );
    assert_no_secret(&e, &secrets());
}

// ---- the flag problems of issue 20 -----------------------------------------------------------

#[test]
fn listen_accepts_localhost() {
    let (_gw, addr, _) = Serve::start(&["--listen", "localhost:0"], &[("KEYPOOL_KEYS", K0)]);
    assert_eq!(addr.ip(), std::net::Ipv4Addr::LOCALHOST);
    let (status, body) = get(addr, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    // What is still refused is refused in one line, with the fix.
    let line = one_line_error(&["serve", "--listen", "8787"], &[("KEYPOOL_KEYS", K0)]);
    assert!(line.contains("127.0.0.1:8787"), "{line}");
    let line = one_line_error(&["serve", "--listen", "localhost"], &[("KEYPOOL_KEYS", K0)]);
    assert!(line.contains("localhost:8787"), "{line}");
}

#[test]
fn a_keys_file_with_a_byte_order_mark_works() {
    let d = dir("bom");
    let file = write(&d, "keys.txt", &format!("\u{feff}{K0}\r\n{K1}\r\n"));
    let (_gw, _, banner) = Serve::start(
        &["--listen", "127.0.0.1:0", "--keys-file", file.to_str().unwrap()],
        &[],
    );
    assert!(banner["fields"]["keys"] == 2, "{banner}");
}

#[test]
fn an_empty_keypool_keys_says_comma_separated() {
    let line = one_line_error(&["serve"], &[("KEYPOOL_KEYS", "")]);
    assert!(
        line.contains("KEYPOOL_KEYS") && line.contains("comma-separated"),
        "{line}"
    );
    assert!(!line.contains("per line"), "{line}");
    let line = one_line_error(&["serve"], &[("KEYPOOL_KEYS", " , ")]);
    assert!(line.contains("comma-separated"), "{line}");
}

#[test]
fn the_banner_for_every_interface_names_reachable_addresses() {
    let (_gw, addr, banner) = Serve::start(
        &["--listen", "0.0.0.0:0", "--client-token", TOKEN],
        &[("KEYPOOL_KEYS", K0)],
    );
    let message = banner["fields"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("http://127.0.0.1:{}", addr.port())),
        "{message}"
    );
    assert!(!message.contains("http://0.0.0.0"), "{message}");
}

#[test]
fn every_duration_flag_needs_a_unit() {
    for flag in [
        "--hold",
        "--default-cooldown",
        "--max-cooldown",
        "--connect-timeout",
        "--first-byte-timeout",
        "--idle-timeout",
        "--grace",
    ] {
        let line = one_line_error(&["serve", flag, "2"], &[("KEYPOOL_KEYS", K0)]);
        assert!(
            line.contains(flag) && line.contains("no unit") && line.contains("2s"),
            "{line}"
        );
    }
}

#[test]
fn help_shows_keypool_keys_but_never_its_value() {
    let out = run(&["serve", "--help"], &[("KEYPOOL_KEYS", K0)]);
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(help.contains("[env: KEYPOOL_KEYS]"), "{help}");
    assert!(help.contains("--config <PATH>"), "{help}");
    assert_no_secret(&help, &secrets());
    let out = run(&["check-config", "--help"], &[]);
    assert!(out.status.success());
}

#[test]
fn implausible_keys_are_warned_about_once_by_position() {
    let keys = format!("{K0},{SHORT_KEY}");
    let (gw, _, _) = Serve::start(&["--listen", "127.0.0.1:0"], &[("KEYPOOL_KEYS", &keys)]);
    let logs = gw.startup_logs();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("shorter than 20")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(
        warnings[0].contains("key #2") && warnings[0].contains("WARN"),
        "{logs}"
    );
    assert!(!logs.contains(SHORT_KEY), "{logs}");
}
