//! patchbayd's life: open the store and queue, take or bind the control socket, run the
//! workers, tell systemd once they run (READY=1, then STATUS= and WATCHDOG=1 from
//! `health`), reload on SIGHUP (`reload`), and on SIGTERM/SIGINT stop in order —
//! STOPPING=1, no new requests, workers finish in-flight jobs within
//! `queue.shutdown_timeout_secs`, exit 0. Workers that end on their own stop the daemon
//! the same way but with an error (non-zero exit), so systemd restarts it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use patchbay_jobs::{JobKind, Store};
use patchbay_store_postgres::{PgOptions, PgStore};
use patchbay_store_sqlite::SqliteStore;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::{QueueBackend, Settings, StoreLocation};
use crate::control::server::{self, Gate};
use crate::mail::{Mailer, Transport};
use crate::plugin_host::registry::Registry;
use crate::plugin_host::supervisor::Supervisor;
use crate::queue::{Queue, WorkerSpec};
use crate::reload::Reloader;
use crate::{health, notify, plugin_host, worker};

/// Connector events waiting to be handled, over all channels.
const EVENT_QUEUE: usize = 65_536;

/// Runs the daemon until SIGTERM/SIGINT. `config_file` is what `--config` named: SIGHUP
/// reads it again.
pub async fn run(settings: Settings, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let store_dir = match &settings.store {
        StoreLocation::Sqlite(path) => path.parent(),
        StoreLocation::Postgres(_) => None,
    };
    for dir in [store_dir, settings.queue_sqlite_path.parent()]
        .into_iter()
        .flatten()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    }
    let metrics = crate::metrics::Metrics::install(&settings.node);
    let (store, checkpoints, _store_guard) = open_store(&settings).await?;
    let queue = match settings.queue {
        QueueBackend::Sqlite => Queue::open_sqlite(&settings.queue_sqlite_path).await,
        QueueBackend::Redis => {
            Queue::open_redis(&settings.raw.queue.redis_url, &settings.raw.queue.namespace).await
        }
    }
    .context("cannot open the job queue")?;
    let socket = server::open(&settings.socket).await?;
    let (listener, socket_path, socket_owned) = (socket.listener, socket.path, socket.owned);
    // After the control socket, whose check names another daemon on this folder; a
    // taken port then ends the start, naming http.listen.
    let http_listener = crate::http::bind(settings.http.listen).await?;
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let embedded_default = config_file.is_none();
    let mut reloader = Reloader::new(config_file, &settings);
    let gate = Gate::new(
        settings.raw.control.allowed_uids.clone(),
        settings.raw.control.allowed_gids.clone(),
    );
    let grace = settings.shutdown_timeout();
    let registry = Registry::scan(&settings.plugins_dir);
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let plugins = Arc::new(
        Supervisor::new(registry, store.clone(), events_tx).with_liveness(settings.liveness()),
    );
    let billing = std::sync::RwLock::new(Arc::new(settings.raw.billing.clone()));
    let mail = &settings.raw.mail;
    let mailer = Transport::from_config(&mail.transport, &settings.mail_spool_dir, &mail.smtp_url)
        .and_then(|t| Mailer::new(t, &mail.from))
        .context("cannot set up mail")?;
    let stop = CancellationToken::new();
    let shared = matches!(settings.store, StoreLocation::Postgres(_));
    let leases = Arc::new(crate::cluster::Leases::new(
        &settings.node,
        shared,
        &settings.raw.node,
        &settings.raw.leases,
    ));
    // The charge batcher reaches back into the App (prices, connectors, the queue).
    let app = Arc::new_cyclic(|app| App {
        settings,
        inbound: worker::inbound_batcher(store.clone()),
        charges: worker::charge_batcher(app.clone()),
        checks: worker::check_batcher(app.clone()),
        stop: stop.clone(),
        store,
        queue,
        // Until the check below says the queue keeps its jobs: the safe side.
        journal_inbound: std::sync::atomic::AtomicBool::new(true),
        plugins,
        leases,
        workers: Default::default(),
        started: Instant::now(),
        billing,
        mailer,
        http_addr,
    });
    app.check_queue_persistence(true).await;
    let cron = tokio::spawn(crate::billing::run_schedule(app.clone()));
    let events = tokio::spawn(plugin_host::events::run(app.clone(), events_rx));
    // Channels start from the reconcile loop: on PostgreSQL only those whose lease
    // this node takes.
    let cluster = tokio::spawn(crate::cluster::run(app.clone(), stop.clone()));
    // Renewals outlive `stop`: the connectors run until the workers drained, and their
    // leases must hold until then.
    let renewals_stop = CancellationToken::new();
    let renewals = tokio::spawn(crate::cluster::renew(app.clone(), renewals_stop.clone()));
    if embedded_default {
        crate::demo::seed(&app).await;
    }
    resume_deletions(&app).await;
    resume_paid_accounts(&app).await;

    let connections = TaskTracker::new();
    let control = tokio::spawn(server::serve(
        listener,
        app.clone(),
        gate,
        stop.clone(),
        connections.clone(),
    ));
    let specs: Vec<WorkerSpec> = JobKind::ALL
        .iter()
        .map(|&kind| WorkerSpec {
            queue: app.queue_name(kind),
            concurrency: app.settings.concurrency(kind),
            poll_fallback: Some(app.settings.poll_fallback()),
        })
        .collect();
    let sweep = tokio::spawn(crate::sweep::run(app.clone(), stop.clone()));
    // Histograms hold their samples until drained, listener or not.
    tokio::spawn(metrics.clone().upkeep(stop.clone()));
    let http = http_listener.zip(http_addr).map(|(listener, addr)| {
        let history = Arc::new(crate::http::history::History::default());
        let settings = &app.settings.http;
        let auth = crate::http::auth::Auth::new(settings.token.clone(), settings.public());
        tokio::spawn(crate::http::history::run(
            app.clone(),
            history.clone(),
            stop.clone(),
        ));
        let state = crate::http::Http {
            addr,
            app: app.clone(),
            metrics: metrics.clone(),
            history,
            auth: Arc::new(auth),
            dashboard_turn: Default::default(),
        };
        tokio::spawn(crate::http::serve(listener, state, stop.clone()))
    });
    let worker_app = app.clone();
    let workers_stop = stop.clone();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let workers = tokio::spawn({
        let queue = app.queue.clone();
        async move {
            queue
                .run_workers_reporting(
                    specs,
                    worker::Jobs(worker_app.clone()),
                    workers_stop.cancelled_owned(),
                    grace,
                    started_tx,
                    worker_app.workers.clone(),
                )
                .await
        }
    });

    // Handlers go in before READY=1: systemd may send SIGHUP (reload) or SIGTERM as soon
    // as it sees it, and SIGHUP's default action would kill the daemon.
    let mut health = None;
    let reason = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut term), Ok(mut hup)) => match wait_for_workers(started_rx, &mut term).await {
            Some(reason) => reason,
            None => {
                // The socket accepts and every worker runs: what READY=1 promises.
                tracing::info!(
                    socket = %socket_path.display(),
                    queue = %app.settings.raw.queue.backend,
                    store = %app.settings.store,
                    http = ?app.http_addr,
                    "patchbayd is ready"
                );
                notify::ready(&format!("ready; queue {}", app.settings.raw.queue.backend));
                health =
                    notify::enabled().then(|| tokio::spawn(health::run(app.clone(), stop.clone())));
                wait_for_stop(&mut term, &mut hup, &workers, async || {
                    reloader.reload(&app).await
                })
                .await
            }
        },
        (term, hup) => {
            let error = term.err().or(hup.err()).map(|e| e.to_string());
            tracing::error!(error, "cannot install signal handlers; stopping");
            Stop::Fault("cannot install the SIGTERM/SIGHUP handlers")
        }
    };
    tracing::info!(reason = reason.describe(), "patchbayd is stopping");
    notify::stopping();
    stop.cancel();
    if let Some(h) = health {
        let _ = h.await;
    }
    connections.close();
    let _ = control.await;
    if let Some(http) = http {
        let _ = http.await;
    }
    if tokio::time::timeout(Duration::from_secs(5), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("control connections still open after 5 s; closing them");
    }
    let workers_outcome = match tokio::time::timeout(grace + Duration::from_secs(5), workers).await
    {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(format!("workers stopped with an error: {e}")),
        Ok(Err(e)) => Some(format!("workers task failed: {e}")),
        Err(_) => {
            tracing::warn!("workers did not stop within the shutdown timeout");
            None
        }
    };
    if let Some(outcome) = &workers_outcome {
        tracing::error!("{outcome}");
    }
    // Connectors stop last: sends in flight needed them until the workers finished.
    cron.abort();
    if let Some(checkpoints) = checkpoints {
        checkpoints.abort();
    }
    let _ = sweep.await;
    let _ = cluster.await;
    app.plugins.stop_all().await;
    renewals_stop.cancel();
    let _ = renewals.await;
    crate::cluster::leave(&app).await;
    drop(app);
    events.abort();
    // A socket passed by systemd is the socket unit's to remove (RemoveOnStop=).
    if socket_owned && let Err(e) = std::fs::remove_file(&socket_path) {
        tracing::debug!(error = %e, "control socket already gone");
    }
    tracing::info!("patchbayd stopped");
    reason.exit(workers_outcome)
}

/// Why the daemon stops. A signal is an ordered stop (exit 0); a fault exits non-zero,
/// so that systemd's `Restart=on-failure` starts a daemon that can no longer work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Signal(&'static str),
    Fault(&'static str),
}

impl Stop {
    fn describe(self) -> &'static str {
        match self {
            Stop::Signal(s) | Stop::Fault(s) => s,
        }
    }

    /// `run`'s result; `detail` is what the workers' task ended with, if anything.
    fn exit(self, detail: Option<String>) -> anyhow::Result<()> {
        match self {
            Stop::Signal(_) => Ok(()),
            Stop::Fault(why) => {
                let detail = detail.map(|d| format!(" ({d})")).unwrap_or_default();
                Err(anyhow::anyhow!(
                    "{why}{detail}; exiting with an error so that the service manager restarts patchbayd"
                ))
            }
        }
    }
}

/// The store, the task checkpointing a SQLite one, and the lock keeping other daemons
/// off a SQLite file.
type OpenStore = (
    Arc<dyn Store>,
    Option<tokio::task::JoinHandle<()>>,
    Option<crate::cluster::store_guard::StoreGuard>,
);

/// Opens the store `store.url` names; for SQLite, also the task that checkpoints it.
/// PostgreSQL down at start is an error naming the URL without its password; down
/// later, store calls fail and their jobs retry.
async fn open_store(settings: &Settings) -> anyhow::Result<OpenStore> {
    match &settings.store {
        StoreLocation::Sqlite(path) => {
            let guard = crate::cluster::store_guard::lock(path)?;
            let sqlite = Arc::new(
                SqliteStore::open(path)
                    .await
                    .context("cannot open the store")?,
            );
            let checkpoints = tokio::spawn(checkpoint_store(sqlite.clone(), path.clone()));
            Ok((sqlite, Some(checkpoints), Some(guard)))
        }
        StoreLocation::Postgres(url) => {
            let c = &settings.raw.store;
            let options = PgOptions {
                max_connections: c.pool_size,
                connect_timeout: Duration::from_secs(c.connect_timeout_secs),
                statement_timeout: Duration::from_secs(c.statement_timeout_secs),
            };
            let store = PgStore::connect(url, &options)
                .await
                .context("cannot open the store (store.url)")?;
            Ok((Arc::new(store), None, None))
        }
    }
}

/// Checkpoints the store's WAL ten times a second while it grows, off the writer (see
/// `SqliteStore::open`): often enough that a data deletion run's burst of writes never
/// grows the WAL to the backstop, where the writer itself would checkpoint for seconds.
/// Whether anything was written is read from the WAL file's size and modification time
/// (a `stat`, no query): an idle store is looked at ever less often, down to every
/// `IDLE_CHECK`, and never checkpointed.
async fn checkpoint_store(store: Arc<SqliteStore>, path: PathBuf) {
    const BUSY: Duration = Duration::from_millis(100);
    const IDLE_CHECK: Duration = Duration::from_millis(1600);
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let stamp = || {
        std::fs::metadata(&wal)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut seen = None;
    let mut every = BUSY;
    loop {
        tokio::time::sleep(every).await;
        let now = stamp();
        if now.is_some() && now == seen {
            every = (every * 2).min(IDLE_CHECK);
            continue;
        }
        every = BUSY;
        if let Err(e) = store.checkpoint().await {
            tracing::warn!(error = %e, "cannot checkpoint the store");
        }
        seen = now;
    }
}

/// Accounts with suspended channels that can now pay for them are resumed, as a top-up
/// would: this completes a top-up whose resume a crash cut short (the ledger committed,
/// the channels still suspended), and also resumes an account that a lowered price now
/// lets pay.
async fn resume_paid_accounts(app: &App) {
    let accounts = match app.store.suspended_accounts().await {
        Ok(accounts) => accounts,
        Err(e) => return tracing::warn!(error = %e, "cannot list suspended accounts"),
    };
    for account in accounts {
        match app.resume(account).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(account, channels = n, "resumed channels a top-up paid for"),
            Err(e) => tracing::warn!(account, error = %e, "cannot resume an account"),
        }
    }
}

/// A deletion run left `running` resumes with its job (see `App::ensure_deletion_job`).
async fn resume_deletions(app: &App) {
    let runs = match app.store.running_deletions().await {
        Ok(runs) => runs,
        Err(e) => return tracing::warn!(error = %e, "cannot list running deletion runs"),
    };
    for run in runs {
        if let Err(e) = app.ensure_deletion_job(run.id).await {
            tracing::warn!(run = run.id, error = %e, "cannot resume a deletion run");
        }
    }
}

/// Waits until every worker is up (`None`), or why the daemon must stop before that.
/// A Redis that accepted the connection but does not answer keeps this waiting (and
/// systemd's start timeout applies): READY=1 must not come before the workers run.
async fn wait_for_workers(
    mut started: tokio::sync::oneshot::Receiver<()>,
    term: &mut Signal,
) -> Option<Stop> {
    let slow = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(slow);
    let mut warned = false;
    loop {
        tokio::select! {
            res = &mut started => {
                // Dropped unsent: `run_workers` returned (or panicked) before they ran.
                return res.err().map(|_| Stop::Fault("the workers stopped before they started"));
            }
            _ = term.recv() => return Some(Stop::Signal("SIGTERM")),
            _ = tokio::signal::ctrl_c() => return Some(Stop::Signal("SIGINT")),
            _ = &mut slow, if !warned => {
                warned = true;
                tracing::warn!("the queue workers have not started after 10 s; still waiting (is the queue backend answering?)");
            }
        }
    }
}

async fn wait_for_stop<T>(
    term: &mut Signal,
    hup: &mut Signal,
    workers: &tokio::task::JoinHandle<T>,
    mut reload: impl AsyncFnMut(),
) -> Stop {
    loop {
        tokio::select! {
            _ = term.recv() => return Stop::Signal("SIGTERM"),
            _ = tokio::signal::ctrl_c() => return Stop::Signal("SIGINT"),
            // A second SIGHUP during a reload waits in the signal stream and runs next.
            _ = hup.recv() => reload().await,
            _ = wait_finished(workers) => return Stop::Fault("the workers stopped unexpectedly"),
        }
    }
}

async fn wait_finished<T>(handle: &tokio::task::JoinHandle<T>) {
    while !handle.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Workers that end on their own (not on our stop) make `run` fail, so the process
    /// exits non-zero and systemd restarts it; a signal is a clean exit.
    #[tokio::test]
    async fn workers_ending_on_their_own_is_a_failure() {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        let workers = tokio::spawn(async {});
        let mut reloads = 0;
        let reason = tokio::time::timeout(
            Duration::from_secs(10),
            wait_for_stop(&mut term, &mut hup, &workers, async || reloads += 1),
        )
        .await
        .expect("noticed within 10 s");
        assert_eq!(reason, Stop::Fault("the workers stopped unexpectedly"));
        assert_eq!(reloads, 0);
        let err = reason
            .exit(Some("workers stopped with an error: boom".into()))
            .expect_err("a fault is an error");
        assert!(err.to_string().contains("boom"), "{err}");
        assert!(Stop::Signal("SIGTERM").exit(None).is_ok());

        // Workers that end before they ever started are a fault too.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        drop(tx);
        assert_eq!(
            wait_for_workers(rx, &mut term).await,
            Some(Stop::Fault("the workers stopped before they started"))
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(());
        assert_eq!(wait_for_workers(rx, &mut term).await, None);
    }
}
