//! TEMPORARY during the port: concept traits not yet written for PostgreSQL. Each
//! porter deletes its concepts' blocks here as it writes them. Never lands on main.
// The imports serve every concept's block; as blocks go, some fall unused.
#![allow(unused_imports)]

use async_trait::async_trait;
use patchbay_jobs::fields::{FieldDef, FieldType};
use patchbay_jobs::kind::{InboundMessage, JobKind};
use patchbay_jobs::model::*;
use patchbay_jobs::store::*;

use crate::PgStore;

// BEGIN Users
#[async_trait]
impl Users for PgStore {
    #[allow(unused_variables)]
    async fn add_user(&self, account: Id, user: &NewUser, role: Role) -> StoreResult<User> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn user(&self, id: Id) -> StoreResult<User> {
        unimplemented!("not yet ported")
    }
}
// END Users

// BEGIN Channels
#[async_trait]
impl Channels for PgStore {
    #[allow(unused_variables)]
    async fn active_channel_kinds(&self, account: Id) -> StoreResult<Vec<String>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn channel_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn stopped_channels(&self, ids: &[Id]) -> StoreResult<Vec<Id>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn channels_per_kind(&self) -> StoreResult<Vec<(String, i64)>> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn add_channel(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
    ) -> StoreResult<Channel> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn channel(&self, id: Id) -> StoreResult<Channel> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn channels(&self, account: Id) -> StoreResult<Vec<Channel>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn runnable_channels(&self) -> StoreResult<Vec<Channel>> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn set_channel_status(
        &self,
        id: Id,
        status: &str,
        reason: Option<&str>,
    ) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn set_channel_identity(
        &self,
        id: Id,
        number: Option<&str>,
        display_name: Option<&str>,
    ) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }
}
// END Channels

// BEGIN Chats
#[async_trait]
impl Chats for PgStore {
    #[allow(unused_variables)]
    async fn create_chat(&self, channel: &Channel, phone: &str) -> StoreResult<Chat> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn chat(&self, id: Id) -> StoreResult<Chat> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn contact(&self, id: Id) -> StoreResult<Contact> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn chats(&self, account: Id, filter: &ChatFilter) -> StoreResult<Vec<Chat>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn messages(
        &self,
        chat: Id,
        limit: u32,
        before: Option<Id>,
    ) -> StoreResult<Vec<Message>> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn assign_chat(&self, chat: Id, user: Option<Id>) -> StoreResult<Chat> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn mark_read(&self, chat: Id) -> StoreResult<Chat> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn close_chat(
        &self,
        chat: Id,
        reset_responsible: bool,
        requested_at: Option<i64>,
    ) -> StoreResult<Chat> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn add_outbound(&self, chat: &Chat, author: Id, text: &str) -> StoreResult<Message> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn message(&self, id: Id) -> StoreResult<Message> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn set_message_status(
        &self,
        id: Id,
        status: &str,
        reason: Option<&str>,
        external_id: Option<&str>,
    ) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn claim_send(&self, id: Id, until: i64) -> StoreResult<bool> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn release_send(&self, id: Id, until: i64) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn fail_unsent(&self, id: Id, reason: &str) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn store_inbound(&self, msg: &InboundMessage, phone: Option<&str>) -> StoreResult<bool> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn run_inbound_batch(&self, jobs: &[InboundJob]) -> StoreResult<Vec<BatchedJob>> {
        unimplemented!("not yet ported")
    }
}
// END Chats

// BEGIN Fields
#[async_trait]
impl Fields for PgStore {
    #[allow(unused_variables)]
    async fn add_field(
        &self,
        account: Id,
        name: &str,
        field_type: FieldType,
        options: Option<&[String]>,
    ) -> StoreResult<FieldDef> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn fields(&self, account: Id) -> StoreResult<Vec<FieldDef>> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn field(&self, id: Id) -> StoreResult<FieldDef> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn remove_field(&self, id: Id) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn set_field_value(
        &self,
        chat: Id,
        field: Id,
        value: &serde_json::Value,
    ) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn field_values(&self, chat: Id) -> StoreResult<Vec<(Id, serde_json::Value)>> {
        unimplemented!("not yet ported")
    }
}
// END Fields

// BEGIN Deletion
#[async_trait]
impl Deletion for PgStore {
    #[allow(unused_variables)]
    async fn start_deletion(&self, account: Id) -> StoreResult<(DeletionRun, bool)> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn deletion_run(&self, id: Id) -> StoreResult<DeletionRun> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn latest_deletion(&self, account: Id) -> StoreResult<Option<DeletionRun>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn running_deletions(&self) -> StoreResult<Vec<DeletionRun>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn delete_batch(&self, run: Id, limit: u32) -> StoreResult<BatchOutcome> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn deletion_remaining(&self, run: &DeletionRun) -> StoreResult<i64> {
        unimplemented!("not yet ported")
    }
}
// END Deletion
