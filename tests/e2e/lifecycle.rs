//! Process lifecycle: sd_notify READY=1 (only once every worker runs) / STOPPING=1,
//! graceful SIGTERM with exit 0 and the socket removed, and a second daemon refusing to
//! steal a live socket.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::harness::{Backend, Daemon, PATCHBAYD};

/// A daemon that is SIGKILLed if an assertion fails before the test stopped it.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_gracefully_and_notifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "").expect("config");
    let mut child = Guard(
        Command::new(PATCHBAYD)
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("PATCHBAY__HTTP__LISTEN", "127.0.0.1:0")
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("READY message");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // READY means every queue's worker runs: each is registered in apalis' Workers table
    // by the time the message arrives (it used to be sent before they started).
    let queue = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        dir.path().join("var/queue.db").display()
    ))
    .await
    .expect("open the queue file");
    let workers: Vec<String> =
        sqlx::query_scalar("SELECT worker_type FROM Workers WHERE id LIKE ?1")
            .bind(format!("%:{}:%", child.0.id()))
            .fetch_all(&queue)
            .await
            .expect("read Workers");
    queue.close().await;
    let mut kinds: Vec<&str> = workers.iter().filter_map(|q| q.split(':').nth(1)).collect();
    kinds.sort_unstable();
    let mut all: Vec<&str> = patchbay_jobs::JobKind::ALL
        .iter()
        .map(|k| k.as_str())
        .collect();
    all.sort_unstable();
    assert_eq!(kinds, all, "workers registered at READY=1: {workers:?}");
    // READY means the socket accepts.
    let socket = dir.path().join("var/patchbayd.sock");
    let mut client = patchbay_daemon::ctl::client::Client::connect(&socket)
        .await
        .expect("connect after READY");
    assert!(client.call("status", json!({})).await.is_ok());

    Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status()
        .expect("kill");
    // STATUS= health lines (systemd.rs tests them) may come first.
    loop {
        let n = notify.recv(&mut buf).expect("STOPPING message");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    let status = child.0.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "socket removed on stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_does_not_steal_the_socket() {
    let mut d = Daemon::start(Backend::Sqlite);
    let out = Command::new(PATCHBAYD)
        .arg("--config")
        .arg(&d.config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    // Refused by the store's lock (SQLite) or by the live socket (PostgreSQL).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another patchbayd"), "{stderr}");
    assert!(d.ok("status", json!({})).await.is_object());
    assert_eq!(d.terminate(), Some(0));
}

/// A second daemon on the same SQLite store, with a socket of its own, is refused with
/// what to do instead; the first keeps running. (Several daemons need PostgreSQL.)
#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_one_sqlite_store_is_refused() {
    // A SQLite store in both builds of the suite.
    let mut d = Daemon::start_with(Backend::Sqlite, "[store]\nurl = \"sqlite://var/patchbay.db\"\n");
    let other = d.dir.path().join("other.sock");
    let out = Command::new(PATCHBAYD)
        .arg("--config")
        .arg(&d.config)
        .env("PATCHBAY__CONTROL__SOCKET", &other)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another patchbayd") && stderr.contains("PostgreSQL"),
        "{stderr}"
    );
    assert!(!other.exists(), "the refused daemon made no socket");
    assert!(d.ok("status", json!({})).await.is_object());
    assert_eq!(d.terminate(), Some(0));
}

/// The README's first command: no configuration file, run from a clone where
/// `target/release` holds the loopback connector. A demo account with a loopback
/// channel is created and its traffic arrives; a second start does not add another.
#[tokio::test(flavor = "multi_thread")]
async fn embedded_default_starts_a_demo_account() {
    let dir = tempfile::tempdir().expect("tempdir");
    let release = dir.path().join("target/release");
    std::fs::create_dir_all(&release).expect("mkdir");
    std::fs::copy(
        crate::harness::loopback_library(),
        release.join("libloopback.so"),
    )
    .expect("copy");
    let socket = dir.path().join("var/patchbayd.sock");
    for start in 0..2 {
        let mut child = Command::new(PATCHBAYD)
            .current_dir(dir.path())
            .env_remove("PATCHBAY_CONFIG")
            // Not the embedded default's 9464: tests run side by side.
            .env("PATCHBAY__HTTP__LISTEN", "127.0.0.1:0")
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        crate::harness::wait_for(Duration::from_secs(30), || socket.exists());
        let mut client = patchbay_daemon::ctl::client::Client::connect(&socket)
            .await
            .expect("connect");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let chats = client
                .call("chat.list", json!({"account": 1}))
                .await
                .expect("chat.list");
            if chats.as_array().is_some_and(|c| !c.is_empty()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no demo traffic");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let channels = client
            .call("channel.list", json!({"account": 1}))
            .await
            .expect("channels");
        assert_eq!(
            channels.as_array().map(Vec::len),
            Some(1),
            "start {start}: one demo channel"
        );
        let missing = client.call("account.get", json!({"account": 2})).await;
        assert!(missing.is_err(), "start {start}: no second demo account");
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert_eq!(child.wait().expect("wait").code(), Some(0));
    }
}

/// A daemon that stops with no other running marks its channels `disconnected`: no
/// status claims a channel runs while no daemon runs it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_daemon_leaves_no_channel_connected() {
    let mut d = Daemon::start(Backend::Sqlite);
    let (acc, admin) = d.account("stop").await;
    d.loopback(acc, admin, json!({})).await;
    let connected = "SELECT COUNT(*) FROM channels WHERE status = 'connected'";
    d.until("the channel runs", Duration::from_secs(20), || async {
        (d.store_count(connected).await == 1).then_some(())
    })
    .await;
    assert_eq!(d.terminate(), Some(0));
    assert_eq!(d.store_count(connected).await, 0, "stopped: none connected");
    let said = d
        .store_count(
            "SELECT COUNT(*) FROM channels WHERE status = 'disconnected' \
             AND status_reason IS NOT NULL",
        )
        .await;
    assert_eq!(said, 1, "the channel says why");
    // Started again, it runs the channel again.
    d.spawn();
    d.until("the channel runs again", Duration::from_secs(20), || async {
        (d.store_count(connected).await == 1).then_some(())
    })
    .await;
}
