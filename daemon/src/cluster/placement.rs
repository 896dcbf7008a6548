//! Where a `message.send` runs: on the node that runs its channel. Any node's worker
//! may take the job from the shared (Redis) queue; one that does not run the channel
//! hands the job back to the queue (same attempt, after a short delay) while another
//! live node holds the channel's lease, so sends find their owner without spending
//! attempts. While nobody holds it (a handover: the old owner died, the new one has not
//! taken it yet) the job is handed back too, for twice the lease TTL after it was
//! queued; after that it runs here and fails the usual way (retry with backoff), so a
//! channel no node will run does not keep a job circling for ever.
//!
//! A queue on SQLite is not shared: a hand-back would come back here. There the job
//! runs here at once (and fails over to its retries if this node does not run it).

use std::time::Duration;

use patchbay_jobs::kind::{JobKind, Payload};
use patchbay_jobs::model::now_ms;

use crate::app::App;
use crate::queue::Envelope;

/// The hand-back delay: short, spread so that the nodes do not pass a job in lockstep.
fn delay() -> Duration {
    Duration::from_millis(50 + u64::from(ulid::Ulid::new().random() as u16 % 200))
}

/// `true` when the job went back to the queue for the node that runs its channel.
pub async fn handed_back(app: &App, kind: JobKind, env: &Envelope) -> bool {
    if !app.leases.shared || kind != JobKind::SendMessage || !app.queue_is_shared() {
        return false;
    }
    let Ok(Payload::SendMessage(send)) = kind.parse_payload(&env.payload) else {
        return false;
    };
    let Ok(message) = app.store.message(send.message).await else {
        return false;
    };
    if app.leases.holds(message.channel) {
        return false;
    }
    let owner = match app.store.channel_lease(message.channel).await {
        Ok(Some(lease)) if lease.live => lease.owner,
        Ok(_) => None,
        Err(_) => return false,
    };
    if owner.as_deref() == Some(app.leases.node_id.as_str()) {
        return false;
    }
    if owner.is_none() {
        // A handover in progress, for a while after the job was queued.
        let queued = ulid::Ulid::from_string(&env.id).map(|u| u.timestamp_ms());
        let young = queued.is_ok_and(|t| {
            let age = u64::try_from(now_ms()).unwrap_or(0).saturating_sub(t);
            age < 2 * app.leases.ttl.as_millis() as u64
        });
        if !young {
            return false;
        }
    }
    match app
        .queue
        .push(&app.queue_name(kind), env, Some(delay()))
        .await
    {
        Ok(()) => {
            tracing::debug!(job = %env.id, channel = message.channel, owner = ?owner,
                "message.send handed back for the node that runs its channel");
            true
        }
        Err(_) => false,
    }
}
