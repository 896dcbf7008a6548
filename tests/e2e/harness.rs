//! Test fixtures that own their components: the real patchbayd binary in a temp folder
//! (with a throwaway redis-server of its own, `redis.rs`), driven over its control socket —
//! optionally on a wall clock the test moves forward (libfaketime), for billing days.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patchbay_daemon::ctl::client::{CallError, Client};
use serde_json::{Value, json};

pub const PATCHBAYD: &str = env!("CARGO_BIN_EXE_patchbayd");
pub const PATCHBAYCTL: &str = env!("CARGO_BIN_EXE_patchbayctl");

/// An argument of `Daemon::store_exec` / `store_scalar`, and `bind_args!`.
#[macro_use]
#[path = "../support/store_arg.rs"]
mod store_arg;
pub use store_arg::StoreArg;

pub use crate::redis::Redis;

enum StoreConn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

/// Where the daemons of this build keep their store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// `e2e` runs on SQLite files, `e2e_postgres` on PostgreSQL (see main.rs).
pub const STORE: StoreKind = match env!("CARGO_CRATE_NAME").as_bytes() {
    b"e2e_postgres" => StoreKind::Postgres,
    _ => StoreKind::Sqlite,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    /// A Redis without persistence: the daemon journals inbound messages first.
    Redis,
    /// A Redis with an append-only file synced on every write (`appendfsync always`),
    /// as production should run one: the daemon queues inbound messages without
    /// journal rows.
    RedisAof,
    /// A Redis with an append-only file synced every second (Redis' default), which can
    /// lose the last second of pushes: the daemon journals inbound messages first unless
    /// `queue.redis_trust_everysec` says otherwise.
    RedisEverysec,
}

/// The loopback connector cargo built for this test run (a dev-dependency).
pub fn loopback_library() -> PathBuf {
    connector_library("loopback")
}

/// The connector library `lib<name>.so` cargo built for this test run (each shipped
/// connector is a dev-dependency of the daemon, so it lands beside the test binaries).
pub fn connector_library(name: &str) -> PathBuf {
    let bin_dir = Path::new(PATCHBAYD).parent().expect("bin dir");
    let file = format!("lib{name}.so");
    // `cargo test` refreshes deps/; a top-level copy may be left from an older build.
    [bin_dir.join("deps").join(&file), bin_dir.join(&file)]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("{file} next to the test binaries"))
}

/// Copies the shipped connector `lib<name>.so` into a plugin folder: for the
/// `start_full` closure, e.g. `|dir| install_connector(dir, "telegram")`.
pub fn install_connector(plugin_dir: &Path, name: &str) {
    let file = format!("lib{name}.so");
    std::fs::copy(connector_library(name), plugin_dir.join(&file))
        .unwrap_or_else(|e| panic!("copy {file}: {e}"));
}

/// Compiles a C connector from connectors/sdk/tests/c with the system compiler.
pub fn compile_c(source: &str, out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(out)
        .arg("-I")
        .arg(root.join("connectors/sdk/include"))
        .arg(root.join("connectors/sdk/tests/c").join(source))
        .status()
        .expect("a C compiler (cc) must be installed");
    assert!(status.success(), "cc failed for {source}");
}

pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One patchbayd process with its own folder, config and (for Redis) server.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    /// Kept for the daemon's lifetime: dropping it stops the server.
    pub redis: Option<Redis>,
    /// Extra environment for the process (a sibling's own socket).
    env: Vec<(String, String)>,
    /// The PostgreSQL database of this daemon (and its siblings), on `e2e_postgres`.
    pub pg_url: Option<String>,
    /// Runs the binary under this command (`ip netns exec <ns>`), if any.
    launcher: Vec<String>,
}

impl Daemon {
    pub fn config_text(backend: Backend, redis: Option<&Redis>, extra: &str) -> String {
        let queue = match (backend, redis) {
            (Backend::Redis | Backend::RedisAof | Backend::RedisEverysec, Some(r)) => format!(
                "backend = \"redis\"\nredis_url = \"{}\"\nnamespace = \"t{}\"\n",
                r.url(),
                std::process::id()
            ),
            _ => "backend = \"sqlite\"\n".to_owned(),
        };
        format!(
            "[queue]\n{queue}retry_base_ms = 100\nretry_max_ms = 1000\nshutdown_timeout_secs = 10\n\
             lost_job_grace_secs = 2\n\
             [log]\nlevel = \"info,patchbay_daemon=debug\"\n{extra}"
        )
    }

    pub fn start(backend: Backend) -> Daemon {
        Daemon::start_with(backend, "")
    }

    pub fn start_with(backend: Backend, extra: &str) -> Daemon {
        Daemon::start_full(backend, extra, |_| {})
    }

    /// Starts with the loopback connector in the plugin folder; `plugins` may add more
    /// libraries there before the daemon scans it.
    pub fn start_full(backend: Backend, extra: &str, plugins: impl FnOnce(&Path)) -> Daemon {
        let mut d = Daemon::prepare(backend, extra, plugins);
        d.spawn();
        d
    }

    /// Starts with `env` set for the daemon (`PATCHBAY__SECTION__KEY` overrides keys of
    /// a section the harness's configuration already has, such as `[queue]`).
    pub fn start_env(backend: Backend, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon::prepare(backend, extra, |_| {});
        d.env
            .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        d.spawn();
        d
    }

    /// Starts on the test's own `redis` (and the store `extra` names), with `env` set.
    #[allow(dead_code)] // e2e_postgres only (cluster.rs)
    pub fn start_on(redis: Redis, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon::prepare_on(Backend::Redis, Some(redis), extra, |_| {});
        d.env
            .extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        d.spawn();
        d
    }

    /// Starts on a wall clock of its own that the test moves forward with
    /// [`set_days_ahead`](Self::set_days_ahead): libfaketime, preloaded into the real
    /// binary, offsets the real time by what the daemon's `clock` file says. Monotonic
    /// time is left alone, so timers and timeouts run as usual. Billing charges only
    /// days that have begun, so a test of several billing days lives through them.
    pub fn start_clocked(backend: Backend, extra: &str) -> Daemon {
        let mut d = Daemon::prepare(backend, extra, |_| {});
        let clock = d.dir.path().join("clock");
        std::fs::write(&clock, "+0d").expect("clock file");
        let lib = [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/faketime/libfaketime.so.1",
            "/usr/lib64/faketime/libfaketime.so.1",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime must be installed (.ci/run installs it)");
        d.env.extend(
            [
                ("LD_PRELOAD", lib.to_owned()),
                ("FAKETIME_TIMESTAMP_FILE", clock.display().to_string()),
                // Read the file at every call: its cache is per thread and may keep a
                // thread on the old day for long after the file changed.
                ("FAKETIME_NO_CACHE", "1".to_owned()),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        d.spawn();
        d
    }

    /// Moves a [`start_clocked`](Self::start_clocked) daemon's wall clock (and its
    /// siblings') to `days` after the real date; the daemon reads it at its next call
    /// for the time.
    pub async fn set_days_ahead(&self, days: u64) {
        let clock = self
            .env
            .iter()
            .find(|(k, _)| k == "FAKETIME_TIMESTAMP_FILE")
            .map(|(_, v)| v.clone())
            .expect("a daemon started with start_clocked");
        // Written whole, then renamed: a reader never sees a half-written file.
        let next = format!("{clock}.next");
        std::fs::write(&next, format!("+{days}d")).expect("clock file");
        std::fs::rename(&next, &clock).expect("clock file");
    }

    /// The folder, config and (for Redis) server of a daemon not yet started.
    fn prepare(backend: Backend, extra: &str, plugins: impl FnOnce(&Path)) -> Daemon {
        let redis = match backend {
            Backend::Sqlite => None,
            Backend::Redis => Some(Redis::start()),
            Backend::RedisAof => Some(Redis::start_persistent(Some("always"))),
            Backend::RedisEverysec => Some(Redis::start_persistent(Some("everysec"))),
        };
        Daemon::prepare_on(backend, redis, extra, plugins)
    }

    fn prepare_on(
        backend: Backend,
        redis: Option<Redis>,
        extra: &str,
        plugins: impl FnOnce(&Path),
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir(&plugin_dir).expect("plugin dir");
        // Whatever the umask: the daemon refuses a group- or world-writable plugin
        // folder (the temp folder above is 0700, and /tmp a root-owned sticky one).
        std::fs::set_permissions(&plugin_dir, std::fs::Permissions::from_mode(0o700))
            .expect("chmod plugin dir");
        std::fs::copy(loopback_library(), plugin_dir.join("libloopback.so"))
            .expect("copy loopback");
        plugins(&plugin_dir);
        let config = dir.path().join("patchbayd.toml");
        // Channels are free unless a test is about billing and says otherwise.
        let billing = if extra.contains("[billing") {
            ""
        } else {
            "[billing]\ndefault_price = 0\n"
        };
        // On e2e_postgres each daemon gets a fresh database (its siblings share it).
        let pg_url = (STORE == StoreKind::Postgres && !extra.contains("[store]"))
            .then(|| crate::pg_cluster::fresh_database("e2e"));
        let store = match &pg_url {
            Some(url) => format!("[store]\nurl = \"{url}\"\n"),
            None => String::new(),
        };
        // Any free port for the metrics/dashboard listener (`status` says which), unless
        // the test configures it: parallel daemons cannot share the default 9464.
        let http = if extra.contains("[http]") {
            ""
        } else {
            "[http]\nlisten = \"127.0.0.1:0\"\n"
        };
        let extra = format!("{extra}\n{billing}{store}{http}[plugins]\ndir = \"plugins\"\n");
        std::fs::write(
            &config,
            Daemon::config_text(backend, redis.as_ref(), &extra),
        )
        .expect("write config");
        let socket = dir.path().join("var/patchbayd.sock");
        Daemon {
            dir,
            config,
            socket,
            child: None,
            redis,
            env: Vec::new(),
            pg_url,
            launcher: Vec::new(),
        }
    }

    /// A second daemon on the same configuration — same store, queue, plugins, clock —
    /// with a control socket of its own.
    pub fn sibling(&self) -> Daemon {
        self.sibling_with(&[])
    }

    /// A [`sibling`](Self::sibling) with `env` set for it as well (its `node.name`).
    pub fn sibling_with(&self, extra_env: &[(&str, &str)]) -> Daemon {
        self.sibling_under(&[], extra_env)
    }

    /// A [`sibling_with`](Self::sibling_with) whose binary runs under `launcher`
    /// (`ip netns exec <ns>`, which execs it: the child's pid is the daemon's).
    pub fn sibling_under(&self, launcher: &[&str], extra_env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sibling.sock");
        let mut env = vec![(
            "PATCHBAY__CONTROL__SOCKET".to_owned(),
            socket.display().to_string(),
        )];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env.extend(
            self.env
                .iter()
                .filter(|(k, _)| k.starts_with("FAKETIME") || k == "LD_PRELOAD")
                .cloned(),
        );
        let mut d = Daemon {
            dir,
            config: self.config.clone(),
            socket,
            child: None,
            redis: None,
            env,
            pg_url: self.pg_url.clone(),
            launcher: launcher.iter().map(|s| (*s).to_owned()).collect(),
        };
        d.spawn();
        d
    }

    /// The running process's pid (for /proc/<pid>/status).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("patchbayd is running")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("patchbayd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or restarts) the binary and waits until the socket answers `status`.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(PATCHBAYD);
                c
            }
            None => Command::new(PATCHBAYD),
        };
        let child = command
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn patchbayd");
        self.child = Some(child);
        let socket = self.socket.clone();
        let start = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "patchbayd exited with {status} during start:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "patchbayd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the crash the daemon must survive without losing or doubling work.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                panic!("patchbayd ignored SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect")
    }

    pub async fn call(&self, method: &str, params: Value) -> Result<Value, CallError> {
        self.client().await.call(method, params).await
    }

    pub async fn ok(&self, method: &str, params: Value) -> Value {
        match self.call(method, params.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("{method} {params} failed: {e:?}\n{}", self.log()),
        }
    }

    /// Calls a method that must fail with an application error of `kind`.
    pub async fn fails(&self, method: &str, params: Value, kind: &str) -> String {
        match self.call(method, params.clone()).await {
            Err(CallError::Rpc {
                code: -32000,
                message,
                kind: Some(k),
            }) if k == kind => message,
            other => panic!("{method} {params}: expected {kind}, got {other:?}"),
        }
    }

    pub async fn account(&self, name: &str) -> (i64, i64) {
        let r = self
            .ok(
                "account.create",
                json!({"name": name, "admin": {"name": "Admin", "email": format!("admin@{name}.test")}}),
            )
            .await;
        (
            r["account"]["id"].as_i64().expect("id"),
            r["admin"]["id"].as_i64().expect("admin id"),
        )
    }

    /// Every message of the account's chats (up to 100 a chat), each with its chat's
    /// `chat_external_id` and `chat_channel` beside its own fields.
    pub async fn account_messages(&self, account: i64) -> Vec<Value> {
        let chats = self.ok("chat.list", json!({"account": account})).await;
        let mut out = Vec::new();
        for chat in chats.as_array().expect("chats") {
            let m = self
                .ok("chat.messages", json!({"chat": chat["id"], "limit": 100}))
                .await;
            for mut msg in m.as_array().expect("messages").iter().cloned() {
                msg["chat_external_id"] = chat["external_chat_id"].clone();
                msg["chat_channel"] = chat["channel"].clone();
                out.push(msg);
            }
        }
        out
    }

    /// Polls `f` until it returns Some, failing after `limit`.
    pub async fn until<T, F, Fut>(&self, what: &str, limit: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Adds a loopback channel and waits until it is connected.
    pub async fn loopback(&self, account: i64, actor: i64, config: Value) -> i64 {
        let ch = self
            .ok("channel.add", json!({"account": account, "actor": actor, "kind": "loopback", "name": "lb", "config": config}))
            .await;
        let id = ch["id"].as_i64().expect("channel id");
        self.until("channel connected", Duration::from_secs(20), || async {
            let list = self.ok("channel.list", json!({"account": account})).await;
            list.as_array()?
                .iter()
                .any(|c| c["id"] == id && c["status"] == "connected")
                .then_some(())
        })
        .await;
        id
    }

    /// Runs a statement of portable SQL on the daemon's store (SQLite file or
    /// PostgreSQL database): writes what a crash or an old version would have left.
    /// Returns the rows affected.
    pub async fn store_exec(&self, sql: &str, args: &[StoreArg]) -> u64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self.store_conn().await {
            StoreConn::Sqlite(mut c) => {
                let q = bind_args!(sqlx::query(sql), args);
                q.execute(&mut c).await.expect("store statement").rows_affected()
            }
            StoreConn::Postgres(mut c) => {
                let q = bind_args!(sqlx::query(sql), args);
                q.execute(&mut c).await.expect("store statement").rows_affected()
            }
        }
    }

    /// `store_count` with arguments: one BIGINT a portable query answers.
    pub async fn store_scalar(&self, sql: &str, args: &[StoreArg]) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self.store_conn().await {
            StoreConn::Sqlite(mut c) => {
                let q = bind_args!(sqlx::query_scalar(sql), args);
                q.fetch_one(&mut c).await.expect("store query")
            }
            StoreConn::Postgres(mut c) => {
                let q = bind_args!(sqlx::query_scalar(sql), args);
                q.fetch_one(&mut c).await.expect("store query")
            }
        }
    }

    async fn store_conn(&self) -> StoreConn {
        use sqlx::ConnectOptions;
        match &self.pg_url {
            Some(url) => StoreConn::Postgres(
                url.parse::<sqlx::postgres::PgConnectOptions>()
                    .expect("store url")
                    .connect()
                    .await
                    .expect("connect to the store"),
            ),
            None => StoreConn::Sqlite(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(self.dir.path().join("var/patchbay.db"))
                    .busy_timeout(Duration::from_secs(10))
                    .connect()
                    .await
                    .expect("open the store"),
            ),
        }
    }

    /// One integer a query (portable SQL) of the daemon's store answers: its SQLite file
    /// read-only, beside the running daemon (WAL lets it read while the daemon writes),
    /// or its PostgreSQL database.
    pub async fn store_count(&self, sql: &str) -> i64 {
        use sqlx::Connection;
        if let Some(url) = &self.pg_url {
            let mut conn = sqlx::PgConnection::connect(url)
                .await
                .expect("connect to the store");
            return sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_one(&mut conn)
                .await
                .expect("store query");
        }
        let url = format!(
            "sqlite://{}?mode=ro",
            self.dir.path().join("var/patchbay.db").display()
        );
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("open the store");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&mut conn)
            .await
            .expect("store query")
    }

    /// Polls `job.get` until the job reaches one of `states`.
    pub async fn job_until(&self, id: &str, states: &[&str], limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let job = self.ok("job.get", json!({ "id": id })).await;
            if states.iter().any(|s| job["state"] == *s) {
                return job;
            }
            assert!(
                start.elapsed() < limit,
                "job {id} stuck in {job}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn ctl(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(PATCHBAYCTL)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run patchbayctl")
}

/// A real SMTP server of our own: Debian's aiosmtpd writing every message it accepts
/// into a Maildir (`apt-get install python3-aiosmtpd`; .ci/run installs it).
pub struct Smtp {
    child: Option<Child>,
    pub port: u16,
    pub maildir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Smtp {
    /// Picks a free port without listening on it yet (for "down, then up" tests).
    pub fn reserve() -> Smtp {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        Smtp {
            child: None,
            port,
            maildir: dir.path().join("maildir"),
            _dir: dir,
        }
    }

    pub fn start() -> Smtp {
        let mut s = Smtp::reserve();
        s.listen();
        s
    }

    pub fn listen(&mut self) {
        let python =
            std::env::var("PATCHBAY_TEST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
        let child = Command::new(python)
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{}", self.port),
            ])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&self.maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with aiosmtpd (apt-get install python3-aiosmtpd)");
        self.child = Some(child);
        let port = self.port;
        wait_for(Duration::from_secs(15), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, as raw text.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(self.maildir.join(sub)) {
                for e in entries.filter_map(Result::ok) {
                    if let Ok(text) = std::fs::read_to_string(e.path()) {
                        out.push(text);
                    }
                }
            }
        }
        out
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A header's value from a raw message (first occurrence, unfolded).
pub fn header(message: &str, name: &str) -> Option<String> {
    let prefix = format!("{}:", name.to_lowercase());
    let mut lines = message.lines();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            return None;
        }
        if line.to_lowercase().starts_with(&prefix) {
            let mut value = line[prefix.len()..].trim().to_owned();
            for cont in lines.by_ref() {
                if cont.starts_with(' ') || cont.starts_with('\t') {
                    value.push(' ');
                    value.push_str(cont.trim());
                } else {
                    break;
                }
            }
            return Some(value);
        }
    }
    None
}
