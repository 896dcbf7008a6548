//! The channel's route on the SDK's shared HTTP listener (`runtime::http`): `POST
//! <path>` on `listen`. Channels with the same listen address share one listener,
//! routed by path (one channel per address and path); the SDK bounds connections
//! (`max_connections`, then 503), header and body time (408) and body size (413, before
//! and while reading), answers other methods 405 and unknown paths 404, and frees the
//! port when the last channel on it leaves.

use std::sync::Arc;

use patchbay_connector_sdk::Level;
use patchbay_connector_sdk::runtime::http::{
    self, ListenError, ListenOptions, Registration, Route,
};
use patchbay_connector_sdk::runtime::hyper::Method;

use crate::hook::Hook;
use crate::inbound;

/// Registers `hook`'s route, binding its address if no channel of this plugin serves it
/// yet. Call from the host's thread (`start`); drop the registration from it too.
pub fn attach(hook: Arc<Hook>) -> Result<Registration, ListenError> {
    let c = &hook.config;
    let serving = hook.clone();
    let handler = http::handler(move |req| {
        let hook = serving.clone();
        async move { inbound::handle(&hook, req).await }
    });
    let refusing = hook.clone();
    let route = Route {
        path: c.path.clone(),
        id: None,
        methods: vec![Method::POST],
        max_body_bytes: c.max_body_bytes,
        handler,
        // 405, 408, 413 and unreadable bodies, answered by the listener itself.
        on_refused: Some(Arc::new(move |status, why| {
            refusing.count("rejected");
            refusing.host().log(
                Level::Debug,
                &format!("webhook: refused a request with {status}: {why}"),
            );
        })),
    };
    let options = ListenOptions {
        max_connections: c.max_connections,
        ..ListenOptions::default()
    };
    http::register(&c.listen, route, None, &options)
}
