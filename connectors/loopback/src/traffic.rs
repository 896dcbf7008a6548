//! The loopback instance's one task on the plugin's shared runtime: connects, injects
//! the configured faults, generates inbound traffic, and emits queued receipts, until
//! the instance's token is cancelled or the host refuses events. With no traffic it
//! waits for a receipt or the token: no CPU, no thread of its own.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use patchbay_connector_sdk::runtime::{self, CancellationToken, Counters};
use patchbay_connector_sdk::{
    ChannelState, EmitError, Event, Host, Inbound, Level, Receipt, Sender, Status, chrono,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use crate::config::{Config, MALFORMED};

/// The counters in `status().details`.
pub(crate) const COUNTERS: &[&str] = &[
    "inbound",
    "sent",
    "receipts",
    "busy_retries",
    "malformed",
    "refused",
];

/// How long an emit may wait for a busy host once stop has begun (the receipts of
/// sends made before stop still go out, but stop stays prompt).
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// The phone of synthetic client `i`.
pub fn client_phone(i: u32) -> String {
    format!("+1555000{i:04}")
}

/// The chat id of synthetic client `i`.
pub fn client_chat_id(i: u32) -> String {
    format!("lb-chat-{i:04}")
}

/// Generates message `n` (1-based) of a run with id prefix `prefix`.
pub fn inbound(config: &Config, prefix: &str, n: u64) -> Inbound {
    let client = (n % u64::from(config.clients)) as u32;
    Inbound {
        external_chat_id: client_chat_id(client),
        external_message_id: format!("{prefix}-{n}"),
        sender: Sender {
            id: None,
            phone: Some(client_phone(client)),
            username: None,
            name: Some(format!("Client {client:04}")),
        },
        text: format!("message {n} from client {client:04}"),
        attachments: Vec::new(),
        sent_at: chrono::Utc::now().fixed_offset(),
    }
}

/// An inbound event whose attachments array is at least `bytes` bytes of JSON.
fn oversize_event(prefix: &str, bytes: usize) -> Vec<u8> {
    let chunk = "x".repeat(1000);
    let attachments: Vec<serde_json::Value> = (0..bytes.div_ceil(1004))
        .map(|_| serde_json::Value::from(chunk.as_str()))
        .collect();
    let event = serde_json::json!({
        "type": "inbound", "external_chat_id": "oversize",
        "external_message_id": format!("{prefix}-oversize"),
        "sender": {"name": "Oversize"}, "text": "oversize attachments",
        "attachments": attachments, "sent_at": chrono::Utc::now().to_rfc3339(),
    });
    serde_json::to_vec(&event).unwrap_or_default()
}

/// State shared by the connector and its task.
pub(crate) struct Shared {
    pub config: Config,
    pub host: Host,
    /// Whether this start injects the configured faults (see `fault_starts`).
    pub faulty: AtomicBool,
    pub state: Mutex<Status>,
    pub counters: Counters,
}

impl Shared {
    pub fn set_state(&self, status: Status) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// Emits, backing off while the host is busy (counted in `busy_retries`); once
    /// `cancel` is cancelled, waits at most `DRAIN_WAIT` for a busy host.
    async fn emit_bytes(&self, bytes: &[u8], cancel: &CancellationToken) -> Result<(), EmitError> {
        match self.host.emit_raw(bytes) {
            Err(EmitError::Busy) => self.counters.incr("busy_retries"),
            other => return other,
        }
        if cancel.is_cancelled() {
            return runtime::emit_raw(
                &self.host,
                bytes,
                Some(DRAIN_WAIT),
                &CancellationToken::new(),
            )
            .await;
        }
        runtime::emit_raw(&self.host, bytes, None, cancel).await
    }

    async fn emit(&self, event: &Event, cancel: &CancellationToken) -> Result<(), EmitError> {
        let bytes = serde_json::to_vec(event).map_err(|_| EmitError::Closed)?;
        self.emit_bytes(&bytes, cancel).await
    }

    /// Records and emits a status; `Host::emit` directly, for the calls the host makes
    /// (start, stop) on its own thread.
    pub fn emit_status_now(&self, status: Status) -> Result<(), EmitError> {
        self.set_state(status.clone());
        self.host.emit(&Event::Status(status))
    }

    async fn emit_status(
        &self,
        status: Status,
        cancel: &CancellationToken,
    ) -> Result<(), EmitError> {
        self.set_state(status.clone());
        self.emit(&Event::Status(status), cancel).await
    }

    /// Emits a test probe: a refusal is counted, not fatal; `Err` only when stopping.
    async fn emit_probe(&self, bytes: &[u8], cancel: &CancellationToken) -> Result<(), EmitError> {
        match self.emit_bytes(bytes, cancel).await {
            Err(_) if cancel.is_cancelled() => Err(EmitError::Closed),
            Err(e) => {
                self.counters.incr("refused");
                let size = bytes.len();
                self.host.log(
                    Level::Warn,
                    &format!("loopback: a probe event of {size} bytes was refused: {e}"),
                );
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    fn connected_status(&self) -> Status {
        Status {
            number: Some(self.config.number.clone()),
            display_name: Some(self.config.display_name.clone()),
            ..Status::new(ChannelState::Connected)
        }
    }
}

/// Sleeps `d` unless `cancel` comes first; returns whether it was cancelled.
async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = cancel.cancelled() => true,
    }
}

/// The instance's task (see the module doc).
pub(crate) async fn run(
    shared: std::sync::Arc<Shared>,
    prefix: String,
    mut receipts: UnboundedReceiver<Receipt>,
    cancel: CancellationToken,
) {
    let c = &shared.config;
    if c.connect_delay_ms > 0 && pause(Duration::from_millis(c.connect_delay_ms), &cancel).await {
        return;
    }
    if shared
        .emit_status(shared.connected_status(), &cancel)
        .await
        .is_err()
    {
        return;
    }
    let line = match &c.secret {
        // Leaked on purpose (see `Config::secret`); a real connector never does this.
        Some(secret) => format!("loopback {} connected with secret {secret}", c.number),
        None => format!("loopback {} connected", c.number),
    };
    shared.host.log(Level::Info, &line);

    let faulty = shared.faulty.load(Ordering::Relaxed);
    if faulty && c.malformed_events {
        for bad in MALFORMED {
            if shared.emit_bytes(bad, &cancel).await.is_err() {
                return;
            }
            shared.counters.incr("malformed");
        }
    }
    for raw in &c.raw_events {
        if shared.emit_probe(raw.as_bytes(), &cancel).await.is_err() {
            return;
        }
    }
    if c.oversize_event_bytes > 0 {
        let big = oversize_event(&prefix, c.oversize_event_bytes);
        if shared.emit_probe(&big, &cancel).await.is_err() {
            return;
        }
    }
    let failing = match c.report_error.as_ref().filter(|_| faulty) {
        Some(reason) => {
            let after = Duration::from_millis(c.report_error_after_ms);
            if !after.is_zero() && pause(after, &cancel).await {
                return;
            }
            let error = Status::new(ChannelState::Error).with_reason(reason.clone());
            if shared.emit_status(error, &cancel).await.is_err() {
                return;
            }
            true
        }
        None => false,
    };

    let mut n: u64 = 0;
    let under_limit = |n: u64| !failing && (c.limit == 0 || n < c.limit);
    let emit_receipt = async |r: Receipt| -> Result<(), EmitError> {
        shared.emit(&Event::Receipt(r), &cancel).await?;
        shared.counters.incr("receipts");
        Ok(())
    };
    let emit_next = async |n: &mut u64| -> Result<(), EmitError> {
        let m = inbound(c, &prefix, *n + 1);
        shared.emit(&Event::Inbound(m), &cancel).await?;
        *n += 1;
        shared.counters.incr("inbound");
        Ok(())
    };

    for _ in 0..c.burst {
        if cancel.is_cancelled() || !under_limit(n) {
            break;
        }
        if emit_next(&mut n).await.is_err() {
            return;
        }
        while let Ok(r) = receipts.try_recv() {
            if emit_receipt(r).await.is_err() {
                return;
            }
        }
    }

    let interval = (c.rate_per_sec > 0.0).then(|| Duration::from_secs_f64(1.0 / c.rate_per_sec));
    let mut due = Instant::now();
    loop {
        let generating = interval.is_some() && under_limit(n);
        // Not generating: wait for a receipt or the token, nothing else.
        tokio::select! {
            () = cancel.cancelled() => break,
            r = receipts.recv() => match r {
                Some(r) => {
                    if emit_receipt(r).await.is_err() {
                        return;
                    }
                    continue;
                }
                None => break,
            },
            () = tokio::time::sleep_until(due), if generating => {}
        }
        if let Some(interval) = interval {
            if emit_next(&mut n).await.is_err() {
                return;
            }
            due += interval;
            let now = Instant::now();
            // More than a second behind (a slow host): drop the backlog rather than
            // burst to catch up.
            if now.saturating_duration_since(due) > Duration::from_secs(1) {
                due = now;
            }
        }
    }
    // Receipts for sends that happened before stop still go out.
    while let Ok(r) = receipts.try_recv() {
        if emit_receipt(r).await.is_err() {
            return;
        }
    }
}
