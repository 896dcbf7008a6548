//! Plugin calls off the async workers: each runs on a blocking thread with a time
//! limit, and whatever may hold an instance's last handle (whose drop calls the plugin)
//! is dropped on a blocking thread too.

use std::sync::Arc;
use std::time::Duration;

use patchbay_connector_sdk::host::Instance;
use tokio::sync::oneshot;

/// Why a blocking call gave no answer.
pub(super) enum CallFailure {
    /// Not within its time limit; it runs on by itself.
    TimedOut,
    /// The host code around the plugin call panicked.
    Crashed,
}

/// Runs `f` (a plugin call) on a blocking thread and waits at most `limit` for it. What
/// it returns may hold the last handle on an instance, whose drop calls the plugin: if
/// nobody waits for it any more (timeout, or the caller was cancelled), it is dropped on
/// a blocking thread too.
pub(super) async fn blocking<T, F>(limit: Duration, f: F) -> Result<T, CallFailure>
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
pub(super) fn release(instance: Arc<Instance>) {
    if let Some(last) = Arc::into_inner(instance) {
        on_blocking_thread(move || drop(last));
    }
}
