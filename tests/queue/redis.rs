//! Redis Streams backend: bulk drain without duplicates, delayed backlog,
//! graceful shutdown, crash redelivery, and lease refresh for long handlers.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{Recorder, TestRedis, env, spec};
use patchbay_daemon::queue::{Envelope, Queue, RedisTuning};

fn fast_tuning() -> RedisTuning {
    RedisTuning {
        visibility_timeout: Duration::from_secs(2),
        reclaim_interval: Duration::from_millis(250),
        block: Duration::from_millis(200),
        ..RedisTuning::default()
    }
}

/// (a) 100,000 jobs pushed at once (far beyond apalis-redis' ~8k wedge) plus
/// 10,000 jobs delayed by 1 s: every one runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_100k_and_10k_delayed_run_exactly_once() {
    let redis = TestRedis::start("bulk").await;
    let queue = Queue::open_redis(&redis.url, "t").await.unwrap();
    let q = "patchbay:bulk";

    let now: Vec<Envelope> = (0..100_000).map(|i| env(format!("n{i}"), "now")).collect();
    queue.push_many(q, &now).await.unwrap();
    let pushed_delayed_at = Instant::now();
    for chunk in (0..10_000).collect::<Vec<_>>().chunks(1000) {
        let pushes = chunk.iter().map(|i| {
            let queue = queue.clone();
            async move {
                queue
                    .push(
                        q,
                        &env(format!("d{i}"), "delayed"),
                        Some(Duration::from_secs(1)),
                    )
                    .await
            }
        });
        for r in futures::future::join_all(pushes).await {
            r.unwrap();
        }
    }
    assert_eq!(queue.depth(q).await.unwrap(), 110_000);

    let rec = Recorder::default();
    let dupes = Arc::new(AtomicUsize::new(0));
    let early = Arc::new(AtomicUsize::new(0));
    let (r, d, e) = (rec.clone(), dupes.clone(), early.clone());
    let handler = move |job: Envelope| {
        let (r, d, e) = (r.clone(), d.clone(), e.clone());
        async move {
            if job.kind == "delayed" && pushed_delayed_at.elapsed() < Duration::from_millis(900) {
                e.fetch_add(1, Ordering::Relaxed);
            }
            if r.count(&job.id) > 0 {
                d.fetch_add(1, Ordering::Relaxed);
            }
            r.record(&job.id);
        }
    };
    let waiter = rec.clone();
    let t = Instant::now();
    queue
        .run_workers(
            spec(q, 64),
            handler,
            async move {
                waiter
                    .wait_until(Duration::from_secs(180), "110k jobs", |r| {
                        r.distinct() == 110_000
                    })
                    .await;
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    println!("drained 110k in {:?}", t.elapsed());
    assert_eq!(rec.distinct(), 110_000);
    assert_eq!(dupes.load(Ordering::Relaxed), 0, "a job ran twice");
    assert_eq!(rec.total(), 110_000);
    assert_eq!(
        early.load(Ordering::Relaxed),
        0,
        "a delayed job ran before its time"
    );
    assert_eq!(queue.depth(q).await.unwrap(), 0);
}

/// (b) on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_redis() {
    let redis = TestRedis::start("graceful").await;
    let queue = Queue::open_redis_with(&redis.url, "t", fast_tuning())
        .await
        .unwrap();
    crate::common::graceful_shutdown_scenario(queue).await;

    // A graceful stop leaves nothing in any pending list and removes its consumers.
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stream = "t:{patchbay:graceful}:stream";
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg("workers")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("unexpected XPENDING reply {pending:?}")
    };
    assert_eq!(
        summary.first(),
        Some(&redis::Value::Int(0)),
        "entries left pending: {summary:?}"
    );
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg("workers")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(consumers.is_empty(), "consumers left behind: {consumers:?}");
}

/// (c) A crashed consumer's job is redelivered to another Queue instance
/// after the visibility timeout (2 s here), not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_consumer_job_is_redelivered() {
    let redis = TestRedis::start("crash").await;
    let a = Queue::open_redis_with(&redis.url, "t", fast_tuning())
        .await
        .unwrap();
    let b = Queue::open_redis_with(&redis.url, "t", fast_tuning())
        .await
        .unwrap();
    let after = crate::common::crash_redelivery_scenario(a, b.clone(), "patchbay:crash").await;
    println!("redelivered {after:?} after the crash");
    assert!(
        after >= Duration::from_millis(1500),
        "redelivered before the visibility timeout: {after:?}"
    );
    assert!(
        after < Duration::from_secs(6),
        "redelivery too slow: {after:?}"
    );
    assert_eq!(b.depth("patchbay:crash").await.unwrap(), 0);
}

/// A handler running longer than the visibility timeout keeps its lease:
/// a second live daemon does not steal the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_handler_is_not_reclaimed_while_alive() {
    let redis = TestRedis::start("lease").await;
    let a = Queue::open_redis_with(&redis.url, "t", fast_tuning())
        .await
        .unwrap();
    let b = Queue::open_redis_with(&redis.url, "t", fast_tuning())
        .await
        .unwrap();
    let q = "patchbay:lease";
    a.push(q, &env("long", "slow"), None).await.unwrap();

    let rec = Recorder::default();
    let r = rec.clone();
    let handler = move |e: Envelope| {
        let r = r.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await; // 2.5x visibility
            r.record(&e.id);
        }
    };
    let (wa, wb) = (rec.clone(), rec.clone());
    let h2 = handler.clone();
    let run_a = a.run_workers(
        spec(q, 1),
        handler,
        async move {
            wa.wait_until(Duration::from_secs(20), "long job", |r| r.total() >= 1)
                .await
        },
        Duration::from_secs(10),
    );
    let run_b = async {
        tokio::time::sleep(Duration::from_millis(300)).await; // let A take it first
        b.run_workers(
            spec(q, 1),
            h2,
            async move {
                wb.wait_until(Duration::from_secs(20), "long job", |r| r.total() >= 1)
                    .await;
                tokio::time::sleep(Duration::from_secs(3)).await; // would a steal show up?
            },
            Duration::from_secs(10),
        )
        .await
    };
    let (ra, rb) = tokio::join!(run_a, run_b);
    ra.unwrap();
    rb.unwrap();
    assert_eq!(
        rec.count("long"),
        1,
        "job was stolen from a live worker and ran twice"
    );
    assert_eq!(a.depth(q).await.unwrap(), 0);
}

/// An idle worker picks up a new job promptly (blocking read, no heartbeat wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_picks_up_quickly() {
    let redis = TestRedis::start("idle").await;
    let queue = Queue::open_redis(&redis.url, "t").await.unwrap();
    let latency = crate::common::idle_pickup_latency(queue).await;
    assert!(
        latency < Duration::from_secs(1),
        "idle pickup took {latency:?}"
    );
}

/// The daemon queues inbound messages without journal rows only on a queue that loses
/// no acknowledged push when its server dies: Redis with an append-only file synced on
/// every write, or on `everysec` only when the operator says so
/// (`queue.redis_trust_everysec`); never without one. Read from the server each time,
/// so a `CONFIG SET` on a running Redis counts at the next check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_is_read_from_the_server() {
    let redis = TestRedis::start("aof").await;
    let queue = Queue::open_redis(&redis.url, "t").await.unwrap();
    assert!(
        !queue.persists_jobs(false).await,
        "started with --appendonly no"
    );
    assert!(
        !queue.persists_jobs(true).await,
        "no append-only file to trust"
    );
    // Redis' default appendfsync is everysec: up to a second of pushes can be lost.
    let aof = TestRedis::start_persistent("aof-yes", true).await;
    let everysec = Queue::open_redis(&aof.url, "t").await.unwrap();
    assert!(!everysec.persists_jobs(false).await, "appendfsync everysec");
    assert!(everysec.persists_jobs(true).await, "everysec, trusted");
    let always = TestRedis::start_args(
        "aof-always",
        &["--appendonly", "yes", "--appendfsync", "always"],
    )
    .await;
    let synced = Queue::open_redis(&always.url, "t").await.unwrap();
    assert!(synced.persists_jobs(false).await, "appendfsync always");
    // Changed at run time: the next check sees it.
    let mut conn = redis::Client::open(aof.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("always")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(everysec.persists_jobs(false).await, "switched to always");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("no")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !everysec.persists_jobs(true).await,
        "append-only file turned off"
    );
    let sqlite = crate::common::TempDb::new("aof");
    assert!(
        Queue::open_sqlite(&sqlite.0)
            .await
            .unwrap()
            .persists_jobs(false)
            .await
    );
}

/// No job stops a worker on Redis: entries XADDed straight into the stream that do
/// not decode (too deep for serde_json, not JSON, no envelope field) are rejected once
/// each instead of being acked away unseen, and the jobs after them run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_entries_are_rejected_and_the_worker_goes_on() {
    let redis = TestRedis::start("poison").await;
    let queue = Queue::open_redis_with(&redis.url, "t", fast_tuning())
        .await
        .unwrap();
    let q = "patchbay:poison";
    let stream = "t:{patchbay:poison}:stream";
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deep = crate::common::deep_envelope("deep-1", 200).into_bytes();
    for (field, value) in [
        ("env", deep.as_slice()),
        ("env", b"not json \xff\xfe".as_slice()),
        ("other", b"{}".as_slice()),
    ] {
        redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(field)
            .arg(value)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    crate::common::poison_scenario(queue, q).await;
}
