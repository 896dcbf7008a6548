//! The daily billing schedule: an apalis-cron worker that, at `billing.run_at` in
//! `billing.timezone`, enqueues that day's `billing_run`.
//!
//! apalis-cron fires on every daemon (no distributed lock, apalis#281) and does not
//! catch up missed ticks; the tick only *enqueues* `billing_run` with the idempotency
//! key `billing_run:<date>`, so two daemons (or a restart) queue the day once. Today's
//! run is also queued whenever `run_at` has passed (`catch_up`: at start and every five
//! minutes), since apalis-cron misses a tick the daemon was down for; an operator
//! catches up an earlier day with `patchbayctl billing run --date`.

use std::str::FromStr;
use std::sync::Arc;

use apalis_core::error::BoxDynError;
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_cron::{CronScheduler, Tick};
use chrono::{NaiveTime, Timelike};
use chrono_tz::Tz;
use patchbay_jobs::JobKind;
use patchbay_jobs::billing;
use serde_json::json;
use tokio_util::task::AbortOnDropHandle;

use crate::app::App;

pub async fn run_schedule(app: Arc<App>) {
    let config = app.billing();
    let (Ok(at), Ok(tz)) = (
        NaiveTime::parse_from_str(&config.run_at, "%H:%M"),
        billing::parse_timezone(&config.timezone),
    ) else {
        tracing::error!("billing.run_at or billing.timezone is invalid; no daily billing runs");
        return;
    };
    let expr = format!("0 {} {} * * *", at.minute(), at.hour());
    let schedule = match cron::Schedule::from_str(&expr) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(expr, error = %e, "cannot build the billing schedule");
            return;
        }
    };
    tracing::info!(run_at = %config.run_at, timezone = %tz, "daily billing scheduled");
    // Aborted with this task: `run_schedule` only ends when the daemon stops.
    let _catching_up = AbortOnDropHandle::new(tokio::spawn(catch_up(app.clone(), at, tz)));
    for attempt in 0u64.. {
        // A fresh name each time: apalis refuses a name it saw alive moments ago.
        let name = format!("billing-cron:{}:{attempt}", std::process::id());
        let worker = WorkerBuilder::new(name)
            .backend(CronScheduler::new(schedule.clone()).with_timezone(tz))
            .data(app.clone())
            .data(tz)
            .build(tick);
        match worker.run().await {
            Ok(()) => tracing::error!("the billing schedule stopped; restarting it in a minute"),
            Err(e) => {
                tracing::error!(error = %e, "the billing schedule failed; restarting it in a minute")
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }
}

/// apalis-cron computes its next tick from the moment it starts and skips a local time
/// that a clock change leaves out: a daemon that was down at run_at, a schedule that
/// was restarting, or a run_at inside the hour clocks jump over would miss the day.
/// Today's run is queued whenever its time has passed — at start and every few minutes;
/// the idempotency key makes that a no-op once it exists.
async fn catch_up(app: Arc<App>, at: NaiveTime, tz: Tz) {
    let mut every = tokio::time::interval(CATCH_UP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let local = chrono::Utc::now().with_timezone(&tz);
        if local.time() >= at {
            queue_run(&app, local.date_naive(), "catching up today's run").await;
        }
    }
}

const CATCH_UP_EVERY: std::time::Duration = std::time::Duration::from_secs(5 * 60);

async fn tick(tick: Tick<Tz>, app: Data<Arc<App>>, tz: Data<Tz>) -> Result<(), BoxDynError> {
    // The day of the scheduled instant, not of now: a tick handled a moment late
    // around midnight still bills the day it was for.
    let at = i64::try_from(tick.get_timestamp())
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .unwrap_or_else(chrono::Utc::now);
    queue_run(&app, billing::billing_day(at, *tz), "daily billing run").await;
    Ok(())
}

async fn queue_run(app: &App, date: chrono::NaiveDate, what: &str) {
    match app
        .enqueue(JobKind::BillingRun, json!({ "date": date }))
        .await
    {
        // Every catch-up check finds the day's run once it exists: not news.
        Ok((id, true)) => tracing::debug!(%date, job = %id, "{what}: queued already"),
        Ok((id, false)) => tracing::info!(%date, job = %id, "{what}: queued"),
        Err(e) => tracing::error!(%date, error = %e, "{what}: cannot queue it"),
    }
}
