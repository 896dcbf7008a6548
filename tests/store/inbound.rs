//! Storing inbound messages, on both stores: a batch stores what message-by-message
//! storage stores, contacts are found by phone, else sender id, else username (a
//! keyless sender writes as its chat's contact), unknown channels' jobs die, and jobs
//! queued without a journal row get theirs. Then two daemons at once: the same new
//! client's burst, stored by both, makes one contact and one chat, every message once
//! and the unread count exact; a data deletion run starting amid the traffic never
//! gets a message taken after its cutoff.

use std::collections::BTreeSet;
use std::sync::Arc;

use patchbay_jobs::DomainError;
use patchbay_jobs::handlers;
use patchbay_jobs::kind::{InboundMessage, JobKind};
use patchbay_jobs::model::{Id, JobRecord, JobState};
use patchbay_jobs::store::{BatchedJob, InboundJob};
use serde_json::{Value, json};
use tokio::sync::Barrier;

use crate::common::{Backend, TestStore, acme, pending_job};

on_both_stores!(
    a_batch_stores_what_message_by_message_stores,
    senders_by_messenger_id_or_name_alone_are_stored,
    unknown_channels_die_and_unjournalled_jobs_get_their_rows,
    a_nul_in_a_message_does_not_stop_it,
    two_daemons_storing_one_new_clients_burst_make_one_contact_and_one_chat,
    two_daemons_storing_one_message_store_it_once,
    a_deletion_run_starting_amid_traffic_gets_no_message_after_its_cutoff,
);

/// A fresh store with an account and a channel: (store, channel).
async fn store(b: Backend) -> (TestStore, Id) {
    let s = TestStore::open(b).await;
    let (acc, _) = s.create_account(&acme()).await.expect("account");
    let ch = s
        .add_channel(acc.id, "loopback", "Demo", &json!({}))
        .await
        .expect("channel");
    (s, ch.id)
}

fn msg(channel: Id, chat: &str, id: &str, sender: Value, minute: u32) -> InboundMessage {
    serde_json::from_value(json!({
        "channel": channel, "external_chat_id": chat, "external_message_id": id,
        "sender": sender, "text": format!("text {id}"), "attachments": [{"type": "image"}],
        "sent_at": format!("2026-11-25T10:{minute:02}:00Z"),
    }))
    .expect("message")
}

/// Traffic that exercises every rule: a contact found by phone written two ways, one
/// known by username that later gives its phone and name, two chats of one contact,
/// repeats of one message, and messages out of time order.
fn traffic(channel: Id) -> Vec<InboundMessage> {
    vec![
        msg(
            channel,
            "a",
            "1",
            json!({"phone": "+7 916 123-45-67", "name": "Ivan"}),
            5,
        ),
        msg(channel, "a", "2", json!({"phone": "79161234567"}), 3),
        msg(channel, "b", "3", json!({"username": "olga"}), 1),
        msg(
            channel,
            "b",
            "4",
            json!({"username": "olga", "phone": "+4915112345678", "name": "Olga"}),
            2,
        ),
        msg(channel, "a", "1", json!({"phone": "+79161234567"}), 9),
        msg(channel, "c", "5", json!({"phone": "+79161234567"}), 4),
        msg(channel, "b", "6", json!({"phone": "+4915112345678"}), 7),
    ]
}

fn job_named(name: String, m: InboundMessage) -> InboundJob {
    let phone = handlers::inbound_sender_phone(&m);
    InboundJob {
        job: name,
        msg: m,
        phone,
        max_attempts: 5,
    }
}

fn job(i: usize, m: InboundMessage) -> InboundJob {
    job_named(format!("job-{i}"), m)
}

/// A job queued from a connector event: a ULID id, no journal row.
fn event(m: InboundMessage) -> InboundJob {
    job_named(ulid::Ulid::new().to_string(), m)
}

async fn journal(s: &TestStore, jobs: &[InboundJob]) {
    let recs: Vec<JobRecord> = jobs
        .iter()
        .map(|j| pending_job(&j.job, JobKind::InboundMessage, json!({})))
        .collect();
    s.journal_insert_many(&recs, false).await.expect("journal");
}

/// Everything a reader sees of the inbound data, without ids' absolute values and times.
async fn snapshot(s: &TestStore) -> Vec<String> {
    let mut out = s
        .texts(
            "SELECT 'contact ' || coalesce(phone, '-') || ' ' || coalesce(username, '-') || ' ' \
             || coalesce(name, '-') FROM contacts \
             UNION ALL SELECT 'chat ' || c.external_chat_id || ' ' \
             || coalesce(k.phone, k.username, k.name, '-') \
             || ' ' || c.status || ' unread ' || c.unread || ' last ' || c.last_message_at \
             FROM chats c JOIN contacts k ON k.id = c.contact_id \
             UNION ALL SELECT 'message ' || m.external_message_id || ' in ' || c.external_chat_id \
             || ' ' || m.text || ' ' || m.attachments || ' ' || m.sent_at \
             FROM messages m JOIN chats c ON c.id = m.chat_id",
        )
        .await;
    out.sort();
    out
}

/// Stores `traffic` message by message in `one` and as one batch in `batch`, checks
/// that both stores then read alike, and returns the batch's jobs and what both read.
async fn one_and_batch(
    (one, ch1): (&TestStore, Id),
    (batch, ch2): (&TestStore, Id),
    traffic: impl Fn(Id) -> Vec<InboundMessage>,
) -> (Vec<InboundJob>, Vec<String>) {
    for m in traffic(ch1) {
        let phone = handlers::inbound_sender_phone(&m);
        one.store_inbound(&m, phone.as_deref())
            .await
            .expect("store");
    }
    let jobs: Vec<InboundJob> = traffic(ch2)
        .into_iter()
        .enumerate()
        .map(|(i, m)| job(i, m))
        .collect();
    journal(batch, &jobs).await;
    let out = batch.run_inbound_batch(&jobs).await.expect("batch");
    assert_eq!(out, vec![BatchedJob::Done; jobs.len()]);
    let expected = snapshot(one).await;
    assert_eq!(snapshot(batch).await, expected);
    (jobs, expected)
}

async fn a_batch_stores_what_message_by_message_stores(b: Backend) {
    let (one, ch1) = store(b).await;
    let (batch, ch2) = store(b).await;
    let (jobs, expected) = one_and_batch((&one, ch1), (&batch, ch2), traffic).await;
    assert!(
        expected.contains(&"contact +79161234567 - Ivan".to_owned()),
        "{expected:?}"
    );
    assert!(expected.contains(&"contact +4915112345678 olga Olga".to_owned()));
    assert!(
        expected
            .iter()
            .any(|r| r.starts_with("chat a +79161234567 open unread 2")),
        "{expected:?}"
    );
    assert_eq!(
        expected
            .iter()
            .filter(|r| r.starts_with("message "))
            .count(),
        6
    );
    // The identities the contacts were created under: the first key of the first
    // message (a contact found by username keeps `user:` after it gave its phone).
    let identities = batch
        .texts("SELECT identity FROM contacts ORDER BY identity")
        .await;
    assert_eq!(identities, ["phone:+79161234567", "user:olga"]);

    // Run again, and as one-message batches: nothing changes, every job stays done.
    assert_eq!(
        batch.run_inbound_batch(&jobs).await.expect("again"),
        vec![BatchedJob::AlreadyFinished; jobs.len()]
    );
    for j in &jobs {
        batch
            .run_inbound_batch(std::slice::from_ref(j))
            .await
            .expect("single");
    }
    assert_eq!(snapshot(&batch).await, expected);
    let states = batch
        .texts("SELECT state || ' ' || attempts FROM jobs ORDER BY id")
        .await;
    assert!(states.iter().all(|s| s == "done 1"), "{states:?}");
}

/// Senders known by the messenger's id alone, or only by a name: each message is
/// stored, the same id finds the same contact on its channel (in another chat too),
/// and a name-only sender writes as its chat's contact.
async fn senders_by_messenger_id_or_name_alone_are_stored(b: Backend) {
    let (one, ch1) = store(b).await;
    let (batch, ch2) = store(b).await;
    let traffic = |ch: Id| {
        vec![
            msg(ch, "43", "1", json!({"id": "43", "name": "Bob"}), 1),
            msg(ch, "43", "2", json!({"id": "43"}), 2),
            // A group chat: the same user is the same contact.
            msg(ch, "-100", "3", json!({"id": "43", "name": "Bob"}), 3),
            msg(ch, "n1", "4", json!({"name": "Nameless"}), 4),
            msg(ch, "n1", "5", json!({"name": "Someone else"}), 5),
            // Later the user gives a phone: the contact found by id gets it.
            msg(
                ch,
                "43",
                "6",
                json!({"id": "43", "phone": "+79161234567"}),
                6,
            ),
        ]
    };
    let (_, expected) = one_and_batch((&one, ch1), (&batch, ch2), traffic).await;
    let contacts: Vec<String> = expected
        .iter()
        .filter(|r| r.starts_with("contact "))
        .cloned()
        .collect();
    assert_eq!(
        contacts,
        vec!["contact +79161234567 - Bob", "contact - - Nameless"],
        "{expected:?}"
    );
    assert_eq!(
        expected
            .iter()
            .filter(|r| r.starts_with("message "))
            .count(),
        6
    );
    assert!(
        expected
            .iter()
            .any(|r| r.starts_with("chat -100 +79161234567 open unread 1")),
        "{expected:?}"
    );
    let identities = batch
        .texts("SELECT identity FROM contacts ORDER BY identity")
        .await;
    assert_eq!(
        identities,
        [format!("chat:{ch2}:n1"), format!("id:{ch2}:43")],
        "a keyless sender's contact is named by its chat"
    );

    // The id is the channel's: the same id on another channel is another person.
    let account = batch.channel(ch2).await.expect("channel").account;
    let other = batch
        .add_channel(account, "loopback", "Other", &json!({}))
        .await
        .expect("channel");
    let m = msg(other.id, "43", "1", json!({"id": "43"}), 7);
    let phone = handlers::inbound_sender_phone(&m);
    batch
        .store_inbound(&m, phone.as_deref())
        .await
        .expect("store");
    assert_eq!(batch.scalar("SELECT COUNT(*) FROM contacts").await, 3);
}

async fn unknown_channels_die_and_unjournalled_jobs_get_their_rows(b: Backend) {
    let (s, ch) = store(b).await;
    let good = job(0, msg(ch, "a", "1", json!({"phone": "+79161234567"}), 1));
    let lost = job(
        1,
        msg(ch + 100, "a", "1", json!({"phone": "+79161234567"}), 1),
    );
    // Queued from a connector event: no journal row until its batch ran.
    let fresh = job(2, msg(ch, "a", "2", json!({"phone": "+79161234567"}), 1));
    let mut fresh_ulid = fresh.clone();
    fresh_ulid.job = ulid::Ulid::new().to_string();
    fresh_ulid.msg.external_message_id = "3".into();
    let stray_dead = job(
        3,
        msg(ch + 100, "a", "9", json!({"phone": "+79161234567"}), 1),
    );
    journal(&s, &[good.clone(), lost.clone()]).await;
    let batch = [
        good,
        lost,
        fresh.clone(),
        fresh_ulid.clone(),
        stray_dead.clone(),
    ];
    let out = s.run_inbound_batch(&batch).await.expect("batch");
    assert_eq!(out[0], BatchedJob::Done);
    assert!(
        matches!(&out[1], BatchedJob::Dead(r) if r.contains("does not exist")),
        "{out:?}"
    );
    assert_eq!(out[2], BatchedJob::Done);
    assert_eq!(out[3], BatchedJob::Done);
    // A dead job the journal does not know goes the per-job path, which writes its
    // row with the whole payload (so `job.retry` can run it again).
    assert_eq!(out[4], BatchedJob::NotJournalled);
    assert!(matches!(
        s.journal_get("job-3").await,
        Err(DomainError::NotFound(_))
    ));
    let dead = s.journal_get("job-1").await.expect("job");
    assert_eq!(dead.state, JobState::Dead);

    let row = s
        .journal_get("job-2")
        .await
        .expect("row written by the batch");
    assert_eq!(row.kind, JobKind::InboundMessage);
    assert_eq!(row.state, JobState::Done);
    assert_eq!((row.attempts, row.max_attempts), (1, 5));
    assert_eq!(
        row.payload,
        json!({"channel": ch, "external_message_id": "2"}),
        "scrubbed: no text or sender"
    );
    // Done, so never one the lost-job sweep would queue again.
    let lost_rows = s
        .journal_claim_lost(i64::MAX / 2, 0, 0, 100)
        .await
        .expect("sweep");
    assert!(!lost_rows.iter().any(|r| r.id == "job-2"), "{lost_rows:?}");
    // A ULID id dates its row from its own creation, not from the batch.
    let created = s
        .journal_get(&fresh_ulid.job)
        .await
        .expect("row")
        .created_at;
    let minted = ulid::Ulid::from_string(&fresh_ulid.job)
        .expect("ulid")
        .timestamp_ms();
    assert_eq!(u64::try_from(created).expect("time"), minted);

    assert_eq!(
        s.scalar("SELECT COUNT(*) FROM messages").await,
        3,
        "the known channel's messages, once each"
    );
    // Redelivered: the rows say done, nothing is stored again.
    let again = s
        .run_inbound_batch(&[fresh.clone(), fresh_ulid])
        .await
        .expect("again");
    assert_eq!(again, vec![BatchedJob::AlreadyFinished; 2]);
    assert_eq!(
        s.journal_get("job-2").await.expect("row").attempts,
        1,
        "a redelivery is not an attempt"
    );
    let dup = s
        .store_inbound(&fresh.msg, fresh.phone.as_deref())
        .await
        .expect("per-job path");
    assert!(!dup, "a duplicate");
    assert!(matches!(
        s.store_inbound(&stray_dead.msg, None).await,
        Err(DomainError::NotFound(_))
    ));
}

/// A connector may pass NUL on (JSON `\u0000`), which PostgreSQL's TEXT cannot hold:
/// the message is stored all the same (there as U+FFFD), never refused for good.
async fn a_nul_in_a_message_does_not_stop_it(b: Backend) {
    let (s, ch) = store(b).await;
    let mut m = msg(
        ch,
        "a\0b",
        "m\0-1",
        json!({"username": "o\0lga", "name": "N\0"}),
        1,
    );
    m.text = "hello\0world".into();
    let jobs = [event(m.clone())];
    assert_eq!(
        s.run_inbound_batch(&jobs).await.expect("batch"),
        [BatchedJob::Done]
    );
    assert!(
        !s.store_inbound(&m, None).await.expect("again"),
        "stored once"
    );
    let chat = s.scalar("SELECT id FROM chats").await;
    let text = &s.messages(chat, 10, None).await.expect("messages")[0].text;
    let expected = match b {
        Backend::Sqlite => "hello\0world",
        Backend::Postgres => "hello\u{FFFD}world",
    };
    assert_eq!(text, expected);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM contacts").await, 1);
}

/// One daemon's share of a burst: its messages in batches of `per_batch`, several
/// batches at once (as its worker's connections run them), all jobs done.
async fn run_share(
    s: Arc<TestStore>,
    msgs: Vec<InboundMessage>,
    per_batch: usize,
    start: Arc<Barrier>,
) {
    let batches: Vec<Vec<InboundJob>> = msgs
        .chunks(per_batch)
        .map(|c| c.iter().cloned().map(event).collect())
        .collect();
    start.wait().await;
    let runs: Vec<_> = batches
        .into_iter()
        .map(|jobs| {
            let s = s.clone();
            tokio::spawn(async move {
                let out = s.run_inbound_batch(&jobs).await.expect("batch");
                assert_eq!(out, vec![BatchedJob::Done; jobs.len()]);
            })
        })
        .collect();
    for r in runs {
        r.await.expect("batch task");
    }
}

/// Two daemons take the same new client's burst at once, each a share that overlaps
/// the other's (a redelivery on the other daemon): one contact, one chat, every message
/// once, the unread count exact. For a client known by phone, by username only, by no
/// key at all, and by messages carrying different keys of it (the messenger's id
/// alone; the id with a phone).
async fn two_daemons_storing_one_new_clients_burst_make_one_contact_and_one_chat(b: Backend) {
    let (first, ch) = store(b).await;
    let first = Arc::new(first);
    let second = Arc::new(first.another_daemon().await);
    type Senders = fn(usize) -> Value;
    let clients: [(&str, Senders); 4] = [
        (
            "phone",
            |_| json!({"phone": "+79161234567", "name": "Ivan"}),
        ),
        ("username", |_| json!({"username": "olga"})),
        ("keyless", |_| json!({"name": "Nameless"})),
        // The second daemon's batches start with the phone, the first daemon's first
        // ones without: two writers creating under different identities at once,
        // which only the lock of the new senders' keys serialises.
        ("mixed", |i| {
            if i % 4 == 0 && i >= 20 {
                json!({"id": "43", "phone": "+4915112345678"})
            } else {
                json!({"id": "43"})
            }
        }),
    ];
    let (total, overlap, per_batch) = (60, 20, 4);
    let mut contacts = 0;
    for (label, sender) in clients {
        for attempt in 0..3 {
            let chat = format!("{label}-{attempt}");
            let all: Vec<InboundMessage> = (0..total)
                .map(|i| {
                    msg(
                        ch,
                        &chat,
                        &format!("{chat}-{i}"),
                        sender(i),
                        (i % 60) as u32,
                    )
                })
                .collect();
            // The first daemon takes messages [0, 40), the second [20, 60): [20, 40)
            // reach both.
            let half = (total + overlap) / 2;
            let mine = all[..half].to_vec();
            let theirs = all[total - half..].to_vec();
            let start = Arc::new(Barrier::new(2));
            tokio::join!(
                run_share(first.clone(), mine, per_batch, start.clone()),
                run_share(second.clone(), theirs, per_batch, start),
            );
            let chats = first
                .texts(&format!(
                    "SELECT id || ' ' || contact_id || ' ' || unread || ' ' || status \
                     FROM chats WHERE external_chat_id = '{chat}'"
                ))
                .await;
            assert_eq!(chats.len(), 1, "{label}: one chat, got {chats:?}");
            let fields: Vec<&str> = chats[0].split(' ').collect();
            assert_eq!(
                (fields[2], fields[3]),
                (total.to_string().as_str(), "open"),
                "{label}: every message counted unread once"
            );
            let messages = first
                .scalar(&format!(
                    "SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id \
                     WHERE c.external_chat_id = '{chat}'"
                ))
                .await;
            assert_eq!(messages, total as i64, "{label}: every message once");
            let distinct = first
                .scalar(&format!(
                    "SELECT COUNT(DISTINCT m.external_message_id) FROM messages m \
                     JOIN chats c ON c.id = m.chat_id WHERE c.external_chat_id = '{chat}'"
                ))
                .await;
            assert_eq!(distinct, total as i64);
            // A keyed client is one contact from its first burst on; a keyless sender
            // is its chat's contact.
            if attempt == 0 || label == "keyless" {
                contacts += 1;
            }
            assert_eq!(
                first.scalar("SELECT COUNT(*) FROM contacts").await,
                contacts,
                "{label}, attempt {attempt}: one contact"
            );
        }
    }
    // Across every attempt: the keyed clients are one contact each however many chats
    // they wrote from, a keyless sender one per chat.
    let mut identities = BTreeSet::from_iter(
        first
            .texts("SELECT identity FROM contacts ORDER BY identity")
            .await,
    );
    // The mixed client's: whichever daemon created it first named it.
    let mixed = [format!("id:{ch}:43"), "phone:+4915112345678".to_owned()];
    assert!(
        identities.remove(&mixed[0]) ^ identities.remove(&mixed[1]),
        "{identities:?}"
    );
    let expected = BTreeSet::from_iter([
        format!("chat:{ch}:keyless-0"),
        format!("chat:{ch}:keyless-1"),
        format!("chat:{ch}:keyless-2"),
        "phone:+79161234567".to_owned(),
        "user:olga".to_owned(),
    ]);
    assert_eq!(identities, expected);
    let mixed = first
        .texts(
            "SELECT coalesce(phone, '-') || ' ' || coalesce(sender_id, '-') FROM contacts \
             WHERE sender_id IS NOT NULL",
        )
        .await;
    assert_eq!(
        mixed,
        ["+4915112345678 43"],
        "one contact has the id and the phone"
    );
    let chats = first.scalar("SELECT COUNT(*) FROM chats").await;
    assert_eq!(chats, 12);
}

/// The same message delivered to both daemons at once, over and over: stored once,
/// counted once, both jobs done.
async fn two_daemons_storing_one_message_store_it_once(b: Backend) {
    let (first, ch) = store(b).await;
    let first = Arc::new(first);
    let second = Arc::new(first.another_daemon().await);
    let rounds = 20;
    for i in 0..rounds {
        let m = msg(
            ch,
            "c1",
            &format!("m{i}"),
            json!({"phone": "+79161234567"}),
            1,
        );
        let start = Arc::new(Barrier::new(2));
        tokio::join!(
            run_share(first.clone(), vec![m.clone()], 1, start.clone()),
            run_share(second.clone(), vec![m], 1, start),
        );
    }
    // And the per-job path against a batch.
    let m = msg(ch, "c1", "last", json!({"phone": "+79161234567"}), 2);
    let jobs = [event(m.clone())];
    let (one, two) = tokio::join!(
        first.store_inbound(&m, Some("+79161234567")),
        second.run_inbound_batch(&jobs),
    );
    assert_eq!(two.expect("batch"), [BatchedJob::Done]);
    // Whichever stored it, the other found it stored.
    one.expect("store");
    assert_eq!(
        first.scalar("SELECT COUNT(*) FROM messages").await,
        rounds + 1
    );
    assert_eq!(first.scalar("SELECT COUNT(*) FROM chats").await, 1);
    assert_eq!(first.scalar("SELECT COUNT(*) FROM contacts").await, 1);
    assert_eq!(first.scalar("SELECT unread FROM chats").await, rounds + 1);
}

/// Inbound traffic on two daemons while a data deletion run starts: every message
/// created at or after the run's cutoff is in the new epoch's chats (kept), none in a
/// chat the run deletes.
async fn a_deletion_run_starting_amid_traffic_gets_no_message_after_its_cutoff(b: Backend) {
    let (first, ch) = store(b).await;
    let account = first.channel(ch).await.expect("channel").account;
    let first = Arc::new(first);
    let second = Arc::new(first.another_daemon().await);
    let traffic = |s: Arc<TestStore>, tag: &'static str| {
        tokio::spawn(async move {
            for i in 0..40 {
                let jobs: Vec<InboundJob> = (0..5)
                    .map(|k| {
                        let sender = json!({"phone": format!("+7916123{:04}", k)});
                        event(msg(
                            ch,
                            &format!("c{k}"),
                            &format!("{tag}-{i}-{k}"),
                            sender,
                            1,
                        ))
                    })
                    .collect();
                let out = s.run_inbound_batch(&jobs).await.expect("batch");
                assert_eq!(out, vec![BatchedJob::Done; jobs.len()]);
            }
        })
    };
    let a = traffic(first.clone(), "a");
    let b2 = traffic(second.clone(), "b");
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let (run, started) = first.start_deletion(account).await.expect("start");
    assert!(started);
    a.await.expect("traffic");
    b2.await.expect("traffic");
    let late_in_old = first
        .scalar(&format!(
            "SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id \
             WHERE c.epoch < {} AND m.created_at >= {}",
            run.epoch, run.cutoff
        ))
        .await;
    assert_eq!(
        late_in_old, 0,
        "a message after the cutoff in a deleted epoch"
    );
    assert_eq!(first.scalar("SELECT COUNT(*) FROM messages").await, 400);
    // New traffic lands in fresh chats and contacts of the new epoch only.
    let stale = first
        .scalar(&format!(
            "SELECT COUNT(*) FROM chats c JOIN contacts k ON k.id = c.contact_id \
             WHERE c.epoch <> k.epoch OR (c.epoch = {} AND c.created_at < {})",
            run.epoch, run.cutoff
        ))
        .await;
    assert_eq!(stale, 0);
}
