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
//! Watching is by event, not by polling: the task sleeps until the instance's
//! `changes` alarm (an event lost, a panic), a status the connector emitted
//! (`status_reported`, from the event loop), the end of an error's grace period, its
//! next liveness check, or the channel's stop. The liveness check (`liveness`: one
//! `status` call every 60 s by default, each instance at its own phase, at most 50 a
//! second in all) is the only periodic work, and its rate does not grow with the
//! channels; a quiet, healthy instance costs a parked task.
//!
//! Plugin calls never run on the async workers, and neither does an instance's last
//! drop (which stops it if needed and calls the plugin's `destroy`). Calls into one
//! instance take the channel's call turn, so a send, a status poll and the final stop
//! never meet inside the plugin.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use patchbay_connector_sdk::host::{Instance, InstanceState, PluginError, RawEvent, codes};
use patchbay_connector_sdk::{ChannelState, Outbound, Status};
use patchbay_jobs::model::{Channel, Id, now_ms};
use patchbay_jobs::store::{Fence, SendClaim};
use patchbay_jobs::{DomainError, JobError, Store};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

pub use super::liveness::Liveness;
use super::registry::Registry;

/// Also bounds how long a send holds its message's lease (see `deliver`).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// An instance that ran this long before failing resets the backoff; one that fails
/// sooner (say, connects and then errors at once) keeps backing off.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// How long a connector may report `error` before it is restarted: long enough for one
/// to retry a passing failure itself, short enough that a stuck one does not sit idle.
const ERROR_GRACE: Duration = Duration::from_secs(15);
/// How long a call may keep the instance busy (seen by status polls) before the
/// instance counts as wedged: a send gives up after CALL_TIMEOUT, so this is beyond any
/// legitimate call.
const STUCK_AFTER: Duration = Duration::from_secs(60);
/// Events one instance may have in flight before its emit gets BUSY.
const EVENTS_PER_INSTANCE: usize = 4096;

/// The host never calls one instance concurrently: sends, status polls and the final
/// stop take turns here instead of getting the plugin's `busy`.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// What the event loop tells a channel's supervising task: the latest status the
/// connector emitted, and a wake-up.
#[derive(Default)]
struct Reports {
    latest: Mutex<Option<(u64, ChannelState, Option<String>)>>,
    wake: tokio::sync::Notify,
}

impl Reports {
    fn take(&self, instance: u64) -> Option<(ChannelState, Option<String>)> {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        match latest.take() {
            Some((i, state, reason)) if i == instance => Some((state, reason)),
            _ => None,
        }
    }
}

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
            *reports.latest.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((instance, state, reason.map(str::to_owned)));
            reports.wake.notify_one();
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

enum Outcome {
    /// The channel was told to stop.
    Stopped,
    /// The instance failed, for this reason (the channel's `error` reason).
    Failed(String),
}

/// Watches a running instance until the channel is told to stop or the instance fails.
/// Sleeps until something happens (see the module doc); costs nothing while quiet.
async fn watch_instance(
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

/// Why a blocking call gave no answer.
enum CallFailure {
    /// Not within its time limit; it runs on by itself.
    TimedOut,
    /// The host code around the plugin call panicked.
    Crashed,
}

/// Runs `f` (a plugin call) on a blocking thread and waits at most `limit` for it. What
/// it returns may hold the last handle on an instance, whose drop calls the plugin: if
/// nobody waits for it any more (timeout, or the caller was cancelled), it is dropped on
/// a blocking thread too.
async fn blocking<T, F>(limit: Duration, f: F) -> Result<T, CallFailure>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    tokio::task::spawn_blocking(move || {
        // A receiver that gave up hands the value back: dropped here, on this thread.
        let _ = tx.send(f());
    });
    let mut answer = Answer(rx);
    match tokio::time::timeout(limit, &mut answer.0).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(CallFailure::Crashed),
        Err(_) => Err(CallFailure::TimedOut),
    }
}

/// The receiving end of a blocking call. Closed when dropped, so a later answer stays on
/// its blocking thread; one that arrived just before is moved to a blocking thread.
struct Answer<T: Send + 'static>(oneshot::Receiver<T>);

impl<T: Send + 'static> Drop for Answer<T> {
    fn drop(&mut self) {
        self.0.close();
        if let Ok(value) = self.0.try_recv() {
            on_blocking_thread(move || drop(value));
        }
    }
}

/// Runs `f` on a blocking thread when on the runtime; inline when already off it.
fn on_blocking_thread(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(f)),
        Err(_) => f(),
    }
}

/// Drops a handle on an instance; the last one is dropped on a blocking thread, since
/// the instance's `Drop` calls the plugin (its `stop` if needed, then `destroy`).
fn release(instance: Arc<Instance>) {
    if let Some(last) = Arc::into_inner(instance) {
        on_blocking_thread(move || drop(last));
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
