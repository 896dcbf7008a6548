//! Chats with their messages and contacts: the shared inbox, inbound storage, outbound send leases.

use async_trait::async_trait;

use super::{BatchedJob, Fence, SendClaim, StoreResult};
use crate::kind::InboundMessage;
use crate::model::{Channel, Chat, Contact, Id, Message};

#[derive(Clone, Debug, Default)]
pub struct ChatFilter {
    /// Only chats this operator may see: unassigned ones and their own.
    pub visible_to_operator: Option<Id>,
    pub status: Option<String>,
    pub limit: u32,
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

/// Chats, their messages and contacts: the inbox, inbound storage and outbound send leases.
#[async_trait]
pub trait Chats: Send + Sync {
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
    /// (ms): `Taken` when it was sent since or another attempt holds the lease. With a
    /// fence, only while that node holds the channel's lease under that epoch, checked
    /// in the claiming statement (`Fenced` otherwise): a node that lost the channel
    /// (paused past its lease, cut off) can never hand the message to a connector.
    async fn claim_send(&self, id: Id, until: i64, fence: Option<&Fence>)
    -> StoreResult<SendClaim>;

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

    /// How many `run_inbound_batch` calls are worth running at once: 1 for a store
    /// whose writes queue for one writer (SQLite), more where batches commit side by
    /// side (PostgreSQL).
    fn inbound_writers(&self) -> usize {
        1
    }
}
