//! Opens the control socket, accepts clients and checks who they are.
//!
//! Under systemd the socket comes from patchbayd.socket through `LISTEN_FDS` (socket
//! activation: systemd owns the file, its mode and group); started by hand, patchbayd
//! binds `control.socket` itself with mode 0660.
//!
//! Peers are identified with SO_PEERCRED: root and the daemon's own user are always
//! allowed, others only when listed in `control.allowed_uids` / `allowed_gids`. A gid
//! matches the peer's primary group or any of its supplementary groups (SO_PEERGROUPS),
//! since admins are usually members of `patchbay-admin` rather than having it as their
//! primary group. A refusal is logged with the peer's pid, uid and gid, at most once
//! every 10 s with a count of the ones not logged. At most `control.max_connections`
//! clients are served at once; the next one gets an `unavailable` error and is closed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::control::connection;

/// The listening control socket.
pub struct ControlSocket {
    pub listener: UnixListener,
    /// Where clients connect.
    pub path: PathBuf,
    /// Bound by this process, so removed on stop. A socket passed by systemd is left
    /// alone: patchbayd.socket owns the file (RemoveOnStop=) and keeps listening on it
    /// while the service restarts, and removing it would make the daemon unreachable.
    pub owned: bool,
}

/// Takes the socket passed by socket activation, or binds `configured` when none was.
pub async fn open(configured: &Path) -> anyhow::Result<ControlSocket> {
    if let Some(listener) = activated()? {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_else(|| configured.to_path_buf());
        if path != configured {
            // patchbayctl finds the daemon through control.socket: say so now rather
            // than leave an admin with "connection refused" later.
            tracing::warn!(
                activated = %path.display(),
                configured = %configured.display(),
                "the socket passed by systemd is not control.socket; patchbayctl reads control.socket"
            );
        }
        listener
            .set_nonblocking(true)
            .context("cannot make the passed control socket non-blocking")?;
        let listener = UnixListener::from_std(listener)
            .context("cannot register the passed control socket")?;
        tracing::info!(socket = %path.display(), "control socket passed by systemd (socket activation)");
        return Ok(ControlSocket {
            listener,
            path,
            owned: false,
        });
    }
    Ok(ControlSocket {
        listener: bind(configured).await?,
        path: configured.to_path_buf(),
        owned: true,
    })
}

/// The first socket of `LISTEN_FDS` when `LISTEN_PID` is this process; checked to be a
/// listening Unix stream socket, since a wrong fd would otherwise fail only at accept.
fn activated() -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    // `false`: leave the environment alone. Unsetting variables in a multi-threaded
    // process races with other threads reading it; LISTEN_PID already keeps any child
    // from taking the fd for its own.
    let mut fds = sd_notify::listen_fds_with_names(false)
        .context("LISTEN_FDS/LISTEN_PID from the service manager are malformed")?;
    let Some((fd, name)) = fds.next() else {
        return Ok(None);
    };
    let extra: Vec<RawFd> = fds.map(|(fd, _)| fd).collect();
    if !extra.is_empty() {
        tracing::warn!(
            ?extra,
            "socket activation passed more than one socket; only the first (fd 3) is used"
        );
    }
    // SAFETY: systemd passed `fd` to this process (LISTEN_PID is ours) and nothing else
    // in patchbayd takes descriptors from LISTEN_FDS, so this is its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let kind = rustix::net::sockopt::socket_type(&fd)
        .with_context(|| format!("passed fd {name:?} is not a socket"))?;
    let listening = rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false);
    if kind != rustix::net::SocketType::STREAM || !listening {
        anyhow::bail!(
            "passed fd {name:?} is not a listening stream socket; use ListenStream= in patchbayd.socket"
        );
    }
    let listener = std::os::unix::net::UnixListener::from(fd);
    if listener.local_addr().is_err() {
        anyhow::bail!("passed fd {name:?} is not a Unix socket; use ListenStream=/PATH");
    }
    Ok(Some(listener))
}

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
    // Bound under a temporary name and renamed into place once its mode is set: a
    // socket accepts connections from bind on, so a client must never find it at
    // `path` with the mode the umask gave it.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)
        .with_context(|| format!("cannot bind the control socket {}", staging.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set mode 0660 on {}", staging.display()))?;
    std::fs::rename(&staging, path)
        .with_context(|| format!("cannot move the control socket to {}", path.display()))?;
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

    fn admits(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0
            || uid == self.own_uid
            || self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
            || groups.iter().any(|g| self.allowed_gids.contains(g))
    }
}

/// The peer's supplementary groups as they were at connect(2) (SO_PEERGROUPS, Linux
/// 4.13+). Empty when the kernel cannot tell: the primary gid still counts.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    // At most two rounds: the first may report ERANGE with the size it needs.
    for _ in 0..2 {
        let Ok(mut len) = libc::socklen_t::try_from(groups.len() * GID) else {
            return Vec::new();
        };
        // SAFETY: `groups` is a live buffer of exactly `len` bytes, and the kernel
        // writes at most `len` bytes to it and the actual size to `len`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID;
        if rc == 0 {
            groups.truncate(needed.min(groups.len()));
            return groups;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE)
            || needed <= groups.len()
        {
            return Vec::new();
        }
        groups.resize(needed, 0);
    }
    Vec::new()
}

/// Logs one kind of refusal at most once per `EVERY`, counting the ones in between, so
/// a flood of refused peers cannot flood the journal.
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Throttle {
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(refusals not logged since the last line)` when this one may be logged.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Descriptors the daemon needs besides control clients: store, queue, connectors'
/// listeners and clients, logs.
const OWN_FDS: u64 = 512;

/// Warns at start when `RLIMIT_NOFILE` cannot hold `control.max_connections` clients
/// beside the daemon's own descriptors: accept would then fail before the cap applies.
fn check_fd_limit(max_connections: usize) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let needed = max_connections as u64 + OWN_FDS;
    if let Some(current) = limit.current
        && current < needed
    {
        tracing::warn!(
            nofile = current,
            needed,
            "the open-file limit is below control.max_connections + {OWN_FDS}; raise \
             LimitNOFILE= (the shipped unit sets 65536) or lower control.max_connections"
        );
    }
}

/// Connections root and the daemon's own user may open beyond
/// `control.max_connections`.
const ADMIN_RESERVE: usize = 8;

/// Accepts clients until `stop` fires; each connection runs on `tracker` so shutdown
/// can wait for requests already being answered. At most `control.max_connections`
/// are served at once: a semaphore permit travels with each connection task, and a
/// client arriving while none is free gets an error line and is closed.
pub async fn serve(
    listener: UnixListener,
    app: Arc<App>,
    gate: Gate,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let control = &app.settings.raw.control;
    let max = control.max_connections;
    let limits = connection::Limits::new(control);
    check_fd_limit(max);
    let slots = Arc::new(Semaphore::new(max));
    // Past the cap, root and the daemon's own user still get in: one allowed client
    // holding every slot must not lock the administrators out of `status`.
    let reserve = Arc::new(Semaphore::new(ADMIN_RESERVE));
    let (mut forbidden_log, mut full_log) = (Throttle::new(), Throttle::new());
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
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut privileged = false;
        let allowed = match stream.peer_cred() {
            Ok(cred) if gate.admits(cred.uid(), cred.gid(), &peer_groups(&stream)) => {
                privileged = cred.uid() == 0 || cred.uid() == gate.own_uid;
                true
            }
            Ok(cred) => {
                if let Some(suppressed) = forbidden_log.allow() {
                    tracing::warn!(
                        pid = ?cred.pid(), uid = cred.uid(), gid = cred.gid(), suppressed,
                        "control socket refused a peer not in control.allowed_uids/allowed_gids"
                    );
                }
                false
            }
            Err(e) => {
                if let Some(suppressed) = forbidden_log.allow() {
                    tracing::warn!(error = %e, suppressed, "control socket refused a peer whose credentials cannot be read");
                }
                false
            }
        };
        if !allowed {
            connection::refuse(stream, connection::forbidden());
            continue;
        }
        let permit = slots.clone().try_acquire_owned().or_else(|full| {
            if privileged {
                reserve.clone().try_acquire_owned()
            } else {
                Err(full)
            }
        });
        let Ok(permit) = permit else {
            if let Some(suppressed) = full_log.allow() {
                let pid = stream.peer_cred().ok().and_then(|c| c.pid());
                tracing::warn!(
                    ?pid,
                    max,
                    suppressed,
                    "control socket refused a client: control.max_connections are connected"
                );
            }
            connection::refuse(stream, connection::full(max));
            continue;
        };
        let app = app.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            connection::run(stream, app, stop, limits).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supplementary_groups_count_like_the_primary_one() {
        let gate = Gate {
            own_uid: 999,
            allowed_uids: vec![1001],
            allowed_gids: vec![4242],
        };
        assert!(gate.admits(0, 0, &[]), "root");
        assert!(gate.admits(999, 5, &[]), "own user");
        assert!(gate.admits(1001, 5, &[]), "listed uid");
        assert!(gate.admits(1002, 4242, &[]), "primary group");
        assert!(gate.admits(1002, 5, &[7, 4242]), "supplementary group");
        assert!(!gate.admits(1002, 5, &[7, 8]));
    }

    #[tokio::test]
    async fn peer_groups_are_read_from_the_socket() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        // The peer is this very process: its groups are ours.
        let mut ours: Vec<u32> = rustix::process::getgroups()
            .expect("getgroups")
            .iter()
            .map(|g| g.as_raw())
            .collect();
        ours.sort();
        let mut seen = peer_groups(&a);
        seen.sort();
        assert_eq!(seen, ours);
    }
}
