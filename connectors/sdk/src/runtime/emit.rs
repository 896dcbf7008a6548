//! Async emit and flush for tasks on the plugin's runtime.
//!
//! `emit` retries a BUSY host with exponential backoff (1 ms to 50 ms) on the runtime's
//! timer, so a waiting instance holds no thread. `flush` has to call the host's flush,
//! which blocks its thread; a few run at once on the runtime's bounded blocking pool
//! (`BLOCKING_FLUSHES`), and a waiter that finds them all taken polls the host with a
//! zero timeout instead (a non-blocking check) with backoff. So thousands of instances
//! waiting for the daemon cost tasks, never threads, and each gets its answer.

use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{EmitError, Event, FlushError, Host};

/// Flushes that may block a thread of the runtime's blocking pool at once.
const BLOCKING_FLUSHES: usize = 4;
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(50);

static FLUSH_SLOTS: Semaphore = Semaphore::const_new(BLOCKING_FLUSHES);

/// Emits `event`, backing off while the host is BUSY, until it is taken or refused;
/// `Closed` once `cancel` is cancelled.
pub async fn emit(host: &Host, event: &Event, cancel: &CancellationToken) -> Result<(), EmitError> {
    let bytes = serde_json::to_vec(event).map_err(|_| EmitError::Closed)?;
    emit_raw(host, &bytes, None, cancel).await
}

/// `emit`, giving up with `Busy` after `wait` (an HTTP request answers 503 then).
pub async fn emit_within(
    host: &Host,
    event: &Event,
    wait: Duration,
    cancel: &CancellationToken,
) -> Result<(), EmitError> {
    let bytes = serde_json::to_vec(event).map_err(|_| EmitError::Closed)?;
    emit_raw(host, &bytes, Some(wait), cancel).await
}

/// `emit` of ready-made JSON bytes, optionally bounded by `wait`.
pub async fn emit_raw(
    host: &Host,
    json: &[u8],
    wait: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<(), EmitError> {
    let deadline = wait.map(|w| Instant::now() + w);
    let mut pause = FIRST_PAUSE;
    loop {
        match host.emit_raw(json) {
            Err(EmitError::Busy) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(EmitError::Busy);
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = cancel.cancelled() => return Err(EmitError::Closed),
                }
                pause = (pause * 2).min(MAX_PAUSE);
            }
            other => return other,
        }
    }
}

/// Waits, for at most `timeout`, until the host has durably recorded every event this
/// instance emitted before the call (see `Host::flush`). `Timeout` when it has not yet,
/// `Closed` when it never will, `Unsupported` for a host older than flush.
pub async fn flush(host: &Host, timeout: Duration) -> Result<(), FlushError> {
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        // A blocking flush keeps the target of its call, so a busy instance emitting
        // on is not chased forever; the zero-timeout checks are the fallback.
        if let Ok(permit) = FLUSH_SLOTS.try_acquire() {
            let left = deadline.saturating_duration_since(Instant::now());
            let h = host.clone();
            let r = tokio::task::spawn_blocking(move || h.flush(left)).await;
            drop(permit);
            return r.unwrap_or(Err(FlushError::Closed));
        }
        match host.flush(Duration::ZERO) {
            Err(FlushError::Timeout) => {}
            other => return other,
        }
        if Instant::now() >= deadline {
            return Err(FlushError::Timeout);
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
