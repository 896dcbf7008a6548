//! Rows to domain types, once for every backend: the domain types derive
//! `sqlx::FromRow` (generic over the database), JSON held as TEXT decodes through
//! `JsonText`, and the `*_columns!` macros name the columns each type reads, for the
//! stores' `concat!`ed queries.

use sqlx::Row;

use crate::error::DomainError;
use crate::fields::{FieldDef, FieldType};
use crate::model::Id;
use crate::store::StoreResult;

/// A JSON document stored as TEXT: both schemas keep JSON as text so payloads
/// round-trip byte for byte. Decoded into a `serde_json::Value` by `TryFrom`.
#[derive(Clone, Debug, sqlx::Type)]
#[sqlx(transparent)]
pub struct JsonText(pub String);

impl TryFrom<JsonText> for serde_json::Value {
    type Error = serde_json::Error;
    fn try_from(t: JsonText) -> Result<Self, Self::Error> {
        serde_json::from_str(&t.0)
    }
}

/// Decodes one row into `T`, with the store's error type.
pub fn decode<'r, T, R>(row: &'r R) -> StoreResult<T>
where
    T: sqlx::FromRow<'r, R>,
    R: Row,
{
    T::from_row(row).map_err(|e| DomainError::Unavailable(format!("corrupt row: {e}")))
}

/// `field_definitions` as stored: `options` is a JSON list of strings.
#[derive(sqlx::FromRow)]
struct FieldRow {
    id: Id,
    account_id: Id,
    name: String,
    #[sqlx(rename = "type", try_from = "String")]
    field_type: FieldType,
    options: Option<String>,
    created_at: i64,
}

impl<'r, R: Row> sqlx::FromRow<'r, R> for FieldDef
where
    FieldRow: sqlx::FromRow<'r, R>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        let r = FieldRow::from_row(row)?;
        let options = r
            .options
            .map(|o| serde_json::from_str(&o))
            .transpose()
            .map_err(|e| sqlx::Error::ColumnDecode {
                index: "options".into(),
                source: Box::new(e),
            })?;
        Ok(FieldDef {
            id: r.id,
            account: r.account_id,
            name: r.name,
            field_type: r.field_type,
            options,
            created_at: r.created_at,
        })
    }
}

#[macro_export]
macro_rules! account_columns {
    () => {
        "id, name, currency, balance, reset_responsible_on_close, \
     mark_read_on_open, phone_format, balance_notify_days, created_at"
    };
}

#[macro_export]
macro_rules! user_columns {
    () => {
        "id, account_id, name, email, role, created_at"
    };
}

#[macro_export]
macro_rules! ledger_columns {
    () => {
        "id, account_id, kind, amount, balance_after, reference, channel_id, day, created_at"
    };
}

#[macro_export]
macro_rules! job_columns {
    () => {
        "id, kind, payload, state, attempts, max_attempts, last_error, \
     idempotency_key, created_at, updated_at, run_at"
    };
}

#[macro_export]
macro_rules! channel_columns {
    () => {
        "id, account_id, kind, name, config, status, status_reason, number, display_name, \
         created_at, removed_at"
    };
}

#[macro_export]
macro_rules! field_columns {
    () => {
        "id, account_id, name, type, options, created_at"
    };
}

#[macro_export]
macro_rules! chat_columns {
    () => {
        "c.id, c.account_id, c.channel_id, c.contact_id, c.external_chat_id, c.status, \
         c.responsible_user_id, c.unread, c.last_message_at, c.created_at"
    };
}

#[macro_export]
macro_rules! message_columns {
    () => {
        "id, chat_id, channel_id, direction, external_message_id, author_user_id, text, \
         attachments, status, status_reason, sent_at, created_at"
    };
}

#[macro_export]
macro_rules! run_columns {
    () => {
        "id, account_id, cutoff, epoch, state, deleted_messages, deleted_chats, \
         deleted_contacts, started_at, finished_at"
    };
}
