//! The cluster as results show it: the live nodes (`node.list`, `status`) and each
//! channel's owner node and lease epoch (`channel.list`). On a SQLite store the daemon
//! is the one node and owns what it runs, with no lease epoch.

use std::collections::HashMap;

use patchbay_jobs::DomainError;
use patchbay_jobs::model::{Id, now_ms};
use patchbay_jobs::store::NodeRow;
use serde_json::{Value, json};

use crate::app::App;

/// The live nodes by id, this one marked `"this": true`.
pub async fn nodes(app: &App) -> Result<Vec<Value>, DomainError> {
    let l = &app.leases;
    let rows = if l.shared {
        app.store.live_nodes().await?
    } else {
        let now = now_ms();
        vec![NodeRow {
            id: l.node_id.clone(),
            name: l.name.clone(),
            started_at: l.started_at,
            heartbeat_at: now,
            expires_at: now,
            max_channels: l.max_channels.map(|c| c as i64),
            channels: app.plugins.running().len() as i64,
            host: l.host.clone(),
            pid: Some(i64::from(std::process::id())),
        }]
    };
    Ok(rows
        .into_iter()
        .map(|n| {
            let instance = n.id.rsplit_once('/').map_or("", |(_, i)| i).to_owned();
            json!({
                "id": n.id,
                "name": n.name,
                "instance": instance,
                "started_at": n.started_at,
                "heartbeat_at": n.heartbeat_at,
                "expires_at": n.expires_at,
                "channels": n.channels,
                "max_channels": n.max_channels,
                "pid": n.pid,
                "this": n.id == l.node_id,
            })
        })
        .collect())
}

/// Each runnable channel's live owner and lease epoch.
pub async fn owners(app: &App) -> Result<HashMap<Id, (String, Option<i64>)>, DomainError> {
    let l = &app.leases;
    if !l.shared {
        return Ok(app
            .plugins
            .running()
            .into_iter()
            .map(|id| (id, (l.node_id.clone(), None)))
            .collect());
    }
    Ok(app
        .store
        .channel_leases()
        .await?
        .into_iter()
        .filter(|lease| lease.live)
        .filter_map(|lease| Some((lease.channel, (lease.owner?, Some(lease.epoch)))))
        .collect())
}
