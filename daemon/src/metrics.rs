//! The daemon's Prometheus metrics: their names, help texts and buckets, the recorder
//! (`metrics` facade, `metrics-exporter-prometheus` rendering on our own HTTP listener),
//! and the gauges read from the store and the queue when Prometheus scrapes.
//!
//! Counters and histograms are recorded where things happen (`worker`, `batcher`,
//! `plugin_host`, `mail`, `app`) through the functions here, so every name is written
//! once. Gauges of state that lives in the store (channels by status, dead jobs, queue
//! depths) are not kept up to date by a loop: [`Metrics::render`] reads them at scrape
//! time, each part within `health::PART_TIMEOUT`, and a part that does not answer keeps
//! its last value while `patchbay_up{part}` says it is down.
//!
//! Why `metrics-exporter-prometheus` and not `prometheus-client`: the `metrics` macros
//! cost a hash lookup and an atomic add on the hot paths with no registry to thread
//! through every module, and the exporter renders the text exposition format without
//! its own HTTP server (default features off), so `/metrics` shares the dashboard's
//! listener.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{
    Counter, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use patchbay_jobs::JobKind;
use patchbay_jobs::model::JobState;

use crate::app::App;
use crate::health::PART_TIMEOUT;

pub const JOBS: &str = "patchbay_jobs_total";
pub const JOB_DURATION: &str = "patchbay_job_duration_seconds";
pub const JOB_QUEUE_LATENCY: &str = "patchbay_job_queue_latency_seconds";
pub const QUEUE_DEPTH: &str = "patchbay_queue_depth";
pub const DEAD_JOBS: &str = "patchbay_dead_jobs";
pub const INBOUND: &str = "patchbay_inbound_messages_total";
pub const OUTBOUND: &str = "patchbay_outbound_messages_total";
pub const CHANNELS: &str = "patchbay_channels";
pub const CONNECTOR_EVENTS: &str = "patchbay_connector_events_total";
pub const CHARGED: &str = "patchbay_billing_charged_minor_units_total";
pub const MAIL: &str = "patchbay_mail_sent_total";
pub const STORE_BATCH: &str = "patchbay_store_batch_duration_seconds";
pub const QUEUE_PUSH: &str = "patchbay_queue_push_duration_seconds";
pub const UP: &str = "patchbay_up";
pub const START_TIME: &str = "patchbay_start_time_seconds";

/// Latency buckets, in seconds: from a fast store commit (1 ms) to a slow send (60 s).
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// How often histograms are drained into their buckets when nobody scrapes: bounds the
/// samples they hold under load.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process' recorder, once installed.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

static INSTALLED: OnceLock<Metrics> = OnceLock::new();

impl Metrics {
    /// Installs the global recorder (once per process; later calls return the first)
    /// and describes every metric, so a scrape shows HELP and TYPE lines even for those
    /// not recorded yet. Every series carries `node`: daemons sharing a store and a
    /// queue are told apart.
    pub fn install(node: &str) -> Metrics {
        INSTALLED
            .get_or_init(|| {
                let builder = PrometheusBuilder::new()
                    .add_global_label("node", node)
                    .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                    .expect("the bucket list is not empty");
                let recorder = builder.build_recorder();
                let handle = recorder.handle();
                if let Err(e) = metrics::set_global_recorder(recorder) {
                    tracing::warn!(error = %e, "another metrics recorder is installed; /metrics shows nothing");
                }
                describe();
                let _ = JOB_SERIES.set(JobSeries::resolve());
                Metrics { handle }
            })
            .clone()
    }

    /// Drains histograms every [`UPKEEP_EVERY`] until `stop`.
    pub async fn upkeep(self, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => self.handle.run_upkeep(),
            }
        }
    }

    /// The text exposition of every metric, after reading the store's and the queue's
    /// gauges.
    pub async fn render(&self, app: &App) -> String {
        refresh_gauges(app).await;
        self.recorded()
    }

    /// The text exposition of what was recorded, without reading any gauge.
    pub fn recorded(&self) -> String {
        self.handle.render()
    }
}

fn describe() {
    describe_counter!(
        JOBS,
        "Job attempts finished, by kind and outcome (done, retry, dead)."
    );
    describe_histogram!(JOB_DURATION, "Time a job's handler took, by kind.");
    describe_histogram!(
        JOB_QUEUE_LATENCY,
        "Time a job waited for a worker once due (enqueued, or its retry's backoff over), by kind."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Jobs by kind and state: queued (waiting in the queue backend), running, failed (waiting for a retry)."
    );
    describe_gauge!(
        DEAD_JOBS,
        "Dead jobs (out of attempts or failed for good), by kind."
    );
    describe_counter!(
        INBOUND,
        "Inbound messages taken from connectors and queued, by connector kind."
    );
    describe_counter!(
        OUTBOUND,
        "Sends handed to connectors, by connector kind and outcome (sent, retry, failed, skipped)."
    );
    describe_gauge!(CHANNELS, "Channels by status.");
    describe_counter!(
        CONNECTOR_EVENTS,
        "Connector events, by connector kind, type (status, inbound, receipt, malformed) and outcome (accepted, refused, dropped, stale, failed)."
    );
    describe_counter!(
        CHARGED,
        "Money charged by daily billing runs and new channels' first day, in minor units of the account currencies."
    );
    describe_counter!(
        MAIL,
        "Balance e-mails handed to the mail transport, by outcome (sent, failed)."
    );
    describe_histogram!(
        STORE_BATCH,
        "Time one group-committed store batch took, by batch (inbound_message, charge_account, balance_check)."
    );
    describe_histogram!(QUEUE_PUSH, "Time one push to the queue backend took.");
    describe_gauge!(
        UP,
        "1 when the part (store, queue) answered the last scrape's probe, else 0."
    );
    describe_gauge!(
        START_TIME,
        "When this daemon started, in seconds since the Unix epoch."
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!(START_TIME).set(started);
}

/// Where a job attempt ended (the discriminant indexes `JobSeries::finished`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done = 0,
    Retry = 1,
    Dead = 2,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Retry => "retry",
            Outcome::Dead => "dead",
        }
    }
}

/// The per-job series, resolved once when the recorder is installed: the workers
/// record three of them for every job, and looking a series up by its name and labels
/// (a key built, hashed and found under a lock) on each call was most of their cost.
/// Unset without a recorder, when there is nothing to record.
struct JobSeries {
    /// Per kind in `JobKind::ALL` order, per [`Outcome`].
    finished: [[Counter; 3]; JobKind::ALL.len()],
    ran: [Histogram; JobKind::ALL.len()],
    waited: [Histogram; JobKind::ALL.len()],
}

static JOB_SERIES: OnceLock<JobSeries> = OnceLock::new();

impl JobSeries {
    fn resolve() -> JobSeries {
        let kind = |i: usize| JobKind::ALL[i].as_str();
        JobSeries {
            finished: std::array::from_fn(|i| {
                [Outcome::Done, Outcome::Retry, Outcome::Dead]
                    .map(|o| counter!(JOBS, "kind" => kind(i), "outcome" => o.as_str()))
            }),
            ran: std::array::from_fn(|i| histogram!(JOB_DURATION, "kind" => kind(i))),
            waited: std::array::from_fn(|i| histogram!(JOB_QUEUE_LATENCY, "kind" => kind(i))),
        }
    }

    fn get(kind: JobKind) -> Option<(&'static JobSeries, usize)> {
        let i = JobKind::ALL.iter().position(|k| *k == kind)?;
        Some((JOB_SERIES.get()?, i))
    }
}

/// Jobs done by this process, per kind in `JobKind::ALL` order: the dashboard's
/// throughput (the `metrics` facade has no reading back).
static DONE: [AtomicU64; JobKind::ALL.len()] = [const { AtomicU64::new(0) }; JobKind::ALL.len()];

pub fn job_finished(kind: JobKind, outcome: Outcome) {
    let Some(i) = JobKind::ALL.iter().position(|k| *k == kind) else {
        return;
    };
    if let Some(series) = JOB_SERIES.get() {
        series.finished[i][outcome as usize].increment(1);
    }
    if outcome == Outcome::Done {
        DONE[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Jobs done by this process since it started, per kind in `JobKind::ALL` order.
pub fn done_totals() -> [u64; JobKind::ALL.len()] {
    std::array::from_fn(|i| DONE[i].load(Ordering::Relaxed))
}

pub fn job_ran(kind: JobKind, took: Duration) {
    if let Some((series, i)) = JobSeries::get(kind) {
        series.ran[i].record(took);
    }
}

/// How long a job waited for a worker after it was due, in ms.
pub fn waited(kind: JobKind, ms: i64) {
    if let Some((series, i)) = JobSeries::get(kind) {
        series.waited[i].record(ms.max(0) as f64 / 1000.0);
    }
}

/// A group-committed job's first delivery (`attempt` 0): its id is a ULID, whose
/// first 48 bits are its creation time. (A dead one retried by hand also comes as
/// attempt 0 and counts from its creation: rare, and an operator's doing.)
pub fn first_start(kind: JobKind, id: &str, attempt: u32, now: i64) {
    if attempt == 0
        && let Ok(ulid) = ulid::Ulid::from_string(id)
    {
        waited(kind, now.saturating_sub(ulid.timestamp_ms() as i64));
    }
}

pub fn inbound_queued(connector: &str, n: u64) {
    counter!(INBOUND, "connector" => connector.to_owned()).increment(n);
}

pub fn outbound(connector: &str, outcome: &'static str) {
    counter!(OUTBOUND, "connector" => connector.to_owned(), "outcome" => outcome).increment(1);
}

pub fn connector_events(connector: &str, kind: &'static str, outcome: &'static str, n: u64) {
    counter!(CONNECTOR_EVENTS, "connector" => connector.to_owned(), "type" => kind, "outcome" => outcome)
        .increment(n);
}

pub fn charged(minor_units: i64) {
    if let Ok(n) = u64::try_from(minor_units) {
        counter!(CHARGED).increment(n);
    }
}

pub fn mail_sent(ok: bool) {
    counter!(MAIL, "outcome" => if ok { "sent" } else { "failed" }).increment(1);
}

pub fn store_batch(batch: &'static str, took: Duration) {
    histogram!(STORE_BATCH, "batch" => batch).record(took);
}

pub fn queue_push(took: Duration) {
    histogram!(QUEUE_PUSH).record(took);
}

/// Reads channels by status, job states and queue depths into their gauges. Each read
/// is bounded by `PART_TIMEOUT`; a part that fails keeps its last values.
async fn refresh_gauges(app: &App) {
    let (channels, jobs, depths) = tokio::join!(
        tokio::time::timeout(PART_TIMEOUT, app.store.channel_counts()),
        tokio::time::timeout(PART_TIMEOUT, app.store.journal_open_counts()),
        tokio::time::timeout(PART_TIMEOUT, async {
            let mut out = Vec::with_capacity(JobKind::ALL.len());
            for kind in JobKind::ALL {
                out.push((kind, app.queue.depth(&app.queue_name(kind)).await?));
            }
            Ok::<_, crate::queue::QueueError>(out)
        }),
    );
    let store_up = matches!((&channels, &jobs), (Ok(Ok(_)), Ok(Ok(_))));
    if let Ok(Ok(channels)) = channels {
        // Every status the daemon writes, so a status that emptied shows 0.
        for status in patchbay_jobs::model::CHANNEL_STATUSES {
            let n = channels
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |c| c.1);
            gauge!(CHANNELS, "status" => status).set(n as f64);
        }
        for (status, n) in &channels {
            gauge!(CHANNELS, "status" => status.clone()).set(*n as f64);
        }
    }
    if let Ok(Ok(jobs)) = jobs {
        for kind in JobKind::ALL {
            let count = |state: JobState| {
                jobs.iter()
                    .find(|(k, s, _)| *k == kind && *s == state)
                    .map_or(0, |j| j.2) as f64
            };
            let k = kind.as_str();
            gauge!(QUEUE_DEPTH, "kind" => k, "state" => "running").set(count(JobState::Running));
            gauge!(QUEUE_DEPTH, "kind" => k, "state" => "failed").set(count(JobState::Failed));
            gauge!(DEAD_JOBS, "kind" => k).set(count(JobState::Dead));
        }
    }
    let queue_up = matches!(depths, Ok(Ok(_)));
    if let Ok(Ok(depths)) = depths {
        for (kind, n) in depths {
            gauge!(QUEUE_DEPTH, "kind" => kind.as_str(), "state" => "queued").set(n as f64);
        }
    }
    gauge!(UP, "part" => "store").set(if store_up { 1.0 } else { 0.0 });
    gauge!(UP, "part" => "queue").set(if queue_up { 1.0 } else { 0.0 });
}
