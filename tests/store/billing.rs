//! Charges, suspension, resumption and the balance e-mail outbox, on both stores; and
//! the races two daemons on one database run: charging the same day at once, top-ups
//! during a billing run, two senders claiming the same e-mails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::NaiveDate;
use serde_json::json;

use patchbay_jobs::DomainError;
use patchbay_jobs::Store;
use patchbay_jobs::billing::Prices;
use patchbay_jobs::kind::{JobKind, charge_account_key};
use patchbay_jobs::model::{Id, JobState, now_ms};
use patchbay_jobs::store::{
    BatchedJob, ChargeJob, ChargeOutcome, Charged, CheckJob, NewAccount, NewUser, OutboxCounts,
};

use crate::common::{Backend, TestStore, pending_job};

on_both_stores!(
    the_outbox_counts_unsent_e_mails_and_those_sent_since,
    an_unsent_e_mail_gets_a_new_check_once_per_grace_after_one_died,
    a_batch_of_balance_checks_claims_once_per_account_and_settles_each_claim,
    a_batch_charges_suspends_and_records_the_e_mails_once,
    a_day_is_charged_once_whoever_charges_it_and_only_for_channels_of_that_day,
    a_past_day_charges_the_channels_of_that_day,
    a_new_channel_pays_today_or_is_refused,
    a_top_up_that_covers_the_day_resumes_the_channels,
    two_daemons_charge_the_same_day_once,
    top_ups_racing_a_billing_run_are_never_lost,
    two_daemons_never_claim_the_same_e_mail,
);

fn prices() -> Prices {
    Prices {
        default_price: 100,
        by_kind: Default::default(),
    }
}

fn day(d: &str) -> NaiveDate {
    d.parse().expect("day")
}

/// An account holding `balance` with `channels` loopback channels, created now and not
/// charged yet.
async fn account(s: &TestStore, name: &str, balance: i64, channels: usize) -> Id {
    let new = NewAccount {
        name: name.into(),
        currency: "EUR".into(),
        admin: NewUser {
            name: "Ann".into(),
            email: format!("ann@{name}.test"),
        },
    };
    let (acc, _) = s.create_account(&new).await.expect("account");
    if balance > 0 {
        s.topup(acc.id, balance, "seed").await.expect("topup");
    }
    for i in 0..channels {
        s.exec(&format!(
            "INSERT INTO channels (account_id, kind, name, config, status, created_at) \
             VALUES ({}, 'loopback', 'c{i}', '{{}}', 'connecting', {})",
            acc.id,
            now_ms()
        ))
        .await;
    }
    acc.id
}

/// A `charge_account` job for `account` and `day`, without a journal row.
fn job(id: &str, account: Id, day: NaiveDate) -> ChargeJob {
    ChargeJob {
        job: id.into(),
        account,
        day,
        day_start: i64::MIN,
        day_end: i64::MAX,
        max_attempts: 8,
    }
}

/// Journalled (pending) `charge_account` jobs `<tag>-<account>`.
async fn jobs(s: &TestStore, tag: &str, accounts: &[Id], day: NaiveDate) -> Vec<ChargeJob> {
    let mut out = Vec::new();
    let mut recs = Vec::new();
    for &account in accounts {
        let id = format!("{tag}-{account}");
        let payload = json!({"account": account, "date": day});
        recs.push(pending_job(&id, JobKind::ChargeAccount, payload));
        out.push(job(&id, account, day));
    }
    s.journal_insert_many(&recs, false).await.expect("journal");
    out
}

async fn ledger_rows(s: &TestStore) -> i64 {
    s.scalar("SELECT COUNT(*) FROM ledger WHERE kind = 'charge'")
        .await
}

async fn count(s: &TestStore, from_where: &str) -> i64 {
    s.scalar(&format!("SELECT COUNT(*) FROM {from_where}"))
        .await
}

async fn balance(s: &TestStore, account: Id) -> i64 {
    s.account(account).await.expect("account").balance
}

async fn notify(s: &TestStore, account: Id, kind: &str, date: &str) {
    s.exec(&format!(
        "INSERT INTO notifications (account_id, kind, disconnect_date, days, balance, \
         daily_total, created_at) VALUES ({account}, '{kind}', '{date}', 3, 250, 100, 1)"
    ))
    .await;
}

async fn the_outbox_counts_unsent_e_mails_and_those_sent_since(b: Backend) {
    let s = TestStore::open(b).await;
    let acc = account(&s, "outbox", 1000, 0).await;
    assert_eq!(
        s.outbox_counts(0).await.expect("counts"),
        OutboxCounts::default()
    );
    notify(&s, acc, "warning_3_days", "2026-12-01").await;
    notify(&s, acc, "warning_2_days", "2026-12-01").await;
    notify(&s, acc, "warning_1_day", "2026-12-01").await;
    s.exec("UPDATE notifications SET sent_at = 500 WHERE kind = 'warning_3_days'")
        .await;
    s.exec("UPDATE notifications SET sent_at = 2000 WHERE kind = 'warning_2_days'")
        .await;
    assert_eq!(
        s.outbox_counts(1000).await.expect("counts"),
        OutboxCounts {
            unsent: 1,
            sent_since: 1
        }
    );
}

async fn an_unsent_e_mail_gets_a_new_check_once_per_grace_after_one_died(b: Backend) {
    let s = TestStore::open(b).await;
    let acc = account(&s, "mailless", 1000, 0).await;
    s.exec(&format!(
        "INSERT INTO notifications (account_id, kind, disconnect_date, days, balance, \
         daily_total, created_at) VALUES ({acc}, 'disconnected', '2026-12-03', 0, 0, 100, 1)"
    ))
    .await;
    assert_eq!(
        s.accounts_with_unsent_notifications(1_000, 10)
            .await
            .expect("sweep"),
        vec![acc],
        "no check at all: one is due"
    );
    // A check that died (the relay refused) at t = 5,000; and a corrupt payload of
    // another kind, which the sweep must not trip on.
    s.exec(&format!(
        "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, pushed, \
         created_at, updated_at, run_at) VALUES \
         ('dead-check', 'balance_check', '{}', 'dead', 8, 8, TRUE, 1, 5000, 5000), \
         ('corrupt', 'send_message', '[[[not json', 'pending', 0, 8, TRUE, 1, 1, 1)",
        json!({"account": acc})
    ))
    .await;
    assert!(
        s.accounts_with_unsent_notifications(4_000, 10)
            .await
            .expect("sweep")
            .is_empty(),
        "it died within the grace: no new check yet"
    );
    assert_eq!(
        s.accounts_with_unsent_notifications(6_000, 10)
            .await
            .expect("sweep"),
        vec![acc],
        "a grace after it died, the e-mail gets another check"
    );
    // A live check (queued, not run yet) holds it back whenever it was queued.
    s.exec(&format!(
        "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, pushed, \
         created_at, updated_at, run_at) \
         VALUES ('live-check', 'balance_check', '{}', 'pending', 0, 8, TRUE, 1, 1, 1)",
        json!({"account": acc})
    ))
    .await;
    assert!(
        s.accounts_with_unsent_notifications(6_000, 10)
            .await
            .expect("sweep")
            .is_empty()
    );
}

async fn a_batch_of_balance_checks_claims_once_per_account_and_settles_each_claim(b: Backend) {
    let s = TestStore::open(b).await;
    // Two e-mails for `warned` (a warning, then a disconnection), one for `poor`.
    let warned = account(&s, "warned", 350, 1).await;
    let poor = account(&s, "poor", 50, 1).await;
    notify(&s, warned, "warning_3_days", "2026-11-28").await;
    notify(&s, warned, "disconnected", "2026-11-28").await;
    notify(&s, poor, "disconnected", "2026-11-28").await;
    let mut recs = Vec::new();
    let mut batch = Vec::new();
    for (id, account) in [("c1", warned), ("c2", warned), ("c3", poor), ("c4", poor)] {
        recs.push(pending_job(
            id,
            JobKind::BalanceCheck,
            json!({"account": account}),
        ));
        batch.push(CheckJob {
            job: id.into(),
            account,
        });
    }
    s.journal_insert_many(&recs[..3], false)
        .await
        .expect("journal");
    let claimed = s
        .claim_balance_checks(&batch, 1_000, 60_000)
        .await
        .expect("claim");
    let kinds = |i: usize| -> Vec<&str> { claimed[i].1.iter().map(|n| n.kind.as_str()).collect() };
    assert_eq!(claimed[0].0, BatchedJob::Done);
    assert_eq!(
        kinds(0),
        ["warning_3_days", "disconnected"],
        "in order, both"
    );
    assert_eq!(claimed[0].1[0].lease, 61_000);
    assert_eq!(
        claimed[0].1[0].disconnect_date,
        day("2026-11-28"),
        "the figures as recorded"
    );
    assert_eq!(
        (
            claimed[0].1[0].days,
            claimed[0].1[0].balance,
            claimed[0].1[0].daily_total
        ),
        (3, 250, 100)
    );
    assert_eq!(
        claimed[1],
        (BatchedJob::Done, vec![]),
        "same account: nothing left"
    );
    assert_eq!(kinds(2), ["disconnected"]);
    assert_eq!(
        claimed[3],
        (BatchedJob::NotJournalled, vec![]),
        "no journal row"
    );
    // A second claim while these are held gets nothing, on either path.
    let again = s.claim_balance_checks(&batch[..1], 2_000, 60_000).await;
    assert_eq!(again.expect("claim")[0].1, vec![]);
    assert!(
        s.claim_notifications(warned, 2_000, 60_000)
            .await
            .expect("claim")
            .is_empty()
    );

    // warned's first e-mail went out, its second was refused; poor's went out.
    let sent = [claimed[0].1[0].clone(), claimed[2].1[0].clone()];
    let unsent = [claimed[0].1[1].clone()];
    // A stale claim (another holder's lease) is neither marked nor released.
    let mut stale = claimed[0].1[1].clone();
    stale.lease -= 1;
    s.settle_balance_checks(&[stale.clone()], &[], &[])
        .await
        .expect("stale");
    s.settle_balance_checks(&[], &[stale.clone()], &[])
        .await
        .expect("stale");
    s.mark_notification_sent(&stale).await.expect("stale");
    s.release_notification(&stale).await.expect("stale");
    assert_eq!(
        count(
            &s,
            &format!(
                "notifications WHERE id = {} AND sent_at IS NULL AND claimed_until IS NOT NULL",
                stale.id
            )
        )
        .await,
        1,
        "another holder's claim is neither marked sent nor released"
    );
    s.settle_balance_checks(&sent, &unsent, &["c2".into(), "c3".into()])
        .await
        .expect("settle");
    for (n, sent) in [(&sent[0], true), (&unsent[0], false), (&sent[1], true)] {
        let cond = if sent {
            "sent_at IS NOT NULL"
        } else {
            "sent_at IS NULL"
        };
        assert_eq!(
            count(
                &s,
                &format!(
                    "notifications WHERE id = {} AND {cond} AND claimed_until IS NULL",
                    n.id
                )
            )
            .await,
            1,
            "{} sent: {sent}",
            n.kind
        );
    }
    let state = |id: &'static str| {
        let s = &s;
        async move { s.journal_get(id).await.expect("job").state }
    };
    assert_eq!(state("c1").await, JobState::Pending);
    assert_eq!(state("c2").await, JobState::Done);
    assert_eq!(state("c3").await, JobState::Done);
    // The released e-mail is free for the retry of c1.
    let retry = s
        .claim_balance_checks(&batch[..1], 3_000, 60_000)
        .await
        .expect("claim");
    assert_eq!(retry[0].1.len(), 1);
    assert_eq!(retry[0].1[0].kind, "disconnected");
    // Released one at a time, it can be claimed on the single path; marked sent, never
    // again.
    s.release_notification(&retry[0].1[0])
        .await
        .expect("release");
    let single = s
        .claim_notifications(warned, 4_000, 60_000)
        .await
        .expect("claim");
    assert_eq!(single.len(), 1);
    s.mark_notification_sent(&single[0]).await.expect("sent");
    assert!(
        s.claim_notifications(warned, 200_000, 60_000)
            .await
            .expect("claim")
            .is_empty(),
        "a sent e-mail is never claimed again"
    );
    // A claim whose lease ran out (its sender died) is taken again.
    notify(&s, poor, "warning_1_day", "2026-11-29").await;
    let first = s
        .claim_notifications(poor, 5_000, 1_000)
        .await
        .expect("claim");
    assert_eq!(first.len(), 1);
    let later = s
        .claim_notifications(poor, 7_000, 1_000)
        .await
        .expect("claim");
    assert_eq!(later.len(), 1);
    s.mark_notification_sent(&first[0]).await.expect("stale");
    assert_eq!(
        count(
            &s,
            &format!(
                "notifications WHERE id = {} AND sent_at IS NULL",
                first[0].id
            )
        )
        .await,
        1,
        "the first holder's lease ran out: it cannot mark the e-mail sent"
    );
}

async fn a_batch_charges_suspends_and_records_the_e_mails_once(b: Backend) {
    let s = TestStore::open(b).await;
    let d = day("2026-11-25");
    let rich = account(&s, "rich", 10_000, 3).await;
    // SPEC §5's example: 250 left after the charge, daily 100, setting 3 → "3 days".
    let warned = account(&s, "warned", 350, 1).await;
    let poor = account(&s, "poor", 50, 1).await;
    let batch = jobs(&s, "first", &[rich, warned, poor], d).await;
    let out = s.charge_accounts(&batch, &prices()).await.expect("charge");
    assert!(out.iter().all(|(o, _)| *o == BatchedJob::Done));
    assert_eq!(
        out[0].1,
        Some(Charged {
            outcome: ChargeOutcome::Charged {
                total: 300,
                balance: 9_700,
                channels: 3
            },
            notices: false
        })
    );
    assert!(out[1].1.as_ref().is_some_and(|c| c.notices));
    let Some(Charged {
        outcome:
            ChargeOutcome::Suspended {
                needed,
                balance: left,
                channels,
            },
        notices: true,
    }) = &out[2].1
    else {
        panic!("poor account not suspended: {out:?}");
    };
    assert_eq!((*needed, *left, channels.len()), (100, 50, 1));
    assert_eq!(balance(&s, poor).await, 50, "all or nothing");
    assert_eq!(balance(&s, rich).await, 9_700);
    assert_eq!(ledger_rows(&s).await, 4);
    assert_eq!(
        count(
            &s,
            &format!(
                "channels WHERE account_id = {poor} AND status = 'suspended' \
                 AND status_reason = 'insufficient_funds'"
            )
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &s,
            &format!("accounts WHERE id = {poor} AND suspended_on = '2026-11-25'")
        )
        .await,
        1
    );
    assert_eq!(s.suspended_accounts().await.expect("suspended"), [poor]);

    assert_eq!(count(&s, "notifications").await, 2);
    assert_eq!(
        count(
            &s,
            &format!(
                "notifications WHERE account_id = {poor} AND kind = 'disconnected' \
                 AND disconnect_date = '2026-11-25' AND days = 0 AND balance = 50 \
                 AND daily_total = 100"
            )
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &s,
            &format!(
                "notifications WHERE account_id = {warned} AND kind = 'warning_3_days' \
                 AND disconnect_date = '2026-11-28' AND days = 3 AND balance = 250 \
                 AND daily_total = 100"
            )
        )
        .await,
        1
    );

    // The same jobs again: finished. New jobs for the same day: nothing due, no mail.
    let again = s.charge_accounts(&batch, &prices()).await.expect("again");
    assert!(again.iter().all(|(o, _)| *o == BatchedJob::AlreadyFinished));
    let rerun = jobs(&s, "rerun", &[rich, warned, poor], d).await;
    for (o, c) in s.charge_accounts(&rerun, &prices()).await.expect("rerun") {
        assert_eq!(o, BatchedJob::Done);
        assert!(c.is_some_and(|c| !c.notices));
    }
    assert_eq!(ledger_rows(&s).await, 4);

    // Jobs queued without journal rows (a fan-out onto a queue that keeps its jobs):
    // charged, and journalled done by the batch; one for an unknown account has no
    // row to make dead and goes the per-job path.
    let next = day("2026-11-26");
    let unjournalled: Vec<ChargeJob> = [rich, 999_999]
        .into_iter()
        .map(|account| job(&format!("queued-{account}"), account, next))
        .collect();
    let out = s
        .charge_accounts(&unjournalled, &prices())
        .await
        .expect("unjournalled");
    assert_eq!(out[0].0, BatchedJob::Done);
    assert_eq!(out[1], (BatchedJob::NotJournalled, None));
    assert_eq!(
        ledger_rows(&s).await,
        7,
        "rich's three channels for the 26th"
    );
    let row = s.journal_get(&unjournalled[0].job).await.expect("row");
    assert_eq!(
        (row.kind, row.state, row.attempts),
        (JobKind::ChargeAccount, JobState::Done, 1)
    );
    assert_eq!(row.payload, json!({"account": rich, "date": "2026-11-26"}));
    assert_eq!(
        row.idempotency_key,
        Some(charge_account_key(rich, next)),
        "the row holds the day's key"
    );
    // A journalled job for an unknown account is dead.
    let ghost = jobs(&s, "ghost", &[999_999], next).await;
    let out = s.charge_accounts(&ghost, &prices()).await.expect("ghost");
    assert!(matches!(out[0], (BatchedJob::Dead(_), None)), "{out:?}");
    assert_eq!(
        s.journal_get("ghost-999999").await.expect("row").state,
        JobState::Dead
    );
    // Redelivered: finished, nothing charged again.
    let again = s
        .charge_accounts(&unjournalled[..1], &prices())
        .await
        .expect("redelivered");
    assert_eq!(again[0].0, BatchedJob::AlreadyFinished);
    assert_eq!(ledger_rows(&s).await, 7);

    // Another job for the same (account, day), a second copy within one batch: kept
    // out by the key the first one's row holds, without a row of their own.
    let out = s
        .charge_accounts(&[job("again", rich, next)], &prices())
        .await
        .expect("same day");
    assert_eq!(out[0], (BatchedJob::AlreadyFinished, None));
    let third = day("2026-11-27");
    let out = s
        .charge_accounts(
            &[job("one", rich, third), job("two", rich, third)],
            &prices(),
        )
        .await
        .expect("twice in a batch");
    assert_eq!(out[0].0, BatchedJob::Done);
    assert_eq!(out[1], (BatchedJob::AlreadyFinished, None));
    assert_eq!(ledger_rows(&s).await, 10);
    assert_eq!(count(&s, "jobs WHERE id IN ('again', 'two')").await, 0);

    // A job with an unfinished row of its own for a day another job's row holds
    // (a fan-out's retry, journalled on Redis): its row is finished, nothing charged.
    s.journal_insert_many(
        &[pending_job(
            "stray",
            JobKind::ChargeAccount,
            json!({"account": rich, "date": third}),
        )],
        false,
    )
    .await
    .expect("journal");
    let out = s
        .charge_accounts(&[job("stray", rich, third)], &prices())
        .await
        .expect("stray");
    assert_eq!(out[0], (BatchedJob::Done, None));
    assert_eq!(
        s.journal_get("stray").await.expect("row").state,
        JobState::Done
    );
    assert_eq!(ledger_rows(&s).await, 10);
    // The per-job path (a batch that failed) does not start a charge job without a
    // row whose day another row holds either.
    let mut per_job = pending_job(
        "per-job",
        JobKind::ChargeAccount,
        json!({"account": rich, "date": third}),
    );
    // As the worker's per-job path builds it.
    per_job.idempotency_key = Some(charge_account_key(rich, third));
    assert!(s.journal_start(&per_job).await.expect("start").is_none());

    // Suspended on the 26th, resumed by a top-up on the 27th (which pays the 27th):
    // a charge job for the 26th queued again later (a fan-out retried after it gave
    // up) must not charge the day the channels spent suspended.
    let late = account(&s, "late", 50, 1).await;
    let out = s
        .charge_accounts(&[job("late-1", late, next)], &prices())
        .await
        .expect("suspends");
    assert!(matches!(
        out[0].1.as_ref().map(|c| &c.outcome),
        Some(ChargeOutcome::Suspended { .. })
    ));
    s.topup(late, 500, "rescue").await.expect("topup");
    let (resumed, _) = s
        .resume_suspended(late, third, &prices())
        .await
        .expect("resume");
    assert_eq!(resumed.len(), 1);
    let out = s
        .charge_accounts(&[job("late-2", late, next)], &prices())
        .await
        .expect("again");
    assert_eq!(out[0], (BatchedJob::AlreadyFinished, None));
    let charges = format!("ledger WHERE account_id = {late} AND kind = 'charge'");
    assert_eq!(count(&s, &charges).await, 1);
    assert_eq!(
        count(&s, &format!("{charges} AND day = '2026-11-27'")).await,
        1,
        "the suspended day is not charged"
    );
}

/// Eight charges of one day at once, from two daemons: each channel once.
async fn a_day_is_charged_once_whoever_charges_it_and_only_for_channels_of_that_day(b: Backend) {
    let s = TestStore::open(b).await;
    let other = s.another_daemon().await;
    let d = day("2026-11-25");
    let acc = account(&s, "acme", 10_000, 3).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 {
            s.store.clone()
        } else {
            other.store.clone()
        };
        tasks.push(tokio::spawn(async move {
            store
                .charge_day(acc, d, i64::MIN, i64::MAX, &prices())
                .await
        }));
    }
    let mut charged = 0;
    for t in tasks {
        match t.await.expect("task").expect("charge").outcome {
            ChargeOutcome::Charged { total: 300, .. } => charged += 1,
            ChargeOutcome::NothingDue { balance: 9_700 } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(charged, 1, "one of them charged, the others found it paid");
    assert_eq!(ledger_rows(&s).await, 3);
    assert_eq!(balance(&s, acc).await, 9_700);
    // A catch-up for a day that ended before the channels were created charges nothing.
    let c = s
        .charge_day(acc, day("2026-11-20"), i64::MIN, 1_000, &prices())
        .await
        .expect("catch-up");
    assert!(matches!(
        c.outcome,
        ChargeOutcome::NothingDue { balance: 9_700 }
    ));
    assert_eq!(ledger_rows(&s).await, 3);
    assert!(matches!(
        s.charge_day(999_999, d, i64::MIN, i64::MAX, &prices())
            .await,
        Err(DomainError::NotFound(_))
    ));
}

/// What a channel was on a past day decides its charge: one removed during the day
/// or later pays it, one removed before it began does not; one suspended only since
/// pays it, one suspended since that day does not; and an account suspended
/// already that cannot pay a past day keeps its suspension day, told once.
async fn a_past_day_charges_the_channels_of_that_day(b: Backend) {
    let s = TestStore::open(b).await;
    let charges = |acc: Id| format!("ledger WHERE account_id = {acc} AND kind = 'charge'");

    // Removed at 5,000 (ms): active on a day spanning 4,000.., not on one from 6,000.
    let acc = account(&s, "removed", 1_000, 1).await;
    s.exec(&format!(
        "UPDATE channels SET status = 'removed', removed_at = 5000, created_at = 0 \
         WHERE account_id = {acc}"
    ))
    .await;
    let c = s
        .charge_day(acc, day("2026-11-24"), 6_000, i64::MAX, &prices())
        .await
        .expect("later day");
    assert!(matches!(c.outcome, ChargeOutcome::NothingDue { .. }));
    let c = s
        .charge_day(acc, day("2026-11-23"), 4_000, 6_000, &prices())
        .await
        .expect("the day of the removal");
    assert!(matches!(
        c.outcome,
        ChargeOutcome::Charged { total: 100, .. }
    ));
    assert!(!c.notices, "a removed channel is not counted in warnings");
    assert_eq!(count(&s, &charges(acc)).await, 1);
    assert_eq!(
        count(&s, &format!("{} AND day = '2026-11-23'", charges(acc))).await,
        1
    );

    // Suspended for the 25th; the 24th, charged late, still pays.
    let acc = account(&s, "suspended", 0, 1).await;
    let c = s
        .charge_day(acc, day("2026-11-25"), i64::MIN, i64::MAX, &prices())
        .await
        .expect("suspends");
    assert!(matches!(c.outcome, ChargeOutcome::Suspended { .. }));
    s.topup(acc, 500, "late money").await.expect("topup");
    let c = s
        .charge_day(acc, day("2026-11-24"), i64::MIN, i64::MAX, &prices())
        .await
        .expect("the day before");
    assert!(matches!(
        c.outcome,
        ChargeOutcome::Charged { balance: 400, .. }
    ));
    let c = s
        .charge_day(acc, day("2026-11-25"), i64::MIN, i64::MAX, &prices())
        .await
        .expect("the suspended day");
    assert!(matches!(c.outcome, ChargeOutcome::NothingDue { .. }));
    assert_eq!(count(&s, &charges(acc)).await, 1);
    assert_eq!(
        count(&s, &format!("{} AND day = '2026-11-24'", charges(acc))).await,
        1
    );

    // Suspended for the 25th and unable to pay the 24th: still the 25th, one e-mail.
    let acc = account(&s, "broke", 0, 1).await;
    for d in ["2026-11-25", "2026-11-24"] {
        let c = s
            .charge_day(acc, day(d), i64::MIN, i64::MAX, &prices())
            .await
            .expect("suspended");
        assert!(matches!(c.outcome, ChargeOutcome::Suspended { .. }));
        assert_eq!(c.notices, d == "2026-11-25", "{d}");
    }
    assert_eq!(
        count(
            &s,
            &format!("accounts WHERE id = {acc} AND suspended_on = '2026-11-25'")
        )
        .await,
        1
    );
    assert_eq!(
        count(&s, &format!("notifications WHERE account_id = {acc}")).await,
        1
    );
}

async fn a_new_channel_pays_today_or_is_refused(b: Backend) {
    let s = TestStore::open(b).await;
    let prices = Prices {
        default_price: 100,
        by_kind: [("telegram".to_owned(), 300)].into_iter().collect(),
    };
    let d = day("2026-11-25");
    let acc = account(&s, "acme", 450, 0).await;
    let (first, noticed) = s
        .add_channel_charged(acc, "loopback", "one", &json!({"k": 1}), d, &prices)
        .await
        .expect("first");
    assert_eq!(
        (first.kind.as_str(), first.status.as_str()),
        ("loopback", "connecting")
    );
    // 350 left, 100 a day: suspension in 4 days, neither the setting (3) nor 1.
    assert!(!noticed);
    assert_eq!(balance(&s, acc).await, 350);
    let (second, noticed) = s
        .add_channel_charged(acc, "telegram", "two", &json!({}), d, &prices)
        .await
        .expect("second");
    // 50 left, 400 a day (both channels): the next run cannot pay.
    assert!(noticed, "the 1-day warning");
    assert_eq!(balance(&s, acc).await, 50);
    assert_eq!(
        count(
            &s,
            &format!(
                "notifications WHERE account_id = {acc} AND kind = 'warning_1_day' \
                 AND disconnect_date = '2026-11-26' AND balance = 50 AND daily_total = 400"
            )
        )
        .await,
        1
    );
    let ledger = s.ledger(acc, 10).await.expect("ledger");
    let charges: Vec<(i64, i64, Option<Id>, Option<&str>)> = ledger
        .iter()
        .filter(|e| e.kind == "charge")
        .map(|e| (e.amount, e.balance_after, e.channel, e.day.as_deref()))
        .collect();
    assert_eq!(
        charges,
        [
            (-300, 50, Some(second.id), Some("2026-11-25")),
            (-100, 350, Some(first.id), Some("2026-11-25")),
        ],
        "newest first"
    );
    let refused = s
        .add_channel_charged(acc, "loopback", "three", &json!({}), d, &prices)
        .await;
    assert!(
        matches!(refused, Err(DomainError::InsufficientFunds(_))),
        "{refused:?}"
    );
    assert_eq!(
        count(&s, &format!("channels WHERE account_id = {acc}")).await,
        2,
        "nothing created"
    );
    assert_eq!(balance(&s, acc).await, 50);
    assert!(matches!(
        s.add_channel_charged(999_999, "loopback", "x", &json!({}), d, &prices)
            .await,
        Err(DomainError::NotFound(_))
    ));
}

async fn a_top_up_that_covers_the_day_resumes_the_channels(b: Backend) {
    let s = TestStore::open(b).await;
    let acc = account(&s, "acme", 0, 2).await;
    let suspended_day = day("2026-11-25");
    let c = s
        .charge_day(acc, suspended_day, i64::MIN, i64::MAX, &prices())
        .await
        .expect("suspends");
    assert!(
        matches!(&c.outcome, ChargeOutcome::Suspended { channels, .. } if channels.len() == 2),
        "{c:?}"
    );
    assert_eq!(s.suspended_accounts().await.expect("list"), [acc]);
    // Today (the 24th in the caller's eyes) is before the unpaid day: the 25th is paid.
    let today = day("2026-11-24");
    s.topup(acc, 150, "part").await.expect("topup");
    let (resumed, noticed) = s
        .resume_suspended(acc, today, &prices())
        .await
        .expect("resume");
    assert!(
        resumed.is_empty() && !noticed,
        "150 does not cover the day's 200"
    );
    assert_eq!(balance(&s, acc).await, 150);
    s.topup(acc, 100, "rest").await.expect("topup");
    let (resumed, noticed) = s
        .resume_suspended(acc, today, &prices())
        .await
        .expect("resume");
    assert_eq!(resumed.len(), 2);
    assert!(resumed.iter().all(|c| c.status == "connecting"));
    assert!(noticed, "50 left for 200 a day: the 1-day warning");
    assert_eq!(balance(&s, acc).await, 50);
    assert_eq!(
        count(
            &s,
            &format!("ledger WHERE account_id = {acc} AND kind = 'charge' AND day = '2026-11-25'")
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &s,
            &format!("accounts WHERE id = {acc} AND suspended_on IS NULL")
        )
        .await,
        1
    );
    assert!(s.suspended_accounts().await.expect("list").is_empty());
    let (resumed, noticed) = s
        .resume_suspended(acc, today, &prices())
        .await
        .expect("again");
    assert!(resumed.is_empty() && !noticed, "nothing suspended any more");
    let c = s
        .charge_day(acc, suspended_day, i64::MIN, i64::MAX, &prices())
        .await
        .expect("charge");
    assert!(matches!(
        c.outcome,
        ChargeOutcome::NothingDue { balance: 50 }
    ));
    assert!(matches!(
        s.resume_suspended(999_999, today, &prices()).await,
        Err(DomainError::NotFound(_))
    ));
}

/// Outcomes per account of charge results from both daemons.
#[derive(Default, Debug)]
struct Tally {
    charged: usize,
    suspended: usize,
}

fn tally(into: &mut HashMap<Id, Tally>, account: Id, c: &Option<Charged>) {
    let t = into.entry(account).or_default();
    match c.as_ref().map(|c| &c.outcome) {
        Some(ChargeOutcome::Charged { .. }) => t.charged += 1,
        Some(ChargeOutcome::Suspended { .. }) => t.suspended += 1,
        _ => {}
    }
}

/// Two daemons run the same day's charges for the same accounts at once, in batches in
/// opposite orders, with per-account charges in between: every (channel, day) is
/// charged once, every balance is exact, every account paid or was suspended once, and
/// one journal row holds each (account, day).
async fn two_daemons_charge_the_same_day_once(b: Backend) {
    let s = TestStore::open(b).await;
    let other = s.another_daemon().await;
    let d = day("2026-11-25");
    let mut accounts = Vec::new();
    for i in 0..45 {
        // Every third cannot pay its three channels.
        let funds = if i % 3 == 0 { 250 } else { 1_000 };
        accounts.push((account(&s, &format!("a{i}"), funds, 3).await, funds));
    }
    let ids: Vec<Id> = accounts.iter().map(|a| a.0).collect();
    let run = |store: Arc<dyn Store>, tag: &'static str, reverse: bool| {
        let mut batches: Vec<Vec<ChargeJob>> = ids
            .chunks(8)
            .map(|c| {
                c.iter()
                    .map(|&a| job(&format!("{tag}-{a}"), a, d))
                    .collect()
            })
            .collect();
        if reverse {
            batches.reverse();
        }
        tokio::spawn(async move {
            let mut out = Vec::new();
            for batch in batches {
                let results = store
                    .charge_accounts(&batch, &prices())
                    .await
                    .expect("charge batch");
                out.extend(batch.iter().map(|j| j.account).zip(results));
            }
            out
        })
    };
    let singles = |store: Arc<dyn Store>, accounts: Vec<Id>| {
        tokio::spawn(async move {
            let mut out = Vec::new();
            for a in accounts {
                let c = store
                    .charge_day(a, d, i64::MIN, i64::MAX, &prices())
                    .await
                    .expect("charge day");
                out.push((a, c));
            }
            out
        })
    };
    let one = run(s.store.clone(), "one", false);
    let two = run(other.store.clone(), "two", true);
    let three = singles(s.store.clone(), ids.iter().step_by(4).copied().collect());
    let four = singles(
        other.store.clone(),
        ids.iter().rev().step_by(5).copied().collect(),
    );

    let mut tallies: HashMap<Id, Tally> = HashMap::new();
    let mut finished = 0;
    for results in [one.await.expect("one"), two.await.expect("two")] {
        for (account, (outcome, charged)) in results {
            match outcome {
                BatchedJob::Done => {}
                BatchedJob::AlreadyFinished => finished += 1,
                other => panic!("account {account}: {other:?}"),
            }
            tally(&mut tallies, account, &charged);
        }
    }
    for results in [three.await.expect("three"), four.await.expect("four")] {
        for (account, c) in results {
            tally(&mut tallies, account, &Some(c));
        }
    }
    assert_eq!(
        finished,
        ids.len(),
        "of each account's two jobs, one found the other's key"
    );
    for &(acc, funds) in &accounts {
        let t = &tallies[&acc];
        if funds == 1_000 {
            assert_eq!((t.charged, t.suspended), (1, 0), "account {acc}");
            assert_eq!(balance(&s, acc).await, 700, "account {acc}");
        } else {
            assert_eq!((t.charged, t.suspended), (0, 1), "account {acc}");
            assert_eq!(balance(&s, acc).await, 250, "account {acc}");
        }
    }
    let payers = accounts.iter().filter(|a| a.1 == 1_000).count() as i64;
    assert_eq!(ledger_rows(&s).await, payers * 3);
    assert_eq!(
        count(&s, "notifications WHERE kind = 'disconnected'").await,
        ids.len() as i64 - payers,
        "one disconnection e-mail per suspended account"
    );
    assert_eq!(
        count(
            &s,
            "jobs WHERE kind = 'charge_account' AND state = 'done' AND idempotency_key IS NOT NULL"
        )
        .await,
        ids.len() as i64,
        "one journal row per (account, day)"
    );
    assert_eq!(count(&s, "jobs").await, ids.len() as i64);
}

/// Many top-ups (distinct references) on two daemons while a billing run charges
/// three days: each balance is exactly its top-ups minus its charges, and every ledger
/// row's `balance_after` is the running sum of the account's rows up to it.
async fn top_ups_racing_a_billing_run_are_never_lost(b: Backend) {
    let s = TestStore::open(b).await;
    let other = s.another_daemon().await;
    let mut ids = Vec::new();
    for i in 0..16 {
        ids.push(account(&s, &format!("a{i}"), 1_000, 3).await);
    }
    let days = [day("2026-11-23"), day("2026-11-24"), day("2026-11-25")];
    let charging = {
        let store = s.store.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            for d in days {
                for batch in ids.chunks(4) {
                    let jobs: Vec<ChargeJob> = batch
                        .iter()
                        .map(|&a| job(&format!("{d}-{a}"), a, d))
                        .collect();
                    let out = store
                        .charge_accounts(&jobs, &prices())
                        .await
                        .expect("charge");
                    assert!(out.iter().all(|(o, _)| *o == BatchedJob::Done), "{out:?}");
                }
            }
        })
    };
    let mut topups = Vec::new();
    let mut expected: HashMap<Id, i64> = ids.iter().map(|&a| (a, 1_000 - 3 * 300)).collect();
    for t in 0..4 {
        let store = if t % 2 == 0 {
            s.store.clone()
        } else {
            other.store.clone()
        };
        let mut mine = Vec::new();
        for k in 0..40 {
            let account = ids[(t * 7 + k) % ids.len()];
            let amount = (t * 100 + k + 1) as i64;
            *expected.get_mut(&account).expect("account") += amount;
            mine.push((account, amount, format!("t{t}-{k}")));
        }
        topups.push(tokio::spawn(async move {
            for (account, amount, reference) in mine {
                store
                    .topup(account, amount, &reference)
                    .await
                    .expect("topup");
            }
        }));
    }
    charging.await.expect("charging");
    for t in topups {
        t.await.expect("topups");
    }
    for (&acc, &want) in &expected {
        assert_eq!(balance(&s, acc).await, want, "account {acc}");
        assert_eq!(
            s.scalar(&format!(
                "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger \
                 WHERE account_id = {acc}"
            ))
            .await,
            want,
            "account {acc}: the ledger adds up to the balance"
        );
    }
    assert_eq!(ledger_rows(&s).await, 16 * 3 * 3);
    assert_eq!(count(&s, "ledger WHERE kind = 'topup'").await, 16 + 4 * 40);
    assert_eq!(
        s.scalar(
            "SELECT COUNT(*) FROM (SELECT balance_after, SUM(amount) OVER \
             (PARTITION BY account_id ORDER BY id) AS running FROM ledger) AS t \
             WHERE running <> balance_after"
        )
        .await,
        0,
        "every balance_after is the balance its row left"
    );
}

/// Eight senders on two daemons claim the same accounts' e-mails at once, by batch and
/// one account at a time: each e-mail goes to exactly one of them.
async fn two_daemons_never_claim_the_same_e_mail(b: Backend) {
    let s = TestStore::open(b).await;
    let other = s.another_daemon().await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let acc = account(&s, &format!("a{i}"), 0, 0).await;
        for (kind, date) in [
            ("warning_3_days", "2026-11-28"),
            ("warning_1_day", "2026-11-28"),
            ("disconnected", "2026-11-28"),
        ] {
            notify(&s, acc, kind, date).await;
        }
        ids.push(acc);
    }
    let mut recs = Vec::new();
    for t in 0..4 {
        for &a in &ids {
            recs.push(pending_job(
                &format!("t{t}-{a}"),
                JobKind::BalanceCheck,
                json!({"account": a}),
            ));
        }
    }
    s.journal_insert_many(&recs, false).await.expect("journal");
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let store = if t % 2 == 0 {
            s.store.clone()
        } else {
            other.store.clone()
        };
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut claimed = Vec::new();
            if t < 4 {
                let jobs: Vec<CheckJob> = ids
                    .iter()
                    .map(|&a| CheckJob {
                        job: format!("t{t}-{a}"),
                        account: a,
                    })
                    .collect();
                for (_, ns) in store
                    .claim_balance_checks(&jobs, 1_000, 60_000)
                    .await
                    .expect("claim batch")
                {
                    claimed.extend(ns.into_iter().map(|n| n.id));
                }
            } else {
                for &a in ids.iter().rev() {
                    let ns = store
                        .claim_notifications(a, 1_000, 60_000)
                        .await
                        .expect("claim");
                    claimed.extend(ns.into_iter().map(|n| n.id));
                }
            }
            claimed
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let distinct: HashSet<Id> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "an e-mail was claimed twice");
    assert_eq!(all.len(), ids.len() * 3, "every e-mail claimed by someone");
}

/// PostgreSQL only (SQLite's one writer cannot interleave so): an enqueue writes a
/// charge key while a batch that charges the same (account, day) is between reading
/// the journal and writing it. The batch's insert of the key then waits for the
/// enqueue and collides with it; the batch still commits its charge, journalled without
/// the key the enqueue's row holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_key_enqueued_during_a_charge_batch_does_not_fail_it() {
    let s = TestStore::open(Backend::Postgres).await;
    let d = day("2026-11-25");
    let acc = account(&s, "acme", 1_000, 2).await;
    let key = charge_account_key(acc, d);
    let raw = sqlx::PgPool::connect(&s.location).await.expect("pool");
    let mut enqueue = raw.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, pushed, \
         created_at, updated_at, run_at, idempotency_key) \
         VALUES ('enqueued', 'charge_account', $1, 'pending', 0, 8, TRUE, 1, 1, 1, $2)",
    )
    .bind(json!({"account": acc, "date": d}).to_string())
    .bind(&key)
    .execute(&mut *enqueue)
    .await
    .expect("insert");
    let store = s.store.clone();
    let batch = tokio::spawn(async move {
        store
            .charge_accounts(&[job("batch", acc, d)], &prices())
            .await
    });
    // Until the batch waits for the enqueue's uncommitted key.
    let started = std::time::Instant::now();
    while s
        .scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database()",
        )
        .await
        == 0
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the batch never waited for the enqueue"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    enqueue.commit().await.expect("commit");
    let out = batch.await.expect("task").expect("the batch commits");
    assert_eq!(out[0].0, BatchedJob::Done);
    assert!(matches!(
        out[0].1.as_ref().map(|c| &c.outcome),
        Some(ChargeOutcome::Charged { total: 200, .. })
    ));
    assert_eq!(balance(&s, acc).await, 800);
    let row = s.journal_get("batch").await.expect("row");
    assert_eq!((row.state, row.idempotency_key), (JobState::Done, None));
    assert_eq!(
        s.journal_get("enqueued")
            .await
            .expect("row")
            .idempotency_key,
        Some(key)
    );
}
