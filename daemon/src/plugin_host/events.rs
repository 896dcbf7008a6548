//! What connector events become: `status` updates the channel, `inbound` becomes an
//! `inbound_message` job, `receipt` updates the outbound message's status. Malformed or
//! stale events (from an instance that was replaced) are logged and dropped.

use std::sync::Arc;

use patchbay_connector_sdk::Event;
use patchbay_connector_sdk::host::RawEvent;
use patchbay_jobs::JobKind;
use serde_json::json;
use tokio::sync::mpsc;

use crate::app::App;

/// Consumes the shared event channel until every sender is gone.
pub async fn run(app: Arc<App>, mut events: mpsc::Receiver<RawEvent>) {
    while let Some(raw) = events.recv().await {
        let channel = raw.tag;
        let event = match raw.parse() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(channel, "dropping a malformed connector event: {e}");
                continue;
            }
        };
        match event {
            Event::Status(s) => {
                if !app.plugins.is_current(channel, raw.instance) {
                    continue;
                }
                let state = s.state.as_str();
                if let Err(e) = app
                    .store
                    .set_channel_status(channel, state, s.reason.as_deref())
                    .await
                {
                    tracing::warn!(channel, error = %e, "cannot record the channel status");
                }
                if (s.number.is_some() || s.display_name.is_some())
                    && let Err(e) = app
                        .store
                        .set_channel_identity(
                            channel,
                            s.number.as_deref(),
                            s.display_name.as_deref(),
                        )
                        .await
                {
                    tracing::warn!(channel, error = %e, "cannot record the channel number");
                }
            }
            Event::Inbound(m) => {
                let payload = json!({
                    "channel": channel,
                    "external_chat_id": m.external_chat_id,
                    "external_message_id": m.external_message_id,
                    "sender": m.sender,
                    "text": m.text,
                    "attachments": m.attachments,
                    "sent_at": m.sent_at.to_rfc3339(),
                });
                // Enqueueing waits on the store and the queue: do it beside the loop so
                // one slow write does not hold up every channel's events. The raw event
                // (and its slot in the instance's budget) lives until it is queued.
                let app = app.clone();
                tokio::spawn(async move {
                    if let Err(e) = app.enqueue(JobKind::InboundMessage, payload).await {
                        tracing::warn!(channel, error = %e, "dropping an inbound event the queue refused");
                    }
                    drop(raw);
                });
            }
            Event::Receipt(r) => match app.store.message(r.message).await {
                Ok(msg) if msg.channel == channel => {
                    let status = match r.status {
                        patchbay_connector_sdk::ReceiptStatus::Delivered => "delivered",
                        patchbay_connector_sdk::ReceiptStatus::Read => "read",
                        patchbay_connector_sdk::ReceiptStatus::Failed => "failed",
                    };
                    if let Err(e) = app
                        .store
                        .set_message_status(
                            msg.id,
                            status,
                            r.reason.as_deref(),
                            r.external_message_id.as_deref(),
                        )
                        .await
                    {
                        tracing::warn!(channel, message = msg.id, error = %e, "cannot record a receipt");
                    }
                }
                _ => tracing::warn!(
                    channel,
                    message = r.message,
                    "dropping a receipt for a message of another channel"
                ),
            },
        }
    }
}
