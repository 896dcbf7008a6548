//! Group commit for `inbound_message` jobs, the bulk of the queue's traffic.
//!
//! Each worker handler hands its job to one batcher task and waits; the batcher runs
//! every job waiting at that moment through `Store::run_inbound_batch` — one store
//! transaction for the batch, where the per-job path costs three per job — and wakes
//! the handlers, whose deliveries apalis then acks. While a batch commits the next one
//! gathers, so batches grow with the load and stay at one job when traffic is light.
//! A job the batch cannot take (no journal row, or the whole batch failed) goes back
//! to its handler, which runs it on the per-job path (`worker`), where retries and
//! `dead` are decided.

use std::sync::Arc;

use patchbay_jobs::Store;
use patchbay_jobs::store::{BatchedJob, InboundJob};
use tokio::sync::{mpsc, oneshot};

/// Jobs in one transaction at most: bounds how long one batch holds the write lock.
pub const MAX_BATCH: usize = 512;

struct Item {
    job: InboundJob,
    done: oneshot::Sender<bool>,
}

#[derive(Clone)]
pub struct InboundBatcher {
    tx: mpsc::Sender<Item>,
}

impl InboundBatcher {
    /// Starts the batcher task on the current runtime; it ends when every handle is gone.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(run(store, rx));
        InboundBatcher { tx }
    }

    /// Runs the job in the next batch. `true` when it is finished (done, dead, or done
    /// before); `false` when the caller must run it on the per-job path.
    pub async fn submit(&self, job: InboundJob) -> bool {
        let (done, finished) = oneshot::channel();
        if self.tx.send(Item { job, done }).await.is_err() {
            return false;
        }
        finished.await.unwrap_or(false)
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Item>) {
    let mut items = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut items, MAX_BATCH).await > 0 {
        let (jobs, waiters): (Vec<InboundJob>, Vec<oneshot::Sender<bool>>) =
            items.drain(..).map(|i| (i.job, i.done)).unzip();
        let outcomes = match store.run_inbound_batch(&jobs).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::warn!(jobs = jobs.len(), error = %e, "inbound batch failed; running its jobs one by one");
                vec![BatchedJob::NotJournalled; jobs.len()]
            }
        };
        tracing::trace!(jobs = jobs.len(), "inbound batch committed");
        for ((job, outcome), waiter) in jobs.iter().zip(outcomes).zip(waiters) {
            let finished = match outcome {
                BatchedJob::Done | BatchedJob::AlreadyFinished => true,
                BatchedJob::Dead(reason) => {
                    tracing::warn!(job = %job.job, error = %reason, "job is dead");
                    true
                }
                BatchedJob::NotJournalled => false,
            };
            // A handler that went away (shutdown) leaves a redelivery to the queue.
            let _ = waiter.send(finished);
        }
    }
}
