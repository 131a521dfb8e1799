//! The config file: `keypool serve --config keypool.toml` (SPEC §13).
//!
//! The file can hold every `serve` flag (same names, `_` for `-`), one `[[pool]]` table and a
//! `[state]` table; `adapters/gateway/keypool.example.toml` shows all of it. Secrets (keys,
//! client tokens, the admin token, a state URL) may be written inline, or named: `*_env = "VAR"`
//! reads an environment variable, `*_file = "path"` reads a file (relative paths are relative to
//! the config file's directory).
//!
//! Precedence, highest first: a flag on the command line or its `KEYPOOL_*` environment
//! variable; the `[[pool]]` table; the top level of the file; the built-in default.
//!
//! Loading ends in the same [`Config`] the flags produce. Every problem is one line that names
//! the file, the problem and the fix, and never contains a secret.

use std::collections::BTreeSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use clap::parser::ValueSource;
use keypool_core::{Action, DisableReason, KeySpec, Policy, PolicyError, Rule};
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::config::{
    self, CommitArg, Config, ConfigError, FileKeys, KeySource, LogFormat, On401, On403, OrderArg, ServeArgs,
};
use crate::keys;

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

// ---------------------------------------------------------------------------------------------
// What the command line gave

/// Which `serve` settings were given on the command line or by their environment variable (they
/// override the file); the others hold clap's defaults.
#[derive(Debug, Clone, Default)]
pub struct Explicit(BTreeSet<String>);

impl Explicit {
    /// Nothing given explicitly: every setting may come from the file.
    pub fn none() -> Self {
        Self::default()
    }

    /// The settings of `serve`'s matches whose value came from the command line or the
    /// environment, not from a default.
    pub fn from_matches(matches: &clap::ArgMatches) -> Self {
        Self(
            matches
                .ids()
                .filter(|id| {
                    matches!(
                        matches.value_source(id.as_str()),
                        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                    )
                })
                .map(|id| id.as_str().to_owned())
                .collect(),
        )
    }

    /// Whether the setting `id` (a `ServeArgs` field name) was given explicitly.
    pub fn contains(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

// ---------------------------------------------------------------------------------------------
// The file's schema

/// The per-pool settings, which may also stand at the top level as defaults for the pool.
macro_rules! pool_settings {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($extra:tt)* }) => {
        $(#[$meta])*
        $vis struct $name {
            $($extra)*
            upstream: Option<String>,
            upstream_ca: Option<PathBuf>,
            keys: Option<SecretList>,
            keys_env: Option<String>,
            keys_file: Option<PathBuf>,
            order: Option<Choice<OrderArg>>,
            commit: Option<Choice<CommitArg>>,
            hold: Option<Dur>,
            on_401: Option<Choice<On401>>,
            on_403: Option<Choice<On403>>,
            default_cooldown: Option<Dur>,
            max_cooldown: Option<Dur>,
            connect_timeout: Option<Dur>,
            first_byte_timeout: Option<Dur>,
            idle_timeout: Option<Dur>,
            probe_delay: Option<Dur>,
            probe_max_delay: Option<Dur>,
            hints: Option<bool>,
            rule: Option<Vec<RawRule>>,
        }
    };
}

pool_settings! {
    /// The whole file.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawFile {
        listen: Option<Listen>,
        max_body: Option<Size>,
        grace: Option<Dur>,
        log_format: Option<Choice<LogFormat>>,
        allow_byok: Option<bool>,
        pass_identity_headers: Option<bool>,
        client_tokens: Option<SecretList>,
        client_tokens_env: Option<String>,
        client_tokens_file: Option<PathBuf>,
        admin_token: Option<SecretValue>,
        admin_token_env: Option<String>,
        admin_token_file: Option<PathBuf>,
        #[serde(default)]
        pool: Vec<RawPool>,
        state: Option<RawState>,
    }
}

pool_settings! {
    /// One `[[pool]]` table.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawPool {
        name: Option<String>,
        provider: Option<String>,
        mount: Option<String>,
    }
}

/// The `[state]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    backend: Option<Choice<Backend>>,
    url: Option<SecretValue>,
    url_env: Option<String>,
    namespace: Option<String>,
}

/// One `[[pool.rule]]` table (SPEC §11.6): for answers with this status (and error type and
/// code, when given), do this.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    status: u16,
    error_type: Option<String>,
    code: Option<String>,
    action: Choice<RuleAction>,
    /// `cool` only: a fixed cooldown instead of the answer's retry delay.
    #[serde(rename = "for")]
    for_: Option<Dur>,
    /// `disable` only: why.
    reason: Option<Choice<RuleReason>>,
}

/// A rule's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuleAction {
    /// Cool the key (for `for`, else the answer's retry delay) and fail over.
    Cool,
    /// Disable the key (with `reason`) and fail over.
    Disable,
    /// Hand the answer to the client as it is.
    Deliver,
}

/// A `disable` rule's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuleReason {
    /// As a 401.
    Unauthorized,
    /// As a 403.
    Forbidden,
    /// As a 402 (out of credit).
    Billing,
}

/// The rules of a pool as the core takes them, checked: `place` names the pool in messages
/// (`[[pool]] "anthropic" `, or nothing for top-level `[[rule]]` tables).
fn rules_of(name: &str, place: &str, raw: Option<&Vec<RawRule>>) -> Result<Vec<Rule>, ConfigError> {
    let mut rules = Vec::new();
    for (i, r) in raw.into_iter().flatten().enumerate() {
        let at = |msg: String| err(format!("{name}: {place}rule #{}: {msg}", i + 1));
        let action = match (r.action.0, r.for_, r.reason) {
            (RuleAction::Cool, Some(d), None) => Action::CoolFor(d.0),
            (RuleAction::Cool, None, None) => Action::CoolRetryDelay,
            (RuleAction::Disable, None, Some(reason)) => Action::Disable(match reason.0 {
                RuleReason::Unauthorized => DisableReason::Unauthorized,
                RuleReason::Forbidden => DisableReason::Forbidden,
                RuleReason::Billing => DisableReason::Billing,
            }),
            (RuleAction::Disable, None, None) => {
                return Err(at(
                    "action = \"disable\" needs a reason: add reason = \"unauthorized\", \"forbidden\" or \"billing\""
                        .into(),
                ));
            }
            (RuleAction::Deliver, None, None) => Action::Deliver,
            (action, Some(_), _) => {
                return Err(at(format!(
                    "`for` goes with action = \"cool\" only; remove it from this \"{}\" rule",
                    name_of(&action)
                )));
            }
            (action, None, Some(_)) => {
                return Err(at(format!(
                    "`reason` goes with action = \"disable\" only; remove it from this \"{}\" rule",
                    name_of(&action)
                )));
            }
        };
        rules.push(Rule {
            status: r.status,
            error_type: r.error_type.clone(),
            code: r.code.clone(),
            action,
        });
    }
    let mut policy = Policy::default();
    policy.rules = rules;
    policy.validate().map_err(|e| {
        let fix = match e {
            PolicyError::Shadowed { earlier, .. } => {
                format!("; remove it, or move it above rule #{earlier}")
            }
            _ => String::new(),
        };
        err(format!("{name}: {place}{e}{fix}"))
    })?;
    Ok(policy.rules)
}

/// Where key state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// In this process (the default).
    Memory,
    /// Shared through Redis or Valkey (`url`, `namespace`).
    Redis,
}

/// A duration written with its unit (`"2s"`, `"500ms"`); a bare number is refused.
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with its unit, like \"2s\" or \"500ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                config::parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "{v} has no unit: write \"{v}s\" (durations are strings with a unit: \"500ms\", \"2s\", \"10m\", \"1h\")"
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "{v} has no unit: write \"{v}s\" (durations are strings with a unit: \"500ms\", \"2s\", \"10m\", \"1h\")"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size: bytes as a number, or a string with a unit (`"32MiB"`).
#[derive(Debug, Clone, Copy)]
struct Size(usize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size, like \"32MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                config::parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                usize::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("{v} bytes is too large")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a size cannot be negative; write e.g. \"32MiB\""))
                    .and_then(|v| self.visit_u64(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A listen address, as `--listen` takes it.
#[derive(Debug, Clone, Copy)]
struct Listen(SocketAddr);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        config::parse_listen(&s).map(Listen).map_err(de::Error::custom)
    }
}

/// One of a flag's values (`"round-robin"`), spelt as on the command line.
#[derive(Debug, Clone, Copy)]
struct Choice<T>(T);

impl<'de, T: ValueEnum> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: ValueEnum> Visitor<'_> for V<T> {
            type Value = Choice<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "one of {}", names::<T>())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Choice<T>, E> {
                T::from_str(v, false)
                    .map(Choice)
                    .map_err(|_| E::custom(format!("unknown value {v:?}: use one of {}", names::<T>())))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

fn names<T: ValueEnum>() -> String {
    T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value())
        .map(|v| format!("\"{}\"", v.get_name()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn name_of<T: ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// A secret written inline: a string. Errors never repeat the value.
struct SecretValue(String);

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SecretValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quoted string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretValue, E> {
                Ok(SecretValue(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretValue, E> {
                Err(E::custom("a secret must be a quoted string"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretValue, E> {
                Err(E::custom("a secret must be a quoted string"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretValue, E> {
                Err(E::custom("a secret must be a quoted string"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretValue, E> {
                Err(E::custom("a secret must be a quoted string"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Secrets written inline: a list of strings. Errors never repeat a value.
struct SecretList(Vec<String>);

impl fmt::Debug for SecretList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} secrets]", self.0.len())
    }
}

impl<'de> Deserialize<'de> for SecretList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of quoted strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretList, A::Error> {
                let mut out = Vec::new();
                while let Some(SecretValue(s)) = seq.next_element()? {
                    out.push(s);
                }
                Ok(SecretList(out))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretList, E> {
                Err(E::custom("write a list: [\"first\", \"second\"]"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretList, E> {
                Err(E::custom(
                    "write a list of quoted strings: [\"first\", \"second\"]",
                ))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretList, E> {
                Err(E::custom(
                    "write a list of quoted strings: [\"first\", \"second\"]",
                ))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretList, E> {
                Err(E::custom(
                    "write a list of quoted strings: [\"first\", \"second\"]",
                ))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading and checking the file

/// A config file, read and checked (not yet merged with the command line).
struct Parsed {
    /// The path as given (for messages).
    name: String,
    /// The file's directory, for relative paths.
    dir: PathBuf,
    raw: RawFile,
    /// The first pool table, or the top level when the file has none.
    pool: PoolInfo,
    /// Every pool table, in order (empty when the file has none).
    pools: Vec<PoolInfo>,
}

/// A pool a config file describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInfo {
    /// Its name (logs, metrics and the admin view carry it).
    pub name: String,
    /// Its provider: `anthropic`, `openai` or `azure-openai`.
    pub provider: String,
    /// Where it is served: `/` by default for Anthropic, `/openai` for OpenAI.
    pub mount: String,
}

impl Default for PoolInfo {
    fn default() -> Self {
        Self {
            name: "anthropic".into(),
            provider: "anthropic".into(),
            mount: "/".into(),
        }
    }
}

/// The checked `[state]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateInfo {
    /// The backend.
    pub backend: Backend,
}

impl Default for StateInfo {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
        }
    }
}

impl StateInfo {
    /// What the effective settings use: Redis when a state URL is set.
    fn of(args: &ServeArgs) -> Self {
        Self {
            backend: if args.state.is_some() {
                Backend::Redis
            } else {
                Backend::Memory
            },
        }
    }
}

fn read_file(path: &Path) -> Result<Parsed, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        err(format!(
            "cannot read config file {name}: {e}; check the path given to --config"
        ))
    })?;
    let text = keys::strip_bom(&text);
    let raw: RawFile = toml::from_str(text).map_err(|e| err(toml_error(&name, text, &e)))?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let pools = check_pools(&name, &raw)?;
    let pool = pools.first().cloned().unwrap_or_default();
    check_state(&name, raw.state.as_ref())?;
    Ok(Parsed {
        name,
        dir,
        raw,
        pool,
        pools,
    })
}

/// One line from a TOML error: file, line, the key when the line starts with one, the message
/// (which never repeats a secret: secrets have their own deserializers), and a fix.
fn toml_error(name: &str, text: &str, e: &toml::de::Error) -> String {
    let message = e.message().replace('\n', "; ");
    let Some(span) = e.span() else {
        return format!("{name}: {message}");
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[..start].rsplit('\n').next().unwrap_or("").to_owned()
        + text[start..].split('\n').next().unwrap_or("");
    if let Some(field) = unknown_field(&message) {
        let fix = match suggest(&field, &message) {
            Some(known) => format!("did you mean `{known}`?"),
            None => {
                "remove it or correct its name (adapters/gateway/keypool.example.toml lists every setting)"
                    .into()
            }
        };
        return format!("{name} line {line_no}: unknown setting `{field}`: {fix}");
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        return format!(
            "{name} line {line_no}: this table needs `{field}`: add it (adapters/gateway/keypool.example.toml shows every setting)"
        );
    }
    if line.trim_start().starts_with("[pool]") {
        return format!("{name} line {line_no}: write [[pool]] (two brackets): pools are a list of tables");
    }
    match bare_key(&line) {
        Some(key) => format!("{name} line {line_no}: {key}: {message}"),
        None => format!("{name} line {line_no}: {message}"),
    }
}

/// The key of a `key = value` line; `None` for anything else (a line inside a multi-line array
/// may hold a secret, so it is never shown).
fn bare_key(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
    .then_some(key)
}

/// `unknown field `x`, expected ...` → `x`.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// The closest known field named in serde's message (`-` for `_`, or one or two typos away).
fn suggest(field: &str, message: &str) -> Option<String> {
    let (_, expected) = message.split_once("expected")?;
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let normal = field.replace('-', "_").to_ascii_lowercase();
    if let Some(k) = known.iter().find(|k| **k == normal) {
        return Some((*k).to_owned());
    }
    known
        .iter()
        .map(|k| (edit_distance(&normal, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| (*k).to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn check_pools(name: &str, raw: &RawFile) -> Result<Vec<PoolInfo>, ConfigError> {
    if raw.pool.is_empty() {
        return Ok(Vec::new());
    }
    if raw.keys.is_some() || raw.keys_env.is_some() || raw.keys_file.is_some() {
        return Err(err(format!(
            "{name}: keys are given at the top level and a [[pool]] table exists; move keys/keys_env/keys_file into the [[pool]] table"
        )));
    }
    let mut out: Vec<PoolInfo> = Vec::new();
    for pool in &raw.pool {
        let provider = pool.provider.as_deref().unwrap_or("anthropic");
        if keypool_core::Profile::by_name(provider).is_none() {
            return Err(err(format!(
                "{name}: [[pool]] provider = {provider:?} is unknown; use \"anthropic\", \"openai\" or \"azure-openai\""
            )));
        }
        let pool_name = pool.name.clone().unwrap_or_else(|| provider.to_owned());
        if !keys::valid_label(&pool_name) {
            return Err(err(format!(
                "{name}: [[pool]] name = {pool_name:?}: use 1-64 letters, digits, '.', '_' or '-'"
            )));
        }
        let default_mount = if provider == "anthropic" {
            "/"
        } else {
            config::OPENAI_MOUNT
        };
        let mount = pool.mount.clone().unwrap_or_else(|| default_mount.into());
        let mount = if mount.len() > 1 {
            mount.trim_end_matches('/').to_owned()
        } else {
            mount
        };
        if !mount.starts_with('/') {
            return Err(err(format!(
                "{name}: [[pool]] {pool_name:?} mount = {mount:?}: a mount is a path starting with '/', e.g. \"/openai\""
            )));
        }
        if let Some(other) = out.iter().find(|o| o.name == pool_name || o.mount == mount) {
            return Err(err(format!(
                "{name}: [[pool]] {pool_name:?} has the same name or mount ({mount:?}) as [[pool]] {:?}; give each pool its own name and mount",
                other.name
            )));
        }
        out.push(PoolInfo {
            name: pool_name,
            provider: provider.to_owned(),
            mount,
        });
    }
    Ok(out)
}

fn check_state(name: &str, state: Option<&RawState>) -> Result<(), ConfigError> {
    let Some(state) = state else { return Ok(()) };
    let backend = state.backend.map_or(Backend::Memory, |c| c.0);
    match backend {
        Backend::Memory => {
            for (set, field) in [
                (state.url.is_some(), "url"),
                (state.url_env.is_some(), "url_env"),
                (state.namespace.is_some(), "namespace"),
            ] {
                if set {
                    return Err(err(format!(
                        "{name}: [state] {field} is only used by backend = \"redis\"; remove it (or set backend = \"redis\")"
                    )));
                }
            }
            Ok(())
        }
        Backend::Redis => {
            let url = match (&state.url, &state.url_env) {
                (Some(_), Some(_)) => {
                    return Err(err(format!("{name}: [state] has both url and url_env; keep one")));
                }
                (Some(SecretValue(url)), None) => Some(url),
                (None, Some(_)) => None,
                (None, None) => {
                    return Err(err(format!(
                        "{name}: [state] backend = \"redis\" needs url = \"redis://HOST:PORT\" (or url_env = \"VAR\")"
                    )));
                }
            };
            if let Some(url) = url
                && !(url.starts_with("redis://") || url.starts_with("rediss://"))
            {
                return Err(err(format!(
                    "{name}: [state] url must start with redis:// or rediss:// (TLS)"
                )));
            }
            if let Some(ns) = &state.namespace
                && !keys::valid_label(ns)
            {
                return Err(err(format!(
                    "{name}: [state] namespace = {ns:?}: use 1-64 letters, digits, '.', '_' or '-'"
                )));
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// Looks up environment variables (the process environment, or a test's map).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Parsed {
    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn env_value(&self, env: Env<'_>, setting: &str, var: &str, alt: &str) -> Result<String, ConfigError> {
        let value = env(var).ok_or_else(|| {
            err(format!(
                "{}: {setting}_env = {var:?}, but {var} is not set; export it, or use {alt}",
                self.name
            ))
        })?;
        if value.trim().is_empty() {
            return Err(err(format!(
                "{}: {setting}_env = {var:?}, but {var} is empty; give it a value, or use {alt}",
                self.name
            )));
        }
        Ok(value)
    }

    fn secret_file(&self, setting: &str, p: &Path) -> Result<(PathBuf, String), ConfigError> {
        let path = self.path(p);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            err(format!(
                "{}: cannot read {setting}_file {}: {e}; check the path (relative paths start at the config file's directory)",
                self.name,
                path.display()
            ))
        })?;
        Ok((path, keys::strip_bom(&text).to_owned()))
    }

    /// The client tokens the file names, if any: `client_tokens`, `_env` or `_file`.
    fn client_tokens(&self, env: Env<'_>) -> Result<Option<(Vec<String>, String)>, ConfigError> {
        let r = &self.raw;
        match one_of(
            &self.name,
            "client_tokens",
            r.client_tokens.is_some(),
            r.client_tokens_env.is_some(),
            r.client_tokens_file.is_some(),
        )? {
            Some(Form::Inline) => Ok(r
                .client_tokens
                .as_ref()
                .map(|l| (l.0.clone(), "client_tokens (inline)".to_owned()))),
            Some(Form::Env) => {
                let var = r.client_tokens_env.as_deref().unwrap_or_default();
                let value = self.env_value(env, "client_tokens", var, "client_tokens_file")?;
                Ok(Some((
                    value.split([',', '\n']).map(str::to_owned).collect(),
                    format!("client_tokens_env = {var:?}"),
                )))
            }
            Some(Form::File) => {
                let p = r.client_tokens_file.as_deref().unwrap_or(Path::new(""));
                let (path, text) = self.secret_file("client_tokens", p)?;
                let tokens: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned)
                    .collect();
                if tokens.is_empty() {
                    return Err(err(format!(
                        "{}: client_tokens_file {} has no token; write one per line",
                        self.name,
                        path.display()
                    )));
                }
                Ok(Some((
                    tokens,
                    format!("client_tokens_file = {:?}", path.display().to_string()),
                )))
            }
            None => Ok(None),
        }
    }

    /// The admin token the file names, if any.
    fn admin_token(&self, env: Env<'_>) -> Result<Option<(String, String)>, ConfigError> {
        let r = &self.raw;
        match one_of(
            &self.name,
            "admin_token",
            r.admin_token.is_some(),
            r.admin_token_env.is_some(),
            r.admin_token_file.is_some(),
        )? {
            Some(Form::Inline) => Ok(r
                .admin_token
                .as_ref()
                .map(|t| (t.0.clone(), "admin_token (inline)".to_owned()))),
            Some(Form::Env) => {
                let var = r.admin_token_env.as_deref().unwrap_or_default();
                let value = self.env_value(env, "admin_token", var, "admin_token_file")?;
                Ok(Some((
                    value.trim().to_owned(),
                    format!("admin_token_env = {var:?}"),
                )))
            }
            Some(Form::File) => {
                let p = r.admin_token_file.as_deref().unwrap_or(Path::new(""));
                let (path, text) = self.secret_file("admin_token", p)?;
                let token = text.trim();
                if token.is_empty() || token.contains('\n') {
                    return Err(err(format!(
                        "{}: admin_token_file {} must hold exactly one token (one line)",
                        self.name,
                        path.display()
                    )));
                }
                Ok(Some((
                    token.to_owned(),
                    format!("admin_token_file = {:?}", path.display().to_string()),
                )))
            }
            None => Ok(None),
        }
    }

    /// The pool's keys: from the `[[pool]]` table, else the top level. `None` when the file
    /// names none.
    fn keys(&self, env: Env<'_>) -> Result<Option<(Vec<KeySpec>, String)>, ConfigError> {
        self.pool_keys(env, 0)
    }

    /// The keys of the pool table at `index` (the top level's when the file has no table).
    fn pool_keys(&self, env: Env<'_>, index: usize) -> Result<Option<(Vec<KeySpec>, String)>, ConfigError> {
        let r = &self.raw;
        let (inline, var, file, place) = match (r.pool.get(index), self.pools.get(index)) {
            (Some(p), Some(info)) => (
                &p.keys,
                &p.keys_env,
                &p.keys_file,
                format!("[[pool]] {:?} ", info.name),
            ),
            _ => (&r.keys, &r.keys_env, &r.keys_file, String::new()),
        };
        let what = format!("{place}keys");
        let listed = match one_of(&self.name, &what, inline.is_some(), var.is_some(), file.is_some())? {
            Some(Form::Inline) => {
                let items = inline.as_ref().map(|l| l.0.as_slice()).unwrap_or_default();
                let source = format!("{}: {place}keys", self.name);
                (
                    keys::parse_list(items, &source).map_err(|e| err(e.to_string()))?,
                    format!("{place}keys (inline)"),
                )
            }
            Some(Form::Env) => {
                let var = var.as_deref().unwrap_or_default();
                let value = self.env_value(env, &what, var, "keys_file")?;
                let source = format!("{var} (keys_env of {})", self.name);
                (
                    keys::parse_env(&value, &source).map_err(|e| err(e.to_string()))?,
                    format!("{place}keys_env = {var:?}"),
                )
            }
            Some(Form::File) => {
                let p = file.as_deref().unwrap_or(Path::new(""));
                let path = self.path(p);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    err(format!(
                        "{}: cannot read {place}keys_file {}: {e}; check the path (relative paths start at the config file's directory)",
                        self.name,
                        path.display()
                    ))
                })?;
                let source = path.display().to_string();
                (
                    keys::parse_file(&text, &source).map_err(|e| err(e.to_string()))?,
                    format!("{place}keys_file = {source:?}"),
                )
            }
            None => return Ok(None),
        };
        let specs: Vec<KeySpec> = listed.0.into_iter().map(|k| k.spec).collect();
        Ok(Some((specs, listed.1)))
    }
}

enum Form {
    Inline,
    Env,
    File,
}

/// At most one of `X`, `X_env`, `X_file`.
fn one_of(
    name: &str,
    setting: &str,
    inline: bool,
    env: bool,
    file: bool,
) -> Result<Option<Form>, ConfigError> {
    match (inline, env, file) {
        (false, false, false) => Ok(None),
        (true, false, false) => Ok(Some(Form::Inline)),
        (false, true, false) => Ok(Some(Form::Env)),
        (false, false, true) => Ok(Some(Form::File)),
        _ => Err(err(format!(
            "{name}: {setting} is given more than one way; keep one of {setting}, {setting}_env, {setting}_file"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Merging with the command line

fn ok<T>(v: T) -> Result<T, ConfigError> {
    Ok(v)
}

/// The outcome of loading: the [`Config`] the server runs, plus what `check-config` shows.
#[derive(Debug)]
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// The effective settings (file and command line merged). Holds secrets: never print it.
    pub args: ServeArgs,
    /// The pool.
    pub pool: PoolInfo,
    /// The state backend.
    pub state: StateInfo,
    /// Where the keys, client tokens and admin token came from (no secrets).
    pub origins: Origins,
    /// Settings of the file that the command line or environment overrode (no secrets).
    pub overridden: Vec<String>,
}

/// Where each secret came from, in words (never the secret).
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// The keys.
    pub keys: String,
    /// The client tokens, when there are any.
    pub client_tokens: Option<String>,
    /// The admin token, when there is one.
    pub admin_token: Option<String>,
}

/// Resolves `serve`'s settings: the flags alone, or merged with `--config`'s file. `explicit`
/// says which flags were given (they override the file); `env` looks up the variables the file
/// names.
pub fn resolve(args: &ServeArgs, explicit: &Explicit, env: Env<'_>) -> Result<Loaded, ConfigError> {
    match &args.config {
        Some(path) => load(path, args, explicit, env),
        None => {
            let config = args.validate()?;
            let origins = Origins {
                keys: key_origin(&config.key_source),
                client_tokens: (!config.access.tokens.is_empty())
                    .then(|| "--client-token / KEYPOOL_CLIENT_TOKENS".to_owned()),
                admin_token: config
                    .admin_token
                    .is_some()
                    .then(|| "--admin-token / KEYPOOL_ADMIN_TOKEN".to_owned()),
            };
            Ok(Loaded {
                config,
                args: args.clone(),
                pool: PoolInfo::default(),
                state: StateInfo::of(args),
                origins,
                overridden: Vec::new(),
            })
        }
    }
}

fn key_origin(source: &KeySource) -> String {
    match source {
        KeySource::File(p) => format!("--keys-file {}", p.display()),
        KeySource::Env => "KEYPOOL_KEYS".into(),
        KeySource::OpenAiEnv => "KEYPOOL_OPENAI_KEYS".into(),
        KeySource::ConfigFile(p) | KeySource::ConfigPool(p, _) => format!("the config file {}", p.display()),
    }
}

/// A `[[pool]]` table after the first, resolved on its own: its settings, else the file's top
/// level, else the built-in defaults (the upstream: its provider's); flags on the command line
/// set the first pool only, and the global settings (listen, tokens, limits) of all.
fn extra_pool(
    parsed: &Parsed,
    index: usize,
    base: &ServeArgs,
    env: Env<'_>,
    path: &Path,
) -> Result<config::PoolConfig, ConfigError> {
    let name = &parsed.name;
    let r = &parsed.raw;
    let (Some(p), Some(info)) = (r.pool.get(index), parsed.pools.get(index)) else {
        return Err(err(format!("{name}: no [[pool]] table number {}", index + 1)));
    };
    let profile = keypool_core::Profile::by_name(&info.provider).unwrap_or_default();
    let mut a = base.clone();
    a.keys = None;
    a.keys_file = None;
    a.openai_keys = None;
    a.openai_keys_file = None;
    a.upstream = match &p.upstream {
        Some(u) => config::check_upstream(u, "[[pool]] upstream").map_err(|e| err(format!("{name}: {e}")))?,
        None if profile.default_base_url().is_empty() => {
            return Err(err(format!(
                "{name}: [[pool]] {:?} (provider {:?}) needs an upstream, e.g. upstream = \"https://RESOURCE.openai.azure.com/openai\"",
                info.name, info.provider
            )));
        }
        None => profile.default_base_url().to_owned(),
    };
    macro_rules! pick {
        ($field:ident, $map:expr) => {{
            if let Some(v) = p.$field.as_ref().or(r.$field.as_ref()) {
                a.$field = $map(v);
            }
        }};
    }
    pick!(upstream_ca, |v: &PathBuf| Some(parsed.path(v)));
    pick!(order, |v: &Choice<OrderArg>| v.0);
    pick!(commit, |v: &Choice<CommitArg>| v.0);
    pick!(hold, |v: &Dur| v.0);
    pick!(on_401, |v: &Choice<On401>| v.0);
    pick!(on_403, |v: &Choice<On403>| v.0);
    pick!(default_cooldown, |v: &Dur| v.0);
    pick!(max_cooldown, |v: &Dur| v.0);
    pick!(connect_timeout, |v: &Dur| v.0);
    pick!(first_byte_timeout, |v: &Dur| v.0);
    pick!(idle_timeout, |v: &Dur| v.0);
    pick!(probe_delay, |v: &Dur| v.0);
    pick!(probe_max_delay, |v: &Dur| v.0);
    if let Some(hints) = p.hints.or(r.hints) {
        a.no_hints = !hints;
    }
    a.rules = rules_of(
        name,
        &format!("[[pool]] {:?} ", info.name),
        p.rule.as_ref().or(r.rule.as_ref()),
    )?;
    let Some((keys, _)) = parsed.pool_keys(env, index)? else {
        return Err(err(format!(
            "{name}: [[pool]] {:?} has no keys: add keys_file = \"keys.txt\" (or keys_env = \"VAR\", or keys = [...])",
            info.name
        )));
    };
    let c = a
        .build(Some(FileKeys {
            keys,
            config: path.to_path_buf(),
        }))
        .map_err(|e| err(format!("{name}: [[pool]] {:?}: {e}", info.name)))?;
    Ok(config::PoolConfig {
        name: info.name.clone(),
        mount: info.mount.clone(),
        upstream: c.upstream,
        keys: c.keys,
        key_source: KeySource::ConfigPool(path.to_path_buf(), index),
        order: c.order,
        call: c.call.with_profile(profile),
        upstream_roots: c.upstream_roots,
        probe: c.probe,
    })
}

/// Loads `path` and merges it under the command line (see the module docs for precedence).
pub fn load(path: &Path, args: &ServeArgs, explicit: &Explicit, env: Env<'_>) -> Result<Loaded, ConfigError> {
    let parsed = read_file(path)?;
    let name = parsed.name.clone();
    let r = &parsed.raw;
    let p = r.pool.first();
    let mut out = args.clone();
    let mut overridden = Vec::new();

    // Take the file's value (pool table first, then top level) unless the flag was given.
    macro_rules! take {
        ($field:ident, $flag:literal, $map:expr) => {{
            let value = p.and_then(|p| p.$field.as_ref()).or(r.$field.as_ref());
            if let Some(v) = value {
                if explicit.contains(stringify!($field)) {
                    overridden.push(format!("{} (overridden by {})", stringify!($field), $flag));
                } else {
                    out.$field = $map(v)?;
                }
            }
        }};
    }
    macro_rules! take_top {
        ($field:ident, $flag:literal, $map:expr) => {{
            if let Some(v) = r.$field.as_ref() {
                if explicit.contains(stringify!($field)) {
                    overridden.push(format!("{} (overridden by {})", stringify!($field), $flag));
                } else {
                    out.$field = $map(v)?;
                }
            }
        }};
    }
    let place = if p.and_then(|p| p.upstream.as_ref()).is_some() {
        "[[pool]] upstream"
    } else {
        "upstream"
    };
    take_top!(listen, "--listen / KEYPOOL_LISTEN", |v: &Listen| ok(v.0));
    take_top!(max_body, "--max-body", |v: &Size| if v.0 == 0 {
        Err(err(format!(
            "{name}: max_body must be larger than 0, e.g. \"32MiB\""
        )))
    } else {
        Ok(v.0)
    });
    take_top!(grace, "--grace", |v: &Dur| ok(v.0));
    take_top!(log_format, "--log-format", |v: &Choice<LogFormat>| ok(v.0));
    take_top!(allow_byok, "--allow-byok", |v: &bool| ok(*v));
    take_top!(pass_identity_headers, "--pass-identity-headers", |v: &bool| ok(
        *v
    ));
    take!(upstream, "--upstream / KEYPOOL_UPSTREAM", |v: &String| {
        config::check_upstream(v, place).map_err(|e| err(format!("{name}: {e}")))
    });
    take!(upstream_ca, "--upstream-ca", |v: &PathBuf| ok(Some(
        parsed.path(v)
    )));
    take!(order, "--order", |v: &Choice<OrderArg>| ok(v.0));
    take!(commit, "--commit", |v: &Choice<CommitArg>| ok(v.0));
    take!(hold, "--hold", |v: &Dur| ok(v.0));
    take!(on_401, "--on-401", |v: &Choice<On401>| ok(v.0));
    take!(on_403, "--on-403", |v: &Choice<On403>| ok(v.0));
    take!(default_cooldown, "--default-cooldown", |v: &Dur| ok(v.0));
    take!(max_cooldown, "--max-cooldown", |v: &Dur| ok(v.0));
    take!(connect_timeout, "--connect-timeout", |v: &Dur| ok(v.0));
    take!(first_byte_timeout, "--first-byte-timeout", |v: &Dur| ok(v.0));
    take!(idle_timeout, "--idle-timeout", |v: &Dur| ok(v.0));
    take!(probe_delay, "--probe-delay", |v: &Dur| ok(v.0));
    take!(probe_max_delay, "--probe-max-delay", |v: &Dur| ok(v.0));
    if let Some(hints) = p.and_then(|p| p.hints).or(r.hints) {
        if explicit.contains("no_hints") {
            overridden.push("hints (overridden by --no-hints)".into());
        } else {
            out.no_hints = !hints;
        }
    }
    let first_place = parsed
        .pools
        .first()
        .map(|info| format!("[[pool]] {:?} ", info.name))
        .unwrap_or_default();
    out.rules = rules_of(
        &name,
        &first_place,
        p.and_then(|p| p.rule.as_ref()).or(r.rule.as_ref()),
    )?;

    if let Some(st) = &r.state
        && st.backend.is_some_and(|b| b.0 == Backend::Redis)
    {
        let url = match (&st.url, &st.url_env) {
            (Some(SecretValue(url)), _) => url.clone(),
            (None, Some(var)) => env(var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                err(format!(
                    "{name}: [state] url_env = {var:?}, but {var} is not set: export it (redis://HOST:PORT)"
                ))
            })?,
            // `check_state` has made sure one of them is there.
            (None, None) => String::new(),
        };
        if explicit.contains("state") {
            overridden.push("[state] url (overridden by --state / KEYPOOL_STATE)".into());
        } else if !url.is_empty() {
            out.state = Some(url);
        }
        if let Some(ns) = &st.namespace {
            if explicit.contains("state_namespace") {
                overridden.push("[state] namespace (overridden by --state-namespace)".into());
            } else {
                out.state_namespace = ns.clone();
            }
        }
    }

    let mut origins = Origins::default();
    if let Some((tokens, origin)) = parsed.client_tokens(env)? {
        if explicit.contains("client_tokens") {
            overridden.push("client_tokens (overridden by --client-token / KEYPOOL_CLIENT_TOKENS)".into());
        } else {
            out.client_tokens = tokens;
            origins.client_tokens = Some(origin);
        }
    }
    if let Some((token, origin)) = parsed.admin_token(env)? {
        if explicit.contains("admin_token") {
            overridden.push("admin_token (overridden by --admin-token / KEYPOOL_ADMIN_TOKEN)".into());
        } else {
            out.admin_token = Some(token);
            origins.admin_token = Some(origin);
        }
    }
    if origins.client_tokens.is_none() && !out.client_tokens.is_empty() {
        origins.client_tokens = Some("--client-token / KEYPOOL_CLIENT_TOKENS".into());
    }
    if origins.admin_token.is_none() && out.admin_token.is_some() {
        origins.admin_token = Some("--admin-token / KEYPOOL_ADMIN_TOKEN".into());
    }

    let file_keys = parsed.keys(env)?;
    if file_keys.is_some()
        && out.keys_file.is_none()
        && out.keys.as_deref().is_some_and(|k| k.trim().is_empty())
    {
        return Err(err(format!(
            "KEYPOOL_KEYS is set but has no keys, and it overrides the keys of {name}: unset it, or give keys comma-separated"
        )));
    }
    let command_line_keys = out.keys_file.is_some() || out.keys.is_some();
    let file_keys = match file_keys {
        Some(_) if command_line_keys => {
            overridden.push("keys (overridden by --keys-file / KEYPOOL_KEYS)".into());
            None
        }
        Some((keys, origin)) => {
            origins.keys = origin;
            Some(FileKeys {
                keys,
                config: path.to_path_buf(),
            })
        }
        None if command_line_keys => None,
        None => {
            let table = if p.is_some() {
                "the [[pool]] table"
            } else {
                "the file"
            };
            return Err(err(format!(
                "{name}: no keys: add keys_file = \"keys.txt\" (or keys_env = \"VAR\", or keys = [...]) to {table}, or set KEYPOOL_KEYS"
            )));
        }
    };
    let mut config = out.build(file_keys).map_err(|e| {
        // Flag-level messages name the flag; say which file the settings came from too.
        if e.0.starts_with(&name) {
            e
        } else {
            err(format!("{name}: {e}"))
        }
    })?;
    // The first pool table names the first pool's provider, name and mount.
    if let Some(first) = parsed.pools.first()
        && matches!(config.key_source, KeySource::ConfigFile(_))
    {
        let profile = keypool_core::Profile::by_name(&first.provider).unwrap_or_default();
        let upstream_given = explicit.contains("upstream")
            || p.and_then(|p| p.upstream.as_ref()).is_some()
            || r.upstream.is_some();
        if !upstream_given && first.provider != "anthropic" {
            if profile.default_base_url().is_empty() {
                return Err(err(format!(
                    "{name}: [[pool]] {:?} (provider {:?}) needs an upstream, e.g. upstream = \"https://RESOURCE.openai.azure.com/openai\"",
                    first.name, first.provider
                )));
            }
            config.upstream = profile.default_base_url().to_owned();
        }
        config.call = config.call.clone().with_profile(profile);
        config.name = first.name.clone();
        config.mount = first.mount.clone();
    }
    for index in 1..parsed.pools.len() {
        config.more.push(extra_pool(&parsed, index, args, env, path)?);
    }
    config.check_pools().map_err(|e| err(format!("{name}: {e}")))?;
    if origins.keys.is_empty() {
        origins.keys = key_origin(&config.key_source);
    }
    let state = StateInfo::of(&out);
    Ok(Loaded {
        config,
        args: out,
        pool: parsed.pool,
        state,
        origins,
        overridden,
    })
}

/// Re-reads the config file at `path` and returns the keys of its `[[pool]]` table at `index`
/// (from 0), for a reload (SIGHUP).
pub fn reload_pool_keys(path: &Path, index: usize) -> Result<Vec<KeySpec>, ConfigError> {
    let parsed = read_file(path)?;
    match parsed.pool_keys(&process_env, index)? {
        Some((keys, _)) => Ok(keys),
        None => Err(err(format!(
            "{}: [[pool]] table number {} names no keys any more; add keys_file, keys_env or keys",
            parsed.name,
            index + 1
        ))),
    }
}

/// Re-reads the config file at `path` and returns its pool's keys, for a reload (SIGHUP): the
/// whole file must still be valid, but only the keys are taken; other changed settings need a
/// restart.
pub fn reload_keys(path: &Path) -> Result<Vec<KeySpec>, ConfigError> {
    let parsed = read_file(path)?;
    match parsed.keys(&process_env)? {
        Some((keys, _)) => Ok(keys),
        None => Err(err(format!(
            "{}: the file names no keys any more; add keys_file, keys_env or keys",
            parsed.name
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// check-config

/// The effective configuration as TOML, with every secret masked: keys by label and hint only,
/// tokens as `***`.
pub fn render(loaded: &Loaded, file: Option<&Path>) -> String {
    use std::fmt::Write as _;
    let a = &loaded.args;
    let c = &loaded.config;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# effective configuration{} (secrets masked)",
        file.map(|f| format!(" of {}", f.display())).unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "# precedence: command-line flags and KEYPOOL_* variables, then [[pool]], then the top level, then defaults"
    );
    for o in &loaded.overridden {
        let _ = writeln!(s, "# note: the file's {o}");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "listen = \"{}\"", c.listen);
    let _ = writeln!(s, "max_body = \"{}\"", fmt_size(c.max_body));
    let _ = writeln!(s, "grace = \"{}\"", fmt_duration(c.grace));
    let _ = writeln!(s, "log_format = \"{}\"", name_of(&a.log_format));
    let _ = writeln!(s, "allow_byok = {}", c.access.allow_byok);
    let _ = writeln!(s, "pass_identity_headers = {}", c.pass_identity_headers);
    match &loaded.origins.client_tokens {
        Some(origin) if !c.access.tokens.is_empty() => {
            let masked = vec!["\"***\""; c.access.tokens.len()].join(", ");
            let _ = writeln!(s, "client_tokens = [{masked}]  # from {origin}");
        }
        _ => {
            let _ = writeln!(
                s,
                "# client_tokens: none (loopback mode: only this machine may connect)"
            );
        }
    }
    match &loaded.origins.admin_token {
        Some(origin) if c.admin_token.is_some() => {
            let _ = writeln!(s, "admin_token = \"***\"  # from {origin}");
        }
        _ => {
            let _ = writeln!(s, "# admin_token: none (the /admin routes are off)");
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "[state]");
    let _ = writeln!(s, "backend = \"{}\"", name_of(&loaded.state.backend));
    if loaded.args.state.is_some() {
        // The URL may hold a password: only its shape is shown.
        let _ = writeln!(s, "url = \"***\"");
        let _ = writeln!(s, "namespace = {:?}", loaded.args.state_namespace);
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "[[pool]]");
    let _ = writeln!(s, "name = \"{}\"", loaded.pool.name);
    let _ = writeln!(s, "provider = \"{}\"", loaded.pool.provider);
    let _ = writeln!(s, "mount = \"{}\"", loaded.pool.mount);
    let _ = writeln!(s, "upstream = \"{}\"", c.upstream);
    if let Some(ca) = &a.upstream_ca {
        let _ = writeln!(s, "upstream_ca = {:?}", ca.display().to_string());
    }
    let _ = writeln!(s, "order = \"{}\"", name_of(&a.order));
    let _ = writeln!(s, "commit = \"{}\"", name_of(&a.commit));
    let _ = writeln!(s, "hold = \"{}\"", fmt_duration(a.hold));
    let _ = writeln!(s, "on_401 = \"{}\"", name_of(&a.on_401));
    let _ = writeln!(s, "on_403 = \"{}\"", name_of(&a.on_403));
    let _ = writeln!(s, "default_cooldown = \"{}\"", fmt_duration(a.default_cooldown));
    let _ = writeln!(s, "max_cooldown = \"{}\"", fmt_duration(a.max_cooldown));
    let _ = writeln!(s, "connect_timeout = \"{}\"", fmt_duration(a.connect_timeout));
    let _ = writeln!(
        s,
        "first_byte_timeout = \"{}\"",
        fmt_duration(a.first_byte_timeout)
    );
    let _ = writeln!(s, "idle_timeout = \"{}\"", fmt_duration(a.idle_timeout));
    let _ = writeln!(s, "probe_delay = \"{}\"", fmt_duration(a.probe_delay));
    let _ = writeln!(s, "probe_max_delay = \"{}\"", fmt_duration(a.probe_max_delay));
    let _ = writeln!(s, "hints = {}", !a.no_hints);
    let reload = match &c.key_source {
        KeySource::Env => "",
        _ => ", re-read on SIGHUP",
    };
    let _ = writeln!(
        s,
        "# {} keys from {}{reload}; shown as label (hint)",
        c.keys.len(),
        loaded.origins.keys
    );
    let _ = writeln!(s, "keys = [");
    for key in &c.keys {
        let hint = keypool_core::Secret::new(key.secret.as_str())
            .map(|k| k.hint().to_owned())
            .unwrap_or_else(|_| "...".into());
        let shown = match &key.label {
            Some(label) => format!("{label} ({hint})"),
            None => hint,
        };
        let _ = writeln!(s, "  {shown:?},");
    }
    let _ = writeln!(s, "]");
    for warning in keys::implausible(&c.keys) {
        let _ = writeln!(s, "# warning: {warning}");
    }
    render_rules(&mut s, &c.call.policy.rules);
    s
}

/// The rules as `[[pool.rule]]` tables, as a file would write them.
fn render_rules(s: &mut String, rules: &[Rule]) {
    use std::fmt::Write as _;
    if rules.is_empty() {
        let _ = writeln!(
            s,
            "# no [[pool.rule]]: the provider's classification table decides"
        );
    }
    for rule in rules {
        let _ = writeln!(s);
        let _ = writeln!(s, "[[pool.rule]]");
        let _ = writeln!(s, "status = {}", rule.status);
        if let Some(t) = &rule.error_type {
            let _ = writeln!(s, "error_type = {t:?}");
        }
        if let Some(c) = &rule.code {
            let _ = writeln!(s, "code = {c:?}");
        }
        match rule.action {
            Action::CoolRetryDelay => {
                let _ = writeln!(s, "action = \"cool\"  # for the answer's retry delay");
            }
            Action::CoolFor(d) => {
                let _ = writeln!(s, "action = \"cool\"");
                let _ = writeln!(s, "for = \"{}\"", fmt_duration(d));
            }
            Action::Disable(reason) => {
                let reason = match reason {
                    DisableReason::Unauthorized => "unauthorized",
                    DisableReason::Forbidden => "forbidden",
                    DisableReason::Billing => "billing",
                    DisableReason::Operator => "operator",
                };
                let _ = writeln!(s, "action = \"disable\"");
                let _ = writeln!(s, "reason = \"{reason}\"");
            }
            Action::Deliver => {
                let _ = writeln!(s, "action = \"deliver\"");
            }
        }
    }
}

/// `1500ms`, `2s`, `10m`, `1h`: the largest unit that is exact, as `parse_duration` reads it.
pub fn fmt_duration(d: Duration) -> String {
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}ms", d.as_secs_f64() * 1000.0);
    }
    if d.subsec_millis() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    if secs != 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// `32MiB`, `64KiB`, or bytes.
pub fn fmt_size(n: usize) -> String {
    for (unit, size) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n != 0 && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_they_parse() {
        for d in ["500ms", "2s", "90s", "10m", "1h", "1500ms", "0s"] {
            let parsed = config::parse_duration(d).unwrap();
            assert_eq!(fmt_duration(parsed), d);
            assert_eq!(config::parse_duration(&fmt_duration(parsed)), Ok(parsed));
        }
        assert_eq!(fmt_size(32 << 20), "32MiB");
        assert_eq!(fmt_size(1000), "1000");
    }

    #[test]
    fn suggestions_for_unknown_fields() {
        let msg = "unknown field `listn`, expected `listen` or `pool`";
        assert_eq!(unknown_field(msg).as_deref(), Some("listn"));
        assert_eq!(suggest("listn", msg).as_deref(), Some("listen"));
        let msg = "unknown field `max-body`, expected one of `listen`, `max_body`";
        assert_eq!(suggest("max-body", msg).as_deref(), Some("max_body"));
        assert_eq!(suggest("zzzzzz", msg), None);
    }

    #[test]
    fn only_bare_keys_are_quoted_from_a_line() {
        assert_eq!(bare_key("hold = 2"), Some("hold"));
        assert_eq!(bare_key("  \"sk-ant-api03-secret\","), None);
        assert_eq!(bare_key("\"sk=x\""), None);
    }
}
