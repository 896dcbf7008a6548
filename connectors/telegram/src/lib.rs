//! telegram: a patchbay connector for the Telegram Bot API, built as `libtelegram.so`
//! (kind `telegram`).
//!
//! On start it builds a small tokio runtime of its own (one worker), calls `getMe` (the
//! channel's number becomes `@username`, its display name the bot's first name), then
//! long-polls `getUpdates` and emits each `message` update as an inbound message; `send`
//! calls `sendMessage` (and `sendPhoto`/`sendDocument`/… for attachments given by
//! `file_id` or URL) on the same runtime. `stop` cancels the long poll and joins the
//! poller, so nothing is emitted after it returns.
//!
//! **Offsets.** The next offset is written to `<state_dir>/telegram-<bot id>.offset`
//! only after the host's `flush` confirmed that the batch's events are durably
//! recorded (on the daemon's job queue), and is sent with the next getUpdates,
//! which is also how Telegram learns the updates were consumed. A restart therefore
//! neither loses an update (an unconfirmed one is fetched again) nor stores one twice
//! (external ids are `<chat id>:<message id>`, which the daemon stores once). Without
//! `state_dir` the same holds through Telegram's own confirmation; the file only saves
//! re-fetching the last batch.
//!
//! Written against the safe SDK only: this crate has no `unsafe`.

#![forbid(unsafe_code)]

pub mod api;
pub mod update;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patchbay_connector_sdk::{
    ChannelState, Connector, ConnectorError, EmitError, Event, FlushError, Host, Level, Outbound,
    Sent, Status, export_connector,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use api::{Api, ApiError, Me};
use update::Skip;

export_connector!(
    Telegram,
    kind = "telegram",
    version = env!("CARGO_PKG_VERSION"),
    secrets = ["token"]
);

/// The public Bot API.
pub const DEFAULT_API_BASE: &str = "https://api.telegram.org";
/// Telegram's limit for one text message, in characters.
const MAX_TEXT: usize = 4096;
/// Telegram's limit for a media caption, in characters.
const MAX_CAPTION: usize = 1024;
/// The longest 429 wait `send` sleeps through itself; longer ones fail retryably.
const MAX_SEND_WAIT: Duration = Duration::from_secs(10);
/// A whole send (waits, retries, every part) stays below the daemon's 30 s call timeout.
const SEND_BUDGET: Duration = Duration::from_secs(25);
/// One flush of the host; the poller flushes again while the daemon is merely behind.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Bound on joining the poller in stop (it gives way at once; this guards a bug).
const STOP_WAIT: Duration = Duration::from_secs(5);
/// Wait between polls while another client holds the bot (409).
const CONFLICT_WAIT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The channel config object. Unknown keys are an error.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The bot token from @BotFather: `<bot id>:<secret>`.
    pub token: String,
    /// The Bot API server; point it at a local Bot API server or a test fake. https://,
    /// or http:// to a loopback address only: every request carries the token.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// getUpdates long-poll timeout (0 = short polling, Telegram allows up to 50).
    #[serde(default = "default_poll_timeout")]
    pub poll_timeout_secs: u64,
    /// Timeout of the other calls (getMe, sendMessage, …).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Folder for the offset file; created if missing. Unset: rely on Telegram's
    /// server-side confirmation alone.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

// The token is secret: keep it out of debug output.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("token", &"<redacted>")
            .field("api_base", &self.api_base)
            .field("poll_timeout_secs", &self.poll_timeout_secs)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

/// `api_base` is https://, or http:// to a loopback IP literal (a local Bot API server,
/// a test fake): the token travels in every request's path, so plain HTTP over a network
/// would hand it to anyone on the way. `localhost` is not taken: a name may resolve
/// elsewhere.
fn check_api_base(api_base: &str) -> Result<(), &'static str> {
    let url = reqwest::Url::parse(api_base).map_err(|_| "not a URL")?;
    let host = url.host_str().ok_or("a URL with a host")?;
    // IPv6 literals come bracketed; a domain name does not parse as an address.
    let ip = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = ip
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(
            "http:// is only allowed to a loopback address (127.0.0.0/8 or [::1]); use https:// \
             (the token is part of every request)",
        ),
        _ => Err("an https:// URL (http:// only to a loopback address)"),
    }
}

fn default_api_base() -> String {
    DEFAULT_API_BASE.into()
}
fn default_poll_timeout() -> u64 {
    25
}
fn default_request_timeout() -> u64 {
    10
}

impl Config {
    pub fn parse(value: serde_json::Value) -> Result<Config, ConnectorError> {
        let c: Config = serde_json::from_value(value)
            .map_err(|e| ConnectorError::config(format!("telegram config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConnectorError> {
        let bad = |key: &str, value: &dyn std::fmt::Debug, allowed: &str| {
            Err(ConnectorError::config(format!(
                "telegram config: {key} = {value:?}: {allowed}"
            )))
        };
        // Never echo the token: name the key and the expected shape only.
        let token_ok = self.token.split_once(':').is_some_and(|(id, secret)| {
            !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_digit())
                && !secret.is_empty()
                && secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        if !token_ok {
            return Err(ConnectorError::config(
                "telegram config: token must look like <bot id>:<secret> as @BotFather gives it",
            ));
        }
        if let Err(allowed) = check_api_base(&self.api_base) {
            return bad("api_base", &self.api_base, allowed);
        }
        if self.poll_timeout_secs > 50 {
            return bad("poll_timeout_secs", &self.poll_timeout_secs, "0 to 50");
        }
        if !(1..=25).contains(&self.request_timeout_secs) {
            return bad(
                "request_timeout_secs",
                &self.request_timeout_secs,
                "1 to 25 (the daemon gives a send 30 s)",
            );
        }
        Ok(())
    }

    fn bot_id(&self) -> &str {
        self.token.split(':').next().unwrap_or_default()
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// The offset file of one bot.
pub struct OffsetFile {
    path: PathBuf,
}

impl OffsetFile {
    pub fn new(dir: &Path, bot_id: &str) -> OffsetFile {
        OffsetFile {
            path: dir.join(format!("telegram-{bot_id}.offset")),
        }
    }

    /// The saved offset; `Ok(None)` when there is none yet.
    pub fn load(&self) -> std::io::Result<Option<i64>> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => s.trim().parse().map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the offset durably: temp file, fsync, rename, so a crash leaves the old
    /// or the new value, never a torn one.
    pub fn save(&self, offset: i64) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("offset.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{offset}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[derive(Default)]
struct Counters {
    inbound: AtomicU64,
    skipped: AtomicU64,
    sent: AtomicU64,
    rate_limited: AtomicU64,
}

/// State shared by the connector and its poller task.
struct Shared {
    config: Config,
    host: Host,
    api: Api,
    /// Set by stop before the poller is told to end: no status is emitted after it.
    stop: AtomicBool,
    state: Mutex<Status>,
    /// Set once getMe answered: the number and name every later status repeats.
    me: Mutex<Option<Me>>,
    /// After a 401/404 nothing is called any more.
    token_invalid: AtomicBool,
    /// No send before this instant (a 429's retry_after).
    send_not_before: Mutex<Option<Instant>>,
    offset: Mutex<Option<i64>>,
    counters: Counters,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Records and emits a status, repeating the bot's identity once known. Emits only
    /// on a change, so a flapping network does not flood the host, and never once stop
    /// has begun (stop reports the final state itself).
    fn set_status(&self, state: ChannelState, reason: Option<String>) {
        if self.stopped() {
            return;
        }
        self.record_status(state, reason);
    }

    fn record_status(&self, state: ChannelState, reason: Option<String>) {
        let me = self.me.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let status = Status {
            number: me
                .as_ref()
                .map(|m| format!("@{}", m.username.as_deref().unwrap_or("unknown"))),
            display_name: me.as_ref().map(|m| m.first_name.clone()),
            reason,
            ..Status::new(state)
        };
        {
            let mut cur = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if cur.state == status.state
                && cur.reason == status.reason
                && cur.number == status.number
            {
                return;
            }
            *cur = status.clone();
        }
        let _ = self.host.emit(&Event::Status(status));
    }

    fn invalid_token(&self, e: &ApiError) {
        self.token_invalid.store(true, Ordering::Relaxed);
        self.host.log(
            Level::Error,
            &format!("telegram: {e}; polling stopped until the channel's token is fixed"),
        );
        self.set_status(ChannelState::Error, Some(e.to_string()));
    }

    /// Records a 429 for later sends: none before `retry_after` has passed.
    fn rate_limited(&self, retry_after: u64) -> Duration {
        self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
        let d = Duration::from_secs(retry_after.min(api::MAX_RETRY_AFTER_SECS));
        *self
            .send_not_before
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Instant::now().checked_add(d);
        d
    }
}

/// Resolves once stop has been signalled (or the instance is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps `d` unless stop comes first; returns whether to stop.
async fn wait(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stopping(stop) => true,
    }
}

/// What the poller does after a failed call.
enum Next {
    Retry(Duration),
    Quit,
}

/// Turns an API error into a status and a wait; network trouble backs off 1 s → 60 s.
fn on_error(shared: &Shared, e: ApiError, backoff: &mut Duration) -> Next {
    match e {
        ApiError::InvalidToken { .. } => {
            shared.invalid_token(&e);
            Next::Quit
        }
        ApiError::RateLimited { retry_after, .. } => {
            let d = shared.rate_limited(retry_after);
            shared.host.log(Level::Warn, &format!("telegram: {e}"));
            Next::Retry(d)
        }
        ApiError::Conflict { .. } => {
            shared.host.log(Level::Warn, &format!("telegram: {e}"));
            shared.set_status(ChannelState::Error, Some(e.to_string()));
            Next::Retry(CONFLICT_WAIT)
        }
        ApiError::Rejected { .. } | ApiError::Unavailable(_) => {
            let wait = *backoff;
            *backoff = (*backoff * 2).min(MAX_BACKOFF);
            let state = if matches!(e, ApiError::Rejected { .. }) {
                ChannelState::Error
            } else {
                ChannelState::Connecting
            };
            shared.host.log(
                Level::Warn,
                &format!("telegram: {e}; retrying in {}s", wait.as_secs()),
            );
            shared.set_status(state, Some(format!("{e}; retrying")));
            Next::Retry(wait)
        }
    }
}

/// Emits one event, backing off while the host is busy; `Err` when it will not take it.
async fn emit(
    shared: &Shared,
    event: &Event,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), EmitError> {
    let mut pause = Duration::from_millis(1);
    loop {
        match shared.host.emit(event) {
            Err(EmitError::Busy) => {
                if wait(stop, pause).await {
                    return Err(EmitError::Closed);
                }
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Waits until the host has durably recorded every event emitted so far, so the offset
/// may pass them. `false`: it will not confirm them (stopping, or it lost one and will
/// replace this instance); the offset must stay.
async fn flushed(shared: &Arc<Shared>, stop: &mut watch::Receiver<bool>) -> bool {
    loop {
        let s = shared.clone();
        // flush blocks its thread, so it runs off the runtime's single worker.
        let r = tokio::task::spawn_blocking(move || s.host.flush(FLUSH_WAIT)).await;
        match r {
            Ok(Ok(())) => return true,
            // A host older than flush: acknowledging after emit is all it allows.
            Ok(Err(FlushError::Unsupported)) => return true,
            // The daemon is behind (back-pressure): keep the offset until it catches up.
            Ok(Err(FlushError::Timeout)) if !*stop.borrow() => continue,
            _ => return false,
        }
    }
}

/// The poller: getMe, then getUpdates until stopped, the token is refused, or the host
/// closes the instance. Every wait and call gives way to stop at once.
async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let c = &shared.config;
    let mut backoff = Duration::from_secs(1);
    let no_params = json!({});
    let me = loop {
        let call = shared
            .api
            .call::<Me>("getMe", &no_params, c.request_timeout());
        let result = tokio::select! {
            r = call => r,
            _ = stopping(&mut stop) => return,
        };
        match result {
            Ok(me) => break me,
            Err(e) => match on_error(&shared, e, &mut backoff) {
                Next::Quit => return,
                Next::Retry(d) => {
                    if wait(&mut stop, d).await {
                        return;
                    }
                }
            },
        }
    };
    let bot_id = me.id.to_string();
    shared.host.log(
        Level::Info,
        &format!(
            "telegram: connected as @{} ({})",
            me.username.as_deref().unwrap_or("?"),
            me.first_name
        ),
    );
    *shared.me.lock().unwrap_or_else(|p| p.into_inner()) = Some(me);
    let file = c.state_dir.as_deref().map(|d| OffsetFile::new(d, &bot_id));
    let mut offset = match file.as_ref().map(OffsetFile::load) {
        Some(Ok(o)) => o,
        Some(Err(e)) => {
            // Without the file Telegram's own confirmation still applies: at worst the
            // last batch comes again, and the daemon stores each message once.
            shared.host.log(
                Level::Warn,
                &format!("telegram: cannot read the offset file ({e}); starting without it"),
            );
            None
        }
        None => None,
    };
    *shared.offset.lock().unwrap_or_else(|p| p.into_inner()) = offset;
    shared.set_status(ChannelState::Connected, None);
    backoff = Duration::from_secs(1);

    // Long polls may legitimately last poll_timeout_secs; the client waits a bit more.
    let poll_timeout = Duration::from_secs(c.poll_timeout_secs) + c.request_timeout();
    while !shared.stopped() {
        let mut params = json!({
            "timeout": c.poll_timeout_secs,
            "allowed_updates": ["message"],
        });
        if let (Some(o), Some(p)) = (offset, params.as_object_mut()) {
            p.insert("offset".into(), o.into());
        }
        let call = shared
            .api
            .call::<Vec<Value>>("getUpdates", &params, poll_timeout);
        let result = tokio::select! {
            r = call => r,
            // Dropping the call closes its connection: nothing of it arrives later.
            _ = stopping(&mut stop) => return,
        };
        let updates = match result {
            Ok(u) => u,
            Err(e) => match on_error(&shared, e, &mut backoff) {
                Next::Quit => return,
                Next::Retry(d) => {
                    if wait(&mut stop, d).await {
                        return;
                    }
                    continue;
                }
            },
        };
        backoff = Duration::from_secs(1);
        shared.set_status(ChannelState::Connected, None);
        let mut next = offset;
        let mut closed = false;
        for u in &updates {
            let Some(id) = update::update_id(u) else {
                shared.host.log(
                    Level::Warn,
                    "telegram: an update without update_id; skipped",
                );
                continue;
            };
            match update::to_inbound(u) {
                Ok(msg) => match emit(&shared, &Event::Inbound(msg), &mut stop).await {
                    Ok(()) => {
                        shared.counters.inbound.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(EmitError::TooLarge) => {
                        shared.host.log(
                            Level::Warn,
                            &format!("telegram: update {id} is too large for the host; skipped"),
                        );
                    }
                    Err(_) => {
                        // Stopping or closed: this update was not taken, so the offset
                        // must not pass it.
                        closed = true;
                        break;
                    }
                },
                Err(skip) => {
                    shared.counters.skipped.fetch_add(1, Ordering::Relaxed);
                    if let Skip::Malformed(why) = skip {
                        shared.host.log(
                            Level::Warn,
                            &format!("telegram: update {id} is unreadable ({why}); skipped"),
                        );
                    }
                }
            }
            // An id at i64::MAX cannot be passed; it simply comes again (and is stored
            // once) rather than wrapping the offset around.
            if let Some(after) = id.checked_add(1) {
                next = Some(next.map_or(after, |n: i64| n.max(after)));
            }
        }
        if next != offset {
            // Only what the host has durably recorded may be confirmed to Telegram:
            // the offset is how Telegram forgets updates.
            if !flushed(&shared, &mut stop).await {
                return;
            }
            offset = next;
            *shared.offset.lock().unwrap_or_else(|p| p.into_inner()) = offset;
            if let (Some(f), Some(o)) = (&file, offset)
                && let Err(e) = f.save(o)
            {
                shared.host.log(
                    Level::Warn,
                    &format!("telegram: cannot save the offset: {e}"),
                );
            }
        }
        if closed {
            return;
        }
    }
}

/// The running instance's runtime and poller.
struct Poller {
    runtime: tokio::runtime::Runtime,
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

/// One Telegram bot channel.
pub struct Telegram {
    shared: Arc<Shared>,
    poller: Option<Poller>,
}

impl Telegram {
    /// Stops the poller and joins it: after this, nothing of this instance runs.
    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let Some(p) = self.poller.take() else { return };
        let _ = p.stop.send(true);
        // The poller gives way at every await; the bound only guards against a bug.
        let joined = p
            .runtime
            .block_on(async { tokio::time::timeout(STOP_WAIT, p.task).await });
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => self
                .shared
                .host
                .log(Level::Error, "telegram: the poller panicked"),
            _ => self
                .shared
                .host
                .log(Level::Error, "telegram: the poller did not stop in time"),
        }
        // Ends the worker and blocking threads (a flush in progress was woken by stop).
        p.runtime.shutdown_timeout(STOP_WAIT);
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime, ConnectorError> {
        self.poller.as_ref().map(|p| &p.runtime).ok_or_else(|| {
            ConnectorError::new("not_running", "telegram is not started").retryable()
        })
    }

    /// Calls one send method within `deadline`, sleeping through a 429 that ends before it.
    async fn call_send(
        &self,
        method: &str,
        params: &Value,
        deadline: Instant,
    ) -> Result<Value, ConnectorError> {
        let timeout = self.shared.config.request_timeout();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnectorError::new(
                    "timeout",
                    format!("{method}: out of time for this send; will retry"),
                )
                .retryable());
            }
            match self
                .shared
                .api
                .call::<Value>(method, params, timeout.min(left))
                .await
            {
                Ok(v) => return Ok(v),
                Err(e @ ApiError::RateLimited { retry_after, .. }) => {
                    let d = self.shared.rate_limited(retry_after);
                    if d > MAX_SEND_WAIT || Instant::now() + d >= deadline {
                        return Err(ConnectorError::new("rate_limited", e.to_string()).retryable());
                    }
                    self.shared.host.log(
                        Level::Info,
                        &format!("telegram: {method} rate limited; waiting {}s", d.as_secs()),
                    );
                    tokio::time::sleep(d).await;
                }
                Err(e @ ApiError::InvalidToken { .. }) => {
                    self.shared.invalid_token(&e);
                    return Err(ConnectorError::new("invalid_token", e.to_string()));
                }
                Err(e @ ApiError::Unavailable(_)) => {
                    return Err(ConnectorError::new("unavailable", e.to_string()).retryable());
                }
                Err(e @ ApiError::Conflict { .. }) => {
                    return Err(ConnectorError::new("conflict", e.to_string()).retryable());
                }
                Err(e @ ApiError::Rejected { .. }) => {
                    return Err(ConnectorError::new("rejected", e.to_string()));
                }
            }
        }
    }

    /// Makes the calls of one message in order. Once a part has reached Telegram a
    /// retry would send it twice, so a later failure is permanent, naming what was sent.
    async fn send_all(
        &self,
        calls: &[(&'static str, Value)],
        deadline: Instant,
    ) -> Result<String, ConnectorError> {
        let mut first = None;
        for (i, (method, params)) in calls.iter().enumerate() {
            let sent = match self.call_send(method, params, deadline).await {
                Ok(v) => v,
                Err(e) if i == 0 => return Err(e),
                Err(e) => {
                    return Err(ConnectorError::new(
                        "partially_sent",
                        format!(
                            "sent {i} of {} parts (first {}), then {}: {}; not retried, so the sent parts do not repeat",
                            calls.len(),
                            first.as_deref().unwrap_or("?"),
                            e.code,
                            e.message
                        ),
                    ));
                }
            };
            if first.is_none() {
                let chat = sent
                    .get("chat")
                    .and_then(|c| c.get("id"))
                    .and_then(Value::as_i64);
                let id = sent.get("message_id").and_then(Value::as_i64);
                if let (Some(chat), Some(id)) = (chat, id) {
                    first = Some(format!("{chat}:{id}"));
                } else if i == 0 {
                    // Telegram has the part but answered oddly: a retry would repeat it.
                    return Err(ConnectorError::new(
                        "bad_answer",
                        "the Bot API answered without chat.id/message_id; not retried",
                    ));
                }
            }
        }
        first.ok_or_else(|| ConnectorError::new("invalid_message", "nothing to send"))
    }
}

/// `reply_parameters` for a `{"type":"reply","external_message_id":"<chat>:<id>"}`
/// attachment (as inbound replies carry them): the first call answers that message.
fn reply_parameters(chat_id: &Value, a: &Value) -> Result<Value, ConnectorError> {
    let bad = || {
        ConnectorError::new(
            "invalid_message",
            "a reply attachment needs external_message_id \"<chat id>:<message id>\"",
        )
    };
    let id = a
        .get("external_message_id")
        .and_then(Value::as_str)
        .ok_or_else(bad)?;
    let (chat, message) = id.rsplit_once(':').ok_or_else(bad)?;
    let message: i64 = message.parse().map_err(|_| bad())?;
    // A deleted original must not make the answer itself fail.
    let mut params = json!({"message_id": message, "allow_sending_without_reply": true});
    let same_chat = match chat_id {
        Value::String(name) => name == chat,
        other => other.as_i64().is_some_and(|n| n.to_string() == chat),
    };
    if !same_chat && let Some(p) = params.as_object_mut() {
        p.insert(
            "chat_id".into(),
            chat.parse::<i64>()
                .map_or_else(|_| chat.into(), Value::from),
        );
    }
    Ok(params)
}

/// The Bot API calls that send `msg`: media by `file_id` or `url` (the first one
/// carrying the text as caption when it fits), then the text in 4096-character parts.
/// A `reply` attachment makes the first call a reply to that message.
pub fn plan_send(
    chat_id: &Value,
    text: &str,
    attachments: &[Value],
) -> Result<Vec<(&'static str, Value)>, ConnectorError> {
    let mut calls = Vec::new();
    let mut text_done = text.is_empty();
    let mut reply_to = None;
    for a in attachments {
        let kind = a.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind == "reply" {
            reply_to = Some(reply_parameters(chat_id, a)?);
            continue;
        }
        let (method, field) = match kind {
            "photo" => ("sendPhoto", "photo"),
            "document" => ("sendDocument", "document"),
            "voice" => ("sendVoice", "voice"),
            "video" => ("sendVideo", "video"),
            "audio" => ("sendAudio", "audio"),
            "animation" => ("sendAnimation", "animation"),
            "sticker" => ("sendSticker", "sticker"),
            other => {
                return Err(ConnectorError::new(
                    "unsupported_attachment",
                    format!(
                        "attachment type {other:?}: telegram sends photo, document, voice, video, audio, animation, sticker"
                    ),
                ));
            }
        };
        let Some(file) = a
            .get("file_id")
            .or_else(|| a.get("url"))
            .and_then(Value::as_str)
        else {
            return Err(ConnectorError::new(
                "unsupported_attachment",
                format!("{kind} attachment needs a file_id or a url"),
            ));
        };
        let mut params = json!({"chat_id": chat_id, field: file});
        if !text_done
            && kind != "sticker"
            && text.chars().count() <= MAX_CAPTION
            && let Some(p) = params.as_object_mut()
        {
            p.insert("caption".into(), text.into());
            text_done = true;
        }
        calls.push((method, params));
    }
    if !text_done {
        let chars: Vec<char> = text.chars().collect();
        for part in chars.chunks(MAX_TEXT) {
            let part: String = part.iter().collect();
            calls.push(("sendMessage", json!({"chat_id": chat_id, "text": part})));
        }
    }
    if calls.is_empty() {
        return Err(ConnectorError::new(
            "invalid_message",
            "nothing to send: no text and no attachments",
        ));
    }
    if let (Some(r), Some((_, first))) = (reply_to, calls.first_mut())
        && let Some(p) = first.as_object_mut()
    {
        p.insert("reply_parameters".into(), r);
    }
    Ok(calls)
}

impl Connector for Telegram {
    fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
        let config = Config::parse(config)?;
        let api = Api::new(&config.api_base, &config.token)
            .map_err(|e| ConnectorError::new("internal", e.to_string()))?;
        Ok(Telegram {
            shared: Arc::new(Shared {
                config,
                host,
                api,
                stop: AtomicBool::new(false),
                state: Mutex::new(
                    Status::new(ChannelState::Disconnected).with_reason("not started"),
                ),
                me: Mutex::new(None),
                token_invalid: AtomicBool::new(false),
                send_not_before: Mutex::new(None),
                offset: Mutex::new(None),
                counters: Counters::default(),
            }),
            poller: None,
        })
    }

    fn start(&mut self) -> Result<(), ConnectorError> {
        if self.poller.is_some() {
            return Err(ConnectorError::new(
                "already_started",
                "telegram is already running",
            ));
        }
        // One worker is plenty for one bot: a long poll and the occasional send.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name(format!("telegram-{}", self.shared.config.bot_id()))
            .enable_all()
            .build()
            .map_err(|e| {
                ConnectorError::new("start_failed", format!("cannot start a runtime: {e}"))
                    .retryable()
            })?;
        self.shared.set_status(ChannelState::Connecting, None);
        let (stop, stop_rx) = watch::channel(false);
        let task = runtime.spawn(run(self.shared.clone(), stop_rx));
        self.poller = Some(Poller {
            runtime,
            task,
            stop,
        });
        Ok(())
    }

    fn send(&mut self, msg: Outbound) -> Result<Sent, ConnectorError> {
        // The daemon gives a call 30 s; everything below fits in SEND_BUDGET.
        let deadline = Instant::now() + SEND_BUDGET;
        if self.shared.token_invalid.load(Ordering::Relaxed) {
            return Err(ConnectorError::new(
                "invalid_token",
                "the Bot API refused this channel's token; fix it in the channel config",
            ));
        }
        let chat = msg.external_chat_id.trim();
        let chat_id: Value = if let Ok(n) = chat.parse::<i64>() {
            n.into()
        } else if chat.starts_with('@') {
            chat.into()
        } else {
            return Err(ConnectorError::new(
                "no_chat",
                "a Telegram bot can only write to a chat the client opened: no chat id for this recipient",
            ));
        };
        let calls = plan_send(&chat_id, &msg.text, &msg.attachments)?;
        let not_before = *self
            .shared
            .send_not_before
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let wait = not_before.map(|t| t.saturating_duration_since(Instant::now()));
        if let Some(left) = wait
            && left > MAX_SEND_WAIT
        {
            return Err(ConnectorError::new(
                "rate_limited",
                format!("rate limited by the Bot API for {}s more", left.as_secs()),
            )
            .retryable());
        }
        let runtime = self.runtime()?;
        let external_message_id = runtime.block_on(async {
            if let Some(left) = wait {
                tokio::time::sleep(left).await;
            }
            self.send_all(&calls, deadline).await
        })?;
        self.shared.counters.sent.fetch_add(1, Ordering::Relaxed);
        Ok(Sent {
            external_message_id,
        })
    }

    fn status(&self) -> Status {
        let mut s = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let k = &self.shared.counters;
        let offset = *self.shared.offset.lock().unwrap_or_else(|p| p.into_inner());
        s.details = Some(json!({
            "bot_id": self.shared.config.bot_id(),
            "offset": offset,
            "inbound": k.inbound.load(Ordering::Relaxed),
            "skipped": k.skipped.load(Ordering::Relaxed),
            "sent": k.sent.load(Ordering::Relaxed),
            "rate_limited": k.rate_limited.load(Ordering::Relaxed),
        }));
        s
    }

    fn stop(&mut self) -> Result<(), ConnectorError> {
        self.shutdown();
        // The poller is joined: this is the instance's last event.
        self.shared
            .record_status(ChannelState::Disconnected, Some("stopped".into()));
        Ok(())
    }
}

impl Drop for Telegram {
    // destroy without stop (after a panic): still stop the poller.
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: Value) -> Value {
        let mut v = json!({"token": "123456:ABC-def_1"});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = Config::parse(cfg(json!({}))).unwrap();
        assert_eq!(c.api_base, DEFAULT_API_BASE);
        assert_eq!(c.poll_timeout_secs, 25);
        assert_eq!(c.bot_id(), "123456");
        assert!(!format!("{c:?}").contains("ABC"));
        for bad in [
            json!({}),
            json!({"token": "nocolon"}),
            json!({"token": "abc:def"}),
            json!({"token": "1:has space"}),
            cfg(json!({"api_base": "ftp://x"})),
            cfg(json!({"api_base": "http://api.telegram.org"})),
            cfg(json!({"api_base": "http://localhost:8081"})),
            cfg(json!({"api_base": "http://10.0.0.5:8081"})),
            cfg(json!({"api_base": "http://[fe80::1]:8081"})),
            cfg(json!({"api_base": "not a url"})),
            cfg(json!({"poll_timeout_secs": 51})),
            cfg(json!({"request_timeout_secs": 0})),
            cfg(json!({"poll_timeout": 1})),
        ] {
            let e = Config::parse(bad.clone()).unwrap_err();
            assert_eq!(e.code, "invalid_config", "{bad}");
            assert!(
                !e.message.contains("ABC-def"),
                "token leaked: {}",
                e.message
            );
        }
    }

    #[test]
    fn api_base_is_https_except_to_loopback() {
        for ok in [
            "https://api.telegram.org",
            "https://bots.example.net:8443/prefix",
            "http://127.0.0.1:8081",
            "http://127.1.2.3",
            "http://[::1]:8081/",
        ] {
            let c = Config::parse(cfg(json!({ "api_base": ok })));
            assert!(c.is_ok(), "{ok}: {:?}", c.err());
        }
        for bad in [
            "http://api.telegram.org",
            "http://192.168.1.10:8081",
            "http://localhost:8081",
        ] {
            let e = Config::parse(cfg(json!({ "api_base": bad }))).unwrap_err();
            assert_eq!(e.code, "invalid_config");
            assert!(
                e.message.contains("api_base") && e.message.contains("only allowed to a loopback"),
                "{bad}: {}",
                e.message
            );
        }
    }

    #[test]
    fn offset_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let f = OffsetFile::new(&dir.path().join("sub"), "42");
        assert_eq!(f.load().unwrap(), None);
        f.save(17).unwrap();
        assert_eq!(f.load().unwrap(), Some(17));
        f.save(18).unwrap();
        assert_eq!(f.load().unwrap(), Some(18));
        std::fs::write(dir.path().join("sub/telegram-42.offset"), "junk").unwrap();
        assert!(f.load().is_err());
    }

    #[test]
    fn send_plans() {
        let chat = json!(42);
        let p = plan_send(&chat, "hi", &[]).unwrap();
        assert_eq!(
            p,
            vec![("sendMessage", json!({"chat_id": 42, "text": "hi"}))]
        );
        let long = "x".repeat(MAX_TEXT + 1);
        assert_eq!(plan_send(&chat, &long, &[]).unwrap().len(), 2);
        let p = plan_send(
            &chat,
            "see",
            &[
                json!({"type": "photo", "file_id": "F"}),
                json!({"type": "document", "url": "https://x/a.pdf"}),
            ],
        )
        .unwrap();
        assert_eq!(
            p[0],
            (
                "sendPhoto",
                json!({"chat_id": 42, "photo": "F", "caption": "see"})
            )
        );
        assert_eq!(
            p[1],
            (
                "sendDocument",
                json!({"chat_id": 42, "document": "https://x/a.pdf"})
            )
        );
        let p = plan_send(&chat, "hi", &[json!({"type": "sticker", "file_id": "S"})]).unwrap();
        assert_eq!(p.len(), 2, "stickers take no caption: {p:?}");
        assert_eq!(
            plan_send(&chat, "", &[json!({"type": "hologram", "file_id": "H"})])
                .unwrap_err()
                .code,
            "unsupported_attachment"
        );
        assert_eq!(
            plan_send(&chat, "", &[]).unwrap_err().code,
            "invalid_message"
        );
        // A reply: the first call answers the message; the reply alone sends nothing.
        let reply = json!({"type": "reply", "external_message_id": "42:5"});
        let p = plan_send(&chat, "yes", std::slice::from_ref(&reply)).unwrap();
        assert_eq!(
            p,
            vec![(
                "sendMessage",
                json!({"chat_id": 42, "text": "yes",
                       "reply_parameters": {"message_id": 5, "allow_sending_without_reply": true}})
            )]
        );
        let p = plan_send(
            &chat,
            "",
            &[
                json!({"type": "reply", "external_message_id": "7:5"}),
                json!({"type": "photo", "file_id": "F"}),
            ],
        )
        .unwrap();
        assert_eq!(
            p[0].1["reply_parameters"],
            json!({"message_id": 5, "chat_id": 7, "allow_sending_without_reply": true})
        );
        assert_eq!(
            plan_send(&chat, "", &[reply]).unwrap_err().code,
            "invalid_message"
        );
        let bad = json!({"type": "reply", "external_message_id": "nonsense"});
        assert_eq!(
            plan_send(&chat, "x", &[bad]).unwrap_err().code,
            "invalid_message"
        );
    }

    #[test]
    fn send_needs_a_chat_id() {
        let mut t = Telegram::create(cfg(json!({})), Host::detached()).unwrap();
        let e = t
            .send(Outbound {
                message: 1,
                external_chat_id: String::new(),
                to: Default::default(),
                text: "x".into(),
                attachments: vec![],
            })
            .unwrap_err();
        assert_eq!(e.code, "no_chat");
    }

    /// A Bot API stand-in: answers each request by method from `answer` (status, body),
    /// one connection per request, and records the methods called.
    fn fake_api(
        answer: impl Fn(&str) -> (u16, Value) + Send + Sync + 'static,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls: Arc<Mutex<Vec<String>>> = Arc::default();
        let (seen, answer) = (calls.clone(), Arc::new(answer));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (seen, answer) = (seen.clone(), answer.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn);
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let method = line.split('/').nth(2).unwrap_or("").split(' ').next();
                    let method = method.unwrap_or("").to_owned();
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    if method == "getUpdates" {
                        // A long poll that finds nothing.
                        std::thread::sleep(Duration::from_millis(500));
                    } else {
                        seen.lock().unwrap().push(method.clone());
                    }
                    let (status, body) = answer(&method);
                    let body = body.to_string();
                    let out = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = r.into_inner().write_all(out.as_bytes());
                });
            }
        });
        (url, calls)
    }

    #[test]
    fn a_part_that_fails_after_another_was_sent_is_not_retried() {
        let (url, calls) = fake_api(|method| match method {
            "getMe" => (
                200,
                json!({"ok": true, "result": {"id": 1, "first_name": "B"}}),
            ),
            "getUpdates" => (200, json!({"ok": true, "result": []})),
            "sendPhoto" => (
                200,
                json!({"ok": true, "result": {"message_id": 7, "chat": {"id": 42}}}),
            ),
            _ => (
                502,
                json!({"ok": false, "error_code": 502, "description": "Bad Gateway"}),
            ),
        });
        let mut t = Telegram::create(
            cfg(json!({"api_base": url, "request_timeout_secs": 2, "poll_timeout_secs": 0})),
            Host::detached(),
        )
        .unwrap();
        t.start().unwrap();
        let msg = |text: String, attachments| Outbound {
            message: 1,
            external_chat_id: "42".into(),
            to: Default::default(),
            text,
            attachments,
        };
        // Photo first (caption too long to ride along), then the text: the text fails.
        let photo = vec![json!({"type": "photo", "file_id": "F"})];
        let e = t
            .send(msg("x".repeat(MAX_CAPTION + 1), photo.clone()))
            .unwrap_err();
        assert_eq!(e.code, "partially_sent", "{e:?}");
        assert!(!e.retryable, "a retry would send the photo twice");
        assert!(e.message.contains("42:7"), "{}", e.message);
        // Nothing sent yet when the first part fails: retryable as usual.
        let e = t.send(msg("hi".into(), vec![])).unwrap_err();
        assert_eq!((e.code.as_str(), e.retryable), ("unavailable", true));
        let sends: Vec<String> = calls
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.starts_with("send"))
            .cloned()
            .collect();
        assert_eq!(sends, ["sendPhoto", "sendMessage", "sendMessage"]);
        t.stop().unwrap();
    }

    #[test]
    fn stop_cancels_a_call_in_flight_and_joins() {
        // A server that accepts and never answers: getMe hangs like a long poll.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let held = std::thread::spawn(move || silent.accept().map(|(conn, _)| conn));
        let mut t = Telegram::create(
            cfg(json!({"api_base": format!("http://{addr}"), "request_timeout_secs": 25})),
            Host::detached(),
        )
        .unwrap();
        t.start().unwrap();
        // Wait until the call is in flight.
        let conn = held.join().unwrap().unwrap();
        let started = Instant::now();
        t.stop().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(t.poller.is_none());
        // The call was dropped with its connection: the server sees EOF.
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 4096];
        let mut conn = conn;
        loop {
            match std::io::Read::read(&mut conn, &mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => panic!("connection still open after stop: {e}"),
            }
        }
    }

    #[test]
    fn stop_is_prompt_even_when_the_api_is_unreachable() {
        // Port 1 on loopback refuses connections: getMe fails and backs off.
        let mut t = Telegram::create(
            cfg(json!({"api_base": "http://127.0.0.1:1", "request_timeout_secs": 1})),
            Host::detached(),
        )
        .unwrap();
        t.start().unwrap();
        let waiting = Instant::now();
        while t.status().reason.is_none() {
            assert!(
                waiting.elapsed() < Duration::from_secs(5),
                "{:?}",
                t.status()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let s = t.status();
        assert_eq!(s.state, ChannelState::Connecting, "{s:?}");
        assert!(s.reason.unwrap_or_default().contains("unavailable"));
        let started = Instant::now();
        t.stop().unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(t.status().state, ChannelState::Disconnected);
    }
}
