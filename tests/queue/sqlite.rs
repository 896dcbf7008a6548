//! SQLite backend: durable PRAGMAs on every pooled connection, graceful
//! shutdown, crash recovery, idle pickup latency.

use std::time::{Duration, Instant};

use crate::common::{Recorder, TempDb, env, spec};
use patchbay_daemon::queue::{Envelope, Queue, SqliteTuning};

/// setup() leaves synchronous=OFF on its connection; ours must all be durable, and
/// leave checkpoints to the checkpoint connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pooled_connection_is_durable() {
    let db = TempDb::new("pragma");
    // A pool of several (the default is one), so setup()'s connection could be among them.
    let tuning = SqliteTuning {
        max_connections: 4,
        ..SqliteTuning::default()
    };
    let Queue::Sqlite(sq) = Queue::open_sqlite_with(&db.0, tuning).await.unwrap() else {
        unreachable!()
    };
    // Hold all connections at once so each distinct one is checked.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(sq.pool().acquire().await.unwrap());
    }
    for c in conns.iter_mut() {
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut **c)
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut **c)
            .await
            .unwrap();
        let autocheckpoint: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
            .fetch_one(&mut **c)
            .await
            .unwrap();
        assert_eq!(sync, 1, "synchronous must be NORMAL (1)");
        assert_eq!(mode, "wal");
        // Checkpoints (and their fsync) belong to the queue's checkpoint connection;
        // the working connections only keep a backstop.
        assert_eq!(autocheckpoint, 10_000);
    }
}

/// (b) on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_sqlite() {
    let db = TempDb::new("graceful");
    let queue = Queue::open_sqlite(&db.0).await.unwrap();
    crate::common::graceful_shutdown_scenario(queue).await;
}

/// (c) on SQLite: recovery is apalis' orphan detection (heartbeat 1 s x 2 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_worker_job_is_rerun() {
    let db = TempDb::new("crash");
    let tuning = SqliteTuning {
        heartbeat: Duration::from_secs(1),
        missed_heartbeats: 2,
        ..SqliteTuning::default()
    };
    let a = Queue::open_sqlite_with(&db.0, tuning.clone())
        .await
        .unwrap();
    let b = Queue::open_sqlite_with(&db.0, tuning).await.unwrap();
    let after = crate::common::crash_redelivery_scenario(a, b.clone(), "patchbay:crash").await;
    println!("re-run {after:?} after the crash");
    assert!(
        after < Duration::from_secs(10),
        "recovery too slow: {after:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.depth("patchbay:crash").await.unwrap() != 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// poll_with_interval: an idle worker does not wait for its heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_picks_up_quickly() {
    let db = TempDb::new("idle");
    let queue = Queue::open_sqlite(&db.0).await.unwrap();
    let latency = crate::common::idle_pickup_latency(queue).await;
    assert!(
        latency < Duration::from_secs(1),
        "idle pickup took {latency:?}"
    );
}

/// An idle worker writes nothing to the queue's file: its polls and heartbeats only
/// read, so `PRAGMA data_version`, which changes whenever another connection committed
/// a write, stays put across dozens of polls and several heartbeats; a push still wakes
/// the worker at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_writes_nothing() {
    use sqlx::ConnectOptions;
    let db = TempDb::new("quiet");
    let tuning = SqliteTuning {
        heartbeat: Duration::from_secs(1),
        poll_fallback: Duration::from_millis(50),
        ..SqliteTuning::default()
    };
    let queue = Queue::open_sqlite_with(&db.0, tuning).await.unwrap();
    let q = "patchbay:quiet";
    let mut watch = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db.0)
        .connect()
        .await
        .unwrap();
    let rec = Recorder::default();
    let handler = rec.handler();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let workers = tokio::spawn({
        let queue = queue.clone();
        async move {
            queue
                .run_workers(
                    spec(q, 1),
                    handler,
                    async move {
                        let _ = stopped.await;
                    },
                    Duration::from_secs(5),
                )
                .await
        }
    });
    // Past start-up, which writes (registration, the first job's fetch and ack).
    queue.push(q, &env("first", "x"), None).await.unwrap();
    rec.wait_until(Duration::from_secs(10), "first", |r| r.total() == 1)
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let version = async |c: &mut sqlx::SqliteConnection| -> i64 {
        sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(c)
            .await
            .unwrap()
    };
    let before = version(&mut watch).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        version(&mut watch).await,
        before,
        "an idle worker wrote to the queue"
    );

    queue.push(q, &env("second", "x"), None).await.unwrap();
    rec.wait_until(Duration::from_secs(10), "second", |r| r.total() == 2)
        .await;
    stop.send(()).unwrap();
    workers.await.unwrap().unwrap();
}

/// Delayed jobs wait (apalis-sqlite stores run_at in whole seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_job_waits() {
    let db = TempDb::new("delay");
    let queue = Queue::open_sqlite(&db.0).await.unwrap();
    let q = "patchbay:delay";
    let t = Instant::now();
    queue
        .push(q, &env("later", "x"), Some(Duration::from_secs(2)))
        .await
        .unwrap();
    let rec = Recorder::default();
    let r = rec.clone();
    let handler = move |e: Envelope| {
        let r = r.clone();
        async move { r.record(&e.id) }
    };
    let w = rec.clone();
    queue
        .run_workers(
            spec(q, 1),
            handler,
            async move {
                w.wait_until(Duration::from_secs(10), "later", |r| r.total() == 1)
                    .await
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "ran too early: {waited:?}"
    );
    assert_eq!(rec.count("later"), 1);
}

/// The queue's index changes (`LEANER_INDEXES`) leave every query we and apalis run
/// per job or per heartbeat on an index: fetch, ack, orphan recovery, depth, purge.
/// The queries are apalis-sqlite 1.0's (`queries/`), with our depth and purge. Also
/// after a restart: apalis' setup then runs `PRAGMA optimize` on a table holding a job
/// or two, and with those statistics SQLite scanned all of Jobs per ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_queries_stay_on_indexes() {
    let db = TempDb::new("plans");
    let first = Queue::open_sqlite(&db.0).await.unwrap();
    first
        .push("patchbay:plans", &env("one", "x"), None)
        .await
        .unwrap();
    queries_use_indexes(first, "first start").await;
    // The second start: setup's `PRAGMA optimize` now has a table to analyze.
    let again = Queue::open_sqlite(&db.0).await.unwrap();
    queries_use_indexes(again, "restart").await;
}

async fn queries_use_indexes(queue: Queue, when: &str) {
    let Queue::Sqlite(sq) = queue else {
        unreachable!()
    };
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'Jobs'",
    )
    .fetch_all(sq.pool())
    .await
    .unwrap();
    assert!(indexes.iter().any(|i| i == "pb_jobs_locked"), "{indexes:?}");
    for gone in [
        "LIdx",
        "idx_jobs_status_run_at",
        "idx_jobs_claimable",
        "idx_jobs_running",
    ] {
        assert!(
            !indexes.iter().any(|i| i == gone),
            "{gone} is back: {indexes:?}"
        );
    }
    let queries = [
        (
            "fetch",
            "UPDATE Jobs SET status = 'Queued', lock_by = ?1, lock_at = strftime('%s', 'now') \
             WHERE ROWID IN (SELECT ROWID FROM Jobs WHERE job_type = ?2 AND status = 'Pending' \
             AND lock_by IS NULL AND (run_at IS NULL OR run_at <= ?4) \
             ORDER BY priority DESC, run_at ASC, id ASC LIMIT ?3) RETURNING *",
            "idx_jobs_pending",
        ),
        (
            "ack",
            "WITH j AS (SELECT value ->> 'task_id' AS task_id, value ->> 'status' AS status \
             FROM json_each(?1)) UPDATE Jobs SET status = j.status FROM j \
             WHERE Jobs.id = j.task_id AND Jobs.lock_by = ?2",
            "sqlite_autoindex_Jobs_1",
        ),
        (
            "orphans",
            "UPDATE Jobs SET status = 'Pending', lock_by = NULL WHERE id IN (SELECT Jobs.id \
             FROM Jobs INNER JOIN Workers ON lock_by = Workers.id \
             WHERE (status = \"Running\" OR status = \"Queued\") \
             AND strftime('%s', 'now') - Workers.last_seen >= ?1 AND Workers.worker_type = ?2 \
             AND (?3 IS NULL OR Workers.id != ?3) AND (?4 IS NULL OR Workers.id = ?4))",
            "pb_jobs_locked",
        ),
        (
            // `sqlite_worker::ANY_DUE`: the read before a fetch.
            "due",
            "SELECT EXISTS (SELECT 1 FROM Jobs WHERE job_type = ?1 \
             AND status = 'Pending' AND lock_by IS NULL AND (run_at IS NULL OR run_at <= ?2)) \
             OR EXISTS (SELECT 1 FROM Jobs WHERE job_type = ?1 AND status = 'Failed' \
             AND attempts < max_attempts AND (run_at IS NULL OR run_at <= ?2))",
            "idx_jobs_job_type_status_run_at",
        ),
        (
            // `sqlite_worker::ANY_LOCKED`: the read before a heartbeat.
            "locked",
            "SELECT EXISTS (SELECT 1 FROM Jobs \
             WHERE (status = 'Running' OR status = 'Queued') AND job_type = ?1)",
            "COVERING INDEX idx_jobs_job_type_status_run_at",
        ),
        (
            "depth",
            "SELECT COUNT(*) FROM Jobs WHERE job_type = ?1 \
             AND status IN ('Pending', 'Queued', 'Running', 'Failed') \
             AND (status <> 'Failed' OR attempts < max_attempts)",
            "idx_jobs_job_type_status_run_at",
        ),
        (
            "purge",
            "DELETE FROM Jobs WHERE rowid IN (SELECT rowid FROM Jobs \
             WHERE status IN ('Done', 'Failed', 'Killed') AND done_at IS NOT NULL \
             AND status = 'Done' AND done_at < ?1 LIMIT 2000)",
            "idx_jobs_completed_done_at",
        ),
    ];
    for (name, sql, index) in queries {
        let plan: Vec<String> = sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(
            format!("EXPLAIN QUERY PLAN {sql}"),
        ))
        .fetch_all(sq.pool())
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .into_iter()
        .map(|row| row.3)
        .collect();
        assert!(
            plan.iter().any(|l| l.contains(index)),
            "{when}: {name} does not use {index}: {plan:?}"
        );
        assert!(
            !plan.iter().any(|l| l.starts_with("SCAN Jobs")),
            "{when}: {name} scans the whole table: {plan:?}"
        );
    }
    sq.pool().close().await;
}

/// No job stops a worker on SQLite: rows written straight into apalis' `Jobs` table
/// that do not decode (too deep for serde_json, not JSON, cut short) are rejected
/// once each, and the jobs after them run (`poison_scenario`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_rows_are_rejected_and_the_worker_goes_on() {
    let db = TempDb::new("poison");
    let queue = Queue::open_sqlite(&db.0).await.unwrap();
    let Queue::Sqlite(sq) = &queue else {
        unreachable!()
    };
    let q = "patchbay:poison";
    let deep = crate::common::deep_envelope("deep-1", 200).into_bytes();
    let bad: [&[u8]; 3] = [&deep, b"not json \xff\xfe", br#"{"id":"#];
    for job in bad {
        // As apalis' sink.sql and our push_many write a job.
        sqlx::query(
            "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, \
             priority, metadata) VALUES (?1, ?2, ?3, 'Pending', 0, 25, 0, 0, '{}')",
        )
        .bind(job)
        .bind(ulid::Ulid::new().to_string())
        .bind(q)
        .execute(sq.pool())
        .await
        .unwrap();
    }
    crate::common::poison_scenario(queue.clone(), q).await;
}
