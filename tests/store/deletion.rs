//! Data deletion runs, on both stores: the epoch bump that hides older data at once,
//! batches that delete it in order with exact counts, and two daemons starting or
//! running one run at the same moment.

use patchbay_jobs::DomainError;
use patchbay_jobs::kind::{InboundMessage, JobKind};
use patchbay_jobs::model::Id;
use serde_json::json;

use crate::common::{Backend, TestStore, acme, pending_job};

on_both_stores!(
    a_run_deletes_the_older_data_in_batches_with_exact_counts,
    two_daemons_running_one_run_keep_its_counts_exact,
    two_daemons_starting_a_run_start_one,
);

/// Stores one inbound message from `phone` in the channel's chat `chat`; `true` if new.
pub async fn store_message(s: &TestStore, channel: Id, chat: &str, id: &str, phone: &str) -> bool {
    let msg: InboundMessage = serde_json::from_value(json!({
        "channel": channel, "external_chat_id": chat, "external_message_id": id,
        "sender": {"phone": phone}, "text": "hello", "sent_at": "2026-11-25T10:00:00Z",
    }))
    .expect("inbound");
    s.store_inbound(&msg, Some(phone)).await.expect("store")
}

/// An account with a channel and `chats` chats of `per_chat` messages, each chat with
/// a client of its own: (account, channel).
async fn with_traffic(s: &TestStore, chats: usize, per_chat: usize) -> (Id, Id) {
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let ch = s
        .add_channel(acc.id, "loopback", "Demo", &json!({}))
        .await
        .expect("channel");
    for c in 0..chats {
        let phone = format!("+49151123456{c:02}");
        for m in 0..per_chat {
            assert!(store_message(s, ch.id, &format!("c{c}"), &format!("m{c}-{m}"), &phone).await);
        }
    }
    (acc.id, ch.id)
}

async fn a_run_deletes_the_older_data_in_batches_with_exact_counts(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, ch) = with_traffic(&s, 2, 4).await;
    let field = s
        .add_field(acc, "Order", patchbay_jobs::fields::FieldType::Text, None)
        .await
        .expect("field");
    let first_chat = s.scalar("SELECT MIN(id) FROM chats").await;
    s.set_field_value(first_chat, field.id, &json!("A-1"))
        .await
        .expect("value");
    // Inbound jobs that died before storing their message keep its text: this
    // account's go with the run, another account's stay.
    let mut other = acme();
    other.admin.email = "boss@other.test".into();
    let (acc2, _) = s.create_account(&other).await.expect("other");
    let ch2 = s
        .add_channel(acc2.id, "loopback", "Other", &json!({}))
        .await
        .expect("channel");
    for (id, channel) in [("dead-mine", ch), ("dead-theirs", ch2.id)] {
        let payload = json!({"channel": channel, "external_message_id": "x", "text": "secret"});
        s.journal_mark_dead(&pending_job(id, JobKind::InboundMessage, payload), "bad")
            .await
            .expect("dead");
    }
    s.exec("UPDATE jobs SET created_at = 1").await;

    let (run, started) = s.start_deletion(acc).await.expect("start");
    assert!(started);
    assert_eq!((run.account, run.state.as_str()), (acc, "running"));
    let (again, started) = s.start_deletion(acc).await.expect("start again");
    assert_eq!((again.id, started), (run.id, false), "one run at a time");
    assert_eq!(s.running_deletions().await.expect("running")[0].id, run.id);
    // New traffic lands in a fresh chat and contact, which the run leaves alone.
    assert!(store_message(&s, ch, "c0", "after", "+4915112345600").await);
    assert_eq!(
        s.deletion_remaining(&run).await.expect("remaining"),
        8 + 2 + 2
    );

    let mut deleted = 0;
    let mut batches = 0;
    loop {
        let out = s.delete_batch(run.id, 3).await.expect("batch");
        assert!(out.deleted <= 3, "a batch deletes at most its limit");
        deleted += out.deleted;
        batches += 1;
        if out.finished {
            break;
        }
        assert!(batches < 50, "the run never finishes");
    }
    assert_eq!(deleted, 12);
    let done = s.deletion_run(run.id).await.expect("run");
    assert_eq!(
        (
            done.state.as_str(),
            done.deleted_messages,
            done.deleted_chats,
            done.deleted_contacts
        ),
        ("done", 8, 2, 2)
    );
    assert!(done.finished_at.is_some());
    assert_eq!(s.deletion_remaining(&run).await.expect("remaining"), 0);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM messages").await, 1);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM chats").await, 1);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM contacts").await, 1);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM field_values").await, 0);
    assert!(matches!(
        s.journal_get("dead-mine").await,
        Err(DomainError::NotFound(_))
    ));
    assert!(s.journal_get("dead-theirs").await.is_ok());
    // A finished run's batches do nothing; the latest run is this one.
    let out = s.delete_batch(run.id, 3).await.expect("after");
    assert_eq!((out.deleted, out.finished), (0, true));
    assert_eq!(
        s.latest_deletion(acc).await.expect("latest").map(|r| r.id),
        Some(run.id)
    );
    assert!(s.latest_deletion(acc2.id).await.expect("none").is_none());
    assert!(s.running_deletions().await.expect("running").is_empty());
    assert!(matches!(
        s.delete_batch(999, 3).await,
        Err(DomainError::NotFound(_))
    ));
    assert!(matches!(
        s.start_deletion(999).await,
        Err(DomainError::NotFound(_))
    ));
    // The next run hides the newer traffic in turn.
    let (next, started) = s.start_deletion(acc).await.expect("next");
    assert!(started && next.id != run.id && next.epoch > run.epoch);
}

/// Two daemons run the batches of one run at the same moment: together they delete
/// everything once, and the run's counts are exactly what went.
async fn two_daemons_running_one_run_keep_its_counts_exact(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, _) = with_traffic(&s, 4, 25).await;
    let (run, _) = s.start_deletion(acc).await.expect("start");
    let other = s.another_daemon().await;
    let drain = |store: std::sync::Arc<dyn patchbay_jobs::Store>| {
        tokio::spawn(async move {
            let mut deleted = 0;
            loop {
                let out = store.delete_batch(run.id, 7).await.expect("batch");
                deleted += out.deleted;
                if out.finished {
                    return deleted;
                }
            }
        })
    };
    let (x, y) = (drain(s.store.clone()), drain(other.store.clone()));
    let total = x.await.expect("x") + y.await.expect("y");
    assert_eq!(total, 100 + 4 + 4, "every row deleted once");
    let done = s.deletion_run(run.id).await.expect("run");
    assert_eq!(
        (
            done.state.as_str(),
            done.deleted_messages,
            done.deleted_chats,
            done.deleted_contacts
        ),
        ("done", 100, 4, 4)
    );
    assert_eq!(s.scalar("SELECT COUNT(*) FROM messages").await, 0);
}

/// Two daemons start a deletion of one account at once: one run starts, the other
/// daemon is handed it, and the epoch moves once.
async fn two_daemons_starting_a_run_start_one(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let other = s.another_daemon().await;
    for round in 1..=5 {
        let start = |store: std::sync::Arc<dyn patchbay_jobs::Store>| {
            tokio::spawn(async move { store.start_deletion(acc.id).await.expect("start") })
        };
        let (x, y) = (start(s.store.clone()), start(other.store.clone()));
        let ((rx, sx), (ry, sy)) = (x.await.expect("x"), y.await.expect("y"));
        assert!(sx != sy, "round {round}: exactly one started ({sx}, {sy})");
        assert_eq!(rx.id, ry.id);
        assert_eq!(
            s.scalar(&format!(
                "SELECT data_epoch FROM accounts WHERE id = {}",
                acc.id
            ))
            .await,
            round
        );
        // Finish it (nothing to delete) for the next round.
        assert!(s.delete_batch(rx.id, 10).await.expect("batch").finished);
    }
}
