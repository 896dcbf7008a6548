//! SQLite backend: apalis-sqlite's `SqliteStorage` on one database file,
//! with our own connection settings (WAL + durable `synchronous`), tuning
//! (batching, polling, heartbeats), worker wiring, retention of completed
//! jobs, and a fix for apalis' O(processed-jobs) ack query. Workers run on
//! [`SqliteWorker`](super::sqlite_worker) (apalis-sqlite's queries, quiet while idle),
//! woken by this handle's pushes; they read each job's stored bytes, which
//! `queue::deliver` decodes: a job apalis' JSON codec refused ended the worker, whose
//! restart fetched the same job again, forever.

use std::{future::Future, path::Path, sync::Arc, time::Duration};

use apalis_core::{
    backend::{TaskSink, ext::BackendExt},
    error::BoxDynError,
    task::builder::TaskBuilder,
    worker::builder::WorkerBuilder,
};
use apalis_sqlite::{Config, SqlitePool, SqliteStorage};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::Notify;
use tower::limit::ConcurrencyLimitLayer;

use super::sqlite_worker::SqliteWorker;
use super::wake::{WakeSource, Wakers};
use super::{Envelope, Handler, QueueError, Run, WorkerSpec, deliver, run_monitor};

/// Index changes after apalis' `setup()`. apalis-sqlite 1.0 keeps nine indexes on
/// `Jobs`, and each job changes status twice (fetched, acked), rewriting its entry in
/// every index that holds the status. Our workers run with `lock_tasks(false)`, so
/// apalis' `lock.sql` never runs and no job is ever `Running`: `idx_jobs_claimable`
/// (lock.sql's) and `idx_jobs_running` are dead weight. `idx_jobs_status_run_at` serves
/// only orphan recovery (jobs `Queued`/`Running` by a dead worker, every heartbeat), which
/// a partial index over those two statuses serves with two writes per job instead of
/// six (written with `OR`: SQLite's planner did not match the `IN` form to the query).
/// Fetch uses `idx_jobs_pending`, ack the id, `depth` the (job_type, status) index, the
/// purge `idx_jobs_completed_done_at` (`tests/queue/sqlite.rs` checks the plans). A
/// push, fetch and ack cycle of 60,000 jobs ran ~20 % faster this way.
const LEANER_INDEXES: [&str; 4] = [
    "CREATE INDEX IF NOT EXISTS pb_jobs_locked ON Jobs (status) \
     WHERE status = 'Running' OR status = 'Queued'",
    "DROP INDEX IF EXISTS idx_jobs_status_run_at",
    "DROP INDEX IF EXISTS idx_jobs_claimable",
    "DROP INDEX IF EXISTS idx_jobs_running",
];

/// Knobs for the SQLite backend. Defaults aim at throughput with crash
/// recovery in ~10-15 s.
#[derive(Clone, Debug)]
pub struct SqliteTuning {
    /// Jobs claimed per fetch query (apalis default 10 is ~3x slower).
    pub batch_size: usize,
    /// How often an idle worker looks for jobs pushed by other processes (this
    /// handle's pushes wake it at once); `queue.poll_fallback_ms`.
    pub poll_fallback: Duration,
    /// Worker heartbeat; a dead worker's jobs are re-queued by a live worker
    /// of the same queue once `heartbeat * missed_heartbeats` passed.
    pub heartbeat: Duration,
    pub missed_heartbeats: usize,
    /// NORMAL (WAL: survives process crash / kill -9, may lose the last
    /// commits on power loss) or FULL. OFF is rejected.
    pub synchronous: SqliteSynchronous,
    /// One by default: every queue operation writes (fetch, ack, push), and several
    /// connections only race for SQLite's write lock, whose busy handler then sleeps
    /// 1-100 ms per retry; one connection queues them in order instead (measured: the
    /// billing bench's charge phase went from 26.9 s to 21.4 s).
    pub max_connections: u32,
    pub busy_timeout: Duration,
    /// Completed jobs are kept (apalis persists results) and deleted by
    /// `run_workers` once older than this. `None` keeps them forever.
    pub retain_done: Option<Duration>,
}

impl Default for SqliteTuning {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_fallback: super::DEFAULT_POLL_FALLBACK,
            heartbeat: Duration::from_secs(5),
            missed_heartbeats: 2,
            synchronous: SqliteSynchronous::Normal,
            max_connections: 1,
            busy_timeout: Duration::from_secs(15),
            retain_done: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

#[derive(Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    /// Only for `PRAGMA wal_checkpoint` (see `open`).
    checkpointer: SqlitePool,
    tuning: SqliteTuning,
    /// Each queue's worker, woken by our pushes.
    wakers: Wakers,
    /// Signalled after each write to the file: the checkpoint task sleeps until then.
    written: Arc<Notify>,
}

impl SqliteQueue {
    pub(super) async fn open(path: &Path, tuning: SqliteTuning) -> Result<Self, QueueError> {
        if matches!(tuning.synchronous, SqliteSynchronous::Off) {
            return Err(QueueError::Config("synchronous=OFF is not durable".into()));
        }
        if tuning.batch_size == 0 || tuning.heartbeat.as_secs() == 0 {
            // apalis panics on batch 0 and compares heartbeats in whole seconds.
            return Err(QueueError::Config(
                "batch_size and heartbeat (>= 1s) must be > 0".into(),
            ));
        }
        let base = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .busy_timeout(tuning.busy_timeout)
            // Reads through a memory map and a larger page cache than SQLite's 2 MB:
            // fetches and acks otherwise spend their time in pread().
            .pragma("mmap_size", "268435456")
            .pragma("cache_size", "-16384")
            // A fetch returns up to `batch_size` rows; sqlx hands them over 50 at a time
            // by default, each hand-off a thread wake-up on both sides.
            .row_buffer_size(patchbay_store_sqlite::ROW_BUFFER);

        // apalis' setup() runs `PRAGMA synchronous = OFF` on whichever pooled
        // connection it gets, and that sticks for the connection's lifetime.
        // Run it on a throwaway one-connection pool so no OFF connection ever
        // serves our traffic.
        let setup_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(base.clone())
            .await?;
        let setup = async {
            SqliteStorage::setup(&setup_pool).await?;
            // apalis' ack query joins a json batch against `Jobs.lock_by = worker`;
            // with index LIdx the planner walks every row this worker ever
            // locked (Done rows keep lock_by) per batch: O(processed) per ack,
            // 20k jobs drained at ~200/s. Without it the join goes through the
            // id index. Orphan recovery uses the status indexes instead.
            sqlx::query("DROP INDEX IF EXISTS LIdx")
                .execute(&setup_pool)
                .await?;
            for stmt in LEANER_INDEXES {
                sqlx::query(stmt).execute(&setup_pool).await?;
            }
            // setup() ends in `PRAGMA optimize`, which from the second start on
            // ANALYZEs the tables as they are then, often near empty; with those
            // statistics SQLite plans the ack (a json batch joined to Jobs by id) as a
            // scan of all of Jobs per batch, and a restarted daemon acked ~400 inbound
            // jobs/s instead of ~14,000 (the density bench). Without statistics the
            // planner keeps the index plans `tests/queue/sqlite.rs` checks.
            for stmt in [
                "DROP TABLE IF EXISTS sqlite_stat1",
                "DROP TABLE IF EXISTS sqlite_stat4",
            ] {
                sqlx::query(stmt).execute(&setup_pool).await?;
            }
            Ok::<(), QueueError>(())
        }
        .await;
        setup_pool.close().await;
        setup?;

        // Connect options are applied on every new pooled connection.
        let opts = base
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(tuning.synchronous);
        // Checkpoints run on a connection of their own (`checkpoints`): a checkpoint
        // ends in an fsync, which takes seconds while the store writes heavily (a data
        // deletion run), and on the working connection it would stop every fetch, ack
        // and push for that long. The limit is a backstop (40 MB of WAL).
        let pool = SqlitePoolOptions::new()
            .max_connections(tuning.max_connections)
            .connect_with(opts.clone().pragma("wal_autocheckpoint", "10000"))
            .await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        Ok(Self {
            pool,
            checkpointer,
            tuning,
            wakers: Wakers::default(),
            written: Arc::new(Notify::new()),
        })
    }

    /// The working pool (for diagnostics/tests, e.g. checking PRAGMAs).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn config(&self, queue: &str) -> Config {
        Config::default()
            .queue(queue)
            .batch_size(self.tuning.batch_size)
            .heartbeat_interval(self.tuning.heartbeat)
            .missed_heartbeats(self.tuning.missed_heartbeats)
            // Locking costs one more UPDATE per batch that scans every
            // claimable row; unlocked jobs stay 'Queued' while running, which
            // orphan recovery and depth() handle the same way.
            .lock_tasks(false)
    }

    /// Deletes Done jobs older than `retain_done`, in small batches so the
    /// write lock is never held long. (apalis' `vacuum_before` compares the
    /// integer run_at with a text datetime and so deletes every finished job,
    /// then runs a full VACUUM.)
    async fn purge_done(&self, older_than: Duration) -> Result<u64, QueueError> {
        let cutoff = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(older_than.as_secs()))
            .unwrap_or(0) as i64;
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM Jobs WHERE rowid IN (SELECT rowid FROM Jobs \
                 WHERE status IN ('Done', 'Failed', 'Killed') AND done_at IS NOT NULL \
                 AND status = 'Done' AND done_at < ?1 LIMIT 2000)",
            )
            .bind(cutoff)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += n;
            if n > 0 {
                self.written.notify_one();
            }
            if n < 2000 {
                return Ok(total);
            }
        }
    }

    async fn housekeeping(&self) {
        tokio::join!(self.purge_loop(), self.checkpoints());
    }

    /// Copies the WAL into the database file at most four times a second while the
    /// queue is written, off the working connection, as far as readers allow (PASSIVE:
    /// it waits for nobody); an idle queue is not touched.
    async fn checkpoints(&self) {
        loop {
            self.written.notified().await;
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&self.checkpointer)
                .await
            {
                tracing::warn!(error = %e, "cannot checkpoint the queue");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn purge_loop(&self) {
        let Some(retain) = self.tuning.retain_done else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(300));
        loop {
            tick.tick().await;
            if let Err(e) = self.purge_done(retain).await {
                tracing::warn!(error = %e, "purging completed jobs failed");
            }
        }
    }

    /// For pushes: apalis encodes the envelope's JSON value as the job's bytes.
    fn storage(&self, queue: &str) -> SqliteStorage<Value> {
        SqliteStorage::new(&self.pool).with_config(self.config(queue))
    }

    pub(super) async fn push(
        &self,
        queue: &str,
        env: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), QueueError> {
        let mut builder = TaskBuilder::new(serde_json::to_value(env)?);
        if let Some(d) = delay {
            builder = builder.run_after(d); // whole seconds in apalis-sqlite
        }
        self.storage(queue)
            .push_task(builder.build())
            .await
            .map_err(|e| QueueError::Push(e.to_string()))?;
        self.written.notify_one();
        match delay {
            // apalis-sqlite stores the due time rounded down to the second, so the job
            // is due by then; the slack covers the timer's and the wall clock's drift.
            Some(d) if !d.is_zero() => self.wakers.wake_after(queue, d, Duration::from_millis(10)),
            _ => self.wakers.wake(queue),
        }
        Ok(())
    }

    /// Many jobs in one INSERT. apalis' own `push_all` runs one statement per job
    /// (`sink.rs`), which made a 100,000-account billing fan-out spend ~9 s here; this
    /// writes the same rows as its `queries/task/sink.sql` (apalis-sqlite 1.0 schema:
    /// the JSON-encoded args as the `job` blob, a fresh ULID task id, `Pending`, no
    /// attempts, run now, priority 0, empty metadata), and apalis' workers fetch them
    /// like any other (tests/queue: the bulk scenarios run through this).
    pub(super) async fn push_many(&self, queue: &str, envs: &[Envelope]) -> Result<(), QueueError> {
        let rows = envs
            .iter()
            .map(|e| {
                Ok(serde_json::json!([
                    ulid::Ulid::new().to_string(),
                    serde_json::to_string(e)?
                ]))
            })
            .collect::<Result<Vec<_>, serde_json::Error>>()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        sqlx::query(
            "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, \
             priority, metadata) \
             SELECT CAST(value ->> 1 AS BLOB), value ->> 0, ?2, 'Pending', 0, 25, ?3, 0, '{}' \
             FROM json_each(?1)",
        )
        .bind(serde_json::Value::from(rows).to_string())
        .bind(queue)
        .bind(i64::try_from(now).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        self.written.notify_one();
        self.wakers.wake(queue);
        Ok(())
    }

    pub(super) async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        // `status IN` lets SQLite walk only these statuses in the (job_type, status,
        // run_at) index; `job_type = ?` alone made it visit every job the queue kept,
        // finished ones included, on each call (the inbound backpressure check runs
        // this per batch).
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM Jobs WHERE job_type = ?1 \
             AND status IN ('Pending', 'Queued', 'Running', 'Failed') \
             AND (status <> 'Failed' OR attempts < max_attempts)",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) async fn run_workers<H: Handler>(
        &self,
        specs: Vec<WorkerSpec>,
        handler: H,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
        run: Run,
    ) -> Result<(), QueueError> {
        // A backend error (e.g. "database is locked" during a heartbeat) ends an
        // apalis worker; restart it after more than one heartbeat, because apalis
        // refuses to re-register a name it saw alive within one heartbeat.
        let restart_delay = self.tuning.heartbeat + Duration::from_secs(1);
        let mut monitor = run.monitor("sqlite");
        for (spec, (name, _)) in specs.into_iter().zip(run.names.iter().cloned()) {
            let this = self.clone();
            let handler = handler.clone();
            let started = run.token();
            let board = run.board.clone();
            monitor = monitor.register(move |restarts| {
                let handler = handler.clone();
                let started = started.clone();
                let board = board.clone();
                let queue = spec.queue.clone();
                let wake = WakeSource::new(
                    this.wakers.get(&spec.queue),
                    spec.poll_fallback.unwrap_or(this.tuning.poll_fallback),
                );
                let backend = SqliteWorker::new(
                    &this.pool,
                    this.config(&spec.queue),
                    this.written.clone(),
                    wake,
                )
                .before_start(move |_| async move {
                    if restarts > 0 {
                        tokio::time::sleep(restart_delay).await;
                    }
                    Ok::<(), apalis_sqlite::Error>(())
                })
                // The first poll_ready registers the worker in `Workers`.
                .after_start(move |_| {
                    started.started();
                    board.up(&queue);
                    async { Ok::<(), apalis_sqlite::Error>(()) }
                });
                let queue = spec.queue.clone();
                WorkerBuilder::new(name.as_str())
                    .backend(backend)
                    .layer(ConcurrencyLimitLayer::new(spec.concurrency))
                    .build(move |bytes: Vec<u8>| {
                        let handler = handler.clone();
                        let queue = queue.clone();
                        async move {
                            deliver(&handler, &queue, &bytes).await;
                            Ok::<(), BoxDynError>(())
                        }
                    })
            });
        }
        tokio::select! {
            res = run_monitor(monitor, shutdown, grace) => res,
            () = self.housekeeping() => Ok(()),
        }
    }
}
