//! A bounded-body HTTP/1 listener on the plugin's runtime that serves several instances
//! on one listen address.
//!
//! An instance `register`s a `Route` (a path, optionally an id) on an address at
//! `start` and drops the `Registration` at `stop`. The first registration on an address
//! binds it; later ones join that listener; the last one to leave closes it, lets its
//! requests finish for `stop_grace`, closes the connections and frees the port before
//! its drop returns. A request is routed by path, and on a path served by several
//! routes by the id its `RouteId` function takes from the request (a header, the query
//! or the body, which is read — bounded — before routing).
//!
//! What a peer can fill is bounded: connections (`max_connections`, then 503, then
//! closed unanswered), header time, body time (408), body size (413, checked against
//! `Content-Length` before reading and while reading). Dropping a registration waits
//! (bounded by `stop_grace`) for that route's requests in progress, so after it
//! returns no request reaches the instance's handler.
//!
//! Listeners live in this crate's `static`, so one plugin's instances share them and
//! another plugin never sees them. Port 0 always binds a fresh listener.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::http::{HeaderMap, Method, Uri};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest body any route may accept. A body may be a batch of many events (Meta
/// sends webhook batches up to 3 MB), so it is bounded on its own; each event still has
/// to fit the host's per-event limit, which the route's handler deals with.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// The largest `max_connections`: each connection is a file descriptor of the daemon's.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Connections past `max_connections` answered 503 at once; past these too, a new
/// connection is closed unanswered.
const MAX_REFUSING: usize = 64;
/// How long a refused connection is given to take its 503.
const REFUSE_WAIT: Duration = Duration::from_secs(1);

/// A request with its body read (within the bounds).
#[derive(Debug)]
pub struct HttpRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpRequest {
    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn path(&self) -> &str {
        self.uri.path()
    }

    pub fn query(&self) -> Option<&str> {
        self.uri.query()
    }
}

pub type HttpResponse = Response<Full<Bytes>>;
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// Answers one routed request.
pub type Handler = Arc<dyn Fn(HttpRequest) -> BoxFuture<HttpResponse> + Send + Sync>;
/// Takes the route id from a request (its body already read); `None`: no id in it.
pub type RouteId = Arc<dyn Fn(&HttpRequest) -> Option<String> + Send + Sync>;
/// Told of a request refused on a route's path before its handler ran (status, why).
pub type OnRefused = Arc<dyn Fn(u16, &str) + Send + Sync>;

/// Wraps an async function as a `Handler`.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(HttpRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// A JSON response, with `Retry-After` seconds if given.
pub fn respond(status: u16, body: &serde_json::Value, retry_after: Option<u32>) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(secs) = retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// A plain-text response (a webhook handshake's echoed challenge, say).
pub fn respond_text(status: u16, text: impl Into<String>) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(text.into())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn refusal(status: u16, message: &str) -> HttpResponse {
    respond(status, &json!({"ok": false, "error": message}), None)
}

/// What one instance serves.
pub struct Route {
    /// The exact path (no query), e.g. `/patchbay/inbound`.
    pub path: String,
    /// Its id on a shared path (see `RouteId`); `None`: the path's default route.
    pub id: Option<String>,
    /// Methods answered; others get 405 before the body is read. Empty: all.
    pub methods: Vec<Method>,
    /// Largest body this route takes (1 to `MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    pub handler: Handler,
    pub on_refused: Option<OnRefused>,
}

/// Bounds of the listener; the first registration on an address sets them.
#[derive(Clone, Debug)]
pub struct ListenOptions {
    /// Connections served at once (1 to `MAX_CONNECTIONS`); the next ones get 503.
    pub max_connections: usize,
    /// A client must send its request headers (and, kept alive, the next request)
    /// within this.
    pub header_timeout: Duration,
    /// A client must send its whole body within this (408 otherwise).
    pub body_timeout: Duration,
    /// How long the last registration's drop lets requests finish before closing
    /// their connections; also how long a route's drop waits for its requests.
    pub stop_grace: Duration,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(3),
        }
    }
}

/// Why a route was not registered.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{path} (id {id:?}) on {addr} is already served by another channel")]
    Taken {
        addr: String,
        path: String,
        id: Option<String>,
    },
    #[error("{0}")]
    Invalid(String),
}

struct RouteEntry {
    serial: u64,
    id: Option<String>,
    methods: Vec<Method>,
    max_body: usize,
    handler: Handler,
    on_refused: Option<OnRefused>,
    requests: TaskTracker,
}

#[derive(Default)]
struct PathGroup {
    router: Option<RouteId>,
    routes: Vec<Arc<RouteEntry>>,
}

impl PathGroup {
    fn max_body(&self) -> usize {
        self.routes.iter().map(|r| r.max_body).max().unwrap_or(0)
    }

    /// The route for `id`: the id's own, or with no id the default route, or the only
    /// route there is.
    fn pick(&self, id: Option<&str>) -> Option<Arc<RouteEntry>> {
        let by_id = self.routes.iter().find(|r| r.id.as_deref() == id).cloned();
        by_id.or_else(|| match (id, self.routes.as_slice()) {
            (None, [only]) => Some(only.clone()),
            _ => None,
        })
    }

    /// The route to tell of a refusal before routing: only when it is unambiguous.
    fn sole(&self) -> Option<&Arc<RouteEntry>> {
        match self.routes.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }
}

/// One bound address.
struct Listener {
    addr: SocketAddr,
    /// Its key in `LISTENERS`: the address asked for, or the bound one for port 0.
    key: String,
    options: ListenOptions,
    paths: RwLock<HashMap<String, PathGroup>>,
    token: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    refused_connections: AtomicU64,
}

impl Listener {
    fn paths(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, PathGroup>> {
        self.paths.read().unwrap_or_else(|p| p.into_inner())
    }

    fn paths_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, PathGroup>> {
        self.paths.write().unwrap_or_else(|p| p.into_inner())
    }
}

static LISTENERS: Mutex<Option<HashMap<String, Arc<Listener>>>> = Mutex::new(None);
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

fn with_listeners<T>(f: impl FnOnce(&mut HashMap<String, Arc<Listener>>) -> T) -> T {
    let mut l = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    f(l.get_or_insert_with(HashMap::new))
}

/// An instance's route on a listener; dropping it unregisters the route (see the
/// module doc). Drop it from the host's thread (`stop`, `Drop`), not from a task.
pub struct Registration {
    listener: Arc<Listener>,
    path: String,
    serial: u64,
    requests: TaskTracker,
    handle: Handle,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("addr", &self.listener.addr)
            .field("path", &self.path)
            .finish()
    }
}

impl Registration {
    /// The address the listener is bound to (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.addr
    }

    /// Connections the listener refused (past `max_connections`) since it was bound.
    pub fn refused_connections(&self) -> u64 {
        self.listener.refused_connections.load(Ordering::Relaxed)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let last = {
            let mut paths = self.listener.paths_mut();
            if let Some(group) = paths.get_mut(&self.path) {
                group.routes.retain(|r| r.serial != self.serial);
                if group.routes.is_empty() {
                    paths.remove(&self.path);
                }
            }
            paths.is_empty()
        };
        let grace = self.listener.options.stop_grace;
        let in_runtime = Handle::try_current().is_ok();
        // This route's requests in progress end (or are given up on) first.
        self.requests.close();
        if !in_runtime {
            let requests = self.requests.clone();
            self.handle.block_on(async {
                let _ = tokio::time::timeout(grace, requests.wait()).await;
            });
        }
        if !last {
            return;
        }
        let gone = with_listeners(|map| {
            // Only if no registration joined it meanwhile.
            let empty = self.listener.paths().is_empty();
            if empty
                && map
                    .get(&self.listener.key)
                    .is_some_and(|l| Arc::ptr_eq(l, &self.listener))
            {
                map.remove(&self.listener.key);
            }
            empty
        });
        if !gone {
            return;
        }
        self.listener.token.cancel();
        let task = self
            .listener
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(task), false) = (task, in_runtime) {
            // serve() bounds its drain by stop_grace; the extra second guards a bug.
            self.handle.block_on(async {
                let _ = tokio::time::timeout(grace + Duration::from_secs(1), task).await;
            });
        }
    }
}

/// Binds, retrying a port still held by a previous listener for a second.
fn bind(listen: &str) -> std::io::Result<std::net::TcpListener> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        match std::net::TcpListener::bind(listen) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Serves `route` on `listen` (`ip:port`), binding the address if no route of this
/// plugin serves it yet. `router` picks the route id on a shared path; the first
/// registration on a path sets it. Call from the host's thread (`start`).
pub fn register(
    listen: &str,
    route: Route,
    router: Option<RouteId>,
    options: &ListenOptions,
) -> Result<Registration, ListenError> {
    if !route.path.starts_with('/') || route.path.contains(['?', '#']) {
        return Err(ListenError::Invalid(format!(
            "path {:?} must be absolute, without query",
            route.path
        )));
    }
    if !(1..=MAX_BODY_BYTES).contains(&route.max_body_bytes) {
        return Err(ListenError::Invalid(format!(
            "max_body_bytes must be 1 to {MAX_BODY_BYTES}"
        )));
    }
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| ListenError::Invalid(format!("{listen:?} is not an IP address and port")))?;
    let handle = super::handle().map_err(|e| ListenError::Invalid(e.message))?;
    let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
    let requests = TaskTracker::new();
    let entry = Arc::new(RouteEntry {
        serial,
        id: route.id.clone(),
        methods: route.methods,
        max_body: route.max_body_bytes,
        handler: route.handler,
        on_refused: route.on_refused,
        requests: requests.clone(),
    });
    // Held while binding, so two instances starting at once on one address share it.
    let mut guard = LISTENERS.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    let existing = (addr.port() != 0)
        .then(|| map.get(listen).cloned())
        .flatten();
    let listener = match existing {
        Some(l) => l,
        None => {
            let std_listener = bind(listen)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| ListenError::Bind {
                    addr: listen.to_owned(),
                    source,
                })?;
            let bound = std_listener.local_addr().unwrap_or(addr);
            let tokio_listener = {
                let _inside = handle.enter();
                TcpListener::from_std(std_listener).map_err(|source| ListenError::Bind {
                    addr: listen.to_owned(),
                    source,
                })?
            };
            let key = if addr.port() == 0 {
                bound.to_string()
            } else {
                listen.to_owned()
            };
            let mut options = options.clone();
            options.max_connections = options.max_connections.clamp(1, MAX_CONNECTIONS);
            let l = Arc::new(Listener {
                addr: bound,
                key: key.clone(),
                options,
                paths: RwLock::new(HashMap::new()),
                token: CancellationToken::new(),
                task: Mutex::new(None),
                refused_connections: AtomicU64::new(0),
            });
            let task = handle.spawn(serve(tokio_listener, l.clone()));
            *l.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
            map.insert(key, l.clone());
            l
        }
    };
    {
        let mut paths = listener.paths_mut();
        let group = paths.entry(route.path.clone()).or_default();
        if group.routes.iter().any(|r| r.id == route.id) {
            let err = ListenError::Taken {
                addr: listen.to_owned(),
                path: route.path.clone(),
                id: route.id,
            };
            let now_empty = group.routes.is_empty();
            if now_empty {
                paths.remove(&route.path);
            }
            return Err(err);
        }
        if group.router.is_none() {
            group.router = router;
        }
        group.routes.push(entry);
    }
    drop(guard);
    Ok(Registration {
        listener,
        path: route.path,
        serial,
        requests,
        handle,
    })
}

/// Reads the body, refusing more than `max` bytes as they arrive, so an undeclared
/// (chunked) oversized body is caught without buffering all of it. `Err` is the
/// status and message to answer.
pub async fn read_body<B>(body: B, max: usize) -> Result<Bytes, (u16, String)>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err((413, format!("body over {max} bytes")))
        }
        Err(e) => Err((400, format!("cannot read the body: {e}"))),
    }
}

fn refused(group_route: Option<&Arc<RouteEntry>>, status: u16, why: &str) -> HttpResponse {
    if let Some(cb) = group_route.and_then(|r| r.on_refused.as_ref()) {
        cb(status, why);
    }
    refusal(status, why)
}

/// Answers one request: routes it, bounds its body, hands it to its route's handler.
async fn handle(listener: Arc<Listener>, req: Request<Incoming>) -> HttpResponse {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    // The bounds and the default route, taken without holding the lock across awaits.
    let (max_body, sole, router) = {
        let paths = listener.paths();
        let Some(group) = paths.get(&path) else {
            return refusal(404, &format!("no such path {path:?}"));
        };
        (
            group.max_body(),
            group.sole().cloned(),
            group.router.clone(),
        )
    };
    if let Some(r) = &sole
        && !r.methods.is_empty()
        && !r.methods.contains(&parts.method)
    {
        return refused(
            Some(r),
            405,
            &format!("{} is not served here", parts.method),
        );
    }
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(n) = declared
        && n > max_body
    {
        return refused(
            sole.as_ref(),
            413,
            &format!("body of {n} bytes is over the limit ({max_body})"),
        );
    }
    let timeout = listener.options.body_timeout;
    let body = match tokio::time::timeout(timeout, read_body(body, max_body)).await {
        Ok(Ok(b)) => b,
        Ok(Err((status, why))) => return refused(sole.as_ref(), status, &why),
        Err(_) => {
            let why = format!("body not received within {}s", timeout.as_secs());
            return refused(sole.as_ref(), 408, &why);
        }
    };
    let req = HttpRequest {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
    };
    let id = router.as_ref().and_then(|f| f(&req));
    let route = listener
        .paths()
        .get(&path)
        .and_then(|g| g.pick(id.as_deref()));
    let Some(route) = route else {
        let why = match id {
            Some(id) => format!("no channel for {id:?} on {path}"),
            None => format!("no channel named by this request on {path}"),
        };
        return refusal(404, &why);
    };
    if !route.methods.is_empty() && !route.methods.contains(&req.method) {
        return refused(
            Some(&route),
            405,
            &format!("{} is not served here", req.method),
        );
    }
    if req.body.len() > route.max_body {
        let why = format!(
            "body of {} bytes is over the limit ({})",
            req.body.len(),
            route.max_body
        );
        return refused(Some(&route), 413, &why);
    }
    if route.requests.is_closed() {
        return respond(
            503,
            &json!({"ok": false, "error": "this channel is stopping; send it again"}),
            Some(5),
        );
    }
    // Tracked, so the route's unregistering waits for it.
    route.requests.track_future((route.handler)(req)).await
}

/// Serves one connection until the client is done or the listener stops.
async fn connection(stream: TcpStream, listener: Arc<Listener>) {
    let token = listener.token.clone();
    let header_timeout = listener.options.header_timeout;
    let service = service_fn(move |req| {
        let listener = listener.clone();
        async move { Ok::<_, Infallible>(handle(listener, req).await) }
    });
    let mut http = http1::Builder::new();
    // Slow or idle clients lose their connection instead of holding it (slowloris).
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = token.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Answers a connection past `max_connections` with 503 and closes it, reading what
/// the client sent for a moment (closing with it unread would reset the connection,
/// and the client could lose the 503).
async fn refuse_busy(mut stream: TcpStream, max: usize) {
    let body = json!({
        "ok": false,
        "error": format!(
            "this listener serves {max} connections already (max_connections); try again shortly"
        ),
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_WAIT, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < 64 * 1024 {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Accepts until the listener is cancelled, then closes the port, lets requests in
/// progress finish for `stop_grace` and drops the rest.
async fn serve(tcp: TcpListener, listener: Arc<Listener>) {
    let max = listener.options.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let token = listener.token.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let l = listener.clone();
                        conns.spawn(async move {
                            connection(stream, l).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        listener.refused_connections.fetch_add(1, Ordering::Relaxed);
                        // Past MAX_REFUSING refusals in progress the stream is dropped.
                        if let Ok(permit) = refusing.clone().try_acquire_owned() {
                            conns.spawn(async move {
                                refuse_busy(stream, max).await;
                                drop(permit);
                            });
                        }
                    }
                },
                // Usually out of file descriptors: pause rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = token.cancelled() => break,
        }
    }
    drop(tcp);
    let drained = tokio::time::timeout(listener.options.stop_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.shutdown().await;
    }
}
