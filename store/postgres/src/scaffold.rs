//! TEMPORARY during the port: concept traits not yet written for PostgreSQL. Each
//! porter deletes its concepts' blocks here as it writes them. Never lands on main.
// The imports serve every concept's block; as blocks go, some fall unused.
#![allow(unused_imports)]

use async_trait::async_trait;
use chrono::NaiveDate;
use patchbay_jobs::billing::Prices;
use patchbay_jobs::fields::{FieldDef, FieldType};
use patchbay_jobs::kind::{InboundMessage, JobKind};
use patchbay_jobs::model::*;
use patchbay_jobs::store::*;

use crate::PgStore;

// BEGIN Accounts
#[async_trait]
impl Accounts for PgStore {
    #[allow(unused_variables)]
    async fn create_account(&self, new: &NewAccount) -> StoreResult<(Account, User)> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn account(&self, id: Id) -> StoreResult<Account> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn topup(&self, account: Id, amount: i64, reference: &str) -> StoreResult<LedgerEntry> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn ledger(&self, account: Id, limit: u32) -> StoreResult<Vec<LedgerEntry>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn set_setting(
        &self,
        account: Id,
        setting: &patchbay_jobs::settings::Setting,
    ) -> StoreResult<Settings> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn account_ids(&self, after: Id, limit: u32) -> StoreResult<Vec<Id>> {
        unimplemented!("not yet ported")
    }
}
// END Accounts

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

// BEGIN Billing
#[async_trait]
impl Billing for PgStore {
    #[allow(unused_variables)]
    async fn add_channel_charged(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Channel, bool)> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn charge_day(
        &self,
        account: Id,
        day: NaiveDate,
        day_start: i64,
        day_end: i64,
        prices: &Prices,
    ) -> StoreResult<Charged> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn charge_accounts(
        &self,
        jobs: &[ChargeJob],
        prices: &Prices,
    ) -> StoreResult<Vec<(BatchedJob, Option<Charged>)>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn resume_suspended(
        &self,
        account: Id,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Vec<Channel>, bool)> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn suspended_accounts(&self) -> StoreResult<Vec<Id>> {
        unimplemented!("not yet ported")
    }
}
// END Billing

// BEGIN Outbox
#[async_trait]
impl Outbox for PgStore {
    #[allow(unused_variables)]
    async fn mail_recipients(&self, accounts: &[Id]) -> StoreResult<Vec<(Account, Vec<String>)>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn claim_notifications(
        &self,
        account: Id,
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Vec<Notification>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn release_notification(&self, n: &Notification) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }

    #[allow(unused_variables)]
    async fn mark_notification_sent(&self, n: &Notification) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn claim_balance_checks(
        &self,
        jobs: &[CheckJob],
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Vec<(BatchedJob, Vec<Notification>)>> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn settle_balance_checks(
        &self,
        sent: &[Notification],
        unsent: &[Notification],
        done: &[String],
    ) -> StoreResult<()> {
        unimplemented!("not yet ported")
    }
    #[allow(unused_variables)]
    async fn accounts_with_unsent_notifications(
        &self,
        before: i64,
        limit: u32,
    ) -> StoreResult<Vec<Id>> {
        unimplemented!("not yet ported")
    }
}
// END Outbox
