//! Scans `plugins.dir` at start and loads every connector library that passes the
//! file checks and the ABI checks; each refusal is one log line and the daemon runs on.
//! SIGHUP rescans the folder for libraries added since (`load_new`). Libraries are never
//! unloaded or replaced: upgrading a connector means restarting the daemon.

use std::collections::BTreeMap;
use std::path::Path;

use patchbay_connector_sdk::host::{self, Library};

#[derive(Clone, Default)]
pub struct Registry {
    by_kind: BTreeMap<String, Library>,
}

impl Registry {
    pub fn scan(dir: &Path, allowed_uids: &[u32]) -> Registry {
        let mut registry = Registry::default();
        registry.load_new(dir, allowed_uids);
        registry
    }

    /// Loads the libraries in `dir` that are not loaded yet and returns the kinds added.
    /// A file already loaded is skipped quietly, so a rescan does not repeat the
    /// duplicate-kind warning for every connector that was there at start.
    pub fn load_new(&mut self, dir: &Path, allowed_uids: &[u32]) -> Vec<String> {
        let mut added = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the plugin folder; no connectors loaded");
                return added;
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
            if self.by_kind.values().any(|lib| lib.path() == checked) {
                continue;
            }
            match host::load(&checked) {
                Ok(lib) => {
                    if let Some(first) = self.by_kind.get(lib.kind()) {
                        tracing::warn!(
                            "plugin {}: kind {:?} is already provided by {}; refusing the duplicate",
                            checked.display(),
                            lib.kind(),
                            first.path().display()
                        );
                        continue;
                    }
                    tracing::info!(kind = lib.kind(), version = lib.version(), file = %checked.display(), "connector loaded");
                    added.push(lib.kind().to_owned());
                    self.by_kind.insert(lib.kind().to_owned(), lib);
                }
                // A library that is not a connector (a helper .so in the same folder)
                // says so in the same one line.
                Err(e) => tracing::warn!("{e}"),
            }
        }
        added
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
