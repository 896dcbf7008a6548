//! Runs one job's effect. Called by the daemon's workers, possibly more than once per
//! job (retries, redelivery after a crash, two daemons), so every handler is
//! idempotent: it relies on the store's UNIQUE constraints and on state checks, never
//! on having run only once. What a handler needs from outside the store (a connector,
//! the queue) comes through `Effects`, which the daemon implements.

use async_trait::async_trait;
use serde_json::{Value, json};

use crate::error::{DomainError, JobError};
use crate::kind::{JobKind, Payload};
use crate::model::{Channel, Id};
use crate::phone;
use crate::store::Store;

#[async_trait]
pub trait Effects: Send + Sync {
    /// Hands an outbound message to its channel's running connector; returns the
    /// messenger's id for it.
    async fn deliver(&self, channel: &Channel, outbound: &Value) -> Result<String, JobError>;
}

pub async fn run(
    store: &dyn Store,
    effects: &dyn Effects,
    payload: &Payload,
) -> Result<(), JobError> {
    match payload {
        Payload::Topup(t) => {
            store.topup(t.account, t.amount, &t.reference).await?;
            Ok(())
        }
        Payload::InboundMessage(m) => {
            let phone = m
                .sender
                .phone
                .as_deref()
                .and_then(phone::normalize_reported);
            if phone.is_none() && m.sender.username.is_none() {
                return Err(JobError::Permanent(format!(
                    "sender phone {:?} is not a phone number and there is no username",
                    m.sender.phone
                )));
            }
            let out = store.store_inbound(m, phone.as_deref()).await?;
            if out.duplicate {
                tracing::debug!(message = out.message, "inbound message was stored before");
            }
            Ok(())
        }
        Payload::ChatClose(c) => {
            let chat = store.chat(c.chat).await?;
            let account = store.account(chat.account).await?;
            store
                .close_chat(chat.id, account.settings.reset_responsible_on_close)
                .await?;
            Ok(())
        }
        Payload::SendMessage(s) => send_message(store, effects, s.message).await,
        Payload::BillingRun(_) => not_built(JobKind::BillingRun),
        Payload::ChargeAccount(_) => not_built(JobKind::ChargeAccount),
        Payload::BalanceCheck(_) => not_built(JobKind::BalanceCheck),
        Payload::DataDeletion(_) => not_built(JobKind::DataDeletion),
    }
}

async fn send_message(store: &dyn Store, effects: &dyn Effects, id: Id) -> Result<(), JobError> {
    let message = store.message(id).await?;
    if message.direction != "out" {
        return Err(JobError::Permanent(format!(
            "message {id} is not an outbound message"
        )));
    }
    if message.status != "queued" && message.status != "failed" {
        // Sent before: a redelivered job must not send it twice.
        return Ok(());
    }
    let chat = store.chat(message.chat).await.map_err(|e| match e {
        DomainError::NotFound(_) => {
            JobError::Permanent(format!("chat of message {id} was deleted"))
        }
        other => other.into(),
    })?;
    let channel = store.channel(message.channel).await?;
    let contact = store.contact(chat.contact).await?;
    let outbound = json!({
        "type": "send",
        "message": message.id,
        "external_chat_id": chat.external_chat_id,
        "to": { "phone": contact.phone, "username": contact.username },
        "text": message.text,
        "attachments": message.attachments,
    });
    match effects.deliver(&channel, &outbound).await {
        Ok(external_id) => {
            store
                .set_message_status(id, "sent", None, Some(&external_id))
                .await?;
            Ok(())
        }
        Err(JobError::Permanent(reason)) => {
            store
                .set_message_status(id, "failed", Some(&reason), None)
                .await?;
            Err(JobError::Permanent(reason))
        }
        Err(e) => Err(e),
    }
}

/// Kinds whose handlers later work fills in fail permanently and visibly (`dead`, with
/// this reason) rather than pretending to succeed.
fn not_built(kind: JobKind) -> Result<(), JobError> {
    Err(JobError::Permanent(format!(
        "the {kind} handler is not implemented in this version of patchbayd"
    )))
}
