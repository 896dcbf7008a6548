//! A throwaway PostgreSQL server owned by the test process.
//!
//! Include it in a test crate with
//! `#[path = "<relative path to the workspace>/tests/support/pg_cluster.rs"] mod pg_cluster;`.
//! It needs `rustix` (feature `process`) as a dev-dependency of that crate.
//!
//! * [`shared()`] is the one server of the test binary, started on first use and used by
//!   all its tests; [`fresh_database`] makes each test a database of its own on it.
//!   Nobody may stop it ([`PgServer::stop`] refuses).
//! * [`PgServer::start_private`] is a server a test owns alone, to stop and start in
//!   place (same data, same port: "PostgreSQL down while running"). Dropping it stops
//!   it and removes its files.
//! * [`PgServer::start_durable`] is a private server with production's durability, for
//!   the benches (`daemon/benches/`): what it acknowledges survives a machine crash.
//! * [`PgServer::start_private_on`] is a private server that also listens on TCP on one
//!   address of the test's own (a veth in a network namespace the test made), for
//!   clients whose route to it the test cuts.
//!
//! Design:
//! * Debian's binaries, the highest version under `/usr/lib/postgresql/*/bin/` (or
//!   `$PG_BIN_DIR`). The machine's own PostgreSQL is never used: each server listens
//!   only on a Unix socket in its own temporary folder (`listen_addresses=''`, `-k`),
//!   and every client is pointed there explicitly (a `start_private_on` server also on
//!   the one address it was given).
//! * initdb refuses to run as root, so as root the binaries run as the `postgres` user
//!   (uid and gid from /etc/passwd) in a folder chowned to it; otherwise as ourselves.
//! * Durability is off (`fsync`, `full_page_writes`) except on a durable server: the
//!   data is thrown away, and a crash of the machine is not what these tests are about. The shared server also
//!   runs with `synchronous_commit=off`; a private one does not, since a test may
//!   [`crash`](PgServer::crash) it and then count on every commit the server
//!   acknowledged (without it an immediate shutdown loses the last ~200 ms of them).
//!   With `fsync=off` a synchronous commit is only a write to the page cache.
//! * Rust test binaries run no static destructors, so the server is made to die with the
//!   test process instead: each server is spawned by a dedicated thread that lives as
//!   long as the server is wanted (for the shared one, as long as the process), with a
//!   parent-death signal of SIGQUIT (immediate shutdown, which stops the backends too).
//!   The kernel sends that signal when the spawning *thread* exits, which is why it is
//!   not spawned from a test's thread. The signal is set in `pre_exec`, after std has
//!   switched to the `postgres` user (a change of credentials clears it).
//! * Each folder records its owner (pid and process start time, so a reused pid is not
//!   mistaken for the owner). At start-up, folders of this harness whose owner is gone
//!   are removed, after stopping a server still running in one; so the shared server's
//!   folder (in `std::env::temp_dir()`, which the `postgres` user must be able to reach)
//!   stays until the next run.
//! * The port is 20000 + pid % 20000 (+1 per further server of the process), moved on a
//!   clash; it only names the socket file and seeds the shared memory key.

#![allow(dead_code)]

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Once, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rustix::process::{Pid, Signal};

const PREFIX: &str = "patchbay-pg-";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The test binary's shared server, started on first use.
pub fn shared() -> &'static PgServer {
    static SHARED: OnceLock<PgServer> = OnceLock::new();
    SHARED.get_or_init(|| PgServer::launch(true, Durability::Off, None))
}

/// A new, empty database on the shared server; returns its URL.
pub fn fresh_database(name_hint: &str) -> String {
    shared().fresh_database(name_hint)
}

/// One PostgreSQL server: its folder (data, socket, log) and the thread that owns the
/// process.
pub struct PgServer {
    root: PathBuf,
    port: u16,
    /// The TCP address of a `start_private_on` server.
    tcp: Option<std::net::IpAddr>,
    bin: PathBuf,
    shared: bool,
    control: mpsc::Sender<Request>,
    supervisor: Option<JoinHandle<()>>,
    databases: AtomicU32,
}

enum Request {
    Start(mpsc::Sender<Result<(), String>>),
    Stop(Signal, mpsc::Sender<()>),
    Shutdown(mpsc::Sender<()>),
}

impl PgServer {
    /// A server of the calling test's own, which it may stop and start.
    pub fn start_private() -> PgServer {
        Self::launch(false, Durability::Off, None)
    }

    /// A private server that also accepts TCP connections on `addr` (an IP address the
    /// machine has) from the clients of network `clients` (CIDR), without a password.
    pub fn start_private_on(addr: std::net::IpAddr, clients: &str) -> PgServer {
        Self::launch(
            false,
            Durability::Off,
            Some(Tcp {
                addr,
                clients: clients.to_owned(),
            }),
        )
    }

    /// A private server with `fsync`, `full_page_writes` and `synchronous_commit` on (a
    /// commit returns once its WAL is on disk), plus `settings` as `-c name=value`
    /// (memory, WAL size, preloaded libraries: what a bench states it ran with).
    pub fn start_durable(settings: &[(&str, &str)]) -> PgServer {
        let settings = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Self::launch(false, Durability::On(settings), None)
    }

    fn launch(shared: bool, durability: Durability, tcp: Option<Tcp>) -> PgServer {
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(remove_stale_folders);
        static SEQ: AtomicU16 = AtomicU16::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);

        let bin = bin_dir();
        let run_as = run_as();
        let root = std::env::temp_dir().join(format!("{PREFIX}{}-{seq}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
        let me = std::process::id();
        let started = start_time(me).unwrap_or_default();
        fs::write(root.join("owner"), format!("{me} {started}\n")).expect("writing owner");
        if let Some((uid, gid)) = run_as {
            chown(&root, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", root.display()));
        }

        let data = root.join("data");
        let durable = matches!(durability, Durability::On(_));
        let mut initdb = as_server_user(Command::new(bin.join("initdb")), run_as, &root);
        initdb.arg("-D").arg(&data).args([
            "--auth=trust",
            "--username=postgres",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if !durable {
            initdb.arg("--no-sync");
        }
        let out = initdb
            .output()
            .unwrap_or_else(|e| panic!("running {}/initdb: {e}", bin.display()));
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(tcp) = &tcp {
            // initdb's rules admit local and loopback clients only.
            let hba = data.join("pg_hba.conf");
            let mut rules = fs::read_to_string(&hba).expect("reading pg_hba.conf");
            rules.push_str(&format!("host all all {} trust\n", tcp.clients));
            fs::write(&hba, rules).expect("writing pg_hba.conf");
        }

        let first_port = 20000 + (me % 20000) as u16 + seq;
        let (control, requests) = mpsc::channel();
        let (port_tx, port_rx) = mpsc::channel();
        let process = Process {
            bin: bin.clone(),
            root: root.clone(),
            run_as,
            port: first_port,
            shared,
            durability,
            listen: tcp.as_ref().map(|t| t.addr),
        };
        let supervisor = std::thread::Builder::new()
            .name(format!("pg-server-{seq}"))
            .spawn(move || supervise(process, requests, port_tx))
            .expect("spawning the PostgreSQL supervisor thread");
        let port = match port_rx.recv() {
            Ok(Ok(port)) => port,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the PostgreSQL supervisor thread died while starting the server"),
        };
        PgServer {
            root,
            port,
            tcp: tcp.map(|t| t.addr),
            bin,
            shared,
            control,
            supervisor: Some(supervisor),
            databases: AtomicU32::new(0),
        }
    }

    /// The folder holding the Unix socket (the `host` of a URL).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost/{db}?host={}&port={}",
            encode_query_value(&self.root.to_string_lossy()),
            self.port
        )
    }

    /// The URL of database `db` over TCP, on a [`start_private_on`](Self::start_private_on)
    /// server.
    pub fn tcp_url(&self, db: &str) -> String {
        let addr = self.tcp.expect("a server started with start_private_on");
        format!("postgres://postgres@{addr}:{}/{db}", self.port)
    }

    /// Creates a database with a name unique on this server and returns its URL.
    pub fn fresh_database(&self, name_hint: &str) -> String {
        let name = self.create_database(name_hint);
        self.url(&name)
    }

    /// Creates a database with a name unique on this server and returns the name.
    pub fn create_database(&self, name_hint: &str) -> String {
        let mut name: String = name_hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        name = format!("t_{name}_{n}");
        let out = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(&self.root)
            .args(["-p", &self.port.to_string(), "-U", "postgres", &name])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running createdb: {e}"));
        assert!(
            out.status.success(),
            "createdb {name} failed ({}): {}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        name
    }

    /// Fast shutdown (SIGINT: sessions are ended, a checkpoint is written); returns once
    /// the server has exited. Clients see the server go away.
    pub fn stop(&self) {
        self.signal(Signal::INT);
    }

    /// Immediate shutdown (SIGQUIT), as a crash: the next start replays the WAL.
    pub fn crash(&self) {
        self.signal(Signal::QUIT);
    }

    /// Starts the stopped server again in place: same data, same port, same URLs.
    pub fn start(&self) {
        let (tx, rx) = mpsc::channel();
        self.control
            .send(Request::Start(tx))
            .expect("the PostgreSQL supervisor thread is gone");
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the PostgreSQL supervisor thread died while starting the server"),
        }
    }

    /// Stops the server, waits `down`, starts it again.
    pub fn stop_for(&self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.start();
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    fn signal(&self, signal: Signal) {
        assert!(
            !self.shared,
            "the shared PostgreSQL server serves every test of this binary and must not \
             be stopped: use PgServer::start_private()"
        );
        let (tx, rx) = mpsc::channel();
        self.control
            .send(Request::Stop(signal, tx))
            .expect("the PostgreSQL supervisor thread is gone");
        rx.recv().expect("the PostgreSQL supervisor thread died");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let (tx, rx) = mpsc::channel();
        if self.control.send(Request::Shutdown(tx)).is_ok() {
            let _ = rx.recv();
        }
        if let Some(thread) = self.supervisor.take() {
            let _ = thread.join();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// What the supervisor thread needs to (re)start the server process.
struct Process {
    bin: PathBuf,
    root: PathBuf,
    run_as: Option<(u32, u32)>,
    port: u16,
    shared: bool,
    durability: Durability,
    /// Also listen on TCP on this address (else only on the Unix socket).
    listen: Option<std::net::IpAddr>,
}

/// A TCP listener for a private server: its address and the clients admitted.
struct Tcp {
    addr: std::net::IpAddr,
    clients: String,
}

/// A test server's durability is off; a bench's is on, with its own `-c` settings.
enum Durability {
    Off,
    On(Vec<String>),
}

/// The server's owning thread: it spawns the process (so the parent-death signal is
/// tied to it) and stops it on request. Returns when asked to shut down or when the
/// `PgServer` is gone; the shared server's thread never returns.
fn supervise(
    mut process: Process,
    requests: mpsc::Receiver<Request>,
    port: mpsc::Sender<Result<u16, String>>,
) {
    let mut child = None;
    let mut first = Err(String::new());
    for attempt in 0..20 {
        match process.spawn_ready() {
            Ok(c) => {
                child = Some(c);
                first = Ok(process.port);
                break;
            }
            Err(Failure::PortTaken(log)) if attempt < 19 => {
                first = Err(log);
                process.port += 100;
            }
            Err(Failure::PortTaken(log) | Failure::Other(log)) => {
                first = Err(log);
                break;
            }
        }
    }
    let started = first.is_ok();
    let _ = port.send(first);
    if !started {
        return;
    }

    for request in requests {
        match request {
            Request::Start(reply) => {
                // A server that exited by itself is started again like a stopped one.
                if child
                    .as_mut()
                    .is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
                {
                    child = None;
                }
                let result = match child {
                    Some(_) => Ok(()),
                    None => process
                        .spawn_ready()
                        .map(|c| child = Some(c))
                        .map_err(|f| match f {
                            Failure::PortTaken(log) | Failure::Other(log) => log,
                        }),
                };
                let _ = reply.send(result);
            }
            Request::Stop(signal, reply) => {
                if let Some(c) = child.take() {
                    stop_child(c, signal);
                }
                let _ = reply.send(());
            }
            Request::Shutdown(reply) => {
                if let Some(c) = child.take() {
                    stop_child(c, Signal::INT);
                }
                let _ = reply.send(());
                return;
            }
        }
    }
    if let Some(c) = child.take() {
        stop_child(c, Signal::INT);
    }
}

enum Failure {
    /// Another server holds the port (its lock file or socket): try the next one.
    PortTaken(String),
    Other(String),
}

impl Process {
    /// Starts `postgres` and waits until it accepts connections.
    fn spawn_ready(&self) -> Result<Child, Failure> {
        let log_path = self.root.join("server.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Failure::Other(format!("opening {}: {e}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Failure::Other(format!("duplicating the log file: {e}")))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let port = self.port.to_string();
        let mut command = as_server_user(
            Command::new(self.bin.join("postgres")),
            self.run_as,
            &self.root,
        );
        command
            .arg("-D")
            .arg(self.root.join("data"))
            .arg("-k")
            .arg(&self.root)
            .args(["-p", &port])
            .arg("-c")
            .arg(format!(
                "listen_addresses={}",
                self.listen.map(|a| a.to_string()).unwrap_or_default()
            ))
            .args(["-c", "max_connections=300"]);
        match &self.durability {
            Durability::Off => {
                command
                    .args(["-c", "fsync=off"])
                    .args([
                        "-c",
                        if self.shared {
                            "synchronous_commit=off"
                        } else {
                            "synchronous_commit=on"
                        },
                    ])
                    .args(["-c", "full_page_writes=off"])
                    .args(["-c", "shared_buffers=128MB"]);
            }
            Durability::On(settings) => {
                command
                    .args(["-c", "fsync=on"])
                    .args(["-c", "synchronous_commit=on"])
                    .args(["-c", "full_page_writes=on"]);
                for setting in settings {
                    command.arg("-c").arg(setting);
                }
            }
        }
        command
            // Never stdout or stderr of the test process: cargo waits for those pipes
            // to close, which a server outliving a test would delay.
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: prctl is async-signal-safe and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::QUIT))?;
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            Failure::Other(format!("starting {}/postgres: {e}", self.bin.display()))
        })?;

        let new_log = || {
            let all = fs::read(&log_path).unwrap_or_default();
            String::from_utf8_lossy(&all[(log_start as usize).min(all.len())..]).into_owned()
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = new_log();
                let message = format!(
                    "PostgreSQL exited while starting ({status}), port {}; server log:\n{log}",
                    self.port
                );
                return Err(
                    if log.contains("lock file") || log.contains("already in use") {
                        Failure::PortTaken(message)
                    } else {
                        Failure::Other(message)
                    },
                );
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.root)
                .args([
                    "-p", &port, "-U", "postgres", "-d", "postgres", "-t", "1", "-q",
                ])
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(child);
            }
            if Instant::now() > deadline {
                stop_child(child, Signal::QUIT);
                return Err(Failure::Other(format!(
                    "PostgreSQL did not accept connections within {READY_TIMEOUT:?} (socket {}, port {}); server log:\n{}",
                    self.root.display(),
                    self.port,
                    new_log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sends `signal` and waits for the exit; a server that ignores it for `STOP_TIMEOUT`
/// is killed.
fn stop_child(mut child: Child, signal: Signal) {
    let _ = rustix::process::kill_process(Pid::from_child(&child), signal);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `command` set up to run as the server's user, in its folder (a cwd it cannot read
/// makes initdb fail).
fn as_server_user(mut command: Command, run_as: Option<(u32, u32)>, root: &Path) -> Command {
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    command.current_dir(root);
    command
}

/// The uid and gid the server runs as: `postgres`'s when we are root, else none (run
/// as ourselves).
fn run_as() -> Option<(u32, u32)> {
    if !rustix::process::getuid().is_root() {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    let entry = passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() > 3 && fields[0] == "postgres")
        .expect(
            "tests run as root and initdb refuses root, but there is no `postgres` user \
             in /etc/passwd: install postgresql (apt-get install postgresql)",
        );
    let uid = entry[2].parse().expect("postgres' uid in /etc/passwd");
    let gid = entry[3].parse().expect("postgres' gid in /etc/passwd");
    Some((uid, gid))
}

/// `$PG_BIN_DIR`, else the highest version under /usr/lib/postgresql/.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").exists(),
            "PG_BIN_DIR={} has no initdb",
            dir.display()
        );
        return dir;
    }
    let version = |name: &str| -> Option<Vec<u32>> {
        name.split('.').map(|part| part.parse().ok()).collect()
    };
    fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let bin = entry.path().join("bin");
            if !bin.join("initdb").exists() {
                return None;
            }
            Some((version(&name)?, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .expect(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: install them \
             (apt-get install postgresql) or set PG_BIN_DIR",
        )
}

/// Removes folders of this harness whose owner process is gone (killed runs), stopping
/// a server that still runs in one.
fn remove_stale_folders() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let root = entry.path();
        match fs::read_to_string(root.join("owner")) {
            Ok(owner) => {
                let mut fields = owner.split_whitespace();
                let pid: Option<u32> = fields.next().and_then(|p| p.parse().ok());
                let recorded: Option<u64> = fields.next().and_then(|t| t.parse().ok());
                let alive =
                    pid.is_some_and(|pid| start_time(pid).is_some_and(|t| Some(t) == recorded));
                if alive {
                    continue;
                }
            }
            // Being set up right now (the owner file comes right after the folder),
            // unless it has been like that for long.
            Err(_) => {
                let age = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                if age.is_none_or(|age| age < Duration::from_secs(600)) {
                    continue;
                }
            }
        }
        stop_orphan(&root.join("data"));
        let _ = fs::remove_dir_all(&root);
    }
}

/// Stops the postmaster named in `data/postmaster.pid`, if it is still a running
/// `postgres` (the parent-death signal normally saw to it already).
fn stop_orphan(data: &Path) {
    let Some(pid) = fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok())
    else {
        return;
    };
    let is_postgres = || {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres")
    };
    if !is_postgres() {
        return;
    }
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, Signal::QUIT);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_postgres() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process' start time (clock ticks since boot, field 22 of /proc/PID/stat): with
/// the pid it identifies the process even after pids wrap around.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Percent-encodes a query value, keeping `/` readable.
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
