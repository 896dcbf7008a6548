//! Parsing and validating a connector's config object, with errors that name the key
//! and what is allowed but never echo a secret value.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use serde::de::DeserializeOwned;

use crate::ConnectorError;

/// Deserializes the config (use `#[serde(deny_unknown_fields)]` on `T`, so a typo is an
/// error, not a silent default); errors read `"<kind> config: …"`.
pub fn parse<T: DeserializeOwned>(
    kind: &str,
    value: serde_json::Value,
) -> Result<T, ConnectorError> {
    serde_json::from_value(value).map_err(|e| ConnectorError::config(format!("{kind} config: {e}")))
}

/// `parse`, then `validate` (the checks serde cannot express) on the result: a
/// connector's whole `Config::parse`.
pub fn parse_checked<T: DeserializeOwned>(
    kind: &str,
    value: serde_json::Value,
    validate: impl FnOnce(&T) -> Result<(), ConnectorError>,
) -> Result<T, ConnectorError> {
    let config = parse(kind, value)?;
    validate(&config)?;
    Ok(config)
}

/// `invalid_config`: `"<kind> config: <key> = <value:?>: <allowed>"`. Only for values
/// that are not secret; see `secret_invalid`.
pub fn invalid(kind: &str, key: &str, value: &dyn Debug, allowed: &str) -> ConnectorError {
    ConnectorError::config(format!("{kind} config: {key} = {value:?}: {allowed}"))
}

/// `invalid_config` for a secret key: names the key and the rule, never the value.
pub fn secret_invalid(kind: &str, key: &str, rule: &str) -> ConnectorError {
    ConnectorError::config(format!("{kind} config: {key} {rule}"))
}

/// `value` within `range`, else `invalid`.
pub fn in_range<T: PartialOrd + Debug>(
    kind: &str,
    key: &str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<(), ConnectorError> {
    if range.contains(&value) {
        Ok(())
    } else {
        let allowed = format!("{:?} to {:?}", range.start(), range.end());
        Err(invalid(kind, key, &value, &allowed))
    }
}

/// A base URL a connector sends credentials to: https://, or http:// only to a loopback
/// IP literal (a local test server). `localhost` does not count: a name may resolve
/// elsewhere. The error says what is allowed.
pub fn https_or_loopback(url: &str) -> Result<url::Url, &'static str> {
    let parsed = url::Url::parse(url).map_err(|_| "not a URL")?;
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(_)) => false,
        None => return Err("a URL with a host"),
    };
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if loopback => Ok(parsed),
        "http" => Err(
            "http:// is only allowed to a loopback address (127.0.0.0/8 or [::1]); use https:// \
             (credentials travel with every request)",
        ),
        _ => Err("an https:// URL (http:// only to a loopback address)"),
    }
}

/// A listener's `ip:port` (port 0: any free port), else `invalid` naming an example on
/// `example_port`.
pub fn listen_addr(
    kind: &str,
    key: &str,
    value: &str,
    example_port: u16,
) -> Result<SocketAddr, ConnectorError> {
    value.parse().map_err(|_| {
        let allowed =
            format!("an IP address and port, e.g. 127.0.0.1:{example_port} or [::]:{example_port}");
        invalid(kind, key, &value, &allowed)
    })
}

/// An HTTP path a listener serves: absolute, without query, fragment or spaces; else
/// `invalid` naming `example`.
pub fn url_path(kind: &str, key: &str, value: &str, example: &str) -> Result<(), ConnectorError> {
    if value.starts_with('/') && !value.contains(['?', '#', ' ']) {
        Ok(())
    } else {
        let allowed = format!("an absolute path without query, e.g. {example}");
        Err(invalid(kind, key, &value, &allowed))
    }
}
