//! The records the store hands out: accounts, users, ledger entries, journal entries.
//!
//! These serialize to exactly what the control socket returns, so the daemon does not
//! keep a second set of response types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::DomainError;
use crate::kind::JobKind;
use crate::store::rows::JsonText;

pub type Id = i64;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// When a job was created (unix ms): job ids are ULIDs, which carry it. `fallback` for
/// an id that is not one (tests use others).
pub fn job_created_at(id: &str, fallback: i64) -> i64 {
    ulid::Ulid::from_string(id)
        .ok()
        .and_then(|u| i64::try_from(u.timestamp_ms()).ok())
        .unwrap_or(fallback)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Administrator,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Administrator => "administrator",
            Role::Operator => "operator",
        }
    }
}

impl TryFrom<String> for Role {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for Role {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "administrator" => Ok(Role::Administrator),
            "operator" => Ok(Role::Operator),
            other => Err(DomainError::InvalidValue(format!(
                "role {other:?} is not allowed; use administrator or operator"
            ))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Settings {
    pub reset_responsible_on_close: bool,
    pub mark_read_on_open: bool,
    pub phone_format: String,
    pub balance_notify_days: i64,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Account {
    pub id: Id,
    pub name: String,
    pub currency: String,
    pub balance: i64,
    #[sqlx(flatten)]
    pub settings: Settings,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct User {
    pub id: Id,
    #[sqlx(rename = "account_id")]
    pub account: Id,
    pub name: String,
    pub email: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct LedgerEntry {
    pub id: Id,
    #[sqlx(rename = "account_id")]
    pub account: Id,
    pub kind: String,
    pub amount: i64,
    pub balance_after: i64,
    pub reference: Option<String>,
    #[sqlx(rename = "channel_id")]
    pub channel: Option<Id>,
    pub day: Option<String>,
    pub created_at: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Done,
    /// Failed and waiting for its next attempt.
    Failed,
    /// Out of attempts or failed permanently; only `job.retry` brings it back.
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Pending,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
        JobState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for JobState {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for JobState {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                DomainError::InvalidValue(format!(
                    "unknown job state {s:?}; allowed: pending, running, done, failed, dead"
                ))
            })
    }
}

/// Largest payload a dead job keeps, in bytes of JSON: above every valid payload (an
/// inbound message's text and attachments bounds come to ~330 KiB), so a dead job that
/// can be retried keeps its payload whole; a refused event may be up to a mebibyte,
/// and dead jobs stay until someone retries them.
pub const MAX_DEAD_PAYLOAD_BYTES: usize = 512 * 1024;

/// `payload` itself when it is at most `MAX_DEAD_PAYLOAD_BYTES` of JSON and nests at
/// most `json_limits::MAX_JSON_DEPTH`. Else its small top-level fields (the channel,
/// external ids, sender — what tells an operator which message it was, and lets a data
/// deletion run find it), `"truncated": true`, and `"raw"`: the start of its JSON.
pub fn bounded_payload(payload: serde_json::Value) -> serde_json::Value {
    use patchbay_connector_sdk::json_limits::{MAX_JSON_DEPTH, value_depth};
    const SMALL_FIELD_BYTES: usize = 1024;
    let text = payload.to_string();
    if text.len() <= MAX_DEAD_PAYLOAD_BYTES && value_depth(&payload) <= MAX_JSON_DEPTH {
        return payload;
    }
    let mut kept = serde_json::Map::new();
    if let serde_json::Value::Object(fields) = &payload {
        for (k, v) in fields {
            let small = v.to_string().len() <= SMALL_FIELD_BYTES;
            if kept.len() < 16 && small && value_depth(v) < MAX_JSON_DEPTH {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    // At most 16 fields of 1 KiB are kept; the rest of the bound goes to the raw start.
    let mut cut = (MAX_DEAD_PAYLOAD_BYTES - 16 * SMALL_FIELD_BYTES).min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    kept.insert("truncated".into(), true.into());
    kept.insert("raw".into(), text[..cut].into());
    serde_json::Value::Object(kept)
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct JobRecord {
    pub id: String,
    #[sqlx(try_from = "String")]
    pub kind: JobKind,
    #[sqlx(try_from = "JsonText")]
    pub payload: serde_json::Value,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    #[sqlx(try_from = "i64")]
    pub attempts: u32,
    #[sqlx(try_from = "i64")]
    pub max_attempts: u32,
    pub last_error: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub run_at: i64,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Channel {
    pub id: Id,
    #[sqlx(rename = "account_id")]
    pub account: Id,
    pub kind: String,
    pub name: String,
    #[sqlx(try_from = "JsonText")]
    pub config: serde_json::Value,
    pub status: String,
    pub status_reason: Option<String>,
    /// The messenger's number or handle, once connected.
    pub number: Option<String>,
    pub display_name: Option<String>,
    pub created_at: i64,
    pub removed_at: Option<i64>,
}

pub const CHANNEL_STATUSES: [&str; 6] = [
    "connecting",
    "connected",
    "disconnected",
    "error",
    "suspended",
    "removed",
];

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Contact {
    pub id: Id,
    pub phone: Option<String>,
    pub username: Option<String>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub url: Option<String>,
    pub notes: Option<String>,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Chat {
    pub id: Id,
    #[sqlx(rename = "account_id")]
    pub account: Id,
    #[sqlx(rename = "channel_id")]
    pub channel: Id,
    #[sqlx(rename = "contact_id")]
    pub contact: Id,
    pub external_chat_id: String,
    pub status: String,
    #[sqlx(rename = "responsible_user_id")]
    pub responsible: Option<Id>,
    pub unread: i64,
    pub last_message_at: Option<i64>,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct Message {
    pub id: Id,
    #[sqlx(rename = "chat_id")]
    pub chat: Id,
    #[sqlx(rename = "channel_id")]
    pub channel: Id,
    pub direction: String,
    pub external_message_id: Option<String>,
    #[sqlx(rename = "author_user_id")]
    pub author: Option<Id>,
    pub text: String,
    #[sqlx(try_from = "JsonText")]
    pub attachments: serde_json::Value,
    pub status: String,
    pub status_reason: Option<String>,
    pub sent_at: i64,
    pub created_at: i64,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct DeletionRun {
    pub id: Id,
    #[sqlx(rename = "account_id")]
    pub account: Id,
    /// Unix ms: everything created before it is deleted.
    pub cutoff: i64,
    #[serde(skip)]
    pub epoch: i64,
    pub state: String,
    pub deleted_messages: i64,
    pub deleted_chats: i64,
    pub deleted_contacts: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}
