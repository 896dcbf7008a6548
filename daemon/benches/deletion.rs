//! deletion: background deletion of 1,000,000 messages (100 accounts x 100 chats x 100
//! messages, with their 10,000 chats and 10,000 contacts) on the SQLite default, while a
//! loopback channel of another account sends steady inbound traffic, against the real
//! release-built `patchbayd`.
//!
//!     cargo bench -p patchbay-daemon --bench deletion
//!
//! The history is seeded with set-based SQL into the store file while the daemon is
//! stopped (once, into a template copied for every configuration). Then, per
//! `deletion.batch_size:pause_ms` configuration: start the daemon, start the loopback
//! traffic (DELETION_RATE msg/s), measure inbound latency for DELETION_BASELINE_SECS,
//! call `data.delete` for each of the 100 accounts (one run each; the `data_deletion`
//! worker runs them one after the other), and measure until every run is done.
//!
//! Inbound latency covers the live messages *sent* before (baseline window) and during
//! the deletion (first `data.delete` call -> last run done), however late they commit;
//! it is `commit − sent_at`: commit time observed by polling `MAX(id)` of
//! `messages` every 5 ms (ids are assigned in commit order), against the loopback's
//! `sent_at`; `created_at − sent_at` is printed too but misses the wait for the write
//! lock (`created_at` is taken before `BEGIN IMMEDIATE`), which is exactly what a
//! deletion batch makes inbound messages do.
//!
//! Knobs: DELETION_CONFIGS (default "1000:1,5000:5,500:5": the shipped default first; e.g.
//! "500:5,2000:5,5000:0"), DELETION_ACCOUNTS (100), DELETION_CHATS (per account, 100),
//! DELETION_PER_CHAT (100), DELETION_RATE (500), DELETION_BASELINE_SECS (15),
//! DELETION_TIMEOUT_SECS (300), plus PATCHBAYD_BIN / LOOPBACK_LIB / BENCH_TMPDIR.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use sqlx::SqlitePool;

#[tokio::main]
async fn main() -> Res<()> {
    let configs: String = env_or("DELETION_CONFIGS", "1000:1,5000:5,500:5".to_owned());
    let accounts: i64 = env_or("DELETION_ACCOUNTS", 100);
    let chats: i64 = env_or("DELETION_CHATS", 100);
    let per_chat: i64 = env_or("DELETION_PER_CHAT", 100);
    let rate: f64 = env_or("DELETION_RATE", 500.0);
    println!("deletion bench — {}", machine());
    println!(
        "patchbayd: {}\nhistory: {accounts} accounts x {chats} chats x {per_chat} messages = {} \
         messages; live traffic {rate} msg/s on another account\n",
        patchbayd_bin().display(),
        accounts * chats * per_chat
    );

    let template = tempdir("pb-bench-deletion-template-");
    let (seed_secs, admins) = make_template(template.path(), accounts, chats, per_chat).await?;
    println!("  seeded the template store in {seed_secs:.1} s");

    let mut summary = Vec::new();
    for c in configs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (batch, pause) = c
            .split_once(':')
            .and_then(|(b, p)| Some((b.parse::<u32>().ok()?, p.parse::<u64>().ok()?)))
            .ok_or_else(|| format!("bad config {c:?}; want batch_size:pause_ms"))?;
        summary.push(bench(template.path(), &admins, batch, pause, rate).await?);
    }
    println!("\n==== deletion summary (load now {}) ====", loadavg());
    for s in summary {
        println!("{s}");
    }
    println!("targets: >= 100000 messages/s deleted; inbound p99 during <= 2x before");
    Ok(())
}

/// Creates the schema by starting the daemon once, stops it, and seeds the history.
/// Returns the seeding time and (account, administrator) pairs.
async fn make_template(
    dir: &Path,
    accounts: i64,
    chats: i64,
    per_chat: i64,
) -> Res<(f64, Vec<(i64, i64)>)> {
    let mut d = Daemon::start(dir, Backend::Sqlite, None, "")?;
    d.terminate();
    let pool = open_store(&d.store_path).await?;
    let t = Instant::now();
    let old = now_ms() - 30 * 24 * 3600 * 1000;
    let mut tx = pool.begin().await?;
    // Each $2 below is the length of the statement's sequence.
    sqlx::query(
        "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < $2) \
         INSERT INTO accounts (name, currency, balance, created_at) \
         SELECT 'old' || i, 'RUB', 0, $1 FROM seq",
    )
    .bind(old)
    .bind(accounts)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO users (account_id, name, email, role, created_at) \
         SELECT id, 'Admin', 'admin' || id || '@old.test', 'administrator', $1 FROM accounts",
    )
    .bind(old)
    .execute(&mut *tx)
    .await?;
    // One channel per account, removed since: history outlives channels, and a removed
    // channel is not started by the daemon.
    sqlx::query(
        "INSERT INTO channels (account_id, kind, name, config, status, status_reason, \
         created_at, removed_at) SELECT id, 'loopback', 'old', '{}', 'removed', 'bench', $1, $1 \
         FROM accounts",
    )
    .bind(old)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < $2) \
         INSERT INTO contacts (account_id, epoch, phone, name, created_at, identity) \
         SELECT a.id, 0, '+1555' || printf('%03d', a.id % 1000) || printf('%04d', s.i), \
         'Client ' || s.i, $1, \
         'phone:+1555' || printf('%03d', a.id % 1000) || printf('%04d', s.i) \
         FROM accounts a, seq s ORDER BY a.id, s.i",
    )
    .bind(old)
    .bind(chats)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO chats (account_id, epoch, channel_id, contact_id, external_chat_id, status, \
         unread, last_message_at, created_at) \
         SELECT ct.account_id, 0, ch.id, ct.id, 'chat-' || ct.id, 'closed', 0, $1, $1 \
         FROM contacts ct JOIN channels ch ON ch.account_id = ct.account_id ORDER BY ct.id",
    )
    .bind(old)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < $2) \
         INSERT INTO messages (account_id, chat_id, channel_id, direction, external_message_id, \
         text, status, sent_at, created_at) \
         SELECT c.account_id, c.id, c.channel_id, 'in', 'h' || c.id || '-' || s.i, \
         'history message ' || s.i || ' of chat ' || c.id || ', some words of text', 'received', \
         $1 + s.i * 1000, $1 + s.i * 1000 FROM chats c, seq s ORDER BY c.id, s.i",
    )
    .bind(old)
    .bind(per_chat)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&pool)
        .await?;
    let admins: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT a.id, u.id FROM accounts a JOIN users u ON u.account_id = a.id ORDER BY a.id",
    )
    .fetch_all(&pool)
    .await?;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    if n != accounts * chats * per_chat {
        return Err(format!("seeded {n} messages").into());
    }
    Ok((t.elapsed().as_secs_f64(), admins))
}

/// Latencies of the live channel's messages *sent* in [from, to) (unix ms), whenever
/// they were committed (so a message held up past the window still counts):
/// `created_at − sent`, `commit − sent`, and `queued − sent` (the inbound job's
/// journal `created_at`, the time in its ULID id, taken when the host queued the
/// event: the part before the queue).
async fn latencies(
    pool: &SqlitePool,
    channel: i64,
    from: i64,
    to: i64,
    clock: &CommitClock,
) -> Res<(Vec<i64>, Vec<i64>, Vec<i64>)> {
    let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(
        "SELECT id, sent_at, created_at, external_message_id FROM messages \
         WHERE channel_id = $1 AND sent_at >= $2 AND sent_at < $3",
    )
    .bind(channel)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let queued: std::collections::HashMap<String, i64> = sqlx::query_as(
        "SELECT payload ->> 'external_message_id', created_at FROM jobs \
         WHERE kind = 'inbound_message' AND payload ->> 'channel' = $1",
    )
    .bind(channel)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    Ok((
        rows.iter().map(|r| r.2 - r.1).collect(),
        rows.iter()
            .filter_map(|r| clock.seen_at(r.0).map(|t| t - r.1))
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
    template: &Path,
    admins: &[(i64, i64)],
    batch: u32,
    pause: u64,
    rate: f64,
) -> Res<String> {
    println!("--- deletion.batch_size = {batch}, deletion.pause_ms = {pause} ---");
    let baseline = Duration::from_secs(env_or("DELETION_BASELINE_SECS", 15));
    let timeout = Duration::from_secs(env_or("DELETION_TIMEOUT_SECS", 300));
    let dir = tempdir("pb-bench-deletion-");
    std::fs::create_dir_all(dir.path().join("var"))?;
    std::fs::copy(
        template.join("var/patchbay.db"),
        dir.path().join("var/patchbay.db"),
    )?;
    // Written back now, not during the baseline: an fsync of the daemon's would wait
    // for the copy's writeback (one journal on the file system) and stall inbound.
    std::fs::File::open(dir.path().join("var/patchbay.db"))?.sync_all()?;
    let mut daemon = Daemon::start(
        dir.path(),
        Backend::Sqlite,
        None,
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
        let (done, deleted): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(deleted_messages), 0) \
             FROM deletion_runs",
        )
        .fetch_one(&pool)
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

    let (msgs, chats, contacts, first_start, last_finish): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT SUM(deleted_messages), SUM(deleted_chats), SUM(deleted_contacts), \
             MIN(started_at), MAX(finished_at) FROM deletion_runs",
        )
        .fetch_one(&pool)
        .await?;
    let secs = (last_finish - first_start) as f64 / 1000.0;
    let old_left: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM messages WHERE channel_id <> $1) + \
         (SELECT COUNT(*) FROM chats WHERE account_id <> $2) + \
         (SELECT COUNT(*) FROM contacts WHERE account_id <> $2)",
    )
    .bind(channel)
    .bind(account)
    .fetch_one(&pool)
    .await?;
    let (live_msgs, live_jobs): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM messages WHERE channel_id = $1), \
         (SELECT COUNT(*) FROM jobs WHERE kind = 'inbound_message' AND state = 'done')",
    )
    .bind(channel)
    .fetch_one(&pool)
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
    drop(pool);
    daemon.terminate();
    Ok(format!(
        "batch {batch:>5} pause {pause:>3} ms: {rate_msgs:>7.0} msg/s deleted ({secs:.1} s); inbound p99 \
         {pb} ms before, {pd} ms during ({ratio:.1}x); {} / {}",
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
