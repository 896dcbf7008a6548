//! loopback: a simulated messenger connector for demos, tests and benchmarks, built as
//! `libloopback.so` (kind `loopback`). It "connects" at once (or after
//! `connect_delay_ms`), generates inbound traffic from `clients` synthetic senders at
//! `rate_per_sec` and/or as a `burst`, accepts every send and echoes a delivery receipt,
//! and can inject faults (failing or panicking start/send, malformed events, an error
//! reported while running), on every start or only on the first few of a channel.
//!
//! Written against the safe SDK only: this crate has no `unsafe`.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use patchbay_connector_sdk::{
    ChannelState, Connector, ConnectorError, EmitError, Event, Host, Inbound, Level, Outbound,
    Receipt, ReceiptStatus, Sender, Sent, Status, chrono, export_connector,
};
use serde::Deserialize;

export_connector!(
    Loopback,
    kind = "loopback",
    version = env!("CARGO_PKG_VERSION"),
    secrets = ["secret"]
);

/// Most distinct synthetic clients: their phones are `+1555000NNNN`.
pub const MAX_CLIENTS: u32 = 10_000;

/// The channel config object. Unknown keys are an error (a typo should not silently
/// disable a fault the test meant to inject).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The number reported once connected.
    pub number: String,
    /// The display name reported once connected.
    pub display_name: String,
    /// Synthetic inbound messages per second; 0 = none.
    pub rate_per_sec: f64,
    /// Distinct synthetic senders, 1..=10000; message n comes from client n % clients.
    pub clients: u32,
    /// Queue a receipt for every send (status `receipt_status`).
    pub echo_receipts: bool,
    /// The status of echoed receipts.
    pub receipt_status: ReceiptStatus,
    /// Inbound messages emitted as fast as the host takes them, right after connecting
    /// (backing off on BUSY), before the `rate_per_sec` traffic.
    pub burst: u64,
    /// Stop generating after this many inbound messages in total; 0 = no limit.
    pub limit: u64,
    /// Prefix of external ids. Unset: random per start. Set: ids repeat across restarts
    /// (`<prefix>-<n>`), which exercises the host's de-duplication.
    pub id_prefix: Option<String>,
    /// Delay between `connecting` and `connected`.
    pub connect_delay_ms: u64,
    /// `start` emits `error` status and fails (retryable `start_failed`).
    pub fail_start: bool,
    /// `send` fails with retryable `unavailable`.
    pub fail_send: bool,
    /// `start` panics.
    pub panic_on_start: bool,
    /// `send` panics.
    pub panic_on_send: bool,
    /// Right after `connected`, emit the `MALFORMED` events (invalid JSON, unknown type,
    /// missing fields, non-UTF-8), then carry on normally.
    pub malformed_events: bool,
    /// Right after `connected` (and any malformed events), emit each of these strings
    /// verbatim as one event, then carry on normally: tests of the host's bounds with
    /// events no `Event` value can express (nested too deep, say). A refused one is
    /// counted in `details.refused` and skipped.
    pub raw_events: Vec<String>,
    /// After the raw events, one inbound event (`<prefix>-oversize`) whose
    /// `attachments` array is at least this many bytes of JSON; 0 = none.
    pub oversize_event_bytes: usize,
    /// Right after `connected` (and any malformed events), report status `error` with
    /// this reason and stay there, generating no traffic: a connector whose messenger
    /// refuses it while its threads run on.
    pub report_error: Option<String>,
    /// A stand-in credential, declared secret: loopback writes it into its "connected"
    /// log line on purpose, so tests can check that the host scrubs it.
    pub secret: Option<String>,
    /// The faults above apply to the first `fault_starts` starts of this configuration
    /// in the process only, later starts run clean (0 = every start): a channel that
    /// fails, is restarted by the daemon, and recovers.
    pub fault_starts: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            number: "+15550000000".into(),
            display_name: "Loopback".into(),
            rate_per_sec: 0.0,
            clients: 10,
            echo_receipts: true,
            receipt_status: ReceiptStatus::Delivered,
            burst: 0,
            limit: 0,
            id_prefix: None,
            connect_delay_ms: 0,
            fail_start: false,
            fail_send: false,
            panic_on_start: false,
            panic_on_send: false,
            malformed_events: false,
            raw_events: Vec::new(),
            oversize_event_bytes: 0,
            report_error: None,
            secret: None,
            fault_starts: 0,
        }
    }
}

/// The bad events `malformed_events` emits, in order.
pub const MALFORMED: [&[u8]; 4] = [
    b"{\"type\":\"inbound\",",
    b"{\"type\":\"teleport\",\"to\":\"mars\"}",
    b"{\"type\":\"inbound\",\"text\":\"no ids, no sender\"}",
    b"\xff\xfe not utf-8",
];

impl Config {
    pub fn parse(value: serde_json::Value) -> Result<Config, ConnectorError> {
        let c: Config = serde_json::from_value(value)
            .map_err(|e| ConnectorError::config(format!("loopback config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConnectorError> {
        let bad = |key: &str, value: &dyn std::fmt::Debug, allowed: &str| {
            Err(ConnectorError::config(format!(
                "loopback config: {key} = {value:?}: {allowed}"
            )))
        };
        // Within the host's bounds, so a long value is refused here instead of the
        // host dropping the status events that carry it.
        if self.number.trim().is_empty() || self.number.chars().count() > 256 {
            return bad("number", &self.number, "1 to 256 characters");
        }
        if self.display_name.chars().count() > 256 {
            return bad("display_name", &self.display_name, "at most 256 characters");
        }
        if let Some(r) = &self.report_error
            && (r.trim().is_empty() || r.chars().count() > 1024)
        {
            return bad("report_error", r, "1 to 1024 characters");
        }
        if !self.rate_per_sec.is_finite() || !(0.0..=1_000_000.0).contains(&self.rate_per_sec) {
            return bad(
                "rate_per_sec",
                &self.rate_per_sec,
                "0 to 1000000 messages per second",
            );
        }
        if self.raw_events.len() > 100 {
            return bad("raw_events", &self.raw_events.len(), "at most 100 events");
        }
        if self.oversize_event_bytes > 4 << 20 {
            return bad(
                "oversize_event_bytes",
                &self.oversize_event_bytes,
                "0 to 4194304 bytes",
            );
        }
        if !(1..=MAX_CLIENTS).contains(&self.clients) {
            return bad("clients", &self.clients, "1 to 10000");
        }
        if let Some(p) = &self.id_prefix {
            let ok = (1..=32).contains(&p.len())
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return bad("id_prefix", p, "1 to 32 characters of [A-Za-z0-9_-]");
            }
        }
        if self.connect_delay_ms > 60_000 {
            return bad("connect_delay_ms", &self.connect_delay_ms, "0 to 60000");
        }
        Ok(())
    }
}

/// Starts so far of each configuration (its JSON text), for `fault_starts`: the daemon
/// creates a new instance for every restart, so the count lives in the library.
static STARTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Counts one more start of the configuration `key`; returns its number (1-based).
fn count_start(key: &str) -> u64 {
    let mut starts = STARTS.lock().unwrap_or_else(|p| p.into_inner());
    let n = starts.entry(key.to_owned()).or_insert(0);
    *n += 1;
    *n
}

/// The phone of synthetic client `i`.
pub fn client_phone(i: u32) -> String {
    format!("+1555000{i:04}")
}

/// The chat id of synthetic client `i`.
pub fn client_chat_id(i: u32) -> String {
    format!("lb-chat-{i:04}")
}

#[derive(Default)]
struct Counters {
    inbound: AtomicU64,
    sent: AtomicU64,
    receipts: AtomicU64,
    busy_retries: AtomicU64,
    malformed: AtomicU64,
    refused: AtomicU64,
}

/// State shared by the connector and its traffic thread.
struct Shared {
    config: Config,
    host: Host,
    stop: AtomicBool,
    /// Whether this start injects the configured faults (see `fault_starts`).
    faulty: AtomicBool,
    state: Mutex<Status>,
    counters: Counters,
}

impl Shared {
    fn set_state(&self, status: Status) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// Emits, backing off on BUSY. Once stopping, gives up after ~0.5 s of BUSY so stop
    /// stays prompt. Returns whether the host took it.
    /// Emits a test probe: a refusal is counted, not fatal; `Err` only when stopping.
    fn emit_probe(&self, bytes: &[u8]) -> Result<(), EmitError> {
        match self.emit_bytes(bytes) {
            Err(_) if self.stop.load(Ordering::Relaxed) => Err(EmitError::Closed),
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
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

    fn emit_bytes(&self, bytes: &[u8]) -> Result<(), EmitError> {
        let mut pause = Duration::from_millis(1);
        let mut busy_while_stopping = 0;
        loop {
            match self.host.emit_raw(bytes) {
                Err(EmitError::Busy) => {
                    self.counters.busy_retries.fetch_add(1, Ordering::Relaxed);
                    if self.stop.load(Ordering::Relaxed) {
                        busy_while_stopping += 1;
                        if busy_while_stopping > 10 {
                            return Err(EmitError::Busy);
                        }
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn emit(&self, event: &Event) -> Result<(), EmitError> {
        let bytes = serde_json::to_vec(event).map_err(|_| EmitError::Closed)?;
        self.emit_bytes(&bytes)
    }

    fn emit_status(&self, status: Status) -> Result<(), EmitError> {
        self.set_state(status.clone());
        self.emit(&Event::Status(status))
    }

    fn connected_status(&self) -> Status {
        Status {
            number: Some(self.config.number.clone()),
            display_name: Some(self.config.display_name.clone()),
            ..Status::new(ChannelState::Connected)
        }
    }
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

/// The traffic thread: connects, injects malformed events, runs the burst and the
/// rate, and emits queued receipts, until `stop` is set or the host refuses events.
fn run(shared: Arc<Shared>, prefix: String, receipts: Receiver<Receipt>) {
    let c = &shared.config;
    let stopped = || shared.stop.load(Ordering::Relaxed);
    let tick = Duration::from_millis(20);

    // Connecting → connected, staying responsive to stop during the delay.
    let connect_at = Instant::now() + Duration::from_millis(c.connect_delay_ms);
    while Instant::now() < connect_at {
        if stopped() {
            return;
        }
        std::thread::sleep(tick.min(connect_at.saturating_duration_since(Instant::now())));
    }
    if shared.emit_status(shared.connected_status()).is_err() {
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
            if shared.emit_bytes(bad).is_err() {
                return;
            }
            shared.counters.malformed.fetch_add(1, Ordering::Relaxed);
        }
    }
    for raw in &c.raw_events {
        if shared.emit_probe(raw.as_bytes()).is_err() {
            return;
        }
    }
    if c.oversize_event_bytes > 0 {
        let big = oversize_event(&prefix, c.oversize_event_bytes);
        if shared.emit_probe(&big).is_err() {
            return;
        }
    }
    let failing = match c.report_error.as_ref().filter(|_| faulty) {
        Some(reason) => {
            let error = Status::new(ChannelState::Error).with_reason(reason.clone());
            if shared.emit_status(error).is_err() {
                return;
            }
            true
        }
        None => false,
    };

    let mut n: u64 = 0;
    let under_limit = |n: u64| !failing && (c.limit == 0 || n < c.limit);
    let emit_receipt = |r: Receipt| -> Result<(), EmitError> {
        shared.emit(&Event::Receipt(r))?;
        shared.counters.receipts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    let emit_next = |n: &mut u64| -> Result<(), EmitError> {
        let m = inbound(c, &prefix, *n + 1);
        shared.emit(&Event::Inbound(m))?;
        *n += 1;
        shared.counters.inbound.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };

    for _ in 0..c.burst {
        if stopped() || !under_limit(n) {
            break;
        }
        if emit_next(&mut n).is_err() {
            return;
        }
        while let Ok(r) = receipts.try_recv() {
            if emit_receipt(r).is_err() {
                return;
            }
        }
    }

    let interval = (c.rate_per_sec > 0.0).then(|| Duration::from_secs_f64(1.0 / c.rate_per_sec));
    let mut due = Instant::now();
    loop {
        if stopped() {
            break;
        }
        let generating = interval.is_some() && under_limit(n);
        // Not generating: sleep until a receipt is queued or `stop` (which drops the
        // sender, ending the wait at once); `recv_timeout` takes `MAX` as "no timeout".
        let wait = if generating {
            due.saturating_duration_since(Instant::now()).min(tick)
        } else {
            Duration::MAX
        };
        match receipts.recv_timeout(wait) {
            Ok(r) => {
                if emit_receipt(r).is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let (true, Some(interval)) = (generating, interval) {
            let now = Instant::now();
            if now >= due {
                if emit_next(&mut n).is_err() {
                    return;
                }
                due += interval;
                // More than a second behind (a slow host): drop the backlog rather
                // than burst to catch up.
                if now.saturating_duration_since(due) > Duration::from_secs(1) {
                    due = now;
                }
            }
        }
    }
    // Receipts for sends that happened before stop still go out.
    while let Ok(r) = receipts.try_recv() {
        if emit_receipt(r).is_err() {
            return;
        }
    }
}

/// One loopback channel.
pub struct Loopback {
    shared: Arc<Shared>,
    /// The configuration's JSON text, counting its starts for `fault_starts`.
    key: String,
    prefix: String,
    receipts: Option<mpsc::Sender<Receipt>>,
    thread: Option<JoinHandle<()>>,
}

impl Loopback {
    fn join(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.receipts = None;
        if let Some(Err(_)) = self.thread.take().map(JoinHandle::join) {
            self.shared
                .host
                .log(Level::Error, "loopback traffic thread panicked");
        }
    }
}

impl Connector for Loopback {
    fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
        let key = config.to_string();
        // The daemon may pass null for "no config": all defaults.
        let config = if config.is_null() {
            Config::default()
        } else {
            Config::parse(config)?
        };
        let prefix = match &config.id_prefix {
            Some(p) => p.clone(),
            None => format!("lb{:08x}", RandomState::new().hash_one(0u8) as u32),
        };
        Ok(Loopback {
            shared: Arc::new(Shared {
                config,
                host,
                stop: AtomicBool::new(false),
                // Decided at start; the faults hold until then.
                faulty: AtomicBool::new(true),
                state: Mutex::new(
                    Status::new(ChannelState::Disconnected).with_reason("not started"),
                ),
                counters: Counters::default(),
            }),
            key,
            prefix,
            receipts: None,
            thread: None,
        })
    }

    fn start(&mut self) -> Result<(), ConnectorError> {
        let c = &self.shared.config;
        if self.thread.is_some() {
            return Err(ConnectorError::new(
                "already_started",
                "loopback is already running",
            ));
        }
        let faulty = c.fault_starts == 0 || count_start(&self.key) <= c.fault_starts;
        self.shared.faulty.store(faulty, Ordering::Relaxed);
        if faulty && c.panic_on_start {
            panic!("loopback: panic_on_start is set");
        }
        let _ = self
            .shared
            .emit_status(Status::new(ChannelState::Connecting));
        if faulty && c.fail_start {
            let reason = "fail_start is set";
            let _ = self
                .shared
                .emit_status(Status::new(ChannelState::Error).with_reason(reason));
            return Err(ConnectorError::new("start_failed", reason).retryable());
        }
        let (tx, rx) = mpsc::channel();
        let shared = self.shared.clone();
        let prefix = self.prefix.clone();
        let thread = std::thread::Builder::new()
            .name(format!("loopback-{}", self.prefix))
            .spawn(move || run(shared, prefix, rx))
            .map_err(|e| {
                ConnectorError::new("start_failed", format!("cannot spawn thread: {e}")).retryable()
            })?;
        self.receipts = Some(tx);
        self.thread = Some(thread);
        Ok(())
    }

    fn send(&mut self, msg: Outbound) -> Result<Sent, ConnectorError> {
        let c = &self.shared.config;
        let faulty = self.shared.faulty.load(Ordering::Relaxed);
        if faulty && c.panic_on_send {
            panic!("loopback: panic_on_send is set");
        }
        if faulty && c.fail_send {
            return Err(ConnectorError::new("unavailable", "fail_send is set").retryable());
        }
        if msg.external_chat_id.is_empty() && msg.to.phone.is_none() && msg.to.username.is_none() {
            return Err(ConnectorError::new(
                "invalid_message",
                "no recipient: external_chat_id, to.phone and to.username are all empty",
            ));
        }
        let n = self.shared.counters.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let external_message_id = format!("{}-out-{n}", self.prefix);
        if let Some(tx) = self.receipts.as_ref().filter(|_| c.echo_receipts) {
            let _ = tx.send(Receipt {
                message: msg.message,
                status: c.receipt_status,
                external_message_id: Some(external_message_id.clone()),
                reason: (c.receipt_status == ReceiptStatus::Failed)
                    .then(|| "receipt_status is failed".to_owned()),
            });
        }
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
        s.details = Some(serde_json::json!({
            "id_prefix": self.prefix,
            "inbound": k.inbound.load(Ordering::Relaxed),
            "sent": k.sent.load(Ordering::Relaxed),
            "receipts": k.receipts.load(Ordering::Relaxed),
            "busy_retries": k.busy_retries.load(Ordering::Relaxed),
            "malformed": k.malformed.load(Ordering::Relaxed),
            "refused": k.refused.load(Ordering::Relaxed),
        }));
        s
    }

    fn stop(&mut self) -> Result<(), ConnectorError> {
        self.join();
        let _ = self
            .shared
            .emit_status(Status::new(ChannelState::Disconnected).with_reason("stopped"));
        Ok(())
    }
}

impl Drop for Loopback {
    // destroy without stop (after a panic, or a careless host): still join the thread.
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_validation() {
        assert_eq!(Config::parse(json!({})).unwrap(), Config::default());
        let c = Config::parse(json!({"rate_per_sec": 5.5, "clients": 3, "id_prefix": "run-1"}))
            .unwrap();
        assert_eq!(c.clients, 3);
        for bad in [
            json!({"rate_per_sec": -1}),
            json!({"clients": 0}),
            json!({"clients": 10001}),
            json!({"number": " "}),
            json!({"id_prefix": "has space"}),
            json!({"echo_reciepts": false}),
            json!({"receipt_status": "lost"}),
            json!("not an object"),
        ] {
            let e = Config::parse(bad.clone()).unwrap_err();
            assert_eq!(e.code, "invalid_config", "{bad}");
        }
        let e = Config::parse(json!({"clients": 0})).unwrap_err();
        assert!(
            e.message.contains("clients = 0: 1 to 10000"),
            "{}",
            e.message
        );
    }

    #[test]
    fn synthetic_messages() {
        let c = Config {
            clients: 3,
            ..Config::default()
        };
        let m = inbound(&c, "p", 4);
        assert_eq!(m.external_message_id, "p-4");
        assert_eq!(m.external_chat_id, "lb-chat-0001");
        assert_eq!(m.sender.phone.as_deref(), Some("+15550000001"));
        assert_eq!(client_phone(9999), "+15550009999");
        Event::Inbound(m).validate().unwrap();
    }

    #[test]
    fn send_without_host_and_faults() {
        let mut lb = Loopback::create(json!({"id_prefix": "t"}), Host::detached()).unwrap();
        let msg = Outbound {
            message: 1,
            external_chat_id: "lb-chat-0001".into(),
            to: Default::default(),
            text: "hi".into(),
            attachments: vec![],
        };
        assert_eq!(lb.send(msg.clone()).unwrap().external_message_id, "t-out-1");
        let no_to = Outbound {
            external_chat_id: String::new(),
            ..msg.clone()
        };
        assert_eq!(lb.send(no_to).unwrap_err().code, "invalid_message");
        let mut failing = Loopback::create(json!({"fail_send": true}), Host::detached()).unwrap();
        let e = failing.send(msg).unwrap_err();
        assert!(e.retryable);
        let mut fs = Loopback::create(json!({"fail_start": true}), Host::detached()).unwrap();
        assert_eq!(fs.start().unwrap_err().code, "start_failed");
    }

    #[test]
    fn start_stop_with_detached_host_ends_promptly() {
        let mut lb = Loopback::create(json!({"rate_per_sec": 1000}), Host::detached()).unwrap();
        lb.start().unwrap();
        lb.stop().unwrap();
        assert_eq!(lb.status().state, ChannelState::Disconnected);
    }

    #[test]
    fn faults_apply_to_the_first_starts_only() {
        // A config of its own: the start count is per configuration and process.
        let config = json!({"fail_start": true, "fault_starts": 2, "id_prefix": "fs"});
        for expect_fail in [true, true, false, false] {
            let mut lb = Loopback::create(config.clone(), Host::detached()).unwrap();
            assert_eq!(lb.start().is_err(), expect_fail);
            lb.stop().unwrap();
        }
        let mut always = Loopback::create(json!({"fail_start": true}), Host::detached()).unwrap();
        assert!(always.start().is_err(), "0 = every start");
        for bad in [
            json!({"report_error": ""}),
            json!({"report_error": "x".repeat(1025)}),
            json!({"number": "1".repeat(257)}),
            json!({"display_name": "n".repeat(257)}),
        ] {
            assert_eq!(Config::parse(bad).unwrap_err().code, "invalid_config");
        }
    }

    #[test]
    fn malformed_events_are_really_malformed() {
        for bad in MALFORMED {
            assert!(Event::parse(bad).is_err());
        }
    }
}
