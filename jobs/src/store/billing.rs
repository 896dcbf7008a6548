//! Daily charges: charging a day once per channel, suspension when funds run out, resumption.

use async_trait::async_trait;
use chrono::NaiveDate;

use super::{BatchedJob, StoreResult};
use crate::billing::Prices;
use crate::model::{Channel, Id};

/// What charging an account for one day did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// The day's unpaid channels were charged `total`; `balance` is what is left.
    Charged {
        total: i64,
        balance: i64,
        channels: usize,
    },
    /// Every active channel was paid for that day already (or there are none).
    NothingDue { balance: i64 },
    /// The balance cannot cover the day: nothing was charged and these channels are
    /// now suspended with reason `insufficient_funds`.
    Suspended {
        needed: i64,
        balance: i64,
        channels: Vec<Id>,
    },
}

/// One account to charge for one billing day (`Store::charge_accounts`).
#[derive(Clone, Debug)]
pub struct ChargeJob {
    /// The `charge_account` job's journal id.
    pub job: String,
    pub account: Id,
    pub day: NaiveDate,
    /// The first instant (unix ms) of `day` in the billing time zone: a channel
    /// removed before it was not active that day and is not charged for it.
    pub day_start: i64,
    /// The first instant (unix ms) after `day` in the billing time zone: a channel
    /// created since did not exist on that day and is not charged for it.
    pub day_end: i64,
    /// For the journal row of a job queued without one.
    pub max_attempts: u32,
}

/// What charging an account did, and whether balance e-mails were recorded for it (the
/// caller then queues a `balance_check` to send them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charged {
    pub outcome: ChargeOutcome,
    pub notices: bool,
}

/// Daily charges, suspension for lack of funds and resumption.
#[async_trait]
pub trait Billing: Send + Sync {
    /// Adds a channel and charges today's price for it in one transaction; refused
    /// with `insufficient_funds` (and nothing created) when the balance cannot pay.
    /// Records the balance warning that charge makes due (`Charged::notices`).
    async fn add_channel_charged(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Channel, bool)>;

    /// Charges every channel active on `day` (the instants `day_start..day_end`) and
    /// not yet paid for it, all or nothing; suspends all the account's channels when
    /// the balance cannot cover the total. Records the balance e-mail that is then due,
    /// in the same transaction.
    async fn charge_day(
        &self,
        account: Id,
        day: NaiveDate,
        day_start: i64,
        day_end: i64,
        prices: &Prices,
    ) -> StoreResult<Charged>;

    /// `charge_day` for the `charge_account` jobs of a batch, in one transaction that
    /// also journals each job done — writing the row, with its idempotency key, of one
    /// queued without it — or dead (an unknown account; `NotJournalled` if it has no
    /// row). A job does not charge if its row is done or dead, or another row or an
    /// earlier job of the batch holds its (account, day) key: `AlreadyFinished`, or
    /// `Done` when it had an unfinished row of its own, which is finished. One entry per
    /// job, in order; `Charged` for the jobs that charged existing accounts. An `Err`
    /// means nothing was written.
    async fn charge_accounts(
        &self,
        jobs: &[ChargeJob],
        prices: &Prices,
    ) -> StoreResult<Vec<(BatchedJob, Option<Charged>)>>;

    /// If the balance now covers `day` for every channel (suspended ones included),
    /// charges what is unpaid and un-suspends; returns the channels to start, and
    /// whether the charge recorded a balance warning.
    async fn resume_suspended(
        &self,
        account: Id,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Vec<Channel>, bool)>;

    /// Accounts with suspended channels.
    async fn suspended_accounts(&self) -> StoreResult<Vec<Id>>;
}
