//! The one loop that decides which connectors run on this node: what should run (the
//! runnable channels whose lease this node holds; on SQLite, every runnable channel)
//! against what does run (the supervisor's instances). Control methods, billing and
//! resumes only change the store and wake it, on whichever daemon they arrive.
//!
//! On PostgreSQL a round also heartbeats the node, renews its leases in one statement
//! every third of the TTL, gives up leases beyond its share (a few per round, stopping
//! the connector before the lease is released, so no channel ever runs twice), and
//! takes unowned or expired ones up to its share. Should renewals stop answering, the
//! node stops its connectors a third of the TTL before its leases can end.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbay_jobs::DomainError;
use patchbay_jobs::model::Id;
use tokio_util::sync::CancellationToken;

use super::balance;
use crate::app::App;

/// Rounds on PostgreSQL: often enough that a released channel is taken within seconds.
const ROUND: Duration = Duration::from_secs(2);
/// Rounds on SQLite, where nothing changes the channels behind this daemon's back but
/// a `patchbayctl` on a copy of the config (a read, no write).
const SOLO_ROUND: Duration = Duration::from_secs(10);
/// Dead nodes' rows are kept this long, for `node list`'s history.
const DEAD_NODE_KEPT_MS: i64 = 3_600_000;

pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let leases = app.leases.clone();
    let mut last_renew: Option<Instant> = None;
    loop {
        let fence_at = leases.fence_at();
        let fenced = async {
            match fence_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            r = round(&app, &mut last_renew) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot reconcile the channels with the store");
                }
            }
            () = fenced => self_fence(&app).await,
        }
        let fence_at = leases.fence_at();
        let fenced = async {
            match fence_at {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        // Never longer than a renewal interval: a round is what renews.
        let every = if leases.shared {
            ROUND.min(leases.renew_every())
        } else {
            SOLO_ROUND
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
            () = leases.woken() => {}
            () = fenced => self_fence(&app).await,
        }
    }
}

/// No renewal answered in time: this node may no longer hold its leases, so its
/// connectors stop now, before another node can take the channels.
async fn self_fence(app: &App) {
    let held = app.leases.held();
    tracing::error!(
        channels = held.len(),
        ttl = ?app.leases.ttl,
        "cannot renew the channel leases: stopping every connector before the leases run out"
    );
    app.leases.forget_all();
    app.plugins.stop_all().await;
}

async fn round(app: &App, last_renew: &mut Option<Instant>) -> Result<(), DomainError> {
    let leases = &app.leases;
    let runnable = app.store.runnable_channels().await?;
    if leases.shared {
        let due = last_renew.is_none_or(|t| t.elapsed() >= leases.renew_every());
        let ttl_ms = i64::try_from(leases.ttl.as_millis()).unwrap_or(i64::MAX);
        if due {
            let sent = Instant::now();
            app.store.node_heartbeat(&leases.info(), ttl_ms).await?;
            if last_renew.is_none() {
                reap_predecessors(app).await?;
            }
            let renewed = app.store.renew_leases(&leases.node_id, ttl_ms).await?;
            leases.renewed(sent, &renewed);
            *last_renew = Some(sent);
            if let Err(e) = app.store.purge_nodes(DEAD_NODE_KEPT_MS).await {
                tracing::debug!(error = %e, "cannot purge dead nodes");
            }
        }
        rebalance(app, &runnable, ttl_ms).await?;
    }
    converge(app, runnable).await;
    Ok(())
}

/// At start: nodes of this host whose process is gone (this daemon's own previous run,
/// killed or crashed) give up their leases now, not after the TTL. Only at start, so
/// failover between running nodes keeps to the one rule every host shares (the TTL).
async fn reap_predecessors(app: &App) -> Result<(), DomainError> {
    for node in app.store.live_nodes().await? {
        if app.leases.is_dead_here(&node) {
            let released = app.store.reap_node(&node.id).await?;
            tracing::info!(node = %node.id, pid = ?node.pid, channels = released,
                "took over the leases of a node of this host whose process is gone");
        }
    }
    Ok(())
}

/// Gives up what is beyond this node's share and takes unowned channels up to it.
async fn rebalance(
    app: &App,
    runnable: &[patchbay_jobs::model::Channel],
    ttl_ms: i64,
) -> Result<(), DomainError> {
    let leases = &app.leases;
    let runnable_ids: HashSet<Id> = runnable.iter().map(|c| c.id).collect();
    let held = leases.held();
    // Held but no longer runnable (removed, suspended): stop, then let go.
    let gone: Vec<Id> = held
        .keys()
        .copied()
        .filter(|id| !runnable_ids.contains(id))
        .collect();
    release(app, &gone).await?;

    let nodes = app.store.live_nodes().await?;
    let caps: Vec<Option<u64>> = nodes
        .iter()
        .map(|n| n.max_channels.and_then(|c| u64::try_from(c).ok()))
        .collect();
    let shares = balance::shares(&caps, runnable.len() as u64);
    let Some(me) = nodes.iter().position(|n| n.id == leases.node_id) else {
        // Not registered yet (the heartbeat is due next round): take nothing.
        return Ok(());
    };
    let share = shares[me] as usize;
    let mut mine: Vec<Id> = leases
        .held()
        .into_keys()
        .filter(|id| runnable_ids.contains(id))
        .collect();
    mine.sort_unstable();
    if mine.len() > share {
        // The newest channels move: a few per round, so a joining node fills up
        // gradually and nobody flaps.
        let excess = (mine.len() - share).min(leases.moves_per_round);
        let shed = mine.split_off(mine.len() - excess);
        tracing::info!(
            channels = shed.len(),
            share,
            "giving channels to other nodes"
        );
        release(app, &shed).await?;
    } else if mine.len() < share {
        let owned: HashSet<Id> = app
            .store
            .channel_leases()
            .await?
            .into_iter()
            .filter(|l| l.live)
            .map(|l| l.channel)
            .collect();
        let free: Vec<Id> = runnable
            .iter()
            .map(|c| c.id)
            .filter(|id| !owned.contains(id))
            .take(share - mine.len())
            .collect();
        if !free.is_empty() {
            let sent = Instant::now();
            let taken = app
                .store
                .acquire_leases(&leases.node_id, &free, ttl_ms)
                .await?;
            if !taken.is_empty() {
                tracing::info!(channels = taken.len(), share, "took channel leases");
            }
            leases.acquired(sent, &taken);
        }
    }
    Ok(())
}

/// Stops the connectors of `channels`, then releases their leases: never the other
/// way round, or another node could start one while it still runs here.
async fn release(app: &App, channels: &[Id]) -> Result<(), DomainError> {
    if channels.is_empty() {
        return Ok(());
    }
    app.leases.forget(channels);
    for &id in channels {
        app.plugins.stop(id).await;
    }
    app.store
        .release_leases(&app.leases.node_id, Some(channels))
        .await?;
    Ok(())
}

/// Starts what should run here and stops what should not.
async fn converge(app: &App, runnable: Vec<patchbay_jobs::model::Channel>) {
    let running: HashSet<Id> = app.plugins.running().into_iter().collect();
    let mut wanted = HashSet::new();
    for channel in runnable {
        if !app.leases.holds(channel.id) {
            continue;
        }
        wanted.insert(channel.id);
        if !running.contains(&channel.id) {
            app.plugins.start(channel);
        }
    }
    for id in running.difference(&wanted) {
        tracing::info!(channel = id, "stopping a channel that no longer runs here");
        app.plugins.stop(*id).await;
    }
}

/// At shutdown, once the connectors stopped: hands every lease back and leaves, so the
/// other nodes take the channels at their next round instead of after the TTL.
pub async fn leave(app: &App) {
    if !app.leases.shared {
        return;
    }
    app.leases.forget_all();
    let released = app.store.release_leases(&app.leases.node_id, None).await;
    let left = app.store.node_leave(&app.leases.node_id).await;
    match (released, left) {
        (Ok(n), Ok(())) => tracing::info!(channels = n, "released the channel leases"),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot release the channel leases; they run out by themselves")
        }
    }
}
