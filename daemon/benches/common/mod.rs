//! Shared by the end-to-end benches (`inbound`, `billing`, `deletion`, `idle`,
//! `cluster`, `density`): the real release-built `patchbayd` in a temp folder with its
//! own config, a throwaway redis-server, a control-socket client, the bench's access to
//! the store (`store.rs`: the SQLite file or a database of the bench's own PostgreSQL,
//! `postgres.rs`), and a few measuring helpers. Not a bench target itself (cargo only
//! discovers `benches/*.rs`).
//!
//! Overrides: `PATCHBAYD_BIN` (the daemon binary), `LOOPBACK_LIB` / `TELEGRAM_LIB` or
//! `PLUGIN_DIR` (where `libloopback.so` / `libtelegram.so` are), `BENCH_TMPDIR` (where
//! the temp folders go), `BENCH_STORE` (`sqlite`, `postgres` or `both`),
//! `BENCH_PG_EXPLAIN` (see postgres.rs).

#![allow(dead_code)]

#[path = "../../../tests/support/pg_cluster.rs"]
mod pg_cluster;
mod postgres;
#[macro_use]
#[path = "../../../tests/support/store_arg.rs"]
mod store_arg;
mod store;

pub use postgres::BenchPg;
// Each bench uses some of these.
#[allow(unused_imports)]
pub use store::{CommitClock, Store, StoreAt, StoreKind};
pub use store_arg::StoreArg;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use patchbay_daemon::ctl::client::Client;
use serde_json::{Value, json};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Res<T> = Result<T, BoxError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Redis,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Redis => "redis",
        }
    }

    /// The backends a comma-separated environment variable names (`default` if unset).
    pub fn list_from_env(var: &str, default: &str) -> Res<Vec<Backend>> {
        env_or(var, default.to_owned())
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|b| match b {
                "sqlite" => Ok(Backend::Sqlite),
                "redis" => Ok(Backend::Redis),
                other => Err(format!("unknown backend {other} in {var}").into()),
            })
            .collect()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The daemon under test: `PATCHBAYD_BIN`, else the one cargo built for this bench.
pub fn patchbayd_bin() -> PathBuf {
    std::env::var_os("PATCHBAYD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_patchbayd")))
}

/// `libloopback.so`: `LOOPBACK_LIB`, else in `PLUGIN_DIR`, else beside the daemon binary.
pub fn loopback_lib() -> PathBuf {
    connector_lib("libloopback.so", "LOOPBACK_LIB")
}

/// A connector library `file`: the path in `var`, else in `PLUGIN_DIR`, else beside the
/// daemon binary (cargo puts the workspace's cdylibs in `target/release` and
/// `target/release/deps`).
pub fn connector_lib(file: &str, var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    if let Some(d) = std::env::var_os("PLUGIN_DIR") {
        return Path::new(&d).join(file);
    }
    let bin = patchbayd_bin();
    let dir = bin.parent().expect("binary folder").to_path_buf();
    [dir.join(file), dir.join("deps").join(file)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{file} not found beside {}; build the workspace (cargo build --release \
                 --workspace) or set {var}",
                bin.display()
            )
        })
}

pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    match std::env::var_os("BENCH_TMPDIR") {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .expect("tempdir")
}

/// 1-, 5- and 15-minute load averages of the machine.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} CPUs, load average {} at start", loadavg())
}

/// Resident set size of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Anonymous resident memory in KiB (RssAnon): heap and stacks, without the pages of
/// memory-mapped files (the daemon maps its SQLite files, up to `mmap_size` each,
/// and those pages count in VmRSS as the files are read).
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "RssAnon:")
}

/// The number of threads of a process (`Threads:` in /proc/<pid>/status).
pub fn threads(pid: u32) -> Option<u64> {
    status_kib(pid, "Threads:")
}

/// A numeric field of /proc/<pid>/status (the memory ones are in KiB).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Total CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // sysconf(_SC_CLK_TCK) is 100 on Linux
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick)
}

/// Nearest-rank percentile of sorted values.
pub fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return -1;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub struct Redis {
    child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// A redis-server with an append-only file (`appendfsync everysec`); the inbound
    /// bench's daemon sets `queue.redis_trust_everysec`, which is what lets it queue
    /// inbound messages without journal rows there (`appendfsync always` would too, at
    /// an fsync per write). `BENCH_REDIS_AOF=0` runs it without persistence.
    pub fn start() -> Res<Redis> {
        let dir = tempdir("pb-bench-redis-");
        let socket = dir.path().join("redis.sock");
        let aof = if env_or("BENCH_REDIS_AOF", 1) == 0 {
            "no"
        } else {
            "yes"
        };
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", aof])
            .args(["--appendfsync", "everysec"])
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server must be installed: {e}"))?;
        let start = Instant::now();
        while !socket.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err("redis-server did not create its socket".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Redis {
            child,
            socket,
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One patchbayd with its own folder (`var/` holds socket, queue, mail, and the store
/// unless it is in PostgreSQL).
pub struct Daemon {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub store_path: PathBuf,
    pub store_at: StoreAt,
    child: Option<Child>,
}

impl Daemon {
    /// Writes `dir/patchbayd.toml` (queue backend, store, plugin folder with the
    /// loopback connector, then `extra`) and starts the daemon on it.
    pub fn start(
        dir: &Path,
        backend: Backend,
        redis: Option<&Redis>,
        store_at: &StoreAt,
        extra: &str,
    ) -> Res<Daemon> {
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins)?;
        std::fs::copy(loopback_lib(), plugins.join("libloopback.so"))?;
        let queue = match (backend, redis) {
            // Trusting everysec: the mode BENCHMARKS.md measured inbound messages in.
            (Backend::Redis, Some(r)) => format!(
                "backend = \"redis\"\nredis_url = \"{}\"\nnamespace = \"bench{}\"\n\
                 redis_trust_everysec = true\n",
                r.url(),
                std::process::id()
            ),
            (Backend::Redis, None) => return Err("redis backend without a server".into()),
            (Backend::Sqlite, _) => "backend = \"sqlite\"\n".to_owned(),
        };
        // The shipped pool size and timeouts: only the URL is the bench's.
        let store = match store_at {
            StoreAt::File => String::new(),
            // A JSON string is a TOML basic string.
            StoreAt::Postgres(url) => format!("[store]\nurl = {}\n", json!(url)),
        };
        let config = dir.join("patchbayd.toml");
        std::fs::write(
            &config,
            format!(
                "[queue]\n{queue}shutdown_timeout_secs = 10\n{store}{extra}\n[plugins]\ndir = \"plugins\"\n\
                 [log]\nlevel = \"{}\"\n{}\n",
                // BENCH_LOG: the daemon's log level, e.g. "info,patchbay_daemon::batcher=debug".
                env_or("BENCH_LOG", "info".to_owned()),
                // BENCH_CONFIG: more TOML tables for experiments, e.g.
                // "[queue.concurrency]\ncharge_account = 1024".
                env_or("BENCH_CONFIG", String::new()).replace("\\n", "\n")
            ),
        )?;
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            config,
            socket: dir.join("var/patchbayd.sock"),
            store_path: dir.join("var/patchbay.db"),
            store_at: store_at.clone(),
            child: None,
        };
        d.spawn()?;
        Ok(d)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("patchbayd.log")
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts the binary and waits until the control socket accepts.
    pub fn spawn(&mut self) -> Res<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(patchbayd_bin())
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("patchbayd exited with {st}:\n{}", self.log_tail()).into());
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(format!("patchbayd did not start:\n{}", self.log_tail()).into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL and reap: a crash, for failover measurements.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (SIGKILL after 30 s).
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    pub async fn client(&self) -> Res<Client> {
        Ok(Client::connect(&self.socket).await?)
    }

    pub async fn call(&self, method: &str, params: Value) -> Res<Value> {
        let mut c = self.client().await?;
        c.call(method, params)
            .await
            .map_err(|e| format!("{method} failed: {e}").into())
    }

    /// Jobs of `kind` waiting or running in the queue, from `status`. Inbound jobs
    /// queued from connector events get a journal row only once they ran, so the
    /// journal cannot count them.
    pub async fn queue_depth(&self, kind: &str) -> Res<i64> {
        let status = self.call("status", json!({})).await?;
        status["queue_depth"][kind]
            .as_i64()
            .ok_or_else(|| format!("no {kind} queue depth in status: {status}").into())
    }

    /// Creates an account with an administrator; returns (account, admin).
    pub async fn account(&self, name: &str) -> Res<(i64, i64)> {
        let r = self
            .call(
                "account.create",
                json!({"name": name, "admin": {"name": "Admin", "email": format!("admin@{name}.test")}}),
            )
            .await?;
        Ok((
            r["account"]["id"].as_i64().ok_or("no account id")?,
            r["admin"]["id"].as_i64().ok_or("no admin id")?,
        ))
    }

    /// Adds a loopback channel; returns its id (does not wait for `connected`).
    pub async fn loopback(&self, account: i64, actor: i64, name: &str, config: Value) -> Res<i64> {
        let ch = self
            .call(
                "channel.add",
                json!({"account": account, "actor": actor, "kind": "loopback", "name": name, "config": config}),
            )
            .await?;
        Ok(ch["id"].as_i64().ok_or("no channel id")?)
    }

    pub async fn remove_channel(&self, account: i64, actor: i64, channel: i64) -> Res<()> {
        self.call(
            "channel.remove",
            json!({"account": account, "actor": actor, "channel": channel}),
        )
        .await?;
        Ok(())
    }

    /// A pool on the daemon's store for the bench's own (read-only) queries, or for
    /// seeding while the daemon is stopped or idle.
    pub async fn store(&self) -> Res<Store> {
        Store::open(&self.store_at, &self.store_path).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Samples a process's RSS; summarises flatness.
#[derive(Default)]
pub struct RssSeries {
    pub samples: Vec<(f64, u64)>,
}

impl RssSeries {
    pub fn push(&mut self, t: f64, kib: u64) {
        self.samples.push((t, kib));
    }

    /// Least-squares slope in MiB per minute.
    pub fn slope_mib_per_min(&self) -> f64 {
        let n = self.samples.len() as f64;
        if n < 2.0 {
            return 0.0;
        }
        let mx = self.samples.iter().map(|s| s.0).sum::<f64>() / n;
        let my = self.samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
        let (mut num, mut den) = (0.0, 0.0);
        for &(x, y) in &self.samples {
            num += (x - mx) * (y as f64 - my);
            den += (x - mx) * (x - mx);
        }
        if den == 0.0 {
            0.0
        } else {
            num / den * 60.0 / 1024.0
        }
    }

    pub fn summary(&self) -> String {
        if self.samples.is_empty() {
            return "no samples".into();
        }
        let mib = |k: u64| k as f64 / 1024.0;
        let first = self.samples[0].1;
        let last = self.samples[self.samples.len() - 1].1;
        let min = self.samples.iter().map(|s| s.1).min().unwrap_or(0);
        let max = self.samples.iter().map(|s| s.1).max().unwrap_or(0);
        format!(
            "first {:.1} MiB, min {:.1}, max {:.1}, last {:.1}, slope {:+.2} MiB/min ({} samples)",
            mib(first),
            mib(min),
            mib(max),
            mib(last),
            self.slope_mib_per_min(),
            self.samples.len()
        )
    }
}

/// Latency figures (ms) of a set of samples.
pub fn latency_line(mut v: Vec<i64>) -> String {
    v.sort_unstable();
    if v.is_empty() {
        return "no samples".into();
    }
    let mean = v.iter().sum::<i64>() as f64 / v.len() as f64;
    format!(
        "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms, mean {:.1} ms (n = {})",
        pct(&v, 50.0),
        pct(&v, 90.0),
        pct(&v, 99.0),
        v[v.len() - 1],
        mean,
        v.len()
    )
}

/// The bench's PostgreSQL, started if `kinds` holds it.
pub async fn bench_pg(kinds: &[StoreKind]) -> Res<Option<BenchPg>> {
    if kinds.contains(&StoreKind::Postgres) {
        Ok(Some(BenchPg::start().await?))
    } else {
        Ok(None)
    }
}

/// Where one daemon run keeps its store: the file in its folder, or a new database
/// `db` on the bench's PostgreSQL (dropped with [`drop_store`]).
pub async fn store_for(kind: StoreKind, pg: Option<&BenchPg>, db: &str) -> Res<StoreAt> {
    match (kind, pg) {
        (StoreKind::Sqlite, _) => Ok(StoreAt::File),
        (StoreKind::Postgres, Some(pg)) => {
            Ok(StoreAt::Postgres(pg.create_database(db, None).await?))
        }
        (StoreKind::Postgres, None) => Err("a PostgreSQL store without the bench's server".into()),
    }
}

/// Drops the run's database (the SQLite file goes with its temp folder).
pub async fn drop_store(kind: StoreKind, pg: Option<&BenchPg>, db: &str) -> Res<()> {
    match (kind, pg) {
        (StoreKind::Postgres, Some(pg)) => pg.drop_database(db).await,
        _ => Ok(()),
    }
}
