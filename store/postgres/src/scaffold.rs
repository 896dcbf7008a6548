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
