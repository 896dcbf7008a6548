//! webhook: a generic HTTP gateway connector for patchbay, built as `libwebhook.so`
//! (kind `webhook`).
//!
//! Inbound, it listens on `listen` and accepts `POST <path>` with a JSON message signed
//! with HMAC-SHA256 (see `signature`); it answers `200` only once the host's `flush`
//! confirmed the message durably recorded, so a gateway that gets anything else knows
//! to retry. Outbound, it POSTs each message as JSON to `outbound_url`, signed the same
//! way, retrying 5xx answers and timeouts a bounded number of times inside `send`, and
//! reports `delivered` on a 2xx.
//!
//! Written against the safe SDK only: this crate has no `unsafe`. Each started instance
//! owns a small tokio runtime (`workers` threads) with a hyper HTTP/1 server: header and
//! body read timeouts, a body size limit, and a graceful shutdown that `stop` joins;
//! nothing of the daemon's runtime crosses the boundary.

#![forbid(unsafe_code)]

pub mod signature;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use patchbay_connector_sdk::chrono::{DateTime, FixedOffset, Utc};
use patchbay_connector_sdk::json_limits::{MAX_JSON_DEPTH, check_depth};
use patchbay_connector_sdk::{
    ChannelState, Connector, ConnectorError, EmitError, Event, FlushError, Host, Inbound, Level,
    Outbound, Receipt, ReceiptStatus, Sender, Sent, Status, export_connector,
};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use signature::{SIGNATURE_HEADER, SignatureError, TIMESTAMP_HEADER, sign, verify};

export_connector!(
    Webhook,
    kind = "webhook",
    version = env!("CARGO_PKG_VERSION"),
    secrets = ["secret", "outbound_secret"]
);

/// The largest inbound body: an event must fit the host's 1 MiB payload limit, with
/// room for the fields the connector adds around the gateway's JSON.
pub const MAX_BODY_BYTES: usize = 1024 * 1024 - 4096;
/// The largest `max_connections`: each connection is a file descriptor of the daemon's.
pub const MAX_CONNECTIONS: usize = 16_384;
/// The daemon runs each call under a 30 s timeout; all of a send's attempts must fit.
const SEND_BUDGET: Duration = Duration::from_secs(25);
/// How long an inbound request waits for a busy host before answering 503.
const EMIT_WAIT: Duration = Duration::from_secs(2);
/// How long an inbound request waits for the host to record its message durably
/// before answering 503 (nothing is lost: the gateway sends it again).
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// A client must send its request headers (and, on a kept-alive connection, the next
/// request) within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send its whole body within this (408 otherwise).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` lets requests in progress finish before closing their connections.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a connection past `max_connections` is given to take its 503.
const REFUSE_WAIT: Duration = Duration::from_secs(1);
/// Connections past `max_connections` answered 503 at once; past these too, a new
/// connection is closed unanswered.
const MAX_REFUSING: usize = 64;

/// The channel config object. Unknown keys are an error, so a typo (`max_skew_sec`)
/// cannot silently fall back to a default.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shared HMAC secret for inbound requests (and outbound, unless `outbound_secret`).
    pub secret: String,
    /// `host:port` to listen on; port 0 picks a free port (reported in the status).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The path inbound messages are POSTed to.
    #[serde(default = "default_path")]
    pub path: String,
    /// Largest accepted timestamp distance from this server's clock, either way.
    #[serde(default = "default_max_skew")]
    pub max_skew_secs: u64,
    /// Largest accepted request body; larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Worker threads of the connector's runtime (requests are async: a slow client
    /// holds no thread).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Connections served at once; the next ones get 503 and are closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Where outbound messages are POSTed; without it, sends fail permanently.
    #[serde(default)]
    pub outbound_url: Option<String>,
    /// Secret for signing outbound requests; defaults to `secret`.
    #[serde(default)]
    pub outbound_secret: Option<String>,
    /// Timeout of one outbound attempt (connect to last byte).
    #[serde(default = "default_outbound_timeout")]
    pub outbound_timeout_secs: u64,
    /// Attempts per send before it fails retryably (the daemon's job retries later).
    #[serde(default = "default_outbound_attempts")]
    pub outbound_attempts: u32,
    /// The number shown in `channel.list`; defaults to the inbound URL.
    #[serde(default)]
    pub number: Option<String>,
    /// The display name shown in `channel.list`.
    #[serde(default = "default_display_name")]
    pub display_name: String,
}

// The secrets stay out of debug output.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("secret", &"<redacted>")
            .field("listen", &self.listen)
            .field("path", &self.path)
            .field("max_skew_secs", &self.max_skew_secs)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("workers", &self.workers)
            .field("max_connections", &self.max_connections)
            .field("outbound_url", &self.outbound_url)
            .field(
                "outbound_secret",
                &self.outbound_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("outbound_timeout_secs", &self.outbound_timeout_secs)
            .field("outbound_attempts", &self.outbound_attempts)
            .field("number", &self.number)
            .field("display_name", &self.display_name)
            .finish()
    }
}

fn default_listen() -> String {
    "127.0.0.1:8088".into()
}
fn default_path() -> String {
    "/patchbay/inbound".into()
}
fn default_max_skew() -> u64 {
    300
}
fn default_max_body() -> usize {
    256 * 1024
}
fn default_workers() -> usize {
    2
}
fn default_max_connections() -> usize {
    256
}
fn default_outbound_timeout() -> u64 {
    5
}
fn default_outbound_attempts() -> u32 {
    3
}
fn default_display_name() -> String {
    "Webhook".into()
}

impl Config {
    pub fn parse(value: serde_json::Value) -> Result<Config, ConnectorError> {
        let c: Config = serde_json::from_value(value)
            .map_err(|e| ConnectorError::config(format!("webhook config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConnectorError> {
        let bad = |key: &str, value: &dyn std::fmt::Debug, allowed: &str| {
            Err(ConnectorError::config(format!(
                "webhook config: {key} = {value:?}: {allowed}"
            )))
        };
        // Never echo secrets into errors: name the key and the problem only.
        if self.secret.len() < 16 {
            return Err(ConnectorError::config(
                "webhook config: secret must be at least 16 bytes",
            ));
        }
        if matches!(&self.outbound_secret, Some(s) if s.len() < 16) {
            return Err(ConnectorError::config(
                "webhook config: outbound_secret must be at least 16 bytes",
            ));
        }
        if self.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "listen",
                &self.listen,
                "an IP address and port, e.g. 127.0.0.1:8088 or [::]:8088",
            );
        }
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return bad(
                "path",
                &self.path,
                "an absolute path without query, e.g. /patchbay/inbound",
            );
        }
        if !(1..=86_400).contains(&self.max_skew_secs) {
            return bad("max_skew_secs", &self.max_skew_secs, "1 to 86400");
        }
        if !(1..=MAX_BODY_BYTES).contains(&self.max_body_bytes) {
            return bad(
                "max_body_bytes",
                &self.max_body_bytes,
                &format!("1 to {MAX_BODY_BYTES}"),
            );
        }
        if !(1..=64).contains(&self.workers) {
            return bad("workers", &self.workers, "1 to 64");
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return bad(
                "max_connections",
                &self.max_connections,
                &format!("1 to {MAX_CONNECTIONS}"),
            );
        }
        if let Some(url) = &self.outbound_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return bad("outbound_url", url, "an http:// or https:// URL");
        }
        if !(1..=20).contains(&self.outbound_timeout_secs) {
            return bad(
                "outbound_timeout_secs",
                &self.outbound_timeout_secs,
                "1 to 20",
            );
        }
        if !(1..=10).contains(&self.outbound_attempts) {
            return bad("outbound_attempts", &self.outbound_attempts, "1 to 10");
        }
        if u64::from(self.outbound_attempts) * self.outbound_timeout_secs > SEND_BUDGET.as_secs() {
            return bad(
                "outbound_attempts",
                &self.outbound_attempts,
                "outbound_attempts x outbound_timeout_secs must be at most 25 s (the daemon gives a send 30 s)",
            );
        }
        Ok(())
    }

    fn outbound_key(&self) -> &[u8] {
        self.outbound_secret
            .as_deref()
            .unwrap_or(&self.secret)
            .as_bytes()
    }
}

/// The inbound JSON body. Unknown fields are ignored, so gateways may send more.
#[derive(Debug, Deserialize)]
struct WireInbound {
    external_chat_id: String,
    external_message_id: String,
    sender: Sender,
    #[serde(default)]
    text: String,
    #[serde(default)]
    attachments: Vec<serde_json::Value>,
    #[serde(default)]
    sent_at: Option<DateTime<FixedOffset>>,
}

/// Why an inbound request was refused: the HTTP status and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Rejection {
    pub status: u16,
    pub message: String,
}

impl Rejection {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Rejection {
            status,
            message: message.into(),
        }
    }
}

/// The request line and headers of an inbound request, as the checks need them.
#[derive(Debug, Default)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub content_length: Option<usize>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// Checks what can be checked before reading the body: method, path, declared size.
pub fn check_head(config: &Config, head: &RequestHead) -> Result<(), Rejection> {
    let path = head.url.split(['?', '#']).next().unwrap_or_default();
    if path != config.path {
        return Err(Rejection::new(404, format!("no such path {path:?}")));
    }
    if !head.method.eq_ignore_ascii_case("POST") {
        return Err(Rejection::new(405, "use POST"));
    }
    if let Some(n) = head.content_length
        && n > config.max_body_bytes
    {
        return Err(Rejection::new(
            413,
            format!(
                "body of {n} bytes is over max_body_bytes ({})",
                config.max_body_bytes
            ),
        ));
    }
    Ok(())
}

/// Reads the body, refusing more than `max` bytes (413) as they arrive, so an
/// undeclared (chunked) oversized body is caught without buffering all of it.
pub async fn read_body<B>(body: B, max: usize) -> Result<Vec<u8>, Rejection>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) if e.is::<LengthLimitError>() => Err(Rejection::new(
            413,
            format!("body is over max_body_bytes ({max})"),
        )),
        Err(e) => Err(Rejection::new(400, format!("cannot read the body: {e}"))),
    }
}

/// Authenticates and parses a body: 401 for a missing, wrong or stale signature (stale
/// is 401 rather than 408 because it is an authentication failure, not a slow client),
/// 400 for JSON that is not a valid message or nests deeper than `MAX_JSON_DEPTH`
/// (measured before parsing; the event keeps the body's nesting, which the host bounds
/// the same way).
pub fn check_body(
    config: &Config,
    head: &RequestHead,
    body: &[u8],
    now: i64,
) -> Result<Inbound, Rejection> {
    signature::verify(
        config.secret.as_bytes(),
        head.timestamp,
        head.signature,
        body,
        now,
        config.max_skew_secs,
    )
    .map_err(|e| Rejection::new(401, e.to_string()))?;
    check_depth(body, MAX_JSON_DEPTH).map_err(|e| {
        Rejection::new(
            400,
            format!("invalid message JSON: {e}; send attachments with less nesting"),
        )
    })?;
    let wire: WireInbound = serde_json::from_slice(body)
        .map_err(|e| Rejection::new(400, format!("invalid message JSON: {e}")))?;
    let msg = Inbound {
        external_chat_id: wire.external_chat_id,
        external_message_id: wire.external_message_id,
        sender: wire.sender,
        text: wire.text,
        attachments: wire.attachments,
        sent_at: wire.sent_at.unwrap_or_else(|| Utc::now().fixed_offset()),
    };
    let event = Event::Inbound(msg);
    event
        .validate()
        .map_err(|e| Rejection::new(400, e.to_string()))?;
    match event {
        Event::Inbound(m) => Ok(m),
        // validate() keeps the variant; this arm only satisfies the match.
        _ => Err(Rejection::new(500, "internal error")),
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    rejected: AtomicU64,
    busy: AtomicU64,
    sent: AtomicU64,
    send_retries: AtomicU64,
}

/// State shared by the connector, its server tasks and sends.
struct Shared {
    config: Config,
    host: Host,
    stop: AtomicBool,
    state: Mutex<Status>,
    counters: Counters,
}

impl Shared {
    fn set_status(&self, status: Status) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = status.clone();
        let _ = self.host.emit(&Event::Status(status));
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Emits, backing off while the host is busy, for at most `wait`.
    async fn emit_for(&self, event: &Event, wait: Duration) -> Result<(), EmitError> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.host.emit(event) {
                Err(EmitError::Busy) if Instant::now() < deadline && !self.stopped() => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }
}

/// Waits until the host has durably recorded the events emitted so far.
async fn flush(shared: &Arc<Shared>) -> Result<(), FlushError> {
    let s = shared.clone();
    // flush blocks its thread: keep it off the runtime's workers.
    match tokio::task::spawn_blocking(move || s.host.flush(FLUSH_WAIT)).await {
        Ok(r) => r,
        Err(_) => Err(FlushError::Closed),
    }
}

fn header<'a>(parts: &'a hyper::http::request::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Answers one request: every path ends in exactly one response.
async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let url = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let head = RequestHead {
        method: parts.method.as_str(),
        url: &url,
        content_length: header(&parts, "content-length").and_then(|v| v.trim().parse().ok()),
        timestamp: header(&parts, TIMESTAMP_HEADER),
        signature: header(&parts, SIGNATURE_HEADER),
    };
    let config = &shared.config;
    let checked = async {
        check_head(config, &head)?;
        // A client that trickles its body is cut off rather than holding a task.
        let body = tokio::time::timeout(BODY_TIMEOUT, read_body(body, config.max_body_bytes))
            .await
            .map_err(|_| {
                Rejection::new(
                    408,
                    format!("body not received within {}s", BODY_TIMEOUT.as_secs()),
                )
            })??;
        check_body(config, &head, &body, Utc::now().timestamp())
    };
    let msg = match checked.await {
        Ok(m) => m,
        Err(r) => {
            shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
            shared.host.log(
                Level::Debug,
                &format!("webhook: refused {} {url}: {r}", head.method),
            );
            return respond(r.status, &json!({"ok": false, "error": r.message}), None);
        }
    };
    let id = msg.external_message_id.clone();
    if let Err(e) = shared.emit_for(&Event::Inbound(msg), EMIT_WAIT).await {
        if e == EmitError::TooLarge {
            return respond(
                413,
                &json!({"ok": false, "error": "message too large for the host"}),
                None,
            );
        }
        // Busy: the daemon is behind; Closed: the channel is stopping. Either way
        // nothing was taken and the gateway should try again shortly.
        shared.counters.busy.fetch_add(1, Ordering::Relaxed);
        let retry = if e == EmitError::Busy { 1 } else { 5 };
        return respond(
            503,
            &json!({"ok": false, "error": e.to_string()}),
            Some(retry),
        );
    }
    // 200 promises the gateway it may forget the message: only once it is durable.
    match flush(&shared).await {
        // A host older than flush offers nothing better than emit.
        Ok(()) | Err(FlushError::Unsupported) => {
            shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
            respond(200, &json!({"ok": true, "external_message_id": id}), None)
        }
        Err(e) => {
            shared.counters.busy.fetch_add(1, Ordering::Relaxed);
            let retry = if e == FlushError::Timeout { 1 } else { 5 };
            respond(
                503,
                &json!({"ok": false, "error": format!("{e}; send it again")}),
                Some(retry),
            )
        }
    }
}

fn respond(
    status: u16,
    body: &serde_json::Value,
    retry_after: Option<u32>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(secs) = retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Resolves once stop has been signalled (or the listener is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves one connection until the client is done or stop asks it to finish the
/// request in progress and close.
async fn connection(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
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

/// Answers a connection past `max_connections` with 503 and closes it. What the client
/// sent is read (and dropped) for a moment after the answer: closing with it unread
/// would reset the connection, and the client could lose the 503 before reading it.
async fn refuse_busy(mut stream: TcpStream, max: usize) {
    let body = json!({
        "ok": false,
        "error": format!("this webhook serves {max} connections already (max_connections); try again shortly"),
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

/// Accepts until stop, then closes the port, lets requests in progress finish for up
/// to `STOP_GRACE` and drops the rest. At most `max_connections` are served at once
/// (a semaphore permit travels with each); the next ones get 503.
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let max = shared.config.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut refused_logged: Option<Instant> = None;
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (shared, stop) = (shared.clone(), stop.clone());
                        conns.spawn(async move {
                            connection(stream, shared, stop).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        shared.counters.busy.fetch_add(1, Ordering::Relaxed);
                        // Once per 10 s at most: a flood must not flood the log.
                        if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            refused_logged = Some(Instant::now());
                            shared.host.log(
                                Level::Warn,
                                &format!("webhook: {max} connections open (max_connections); answering new ones 503"),
                            );
                        }
                        // Past MAX_REFUSING refusals in progress the stream is dropped.
                        if let Ok(permit) = refusing.clone().try_acquire_owned() {
                            conns.spawn(async move {
                                refuse_busy(stream, max).await;
                                drop(permit);
                            });
                        }
                    }
                },
                Err(e) => {
                    // Usually out of file descriptors: pause rather than spin.
                    shared.host.log(Level::Warn, &format!("webhook: accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stopping(&mut stop) => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        shared.host.log(
            Level::Warn,
            "webhook: requests still in progress at stop; closing their connections",
        );
        conns.shutdown().await;
    }
}

/// Binds the listener, retrying a port still held by a previous instance for a second.
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

/// The outcome of one outbound POST that may be worth repeating.
enum Attempt {
    /// 2xx, with the gateway's own id for the message if it named one.
    Delivered(Option<String>),
    /// 5xx, 408, 429 or a network error; `Retry-After` seconds if given.
    Retry {
        reason: String,
        retry_after: Option<u64>,
    },
}

/// A running instance: its runtime, the server task and the signal that stops it.
struct Listener {
    runtime: tokio::runtime::Runtime,
    server: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

/// One webhook channel.
pub struct Webhook {
    shared: Arc<Shared>,
    client: reqwest::Client,
    listener: Option<Listener>,
}

impl Webhook {
    /// Stops the server and joins it: after this no request is handled (nor emits).
    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let Some(l) = self.listener.take() else {
            return;
        };
        let _ = l.stop.send(true);
        // serve() bounds its own drain by STOP_GRACE; the extra second guards a bug.
        let joined = l.runtime.block_on(async {
            tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), l.server).await
        });
        if !matches!(joined, Ok(Ok(()))) {
            self.shared
                .host
                .log(Level::Error, "webhook: the server did not stop cleanly");
        }
        l.runtime.shutdown_timeout(Duration::from_secs(1));
    }

    /// One signed POST of `body`; `Err` when retrying cannot help.
    async fn attempt(&self, url: &str, body: &[u8]) -> Result<Attempt, ConnectorError> {
        let c = &self.shared.config;
        let ts = Utc::now().timestamp();
        let sig = sign(c.outbound_key(), ts, body)
            .map_err(|e| ConnectorError::new("internal", e.to_string()))?;
        let result = self
            .client
            .post(url)
            .header("Content-Type", "application/json")
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(SIGNATURE_HEADER, sig)
            .body(body.to_vec())
            .send()
            .await;
        let mut resp = match result {
            Ok(r) => r,
            // A bad URL or header cannot get better; everything else (connect, timeout,
            // reset) is the network's trouble.
            Err(e) if e.is_builder() => {
                return Err(ConnectorError::new(
                    "send_failed",
                    format!("POST {url}: {e}"),
                ));
            }
            Err(e) => {
                return Ok(Attempt::Retry {
                    reason: format!("POST {url}: {e}"),
                    retry_after: None,
                });
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("Retry-After")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let mut text = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            text.extend_from_slice(&chunk);
            if text.len() > 64 * 1024 {
                break;
            }
        }
        let text = String::from_utf8_lossy(&text);
        match status {
            200..=299 => {
                // The gateway may name its own id for the message; otherwise ours.
                let id = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("external_message_id")?.as_str().map(str::to_owned))
                    .filter(|s| !s.is_empty() && s.len() <= 256);
                Ok(Attempt::Delivered(id))
            }
            408 | 429 | 500..=599 => Ok(Attempt::Retry {
                reason: format!("POST {url}: HTTP {status}: {}", snippet(&text)),
                retry_after,
            }),
            _ => Err(ConnectorError::new(
                "rejected",
                format!("POST {url}: HTTP {status}: {}", snippet(&text)),
            )),
        }
    }

    /// The attempts of one send, within `SEND_BUDGET`.
    async fn deliver(&self, url: &str, body: &[u8], message: i64) -> Result<Sent, ConnectorError> {
        let c = &self.shared.config;
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 1..=c.outbound_attempts {
            match self.attempt(url, body).await? {
                Attempt::Delivered(id) => {
                    let external_message_id = id.unwrap_or_else(|| format!("wh-out-{message}"));
                    self.shared.counters.sent.fetch_add(1, Ordering::Relaxed);
                    // A 2xx is the gateway's acknowledgement: that is what delivered
                    // means for a webhook.
                    let receipt = Event::Receipt(Receipt {
                        message,
                        status: ReceiptStatus::Delivered,
                        external_message_id: Some(external_message_id.clone()),
                        reason: None,
                    });
                    if let Err(e) = self.shared.emit_for(&receipt, EMIT_WAIT).await {
                        self.shared.host.log(
                            Level::Warn,
                            &format!("webhook: receipt for message {message} dropped: {e}"),
                        );
                    }
                    return Ok(Sent {
                        external_message_id,
                    });
                }
                Attempt::Retry {
                    reason,
                    retry_after,
                } => {
                    last = reason;
                    if attempt == c.outbound_attempts {
                        break;
                    }
                    self.shared
                        .counters
                        .send_retries
                        .fetch_add(1, Ordering::Relaxed);
                    let wait = retry_after
                        .map(Duration::from_secs)
                        .unwrap_or(pause)
                        .min(Duration::from_secs(5));
                    // Never let the retries push the call past the daemon's timeout.
                    let next_end =
                        started.elapsed() + wait + Duration::from_secs(c.outbound_timeout_secs);
                    if next_end > SEND_BUDGET {
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    pause *= 2;
                }
            }
        }
        Err(ConnectorError::new("unavailable", last).retryable())
    }
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace(['\r', '\n'], " ")
}

impl Connector for Webhook {
    fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
        let config = Config::parse(config)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.outbound_timeout_secs))
            .build()
            .map_err(|e| ConnectorError::new("internal", format!("HTTP client: {e}")))?;
        Ok(Webhook {
            shared: Arc::new(Shared {
                config,
                host,
                stop: AtomicBool::new(false),
                state: Mutex::new(
                    Status::new(ChannelState::Disconnected).with_reason("not started"),
                ),
                counters: Counters::default(),
            }),
            client,
            listener: None,
        })
    }

    fn start(&mut self) -> Result<(), ConnectorError> {
        if self.listener.is_some() {
            return Err(ConnectorError::new(
                "already_started",
                "webhook is already running",
            ));
        }
        let c = &self.shared.config;
        self.shared.stop.store(false, Ordering::Relaxed);
        self.shared
            .set_status(Status::new(ChannelState::Connecting));
        let fail = |shared: &Shared, reason: String| {
            shared.set_status(Status::new(ChannelState::Error).with_reason(&reason));
            ConnectorError::new("listen_failed", reason).retryable()
        };
        // Usually the port is taken (by a previous instance still closing, or another
        // program): worth retrying.
        let std_listener = bind(&c.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| fail(&self.shared, format!("cannot listen on {}: {e}", c.listen)))?;
        let addr = std_listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| c.listen.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(c.workers)
            .max_blocking_threads(c.workers.max(4))
            .thread_name("webhook")
            .enable_all()
            .build()
            .map_err(|e| {
                ConnectorError::new("start_failed", format!("cannot start a runtime: {e}"))
                    .retryable()
            })?;
        let listener = {
            let _inside = runtime.enter();
            TcpListener::from_std(std_listener)
                .map_err(|e| fail(&self.shared, format!("cannot listen on {addr}: {e}")))?
        };
        let (stop, stop_rx) = watch::channel(false);
        let server = runtime.spawn(serve(listener, self.shared.clone(), stop_rx));
        self.listener = Some(Listener {
            runtime,
            server,
            stop,
        });
        let number = c
            .number
            .clone()
            .unwrap_or_else(|| format!("http://{addr}{}", c.path));
        self.shared.host.log(
            Level::Info,
            &format!("webhook listening on http://{addr}{}", c.path),
        );
        self.shared.set_status(Status {
            number: Some(number),
            display_name: Some(c.display_name.clone()),
            details: Some(json!({"listen": addr})),
            ..Status::new(ChannelState::Connected)
        });
        Ok(())
    }

    /// POSTs the message, retrying 5xx/408/429 answers and network errors up to
    /// `outbound_attempts` times with backoff (honouring a short `Retry-After`). When
    /// all attempts fail the error is retryable, so the daemon's job retries later;
    /// a 4xx is permanent. Delivery is at least once: the body carries the host's
    /// `message` id for the gateway to de-duplicate.
    fn send(&mut self, msg: Outbound) -> Result<Sent, ConnectorError> {
        let Some(url) = self.shared.config.outbound_url.clone() else {
            return Err(ConnectorError::new(
                "unsupported",
                "this webhook channel has no outbound_url, so it cannot send",
            ));
        };
        let body = serde_json::to_vec(&json!({
            "message": msg.message,
            "external_chat_id": msg.external_chat_id,
            "to": msg.to,
            "text": msg.text,
            "attachments": msg.attachments,
        }))
        .map_err(|e| ConnectorError::new("invalid_message", e.to_string()))?;
        let Some(l) = self.listener.as_ref() else {
            return Err(ConnectorError::new("not_running", "webhook is not started").retryable());
        };
        l.runtime.block_on(self.deliver(&url, &body, msg.message))
    }

    fn status(&self) -> Status {
        let mut s = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let k = &self.shared.counters;
        let mut details = s.details.take().unwrap_or_else(|| json!({}));
        if let Some(d) = details.as_object_mut() {
            d.insert("accepted".into(), k.accepted.load(Ordering::Relaxed).into());
            d.insert("rejected".into(), k.rejected.load(Ordering::Relaxed).into());
            d.insert("busy".into(), k.busy.load(Ordering::Relaxed).into());
            d.insert("sent".into(), k.sent.load(Ordering::Relaxed).into());
            d.insert(
                "send_retries".into(),
                k.send_retries.load(Ordering::Relaxed).into(),
            );
        }
        s.details = Some(details);
        s
    }

    fn stop(&mut self) -> Result<(), ConnectorError> {
        self.shutdown();
        self.shared
            .set_status(Status::new(ChannelState::Disconnected).with_reason("stopped"));
        Ok(())
    }
}

impl Drop for Webhook {
    // destroy without stop (after a panic): still join the threads and free the port.
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef-secret";

    fn config() -> Config {
        Config::parse(json!({"secret": SECRET, "path": "/in", "max_body_bytes": 200})).unwrap()
    }

    fn head<'a>(ts: &'a str, sig: &'a str) -> RequestHead<'a> {
        RequestHead {
            method: "POST",
            url: "/in",
            content_length: None,
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = Config::parse(json!({"secret": SECRET})).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8088");
        assert_eq!(c.path, "/patchbay/inbound");
        assert_eq!(c.max_skew_secs, 300);
        for bad in [
            json!({}),
            json!({"secret": "short"}),
            json!({"secret": SECRET, "listen": "localhost"}),
            json!({"secret": SECRET, "path": "in"}),
            json!({"secret": SECRET, "max_body_bytes": 0}),
            json!({"secret": SECRET, "max_body_bytes": 2_000_000}),
            json!({"secret": SECRET, "outbound_url": "ftp://x"}),
            json!({"secret": SECRET, "outbound_attempts": 10, "outbound_timeout_secs": 20}),
            json!({"secret": SECRET, "max_skew": 3}),
        ] {
            let e = Config::parse(bad.clone()).unwrap_err();
            assert_eq!(e.code, "invalid_config", "{bad}");
            assert!(!e.message.contains(SECRET), "secret leaked: {}", e.message);
        }
    }

    #[test]
    fn head_checks() {
        let c = config();
        assert_eq!(check_head(&c, &head("1", "x")), Ok(()));
        let wrong_path = RequestHead {
            url: "/other?x=1",
            ..head("1", "x")
        };
        assert_eq!(check_head(&c, &wrong_path).unwrap_err().status, 404);
        let query_ok = RequestHead {
            url: "/in?x=1",
            ..head("1", "x")
        };
        assert_eq!(check_head(&c, &query_ok), Ok(()));
        let get = RequestHead {
            method: "GET",
            ..head("1", "x")
        };
        assert_eq!(check_head(&c, &get).unwrap_err().status, 405);
        let big = RequestHead {
            content_length: Some(201),
            ..head("1", "x")
        };
        assert_eq!(check_head(&c, &big).unwrap_err().status, 413);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let body = |n: usize| Full::new(Bytes::from(vec![b'a'; n]));
        assert_eq!(
            rt.block_on(read_body(body(201), 200)).unwrap_err().status,
            413
        );
        assert_eq!(rt.block_on(read_body(body(200), 200)).unwrap().len(), 200);
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = Config::parse(
            json!({"secret": SECRET, "outbound_secret": "another-secret-0123456789"}),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains(SECRET) && !shown.contains("another-secret"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn body_checks() {
        let c = config();
        let now = 1_700_000_000;
        let ts = now.to_string();
        let body = json!({
            "external_chat_id": "c1", "external_message_id": "m1",
            "sender": {"phone": "+15550001111", "name": "Ann"}, "text": "hi",
            "attachments": [{"url": "https://x/y.png"}], "extra": true
        })
        .to_string();
        let sig = sign(SECRET.as_bytes(), now, body.as_bytes()).unwrap();
        let m = check_body(&c, &head(&ts, &sig), body.as_bytes(), now).unwrap();
        assert_eq!(m.external_message_id, "m1");
        assert_eq!(m.sender.name.as_deref(), Some("Ann"));
        assert_eq!(m.attachments.len(), 1);

        let with_date = json!({
            "external_chat_id": "c1", "external_message_id": "m2",
            "sender": {"username": "ann"}, "sent_at": "2026-01-02T03:04:05+01:00"
        })
        .to_string();
        let sig2 = sign(SECRET.as_bytes(), now, with_date.as_bytes()).unwrap();
        let m = check_body(&c, &head(&ts, &sig2), with_date.as_bytes(), now).unwrap();
        assert_eq!(m.sent_at.to_rfc3339(), "2026-01-02T03:04:05+01:00");
        assert_eq!(m.text, "");

        // Authentication comes first: a bad signature on bad JSON is still 401.
        assert_eq!(
            check_body(&c, &head(&ts, "sha256=00"), b"{", now)
                .unwrap_err()
                .status,
            401
        );
        let stale = check_body(&c, &head(&ts, &sig), body.as_bytes(), now + 301).unwrap_err();
        assert_eq!(stale.status, 401);
        assert!(stale.message.contains("301 s"), "{}", stale.message);

        for bad in [
            "{".to_owned(),
            json!({"external_chat_id": "c"}).to_string(),
            json!({"external_chat_id": "", "external_message_id": "m", "sender": {"name": "x"}})
                .to_string(),
            json!({"external_chat_id": "c", "external_message_id": "m", "sender": {}}).to_string(),
        ] {
            let sig = sign(SECRET.as_bytes(), now, bad.as_bytes()).unwrap();
            let r = check_body(&c, &head(&ts, &sig), bad.as_bytes(), now).unwrap_err();
            assert_eq!(r.status, 400, "{bad}: {r}");
        }
    }

    #[test]
    fn a_deep_body_is_refused_after_the_signature() {
        let c = Config::parse(json!({"secret": SECRET, "path": "/in"})).unwrap();
        let now = 1_700_000_000;
        let ts = now.to_string();
        let body = |levels: usize| {
            format!(
                r#"{{"external_chat_id":"c","external_message_id":"m","sender":{{"name":"A"}},"attachments":[{}1{}]}}"#,
                "[".repeat(levels - 2),
                "]".repeat(levels - 2)
            )
        };
        let at = body(MAX_JSON_DEPTH);
        let sig = sign(SECRET.as_bytes(), now, at.as_bytes()).unwrap();
        assert!(check_body(&c, &head(&ts, &sig), at.as_bytes(), now).is_ok());
        let over = body(MAX_JSON_DEPTH + 1);
        let sig = sign(SECRET.as_bytes(), now, over.as_bytes()).unwrap();
        let r = check_body(&c, &head(&ts, &sig), over.as_bytes(), now).unwrap_err();
        assert_eq!(r.status, 400);
        assert!(r.message.contains("nested deeper than 32"), "{}", r.message);
        // Unsigned, the same body is an authentication failure first.
        let r = check_body(&c, &head(&ts, "sha256=00"), over.as_bytes(), now).unwrap_err();
        assert_eq!(r.status, 401);
        assert!(Config::parse(json!({"secret": SECRET, "max_connections": 0})).is_err());
    }

    #[test]
    fn send_without_outbound_url_is_permanent() {
        let mut w = Webhook::create(json!({"secret": SECRET}), Host::detached()).unwrap();
        let e = w
            .send(Outbound {
                message: 1,
                external_chat_id: "c".into(),
                to: Default::default(),
                text: "x".into(),
                attachments: vec![],
            })
            .unwrap_err();
        assert_eq!(e.code, "unsupported");
        assert!(!e.retryable);
    }

    #[test]
    fn start_listens_and_stop_frees_the_port() {
        let mut w = Webhook::create(
            json!({"secret": SECRET, "listen": "127.0.0.1:0", "workers": 2}),
            Host::detached(),
        )
        .unwrap();
        w.start().unwrap();
        let status = w.status();
        assert_eq!(status.state, ChannelState::Connected);
        let addr = status.details.unwrap()["listen"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(std::net::TcpStream::connect(&addr).is_ok());
        let t = Instant::now();
        w.stop().unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "stop is prompt");
        // The port is free again once stop returns, so a restarted channel can bind it.
        std::net::TcpListener::bind(&addr).expect("port freed by stop");
    }

    /// Starts a webhook on a free port; returns it and its address.
    fn started(extra: serde_json::Value) -> (Webhook, String) {
        let mut config = json!({"secret": SECRET, "listen": "127.0.0.1:0", "path": "/in"});
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let mut w = Webhook::create(config, Host::detached()).unwrap();
        w.start().unwrap();
        let addr = w.status().details.unwrap()["listen"]
            .as_str()
            .unwrap()
            .to_owned();
        (w, addr)
    }

    fn read_all(conn: &mut std::net::TcpStream) -> String {
        use std::io::Read;
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut out = Vec::new();
        let _ = conn.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn a_stalled_body_gets_408_and_a_big_one_413() {
        use std::io::Write;
        let (mut w, addr) = started(json!({"max_body_bytes": 100}));
        // Declares 50 bytes, sends 5, then stalls: cut off after BODY_TIMEOUT.
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nhello")
            .unwrap();
        let t = Instant::now();
        let answer = read_all(&mut conn);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(t.elapsed() >= BODY_TIMEOUT - Duration::from_secs(1));
        // Chunked (undeclared) and too large: 413 once the limit is passed.
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        for _ in 0..3 {
            let _ = conn.write_all(format!("40\r\n{}\r\n", "a".repeat(64)).as_bytes());
        }
        let _ = conn.write_all(b"0\r\n\r\n");
        let answer = read_all(&mut conn);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        w.stop().unwrap();
    }

    #[test]
    fn stop_closes_idle_and_slow_connections() {
        use std::io::Write;
        let (mut w, addr) = started(json!({}));
        // One idle kept-alive connection, one that sent half its headers.
        let mut idle = std::net::TcpStream::connect(&addr).unwrap();
        let mut slow = std::net::TcpStream::connect(&addr).unwrap();
        slow.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        w.stop().unwrap();
        assert!(
            t.elapsed() < STOP_GRACE + Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        // Both see their connection closed (EOF) right away, not after a timeout.
        let t = Instant::now();
        read_all(&mut idle);
        read_all(&mut slow);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}
