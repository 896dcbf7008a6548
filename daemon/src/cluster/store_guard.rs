//! One daemon per SQLite store: an exclusive `flock` on `<store>.lock`, held for the
//! life of the process (the kernel drops it when the process dies, however it dies).
//! The lock is named after the store's canonical path, so two daemons that name one
//! file differently (a relative path, a symlink) still find each other.
//! Channel leases need a store every node reaches and one clock; several daemons need
//! PostgreSQL, and a second one on a SQLite file is refused at start.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

/// Held while the daemon runs; dropping it lets another daemon open the store.
#[derive(Debug)]
pub struct StoreGuard {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "the store {store} is in use by another patchbayd (it holds {lock}); one SQLite store \
         serves one daemon: stop the other one, or move several daemons to PostgreSQL \
         (store.url = \"postgres://…\", see README \"Running several daemons\")"
    )]
    InUse { store: PathBuf, lock: PathBuf },
    #[error("cannot lock the store {store} ({lock}): {cause}")]
    Io {
        store: PathBuf,
        lock: PathBuf,
        cause: std::io::Error,
    },
}

pub fn lock(store: &Path) -> Result<StoreGuard, GuardError> {
    let store = &canonical(store);
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    let lock = PathBuf::from(name);
    let io = |cause| GuardError::Io {
        store: store.to_owned(),
        lock: lock.clone(),
        cause,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(io)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(StoreGuard { _file: file }),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(GuardError::InUse {
            store: store.to_owned(),
            lock,
        }),
        Err(e) => Err(io(e.into())),
    }
}

/// The store file's canonical path; before the file exists, its canonical folder's.
fn canonical(store: &Path) -> PathBuf {
    if let Ok(path) = store.canonicalize() {
        return path;
    }
    let parent = match store.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (parent.canonicalize(), store.file_name()) {
        (Ok(dir), Some(file)) => dir.join(file),
        _ => store.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_lock_on_one_store_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("dir");
        let store = dir.path().join("patchbay.db");
        let first = super::lock(&store).expect("first");
        let e = super::lock(&store).expect_err("second");
        assert!(e.to_string().contains("PostgreSQL"), "{e}");
        drop(first);
        super::lock(&store).expect("after the first is gone");
    }

    #[test]
    fn one_store_named_through_a_symlink_is_still_one_store() {
        let dir = tempfile::tempdir().expect("dir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let _first = super::lock(&real.join("patchbay.db")).expect("first");
        let e = super::lock(&link.join("patchbay.db")).expect_err("the same file");
        assert!(e.to_string().contains("in use"), "{e}");
    }
}
