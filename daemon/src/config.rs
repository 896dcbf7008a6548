//! patchbayd's configuration: built-in defaults (the embedded default), then the TOML
//! file, then `PATCHBAY__SECTION__KEY` environment variables, layered with `config`.
//!
//! Every value is checked here, once, at start: a bad one becomes a `ConfigError` that
//! names the key, the value and what is allowed, and patchbayd exits 78 (EX_CONFIG).
//! Relative paths are resolved against the config file's folder (or the working folder
//! when there is no file), so the rest of the daemon only sees absolute paths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchbay_jobs::JobKind;
use patchbay_jobs::validate::MAX_BALANCE;
use serde::{Deserialize, Serialize};

/// EX_CONFIG from sysexits.h: what systemd and scripts expect for a bad configuration.
pub const EXIT_CONFIG: i32 = 78;

#[derive(Debug, thiserror::Error)]
#[error("configuration error: {key} = {value}: {allowed}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

impl ConfigError {
    pub(crate) fn new(key: &str, value: impl std::fmt::Debug, allowed: impl Into<String>) -> Self {
        ConfigError {
            key: key.to_owned(),
            value: format!("{value:?}"),
            allowed: allowed.into(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub control: ControlConfig,
    pub store: StoreConfig,
    pub queue: QueueConfig,
    pub plugins: PluginsConfig,
    pub mail: MailConfig,
    pub billing: BillingConfig,
    pub deletion: DeletionConfig,
    pub log: LogConfig,
    pub http: crate::http::config::HttpConfig,
    pub node: crate::node::NodeConfig,
    pub leases: crate::cluster::config::LeasesConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// Clients connected at once; the next one gets an error line and is closed.
    pub max_connections: usize,
    /// Requests in one JSON-RPC batch; a larger batch gets one error.
    pub max_batch: usize,
    /// A connection with no complete request for this long is closed.
    pub idle_timeout_secs: u64,
    /// A client that does not take a reply within this is dropped.
    pub write_timeout_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (the default) or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`.
    pub url: String,
    /// PostgreSQL: connections this daemon opens at most.
    pub pool_size: u32,
    /// PostgreSQL: how long connecting (or waiting for a pooled connection) may take.
    pub connect_timeout_secs: u64,
    /// PostgreSQL: the server cancels a statement running longer (0: never); its job
    /// fails and is retried.
    pub statement_timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    Sqlite,
    Redis,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub backend: String,
    pub sqlite_path: PathBuf,
    pub redis_url: String,
    pub namespace: String,
    pub shutdown_timeout_secs: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Per job kind: how many of its jobs run at once.
    pub concurrency: BTreeMap<String, usize>,
    /// Per job kind: attempts before `dead`.
    pub max_attempts: BTreeMap<String, u32>,
    /// A job recorded but not queued this long (the daemon died in between) is queued
    /// by the lost-job sweep; also how often the sweep runs.
    pub lost_job_grace_secs: u64,
    /// Done jobs stay in the journal (job.get, job.list) this many days; dead ones until
    /// retried.
    pub journal_retention_days: u64,
    /// Queue inbound messages without journal rows on a Redis with `appendonly yes` and
    /// `appendfsync everysec`, which may lose the last second of acknowledged pushes if
    /// Redis itself dies. Off: they skip the journal only with `appendfsync always`.
    pub redis_trust_everysec: bool,
    /// How often an idle worker looks for jobs other processes pushed; this daemon's
    /// own pushes wake their worker at once.
    pub poll_fallback_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    /// How often each running instance's `status` is asked, as a liveness check
    /// (status changes arrive as events); each instance's checks are spread over it.
    pub liveness_check_ms: u64,
    /// A liveness check unanswered this long means the instance hangs: it is replaced.
    pub liveness_timeout_ms: u64,
    /// Most liveness checks a second over all instances: beyond that many channels
    /// (× the period) each instance is checked less often, not the host more.
    pub liveness_checks_per_sec: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    pub transport: String,
    pub spool_dir: PathBuf,
    pub smtp_url: String,
    pub from: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    pub run_at: String,
    pub timezone: String,
    pub default_price: i64,
    pub prices: BTreeMap<String, i64>,
    /// How many days before today `billing.run` (and `job.enqueue` of `billing_run` /
    /// `charge_account`) may still charge; see `Settings::catch_up_days`.
    pub catch_up_days: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeletionConfig {
    pub batch_size: u32,
    pub pause_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: String,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: "var/patchbayd.sock".into(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_connections: 256,
            max_batch: 100,
            idle_timeout_secs: 300,
            write_timeout_secs: 10,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://var/patchbay.db".into(),
            pool_size: 16,
            connect_timeout_secs: 10,
            statement_timeout_secs: 30,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: "sqlite".into(),
            sqlite_path: "var/queue.db".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
            namespace: "patchbay".into(),
            shutdown_timeout_secs: 30,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            lost_job_grace_secs: 30,
            journal_retention_days: 7,
            redis_trust_everysec: false,
            poll_fallback_ms: crate::queue::DEFAULT_POLL_FALLBACK.as_millis() as u64,
            concurrency: BTreeMap::new(),
            max_attempts: BTreeMap::new(),
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: "target/release".into(),
            liveness_check_ms: 60_000,
            liveness_timeout_ms: 10_000,
            liveness_checks_per_sec: 50,
        }
    }
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            transport: "file".into(),
            spool_dir: "var/mail".into(),
            smtp_url: String::new(),
            from: "patchbay <billing@patchbay.invalid>".into(),
        }
    }
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            run_at: "00:05".into(),
            timezone: "UTC".into(),
            default_price: 100,
            prices: BTreeMap::new(),
            catch_up_days: patchbay_jobs::billing::DEFAULT_CATCH_UP_DAYS,
        }
    }
}

impl Default for DeletionConfig {
    fn default() -> Self {
        // 1000 rows with a 1 ms pause: >= 100,000 messages/s deleted with inbound p99
        // within 2x of normal (BENCHMARKS.md has the measured trade-off).
        DeletionConfig {
            batch_size: 1000,
            pause_ms: 1,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Where the store is, from `store.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// The SQLite file, made absolute.
    Sqlite(PathBuf),
    /// A PostgreSQL URL, as written (it may hold a password: show `Display`).
    Postgres(String),
}

impl StoreLocation {
    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreLocation::Sqlite(_) => "sqlite",
            StoreLocation::Postgres(_) => "postgres",
        }
    }
}

impl std::fmt::Display for StoreLocation {
    /// The file's path, or the URL with its password replaced.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "{}", p.display()),
            StoreLocation::Postgres(url) => f.write_str(&patchbay_store_postgres::redact_url(url)),
        }
    }
}

/// A loaded and checked configuration, with paths made absolute.
#[derive(Clone, Debug)]
pub struct Settings {
    pub raw: Config,
    pub socket: PathBuf,
    pub store: StoreLocation,
    pub queue: QueueBackend,
    pub queue_sqlite_path: PathBuf,
    pub plugins_dir: PathBuf,
    pub mail_spool_dir: PathBuf,
    pub http: crate::http::config::HttpSettings,
    /// `node.name`, or the host name.
    pub node: String,
}

impl Settings {
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.raw.queue.shutdown_timeout_secs)
    }

    pub fn concurrency(&self, kind: JobKind) -> usize {
        let default = match kind {
            // These handlers mostly wait for their batcher, which takes up to 512 jobs: two
            // batches' worth in flight lets the next one fill while one commits. With 512,
            // batches averaged ~250 jobs; 1024 stored 16 % more inbound messages a second
            // and made a billing run ~15 % faster.
            JobKind::InboundMessage | JobKind::ChargeAccount => 1024,
            // Group-committed too; a batch sends `handlers::PARALLEL_SENDS` accounts' e-mails at once.
            JobKind::BalanceCheck => 128,
            // Each waits on its channel's connector most of the time.
            JobKind::SendMessage => 32,
            // Deletion is paced and must never crowd out inbound work.
            JobKind::DataDeletion => 1,
            _ => 8,
        };
        self.raw
            .queue
            .concurrency
            .get(kind.as_str())
            .copied()
            .unwrap_or(default)
    }

    /// How long an idle worker waits before it looks for jobs that other processes
    /// pushed (`queue.poll_fallback_ms`). This daemon's pushes wake their worker at once,
    /// so the interval only bounds how late another daemon's (or a retry's, pushed by
    /// another daemon) jobs start while this one has nothing else to do.
    pub fn poll_fallback(&self) -> Duration {
        Duration::from_millis(self.raw.queue.poll_fallback_ms)
    }

    /// The supervisor's liveness check: how often, and how long an answer may take.
    pub fn liveness(&self) -> crate::plugin_host::liveness::Liveness {
        crate::plugin_host::liveness::Liveness::new(
            Duration::from_millis(self.raw.plugins.liveness_check_ms),
            Duration::from_millis(self.raw.plugins.liveness_timeout_ms),
            self.raw.plugins.liveness_checks_per_sec,
        )
    }

    pub fn journal_retention(&self) -> Duration {
        Duration::from_secs(self.raw.queue.journal_retention_days.saturating_mul(86_400))
    }

    /// The days before today an operator may still charge: `billing.catch_up_days`, but
    /// never a day whose jobs' idempotency keys the journal may have deleted (done jobs
    /// stay `queue.journal_retention_days`), where a rerun would charge the day again
    /// by what its channels are now.
    pub fn catch_up_days(&self) -> u32 {
        let kept = self.raw.queue.journal_retention_days.saturating_sub(1);
        self.raw
            .billing
            .catch_up_days
            .min(u32::try_from(kept).unwrap_or(u32::MAX))
    }

    pub fn lost_job_grace(&self) -> Duration {
        Duration::from_secs(self.raw.queue.lost_job_grace_secs)
    }

    pub fn max_attempts(&self, kind: JobKind) -> u32 {
        let q = &self.raw.queue;
        q.max_attempts
            .get(kind.as_str())
            .copied()
            .unwrap_or_else(|| kind.default_max_attempts())
    }

    /// Exponential backoff before attempt `attempt + 1`, capped.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let q = &self.raw.queue;
        let factor = 1u64
            .checked_shl(attempt.saturating_sub(1).min(30))
            .unwrap_or(u64::MAX);
        Duration::from_millis(q.retry_base_ms.saturating_mul(factor).min(q.retry_max_ms))
    }
}

/// Where relative paths point when no file is given.
fn default_base() -> PathBuf {
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
}

pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
    let defaults = ::config::Config::try_from(&Config::default())
        .map_err(|e| ConfigError::new("(defaults)", e.to_string(), "a bug: please report"))?;
    let mut builder = ::config::Config::builder().add_source(defaults);
    let base = match file {
        Some(path) => {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    path.display().to_string(),
                    "a readable TOML file (see config/patchbayd.toml)",
                ));
            }
            builder = builder.add_source(
                ::config::File::from(path)
                    .format(::config::FileFormat::Toml)
                    .required(true),
            );
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
            abs.parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(default_base)
        }
        None => default_base(),
    };
    builder = builder.add_source(
        ::config::Environment::with_prefix("PATCHBAY")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("control.allowed_uids")
            .with_list_parse_key("control.allowed_gids"),
    );
    let built = builder.build().map_err(from_config_error)?;
    let raw: Config = built.try_deserialize().map_err(from_config_error)?;
    check(raw, &base)
}

/// Turns the `config` crate's error into ours, keeping its key and expectation.
fn from_config_error(e: ::config::ConfigError) -> ConfigError {
    match e {
        ::config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => ConfigError {
            key: key.unwrap_or_else(|| "(unknown key)".into()),
            value: unexpected.to_string(),
            allowed: format!("expected {expected}"),
        },
        ::config::ConfigError::FileParse { cause, .. } => ConfigError {
            key: "--config".into(),
            value: "(the file)".into(),
            // One line, as promised: TOML errors come with a drawn excerpt.
            allowed: format!(
                "must be valid TOML: {}",
                cause
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        },
        other => {
            let text = other.to_string();
            // serde's "unknown field `x`, expected one of ..." keeps its own wording.
            let key = text
                .split('`')
                .nth(1)
                .map(str::to_owned)
                .unwrap_or_else(|| "(configuration)".into());
            ConfigError {
                key,
                value: "(present)".into(),
                allowed: text,
            }
        }
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn check(raw: Config, base: &Path) -> Result<Settings, ConfigError> {
    let queue = match raw.queue.backend.as_str() {
        "sqlite" => QueueBackend::Sqlite,
        "redis" => QueueBackend::Redis,
        other => {
            return Err(ConfigError::new(
                "queue.backend",
                other,
                "one of sqlite, redis",
            ));
        }
    };
    if queue == QueueBackend::Redis {
        check_redis_url(&raw.queue.redis_url)?;
    }
    if queue == QueueBackend::Sqlite && raw.queue.sqlite_path.as_os_str().is_empty() {
        return Err(ConfigError::new(
            "queue.sqlite_path",
            "",
            "a file path for the SQLite queue (queue.backend = \"sqlite\")",
        ));
    }
    if raw.queue.namespace.is_empty()
        || !raw
            .queue
            .namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::new(
            "queue.namespace",
            &raw.queue.namespace,
            "letters, digits, '-', '_' or '.', not empty",
        ));
    }
    if raw.queue.retry_base_ms == 0
        || raw.queue.retry_max_ms < raw.queue.retry_base_ms
        || raw.queue.retry_max_ms > MAX_RETRY_MS
    {
        return Err(ConfigError::new(
            "queue.retry_max_ms",
            raw.queue.retry_max_ms,
            format!(
                "at least queue.retry_base_ms ({}), which must be > 0, and at most \
                 {MAX_RETRY_MS} (7 days)",
                raw.queue.retry_base_ms
            ),
        ));
    }
    if !(1..=3650).contains(&raw.queue.journal_retention_days) {
        return Err(ConfigError::new(
            "queue.journal_retention_days",
            raw.queue.journal_retention_days,
            "days from 1 to 3650",
        ));
    }
    if !(10..=3_600_000).contains(&raw.queue.poll_fallback_ms) {
        return Err(ConfigError::new(
            "queue.poll_fallback_ms",
            raw.queue.poll_fallback_ms,
            "milliseconds from 10 to 3600000",
        ));
    }
    if !(100..=86_400_000).contains(&raw.plugins.liveness_check_ms) {
        return Err(ConfigError::new(
            "plugins.liveness_check_ms",
            raw.plugins.liveness_check_ms,
            "milliseconds from 100 to 86400000",
        ));
    }
    if !(100..=600_000).contains(&raw.plugins.liveness_timeout_ms) {
        return Err(ConfigError::new(
            "plugins.liveness_timeout_ms",
            raw.plugins.liveness_timeout_ms,
            "milliseconds from 100 to 600000",
        ));
    }
    if !(1..=10_000).contains(&raw.plugins.liveness_checks_per_sec) {
        return Err(ConfigError::new(
            "plugins.liveness_checks_per_sec",
            raw.plugins.liveness_checks_per_sec,
            "checks a second from 1 to 10000",
        ));
    }
    if !(1..=86_400).contains(&raw.queue.lost_job_grace_secs) {
        return Err(ConfigError::new(
            "queue.lost_job_grace_secs",
            raw.queue.lost_job_grace_secs,
            "seconds from 1 to 86400",
        ));
    }
    for (map, what, max) in [
        (
            &raw.queue
                .concurrency
                .iter()
                .map(|(k, v)| (k, *v as u64))
                .collect::<Vec<_>>(),
            "concurrency",
            1024,
        ),
        (
            &raw.queue
                .max_attempts
                .iter()
                .map(|(k, v)| (k, u64::from(*v)))
                .collect::<Vec<_>>(),
            "max_attempts",
            100,
        ),
    ] {
        for (kind, value) in map {
            let key = format!("queue.{what}.{kind}");
            if kind.parse::<JobKind>().is_err() {
                let names: Vec<_> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(ConfigError::new(
                    &key,
                    kind,
                    format!("a job kind: {}", names.join(", ")),
                ));
            }
            if *value == 0 || *value > max {
                return Err(ConfigError::new(&key, value, format!("1 to {max}")));
            }
        }
    }
    let store = store_location(base, &raw.store)?;
    if !matches!(raw.mail.transport.as_str(), "file" | "smtp") {
        return Err(ConfigError::new(
            "mail.transport",
            &raw.mail.transport,
            "one of file, smtp",
        ));
    }
    if raw.mail.transport == "smtp" {
        check_smtp_url(&raw.mail.smtp_url)?;
    }
    if raw.mail.transport == "file" && raw.mail.spool_dir.as_os_str().is_empty() {
        return Err(ConfigError::new(
            "mail.spool_dir",
            "",
            "a folder for the .eml files (mail.transport = \"file\")",
        ));
    }
    if let Err(e) = raw.mail.from.parse::<lettre::message::Mailbox>() {
        return Err(ConfigError::new(
            "mail.from",
            &raw.mail.from,
            format!("an e-mail address such as \"patchbay <billing@example.com>\" ({e})"),
        ));
    }
    if chrono::NaiveTime::parse_from_str(&raw.billing.run_at, "%H:%M").is_err() {
        return Err(ConfigError::new(
            "billing.run_at",
            &raw.billing.run_at,
            "a time HH:MM, e.g. 00:05",
        ));
    }
    if let Err(e) = patchbay_jobs::billing::parse_timezone(&raw.billing.timezone) {
        return Err(ConfigError::new(
            "billing.timezone",
            &raw.billing.timezone,
            e.to_string(),
        ));
    }
    let prices = std::iter::once((
        "billing.default_price".to_owned(),
        raw.billing.default_price,
    ))
    .chain(
        raw.billing
            .prices
            .iter()
            .map(|(kind, price)| (format!("billing.prices.{kind}"), *price)),
    );
    for (key, price) in prices {
        if !(0..=MAX_BALANCE).contains(&price) {
            return Err(ConfigError::new(
                &key,
                price,
                format!("a non-negative integer of minor units, at most {MAX_BALANCE}"),
            ));
        }
    }
    if raw.deletion.batch_size == 0 || raw.deletion.batch_size > 100_000 {
        return Err(ConfigError::new(
            "deletion.batch_size",
            raw.deletion.batch_size,
            "1 to 100000",
        ));
    }
    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        return Err(ConfigError::new(
            "log.level",
            &raw.log.level,
            "error, warn, info, debug, trace, or a RUST_LOG-style filter",
        ));
    }
    if !matches!(raw.log.format.as_str(), "text" | "json") {
        return Err(ConfigError::new(
            "log.format",
            &raw.log.format,
            "one of text, json",
        ));
    }
    let socket = check_socket(base, &raw.control.socket)?;
    check_control_limits(&raw.control)?;
    let http = crate::http::config::check(&raw.http)?;
    let node = crate::node::check(&raw.node)?;
    if !raw.node.run_channels
        && matches!(store, StoreLocation::Postgres(_))
        && queue != QueueBackend::Redis
    {
        // Its sends must reach the node that runs their channel: only a shared queue
        // hands them over.
        return Err(ConfigError::new(
            "node.run_channels",
            false,
            "true, unless the nodes share the Redis queue (queue.backend = \"redis\"): \
             a node that runs no channel passes its sends on through it",
        ));
    }
    crate::cluster::config::check(&raw.leases)?;
    Ok(Settings {
        http,
        node,
        socket,
        store,
        queue,
        queue_sqlite_path: resolve(base, &raw.queue.sqlite_path),
        plugins_dir: resolve(base, &raw.plugins.dir),
        mail_spool_dir: resolve(base, &raw.mail.spool_dir),
        raw,
    })
}

/// Longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The longest retry backoff: long enough for any outage worth waiting out.
const MAX_RETRY_MS: u64 = 7 * 24 * 3600 * 1000;

/// `store.url` and the PostgreSQL pool settings. A PostgreSQL URL is checked for its
/// form here; whether the server answers is found at start (with a clear message).
fn store_location(base: &Path, store: &StoreConfig) -> Result<StoreLocation, ConfigError> {
    const FORMS: &str = "sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";
    let url = store.url.as_str();
    let location = if let Some(p) = url.strip_prefix("sqlite://") {
        if p.is_empty() {
            return Err(ConfigError::new("store.url", url, FORMS));
        }
        StoreLocation::Sqlite(resolve(base, Path::new(p)))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let parsed = url::Url::parse(url).ok();
        let has_db = parsed
            .as_ref()
            .is_some_and(|u| !u.path().trim_start_matches('/').is_empty());
        if !has_db {
            let shown = patchbay_store_postgres::redact_url(url);
            return Err(ConfigError::new("store.url", shown, FORMS));
        }
        StoreLocation::Postgres(url.to_owned())
    } else {
        let shown = patchbay_store_postgres::redact_url(url);
        return Err(ConfigError::new("store.url", shown, FORMS));
    };
    if store.pool_size == 0 || store.pool_size > 1000 {
        return Err(ConfigError::new(
            "store.pool_size",
            store.pool_size,
            "1 to 1000",
        ));
    }
    if store.connect_timeout_secs == 0 || store.connect_timeout_secs > 3600 {
        return Err(ConfigError::new(
            "store.connect_timeout_secs",
            store.connect_timeout_secs,
            "1 to 3600",
        ));
    }
    if store.statement_timeout_secs > 86_400 {
        return Err(ConfigError::new(
            "store.statement_timeout_secs",
            store.statement_timeout_secs,
            "0 (no limit) to 86400",
        ));
    }
    Ok(location)
}

/// `control.socket` resolved; binding an empty or over-long path fails only at start,
/// with an error that names no key.
fn check_socket(base: &Path, socket: &Path) -> Result<PathBuf, ConfigError> {
    if socket.as_os_str().is_empty() {
        return Err(ConfigError::new(
            "control.socket",
            "",
            "a path for the control socket, e.g. var/patchbayd.sock",
        ));
    }
    let path = resolve(base, socket);
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ConfigError::new(
            "control.socket",
            path.display().to_string(),
            format!("a path of at most {MAX_SOCKET_PATH} bytes once resolved (this is {len})"),
        ));
    }
    Ok(path)
}

/// The control socket's bounds: each must be positive, and none so large that it stops
/// bounding anything.
fn check_control_limits(c: &ControlConfig) -> Result<(), ConfigError> {
    for (key, value, max) in [
        ("control.max_connections", c.max_connections as u64, 65_536),
        ("control.max_batch", c.max_batch as u64, 10_000),
        ("control.idle_timeout_secs", c.idle_timeout_secs, 86_400),
        ("control.write_timeout_secs", c.write_timeout_secs, 3_600),
    ] {
        if !(1..=max).contains(&value) {
            return Err(ConfigError::new(key, value, format!("1 to {max}")));
        }
    }
    Ok(())
}

/// Parses `queue.redis_url` as the daemon will (`redis::Client::open` only parses; it
/// does not connect). The value shown has its password replaced by `***`.
fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    const ALLOWED: &str = "redis://[:PASSWORD@]HOST[:PORT][/DB] or redis+unix:///PATH (TLS, rediss://, is not built in)";
    let shown = crate::mail::redact_url(url);
    // The redis crate's own messages never quote the URL, so they are safe to show.
    match redis::Client::open(url) {
        Ok(_) => Ok(()),
        Err(e) => {
            // "Redis URL did not parse - InvalidClientConfig": the kind adds nothing.
            let text = e.to_string();
            let reason = text.split(" - ").next().unwrap_or(&text);
            Err(ConfigError::new(
                "queue.redis_url",
                shown,
                format!("{ALLOWED}: {reason}"),
            ))
        }
    }
}

/// Checks `mail.smtp_url` by lettre's rules (scheme, host, `tls=`, percent-encoded
/// credentials) without building its TLS settings, which would read the system's
/// certificates. The value shown has its password replaced by `***`.
fn check_smtp_url(raw: &str) -> Result<(), ConfigError> {
    const ALLOWED: &str = "smtp://HOST:PORT (plain), smtp://HOST:587?tls=required (STARTTLS) \
                           or smtps://HOST:465 (TLS), with optional USER:PASSWORD@";
    let bad = |why: String| {
        Err(ConfigError::new(
            "mail.smtp_url",
            crate::mail::redact_url(raw),
            format!("{ALLOWED}: {why}"),
        ))
    };
    // url's messages describe the problem without quoting the input.
    let url = match url::Url::parse(raw) {
        Ok(url) => url,
        Err(e) => return bad(e.to_string()),
    };
    if url.host_str().is_none_or(str::is_empty) {
        return bad("no host".into());
    }
    let tls = url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v);
    match (url.scheme(), tls.as_deref()) {
        ("smtp", None | Some("required" | "opportunistic")) | ("smtps", _) => {}
        ("smtp", Some(other)) => {
            return bad(format!(
                "tls={other:?} is not one of required, opportunistic"
            ));
        }
        (scheme, _) => return bad(format!("scheme {scheme:?} is not smtp or smtps")),
    }
    let credentials = [url.username(), url.password().unwrap_or("")];
    if url.password().is_some() && !credentials.iter().all(|s| percent_decodes_to_utf8(s)) {
        return bad("the user name and password must be percent-encoded UTF-8".into());
    }
    Ok(())
}

/// Whether `%XX` decoding `s` gives UTF-8, as lettre requires of SMTP credentials (a
/// `%` not followed by two hex digits stays as it is, as in lettre).
fn percent_decodes_to_utf8(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).is_ok()
}

#[cfg(test)]
mod tests;
