//! `status`: what an operator checks first — version, uptime, backends, channels by
//! status and the queue by job kind.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::NoParams;
use crate::app::App;
use crate::control::rpc::RpcError;

pub async fn status(app: &App, _: NoParams) -> Result<Value, RpcError> {
    let channels: BTreeMap<String, i64> = app.store.channel_counts().await?.into_iter().collect();
    let mut jobs: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (kind, state, n) in app.store.journal_counts().await? {
        jobs.entry(kind.to_string())
            .or_default()
            .insert(state.to_string(), n);
    }
    let queue_depth = app.queue_depths().await;
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_secs": app.started.elapsed().as_secs(),
        "backends": {
            "queue": app.settings.raw.queue.backend,
            "store": "sqlite",
            "mail": app.settings.raw.mail.transport,
        },
        "plugins": app.plugins.registry().kinds(),
        "channels": channels,
        "queue_depth": queue_depth,
        "jobs": jobs,
    }))
}
