//! inbound: loopback channels at full speed into the real release-built `patchbayd`,
//! on the SQLite queue and on Redis, with the store in SQLite or in PostgreSQL. Reports
//! inbound messages/s end to end (connector event -> `messages` row committed), latency
//! percentiles and the daemon's RSS over the run, then the latency at a paced
//! (sub-saturation) rate. On PostgreSQL it also reports the server's top statements
//! over the saturated window.
//!
//!     cargo bench -p patchbay-daemon --bench inbound
//!
//! Knobs (environment): INBOUND_BACKENDS (default "sqlite,redis"), BENCH_STORE (sqlite,
//! postgres or both; default sqlite), INBOUND_ROUNDS (runs of each backend and store,
//! the stores alternating within a round; default 1), INBOUND_SECS (saturated window,
//! default 60), INBOUND_CHANNELS (default 4), INBOUND_CLIENTS (synthetic senders per
//! channel, default 1000), INBOUND_WARMUP_SECS (default 5), INBOUND_PACED_SECS
//! (default 15; 0: no paced run),
//! INBOUND_PACED_RATE (messages/s over all channels; default 1000), plus PATCHBAYD_BIN /
//! LOOPBACK_LIB / BENCH_TMPDIR / BENCH_PG_EXPLAIN (see common/mod.rs).
//!
//! Latency is reported two ways, both against the loopback's `sent_at` (unix ms taken
//! when the connector generated the message, before `emit`):
//! * `created_at − sent_at`: `messages.created_at` is taken by `store_inbound` when the
//!   handler starts, *before* it waits for the store's write lock and commits;
//! * `commit − sent_at`: on SQLite, commit time observed by polling `MAX(id)` every 5 ms
//!   (ids are assigned in commit order), so it includes the lock wait and the commit,
//!   +≤5 ms; on PostgreSQL, the row's commit timestamp (`CommitClock`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// INBOUND_WARMUP_SECS: before the window (default 5). On a new PostgreSQL store the
/// planner has no statistics until autovacuum's first ANALYZE (up to a minute, see
/// BENCHMARKS.md); 70 measures the store after it.
fn warmup() -> Duration {
    Duration::from_secs(env_or("INBOUND_WARMUP_SECS", 5))
}

struct Window {
    first_id: i64,
    last_id: i64,
    secs: f64,
}

#[tokio::main]
async fn main() -> Res<()> {
    let backends: String = env_or("INBOUND_BACKENDS", "sqlite,redis".to_owned());
    let stores = StoreKind::from_env()?;
    let rounds: usize = env_or("INBOUND_ROUNDS", 1);
    let secs: u64 = env_or("INBOUND_SECS", 60);
    let channels: usize = env_or("INBOUND_CHANNELS", 4);
    let clients: u32 = env_or("INBOUND_CLIENTS", 1000);
    let paced_secs: u64 = env_or("INBOUND_PACED_SECS", 15);
    println!("inbound bench — {}", machine());
    println!(
        "patchbayd: {}\nsaturated: {channels} loopback channels, burst (as fast as the host takes \
         events), {clients} clients each, {}s warm-up + {secs}s window\n",
        patchbayd_bin().display(),
        warmup().as_secs()
    );
    let pg = bench_pg(&stores).await?;
    let mut summary = Vec::new();
    let mut rates: Vec<(Backend, StoreKind, f64)> = Vec::new();
    let mut order = 0;
    for b in backends.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let backend = match b {
            "sqlite" => Backend::Sqlite,
            "redis" => Backend::Redis,
            other => return Err(format!("unknown backend {other}").into()),
        };
        for _ in 0..rounds {
            for &store in &stores {
                order += 1;
                let run = Run {
                    backend,
                    store,
                    pg: pg.as_ref(),
                    order,
                };
                let sat = saturated(&run, secs, channels, clients).await?;
                rates.push((backend, store, sat));
                let rate: f64 = env_or("INBOUND_PACED_RATE", 1000.0);
                let paced = if paced_secs > 0 {
                    paced(&run, paced_secs, channels, clients, rate).await?
                } else {
                    "not run".to_owned()
                };
                summary.push(format!(
                    "#{order} {:<6} queue, {:<8} store: saturated {sat:>7.0} msg/s | paced \
                     {rate:.0}/s offered: {paced}",
                    backend.name(),
                    store.name()
                ));
            }
        }
    }
    println!(
        "\n==== inbound summary ({} CPUs, load now {}) ====",
        machine_cpus(),
        loadavg()
    );
    for s in summary {
        println!("{s}");
    }
    for backend in [Backend::Sqlite, Backend::Redis] {
        let mean = |store| {
            let v: Vec<f64> = rates
                .iter()
                .filter(|r| r.0 == backend && r.1 == store)
                .map(|r| r.2)
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        if let (Some(s), Some(p)) = (mean(StoreKind::Sqlite), mean(StoreKind::Postgres)) {
            println!(
                "{} queue: PostgreSQL store {p:.0} msg/s / SQLite store {s:.0} msg/s (means) = {:.2}x",
                backend.name(),
                p / s
            );
        }
    }
    println!(
        "targets: redis >= 16000 msg/s, sqlite >= 8000 msg/s, RSS flat over 60 s; \
         PostgreSQL store >= 0.8x the SQLite store's msg/s on the same queue"
    );
    Ok(())
}

fn machine_cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// One run's queue and store, and its place in the run order.
struct Run<'a> {
    backend: Backend,
    store: StoreKind,
    pg: Option<&'a BenchPg>,
    order: usize,
}

impl Run<'_> {
    fn db(&self, label: &str) -> String {
        format!("inbound_{label}_{}", self.order)
    }
}

async fn setup(
    run: &Run<'_>,
    label: &str,
) -> Res<(tempfile::TempDir, Option<Redis>, Daemon, i64, i64)> {
    let redis = match run.backend {
        Backend::Redis => Some(Redis::start()?),
        Backend::Sqlite => None,
    };
    let dir = tempdir(&format!("pb-bench-inbound-{label}-"));
    let store_at = store_for(run.store, run.pg, &run.db(label)).await?;
    let daemon = Daemon::start(
        dir.path(),
        run.backend,
        redis.as_ref(),
        &store_at,
        "[billing]\ndefault_price = 0\n",
    )?;
    let (account, admin) = daemon.account("bench").await?;
    Ok((dir, redis, daemon, account, admin))
}

/// Latencies of the messages of the window (`created_at − sent_at`, `commit − sent_at`)
/// and how many there are.
async fn latencies(
    store: &Store,
    w: &Window,
    clock: &CommitClock,
) -> Res<(Vec<i64>, Vec<i64>, usize)> {
    let rows: Vec<(i64, i64, i64, Option<i64>)> = store
        .all(
            &format!(
                "SELECT id, sent_at, created_at, {} FROM messages WHERE id > $1 AND id <= $2 \
                 ORDER BY id",
                store.commit_ms_sql()
            ),
            &[w.first_id.into(), w.last_id.into()],
        )
        .await?;
    let created = rows.iter().map(|r| r.2 - r.1).collect();
    let committed = rows
        .iter()
        .filter_map(|r| clock.commit_ms(r.0, r.3).map(|t| t - r.1))
        .collect();
    Ok((created, committed, rows.len()))
}

async fn saturated(run: &Run<'_>, secs: u64, channels: usize, clients: u32) -> Res<f64> {
    let backend = run.backend;
    println!(
        "--- #{} {} queue, {} store, saturated ---",
        run.order,
        backend.name(),
        run.store.name()
    );
    let (_dir, redis, mut daemon, account, admin) = setup(run, "sat").await?;
    let pool = daemon.store().await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let clock = CommitClock::spawn(pool.clone(), Duration::from_millis(5), stop_rx);

    let t0 = Instant::now();
    for i in 0..channels {
        daemon
            .loopback(
                account,
                admin,
                &format!("sat{i}"),
                json!({"burst": 1_000_000_000u64, "clients": clients, "id_prefix": format!("sat{i}")}),
            )
            .await?;
    }
    let mut rss = RssSeries::default();
    let mut anon = RssSeries::default();
    let mut redis_rss = RssSeries::default();
    let mut start = None;
    let end = warmup() + Duration::from_secs(secs);
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = t0.elapsed();
        if t >= warmup() {
            if start.is_none() {
                if let Some(pg) = run.pg {
                    pg.reset_stats().await?;
                }
                start = Some((
                    Instant::now(),
                    pool.max_message_id().await?,
                    daemon.queue_depth("inbound_message").await?,
                    cpu_secs(daemon.pid()).unwrap_or(0.0),
                    redis
                        .as_ref()
                        .and_then(|r| cpu_secs(r.pid()))
                        .unwrap_or(0.0),
                ));
            }
            if let Some(k) = rss_kib(daemon.pid()) {
                rss.push(t.as_secs_f64(), k);
            }
            if let Some(k) = rss_anon_kib(daemon.pid()) {
                anon.push(t.as_secs_f64(), k);
            }
            if let Some(k) = redis.as_ref().and_then(|r| rss_kib(r.pid())) {
                redis_rss.push(t.as_secs_f64(), k);
            }
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "  t={:>3}s stored {:>8} backlog {:>6} daemon RSS {:.1} MiB load {}",
                t.as_secs(),
                pool.max_message_id().await?,
                daemon.queue_depth("inbound_message").await?,
                rss_kib(daemon.pid()).unwrap_or(0) as f64 / 1024.0,
                loadavg()
            );
        }
        if t >= end {
            break;
        }
    }
    let (s_at, s_id, s_backlog, s_cpu, s_rcpu) = start.ok_or("no window start")?;
    let e_id = pool.max_message_id().await?;
    let e_backlog = daemon.queue_depth("inbound_message").await?;
    let e_cpu = cpu_secs(daemon.pid()).unwrap_or(0.0);
    let e_rcpu = redis
        .as_ref()
        .and_then(|r| cpu_secs(r.pid()))
        .unwrap_or(0.0);
    let wsecs = s_at.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let clock = clock.await?;
    let w = Window {
        first_id: s_id,
        last_id: e_id,
        secs: wsecs,
    };
    // The window's rows (on SQLite that is `e_id - s_id`: ids there have no gaps).
    let (created, committed, n) = latencies(&pool, &w, &clock).await?;
    let stored = n as f64 / w.secs;
    let grew = e_backlog - s_backlog;
    let enq = (n as i64 + grew) as f64 / w.secs;
    println!(
        "#{} {} queue, {} store saturated: {:.0} messages/s stored, {:.0} jobs/s enqueued \
         (backlog grew by {} in {:.0} s)",
        run.order,
        backend.name(),
        run.store.name(),
        stored,
        enq,
        grew,
        w.secs
    );
    println!(
        "  daemon CPU {:.0}% of one core{}",
        (e_cpu - s_cpu) / w.secs * 100.0,
        if redis.is_some() {
            format!(
                ", redis-server CPU {:.0}%",
                (e_rcpu - s_rcpu) / w.secs * 100.0
            )
        } else {
            String::new()
        }
    );
    println!("  latency created_at−sent_at: {}", latency_line(created));
    println!("  latency commit−sent_at:     {}", latency_line(committed));
    println!("  (saturated latency = time queued behind the backlog; see the paced run)");
    println!("  daemon RSS: {}", rss.summary());
    println!("  daemon RssAnon (heap, stacks): {}", anon.summary());
    if redis.is_some() {
        println!("  redis-server RSS: {}", redis_rss.summary());
    }
    if let Some(pg) = run.pg.filter(|_| run.store == StoreKind::Postgres) {
        pg.report(&run.db("sat"), "the saturated window", 12)
            .await?;
    }
    pool.close().await;
    daemon.terminate();
    drop(redis);
    drop_store(run.store, run.pg, &run.db("sat")).await?;
    Ok(stored)
}

async fn paced(run: &Run<'_>, secs: u64, channels: usize, clients: u32, rate: f64) -> Res<String> {
    println!(
        "--- #{} {} queue, {} store, paced at {rate:.0} msg/s ---",
        run.order,
        run.backend.name(),
        run.store.name()
    );
    let (_dir, redis, mut daemon, account, admin) = setup(run, "paced").await?;
    let pool = daemon.store().await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let clock = CommitClock::spawn(pool.clone(), Duration::from_millis(5), stop_rx);
    for i in 0..channels {
        daemon
            .loopback(
                account,
                admin,
                &format!("paced{i}"),
                json!({"rate_per_sec": rate / channels as f64, "clients": clients, "id_prefix": format!("p{i}")}),
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s_id = pool.max_message_id().await?;
    let s_cpu = cpu_secs(daemon.pid()).unwrap_or(0.0);
    let s_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let e_id = pool.max_message_id().await?;
    let e_cpu = cpu_secs(daemon.pid()).unwrap_or(0.0);
    let wsecs = s_at.elapsed().as_secs_f64();
    // Let the last messages of the window commit before reading the clock.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    let clock = clock.await?;
    let w = Window {
        first_id: s_id,
        last_id: e_id,
        secs: wsecs,
    };
    let (created, committed, n) = latencies(&pool, &w, &clock).await?;
    let achieved = n as f64 / w.secs;
    let c = latency_line(created);
    let k = latency_line(committed);
    println!(
        "  stored {achieved:.0} msg/s, daemon CPU {:.0}% of one core",
        (e_cpu - s_cpu) / wsecs * 100.0
    );
    println!("  latency created_at−sent_at: {c}");
    println!("  latency commit−sent_at:     {k}");
    pool.close().await;
    daemon.terminate();
    drop(redis);
    drop_store(run.store, run.pg, &run.db("paced")).await?;
    Ok(format!("stored {achieved:.0}/s, commit−sent {k}"))
}
