//! This daemon as one node of a cluster: `node.name`, the stable name people see in
//! metrics (the `node` label) and the dashboard, by default the host name, and how many
//! channels it may run (`node.max_channels`, or none with `node.run_channels = false`:
//! a node that only works the job queue; see `cluster`).

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Longest `node.name`.
const MAX_NAME: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Empty: the host name. Two daemons on one host need names of their own.
    pub name: String,
    /// Most channels this node runs (0: no limit); the others take the rest.
    pub max_channels: u32,
    /// False: this node runs no connector at all, only jobs (the others run every
    /// channel; alone on its store, no channel runs).
    pub run_channels: bool,
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        NodeConfig {
            name: String::new(),
            max_channels: 0,
            run_channels: true,
        }
    }
}

/// `node.name`, or the host name when it is empty.
pub fn check(raw: &NodeConfig) -> Result<String, ConfigError> {
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
    }
}
