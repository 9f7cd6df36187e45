//! `qcluster.toml`: Django Q's cluster keys, loaded with precedence flags > environment > file >
//! defaults, validated with errors that name the key, and reported with where each value came from.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use broker_core::secs;
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::ConfigError;

/// Environment variables that start with `QCLUSTER_` but are not configuration keys.
/// `secret` is read from `QCLUSTER_SECRET` as is (not parsed as a number or boolean).
const ENV_NOT_KEYS: &[&str] = &["config", "log", "require_services", "secret"];

/// Largest package when `max_message_size` is not set and the broker sets no lower limit.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// Name under which the default values are reported.
pub const SOURCE_DEFAULT: &str = "default";
/// Name under which values set with [`Config::set`] are reported.
pub const SOURCE_CODE: &str = "set in code";
/// Name under which `--set` and other flags are reported.
pub const SOURCE_FLAG: &str = "command-line flag";

/// The whole cluster configuration. Field names are the keys of `qcluster.toml`; a broker's own
/// section (`[orm]`, `[redis]`, `[nats]`…) is kept raw and read by its factory (see
/// [`crate::broker::Brokers`]). Unknown keys are refused by [`Config::load`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Cluster name: names the queue, keys the signatures (two clusters with different names
    /// cannot run each other's packages) and tags results.
    pub name: String,
    /// Label shown by `info` and `monitor`.
    pub label: String,
    /// Which broker carries the packages: a registered name, `orm` (default), `redis`, `memory`…
    pub broker: String,
    /// Concurrent task executors.
    pub workers: usize,
    /// How workers run tasks: `async` (tokio tasks in this process, the default) or `process`
    /// (one child process per worker: hard timeouts, `recycle`, `max_rss`, `cpu_affinity`).
    pub worker_mode: WorkerMode,
    /// Tasks a process worker runs before it is replaced; 0 never replaces it.
    pub recycle: u64,
    /// Resident memory in KiB above which a process worker is replaced after its task.
    pub max_rss: Option<u64>,
    /// CPUs each process worker is pinned to, in rotation over the CPUs this process may use;
    /// 0 pins nothing.
    pub cpu_affinity: usize,
    /// Process workers die with the cluster process (`PR_SET_PDEATHSIG` on Linux), so a
    /// `kill -9` of the cluster leaves no task running. When false, a child finishes the task it
    /// runs, then exits.
    pub daemonize_workers: bool,
    /// Longest a task may run, in seconds, before it is failed.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// Lease in seconds: a package not acknowledged this long after delivery is delivered again.
    /// Must be greater than `timeout`.
    #[serde(with = "secs")]
    pub retry: Duration,
    /// Most attempts of a failing task, 0 for no limit.
    pub max_attempts: u32,
    /// Acknowledge failed tasks too (no retry).
    pub ack_failure: bool,
    /// Compress packages (LZ4) when that makes them smaller.
    pub compress: bool,
    /// Successful results kept: 0 keeps all, -1 keeps none. Failures are always kept.
    pub save_limit: i64,
    /// Packages held in memory between the broker and the workers; defaults to `2 × workers`.
    pub queue_limit: Option<usize>,
    /// Packages one dequeue claims.
    pub bulk: usize,
    /// Seconds between looks at an empty queue when the broker cannot wake consumers.
    #[serde(with = "secs")]
    pub poll: Duration,
    /// Seconds between the sentinel's health checks and status updates.
    #[serde(with = "secs")]
    pub guard_cycle: Duration,
    /// Seconds that running tasks get to finish at shutdown before they are given back.
    #[serde(with = "secs")]
    pub shutdown_timeout: Duration,
    /// Run tasks inline at enqueue time instead of through the broker (for tests and debugging).
    pub sync: bool,
    /// Delete final results older than this many seconds (successes; failures too with
    /// `prune_failures`), checked every 2 s by every cluster; unset keeps them (only `save_limit`
    /// applies). Never less than twice `retry`.
    #[serde(with = "opt_secs")]
    pub prune_older_than: Option<Duration>,
    /// `prune_older_than` deletes failures too.
    pub prune_failures: bool,
    /// Run every missed schedule slot after downtime; false runs the missed ones once.
    pub catch_up: bool,
    /// Fire due schedules from this cluster (every cluster of a name may: each slot fires once).
    pub scheduler: bool,
    /// Largest package in bytes; unset takes the broker's own limit (16 MiB, or less where the
    /// server allows less). A value set here that the server cannot take is refused.
    pub max_message_size: Option<usize>,
    /// The signing secret. Only from `QCLUSTER_SECRET` or a flag, never from the file.
    pub secret: Option<Secret>,
    /// File holding the signing secret.
    pub secret_file: Option<PathBuf>,
    /// Accept a secret shorter than [`MIN_SECRET`] bytes (tests and demos only: a short HMAC
    /// key falls to an offline guess from one captured package).
    pub allow_short_secret: bool,
    /// `[store]`: where results are kept.
    pub store: StoreSection,
    /// `[error_reporter]`: where final failures are reported.
    pub error_reporter: ReporterSection,
    /// `[http]`: the cluster's metrics, stats, health and dashboard endpoint.
    pub http: HttpSection,
    /// Broker sections (`[orm]`, `[redis]`, …), raw: each adapter reads its own. Set keys in
    /// code with [`Config::set`].
    #[serde(skip)]
    pub sections: Sections,
    /// Where loaded values came from (empty for a configuration built in code).
    #[serde(skip)]
    pub origin: Origin,
}

/// How workers run tasks (`worker_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerMode {
    /// Tokio tasks in the cluster process: the least overhead. A blocking task that overruns
    /// its timeout is failed but keeps its thread until it returns.
    #[default]
    Async,
    /// One child process per worker, running one task at a time: a task past its timeout is
    /// killed with its process, and a crash fails only that task.
    Process,
}

impl fmt::Display for WorkerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Async => "async",
            Self::Process => "process",
        })
    }
}

/// Raw broker sections by name. Debug masks URLs and secret-looking keys.
#[derive(Clone, Default)]
pub struct Sections(Dict);

impl fmt::Debug for Sections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (name, v) in &self.0 {
            let json = serde_json::to_value(v).unwrap_or_default();
            m.entry(name, &mask(name, json).to_string());
        }
        m.finish()
    }
}

/// The layers a configuration was loaded from. Opaque, and never printed: it holds raw values.
#[derive(Clone, Default)]
pub struct Origin(Option<std::sync::Arc<Figment>>);

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "loaded"
        } else {
            "in code"
        })
    }
}

/// Masks a value for display: a secret-looking key hides its whole value; any text that looks
/// like a URL (under any key, in lists too) loses its password or token.
pub(crate) fn mask(key: &str, value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        J::Null => J::Null,
        _ if secret_leaf(key) => J::String("********".into()),
        J::String(s)
            if s.contains("://") || key.rsplit('.').next().is_some_and(|l| l.ends_with("url")) =>
        {
            J::String(broker_core::mask_url(&s))
        }
        J::Array(items) => J::Array(items.into_iter().map(|v| mask(key, v)).collect()),
        J::Object(m) => J::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let inner = mask(&format!("{key}.{k}"), v);
                    (k, inner)
                })
                .collect(),
        ),
        other => other,
    }
}

/// Keys whose values are secrets whatever they look like: `*password*`, `*passwd*`, `*pwd*`,
/// `*secret*`, `*token*`, `*credential*`, `*webhook*`, `*auth*` (Disque's, Redis' `AUTH`),
/// `*dsn*`, `*private*`, `*cookie*`, `*key` (not `*key_file`). An adapter's own secret keys must
/// be named so that this rule hides them (README, "Write your own broker").
fn secret_leaf(key: &str) -> bool {
    let leaf = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    [
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "credential",
        "webhook",
        "auth",
        "dsn",
        "private",
        "cookie",
    ]
    .iter()
    .any(|w| leaf.contains(w))
        || (leaf.ends_with("key") && !leaf.ends_with("key_file"))
}

/// The shortest signing secret accepted without `allow_short_secret`, in bytes.
pub const MIN_SECRET: usize = 32;

/// Warns when `path` (a secret file) can be read by its group or by others.
fn warn_if_readable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "secret_file {} has mode {mode:04o}: readable by its group or others; \
                 `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "qcluster".to_owned(),
            label: "qcluster".to_owned(),
            broker: "orm".to_owned(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            worker_mode: WorkerMode::Async,
            recycle: 500,
            max_rss: None,
            cpu_affinity: 0,
            daemonize_workers: true,
            timeout: Duration::from_secs(30),
            retry: Duration::from_secs(60),
            max_attempts: 3,
            ack_failure: false,
            compress: false,
            save_limit: 250,
            queue_limit: None,
            bulk: 10,
            poll: Duration::from_millis(200),
            guard_cycle: Duration::from_millis(500),
            shutdown_timeout: Duration::from_secs(10),
            sync: false,
            catch_up: true,
            scheduler: true,
            prune_older_than: None,
            prune_failures: false,
            max_message_size: None,
            secret: None,
            secret_file: None,
            allow_short_secret: false,
            store: StoreSection::default(),
            error_reporter: ReporterSection::default(),
            http: HttpSection::default(),
            sections: Sections::default(),
            origin: Origin::default(),
        }
    }
}

/// `[error_reporter]`: every final failure is POSTed as JSON to `webhook` (Django Q's
/// `error_reporter`), off the workers' path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReporterSection {
    /// The URL to POST each report to (`http://` or `https://`); none reports nothing. Its
    /// whole value is a secret (webhook URLs carry their token in the path): never shown, not
    /// even by `Debug`.
    pub webhook: Option<Secret>,
    /// Seconds one POST may take.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// Further tries of a POST that failed (a connection error, or a status other than 2xx).
    pub retries: u32,
    /// A Sentry DSN: each final failure is also sent to Sentry as an event (a secret: never
    /// shown).
    pub sentry_dsn: Option<Secret>,
}

/// `[http]`: what `run` serves over HTTP when `listen` is set, and what `qcluster dashboard`
/// serves: `/metrics` (Prometheus), `/stats.json`, `/health` and the dashboard pages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// `host:port` to listen on (e.g. `127.0.0.1:9100`); unset serves nothing from `run`.
    pub listen: Option<String>,
    /// Bearer token (or dashboard login): required for every state change, for `/metrics` and
    /// `/stats.json` when set, and for everything when `listen` is beyond loopback (which is
    /// refused without one). A secret: never shown.
    pub token: Option<Secret>,
    /// `run` serves the dashboard pages too (not only metrics, stats and health).
    pub dashboard: bool,
    /// Collect per-task metrics (counters and run-time histograms by func, broker call
    /// latency) for `/metrics`.
    pub metrics: bool,
}

impl HttpSection {
    /// Parses `listen` (`host:port`, `localhost` for 127.0.0.1) and refuses an address beyond
    /// loopback without a token, or a token shorter than 16 bytes; `key` names the setting.
    pub fn check(&self, listen: &str, key: &str) -> Result<std::net::SocketAddr, ConfigError> {
        let addr: std::net::SocketAddr = match listen.strip_prefix("localhost:") {
            Some(port) => format!("127.0.0.1:{port}").parse(),
            None => listen.parse(),
        }
        .map_err(|_| {
            ConfigError::new(
                key,
                format!("`{listen}` is not host:port (e.g. 127.0.0.1:9100)"),
            )
        })?;
        match &self.token {
            Some(t)
                if t.expose().iter().any(|b| {
                    b.is_ascii_whitespace() || b.is_ascii_control() || b";,\"\\".contains(b)
                }) =>
            {
                Err(ConfigError::new(
                    "http.token",
                    "holds whitespace or one of ; , \" \\ (it travels in a header and a cookie); \
                     base64 or hex is fine",
                ))
            }
            Some(t) if t.expose().len() < 16 => Err(ConfigError::new(
                "http.token",
                format!(
                    "is {} bytes; it needs at least 16 (make one with `head -c 24 /dev/urandom | base64`)",
                    t.expose().len()
                ),
            )),
            None if !addr.ip().is_loopback() => Err(ConfigError::new(
                key,
                format!(
                    "{addr} is beyond loopback: set http.token (QCLUSTER_HTTP__TOKEN) so that \
                     nothing is served without it"
                ),
            )),
            _ => Ok(addr),
        }
    }
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: None,
            token: None,
            dashboard: true,
            metrics: true,
        }
    }
}

impl Default for ReporterSection {
    fn default() -> Self {
        Self {
            webhook: None,
            timeout: Duration::from_secs(5),
            retries: 3,
            sentry_dsn: None,
        }
    }
}

/// `[store]`: the result store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Defaults to the ORM broker's database when `broker = "orm"`, else `sqlite://qcluster.sqlite3`.
    pub url: Option<Url>,
    /// Seconds to wait for a connection.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            url: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A URL whose password is masked wherever it is printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Url(pub String);

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&broker_core::mask_url(&self.0))
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&broker_core::mask_url(&self.0))
    }
}

impl Serialize for Url {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// The signing secret: never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret's bytes, for the codec.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
    /// The secret as text, for the one place that uses it (a webhook URL, a DSN).
    pub(crate) fn reveal(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("********")
    }
}

/// A provider with a name of our own (so that `qcluster config` can say where a value came from).
pub(crate) struct Named {
    pub(crate) name: &'static str,
    pub(crate) dict: Dict,
}

impl Provider for Named {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Where a configuration came from, with the values. Built by [`Config::load`].
#[derive(Clone)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    figment: Figment,
    secret_source: Option<String>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the figment: it holds the raw values, secrets included.
        f.debug_struct("Loaded")
            .field("config", &self.config)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// How strong a source is: flags beat the environment, which beats the file.
fn rank(source: &str) -> u8 {
    if source == SOURCE_FLAG {
        3
    } else if source.starts_with("environment") {
        2
    } else if source.starts_with("file") {
        1
    } else {
        0
    }
}

/// Keys whose values are never echoed in errors.
/// Sections holding one count too: a whole section given as a string may be a URL.
fn sensitive(key: &str) -> bool {
    key == "config"
        || key == "store"
        || key == "error_reporter"
        || key == "http"
        || key.ends_with("dsn")
        || (!key.contains('.') && !is_cluster_key(key))
        || key.ends_with("url")
        || key.ends_with("uri")
        || secret_leaf(key)
}

/// The top-level keys of [`Config`] (every other top-level key is a broker section).
fn cluster_keys() -> &'static [String] {
    static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let value = serde_json::to_value(Config::default()).unwrap_or_default();
        let mut keys: Vec<String> = value
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    })
}

/// True for a key of the cluster itself (`workers`, `store`), false for a broker section.
pub(crate) fn is_cluster_key(key: &str) -> bool {
    cluster_keys().iter().any(|k| k == key)
}

/// A TOML syntax error without the quoted source line (it may hold a password): where, and what.
fn toml_syntax(message: &str) -> Option<String> {
    let first = message.lines().next()?;
    if !first.contains("parse error") {
        return None;
    }
    let what = message
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('|') && !l.contains(" | "))
        .unwrap_or("");
    Some(format!("{} ({})", first.trim(), what.trim()))
}

/// One effective value and where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Dotted key, e.g. `orm.url`.
    pub key: String,
    /// The value, secrets and passwords masked.
    pub value: serde_json::Value,
    /// `default`, the file, the environment variable or `command-line flag`.
    pub source: String,
}

impl Loaded {
    /// Every key with its effective value (masked) and source, in key order; the sections of
    /// the built-in brokers with their defaults.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries_with(&crate::broker::Brokers::builtin())
    }

    /// Every key with its effective value (masked) and source, in key order. The selected
    /// broker's section (and any other section of a registered broker) shows every key of the
    /// adapter's config, defaults included; other sections show what was written.
    pub fn entries_with(&self, brokers: &crate::broker::Brokers) -> Vec<Entry> {
        let mut out = Vec::new();
        let value = serde_json::to_value(&self.config).unwrap_or_default();
        flatten("", &value, &mut out);
        let mut names: Vec<&str> = self.config.sections.0.keys().map(String::as_str).collect();
        if !names.contains(&self.config.broker.as_str()) {
            names.push(&self.config.broker);
        }
        for name in names {
            let section = match brokers.describe(&self.config, name) {
                Ok(v) => v,
                Err(_) => self
                    .config
                    .section_value(name)
                    .and_then(|v| serde_json::to_value(v).ok())
                    .unwrap_or_default(),
            };
            flatten(name, &section, &mut out);
        }
        for e in &mut out {
            e.source = self.source_of(&e.key);
            e.value = mask(&e.key, std::mem::take(&mut e.value));
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Where `key` got its value: a file, an environment variable, a flag or the default.
    pub fn source_of(&self, key: &str) -> String {
        if key == "secret"
            && let Some(s) = &self.secret_source
        {
            return s.clone();
        }
        match self.figment.find_metadata(key) {
            Some(md) if md.name.contains("environment") => format!("environment {}", env_name(key)),
            Some(md) => match &md.source {
                Some(figment::Source::File(p)) => format!("file {}", p.display()),
                _ => md.name.to_string(),
            },
            None => SOURCE_DEFAULT.to_owned(),
        }
    }
}

fn env_name(key: &str) -> String {
    format!("QCLUSTER_{}", key.replace('.', "__").to_ascii_uppercase())
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<Entry>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push(Entry {
            key: prefix.to_owned(),
            value: other.clone(),
            source: String::new(),
        }),
    }
}

/// The candidate closest to `unknown`, if any is close enough to suggest.
fn closest<'a>(unknown: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|k| {
            // Transpositions and one-letter slips in short keys count as close too.
            let edits = strsim::damerau_levenshtein(unknown, k);
            let close = edits <= (k.len() / 3).max(1);
            let score = strsim::jaro_winkler(unknown, k) + if close { 1.0 } else { 0.0 };
            (score, k)
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.to_owned())
}

/// " (from <source>)" for `key`, or nothing when it is a default or unknown.
pub(crate) fn from_source(figment: Option<&Figment>, key: &str) -> String {
    let Some(md) = figment.and_then(|f| f.find_metadata(key)) else {
        return String::new();
    };
    describe_source(md, key)
}

fn describe_source(md: &Metadata, key: &str) -> String {
    if md.name.contains("environment") {
        format!(" (from {})", env_name(key))
    } else {
        match &md.source {
            Some(figment::Source::File(p)) => format!(" (from file {})", p.display()),
            _ if md.name == SOURCE_DEFAULT => String::new(),
            _ => format!(" (from {})", md.name),
        }
    }
}

/// Parses `KEY=VALUE` from `--set`; the value is read as TOML (`4`, `true`, `"x"`), else as text.
pub fn parse_flag(raw: &str) -> Result<(String, Value), ConfigError> {
    let (key, value) = raw
        .split_once('=')
        .ok_or_else(|| ConfigError::new("--set", format!("`{raw}` is not KEY=VALUE")))?;
    let key = key.trim().to_owned();
    if key == "secret" {
        return Ok((key, Value::from(value.to_owned())));
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let value = match parsed {
        Some(v) => Value::serialize(v).map_err(|e| ConfigError::new(&key, e.to_string()))?,
        None => Value::from(value.to_owned()),
    };
    Ok((key, value))
}

impl Config {
    /// Loads the configuration: defaults, then the file (`path`, else `QCLUSTER_CONFIG`, else
    /// `./qcluster.toml` if present), then `QCLUSTER_*` variables, then `flags`; validates it
    /// with the brokers built into this binary.
    pub fn load(path: Option<&Path>, flags: &[(String, Value)]) -> Result<Loaded, ConfigError> {
        Self::load_with(path, flags, &crate::broker::Brokers::builtin())
    }

    /// [`Config::load`] with the brokers `brokers` registers: `broker` must name one of them,
    /// and the sections of registered brokers are read (and refused) by their config types.
    pub fn load_with(
        path: Option<&Path>,
        flags: &[(String, Value)],
        brokers: &crate::broker::Brokers,
    ) -> Result<Loaded, ConfigError> {
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None => match std::env::var_os("QCLUSTER_CONFIG") {
                Some(p) => Some(PathBuf::from(p)),
                None => Some(PathBuf::from("qcluster.toml")).filter(|p| p.exists()),
            },
        };
        if let Some(f) = &file
            && !f.is_file()
        {
            return Err(ConfigError::new(
                "--config",
                format!("config file {} does not exist", f.display()),
            ));
        }
        let defaults = Value::serialize(Config::default())
            .ok()
            .and_then(|v| v.into_dict())
            .unwrap_or_default();
        let mut figment = Figment::new().merge(Named {
            name: SOURCE_DEFAULT,
            dict: defaults,
        });
        if let Some(f) = &file {
            let toml = Toml::file_exact(f);
            let in_file = toml
                .data()
                .ok()
                .and_then(|d| d.get(&Profile::Default).map(|d| d.contains_key("secret")));
            if in_file == Some(true) {
                return Err(ConfigError::new(
                    "secret",
                    format!(
                        "the secret must not be written in the config file ({}): set \
                         QCLUSTER_SECRET or point `secret_file` at a file only you can read",
                        f.display()
                    ),
                ));
            }
            figment = figment.merge(toml);
        }
        figment = figment.merge(
            Env::prefixed("QCLUSTER_")
                .filter(|k| {
                    let k = k.as_str().to_ascii_lowercase();
                    !ENV_NOT_KEYS.contains(&k.as_str()) && !k.starts_with("test_")
                })
                .split("__")
                .profile(Profile::Default),
        );
        let mut dict = Dict::new();
        for (key, value) in flags {
            insert_path(&mut dict, key, value.clone());
        }
        figment = figment.merge(Named {
            name: SOURCE_FLAG,
            dict,
        });

        let mut config: Config = figment.extract().map_err(|e| known_error(e, None))?;
        // Every other top-level key is a broker section, or a mistake.
        let all: Dict = figment.extract().map_err(|e| known_error(e, None))?;
        for (key, value) in all {
            if is_cluster_key(&key) {
                continue;
            }
            if !brokers.contains(&key) && crate::broker::feature_of(&key).is_none() {
                let candidates = cluster_keys()
                    .iter()
                    .map(String::as_str)
                    .chain(brokers.names());
                let hint = closest(&key, candidates)
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                let from = from_source(Some(&figment), &key);
                return Err(ConfigError::new(&key, format!("unknown key{from}{hint}")));
            }
            config.sections.0.insert(key, value);
        }
        config.origin = Origin(Some(std::sync::Arc::new(figment.clone())));
        let mut secret_source = None;
        if flags.iter().any(|(k, _)| k == "secret") {
            secret_source = Some(SOURCE_FLAG.to_owned());
        } else if let Ok(raw) = std::env::var("QCLUSTER_SECRET") {
            config.secret = Some(Secret(raw));
            secret_source = Some("environment QCLUSTER_SECRET".to_owned());
        }
        let mut loaded = Loaded {
            config,
            file,
            figment,
            secret_source,
        };
        // Both a secret and a secret file: the stronger source wins.
        if loaded.config.secret.is_some()
            && loaded.config.secret_file.is_some()
            && rank(&loaded.source_of("secret_file")) > rank(&loaded.source_of("secret"))
        {
            loaded.config.secret = None;
            loaded.secret_source = None;
        }
        loaded.config.validate()?;
        brokers.check_name(&loaded.config.broker)?;
        // Every section of a registered broker is read now, so a typo stops start-up even in
        // the section of a broker not in use.
        let present: Vec<String> = loaded.config.sections.0.keys().cloned().collect();
        for name in present.iter().chain(std::iter::once(&loaded.config.broker)) {
            if brokers.contains(name) {
                brokers.describe(&loaded.config, name)?;
            }
        }
        Ok(loaded)
    }

    /// The raw section `[<name>]`, if the configuration has one.
    pub fn section_value(&self, name: &str) -> Option<&Value> {
        self.sections.0.get(name)
    }

    /// The layers this configuration was loaded from, if it was loaded (not built in code).
    pub(crate) fn origin(&self) -> Option<std::sync::Arc<Figment>> {
        self.origin.0.clone()
    }

    /// Sets a key in code, the way `--set` does: `set("orm.url", "postgres://…")`,
    /// `set("workers", 4)`, `set("secret", "…")`. A cluster key is checked at once (type and
    /// [`Config::validate`]); a key of any other section is kept for that broker's factory,
    /// which refuses unknown keys when it connects.
    pub fn set(&mut self, key: &str, value: impl Serialize) -> Result<&mut Self, ConfigError> {
        let value = Value::serialize(value).map_err(|e| ConfigError::new(key, e.to_string()))?;
        let head = key.split('.').next().unwrap_or(key);
        if is_cluster_key(head) {
            let mut dict = Value::serialize(&*self)
                .ok()
                .and_then(|v| v.into_dict())
                .unwrap_or_default();
            insert_path(&mut dict, key, value.clone());
            let mut updated: Config = Value::from(dict)
                .deserialize()
                .map_err(|e| known_error(e, None))?;
            if key != "secret" {
                // Serialised masked: keep the real one.
                updated.secret = self.secret.clone();
            }
            updated.validate()?;
            updated.sections = std::mem::take(&mut self.sections);
            updated.origin = std::mem::take(&mut self.origin);
            *self = updated;
        } else {
            insert_path(&mut self.sections.0, key, value.clone());
        }
        if let Some(f) = &self.origin.0 {
            let mut d = Dict::new();
            insert_path(&mut d, key, value);
            let merged = (**f).clone().merge(Named {
                name: SOURCE_CODE,
                dict: d,
            });
            self.origin = Origin(Some(std::sync::Arc::new(merged)));
        }
        Ok(self)
    }

    /// Checks values and combinations, naming the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |k: &str, m: String| Err(ConfigError::new(k, m));
        if self.name.trim().is_empty() {
            return err("name", "must not be empty".into());
        }
        if self.name.len() > broker_core::MAX_QUEUE_NAME {
            return err(
                "name",
                format!("is longer than {} bytes", broker_core::MAX_QUEUE_NAME),
            );
        }
        if self.workers == 0 {
            return err("workers", "must be at least 1".into());
        }
        if self.workers > 10_000 {
            return err("workers", "must be at most 10000".into());
        }
        if self.timeout.is_zero() {
            return err("timeout", "must be greater than 0".into());
        }
        let day = Duration::from_secs(24 * 3600);
        for (key, value, max) in [
            ("timeout", self.timeout, broker_core::MAX_RETRY),
            ("retry", self.retry, broker_core::MAX_RETRY),
            ("poll", self.poll, Duration::from_secs(3600)),
            ("guard_cycle", self.guard_cycle, Duration::from_secs(3600)),
            ("shutdown_timeout", self.shutdown_timeout, day),
            (
                "store.connect_timeout",
                self.store.connect_timeout,
                Duration::from_secs(3600),
            ),
        ] {
            if value > max {
                return err(key, format!("must be at most {} seconds", max.as_secs()));
            }
        }
        if self.retry <= self.timeout {
            return err(
                "retry",
                format!(
                    "must be greater than timeout ({}s, retry is {}s): a task still running when \
                     its lease runs out is delivered again and runs twice",
                    self.timeout.as_secs_f64(),
                    self.retry.as_secs_f64()
                ),
            );
        }
        if self.bulk == 0 {
            return err("bulk", "must be at least 1".into());
        }
        if self.queue_limit == Some(0) {
            return err("queue_limit", "must be at least 1".into());
        }
        if self.queue_limit.is_some_and(|q| q > 100_000) {
            return err("queue_limit", "must be at most 100000".into());
        }
        if self.bulk > 1000 {
            return err("bulk", "must be at most 1000".into());
        }
        if self.poll.is_zero() {
            return err("poll", "must be greater than 0".into());
        }
        if self.guard_cycle.is_zero() {
            return err("guard_cycle", "must be greater than 0".into());
        }
        if self.save_limit < -1 {
            return err(
                "save_limit",
                "must be -1 (keep no successes), 0 (keep all) or a positive count".into(),
            );
        }
        if let Some(age) = self.prune_older_than
            && age < self.retry * 2
        {
            return err(
                "prune_older_than",
                format!(
                    "must be at least twice retry ({}s): younger results still guard against \
                     duplicate deliveries",
                    (self.retry * 2).as_secs_f64()
                ),
            );
        }
        if self.max_rss.is_some_and(|m| m < 1024) {
            return err(
                "max_rss",
                "is in KiB and must be at least 1024 (a worker process alone takes several MiB)"
                    .into(),
            );
        }
        if self.cpu_affinity > 4096 {
            return err("cpu_affinity", "must be at most 4096 CPUs".into());
        }
        if self.max_message_size.is_some_and(|m| m < 64) {
            return err("max_message_size", "must be at least 64 bytes".into());
        }
        if self.max_message_size.is_some_and(|m| m > u32::MAX as usize) {
            return err(
                "max_message_size",
                format!("must be at most {} bytes", u32::MAX),
            );
        }
        if let Some(listen) = &self.http.listen {
            self.http.check(listen, "http.listen")?;
        }
        Ok(())
    }

    /// Refuses a secret under [`MIN_SECRET`] bytes unless `allow_short_secret`.
    fn long_enough(&self, key: &str, what: &str, s: &Secret) -> Result<(), ConfigError> {
        let n = s.0.len();
        if n >= MIN_SECRET || self.allow_short_secret {
            return Ok(());
        }
        Err(ConfigError::new(
            key,
            format!(
                "{what} is {n} bytes; a signing secret needs at least {MIN_SECRET} (a short key \
                 falls to an offline guess from one captured package). Make one with \
                 `head -c 32 /dev/urandom | base64`; `allow_short_secret = true` accepts it \
                 anyway (tests only)"
            ),
        ))
    }

    /// Packages held in memory between the pushers and the workers: `queue_limit`, else room
    /// for two claims or two per worker; never less than one claim (`bulk`).
    pub fn queue_limit(&self) -> usize {
        self.queue_limit
            .unwrap_or((self.workers * 2).max(self.bulk * 2))
            .max(self.bulk)
    }

    /// The result store's URL: `[store] url`, else the ORM database, else a local SQLite file.
    pub fn store_url(&self) -> String {
        const LOCAL: &str = "sqlite://qcluster.sqlite3";
        match (&self.store.url, self.broker.as_str()) {
            (Some(u), _) => u.0.clone(),
            (None, "orm") => self
                .section_value("orm")
                .and_then(|v| v.find_ref("url"))
                .and_then(|v| v.as_str())
                .unwrap_or(LOCAL)
                .to_owned(),
            _ => LOCAL.to_owned(),
        }
    }

    /// The signing secret from `secret` (environment or flag) or `secret_file`.
    pub fn load_secret(&self) -> Result<Secret, ConfigError> {
        if let Some(s) = &self.secret {
            if s.0.is_empty() {
                return Err(ConfigError::new("secret", "QCLUSTER_SECRET is empty"));
            }
            self.long_enough("secret", "the secret", s)?;
            return Ok(s.clone());
        }
        if let Some(path) = &self.secret_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let s = text.trim();
            if s.is_empty() {
                return Err(ConfigError::new(
                    "secret_file",
                    format!("{} is empty", path.display()),
                ));
            }
            let secret = Secret(s.to_owned());
            self.long_enough(
                "secret_file",
                &format!("the secret in {}", path.display()),
                &secret,
            )?;
            warn_if_readable(path);
            return Ok(secret);
        }
        Err(ConfigError::new(
            "secret",
            "no signing secret: set QCLUSTER_SECRET or `secret_file` (the same on every \
             producer and cluster)",
        ))
    }

    /// The queue settings the broker gets from this configuration.
    pub fn queue_settings(&self) -> broker_core::QueueSettings {
        broker_core::QueueSettings {
            queue: self.name.clone(),
            bulk: self.bulk,
            retry: self.retry,
            wait: Duration::from_secs(1),
            poll: self.poll,
            max_message_size: self.max_message_size,
        }
    }
}

fn insert_path(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// Turns figment's error into one that names the key (inside `section` when given), its source
/// and the closest known key.
pub(crate) fn known_error(e: figment::Error, section: Option<&str>) -> ConfigError {
    let Some(e) = e.into_iter().next() else {
        return ConfigError::new("config", "invalid configuration".to_owned());
    };
    let mut path: Vec<String> = section.map(str::to_owned).into_iter().collect();
    path.extend(e.path.iter().cloned());
    let from = |key: &str| {
        e.metadata
            .as_ref()
            .map(|md| describe_source(md, key))
            .unwrap_or_default()
    };
    match &e.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            if path.last() == Some(field) {
                path.pop();
            }
            let prefix = path.join(".");
            path.push(field.clone());
            let key = path.join(".");
            let hint = closest(field, expected.iter().copied())
                .map(|k| {
                    if prefix.is_empty() {
                        format!("; did you mean `{k}`?")
                    } else {
                        format!("; did you mean `{prefix}.{k}`?")
                    }
                })
                .unwrap_or_default();
            ConfigError::new(&key, format!("unknown key{}{hint}", from(&key)))
        }
        kind => {
            let key = if path.is_empty() {
                "config".to_owned()
            } else {
                path.join(".")
            };
            if let Some(syntax) = toml_syntax(&kind.to_string()) {
                return ConfigError::new(&key, format!("{syntax}{}", from(&key)));
            }
            if sensitive(&key) {
                return ConfigError::new(
                    &key,
                    format!("has the wrong type or form (value not shown){}", from(&key)),
                );
            }
            ConfigError::new(&key, format!("{kind}{}", from(&key)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_find_the_closest_key() {
        let top = || cluster_keys().iter().map(String::as_str);
        assert_eq!(closest("workres", top()).as_deref(), Some("workers"));
        assert_eq!(closest("ur", ["url", "pool_size"]).as_deref(), Some("url"));
        assert_eq!(
            closest("ulr", ["url", "replica_url"]).as_deref(),
            Some("url")
        );
        assert_eq!(closest("zzzzzz", top()), None);
    }

    #[test]
    fn flags_parse_as_toml_values() {
        let (k, v) = parse_flag("workers=4").expect("flag");
        assert_eq!(k, "workers");
        assert_eq!(v.deserialize::<u64>().ok(), Some(4));
        let (_, v) = parse_flag("orm.url=sqlite://x.db").expect("flag");
        assert_eq!(v.as_str(), Some("sqlite://x.db"));
        assert!(parse_flag("workers").is_err());
    }

    #[test]
    fn secret_never_prints() {
        let mut c = Config {
            secret: Some(Secret::new("hunter2-secret")),
            ..Config::default()
        };
        c.set("orm.url", "postgres://u:pw-xyz@h/db").expect("set");
        c.set("nats.token", "tok-xyz").expect("set");
        assert_eq!(c.store_url(), "postgres://u:pw-xyz@h/db");
        let dbg = format!("{c:?}");
        let json = serde_json::to_string(&c).expect("json");
        for out in [dbg, json] {
            assert!(!out.contains("hunter2-secret"), "{out}");
        }
        assert!(!format!("{c:?}").contains("pw-xyz"));
        assert!(!format!("{c:?}").contains("tok-xyz"));
    }

    #[test]
    fn adapter_and_reporter_secrets_never_print() {
        let mut c = Config::default();
        c.set("disque.auth", "disque-pw-xyz").expect("set");
        c.set("redis.password", "redis-pw-xyz").expect("set");
        c.set("mine.api_key", "key-xyz").expect("set");
        c.set("mine.dsn", "dsn-xyz").expect("set");
        c.error_reporter.webhook = Some(Secret::new("https://hooks.example/T0/B0/path-token-xyz"));
        c.error_reporter.sentry_dsn = Some(Secret::new("https://dsn-key-xyz@sentry.example/1"));
        let dbg = format!("{c:?}");
        let json = serde_json::to_string(&c).expect("json");
        for out in [dbg, json] {
            for leak in [
                "disque-pw-xyz",
                "redis-pw-xyz",
                "key-xyz",
                "dsn-xyz",
                "path-token-xyz",
            ] {
                assert!(!out.contains(leak), "{leak} in {out}");
            }
        }
        // Masking is by key name: a plain value keeps showing.
        c.set("disque.nodes", "127.0.0.1:7711").expect("set");
        assert!(format!("{c:?}").contains("127.0.0.1:7711"));
    }
}

/// `Option<Duration>` as an optional number of seconds.
mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => broker_core::secs::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Secs(#[serde(with = "broker_core::secs")] Duration);
        Ok(Option::<Secs>::deserialize(d)?.map(|s| s.0))
    }
}
