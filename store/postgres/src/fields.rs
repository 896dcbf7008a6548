//! `Fields` on PostgreSQL: custom chat fields, definitions per account and values per
//! chat. A name is unique per account ignoring case by the UNIQUE (account_id,
//! name_key) constraint, so two daemons adding one name at once make one field.

use async_trait::async_trait;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::field_columns;
use patchbay_jobs::fields::{FieldDef, FieldType};
use patchbay_jobs::model::{Id, now_ms};
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;

use crate::PgStore;
use crate::is_unique_violation;

#[async_trait]
impl Fields for PgStore {
    async fn add_field(
        &self,
        account: Id,
        name: &str,
        field_type: FieldType,
        options: Option<&[String]>,
    ) -> StoreResult<FieldDef> {
        let options_json = options.map(|o| serde_json::Value::from(o.to_vec()).to_string());
        // The account check and the insert in one statement (accounts are never deleted).
        let row = sqlx::query(concat!(
            "INSERT INTO field_definitions (account_id, name, name_key, type, options, created_at) \
             SELECT id, $2, $3, $4, $5, $6 FROM accounts WHERE id = $1 RETURNING ",
            field_columns!()
        ))
        .bind(account)
        .bind(name)
        .bind(name.to_lowercase())
        .bind(field_type.as_str())
        .bind(options_json)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                DomainError::Conflict(format!(
                    "account {account} already has a field named {name:?} (names ignore case)"
                ))
            } else {
                e.into()
            }
        })?
        .ok_or_else(|| DomainError::not_found("account", account))?;
        decode::<FieldDef, _>(&row)
    }

    async fn fields(&self, account: Id) -> StoreResult<Vec<FieldDef>> {
        self.account(account).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            field_columns!(),
            " FROM field_definitions WHERE account_id = $1 ORDER BY id"
        ))
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::<FieldDef, _>).collect()
    }

    async fn field(&self, id: Id) -> StoreResult<FieldDef> {
        let row = sqlx::query(concat!(
            "SELECT ",
            field_columns!(),
            " FROM field_definitions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("field", id))?;
        decode::<FieldDef, _>(&row)
    }

    async fn remove_field(&self, id: Id) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        // Locks the definition first: a value being set for it at this moment (its
        // foreign-key check holds FOR KEY SHARE on the definition) is waited for and
        // then deleted with the rest, and one set afterwards waits for this commit and
        // fails as it would for a field that never was. Without the lock, a value
        // inserted between the two DELETEs would fail the definition's.
        let found: Option<Id> =
            sqlx::query_scalar("SELECT id FROM field_definitions WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Err(DomainError::not_found("field", id));
        }
        sqlx::query("DELETE FROM field_values WHERE field_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM field_definitions WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_field_value(
        &self,
        chat: Id,
        field: Id,
        value: &serde_json::Value,
    ) -> StoreResult<()> {
        // One statement either way; the upsert is safe against a concurrent one.
        if value.is_null() {
            sqlx::query("DELETE FROM field_values WHERE chat_id = $1 AND field_id = $2")
                .bind(chat)
                .bind(field)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO field_values (chat_id, field_id, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (chat_id, field_id) DO UPDATE SET value = excluded.value",
            )
            .bind(chat)
            .bind(field)
            .bind(value.to_string())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn field_values(&self, chat: Id) -> StoreResult<Vec<(Id, serde_json::Value)>> {
        let rows: Vec<(Id, String)> = sqlx::query_as(
            "SELECT field_id, value FROM field_values WHERE chat_id = $1 ORDER BY field_id",
        )
        .bind(chat)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, v)| {
                serde_json::from_str(&v)
                    .map(|v| (id, v))
                    .map_err(|e| DomainError::Unavailable(format!("corrupt field value: {e}")))
            })
            .collect()
    }
}
