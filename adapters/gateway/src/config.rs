//! `keypool serve` flags, and their validation into a [`Config`] (the config file, which can
//! hold every flag, is [`crate::config_file`]).
//!
//! Every problem is reported as one line that names it and the fix; nothing here ever prints a
//! key or a token.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use keypool_core::call::{CallConfig, CommitPoint, Timeouts};
use keypool_core::probe::ProbeConfig;
use keypool_core::{KeySpec, OnForbidden, OnUnauthorized, Order, Policy, Rule, Secret};

use crate::access::AccessPolicy;
use crate::keys;

/// Flags of `keypool serve`. Its `Debug` masks the keys and tokens.
#[derive(Clone, Args)]
pub struct ServeArgs {
    /// Config file (TOML) with any of these settings, the pool and the state backend. A flag or
    /// environment variable given here overrides the file. See `keypool check-config`.
    #[arg(long, value_name = "PATH", env = "KEYPOOL_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on: IP:PORT, or localhost:PORT. Without client tokens only a loopback
    /// address is allowed.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:8787",
        env = "KEYPOOL_LISTEN",
        value_parser = parse_listen
    )]
    pub listen: SocketAddr,

    /// Upstream base URL every `/v1/...` request is forwarded to.
    #[arg(long, default_value = "https://api.anthropic.com", env = "KEYPOOL_UPSTREAM")]
    pub upstream: String,

    /// File with the pool's keys: one per line, `#` comments, optional `label=key`.
    /// Re-read on SIGHUP. Takes precedence over KEYPOOL_KEYS.
    #[arg(long, value_name = "PATH")]
    pub keys_file: Option<PathBuf>,

    /// The pool's keys, comma- or newline-separated (`label=key` names one). Prefer the
    /// environment variable: a command line is visible to every user of the machine.
    #[arg(long, value_name = "KEYS", env = "KEYPOOL_KEYS", hide_env_values = true)]
    pub keys: Option<String>,

    /// Upstream base URL of the OpenAI pool, which is served at `/openai`
    /// (`/openai/v1/chat/completions` → `{upstream}/v1/chat/completions`). Any
    /// OpenAI-compatible API works (its base URL without `/v1`).
    #[arg(
        long,
        default_value = "https://api.openai.com",
        env = "KEYPOOL_OPENAI_UPSTREAM"
    )]
    pub openai_upstream: String,

    /// File with the OpenAI pool's keys (same format as --keys-file). Re-read on SIGHUP.
    #[arg(long, value_name = "PATH")]
    pub openai_keys_file: Option<PathBuf>,

    /// The OpenAI pool's keys, comma- or newline-separated: with them the gateway also serves
    /// an OpenAI pool at `/openai`.
    #[arg(
        long,
        value_name = "KEYS",
        env = "KEYPOOL_OPENAI_KEYS",
        hide_env_values = true
    )]
    pub openai_keys: Option<String>,

    /// Client tokens that may use the pool (repeat the flag, or comma-separate in the env var).
    /// Without any, the gateway serves only loopback clients.
    #[arg(
        long = "client-token",
        value_name = "TOKEN",
        env = "KEYPOOL_CLIENT_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub client_tokens: Vec<String>,

    /// Forward a client credential that is not a client token as the caller's own key, once.
    #[arg(long)]
    pub allow_byok: bool,

    /// Pass the upstream's identity headers (Anthropic: anthropic-organization-id,
    /// anthropic-workspace-id) on to clients. By default they are removed: they identify the
    /// pool's owner. Rate-limit headers always pass.
    #[arg(long)]
    pub pass_identity_headers: bool,

    /// Token for /admin routes (x-api-key or Authorization: Bearer). Without it they are off.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KEYPOOL_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Which key a call tries first: `primary` (always the first healthy key, keeps the prompt
    /// cache warm) or `round-robin`.
    #[arg(long, value_enum, default_value_t = OrderArg::Primary)]
    pub order: OrderArg,

    /// When a stream stops being able to fail over: at the first byte, or at the first content
    /// block (holding message_start and ping for up to --hold).
    #[arg(long, value_enum, default_value_t = CommitArg::FirstByte)]
    pub commit: CommitArg,

    /// Longest hold of the first-content commit point.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub hold: Duration,

    /// What a 401 does to a key: disable it, or cool it for 60 s.
    #[arg(long = "on-401", value_enum, default_value_t = On401::Disable)]
    pub on_401: On401,

    /// What a 403 does: disable the key, or deliver the 403 to the client.
    #[arg(long = "on-403", value_enum, default_value_t = On403::Disable)]
    pub on_403: On403,

    /// Cooldown of a 429 that carries no usable retry-after.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub default_cooldown: Duration,

    /// Longest cooldown any retry-after can ask for.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub max_cooldown: Duration,

    /// Largest request body accepted (bigger ones get 413 request_too_large).
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = parse_size)]
    pub max_body: usize,

    /// TCP + TLS connect timeout to the upstream.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Longest wait for the upstream's response head (a non-streaming answer arrives whole).
    #[arg(long, value_name = "DURATION", default_value = "600s", value_parser = parse_duration)]
    pub first_byte_timeout: Duration,

    /// Longest gap between two chunks of an upstream body or stream.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT, how long in-flight requests and streams may take to finish.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,

    /// Extra root certificate (PEM) to trust for the upstream, e.g. a test upstream's CA.
    #[arg(long, value_name = "PATH")]
    pub upstream_ca: Option<PathBuf>,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Share key state with every replica on the same Redis/Valkey:
    /// redis://[:PASSWORD@]HOST:PORT[/DB], rediss:// for TLS (prefer the env var when the URL
    /// holds a password). Without it, state is in-process.
    #[arg(long, value_name = "URL", env = "KEYPOOL_STATE", hide_env_values = true)]
    pub state: Option<String>,

    /// Prefix of the Redis names keypool uses ({NS}:keys, {NS}:marks); replicas that share
    /// state use the same one.
    #[arg(
        long,
        value_name = "NS",
        default_value = "keypool",
        env = "KEYPOOL_STATE_NAMESPACE"
    )]
    pub state_namespace: String,

    /// How long after the upstream disabled a key (401, 403, billing) it is probed with one
    /// request that spends no tokens (GET /v1/models); a success enables it. `0s`: never.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub probe_delay: Duration,

    /// The longest wait between two probes of a key: each failed probe doubles the wait, up to
    /// this.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub probe_max_delay: Duration,

    /// Ignore the upstream's rate-limit headers: without this, a key whose answer says a limit
    /// is used up is tried after the others until the limit resets (never refused).
    #[arg(long)]
    pub no_hints: bool,

    /// The classification rules of a config file's pool (`[[pool.rule]]`); no flag sets them.
    #[arg(skip)]
    pub rules: Vec<Rule>,
}

impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked = |set: bool| if set { "***" } else { "-" };
        f.debug_struct("ServeArgs")
            .field("config", &self.config)
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("keys_file", &self.keys_file)
            .field("keys", &masked(self.keys.is_some()))
            .field("openai_upstream", &self.openai_upstream)
            .field("openai_keys_file", &self.openai_keys_file)
            .field("openai_keys", &masked(self.openai_keys.is_some()))
            .field("client_tokens", &self.client_tokens.len())
            .field("allow_byok", &self.allow_byok)
            .field("pass_identity_headers", &self.pass_identity_headers)
            .field("admin_token", &masked(self.admin_token.is_some()))
            .field("order", &self.order)
            .field("commit", &self.commit)
            .field("hold", &self.hold)
            .field("on_401", &self.on_401)
            .field("on_403", &self.on_403)
            .field("default_cooldown", &self.default_cooldown)
            .field("max_cooldown", &self.max_cooldown)
            .field("max_body", &self.max_body)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("grace", &self.grace)
            .field("upstream_ca", &self.upstream_ca)
            .field("log_format", &self.log_format)
            .field("probe_delay", &self.probe_delay)
            .field("probe_max_delay", &self.probe_max_delay)
            .field("no_hints", &self.no_hints)
            .field("rules", &self.rules)
            .finish()
    }
}

/// `--order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrderArg {
    /// Primary with fallback.
    Primary,
    /// Round robin.
    RoundRobin,
}

/// `--commit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CommitArg {
    /// Commit at the first byte.
    FirstByte,
    /// Commit at the first content block.
    FirstContent,
}

/// `--on-401`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum On401 {
    /// Disable the key.
    Disable,
    /// Cool it for 60 s.
    Cool,
}

/// `--on-403`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum On403 {
    /// Disable the key.
    Disable,
    /// Deliver the 403.
    Deliver,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A key file (`--keys-file`), re-read on SIGHUP.
    File(PathBuf),
    /// `KEYPOOL_KEYS` (or `--keys`).
    Env,
    /// The pool of this config file (inline, `keys_env` or `keys_file`); SIGHUP re-reads the
    /// config file and takes its keys.
    ConfigFile(PathBuf),
    /// The `[[pool]]` table at this position (from 0) of a config file with several pools.
    ConfigPool(PathBuf, usize),
    /// `KEYPOOL_OPENAI_KEYS` (or `--openai-keys`).
    OpenAiEnv,
}

impl KeySource {
    /// Reads the keys again from where they came from, for a reload (SIGHUP).
    pub fn reload(&self) -> Result<Vec<KeySpec>, ConfigError> {
        match self {
            Self::File(path) => load_keys_file(path),
            Self::ConfigFile(path) => crate::config_file::reload_keys(path),
            Self::ConfigPool(path, index) => crate::config_file::reload_pool_keys(path, *index),
            Self::Env => Err(err(
                "keys come from KEYPOOL_KEYS (or --keys); there is no file to reload",
            )),
            Self::OpenAiEnv => Err(err(
                "keys come from KEYPOOL_OPENAI_KEYS (or --openai-keys); there is no file to reload",
            )),
        }
    }
}

/// One pool the gateway serves: its provider (in `call.profile`), upstream, keys, policy and
/// the path it is mounted at.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Its name, in logs, metrics (`pool` label) and the admin view.
    pub name: String,
    /// Where it is served: `/` or a path such as `/openai` (no trailing slash);
    /// `{mount}/v1/...` is forwarded to `{upstream}/v1/...`.
    pub mount: String,
    /// Upstream base URL, without a trailing slash.
    pub upstream: String,
    /// The keys.
    pub keys: Vec<KeySpec>,
    /// Where they came from.
    pub key_source: KeySource,
    /// Walk order.
    pub order: Order,
    /// Provider profile, policy, commit point, timeouts.
    pub call: CallConfig,
    /// Extra upstream root certificates (DER).
    pub upstream_roots: Vec<Vec<u8>>,
    /// When disabled keys are probed.
    pub probe: ProbeConfig,
}

/// The mount path of the OpenAI pool the `KEYPOOL_OPENAI_KEYS` shortcut makes.
pub const OPENAI_MOUNT: &str = "/openai";

/// A validated configuration. The first pool's settings stand at the top level (`name`,
/// `mount`, `upstream`, `keys`, …); further pools are in `more` ([`Config::pools`] lists all).
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// The first pool's name (logs, metrics, admin).
    pub name: String,
    /// The first pool's mount path (`/` for the Anthropic pool of round 1).
    pub mount: String,
    /// Further pools, each at its own mount path.
    pub more: Vec<PoolConfig>,
    /// Upstream base URL, without a trailing slash.
    pub upstream: String,
    /// The keys.
    pub keys: Vec<KeySpec>,
    /// Where they came from.
    pub key_source: KeySource,
    /// Access control.
    pub access: AccessPolicy,
    /// Admin token.
    pub admin_token: Option<Secret>,
    /// Whether the upstream's identity headers reach clients (SPEC §13; off by default).
    pub pass_identity_headers: bool,
    /// Walk order.
    pub order: Order,
    /// Policy, commit point, timeouts.
    pub call: CallConfig,
    /// Request body limit.
    pub max_body: usize,
    /// Shutdown grace period.
    pub grace: Duration,
    /// Extra upstream root certificates (DER).
    pub upstream_roots: Vec<Vec<u8>>,
    /// The shared state backend (`--state`); `None`: in-process.
    pub state: Option<keypool_redis::StateConfig>,
    /// When the first pool's disabled keys are probed.
    pub probe: ProbeConfig,
}

impl Config {
    /// Every pool: the first (from the top-level fields), then `more`.
    pub fn pools(&self) -> Vec<PoolConfig> {
        let first = PoolConfig {
            name: self.name.clone(),
            mount: self.mount.clone(),
            upstream: self.upstream.clone(),
            keys: self.keys.clone(),
            key_source: self.key_source.clone(),
            order: self.order,
            call: self.call.clone(),
            upstream_roots: self.upstream_roots.clone(),
            probe: self.probe,
        };
        std::iter::once(first).chain(self.more.iter().cloned()).collect()
    }

    /// Checks that pool names and mount paths are unique and well-formed.
    pub fn check_pools(&self) -> Result<(), ConfigError> {
        let pools = self.pools();
        for (i, p) in pools.iter().enumerate() {
            if !keys::valid_label(&p.name) {
                return Err(err(format!(
                    "pool name {:?}: use 1-64 letters, digits, '.', '_' or '-'",
                    p.name
                )));
            }
            if !p.mount.starts_with('/') || (p.mount.len() > 1 && p.mount.ends_with('/')) {
                return Err(err(format!(
                    "pool {:?} mount {:?}: a mount is a path starting with '/' and not ending with one, e.g. \"/openai\"",
                    p.name, p.mount
                )));
            }
            if let Some(other) = pools[..i].iter().find(|o| o.name == p.name || o.mount == p.mount) {
                return Err(err(format!(
                    "pools {:?} and {:?} have the same name or mount path ({:?}); give each its own",
                    other.name, p.name, p.mount
                )));
            }
        }
        Ok(())
    }
}

/// A configuration problem: one line, naming the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// Keys named by a config file, used when neither `--keys-file` nor `KEYPOOL_KEYS` gives keys.
#[derive(Debug, Clone)]
pub struct FileKeys {
    /// The keys.
    pub keys: Vec<KeySpec>,
    /// The config file that names them (re-read on SIGHUP).
    pub config: PathBuf,
}

impl ServeArgs {
    /// Validates the flags (without a config file; see [`crate::config_file::load`]).
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.build(None)
    }

    /// Validates the settings; `file_keys` are a config file's keys, used when neither
    /// `--keys-file` nor `KEYPOOL_KEYS` (`--keys`) is given.
    pub fn build(&self, file_keys: Option<FileKeys>) -> Result<Config, ConfigError> {
        let openai_keys = match (&self.openai_keys_file, &self.openai_keys) {
            (Some(path), _) => Some((load_keys_file(path)?, KeySource::File(path.clone()))),
            (None, Some(value)) => {
                let keys = keys::parse_env(value, "KEYPOOL_OPENAI_KEYS").map_err(|e| err(e.to_string()))?;
                Some((keys.into_iter().map(|k| k.spec).collect(), KeySource::OpenAiEnv))
            }
            (None, None) => None,
        };
        let anthropic_keys = match (&self.keys_file, &self.keys, file_keys) {
            (Some(path), _, _) => Some((load_keys_file(path)?, KeySource::File(path.clone()))),
            (None, Some(value), _) => {
                let keys = keys::parse_env(value, "KEYPOOL_KEYS").map_err(|e| err(e.to_string()))?;
                Some((keys.into_iter().map(|k| k.spec).collect(), KeySource::Env))
            }
            (None, None, Some(file)) => Some((file.keys, KeySource::ConfigFile(file.config))),
            (None, None, None) => None,
        };
        if anthropic_keys.is_none() && openai_keys.is_none() {
            return Err(err(
                "no keys: set KEYPOOL_KEYS=key1,key2 (Anthropic) or KEYPOOL_OPENAI_KEYS=key1,key2 (OpenAI), \
                 pass --keys-file PATH (one key per line), or name them in a --config file",
            ));
        }
        if let Some((keys, _)) = &openai_keys {
            keypool_core::Pool::new(keys.clone(), Order::default(), std::time::Instant::now())
                .map_err(|e| err(format!("invalid OpenAI key list: {e}")))?;
        }
        // The first pool is Anthropic's at `/` when it has keys, else OpenAI's at `/openai`.
        let (first_openai, (keys, key_source), more_openai) = match (anthropic_keys, openai_keys) {
            (Some(a), o) => (false, a, o),
            (None, Some(o)) => (true, o, None),
            (None, None) => unreachable_keys()?,
        };
        // Validate the key list exactly as the pool will, so errors surface before listening.
        keypool_core::Pool::new(keys.clone(), Order::default(), std::time::Instant::now())
            .map_err(|e| err(format!("invalid key list: {e}")))?;

        let mut tokens = Vec::new();
        for (i, t) in self
            .client_tokens
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .enumerate()
        {
            tokens.push(Secret::new(t).map_err(|e| err(format!("client token #{}: {e}", i + 1)))?);
        }
        if tokens.is_empty() && !self.listen.ip().is_loopback() {
            return Err(err(format!(
                "refusing to listen on {} without client tokens: anyone who reaches it could spend your keys; \
                 set --client-token (or KEYPOOL_CLIENT_TOKENS{}), or listen on 127.0.0.1",
                self.listen,
                if self.config.is_some() {
                    ", or client_tokens_env in the config file"
                } else {
                    ""
                }
            )));
        }
        let admin_token = match self
            .admin_token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            Some(t) => Some(Secret::new(t).map_err(|e| err(format!("admin token: {e}")))?),
            None => None,
        };

        let upstream = check_upstream(&self.upstream, "--upstream")?;
        let openai_upstream = check_upstream(&self.openai_upstream, "--openai-upstream")?;
        let upstream_roots = match &self.upstream_ca {
            Some(path) => load_pem_certs(path)?,
            None => Vec::new(),
        };
        let state = match self.state.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            Some(url) => Some(crate::state::config(url, &self.state_namespace)?),
            None => None,
        };
        if self.max_body == 0 {
            return Err(err("--max-body must be larger than 0"));
        }

        let mut policy = Policy::default();
        policy.on_unauthorized = match self.on_401 {
            On401::Disable => OnUnauthorized::Disable,
            On401::Cool => OnUnauthorized::CoolFor(Duration::from_secs(60)),
        };
        policy.on_forbidden = match self.on_403 {
            On403::Disable => OnForbidden::Disable,
            On403::Deliver => OnForbidden::Deliver,
        };
        policy.default_cooldown = self.default_cooldown;
        policy.max_cooldown = self.max_cooldown;
        policy.hints = !self.no_hints;
        policy.rules.clone_from(&self.rules);
        // A config file's rules were checked where it names them; this is the backstop.
        policy.validate().map_err(|e| err(e.to_string()))?;
        if !self.probe_delay.is_zero() && self.probe_max_delay < self.probe_delay {
            return Err(err(format!(
                "probe_max_delay (--probe-max-delay) {} is shorter than probe_delay (--probe-delay) {}: make it at least as long (default 24h), or set probe_delay to 0s for no probes",
                crate::config_file::fmt_duration(self.probe_max_delay),
                crate::config_file::fmt_duration(self.probe_delay)
            )));
        }
        let probe = ProbeConfig {
            first_delay: self.probe_delay,
            max_delay: self.probe_max_delay,
        };
        let commit = match self.commit {
            CommitArg::FirstByte => CommitPoint::FirstByte,
            CommitArg::FirstContent => CommitPoint::FirstContent { hold: self.hold },
        };
        let call = CallConfig::default()
            .with_policy(policy)
            .with_commit(commit)
            .with_timeouts(Timeouts {
                first_byte: self.first_byte_timeout,
                idle: self.idle_timeout,
                connect: self.connect_timeout,
            });
        let order = match self.order {
            OrderArg::Primary => Order::PrimaryWithFallback,
            OrderArg::RoundRobin => Order::RoundRobin,
        };
        let openai_call = call.clone().with_profile(keypool_core::Profile::openai());
        let more = more_openai
            .map(|(keys, key_source)| PoolConfig {
                name: "openai".into(),
                mount: OPENAI_MOUNT.into(),
                upstream: openai_upstream.clone(),
                keys,
                key_source,
                order,
                call: openai_call.clone(),
                upstream_roots: upstream_roots.clone(),
                probe,
            })
            .into_iter()
            .collect();
        let (name, mount, upstream, call) = if first_openai {
            ("openai", OPENAI_MOUNT, openai_upstream, openai_call)
        } else {
            ("anthropic", "/", upstream, call)
        };
        Ok(Config {
            listen: self.listen,
            name: name.into(),
            mount: mount.into(),
            more,
            upstream,
            keys,
            key_source,
            access: AccessPolicy {
                tokens,
                allow_byok: self.allow_byok,
            },
            admin_token,
            pass_identity_headers: self.pass_identity_headers,
            order,
            call,
            max_body: self.max_body,
            grace: self.grace,
            upstream_roots,
            state,
            probe,
        })
    }
}

/// `build` checked that some pool has keys; this is never reached.
fn unreachable_keys<T>() -> Result<T, ConfigError> {
    Err(err("no keys: set KEYPOOL_KEYS or KEYPOOL_OPENAI_KEYS"))
}

/// Checks an upstream base URL and returns it without a trailing slash; `what` names the
/// setting in errors (`--upstream`, or where in a config file).
pub fn check_upstream(raw: &str, what: &str) -> Result<String, ConfigError> {
    let upstream = raw.trim().trim_end_matches('/').to_owned();
    let uri: http::Uri = upstream.parse().map_err(|_| {
        err(format!(
            "invalid {what} {upstream:?}: use a URL like https://api.anthropic.com"
        ))
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(err(format!(
            "invalid {what} {upstream:?}: it must start with http:// or https:// and name a host"
        )));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(err(format!(
            "invalid {what} {upstream:?}: give the base URL only (no path); /v1/... is appended per request"
        )));
    }
    Ok(upstream)
}

/// Reads and parses a key file.
pub fn load_keys_file(path: &Path) -> Result<Vec<KeySpec>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read --keys-file {}: {e}", path.display())))?;
    let keys = keys::parse_file(&text, &path.display().to_string()).map_err(|e| err(e.to_string()))?;
    Ok(keys.into_iter().map(|k| k.spec).collect())
}

fn load_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| err(format!("cannot read --upstream-ca {}: {e}", path.display())))?
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect();
    if certs.is_empty() {
        return Err(err(format!(
            "--upstream-ca {}: no PEM CERTIFICATE block found",
            path.display()
        )));
    }
    Ok(certs)
}

/// Parses `500ms`, `2s`, `1.5s`, `10m`, `1h`. A bare number is refused: `--hold 2` could mean
/// 2 ms or 2 s, so the error asks for the unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 500ms, 2s, 10m, 1h)"))?;
    let secs = match unit.trim() {
        "" => {
            return Err(format!("{s} has no unit: write {s}s (or 500ms, 10m, 1h)"));
        }
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

/// Parses a listen address: `IP:PORT` (`[::1]:PORT` for IPv6), `localhost:PORT` (the IPv4
/// loopback, 127.0.0.1), or `NAME:PORT` for a host name that resolves (its first IPv4 address,
/// else its first address). Errors are one line with the fix.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let example = "write IP:PORT, e.g. 127.0.0.1:8787 (this machine only) or 0.0.0.0:8787 (every interface)";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(match s.parse::<u16>() {
            Ok(port) => format!("{s} is only a port: write 127.0.0.1:{port} (or localhost:{port})"),
            Err(_)
                if !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') =>
            {
                format!("{s:?} has no port: write {s}:8787 (or 127.0.0.1:8787)")
            }
            Err(_) => format!("{s:?} is not an address: {example}"),
        });
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!(
            "{s:?}: the port after ':' must be a number from 0 to 65535; {example}"
        ));
    };
    if host.is_empty() {
        return Err(format!(
            "{s:?} has no host: write 127.0.0.1:{port} (this machine only) or 0.0.0.0:{port} (every interface)"
        ));
    }
    if host.eq_ignore_ascii_case("localhost") {
        // RFC 6761: localhost is the loopback; no resolver needed (or trusted) for it.
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    if host.parse::<IpAddr>().is_ok() || host.contains(':') {
        return Err(format!(
            "{s:?}: write an IPv6 address in brackets, e.g. [::1]:{port}"
        ));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|_| format!("cannot resolve the host name {host:?}: {example}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("the host name {host:?} has no address: {example}"))
}

/// What the start-up line tells clients to use as their base URL. An unspecified address
/// (`0.0.0.0`, `::`) is where the gateway listens, not an address a client can connect to.
pub fn client_base_urls(addr: SocketAddr) -> String {
    let port = addr.port();
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            format!("http://127.0.0.1:{port} on this host, http://<this host's address>:{port} elsewhere")
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            format!("http://[::1]:{port} on this host, http://<this host's address>:{port} elsewhere")
        }
        _ => format!("http://{addr}"),
    }
}

/// Parses `1024`, `64KiB`, `32MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 32MiB)"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?} (use B, KiB, MiB, GiB)")),
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        // A bare number is refused, with the fix.
        let e = parse_duration("2").unwrap_err();
        assert!(e.contains("no unit") && e.contains("2s"), "{e}");
        assert!(parse_duration("0").is_err());
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn debug_masks_keys_and_tokens() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "keypool",
            "--keys",
            "sk-ant-api03-debug-secret-key",
            "--admin-token",
            "debug-admin-secret",
            "--client-token",
            "debug-client-secret",
        ])
        .unwrap();
        let shown = format!("{:?}", cli.serve);
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("keys: \"***\""), "{shown}");
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("127.0.0.1:8787"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 8787)))
        );
        assert_eq!(
            parse_listen("localhost:8787"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 8787)))
        );
        assert_eq!(
            parse_listen("LOCALHOST:0"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
        );
        assert_eq!(
            parse_listen("[::1]:9000"),
            "[::1]:9000".parse::<SocketAddr>().map_err(|e| e.to_string())
        );
        for (input, needle) in [
            ("8787", "127.0.0.1:8787"),
            (":8787", "127.0.0.1:8787"),
            ("localhost", "localhost:8787"),
            ("", "not an address"),
            ("localhost:http", "port"),
            ("::1:8787", "brackets"),
        ] {
            let e = parse_listen(input).unwrap_err();
            assert!(e.contains(needle), "{input}: {e}");
            assert!(!e.contains('\n'), "{input}: {e}");
        }
    }

    #[test]
    fn banner_urls_are_reachable_addresses() {
        assert_eq!(
            client_base_urls(SocketAddr::from(([127, 0, 0, 1], 8787))),
            "http://127.0.0.1:8787"
        );
        let any = client_base_urls(SocketAddr::from(([0, 0, 0, 0], 8787)));
        assert!(any.starts_with("http://127.0.0.1:8787 "), "{any}");
        assert!(!any.contains("0.0.0.0"), "{any}");
        let any6 = client_base_urls("[::]:8787".parse().unwrap());
        assert!(any6.starts_with("http://[::1]:8787 "), "{any6}");
    }
}
