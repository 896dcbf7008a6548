//! Scans `plugins.dir` at start and loads every connector library that passes the
//! file checks and the ABI checks; each refusal is one log line and the daemon runs on.
//! SIGHUP rescans the folder for libraries added since (`load_new`). Libraries are never
//! unloaded or replaced: upgrading a connector means restarting the daemon.
//!
//! A plugin file must be owned by root or by the daemon's own user: plugins run as the
//! daemon, so anyone else who owns one (control-socket users included) could make the
//! daemon run their code. The same goes for every folder above it (`host::check_file`:
//! none group- or world-writable, except root-owned sticky ones like `/tmp` above the
//! plugin folder), and the daemon loads the very file it checked (through its open
//! descriptor), not whatever the path names by then.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use patchbay_connector_sdk::host::{self, Library};

/// Which version of a file was refused: a rescan skips it quietly while it is unchanged,
/// and checks it again once it was replaced (inode), rewritten (mtime), or had its mode
/// or owner fixed (ctime), or a folder above it changed owner or mode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    /// Hash of (inode, mode, owner) of every folder above the file.
    folders: u64,
}

impl FileVersion {
    /// The version of what `path` resolves to; `None` when it cannot be read (the
    /// refusal then says why, and is logged again next time).
    fn of(path: &Path) -> Option<FileVersion> {
        use std::hash::{Hash, Hasher};
        let m = std::fs::metadata(path).ok()?;
        let real = std::fs::canonicalize(path).ok()?;
        let mut folders = std::collections::hash_map::DefaultHasher::new();
        for folder in real.ancestors().skip(1) {
            let f = std::fs::symlink_metadata(folder).ok()?;
            (f.ino(), f.mode(), f.uid()).hash(&mut folders);
        }
        Some(FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            folders: folders.finish(),
        })
    }
}

#[derive(Clone, Default)]
pub struct Registry {
    by_kind: BTreeMap<String, Library>,
    /// Files refused so far (unfit, not a connector, or a duplicate kind), so that a
    /// rescan logs each refusal once.
    refused: HashMap<PathBuf, FileVersion>,
}

/// The owners a plugin file may have besides root (which `check_file` always allows):
/// the daemon's own user, and nobody else.
fn trusted_owners() -> [u32; 1] {
    [rustix::process::getuid().as_raw()]
}

impl Registry {
    pub fn scan(dir: &Path) -> Registry {
        let mut registry = Registry::default();
        registry.load_new(dir);
        registry
    }

    /// Loads the libraries in `dir` that are not loaded yet and returns the kinds added.
    /// A file already loaded, or refused before and unchanged since, is skipped quietly,
    /// so a rescan does not repeat the warnings of the scan before.
    pub fn load_new(&mut self, dir: &Path) -> Vec<String> {
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
        let owners = trusted_owners();
        for path in paths {
            let version = FileVersion::of(&path);
            if version.is_some() && self.refused.get(&path) == version.as_ref() {
                continue;
            }
            if let Err(refusal) = self.try_load(&path, dir, &owners, &mut added) {
                tracing::warn!("{refusal}");
                match version {
                    Some(v) => self.refused.insert(path, v),
                    None => self.refused.remove(&path),
                };
            } else {
                self.refused.remove(&path);
            }
        }
        added
    }

    /// Checks and loads one file; `Err` is the log line of its refusal.
    fn try_load(
        &mut self,
        path: &Path,
        dir: &Path,
        owners: &[u32],
        added: &mut Vec<String>,
    ) -> Result<(), String> {
        let checked = host::check_file(path, dir, owners).map_err(|e| e.to_string())?;
        if self
            .by_kind
            .values()
            .any(|lib| lib.path() == checked.path())
        {
            return Ok(());
        }
        // A library that is not a connector (a helper .so in the same folder) says so
        // in the same one line.
        let checked_path = checked.path().to_owned();
        let lib = host::load_checked(checked).map_err(|e| e.to_string())?;
        let checked = checked_path.as_path();
        if let Some(first) = self.by_kind.get(lib.kind()) {
            return Err(format!(
                "plugin {}: kind {:?} is already provided by {}; refusing the duplicate",
                checked.display(),
                lib.kind(),
                first.path().display()
            ));
        }
        tracing::info!(
            kind = lib.kind(),
            version = lib.version(),
            file = %checked.display(),
            secret_keys = ?lib.secret_keys(),
            "connector loaded"
        );
        added.push(lib.kind().to_owned());
        self.by_kind.insert(lib.kind().to_owned(), lib);
        Ok(())
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
