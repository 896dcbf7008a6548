//! The channel config object of a telegram channel: its keys, defaults and the checks
//! serde cannot express (through the SDK's `runtime::config` helpers). Unknown keys are
//! refused, and the token never appears in errors or debug output.

use std::path::PathBuf;
use std::time::Duration;

use patchbay_connector_sdk::ConnectorError;
use patchbay_connector_sdk::runtime::config::{
    https_or_loopback, in_range, invalid, parse_checked, secret_invalid,
};
use serde::Deserialize;

/// The public Bot API.
pub const DEFAULT_API_BASE: &str = "https://api.telegram.org";
const KIND: &str = "telegram";

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
        parse_checked(KIND, value, Config::validate)
    }

    fn validate(&self) -> Result<(), ConnectorError> {
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
            return Err(secret_invalid(
                KIND,
                "token",
                "must look like <bot id>:<secret> as @BotFather gives it",
            ));
        }
        // The token travels in every request's path: plain HTTP only to a loopback
        // address (a local Bot API server, a test fake).
        if let Err(allowed) = https_or_loopback(&self.api_base) {
            return Err(invalid(KIND, "api_base", &self.api_base, allowed));
        }
        in_range(KIND, "poll_timeout_secs", self.poll_timeout_secs, 0..=50)?;
        if !(1..=25).contains(&self.request_timeout_secs) {
            return Err(invalid(
                KIND,
                "request_timeout_secs",
                &self.request_timeout_secs,
                "1 to 25 (the daemon gives a send 30 s)",
            ));
        }
        Ok(())
    }

    /// The bot's id: the token's part before the colon (not secret).
    pub fn bot_id(&self) -> &str {
        self.token.split(':').next().unwrap_or_default()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}
