//! Durable background-job queue for patchbayd: one `Queue` handle over two
//! backends (SQLite through apalis-sqlite, or our own Redis Streams backend),
//! producing [`Envelope`]s and running them on apalis workers under one
//! apalis `Monitor`.
//!
//! Delivery is at least once on both backends: a job whose handler finished
//! but whose ack was lost (crash, connection drop) runs again, so handlers
//! must be idempotent (key on `Envelope::id`).
//!
//! No job can stop a worker: both backends hand the stored bytes to [`deliver`],
//! which decodes them itself; a job that cannot be decoded, or whose handler
//! panics, goes to [`Handler::reject`] (the daemon records it dead) and the
//! worker takes the next one. A worker that ends anyway is restarted, and
//! [`WorkerBoard`] says which are running and how often each restarted.
//!
//! An idle worker sleeps: this process's pushes wake their queue's worker at once
//! (`wake`), and polling is only a slow fallback for jobs that other processes pushed.

mod redis_stream;
mod sqlite;
mod sqlite_worker;
mod wake;

use std::{
    collections::BTreeMap,
    future::Future,
    panic::AssertUnwindSafe,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
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
    /// How long an idle worker waits before it looks for jobs that other processes
    /// pushed (this process's pushes wake it at once); `None`: the backend's tuning
    /// (`DEFAULT_POLL_FALLBACK` unless set). On Redis it is the longest XREADGROUP
    /// BLOCK, which any push (from any process) ends at once: it bounds how late
    /// another process's delayed jobs and abandoned entries are picked up.
    pub poll_fallback: Option<Duration>,
}

/// `queue.poll_fallback_ms`'s default.
pub const DEFAULT_POLL_FALLBACK: Duration = Duration::from_secs(5);

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
    pub async fn run_workers<H: Handler>(
        &self,
        specs: Vec<WorkerSpec>,
        handler: H,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) -> Result<(), QueueError> {
        let (started, _) = oneshot::channel();
        self.run_workers_reporting(
            specs,
            handler,
            shutdown,
            grace,
            started,
            WorkerBoard::default(),
        )
        .await
    }

    /// [`run_workers`](Self::run_workers), sending on `started` once every worker is
    /// up — SQLite: registered in apalis' `Workers` table; Redis: connected and its
    /// consumer group in place — so the caller can tell systemd READY=1 truthfully.
    /// `started` is dropped unsent if `run_workers` returns before that. `board`
    /// follows each worker: running or not, and its restarts.
    pub async fn run_workers_reporting<H: Handler>(
        &self,
        specs: Vec<WorkerSpec>,
        handler: H,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
        started: oneshot::Sender<()>,
        board: WorkerBoard,
    ) -> Result<(), QueueError> {
        for spec in &specs {
            if spec.concurrency == 0 || spec.queue.is_empty() {
                return Err(QueueError::Config(format!("bad worker spec {spec:?}")));
            }
        }
        let latch = StartLatch::new(specs.len(), started);
        let run = Run {
            latch,
            board,
            names: specs
                .iter()
                .map(|s| (unique_worker_name(&s.queue), s.queue.clone()))
                .collect(),
        };
        for spec in &specs {
            run.board.register(&spec.queue);
        }
        match self {
            Queue::Sqlite(q) => q.run_workers(specs, handler, shutdown, grace, run).await,
            Queue::Redis(q) => q.run_workers(specs, handler, shutdown, grace, run).await,
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

/// What the workers do with their jobs. Any `Fn(Envelope) -> Future` closure is one,
/// whose rejected jobs are only logged; the daemon's handler records them dead.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Runs one decoded job.
    fn run(&self, env: Envelope) -> impl Future<Output = ()> + Send + 'static;
    /// A job that cannot run: its stored form does not decode, or `run` panicked. The
    /// delivery is acked once this returns; retrying would fail the same way.
    fn reject(&self, job: Rejected) -> impl Future<Output = ()> + Send + 'static;
}

impl<F, Fut> Handler for F
where
    F: Fn(Envelope) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn run(&self, env: Envelope) -> impl Future<Output = ()> + Send + 'static {
        self(env)
    }

    fn reject(&self, job: Rejected) -> impl Future<Output = ()> + Send + 'static {
        tracing::error!(job_id = %job.id, queue = %job.queue, reason = %job.reason, "job rejected");
        std::future::ready(())
    }
}

/// Most bytes of a rejected job's stored form kept in [`Rejected::payload`].
pub const MAX_REJECTED_PAYLOAD: usize = 32 * 1024;

/// A job no handler can run, with what could be read of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// The worker's queue (`<namespace>:<kind>`).
    pub queue: String,
    /// The envelope's id when the stored job shows one, else a fresh ULID.
    pub id: String,
    /// The envelope's attempt, 0 when unreadable.
    pub attempt: u32,
    /// The envelope's payload when it decodes (then the job can be retried);
    /// otherwise `{"channel": <the payload's, if readable>, "undecodable": <the
    /// stored job's first MAX_REJECTED_PAYLOAD bytes, as text>, "bytes": <its size>,
    /// "note": ...}`.
    pub payload: serde_json::Value,
    /// Whether `payload` is the envelope's own.
    pub decodable: bool,
    pub reason: String,
}

impl Rejected {
    /// From the stored bytes of a job on `queue`.
    pub fn new(queue: &str, bytes: &[u8], reason: String) -> Self {
        /// Only the envelope's head: serde skips the payload with `IgnoredAny`, which
        /// serde_json walks without its recursion limit, so a too-deep payload still
        /// gives up its id.
        #[derive(Deserialize)]
        struct Head {
            id: Option<String>,
            attempt: Option<u32>,
        }
        /// The payload's channel, read apart (a payload that is no object fails only
        /// this), so a data deletion run still finds an inbound job's cut copy.
        #[derive(Deserialize)]
        struct Channel {
            payload: ChannelOf,
        }
        #[derive(Deserialize)]
        struct ChannelOf {
            channel: Option<i64>,
        }
        let head = serde_json::from_slice::<Head>(bytes).ok();
        let id = head
            .as_ref()
            .and_then(|h| h.id.clone())
            .filter(|id| !id.is_empty() && id.len() <= 128)
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
        let attempt = head.as_ref().and_then(|h| h.attempt).unwrap_or(0);
        let channel = serde_json::from_slice::<Channel>(bytes)
            .ok()
            .and_then(|c| c.payload.channel);
        // Whole, whatever its size: a job that panicked must stay retryable. The
        // journal bounds what it keeps (`model::bounded_payload`).
        let decoded = serde_json::from_slice::<Envelope>(bytes).ok();
        let (payload, decodable) = match decoded {
            Some(env) => (env.payload, true),
            None => {
                let cut = &bytes[..bytes.len().min(MAX_REJECTED_PAYLOAD)];
                let note = if cut.len() < bytes.len() {
                    format!("the stored job, cut to its first {} bytes", cut.len())
                } else {
                    "the stored job as it was".to_owned()
                };
                (
                    serde_json::json!({
                        "channel": channel,
                        "undecodable": String::from_utf8_lossy(cut),
                        "bytes": bytes.len(),
                        "note": note,
                    }),
                    false,
                )
            }
        };
        Rejected {
            queue: queue.to_owned(),
            id,
            attempt,
            payload,
            decodable,
            reason,
        }
    }
}

/// One delivery as both backends hand it over: decode, then run or reject. Never
/// fails and never panics, so the worker goes on with its next job either way.
pub(crate) async fn deliver<H: Handler>(handler: &H, queue: &str, bytes: &[u8]) {
    let env = match serde_json::from_slice::<Envelope>(bytes) {
        Ok(env) => env,
        Err(e) => {
            let job = Rejected::new(
                queue,
                bytes,
                format!("the queued job cannot be decoded: {e}"),
            );
            tracing::error!(job_id = %job.id, queue, error = %e, "undecodable job; rejecting it");
            return reject_guarded(handler, job).await;
        }
    };
    let id = env.id.clone();
    let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.run(env))) {
        Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
        Err(panic) => Err(panic),
    };
    if let Err(panic) = outcome {
        let msg = panic_message(panic.as_ref());
        drop(panic);
        tracing::error!(job_id = %id, queue, panic = %msg, "job handler panicked; rejecting the job");
        // Decoded once already: only the envelope is read again, on this rare path.
        let job = Rejected::new(queue, bytes, format!("handler panicked: {msg}"));
        reject_guarded(handler, job).await;
    }
}

async fn reject_guarded<H: Handler>(handler: &H, job: Rejected) {
    let id = job.id.clone();
    let outcome = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.reject(job))) {
        Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
        Err(panic) => Err(panic),
    };
    if let Err(panic) = outcome {
        let msg = panic_message(panic.as_ref());
        tracing::error!(job_id = %id, panic = %msg, "recording a rejected job panicked; it is dropped");
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// The state of each worker (by queue), shared with `status` and the health task.
#[derive(Clone, Default)]
pub struct WorkerBoard(Arc<Mutex<BTreeMap<String, WorkerState>>>);

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkerState {
    /// Taking jobs. False before it first started, and between a failure and its
    /// restart.
    pub running: bool,
    /// Times the worker ended with an error and was started again.
    pub restarts: u64,
    /// Why it last ended.
    pub last_error: Option<String>,
    /// Seconds since it last stopped running (while not running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_secs: Option<u64>,
    #[serde(skip)]
    down_since: Option<Instant>,
}

impl WorkerBoard {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, WorkerState>) -> R) -> R {
        // Every update is a whole-field write: a poisoned lock holds a sound map.
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn register(&self, queue: &str) {
        self.with(|m| {
            m.entry(queue.to_owned()).or_insert(WorkerState {
                running: false,
                restarts: 0,
                last_error: None,
                down_secs: None,
                down_since: Some(Instant::now()),
            });
        });
    }

    /// The worker of `queue` takes jobs (again).
    pub(super) fn up(&self, queue: &str) {
        self.with(|m| {
            if let Some(w) = m.get_mut(queue) {
                w.running = true;
                w.down_since = None;
            }
        });
    }

    /// The worker of `queue` ended with `error` and is being restarted.
    pub(super) fn failed(&self, queue: &str, error: String) {
        self.with(|m| {
            if let Some(w) = m.get_mut(queue) {
                w.running = false;
                w.restarts += 1;
                w.last_error = Some(error);
                w.down_since.get_or_insert_with(Instant::now);
            }
        });
    }

    /// Every worker by queue, as now.
    pub fn snapshot(&self) -> BTreeMap<String, WorkerState> {
        self.with(|m| {
            m.iter()
                .map(|(q, w)| {
                    let mut w = w.clone();
                    w.down_secs = w.down_since.map(|t| t.elapsed().as_secs());
                    (q.clone(), w)
                })
                .collect()
        })
    }
}

/// What one `run_workers` call shares with its backend: the start report, the board,
/// and each spec's worker name (in spec order) with its queue.
pub(super) struct Run {
    latch: StartLatch,
    pub(super) board: WorkerBoard,
    pub(super) names: Vec<(String, String)>,
}

impl Run {
    pub(super) fn token(&self) -> StartToken {
        self.latch.token()
    }

    /// A monitor whose workers are restarted whenever they end with an error, each
    /// restart counted on the board; `delay` is logged by the caller's restart policy.
    pub(super) fn monitor(&self, backend: &'static str) -> Monitor {
        let board = self.board.clone();
        let queues: std::collections::HashMap<String, String> =
            self.names.iter().cloned().collect();
        Monitor::new().should_restart(move |worker, err| {
            let queue = queues.get(worker.name()).map_or("?", String::as_str);
            tracing::warn!(worker = worker.name(), queue, error = %err, "{backend} worker failed; restarting it");
            board.failed(queue, err.to_string());
            true
        })
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

    /// The id is read past a payload nested 100,000 deep (no recursion limit, no stack
    /// overflow), and only a bounded copy of the stored job is kept.
    #[test]
    fn a_rejected_job_keeps_its_id_and_a_bounded_copy() {
        let levels = 100_000;
        let stored = format!(
            r#"{{"id":"j1","kind":"k","attempt":3,"payload":{}{}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        );
        let r = Rejected::new("ns:k", stored.as_bytes(), "too deep".into());
        assert_eq!((r.id.as_str(), r.attempt, r.decodable), ("j1", 3, false));
        let kept = r.payload["undecodable"].as_str().expect("raw copy");
        assert_eq!(kept.len(), MAX_REJECTED_PAYLOAD);
        assert_eq!(r.payload["bytes"], stored.len());

        let ok = serde_json::to_vec(&Envelope {
            id: "j2".into(),
            kind: "k".into(),
            payload: serde_json::json!({"a": 1}),
            attempt: 0,
        })
        .expect("json");
        let r = Rejected::new("ns:k", &ok, "handler panicked".into());
        assert!(r.decodable);
        assert_eq!(r.payload, serde_json::json!({"a": 1}));

        let r = Rejected::new("ns:k", b"\xff garbage", "no".into());
        assert_eq!(r.id.len(), 26, "a fresh ULID");

        // A deep inbound payload keeps its channel beside the cut copy.
        let deep = format!(
            r#"{{"id":"j3","kind":"k","attempt":1,"payload":{{"channel":7,"attachments":{}{}}}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        );
        let r = Rejected::new("ns:k", deep.as_bytes(), "too deep".into());
        assert_eq!((r.id.as_str(), r.decodable), ("j3", false));
        assert_eq!(r.payload["channel"], 7);
    }

    #[test]
    fn the_board_counts_restarts_and_says_what_is_down() {
        let board = WorkerBoard::default();
        board.register("q");
        assert!(
            !board.snapshot()["q"].running,
            "not running before it started"
        );
        board.up("q");
        assert!(board.snapshot()["q"].running);
        board.failed("q", "database is locked".into());
        let w = &board.snapshot()["q"];
        assert_eq!((w.running, w.restarts), (false, 1));
        assert_eq!(w.last_error.as_deref(), Some("database is locked"));
        assert!(w.down_secs.is_some());
        board.up("q");
        let w = &board.snapshot()["q"];
        assert_eq!((w.running, w.restarts, w.down_secs), (true, 1, None));
    }
}
