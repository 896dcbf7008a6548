//! Binds the control socket (mode 0660), accepts clients and checks who they are.
//!
//! Peers are identified with SO_PEERCRED: root and the daemon's own user are always
//! allowed, others only when listed in `control.allowed_uids` / `allowed_gids`. A
//! refusal is logged with the peer's pid, uid and gid.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::control::connection;

/// Binds `path`, replacing a stale socket file left by a crashed daemon but refusing to
/// steal the socket of one that still answers.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the socket folder {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another patchbayd is listening on {}; stop it or set control.socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set mode 0660 on {}", path.display()))?;
    Ok(listener)
}

pub struct Gate {
    own_uid: u32,
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
}

impl Gate {
    pub fn new(allowed_uids: Vec<u32>, allowed_gids: Vec<u32>) -> Self {
        Gate {
            own_uid: rustix::process::getuid().as_raw(),
            allowed_uids,
            allowed_gids,
        }
    }

    fn admits(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == self.own_uid
            || self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
    }
}

/// Accepts clients until `stop` fires; each connection runs on `tracker` so shutdown
/// can wait for requests already being answered.
pub async fn serve(
    listener: UnixListener,
    app: Arc<App>,
    gate: Gate,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let allowed = match stream.peer_cred() {
            Ok(cred) if gate.admits(cred.uid(), cred.gid()) => true,
            Ok(cred) => {
                tracing::warn!(
                    pid = ?cred.pid(), uid = cred.uid(), gid = cred.gid(),
                    "control socket refused a peer not in control.allowed_uids/allowed_gids"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket refused a peer whose credentials cannot be read");
                false
            }
        };
        let app = app.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            if allowed {
                connection::run(stream, app, stop).await;
            } else {
                connection::refuse(stream).await;
            }
        });
    }
}
