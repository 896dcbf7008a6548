//! SIGHUP (`systemctl reload patchbayd`): re-read the configuration file given with
//! `--config` and apply what can change while channels run and jobs are in flight:
//!
//! * `log.level` — the tracing filter is swapped (unless RUST_LOG is set: it wins, as
//!   at start);
//! * `billing.prices` and `billing.default_price` — read through `App::billing`;
//! * connectors — `plugins.dir` is rescanned and libraries of new kinds are loaded;
//!   running channels keep their instances.
//!
//! Everything else (sockets, store, queue, mail, schedule) is wired into running tasks;
//! a change there is logged as needing a restart and otherwise ignored. A configuration
//! that does not load is logged and ignored as a whole: the daemon keeps running on the
//! one it has.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::app::App;
use crate::config::{self, Config, Settings};
use crate::logging::{self, LevelChange};
use crate::notify;

pub struct Reloader {
    file: Option<PathBuf>,
    /// The level in force, to tell whether the file changed it.
    level: String,
}

/// What one reload did, for the log and for tests.
#[derive(Debug, Default)]
pub struct Outcome {
    pub applied: Vec<String>,
    pub needs_restart: Vec<&'static str>,
}

impl Reloader {
    pub fn new(file: Option<PathBuf>, settings: &Settings) -> Self {
        Reloader {
            file,
            level: settings.raw.log.level.clone(),
        }
    }

    /// Reloads, telling systemd (RELOADING=1 … READY=1) and the log what happened.
    pub async fn reload(&mut self, app: &Arc<App>) {
        notify::reloading();
        tracing::info!(file = ?self.file, "SIGHUP: reloading the configuration");
        match self.apply(app).await {
            Ok(outcome) => {
                for key in &outcome.needs_restart {
                    tracing::warn!(
                        key,
                        "changed in the configuration file; takes effect after a restart"
                    );
                }
                let applied = if outcome.applied.is_empty() {
                    "nothing changed".to_owned()
                } else {
                    outcome.applied.join("; ")
                };
                tracing::info!(applied, "configuration reloaded");
                notify::reloaded(&format!("reloaded: {applied}"));
            }
            Err(e) => {
                tracing::error!(
                    "SIGHUP: {e}; the new configuration is ignored and the running one kept"
                );
                notify::reloaded(
                    "reload refused: the configuration file has an error (see the log)",
                );
            }
        }
    }

    async fn apply(&mut self, app: &Arc<App>) -> Result<Outcome, String> {
        let file = self.file.clone();
        // Reading the file is blocking I/O; keep it off the async workers.
        let new = tokio::task::spawn_blocking(move || config::load(file.as_deref()))
            .await
            .map_err(|e| format!("the configuration loader failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let mut out = Outcome::default();

        if new.raw.log.level != self.level {
            match logging::set_level(&new.raw.log.level) {
                Ok(LevelChange::Applied) => {
                    out.applied
                        .push(format!("log.level = {}", new.raw.log.level));
                    self.level = new.raw.log.level.clone();
                }
                Ok(LevelChange::RustLogWins) => {
                    tracing::info!("log.level changed but RUST_LOG is set and keeps winning");
                }
                Err(e) => tracing::warn!("log.level not reloaded: {e}"),
            }
        }

        let billing = app.billing();
        let (old_b, new_b) = (&*billing, &new.raw.billing);
        if old_b.prices != new_b.prices || old_b.default_price != new_b.default_price {
            let mut next = old_b.clone();
            next.prices = new_b.prices.clone();
            next.default_price = new_b.default_price;
            *app.billing.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
            out.applied.push(format!(
                "billing prices (default {}, {})",
                new_b.default_price,
                if new_b.prices.is_empty() {
                    "no per-kind prices".to_owned()
                } else {
                    new_b
                        .prices
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }

        // The folder scanned is the one from start: a moved plugins.dir is a restart,
        // like every other path.
        let plugins = app.plugins.clone();
        let dir = app.settings.plugins_dir.clone();
        // dlopen runs plugin code: never on the async workers.
        let added = tokio::task::spawn_blocking(move || plugins.rescan(&dir))
            .await
            .map_err(|e| format!("the plugin rescan failed: {e}"))?;
        if !added.is_empty() {
            out.applied
                .push(format!("new connectors: {}", added.join(", ")));
        }

        out.needs_restart = restart_only_changes(&app.settings.raw, &new.raw);
        Ok(out)
    }
}

/// The keys that differ between the running and the new configuration but are only
/// read at start.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    fn differs<T: Serialize>(a: &T, b: &T) -> bool {
        serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
    }
    let mut keys = Vec::new();
    for (key, changed) in [
        ("control", differs(&running.control, &new.control)),
        ("store", differs(&running.store, &new.store)),
        ("queue", differs(&running.queue, &new.queue)),
        ("plugins.dir", running.plugins.dir != new.plugins.dir),
        (
            "plugins.liveness_check_ms / liveness_timeout_ms / liveness_checks_per_sec",
            running.plugins.liveness_check_ms != new.plugins.liveness_check_ms
                || running.plugins.liveness_timeout_ms != new.plugins.liveness_timeout_ms
                || running.plugins.liveness_checks_per_sec != new.plugins.liveness_checks_per_sec,
        ),
        ("mail", differs(&running.mail, &new.mail)),
        (
            "billing.run_at / billing.timezone",
            running.billing.run_at != new.billing.run_at
                || running.billing.timezone != new.billing.timezone,
        ),
        ("deletion", differs(&running.deletion, &new.deletion)),
        ("log.format", running.log.format != new.log.format),
        ("http", differs(&running.http, &new.http)),
        ("node", differs(&running.node, &new.node)),
    ] {
        if changed {
            keys.push(key);
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_start_time_keys_are_reported() {
        let running = Config::default();
        let mut new = Config::default();
        new.log.level = "debug".into();
        new.billing.prices.insert("loopback".into(), 7);
        assert!(restart_only_changes(&running, &new).is_empty());
        new.queue.backend = "redis".into();
        new.log.format = "json".into();
        assert_eq!(
            restart_only_changes(&running, &new),
            vec!["queue", "log.format"]
        );
    }
}
