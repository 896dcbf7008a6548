//! Durable background-job queue for patchbayd: one `Queue` handle over two
//! backends (SQLite through apalis-sqlite, or our own Redis Streams backend),
//! producing [`Envelope`]s and running them on apalis workers under one
//! apalis `Monitor`.
//!
//! Delivery is at least once on both backends: a job whose handler finished
//! but whose ack was lost (crash, connection drop) runs again, so handlers
//! must be idempotent (key on `Envelope::id`).

mod redis_stream;
mod sqlite;

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis_core::monitor::{Monitor, MonitorError};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use redis_stream::{RedisQueue, RedisTuning};
pub use sqlite::{SqliteQueue, SqliteTuning};

/// One unit of work. `id` should be unique: it is the idempotency key handlers
/// use, and on Redis identical delayed envelopes collapse into one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub id: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub attempt: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] sqlx::Error),
    #[error("apalis-sqlite: {0}")]
    ApalisSqlite(#[from] apalis_sqlite::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("envelope encoding: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("push failed: {0}")]
    Push(String),
    #[error("worker monitor: {0}")]
    Monitor(#[from] MonitorError),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// One apalis worker: `queue` is the full queue name (e.g.
/// "patchbay:inbound_message"), `concurrency` the number of handlers it runs at once.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub queue: String,
    pub concurrency: usize,
    /// How often a polling backend (SQLite) looks for new jobs; `None`: the backend's
    /// default. Redis blocks on the stream instead and ignores it.
    pub poll_interval: Option<Duration>,
}

/// Clone-able producer handle + worker runner.
#[derive(Clone)]
pub enum Queue {
    Sqlite(SqliteQueue),
    Redis(RedisQueue),
}

impl Queue {
    /// SQLite file queue with default tuning (see [`SqliteTuning`]).
    pub async fn open_sqlite(path: &Path) -> Result<Self, QueueError> {
        Self::open_sqlite_with(path, SqliteTuning::default()).await
    }

    pub async fn open_sqlite_with(path: &Path, tuning: SqliteTuning) -> Result<Self, QueueError> {
        Ok(Queue::Sqlite(SqliteQueue::open(path, tuning).await?))
    }

    /// Redis Streams queue with default tuning (see [`RedisTuning`]). All keys
    /// live under `namespace`.
    pub async fn open_redis(url: &str, namespace: &str) -> Result<Self, QueueError> {
        Self::open_redis_with(url, namespace, RedisTuning::default()).await
    }

    pub async fn open_redis_with(
        url: &str,
        namespace: &str,
        tuning: RedisTuning,
    ) -> Result<Self, QueueError> {
        Ok(Queue::Redis(
            RedisQueue::open(url, namespace, tuning).await?,
        ))
    }

    /// Enqueue one job, runnable now or after `delay`.
    pub async fn push(
        &self,
        queue: &str,
        env: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), QueueError> {
        match self {
            Queue::Sqlite(q) => q.push(queue, env, delay).await,
            Queue::Redis(q) => q.push(queue, env, delay).await,
        }
    }

    /// Enqueue many jobs in one round trip / transaction (fan-outs).
    pub async fn push_many(&self, queue: &str, envs: &[Envelope]) -> Result<(), QueueError> {
        if envs.is_empty() {
            return Ok(());
        }
        match self {
            Queue::Sqlite(q) => q.push_many(queue, envs).await,
            Queue::Redis(q) => q.push_many(queue, envs).await,
        }
    }

    /// Whether every job the queue acknowledged survives a crash of the queue's server:
    /// always for the SQLite file; for Redis only with an append-only file synced on
    /// every write (`appendonly yes`, `appendfsync always` — RDB snapshots lose what
    /// came after the last one, `everysec` up to a second of pushes), or with
    /// `everysec` when the operator accepts that (`trust_everysec`,
    /// `queue.redis_trust_everysec`). A Redis whose `CONFIG` is disabled (managed
    /// services) counts as not persistent.
    pub async fn persists_jobs(&self, trust_everysec: bool) -> bool {
        match self {
            Queue::Sqlite(_) => true,
            Queue::Redis(q) => q.keeps_acknowledged(trust_everysec).await,
        }
    }

    /// Jobs not yet done: waiting, delayed, and in flight.
    pub async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        match self {
            Queue::Sqlite(q) => q.depth(queue).await,
            Queue::Redis(q) => q.depth(queue).await,
        }
    }

    /// Runs one apalis worker per spec under one apalis `Monitor` until
    /// `shutdown` resolves; then stops taking jobs, gives in-flight handlers up
    /// to `grace` to finish, hands fetched-but-unstarted jobs back to the
    /// queue, and returns. Handlers that outlive `grace` are dropped; their jobs
    /// are redelivered later (SQLite: orphan recovery, Redis: visibility timeout).
    pub async fn run_workers<H, Fut>(
        &self,
        specs: Vec<WorkerSpec>,
        handler: H,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) -> Result<(), QueueError>
    where
        H: Fn(Envelope) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (started, _) = oneshot::channel();
        self.run_workers_reporting(specs, handler, shutdown, grace, started)
            .await
    }

    /// [`run_workers`](Self::run_workers), sending on `started` once every worker is
    /// up — SQLite: registered in apalis' `Workers` table; Redis: connected and its
    /// consumer group in place — so the caller can tell systemd READY=1 truthfully.
    /// `started` is dropped unsent if `run_workers` returns before that.
    pub async fn run_workers_reporting<H, Fut>(
        &self,
        specs: Vec<WorkerSpec>,
        handler: H,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
        started: oneshot::Sender<()>,
    ) -> Result<(), QueueError>
    where
        H: Fn(Envelope) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        for spec in &specs {
            if spec.concurrency == 0 || spec.queue.is_empty() {
                return Err(QueueError::Config(format!("bad worker spec {spec:?}")));
            }
        }
        let latch = StartLatch::new(specs.len(), started);
        match self {
            Queue::Sqlite(q) => q.run_workers(specs, handler, shutdown, grace, latch).await,
            Queue::Redis(q) => q.run_workers(specs, handler, shutdown, grace, latch).await,
        }
    }
}

/// Counts workers not yet up; the last one to come up sends the start report.
#[derive(Clone)]
pub(super) struct StartLatch(Arc<LatchInner>);

struct LatchInner {
    waiting: AtomicUsize,
    report: Mutex<Option<oneshot::Sender<()>>>,
}

impl StartLatch {
    fn new(workers: usize, report: oneshot::Sender<()>) -> Self {
        let latch = StartLatch(Arc::new(LatchInner {
            waiting: AtomicUsize::new(workers),
            report: Mutex::new(Some(report)),
        }));
        if workers == 0 {
            latch.send();
        }
        latch
    }

    /// One per worker, shared by its restarts.
    pub(super) fn token(&self) -> StartToken {
        StartToken {
            latch: self.clone(),
            done: Arc::new(AtomicBool::new(false)),
        }
    }

    fn send(&self) {
        // Poisoning cannot leave an Option half-taken.
        let mut report = self.0.report.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = report.take() {
            // The receiver may be gone (the caller stopped waiting): nothing to tell.
            let _ = tx.send(());
        }
    }
}

/// A worker's "I am up"; only its first call counts, so a restarted worker (a fresh
/// backend built by the same factory) does not count twice.
#[derive(Clone)]
pub(super) struct StartToken {
    latch: StartLatch,
    done: Arc<AtomicBool>,
}

impl StartToken {
    pub(super) fn started(&self) {
        if !self.done.swap(true, Ordering::AcqRel)
            && self.latch.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1
        {
            self.latch.send();
        }
    }
}

/// Drives `monitor` until `shutdown`, then allows `grace` for in-flight work.
async fn run_monitor(
    monitor: Monitor,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), QueueError> {
    monitor
        // apalis starts this timer only after the signal fired, so it bounds
        // the drain phase, not the whole run.
        .shutdown_timeout(grace)
        .run_with_signal(async move {
            shutdown.await;
            Ok(())
        })
        .await?;
    Ok(())
}

/// Runs the user's handler so that a panic (while building or polling its
/// future) is logged and swallowed: the job then counts as done and the
/// worker keeps going. Retrying a panicking job would just panic again.
async fn run_guarded<H, Fut>(handler: &H, env: Envelope)
where
    H: Fn(Envelope) -> Fut,
    Fut: Future<Output = ()>,
{
    let id = env.id.clone();
    let kind = env.kind.clone();
    let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(env))) {
        Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
        Err(panic) => Err(panic),
    };
    if let Err(panic) = outcome {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".to_owned());
        tracing::error!(job_id = %id, kind = %kind, panic = %msg, "job handler panicked");
    }
}

/// Worker / consumer name, unique per process and per `run_workers` call:
/// apalis rejects a worker name seen alive within one heartbeat, and a shared
/// Redis consumer name would let two processes steal each other's pending jobs.
fn unique_worker_name(queue: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{}:{}:{}:{}", hostname(), std::process::id(), queue, seq)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_comes_once_every_worker_started_once() {
        let (tx, mut rx) = oneshot::channel();
        let latch = StartLatch::new(2, tx);
        let (a, b) = (latch.token(), latch.token());
        a.started();
        a.clone().started(); // a restart of the same worker
        assert!(rx.try_recv().is_err(), "one of two workers is up");
        b.started();
        assert!(rx.try_recv().is_ok());

        let (tx, mut rx) = oneshot::channel();
        let _latch = StartLatch::new(0, tx);
        assert!(rx.try_recv().is_ok(), "no workers: nothing to wait for");
    }
}
