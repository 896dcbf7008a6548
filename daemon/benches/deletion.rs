//! deletion: background deletion of 1,000,000 messages (100 accounts x 100 chats x 100
//! messages, with their 10,000 chats and 10,000 contacts) on the SQLite default (or in
//! PostgreSQL), while a loopback channel of another account sends steady inbound
//! traffic, against the real release-built `patchbayd`.
//!
//!     cargo bench -p patchbay-daemon --bench deletion
//!
//! The history is seeded with set-based SQL into the store while the daemon is
//! stopped (once, into a template copied for every configuration: the file, or on
//! PostgreSQL a template database that `CREATE DATABASE … TEMPLATE` copies). Then, per
//! `deletion.batch_size:pause_ms` configuration: start the daemon, start the loopback
//! traffic (DELETION_RATE msg/s), measure inbound latency for DELETION_BASELINE_SECS,
//! call `data.delete` for each of the 100 accounts (one run each; the `data_deletion`
//! worker runs them one after the other), and measure until every run is done.
//!
//! Inbound latency covers the live messages *sent* before (baseline window) and during
//! the deletion (first `data.delete` call -> last run done), however late they commit;
//! it is `commit − sent_at`: commit time observed by polling `MAX(id)` of
//! `messages` every 5 ms (ids are assigned in commit order; on PostgreSQL the row's
//! commit timestamp instead, see `CommitClock`), against the loopback's `sent_at`; `created_at − sent_at` is printed too but misses the wait for the write
//! lock (`created_at` is taken before `BEGIN IMMEDIATE`), which is exactly what a
//! deletion batch makes inbound messages do.
//!
//! Knobs: DELETION_CONFIGS (default "1000:1,5000:5,500:5": the shipped default first; e.g.
//! "500:5,2000:5,5000:0"), DELETION_ACCOUNTS (100), DELETION_CHATS (per account, 100),
//! DELETION_PER_CHAT (100), DELETION_RATE (500), DELETION_BASELINE_SECS (15),
//! DELETION_TIMEOUT_SECS (300), BENCH_STORE (sqlite, postgres or both; default sqlite),
//! plus PATCHBAYD_BIN / LOOPBACK_LIB / BENCH_TMPDIR / BENCH_PG_EXPLAIN. On PostgreSQL
//! the server's top statements during the deletion are reported.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::main]
async fn main() -> Res<()> {
    let configs: String = env_or("DELETION_CONFIGS", "1000:1,5000:5,500:5".to_owned());
    let accounts: i64 = env_or("DELETION_ACCOUNTS", 100);
    let chats: i64 = env_or("DELETION_CHATS", 100);
    let per_chat: i64 = env_or("DELETION_PER_CHAT", 100);
    let rate: f64 = env_or("DELETION_RATE", 500.0);
    let stores = StoreKind::from_env()?;
    let pg = bench_pg(&stores).await?;
    println!("deletion bench — {}", machine());
    println!(
        "patchbayd: {}\nhistory: {accounts} accounts x {chats} chats x {per_chat} messages = {} \
         messages; live traffic {rate} msg/s on another account\n",
        patchbayd_bin().display(),
        accounts * chats * per_chat
    );

    let mut summary = Vec::new();
    for &store in &stores {
        let template = Template {
            dir: tempdir("pb-bench-deletion-template-"),
            store,
            pg: pg.as_ref().filter(|_| store == StoreKind::Postgres),
        };
        let (seed_secs, admins) = template.make(accounts, chats, per_chat).await?;
        println!(
            "  seeded the template {} store in {seed_secs:.1} s",
            store.name()
        );
        for (n, c) in configs
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let (batch, pause) = c
                .split_once(':')
                .and_then(|(b, p)| Some((b.parse::<u32>().ok()?, p.parse::<u64>().ok()?)))
                .ok_or_else(|| format!("bad config {c:?}; want batch_size:pause_ms"))?;
            summary.push(bench(&template, n, &admins, batch, pause, rate).await?);
        }
        template.remove().await?;
    }
    println!("\n==== deletion summary (load now {}) ====", loadavg());
    for s in summary {
        println!("{s}");
    }
    println!("targets: >= 100000 messages/s deleted; inbound p99 during <= 2x before");
    Ok(())
}

/// The seeded history every configuration starts from.
struct Template<'a> {
    dir: tempfile::TempDir,
    store: StoreKind,
    /// The bench's PostgreSQL, for a PostgreSQL store.
    pg: Option<&'a BenchPg>,
}

const TEMPLATE_DB: &str = "deletion_template";

impl Template<'_> {
    /// Creates the schema by starting the daemon once, stops it, and seeds the history.
    /// Returns the seeding time and (account, administrator) pairs.
    async fn make(&self, accounts: i64, chats: i64, per_chat: i64) -> Res<(f64, Vec<(i64, i64)>)> {
        let at = store_for(self.store, self.pg, TEMPLATE_DB).await?;
        let mut d = Daemon::start(self.dir.path(), Backend::Sqlite, None, &at, "")?;
        d.terminate();
        let store = d.store().await?;
        let t = Instant::now();
        let old = now_ms() - 30 * 24 * 3600 * 1000;
        // Each $2 below is the length of the statement's sequence.
        let seq =
            "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < $2)";
        let phone = format!(
            "'+1555' || {} || {}",
            zero_padded("a.id % 1000", 3),
            zero_padded("s.i", 4)
        );
        let contacts = format!(
            "{seq} INSERT INTO contacts (account_id, epoch, phone, name, created_at, identity) \
             SELECT a.id, 0, {phone}, 'Client ' || s.i, $1, 'phone:' || {phone} \
             FROM accounts a, seq s ORDER BY a.id, s.i"
        );
        store
            .exec_all(&[
                (
                    &format!(
                        "{seq} INSERT INTO accounts (name, currency, balance, created_at) \
                         SELECT 'old' || i, 'RUB', 0, $1 FROM seq"
                    ),
                    vec![old.into(), accounts.into()],
                ),
                (
                    "INSERT INTO users (account_id, name, email, role, created_at) \
                     SELECT id, 'Admin', 'admin' || id || '@old.test', 'administrator', $1 \
                     FROM accounts",
                    vec![old.into()],
                ),
                // One channel per account, removed since: history outlives channels, and
                // a removed channel is not started by the daemon.
                (
                    "INSERT INTO channels (account_id, kind, name, config, status, status_reason, \
                     created_at, removed_at) SELECT id, 'loopback', 'old', '{}', 'removed', \
                     'bench', $1, $1 FROM accounts",
                    vec![old.into()],
                ),
                (&contacts, vec![old.into(), chats.into()]),
                (
                    "INSERT INTO chats (account_id, epoch, channel_id, contact_id, \
                     external_chat_id, status, unread, last_message_at, created_at) \
                     SELECT ct.account_id, 0, ch.id, ct.id, 'chat-' || ct.id, 'closed', 0, $1, $1 \
                     FROM contacts ct JOIN channels ch ON ch.account_id = ct.account_id \
                     ORDER BY ct.id",
                    vec![old.into()],
                ),
                (
                    &format!(
                        "{seq} INSERT INTO messages (account_id, chat_id, channel_id, direction, \
                         external_message_id, text, status, sent_at, created_at) \
                         SELECT c.account_id, c.id, c.channel_id, 'in', 'h' || c.id || '-' || s.i, \
                         'history message ' || s.i || ' of chat ' || c.id || ', some words of text', \
                         'received', $1 + s.i * 1000, $1 + s.i * 1000 FROM chats c, seq s \
                         ORDER BY c.id, s.i"
                    ),
                    vec![old.into(), per_chat.into()],
                ),
            ])
            .await?;
        store.settle().await?;
        let admins: Vec<(i64, i64)> = store
            .all(
                "SELECT a.id, u.id FROM accounts a JOIN users u ON u.account_id = a.id ORDER BY a.id",
                &[],
            )
            .await?;
        let n: i64 = store.scalar("SELECT COUNT(*) FROM messages", &[]).await?;
        store.close().await;
        if n != accounts * chats * per_chat {
            return Err(format!("seeded {n} messages").into());
        }
        Ok((t.elapsed().as_secs_f64(), admins))
    }

    /// A copy of the seeded store for configuration `n`, in `dir`.
    async fn copy(&self, dir: &Path, n: usize) -> Res<StoreAt> {
        match self.pg {
            Some(pg) => {
                let url = pg
                    .create_database(&Self::copy_db(n), Some(TEMPLATE_DB))
                    .await?;
                Ok(StoreAt::Postgres(url))
            }
            None => {
                std::fs::create_dir_all(dir.join("var"))?;
                std::fs::copy(
                    self.dir.path().join("var/patchbay.db"),
                    dir.join("var/patchbay.db"),
                )?;
                // Written back now, not during the baseline: an fsync of the daemon's
                // would wait for the copy's writeback (one journal on the file system)
                // and stall inbound.
                std::fs::File::open(dir.join("var/patchbay.db"))?.sync_all()?;
                Ok(StoreAt::File)
            }
        }
    }

    fn copy_db(n: usize) -> String {
        format!("deletion_{n}")
    }

    async fn remove(&self) -> Res<()> {
        drop_store(self.store, self.pg, TEMPLATE_DB).await
    }
}

/// SQL for `expr` (a non-negative integer) as text zero-padded to `width` digits, in
/// functions both databases have (SQLite has no `lpad`, PostgreSQL no `printf`).
fn zero_padded(expr: &str, width: usize) -> String {
    let zeros = "0".repeat(width);
    format!(
        "substr('{zeros}' || ({expr}), length('{zeros}' || ({expr})) - {})",
        width - 1
    )
}

/// Latencies of the live channel's messages *sent* in [from, to) (unix ms), whenever
/// they were committed (so a message held up past the window still counts):
/// `created_at − sent`, `commit − sent`, and `queued − sent` (the inbound job's
/// journal `created_at`, the time in its ULID id, taken when the host queued the
/// event: the part before the queue).
async fn latencies(
    pool: &Store,
    channel: i64,
    from: i64,
    to: i64,
    clock: &CommitClock,
) -> Res<(Vec<i64>, Vec<i64>, Vec<i64>)> {
    let rows: Vec<(i64, i64, i64, String, Option<i64>)> = pool
        .all(
            &format!(
                "SELECT id, sent_at, created_at, external_message_id, {} FROM messages \
                 WHERE channel_id = $1 AND sent_at >= $2 AND sent_at < $3",
                pool.commit_ms_sql()
            ),
            &[channel.into(), from.into(), to.into()],
        )
        .await?;
    let queued: std::collections::HashMap<String, i64> = pool
        .all::<(String, i64)>(
            &format!(
                "SELECT {}, created_at FROM jobs \
                 WHERE kind = 'inbound_message' AND CAST({} AS BIGINT) = $1",
                pool.json_field("payload", "external_message_id"),
                pool.json_field("payload", "channel")
            ),
            &[channel.into()],
        )
        .await?
        .into_iter()
        .collect();
    Ok((
        rows.iter().map(|r| r.2 - r.1).collect(),
        rows.iter()
            .filter_map(|r| clock.commit_ms(r.0, r.4).map(|t| t - r.1))
            .collect(),
        rows.iter()
            .filter_map(|r| queued.get(&r.3).map(|t| t - r.1))
            .collect(),
    ))
}

fn p99(v: &[i64]) -> i64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    pct(&v, 99.0)
}

async fn bench(
    template: &Template<'_>,
    n: usize,
    admins: &[(i64, i64)],
    batch: u32,
    pause: u64,
    rate: f64,
) -> Res<String> {
    println!(
        "--- {} store, deletion.batch_size = {batch}, deletion.pause_ms = {pause} ---",
        template.store.name()
    );
    let baseline = Duration::from_secs(env_or("DELETION_BASELINE_SECS", 15));
    let timeout = Duration::from_secs(env_or("DELETION_TIMEOUT_SECS", 300));
    let dir = tempdir("pb-bench-deletion-");
    let store_at = template.copy(dir.path(), n).await?;
    let mut daemon = Daemon::start(
        dir.path(),
        Backend::Sqlite,
        None,
        &store_at,
        &format!(
            "[billing]\ndefault_price = 0\n[deletion]\nbatch_size = {batch}\npause_ms = {pause}\n"
        ),
    )?;
    let pool = daemon.store().await?;
    let (account, admin) = daemon.account("live").await?;
    let channel = daemon
        .loopback(
            account,
            admin,
            "live",
            json!({"rate_per_sec": rate, "clients": 100, "id_prefix": "live"}),
        )
        .await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let clock = CommitClock::spawn(pool.clone(), Duration::from_millis(5), stop_rx);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let b_from = now_ms();
    tokio::time::sleep(baseline).await;
    let b_to = now_ms();

    if let Some(pg) = template.pg {
        pg.reset_stats().await?;
    }
    let cpu0 = cpu_secs(daemon.pid()).unwrap_or(0.0);
    let d_started = Instant::now();
    let d_started_ms = now_ms();
    let mut c = daemon.client().await?;
    for &(acc, adm) in admins {
        c.call("data.delete", json!({"account": acc, "actor": adm}))
            .await
            .map_err(|e| format!("data.delete {acc}: {e}"))?;
    }
    let d_from = d_started_ms;
    let call_secs = d_started.elapsed().as_secs_f64();
    let mut last_print = Instant::now();
    let runs = admins.len() as i64;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (done, deleted): (i64, i64) = pool
            .one(
                "SELECT COUNT(*) FILTER (WHERE state = 'done'), \
                 CAST(COALESCE(SUM(deleted_messages), 0) AS BIGINT) FROM deletion_runs",
                &[],
            )
            .await?;
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "  t={:>5.1}s runs done {done}/{runs}, messages deleted {deleted}, load {}",
                d_started.elapsed().as_secs_f64(),
                loadavg()
            );
        }
        if done == runs {
            break;
        }
        if d_started.elapsed() > timeout {
            return Err(format!(
                "deletion not done after {timeout:?}: {done}/{runs} runs, {deleted} messages"
            )
            .into());
        }
    }
    let d_to = now_ms();
    let cpu = cpu_secs(daemon.pid()).unwrap_or(0.0) - cpu0;
    if let Some(pg) = template.pg {
        pg.report(&Template::copy_db(n), "the deletion", 12).await?;
    }
    // Messages sent during the run but held up by it still have to commit: wait until
    // the live channel's inbound jobs are all done (at most 60 s).
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(60) {
        if daemon.queue_depth("inbound_message").await? == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    let clock = clock.await?;

    let (msgs, chats, contacts, first_start, last_finish): (i64, i64, i64, i64, i64) = pool
        .one(
            "SELECT CAST(SUM(deleted_messages) AS BIGINT), CAST(SUM(deleted_chats) AS BIGINT), \
             CAST(SUM(deleted_contacts) AS BIGINT), MIN(started_at), MAX(finished_at) \
             FROM deletion_runs",
            &[],
        )
        .await?;
    let secs = (last_finish - first_start) as f64 / 1000.0;
    let old_left: i64 = pool
        .scalar(
            "SELECT (SELECT COUNT(*) FROM messages WHERE channel_id <> $1) + \
             (SELECT COUNT(*) FROM chats WHERE account_id <> $2) + \
             (SELECT COUNT(*) FROM contacts WHERE account_id <> $2)",
            &[channel.into(), account.into()],
        )
        .await?;
    let (live_msgs, live_jobs): (i64, i64) = pool
        .one(
            "SELECT (SELECT COUNT(*) FROM messages WHERE channel_id = $1), \
             (SELECT COUNT(*) FROM jobs WHERE kind = 'inbound_message' AND state = 'done')",
            &[channel.into()],
        )
        .await?;

    let (bc, bk, bj) = latencies(&pool, channel, b_from, b_to, &clock).await?;
    let (dc, dk, dj) = latencies(&pool, channel, d_from, d_to, &clock).await?;
    let rate_msgs = msgs as f64 / secs;
    println!(
        "  deleted {msgs} messages, {chats} chats, {contacts} contacts in {secs:.1} s \
         (first run start -> last run finish; {call_secs:.2} s of that issuing the {runs} data.delete calls)"
    );
    println!(
        "  {rate_msgs:.0} messages/s, {:.0} rows/s; daemon CPU {:.0}% of one core; left over: {old_left}",
        (msgs + chats + contacts) as f64 / secs,
        cpu / d_started.elapsed().as_secs_f64() * 100.0
    );
    println!("  live channel: {live_msgs} messages stored, {live_jobs} inbound jobs done");
    println!(
        "  inbound before   commit−sent:     {}",
        latency_line(bk.clone())
    );
    println!(
        "  inbound during   commit−sent:     {}",
        latency_line(dk.clone())
    );
    println!("  inbound before   created_at−sent: {}", latency_line(bc));
    println!("  inbound during   created_at−sent: {}", latency_line(dc));
    println!("  inbound before   queued−sent:     {}", latency_line(bj));
    println!("  inbound during   queued−sent:     {}", latency_line(dj));
    let (pb, pd) = (p99(&bk), p99(&dk));
    let ratio = pd as f64 / pb.max(1) as f64;
    pool.close().await;
    daemon.terminate();
    if template.pg.is_some() {
        drop_store(template.store, template.pg, &Template::copy_db(n)).await?;
    }
    Ok(format!(
        "{:<8} batch {batch:>5} pause {pause:>3} ms: {rate_msgs:>7.0} msg/s deleted ({secs:.1} s); inbound p99 \
         {pb} ms before, {pd} ms during ({ratio:.1}x); {} / {}",
        template.store.name(),
        if rate_msgs >= 100_000.0 {
            "rate target met"
        } else {
            "rate target NOT met"
        },
        if ratio <= 2.0 {
            "latency target met"
        } else {
            "latency target NOT met"
        },
    ))
}
