//! Watching one running instance, by event rather than by polling: its supervising task
//! sleeps until the instance's `changes` alarm (an event lost, a panic), a status the
//! connector emitted (`Reports`, from the event loop), the end of an error's grace
//! period, its next paced liveness check (`liveness`), or the channel's stop, and
//! judges from what it saw (`Health`) whether the instance must be replaced.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patchbay_connector_sdk::host::{Instance, InstanceState, PluginError, codes};
use patchbay_connector_sdk::{ChannelState, Status};
use tokio::sync::watch;

use super::blocking::{CallFailure, blocking};
use super::liveness::Liveness;
use super::supervisor::Turn;

/// How long a connector may report `error` before it is restarted: long enough for one
/// to retry a passing failure itself, short enough that a stuck one does not sit idle.
const ERROR_GRACE: Duration = Duration::from_secs(15);
/// How long a call may keep the instance busy (seen by status polls) before the
/// instance counts as wedged: a send gives up after CALL_TIMEOUT, so this is beyond any
/// legitimate call.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// What the event loop tells a channel's supervising task: the latest status the
/// connector emitted, and a wake-up.
#[derive(Default)]
pub(super) struct Reports {
    latest: Mutex<Option<(u64, ChannelState, Option<String>)>>,
    wake: tokio::sync::Notify,
}

impl Reports {
    /// Hands the task a status `instance` emitted, and wakes it.
    pub(super) fn put(&self, instance: u64, state: ChannelState, reason: Option<&str>) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((instance, state, reason.map(str::to_owned)));
        self.wake.notify_one();
    }

    fn take(&self, instance: u64) -> Option<(ChannelState, Option<String>)> {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        match latest.take() {
            Some((i, state, reason)) if i == instance => Some((state, reason)),
            _ => None,
        }
    }
}

pub(super) enum Outcome {
    /// The channel was told to stop.
    Stopped,
    /// The instance failed, for this reason (the channel's `error` reason).
    Failed(String),
}

/// Watches a running instance until the channel is told to stop or the instance fails.
/// Sleeps until something happens (see the module doc); costs nothing while quiet.
pub(super) async fn watch_instance(
    instance: &Arc<Instance>,
    calls: &Turn,
    reports: &Reports,
    liveness: &Liveness,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let alarm = instance.changes();
    let mut health = Health::default();
    let mut next_check = liveness.first_due(instance.id());
    // The paced time of the check that is due, once taken (`Liveness::pace`).
    let mut slot: Option<Instant> = None;
    loop {
        if let Some(reason) = dead(instance) {
            return Outcome::Failed(reason);
        }
        let now = Instant::now();
        if let Some((state, reason)) = reports.take(instance.id())
            && let Some(reason) = health.observe(state, reason, now)
        {
            return Outcome::Failed(reason);
        }
        if let Some(reason) = health.overdue(now) {
            return Outcome::Failed(reason);
        }
        let ready = health.polling && now >= next_check && {
            let at = *slot.get_or_insert_with(|| liveness.pace(now));
            now >= at
        };
        if ready {
            slot = None;
            tokio::select! {
                poll = poll_status(instance, calls, liveness.timeout) => {
                    if let Some(reason) = health.record(poll, Instant::now()) {
                        return Outcome::Failed(reason);
                    }
                }
                _ = stop.changed() => return Outcome::Stopped,
            }
            next_check = liveness.next_due();
            continue;
        }
        // Far enough that a connector without status sleeps until something happens.
        let check = if health.polling {
            slot.unwrap_or(next_check)
        } else {
            now + Duration::from_secs(86_400)
        };
        let wake_at = health.deadline().map_or(check, |d| d.min(check));
        tokio::select! {
            _ = stop.changed() => return Outcome::Stopped,
            () = alarm.notified() => {}
            () = reports.wake.notified() => {}
            () = tokio::time::sleep_until(wake_at.into()) => {}
        }
    }
}

/// Why the instance cannot go on, judged from its state alone. An instance that lost
/// events dies too: its flushes fail from then on, so it would never acknowledge a
/// message again.
fn dead(instance: &Instance) -> Option<String> {
    let lost = instance.lost_events();
    if instance.is_poisoned() {
        Some("the connector panicked; restarting it".to_owned())
    } else if lost > 0 {
        Some(format!(
            "the daemon could not store {lost} inbound event(s) of this channel; \
             restarting the connector so the messenger delivers them again"
        ))
    } else if instance.state() != InstanceState::Running {
        Some("the connector stopped by itself; restarting it".to_owned())
    } else {
        None
    }
}

/// One `status` poll.
enum Poll {
    /// The plugin answered (or the host refused the call, e.g. `busy`).
    Answered(Result<Status, PluginError>),
    /// A send holds the channel's turn; it gives up within `CALL_TIMEOUT` by itself.
    Skipped,
    /// The call did not return within this (the liveness timeout).
    TimedOut(Duration),
}

async fn poll_status(instance: &Arc<Instance>, calls: &Turn, timeout: Duration) -> Poll {
    let Ok(_turn) = calls.try_lock() else {
        return Poll::Skipped;
    };
    let polled = instance.clone();
    match blocking(timeout, move || polled.status()).await {
        Err(CallFailure::TimedOut) => Poll::TimedOut(timeout),
        Ok(answer) => Poll::Answered(answer),
        Err(CallFailure::Crashed) => Poll::Answered(Err(PluginError {
            code: "host_failure".into(),
            message: "the status call failed in the host".into(),
            retryable: true,
        })),
    }
}

/// What the status polls of one instance have seen so far.
struct Health {
    /// False once the connector said it has no `status`.
    polling: bool,
    /// Since when the connector reports `error`, and its latest reason.
    error_since: Option<(Instant, String)>,
    /// Since when every poll found another call still running in the instance.
    busy_since: Option<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            polling: true,
            error_since: None,
            busy_since: None,
        }
    }
}

impl Health {
    /// Takes one poll into account; `Some(reason)` when the instance must be replaced.
    fn record(&mut self, poll: Poll, now: Instant) -> Option<String> {
        let answer = match poll {
            Poll::Skipped => return None,
            Poll::TimedOut(limit) => {
                return Some(format!(
                    "the connector did not answer a liveness check (status call) within \
                     {limit:?}; restarting it"
                ));
            }
            Poll::Answered(answer) => answer,
        };
        if !matches!(&answer, Err(e) if e.code == codes::BUSY) {
            self.busy_since = None;
        }
        let reported_error = match answer {
            Ok(s) => return self.observe(s.state, s.reason, now),
            Err(e) if e.code == codes::UNSUPPORTED => {
                self.polling = false;
                return None;
            }
            Err(e) if e.is_panic() => return Some("the connector panicked; restarting it".into()),
            Err(e) if e.code == codes::BUSY => {
                let since = *self.busy_since.get_or_insert(now);
                if now.duration_since(since) >= STUCK_AFTER {
                    return Some(format!(
                        "a call to the connector has not returned for {} s; restarting it",
                        now.duration_since(since).as_secs()
                    ));
                }
                return None;
            }
            // Stopped by itself: `dead` reports it at the next check.
            Err(e) if e.code == codes::NOT_RUNNING => return None,
            // A status the host cannot read counts as an error report.
            Err(e) => format!("its status call failed: {}: {}", e.code, e.message),
        };
        self.error_reported(reported_error, now)
    }

    /// Takes a reported state into account (an emitted status event, or a check's
    /// answer); `Some(reason)` when the instance must be replaced.
    fn observe(
        &mut self,
        state: ChannelState,
        reason: Option<String>,
        now: Instant,
    ) -> Option<String> {
        if state != ChannelState::Error {
            self.error_since = None;
            return None;
        }
        self.error_reported(reason.unwrap_or_else(|| "no reason given".to_owned()), now)
    }

    /// When the error being reported outlasts the grace, if one is.
    fn deadline(&self) -> Option<Instant> {
        self.error_since
            .as_ref()
            .map(|(since, _)| *since + ERROR_GRACE)
    }

    /// `Some(reason)` once the error reported since `error_since` outlasted the grace.
    fn overdue(&self, now: Instant) -> Option<String> {
        let (since, reason) = self.error_since.as_ref()?;
        let lasted = now.duration_since(*since);
        (lasted >= ERROR_GRACE).then(|| {
            format!(
                "the connector has reported an error for {} s ({reason}); restarting it",
                lasted.as_secs()
            )
        })
    }

    fn error_reported(&mut self, reported_error: String, now: Instant) -> Option<String> {
        match &mut self.error_since {
            Some((_, reason)) => *reason = reported_error,
            None => self.error_since = Some((now, reported_error)),
        }
        self.overdue(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: ChannelState, reason: Option<&str>) -> Poll {
        let mut s = Status::new(state);
        s.reason = reason.map(str::to_owned);
        Poll::Answered(Ok(s))
    }

    fn host_error(code: &str) -> Poll {
        Poll::Answered(Err(PluginError {
            code: code.into(),
            message: "m".into(),
            retryable: true,
        }))
    }

    #[test]
    fn a_reported_error_is_tolerated_for_the_grace_period() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut h = Health::default();
        assert!(
            h.record(status(ChannelState::Error, Some("down")), at(0))
                .is_none()
        );
        assert!(
            h.record(status(ChannelState::Error, Some("still down")), at(10))
                .is_none()
        );
        let reason = h
            .record(status(ChannelState::Error, Some("still down")), at(15))
            .expect("past the grace period");
        assert!(reason.contains("15 s (still down)"), "{reason}");

        // Recovering in between starts the grace period again.
        let mut h = Health::default();
        assert!(h.record(status(ChannelState::Error, None), at(0)).is_none());
        assert!(
            h.record(status(ChannelState::Connected, None), at(10))
                .is_none()
        );
        assert!(
            h.record(status(ChannelState::Error, None), at(20))
                .is_none()
        );
        assert!(
            h.record(status(ChannelState::Error, None), at(30))
                .is_none()
        );
        assert!(
            h.record(status(ChannelState::Error, None), at(35))
                .is_some()
        );
    }

    #[test]
    fn timeouts_panics_and_stuck_calls_fail_the_instance() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(
            h.record(Poll::TimedOut(Duration::from_secs(10)), t0)
                .is_some()
        );
        assert!(h.record(host_error(codes::POISONED), t0).is_some());
        assert!(h.record(Poll::Skipped, t0).is_none());
        assert!(h.record(host_error(codes::BUSY), t0).is_none());
        assert!(
            h.record(host_error(codes::BUSY), t0 + STUCK_AFTER / 2)
                .is_none()
        );
        assert!(
            h.record(host_error(codes::BUSY), t0 + STUCK_AFTER)
                .is_some()
        );
        // A connector without status is not polled again.
        let mut h = Health::default();
        assert!(h.record(host_error(codes::UNSUPPORTED), t0).is_none());
        assert!(!h.polling);
    }
}
