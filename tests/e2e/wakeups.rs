//! How idle workers learn of new jobs: this daemon's own pushes wake their worker at
//! once, whatever `queue.poll_fallback_ms` says; a job that another process put in the
//! SQLite queue is found by the fallback poll.

use std::time::Duration;

use serde_json::json;
use sqlx::ConnectOptions;

use crate::harness::{Backend, Daemon};

/// Far longer than any wait below: a job that waited for the fallback poll would fail
/// the test.
const LONG_FALLBACK_MS: &str = "60000";

/// Completed well inside the fallback interval: only a wake-up from the push can do that.
const PROMPT: Duration = Duration::from_secs(20);

async fn own_pushes_wake_their_worker(backend: Backend) {
    let d = Daemon::start_env(
        backend,
        "",
        &[("PATCHBAY__QUEUE__POLL_FALLBACK_MS", LONG_FALLBACK_MS)],
    );
    let (acc, admin) = d.account("wake").await;
    // Past the workers' first fetch at start: from here on they only sleep.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A job the control socket enqueues (one push).
    let r = d
        .ok(
            "job.enqueue",
            json!({"kind": "topup", "payload": {"account": acc, "amount": 700, "reference": "wake-1"}}),
        )
        .await;
    d.job_until(r["id"].as_str().expect("id"), &["done"], PROMPT)
        .await;
    assert_eq!(
        d.ok("account.get", json!({"account": acc})).await["balance"],
        700
    );

    // Inbound messages from a connector (a batched push), then a send to one of the
    // chats (a job whose worker has been idle all along).
    d.loopback(acc, admin, json!({"burst": 3, "clients": 1})).await;
    let chat = d
        .until("the inbound messages stored", PROMPT, || async {
            let chats = d.ok("chat.list", json!({"account": acc})).await;
            let chat = chats.as_array()?.first()?["id"].as_i64()?;
            (d.store_count("SELECT COUNT(*) FROM messages").await >= 3).then_some(chat)
        })
        .await;
    let sent = d
        .ok(
            "message.send",
            json!({"chat": chat, "actor": admin, "text": "hello"}),
        )
        .await;
    let job = sent["job"].as_str().expect("the send's job").to_owned();
    d.job_until(&job, &["done"], PROMPT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_pushes_wake_their_worker_sqlite() {
    own_pushes_wake_their_worker(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_pushes_wake_their_worker_redis() {
    own_pushes_wake_their_worker(Backend::Redis).await;
}

/// A job written into the queue's file by another process (as a second daemon on the
/// same file would push it) wakes nobody here: the fallback poll finds and runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pushed_by_another_process_runs_on_the_fallback_poll() {
    let d = Daemon::start_env(
        Backend::Sqlite,
        "",
        &[("PATCHBAY__QUEUE__POLL_FALLBACK_MS", "1000")],
    );
    let (acc, _) = d.account("elsewhere").await;
    let envelope = json!({
        "id": ulid::Ulid::new().to_string(),
        "kind": "topup",
        "payload": {"account": acc, "amount": 321, "reference": "from-another-process"},
        "attempt": 0,
    });
    let mut queue = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(d.dir.path().join("var/queue.db"))
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("open the queue file");
    // The row apalis-sqlite's own push writes (see `SqliteQueue::push_many`).
    sqlx::query(
        "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, \
         metadata) VALUES (CAST(?1 AS BLOB), ?2, 'patchbay:topup', 'Pending', 0, 25, \
         strftime('%s', 'now'), 0, '{}')",
    )
    .bind(envelope.to_string())
    .bind(ulid::Ulid::new().to_string())
    .execute(&mut queue)
    .await
    .expect("insert a job");
    d.until("the job run by the fallback poll", Duration::from_secs(30), || async {
        let acc = d.ok("account.get", json!({"account": acc})).await;
        (acc["balance"] == 321).then_some(())
    })
    .await;
}
