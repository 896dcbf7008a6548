//! How patchbayctl prints: the `-o` format, whether to colour, and writing to a stdout
//! that may close early (`patchbayctl job list | head` ends quietly, not with a panic).

use std::io::{IsTerminal, Write};

/// `-o`: tables for people (the default), wider tables, or the RPC result for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Curated columns, relative times.
    Table,
    /// More columns (config, payloads, ids of related objects), absolute RFC 3339 times.
    Wide,
    /// The JSON-RPC result unchanged: stable for scripts.
    Json,
    /// The same result as YAML.
    Yaml,
}

/// Colour only for a person at a terminal: never when piped, never with `NO_COLOR` set
/// to anything non-empty (<https://no-color.org>).
pub fn colour_wanted() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stdout().is_terminal()
}

/// Writes `text` and a newline to stdout. A reader that went away (`| head`) is not an
/// error: the output is simply no longer wanted.
pub fn emit(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// The result in a machine format; `None` for the table formats.
pub fn machine(format: Format, result: &serde_json::Value) -> Option<anyhow::Result<String>> {
    match format {
        Format::Json => Some(serde_json::to_string_pretty(result).map_err(Into::into)),
        Format::Yaml => Some(
            serde_norway::to_string(result)
                .map(|s| s.trim_end().to_owned())
                .map_err(Into::into),
        ),
        Format::Table | Format::Wide => None,
    }
}
