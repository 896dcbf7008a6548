//! Runs one connector instance per active channel and keeps it running.
//!
//! Each channel has a supervising task: create and start the instance (on a blocking
//! thread, with a timeout), watch it, and when it fails or panics put the channel in
//! `error` with the reason and start a fresh instance after an exponential backoff
//! (1 s doubling to 60 s). A failing channel never touches the others. Plugin calls
//! never run on the async workers. An instance some of whose events the daemon could
//! not store is replaced the same way, so its messenger delivers them again.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use patchbay_connector_sdk::host::{Instance, InstanceState, RawEvent};
use patchbay_jobs::model::{Channel, Id};
use patchbay_jobs::{JobError, Store};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::registry::Registry;

const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Events one instance may have in flight before its emit gets BUSY.
const EVENTS_PER_INSTANCE: usize = 4096;

struct Running {
    stop: watch::Sender<bool>,
    /// The instance whose events count: set at create, before start emits anything.
    current: Option<u64>,
    /// The live instance, once started; sends go to it.
    instance: Option<Arc<Instance>>,
    /// The host never calls one instance concurrently: sends queue here instead of
    /// getting the plugin's `busy`.
    calls: Arc<tokio::sync::Mutex<()>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Supervisor {
    /// Swapped whole by `rescan`; readers take a snapshot, so a rescan never waits for
    /// (or disturbs) a channel that is launching or running.
    registry: RwLock<Arc<Registry>>,
    store: Arc<dyn Store>,
    events: mpsc::Sender<RawEvent>,
    channels: Mutex<HashMap<Id, Running>>,
}

impl Supervisor {
    pub fn new(registry: Registry, store: Arc<dyn Store>, events: mpsc::Sender<RawEvent>) -> Self {
        Supervisor {
            registry: RwLock::new(Arc::new(registry)),
            store,
            events,
            channels: Mutex::new(HashMap::new()),
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
    pub fn rescan(&self, dir: &Path, allowed_uids: &[u32]) -> Vec<String> {
        let mut next = Registry::clone(&self.registry());
        let added = next.load_new(dir, allowed_uids);
        if !added.is_empty() {
            *self.registry.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        }
        added
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, Running>> {
        // A panic while holding the lock leaves the map consistent (single inserts and
        // removes), so a poisoned lock is safe to keep using.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts supervising `channel` (no-op if it already is).
    pub fn start(self: &Arc<Self>, channel: Channel) {
        let mut map = self.lock();
        if map.contains_key(&channel.id) {
            return;
        }
        let (stop, stop_rx) = watch::channel(false);
        let id = channel.id;
        let task = tokio::spawn(self.clone().supervise(channel, stop_rx));
        map.insert(
            id,
            Running {
                stop,
                current: None,
                instance: None,
                calls: Default::default(),
                task,
            },
        );
    }

    /// Stops the channel's connector and waits until its instance is stopped.
    pub async fn stop(&self, channel: Id) {
        let running = self.lock().remove(&channel);
        if let Some(r) = running {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
    }

    pub async fn stop_all(&self) {
        let ids: Vec<Id> = self.lock().keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }

    /// Whether `instance` is the channel's current instance: events of an instance that
    /// was replaced or stopped are stale.
    pub fn is_current(&self, channel: Id, instance: u64) -> bool {
        self.lock().get(&channel).and_then(|r| r.current) == Some(instance)
    }

    pub fn running_count(&self, kind: &str) -> usize {
        self.lock()
            .values()
            .filter_map(|r| r.instance.as_ref())
            .filter(|i| i.library().kind() == kind)
            .count()
    }

    /// Hands an outbound message to the channel's running instance.
    pub async fn deliver(&self, channel: &Channel, outbound: &Value) -> Result<String, JobError> {
        let current = self
            .lock()
            .get(&channel.id)
            .and_then(|r| r.instance.clone().map(|i| (i, r.calls.clone())));
        let Some((instance, calls)) = current else {
            return Err(JobError::Retryable(format!(
                "channel {} is not connected (status {}); will retry",
                channel.id, channel.status
            )));
        };
        let _turn = calls.lock().await;
        let msg = outbound.clone();
        let call = tokio::task::spawn_blocking(move || instance.send_json(&msg));
        let reply = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(JobError::Retryable(format!("connector call failed: {e}"))),
            Err(_) => {
                return Err(JobError::Retryable(format!(
                    "connector of channel {} did not answer within {CALL_TIMEOUT:?}",
                    channel.id
                )));
            }
        };
        match reply {
            Ok(sent) => sent
                .get("external_message_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| {
                    JobError::Permanent(format!(
                        "connector reply has no external_message_id: {sent}"
                    ))
                }),
            Err(e) if e.retryable || e.is_panic() => {
                Err(JobError::Retryable(format!("{}: {}", e.code, e.message)))
            }
            Err(e) => Err(JobError::Permanent(format!("{}: {}", e.code, e.message))),
        }
    }

    fn set_instance(&self, channel: Id, instance: Option<Arc<Instance>>) {
        if let Some(r) = self.lock().get_mut(&channel) {
            r.instance = instance;
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

    async fn supervise(self: Arc<Self>, channel: Channel, mut stop: watch::Receiver<bool>) {
        let id = channel.id;
        let mut backoff = Duration::from_secs(1);
        loop {
            if *stop.borrow() {
                return;
            }
            self.status(id, "connecting", None).await;
            let failure = match self.launch(&channel).await {
                Ok(instance) => {
                    self.set_instance(id, Some(instance.clone()));
                    backoff = Duration::from_secs(1);
                    let stopped = watch_instance(&instance, &mut stop).await;
                    self.set_instance(id, None);
                    self.set_current(id, None);
                    if stopped {
                        finish(instance).await;
                        return;
                    }
                    let lost = instance.lost_events();
                    let reason = if instance.is_poisoned() {
                        "the connector panicked; restarting it".to_owned()
                    } else if lost > 0 {
                        format!(
                            "the daemon could not store {lost} inbound event(s) of this channel; \
                             restarting the connector so the messenger delivers them again"
                        )
                    } else {
                        "the connector stopped by itself; restarting it".to_owned()
                    };
                    finish(instance).await;
                    reason
                }
                Err(reason) => reason,
            };
            tracing::warn!(channel = id, kind = %channel.kind, retry_in = ?backoff, "{failure}");
            self.status(id, "error", Some(&failure)).await;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Creates and starts an instance, each on a blocking thread. The instance becomes
    /// current between the two, so the status events `start` emits are not stale.
    async fn launch(&self, channel: &Channel) -> Result<Arc<Instance>, String> {
        let registry = self.registry();
        let Some(lib) = registry.get(&channel.kind).cloned() else {
            return Err(format!(
                "no connector plugin of kind {:?} is loaded (loaded: {})",
                channel.kind,
                registry.kinds().join(", ")
            ));
        };
        let (id, config, events) = (channel.id, channel.config.clone(), self.events.clone());
        let create = tokio::task::spawn_blocking(move || {
            Instance::create(&lib, id, &config, events, EVENTS_PER_INSTANCE).map(Arc::new)
        });
        let instance = match tokio::time::timeout(CALL_TIMEOUT, create).await {
            Ok(Ok(Ok(instance))) => instance,
            Ok(Ok(Err(e))) => {
                return Err(format!(
                    "connector refused its configuration: {}: {}",
                    e.code, e.message
                ));
            }
            Ok(Err(e)) => return Err(format!("connector create failed: {e}")),
            // The thread is abandoned with its instance: dropping it could block too.
            Err(_) => return Err(format!("connector was not created within {CALL_TIMEOUT:?}")),
        };
        self.set_current(id, Some(instance.id()));
        let starting = instance.clone();
        let start = tokio::task::spawn_blocking(move || starting.start());
        let failure = match tokio::time::timeout(CALL_TIMEOUT, start).await {
            Ok(Ok(Ok(()))) => return Ok(instance),
            Ok(Ok(Err(e))) => format!("connector failed to start: {}: {}", e.code, e.message),
            Ok(Err(e)) => format!("connector start failed: {e}"),
            Err(_) => return Err(format!("connector did not start within {CALL_TIMEOUT:?}")),
        };
        self.set_current(id, None);
        finish(instance).await;
        Err(failure)
    }
}

/// Waits until the channel is told to stop (true) or the instance dies (false). An
/// instance that lost events dies too: its flushes fail from then on, so it would never
/// acknowledge a message again.
async fn watch_instance(instance: &Instance, stop: &mut watch::Receiver<bool>) -> bool {
    loop {
        if instance.is_poisoned()
            || instance.state() != InstanceState::Running
            || instance.lost_events() > 0
        {
            return false;
        }
        tokio::select! {
            _ = stop.changed() => return true,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Stops and destroys an instance on a blocking thread (stop joins plugin threads).
async fn finish(instance: Arc<Instance>) {
    let call = tokio::task::spawn_blocking(move || {
        if let Err(e) = instance.stop() {
            tracing::debug!(code = %e.code, "connector stop: {}", e.message);
        }
        drop(instance);
    });
    if tokio::time::timeout(CALL_TIMEOUT, call).await.is_err() {
        tracing::warn!("a connector did not stop within {CALL_TIMEOUT:?}; abandoning it");
    }
}
