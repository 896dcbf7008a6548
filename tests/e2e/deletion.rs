//! Background data deletion: race-free cutoff semantics under live traffic, exact counts,
//! resumption after kill -9, and the admin-only rule. Old data is seeded through the
//! real pipeline, then multiplied with one INSERT … SELECT into the daemon's own SQLite
//! file, so 100,000 messages exist without waiting for 100,000 jobs.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon};

const CHATS: usize = 5;
const OLD_MESSAGES: i64 = 100_000;

fn inbound(channel: i64, chat: usize, msg: &str) -> Value {
    json!({"kind": "inbound_message", "payload": {
        "channel": channel, "external_chat_id": format!("chat-{chat}"), "external_message_id": msg,
        "sender": {"phone": format!("+7916000000{chat}"), "name": format!("Client {chat}")},
        "text": "hello", "attachments": [], "sent_at": "2026-11-25T10:00:00Z"}})
}

async fn enqueue_and_wait(d: &Daemon, jobs: Vec<Value>) {
    let mut client = d.client().await;
    let mut ids = Vec::new();
    for job in jobs {
        let r = client.call("job.enqueue", job).await.expect("enqueue");
        ids.push(r["id"].as_str().expect("id").to_owned());
    }
    for id in ids {
        d.job_until(&id, &["done"], Duration::from_secs(60)).await;
    }
}

/// Seeds CHATS chats with OLD_MESSAGES messages in all; returns (account, admin, channel).
async fn seed(d: &Daemon) -> (i64, i64, i64) {
    let (acc, admin) = d.account("del").await;
    let channel = d
        .loopback(acc, admin, json!({"rate_per_sec": 0, "id_prefix": "d"}))
        .await;
    enqueue_and_wait(
        d,
        (0..CHATS)
            .map(|c| inbound(channel, c, &format!("old-{c}")))
            .collect(),
    )
    .await;
    let extra = OLD_MESSAGES - CHATS as i64;
    d.store_exec(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
         INSERT INTO messages (account_id, chat_id, channel_id, direction, external_message_id, \
         text, attachments, status, sent_at, created_at) \
         SELECT m.account_id, m.chat_id, m.channel_id, 'in', 'bulk-' || n.i || '-' || m.chat_id, \
         'old text', '[]', 'received', m.sent_at, m.created_at \
         FROM n JOIN messages m ON m.id = (SELECT MIN(id) FROM messages) + (n.i % $2)",
        &[extra.into(), (CHATS as i64).into()],
    )
    .await;
    let total = d.store_count("SELECT COUNT(*) FROM messages").await;
    assert_eq!(total, OLD_MESSAGES);
    (acc, admin, channel)
}

async fn wait_done(d: &Daemon, acc: i64, limit: Duration) -> Value {
    d.until("deletion run done", limit, || async {
        let s = d.ok("data.deletion_status", json!({"account": acc})).await;
        (s["state"] == "done").then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_races_live_traffic_and_keeps_everything_after_the_cutoff() {
    let d = Daemon::start_with(
        Backend::Sqlite,
        "[deletion]\nbatch_size = 500\npause_ms = 2\n",
    );
    let (acc, admin, channel) = seed(&d).await;
    let old_chats: Vec<Value> = d
        .ok("chat.list", json!({"account": acc}))
        .await
        .as_array()
        .cloned()
        .expect("chats");
    assert_eq!(old_chats.len(), CHATS);

    // An inbound event that cannot be stored (a blank sender id) is kept as a dead job,
    // its text and sender in the journal, until the account's deletion run.
    let bad = json!({
        "type": "inbound", "external_chat_id": "c-dead", "external_message_id": "dead-one",
        "sender": {"id": " ", "name": "Secret Name"}, "text": "secret text",
        "sent_at": "2026-12-01T10:00:00Z"
    });
    d.loopback(
        acc,
        admin,
        json!({"raw_events": [bad.to_string()], "id_prefix": "dd"}),
    )
    .await;
    let dead_job = d
        .until(
            "the refused event is a dead job",
            Duration::from_secs(30),
            || async {
                let dead = d
                    .ok(
                        "job.list",
                        json!({"state": "dead", "kind": "inbound_message"}),
                    )
                    .await;
                dead.as_array()?
                    .iter()
                    .find(|j| j["payload"]["external_message_id"] == "dead-one")
                    .and_then(|j| j["id"].as_str().map(str::to_owned))
            },
        )
        .await;
    let run = d
        .ok("data.delete", json!({"account": acc, "actor": admin}))
        .await;
    assert_eq!(run["created"], true);
    assert_eq!(run["state"], "running");
    // Nothing from before the cutoff is visible once the run started.
    assert_eq!(d.ok("chat.list", json!({"account": acc})).await, json!([]));
    d.fails("chat.get", json!({"chat": old_chats[0]["id"]}), "not_found")
        .await;
    d.fails(
        "chat.messages",
        json!({"chat": old_chats[0]["id"]}),
        "not_found",
    )
    .await;

    // The same clients keep writing while the run deletes their old history.
    let mut new_jobs = Vec::new();
    for i in 0..200 {
        new_jobs.push(inbound(channel, i % CHATS, &format!("new-{i}")));
    }
    enqueue_and_wait(&d, new_jobs).await;
    let status = wait_done(&d, acc, Duration::from_secs(120)).await;
    assert_eq!(
        status["deleted"],
        json!({"messages": OLD_MESSAGES, "chats": CHATS, "contacts": CHATS}),
        "{status}"
    );
    assert_eq!(status["remaining_estimate"], 0);

    // Every message after the cutoff is there, one by one; new chats, new contacts.
    let chats = d.ok("chat.list", json!({"account": acc})).await;
    let chats = chats.as_array().expect("chats");
    assert_eq!(chats.len(), CHATS);
    let mut seen = std::collections::HashSet::new();
    for chat in chats {
        assert!(
            old_chats
                .iter()
                .all(|o| o["id"] != chat["id"] && o["contact"] != chat["contact"]),
            "fresh chat and contact"
        );
        let msgs = d
            .ok("chat.messages", json!({"chat": chat["id"], "limit": 1000}))
            .await;
        for m in msgs.as_array().expect("msgs") {
            assert!(m["created_at"].as_i64() >= status["cutoff"].as_i64());
            seen.insert(
                m["external_message_id"]
                    .as_str()
                    .expect("ext id")
                    .to_owned(),
            );
        }
    }
    assert_eq!(seen.len(), 200);
    assert!((0..200).all(|i| seen.contains(&format!("new-{i}"))));
    // A pre-cutoff inbound job that died keeps its message only in the journal: gone.
    d.fails("job.get", json!({"id": dead_job}), "not_found")
        .await;
    // Channels, users, settings and the ledger are untouched.
    assert_eq!(
        d.ok("channel.list", json!({"account": acc})).await[0]["status"],
        "connected"
    );
    assert!(d.ok("account.get", json!({"account": acc})).await["settings"].is_object());
}

#[tokio::test(flavor = "multi_thread")]
async fn deletion_resumes_after_kill_9_with_exact_counts() {
    let mut d = Daemon::start_with(
        Backend::Sqlite,
        "[deletion]\nbatch_size = 200\npause_ms = 3\n",
    );
    let (acc, admin, _) = seed(&d).await;
    d.ok("data.delete", json!({"account": acc, "actor": admin}))
        .await;
    d.until("some rows deleted", Duration::from_secs(60), || async {
        let s = d.ok("data.deletion_status", json!({"account": acc})).await;
        assert_eq!(
            s["state"], "running",
            "finished before the kill; make the run slower"
        );
        (s["deleted"]["messages"].as_i64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    d.kill9();
    d.spawn();
    let status = wait_done(&d, acc, Duration::from_secs(180)).await;
    assert_eq!(
        status["deleted"],
        json!({"messages": OLD_MESSAGES, "chats": CHATS, "contacts": CHATS}),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_administrators_delete_and_one_run_at_a_time() {
    let d = Daemon::start_with(
        Backend::Sqlite,
        "[deletion]\nbatch_size = 100\npause_ms = 5\n",
    );
    let (acc, admin, _) = seed(&d).await;
    let op = d
        .ok(
            "user.add",
            json!({"account": acc, "name": "Op", "email": "op@del.test", "role": "operator"}),
        )
        .await;
    d.fails(
        "data.delete",
        json!({"account": acc, "actor": op["id"]}),
        "forbidden",
    )
    .await;
    assert_eq!(
        d.ok("data.deletion_status", json!({"account": acc})).await,
        Value::Null,
        "nothing started"
    );
    assert_eq!(
        d.ok("chat.list", json!({"account": acc}))
            .await
            .as_array()
            .map(Vec::len),
        Some(CHATS)
    );
    let first = d
        .ok("data.delete", json!({"account": acc, "actor": admin}))
        .await;
    let second = d
        .ok("data.delete", json!({"account": acc, "actor": admin}))
        .await;
    assert_eq!(second["run"], first["run"]);
    assert_eq!(second["created"], false);
    wait_done(&d, acc, Duration::from_secs(180)).await;
    let third = d
        .ok("data.delete", json!({"account": acc, "actor": admin}))
        .await;
    assert_ne!(
        third["run"], first["run"],
        "a finished run makes room for a new one"
    );
}

/// A run recorded just before a crash, whose job was never queued (written here into
/// the stopped daemon's store as the crash leaves it), is resumed at start.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_without_its_job_resumes_at_start() {
    let mut d = Daemon::start_with(
        Backend::Sqlite,
        "[deletion]\nbatch_size = 5000\npause_ms = 0\n",
    );
    let (acc, _, _) = seed(&d).await;
    d.kill9();
    let now = chrono::Utc::now().timestamp_millis();
    let epoch = d
        .store_scalar(
            "UPDATE accounts SET data_epoch = data_epoch + 1 WHERE id = $1 RETURNING data_epoch",
            &[acc.into()],
        )
        .await;
    d.store_exec(
        "INSERT INTO deletion_runs (account_id, cutoff, epoch, state, started_at) \
         VALUES ($1, $2, $3, 'running', $2)",
        &[acc.into(), now.into(), epoch.into()],
    )
    .await;
    d.spawn();
    let status = wait_done(&d, acc, Duration::from_secs(120)).await;
    assert_eq!(
        status["deleted"],
        json!({"messages": OLD_MESSAGES, "chats": CHATS, "contacts": CHATS}),
        "{status}"
    );
}
