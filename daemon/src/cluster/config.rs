//! `[leases]`: how long a channel lease lasts and how fast channels move between nodes
//! (PostgreSQL store; alone on SQLite the daemon holds no leases).

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Bounds of `leases.ttl_secs`: renewals run every third of it, and a node stops its
/// connectors a third before it ends.
const TTL_SECS: std::ops::RangeInclusive<u64> = 3..=300;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeasesConfig {
    /// How long a channel lease lasts without renewal.
    pub ttl_secs: u64,
    /// Most channels a node gives up per round to even out the cluster.
    pub moves_per_round: u32,
}

impl Default for LeasesConfig {
    fn default() -> Self {
        LeasesConfig {
            ttl_secs: 15,
            moves_per_round: 10,
        }
    }
}

pub fn check(raw: &LeasesConfig) -> Result<(), ConfigError> {
    if !TTL_SECS.contains(&raw.ttl_secs) {
        return Err(ConfigError::new(
            "leases.ttl_secs",
            raw.ttl_secs,
            format!("{} to {} seconds", TTL_SECS.start(), TTL_SECS.end()),
        ));
    }
    if raw.moves_per_round == 0 {
        return Err(ConfigError::new(
            "leases.moves_per_round",
            raw.moves_per_round,
            "at least 1",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        check(&LeasesConfig::default()).expect("defaults");
        for (ttl, moves, key) in [
            (2, 10, "leases.ttl_secs"),
            (301, 10, "leases.ttl_secs"),
            (15, 0, "leases.moves_per_round"),
        ] {
            let e = check(&LeasesConfig {
                ttl_secs: ttl,
                moves_per_round: moves,
            })
            .expect_err(key);
            assert_eq!(e.key, key);
        }
    }
}
