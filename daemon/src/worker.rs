//! What a queue worker does with one delivered job: journal it, run its handler, and
//! decide done, retry with backoff, or dead.
//!
//! The queue only delivers; attempts, backoff and `dead` are decided here, the same on
//! every backend (apalis-redis 1.0 ignores max_attempts and apalis-sqlite retries with
//! no backoff, see ARCHITECTURE.md). A retry is a new delivery pushed with a delay.
//! `inbound_message` and `charge_account` jobs go through group commits (`batcher`)
//! first and come back here only when a batch cannot take them.
//!
//! A job the queue rejects (its stored form does not decode, or its handler panicked
//! outside `attempt`'s own guard) is recorded dead here too, with the reason and a
//! bounded copy of what was stored (`queue::Rejected`).

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::FutureExt;
use patchbay_jobs::model::{Id, JobRecord, JobState, now_ms};
use patchbay_jobs::store::{BatchedJob, ChargeJob, Charged, CheckJob, InboundJob};
use patchbay_jobs::{DomainError, JobError, JobKind, Payload, Store, handlers};
use tokio::sync::mpsc;

use crate::app::App;
use crate::batcher::Batcher;
use crate::metrics::{self, Outcome};
use crate::queue::{Envelope, Handler, Rejected, panic_message};

/// The daemon's queue handler: [`run_job`] for each job, [`reject`] for a job that
/// cannot run.
#[derive(Clone)]
pub struct Jobs(pub Arc<App>);

impl Handler for Jobs {
    fn run(&self, env: Envelope) -> impl Future<Output = ()> + Send + 'static {
        run_job(self.0.clone(), env)
    }

    fn reject(&self, job: Rejected) -> impl Future<Output = ()> + Send + 'static {
        reject(self.0.clone(), job)
    }
}

pub async fn run_job(app: Arc<App>, env: Envelope) {
    let kind = match env.kind.parse::<JobKind>() {
        Ok(kind) => kind,
        Err(e) => {
            tracing::error!(job = %env.id, error = %e, "dropping a queued job of unknown kind");
            return;
        }
    };
    let started = std::time::Instant::now();
    let (id, attempt) = (env.id.clone(), env.attempt);
    // Bad payloads skip the batchers: the per-job path makes them dead with the reason.
    let batched = match kind.parse_payload(&env.payload) {
        Ok(Payload::InboundMessage(msg)) => {
            let job = InboundJob {
                job: env.id.clone(),
                phone: handlers::inbound_sender_phone(&msg),
                msg,
                max_attempts: app.settings.max_attempts(kind),
            };
            app.inbound.submit(job).await
        }
        Ok(Payload::ChargeAccount(c)) => {
            let job = ChargeJob {
                job: env.id.clone(),
                account: c.account,
                day: c.date,
                day_start: app.day_start(c.date),
                day_end: app.day_end(c.date),
                max_attempts: app.settings.max_attempts(kind),
            };
            app.charges.submit(job).await
        }
        Ok(Payload::BalanceCheck(b)) => {
            let job = CheckJob {
                job: env.id.clone(),
                account: b.account,
            };
            app.checks.submit(job).await
        }
        _ => false,
    };
    let ran = if batched {
        // A batch reads no journal row back: the first delivery's wait is its age.
        metrics::first_start(kind, &id, attempt, now_ms());
        true
    } else {
        run_single(app, env, kind).await
    };
    if ran {
        metrics::job_ran(kind, started.elapsed());
    }
}

/// Group commit for `inbound_message` jobs (`Store::run_inbound_batch`), with as many
/// batches at once as the store takes (`Store::inbound_writers`).
pub fn inbound_batcher(store: Arc<dyn Store>) -> Batcher<InboundJob> {
    let writers = store.inbound_writers();
    Batcher::start_writers("inbound_message", writers, move |jobs: Vec<InboundJob>| {
        let store = store.clone();
        async move {
            let outcomes = store.run_inbound_batch(&jobs).await;
            finished(
                JobKind::InboundMessage,
                outcomes,
                jobs.iter().map(|j| j.job.as_str()),
            )
        }
    })
}

/// Group commit for `charge_account` jobs (`Store::charge_accounts`). What follows the
/// charges (`App::after_charges`: stopping suspended connectors, queueing balance
/// checks) runs beside the next batches, not between them: it writes the journal and
/// the queue, and made a third of each batch's time. Charge jobs are then done before
/// their balance checks are queued; a check lost in between (a crash) is queued by the
/// lost-job sweep from the e-mails the charge recorded (`sweep::unsent_mail`).
pub fn charge_batcher(app: Weak<App>) -> Batcher<ChargeJob> {
    let follow_ups = follow_charges(app.clone());
    Batcher::start("charge_account", move |jobs: Vec<ChargeJob>| {
        let app = app.upgrade();
        let follow_ups = follow_ups.clone();
        async move {
            let Some(app) = app else {
                return vec![false; jobs.len()];
            };
            let results = match app.store.charge_accounts(&jobs, &app.prices()).await {
                Ok(results) => results,
                Err(e) => {
                    let jobs = jobs.iter().map(|j| j.job.as_str());
                    return finished(JobKind::ChargeAccount, Err(e), jobs);
                }
            };
            let charges: Vec<(Id, Charged)> = jobs
                .iter()
                .zip(&results)
                .filter_map(|(j, (_, c))| Some((j.account, c.clone()?)))
                .collect();
            // Waits only when `FOLLOW_UPS` batches are behind: bounded memory.
            if !charges.is_empty() && follow_ups.send(charges).await.is_err() {
                tracing::warn!("charges committed, their balance checks are left to the sweep");
            }
            let outcomes = results.into_iter().map(|(o, _)| o).collect();
            let jobs = jobs.iter().map(|j| j.job.as_str());
            finished(JobKind::ChargeAccount, Ok(outcomes), jobs)
        }
    })
}

/// Charge batches whose follow-ups may wait at once.
const FOLLOW_UPS: usize = 8;

/// The task that runs `App::after_charges` for committed charge batches, in order,
/// several waiting batches at once. It ends with the charge batcher.
fn follow_charges(app: Weak<App>) -> mpsc::Sender<Vec<(Id, Charged)>> {
    let (tx, mut rx) = mpsc::channel::<Vec<(Id, Charged)>>(FOLLOW_UPS);
    tokio::spawn(async move {
        let mut batches = Vec::with_capacity(FOLLOW_UPS);
        while rx.recv_many(&mut batches, FOLLOW_UPS).await > 0 {
            let charges: Vec<(Id, Charged)> = batches.drain(..).flatten().collect();
            let Some(app) = app.upgrade() else { return };
            if let Err(e) = app.after_charges(&charges).await {
                tracing::warn!(error = %e, "cannot queue balance checks after a charge batch");
            }
        }
    });
    tx
}

/// Group commit for `balance_check` jobs (`handlers::balance_checks`): their e-mails
/// claimed and settled in one transaction each, sent in parallel in between.
pub fn check_batcher(app: Weak<App>) -> Batcher<CheckJob> {
    Batcher::start("balance_check", move |jobs: Vec<CheckJob>| {
        let app = app.upgrade();
        async move {
            let Some(app) = app else {
                return vec![false; jobs.len()];
            };
            let outcomes = handlers::balance_checks(app.store.as_ref(), app.as_ref(), &jobs).await;
            finished(
                JobKind::BalanceCheck,
                outcomes,
                jobs.iter().map(|j| j.job.as_str()),
            )
        }
    })
}

/// Which jobs of a batch are finished (`true`) or must go the per-job path (`false`);
/// `outcomes` are in the order of `jobs` (their journal ids).
fn finished<'a>(
    kind: JobKind,
    outcomes: Result<Vec<BatchedJob>, DomainError>,
    jobs: impl ExactSizeIterator<Item = &'a str>,
) -> Vec<bool> {
    match outcomes {
        Ok(outcomes) => outcomes
            .into_iter()
            .zip(jobs)
            .map(|(outcome, job)| match outcome {
                BatchedJob::Done => {
                    metrics::job_finished(kind, Outcome::Done);
                    true
                }
                BatchedJob::AlreadyFinished => true,
                BatchedJob::Dead(reason) => {
                    metrics::job_finished(kind, Outcome::Dead);
                    tracing::warn!(job = %job, error = %reason, "job is dead");
                    true
                }
                BatchedJob::NotJournalled => false,
                BatchedJob::Failed(reason) => {
                    tracing::debug!(job = %job, error = %reason, "job failed in its batch; running it alone");
                    false
                }
            })
            .collect(),
        Err(e) => {
            let n = jobs.len();
            tracing::warn!(jobs = n, error = %e, "job batch failed; running its jobs one by one");
            vec![false; n]
        }
    }
}

/// The per-job path: journal the attempt, run the handler, journal the outcome.
/// `false` when the job did not run (finished before, or the store is unreachable).
async fn run_single(app: Arc<App>, env: Envelope, kind: JobKind) -> bool {
    if crate::cluster::placement::handed_back(&app, kind, &env).await {
        return false;
    }
    let now = now_ms();
    let rec = JobRecord {
        id: env.id.clone(),
        kind,
        payload: env.payload.clone(),
        state: JobState::Pending,
        attempts: env.attempt,
        max_attempts: app.settings.max_attempts(kind),
        last_error: None,
        // For a missing journal row only (`journal_start`): a job queued without one
        // whose key another row holds does not run, as an enqueue would have answered.
        idempotency_key: kind
            .parse_payload(&env.payload)
            .ok()
            .and_then(|p| p.idempotency_key()),
        created_at: now,
        updated_at: now,
        run_at: now,
    };
    let Some(started) = start(&app, &rec).await else {
        return false;
    };
    // Due since `run_at`: its enqueue, its retry's backoff, or its revival.
    metrics::waited(kind, now_ms().saturating_sub(started.run_at));
    let span = tracing::info_span!("job", id = %rec.id, kind = %kind, attempt = started.attempts);
    tracing::Instrument::instrument(attempt(app, env, kind, started), span).await;
    true
}

/// Runs one attempt and records its outcome; runs inside the job's span.
async fn attempt(app: Arc<App>, env: Envelope, kind: JobKind, started: JobRecord) {
    let outcome = async {
        let payload = kind.parse_payload(&env.payload).map_err(JobError::from)?;
        match AssertUnwindSafe(handlers::run(&*app.store, &*app, &payload))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            // A panic is a bug in the handler: running it again would panic again.
            Err(panic) => Err(JobError::Permanent(format!(
                "handler panicked: {}",
                panic_message(panic.as_ref())
            ))),
        }
    }
    .await;
    let (state, error, delay) = match outcome {
        Ok(()) => (JobState::Done, None, None),
        Err(JobError::Permanent(m)) => (JobState::Dead, Some(m), None),
        Err(JobError::Retryable(m)) if started.attempts >= started.max_attempts => (
            JobState::Dead,
            Some(format!("gave up after {} attempts: {m}", started.attempts)),
            None,
        ),
        Err(JobError::Retryable(m)) => (
            JobState::Failed,
            Some(m),
            Some(app.settings.retry_delay(started.attempts)),
        ),
    };
    metrics::job_finished(
        kind,
        match state {
            JobState::Done => Outcome::Done,
            JobState::Dead => Outcome::Dead,
            _ => Outcome::Retry,
        },
    );
    match (&state, &error) {
        (JobState::Done, _) => tracing::debug!("job done"),
        (JobState::Dead, Some(m)) => tracing::warn!(error = %m, "job is dead"),
        (_, m) => tracing::info!(error = ?m, retry_in = ?delay, "job failed, will retry"),
    }
    let run_at = now_ms()
        .saturating_add(delay.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    if let Err(e) = app
        .store
        .journal_finish(&started.id, state, error.as_deref(), run_at)
        .await
    {
        tracing::error!(error = %e, "cannot record the job's outcome");
    }
    if let (JobState::Dead, Some(reason)) = (&state, &error)
        && let Ok(payload) = kind.parse_payload(&env.payload)
        && let Err(e) = handlers::gave_up(&*app.store, &payload, reason).await
    {
        tracing::warn!(error = %e, "cannot record what the dead job leaves behind");
    }
    if let Some(delay) = delay {
        // On failure the journal row stays `failed` with its run_at: the sweep queues it.
        if let Err(e) = app.push(&started, started.attempts, Some(delay)).await {
            tracing::error!(error = %e, "cannot queue the job's retry");
        }
    }
}

/// Journals the start of an attempt, waiting out short store outages; `None` when the
/// job must not run (already done or dead, or the store stayed unreachable).
async fn start(app: &App, rec: &JobRecord) -> Option<JobRecord> {
    let mut wait = Duration::from_millis(100);
    for _ in 0..8 {
        match app.store.journal_start(rec).await {
            Ok(Some(started)) => return Some(started),
            Ok(None) => {
                tracing::debug!(job = %rec.id, "skipping a redelivered job that already finished");
                return None;
            }
            Err(e) => {
                tracing::warn!(job = %rec.id, error = %e, "cannot journal a job start, retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!(job = %rec.id, "store unreachable; requeueing the job");
    // This delivery is acked when we return. An inbound message queued from a
    // connector has no journal row yet, so the queue's copy is the only one: keep
    // handing it back until the queue takes it. (At shutdown the worker stops waiting
    // for this handler after the grace period and leaves the delivery unacked.)
    let mut wait = Duration::from_secs(1);
    loop {
        match app
            .push(rec, rec.attempts, Some(Duration::from_secs(30)))
            .await
        {
            Ok(()) => return None,
            Err(e) => {
                tracing::warn!(job = %rec.id, error = %e, "cannot requeue the job, retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Records a rejected job dead, with its reason: its journal row if it has one (which
/// keeps the payload it was queued with), else a new row with the payload the queue
/// could read. Waits out a store outage, since the queue's copy goes once this returns;
/// a daemon stopping meanwhile leaves the delivery unacked, to come again.
pub async fn reject(app: Arc<App>, job: Rejected) {
    // The worker's queue says the kind, whatever the stored job claims.
    let prefix = format!("{}:", app.settings.raw.queue.namespace);
    let Some(kind) = job
        .queue
        .strip_prefix(&prefix)
        .and_then(|k| k.parse::<JobKind>().ok())
    else {
        return tracing::error!(job = %job.id, queue = %job.queue, reason = %job.reason, "rejected job of an unknown queue dropped");
    };
    let payload = job
        .decodable
        .then(|| kind.parse_payload(&job.payload).ok())
        .flatten();
    let now = now_ms();
    let rec = JobRecord {
        id: job.id.clone(),
        kind,
        payload: job.payload,
        state: JobState::Pending,
        attempts: job.attempt,
        max_attempts: app.settings.max_attempts(kind),
        last_error: None,
        idempotency_key: payload.as_ref().and_then(Payload::idempotency_key),
        created_at: now,
        updated_at: now,
        run_at: now,
    };
    tracing::warn!(job = %rec.id, kind = %kind, reason = %job.reason, "job is dead: the queue rejected it");
    metrics::job_finished(kind, Outcome::Dead);
    let mut wait = Duration::from_millis(100);
    loop {
        // One statement that reads no row back: a stored row past repair cannot
        // fail it for good (only an unreachable store is retried).
        match app.store.journal_mark_dead(&rec, &job.reason).await {
            Ok(()) => break,
            Err(e) if app.stop.is_cancelled() => {
                tracing::warn!(job = %rec.id, error = %e, "cannot record a rejected job before stopping; it stays queued");
                return std::future::pending().await;
            }
            Err(e) => {
                tracing::warn!(job = %rec.id, error = %e, "cannot record a rejected job, retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
    if let Some(payload) = payload
        && let Err(e) = handlers::gave_up(&*app.store, &payload, &job.reason).await
    {
        tracing::warn!(job = %rec.id, error = %e, "cannot record what the dead job leaves behind");
    }
}
