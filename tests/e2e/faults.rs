//! Faults the daemon rides out without a restart: a job poisoned in the queue itself
//! (written into the SQLite queue file or the Redis stream, past every check the
//! daemon makes when it queues) goes dead with its reason while the worker carries
//! on, and a Redis outage under inbound load leaves the same process running, says
//! the queue is down, and loses no message.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::channels::messages;
use crate::harness::{Backend, Daemon, ctl};

/// How long Redis stays down in the outage test: two minutes, four times the shipped
/// unit's `WatchdogSec=30s` (pings every 15 s), so a daemon that gave up on an outage,
/// or would let systemd restart it, shows. The test runs beside the rest of the suite.
const OUTAGE: Duration = Duration::from_secs(120);

/// A stored job no worker can decode: an inbound envelope whose payload nests 300
/// arrays deep (serde_json stops at 128), carrying 40 KiB of text before that, so
/// the dead job's copy must be cut.
fn poisoned_envelope(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","kind":"inbound_message","payload":{{"channel":1,"text":"{}","sender":{}{}}},"attempt":0}}"#,
        "x".repeat(40 * 1024),
        "[".repeat(300),
        "]".repeat(300)
    )
    .into_bytes()
}

/// A connection to the test's own Redis, beside the daemon's.
async fn redis_connection(d: &Daemon) -> redis::aio::MultiplexedConnection {
    let redis = d.redis.as_ref().expect("redis");
    let client = redis::Client::open(redis.url()).expect("redis url");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Writes `job` straight into the daemon's queue for `kind`, as the backend stores it.
async fn poison_queue(d: &Daemon, backend: Backend, kind: &str, job: &[u8]) {
    match backend {
        Backend::Sqlite => {
            let opts = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(d.dir.path().join("var/queue.db"))
                .busy_timeout(Duration::from_secs(10));
            let pool = sqlx::SqlitePool::connect_with(opts)
                .await
                .expect("open the queue file");
            // The row apalis' sink.sql (and the daemon's push_many) writes.
            sqlx::query(
                "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, \
                 priority, metadata) VALUES (?1, ?2, ?3, 'Pending', 0, 25, 0, 0, '{}')",
            )
            .bind(job)
            .bind(ulid::Ulid::new().to_string())
            .bind(format!("patchbay:{kind}"))
            .execute(&pool)
            .await
            .expect("insert the poisoned row");
            pool.close().await;
        }
        Backend::Redis | Backend::RedisAof | Backend::RedisEverysec => {
            let mut con = redis_connection(d).await;
            let ns = format!("t{}", std::process::id());
            redis::cmd("XADD")
                .arg(format!("{ns}:{{{ns}:{kind}}}:stream"))
                .arg("*")
                .arg("env")
                .arg(job)
                .query_async::<()>(&mut con)
                .await
                .expect("XADD the poisoned entry");
        }
    }
}

async fn poisoned_job_is_dead_and_the_worker_goes_on(backend: Backend) {
    let d = Daemon::start(backend);
    let (acc, _) = d.account("poison").await;
    let id = ulid::Ulid::new().to_string();
    let poison = poisoned_envelope(&id);
    poison_queue(&d, backend, "inbound_message", &poison).await;
    // Queued after the poison, on the same worker: it runs.
    let next = d
        .ok(
            "job.enqueue",
            json!({"kind": "inbound_message", "payload": {
                "channel": 4242, "external_chat_id": "c1", "external_message_id": "m1",
                "sender": {"phone": "+79161234567"}, "text": "hi", "attachments": [],
                "sent_at": "2026-11-25T10:00:00Z"}}),
        )
        .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // (Dead too, for its unknown channel, but run by the worker: what counts here.)
    d.job_until(&next, &["done", "dead"], Duration::from_secs(30))
        .await;
    let topup = d
        .ok(
            "job.enqueue",
            json!({"kind": "topup", "payload": {"account": acc, "amount": 5, "reference": "p1"}}),
        )
        .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    d.job_until(&topup, &["done"], Duration::from_secs(30))
        .await;

    let dead = d.job_until(&id, &["dead"], Duration::from_secs(30)).await;
    assert_eq!(dead["kind"], "inbound_message", "{dead}");
    let reason = dead["last_error"].as_str().expect("reason kept");
    assert!(
        reason.contains("cannot be decoded") && reason.contains("recursion limit"),
        "{reason}"
    );
    // A bounded copy: the first 32 KiB of the stored job, and its full size.
    let kept = dead["payload"]["undecodable"].as_str().expect("raw copy");
    assert_eq!(kept.len(), 32 * 1024);
    assert!(kept.starts_with(&format!(r#"{{"id":"{id}""#)), "{kept:.80}");
    assert_eq!(dead["payload"]["bytes"], poison.len());
    let listed = d.ok("job.list", json!({"state": "dead"})).await;
    assert!(
        listed
            .as_array()
            .expect("jobs")
            .iter()
            .any(|j| j["id"] == id.as_str()),
        "{listed}"
    );
    let out = ctl(&d.config, &["job", "list", "--state", "dead"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&id));
    // A cut copy cannot run again.
    let refused = d.fails("job.retry", json!({"id": id}), "conflict").await;
    assert!(refused.contains("cannot be retried"), "{refused}");

    // The worker never stopped, and the poison left the queue.
    let status = d
        .until(
            "an empty inbound queue",
            Duration::from_secs(10),
            || async {
                let s = d.ok("status", json!({})).await;
                (s["queue_depth"]["inbound_message"] == 0).then_some(s)
            },
        )
        .await;
    let worker = &status["health"]["workers"][match backend {
        Backend::Sqlite => "patchbay:inbound_message".to_owned(),
        _ => format!("t{0}:inbound_message", std::process::id()),
    }];
    assert_eq!(worker["running"], true, "{status}");
    assert_eq!(worker["restarts"], 0, "{status}");
    assert_eq!(status["health"]["ok"], true, "{status}");
    assert_eq!(
        d.ok("account.get", json!({"account": acc})).await["balance"],
        5
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn poisoned_job_is_dead_and_the_worker_goes_on_sqlite() {
    poisoned_job_is_dead_and_the_worker_goes_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poisoned_job_is_dead_and_the_worker_goes_on_redis() {
    poisoned_job_is_dead_and_the_worker_goes_on(Backend::RedisAof).await;
}

/// Inbound messages stored for the account: (all, distinct external ids).
async fn stored(d: &Daemon, account: i64) -> (usize, usize) {
    let inbound: Vec<Value> = messages(d, account)
        .await
        .into_iter()
        .filter(|m| m["direction"] == "in")
        .collect();
    let ids: std::collections::HashSet<&str> = inbound
        .iter()
        .filter_map(|m| m["external_message_id"].as_str())
        .collect();
    (inbound.len(), ids.len())
}

/// Redis down for [`OUTAGE`] while a loopback channel sends: the same daemon process
/// stays up throughout, `status` answers and says the queue is down, and once Redis
/// is back (same socket, same append-only file) every message is stored exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_under_inbound_load_loses_nothing_and_keeps_the_daemon() {
    const SENT: usize = 400;
    let mut d = Daemon::start(Backend::RedisAof);
    let pid = d.ok("status", json!({})).await["pid"].clone();
    let (acc, admin) = d.account("outage").await;
    // Ids repeat across the connector's restarts: what it sends again is the same message.
    d.loopback(
        acc,
        admin,
        json!({"rate_per_sec": 20, "limit": SENT, "clients": 4, "id_prefix": "out"}),
    )
    .await;
    d.until("the first messages", Duration::from_secs(30), || async {
        (stored(&d, acc).await.0 >= 20).then_some(())
    })
    .await;

    // A clean stop, so Redis' own fsync policy cannot lose the last second of jobs:
    // what is tested is the daemon.
    {
        let mut con = redis_connection(&d).await;
        let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut con).await;
    }
    d.redis.as_mut().expect("redis").stop();
    let down_at = Instant::now();
    let status = d
        .until(
            "status saying the queue is down",
            Duration::from_secs(20),
            || async {
                let s = d.ok("status", json!({})).await;
                s["health"]["queue"].is_string().then_some(s)
            },
        )
        .await;
    assert_eq!(status["health"]["ok"], false, "{status}");
    assert!(
        status["health"]["down"]
            .as_array()
            .expect("down")
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.starts_with("queue down"))),
        "{status}"
    );
    assert_eq!(status["queue_depth"]["inbound_message"], Value::Null);
    while down_at.elapsed() < OUTAGE {
        let s = d.ok("status", json!({})).await;
        assert_eq!(s["pid"], pid, "the daemon restarted during the outage");
        assert!(s["health"]["queue"].is_string(), "{s}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    d.redis.as_mut().expect("redis").restart();
    d.until(
        "the queue answering again",
        Duration::from_secs(30),
        || async {
            let s = d.ok("status", json!({})).await;
            (s["health"]["ok"] == true).then_some(())
        },
    )
    .await;
    d.until("every message stored", Duration::from_secs(180), || async {
        let (all, distinct) = stored(&d, acc).await;
        assert_eq!(all, distinct, "a message stored twice");
        assert!(all <= SENT, "more messages than sent: {all}");
        (all == SENT).then_some(())
    })
    .await;
    let status = d.ok("status", json!({})).await;
    assert_eq!(status["pid"], pid, "{status}");
    let workers = status["health"]["workers"].as_object().expect("workers");
    assert!(workers.values().all(|w| w["running"] == true), "{status}");
}
