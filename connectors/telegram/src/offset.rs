//! The offset file of one bot (`<state_dir>/telegram-<bot id>.offset`): the next
//! getUpdates offset, written only after the host's flush confirmed the batch, and
//! written durably (temp file, fsync, rename).

use std::path::{Path, PathBuf};

/// The offset file of one bot. Its I/O blocks (a save waits for an fsync): the poller
/// runs it on the runtime's blocking pool.
#[derive(Clone)]
pub struct OffsetFile {
    path: PathBuf,
}

impl OffsetFile {
    pub fn new(dir: &Path, bot_id: &str) -> OffsetFile {
        OffsetFile {
            path: dir.join(format!("telegram-{bot_id}.offset")),
        }
    }

    /// The saved offset; `Ok(None)` when there is none yet.
    pub fn load(&self) -> std::io::Result<Option<i64>> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => s.trim().parse().map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the offset durably: temp file, fsync, rename, so a crash leaves the old
    /// or the new value, never a torn one. A save that outlives its poller (a stop
    /// aborts the poller after its grace; the blocking save runs on) may race the next
    /// instance's on the temp file: at worst the file then holds an older offset or
    /// does not parse, and Telegram's own confirmation still applies (every value was
    /// flushed before it was saved, so none is ahead of what the host recorded).
    pub fn save(&self, offset: i64) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("offset.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{offset}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}
