//! The job journal, on both stores: dead-marking without reading, the lost-job sweep,
//! retention, idempotency keys, and two daemons sweeping or inserting at once.

use std::collections::HashSet;

use patchbay_jobs::DomainError;
use patchbay_jobs::kind::JobKind;
use patchbay_jobs::model::{JobRecord, JobState, now_ms};
use patchbay_jobs::store::JournalInsert;
use serde_json::json;

use crate::common::{Backend, TestStore, pending_job};

on_both_stores!(
    mark_dead_needs_no_readable_row,
    a_lost_job_is_claimed_until_a_push_is_recorded,
    jobs_journalled_as_pushed_are_lost_only_once_stale,
    the_journal_keeps_finished_jobs_for_the_retention_only,
    an_idempotency_key_holds_one_job,
    a_job_started_without_a_row_gets_one,
    two_sweeps_never_claim_the_same_job,
    two_daemons_inserting_one_key_make_one_job,
);

fn ulid(n: u128) -> String {
    ulid::Ulid::from_parts(1, n).to_string()
}

fn keyed(id: &str, key: &str) -> JobRecord {
    JobRecord {
        idempotency_key: Some(key.into()),
        ..pending_job(id, JobKind::ChargeAccount, json!({"account": 1}))
    }
}

/// How many jobs match a condition of portable SQL.
async fn jobs_where(s: &TestStore, cond: &str) -> i64 {
    s.scalar(&format!("SELECT COUNT(*) FROM jobs WHERE {cond}"))
        .await
}

/// A rejected job is marked dead without its row being read: a row whose payload
/// no longer parses cannot make it fail for good; done and dead rows stay, and so
/// does another row holding the job's idempotency key.
async fn mark_dead_needs_no_readable_row(b: Backend) {
    let s = TestStore::open(b).await;
    let job = |id: &str| pending_job(id, JobKind::SendMessage, json!({"message": 1}));
    s.journal_insert(&job("corrupt")).await.expect("insert");
    s.exec("UPDATE jobs SET payload = '[[[not json' WHERE id = 'corrupt'")
        .await;
    s.journal_mark_dead(&job("corrupt"), "poison")
        .await
        .expect("mark");
    s.journal_mark_dead(&job("fresh"), "poison")
        .await
        .expect("mark");
    let done = job("done");
    s.journal_insert(&done).await.expect("insert");
    s.journal_finish("done", JobState::Done, None, 2)
        .await
        .expect("finish");
    s.journal_mark_dead(&done, "late").await.expect("mark");
    // A dead job marked dead again keeps its first reason and attempt count.
    s.journal_mark_dead(&job("fresh"), "again")
        .await
        .expect("mark");
    // Another row holds the key: neither it nor a new row changes.
    s.journal_insert(&keyed("holder", "k"))
        .await
        .expect("insert");
    s.journal_mark_dead(&keyed("other", "k"), "poison")
        .await
        .expect("mark");

    assert_eq!(
        jobs_where(
            &s,
            "id = 'corrupt' AND state = 'dead' AND last_error = 'poison' AND attempts = 1 \
             AND payload = '[[[not json'"
        )
        .await,
        1,
        "the corrupt row is dead, its payload untouched, the attempt counted"
    );
    let fresh = s.journal_get("fresh").await.expect("fresh");
    assert_eq!(
        (fresh.state, fresh.last_error.as_deref(), fresh.attempts),
        (JobState::Dead, Some("poison"), 1)
    );
    assert_eq!(
        fresh.payload,
        json!({"message": 1}),
        "written from the record"
    );
    let done = s.journal_get("done").await.expect("done");
    assert_eq!((done.state, done.last_error), (JobState::Done, None));
    assert_eq!(
        s.journal_get("holder").await.expect("holder").state,
        JobState::Pending
    );
    assert!(matches!(
        s.journal_get("other").await,
        Err(DomainError::NotFound(_))
    ));
    assert_eq!(jobs_where(&s, "TRUE").await, 4);
}

async fn a_lost_job_is_claimed_until_a_push_is_recorded(b: Backend) {
    let s = TestStore::open(b).await;
    let id = ulid(1);
    let rec = pending_job(&id, JobKind::SendMessage, json!({"message": 1}));
    s.journal_insert_many(&[rec], false).await.expect("insert");
    let (grace, stale) = (1_000, 60_000);
    let claimed = s
        .journal_claim_lost(10_000, grace, stale, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "journalled, never pushed: lost");
    assert_eq!(claimed[0].id, id);
    assert_eq!(
        (claimed[0].state, claimed[0].updated_at, claimed[0].run_at),
        (JobState::Pending, 10_000, 10_000)
    );
    assert!(
        s.journal_claim_lost(10_500, grace, stale, 10)
            .await
            .expect("claim")
            .is_empty(),
        "within the grace another sweep leaves it to the first"
    );
    // The first sweep died before its push: after the grace it is claimed again.
    let again = s
        .journal_claim_lost(12_000, grace, stale, 10)
        .await
        .expect("claim");
    assert_eq!(again.len(), 1, "a claim whose push never happened");
    s.journal_mark_pushed(std::slice::from_ref(&id), true)
        .await
        .expect("pushed");
    assert!(
        s.journal_claim_lost(20_000, grace, stale, 10)
            .await
            .expect("claim")
            .is_empty(),
        "a pushed job is not lost"
    );
    // Queued, and no worker ever started it: the queue lost it (Redis restarted
    // empty). After `stale` it is queued again.
    let requeued = s
        .journal_claim_lost(12_000 + stale + 1, grace, stale, 10)
        .await
        .expect("claim");
    assert_eq!(requeued.len(), 1, "queued long ago and never started");
    // A failed job whose retry is overdue (its daemon died before queueing it).
    s.journal_finish(&id, JobState::Failed, Some("try later"), 100_000)
        .await
        .expect("failed");
    assert!(
        s.journal_claim_lost(100_500, grace, stale, 10)
            .await
            .expect("claim")
            .is_empty(),
        "a retry not yet overdue is the queue's"
    );
    let retried = s
        .journal_claim_lost(101_001, grace, stale, 10)
        .await
        .expect("claim");
    assert_eq!(retried.len(), 1, "an overdue retry is queued again");
    assert_eq!(retried[0].state, JobState::Pending);
}

async fn jobs_journalled_as_pushed_are_lost_only_once_stale(b: Backend) {
    let s = TestStore::open(b).await;
    let id = ulid(1);
    let rec = pending_job(&id, JobKind::InboundMessage, json!({"x": 1}));
    s.journal_insert_many(&[rec], true).await.expect("insert");
    let (grace, stale) = (1_000, 60_000);
    assert!(
        s.journal_claim_lost(10_000, grace, stale, 10)
            .await
            .expect("claim")
            .is_empty(),
        "recorded as queued: not lost after the grace"
    );
    let requeued = s
        .journal_claim_lost(1 + stale + 1, grace, stale, 10)
        .await
        .expect("claim");
    assert_eq!(
        requeued.len(),
        1,
        "the push never happened (a crash): stale, queued again"
    );
}

async fn the_journal_keeps_finished_jobs_for_the_retention_only(b: Backend) {
    let s = TestStore::open(b).await;
    // Ids are ULIDs: the purge finds old jobs by their creation time in the id.
    let (done_id, dead_id, pending_id) = (ulid(1), ulid(2), ulid(3));
    let rec = |id: &str, kind: JobKind| {
        let payload = json!({"channel": 1, "external_message_id": "m", "text": "t"});
        pending_job(id, kind, payload)
    };
    let recs = [
        rec(&done_id, JobKind::InboundMessage),
        rec(&dead_id, JobKind::InboundMessage),
        rec(&pending_id, JobKind::SendMessage),
    ];
    s.journal_insert_many(&recs, false).await.expect("insert");
    s.journal_finish(&done_id, JobState::Done, None, 1)
        .await
        .expect("done");
    s.journal_finish(&dead_id, JobState::Dead, Some("x"), 1)
        .await
        .expect("dead");
    let done = s.journal_get(&done_id).await.expect("get");
    assert_eq!(
        done.payload,
        json!({"channel": 1, "external_message_id": "m"}),
        "a done inbound job keeps no text"
    );
    assert_eq!(
        s.journal_get(&dead_id).await.expect("get").payload["text"],
        "t"
    );
    assert_eq!(s.journal_purge(0, 10).await.expect("nothing old"), 0);
    assert_eq!(
        s.journal_purge(now_ms() + 1, 10).await.expect("purge"),
        1,
        "only the done job goes"
    );
    assert!(
        s.journal_get(&pending_id).await.is_ok(),
        "unfinished jobs stay"
    );
    assert!(
        s.journal_get(&dead_id).await.is_ok(),
        "dead jobs stay for an operator to retry"
    );
    assert!(matches!(
        s.journal_get(&done_id).await,
        Err(DomainError::NotFound(_))
    ));
    // A finished job cannot be finished again into another state.
    s.journal_finish(&dead_id, JobState::Done, None, 2)
        .await
        .expect("done after dead");
    assert_eq!(
        s.journal_get(&dead_id).await.expect("get").state,
        JobState::Done
    );
    s.journal_finish(&dead_id, JobState::Dead, Some("late"), 3)
        .await
        .expect("no-op");
    assert_eq!(
        s.journal_get(&dead_id).await.expect("get").state,
        JobState::Done,
        "a done job stays done"
    );
}

/// One job per idempotency key, whether recorded alone or in a batch; the journal
/// answers which job holds a key, and lists and counts what it holds.
async fn an_idempotency_key_holds_one_job(b: Backend) {
    let s = TestStore::open(b).await;
    let first = keyed(&ulid(1), "charge_account:1:2026-11-25");
    assert_eq!(
        s.journal_insert(&first).await.expect("insert"),
        JournalInsert::Inserted
    );
    assert_eq!(
        s.journal_insert(&keyed(&ulid(2), "charge_account:1:2026-11-25"))
            .await
            .expect("insert"),
        JournalInsert::Existing(first.id.clone()),
        "the key's job is the first one"
    );
    assert_eq!(
        s.journal_insert(&first).await.expect("again"),
        JournalInsert::Existing(first.id.clone()),
        "the same job recorded twice"
    );
    let batch = [
        keyed(&ulid(3), "charge_account:1:2026-11-25"),
        keyed(&ulid(4), "charge_account:2:2026-11-25"),
        pending_job(&ulid(5), JobKind::InboundMessage, json!({"x": 1})),
        pending_job(&ulid(6), JobKind::InboundMessage, json!({"x": 2})),
    ];
    assert_eq!(
        s.journal_insert_many(&batch, true).await.expect("batch"),
        vec![false, true, true, true]
    );
    let by_key = s
        .journal_by_key("charge_account:2:2026-11-25")
        .await
        .expect("by key")
        .expect("found");
    assert_eq!(by_key.id, ulid(4));
    assert_eq!(by_key.max_attempts, 8);
    assert!(
        s.journal_by_key("charge_account:3:2026-11-25")
            .await
            .expect("by key")
            .is_none()
    );
    let charges = s
        .journal_list(&patchbay_jobs::store::JobFilter {
            state: Some(JobState::Pending),
            kind: Some(JobKind::ChargeAccount),
            limit: 10,
            offset: 0,
        })
        .await
        .expect("list");
    let ids: Vec<&str> = charges.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [ulid(4).as_str(), ulid(1).as_str()], "newest first");
    let all = s
        .journal_list(&patchbay_jobs::store::JobFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(all.len(), 2);
    let second = s
        .journal_list(&patchbay_jobs::store::JobFilter {
            kind: Some(JobKind::ChargeAccount),
            limit: 5,
            offset: 1,
            ..Default::default()
        })
        .await
        .expect("list a page");
    let ids: Vec<&str> = second.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [ulid(1).as_str()], "the page after the newest");
    let counts = s.journal_counts().await.expect("counts");
    assert_eq!(
        counts,
        vec![
            (JobKind::ChargeAccount, JobState::Pending, 2),
            (JobKind::InboundMessage, JobState::Pending, 2),
        ]
    );
    s.journal_finish(&ulid(4), JobState::Done, None, 0)
        .await
        .expect("finish");
    let open = s.journal_open_counts().await.expect("open counts");
    assert_eq!(
        open,
        vec![
            (JobKind::ChargeAccount, JobState::Pending, 1),
            (JobKind::InboundMessage, JobState::Pending, 2),
        ],
        "done jobs are not open"
    );
    let all = s.journal_counts().await.expect("counts");
    assert!(all.contains(&(JobKind::ChargeAccount, JobState::Done, 1)));
}

/// `journal_start` of a job the journal never saw records it, dated from its ULID,
/// unless another job holds its key; a finished job is not started again, and only a
/// dead job can be revived.
async fn a_job_started_without_a_row_gets_one(b: Backend) {
    let s = TestStore::open(b).await;
    let id = ulid(7);
    let started = s
        .journal_start(&pending_job(
            &id,
            JobKind::SendMessage,
            json!({"message": 3}),
        ))
        .await
        .expect("start")
        .expect("runs");
    assert_eq!(
        (started.state, started.attempts, started.created_at),
        (JobState::Running, 1, 1),
        "running, one attempt, created when its ULID says"
    );
    let again = s
        .journal_start(&started)
        .await
        .expect("start")
        .expect("runs");
    assert_eq!(again.attempts, 2);
    s.journal_finish(&id, JobState::Done, None, 5)
        .await
        .expect("done");
    assert!(
        s.journal_start(&started).await.expect("start").is_none(),
        "a redelivered copy of a done job does not run"
    );
    assert!(matches!(
        s.journal_revive(&id).await,
        Err(DomainError::Conflict(_))
    ));
    assert!(matches!(
        s.journal_revive("nope").await,
        Err(DomainError::NotFound(_))
    ));

    s.journal_insert(&keyed(&ulid(8), "k"))
        .await
        .expect("insert");
    assert!(
        s.journal_start(&keyed(&ulid(9), "k"))
            .await
            .expect("start")
            .is_none(),
        "another job holds the key: that one is the key's job"
    );
    assert!(matches!(
        s.journal_get(&ulid(9)).await,
        Err(DomainError::NotFound(_))
    ));

    s.journal_finish(&ulid(8), JobState::Dead, Some("gave up"), 5)
        .await
        .expect("dead");
    let revived = s.journal_revive(&ulid(8)).await.expect("revive");
    assert_eq!((revived.state, revived.attempts), (JobState::Pending, 0));
    let lost = s
        .journal_claim_lost(now_ms() + 10_000, 1_000, 600_000, 10)
        .await
        .expect("claim");
    assert_eq!(
        lost.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [ulid(8).as_str()],
        "a revived job is unpushed until its push succeeds"
    );
}

/// Two daemons sweep one store at once, round after round: every lost job is claimed,
/// and by one of them only.
async fn two_sweeps_never_claim_the_same_job(b: Backend) {
    const JOBS: u128 = 2_000;
    let s = TestStore::open(b).await;
    let recs: Vec<JobRecord> = (1..=JOBS)
        .map(|n| pending_job(&ulid(n), JobKind::SendMessage, json!({"message": n})))
        .collect();
    for chunk in recs.chunks(500) {
        s.journal_insert_many(chunk, false).await.expect("insert");
    }
    // A few failed with an overdue retry: lost as well.
    s.exec("UPDATE jobs SET state = 'failed', run_at = 1 WHERE payload LIKE '%5}'")
        .await;
    let other = s.another_daemon().await;
    let sweep = |store: std::sync::Arc<dyn patchbay_jobs::Store>| {
        tokio::spawn(async move {
            let mut claimed = Vec::new();
            let mut rounds = 0;
            loop {
                let got = store
                    .journal_claim_lost(10_000, 1_000, 600_000, 50)
                    .await
                    .expect("claim");
                if got.is_empty() {
                    return (claimed, rounds);
                }
                rounds += 1;
                claimed.extend(got.into_iter().map(|j| j.id));
            }
        })
    };
    let (a, b2) = (sweep(s.store.clone()), sweep(other.store.clone()));
    let (a, a_rounds) = a.await.expect("sweep a");
    let (b2, b_rounds) = b2.await.expect("sweep b");
    assert!(a_rounds + b_rounds >= 40, "several rounds each");
    let a_set: HashSet<&String> = a.iter().collect();
    let b_set: HashSet<&String> = b2.iter().collect();
    assert_eq!(a_set.len(), a.len(), "one sweep claimed a job twice");
    assert_eq!(b_set.len(), b2.len(), "one sweep claimed a job twice");
    assert!(
        a_set.is_disjoint(&b_set),
        "{} jobs claimed by both sweeps",
        a_set.intersection(&b_set).count()
    );
    assert_eq!(
        a.len() + b2.len(),
        JOBS as usize,
        "every lost job is claimed"
    );
    assert_eq!(
        jobs_where(
            &s,
            "state = 'pending' AND updated_at = 10000 AND NOT pushed"
        )
        .await,
        JOBS as i64
    );
}

/// Two daemons record jobs for the same keys at the same moment: one job per key,
/// the other daemon told which, and never an error.
async fn two_daemons_inserting_one_key_make_one_job(b: Backend) {
    const KEYS: u128 = 50;
    let s = TestStore::open(b).await;
    let other = s.another_daemon().await;
    let insert = |store: std::sync::Arc<dyn patchbay_jobs::Store>, offset: u128| {
        tokio::spawn(async move {
            let mut out = Vec::new();
            for n in 0..KEYS {
                let rec = keyed(&ulid(offset + n), &format!("k{n}"));
                out.push(store.journal_insert(&rec).await.expect("insert"));
            }
            out
        })
    };
    let (a, b2) = (
        insert(s.store.clone(), 1_000),
        insert(other.store.clone(), 2_000),
    );
    let (a, b2) = (a.await.expect("a"), b2.await.expect("b"));
    for (n, (x, y)) in a.iter().zip(&b2).enumerate() {
        let holder = s
            .journal_by_key(&format!("k{n}"))
            .await
            .expect("by key")
            .expect("held")
            .id;
        let n = n as u128;
        let expected = if holder == ulid(1_000 + n) {
            (JournalInsert::Inserted, JournalInsert::Existing(holder))
        } else {
            (JournalInsert::Existing(holder), JournalInsert::Inserted)
        };
        assert_eq!((x, y), (&expected.0, &expected.1));
    }
    assert_eq!(jobs_where(&s, "TRUE").await, KEYS as i64);
}
