//! The one interface to patchbay's data, whatever database sits behind it.
//!
//! Handlers and control methods talk to `dyn Store`; `SqliteStore` is the embedded
//! implementation. The SQL is kept portable so a PostgreSQL store can follow, and every
//! "at most once" rule is a UNIQUE constraint, not a check in code.

use async_trait::async_trait;
use serde::Deserialize;

use chrono::NaiveDate;

use crate::billing::Prices;
use crate::error::DomainError;
use crate::fields::{FieldDef, FieldType};
use crate::kind::{InboundMessage, JobKind};
use crate::model::{
    Account, Channel, Chat, Contact, DeletionRun, Id, JobRecord, JobState, LedgerEntry, Message,
    Role, Settings, User,
};

pub type StoreResult<T> = Result<T, DomainError>;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    pub name: String,
    #[serde(default = "default_currency")]
    pub currency: String,
    pub admin: NewUser,
}

fn default_currency() -> String {
    "USD".to_owned()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    pub email: String,
}

/// What `journal_insert` found: a job with the same idempotency key may exist already.
#[derive(Debug, PartialEq, Eq)]
pub enum JournalInsert {
    Inserted,
    Existing(String),
}

#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
    pub limit: u32,
}

#[derive(Clone, Debug, Default)]
pub struct ChatFilter {
    /// Only chats this operator may see: unassigned ones and their own.
    pub visible_to_operator: Option<Id>,
    pub status: Option<String>,
    pub limit: u32,
}

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

/// What one deletion batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOutcome {
    pub deleted: u64,
    /// Nothing of the run is left; the run is marked done.
    pub finished: bool,
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

/// One queued `inbound_message` job for `Store::run_inbound_batch`: its job id, the
/// payload, and the sender's phone normalised by `handlers::inbound_sender_phone`.
/// Jobs queued from connector events have no journal row until their batch writes one
/// (`done`), which is why the batch needs the kind's `max_attempts`.
#[derive(Clone, Debug)]
pub struct InboundJob {
    pub job: String,
    pub msg: InboundMessage,
    pub phone: Option<String>,
    pub max_attempts: u32,
}

/// One queued `balance_check` job for `Store::claim_balance_checks`.
#[derive(Clone, Debug)]
pub struct CheckJob {
    /// The `balance_check` job's journal id.
    pub job: String,
    pub account: Id,
}

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

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates an account and its first administrator in one transaction.
    async fn create_account(&self, new: &NewAccount) -> StoreResult<(Account, User)>;
    async fn account(&self, id: Id) -> StoreResult<Account>;
    /// Credits `amount` once per (account, reference); a repeat returns the first entry.
    async fn topup(&self, account: Id, amount: i64, reference: &str) -> StoreResult<LedgerEntry>;
    async fn ledger(&self, account: Id, limit: u32) -> StoreResult<Vec<LedgerEntry>>;
    async fn add_user(&self, account: Id, user: &NewUser, role: Role) -> StoreResult<User>;
    async fn user(&self, id: Id) -> StoreResult<User>;
    /// Kinds of the account's channels that are billed (not removed, not suspended).
    async fn active_channel_kinds(&self, account: Id) -> StoreResult<Vec<String>>;
    /// Number of channels in each status, over all accounts.
    async fn channel_counts(&self) -> StoreResult<Vec<(String, i64)>>;
    /// Those of `ids` that must not run: suspended or removed (by any daemon).
    async fn stopped_channels(&self, ids: &[Id]) -> StoreResult<Vec<Id>>;
    /// Number of channels that are not removed, per connector kind, over all accounts.
    async fn channels_per_kind(&self) -> StoreResult<Vec<(String, i64)>>;

    /// Records a job before it is pushed. A job whose idempotency key is taken is not
    /// recorded, and the existing job's id is returned.
    async fn journal_insert(&self, rec: &JobRecord) -> StoreResult<JournalInsert>;
    /// `journal_insert` for many jobs in one transaction; `true` where recorded.
    /// `pushed` records them as queued already: the caller is about to push them and
    /// marks them unpushed if the push fails, which saves a journal write per job on
    /// the hot paths; a crash in between leaves them to the sweep's stale-queue check.
    async fn journal_insert_many(&self, recs: &[JobRecord], pushed: bool)
    -> StoreResult<Vec<bool>>;
    async fn journal_get(&self, id: &str) -> StoreResult<JobRecord>;
    /// The job holding this idempotency key, if any.
    async fn journal_by_key(&self, key: &str) -> StoreResult<Option<JobRecord>>;
    async fn journal_list(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>>;
    /// Marks the job running and counts the attempt; `None` if it is already done or
    /// dead (a redelivered copy). `rec` recreates a missing entry, unless another entry
    /// holds its idempotency key (then `None`: that entry's job is the one for the key).
    async fn journal_start(&self, rec: &JobRecord) -> StoreResult<Option<JobRecord>>;
    async fn journal_finish(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        run_at: i64,
    ) -> StoreResult<()>;
    /// Records `rec`'s job `dead` with `reason` in one statement that reads nothing
    /// back: an existing row (whose payload may be past repair) keeps its payload and
    /// counts the attempt, a missing one is written from `rec`; a done or dead row, or
    /// another row holding `rec`'s idempotency key, is left as it is. For jobs the
    /// queue rejected, where reading the row could fail for good.
    async fn journal_mark_dead(&self, rec: &JobRecord, reason: &str) -> StoreResult<()>;
    /// Deletes up to `limit` done jobs created and finished before `before` (journal
    /// retention); returns how many went. Dead jobs stay until someone retries them.
    async fn journal_purge(&self, before: i64, limit: u32) -> StoreResult<u64>;
    /// Records whether these jobs reached the queue (a failed push leaves them to the sweep).
    async fn journal_mark_pushed(&self, ids: &[String], pushed: bool) -> StoreResult<()>;
    /// Claims up to `limit` jobs the queue lost, to be queued again: pending jobs recorded
    /// more than `grace_ms` ago that never reached the queue (the daemon died between
    /// journal and queue), and failed jobs whose retry is `grace_ms` overdue (it died
    /// before queueing the retry), and pending jobs the queue took more than `stale_ms`
    /// ago that no worker has started (a queue that lost its data: a Redis restarted
    /// without persistence). A claimed job is `pending`, unpushed, with a fresh
    /// `updated_at`: two daemons sweeping one store never claim it within the grace, and
    /// one whose push never happens is claimed again after it.
    async fn journal_claim_lost(
        &self,
        now: i64,
        grace_ms: i64,
        stale_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<JobRecord>>;
    /// Moves a dead job back to pending with a fresh attempt budget.
    async fn journal_revive(&self, id: &str) -> StoreResult<JobRecord>;
    async fn journal_counts(&self) -> StoreResult<Vec<(JobKind, JobState, i64)>>;

    /// Stores one setting (that column alone, so concurrent changes of different
    /// settings all stick); returns the account's settings as they are now.
    async fn set_setting(
        &self,
        account: Id,
        setting: &crate::settings::Setting,
    ) -> StoreResult<Settings>;

    async fn add_channel(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
    ) -> StoreResult<Channel>;
    async fn channel(&self, id: Id) -> StoreResult<Channel>;
    /// The account's channels that are not removed.
    async fn channels(&self, account: Id) -> StoreResult<Vec<Channel>>;
    /// Channels of every account that should be running (not removed, not suspended).
    async fn runnable_channels(&self) -> StoreResult<Vec<Channel>>;
    async fn set_channel_status(
        &self,
        id: Id,
        status: &str,
        reason: Option<&str>,
    ) -> StoreResult<()>;
    async fn set_channel_identity(
        &self,
        id: Id,
        number: Option<&str>,
        display_name: Option<&str>,
    ) -> StoreResult<()>;

    async fn add_field(
        &self,
        account: Id,
        name: &str,
        field_type: FieldType,
        options: Option<&[String]>,
    ) -> StoreResult<FieldDef>;
    async fn fields(&self, account: Id) -> StoreResult<Vec<FieldDef>>;
    async fn field(&self, id: Id) -> StoreResult<FieldDef>;
    /// Removes the definition and every value of it.
    async fn remove_field(&self, id: Id) -> StoreResult<()>;
    /// Sets a checked value; `null` clears it.
    async fn set_field_value(
        &self,
        chat: Id,
        field: Id,
        value: &serde_json::Value,
    ) -> StoreResult<()>;
    async fn field_values(&self, chat: Id) -> StoreResult<Vec<(Id, serde_json::Value)>>;

    /// Finds or creates the contact with this E.164 phone and its chat on `channel`.
    async fn create_chat(&self, channel: &Channel, phone: &str) -> StoreResult<Chat>;
    /// A chat of the account's current data epoch; older ones are `not_found`.
    async fn chat(&self, id: Id) -> StoreResult<Chat>;
    async fn contact(&self, id: Id) -> StoreResult<Contact>;
    async fn chats(&self, account: Id, filter: &ChatFilter) -> StoreResult<Vec<Chat>>;
    /// Newest first; `before` pages by message id.
    async fn messages(&self, chat: Id, limit: u32, before: Option<Id>)
    -> StoreResult<Vec<Message>>;
    async fn assign_chat(&self, chat: Id, user: Option<Id>) -> StoreResult<Chat>;
    /// Marks the client's messages read and zeroes the unread count.
    async fn mark_read(&self, chat: Id) -> StoreResult<Chat>;
    /// Closes the chat, resetting the responsible if asked. A client who wrote after
    /// `requested_at` reopened it since the close was asked for: it stays open (the
    /// reset still applies, as if the close had run first).
    async fn close_chat(
        &self,
        chat: Id,
        reset_responsible: bool,
        requested_at: Option<i64>,
    ) -> StoreResult<Chat>;
    async fn add_outbound(&self, chat: &Chat, author: Id, text: &str) -> StoreResult<Message>;
    async fn message(&self, id: Id) -> StoreResult<Message>;
    /// Records a status (and the messenger's id, if first given). A status never goes
    /// back from delivered or read.
    async fn set_message_status(
        &self,
        id: Id,
        status: &str,
        reason: Option<&str>,
        external_id: Option<&str>,
    ) -> StoreResult<()>;
    /// Claims a queued or failed outbound message for one send attempt until `until`
    /// (ms): `false` when it was sent since or another attempt holds the lease.
    async fn claim_send(&self, id: Id, until: i64) -> StoreResult<bool>;
    /// Gives a send lease back (the attempt did not send and will be retried); only
    /// the lease claimed with this `until`, never another attempt's.
    async fn release_send(&self, id: Id, until: i64) -> StoreResult<()>;
    /// Marks a message whose send gave up `failed`, in one statement: only while it is
    /// still `queued` and no attempt holds its lease (one that does may yet send it).
    async fn fail_unsent(&self, id: Id, reason: &str) -> StoreResult<()>;
    /// Upserts contact and chat, reopens a closed chat, stores the message once per
    /// (channel, external message id) and bumps the unread count — in one transaction.
    /// `false` when it was stored before (a redelivered job): nothing changed.
    async fn store_inbound(&self, msg: &InboundMessage, phone: Option<&str>) -> StoreResult<bool>;
    /// Runs many `inbound_message` jobs in one transaction: for each job still to run,
    /// what `store_inbound` does, and its journal row goes to `done` (or `dead`) in the
    /// same commit; a done job the journal does not know yet (queued from a connector
    /// event) gets its row here. One outcome per job, in order. An `Err` means nothing
    /// was written and the caller should run the jobs one by one.
    async fn run_inbound_batch(&self, jobs: &[InboundJob]) -> StoreResult<Vec<BatchedJob>>;

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
    /// Accounts in id order after `after`, for the billing fan-out.
    async fn account_ids(&self, after: Id, limit: u32) -> StoreResult<Vec<Id>>;
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
