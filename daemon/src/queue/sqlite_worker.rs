//! The worker side of the SQLite queue: an apalis backend that runs apalis-sqlite's own
//! queries (`apalis_sqlite::queries`, the same rows and statuses as `SqliteStorage`)
//! but sleeps while nothing is due and writes nothing while idle.
//!
//! apalis-sqlite's worker writes even when there is no work: every poll is its fetch
//! `UPDATE … RETURNING` in a write transaction, and every heartbeat (5 s) updates the
//! worker's `last_seen`. With nothing due the fetch changes no page (SQLite's
//! `data_version` stays put), but it still takes the file's write lock — which a push
//! from another daemon then waits for — and SQLite re-prepares the statement each time;
//! the heartbeat is a real write, one per worker every 5 s. Here:
//! * a fetch first asks, with a read, whether any job is due, and skips the `UPDATE`
//!   when none is (not after a fetch that found jobs: then more are likely);
//! * the heartbeat's write (and its orphan recovery) only runs while some job of the
//!   queue is fetched and unfinished — this worker's, or a dead one's to take over. An
//!   idle worker's `last_seen` goes stale, which is safe: it holds no job that orphan
//!   recovery could take from it, and a fetch after such a pause refreshes `last_seen`
//!   in its own transaction before it claims jobs;
//! * the worker is woken by its queue's in-process notifier (`wake::Wakers`, signalled
//!   next to every push) and otherwise only by the slow fallback timer, for jobs that
//!   other processes pushed;
//! * a fetch that found less than a full batch lets the next one start no sooner than
//!   [`SHORT_FETCH_GAP`] after it (one asked for sooner answers empty at once, and the
//!   worker is woken when the gap ends): woken by every push, a worker at a moderate
//!   rate would otherwise claim a job or two per write transaction. A full batch (a
//!   backlog) or a worker idle for longer is fetched at once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use apalis_core::{
    backend::{
        Backend, BackendConfig, WorkerFilter,
        finalize::Ephemeral,
        persistence::{Persisted, Persistence, TaskEvent, TaskPersistLayer},
    },
    task::Task,
    worker::context::WorkerContext,
};
use apalis_sqlite::{
    Config, Error, JsonCodec, SqlitePool, SqliteStorage,
    queries::{
        ack_tasks, fetch_next, keep_alive, lock_tasks, push_tasks, reenqueue_abandoned,
        reenqueue_orphaned, register_worker,
    },
};
use serde_json::Value;
use tokio::sync::Notify;

use super::wake::WakeSource;

/// Whether a fetch would claim anything: the two branches of apalis-sqlite's
/// `fetch_next.sql`, each a seek in the (job_type, status, run_at) index that stops at
/// the first due job (`tests/queue/sqlite.rs` checks the plan).
const ANY_DUE: &str = "SELECT EXISTS (SELECT 1 FROM Jobs WHERE job_type = ?1 \
     AND status = 'Pending' AND lock_by IS NULL AND (run_at IS NULL OR run_at <= ?2)) \
     OR EXISTS (SELECT 1 FROM Jobs WHERE job_type = ?1 AND status = 'Failed' \
     AND attempts < max_attempts AND (run_at IS NULL OR run_at <= ?2))";

/// Whether some job of the queue is fetched and unfinished (ours or a dead worker's):
/// only then does the heartbeat have something to keep alive or to take over. A seek in
/// the (job_type, status, …) index, which covers it.
const ANY_LOCKED: &str = "SELECT EXISTS (SELECT 1 FROM Jobs \
     WHERE (status = 'Running' OR status = 'Queued') AND job_type = ?1)";

/// The least time between a fetch that found less than a full batch and the next: at
/// most this much latency at moderate rates, for batches of what arrived meanwhile.
pub(super) const SHORT_FETCH_GAP: std::time::Duration = std::time::Duration::from_millis(20);

/// apalis-sqlite's persistence with the idle rules above.
#[derive(Clone)]
struct QuietPersistence {
    pool: SqlitePool,
    config: Config,
    /// Signalled after every write, for the checkpoint task (`SqliteQueue::checkpoints`).
    written: Arc<Notify>,
    /// The last fetch claimed jobs: the next one skips the read.
    busy: Arc<AtomicBool>,
    /// Unix seconds of our last `last_seen` write (registration, heartbeat, or a fetch
    /// after an idle stretch).
    alive_at: Arc<AtomicU64>,
    /// No fetch before this (set by a fetch that found less than a full batch).
    next_fetch: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// The worker's wake-up notifier, signalled when that gap ends, and whether such a
    /// signal is already on its way.
    wake: Arc<Notify>,
    wake_armed: Arc<AtomicBool>,
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl QuietPersistence {
    async fn exists(&self, query: &'static str, now: Option<i64>) -> Result<bool, Error> {
        let mut q = sqlx::query_scalar::<_, bool>(query).bind(self.config.queue.as_ref());
        if let Some(now) = now {
            q = q.bind(now);
        }
        Ok(q.fetch_one(&self.pool).await?)
    }

    fn stale(&self) -> bool {
        unix_secs().saturating_sub(self.alive_at.load(Ordering::Relaxed))
            >= self.config.heartbeat_interval.as_secs()
    }

    fn alive(&self) {
        self.alive_at.store(unix_secs(), Ordering::Relaxed);
    }

    /// One fetch: a read first unless the last fetch found jobs, then apalis-sqlite's
    /// claim (with a `last_seen` refresh after an idle stretch).
    async fn fetch_now(&self, worker: &WorkerContext) -> Result<Vec<Task<Vec<u8>>>, Error> {
        let now = i64::try_from(unix_secs()).unwrap_or(i64::MAX);
        if !self.busy.load(Ordering::Relaxed) && !self.exists(ANY_DUE, Some(now)).await? {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let stale = self.stale();
        if stale {
            // After an idle stretch: another daemon's orphan recovery must not take
            // the jobs this transaction claims.
            keep_alive(&mut *tx, &self.config, worker).await?;
        }
        let tasks = fetch_next(&mut *tx, &self.config, worker).await?;
        tx.commit().await?;
        if stale {
            self.alive();
        }
        self.busy.store(!tasks.is_empty(), Ordering::Relaxed);
        if stale || !tasks.is_empty() {
            self.written.notify_one();
        }
        Ok(tasks)
    }
}

impl Persistence for QuietPersistence {
    type Compact = Vec<u8>;
    type Error = Error;
    type Response = Value;

    /// As apalis-sqlite: takes back what an earlier worker of this name left, and
    /// registers (fails while a worker of this name was seen within a heartbeat).
    async fn register(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        let dead_for = self.config.heartbeat_interval.as_secs() as i64;
        let mut tx = self.pool.begin().await?;
        reenqueue_orphaned(
            &mut *tx,
            dead_for,
            self.config.queue.as_ref(),
            &WorkerFilter::Only(worker.name().to_owned()),
        )
        .await?;
        register_worker(&mut *tx, &self.config, worker, "SqliteStorage").await?;
        tx.commit().await?;
        self.alive();
        self.written.notify_one();
        Ok(())
    }

    async fn heartbeat(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        if !self.exists(ANY_LOCKED, None).await? {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        keep_alive(&mut *tx, &self.config, worker).await?;
        let count = reenqueue_orphaned(
            &mut *tx,
            self.config.orphaned_duration().as_secs() as i64,
            self.config.queue.as_ref(),
            &WorkerFilter::AllExcept(worker.name().to_owned()),
        )
        .await?;
        tx.commit().await?;
        self.alive();
        self.written.notify_one();
        if count > 0 {
            tracing::info!(count, queue = %self.config.queue, "re-queued jobs of a worker that stopped beating");
            // They are `Pending` now: the fetch after this heartbeat must look.
            self.busy.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn fetch_next(&mut self, worker: &WorkerContext) -> Result<Vec<Task<Vec<u8>>>, Error> {
        let not_before = *self.next_fetch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = not_before
            && tokio::time::Instant::now() < t
        {
            // Not now: answer empty at once (a fetch that waited here would hold back
            // the acks queued behind it) and wake the worker when the gap ends.
            if !self.wake_armed.swap(true, Ordering::AcqRel) {
                let (wake, armed) = (self.wake.clone(), self.wake_armed.clone());
                tokio::spawn(async move {
                    tokio::time::sleep_until(t).await;
                    armed.store(false, Ordering::Release);
                    wake.notify_one();
                });
            }
            return Ok(Vec::new());
        }
        let tasks = self.fetch_now(worker).await?;
        let short = tasks.len() < self.config.batch_size;
        *self.next_fetch.lock().unwrap_or_else(|p| p.into_inner()) =
            short.then(|| tokio::time::Instant::now() + SHORT_FETCH_GAP);
        Ok(tasks)
    }

    async fn reenqueue_abandoned(
        &mut self,
        tasks: Vec<Task<Vec<u8>>>,
        worker: &WorkerContext,
    ) -> Result<u64, Error> {
        let ids = tasks
            .iter()
            .filter_map(|t| t.task_id().map(ToString::to_string))
            .collect();
        let mut tx = self.pool.begin().await?;
        let count =
            reenqueue_abandoned(&mut *tx, self.config.queue.as_ref(), worker.name(), &ids).await?;
        if count as usize != tasks.len() {
            return Err(Error::ReenqueueMismatch {
                queued: tasks.len(),
                abandoned: count as usize,
            });
        }
        tx.commit().await?;
        self.written.notify_one();
        Ok(count)
    }

    /// Acks (and locks, unused with `lock_tasks(false)`), as apalis-sqlite.
    async fn handle_events(
        &mut self,
        events: Vec<TaskEvent<Value>>,
        worker: &WorkerContext,
    ) -> Result<(), Error> {
        let mut locks = Vec::new();
        let mut acks = Vec::new();
        for event in &events {
            match event {
                TaskEvent::Lock { task_id } => locks.push(task_id.to_string()),
                TaskEvent::Complete(result) => acks.push(result),
                _ => {}
            }
        }
        if locks.is_empty() && acks.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        if !locks.is_empty() {
            lock_tasks(&mut *tx, &locks, worker.name()).await?;
        }
        if !acks.is_empty() {
            ack_tasks(&mut *tx, &acks, worker.name()).await?;
        }
        tx.commit().await?;
        self.written.notify_one();
        Ok(())
    }

    /// Not used: producers push through `SqliteQueue`.
    async fn push_tasks(&mut self, tasks: Vec<Task<Vec<u8>>>) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        push_tasks(&mut *tx, self.config.queue.as_ref(), &tasks).await?;
        tx.commit().await?;
        self.written.notify_one();
        Ok(())
    }
}

/// One worker's backend: the jobs' stored bytes, fetched by [`QuietPersistence`].
pub(super) struct SqliteWorker {
    persisted: Persisted<QuietPersistence>,
    wake: WakeSource,
}

impl SqliteWorker {
    pub(super) fn new(
        pool: &SqlitePool,
        config: Config,
        written: Arc<Notify>,
        wake: WakeSource,
    ) -> Self {
        let notify = wake.notifier();
        SqliteWorker {
            persisted: Persisted::new(QuietPersistence {
                pool: pool.clone(),
                config,
                written,
                // The first fetch looks without asking: what waited before we started.
                busy: Arc::new(AtomicBool::new(true)),
                alive_at: Arc::new(AtomicU64::new(0)),
                next_fetch: Arc::default(),
                wake: notify,
                wake_armed: Arc::new(AtomicBool::new(false)),
            }),
            wake,
        }
    }
}

impl Backend for SqliteWorker {
    type Task = Task<Vec<u8>>;
    type Error = Error;

    /// Registers, beats and flushes acks (apalis' `Persisted`).
    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        let heartbeat = self.persisted.config.heartbeat_interval;
        self.persisted.poll_ready(cx, worker, heartbeat)
    }

    /// Every poll of the worker may fetch (`Persisted` starts one whenever its buffer
    /// is empty); the wake source only decides when the worker is polled again.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Error>>> {
        self.wake.poll_woken(cx);
        self.persisted.poll_next(cx, worker)
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        self.persisted.poll_close(cx, worker)
    }
}

impl BackendConfig for SqliteWorker {
    type Args = Vec<u8>;
    type Id = <SqliteStorage<()> as BackendConfig>::Id;
    /// The handler takes the stored bytes as they are (`queue::deliver` decodes them):
    /// no codec step between.
    type Kind = Ephemeral;
    type Config = Config;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &Config {
        &self.persisted.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        let (batch, persist, lock) = (
            self.persisted.config.batch_size,
            self.persisted.config.persist_results,
            self.persisted.config.lock_tasks,
        );
        self.persisted
            .layer(JsonCodec::default(), batch)
            .persist_results(persist)
            .lock_tasks(lock)
    }
}
