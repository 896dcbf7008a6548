//! patchbayd's life: open the store and queue, bind the control socket, run the
//! workers, and on SIGTERM/SIGINT stop in order — no new requests, workers finish
//! in-flight jobs within `queue.shutdown_timeout_secs`, exit 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use patchbay_jobs::{JobKind, SqliteStore, Store};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::{QueueBackend, Settings};
use crate::control::server::{self, Gate};
use crate::plugin_host::registry::Registry;
use crate::plugin_host::supervisor::Supervisor;
use crate::queue::{Queue, WorkerSpec};
use crate::{notify, plugin_host, worker};

/// Connector events waiting to be handled, over all channels.
const EVENT_QUEUE: usize = 65_536;

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    for dir in [
        settings.store_path.parent(),
        settings.queue_sqlite_path.parent(),
    ]
    .into_iter()
    .flatten()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    }
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&settings.store_path)
            .await
            .context("cannot open the store")?,
    );
    let queue = match settings.queue {
        QueueBackend::Sqlite => Queue::open_sqlite(&settings.queue_sqlite_path).await,
        QueueBackend::Redis => {
            Queue::open_redis(&settings.raw.queue.redis_url, &settings.raw.queue.namespace).await
        }
    }
    .context("cannot open the job queue")?;
    let listener = server::bind(&settings.socket).await?;
    let socket_path = settings.socket.clone();
    let gate = Gate::new(
        settings.raw.control.allowed_uids.clone(),
        settings.raw.control.allowed_gids.clone(),
    );
    let grace = settings.shutdown_timeout();
    let mut plugin_uids = settings.raw.control.allowed_uids.clone();
    plugin_uids.push(rustix::process::getuid().as_raw());
    let registry = Registry::scan(&settings.plugins_dir, &plugin_uids);
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let plugins = Arc::new(Supervisor::new(registry, store.clone(), events_tx));
    let app = Arc::new(App {
        settings,
        store,
        queue,
        plugins,
        started: Instant::now(),
    });
    let events = tokio::spawn(plugin_host::events::run(app.clone(), events_rx));
    for channel in app
        .store
        .runnable_channels()
        .await
        .context("cannot list channels")?
    {
        app.plugins.start(channel);
    }

    let stop = CancellationToken::new();
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
        })
        .collect();
    let worker_app = app.clone();
    let workers_stop = stop.clone();
    let workers = tokio::spawn({
        let queue = app.queue.clone();
        async move {
            queue
                .run_workers(
                    specs,
                    move |env| worker::run_job(worker_app.clone(), env),
                    workers_stop.cancelled_owned(),
                    grace,
                )
                .await
        }
    });

    tracing::info!(
        socket = %socket_path.display(),
        queue = %app.settings.raw.queue.backend,
        store = %app.settings.store_path.display(),
        "patchbayd is ready"
    );
    notify::ready(&format!("ready; queue {}", app.settings.raw.queue.backend));

    let reason = wait_for_stop(&workers).await;
    tracing::info!(reason, "patchbayd is stopping");
    notify::stopping();
    stop.cancel();
    connections.close();
    let _ = control.await;
    if tokio::time::timeout(Duration::from_secs(5), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("control connections still open after 5 s; closing them");
    }
    match tokio::time::timeout(grace + Duration::from_secs(5), workers).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "workers stopped with an error"),
        Ok(Err(e)) => tracing::error!(error = %e, "workers task failed"),
        Err(_) => tracing::warn!("workers did not stop within the shutdown timeout"),
    }
    // Connectors stop last: sends in flight needed them until the workers finished.
    app.plugins.stop_all().await;
    drop(app);
    events.abort();
    if let Err(e) = std::fs::remove_file(&socket_path) {
        tracing::debug!(error = %e, "control socket already gone");
    }
    tracing::info!("patchbayd stopped");
    Ok(())
}

async fn wait_for_stop(
    workers: &tokio::task::JoinHandle<Result<(), crate::queue::QueueError>>,
) -> &'static str {
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stopping");
        return "no signal handlers";
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = tokio::signal::ctrl_c() => return "SIGINT",
            _ = hup.recv() => tracing::info!("SIGHUP: nothing to reload in this version"),
            _ = wait_finished(workers) => return "the workers stopped unexpectedly",
        }
    }
}

async fn wait_finished<T>(handle: &tokio::task::JoinHandle<T>) {
    while !handle.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
