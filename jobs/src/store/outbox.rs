//! The balance e-mail outbox: notifications a charge recorded, their claims and their recipients.

use async_trait::async_trait;
use chrono::NaiveDate;

use super::{BatchedJob, StoreResult};
use crate::model::{Account, Id};

/// A recorded balance e-mail (see the `notifications` table), claimed for sending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub id: Id,
    pub account: Id,
    /// `warning_<n>_days`, `warning_1_day` or `disconnected`.
    pub kind: String,
    pub disconnect_date: NaiveDate,
    /// Days from the charge until the disconnection; 0 for `disconnected`.
    pub days: i64,
    /// The balance and daily total when the charge decided the e-mail was due.
    pub balance: i64,
    pub daily_total: i64,
    /// The claim's expiry: only the holder of this claim may release or settle it.
    pub lease: i64,
}

/// One queued `balance_check` job for `Store::claim_balance_checks`.
#[derive(Clone, Debug)]
pub struct CheckJob {
    /// The `balance_check` job's journal id.
    pub job: String,
    pub account: Id,
}

/// How the outbox stands: e-mails waiting to be sent, and those sent since a time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxCounts {
    pub unsent: i64,
    pub sent_since: i64,
}

/// The balance e-mail outbox: recorded notifications, their claims and their recipients.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// E-mails recorded and not sent yet, and e-mails sent at or after `since` (ms).
    async fn outbox_counts(&self, since: i64) -> StoreResult<OutboxCounts>;

    /// Those of `accounts` that exist, each with its administrators' e-mail addresses
    /// (in user id order): who gets the balance e-mails. Two queries for a batch.
    async fn mail_recipients(&self, accounts: &[Id]) -> StoreResult<Vec<(Account, Vec<String>)>>;

    /// Claims the account's recorded, unsent balance e-mails for `lease_ms`: no other
    /// sender gets them until the lease runs out (a crashed sender's) or they are
    /// released.
    async fn claim_notifications(
        &self,
        account: Id,
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Vec<Notification>>;

    /// Gives a claimed e-mail back after a failed send, for the retry.
    async fn release_notification(&self, n: &Notification) -> StoreResult<()>;

    async fn mark_notification_sent(&self, n: &Notification) -> StoreResult<()>;

    /// `claim_notifications` for a batch of `balance_check` jobs, in one transaction
    /// that also reads their journal: per job, `NotJournalled` or `AlreadyFinished`
    /// (nothing claimed), or `Done` with the e-mails it claimed (none for a second job
    /// of the same account). Nothing is journalled yet: `settle_balance_checks` does.
    async fn claim_balance_checks(
        &self,
        jobs: &[CheckJob],
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Vec<(BatchedJob, Vec<Notification>)>>;

    /// After the sends of a batch, in one transaction: `sent` e-mails marked sent,
    /// `unsent` ones released for a retry (each only under its own claim) and the
    /// `done` jobs journalled done.
    async fn settle_balance_checks(
        &self,
        sent: &[Notification],
        unsent: &[Notification],
        done: &[String],
    ) -> StoreResult<()>;

    /// Accounts with balance e-mails recorded before `before` and still unsent and
    /// unclaimed, and no `balance_check` live or dead since `before`: their check was
    /// lost or gave up; the sweep queues another.
    async fn accounts_with_unsent_notifications(
        &self,
        before: i64,
        limit: u32,
    ) -> StoreResult<Vec<Id>>;
}
