//! systemd's sd_notify protocol: READY, RELOADING, STOPPING, STATUS and WATCHDOG. Every
//! call is a no-op when NOTIFY_SOCKET is not set, so the daemon runs the same by hand and
//! under systemd.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Whether a service manager listens: the health task only runs when someone reads it.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload starts. systemd ≥ 253 insists on MONOTONIC_USEC with RELOADING=1; 252
/// ignores it, so it is always sent.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(e) => tracing::warn!(error = %e, "cannot read the monotonic clock for RELOADING=1"),
    }
}

/// The reload is over (whether or not anything changed): READY=1 ends it.
pub fn reloaded(status: &str) {
    ready(status);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The interval between WATCHDOG=1 pings: half of `WatchdogSec=` as systemd passes it in
/// WATCHDOG_USEC (only when WATCHDOG_PID is ours), so one late ping is not yet fatal.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
        .then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}
