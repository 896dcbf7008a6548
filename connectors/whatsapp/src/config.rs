//! The channel config object of a whatsapp channel: its keys, defaults and the checks
//! serde cannot express. Unknown keys are refused, and the three secrets
//! (`access_token`, `app_secret`, `verify_token`) never appear in errors or debug output.

use patchbay_connector_sdk::ConnectorError;
use patchbay_connector_sdk::runtime::config::{
    https_or_loopback, in_range, invalid, listen_addr, parse_checked, secret_invalid, url_path,
};
use serde::Deserialize;

/// Meta's Graph API.
pub const DEFAULT_GRAPH_BASE: &str = "https://graph.facebook.com";
/// The Graph API version the connector is written against.
pub const DEFAULT_API_VERSION: &str = "v21.0";
/// The largest inbound body accepted at all: the SDK listener's bound.
pub const MAX_BODY_BYTES: usize = patchbay_connector_sdk::runtime::http::MAX_BODY_BYTES;
/// Meta documents webhook batches of up to 3 MB.
pub const DEFAULT_BODY_BYTES: usize = 3 * 1024 * 1024;
const KIND: &str = "whatsapp";

#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The business number's id in the Graph API (not the phone number itself).
    pub phone_number_id: String,
    /// A system user's (or temporary) access token with `whatsapp_business_messaging`.
    pub access_token: String,
    /// The Meta app's secret: `X-Hub-Signature-256` is an HMAC with it.
    pub app_secret: String,
    /// The token typed into the app's webhook setup, echoed in the GET handshake.
    pub verify_token: String,
    /// The Graph API server; https://, or http:// to a loopback address only.
    #[serde(default = "default_graph_base")]
    pub graph_base: String,
    /// `vNN.N`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// `ip:port` of the webhook listener; channels with the same `listen` and `path`
    /// share one listener, which routes by `phone_number_id`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The webhook path registered with Meta.
    #[serde(default = "default_path")]
    pub path: String,
    /// Largest webhook body; larger ones get 413 before they are read.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Timeout of one Graph API call.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Shown in `channel.list`; defaults to the number's verified name.
    #[serde(default)]
    pub display_name: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("phone_number_id", &self.phone_number_id)
            .field("access_token", &"<redacted>")
            .field("app_secret", &"<redacted>")
            .field("verify_token", &"<redacted>")
            .field("graph_base", &self.graph_base)
            .field("api_version", &self.api_version)
            .field("listen", &self.listen)
            .field("path", &self.path)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("display_name", &self.display_name)
            .finish()
    }
}

fn default_graph_base() -> String {
    DEFAULT_GRAPH_BASE.into()
}
fn default_api_version() -> String {
    DEFAULT_API_VERSION.into()
}
fn default_listen() -> String {
    "127.0.0.1:8089".into()
}
fn default_path() -> String {
    "/whatsapp/webhook".into()
}
fn default_max_body() -> usize {
    DEFAULT_BODY_BYTES
}
fn default_request_timeout() -> u64 {
    10
}

/// `v` and a dotted number: `v21.0`.
fn valid_version(v: &str) -> bool {
    v.strip_prefix('v').is_some_and(|rest| {
        !rest.is_empty()
            && rest.split('.').count() <= 2
            && rest
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

impl Config {
    pub fn parse(value: serde_json::Value) -> Result<Config, ConnectorError> {
        parse_checked(KIND, value, Config::validate)
    }

    fn validate(&self) -> Result<(), ConnectorError> {
        let bad = |key: &str, value: &dyn std::fmt::Debug, allowed: &str| {
            Err(invalid(KIND, key, value, allowed))
        };
        if self.phone_number_id.is_empty()
            || self.phone_number_id.len() > 64
            || !self.phone_number_id.bytes().all(|b| b.is_ascii_digit())
        {
            return bad(
                "phone_number_id",
                &self.phone_number_id,
                "the number's id from the app's WhatsApp > API Setup page (digits)",
            );
        }
        // Secrets: name the key and the rule, never the value.
        for (key, value) in [
            ("access_token", &self.access_token),
            ("app_secret", &self.app_secret),
            ("verify_token", &self.verify_token),
        ] {
            if value.trim().is_empty() || value.len() > 4096 {
                return Err(secret_invalid(
                    KIND,
                    key,
                    "must be 1 to 4096 bytes, not blank",
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(secret_invalid(
                    KIND,
                    key,
                    "must not contain control characters",
                ));
            }
        }
        match https_or_loopback(&self.graph_base) {
            Err(allowed) => return bad("graph_base", &self.graph_base, allowed),
            Ok(url) if url.query().is_some() || url.fragment().is_some() => {
                return bad("graph_base", &self.graph_base, "a base URL without query");
            }
            Ok(_) => {}
        }
        if !valid_version(&self.api_version) {
            return bad("api_version", &self.api_version, "like v21.0");
        }
        listen_addr(KIND, "listen", &self.listen, 8089)?;
        url_path(KIND, "path", &self.path, "/whatsapp/webhook")?;
        in_range(
            KIND,
            "max_body_bytes",
            self.max_body_bytes,
            1024..=MAX_BODY_BYTES,
        )?;
        in_range(
            KIND,
            "request_timeout_secs",
            self.request_timeout_secs,
            1..=20,
        )?;
        if let Some(name) = &self.display_name
            && (name.trim().is_empty() || name.chars().count() > 256)
        {
            return bad("display_name", name, "1 to 256 characters");
        }
        Ok(())
    }

    /// `{graph_base}/{api_version}/{tail}`.
    pub fn graph_url(&self, tail: &str) -> String {
        format!(
            "{}/{}/{tail}",
            self.graph_base.trim_end_matches('/'),
            self.api_version
        )
    }
}
