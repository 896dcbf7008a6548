//! Runs one connector instance per active channel and keeps it running.
//!
//! Each channel has a supervising task: create and start the instance (on a blocking
//! thread, with a timeout), watch it, and when it fails put the channel in `error` with
//! the reason and start a fresh instance after an exponential backoff (1 s doubling to
//! 60 s, back to 1 s only once an instance stayed up for a minute). An instance fails
//! when it panics, stops by itself, loses events the daemon could not store (its
//! messenger then delivers them again to the successor), reports `error` for longer
//! than a grace period, or does not answer a liveness check in time. A failing channel
//! never touches the others.
//!
//! Watching is by event, not by polling (`watch`); the paced liveness check
//! (`liveness`) is the only periodic work, and its rate does not grow with the
//! channels: a quiet, healthy instance costs a parked task.
//!
//! Plugin calls never run on the async workers (`blocking`), and neither does an
//! instance's last drop (which stops it if needed and calls the plugin's `destroy`). Calls into one
//! instance take the channel's call turn, so a send, a status poll and the final stop
//! never meet inside the plugin.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use patchbay_connector_sdk::host::{Instance, RawEvent};
use patchbay_connector_sdk::{ChannelState, Outbound};
use patchbay_jobs::model::{Channel, Id, now_ms};
use patchbay_jobs::store::{Fence, SendClaim};
use patchbay_jobs::{DomainError, JobError, Store};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::blocking::{CallFailure, blocking, release};
use super::liveness::Liveness;
use super::registry::Registry;
use super::watch::{Outcome, Reports, watch_instance};

/// Also bounds how long a send holds its message's lease (see `deliver`).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// An instance that ran this long before failing resets the backoff; one that fails
/// sooner (say, connects and then errors at once) keeps backing off.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Events one instance may have in flight before its emit gets BUSY.
const EVENTS_PER_INSTANCE: usize = 4096;

/// The host never calls one instance concurrently: sends, status polls and the final
/// stop take turns here instead of getting the plugin's `busy`.
pub(super) type Turn = Arc<tokio::sync::Mutex<()>>;

struct Running {
    /// The channel's connector kind (for metrics' `connector` label).
    kind: Arc<str>,
    reports: Arc<Reports>,
    stop: watch::Sender<bool>,
    /// The instance whose events count: set at create, before start emits anything.
    current: Option<u64>,
    /// The live instance, once started; sends go to it.
    instance: Option<Arc<Instance>>,
    calls: Turn,
    task: tokio::task::JoinHandle<()>,
}

pub struct Supervisor {
    /// Swapped whole by `rescan`; readers take a snapshot, so a rescan never waits for
    /// (or disturbs) a channel that is launching or running.
    registry: RwLock<Arc<Registry>>,
    store: Arc<dyn Store>,
    events: mpsc::Sender<RawEvent>,
    channels: Mutex<HashMap<Id, Running>>,
    liveness: Liveness,
}

impl Supervisor {
    pub fn new(registry: Registry, store: Arc<dyn Store>, events: mpsc::Sender<RawEvent>) -> Self {
        Supervisor {
            registry: RwLock::new(Arc::new(registry)),
            store,
            events,
            channels: Mutex::new(HashMap::new()),
            liveness: Liveness::default(),
        }
    }

    /// Sets the liveness check (before any channel starts).
    pub fn with_liveness(mut self, liveness: Liveness) -> Self {
        self.liveness = liveness;
        self
    }

    /// A status the channel's current `instance` emitted, already recorded in the
    /// store: wakes the supervising task, which starts (or ends) the error grace.
    pub fn status_reported(
        &self,
        channel: Id,
        instance: u64,
        state: ChannelState,
        reason: Option<&str>,
    ) {
        let reports = self.lock().get(&channel).map(|r| r.reports.clone());
        if let Some(reports) = reports {
            reports.put(instance, state, reason);
        }
    }

    /// The connector libraries loaded now.
    pub fn registry(&self) -> Arc<Registry> {
        // Only whole-Arc swaps happen under the lock, so a poisoned one is still sound.
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads connector libraries added to `dir` since the last scan and returns their
    /// kinds. Running channels keep their instances; channels waiting in `error` for a
    /// missing kind find it at their next restart attempt. Blocking (dlopen runs plugin
    /// code): call it on a blocking thread.
    pub fn rescan(&self, dir: &Path) -> Vec<String> {
        let mut next = Registry::clone(&self.registry());
        let added = next.load_new(dir);
        // Swapped even when nothing was added: the registry also remembers the files it
        // refused, so the next rescan does not log them again.
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        added
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Running>> {
        // A panic while holding the lock leaves the map consistent (single inserts and
        // removes), so a poisoned lock is safe to keep using.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The channels this daemon supervises now.
    pub fn running(&self) -> Vec<Id> {
        self.lock().keys().copied().collect()
    }

    /// Starts supervising `channel` (no-op if it already is).
    pub fn start(self: &Arc<Self>, channel: Channel) {
        let mut map = self.lock();
        if map.contains_key(&channel.id) {
            return;
        }
        let (stop, stop_rx) = watch::channel(false);
        let (id, kind) = (channel.id, Arc::from(channel.kind.as_str()));
        let calls = Turn::default();
        let reports = Arc::new(Reports::default());
        let task =
            tokio::spawn(
                self.clone()
                    .supervise(channel, calls.clone(), reports.clone(), stop_rx),
            );
        map.insert(
            id,
            Running {
                kind,
                reports,
                stop,
                current: None,
                instance: None,
                calls,
                task,
            },
        );
    }

    /// Stops the channel's connector and waits until its instance is stopped.
    pub async fn stop(&self, channel: Id) {
        let running = self.lock().remove(&channel);
        if let Some(mut r) = running {
            let _ = r.stop.send(true);
            let _ = (&mut r.task).await;
            // The task clears it before it finishes the instance; this is only left
            // when the task died. Either way the last drop must not run here.
            if let Some(instance) = r.instance.take() {
                release(instance);
            }
        }
    }

    pub async fn stop_all(&self) {
        let ids: Vec<Id> = self.lock().keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }

    /// The connector kind of a supervised channel.
    pub fn kind_of(&self, channel: Id) -> Option<Arc<str>> {
        self.lock().get(&channel).map(|r| r.kind.clone())
    }

    /// Whether `instance` is the channel's current instance: events of an instance that
    /// was replaced or stopped are stale.
    pub fn is_current(&self, channel: Id, instance: u64) -> bool {
        self.lock().get(&channel).and_then(|r| r.current) == Some(instance)
    }

    /// The channels that use each connector kind, from the store: every channel that is
    /// not removed (running, failing, waiting for a restart or suspended), so
    /// `plugin.list` answers the same on every daemon and whatever the channels' state.
    pub async fn channels_by_kind(&self) -> Result<BTreeMap<String, usize>, DomainError> {
        Ok(self
            .store
            .channels_per_kind()
            .await?
            .into_iter()
            .map(|(kind, n)| (kind, usize::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// Hands an outbound message to the channel's running instance. Sends on one
    /// channel take turns; once it is this message's turn, its send lease is claimed
    /// for `lease_ms` under `fence` (`Store::claim_send`), and `None` means the claim failed (sent
    /// since, or another attempt holds it) and nothing was sent. A retryable failure
    /// gives the lease back; any other outcome keeps it. The connector's answer must be
    /// `{"type":"sent"}` with a non-empty external id: anything else fails the message
    /// for good, since it may have been sent and a retry could send it twice.
    pub async fn deliver(
        &self,
        channel: &Channel,
        outbound: &Value,
        lease_ms: i64,
        fence: Option<&Fence>,
    ) -> Result<Option<String>, JobError> {
        let sent = self.deliver_once(channel, outbound, lease_ms, fence).await;
        let outcome = match &sent {
            Ok(Some(_)) => "sent",
            Ok(None) => "skipped",
            Err(JobError::Retryable(_)) => "retry",
            Err(JobError::Permanent(_)) => "failed",
        };
        crate::metrics::outbound(&channel.kind, outcome);
        sent
    }

    async fn deliver_once(
        &self,
        channel: &Channel,
        outbound: &Value,
        lease_ms: i64,
        fence: Option<&Fence>,
    ) -> Result<Option<String>, JobError> {
        let msg: Outbound = serde_json::from_value(outbound.clone()).map_err(|e| {
            JobError::Permanent(format!("not a valid outbound message for a connector: {e}"))
        })?;
        let not_connected = || {
            JobError::Retryable(format!(
                "channel {} is not connected (status {}); will retry",
                channel.id, channel.status
            ))
        };
        let calls = self.lock().get(&channel.id).map(|r| r.calls.clone());
        let calls = calls.ok_or_else(not_connected)?;
        let _turn = calls.lock().await;
        // Claimed with the turn, and timed from it, so the lease covers one call, not
        // the wait behind other sends.
        let (message, lease_until) = (msg.message, now_ms() + lease_ms);
        match self.store.claim_send(message, lease_until, fence).await? {
            SendClaim::Claimed => {}
            SendClaim::Taken => return Ok(None),
            // This node lost the channel (paused or cut off past its lease): the new
            // owner sends it; a retry here finds out where it runs.
            SendClaim::Fenced => {
                return Err(JobError::Retryable(format!(
                    "channel {} is no longer run by this node (lease epoch {:?} ended)",
                    channel.id,
                    fence.map(|f| f.epoch)
                )));
            }
        }
        let sent = async {
            // Taken only now, with the turn: the instance is the current one, and no
            // await lies between here and the blocking thread that will own this handle.
            let instance = self
                .lock()
                .get(&channel.id)
                .and_then(|r| r.instance.clone());
            let instance = instance.ok_or_else(not_connected)?;
            let reply = match blocking(CALL_TIMEOUT, move || instance.send(&msg)).await {
                Ok(reply) => reply,
                Err(CallFailure::TimedOut) => {
                    // The call may still send it: a retry could send it twice.
                    return Err(JobError::Permanent(format!(
                        "connector of channel {} did not answer within {CALL_TIMEOUT:?}; \
                         the message may have been sent (retry the job to send it again)",
                        channel.id
                    )));
                }
                Err(CallFailure::Crashed) => {
                    return Err(JobError::Retryable("connector call failed".into()));
                }
            };
            match reply {
                Ok(sent) => Ok(Some(sent.external_message_id)),
                Err(e) if e.retryable || e.is_panic() => {
                    Err(JobError::Retryable(format!("{}: {}", e.code, e.message)))
                }
                Err(e) => Err(JobError::Permanent(format!("{}: {}", e.code, e.message))),
            }
        }
        .await;
        if let Err(JobError::Retryable(_)) = &sent {
            // Not sent: the retry may claim it at once. Should this write fail, the
            // lease runs out by itself.
            if let Err(e) = self.store.release_send(message, lease_until).await {
                tracing::warn!(message, error = %e, "cannot release a send lease");
            }
        }
        sent
    }

    fn set_instance(&self, channel: Id, instance: Option<Arc<Instance>>) {
        let old = self
            .lock()
            .get_mut(&channel)
            .and_then(|r| std::mem::replace(&mut r.instance, instance));
        if let Some(old) = old {
            release(old);
        }
    }

    fn set_current(&self, channel: Id, instance: Option<u64>) {
        if let Some(r) = self.lock().get_mut(&channel) {
            r.current = instance;
        }
    }

    async fn status(&self, channel: Id, status: &str, reason: Option<&str>) {
        if let Err(e) = self.store.set_channel_status(channel, status, reason).await {
            tracing::warn!(channel, error = %e, "cannot record the channel status");
        }
    }

    async fn supervise(
        self: Arc<Self>,
        channel: Channel,
        calls: Turn,
        reports: Arc<Reports>,
        mut stop: watch::Receiver<bool>,
    ) {
        let id = channel.id;
        let mut backoff = Backoff::default();
        loop {
            if *stop.borrow() {
                return;
            }
            // The store may hang (a network cut): a stop meanwhile wins, and no instance
            // starts after it (a node fencing itself must not start one late).
            tokio::select! {
                () = self.status(id, "connecting", None) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let (failure, ran) = match self.launch(&channel, &calls, &stop).await {
                Ok(instance) => {
                    self.set_instance(id, Some(instance.clone()));
                    let started = Instant::now();
                    let outcome =
                        watch_instance(&instance, &calls, &reports, &self.liveness, &mut stop)
                            .await;
                    self.set_instance(id, None);
                    self.set_current(id, None);
                    finish(instance, calls.clone()).await;
                    match outcome {
                        Outcome::Stopped => return,
                        Outcome::Failed(reason) => (reason, Some(started.elapsed())),
                    }
                }
                Err(_) if *stop.borrow() => return,
                Err(reason) => (reason, None),
            };
            let delay = backoff.after_failure(ran);
            tracing::warn!(channel = id, kind = %channel.kind, retry_in = ?delay, "{failure}");
            self.status(id, "error", Some(&failure)).await;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Creates and starts an instance, each on a blocking thread. The instance becomes
    /// current between the two, so the status events `start` emits are not stale.
    async fn launch(
        &self,
        channel: &Channel,
        calls: &Turn,
        stop: &watch::Receiver<bool>,
    ) -> Result<Arc<Instance>, String> {
        let registry = self.registry();
        let Some(lib) = registry.get(&channel.kind).cloned() else {
            return Err(format!(
                "no connector plugin of kind {:?} is loaded (loaded: {})",
                channel.kind,
                registry.kinds().join(", ")
            ));
        };
        let (id, config, events) = (channel.id, channel.config.clone(), self.events.clone());
        let create = blocking(CALL_TIMEOUT, move || {
            Instance::create(&lib, id, &config, events, EVENTS_PER_INSTANCE).map(Arc::new)
        });
        let instance = match create.await {
            Ok(Ok(instance)) => instance,
            Ok(Err(e)) => {
                return Err(format!(
                    "connector refused its configuration: {}: {}",
                    e.code, e.message
                ));
            }
            Err(CallFailure::Crashed) => return Err("connector create failed".into()),
            // An instance created after all is destroyed on the thread that made it.
            Err(CallFailure::TimedOut) => {
                return Err(format!("connector was not created within {CALL_TIMEOUT:?}"));
            }
        };
        if *stop.borrow() {
            // Stopped while it was being created: it never starts.
            finish(instance, calls.clone()).await;
            return Err("stopped before it started".into());
        }
        self.set_current(id, Some(instance.id()));
        let starting = instance.clone();
        let failure = match blocking(CALL_TIMEOUT, move || starting.start()).await {
            Ok(Ok(())) => return Ok(instance),
            Ok(Err(e)) => format!("connector failed to start: {}: {}", e.code, e.message),
            Err(CallFailure::Crashed) => "connector start failed".to_owned(),
            Err(CallFailure::TimedOut) => {
                format!("connector did not start within {CALL_TIMEOUT:?}")
            }
        };
        self.set_current(id, None);
        // After a timeout the start is still running: the stop waits for it (bounded),
        // and whichever thread drops the instance last stops and destroys it.
        finish(instance, calls.clone()).await;
        Err(failure)
    }
}

/// Restart delays after failures: 1 s doubling to 60 s, and back to 1 s only after an
/// instance stayed up for `HEALTHY_AFTER`.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt, after an instance that ran for `ran` failed
    /// (`None`: it never started).
    fn after_failure(&mut self, ran: Option<Duration>) -> Duration {
        if ran.is_some_and(|r| r >= HEALTHY_AFTER) {
            self.next = FIRST_BACKOFF;
        }
        let delay = self.next;
        self.next = (delay * 2).min(MAX_BACKOFF);
        delay
    }
}

/// Stops an instance and drops this handle on it, on a blocking thread, taking the
/// channel's turn first so no send or status poll runs into the stop. Waits at most
/// `CALL_TIMEOUT`; the stop carries on by itself after that.
async fn finish(instance: Arc<Instance>, calls: Turn) {
    let call = blocking(CALL_TIMEOUT, move || {
        let _turn = calls.blocking_lock();
        if let Err(e) = instance.stop() {
            tracing::debug!(code = %e.code, "connector stop: {}", e.message);
        }
        drop(instance);
    });
    if call.await.is_err() {
        tracing::warn!("a connector did not stop within {CALL_TIMEOUT:?}; leaving it to finish");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_until_an_instance_stays_up() {
        let mut b = Backoff::default();
        let secs = |d: Duration| d.as_secs();
        // Start failures, and instances that fail soon after starting, keep backing off.
        assert_eq!(secs(b.after_failure(None)), 1);
        assert_eq!(secs(b.after_failure(Some(Duration::from_secs(2)))), 2);
        assert_eq!(secs(b.after_failure(None)), 4);
        assert_eq!(secs(b.after_failure(Some(Duration::from_secs(59)))), 8);
        for _ in 0..5 {
            b.after_failure(None);
        }
        assert_eq!(secs(b.after_failure(None)), 60, "capped");
        // An instance that ran long enough starts the count again.
        assert_eq!(secs(b.after_failure(Some(HEALTHY_AFTER))), 1);
        assert_eq!(secs(b.after_failure(None)), 2);
    }
}
