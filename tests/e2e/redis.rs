//! A throwaway redis-server of the test's own: on a unix socket in its own folder
//! (never the machine's shared server), optionally with an append-only file, or also
//! on TCP on an address of the test's own (a veth end) for the network-cut test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::wait_for;

/// A redis-server of our own on a unix socket; never the machine's shared one.
pub struct Redis {
    child: Option<Child>,
    pub socket: PathBuf,
    dir: tempfile::TempDir,
    /// With an append-only file: its `appendfsync` policy.
    aof: Option<&'static str>,
    /// Also listening on TCP here (`start_on`).
    tcp: Option<std::net::SocketAddr>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_persistent(None)
    }

    /// With `aof`, an append-only file in the server's own folder, synced by that
    /// `appendfsync` policy (`always`, `everysec`).
    pub fn start_persistent(aof: Option<&'static str>) -> Redis {
        Redis::launch(aof, None)
    }

    /// Also listening on TCP on `addr` (an address of the test's own, such as a veth
    /// end), on a port free there.
    #[allow(dead_code)] // e2e_postgres only (cluster.rs)
    pub fn start_on(addr: std::net::IpAddr) -> Redis {
        let port = std::net::TcpListener::bind((addr, 0))
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("no free port on {addr}: {e}"))
            .port();
        Redis::launch(None, Some((addr, port).into()))
    }

    fn launch(aof: Option<&'static str>, tcp: Option<std::net::SocketAddr>) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("redis.sock");
        let mut redis = Redis {
            child: None,
            socket,
            dir,
            aof,
            tcp,
        };
        redis.restart();
        redis
    }

    /// Kills the server (an outage); its data is gone, as with `--save ""`, unless it
    /// has an append-only file.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts the server (again) on the same socket.
    pub fn restart(&mut self) {
        self.stop();
        let (bind, port) = match self.tcp {
            Some(a) => (a.ip().to_string(), a.port().to_string()),
            None => ("127.0.0.1".to_owned(), "0".to_owned()),
        };
        let child = Command::new("redis-server")
            .args(["--bind", &bind, "--port", &port, "--protected-mode", "no"])
            .args([
                "--save",
                "",
                "--appendonly",
                if self.aof.is_some() { "yes" } else { "no" },
                "--appendfsync",
                self.aof.unwrap_or("everysec"),
                "--unixsocketperm",
                "700",
            ])
            .arg("--unixsocket")
            .arg(&self.socket)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        self.child = Some(child);
        wait_for(Duration::from_secs(10), || self.socket.exists());
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// The TCP URL of a [`start_on`](Self::start_on) server.
    #[allow(dead_code)] // e2e_postgres only (cluster.rs)
    pub fn tcp_url(&self) -> String {
        let addr = self.tcp.expect("a server started with start_on");
        format!("redis://{addr}")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
