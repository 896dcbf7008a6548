//! Group commit for the queue's high-volume job kinds (`inbound_message`,
//! `charge_account`).
//!
//! Each worker handler hands its job to the kind's batcher task and waits; the batcher
//! runs every job waiting at that moment through one store transaction — where the
//! per-job path costs three per job — and wakes the handlers, whose deliveries apalis
//! then acks. While a batch commits the next one gathers, so batches grow with the load
//! and stay at one job when traffic is light. A job the batch cannot take (no journal
//! row, or the whole batch failed) goes back to its handler, which runs it on the
//! per-job path (`worker`), where retries and `dead` are decided.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

/// Jobs in one transaction at most: bounds how long one batch holds the write lock.
pub const MAX_BATCH: usize = 512;

struct Item<T> {
    job: T,
    done: oneshot::Sender<bool>,
}

pub struct Batcher<T> {
    tx: mpsc::Sender<Item<T>>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the batcher task on the current runtime; it ends when the handle is gone.
    /// `run` takes a batch and says per job whether it is finished (`true`: done, dead
    /// or done before) or must go the per-job path (`false`).
    /// `kind` names the jobs in the log.
    pub fn start<F, Fut>(kind: &'static str, mut run: F) -> Self
    where
        F: FnMut(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<bool>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<Item<T>>(MAX_BATCH * 4);
        tokio::spawn(async move {
            let mut items = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut items, MAX_BATCH).await > 0 {
                let (jobs, waiters): (Vec<T>, Vec<oneshot::Sender<bool>>) =
                    items.drain(..).map(|i| (i.job, i.done)).unzip();
                let finished = commit(kind, jobs, &mut run).await;
                // A short answer leaves the rest to the per-job path (dropped senders);
                // a handler that went away (shutdown) leaves a redelivery to the queue.
                for (waiter, done) in waiters.into_iter().zip(finished) {
                    let _ = waiter.send(done);
                }
            }
        });
        Batcher { tx }
    }

    /// As `start`, with `writers` batches running at once (for a store that commits
    /// them side by side): each runner takes every job waiting when it is free, so
    /// batches still grow with the load, and one runs as `start` does.
    pub fn start_writers<F, Fut>(kind: &'static str, writers: usize, run: F) -> Self
    where
        F: FnMut(Vec<T>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Vec<bool>> + Send,
    {
        if writers <= 1 {
            return Self::start(kind, run);
        }
        let (tx, rx) = mpsc::channel::<Item<T>>(MAX_BATCH * 4);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..writers {
            let (rx, mut run) = (rx.clone(), run.clone());
            tokio::spawn(async move {
                let mut items = Vec::with_capacity(MAX_BATCH);
                loop {
                    // The runner holding the receiver gathers; the others wait their turn.
                    if rx.lock().await.recv_many(&mut items, MAX_BATCH).await == 0 {
                        break;
                    }
                    let (jobs, waiters): (Vec<T>, Vec<oneshot::Sender<bool>>) =
                        items.drain(..).map(|i| (i.job, i.done)).unzip();
                    let finished = commit(kind, jobs, &mut run).await;
                    for (waiter, done) in waiters.into_iter().zip(finished) {
                        let _ = waiter.send(done);
                    }
                }
            });
        }
        Batcher { tx }
    }

    /// Runs the job in the next batch: `true` when it is finished, `false` when the
    /// caller must run it on the per-job path.
    pub async fn submit(&self, job: T) -> bool {
        let (done, finished) = oneshot::channel();
        if self.tx.send(Item { job, done }).await.is_err() {
            return false;
        }
        finished.await.unwrap_or(false)
    }
}

/// Runs one batch, timed for the log and `patchbay_store_batch_duration_seconds`.
async fn commit<T, F, Fut>(kind: &'static str, jobs: Vec<T>, run: &mut F) -> Vec<bool>
where
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<bool>>,
{
    let (n, started) = (jobs.len(), std::time::Instant::now());
    let finished = run(jobs).await;
    let took = started.elapsed();
    crate::metrics::store_batch(kind, took);
    tracing::debug!(kind, jobs = n, took = ?took, "batch committed");
    finished
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Several runners: every job is answered once, and batches overlap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_writers_run_batches_side_by_side() {
        let (running, most, seen) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let run = {
            let (running, most, seen) = (running.clone(), most.clone(), seen.clone());
            move |jobs: Vec<u32>| {
                let (running, most, seen) = (running.clone(), most.clone(), seen.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    seen.fetch_add(jobs.len(), Ordering::SeqCst);
                    jobs.iter().map(|j| j % 2 == 0).collect()
                }
            }
        };
        let batcher = Arc::new(Batcher::start_writers("test", 3, run));
        let submits: Vec<_> = (0..200u32)
            .map(|j| {
                let b = batcher.clone();
                tokio::spawn(async move { (j, b.submit(j).await) })
            })
            .collect();
        for s in submits {
            let (j, done) = s.await.expect("submit");
            assert_eq!(done, j % 2 == 0, "job {j} got its own answer");
        }
        assert_eq!(seen.load(Ordering::SeqCst), 200, "each job in one batch");
        assert!(most.load(Ordering::SeqCst) > 1, "batches overlapped");
    }
}
