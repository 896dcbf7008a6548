//! tracing to stderr (journald picks it up), as text or JSON. RUST_LOG, when set, wins
//! over `log.level`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::Settings;

pub fn init(settings: &Settings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.raw.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal, never into journald or a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = if settings.raw.log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = result {
        eprintln!("patchbayd: cannot initialise logging: {e}");
    }
}
