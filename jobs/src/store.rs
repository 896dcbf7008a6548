//! The one interface to patchbay's data, whatever database sits behind it.
//!
//! The interface is split by concept, one small capability trait per file (in the
//! manner of apalis-core's backend traits): `Accounts`, `Users`, `Channels`, `Chats`,
//! `Fields`, `Journal`, `Billing`, `Deletion`, `Outbox` and `Cluster`. `Store` is all of them; an
//! implementation provides each trait and gets `Store` for free. Handlers and control
//! methods talk to `dyn Store` (bring the traits into scope with `use store::*`).
//!
//! The implementations live in their own crates (`store/sqlite`, `store/postgres`).
//! Every "at most once" rule is a UNIQUE constraint of their schemas, not a check in
//! code; the rules both follow (billing decisions, warnings, validation) are pure
//! functions of this crate.

mod accounts;
mod billing;
mod channels;
mod chats;
mod cluster;
mod deletion;
mod fields;
mod journal;
mod outbox;
pub mod rows;
mod users;

pub use accounts::{Accounts, NewAccount};
pub use billing::{Billing, ChargeJob, ChargeOutcome, Charged};
pub use channels::Channels;
pub use chats::{ChatFilter, Chats, InboundJob};
pub use cluster::{Cluster, Fence, LeaseRow, NodeInfo, NodeRow, SendClaim};
pub use deletion::{BatchOutcome, Deletion};
pub use fields::Fields;
pub use journal::{JobFilter, Journal, JournalInsert};
pub use outbox::{CheckJob, Notification, Outbox, OutboxCounts};
pub use users::{NewUser, Users};

use crate::error::DomainError;

pub type StoreResult<T> = Result<T, DomainError>;

/// What a group commit did with one job of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchedJob {
    /// Its message is stored (now, or by an earlier delivery) and the job is `done`.
    Done,
    /// The journal says done or dead already (a redelivered copy): nothing ran.
    AlreadyFinished,
    /// No journal row: the caller runs it on the per-job path, which creates it.
    NotJournalled,
    /// It can never succeed (its channel does not exist); journalled `dead` with this.
    Dead(String),
    /// It failed this time (an e-mail was refused); nothing is journalled, and the
    /// caller runs it on the per-job path, where retries and backoff are decided.
    Failed(String),
}

/// The whole store: every concept trait. Implemented for any type that has them all.
pub trait Store:
    Accounts
    + Users
    + Channels
    + Chats
    + Fields
    + Journal
    + Billing
    + Deletion
    + Outbox
    + Cluster
    + 'static
{
}

impl<T> Store for T where
    T: Accounts
        + Users
        + Channels
        + Chats
        + Fields
        + Journal
        + Billing
        + Deletion
        + Outbox
        + Cluster
        + 'static
{
}
