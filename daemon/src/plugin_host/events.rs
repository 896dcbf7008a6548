//! What connector events become: `status` updates the channel, `inbound` becomes an
//! `inbound_message` job, `receipt` updates the outbound message's status. Malformed or
//! stale events (from an instance that was replaced) are logged and dropped.
//!
//! Every event is `settle`d once handled (an inbound one only after its job is
//! queued), which is what a connector's `flush` waits for before it
//! acknowledges messages to its messenger. An event dropped unsettled counts as lost.

use std::sync::Arc;

use patchbay_connector_sdk::Event;
use patchbay_connector_sdk::host::RawEvent;
use patchbay_jobs::{DomainError, JobKind};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::app::App;

/// Inbound events queued together: one queue push.
const BATCH: usize = 512;

type Batch = Vec<(Value, RawEvent)>;

/// Inbound jobs waiting in the queue beyond which connectors are slowed down. Enough
/// to keep every inbound worker (512 by default) busy several times over; more only
/// adds latency, memory, and work to each SQLite queue fetch.
const MAX_INBOUND_BACKLOG: u64 = 8_192;

/// Consumes the shared event channel until every sender is gone. Status and receipt
/// events are applied in order here; inbound events are gathered into batches that a
/// writer task beside the loop queues, so a burst from many channels costs one push
/// per batch rather than per message.
pub async fn run(app: Arc<App>, mut events: mpsc::Receiver<RawEvent>) {
    let (batches, pending) = mpsc::channel::<Batch>(4);
    let writer = tokio::spawn(write_batches(app.clone(), pending));
    let mut buf: Batch = Vec::with_capacity(BATCH);
    while let Some(first) = events.recv().await {
        let mut next = Some(first);
        while let Some(raw) = next.take() {
            handle(&app, raw, &mut buf).await;
            if buf.len() < BATCH {
                next = events.try_recv().ok();
            }
        }
        if !buf.is_empty() && batches.send(std::mem::take(&mut buf)).await.is_err() {
            break;
        }
    }
    drop(batches);
    let _ = writer.await;
}

/// Queues inbound batches in arrival order. The raw events (and their
/// slots in each instance's budget) live until their batch is queued.
async fn write_batches(app: Arc<App>, mut pending: mpsc::Receiver<Batch>) {
    let queue = app.queue_name(JobKind::InboundMessage);
    while let Some(batch) = pending.recv().await {
        // Backpressure: while the workers are this far behind, hold the batch. Its raw
        // events keep their slots in each instance's budget, so connectors get BUSY and
        // slow down instead of growing the queue (and Redis' memory) without bound, and
        // the workers get the CPU that enqueueing would take.
        while let Ok(depth) = app.queue.depth(&queue).await {
            if depth <= MAX_INBOUND_BACKLOG {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let n = batch.len();
        let (payloads, raws): (Vec<Value>, Vec<RawEvent>) = batch.into_iter().unzip();
        match app.queue_batched(JobKind::InboundMessage, payloads).await {
            // Queued: durable, so connectors may acknowledge them.
            Ok(_) => raws.into_iter().for_each(RawEvent::settle),
            // Dropped unsettled: the connectors' flushes fail, they acknowledge nothing,
            // and the supervisor replaces them so the messages come again.
            Err(e) => {
                tracing::warn!(events = n, error = %e, "dropping inbound events the queue refused");
                drop(raws);
            }
        }
    }
}

async fn handle(app: &App, raw: RawEvent, inbound: &mut Batch) {
    let channel = raw.tag;
    let event = match raw.parse() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(channel, "dropping a malformed connector event: {e}");
            // Dropped on purpose, not lost: retrying it would not help.
            raw.settle();
            return;
        }
    };
    match event {
        Event::Status(s) => {
            if !app.plugins.is_current(channel, raw.instance) {
                raw.settle();
                return;
            }
            // Number and name first: whoever sees "connected" must see them too.
            if (s.number.is_some() || s.display_name.is_some())
                && let Err(e) = app
                    .store
                    .set_channel_identity(channel, s.number.as_deref(), s.display_name.as_deref())
                    .await
            {
                tracing::warn!(channel, error = %e, "cannot record the channel number");
            }
            if let Err(e) = app
                .store
                .set_channel_status(channel, s.state.as_str(), s.reason.as_deref())
                .await
            {
                tracing::warn!(channel, error = %e, "cannot record the channel status");
            }
            raw.settle();
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
            // Checked one by one, so one bad event cannot sink its batch.
            match JobKind::InboundMessage.parse_payload(&payload) {
                Ok(_) => inbound.push((payload, raw)),
                Err(e) => {
                    tracing::warn!(channel, "dropping an inbound event: {e}");
                    raw.settle();
                }
            }
        }
        Event::Receipt(r) => {
            match app.store.message(r.message).await {
                Ok(msg) if msg.channel == channel && msg.direction == "out" => {
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
                Ok(msg) if msg.channel == channel => tracing::warn!(
                    channel,
                    message = r.message,
                    "dropping a receipt for an inbound message (receipts are for sends)"
                ),
                Ok(msg) => tracing::warn!(
                    channel,
                    message = r.message,
                    message_channel = msg.channel,
                    "dropping a receipt for a message of another channel"
                ),
                Err(DomainError::NotFound(_)) => tracing::warn!(
                    channel,
                    message = r.message,
                    "dropping a receipt for an unknown message"
                ),
                Err(e) => tracing::warn!(
                    channel,
                    message = r.message,
                    error = %e,
                    "cannot read the message of a receipt; dropping the receipt"
                ),
            }
            raw.settle();
        }
    }
}
