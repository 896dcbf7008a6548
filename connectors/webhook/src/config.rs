//! The channel config object of a webhook channel: its keys, defaults and the checks
//! serde cannot express (through the SDK's `runtime::config` helpers). Unknown keys are
//! refused, so a typo (`max_skew_sec`) cannot silently fall back to a default, and the
//! secrets never appear in errors or debug output.

use std::time::Duration;

use patchbay_connector_sdk::ConnectorError;
use patchbay_connector_sdk::runtime::config::{
    in_range, invalid, listen_addr, parse_checked, secret_invalid, url_path,
};
use serde::Deserialize;

/// The largest inbound body: an event must fit the host's 1 MiB payload limit, with
/// room for the fields the connector adds around the gateway's JSON.
pub const MAX_BODY_BYTES: usize = 1024 * 1024 - 4096;
/// The largest `max_connections`: each connection is a file descriptor of the daemon's.
pub const MAX_CONNECTIONS: usize = patchbay_connector_sdk::runtime::http::MAX_CONNECTIONS;
/// The daemon runs each call under a 30 s timeout; all of a send's attempts must fit.
pub const SEND_BUDGET: Duration = Duration::from_secs(25);
const KIND: &str = "webhook";

/// The channel config object.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shared HMAC secret for inbound requests (and outbound, unless `outbound_secret`).
    pub secret: String,
    /// `host:port` to listen on; port 0 picks a free port (reported in the status).
    /// Channels with the same `listen` (not port 0) share one listener, routed by `path`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The path inbound messages are POSTed to; one channel per listen address and path.
    #[serde(default = "default_path")]
    pub path: String,
    /// Largest accepted timestamp distance from this server's clock, either way.
    #[serde(default = "default_max_skew")]
    pub max_skew_secs: u64,
    /// Largest accepted request body; larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// No longer used: every channel runs on the plugin's one shared runtime (sized by
    /// `PATCHBAY_CONNECTOR_THREADS`). Still accepted, so existing configs load.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Connections the listener serves at once; the next ones get 503 and are closed.
    /// Channels sharing a listener share this bound: the first one's value holds.
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
        parse_checked(KIND, value, Config::validate)
    }

    fn validate(&self) -> Result<(), ConnectorError> {
        let bad = |key: &str, value: &dyn std::fmt::Debug, allowed: &str| {
            Err(invalid(KIND, key, value, allowed))
        };
        // Never echo secrets into errors: name the key and the problem only.
        if self.secret.len() < 16 {
            return Err(secret_invalid(KIND, "secret", "must be at least 16 bytes"));
        }
        if matches!(&self.outbound_secret, Some(s) if s.len() < 16) {
            return Err(secret_invalid(
                KIND,
                "outbound_secret",
                "must be at least 16 bytes",
            ));
        }
        listen_addr(KIND, "listen", &self.listen, 8088)?;
        url_path(KIND, "path", &self.path, "/patchbay/inbound")?;
        in_range(KIND, "max_skew_secs", self.max_skew_secs, 1..=86_400)?;
        in_range(
            KIND,
            "max_body_bytes",
            self.max_body_bytes,
            1..=MAX_BODY_BYTES,
        )?;
        in_range(KIND, "workers", self.workers, 1..=64)?;
        in_range(
            KIND,
            "max_connections",
            self.max_connections,
            1..=MAX_CONNECTIONS,
        )?;
        if let Some(url) = &self.outbound_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return bad("outbound_url", url, "an http:// or https:// URL");
        }
        in_range(
            KIND,
            "outbound_timeout_secs",
            self.outbound_timeout_secs,
            1..=20,
        )?;
        in_range(KIND, "outbound_attempts", self.outbound_attempts, 1..=10)?;
        if u64::from(self.outbound_attempts) * self.outbound_timeout_secs > SEND_BUDGET.as_secs() {
            return bad(
                "outbound_attempts",
                &self.outbound_attempts,
                "outbound_attempts x outbound_timeout_secs must be at most 25 s (the daemon gives a send 30 s)",
            );
        }
        Ok(())
    }

    /// The key outbound requests are signed with.
    pub fn outbound_key(&self) -> &[u8] {
        self.outbound_secret
            .as_deref()
            .unwrap_or(&self.secret)
            .as_bytes()
    }
}
