//! Two loops decide which connectors run on this node.
//!
//! `run`, the reconcile loop: what should run (the runnable channels whose lease this
//! node holds; on SQLite, every runnable channel) against what does run (the
//! supervisor's instances). Control methods, billing and resumes only change the store
//! and wake it, on whichever daemon they arrive. On PostgreSQL a round also gives up
//! leases beyond this node's share (a few per round, stopping each connector before its
//! lease is released, so no channel ever runs twice) and takes unowned or expired ones
//! up to it.
//!
//! `renew` (PostgreSQL only): heartbeats the node and renews its leases in one
//! statement every third of the TTL, on a task of its own so that no slow connector stop
//! delays a renewal; should renewals stop answering, it stops every connector a third of
//! the TTL before the leases can end. At shutdown it keeps renewing while the workers
//! drain and the connectors stop, and only then hands the leases back (`leave`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use patchbay_jobs::DomainError;
use patchbay_jobs::model::{Channel, Id};
use tokio_util::sync::CancellationToken;

use super::balance;
use crate::app::App;

/// Rounds on PostgreSQL: often enough that a released channel is taken within seconds.
const ROUND: Duration = Duration::from_secs(2);
/// Rounds on SQLite, where only this daemon changes the channels and every change
/// wakes the loop: the round is a backstop, and at 10,000 channels its read of them
/// all is a visible share of an idle daemon's CPU (a worker-only node's round is one
/// UPDATE instead).
const SOLO_ROUND: Duration = Duration::from_secs(60);
/// The first retry after a round failed.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Dead nodes' rows are kept this long, for `node list`'s history.
const DEAD_NODE_KEPT_MS: i64 = 3_600_000;
/// What a channel nobody runs says (`Cluster::disconnect_unowned`).
const UNOWNED: &str = "no node runs it now (its node stopped or lost its lease); \
                       another node takes it within the lease TTL";

/// What a channel says while the one daemon of its SQLite store is not running.
const STOPPED: &str = "patchbayd is not running; the channel connects when it starts";

/// What a channel says while the one daemon of its SQLite store runs no connector.
const WORKER_ONLY: &str = "patchbayd runs no connector (node.run_channels = false); \
                           the channel connects once it runs with run_channels = true";

/// The reconcile loop, until `stop`.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let every = if app.leases.shared { ROUND } else { SOLO_ROUND };
    if !app.leases.runs_channels {
        if app.leases.shared {
            tracing::info!("node.run_channels = false: this node runs jobs, no connector");
        } else {
            tracing::warn!(
                "node.run_channels = false alone on a SQLite store: no channel runs \
                 until this daemon runs again with run_channels = true"
            );
        }
    }
    if !app.leases.shared {
        // A daemon killed before its `leave` left its channels `connected`: that was a
        // previous process, and this one has not started them yet.
        if let Err(e) = app.store.disconnect_unowned(STOPPED).await {
            tracing::warn!(error = %e, "cannot mark the channels disconnected");
        }
    }
    // After a failed round (the store unreachable) the next comes sooner: 1 s,
    // doubling up to the usual interval.
    let mut retry = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = round(&app) => match r {
                Ok(()) => retry = None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reconcile the channels with the store");
                    retry = Some(retry.map_or(RETRY_FIRST, |d: Duration| (d * 2).min(every)));
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry.unwrap_or(every)) => {}
            () = app.leases.woken() => {}
        }
    }
}

async fn round(app: &App) -> Result<(), DomainError> {
    if !app.leases.runs_channels {
        // A worker-only node holds nothing and takes nothing: no read of the channels
        // (on PostgreSQL with 300,000 of them that is most of a second each round).
        if !app.leases.shared {
            // Nothing runs here nor anywhere else: no channel added or resumed since
            // may stay `connecting` (one UPDATE, changing rows only when there are).
            app.store.disconnect_unowned(WORKER_ONLY).await?;
        }
        return Ok(());
    }
    let runnable = app.store.runnable_channels().await?;
    if app.leases.shared {
        rebalance(app, &runnable).await?;
    }
    converge(app, runnable).await;
    Ok(())
}

/// The renewal loop (PostgreSQL), until `stop`: the daemon cancels it only once its
/// connectors stopped, then calls `leave`.
pub async fn renew(app: Arc<App>, stop: CancellationToken) {
    let leases = app.leases.clone();
    if !leases.shared {
        return;
    }
    let ttl_ms = i64::try_from(leases.ttl.as_millis()).unwrap_or(i64::MAX);
    let mut registered = false;
    // A renewal answering later than this comes after the fence anyway; bounding it
    // also drops a connection a network cut left hanging, so the next one starts anew.
    let answer_within = leases.ttl - leases.renew_every();
    loop {
        let mut renewed = false;
        tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(answer_within, renew_once(&app, ttl_ms, !registered)) => match r {
                Ok(Ok(())) => {
                    renewed = true;
                    if !registered {
                        registered = true;
                        // Now in the node list: the reconcile loop may take its share.
                        leases.wake();
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the channel leases; retrying"),
                Err(_) => tracing::warn!(
                    within = ?answer_within,
                    "the store did not answer the lease renewal in time; retrying"
                ),
            },
            () = leases.fence_due() => self_fence(&app).await,
        }
        if renewed {
            // Still racing the fence: a store that hangs here must not hold it off.
            tokio::select! {
                () = stop.cancelled() => return,
                r = tokio::time::timeout(answer_within, housekeeping(&app)) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "lease housekeeping failed"),
                    Err(_) => tracing::debug!("lease housekeeping did not finish in time"),
                },
                () = leases.fence_due() => self_fence(&app).await,
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(leases.renew_every()) => {}
            () = leases.fence_due() => self_fence(&app).await,
        }
    }
}

async fn renew_once(app: &App, ttl_ms: i64, first: bool) -> Result<(), DomainError> {
    let leases = &app.leases;
    let _ops = leases.ops.lock().await;
    let sent = Instant::now();
    app.store.node_heartbeat(&leases.info(), ttl_ms).await?;
    if first {
        reap_predecessors(app).await?;
    }
    let renewed = app.store.renew_leases(&leases.node_id, ttl_ms).await?;
    leases.renewed(sent, &renewed);
    Ok(())
}

/// Housekeeping any node may do after a renewal, idempotent: at most a write when
/// there is work.
async fn housekeeping(app: &App) -> Result<(), DomainError> {
    let disconnected = app.store.disconnect_unowned(UNOWNED).await?;
    if disconnected > 0 {
        tracing::info!(
            channels = disconnected,
            "channels no node runs now marked disconnected"
        );
    }
    if let Err(e) = app.store.purge_nodes(DEAD_NODE_KEPT_MS).await {
        tracing::debug!(error = %e, "cannot purge dead nodes");
    }
    Ok(())
}

/// No renewal answered in time: this node may no longer hold its leases, so its
/// connectors stop now (all at once), before another node can take the channels.
async fn self_fence(app: &App) {
    let held = app.leases.held();
    tracing::error!(
        channels = held.len(),
        ttl = ?app.leases.ttl,
        "cannot renew the channel leases: stopping every connector before the leases run out"
    );
    let running = {
        let _deciding = app
            .leases
            .deciding
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        app.leases.forget_all();
        app.plugins.running()
    };
    stop_each(app, &running).await;
}

async fn stop_each(app: &App, channels: &[Id]) {
    join_all(channels.iter().map(|&id| app.plugins.stop(id))).await;
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
async fn rebalance(app: &App, runnable: &[Channel]) -> Result<(), DomainError> {
    let leases = &app.leases;
    let ttl_ms = i64::try_from(leases.ttl.as_millis()).unwrap_or(i64::MAX);
    let runnable_ids: HashSet<Id> = runnable.iter().map(|c| c.id).collect();
    // Held but no longer runnable (removed, suspended): stop, then let go.
    let gone: Vec<Id> = leases
        .held()
        .into_keys()
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
        // Not registered yet (the renewal loop's first heartbeat wakes us): take nothing.
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
            let _ops = leases.ops.lock().await;
            let sent = Instant::now();
            let taken = app
                .store
                .acquire_leases(&leases.node_id, &free, ttl_ms)
                .await?;
            leases.acquired(sent, &taken);
            drop(_ops);
            if !taken.is_empty() {
                tracing::info!(channels = taken.len(), share, "took channel leases");
            }
        }
    }
    Ok(())
}

/// Stops the connectors of `channels` (all at once), then releases their leases: never
/// the other way round, or another node could start one while it still runs here.
async fn release(app: &App, channels: &[Id]) -> Result<(), DomainError> {
    if channels.is_empty() {
        return Ok(());
    }
    app.leases.forget(channels);
    stop_each(app, channels).await;
    let released = {
        let _ops = app.leases.ops.lock().await;
        app.store
            .release_leases(&app.leases.node_id, Some(channels))
            .await
    };
    // Released or not, they are no longer being released: a lease the store still
    // has (the release failed) comes back with the next renewal and runs here again.
    app.leases.released(channels);
    released.map(|_| ())
}

/// Starts what should run here and stops what should not.
async fn converge(app: &App, runnable: Vec<Channel>) {
    let running: HashSet<Id> = app.plugins.running().into_iter().collect();
    let mut wanted = HashSet::new();
    for channel in runnable {
        let _deciding = app
            .leases
            .deciding
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !app.leases.holds(channel.id) {
            continue;
        }
        wanted.insert(channel.id);
        if !running.contains(&channel.id) {
            app.plugins.start(channel);
        }
    }
    let unwanted: Vec<Id> = running.difference(&wanted).copied().collect();
    if !unwanted.is_empty() {
        tracing::info!(
            channels = unwanted.len(),
            "stopping channels that no longer run here"
        );
        stop_each(app, &unwanted).await;
    }
}

/// At shutdown, once the connectors stopped: hands every lease back and leaves, so the
/// other nodes take the channels at their next round instead of after the TTL.
pub async fn leave(app: &App) {
    if !app.leases.shared {
        // Alone on the store: nothing runs its channels until it starts again, and no
        // status may claim otherwise (`disconnect_unowned`: no leases, so all of them).
        if let Err(e) = app.store.disconnect_unowned(STOPPED).await {
            tracing::warn!(error = %e, "cannot mark the channels disconnected");
        }
        return;
    }
    app.leases.forget_all();
    let released = app.store.release_leases(&app.leases.node_id, None).await;
    let left = app.store.node_leave(&app.leases.node_id).await;
    // What nobody else runs now (the last node stopping) says so at once.
    if let Err(e) = app.store.disconnect_unowned(UNOWNED).await {
        tracing::debug!(error = %e, "cannot mark unowned channels disconnected");
    }
    match (released, left) {
        (Ok(n), Ok(())) => tracing::info!(channels = n, "released the channel leases"),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot release the channel leases; they run out by themselves")
        }
    }
}
