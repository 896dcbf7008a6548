//! A channel's place on the SDK's shared HTTP listener (`runtime::http`), and the
//! plugin's table of which channels share a listen address and path.
//!
//! One WhatsApp notification may carry changes for several numbers, so a request is
//! not one route's: the SDK listener picks one registered channel's route for it (the
//! router below names the first channel on the path, without reading the body, which
//! is not authenticated yet), and that route's handler serves the request for all the
//! channels on the path (`webhook::handle`): signature, then routing of each change by
//! phone_number_id. The SDK bounds connections, header and body time and body size,
//! and frees the port when the last channel leaves.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use patchbay_connector_sdk::runtime::http::{
    self, HttpRequest, ListenError, ListenOptions, Route, RouteId,
};
use patchbay_connector_sdk::runtime::hyper::Method;

use crate::channel::Channel;

/// Connections one listener serves at once; each is a file descriptor of the daemon's.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a leaving channel lets requests in progress finish.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// The running channels by `"<bound address> <path>"`, in registration order.
static CHANNELS: Mutex<Option<HashMap<String, Vec<Arc<Channel>>>>> = Mutex::new(None);

fn table() -> MutexGuard<'static, Option<HashMap<String, Vec<Arc<Channel>>>>> {
    CHANNELS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The channels sharing the listener and path named by `key`.
pub fn channels(key: &str) -> Vec<Arc<Channel>> {
    table()
        .as_ref()
        .and_then(|m| m.get(key).cloned())
        .unwrap_or_default()
}

/// A channel's registration; `detach` (or drop) takes it off.
pub struct Registration {
    key: String,
    addr: SocketAddr,
    channel: Arc<Channel>,
    route: Option<http::Registration>,
}

impl Registration {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes the channel off the table, then off the listener, which waits for its
    /// requests in progress; the last one frees the port. Call from the host's thread.
    pub fn detach(&mut self) {
        let Some(route) = self.route.take() else {
            return;
        };
        if let Some(map) = table().as_mut()
            && let Some(list) = map.get_mut(&self.key)
        {
            list.retain(|c| !Arc::ptr_eq(c, &self.channel));
            if list.is_empty() {
                map.remove(&self.key);
            }
        }
        drop(route);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Why a channel could not join a listener.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0}")]
    Bind(ListenError),
    #[error(
        "another running channel already serves phone_number_id {0} on this listen address and path"
    )]
    Duplicate(String),
    #[error("{0}")]
    Invalid(ListenError),
}

/// Registers `channel` on the listener of its `listen` address (binding it if no
/// channel serves it yet).
pub fn attach(channel: Arc<Channel>) -> Result<Registration, AttachError> {
    let c = channel.config.clone();
    // Known once registered (port 0 binds a fresh address); until then the request
    // finds no channels and gets 503.
    let key: Arc<OnceLock<String>> = Arc::default();
    let router: RouteId = {
        let key = key.clone();
        Arc::new(move |_req: &HttpRequest| {
            let key = key.get()?;
            channels(key)
                .first()
                .map(|c| c.config.phone_number_id.clone())
        })
    };
    let handler = {
        let key = key.clone();
        http::handler(move |req| {
            let chans = key.get().map(|k| channels(k)).unwrap_or_default();
            async move { crate::webhook::handle(&chans, req).await }
        })
    };
    let counted = channel.clone();
    let route = Route {
        path: c.path.clone(),
        id: Some(c.phone_number_id.clone()),
        methods: vec![Method::GET, Method::POST],
        max_body_bytes: c.max_body_bytes,
        handler,
        on_refused: Some(Arc::new(move |_status, _why| {
            counted.counters.rejected.fetch_add(1, Ordering::Relaxed);
        })),
    };
    let options = ListenOptions {
        max_connections: MAX_CONNECTIONS,
        stop_grace: STOP_GRACE,
        ..ListenOptions::default()
    };
    let registered =
        http::register(&c.listen, route, Some(router), &options).map_err(|e| match e {
            ListenError::Bind { .. } => AttachError::Bind(e),
            ListenError::Taken { .. } => AttachError::Duplicate(c.phone_number_id.clone()),
            ListenError::Invalid(_) => AttachError::Invalid(e),
        })?;
    let addr = registered.local_addr();
    let name = format!("{addr} {}", c.path);
    table()
        .get_or_insert_with(HashMap::new)
        .entry(name.clone())
        .or_default()
        .push(channel.clone());
    let _ = key.set(name.clone());
    Ok(Registration {
        key: name,
        addr,
        channel,
        route: Some(registered),
    })
}
