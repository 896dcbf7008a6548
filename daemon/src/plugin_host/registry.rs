//! Scans `plugins.dir` once at start and loads every connector library that passes the
//! file checks and the ABI checks; each refusal is one log line and the daemon runs on.
//! Libraries are never unloaded: upgrading a connector means restarting the daemon.

use std::collections::BTreeMap;
use std::path::Path;

use patchbay_connector_sdk::host::{self, Library};

#[derive(Default)]
pub struct Registry {
    by_kind: BTreeMap<String, Library>,
}

impl Registry {
    pub fn scan(dir: &Path, allowed_uids: &[u32]) -> Registry {
        let mut registry = Registry::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the plugin folder; no connectors loaded");
                return registry;
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "so"))
            .collect();
        paths.sort();
        for path in paths {
            let checked = match host::check_file(&path, dir, allowed_uids) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("{e}");
                    continue;
                }
            };
            match host::load(&checked) {
                Ok(lib) => {
                    if let Some(first) = registry.by_kind.get(lib.kind()) {
                        tracing::warn!(
                            "plugin {}: kind {:?} is already provided by {}; refusing the duplicate",
                            checked.display(),
                            lib.kind(),
                            first.path().display()
                        );
                        continue;
                    }
                    tracing::info!(kind = lib.kind(), version = lib.version(), file = %checked.display(), "connector loaded");
                    registry.by_kind.insert(lib.kind().to_owned(), lib);
                }
                // A library that is not a connector (a helper .so in the same folder)
                // says so in the same one line.
                Err(e) => tracing::warn!("{e}"),
            }
        }
        registry
    }

    pub fn get(&self, kind: &str) -> Option<&Library> {
        self.by_kind.get(kind)
    }

    pub fn libraries(&self) -> impl Iterator<Item = &Library> {
        self.by_kind.values()
    }

    pub fn kinds(&self) -> Vec<String> {
        self.by_kind.keys().cloned().collect()
    }
}
