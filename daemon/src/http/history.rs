//! The last hour of throughput and queue depth per job kind, for the dashboard's
//! charts: a sample every [`SAMPLE_EVERY`] of this process' done-job counters and of
//! the queue's depths (reads only: an idle daemon writes nothing for it), kept in a
//! ring of one hour.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use patchbay_jobs::JobKind;
use patchbay_jobs::model::now_ms;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::health::PART_TIMEOUT;

pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);
const KEEP: usize = 240; // one hour

const KINDS: usize = JobKind::ALL.len();

#[derive(Clone, Debug)]
pub struct Sample {
    /// Unix ms.
    pub at: i64,
    /// Jobs done by this process since it started, per kind (`JobKind::ALL` order).
    pub done: [u64; KINDS],
    /// Jobs waiting in the queue per kind; `None` when the queue did not answer.
    pub queued: Option<[u64; KINDS]>,
}

/// One line of a chart: a kind's values at each sample time.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub kind: JobKind,
    /// (Unix ms, value).
    pub points: Vec<(i64, f64)>,
}

#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == KEEP {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    fn snapshot(&self) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.iter().cloned().collect()
    }

    /// Jobs done per minute by this process, per kind, between successive samples;
    /// only kinds that did any work in the hour.
    pub fn throughput(&self) -> Vec<Series> {
        let samples = self.snapshot();
        let mut out = Vec::new();
        for (i, &kind) in JobKind::ALL.iter().enumerate() {
            let points: Vec<(i64, f64)> = samples
                .windows(2)
                .map(|w| {
                    let minutes = (w[1].at - w[0].at).max(1) as f64 / 60_000.0;
                    let done = w[1].done[i].saturating_sub(w[0].done[i]) as f64;
                    (w[1].at, done / minutes)
                })
                .collect();
            if points.iter().any(|p| p.1 > 0.0) {
                out.push(Series { kind, points });
            }
        }
        out
    }

    /// Jobs waiting in the queue, per kind; only kinds that had any in the hour.
    pub fn depth(&self) -> Vec<Series> {
        let samples = self.snapshot();
        let mut out = Vec::new();
        for (i, &kind) in JobKind::ALL.iter().enumerate() {
            let points: Vec<(i64, f64)> = samples
                .iter()
                .filter_map(|s| Some((s.at, s.queued?[i] as f64)))
                .collect();
            if points.iter().any(|p| p.1 > 0.0) {
                out.push(Series { kind, points });
            }
        }
        out
    }
}

/// Takes a sample now and every [`SAMPLE_EVERY`] until `stop`.
pub async fn run(app: Arc<App>, history: Arc<History>, stop: CancellationToken) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let depths = tokio::time::timeout(PART_TIMEOUT, async {
            let mut out = [0u64; KINDS];
            for (i, kind) in JobKind::ALL.iter().enumerate() {
                out[i] = app.queue.depth(&app.queue_name(*kind)).await?;
            }
            Ok::<_, crate::queue::QueueError>(out)
        })
        .await;
        history.push(Sample {
            at: now_ms(),
            done: crate::metrics::done_totals(),
            queued: depths.ok().and_then(Result::ok),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: i64, inbound_done: u64, queued: Option<u64>) -> Sample {
        let mut done = [0; KINDS];
        done[0] = inbound_done;
        Sample {
            at,
            done,
            queued: queued.map(|q| {
                let mut a = [0; KINDS];
                a[0] = q;
                a
            }),
        }
    }

    #[test]
    fn throughput_is_per_minute_between_samples_and_skips_idle_kinds() {
        let h = History::default();
        h.push(sample(0, 0, Some(5)));
        h.push(sample(15_000, 30, None));
        h.push(sample(30_000, 30, Some(0)));
        let t = h.throughput();
        assert_eq!(t.len(), 1, "only inbound_message did work: {t:?}");
        assert_eq!(t[0].kind, JobKind::ALL[0]);
        assert_eq!(t[0].points, vec![(15_000, 120.0), (30_000, 0.0)]);
        let d = h.depth();
        assert_eq!(
            d[0].points,
            vec![(0, 5.0), (30_000, 0.0)],
            "unanswered samples left out"
        );
    }

    #[test]
    fn the_ring_keeps_one_hour() {
        let h = History::default();
        for i in 0..(KEEP as i64 + 10) {
            h.push(sample(i * 15_000, 0, Some(0)));
        }
        let s = h.snapshot();
        assert_eq!(s.len(), KEEP);
        assert_eq!(s[0].at, 10 * 15_000);
    }
}
