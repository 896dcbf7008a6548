//! `status`: what an operator checks first — version, uptime, backends, channels by
//! status, the queue by job kind, and what is down (store, queue, a worker not
//! running). It answers while the store or the queue is down: their parts are null and
//! `health` says why.

use std::collections::BTreeMap;

use patchbay_jobs::JobKind;
use serde_json::{Value, json};

use super::NoParams;
use crate::app::App;
use crate::control::rpc::RpcError;
use crate::health::{self, PART_TIMEOUT};

pub async fn status(app: &App, _: NoParams) -> Result<Value, RpcError> {
    let (probe, counts, nodes) = tokio::join!(
        health::probe(app),
        tokio::time::timeout(PART_TIMEOUT, app.store.journal_counts()),
        tokio::time::timeout(PART_TIMEOUT, crate::cluster::view::nodes(app))
    );
    let nodes = match nodes {
        Ok(Ok(nodes)) => json!(nodes),
        _ => Value::Null,
    };
    let jobs = match counts {
        Ok(Ok(counts)) => {
            let mut jobs: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
            for (kind, state, n) in counts {
                jobs.entry(kind.to_string())
                    .or_default()
                    .insert(state.to_string(), n);
            }
            json!(jobs)
        }
        _ => Value::Null,
    };
    let channels = match &probe.channels {
        Ok(c) => json!(c.iter().cloned().collect::<BTreeMap<String, i64>>()),
        Err(_) => Value::Null,
    };
    // A queue that does not answer shows every kind as null.
    let queue_depth: BTreeMap<&str, Value> = JobKind::ALL
        .iter()
        .map(|k| {
            let depth = probe.queue.as_ref().ok().and_then(|q| q.get(k.as_str()));
            (k.as_str(), depth.map_or(Value::Null, |n| json!(n)))
        })
        .collect();
    let down = probe.down();
    let mut running = app.plugins.running();
    running.sort_unstable();
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": app.settings.node,
        "node_id": app.leases.node_id,
        "nodes": nodes,
        // What runs in this process, from the supervisor itself (not the store).
        "running_channels": running,
        "pid": std::process::id(),
        "uptime_secs": app.started.elapsed().as_secs(),
        "backends": {
            "queue": app.settings.raw.queue.backend,
            "store": app.settings.store.kind(),
            "mail": app.settings.raw.mail.transport,
        },
        "health": {
            "ok": down.is_empty(),
            "down": down,
            "store": probe.channels.as_ref().err(),
            "queue": probe.queue.as_ref().err(),
            "workers": probe.workers,
        },
        "http": app.http_addr.map(|a| a.to_string()),
        "plugins": app.plugins.registry().kinds(),
        "channels": channels,
        "queue_depth": queue_depth,
        "jobs": jobs,
    }))
}

/// `node.list`: the live nodes, their channel counts and last heartbeats.
pub async fn nodes(app: &App, _: NoParams) -> Result<Value, RpcError> {
    Ok(json!(crate::cluster::view::nodes(app).await?))
}
