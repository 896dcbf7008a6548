//! The plugin's one runtime and each instance's share of it (`Tasks`).
//!
//! The runtime lives in a `static` of this crate, and each plugin library links its own
//! copy of the SDK, so there is exactly one runtime per loaded plugin, shared by all of
//! its instances. It is built lazily (the first `Tasks::new`), never before a channel
//! starts, and lives as long as the process (libraries are never unloaded).

use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ConnectorError;

/// What `Tasks::stop` gives running tasks to end by themselves once cancelled, before
/// it aborts them.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How the plugin's runtime is built; see `configure`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// Async worker threads. Default: `PATCHBAY_CONNECTOR_THREADS` if set (1 to 64),
    /// else the CPUs available, at most 4.
    pub worker_threads: usize,
    /// Most blocking threads at once (`spawn_blocking`, `flush`). Default 8.
    pub max_blocking_threads: usize,
    /// Name of the runtime's threads (Linux truncates it to 15 bytes).
    pub thread_name: String,
}

impl RuntimeOptions {
    /// The worker threads the operator asked for: `PATCHBAY_CONNECTOR_THREADS`, if set
    /// to 1 to 64. A plugin choosing its own default should still honour it.
    pub fn threads_from_env() -> Option<usize> {
        std::env::var("PATCHBAY_CONNECTOR_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| (1..=64).contains(n))
    }
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let worker_threads = RuntimeOptions::threads_from_env().unwrap_or(cpus.min(4));
        RuntimeOptions {
            worker_threads,
            max_blocking_threads: 8,
            thread_name: "connector-rt".into(),
        }
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
/// Options set by `configure` before the runtime exists.
static OPTIONS: Mutex<Option<RuntimeOptions>> = Mutex::new(None);

/// Sets how the plugin's runtime is built. Only before it exists (before the first
/// `Tasks::new`); returns whether the options were taken.
pub fn configure(options: RuntimeOptions) -> bool {
    let mut o = OPTIONS.lock().unwrap_or_else(|p| p.into_inner());
    if RUNTIME.get().is_some() {
        return false;
    }
    *o = Some(options);
    true
}

/// The plugin's runtime, built on first use.
pub fn handle() -> Result<Handle, ConnectorError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle().clone());
    }
    // Built under the lock, so two instances starting at once build one runtime.
    let options = OPTIONS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle().clone());
    }
    let o = options.clone().unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.worker_threads.clamp(1, 64))
        .max_blocking_threads(o.max_blocking_threads.max(1))
        .thread_name(o.thread_name)
        .enable_all()
        .build()
        .map_err(|e| {
            ConnectorError::new("start_failed", format!("cannot build the runtime: {e}"))
                .retryable()
        })?;
    let handle = rt.handle().clone();
    let _ = RUNTIME.set(rt);
    Ok(handle)
}

/// How `Tasks::stop` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Tasks that panicked.
    pub panicked: usize,
    /// Tasks still running after the grace, aborted (and joined).
    pub aborted: usize,
}

/// One instance's tasks on the plugin's runtime: what it spawns, the token that cancels
/// them, and the join at `stop`. Dropping it stops it (`STOP_GRACE`).
pub struct Tasks {
    handle: Handle,
    token: CancellationToken,
    set: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("cancelled", &self.token.is_cancelled())
            .finish()
    }
}

impl Tasks {
    /// A fresh task set on the plugin's runtime (building the runtime if needed).
    pub fn new() -> Result<Tasks, ConnectorError> {
        Ok(Tasks {
            handle: handle()?,
            token: CancellationToken::new(),
            set: Mutex::new(JoinSet::new()),
        })
    }

    /// The token `stop` cancels: select on `token.cancelled()` at every wait.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The plugin runtime's handle (for `TcpListener::from_std` and the like).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Whether `stop` has begun.
    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    fn set(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `task` on the plugin's runtime as one of this instance's tasks. Ignored
    /// once `stop` has begun (the future is dropped unpolled).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.token.is_cancelled() {
            return;
        }
        let mut set = self.set();
        // Reap what already finished, so a long-lived instance that spawns many short
        // tasks keeps O(running) entries.
        while set.try_join_next().is_some() {}
        set.spawn_on(task, &self.handle);
    }

    /// Runs `fut` to completion on the calling thread, with the plugin runtime's timers
    /// and sockets: for `send`, which the host calls on a thread of its own. Never call
    /// it from inside the runtime (a task), where it would panic.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.handle.block_on(fut)
    }

    /// Cancels the token, waits up to `grace` for this instance's tasks to end, aborts
    /// the rest and joins them too: when it returns, none of them runs. Other instances'
    /// tasks are untouched. Call it from the host's thread (`stop`, `Drop`); from inside
    /// the runtime it only cancels and aborts, without waiting.
    pub fn stop(&self, grace: Duration) -> StopOutcome {
        self.token.cancel();
        let mut set = std::mem::take(&mut *self.set());
        let mut outcome = StopOutcome {
            panicked: 0,
            aborted: 0,
        };
        if Handle::try_current().is_ok() {
            // On a runtime thread (ours or another's) blocking is not allowed.
            outcome.aborted = set.len();
            set.abort_all();
            set.detach_all();
            return outcome;
        }
        self.handle.block_on(async {
            let drained = tokio::time::timeout(grace, async {
                while let Some(r) = set.join_next().await {
                    if matches!(r, Err(e) if e.is_panic()) {
                        outcome.panicked += 1;
                    }
                }
            })
            .await;
            if drained.is_err() {
                outcome.aborted = set.len();
                set.abort_all();
                while let Some(r) = set.join_next().await {
                    if matches!(r, Err(e) if e.is_panic()) {
                        outcome.panicked += 1;
                    }
                }
            }
        });
        outcome
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        if !self.set().is_empty() {
            self.stop(STOP_GRACE);
        }
    }
}
