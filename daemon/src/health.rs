//! What is up and what is down — store, queue, each queue worker — for `status` and,
//! under systemd, `STATUS=` lines; and `WATCHDOG=1`.
//!
//! An outage of the queue (Redis) or the store is not a reason to be restarted: the
//! daemon waits for it (jobs stay queued or journalled, connectors are held back) and
//! says so in STATUS= (`degraded: …`). A restart would only restart every connector
//! every `WatchdogSec=` through the outage. So the watchdog is fed by a task of its own
//! whose ping follows a freshly spawned task having run: the pings stop only when the
//! runtime itself is wedged (no task can run), which only a restart cures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbay_jobs::JobKind;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::notify;
use crate::queue::WorkerState;

/// How often STATUS= is refreshed when nothing changed (and the probe period without a
/// watchdog).
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Each part (store, queue) gets this long to answer a probe: a hung Redis must not
/// make `status` hang.
pub const PART_TIMEOUT: Duration = Duration::from_secs(3);

/// What a probe saw: each part's answer, or why it is down.
#[derive(Debug, PartialEq, Eq)]
pub struct Health {
    /// Channel status → number of channels; `Err`: the store does not answer.
    pub channels: Result<Vec<(String, i64)>, String>,
    /// Job kind → jobs not yet done; `Err`: the queue does not answer.
    pub queue: Result<BTreeMap<&'static str, u64>, String>,
    /// Each worker by queue name.
    pub workers: BTreeMap<String, WorkerState>,
}

impl Health {
    /// What is down, one phrase each; empty when all is well.
    pub fn down(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = &self.channels {
            out.push(format!("store down ({e})"));
        }
        if let Err(e) = &self.queue {
            out.push(format!("queue down ({e})"));
        }
        for (queue, w) in &self.workers {
            if !w.running {
                let kind = queue.rsplit(':').next().unwrap_or(queue);
                let why = w
                    .last_error
                    .as_deref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default();
                out.push(format!(
                    "worker {kind} not running ({} restarts{why})",
                    w.restarts
                ));
            }
        }
        out
    }

    /// One STATUS= line, e.g. `channels: 3 connected, 1 error; queue: 12 (send_message
    /// 12)`, prefixed with `degraded: <what is down>; ` when something is.
    pub fn line(&self) -> String {
        let mut out = String::new();
        let down = self.down();
        if !down.is_empty() {
            let _ = write!(out, "degraded: {}; ", down.join(", "));
        }
        out.push_str("channels: ");
        match &self.channels {
            Ok(channels) if channels.is_empty() => out.push_str("none"),
            Ok(channels) => {
                for (i, (status, n)) in channels.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    let _ = write!(out, "{sep}{n} {status}");
                }
            }
            Err(_) => out.push_str("unknown"),
        }
        match &self.queue {
            Ok(queue) => {
                let total: u64 = queue.values().sum();
                let _ = write!(out, "; queue: {total}");
                let busy: Vec<String> = queue
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                if !busy.is_empty() {
                    let _ = write!(out, " ({})", busy.join(", "));
                }
            }
            Err(_) => out.push_str("; queue: unknown"),
        }
        out
    }
}

/// Reads the store and every queue (at once, each within [`PART_TIMEOUT`]) and the
/// workers' board.
pub async fn probe(app: &App) -> Health {
    let channels = async {
        match tokio::time::timeout(PART_TIMEOUT, app.store.channel_counts()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {PART_TIMEOUT:?}")),
        }
    };
    let queue = async {
        let depths = async {
            let mut queue = BTreeMap::new();
            for kind in JobKind::ALL {
                let depth = app.queue.depth(&app.queue_name(kind)).await?;
                queue.insert(kind.as_str(), depth);
            }
            Ok::<_, crate::queue::QueueError>(queue)
        };
        match tokio::time::timeout(PART_TIMEOUT, depths).await {
            Ok(Ok(q)) => Ok(q),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {PART_TIMEOUT:?}")),
        }
    };
    let (channels, queue) = tokio::join!(channels, queue);
    Health {
        channels,
        queue,
        workers: app.workers.snapshot(),
    }
}

/// Runs until `stop`: the watchdog pings (every half of WatchdogSec) and, every ping
/// interval or every `STATUS_EVERY`, whichever is shorter, a probe for STATUS=.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let watchdog = notify::watchdog_interval();
    let period = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    let pings = watchdog.map(|w| {
        tracing::info!(every = ?w, "systemd watchdog enabled; pinging while the runtime runs tasks");
        tokio::spawn(feed_watchdog(w, stop.clone()))
    });
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_line = String::new();
    let mut last_sent = Instant::now();
    let mut last_down: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let health = tokio::select! {
            _ = stop.cancelled() => break,
            h = probe(&app) => h,
        };
        let down = health.down();
        if down != last_down {
            if down.is_empty() {
                tracing::info!("everything answers again");
            } else {
                tracing::error!(down = %down.join(", "), "degraded; waiting for what is down to come back");
            }
            last_down = down;
        }
        let line = health.line();
        if line != last_line || last_sent.elapsed() >= STATUS_EVERY {
            notify::status(&line);
            last_sent = Instant::now();
            last_line = line;
        }
    }
    if let Some(pings) = pings {
        let _ = pings.await;
    }
}

/// Pings every `every` while a task spawned for each ping runs within `every`.
async fn feed_watchdog(every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    // A late tick must not be followed by a burst of catch-up pings.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut wedged = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if runtime_runs_tasks(every).await {
            notify::watchdog();
            if wedged {
                tracing::info!("the runtime runs tasks again; watchdog pings resumed");
                wedged = false;
            }
        } else if !wedged {
            tracing::error!(within = ?every, "a new task did not run in time; withholding WATCHDOG=1");
            wedged = true;
        }
    }
}

/// Whether a task spawned now runs within `limit`.
async fn runtime_runs_tasks(limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, tokio::spawn(async {})).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_names_channels_busy_queues_and_what_is_down() {
        let h = Health {
            channels: Ok(vec![("connected".into(), 3), ("error".into(), 1)]),
            queue: Ok(BTreeMap::from([("send_message", 12), ("billing_run", 0)])),
            workers: BTreeMap::new(),
        };
        assert_eq!(
            h.line(),
            "channels: 3 connected, 1 error; queue: 12 (send_message 12)"
        );
        let idle = Health {
            channels: Ok(vec![]),
            queue: Ok(BTreeMap::new()),
            workers: BTreeMap::new(),
        };
        assert_eq!(idle.line(), "channels: none; queue: 0");
        let board = crate::queue::WorkerBoard::default();
        let down = Health {
            channels: Ok(vec![("connected".into(), 1)]),
            queue: Err("connection refused".into()),
            workers: board.snapshot(),
        };
        assert_eq!(
            down.line(),
            "degraded: queue down (connection refused); channels: 1 connected; queue: unknown"
        );
    }

    #[tokio::test]
    async fn a_runtime_that_runs_tasks_is_not_wedged() {
        assert!(runtime_runs_tasks(Duration::from_secs(5)).await);
    }
}
