//! metrics: what recording the daemon's metrics costs on the hot path, per inbound
//! message, with the real recorder installed (`Metrics::install`, as patchbayd does).
//! Each inbound message is one job (`first_start`, `job_ran`, `job_finished`) and part
//! of a connector batch (`connector_events`, `inbound_queued`, and the store batch's and
//! queue push's timings); the bench calls exactly those, from 1 and from 4 threads (the
//! workers record concurrently), and prints nanoseconds per message.
//!
//!     cargo bench -p patchbay-daemon --bench metrics
//!
//! Knobs (environment): METRICS_ITERATIONS (default 2,000,000 per thread),
//! METRICS_BATCH (messages per connector batch, default 1: the worst case).

use std::time::{Duration, Instant};

use patchbay_daemon::metrics::{self, Metrics, Outcome};
use patchbay_jobs::JobKind;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the daemon records for `n` inbound messages arriving `batch` at a time.
fn record(n: u64, batch: u64, id: &str) {
    let now = patchbay_jobs::model::now_ms();
    for i in 0..n {
        if i % batch == 0 {
            metrics::connector_events("loopback", "inbound", "accepted", batch);
            metrics::inbound_queued("loopback", batch);
            metrics::store_batch("inbound", Duration::from_micros(800));
            metrics::queue_push(Duration::from_micros(300));
        }
        metrics::first_start(JobKind::InboundMessage, id, 0, now);
        metrics::job_ran(JobKind::InboundMessage, Duration::from_micros(120));
        metrics::job_finished(JobKind::InboundMessage, Outcome::Done);
    }
}

fn main() {
    let n: u64 = env_or("METRICS_ITERATIONS", 2_000_000);
    let batch: u64 = env_or::<u64>("METRICS_BATCH", 1).max(1);
    let m = Metrics::install("bench");
    let id = ulid::Ulid::new().to_string();
    // Warm up: every series exists before the clock starts.
    record(10_000, batch, &id);
    println!("metrics: recording per inbound message, batch {batch}, {n} messages per thread");
    for threads in [1usize, 4] {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| record(n, batch, &id));
            }
        });
        let took = start.elapsed();
        // Wall time over all messages of all threads: with more threads than cores
        // this is the machine's throughput, not one call's latency.
        let per = took.as_nanos() as f64 / (n as f64 * threads as f64);
        println!("  {threads} thread(s): {per:.0} ns per message (wall {took:.2?})");
    }
    // Histograms hold their samples until drained; the daemon drains every 5 s.
    let rendered = m.recorded();
    assert!(
        rendered.contains("patchbay_jobs_total"),
        "the recorder saw the jobs"
    );
}
