//! What a queue worker does with one delivered job: journal it, run its handler, and
//! decide done, retry with backoff, or dead.
//!
//! The queue only delivers; attempts, backoff and `dead` are decided here, the same on
//! every backend (apalis-redis 1.0 ignores max_attempts and apalis-sqlite retries with
//! no backoff, see ARCHITECTURE.md). A retry is a new delivery pushed with a delay.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use patchbay_jobs::model::{JobRecord, JobState, now_ms};
use patchbay_jobs::store::InboundJob;
use patchbay_jobs::{JobError, JobKind, Payload, handlers};

use crate::app::App;
use crate::queue::Envelope;

pub async fn run_job(app: Arc<App>, env: Envelope) {
    let kind = match env.kind.parse::<JobKind>() {
        Ok(kind) => kind,
        Err(e) => {
            tracing::error!(job = %env.id, error = %e, "dropping a queued job of unknown kind");
            return;
        }
    };
    if kind == JobKind::InboundMessage
        && let Some(job) = batchable(&env)
        && app.inbound.submit(job).await
    {
        return;
    }
    run_single(app, env, kind).await
}

/// The job as the inbound batcher takes it; `None` when its payload is bad, which the
/// per-job path turns into a dead job with the reason.
fn batchable(env: &Envelope) -> Option<InboundJob> {
    let Ok(Payload::InboundMessage(msg)) = JobKind::InboundMessage.parse_payload(&env.payload)
    else {
        return None;
    };
    let phone = handlers::inbound_sender_phone(&msg).ok()?;
    Some(InboundJob {
        job: env.id.clone(),
        msg,
        phone,
    })
}

/// The per-job path: journal the attempt, run the handler, journal the outcome.
async fn run_single(app: Arc<App>, env: Envelope, kind: JobKind) {
    let now = now_ms();
    let rec = JobRecord {
        id: env.id.clone(),
        kind,
        payload: env.payload.clone(),
        state: JobState::Pending,
        attempts: env.attempt,
        max_attempts: app.settings.max_attempts(kind),
        last_error: None,
        idempotency_key: None,
        created_at: now,
        updated_at: now,
        run_at: now,
    };
    let Some(started) = start(&app, &rec).await else {
        return;
    };
    let span = tracing::info_span!("job", id = %rec.id, kind = %kind, attempt = started.attempts);
    tracing::Instrument::instrument(attempt(app, env, kind, started), span).await;
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
    match (&state, &error) {
        (JobState::Done, _) => tracing::debug!("job done"),
        (JobState::Dead, Some(m)) => tracing::warn!(error = %m, "job is dead"),
        (_, m) => tracing::info!(error = ?m, retry_in = ?delay, "job failed, will retry"),
    }
    let run_at = now_ms() + delay.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    if let Err(e) = app
        .store
        .journal_finish(&started.id, state, error.as_deref(), run_at)
        .await
    {
        tracing::error!(error = %e, "cannot record the job's outcome");
    }
    if let Some(delay) = delay {
        // On failure push() marks the job dead with the reason, so it is not lost silently.
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
    let _ = app
        .push(rec, rec.attempts, Some(Duration::from_secs(30)))
        .await;
    None
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}
