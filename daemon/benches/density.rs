//! density: thousands of channels on one real release-built `patchbayd` (issue 21). Per
//! connector kind and size N, on the SQLite queue and store:
//!
//! 1. the daemon's threads and RssAnon before any channel (the base);
//! 2. N channels added over the control socket (JSON-RPC batches on a few connections;
//!    the first ones one RPC at a time, so both rates are figures), then the time until
//!    `status` counts all N `connected`;
//! 3. after a settle, threads, RssAnon and CPU (utime + stime, /proc/<pid>/stat) over an
//!    idle window;
//! 4. SIGTERM, the same binary started again on the same store: time to the control
//!    socket and to all N connected (the stopped daemon leaves its channels
//!    `connected` in the store; the bench marks them `disconnected` before the start,
//!    so each must be connected again by the new process to count);
//! 5. 1 % of the channels swapped for loopback channels that emit as fast as the host
//!    takes events (`burst`), the stored inbound rate over a window; then a fresh daemon
//!    with 4 such channels (the same 4,000 synthetic clients in total) for the rate to
//!    compare with, in the same minutes.
//!
//! Telegram channels talk to a fake Bot API in this process (axum on 127.0.0.1): getMe
//! answers a bot per token, getUpdates holds each long poll for the `timeout` the
//! connector asks (the bench configures 25 s, as the real API holds it) or until the
//! bench ends, then answers `{"ok":true,"result":[]}`. Their traffic in step 5 comes
//! from the loopback channels.
//!
//!     cargo bench -p patchbay-daemon --bench density
//!
//! Knobs (environment): DENSITY_SIZES (default "1000,5000,10000"), DENSITY_KINDS
//! (default "loopback,telegram"), DENSITY_IDLE_SECS (the idle window, default 60),
//! DENSITY_SETTLE_SECS (after all connected, default 15: the blocking threads used to
//! start them retire after 10 s idle), DENSITY_INBOUND_SECS (default 30),
//! DENSITY_WARMUP_SECS (before an inbound window, default 5), DENSITY_SINGLE_ADDS
//! (channels added one RPC at a time before the batches, default 200), DENSITY_ADD_CONNS
//! (connections adding batches at once, default 4), DENSITY_POLL_SECS (telegram's
//! poll_timeout_secs, default 25), DENSITY_CONNECT_SECS (how long to wait for all
//! connected, default 600), DENSITY_RESTART (0: skip step 4), DENSITY_CONFIG (daemon
//! config to add, `\n` between lines; for keys of the tables the bench writes itself,
//! `[plugins]`, `[billing]` and `[http]`, use `PATCHBAY__…` environment variables,
//! which the daemon inherits), DENSITY_DEBUG (set: the
//! daemon log's tail after each inbound window), plus PATCHBAYD_BIN / LOOPBACK_LIB /
//! TELEGRAM_LIB / BENCH_TMPDIR (see common/mod.rs).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Synthetic senders over all active channels, as the inbound bench's 4 x 1,000.
const CLIENTS_TOTAL: u32 = 4000;
/// The daemon's config beyond common's: no charges, and no HTTP listener (its fixed
/// default port may be taken by another daemon on the machine).
const CONFIG: &str = "[billing]\ndefault_price = 0\n[http]\nlisten = \"\"\n";
/// Channels of the comparison run.
const BASELINE_CHANNELS: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Loopback,
    Telegram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Loopback => "loopback",
            Kind::Telegram => "telegram",
        }
    }
}

struct Knobs {
    idle: Duration,
    settle: Duration,
    inbound: Duration,
    warmup: Duration,
    single_adds: usize,
    add_conns: usize,
    poll_secs: u64,
    connect_wait: Duration,
    restart: bool,
    /// `CONFIG` and what DENSITY_CONFIG adds.
    config: String,
}

/// What one kind and size gave.
struct Figures {
    kind: Kind,
    n: usize,
    base_threads: u64,
    threads: u64,
    base_anon_kib: u64,
    anon_kib: u64,
    single_rate: f64,
    batch_rate: f64,
    add_secs: f64,
    connected_secs: f64,
    idle_cpu: f64,
    idle_load: String,
    restart_socket_secs: f64,
    restart_connected_secs: f64,
    inbound: f64,
    baseline: f64,
    inbound_load: String,
}

#[tokio::main]
async fn main() -> Res<()> {
    let sizes: Vec<usize> = list_env("DENSITY_SIZES", "1000,5000,10000")
        .iter()
        .map(|s| s.parse().map_err(|_| format!("DENSITY_SIZES: {s:?}")))
        .collect::<Result<_, _>>()?;
    let kinds: Vec<Kind> = list_env("DENSITY_KINDS", "loopback,telegram")
        .iter()
        .map(|k| match k.as_str() {
            "loopback" => Ok(Kind::Loopback),
            "telegram" => Ok(Kind::Telegram),
            other => Err(format!("unknown kind {other} in DENSITY_KINDS")),
        })
        .collect::<Result<_, _>>()?;
    let secs = |var, default| Duration::from_secs(env_or(var, default));
    let knobs = Knobs {
        idle: secs("DENSITY_IDLE_SECS", 60),
        settle: secs("DENSITY_SETTLE_SECS", 15),
        inbound: secs("DENSITY_INBOUND_SECS", 30),
        warmup: secs("DENSITY_WARMUP_SECS", 5),
        single_adds: env_or("DENSITY_SINGLE_ADDS", 200),
        add_conns: env_or("DENSITY_ADD_CONNS", 4).max(1),
        poll_secs: env_or("DENSITY_POLL_SECS", 25),
        connect_wait: secs("DENSITY_CONNECT_SECS", 600),
        restart: env_or("DENSITY_RESTART", 1) != 0,
        // TOML lines with `\n` for newlines, e.g. "[plugins]\nliveness_check_ms = 600000".
        config: format!(
            "{CONFIG}{}\n",
            env_or("DENSITY_CONFIG", String::new()).replace("\\n", "\n")
        ),
    };
    println!("density bench — {}", machine());
    println!(
        "patchbayd: {}\nsizes {sizes:?}, kinds {:?}; idle window {} s after {} s settling; \
         inbound windows {} s after {} s warm-up\n",
        patchbayd_bin().display(),
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>(),
        knobs.idle.as_secs(),
        knobs.settle.as_secs(),
        knobs.inbound.as_secs(),
        knobs.warmup.as_secs(),
    );
    let fake = if kinds.contains(&Kind::Telegram) {
        Some(FakeBotApi::start().await?)
    } else {
        None
    };
    let mut all = Vec::new();
    for &kind in &kinds {
        for &n in &sizes {
            all.push(run(kind, n, &knobs, fake.as_deref()).await?);
        }
    }
    println!(
        "\n==== density summary ({} CPUs, load now {}) ====",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    for f in &all {
        println!(
            "{:<8} {:>6}: threads {} (base {}, +{}) | RssAnon {:.0} MiB (base {:.0}, +{:.1} KiB/channel) \
             | idle CPU {:.2} % of one core (load {}) | added in {:.1} s (one RPC at a time \
             {:.0}/s, batched {:.0}/s), all connected {:.1} s after the first add | restart: \
             socket {:.1} s, all connected {:.1} s | inbound, 1 % active {:.0} msg/s vs {:.0} \
             with 4 = {:.2}x (load {})",
            f.kind.name(),
            f.n,
            f.threads,
            f.base_threads,
            f.threads as i64 - f.base_threads as i64,
            mib(f.anon_kib),
            mib(f.base_anon_kib),
            (f.anon_kib as f64 - f.base_anon_kib as f64) / f.n as f64,
            f.idle_cpu,
            f.idle_load,
            f.add_secs,
            f.single_rate,
            f.batch_rate,
            f.connected_secs,
            f.restart_socket_secs,
            f.restart_connected_secs,
            f.inbound,
            f.baseline,
            f.inbound / f.baseline,
            f.inbound_load,
        );
    }
    println!(
        "targets at 10,000 idle channels: <= 64 threads above the base, <= 1 GiB RssAnon, <= 5 % \
         of one core; all connected within 60 s of a start; inbound with 1 % active >= 0.9x the \
         rate with 4 channels"
    );
    Ok(())
}

fn list_env(var: &str, default: &str) -> Vec<String> {
    env_or(var, default.to_owned())
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn run(kind: Kind, n: usize, k: &Knobs, fake: Option<&FakeBotApi>) -> Res<Figures> {
    println!("--- {} x {n} ---", kind.name());
    let dir = tempdir(&format!("pb-bench-density-{}-", kind.name()));
    if kind == Kind::Telegram {
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins)?;
        std::fs::copy(
            connector_lib("libtelegram.so", "TELEGRAM_LIB"),
            plugins.join("libtelegram.so"),
        )?;
    }
    let mut daemon = Daemon::start(dir.path(), Backend::Sqlite, None, &StoreAt::File, &k.config)?;
    let pid = daemon.pid();
    let base_threads = threads(pid).ok_or("no /proc status")?;
    let base_anon_kib = rss_anon_kib(pid).ok_or("no /proc status")?;
    println!(
        "  base: {base_threads} threads, RssAnon {:.1} MiB",
        mib(base_anon_kib)
    );
    let (account, admin) = daemon.account("density").await?;
    let api_base = fake.map(FakeBotApi::url).unwrap_or_default();
    let adds: Vec<Value> = (0..n)
        .map(|i| {
            let (kind_name, config) = match kind {
                Kind::Loopback => ("loopback", json!({})),
                Kind::Telegram => (
                    "telegram",
                    json!({"token": format!("{}:bench-token", 100_000 + i), "api_base": api_base,
                           "poll_timeout_secs": k.poll_secs}),
                ),
            };
            json!({"account": account, "actor": admin, "kind": kind_name,
                   "name": format!("d{i}"), "config": config})
        })
        .collect();

    // Adding: the first ones one RPC at a time, the rest batched.
    let t_add = Instant::now();
    let single = k.single_adds.min(n);
    let mut ids = Vec::with_capacity(n);
    let mut client = daemon.client().await?;
    for p in &adds[..single] {
        let ch = client.call("channel.add", p.clone()).await?;
        ids.push(ch["id"].as_i64().ok_or("no channel id")?);
    }
    let single_secs = t_add.elapsed().as_secs_f64();
    let t_batch = Instant::now();
    for ch in batched(&daemon.socket, "channel.add", &adds[single..], k.add_conns).await? {
        ids.push(ch["id"].as_i64().ok_or("no channel id")?);
    }
    let batch_secs = t_batch.elapsed().as_secs_f64();
    let add_secs = t_add.elapsed().as_secs_f64();
    let single_rate = single as f64 / single_secs.max(1e-9);
    let batch_rate = (n - single) as f64 / batch_secs.max(1e-9);
    println!(
        "  added {n} in {add_secs:.1} s: {single} one RPC at a time ({single_rate:.0}/s), \
         {} in batches of 100 over {} connections ({batch_rate:.0}/s)",
        n - single,
        k.add_conns
    );
    until_connected(&daemon, n, t_add, k.connect_wait).await?;
    let connected_secs = t_add.elapsed().as_secs_f64();
    println!("  all {n} connected {connected_secs:.1} s after the first add");

    // Idle.
    tokio::time::sleep(k.settle).await;
    let fake_before = fake.map(FakeBotApi::counts);
    let me = std::process::id();
    let (cpu0, own0) = (cpu_secs(pid).ok_or("no /proc stat")?, cpu_secs(me));
    let t0 = Instant::now();
    let mut max_threads = 0;
    while t0.elapsed() < k.idle {
        tokio::time::sleep(Duration::from_secs(1)).await;
        max_threads = max_threads.max(threads(pid).unwrap_or(0));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let idle_cpu = (cpu_secs(pid).ok_or("no /proc stat")? - cpu0) / elapsed * 100.0;
    let idle_load = loadavg();
    let thread_count = threads(pid).unwrap_or(0);
    let anon_kib = rss_anon_kib(pid).unwrap_or(0);
    println!(
        "  idle {elapsed:.0} s: daemon CPU {idle_cpu:.2} % of one core, threads {thread_count} \
         (max {max_threads} in the window, base {base_threads}), RssAnon {:.1} MiB, VmRSS \
         {:.1} MiB; load {idle_load}",
        mib(anon_kib),
        mib(rss_kib(pid).unwrap_or(0)),
    );
    if let (Some(fake), Some((me0, polls0))) = (fake, fake_before) {
        let (me1, polls1) = fake.counts();
        let own = cpu_secs(me).zip(own0).map_or(0.0, |(b, a)| b - a) / elapsed * 100.0;
        println!(
            "  fake Bot API over the window: {} getMe, {:.1} getUpdates/s answered, {} held \
             now; the bench process (the fake) {own:.2} % of one core",
            me1 - me0,
            (polls1 - polls0) as f64 / elapsed,
            fake.held.load(Ordering::Relaxed)
        );
    }

    // Restart on the same store.
    let (restart_socket_secs, restart_connected_secs) = if k.restart {
        restart(&mut daemon, n, k).await?
    } else {
        (f64::NAN, f64::NAN)
    };

    // 1 % active: that many idle channels removed, as many emitting ones added.
    let active = (n / 100).max(1);
    let removes: Vec<Value> = ids[..active]
        .iter()
        .map(|id| json!({"account": account, "actor": admin, "channel": id}))
        .collect();
    batched(&daemon.socket, "channel.remove", &removes, k.add_conns).await?;
    let inbound = saturated(&daemon, account, admin, active, "a", k).await?;
    let inbound_load = loadavg();
    println!(
        "  inbound with {n} channels, {active} active: {inbound:.0} msg/s stored; load \
         {inbound_load}"
    );
    daemon.terminate();
    drop(dir);

    let bdir = tempdir("pb-bench-density-base-");
    let mut base = Daemon::start(
        bdir.path(),
        Backend::Sqlite,
        None,
        &StoreAt::File,
        &k.config,
    )?;
    let (bacc, badmin) = base.account("baseline").await?;
    let baseline = saturated(&base, bacc, badmin, BASELINE_CHANNELS, "b", k).await?;
    println!(
        "  inbound with {BASELINE_CHANNELS} channels: {baseline:.0} msg/s stored ({:.2}x); load {}",
        inbound / baseline,
        loadavg()
    );
    base.terminate();
    Ok(Figures {
        kind,
        n,
        base_threads,
        threads: thread_count,
        base_anon_kib,
        anon_kib,
        single_rate,
        batch_rate,
        add_secs,
        connected_secs,
        idle_cpu,
        idle_load,
        restart_socket_secs,
        restart_connected_secs,
        inbound,
        baseline,
        inbound_load,
    })
}

/// SIGTERM, then the same binary again on the same files: seconds until its control
/// socket accepts and until all `n` channels are connected.
async fn restart(daemon: &mut Daemon, n: usize, k: &Knobs) -> Res<(f64, f64)> {
    let t_stop = Instant::now();
    daemon.terminate();
    println!(
        "  SIGTERM: exited in {:.1} s",
        t_stop.elapsed().as_secs_f64()
    );
    // The stopped daemon leaves its channels `connected` in the store, and `status`
    // counts the store's statuses: marked `disconnected` here (the daemon is down), so
    // the wait below sees each channel connected by the new process.
    let store = daemon.store().await?;
    let before: Vec<(String, i64)> = store
        .all(
            "SELECT status, COUNT(*) FROM channels GROUP BY status ORDER BY status",
            &[],
        )
        .await?;
    store
        .exec(
            "UPDATE channels SET status = 'disconnected' WHERE status = 'connected'",
            &[],
        )
        .await?;
    store.close().await;
    println!(
        "  channel statuses in the store after the stop: {before:?} (now marked disconnected)"
    );
    let t_start = Instant::now();
    daemon.spawn()?;
    let restart_socket_secs = t_start.elapsed().as_secs_f64();
    until_connected(daemon, n, t_start, k.connect_wait).await?;
    let restart_connected_secs = t_start.elapsed().as_secs_f64();
    let pid = daemon.pid();
    println!(
        "  restart: control socket after {restart_socket_secs:.1} s, all {n} connected after \
         {restart_connected_secs:.1} s; threads {}, RssAnon {:.1} MiB; load {}",
        threads(pid).unwrap_or(0),
        mib(rss_anon_kib(pid).unwrap_or(0)),
        loadavg()
    );
    Ok((restart_socket_secs, restart_connected_secs))
}

/// Adds `active` loopback channels that emit as fast as the host takes events, waits
/// for the warm-up, then returns the messages stored per second over the window.
async fn saturated(
    d: &Daemon,
    account: i64,
    admin: i64,
    active: usize,
    prefix: &str,
    k: &Knobs,
) -> Res<f64> {
    let clients = (CLIENTS_TOTAL / active as u32).max(1);
    let adds: Vec<Value> = (0..active)
        .map(|i| {
            json!({"account": account, "actor": admin, "kind": "loopback",
                   "name": format!("{prefix}{i}"),
                   "config": {"burst": 1_000_000_000u64, "clients": clients,
                              "id_prefix": format!("{prefix}{i}")}})
        })
        .collect();
    batched(&d.socket, "channel.add", &adds, k.add_conns).await?;
    let store = d.store().await?;
    tokio::time::sleep(k.warmup).await;
    let (id0, t0) = (store.max_message_id().await?, Instant::now());
    let backlog0 = d.queue_depth("inbound_message").await.ok();
    tokio::time::sleep(k.inbound).await;
    let id1 = store.max_message_id().await?;
    let rate = (id1 - id0) as f64 / t0.elapsed().as_secs_f64();
    let backlog1 = d.queue_depth("inbound_message").await.ok();
    println!(
        "    {active} active: {} stored in {:.1} s, inbound backlog {backlog0:?} -> {backlog1:?}",
        id1 - id0,
        t0.elapsed().as_secs_f64()
    );
    if std::env::var_os("DENSITY_DEBUG").is_some() {
        println!("{}", d.log_tail());
    }
    store.close().await;
    Ok(rate)
}

/// Waits until `status` counts `n` connected channels; prints progress every 10 s.
async fn until_connected(d: &Daemon, n: usize, since: Instant, wait: Duration) -> Res<()> {
    let mut last_print = Instant::now();
    loop {
        let status = d.call("status", json!({})).await?;
        let connected = status["channels"]["connected"].as_u64().unwrap_or(0) as usize;
        if connected >= n {
            return Ok(());
        }
        if since.elapsed() > wait {
            return Err(format!(
                "{connected} of {n} channels connected after {} s: {}\n{}",
                wait.as_secs(),
                status["channels"],
                d.log_tail()
            )
            .into());
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "    t={:>4.0}s connected {connected}/{n}, threads {}, load {}",
                since.elapsed().as_secs_f64(),
                threads(d.pid()).unwrap_or(0),
                loadavg()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Calls `method` once per element of `params`, in JSON-RPC batches of 100 (the default
/// `control.max_batch`) spread over `conns` connections at once; the results in order.
async fn batched(socket: &Path, method: &str, params: &[Value], conns: usize) -> Res<Vec<Value>> {
    const BATCH: usize = 100;
    let mut per_conn: Vec<Vec<(usize, Vec<Value>)>> = vec![Vec::new(); conns];
    for (i, chunk) in params.chunks(BATCH).enumerate() {
        per_conn[i % conns].push((i * BATCH, chunk.to_vec()));
    }
    let tasks = per_conn
        .into_iter()
        .filter(|c| !c.is_empty())
        .map(|chunks| {
            let (socket, method) = (socket.to_path_buf(), method.to_owned());
            tokio::spawn(async move { batch_connection(socket, method, chunks).await })
        });
    let mut results = vec![Value::Null; params.len()];
    for done in futures::future::join_all(tasks).await {
        for (i, v) in done?? {
            *results.get_mut(i).ok_or("a reply id out of range")? = v;
        }
    }
    Ok(results)
}

/// One connection's batches, in turn; each request's id is its index in the whole list.
async fn batch_connection(
    socket: PathBuf,
    method: String,
    chunks: Vec<(usize, Vec<Value>)>,
) -> Res<Vec<(usize, Value)>> {
    let (r, mut w) = tokio::net::UnixStream::connect(&socket).await?.into_split();
    let mut r = BufReader::new(r);
    let mut out = Vec::new();
    for (first, chunk) in chunks {
        let reqs: Vec<Value> = chunk
            .into_iter()
            .enumerate()
            .map(|(i, p)| json!({"jsonrpc": "2.0", "id": first + i, "method": method, "params": p}))
            .collect();
        let mut line = Value::Array(reqs).to_string();
        line.push('\n');
        w.write_all(line.as_bytes()).await?;
        let mut reply = String::new();
        if r.read_line(&mut reply).await? == 0 {
            return Err("the control socket closed before answering a batch".into());
        }
        let replies: Vec<Value> = serde_json::from_str(&reply)?;
        for mut rep in replies {
            if let Some(e) = rep.get("error") {
                return Err(format!("{method} failed: {e}").into());
            }
            let id = rep["id"].as_u64().ok_or("a reply without an id")? as usize;
            out.push((id, rep["result"].take()));
        }
    }
    Ok(out)
}

/// The fake Bot API: counts what it answered and how many polls it holds now.
struct FakeBotApi {
    addr: std::net::SocketAddr,
    get_me: AtomicU64,
    polls: AtomicU64,
    held: AtomicI64,
    stop: CancellationToken,
}

impl FakeBotApi {
    async fn start() -> Res<Arc<FakeBotApi>> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        // Every channel of a restart connects at once.
        let listener = socket.listen(16_384)?;
        let fake = Arc::new(FakeBotApi {
            addr: listener.local_addr()?,
            get_me: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            held: AtomicI64::new(0),
            stop: CancellationToken::new(),
        });
        let app = axum::Router::new()
            .fallback(bot_api)
            .with_state(fake.clone());
        let stop = fake.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(fake)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// getMe and getUpdates answered so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.get_me.load(Ordering::Relaxed),
            self.polls.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FakeBotApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `POST /bot<id>:<secret>/<method>`: getMe names bot <id>, getUpdates holds the poll for
/// the `timeout` asked (at most Telegram's 50 s) and answers no updates.
async fn bot_api(
    State(fake): State<Arc<FakeBotApi>>,
    uri: Uri,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let ok = |result: Value| axum::Json(json!({"ok": true, "result": result})).into_response();
    let path = uri.path();
    let Some((token, method)) = path.strip_prefix("/bot").and_then(|p| p.split_once('/')) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"ok": false, "error_code": 404, "description": "Not Found"})),
        )
            .into_response();
    };
    let bot: i64 = token
        .split(':')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or(0);
    match method {
        "getMe" => {
            fake.get_me.fetch_add(1, Ordering::Relaxed);
            ok(
                json!({"id": bot, "is_bot": true, "first_name": "Bench", "username": format!("bench{bot}_bot")}),
            )
        }
        "getUpdates" => {
            let asked = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["timeout"].as_u64())
                .unwrap_or(0)
                .min(50);
            let _held = Held::new(&fake.held);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(asked)) => {}
                _ = fake.stop.cancelled() => {}
            }
            fake.polls.fetch_add(1, Ordering::Relaxed);
            ok(json!([]))
        }
        _ => ok(json!(true)),
    }
}

/// Counts a poll as held while it lives, also when hyper drops it because the client
/// went away.
struct Held<'a>(&'a AtomicI64);

impl<'a> Held<'a> {
    fn new(n: &'a AtomicI64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Held(n)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
