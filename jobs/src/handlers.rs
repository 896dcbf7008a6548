//! Runs one job's effect. Called by the daemon's workers, possibly more than once per
//! job (retries, redelivery after a crash, two daemons), so every handler is
//! idempotent: it relies on the store's UNIQUE constraints and on state checks, never
//! on having run only once. What a handler needs from outside the store (a connector,
//! the queue) comes through `Effects`, which the daemon implements.

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::{Value, json};

use chrono::NaiveDate;

use crate::billing::{Prices, Warning};
use crate::error::{DomainError, JobError};
use crate::kind::{InboundMessage, JobKind, Payload};
use crate::model::{Account, Channel, Id, now_ms};
use crate::phone;
use crate::store::{BatchedJob, Charged, CheckJob, Notification, Store, StoreResult};

#[async_trait]
pub trait Effects: Send + Sync {
    /// Hands an outbound message to its channel's running connector; returns the
    /// messenger's id for it. Sends on one channel take turns; at its turn the message's
    /// send lease is claimed for `lease_ms` (`Store::claim_send`), and `None` means the
    /// claim failed (sent since, or another attempt holds it): nothing was sent. A
    /// retryable error gives the lease back; any other outcome keeps it.
    async fn deliver(
        &self,
        channel: &Channel,
        outbound: &Value,
        lease_ms: i64,
    ) -> Result<Option<String>, JobError>;
    /// Rows per deletion batch and the pause between batches (`deletion.*` config).
    fn deletion_pacing(&self) -> (u32, std::time::Duration);
    /// The daemon is shutting down: long handlers stop at their next safe point.
    fn stopping(&self) -> bool;
    /// Daily prices in force now.
    fn prices(&self) -> Prices;
    /// Today in the billing time zone.
    fn today(&self) -> NaiveDate;
    /// Queues jobs of one kind in bulk (journal and queue in batches). `charge_account`
    /// jobs skip the journal on the SQLite queue (their batch writes it).
    async fn enqueue_many(&self, kind: JobKind, payloads: Vec<Value>) -> Result<(), JobError>;
    /// The first instant (unix ms) after `day` in the billing time zone.
    fn day_end(&self, day: NaiveDate) -> i64;
    /// The first instant (unix ms) of `day` in the billing time zone.
    fn day_start(&self, day: NaiveDate) -> i64;
    /// After charges: stops the connectors of the channels they suspended, and queues a
    /// `balance_check` for each account whose charge recorded a balance e-mail.
    async fn charged(&self, charges: &[(Id, Charged)]) -> Result<(), JobError>;
    /// Money arrived: resumes the account's suspended channels if it now pays the day.
    async fn account_credited(&self, account: Id) -> Result<(), JobError>;
    /// Sends an e-mail about the account's balance to its administrators.
    async fn send_notice(&self, notice: &Notice) -> Result<(), JobError>;
    /// Waits `d` (between retries, between deletion batches): time is the daemon's, so
    /// this crate never sleeps on its own.
    async fn pause(&self, d: std::time::Duration);
}

/// A balance e-mail: a warning before disconnection, or the disconnection itself.
#[derive(Clone, Debug)]
pub struct Notice {
    pub account: Account,
    pub to: Vec<String>,
    pub daily_total: i64,
    pub kind: NoticeKind,
}

#[derive(Clone, Debug)]
pub enum NoticeKind {
    Warning(Warning),
    Disconnected { date: NaiveDate },
}

pub async fn run(
    store: &dyn Store,
    effects: &dyn Effects,
    payload: &Payload,
) -> Result<(), JobError> {
    match payload {
        Payload::Topup(t) => {
            store.topup(t.account, t.amount, &t.reference).await?;
            // As account.topup: a top-up that pays the day resumes suspended channels.
            effects.account_credited(t.account).await
        }
        Payload::InboundMessage(m) => {
            let phone = inbound_sender_phone(m);
            if !store.store_inbound(m, phone.as_deref()).await? {
                tracing::debug!(message = %m.external_message_id, "inbound message was stored before");
            }
            Ok(())
        }
        Payload::ChatClose(c) => {
            let chat = store.chat(c.chat).await?;
            let account = store.account(chat.account).await?;
            store
                .close_chat(
                    chat.id,
                    account.settings.reset_responsible_on_close,
                    c.requested_at,
                )
                .await?;
            Ok(())
        }
        Payload::SendMessage(s) => send_message(store, effects, s.message).await,
        Payload::BillingRun(b) => billing_run(store, effects, b.date).await,
        Payload::ChargeAccount(c) => charge_account(store, effects, c.account, c.date).await,
        Payload::BalanceCheck(b) => balance_check(store, effects, b.account).await,
        Payload::DataDeletion(d) => data_deletion(store, effects, d.run).await,
    }
}

/// What a job that went dead leaves behind: a send that gave up while its message was
/// still queued marks the message failed, with the reason, so the inbox shows it and
/// `job.retry` can send it again.
pub async fn gave_up(store: &dyn Store, payload: &Payload, reason: &str) -> StoreResult<()> {
    match payload {
        Payload::SendMessage(s) => store.fail_unsent(s.message, reason).await,
        _ => Ok(()),
    }
}

/// The sender's phone in E.164, the first key its contact is found by. A reported phone
/// that is not one is no key (the sender id, the username or the chat find the contact
/// instead): the message is stored all the same.
pub fn inbound_sender_phone(m: &InboundMessage) -> Option<String> {
    m.sender
        .phone
        .as_deref()
        .and_then(phone::normalize_reported)
}

/// How long one send attempt holds its message: the lease is claimed at the channel's
/// turn, so it covers one connector call (at most 30 s) with a wide margin. A daemon
/// that dies mid-send leaves the message to a retry after this; with the default
/// backoff the job's last attempts come later than that.
const SEND_LEASE_MS: i64 = 120 * 1000;

async fn send_message(store: &dyn Store, effects: &dyn Effects, id: Id) -> Result<(), JobError> {
    let message = match store.message(id).await {
        Ok(m) => m,
        // A data deletion run took it (or its chat, below): nothing is left to send.
        Err(DomainError::NotFound(_)) => {
            tracing::info!(
                message = id,
                "outbound message was deleted before it was sent"
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if message.direction != "out" {
        return Err(JobError::Permanent(format!(
            "message {id} is not an outbound message"
        )));
    }
    if message.status != "queued" && message.status != "failed" {
        // Sent before: a redelivered job must not send it twice.
        return Ok(());
    }
    let chat = match store.chat(message.chat).await {
        Ok(chat) => chat,
        Err(DomainError::NotFound(_)) => {
            tracing::info!(
                message = id,
                "the chat was deleted before the message was sent"
            );
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let channel = store.channel(message.channel).await?;
    let contact = store.contact(chat.contact).await?;
    let outbound = json!({
        "type": "send",
        "message": message.id,
        "external_chat_id": chat.external_chat_id,
        "to": { "phone": contact.phone, "username": contact.username },
        "text": message.text,
        "attachments": message.attachments,
    });
    // One attempt at a time hands the message to the connector: a job redelivered
    // while its first run is still sending finds the lease and backs off.
    match effects.deliver(&channel, &outbound, SEND_LEASE_MS).await {
        Ok(Some(external_id)) => record_sent(store, effects, id, &external_id).await,
        Ok(None) => {
            let status = store.message(id).await?.status;
            if status != "queued" && status != "failed" {
                return Ok(());
            }
            Err(JobError::Retryable(format!(
                "message {id} is being sent by another attempt"
            )))
        }
        Err(JobError::Permanent(reason)) => {
            // The lease stays until it runs out: a send whose outcome is unknown (the
            // connector did not answer in time) may still be going on.
            store
                .set_message_status(id, "failed", Some(&reason), None)
                .await?;
            Err(JobError::Permanent(reason))
        }
        // Retryable: not sent, and `deliver` gave the lease back.
        Err(e) => Err(e),
    }
}

/// Records a sent message, retrying a failing store a few times: a `sent` left
/// unrecorded would have the job retried, and the message sent twice. If the store
/// stays down, the job dies with the messenger's id in its error and the message keeps
/// its lease, so nothing sends it again on its own.
async fn record_sent(
    store: &dyn Store,
    effects: &dyn Effects,
    id: Id,
    external_id: &str,
) -> Result<(), JobError> {
    retrying(effects, &format!("sent message {id}"), || {
        store.set_message_status(id, "sent", None, Some(external_id))
    })
    .await
    .map_err(|e| {
        JobError::Permanent(format!(
            "message {id} was sent (messenger id {external_id}) but its status could \
             not be recorded: {e}"
        ))
    })
}

/// Runs a store write that records something already done outside the store (a send),
/// retrying a failing store 5 times with a doubling pause from 100 ms: giving up early
/// would have it done again.
async fn retrying<F, Fut>(effects: &dyn Effects, what: &str, mut write: F) -> StoreResult<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<()>>,
{
    let mut wait = std::time::Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match write().await {
            Ok(()) => return Ok(()),
            Err(e) if tries < 5 => {
                tracing::warn!(error = %e, "cannot record {what}; retrying");
                effects.pause(wait).await;
                wait *= 2;
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Deletes a run's pre-cutoff data batch by batch until none is left. Each batch is
/// its own short transaction that also advances the run's counts, so a crash resumes
/// where it stopped with exact counts, and inbound traffic gets the store between
/// batches.
async fn data_deletion(store: &dyn Store, effects: &dyn Effects, run: Id) -> Result<(), JobError> {
    let (batch, pause) = effects.deletion_pacing();
    loop {
        let outcome = store.delete_batch(run, batch).await?;
        if outcome.finished {
            tracing::info!(run, "data deletion finished");
            return Ok(());
        }
        if effects.stopping() {
            // Counts are checkpointed with every batch: the next start resumes here.
            return Err(JobError::Retryable(
                "the daemon is stopping; the run resumes where it stopped".into(),
            ));
        }
        if !pause.is_zero() {
            effects.pause(pause).await;
        }
    }
}

/// Fans out one `charge_account` per account, each for the idempotency key
/// `charge_account:<account>:<date>`: journalled first (Redis), a second job for a key
/// is not queued; queued without journal rows (the SQLite queue, see
/// `Effects::enqueue_many`), the charge batch skips a job whose key another row holds.
/// Either way a retried fan-out charges no account twice for the day, and a rerun of
/// the day is kept out by the `billing_run`'s own key.
async fn billing_run(
    store: &dyn Store,
    effects: &dyn Effects,
    date: NaiveDate,
) -> Result<(), JobError> {
    const PAGE: u32 = 5_000;
    let mut after = 0;
    loop {
        let ids = store.account_ids(after, PAGE).await?;
        let Some(&last) = ids.last() else {
            return Ok(());
        };
        let payloads = ids
            .iter()
            .map(|a| json!({ "account": a, "date": date }))
            .collect();
        effects
            .enqueue_many(JobKind::ChargeAccount, payloads)
            .await?;
        after = last;
    }
}

async fn charge_account(
    store: &dyn Store,
    effects: &dyn Effects,
    account: Id,
    date: NaiveDate,
) -> Result<(), JobError> {
    let charged = store
        .charge_day(
            account,
            date,
            effects.day_start(date),
            effects.day_end(date),
            &effects.prices(),
        )
        .await?;
    effects.charged(&[(account, charged)]).await
}

/// How long a sender holds the balance e-mails it claimed: longer than any SMTP
/// exchange; a crashed sender's e-mails are free again after it.
const NOTICE_LEASE_MS: i64 = 10 * 60 * 1000;

/// Sends the account's recorded, unsent balance e-mails (the charge that made them due
/// recorded them with its figures). Each is claimed before it is sent and marked sent
/// after, so a failed send is retried, a sent one never repeated, and two senders never
/// send the same one.
async fn balance_check(
    store: &dyn Store,
    effects: &dyn Effects,
    account: Id,
) -> Result<(), JobError> {
    let claimed = store
        .claim_notifications(account, now_ms(), NOTICE_LEASE_MS)
        .await?;
    if claimed.is_empty() {
        return Ok(());
    }
    let result = send_notices(store, effects, account, &claimed).await;
    if result.is_err() {
        // What was not sent goes back for the retry (a sent e-mail's claim is gone
        // already, so this leaves it alone).
        for n in &claimed {
            let _ = store.release_notification(n).await;
        }
    }
    result
}

async fn send_notices(
    store: &dyn Store,
    effects: &dyn Effects,
    account: Id,
    claimed: &[Notification],
) -> Result<(), JobError> {
    let (acc, to) = recipients(store, account).await?;
    for n in claimed {
        send_one(effects, &acc, &to, n).await?;
        store.mark_notification_sent(n).await?;
    }
    Ok(())
}

/// The account and its administrators' addresses, for its balance e-mails.
async fn recipients(store: &dyn Store, account: Id) -> Result<(Account, Vec<String>), JobError> {
    store
        .mail_recipients(&[account])
        .await?
        .pop()
        .ok_or_else(|| DomainError::not_found("account", account).into())
}

async fn send_one(
    effects: &dyn Effects,
    acc: &Account,
    to: &[String],
    n: &Notification,
) -> Result<(), JobError> {
    let kind = if n.kind == "disconnected" {
        NoticeKind::Disconnected {
            date: n.disconnect_date,
        }
    } else {
        NoticeKind::Warning(Warning {
            kind: n.kind.clone(),
            days: n.days,
            disconnect_date: n.disconnect_date,
        })
    };
    let notice = Notice {
        account: Account {
            balance: n.balance,
            ..acc.clone()
        },
        to: to.to_vec(),
        daily_total: n.daily_total,
        kind,
    };
    // A refusal (5xx, bad credentials, no administrator yet) is not final for the
    // e-mail: the job retries with backoff, the claim released, and once the job is
    // dead the lost-job sweep queues a new balance_check after its grace — a warning
    // is delayed until mail works, never lost.
    effects.send_notice(&notice).await.map_err(|e| match e {
        JobError::Permanent(why) => JobError::Retryable(why),
        other => other,
    })
}

/// Sends one account's claimed e-mails in order, stopping at the first refusal:
/// (`i`, how many went out, the refusal).
async fn send_account(
    effects: &dyn Effects,
    i: usize,
    recipients: Result<&(Account, Vec<String>), JobError>,
    notices: &[Notification],
) -> (usize, usize, Result<(), JobError>) {
    let (acc, to) = match recipients {
        Ok(r) => r,
        Err(e) => return (i, 0, Err(e)),
    };
    for (sent, n) in notices.iter().enumerate() {
        if let Err(e) = send_one(effects, acc, to, n).await {
            return (i, sent, Err(e));
        }
    }
    (i, notices.len(), Ok(()))
}

/// E-mails sent at once by `balance_checks`, and how many finished accounts make a
/// settle worth starting.
pub const PARALLEL_SENDS: usize = 32;

/// Finished accounts that may wait for their settle while another one is in flight:
/// a crash leaves at most twice this many accounts' e-mails sent but unmarked (sent
/// again once their claim lapses).
pub const UNSETTLED_MAX: usize = 2 * PARALLEL_SENDS;

/// What `balance_checks` waited for.
enum Step {
    Settled(StoreResult<()>),
    Sent(Option<(usize, usize, Result<(), JobError>)>),
}

/// `balance_check` for a batch of jobs (a group commit, as `charge_account`'s): one
/// transaction claims every e-mail of the batch, the e-mails go out `PARALLEL_SENDS`
/// accounts at a time (each account's in order, stopping at its first refusal), and
/// one transaction at a time marks the finished accounts' sent e-mails sent, releases
/// the rest and journals the jobs whose e-mails all went out. A settle runs beside
/// the sends: it waits for the store's writer, which a billing run's charge batches
/// hold for tens of milliseconds, and settling in between stopped the sends for that
/// long every 32 accounts. Accounts finished meanwhile go in the next settle, up to
/// `UNSETTLED_MAX`. A job with a refused e-mail reads `Failed`: the caller runs it on
/// the per-job path, which retries it with backoff. `Err`: nothing was claimed, the
/// recipients could not be read (nothing was sent; the claims are released), or
/// settling failed even after retries (the unsettled claims then lapse after their
/// lease, and the sweep queues those e-mails again).
pub async fn balance_checks(
    store: &dyn Store,
    effects: &dyn Effects,
    jobs: &[CheckJob],
) -> StoreResult<Vec<BatchedJob>> {
    use futures::StreamExt;
    use futures::future::{BoxFuture, Either, select};

    // The claim must outlast the batch: each round of sends gets a lease's worth.
    let rounds = jobs.len().div_ceil(PARALLEL_SENDS).max(1);
    let lease_ms = NOTICE_LEASE_MS.saturating_mul(i64::try_from(rounds).unwrap_or(i64::MAX));
    let claimed = store.claim_balance_checks(jobs, now_ms(), lease_ms).await?;
    let mut outcomes: Vec<BatchedJob> = claimed.iter().map(|(o, _)| o.clone()).collect();
    // Every recipient of the batch in one read: two queries per account were most of
    // the reads a billing run's checks made.
    let mailed: Vec<Id> = claimed
        .iter()
        .zip(jobs)
        .filter(|((o, notices), _)| *o == BatchedJob::Done && !notices.is_empty())
        .map(|(_, j)| j.account)
        .collect();
    let recipients: HashMap<Id, (Account, Vec<String>)> = if mailed.is_empty() {
        HashMap::new()
    } else {
        match store.mail_recipients(&mailed).await {
            Ok(r) => r.into_iter().map(|(a, to)| (a.id, (a, to))).collect(),
            Err(e) => {
                // Nothing sent: the claims go back for the per-job retries. Should that
                // fail too, they lapse after their lease and the sweep queues the
                // e-mails again: late, not lost.
                let held: Vec<Notification> = claimed
                    .iter()
                    .flat_map(|(_, n)| n.iter().cloned())
                    .collect();
                let released = retrying(effects, "released balance e-mails", || {
                    store.settle_balance_checks(&[], &held, &[])
                })
                .await;
                if let Err(released) = released {
                    tracing::warn!(error = %released, "balance e-mails stay claimed until their lease ends");
                }
                return Err(e);
            }
        }
    };
    // Futures built in a loop, not an iterator chain: closures over borrowed data trip
    // the compiler's `Send` inference for the caller's spawned future.
    let mut sends = Vec::new();
    let mut finished = Vec::new();
    for (i, (outcome, notices)) in claimed.iter().enumerate() {
        if *outcome != BatchedJob::Done {
            continue;
        }
        if notices.is_empty() {
            finished.push(jobs[i].job.clone());
        } else {
            let account = jobs[i].account;
            let to = recipients
                .get(&account)
                .ok_or_else(|| DomainError::not_found("account", account).into());
            sends.push(send_account(effects, i, to, notices));
        }
    }
    let mut results = futures::stream::iter(sends).buffer_unordered(PARALLEL_SENDS);
    let (mut sent, mut unsent) = (Vec::new(), Vec::new());
    let (mut pending, mut all_sent) = (0, false);
    let mut settling: Option<BoxFuture<'_, StoreResult<()>>> = None;
    loop {
        // With no settle in flight, `pending` below started one: it never blocks sends.
        let more = !all_sent && (pending < UNSETTLED_MAX || settling.is_none());
        let step = match (settling.as_mut(), more) {
            (Some(settle), true) => match select(settle, results.next()).await {
                Either::Left((settled, _)) => Step::Settled(settled),
                Either::Right((next, _)) => Step::Sent(next),
            },
            (Some(settle), false) => Step::Settled(settle.await),
            (None, true) => Step::Sent(results.next().await),
            (None, false) => Step::Sent(None),
        };
        match step {
            Step::Settled(settled) => {
                settling = None;
                settled?;
            }
            Step::Sent(Some((i, n, result))) => {
                let notices = &claimed[i].1;
                sent.extend_from_slice(&notices[..n]);
                unsent.extend_from_slice(&notices[n..]);
                match result {
                    Ok(()) => finished.push(jobs[i].job.clone()),
                    Err(e) => outcomes[i] = BatchedJob::Failed(e.to_string()),
                }
                pending += 1;
            }
            Step::Sent(None) => all_sent = true,
        }
        let worth =
            pending >= PARALLEL_SENDS || (all_sent && (pending > 0 || !finished.is_empty()));
        if settling.is_none() && worth {
            let (sent, unsent, finished) = (
                std::mem::take(&mut sent),
                std::mem::take(&mut unsent),
                std::mem::take(&mut finished),
            );
            pending = 0;
            // Safe to repeat: each update is made under its own claim.
            settling = Some(Box::pin(async move {
                retrying(effects, "sent balance e-mails", || {
                    store.settle_balance_checks(&sent, &unsent, &finished)
                })
                .await
            }));
        }
        if all_sent && settling.is_none() {
            return Ok(outcomes);
        }
    }
}
