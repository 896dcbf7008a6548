//! qbench: push 20,000 trivial envelopes with `push_many`, then drain them
//! with one worker at concurrency 64, on SQLite (temp file) and on a
//! throwaway redis-server (or `QBENCH_REDIS_URL`). Prints jobs/s for 3 runs
//! and the median. Knobs: QBENCH_POLL_MS, QBENCH_BATCH (SQLite tuning),
//! QBENCH_SKIP_REDIS.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use patchbay_daemon::queue::{Envelope, Queue, WorkerSpec};
use tokio::sync::Notify;

const N: usize = 20_000;
const CONCURRENCY: usize = 64;
const RUNS: usize = 3;
const QUEUE: &str = "patchbay:bench";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Figures {
    push: f64,
    drain: f64,
    settled: f64,
}

fn envelopes(run: usize) -> Vec<Envelope> {
    (0..N)
        .map(|i| Envelope {
            id: format!("r{run}-{i}"),
            kind: "bench".into(),
            payload: serde_json::json!({ "i": i }),
            attempt: 0,
        })
        .collect()
}

async fn bench(queue: &Queue, run: usize) -> Result<Figures, BoxError> {
    let envs = envelopes(run);
    let t = Instant::now();
    queue.push_many(QUEUE, &envs).await?;
    let push = N as f64 / t.elapsed().as_secs_f64();

    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let (d, n) = (done.clone(), all_done.clone());
    let handler = move |_env: Envelope| {
        let (d, n) = (d.clone(), n.clone());
        async move {
            if d.fetch_add(1, Ordering::Relaxed) + 1 == N {
                n.notify_one();
            }
        }
    };
    let t = Instant::now();
    let waiter = all_done.clone();
    queue
        .run_workers(
            vec![WorkerSpec {
                queue: QUEUE.into(),
                concurrency: CONCURRENCY,
                poll_fallback: None,
            }],
            handler,
            async move { waiter.notified().await },
            Duration::from_secs(10),
        )
        .await?;
    let drain = N as f64 / t.elapsed().as_secs_f64();
    // Acks are flushed by then; depth 0 confirms they were persisted.
    while queue.depth(QUEUE).await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let settled = N as f64 / t.elapsed().as_secs_f64();
    Ok(Figures {
        push,
        drain,
        settled,
    })
}

fn report(name: &str, figs: &mut [Figures]) {
    for (i, f) in figs.iter().enumerate() {
        println!(
            "{name} run {}: push {:>8.0} jobs/s   drain {:>8.0} jobs/s   (drain incl. acks persisted {:>8.0} jobs/s)",
            i + 1,
            f.push,
            f.drain,
            f.settled
        );
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "{name} MEDIAN: push {:.0} jobs/s, drain {:.0} jobs/s, drain+acks {:.0} jobs/s",
        med(figs.iter().map(|f| f.push).collect()),
        med(figs.iter().map(|f| f.drain).collect()),
        med(figs.iter().map(|f| f.settled).collect()),
    );
}

struct RedisChild {
    child: Child,
    socket: PathBuf,
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn throwaway_redis() -> Result<(String, Option<RedisChild>), BoxError> {
    if let Ok(url) = std::env::var("QBENCH_REDIS_URL") {
        return Ok((url, None));
    }
    let socket = std::env::temp_dir().join(format!("qbench-redis-{}.sock", std::process::id()));
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
        ])
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()?;
    let guard = RedisChild {
        child,
        socket: socket.clone(),
    };
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((format!("redis+unix://{}", socket.display()), Some(guard)))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("{N} trivial jobs, push_many then drain with 1 worker x concurrency {CONCURRENCY}");

    let mut figs = Vec::new();
    for run in 0..RUNS {
        let path = std::env::temp_dir().join(format!("qbench-{}-{run}.db", std::process::id()));
        let mut tuning = patchbay_daemon::queue::SqliteTuning::default();
        if let Ok(ms) = std::env::var("QBENCH_POLL_MS") {
            tuning.poll_fallback = Duration::from_millis(ms.parse()?);
        }
        if let Ok(b) = std::env::var("QBENCH_BATCH") {
            tuning.batch_size = b.parse()?;
        }
        let queue = Queue::open_sqlite_with(&path, tuning).await?;
        figs.push(bench(&queue, run).await?);
        drop(queue);
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
    }
    report("sqlite", &mut figs);

    if std::env::var("QBENCH_SKIP_REDIS").is_ok() {
        return Ok(());
    }
    let (url, _guard) = throwaway_redis().await?;
    let mut figs = Vec::new();
    for run in 0..RUNS {
        let ns = format!("qbench-{}-{run}", std::process::id());
        let queue = Queue::open_redis(&url, &ns).await?;
        figs.push(bench(&queue, run).await?);
    }
    report("redis", &mut figs);
    Ok(())
}
