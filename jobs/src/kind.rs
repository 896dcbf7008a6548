//! The job kinds of SPEC §4, their typed payloads, and payload validation.
//!
//! Everything that enters the queue passes through `JobKind::parse_payload` first, so a
//! handler never sees a payload it has to second-guess, and `job.enqueue` can refuse bad
//! input before anything is written.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::error::DomainError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    InboundMessage,
    SendMessage,
    ChatClose,
    BillingRun,
    ChargeAccount,
    BalanceCheck,
    DataDeletion,
    /// A ledger credit with a caller-chosen reference (bulk imports from a payment
    /// provider); applied once per (account, reference).
    Topup,
}

impl JobKind {
    pub const ALL: [JobKind; 8] = [
        JobKind::InboundMessage,
        JobKind::SendMessage,
        JobKind::ChatClose,
        JobKind::BillingRun,
        JobKind::ChargeAccount,
        JobKind::BalanceCheck,
        JobKind::DataDeletion,
        JobKind::Topup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::InboundMessage => "inbound_message",
            JobKind::SendMessage => "send_message",
            JobKind::ChatClose => "chat_close",
            JobKind::BillingRun => "billing_run",
            JobKind::ChargeAccount => "charge_account",
            JobKind::BalanceCheck => "balance_check",
            JobKind::DataDeletion => "data_deletion",
            JobKind::Topup => "topup",
        }
    }

    /// Attempts before a job goes `dead`, unless configured otherwise.
    pub fn default_max_attempts(self) -> u32 {
        match self {
            // Mail servers can be down for a while; warnings must not be lost.
            JobKind::BalanceCheck => 12,
            JobKind::DataDeletion => 20,
            _ => 8,
        }
    }

    /// Parses and validates a payload for this kind.
    pub fn parse_payload(self, value: &serde_json::Value) -> Result<Payload, DomainError> {
        fn typed<T: for<'de> Deserialize<'de>>(
            kind: JobKind,
            value: &serde_json::Value,
        ) -> Result<T, DomainError> {
            T::deserialize(value).map_err(|e| {
                DomainError::InvalidValue(format!("invalid {} payload: {e}", kind.as_str()))
            })
        }
        let payload = match self {
            JobKind::InboundMessage => Payload::InboundMessage(typed(self, value)?),
            JobKind::SendMessage => Payload::SendMessage(typed(self, value)?),
            JobKind::ChatClose => Payload::ChatClose(typed(self, value)?),
            JobKind::BillingRun => Payload::BillingRun(typed(self, value)?),
            JobKind::ChargeAccount => Payload::ChargeAccount(typed(self, value)?),
            JobKind::BalanceCheck => Payload::BalanceCheck(typed(self, value)?),
            JobKind::DataDeletion => Payload::DataDeletion(typed(self, value)?),
            JobKind::Topup => Payload::Topup(typed(self, value)?),
        };
        payload.validate()?;
        Ok(payload)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for JobKind {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for JobKind {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
                DomainError::InvalidValue(format!(
                    "unknown job kind {s:?}; allowed: {}",
                    names.join(", ")
                ))
            })
    }
}

/// The sender of an inbound message (SPEC §4): the messenger's stable user `id`, a
/// phone, a username, a name; at least one of them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sender {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundMessage {
    pub channel: i64,
    pub external_chat_id: String,
    pub external_message_id: String,
    pub sender: Sender,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub attachments: Vec<serde_json::Value>,
    pub sent_at: DateTime<FixedOffset>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub message: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatClose {
    pub chat: i64,
    pub actor: i64,
    /// When the close was asked for (ms): a client message stored after it means the
    /// chat was reopened since, and a late or repeated run must not close it again.
    /// Absent in jobs queued before the field existed.
    #[serde(default)]
    pub requested_at: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingRun {
    pub date: NaiveDate,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeAccount {
    pub account: i64,
    pub date: NaiveDate,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceCheck {
    pub account: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataDeletion {
    pub run: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topup {
    pub account: i64,
    pub amount: i64,
    pub reference: String,
}

#[derive(Clone, Debug)]
pub enum Payload {
    InboundMessage(InboundMessage),
    SendMessage(SendMessage),
    ChatClose(ChatClose),
    BillingRun(BillingRun),
    ChargeAccount(ChargeAccount),
    BalanceCheck(BalanceCheck),
    DataDeletion(DataDeletion),
    Topup(Topup),
}

/// Longest accepted free text of one message, in bytes: the connectors' bound, so an
/// operator's reply and a client's message have one limit.
pub const MAX_TEXT_BYTES: usize = patchbay_connector_sdk::events::MAX_TEXT_BYTES;
const MAX_ID_BYTES: usize = 256;

impl Payload {
    fn validate(&self) -> Result<(), DomainError> {
        let bad = |m: String| Err(DomainError::InvalidValue(m));
        match self {
            Payload::InboundMessage(m) => {
                for (name, v) in [
                    ("external_chat_id", &m.external_chat_id),
                    ("external_message_id", &m.external_message_id),
                ] {
                    if v.is_empty() || v.len() > MAX_ID_BYTES {
                        return bad(format!("{name} must be 1 to {MAX_ID_BYTES} bytes"));
                    }
                }
                // The bounds connector events meet (the SDK's), so an event the host
                // took always makes a valid job.
                let s = &m.sender;
                patchbay_connector_sdk::events::check_sender(
                    s.id.as_deref(),
                    s.phone.as_deref(),
                    s.username.as_deref(),
                    s.name.as_deref(),
                )
                .or_else(bad)?;
                patchbay_connector_sdk::events::check_inbound_content(&m.text, &m.attachments)
                    .or_else(bad)?;
            }
            // The rules of `account.topup`, which the job's handler calls.
            Payload::Topup(t) => {
                crate::validate::topup(t.amount, &t.reference)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Jobs that must exist at most once per key, whoever enqueues them (two daemons'
    /// cron ticks, an operator's catch-up run). Inbound messages have none on purpose:
    /// their handler is idempotent on its own, and every delivery is worth a journal row.
    pub fn idempotency_key(&self) -> Option<String> {
        match self {
            Payload::BillingRun(b) => Some(format!("billing_run:{}", b.date)),
            Payload::ChargeAccount(c) => Some(charge_account_key(c.account, c.date)),
            // Trimmed as the ledger stores it: " r1" and "r1" are one payment.
            Payload::Topup(t) => Some(format!("topup:{}:{}", t.account, t.reference.trim())),
            // One job per run: data.delete and the start-up check enqueue it again freely.
            Payload::DataDeletion(d) => Some(data_deletion_key(d.run)),
            _ => None,
        }
    }
}

/// The idempotency key of a deletion run's one `data_deletion` job.
pub fn data_deletion_key(run: i64) -> String {
    format!("data_deletion:{run}")
}

/// The idempotency key of an account's `charge_account` job for a day.
pub fn charge_account_key(account: i64, date: NaiveDate) -> String {
    format!("charge_account:{account}:{date}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in JobKind::ALL {
            assert_eq!(k.as_str().parse::<JobKind>().ok(), Some(k));
        }
        let err = "billing".parse::<JobKind>().err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("billing_run"));
    }

    #[test]
    fn payloads_are_validated() {
        assert!(
            JobKind::Topup
                .parse_payload(&json!({"account": 1, "amount": 100, "reference": "r1"}))
                .is_ok()
        );
        for bad in [
            json!({"account": 1, "amount": 0, "reference": "r"}),
            json!({"account": 1, "amount": 10, "reference": ""}),
            json!({"account": 1, "amount": 10, "reference": "  "}),
            json!({"account": 1, "amount": crate::validate::MAX_TOPUP + 1, "reference": "r"}),
            json!({"account": "x", "amount": 10, "reference": "r"}),
            json!({"account": 1, "amount": 10, "reference": "r", "extra": 1}),
        ] {
            assert!(JobKind::Topup.parse_payload(&bad).is_err(), "{bad}");
        }
        let padded = JobKind::Topup
            .parse_payload(&json!({"account": 1, "amount": 100, "reference": " r1 "}))
            .map(|p| p.idempotency_key());
        assert_eq!(padded.ok().flatten().as_deref(), Some("topup:1:r1"));
        assert!(
            JobKind::BillingRun
                .parse_payload(&json!({"date": "2026-02-30"}))
                .is_err()
        );
        let inbound = json!({
            "channel": 1, "external_chat_id": "c", "external_message_id": "m",
            "sender": {"phone": "+79161234567"}, "text": "hi", "attachments": [],
            "sent_at": "2026-11-25T10:00:00Z"
        });
        assert!(JobKind::InboundMessage.parse_payload(&inbound).is_ok());
        // A name alone, or the messenger's id alone, is a sender; nothing is not.
        for sender in [json!({"name": "Ann"}), json!({"id": "43"})] {
            let mut only = inbound.clone();
            only["sender"] = sender;
            assert!(JobKind::InboundMessage.parse_payload(&only).is_ok());
        }
        let mut no_sender = inbound.clone();
        no_sender["sender"] = json!({});
        assert!(JobKind::InboundMessage.parse_payload(&no_sender).is_err());
        let mut long_text = inbound.clone();
        long_text["text"] = json!("x".repeat(MAX_TEXT_BYTES + 1));
        assert!(JobKind::InboundMessage.parse_payload(&long_text).is_err());
        for username in ["", "  "] {
            let mut empty = inbound.clone();
            empty["sender"] = json!({"phone": "+79161234567", "username": username});
            let err = JobKind::InboundMessage
                .parse_payload(&empty)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("sender.username must not be empty"), "{err}");
        }
    }
}
