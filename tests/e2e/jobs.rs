//! Jobs on both queue backends: journal states, idempotency keys, dead jobs and
//! job.retry, and the crash test — kill -9 mid-run, restart, nothing lost or doubled.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, ctl};

async fn lifecycle(backend: Backend) {
    let d = Daemon::start(backend);
    let (acc, _) = d.account("jobs").await;

    let r = d.ok("job.enqueue", json!({"kind": "topup", "payload": {"account": acc, "amount": 250, "reference": "batch-1"}})).await;
    let id = r["id"].as_str().expect("id").to_owned();
    assert_eq!(r["existing"], false);
    let job = d.job_until(&id, &["done"], Duration::from_secs(20)).await;
    assert_eq!(job["attempts"], 1);
    let again = d.ok("job.enqueue", json!({"kind": "topup", "payload": {"account": acc, "amount": 250, "reference": "batch-1"}})).await;
    assert_eq!(
        again["id"],
        id.as_str(),
        "the idempotency key finds the first job"
    );
    assert_eq!(again["existing"], true);
    assert_eq!(
        d.ok("account.get", json!({"account": acc})).await["balance"],
        250
    );

    // A job whose effect cannot happen goes dead at once with the reason, not 8 retries.
    let r = d
        .ok(
            "job.enqueue",
            json!({"kind": "topup", "payload": {"account": 4242, "amount": 1, "reference": "x"}}),
        )
        .await;
    let dead_id = r["id"].as_str().expect("id").to_owned();
    let dead = d
        .job_until(&dead_id, &["dead"], Duration::from_secs(20))
        .await;
    assert_eq!(dead["attempts"], 1);
    assert!(
        dead["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("account 4242 does not exist"),
        "{dead}"
    );

    let listed = d.ok("job.list", json!({"state": "dead"})).await;
    assert!(
        listed
            .as_array()
            .expect("array")
            .iter()
            .any(|j| j["id"] == dead_id.as_str())
    );
    let out = ctl(&d.config, &["job", "list", "--state", "dead"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&dead_id));

    // The account appears; retrying the dead job now succeeds.
    let (acc2, _) = d.account("late").await;
    assert_eq!(acc2, 2);
    let r = d
        .ok(
            "job.enqueue",
            json!({"kind": "topup", "payload": {"account": 4242, "amount": 1, "reference": "y"}}),
        )
        .await;
    d.job_until(
        r["id"].as_str().expect("id"),
        &["dead"],
        Duration::from_secs(20),
    )
    .await;
    let revived = d.ok("job.retry", json!({"id": dead_id})).await;
    assert_eq!(revived["attempts"], 0);
    d.job_until(&dead_id, &["dead", "done"], Duration::from_secs(20))
        .await;
    d.fails("job.retry", json!({"id": id}), "conflict").await;
    d.fails("job.get", json!({"id": "nope"}), "not_found").await;
    let status = d.ok("status", json!({})).await;
    assert_eq!(
        status["backends"]["queue"],
        if backend == Backend::Redis {
            "redis"
        } else {
            "sqlite"
        }
    );
    assert_eq!(status["jobs"]["topup"]["done"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn job_lifecycle_sqlite() {
    lifecycle(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn job_lifecycle_redis() {
    lifecycle(Backend::Redis).await;
}

/// `job.enqueue` of a `topup` follows `account.topup`'s rules exactly: the same bounds
/// with the same answer, and the reference trimmed the same way, so a padded reference
/// names the payment its trimmed form names — one job, one ledger entry.
#[tokio::test(flavor = "multi_thread")]
async fn topup_jobs_follow_account_topup() {
    let d = Daemon::start(Backend::Sqlite);
    let (acc, _) = d.account("topups").await;
    let long = "r".repeat(257);
    for (amount, reference) in [
        (1_000_000_000_000_001_i64, "big"),
        (0, "zero"),
        (-5, "negative"),
        (5, "  \t "),
        (5, long.as_str()),
    ] {
        let t = json!({"account": acc, "amount": amount, "reference": reference});
        let direct = d.fails("account.topup", t.clone(), "invalid_value").await;
        let queued = d
            .fails(
                "job.enqueue",
                json!({"kind": "topup", "payload": t}),
                "invalid_value",
            )
            .await;
        assert_eq!(direct, queued, "{t}");
    }
    let jobs = d.ok("job.list", json!({"kind": "topup"})).await;
    assert_eq!(jobs, json!([]), "a refused top-up queues nothing");
    assert_eq!(
        d.ok("account.get", json!({"account": acc})).await["balance"],
        0
    );

    let entry = d
        .ok(
            "account.topup",
            json!({"account": acc, "amount": 100, "reference": " pay-1 "}),
        )
        .await;
    assert_eq!(entry["reference"], "pay-1");
    let r = d.ok("job.enqueue", json!({"kind": "topup", "payload": {"account": acc, "amount": 100, "reference": "pay-1\t"}})).await;
    d.job_until(
        r["id"].as_str().expect("id"),
        &["done"],
        Duration::from_secs(20),
    )
    .await;
    let first = d.ok("job.enqueue", json!({"kind": "topup", "payload": {"account": acc, "amount": 200, "reference": " pay-2"}})).await;
    d.job_until(
        first["id"].as_str().expect("id"),
        &["done"],
        Duration::from_secs(20),
    )
    .await;
    let again = d.ok("job.enqueue", json!({"kind": "topup", "payload": {"account": acc, "amount": 200, "reference": "pay-2 "}})).await;
    assert_eq!(
        (&again["id"], &again["existing"]),
        (&first["id"], &json!(true))
    );
    d.ok(
        "account.topup",
        json!({"account": acc, "amount": 200, "reference": "pay-2"}),
    )
    .await;
    assert_eq!(
        d.ok("account.get", json!({"account": acc})).await["balance"],
        300
    );
    let ledger = d.ok("account.ledger", json!({"account": acc})).await;
    let mut refs: Vec<&str> = ledger
        .as_array()
        .expect("ledger")
        .iter()
        .filter_map(|e| e["reference"].as_str())
        .collect();
    refs.sort();
    assert_eq!(refs, ["pay-1", "pay-2"]);
}

fn topup(acc: i64, i: i64) -> Value {
    json!({"kind": "topup", "payload": {"account": acc, "amount": 1, "reference": format!("c-{i}")}})
}

/// 1,000 countable jobs; the daemon is killed with SIGKILL while they are being
/// enqueued and run — so also between a job's journal row and its push — and
/// restarted. The client then enqueues all 1,000 again, as a client whose calls were
/// cut off would (same references, so the jobs that exist come back instead). Every
/// job completes, the balance is exactly the sum, once.
async fn crash(backend: Backend) {
    const JOBS: i64 = 1000;
    // The harness sets queue.lost_job_grace_secs = 2.
    let mut d = Daemon::start_with(backend, "[queue.concurrency]\ntopup = 4\n");
    let (acc, _) = d.account("crash").await;
    let mut client = d.client().await;
    let enqueuer = tokio::spawn(async move {
        let mut accepted = 0;
        for i in 0..JOBS {
            if client.call("job.enqueue", topup(acc, i)).await.is_err() {
                break;
            }
            accepted += 1;
        }
        accepted
    });
    // Kill as soon as some are done: the enqueuer is still at work.
    d.until("a top-up applied", Duration::from_secs(30), || async {
        let bal = d.ok("account.get", json!({"account": acc})).await["balance"].as_i64();
        (bal.unwrap_or(0) > 0).then_some(())
    })
    .await;
    d.kill9();
    let accepted = enqueuer.await.expect("enqueuer");
    assert!(
        accepted < JOBS,
        "enqueueing finished before the kill; make the test harder"
    );
    d.spawn();
    let mut client = d.client().await;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let r = client
            .call("job.enqueue", topup(acc, i))
            .await
            .expect("enqueue");
        ids.push(r["id"].as_str().expect("id").to_owned());
    }
    let start = Instant::now();
    loop {
        let status = d.ok("status", json!({})).await;
        let done = status["jobs"]["topup"]["done"].as_i64().unwrap_or(0);
        if done == JOBS {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "only {done} of {JOBS} done: {status}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let account = d.ok("account.get", json!({"account": acc})).await;
    assert_eq!(account["balance"], JOBS, "each top-up applied exactly once");
    let ledger = d
        .ok("account.ledger", json!({"account": acc, "limit": 5000}))
        .await;
    assert_eq!(ledger.as_array().map(Vec::len), Some(JOBS as usize));
    for id in ids.iter().step_by(97) {
        assert_eq!(d.ok("job.get", json!({"id": id})).await["state"], "done");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_and_restart_sqlite() {
    crash(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_and_restart_redis() {
    crash(Backend::Redis).await;
}

/// A job the daemon journalled but died before queueing (written here straight into
/// the stopped daemon's store, as the crash would leave it) is queued by the lost-job
/// sweep after the restart and runs once; so is a retry that was never queued.
async fn lost_jobs(backend: Backend) {
    let mut d = Daemon::start(backend);
    let (acc, _) = d.account("lost").await;
    d.kill9();
    for (id, state, reference) in [
        ("lost-pending", "pending", "p"),
        ("lost-retry", "failed", "f"),
    ] {
        let payload = json!({"account": acc, "amount": 7, "reference": reference});
        d.store_exec(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, \
             idempotency_key, pushed, created_at, updated_at, run_at) \
             VALUES ($1, 'topup', $2, $3, $4, 8, $5, $6, 1000, 1000, 1000)",
            &[
                id.into(),
                payload.to_string().into(),
                state.into(),
                i64::from(state == "failed").into(),
                format!("topup:{acc}:{reference}").into(),
                (state == "failed").into(),
            ],
        )
        .await;
    }
    d.spawn();
    for id in ["lost-pending", "lost-retry"] {
        d.job_until(id, &["done"], Duration::from_secs(30)).await;
    }
    assert_eq!(
        d.ok("account.get", json!({"account": acc})).await["balance"],
        14
    );
    assert!(d.log().contains("queueing a job the queue never got"));
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_jobs_are_queued_by_the_sweep_sqlite() {
    lost_jobs(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_jobs_are_queued_by_the_sweep_redis() {
    lost_jobs(Backend::Redis).await;
}

/// A finished inbound job keeps which message it was in the journal, never its text or
/// sender: those live with the message, where a data deletion run reaches them.
#[tokio::test(flavor = "multi_thread")]
async fn finished_inbound_jobs_keep_no_copy_of_the_message() {
    let d = Daemon::start(Backend::Sqlite);
    let (acc, admin) = d.account("scrub").await;
    let channel = d.loopback(acc, admin, json!({"rate_per_sec": 0})).await;
    let job = d
        .ok(
            "job.enqueue",
            json!({"kind": "inbound_message", "payload": {
                "channel": channel, "external_chat_id": "c1", "external_message_id": "m1",
                "sender": {"phone": "+79161234567", "name": "Secret Name"},
                "text": "secret text", "attachments": [], "sent_at": "2026-11-25T10:00:00Z"}}),
        )
        .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let done = d.job_until(&job, &["done"], Duration::from_secs(30)).await;
    assert_eq!(
        done["payload"],
        json!({"channel": channel, "external_message_id": "m1"}),
        "{done}"
    );
    let chats = d.ok("chat.list", json!({"account": acc})).await;
    let msgs = d.ok("chat.messages", json!({"chat": chats[0]["id"]})).await;
    assert_eq!(msgs[0]["text"], "secret text");
}

/// A Redis outage: a job enqueued while the server is down is accepted (it is in the
/// journal), and once Redis is back — empty, as a restarted cache-only server is — the
/// lost-job sweep queues it and it runs, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_accepted_while_redis_is_down_runs_once_it_is_back() {
    let mut d = Daemon::start(Backend::Redis);
    let (acc, _) = d.account("outage").await;
    d.redis.as_mut().expect("redis").stop();
    let id = d.ok("job.enqueue", topup(acc, 1)).await["id"]
        .as_str()
        .expect("job id")
        .to_owned();
    assert_eq!(
        d.ok("job.get", json!({"id": id})).await["state"],
        "pending",
        "recorded, not run"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.redis.as_mut().expect("redis").restart();
    d.job_until(&id, &["done"], Duration::from_secs(60)).await;
    let again = d.ok("job.enqueue", topup(acc, 1)).await;
    assert_eq!(
        again["id"],
        id.as_str(),
        "the same reference is the same job"
    );
    assert_eq!(again["existing"], true);
    assert_eq!(
        d.ok("account.get", json!({"account": acc})).await["balance"],
        1,
        "applied once"
    );
    assert!(d.log().contains("job recorded, not queued yet"));
}
