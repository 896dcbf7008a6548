//! idle: what the real release-built `patchbayd` costs with nothing to do. Per queue
//! backend: a daemon with N loopback channels that send nothing, left to settle, then
//! watched for a window: its CPU time (utime + stime from /proc/<pid>/stat) as a share of
//! one core, its context switches (all threads, /proc/<pid>/task/*/status), and the
//! writes to its SQLite files — a change of `PRAGMA data_version` seen by a reader that
//! samples every 100 ms (a lower bound on write transactions) — and, on Redis, the
//! commands Redis served.
//!
//!     cargo bench -p patchbay-daemon --bench idle
//!
//! Knobs (environment): IDLE_BACKENDS (default "sqlite,redis"), IDLE_CHANNELS (default
//! 10), IDLE_SECS (the window, default 60), IDLE_SETTLE_SECS (after every channel is
//! connected, default 10), plus PATCHBAYD_BIN / LOOPBACK_LIB / BENCH_TMPDIR (see
//! common/mod.rs).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use sqlx::SqlitePool;

#[tokio::main]
async fn main() -> Res<()> {
    let backends = Backend::list_from_env("IDLE_BACKENDS", "sqlite,redis")?;
    let channels: usize = env_or("IDLE_CHANNELS", 10);
    let secs: u64 = env_or("IDLE_SECS", 60);
    let settle: u64 = env_or("IDLE_SETTLE_SECS", 10);
    println!("idle bench — {}", machine());
    println!(
        "patchbayd: {}\n{channels} idle loopback channels, {settle} s to settle, then a {secs} s window\n",
        patchbayd_bin().display()
    );
    let mut summary = Vec::new();
    for backend in backends {
        summary.push(idle(backend, channels, settle, secs).await?);
    }
    println!("\n==== idle summary (load now {}) ====", loadavg());
    for s in summary {
        println!("{s}");
    }
    println!("target: <= 0.5 % of one core and no periodic store writes, SQLite queue");
    Ok(())
}

async fn idle(backend: Backend, channels: usize, settle: u64, secs: u64) -> Res<String> {
    println!("--- {} ---", backend.name());
    let redis = match backend {
        Backend::Redis => Some(Redis::start()?),
        Backend::Sqlite => None,
    };
    let dir = tempdir("pb-bench-idle-");
    let mut daemon = Daemon::start(
        dir.path(),
        backend,
        redis.as_ref(),
        &StoreAt::File,
        "[billing]\ndefault_price = 0\n",
    )?;
    let (account, admin) = daemon.account("idle").await?;
    for i in 0..channels {
        daemon
            .loopback(account, admin, &format!("idle{i}"), json!({}))
            .await?;
    }
    let start = Instant::now();
    loop {
        let list = daemon
            .call("channel.list", json!({"account": account}))
            .await?;
        let connected = list.as_array().map_or(0, |l| {
            l.iter().filter(|c| c["status"] == "connected").count()
        });
        if connected == channels {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("{connected} of {channels} channels connected after 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(settle)).await;

    let pid = daemon.pid();
    let mut files = vec![("store", daemon.store_path.clone())];
    if backend == Backend::Sqlite {
        files.push(("queue", daemon.dir.join("var/queue.db")));
    }
    let mut watchers = Vec::new();
    for (name, path) in &files {
        watchers.push((*name, WriteWatch::open(path).await?));
    }
    let redis_before = match &redis {
        Some(r) => Some((redis_commands(r).await?, cpu_secs(r.pid()).unwrap_or(0.0))),
        None => None,
    };
    let (cpu0, switches0) = (cpu_secs(pid).ok_or("no /proc stat")?, switches(pid));
    let t0 = Instant::now();
    let window = Duration::from_secs(secs);
    while t0.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (_, w) in &mut watchers {
            w.sample().await?;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, switches1) = (cpu_secs(pid).ok_or("no /proc stat")?, switches(pid));
    let per_min = |n: u64| n as f64 * 60.0 / elapsed;
    let cpu_share = (cpu1 - cpu0) / elapsed * 100.0;
    let (vol, invol) = (switches1.0 - switches0.0, switches1.1 - switches0.1);
    println!(
        "daemon CPU: {:.2} s over {elapsed:.1} s = {cpu_share:.3} % of one core",
        cpu1 - cpu0
    );
    println!(
        "context switches: {:.0}/min ({vol} voluntary, {invol} involuntary over the window)",
        per_min(vol + invol)
    );
    let mut writes = Vec::new();
    for (name, w) in &watchers {
        println!(
            "{name} writes seen: {} ({:.1}/min), WAL {} → {} bytes",
            w.changes,
            per_min(w.changes),
            w.wal_start,
            w.wal_size()
        );
        writes.push(format!("{name} {:.1}/min", per_min(w.changes)));
    }
    if let (Some(r), Some((cmds0, rcpu0))) = (&redis, redis_before) {
        // Minus the bench's own INFO call.
        let cmds = redis_commands(r).await?.saturating_sub(cmds0 + 1);
        let rcpu = cpu_secs(r.pid()).unwrap_or(0.0) - rcpu0;
        println!(
            "redis: {cmds} commands ({:.0}/min), redis-server CPU {:.3} % of one core",
            per_min(cmds),
            rcpu / elapsed * 100.0
        );
        writes.push(format!("redis {:.0} commands/min", per_min(cmds)));
    }
    daemon.terminate();
    Ok(format!(
        "{:<6} CPU {cpu_share:.3} % of one core | {:.0} context switches/min | writes: {}",
        backend.name(),
        per_min(vol + invol),
        writes.join(", ")
    ))
}

/// Voluntary and involuntary context switches of every thread of `pid`.
fn switches(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let value = |l: &str| l.split_whitespace().nth(1)?.parse::<u64>().ok();
            if line.starts_with("voluntary_ctxt_switches:") {
                total.0 += value(line).unwrap_or(0);
            } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                total.1 += value(line).unwrap_or(0);
            }
        }
    }
    total
}

async fn redis_commands(r: &Redis) -> Res<u64> {
    let client = redis::Client::open(r.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no total_commands_processed in INFO".into())
}

/// Counts commits to a SQLite file by other connections: `PRAGMA data_version` changes
/// when one happened since this connection last looked.
struct WriteWatch {
    pool: SqlitePool,
    wal: std::path::PathBuf,
    wal_start: u64,
    last: i64,
    changes: u64,
}

impl WriteWatch {
    async fn open(path: &Path) -> Res<WriteWatch> {
        // One connection: data_version is per connection.
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .read_only(true);
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        let last = data_version(&pool).await?;
        let wal = std::path::PathBuf::from(format!("{}-wal", path.display()));
        let mut w = WriteWatch {
            pool,
            wal,
            wal_start: 0,
            last,
            changes: 0,
        };
        w.wal_start = w.wal_size();
        Ok(w)
    }

    fn wal_size(&self) -> u64 {
        std::fs::metadata(&self.wal).map_or(0, |m| m.len())
    }

    async fn sample(&mut self) -> Res<()> {
        let now = data_version(&self.pool).await?;
        if now != self.last {
            self.changes += 1;
            self.last = now;
        }
        Ok(())
    }
}

async fn data_version(pool: &SqlitePool) -> Res<i64> {
    Ok(sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(pool)
        .await?)
}
