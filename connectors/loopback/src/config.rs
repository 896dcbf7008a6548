//! The loopback channel's config object: traffic shape, identity, and the faults a test
//! can inject.

use patchbay_connector_sdk::{ConnectorError, ReceiptStatus};
use serde::Deserialize;

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
    /// How long after `connected` `report_error` is emitted: a status change that the
    /// daemon must learn from the event, long before any liveness check.
    pub report_error_after_ms: u64,
    /// `status` sleeps this long before answering (0 = answers at once): a connector
    /// that hangs, for the daemon's liveness check to catch.
    pub hang_status_ms: u64,
    /// A stand-in credential, declared secret: loopback writes it into its "connected"
    /// log line on purpose, so tests can check that the host scrubs it.
    pub secret: Option<String>,
    /// The faults above apply to the first `fault_starts` starts of this configuration
    /// in the process only, later starts run clean (0 = every start): a channel that
    /// fails, is restarted by the daemon, and recovers.
    pub fault_starts: u64,
    /// A folder where each running instance holds a lock file for its `number`; a
    /// second live instance of the same number records the overlap there and fails its
    /// start (see `exclusive`). For tests of "one instance per channel" across daemons.
    pub exclusive_dir: Option<String>,
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
            report_error_after_ms: 0,
            hang_status_ms: 0,
            secret: None,
            fault_starts: 0,
            exclusive_dir: None,
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
        if self.report_error_after_ms > 3_600_000 {
            return bad(
                "report_error_after_ms",
                &self.report_error_after_ms,
                "0 to 3600000",
            );
        }
        if let Some(d) = &self.exclusive_dir
            && !(d.starts_with('/') && std::path::Path::new(d).is_dir())
        {
            return bad(
                "exclusive_dir",
                d,
                "an existing folder, as an absolute path",
            );
        }
        if self.hang_status_ms > 600_000 {
            return bad("hang_status_ms", &self.hang_status_ms, "0 to 600000");
        }
        Ok(())
    }
}
