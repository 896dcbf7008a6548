//! Shared test helpers: throwaway redis-server, temp SQLite paths, a
//! recording handler, and scenarios run against both backends.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use patchbay_daemon::queue::{Envelope, Handler, Queue, Rejected, WorkerSpec};
use tokio::sync::Notify;

pub fn env(id: impl Into<String>, kind: &str) -> Envelope {
    Envelope {
        id: id.into(),
        kind: kind.into(),
        payload: serde_json::json!({}),
        attempt: 0,
    }
}

/// Our own redis-server on a unix socket; killed (by its pid) on drop.
pub struct TestRedis {
    child: Child,
    socket: PathBuf,
    pub url: String,
    /// The server's working folder (where an append-only file goes).
    _dir: tempfile::TempDir,
}

impl TestRedis {
    pub async fn start(name: &str) -> TestRedis {
        TestRedis::start_persistent(name, false).await
    }

    /// With `aof`, the server keeps an append-only file in a folder of its own.
    pub async fn start_persistent(name: &str, aof: bool) -> TestRedis {
        TestRedis::start_args(name, &["--appendonly", if aof { "yes" } else { "no" }]).await
    }

    /// With these server arguments (e.g. `--appendfsync always`).
    pub async fn start_args(name: &str, args: &[&str]) -> TestRedis {
        let socket = std::env::temp_dir().join(format!("pbq-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", ""])
            .args(args)
            .arg("--dir")
            .arg(dir.path())
            .arg("--unixsocket")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let url = format!("redis+unix://{}", socket.display());
        TestRedis {
            child,
            socket,
            url,
            _dir: dir,
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Fresh SQLite path (removed with its WAL files on drop).
pub struct TempDb(pub PathBuf);

impl TempDb {
    pub fn new(name: &str) -> TempDb {
        let p = std::env::temp_dir().join(format!("pbq-{name}-{}.db", std::process::id()));
        let db = TempDb(p);
        db.cleanup();
        db
    }
    fn cleanup(&self) {
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", self.0.display()));
        }
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Records every handled job id (with how often it ran) and wakes waiters.
#[derive(Clone, Default)]
pub struct Recorder {
    pub seen: Arc<Mutex<HashMap<String, usize>>>,
    pub changed: Arc<Notify>,
}

impl Recorder {
    pub fn record(&self, id: &str) {
        *self.seen.lock().unwrap().entry(id.to_owned()).or_default() += 1;
        self.changed.notify_waiters();
    }
    /// A handler that records each job it runs.
    pub fn handler(&self) -> impl Handler {
        let r = self.clone();
        move |e: Envelope| {
            let r = r.clone();
            async move { r.record(&e.id) }
        }
    }
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    pub fn total(&self) -> usize {
        self.seen.lock().unwrap().values().sum()
    }
    pub fn count(&self, id: &str) -> usize {
        self.seen.lock().unwrap().get(id).copied().unwrap_or(0)
    }
    /// Waits until `pred` holds, or panics after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Recorder) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if pred(self) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what} (distinct={}, total={})",
                self.distinct(),
                self.total()
            );
            let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), notified).await;
        }
    }
}

pub fn spec(queue: &str, concurrency: usize) -> Vec<WorkerSpec> {
    vec![WorkerSpec {
        queue: queue.into(),
        concurrency,
        poll_fallback: None,
    }]
}

/// (b) A handler still running when shutdown is requested finishes within
/// the grace period; jobs not yet taken stay queued and run on the next
/// `run_workers`. Also: a panicking handler does not kill the worker (a closure
/// handler only logs the rejected job).
pub async fn graceful_shutdown_scenario(queue: Queue) {
    let q = "patchbay:graceful";
    // Two slow jobs occupy both slots; the rest must wait.
    queue.push(q, &env("slow-1", "slow"), None).await.unwrap();
    queue.push(q, &env("slow-2", "slow"), None).await.unwrap();
    let rest: Vec<_> = (0..10).map(|i| env(format!("later-{i}"), "fast")).collect();
    queue.push_many(q, &rest).await.unwrap();
    assert_eq!(queue.depth(q).await.unwrap(), 12);

    let rec = Recorder::default();
    let started = Arc::new(Mutex::new(0usize));
    let both_started = Arc::new(Notify::new());
    let (r, s, b) = (rec.clone(), started.clone(), both_started.clone());
    let handler = move |e: Envelope| {
        let (r, s, b) = (r.clone(), s.clone(), b.clone());
        async move {
            if e.kind == "slow" {
                let n = {
                    let mut g = s.lock().unwrap();
                    *g += 1;
                    *g
                };
                if n == 2 {
                    b.notify_one();
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            r.record(&e.id);
        }
    };
    let t = Instant::now();
    let signal = both_started.clone();
    queue
        .run_workers(
            spec(q, 2),
            handler.clone(),
            async move { signal.notified().await },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // Returned only after the running handlers completed (not cut off).
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "returned too early: {:?}",
        t.elapsed()
    );
    assert_eq!(rec.count("slow-1"), 1);
    assert_eq!(rec.count("slow-2"), 1);
    assert_eq!(
        rec.total(),
        2,
        "no other job may start after shutdown was requested"
    );
    assert_eq!(
        queue.depth(q).await.unwrap(),
        10,
        "untaken jobs stay queued"
    );

    // Second run: the 10 leftovers plus a panicking job, all complete.
    queue.push(q, &env("boom", "panic"), None).await.unwrap();
    let rec2 = Recorder::default();
    let r2 = rec2.clone();
    let handler2 = move |e: Envelope| {
        let r2 = r2.clone();
        async move {
            r2.record(&e.id);
            if e.kind == "panic" {
                panic!("handler exploded on purpose");
            }
        }
    };
    let waiter = rec2.clone();
    queue
        .run_workers(
            spec(q, 2),
            handler2,
            async move {
                waiter
                    .wait_until(Duration::from_secs(30), "leftovers", |r| r.distinct() == 11)
                    .await;
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    for i in 0..10 {
        assert_eq!(rec2.count(&format!("later-{i}")), 1);
    }
    assert_eq!(rec2.count("boom"), 1);
    // The panicked job counts as done: nothing left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while queue.depth(q).await.unwrap() != 0 {
        assert!(Instant::now() < deadline, "depth never reached 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (c) A consumer takes a job and "crashes" (its run_workers future is
/// aborted: no ack, no graceful release). A second Queue instance gets the
/// job once the backend's recovery timeout passed. Returns the delay between
/// the crash and the redelivery.
pub async fn crash_redelivery_scenario(first: Queue, second: Queue, q: &'static str) -> Duration {
    first.push(q, &env("crashy", "x"), None).await.unwrap();

    let taken = Arc::new(Notify::new());
    let t2 = taken.clone();
    let stuck = move |_e: Envelope| {
        let t2 = t2.clone();
        async move {
            t2.notify_one();
            std::future::pending::<()>().await; // never finishes, never acks
        }
    };
    let crashed = tokio::spawn(async move {
        first
            .run_workers(
                spec(q, 1),
                stuck,
                std::future::pending(),
                Duration::from_secs(1),
            )
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), taken.notified())
        .await
        .expect("first consumer never took the job");
    crashed.abort(); // kill -9 equivalent for this process
    let _ = crashed.await;
    let crash_at = Instant::now();

    let rec = Recorder::default();
    let r = rec.clone();
    let handler = move |e: Envelope| {
        let r = r.clone();
        async move { r.record(&e.id) }
    };
    let waiter = rec.clone();
    second
        .run_workers(
            spec(q, 1),
            handler,
            async move {
                waiter
                    .wait_until(Duration::from_secs(40), "redelivery", |r| {
                        r.count("crashy") == 1
                    })
                    .await;
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    crash_at.elapsed()
}

/// Returns how long a job pushed to an idle worker took to run: an idle worker must
/// not wait for its heartbeat to poll. A warm-up job first proves the worker is polling,
/// so a slow start-up on a loaded machine is not mistaken for a slow pickup; then the
/// worker idles for 2 s (many poll intervals) before the measured push.
pub async fn idle_pickup_latency(queue: Queue) -> Duration {
    let q = "patchbay:idle";
    let rec = Recorder::default();
    let r = rec.clone();
    let handler = move |e: Envelope| {
        let r = r.clone();
        async move { r.record(&e.id) }
    };
    let waiter = rec.clone();
    let producer = queue.clone();
    let latency = tokio::spawn(async move {
        producer.push(q, &env("warm-up", "x"), None).await.unwrap();
        waiter
            .wait_until(Duration::from_secs(30), "warm-up", |r| r.total() == 1)
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = Instant::now();
        producer.push(q, &env("ping", "x"), None).await.unwrap();
        waiter
            .wait_until(Duration::from_secs(10), "ping", |r| r.total() == 2)
            .await;
        t.elapsed()
    });
    let w = rec.clone();
    queue
        .run_workers(
            spec(q, 4),
            handler,
            async move {
                w.wait_until(Duration::from_secs(45), "ping", |r| r.total() == 2)
                    .await
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let latency = latency.await.unwrap();
    println!("idle pickup latency {latency:?}");
    latency
}

/// The stored form of an envelope whose payload nests `levels` arrays deep: past
/// serde_json's recursion limit (128) it cannot be decoded.
pub fn deep_envelope(id: &str, levels: usize) -> String {
    format!(
        r#"{{"id":"{id}","kind":"deep","payload":{}{},"attempt":2}}"#,
        "[".repeat(levels),
        "]".repeat(levels)
    )
}

/// Records the jobs it ran and the ones the queue rejected; panics on kind "panic".
#[derive(Clone, Default)]
pub struct Rejecting {
    pub ran: Recorder,
    pub rejected: Arc<Mutex<Vec<Rejected>>>,
}

impl Handler for Rejecting {
    fn run(&self, env: Envelope) -> impl Future<Output = ()> + Send + 'static {
        let ran = self.ran.clone();
        async move {
            ran.record(&env.id);
            if env.kind == "panic" {
                panic!("handler exploded on purpose");
            }
        }
    }

    fn reject(&self, job: Rejected) -> impl Future<Output = ()> + Send + 'static {
        self.rejected.lock().unwrap().push(job);
        // Wake the waiter, which watches `ran`.
        self.ran.changed.notify_waiters();
        std::future::ready(())
    }
}

/// No job stops a worker: the caller put three poisoned entries on `q` (written into
/// the backend directly): `deep_envelope("deep-1", 200)`, one that is not JSON, and
/// (Redis) one without the envelope field or (SQLite) a truncated envelope. With a job
/// whose handler panics and a normal job queued after them, the normal one runs, each
/// bad one is rejected once with its reason (and its id where it could be read), and
/// the queue ends empty.
pub async fn poison_scenario(queue: Queue, q: &str) {
    queue.push(q, &env("boom", "panic"), None).await.unwrap();
    queue.push(q, &env("after", "fast"), None).await.unwrap();
    let h = Rejecting::default();
    let (ran, rejected) = (h.ran.clone(), h.rejected.clone());
    let stop = h.clone();
    queue
        .run_workers(
            spec(q, 2),
            h,
            async move {
                let rejected = stop.rejected.clone();
                stop.ran
                    .wait_until(Duration::from_secs(30), "the good job and 4 rejects", |r| {
                        r.count("after") == 1 && rejected.lock().unwrap().len() == 4
                    })
                    .await;
                // Time for a wrongly repeated delivery to show.
                tokio::time::sleep(Duration::from_millis(500)).await;
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(
        (ran.count("after"), ran.count("boom")),
        (1, 1),
        "each ran once"
    );
    let rejected = rejected.lock().unwrap().clone();
    assert_eq!(rejected.len(), 4, "{rejected:#?}");
    assert!(rejected.iter().all(|r| r.queue == q), "{rejected:#?}");
    let by_id = |id: &str| rejected.iter().find(|r| r.id == id);
    let deep = by_id("deep-1").expect("the deep job's id is read past its payload");
    assert!(deep.reason.contains("recursion limit"), "{deep:?}");
    assert_eq!(deep.attempt, 2);
    assert!(!deep.decodable);
    let kept = deep.payload["undecodable"].as_str().expect("raw text kept");
    assert!(kept.starts_with(r#"{"id":"deep-1""#), "{kept}");
    assert_eq!(deep.payload["bytes"], deep_envelope("deep-1", 200).len());
    let boom = by_id("boom").expect("the panicking job");
    assert!(
        boom.reason
            .contains("handler panicked: handler exploded on purpose"),
        "{boom:?}"
    );
    assert!(
        boom.decodable,
        "a decodable job keeps its payload: {boom:?}"
    );
    assert_eq!(boom.payload, serde_json::json!({}));
    // The two unreadable ones got ids of their own, and reasons.
    let others: Vec<&Rejected> = rejected
        .iter()
        .filter(|r| r.id != "deep-1" && r.id != "boom")
        .collect();
    assert_eq!(others.len(), 2, "{rejected:#?}");
    for r in others {
        assert_eq!(r.id.len(), 26, "a fresh ULID: {r:?}");
        assert!(r.reason.contains("cannot be decoded"), "{r:?}");
        assert!(r.payload["undecodable"].is_string(), "{r:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while queue.depth(q).await.unwrap() != 0 {
        assert!(
            Instant::now() < deadline,
            "poisoned entries left in the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
