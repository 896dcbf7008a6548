//! This daemon as one node of a cluster: `node.name`, the stable name people see in
//! metrics (the `node` label) and the dashboard, by default the host name, and the
//! `[node]` settings of its channel leases (see `cluster`).

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Longest `node.name`.
const MAX_NAME: usize = 64;

/// Bounds of `node.lease_ttl_secs`: renewals run every third of it, and a node stops
/// its connectors a third before it ends.
const TTL_SECS: std::ops::RangeInclusive<u64> = 3..=300;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Empty: the host name. Two daemons on one host need names of their own.
    pub name: String,
    /// Most channels this node runs (0: no limit); the others take the rest.
    pub max_channels: u32,
    /// How long a channel lease lasts without renewal (PostgreSQL store).
    pub lease_ttl_secs: u64,
    /// Most channels this node gives up per round to even out the cluster.
    pub moves_per_round: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: String::new(),
            max_channels: 0,
            lease_ttl_secs: 15,
            moves_per_round: 10,
        }
    }
}

/// `node.name`, or the host name when it is empty; the lease settings in their bounds.
pub fn check(raw: &NodeConfig) -> Result<String, ConfigError> {
    if !TTL_SECS.contains(&raw.lease_ttl_secs) {
        return Err(ConfigError::new(
            "node.lease_ttl_secs",
            raw.lease_ttl_secs,
            format!("{} to {} seconds", TTL_SECS.start(), TTL_SECS.end()),
        ));
    }
    if raw.moves_per_round == 0 {
        return Err(ConfigError::new(
            "node.moves_per_round",
            raw.moves_per_round,
            "at least 1",
        ));
    }
    let name = if raw.name.is_empty() {
        let host = rustix::system::uname();
        host.nodename().to_string_lossy().into_owned()
    } else {
        raw.name.clone()
    };
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid {
        return Err(ConfigError::new(
            "node.name",
            &name,
            format!("1 to {MAX_NAME} letters, digits, '-', '_' or '.' (empty: the host name)"),
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_host_name_and_bad_names_are_refused() {
        let host = check(&NodeConfig::default()).expect("host name");
        assert!(!host.is_empty());
        let named = NodeConfig {
            name: "eu-1.a".into(),
            ..NodeConfig::default()
        };
        assert_eq!(check(&named).unwrap(), "eu-1.a");
        for bad in ["two words", "ünicode", &"x".repeat(65)] {
            let e = check(&NodeConfig {
                name: bad.into(),
                ..NodeConfig::default()
            })
            .expect_err(bad);
            assert_eq!(e.key, "node.name");
        }
        for (ttl, moves, key) in [
            (2, 10, "node.lease_ttl_secs"),
            (15, 0, "node.moves_per_round"),
        ] {
            let e = check(&NodeConfig {
                lease_ttl_secs: ttl,
                moves_per_round: moves,
                ..NodeConfig::default()
            })
            .expect_err(key);
            assert_eq!(e.key, key);
        }
    }
}
