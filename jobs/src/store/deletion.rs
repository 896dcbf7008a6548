//! Data deletion runs: the epoch bump that hides older data at once, then batched deletion.

use async_trait::async_trait;

use super::StoreResult;
use crate::model::{DeletionRun, Id};

/// What one deletion batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOutcome {
    pub deleted: u64,
    /// Nothing of the run is left; the run is marked done.
    pub finished: bool,
}

/// Data deletion runs: the epoch bump and the batched deletion of older data.
#[async_trait]
pub trait Deletion: Send + Sync {
    /// Starts a data deletion run with cutoff now: bumps the account's data epoch so
    /// everything older is hidden at once and new traffic lands in fresh chats and
    /// contacts. If a run is active, returns it instead (`false`).
    async fn start_deletion(&self, account: Id) -> StoreResult<(DeletionRun, bool)>;

    async fn deletion_run(&self, id: Id) -> StoreResult<DeletionRun>;

    async fn latest_deletion(&self, account: Id) -> StoreResult<Option<DeletionRun>>;

    /// Every run still `running`, of all accounts.
    async fn running_deletions(&self) -> StoreResult<Vec<DeletionRun>>;

    /// Deletes up to `limit` rows of the run (messages, then field values and chats,
    /// then contacts) in one transaction that also advances the run's counts.
    async fn delete_batch(&self, run: Id, limit: u32) -> StoreResult<BatchOutcome>;

    /// Rows of the run not yet deleted.
    async fn deletion_remaining(&self, run: &DeletionRun) -> StoreResult<i64>;
}
