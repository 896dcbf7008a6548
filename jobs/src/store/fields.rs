//! Custom chat fields: definitions per account, values per chat.

use async_trait::async_trait;

use super::StoreResult;
use crate::fields::{FieldDef, FieldType};
use crate::model::Id;

/// Custom chat fields: definitions per account and values per chat.
#[async_trait]
pub trait Fields: Send + Sync {
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
}
