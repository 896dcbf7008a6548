//! Row mappers shared by the concept files.

use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::fields::{FieldDef, FieldType};
use patchbay_jobs::kind::JobKind;
use patchbay_jobs::model::{
    Account, Channel, Chat, DeletionRun, JobRecord, JobState, LedgerEntry, Message, Role, Settings,
    User,
};
use patchbay_jobs::store::*;

macro_rules! account_columns {
    () => {
        "id, name, currency, balance, reset_responsible_on_close, \
     mark_read_on_open, phone_format, balance_notify_days, created_at"
    };
}

pub(crate) fn account_from_row(r: &SqliteRow) -> StoreResult<Account> {
    Ok(Account {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        currency: r.try_get("currency")?,
        balance: r.try_get("balance")?,
        settings: Settings {
            reset_responsible_on_close: r.try_get("reset_responsible_on_close")?,
            mark_read_on_open: r.try_get("mark_read_on_open")?,
            phone_format: r.try_get("phone_format")?,
            balance_notify_days: r.try_get("balance_notify_days")?,
        },
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! user_columns {
    () => {
        "id, account_id, name, email, role, created_at"
    };
}

pub(crate) fn user_from_row(r: &SqliteRow) -> StoreResult<User> {
    let role: String = r.try_get("role")?;
    Ok(User {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        name: r.try_get("name")?,
        email: r.try_get("email")?,
        role: Role::from_str(&role)?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! ledger_columns {
    () => {
        "id, account_id, kind, amount, balance_after, reference, channel_id, day, created_at"
    };
}

pub(crate) fn ledger_from_row(r: &SqliteRow) -> StoreResult<LedgerEntry> {
    Ok(LedgerEntry {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        kind: r.try_get("kind")?,
        amount: r.try_get("amount")?,
        balance_after: r.try_get("balance_after")?,
        reference: r.try_get("reference")?,
        channel: r.try_get("channel_id")?,
        day: r.try_get("day")?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! job_columns {
    () => {
        "id, kind, payload, state, attempts, max_attempts, last_error, \
     idempotency_key, created_at, updated_at, run_at"
    };
}

pub(crate) fn job_from_row(r: &SqliteRow) -> StoreResult<JobRecord> {
    let kind: String = r.try_get("kind")?;
    let state: String = r.try_get("state")?;
    let payload: String = r.try_get("payload")?;
    let attempts: i64 = r.try_get("attempts")?;
    let max_attempts: i64 = r.try_get("max_attempts")?;
    Ok(JobRecord {
        id: r.try_get("id")?,
        kind: JobKind::from_str(&kind)?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| DomainError::Unavailable(format!("corrupt job payload: {e}")))?,
        state: JobState::from_str(&state)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        max_attempts: u32::try_from(max_attempts).unwrap_or(u32::MAX),
        last_error: r.try_get("last_error")?,
        idempotency_key: r.try_get("idempotency_key")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        run_at: r.try_get("run_at")?,
    })
}

macro_rules! channel_columns {
    () => {
        "id, account_id, kind, name, config, status, status_reason, number, display_name, \
         created_at, removed_at"
    };
}

pub(crate) fn channel_from_row(r: &SqliteRow) -> StoreResult<Channel> {
    let config: String = r.try_get("config")?;
    Ok(Channel {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        kind: r.try_get("kind")?,
        name: r.try_get("name")?,
        config: serde_json::from_str(&config)
            .map_err(|e| DomainError::Unavailable(format!("corrupt channel config: {e}")))?,
        status: r.try_get("status")?,
        status_reason: r.try_get("status_reason")?,
        number: r.try_get("number")?,
        display_name: r.try_get("display_name")?,
        created_at: r.try_get("created_at")?,
        removed_at: r.try_get("removed_at")?,
    })
}

macro_rules! field_columns {
    () => {
        "id, account_id, name, type, options, created_at"
    };
}

pub(crate) fn field_from_row(r: &SqliteRow) -> StoreResult<FieldDef> {
    let t: String = r.try_get("type")?;
    let options: Option<String> = r.try_get("options")?;
    Ok(FieldDef {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        name: r.try_get("name")?,
        field_type: FieldType::from_str(&t)?,
        options: options
            .map(|o| serde_json::from_str(&o))
            .transpose()
            .map_err(|e| DomainError::Unavailable(format!("corrupt field options: {e}")))?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! chat_columns {
    () => {
        "c.id, c.account_id, c.channel_id, c.contact_id, c.external_chat_id, c.status, \
         c.responsible_user_id, c.unread, c.last_message_at, c.created_at"
    };
}

pub(crate) fn chat_from_row(r: &SqliteRow) -> StoreResult<Chat> {
    Ok(Chat {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        channel: r.try_get("channel_id")?,
        contact: r.try_get("contact_id")?,
        external_chat_id: r.try_get("external_chat_id")?,
        status: r.try_get("status")?,
        responsible: r.try_get("responsible_user_id")?,
        unread: r.try_get("unread")?,
        last_message_at: r.try_get("last_message_at")?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! message_columns {
    () => {
        "id, chat_id, channel_id, direction, external_message_id, author_user_id, text, \
         attachments, status, status_reason, sent_at, created_at"
    };
}

pub(crate) fn message_from_row(r: &SqliteRow) -> StoreResult<Message> {
    let attachments: String = r.try_get("attachments")?;
    Ok(Message {
        id: r.try_get("id")?,
        chat: r.try_get("chat_id")?,
        channel: r.try_get("channel_id")?,
        direction: r.try_get("direction")?,
        external_message_id: r.try_get("external_message_id")?,
        author: r.try_get("author_user_id")?,
        text: r.try_get("text")?,
        attachments: serde_json::from_str(&attachments).unwrap_or(serde_json::Value::Null),
        status: r.try_get("status")?,
        status_reason: r.try_get("status_reason")?,
        sent_at: r.try_get("sent_at")?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! run_columns {
    () => {
        "id, account_id, cutoff, epoch, state, deleted_messages, deleted_chats, \
         deleted_contacts, started_at, finished_at"
    };
}

pub(crate) fn run_from_row(r: &SqliteRow) -> StoreResult<DeletionRun> {
    Ok(DeletionRun {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        cutoff: r.try_get("cutoff")?,
        epoch: r.try_get("epoch")?,
        state: r.try_get("state")?,
        deleted_messages: r.try_get("deleted_messages")?,
        deleted_chats: r.try_get("deleted_chats")?,
        deleted_contacts: r.try_get("deleted_contacts")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}
