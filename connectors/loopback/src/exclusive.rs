//! `exclusive_dir`: a probe of the host's one-instance-per-channel rule. A running
//! instance holds an exclusive `flock` on `<dir>/<number>.lock` (the kernel drops it
//! when the instance's file closes or its process dies); an instance that finds the
//! lock taken by another live instance of the same number records the overlap in
//! `<dir>/overlaps` (one line each, appended) and fails its start, so tests can assert
//! that no two nodes ever ran one channel at once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use patchbay_connector_sdk::ConnectorError;
use rustix::fs::{FlockOperation, flock};

/// Held while the instance runs.
pub struct Held {
    _file: File,
}

/// Takes `number`'s lock in `dir`, or records the overlap and fails.
pub fn take(dir: &str, number: &str) -> Result<Held, ConnectorError> {
    let io = |what: &str, e: std::io::Error| {
        ConnectorError::new("start_failed", format!("exclusive_dir {dir}: {what}: {e}"))
    };
    // The number as a file name: digits and '+' stay, anything else becomes '_'.
    let name: String = number
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '+' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = Path::new(dir).join(format!("{name}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io("cannot open the lock file", e))?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Held { _file: file }),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(dir).join("overlaps"))
                .map_err(|e| io("cannot record an overlap", e))?;
            writeln!(log, "{number} pid {}", std::process::id())
                .map_err(|e| io("cannot record an overlap", e))?;
            Err(ConnectorError::new(
                "start_failed",
                format!("another live instance holds {number} (exclusive_dir {dir})"),
            )
            .retryable())
        }
        Err(e) => Err(io("cannot lock", e.into())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_holder_of_one_number_is_refused_and_recorded() {
        let dir = tempfile::tempdir().expect("dir");
        let d = dir.path().to_str().expect("utf-8");
        let first = super::take(d, "+15550000001").expect("first");
        let e = super::take(d, "+15550000001").err().expect("second");
        assert!(e.message.contains("another live instance"), "{}", e.message);
        super::take(d, "+15550000002").expect("another number");
        drop(first);
        super::take(d, "+15550000001").expect("free again");
        let overlaps = std::fs::read_to_string(dir.path().join("overlaps")).expect("log");
        assert_eq!(overlaps.lines().count(), 1);
    }
}
