//! systemd deployment: the unit files pass `systemd-analyze verify` and the offline
//! security review; the real daemon runs under `systemd-socket-activate` (LISTEN_FDS)
//! with a real NOTIFY_SOCKET and WATCHDOG_USEC, as systemd would start it; the watchdog
//! pings stop while the queue backend hangs; SIGHUP reloads the log level, prices and
//! new connectors without touching running channels; the .deb recipe ships every file.
//! No running systemd is needed.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Backend, Daemon, PATCHBAYD, Redis, compile_c};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether a systemd tool is installed; .ci/run installs the `systemd` package, so a
/// skip is only for a developer machine without it.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!(
            "SKIPPED: {tool} is not installed (apt-get install systemd); .ci/run installs it"
        );
    }
    found
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// The receiving end of NOTIFY_SOCKET, as systemd has it.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        Notify {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Reads messages until one satisfies `want`, or panics after `limit`.
    fn until(&mut self, what: &str, limit: Duration, want: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < limit {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if want(&msg) {
                    return msg;
                }
            }
        }
        panic!("no {what} within {limit:?}; got {:#?}", self.seen);
    }

    /// All messages that arrive during `span`.
    fn during(&mut self, span: Duration) -> Vec<String> {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        while start.elapsed() < span {
            if let Ok(n) = self.sock.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        self.seen.extend(out.iter().cloned());
        out
    }
}

fn pings(msgs: &[String]) -> usize {
    msgs.iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

/// A child that is SIGKILLed if a test fails before stopping it.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.code();
            }
            assert!(start.elapsed() < limit, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `cmd` through `sh` so that WATCHDOG_PID can name the pid the daemon will have:
/// `exec` keeps the shell's pid, and systemd-socket-activate execs the daemon too.
fn spawn_with_watchdog_pid(script: &str, args: &[&Path], notify: &Notify, log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log");
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("export WATCHDOG_PID=$$; {script}"))
        .arg("sh")
        .args(args)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .env("PATCHBAY__HTTP__LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn");
    Proc(child)
}

#[test]
fn shipped_system_configuration_is_valid() {
    let out = Command::new(PATCHBAYD)
        .arg("--check-config")
        .arg("--config")
        .arg(repo().join("systemd/patchbayd.toml"))
        .output()
        .expect("patchbayd --check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("socket /run/patchbayd.sock, store /var/lib/patchbay/patchbay.db"),
        "{text}"
    );
}

#[test]
fn unit_files_verify_and_reach_the_security_target() {
    if !have("systemd-analyze") {
        return;
    }
    // verify checks that ExecStart=/ExecReload= binaries exist and that the units'
    // dependencies resolve: give it a root with the install layout and the system units.
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    for d in ["usr/bin", "bin", "etc/systemd/system", "usr/lib/systemd"] {
        std::fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd"))
        .status()
        .expect("cp");
    assert!(copied.success());
    std::fs::copy(PATCHBAYD, r.join("usr/bin/patchbayd")).expect("copy patchbayd");
    std::fs::copy("/bin/kill", r.join("bin/kill")).expect("copy kill");
    for unit in ["patchbayd.service", "patchbayd.socket"] {
        std::fs::copy(
            repo().join("systemd").join(unit),
            r.join("etc/systemd/system").join(unit),
        )
        .expect("copy unit");
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .args(["patchbayd.service", "patchbayd.socket"])
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings (exit 0): any line is a failure.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(repo().join("systemd/patchbayd.service"))
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("patchbayd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 1.5, "exposure {score} > 1.5:\n{text}");

    if Command::new("systemd-sysusers")
        .arg("--version")
        .output()
        .is_ok()
    {
        let out = Command::new("systemd-sysusers")
            .arg(format!("--root={}", r.display()))
            .arg("--dry-run")
            .arg(repo().join("systemd/sysusers.d/patchbay.conf"))
            .output()
            .expect("systemd-sysusers");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "systemd-sysusers:\n{all}");
        assert!(
            all.contains("group 'patchbay-admin'") && all.contains("user 'patchbay'"),
            "{all}"
        );
    }
}

#[test]
fn socket_activation_notify_watchdog_reload_and_stop() {
    if !have("systemd-socket-activate") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("patchbayd.sock");
    let config = dir.path().join("patchbayd.toml");
    std::fs::write(
        &config,
        format!("[control]\nsocket = \"{}\"\n", socket.display()),
    )
    .expect("config");
    let log_path = dir.path().join("patchbayd.log");
    let mut notify = Notify::bind(dir.path());
    // As systemd runs the pair: the socket exists first and the daemon starts on the
    // first connection, with LISTEN_FDS=1 and LISTEN_PID set for it.
    let mut daemon = spawn_with_watchdog_pid(
        r#"exec systemd-socket-activate -l "$1" -E NOTIFY_SOCKET -E WATCHDOG_USEC -E WATCHDOG_PID -E PATCHBAY__HTTP__LISTEN "$2" --config "$3""#,
        &[&socket, Path::new(PATCHBAYD), &config],
        &notify,
        &log_path,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    crate::harness::wait_for(Duration::from_secs(10), || socket.exists());

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let status = rt.block_on(async {
        let mut client = patchbay_daemon::ctl::client::Client::connect(&socket)
            .await
            .expect("connect to the activated socket");
        client.call("status", json!({})).await
    });
    let status = status.unwrap_or_else(|e| panic!("status: {e:?}\n{}", log()));
    assert_eq!(
        status["pid"],
        daemon.0.id(),
        "the activated process answers"
    );
    assert!(
        log().contains("control socket passed by systemd"),
        "{}",
        log()
    );

    let ready = notify.until("READY=1", Duration::from_secs(20), |m| {
        m.contains("READY=1")
    });
    assert!(ready.contains("STATUS=ready"), "{ready}");
    // WATCHDOG_USEC=1s: a ping every 0.5 s, each after a store and queue probe, and a
    // STATUS= line with channels and queue depth.
    // (Once today's billing run, queued at start, has run.)
    let status_line = notify.until("a STATUS= health line", Duration::from_secs(10), |m| {
        m.contains("STATUS=channels:") && m.contains("; queue: 0")
    });
    assert!(status_line.contains("; queue: 0"), "{status_line}");
    let seen = notify.during(Duration::from_secs(2));
    assert!(pings(&seen) >= 3, "pings in 2 s: {seen:#?}\n{}", log());

    // ExecReload=/bin/kill -HUP $MAINPID
    signal(daemon.0.id(), "HUP");
    notify.until("RELOADING=1", Duration::from_secs(10), |m| {
        m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC=")
    });
    let reloaded = notify.until("READY=1 after the reload", Duration::from_secs(10), |m| {
        m.contains("READY=1")
    });
    assert!(reloaded.contains("nothing changed"), "{reloaded}");

    signal(daemon.0.id(), "TERM");
    notify.until("STOPPING=1", Duration::from_secs(20), |m| {
        m.contains("STOPPING=1")
    });
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        log()
    );
    // The socket belongs to the socket unit (RemoveOnStop=): the daemon leaves it.
    assert!(socket.exists(), "a passed socket must not be removed");
}

/// An outage is not a reason for systemd to restart the daemon (and every connector):
/// with the Redis server frozen (SIGSTOP) the queue cannot answer, STATUS= says the
/// daemon is degraded and why, and the watchdog pings go on, because the runtime still
/// runs tasks; once Redis thaws STATUS= is back to normal.
#[test]
fn watchdog_pings_go_on_while_the_queue_backend_hangs() {
    let redis = Redis::start();
    let redis_pid: u32 = {
        let client = redis::Client::open(redis.url()).expect("redis url");
        let mut con = client.get_connection().expect("redis connection");
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut con)
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("process_id in INFO")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("patchbayd.toml");
    std::fs::write(
        &config,
        Daemon::config_text(Backend::Redis, Some(&redis), ""),
    )
    .expect("config");
    let log_path = dir.path().join("patchbayd.log");
    let mut notify = Notify::bind(dir.path());
    let mut daemon = spawn_with_watchdog_pid(
        r#"exec "$1" --config "$2""#,
        &[Path::new(PATCHBAYD), &config],
        &notify,
        &log_path,
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    notify.until("READY=1", Duration::from_secs(30), |m| {
        m.contains("READY=1")
    });
    // READY=1 came only once every worker had its consumer group on the Redis server.
    {
        let client = redis::Client::open(redis.url()).expect("redis url");
        let mut con = client.get_connection().expect("redis connection");
        let streams: Vec<String> = redis::cmd("KEYS")
            .arg("*:stream")
            .query(&mut con)
            .expect("KEYS");
        assert_eq!(
            streams.len(),
            patchbay_jobs::JobKind::ALL.len(),
            "one stream per job kind at READY=1: {streams:?}"
        );
        for stream in &streams {
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query(&mut con)
                .expect("XINFO GROUPS");
            assert!(
                format!("{groups:?}").contains("workers"),
                "{stream}: {groups:?}"
            );
        }
    }
    let seen = notify.during(Duration::from_secs(2));
    assert!(pings(&seen) >= 3, "pings while healthy: {seen:#?}");

    signal(redis_pid, "STOP");
    // Thaw Redis even if an assertion below fails, so its Drop can stop it.
    struct Thaw(u32);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.0.to_string())
                .status();
        }
    }
    let thaw = Thaw(redis_pid);
    notify.until("STATUS=degraded", Duration::from_secs(15), |m| {
        m.contains("STATUS=degraded: queue down")
    });
    let frozen = notify.during(Duration::from_secs(3));
    assert!(pings(&frozen) >= 3, "pings while Redis hangs: {frozen:#?}");
    assert!(
        log().contains("degraded; waiting for what is down to come back"),
        "{}",
        log()
    );
    assert!(!log().contains("withholding WATCHDOG=1"), "{}", log());

    drop(thaw);
    notify.until(
        "a normal STATUS= after Redis thawed",
        Duration::from_secs(30),
        |m| m.contains("STATUS=channels: "),
    );
    let seen = notify.during(Duration::from_secs(2));
    assert!(pings(&seen) >= 2, "pings after the thaw: {seen:#?}");
    assert!(log().contains("everything answers again"), "{}", log());

    signal(daemon.0.id(), "TERM");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        log()
    );
}

/// SIGHUP (systemctl reload): log level, prices and a connector dropped into the plugin
/// folder change while a loopback channel keeps running on the same instance; a broken
/// file is refused and the daemon carries on with what it has.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_level_prices_and_new_connectors_keeping_channels() {
    let d = Daemon::start(Backend::Sqlite);
    let pid = d.ok("status", json!({})).await["pid"]
        .as_u64()
        .expect("pid") as u32;
    let (acc, admin) = d.account("reload").await;
    let ch = d.loopback(acc, admin, json!({})).await;
    let starts = |log: &str| {
        log.lines()
            .filter(|l| l.contains("loopback +") && l.contains("connected"))
            .count()
    };
    let starts_before = starts(&d.log());
    assert_eq!(starts_before, 1, "{}", d.log());
    let original = std::fs::read_to_string(&d.config).expect("config");
    let reloads = |log: &str| log.matches("configuration reloaded").count();

    let reload = |text: String| {
        let done = reloads(&d.log()) + d.log().matches("new configuration is ignored").count();
        std::fs::write(&d.config, text).expect("write config");
        signal(pid, "HUP");
        crate::harness::wait_for(Duration::from_secs(20), || {
            let log = d.log();
            reloads(&log) + log.matches("new configuration is ignored").count() > done
        });
    };
    // A failing call logs "control request failed" at debug level only.
    let debug_lines = || d.log().matches("control request failed").count();
    let bad_call = || async {
        let _ = d.call("no.such.method", json!({})).await;
    };

    // 1. Quieter: the harness runs with patchbay_daemon=debug; reload to plain info.
    reload(original.replace("info,patchbay_daemon=debug", "info"));
    assert!(
        d.log().contains(r#"applied="log.level = info""#),
        "{}",
        d.log()
    );
    let quiet = debug_lines();
    bad_call().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(debug_lines(), quiet, "debug lines after level=info");

    // 2. Louder again, a new price and a C connector dropped into the plugin folder.
    let plugins = d.dir.path().join("plugins");
    compile_c("hello_connector.c", &plugins.join("libhello.so"));
    let kinds = |list: serde_json::Value| -> Vec<String> {
        list.as_array()
            .expect("plugin list")
            .iter()
            .filter_map(|p| p["kind"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(kinds(d.ok("plugin.list", json!({})).await), ["loopback"]);
    reload(format!("{original}\n[billing.prices]\nloopback = 250\n"));
    let log = d.log();
    assert!(log.contains("new connectors: hello"), "{log}");
    assert!(
        log.contains("billing prices (default ") && log.contains("loopback 250)"),
        "{log}"
    );
    let before = debug_lines();
    bad_call().await;
    d.until("a debug line", Duration::from_secs(5), || async {
        (debug_lines() > before).then_some(())
    })
    .await;
    assert_eq!(
        kinds(d.ok("plugin.list", json!({})).await),
        ["hello", "loopback"]
    );
    let list = d.ok("channel.list", json!({"account": acc})).await;
    assert_eq!(list[0]["id"], ch);
    assert_eq!(list[0]["status"], "connected");
    assert_eq!(list[0]["daily_price"], 250);
    // The new kind is usable at once.
    d.ok(
        "channel.add",
        json!({"account": acc, "actor": admin, "kind": "hello", "name": "C", "config": {}}),
    )
    .await;

    // 3. A broken file changes nothing.
    reload("[queue]\nbackend = \"mysql\"\n".to_owned());
    assert!(
        d.log().contains("queue.backend") && d.log().contains("running one kept"),
        "{}",
        d.log()
    );
    assert!(d.ok("status", json!({})).await.is_object());
    let list = d.ok("channel.list", json!({"account": acc})).await;
    let lb = list
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["id"] == ch)
        .cloned()
        .expect("loopback channel");
    assert_eq!(lb["status"], "connected");
    assert_eq!(lb["daily_price"], 250);

    // Through three reloads the loopback instance was never restarted.
    assert_eq!(starts(&d.log()), starts_before, "{}", d.log());
}

/// The .deb recipe (`[package.metadata.deb]`, built with cargo-deb, which CI does not
/// install): every file it ships exists, the connectors are the ones the workspace
/// builds, the configuration is a conffile, and the maintainer scripts parse.
#[test]
fn deb_package_recipe_is_complete() {
    let manifest = repo().join("daemon/Cargo.toml");
    let cargo = config::Config::builder()
        .add_source(config::File::from(manifest.as_path()).format(config::FileFormat::Toml))
        .build()
        .expect("daemon/Cargo.toml");
    let assets: Vec<Vec<String>> = cargo
        .get("package.metadata.deb.assets")
        .expect("package.metadata.deb.assets");
    let daemon_dir = repo().join("daemon");
    let mut shipped = Vec::new();
    for asset in &assets {
        let [source, dest, mode] = asset.as_slice() else {
            panic!("asset {asset:?} is not [source, destination, mode]");
        };
        assert!(u32::from_str_radix(mode, 8).is_ok(), "{asset:?}");
        match source.strip_prefix("target/release/") {
            Some(built) => shipped.push(built.to_owned()),
            None => assert!(daemon_dir.join(source).is_file(), "{source} is missing"),
        }
        if dest.ends_with('/') {
            let name = Path::new(source).file_name().expect("file name");
            shipped.push(format!("{dest}{}", name.to_string_lossy()));
        } else {
            shipped.push(dest.clone());
        }
    }
    for want in [
        "patchbayd",
        "patchbayctl",
        "libloopback.so",
        "libtelegram.so",
        "libwebhook.so",
        "libwhatsapp.so",
        "usr/bin/patchbayd",
        "usr/lib/patchbay/connectors/libtelegram.so",
        "lib/systemd/system/patchbayd.service",
        "lib/systemd/system/patchbayd.socket",
        "usr/lib/sysusers.d/patchbay.conf",
        "etc/patchbay/patchbayd.toml",
        "usr/share/bash-completion/completions/patchbayctl",
        "usr/share/man/man1/patchbayctl.1",
    ] {
        assert!(
            shipped.iter().any(|s| s == want),
            "{want} not in {shipped:?}"
        );
    }
    let conffiles: Vec<String> = cargo
        .get("package.metadata.deb.conf-files")
        .expect("conf-files");
    assert_eq!(conffiles, ["/etc/patchbay/patchbayd.toml"]);
    let scripts: String = cargo
        .get("package.metadata.deb.maintainer-scripts")
        .expect("maintainer-scripts");
    for script in ["postinst", "prerm", "postrm"] {
        let path = daemon_dir.join(&scripts).join(script);
        let ok = Command::new("sh")
            .arg("-n")
            .arg(&path)
            .status()
            .expect("sh -n");
        assert!(ok.success(), "{} does not parse", path.display());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("script").permissions(),
        );
        assert!(mode & 0o111 != 0, "{} is not executable", path.display());
    }
    // patchbayctl's completions and man page: the script writes every one the package
    // ships, from the binary itself.
    let out = tempfile::tempdir().expect("tempdir");
    let ok = Command::new(daemon_dir.join("patchbayctl-assets.sh"))
        .arg(crate::harness::PATCHBAYCTL)
        .arg(out.path())
        .status()
        .expect("patchbayctl-assets.sh");
    assert!(ok.success(), "patchbayctl-assets.sh failed");
    let generated = assets
        .iter()
        .filter_map(|a| a[0].strip_prefix("target/release/"))
        .filter(|f| f.starts_with("patchbayctl.") || f.starts_with("_patchbayctl"));
    let mut n = 0;
    for file in generated {
        let len = std::fs::metadata(out.path().join(file)).map_or(0, |m| m.len());
        assert!(len > 0, "patchbayctl-assets.sh did not write {file}");
        n += 1;
    }
    assert_eq!(n, 4, "bash, zsh and fish completions and the man page");
}
