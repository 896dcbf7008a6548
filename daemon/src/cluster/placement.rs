//! Where a `message.send` runs: on the node that runs its channel. Any node's worker
//! may take the job from the shared queue; one that does not run the channel hands the
//! job back to the queue (same attempt, after a short delay) while another live node
//! holds the channel's lease, so sends find their owner without spending attempts.
//! With no live owner the job runs here and fails the usual way (retry with backoff).

use std::time::Duration;

use patchbay_jobs::kind::{JobKind, Payload};

use crate::app::App;
use crate::queue::Envelope;

/// The hand-back delay: short, spread so that the nodes do not pass a job in lockstep.
fn delay() -> Duration {
    Duration::from_millis(50 + u64::from(ulid::Ulid::new().random() as u16 % 200))
}

/// `true` when the job went back to the queue for the node that runs its channel.
pub async fn handed_back(app: &App, kind: JobKind, env: &Envelope) -> bool {
    if !app.leases.shared || kind != JobKind::SendMessage {
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
        _ => None,
    };
    if owner.is_none() || owner.as_deref() == Some(app.leases.node_id.as_str()) {
        return false;
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
