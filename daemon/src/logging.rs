//! tracing to stderr (journald picks it up), as text or JSON. RUST_LOG, when set, wins
//! over `log.level`. The level filter sits behind a reload layer so SIGHUP can change
//! `log.level` without a restart; the format cannot change (it is fixed at start).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::Settings;

/// Set once by `init`; absent when another subscriber was installed first (tests).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// What `set_level` did.
#[derive(Debug, PartialEq, Eq)]
pub enum LevelChange {
    Applied,
    /// RUST_LOG is set and keeps winning, as it did at start.
    RustLogWins,
}

fn rust_log() -> Option<EnvFilter> {
    EnvFilter::try_from_default_env().ok()
}

pub fn init(settings: &Settings) {
    let filter = rust_log()
        .or_else(|| EnvFilter::try_new(&settings.raw.log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colour only for a person at a terminal, never into journald or a log file.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if settings.raw.log.format == "json" {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    match tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
    {
        Ok(()) => {
            let _ = FILTER.set(handle);
        }
        Err(e) => eprintln!("patchbayd: cannot initialise logging: {e}"),
    }
}

/// Replaces the level filter with `level` (already checked by `config::load`).
pub fn set_level(level: &str) -> Result<LevelChange, String> {
    if rust_log().is_some() {
        return Ok(LevelChange::RustLogWins);
    }
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging was not initialised by patchbayd".to_owned())?;
    handle
        .reload(filter)
        .map_err(|e| format!("cannot swap the log filter: {e}"))?;
    Ok(LevelChange::Applied)
}
