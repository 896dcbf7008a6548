//! In-process wake-ups for queue workers: one `Notify` per queue, held by the queue
//! handle and signalled next to every push, so a job pushed by this process reaches its
//! idle worker at once instead of at the worker's next poll. Polling stays only as a
//! slow fallback (`queue.poll_fallback_ms`) for jobs pushed by other processes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    task::Context,
    time::Duration,
};

use futures::FutureExt;
use tokio::sync::{Notify, futures::OwnedNotified};

/// The per-queue notifiers of one queue handle (shared by its clones). Each wakes one
/// worker: a process runs one worker per queue.
#[derive(Clone, Default)]
pub(super) struct Wakers(Arc<Mutex<HashMap<String, Arc<Notify>>>>);

impl Wakers {
    pub(super) fn get(&self, queue: &str) -> Arc<Notify> {
        // A poisoned map still holds whole entries.
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(queue.to_owned()).or_default().clone()
    }

    /// Jobs of `queue` became runnable. `notify_one` keeps a permit when the worker is
    /// not waiting (it is fetching or busy), so a push between its empty fetch and its
    /// next wait is not missed.
    pub(super) fn wake(&self, queue: &str) {
        self.get(queue).notify_one();
    }

    /// A job of `queue` becomes runnable after `delay` (a retry's backoff): wakes the
    /// worker `slack` after that.
    pub(super) fn wake_after(&self, queue: &str, delay: Duration, slack: Duration) {
        let notify = self.get(queue);
        tokio::spawn(async move {
            tokio::time::sleep(delay + slack).await;
            notify.notify_one();
        });
    }
}

/// What wakes one idle worker: its queue's notifier, or the fallback timer.
pub(super) struct WakeSource {
    notify: Arc<Notify>,
    notified: std::pin::Pin<Box<OwnedNotified>>,
    fallback: tokio::time::Interval,
}

impl WakeSource {
    pub(super) fn new(notify: Arc<Notify>, fallback: Duration) -> Self {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + fallback, fallback);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        WakeSource {
            notified: Box::pin(notify.clone().notified_owned()),
            notify,
            fallback: tick,
        }
    }

    /// The notifier this source listens to (to wake the worker from elsewhere).
    pub(super) fn notifier(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    /// Whether a push or the fallback timer fired since the last call. Either way both
    /// are left armed with `cx`'s waker, so the worker's task is woken by the next one.
    pub(super) fn poll_woken(&mut self, cx: &mut Context<'_>) -> bool {
        let mut woken = false;
        while self.notified.poll_unpin(cx).is_ready() {
            woken = true;
            self.notified = Box::pin(self.notify.clone().notified_owned());
        }
        // An `Interval` arms its next tick only when polled to `Pending`.
        while self.fallback.poll_tick(cx).is_ready() {
            woken = true;
        }
        woken
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;
    use std::time::Instant;

    use super::*;

    /// Resolves once `source` reports a wake-up.
    async fn woken(source: &mut WakeSource) {
        std::future::poll_fn(|cx| {
            if source.poll_woken(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn now_woken(source: &mut WakeSource) -> bool {
        let waker = futures::task::noop_waker();
        source.poll_woken(&mut Context::from_waker(&waker))
    }

    #[tokio::test]
    async fn a_push_wakes_at_once_and_the_fallback_ticks_slowly() {
        let wakers = Wakers::default();
        let fallback = Duration::from_millis(300);
        let mut source = WakeSource::new(wakers.get("q"), fallback);
        let started = Instant::now();
        assert!(!now_woken(&mut source), "nothing happened yet");

        // A push while the worker is not waiting leaves a permit; another queue's
        // push is not ours.
        wakers.wake("q");
        wakers.wake("other");
        assert!(now_woken(&mut source), "the push is seen");
        assert!(!now_woken(&mut source), "once");

        // A waiting worker is woken by a push.
        let waiting = tokio::spawn(async move {
            woken(&mut source).await;
            source
        });
        tokio::task::yield_now().await;
        wakers.wake("q");
        let mut source = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken by the push")
            .expect("task");

        // Nothing pushed: the fallback fires, not before its period.
        woken(&mut source).await;
        assert!(started.elapsed() >= fallback);
        // One worker per queue and process: `notify_one` wakes the one waiting.
        drop(source);

        // A delayed job wakes the worker once it is due, not before.
        let delay = Duration::from_millis(100);
        let mut source = WakeSource::new(wakers.get("q"), Duration::from_secs(3600));
        let started = Instant::now();
        wakers.wake_after("q", delay, Duration::from_millis(10));
        tokio::time::timeout(Duration::from_secs(10), woken(&mut source))
            .await
            .expect("woken when due");
        assert!(started.elapsed() >= delay);
    }
}
