//! Under systemd: `STATUS=` lines (channels by status, queue depth) and `WATCHDOG=1`.
//!
//! A ping is not a timer: each one follows a probe that had to read the store (channels
//! by status) and the queue (depth of every job kind) within one ping interval. A
//! wedged runtime never runs the probe, and a hung store or queue backend makes it
//! time out or fail; either way the pings stop and systemd's `WatchdogSec=` restarts
//! the service. The probe is two cheap reads, the same as `status` does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbay_jobs::JobKind;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::notify;

/// How often STATUS= is refreshed when nothing changed (and the probe period without a
/// watchdog).
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// What a successful probe saw.
#[derive(Debug, PartialEq, Eq)]
pub struct Health {
    /// Channel status → number of channels.
    pub channels: Vec<(String, i64)>,
    /// Job kind → jobs not yet done.
    pub queue: BTreeMap<&'static str, u64>,
}

impl Health {
    /// One STATUS= line, e.g. `channels: 3 connected, 1 error; queue: 12 (send_message 12)`.
    pub fn line(&self) -> String {
        let mut out = String::from("channels: ");
        if self.channels.is_empty() {
            out.push_str("none");
        }
        for (i, (status, n)) in self.channels.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(out, "{sep}{n} {status}");
        }
        let total: u64 = self.queue.values().sum();
        let _ = write!(out, "; queue: {total}");
        let busy: Vec<String> = self
            .queue
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !busy.is_empty() {
            let _ = write!(out, " ({})", busy.join(", "));
        }
        out
    }
}

/// Reads the store and every queue; any error is the reason the daemon is unhealthy.
pub async fn probe(app: &App) -> Result<Health, String> {
    let channels = app
        .store
        .channel_counts()
        .await
        .map_err(|e| format!("the store does not answer: {e}"))?;
    let mut queue = BTreeMap::new();
    for kind in JobKind::ALL {
        let depth = app
            .queue
            .depth(&app.queue_name(kind))
            .await
            .map_err(|e| format!("the queue does not answer: {e}"))?;
        queue.insert(kind.as_str(), depth);
    }
    Ok(Health { channels, queue })
}

/// Runs until `stop`: probes every ping interval (half of WatchdogSec) or every
/// `STATUS_EVERY`, whichever is shorter.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let watchdog = notify::watchdog_interval();
    let period = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    if let Some(w) = watchdog {
        tracing::info!(every = ?w, "systemd watchdog enabled; pinging after each health probe");
    }
    let mut tick = tokio::time::interval(period);
    // A slow probe must not be followed by a burst of catch-up pings.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_line = String::new();
    let mut last_sent = Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The probe gets one period: a probe that takes longer already made the next
        // ping late, which is what the watchdog is there to notice.
        let result = match tokio::time::timeout(period, probe(&app)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the store or the queue did not answer within {period:?}"
            )),
        };
        if stop.is_cancelled() {
            return;
        }
        match result {
            Ok(health) => {
                if watchdog.is_some() {
                    notify::watchdog();
                }
                if failing {
                    tracing::info!("health probe passes again; watchdog pings resumed");
                    failing = false;
                }
                let line = health.line();
                if line != last_line || last_sent.elapsed() >= STATUS_EVERY {
                    notify::status(&line);
                    last_sent = Instant::now();
                    last_line = line;
                }
            }
            Err(reason) => {
                if !failing {
                    tracing::error!(
                        reason,
                        "health probe failed; withholding WATCHDOG=1 until it passes"
                    );
                    failing = true;
                }
                let line = format!("unhealthy: {reason}");
                if line != last_line {
                    notify::status(&line);
                    last_sent = Instant::now();
                    last_line = line;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_names_channels_and_busy_queues() {
        let h = Health {
            channels: vec![("connected".into(), 3), ("error".into(), 1)],
            queue: BTreeMap::from([("send_message", 12), ("billing_run", 0)]),
        };
        assert_eq!(
            h.line(),
            "channels: 3 connected, 1 error; queue: 12 (send_message 12)"
        );
        let idle = Health {
            channels: vec![],
            queue: BTreeMap::new(),
        };
        assert_eq!(idle.line(), "channels: none; queue: 0");
    }
}
