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
                let (n, started) = (jobs.len(), std::time::Instant::now());
                let finished = run(jobs).await;
                tracing::debug!(kind, jobs = n, took = ?started.elapsed(), "batch committed");
                // A short answer leaves the rest to the per-job path (dropped senders);
                // a handler that went away (shutdown) leaves a redelivery to the queue.
                for (waiter, done) in waiters.into_iter().zip(finished) {
                    let _ = waiter.send(done);
                }
            }
        });
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
