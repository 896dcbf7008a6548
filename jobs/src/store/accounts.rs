//! Accounts and their ledger: creation, top-ups, settings, the account list.

use async_trait::async_trait;
use serde::Deserialize;

use super::StoreResult;
use super::*;
use crate::model::{Account, Id, LedgerEntry, Settings, User};

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

/// Accounts and their ledger: creation, top-ups, settings.
#[async_trait]
pub trait Accounts: Send + Sync {
    /// Creates an account and its first administrator in one transaction.
    async fn create_account(&self, new: &NewAccount) -> StoreResult<(Account, User)>;

    async fn account(&self, id: Id) -> StoreResult<Account>;

    /// Credits `amount` once per (account, reference); a repeat returns the first entry.
    async fn topup(&self, account: Id, amount: i64, reference: &str) -> StoreResult<LedgerEntry>;

    async fn ledger(&self, account: Id, limit: u32) -> StoreResult<Vec<LedgerEntry>>;

    /// Stores one setting (that column alone, so concurrent changes of different
    /// settings all stick); returns the account's settings as they are now.
    async fn set_setting(
        &self,
        account: Id,
        setting: &crate::settings::Setting,
    ) -> StoreResult<Settings>;

    /// Accounts in id order after `after`, for the billing fan-out.
    async fn account_ids(&self, after: Id, limit: u32) -> StoreResult<Vec<Id>>;
}
