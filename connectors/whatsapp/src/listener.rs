//! The webhook listeners of the process: one per `listen` address, shared by every
//! channel configured with it, on the plugin's runtime. A listener routes requests by
//! path to the channels registered there (`webhook` then routes each change by
//! phone_number_id); the last channel to leave stops it and frees the port.
//!
//! Bounded: header and body read timeouts, at most `MAX_CONNECTIONS` connections
//! (the next ones are closed at once), and a graceful stop that `detach` joins.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use patchbay_connector_sdk::Level;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::channel::Channel;

/// Connections one listener serves at once; each is a file descriptor of the daemon's.
pub const MAX_CONNECTIONS: usize = 1024;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop lets requests in progress finish before closing their connections.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// One listening address and the channels behind it.
pub struct Listener {
    pub addr: SocketAddr,
    /// By path.
    routes: Mutex<HashMap<String, Vec<Arc<Channel>>>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Listener {
    /// The channels registered for `path`.
    pub fn channels(&self, path: &str) -> Vec<Arc<Channel>> {
        lock(&self.routes).get(path).cloned().unwrap_or_default()
    }

    /// Where this listener's notes go: any channel's host (all log to the daemon).
    fn log(&self, level: Level, msg: &str) {
        if let Some(c) = lock(&self.routes).values().flatten().next() {
            c.host.log(level, msg);
        }
    }
}

/// The listeners by configured `listen` string.
static LISTENERS: Mutex<Option<HashMap<String, Arc<Listener>>>> = Mutex::new(None);

/// A channel's place on a listener; `detach` (or drop) takes it off.
pub struct Registration {
    key: String,
    path: String,
    listener: Arc<Listener>,
    channel: Arc<Channel>,
    handle: Handle,
    detached: bool,
}

impl Registration {
    pub fn addr(&self) -> SocketAddr {
        self.listener.addr
    }

    /// Takes the channel off; the last one stops the listener and joins it, so the port
    /// is free once this returns. Must not run on the runtime's own threads.
    pub fn detach(&mut self) {
        if std::mem::replace(&mut self.detached, true) {
            return;
        }
        let mut all = lock(&LISTENERS);
        let empty = {
            let mut routes = lock(&self.listener.routes);
            if let Some(list) = routes.get_mut(&self.path) {
                list.retain(|c| !Arc::ptr_eq(c, &self.channel));
                if list.is_empty() {
                    routes.remove(&self.path);
                }
            }
            routes.is_empty()
        };
        if !empty {
            return;
        }
        if let Some(map) = all.as_mut() {
            map.remove(&self.key);
        }
        let _ = self.listener.stop.send(true);
        let task = lock(&self.listener.task).take();
        if let Some(task) = task {
            // serve() bounds its own drain by STOP_GRACE; the extra second guards a bug.
            let joined = self.handle.block_on(async {
                tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), task).await
            });
            if !matches!(joined, Ok(Ok(()))) {
                self.channel
                    .host
                    .log(Level::Error, "whatsapp: the listener did not stop cleanly");
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Binds, retrying for a second a port a previous instance is still closing.
fn bind(listen: &str) -> std::io::Result<std::net::TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match std::net::TcpListener::bind(listen) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Why a channel could not join a listener.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        listen: String,
        source: std::io::Error,
    },
    #[error(
        "another running channel already serves phone_number_id {0} on this listen address and path"
    )]
    Duplicate(String),
}

/// Registers `channel` on the listener of its `listen` address, starting it if none
/// runs yet.
pub fn attach(handle: &Handle, channel: Arc<Channel>) -> Result<Registration, AttachError> {
    let c = channel.config.clone();
    let mut all = lock(&LISTENERS);
    let map = all.get_or_insert_with(HashMap::new);
    let listener = match map.get(&c.listen) {
        Some(l) => l.clone(),
        None => {
            let bind_err = |source| AttachError::Bind {
                listen: c.listen.clone(),
                source,
            };
            let std_listener = bind(&c.listen)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(bind_err)?;
            let addr = std_listener.local_addr().map_err(bind_err)?;
            let tcp = {
                let _inside = handle.enter();
                TcpListener::from_std(std_listener).map_err(bind_err)?
            };
            let (stop, stop_rx) = watch::channel(false);
            let listener = Arc::new(Listener {
                addr,
                routes: Mutex::new(HashMap::new()),
                stop,
                task: Mutex::new(None),
            });
            let task = handle.spawn(serve(tcp, listener.clone(), stop_rx));
            *lock(&listener.task) = Some(task);
            map.insert(c.listen.clone(), listener.clone());
            listener
        }
    };
    {
        let mut routes = lock(&listener.routes);
        let taken = routes.get(&c.path).is_some_and(|list| {
            list.iter()
                .any(|o| o.config.phone_number_id == c.phone_number_id)
        });
        if taken {
            return Err(AttachError::Duplicate(c.phone_number_id.clone()));
        }
        routes
            .entry(c.path.clone())
            .or_default()
            .push(channel.clone());
    }
    Ok(Registration {
        key: c.listen.clone(),
        path: c.path.clone(),
        listener,
        channel,
        handle: handle.clone(),
        detached: false,
    })
}

async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn connection(stream: TcpStream, listener: Arc<Listener>, mut stop: watch::Receiver<bool>) {
    let service = service_fn(move |req| {
        let listener = listener.clone();
        async move { Ok::<_, Infallible>(crate::webhook::handle(&listener, req).await) }
    });
    let mut http = http1::Builder::new();
    // Slow or idle clients lose their connection instead of holding it (slowloris).
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopping(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Accepts until stop, then closes the port, lets requests in progress finish for up
/// to `STOP_GRACE` and drops the rest.
async fn serve(tcp: TcpListener, listener: Arc<Listener>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused_logged: Option<Instant> = None;
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (l, stop) = (listener.clone(), stop.clone());
                        conns.spawn(async move {
                            connection(stream, l, stop).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        // Closed unanswered: Meta retries a delivery that got no 200.
                        if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            refused_logged = Some(Instant::now());
                            listener.log(Level::Warn, &format!(
                                "whatsapp: {MAX_CONNECTIONS} connections open on {}; closing new ones", listener.addr));
                        }
                        drop(stream);
                    }
                },
                Err(e) => {
                    // Usually out of file descriptors: pause rather than spin.
                    listener.log(Level::Warn, &format!("whatsapp: accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stopping(&mut stop) => break,
        }
    }
    drop(tcp);
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.shutdown().await;
    }
}
