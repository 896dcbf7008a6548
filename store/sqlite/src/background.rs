//! The store's background connection: bulk work (data deletion batches) runs on a
//! SQLite connection of its own whose thread runs at a lower CPU priority.
//!
//! On a small machine a deletion batch keeps a core busy; at the same priority, every
//! hand-off on the inbound path (connector, queue, writer) waits its turn behind it and
//! inbound latency doubles. Niced, the kernel runs inbound work first and the deletion
//! takes the CPU left over. sqlx runs each SQLite connection on a thread of its own;
//! that thread is named here and found again by name under `/proc/self/task`, since
//! nothing runs code on it. Elsewhere than on Linux this is a plain connection.

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

const THREAD_PREFIX: &str = "pb-sqlite-bg-";

/// How much lower than the daemon the background thread runs (nice steps).
const NICE_STEPS: i32 = 10;

/// One connection, kept for the daemon's life, its thread niced as soon as it exists.
/// Writes on it must hold the writer's connection, so they never race it for the lock.
pub(super) async fn open(options: SqliteConnectOptions) -> Result<SqlitePool, sqlx::Error> {
    SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .after_connect(|_, _| {
            Box::pin(async {
                lower_priority();
                Ok(())
            })
        })
        .connect_with(options.thread_name(|id| format!("{THREAD_PREFIX}{id}")))
        .await
}

/// Lowers every background connection thread's priority to `NICE_STEPS` below the
/// calling (ordinary) thread's; threads already there are left alone, so a second store
/// in the process does not push the first one's further down. Best effort: a failure
/// costs inbound latency during deletion, not correctness, so it is logged and ignored.
fn lower_priority() {
    let Ok(own) = rustix::process::getpriority_process(None) else {
        return;
    };
    let target = (own + NICE_STEPS).min(19);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let named = std::fs::read_to_string(task.path().join("comm"))
            .is_ok_and(|comm| comm.starts_with(THREAD_PREFIX));
        let pid = task
            .file_name()
            .to_str()
            .and_then(|tid| tid.parse().ok())
            .and_then(rustix::process::Pid::from_raw);
        let (true, Some(pid)) = (named, pid) else {
            continue;
        };
        // On Linux the nice value is per thread: PRIO_PROCESS with a thread id sets it.
        let result = rustix::process::getpriority_process(Some(pid)).and_then(|nice| {
            if nice < target {
                rustix::process::setpriority_process(Some(pid), target)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => tracing::debug!(tid = pid.as_raw_pid(), "background store thread niced"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot lower the background store thread's priority")
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {

    use super::*;

    #[tokio::test]
    async fn the_background_connection_thread_runs_niced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("bg.db"))
            .create_if_missing(true);
        let pool = open(options).await.expect("open");
        sqlx::query("SELECT 1").execute(&pool).await.expect("query");
        let own = rustix::process::getpriority_process(None).expect("own nice");
        let mut found = 0;
        for task in std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with(THREAD_PREFIX) {
                let tid: i32 = task
                    .file_name()
                    .to_str()
                    .expect("tid")
                    .parse()
                    .expect("tid");
                let pid = rustix::process::Pid::from_raw(tid).expect("pid");
                let nice = rustix::process::getpriority_process(Some(pid)).expect("nice");
                assert_eq!(nice, (own + NICE_STEPS).min(19));
                found += 1;
            }
        }
        // Other tests' stores have background threads too, niced the same (never more).
        assert!(found >= 1, "no background connection thread found");
    }
}
