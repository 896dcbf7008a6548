//! `[http]`: where the metrics, health and dashboard listener binds, and the token that
//! allows the dashboard's actions. Checked at start like every other section
//! (`config::check`); not reloaded by SIGHUP (the listener stays bound).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Shortest `http.token`: guessing one must be out of reach.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `IP:PORT` of the listener (port 0: any free port, shown by `status`); empty: no
    /// listener.
    pub listen: String,
    /// Allows the dashboard's actions (retrying a dead job). Required when `listen`
    /// is not a loopback address: then every page asks for it.
    pub token: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
            token: String::new(),
        }
    }
}

impl std::fmt::Debug for HttpConfig {
    /// The token is a secret: never in a log line or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("token", &if self.token.is_empty() { "" } else { "***" })
            .finish()
    }
}

/// `[http]` checked: the address to bind, if any, and the token, if any.
#[derive(Clone)]
pub struct HttpSettings {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl HttpSettings {
    /// Whether every request must carry the token: a listener others can reach.
    pub fn public(&self) -> bool {
        self.listen.is_some_and(|a| !a.ip().is_loopback())
    }
}

pub fn check(raw: &HttpConfig) -> Result<HttpSettings, ConfigError> {
    let token = (!raw.token.is_empty()).then(|| raw.token.clone());
    if let Some(t) = &token
        && (t.len() < MIN_TOKEN_LEN || t.chars().any(|c| c.is_control() || c.is_whitespace()))
    {
        return Err(ConfigError::new(
            "http.token",
            "(hidden)",
            format!(
                "at least {MIN_TOKEN_LEN} characters without spaces or control characters, \
                 e.g. from `openssl rand -hex 24`"
            ),
        ));
    }
    if raw.listen.is_empty() {
        return Ok(HttpSettings {
            listen: None,
            token,
        });
    }
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        ConfigError::new(
            "http.listen",
            &raw.listen,
            "IP:PORT such as 127.0.0.1:9464 or [::1]:9464 (an IP address, not a host \
             name), or \"\" for no listener",
        )
    })?;
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(ConfigError::new(
            "http.token",
            "",
            format!(
                "a token is required because http.listen = {listen} is not a loopback \
                 address: set http.token (or PATCHBAY__HTTP__TOKEN), or listen on 127.0.0.1"
            ),
        ));
    }
    Ok(HttpSettings {
        listen: Some(listen),
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(listen: &str, token: &str) -> HttpConfig {
        HttpConfig {
            listen: listen.into(),
            token: token.into(),
        }
    }

    #[test]
    fn the_default_listens_on_loopback_without_a_token() {
        let s = check(&HttpConfig::default()).expect("default");
        assert_eq!(s.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(s.token.is_none() && !s.public());
    }

    #[test]
    fn a_public_address_needs_a_token() {
        let e = check(&http("0.0.0.0:9464", "")).expect_err("refused");
        assert_eq!(e.key, "http.token");
        assert!(e.allowed.contains("not a loopback"), "{}", e.allowed);
        let s = check(&http("0.0.0.0:9464", "0123456789abcdef01")).expect("with a token");
        assert!(s.public());
    }

    #[test]
    fn bad_values_name_their_key_and_hide_the_token() {
        assert_eq!(
            check(&http("localhost:9464", "")).err().unwrap().key,
            "http.listen"
        );
        assert_eq!(
            check(&http("127.0.0.1", "")).err().unwrap().key,
            "http.listen"
        );
        let short = check(&http("127.0.0.1:0", "short-secret")).err().unwrap();
        assert_eq!(short.key, "http.token");
        assert!(!short.to_string().contains("short-secret"), "{short}");
        assert!(check(&http("", "")).unwrap().listen.is_none(), "empty: off");
        let shown = format!("{:?}", http("127.0.0.1:1", "0123456789abcdef01"));
        assert!(!shown.contains("0123456789abcdef01"), "{shown}");
    }
}
