//! What connector events become: `status` updates the channel, `inbound` becomes an
//! `inbound_message` job, `receipt` updates the outbound message's status.
//!
//! Every event is `settle`d once handled (an inbound one only after its job is
//! queued), which is what a connector's `flush` waits for before it
//! acknowledges messages to its messenger. An event dropped unsettled counts as lost:
//! the connector's flushes fail and the messenger delivers it again.
//!
//! No inbound event is settled without a record of it (every path by which one could
//! be lost is closed here): one that cannot become a stored message — outside the SDK's
//! bounds, nested too deep, a wrong shape under `"type":"inbound"`, a payload the job
//! refuses — is journalled as a `dead` `inbound_message` job with the reason and a
//! bounded payload (`App::record_dead`), visible in `job.list` and retryable; if even
//! that write fails the event stays unsettled. A batch the queue refuses stays
//! unsettled. Only bytes that are no JSON object of type `inbound` are dropped on
//! purpose (nothing to store), and stale status events of replaced instances.

use std::collections::HashMap;
use std::sync::Arc;

use patchbay_connector_sdk::Event;
use patchbay_connector_sdk::host::RawEvent;
use patchbay_connector_sdk::json_limits::{MAX_JSON_DEPTH, json_depth};
use patchbay_jobs::{DomainError, JobKind};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::app::App;
use crate::metrics;

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
    let mut kinds = Kinds::default();
    while let Some(first) = events.recv().await {
        let mut next = Some(first);
        while let Some(raw) = next.take() {
            let channel = raw.tag;
            if let Some((kind, outcome)) = handle(&app, raw, &mut buf).await {
                metrics::connector_events(&kinds.of(&app, channel), kind, outcome, 1);
            }
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
    let mut kinds = Kinds::default();
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
            Ok(_) => {
                for (kind, n) in kinds.count(&app, &raws) {
                    metrics::inbound_queued(&kind, n);
                    metrics::connector_events(&kind, "inbound", "accepted", n);
                }
                raws.into_iter().for_each(RawEvent::settle)
            }
            // Dropped unsettled: the connectors' flushes fail, they acknowledge nothing,
            // and the supervisor replaces them so the messages come again.
            Err(e) => {
                tracing::warn!(events = n, error = %e, "dropping inbound events the queue refused");
                for (kind, n) in kinds.count(&app, &raws) {
                    metrics::connector_events(&kind, "inbound", "failed", n);
                }
                drop(raws);
            }
        }
    }
}

/// Handles one event; returns its type and outcome for
/// `patchbay_connector_events_total` (accepted; refused: kept as a dead job; dropped;
/// stale: of a replaced instance; failed: left unsettled for the messenger to send
/// again), or `None` for an inbound event gathered into the batch (counted when its
/// batch is queued).
async fn handle(
    app: &App,
    raw: RawEvent,
    inbound: &mut Batch,
) -> Option<(&'static str, &'static str)> {
    let channel = raw.tag;
    let event = match raw.parse() {
        Ok(e) => e,
        Err(e) => {
            return Some(match refused_inbound(channel, &raw.json) {
                Some(payload) => {
                    dead_letter(app, raw, payload, &e.to_string()).await;
                    ("inbound", "refused")
                }
                None => {
                    tracing::warn!(channel, "dropping a malformed connector event: {e}");
                    // Dropped on purpose, not lost: there is nothing to store.
                    raw.settle();
                    ("malformed", "dropped")
                }
            });
        }
    };
    match event {
        Event::Status(s) => {
            if !app.plugins.is_current(channel, raw.instance) {
                raw.settle();
                return Some(("status", "stale"));
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
            // The supervisor learns of an `error` (and of recovering) from here, not
            // from polling the connector.
            app.plugins
                .status_reported(channel, raw.instance, s.state, s.reason.as_deref());
            raw.settle();
            Some(("status", "accepted"))
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
                Ok(_) => {
                    inbound.push((payload, raw));
                    None
                }
                Err(e) => {
                    dead_letter(app, raw, payload, &e.to_string()).await;
                    Some(("inbound", "refused"))
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
                        // Unsettled: the connector keeps it unacknowledged, and the
                        // messenger reports it again.
                        tracing::warn!(channel, message = msg.id, error = %e, "cannot record a receipt");
                        drop(raw);
                        return Some(("receipt", "failed"));
                    }
                    raw.settle();
                    return Some(("receipt", "accepted"));
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
            Some(("receipt", "dropped"))
        }
    }
}

/// Each channel's connector kind, for the metrics' `connector` label. Cached per
/// consumer, since a channel's kind never changes; bounded by the channels seen.
#[derive(Default)]
struct Kinds(HashMap<i64, Arc<str>>);

impl Kinds {
    fn of(&mut self, app: &App, channel: i64) -> Arc<str> {
        if let Some(kind) = self.0.get(&channel) {
            return kind.clone();
        }
        match app.plugins.kind_of(channel) {
            Some(kind) => {
                self.0.insert(channel, kind.clone());
                kind
            }
            // Stopped meanwhile: not cached, its kind may be found later.
            None => Arc::from("unknown"),
        }
    }

    /// Events per connector kind.
    fn count(&mut self, app: &App, raws: &[RawEvent]) -> HashMap<Arc<str>, u64> {
        let mut per_kind = HashMap::new();
        for raw in raws {
            *per_kind.entry(self.of(app, raw.tag)).or_default() += 1;
        }
        per_kind
    }
}

/// The payload a dead job keeps for event bytes that did not parse as an event, if
/// they claim to be an inbound message (a JSON object with `"type":"inbound"`): the
/// object as a job payload (its `type` replaced by the channel) when it nests within
/// bounds, else its text. `None` for anything else: no message to keep.
fn refused_inbound(channel: i64, bytes: &[u8]) -> Option<Value> {
    /// Reads only `type`; serde skips the rest without recursing, at any depth.
    #[derive(serde::Deserialize)]
    struct Tagged {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let tagged: Tagged = serde_json::from_slice(bytes).ok()?;
    if tagged.kind.as_deref() != Some("inbound") {
        return None;
    }
    let parsed = (json_depth(bytes) <= MAX_JSON_DEPTH)
        .then(|| serde_json::from_slice::<serde_json::Map<String, Value>>(bytes).ok())
        .flatten();
    Some(match parsed {
        Some(mut event) => {
            event.remove("type");
            event.insert("channel".into(), channel.into());
            Value::Object(event)
        }
        None => json!({
            "channel": channel,
            "raw_event": String::from_utf8_lossy(bytes),
        }),
    })
}

/// Journals an inbound event the daemon cannot store as a dead job, then settles it:
/// the connector may acknowledge it, and an operator sees it in `job list --state
/// dead`. If the journal refuses, the event stays unsettled, so the connector does not
/// acknowledge it and the messenger delivers it again.
async fn dead_letter(app: &App, raw: RawEvent, payload: Value, reason: &str) {
    let channel = raw.tag;
    match app
        .record_dead(JobKind::InboundMessage, payload, reason)
        .await
    {
        Ok(job) => {
            tracing::warn!(
                channel,
                job,
                reason,
                "an inbound event the daemon cannot store is kept as a dead job"
            );
            raw.settle();
        }
        Err(e) => {
            tracing::warn!(channel, reason, error = %e, "cannot record a refused inbound event; its connector will deliver it again");
            drop(raw);
        }
    }
}
