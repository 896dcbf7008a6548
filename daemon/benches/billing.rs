//! billing: one daily `billing.run` over 100,000 accounts with 300,000 channels, on the
//! SQLite queue (the default) and on Redis, with the store in SQLite (the default) or
//! in PostgreSQL, against the real release-built `patchbayd`.
//!
//!     cargo bench -p patchbay-daemon --bench billing
//!
//! Seeding: the daemon is started on a fresh folder as a worker-only node
//! (`node.run_channels = false`: 300,000 loopback connectors are not what this
//! measures), then the
//! bench inserts the accounts, one administrator each and three `loopback` channels each
//! (status `disconnected`, as a node running no connector leaves them: charged all
//! the same) straight into the store with set-based SQL, while the
//! daemon is idle. Price 100 per channel per day, so 300 per account:
//! * 90 % of accounts hold 1,000,000 — charged, no e-mail;
//! * 5 % (id ≡ 1 mod 20) hold 1,000 — charged, 700 left = 3 days: a warning e-mail;
//! * 5 % (id ≡ 0 mod 20) hold 100 — cannot pay: channels suspended, "disconnected" e-mail.
//!
//! Phases, from the job journal's own timestamps: fan-out (the `billing_run` job queueing
//! one `charge_account` per account), charging (every `charge_account` done) and balance
//! checks (every `balance_check` the charges queued done: one per account whose charge
//! recorded an e-mail, 10 % of them on the first run, none on a rerun). Then two reruns of the same
//! day: (A) `billing.run` again, which the idempotency key turns into a no-op, and (B) a
//! forced full re-execution — the bench clears the `billing_run` / `charge_account`
//! idempotency keys in the journal so every account is charged again — which must
//! change nothing (ledger, balances, suspensions, e-mails) thanks to the store's UNIQUE
//! (channel, day) and notification constraints. A rerun that changes the ledger's rows
//! or any balance stops the bench with an error. On PostgreSQL the server's top
//! statements are reported for the first run and for rerun B.
//!
//! Knobs: BILLING_BACKENDS (default "sqlite,redis"), BENCH_STORE (sqlite, postgres or
//! both; default sqlite), BILLING_ACCOUNTS (100000),
//! BILLING_TIMEOUT_SECS (per run, 150: an unfinished run reports its progress and rate
//! and skips the reruns), BILLING_SPOOL (a folder for the e-mail spool instead of the
//! daemon's own, e.g. /dev/shm: a diagnostic, see BENCHMARKS.md), plus PATCHBAYD_BIN /
//! LOOPBACK_LIB / BENCH_TMPDIR / BENCH_PG_EXPLAIN.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::main]
async fn main() -> Res<()> {
    let backends: String = env_or("BILLING_BACKENDS", "sqlite,redis".to_owned());
    let accounts: i64 = env_or("BILLING_ACCOUNTS", 100_000);
    let stores = StoreKind::from_env()?;
    println!("billing bench — {}", machine());
    println!(
        "patchbayd: {}\n{accounts} accounts x 3 channels, price 100/channel/day\n",
        patchbayd_bin().display()
    );
    let pg = bench_pg(&stores).await?;
    let mut summary = Vec::new();
    for b in backends.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let backend = match b {
            "sqlite" => Backend::Sqlite,
            "redis" => Backend::Redis,
            other => return Err(format!("unknown backend {other}").into()),
        };
        for &store in &stores {
            if store == StoreKind::Postgres && backend == Backend::Sqlite {
                // A worker-only node on PostgreSQL needs the shared queue (its sends go
                // through it to the channels' nodes): the daemon refuses the pair.
                println!("(skipped: the SQLite queue with the PostgreSQL store)");
                continue;
            }
            summary.extend(bench(backend, store, pg.as_ref(), accounts).await?);
        }
    }
    println!("\n==== billing summary (load now {}) ====", loadavg());
    for s in summary {
        println!("{s}");
    }
    println!(
        "target: whole run <= 10 s on SQLite and on PostgreSQL; rerun changes nothing and \
         takes no longer"
    );
    Ok(())
}

async fn seed(store: &Store, accounts: i64) -> Res<f64> {
    let t = Instant::now();
    // Two days ago: the run bills yesterday (a day after today is refused), on which
    // the channels must have existed.
    let now = now_ms() - 2 * 86_400_000;
    store
        .exec_all(&[
            (
                "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < $1) \
                 INSERT INTO accounts (name, currency, balance, created_at) \
                 SELECT 'acc' || i, 'RUB', \
                        CASE WHEN i % 20 = 0 THEN 100 WHEN i % 20 = 1 THEN 1000 ELSE 1000000 END, $2 \
                 FROM seq",
                vec![accounts.into(), now.into()],
            ),
            (
                "INSERT INTO users (account_id, name, email, role, created_at) \
                 SELECT id, 'Admin', 'admin' || id || '@bench.test', 'administrator', $1 \
                 FROM accounts",
                vec![now.into()],
            ),
            (
                "INSERT INTO channels (account_id, kind, name, config, status, created_at) \
                 SELECT a.id, 'loopback', 'ch' || k.k, '{}', 'disconnected', $1 FROM accounts a, \
                 (SELECT 1 AS k UNION ALL SELECT 2 UNION ALL SELECT 3) k ORDER BY a.id, k.k",
                vec![now.into()],
            ),
        ])
        .await?;
    store.settle().await?;
    Ok(t.elapsed().as_secs_f64())
}

#[derive(Debug, PartialEq)]
struct Effects {
    charges: i64,
    charged: i64,
    ledger_rows: i64,
    balances: i64,
    /// A digest of every (account, balance): a rerun moving money between accounts
    /// shows here even when the sum stays.
    balances_digest: u64,
    suspended: i64,
    notifications: i64,
    mails: usize,
}

async fn effects(store: &Store, day: &str, spool: &std::path::Path) -> Res<Effects> {
    let (charges, charged): (i64, i64) = store
        .one(
            "SELECT COUNT(*), CAST(COALESCE(-SUM(amount), 0) AS BIGINT) FROM ledger \
             WHERE kind = 'charge' AND day = $1",
            &[day.into()],
        )
        .await?;
    let ledger_rows: i64 = store.scalar("SELECT COUNT(*) FROM ledger", &[]).await?;
    let balances: Vec<(i64, i64)> = store
        .all("SELECT id, balance FROM accounts ORDER BY id", &[])
        .await?;
    // FNV-1a over the pairs.
    let balances_digest = balances
        .iter()
        .flat_map(|(id, b)| id.to_le_bytes().into_iter().chain(b.to_le_bytes()))
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, byte| {
            (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    let suspended: i64 = store
        .scalar(
            "SELECT COUNT(*) FROM channels WHERE status = 'suspended'",
            &[],
        )
        .await?;
    let notifications: i64 = store
        .scalar("SELECT COUNT(*) FROM notifications", &[])
        .await?;
    let mails = std::fs::read_dir(spool).map_or(0, |d| d.count());
    Ok(Effects {
        charges,
        charged,
        ledger_rows,
        balances: balances.iter().map(|b| b.1).sum(),
        balances_digest,
        suspended,
        notifications,
        mails,
    })
}

/// Journal counts of the charge jobs not finished yet, and finished ones, by kind.
async fn open_and_done(store: &Store) -> Res<(i64, i64, i64, i64)> {
    let open: Vec<(String, i64)> = store
        .all(
            "SELECT kind, COUNT(*) FROM jobs WHERE state IN ('pending', 'running', 'failed') \
             AND kind IN ('billing_run', 'charge_account', 'balance_check') GROUP BY kind",
            &[],
        )
        .await?;
    let done: Vec<(String, i64)> = store
        .all(
            "SELECT kind, COUNT(*) FROM jobs WHERE state IN ('done', 'dead') \
             AND kind IN ('charge_account', 'balance_check') GROUP BY kind",
            &[],
        )
        .await?;
    let get = |v: &[(String, i64)], k: &str| v.iter().find(|r| r.0 == k).map_or(0, |r| r.1);
    Ok((
        get(&open, "charge_account") + get(&open, "billing_run"),
        get(&open, "balance_check"),
        get(&done, "charge_account"),
        get(&done, "balance_check"),
    ))
}

struct RunFigures {
    /// False: the timeout came first; the figures are then the progress so far.
    finished: bool,
    total: f64,
    fanout: f64,
    charges_done: f64,
    checks_done: f64,
    charge_jobs: i64,
    check_jobs: i64,
    dead: i64,
    cpu: f64,
    redis_cpu: f64,
}

/// `billing.run` for `day`, then waits until every job it caused is finished.
async fn run(
    daemon: &Daemon,
    redis: Option<&Redis>,
    pool: &Store,
    day: &str,
    accounts: i64,
    expected_checks: i64,
) -> Res<RunFigures> {
    let timeout = Duration::from_secs(env_or("BILLING_TIMEOUT_SECS", 150));
    let mut finished = true;
    let mut fanout_done;
    let (_, _, base_charge, base_check) = open_and_done(pool).await?;
    let cpu0 = cpu_secs(daemon.pid()).unwrap_or(0.0);
    let rcpu0 = redis.and_then(|r| cpu_secs(r.pid())).unwrap_or(0.0);
    let t_call = now_ms();
    let started = Instant::now();
    let r = daemon.call("billing.run", json!({ "date": day })).await?;
    let job = r["job"].as_str().ok_or("no job id")?.to_owned();
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (open_c, open_b, done_c, done_b) = open_and_done(pool).await?;
        let run_state: String = pool
            .scalar(
                "SELECT state FROM jobs WHERE id = $1",
                &[job.as_str().into()],
            )
            .await?;
        let (dc, db) = (done_c - base_charge, done_b - base_check);
        fanout_done = run_state == "done";
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "  t={:>5.1}s billing_run {run_state}, charge_account done {dc}, balance_check done {db}, open {} / {}",
                started.elapsed().as_secs_f64(),
                open_c,
                open_b
            );
        }
        if run_state == "done"
            && open_c == 0
            && open_b == 0
            && dc >= accounts
            && db >= expected_checks
        {
            break;
        }
        if started.elapsed() > timeout {
            println!(
                "  NOT FINISHED after {timeout:?}: billing_run {run_state}, charge_account done \
                 {dc}/{accounts}, balance_check done {db}/{expected_checks}"
            );
            finished = false;
            break;
        }
    }
    let cpu = cpu_secs(daemon.pid()).unwrap_or(0.0) - cpu0;
    let redis_cpu = redis.and_then(|r| cpu_secs(r.pid())).unwrap_or(0.0) - rcpu0;
    // Exact phase times from the journal (unix ms).
    let run_done: i64 = pool
        .scalar(
            "SELECT updated_at FROM jobs WHERE id = $1",
            &[job.as_str().into()],
        )
        .await?;
    let (charge_jobs, charges_end, dead_c) = jobs_since(pool, "charge_account", t_call).await?;
    let (check_jobs, checks_end, dead_b) = jobs_since(pool, "balance_check", t_call).await?;
    let s = |t: i64| (t - t_call) as f64 / 1000.0;
    let checks_done = s(checks_end.unwrap_or(t_call));
    let charges_done = s(charges_end.unwrap_or(t_call));
    if !finished {
        // Progress so far: the time is the timeout, the job counts what got done.
        let (_, _, done_c, done_b) = open_and_done(pool).await?;
        let now = (now_ms() - t_call) as f64 / 1000.0;
        return Ok(RunFigures {
            finished,
            total: now,
            fanout: if fanout_done { s(run_done) } else { f64::NAN },
            charges_done: now,
            checks_done: now,
            charge_jobs: done_c - base_charge,
            check_jobs: done_b - base_check,
            dead: dead_c + dead_b,
            cpu,
            redis_cpu,
        });
    }
    Ok(RunFigures {
        finished,
        total: checks_done.max(charges_done).max(s(run_done)),
        fanout: s(run_done),
        charges_done,
        checks_done,
        charge_jobs,
        check_jobs,
        dead: dead_c + dead_b,
        cpu,
        redis_cpu,
    })
}

/// Jobs of `kind` created since `t` (unix ms): how many, the last update, how many dead.
async fn jobs_since(pool: &Store, kind: &str, t: i64) -> Res<(i64, Option<i64>, i64)> {
    pool.one(
        "SELECT COUNT(*), MAX(updated_at), COUNT(*) FILTER (WHERE state = 'dead') FROM jobs \
         WHERE kind = $1 AND created_at >= $2",
        &[kind.into(), t.into()],
    )
    .await
}

fn print_run(label: &str, f: &RunFigures) -> String {
    if !f.finished {
        let rate = f.charge_jobs as f64 / f.total.max(0.001);
        let line = format!(
            "{label}: NOT FINISHED within {:.0} s — {} charge_account and {} balance_check jobs \
             done ({rate:.0} accounts/s charged; fan-out done at {:.1} s); daemon CPU {:.1} s{}",
            f.total,
            f.charge_jobs,
            f.check_jobs,
            f.fanout,
            f.cpu,
            if f.redis_cpu > 0.0 {
                format!(", redis CPU {:.1} s", f.redis_cpu)
            } else {
                String::new()
            }
        );
        println!("  {line}");
        return line;
    }
    let line = format!(
        "{label}: whole run {:.1} s (fan-out of {} charge_account jobs done at {:.1} s, last charge \
         at {:.1} s, last of {} balance_check at {:.1} s); {:.0} accounts/s; dead jobs {}; daemon \
         CPU {:.1} s{}",
        f.total,
        f.charge_jobs,
        f.fanout,
        f.charges_done,
        f.check_jobs,
        f.checks_done,
        f.charge_jobs as f64 / f.charges_done.max(0.001),
        f.dead,
        f.cpu,
        if f.redis_cpu > 0.0 {
            format!(", redis CPU {:.1} s", f.redis_cpu)
        } else {
            String::new()
        }
    );
    println!("  {line}");
    line
}

/// Waits until the daemon's catch-up `billing_run` for today is done.
async fn wait_for_catch_up(pool: &Store) -> Res<()> {
    let start = Instant::now();
    loop {
        let done: i64 = pool
            .scalar(
                "SELECT COUNT(*) FROM jobs WHERE kind = 'billing_run' AND state = 'done'",
                &[],
            )
            .await?;
        if done > 0 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err("the daemon did not run today's catch-up billing_run within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn bench(
    backend: Backend,
    store: StoreKind,
    pg: Option<&BenchPg>,
    accounts: i64,
) -> Res<Vec<String>> {
    println!("--- {} queue, {} store ---", backend.name(), store.name());
    let label = format!("{} queue, {} store", backend.name(), store.name());
    let redis = match backend {
        Backend::Redis => Some(Redis::start()?),
        Backend::Sqlite => None,
    };
    let dir = tempdir(&format!("pb-bench-billing-{}-", backend.name()));
    let db = format!("billing_{}", backend.name());
    let store_at = store_for(store, pg, &db).await?;
    let pg = pg.filter(|_| store == StoreKind::Postgres);
    // BILLING_SPOOL: the e-mail spool somewhere else, e.g. on a tmpfs, to tell the
    // daemon's cost from this disk's (see BENCHMARKS.md, "The spool's cost").
    let spool_parent = match std::env::var_os("BILLING_SPOOL") {
        Some(p) => Some(
            tempfile::Builder::new()
                .prefix("pb-spool-")
                .tempdir_in(&p)
                .map_err(|e| {
                    format!("BILLING_SPOOL={}: not a writable folder: {e}", p.display())
                })?,
        ),
        None => None,
    };
    let spool = spool_parent
        .as_ref()
        .map_or_else(|| dir.path().join("var/mail"), |d| d.path().join("mail"));
    let mut daemon = Daemon::start(
        dir.path(),
        backend,
        redis.as_ref(),
        &store_at,
        // run_at 00:00: the daemon always catches up today's run at start, which the
        // bench lets finish on the empty store before seeding (else it races the seed).
        // A worker-only node: the reconcile loop would otherwise start the 300,000
        // seeded channels' connectors, which is not what this measures.
        &format!(
            "[billing]\ndefault_price = 100\nrun_at = \"00:00\"\ntimezone = \"UTC\"\n\
             [node]\nrun_channels = false\n[mail]\nspool_dir = {}\n",
            // A JSON string is a TOML basic string.
            json!(spool.to_string_lossy())
        ),
    )?;
    let pool = daemon.store().await?;
    wait_for_catch_up(&pool).await?;
    let seed_secs = seed(&pool, accounts).await?;
    println!(
        "  seeded {accounts} accounts, {accounts} administrators, {} channels in {seed_secs:.1} s (load {})",
        accounts * 3,
        loadavg()
    );
    // Yesterday, as an operator catching up bills it (a day after today is refused):
    // today's run was queued by the daemon at start (it catches up a run_at that has
    // passed) while the store was still empty.
    let day = (chrono::Utc::now().date_naive() - chrono::Days::new(1)).to_string();
    let before = effects(&pool, &day, &spool).await?;

    // Accounts with id ≡ 0 or 1 (mod 20) get an e-mail: a balance_check each.
    let mailed = (1..=accounts).filter(|id| id % 20 <= 1).count() as i64;
    if let Some(pg) = pg {
        pg.reset_stats().await?;
    }
    let first = run(&daemon, redis.as_ref(), &pool, &day, accounts, mailed).await?;
    let mut out = vec![print_run(&format!("{label} first run"), &first)];
    if let Some(pg) = pg {
        pg.report(&db, "the first run", 12).await?;
    }
    if !first.finished {
        out.push(format!(
            "{label} reruns skipped (first run unfinished; try BILLING_ACCOUNTS=10000)"
        ));
        pool.close().await;
        daemon.terminate();
        drop_store(store, pg, &db).await?;
        return Ok(out);
    }
    let after = effects(&pool, &day, &spool).await?;
    println!("  effects: {after:?} (before: {before:?})");
    let payers = accounts - accounts / 20;
    let expect_ok = after.charges == payers * 3 && after.suspended == (accounts / 20) * 3;
    println!(
        "  expected {} charges and {} suspended channels: {}",
        payers * 3,
        (accounts / 20) * 3,
        if expect_ok { "ok" } else { "MISMATCH" }
    );

    // Rerun A: the same day through the API — the idempotency key answers `existing`.
    let t = Instant::now();
    let r = daemon.call("billing.run", json!({ "date": day })).await?;
    let a_ms = t.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_a = effects(&pool, &day, &spool).await?;
    let line = format!(
        "{label} rerun A (billing.run again): existing = {}, answered in {a_ms:.1} ms, effects \
         unchanged: {}",
        r["existing"],
        after_a == after
    );
    println!("  {line}");
    out.push(line);
    unchanged_or_fail("rerun A", &after, &after_a)?;

    // Rerun B: forget the keys, so the fan-out and every charge really run again.
    pool.exec(
        "UPDATE jobs SET idempotency_key = NULL WHERE kind IN ('billing_run', 'charge_account')",
        &[],
    )
    .await?;
    if let Some(pg) = pg {
        pg.reset_stats().await?;
    }
    let second = run(&daemon, redis.as_ref(), &pool, &day, accounts, 0).await?;
    let after_b = effects(&pool, &day, &spool).await?;
    let mut line = print_run(
        &format!("{label} rerun B (forced re-execution of every charge)"),
        &second,
    );
    if let Some(pg) = pg {
        pg.report(&db, "rerun B", 8).await?;
    }
    let unchanged = after_b == after;
    line.push_str(&format!(
        "; effects unchanged: {unchanged}; no longer than the first run: {}",
        second.total <= first.total
    ));
    println!("  effects unchanged: {unchanged} {after_b:?}");
    out.push(line);
    unchanged_or_fail("rerun B", &after, &after_b)?;
    pool.close().await;
    daemon.terminate();
    drop(redis);
    drop_store(store, pg, &db).await?;
    Ok(out)
}

/// A rerun of a billed day must leave the ledger and every balance as they were.
fn unchanged_or_fail(rerun: &str, before: &Effects, after: &Effects) -> Res<()> {
    if after.ledger_rows != before.ledger_rows
        || after.balances_digest != before.balances_digest
        || after != before
    {
        return Err(format!("{rerun} changed the store: {before:?} -> {after:?}").into());
    }
    Ok(())
}
