//! The lost-job sweep: queues again the jobs the journal holds but the queue never got.
//!
//! A job is journalled, then pushed; a retry is journalled `failed`, then pushed with a
//! delay. A daemon killed between the two steps leaves a journal row that nothing will
//! ever run, and whose idempotency key (a billing day, a top-up reference) makes every
//! later enqueue return it instead of queueing anew. Every `queue.lost_job_grace_secs`
//! this task claims such rows (`Store::journal_claim_lost`) and pushes them. A job that
//! was in the queue after all (a crash after the push, before the journal heard of it)
//! runs twice, which every handler is built to absorb.
//!
//! A job the queue took but no worker started within `QUEUED_STALE` (a Redis restarted
//! without its data) is queued again the same way. Inbound messages from connectors
//! are journalled before they are queued only on such a Redis (no append-only file),
//! billing's charges on every Redis; otherwise the queue alone holds them until they
//! ran (`App::queue_batched`).
//!
//! It also deletes done jobs older than `queue.journal_retention_days` from the journal
//! (dead ones stay for `job.retry`), and watches the balance e-mail outbox: an e-mail
//! recorded by a charge and still unsent after `UNSENT_GRACE`, with no `balance_check`
//! left to send it (the job ran out of attempts during a long SMTP outage, or was never
//! queued), gets a new `balance_check` — so a warning is delayed by an outage, never
//! lost.

use std::sync::Arc;
use std::time::Duration;

use patchbay_jobs::JobKind;
use patchbay_jobs::model::now_ms;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::App;

/// Jobs claimed and pushed per store round trip.
const CLAIM: u32 = 500;

/// How long a queued job may wait for a worker before the sweep assumes the queue lost
/// it (a Redis restarted without its data) and queues it again. Far above any backlog
/// the daemon lets build up (inbound backpressure holds it at 8,192 jobs, a billing
/// fan-out drains in under a minute); a job queued twice runs once, by idempotency.
const QUEUED_STALE: Duration = Duration::from_secs(15 * 60);

/// How long a recorded balance e-mail may wait for its `balance_check`.
const UNSENT_GRACE: Duration = Duration::from_secs(10 * 60);

pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let grace = app.settings.lost_job_grace();
    let (grace_ms, stale_ms) = (millis(grace), millis(QUEUED_STALE));
    let mut tick = tokio::time::interval(grace.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        app.check_queue_persistence(false).await;
        loop {
            let lost = match app
                .store
                .journal_claim_lost(now_ms(), grace_ms, stale_ms, CLAIM)
                .await
            {
                Ok(lost) => lost,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for lost jobs");
                    break;
                }
            };
            for rec in &lost {
                tracing::warn!(job = %rec.id, kind = %rec.kind, state = %rec.state,
                    "queueing a job the queue never got or lost (the daemon stopped in between, or the queue lost its data)");
                // On failure the row stays pending and unpushed: a later sweep tries again.
                let _ = app.push(rec, rec.attempts, None).await;
            }
            if lost.len() < CLAIM as usize {
                break;
            }
        }
        unsent_mail(&app).await;
        purge_journal(&app).await;
    }
}

/// Journal rows per purge statement and per sweep: small deletes that never hold the
/// store's writer for long; a backlog of old rows goes over several sweeps.
const PURGE: u32 = 1_000;
const PURGE_PER_SWEEP: u64 = 20_000;

async fn purge_journal(app: &App) {
    let before = now_ms().saturating_sub(millis(app.settings.journal_retention()));
    let mut purged = 0;
    while purged < PURGE_PER_SWEEP {
        match app.store.journal_purge(before, PURGE).await {
            Ok(n) => {
                purged += n;
                if n < u64::from(PURGE) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot purge old jobs from the journal");
                break;
            }
        }
    }
    if purged > 0 {
        tracing::info!(jobs = purged, "purged done jobs past the journal retention");
    }
}

async fn unsent_mail(app: &App) {
    let before = now_ms().saturating_sub(millis(UNSENT_GRACE));
    let accounts = match app
        .store
        .accounts_with_unsent_notifications(before, CLAIM)
        .await
    {
        Ok(accounts) => accounts,
        Err(e) => return tracing::warn!(error = %e, "cannot look for unsent balance e-mails"),
    };
    if accounts.is_empty() {
        return;
    }
    tracing::warn!(
        accounts = accounts.len(),
        "queueing balance checks for unsent balance e-mails"
    );
    let checks = accounts.iter().map(|a| json!({ "account": a })).collect();
    if let Err(e) = app.enqueue_many(JobKind::BalanceCheck, checks).await {
        tracing::warn!(error = %e, "cannot queue balance checks for unsent e-mails");
    }
}

/// A duration in the journal's unit, unix milliseconds (saturating).
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
