//! Times and durations as people read them (patchbayctl's tables, the dashboard): "3 min ago", "in 2 h", "2 h 5 min", and
//! RFC 3339 for `-o wide`. Pure functions of the instant and "now" (Unix milliseconds).

use chrono::{DateTime, SecondsFormat};

/// `ms` relative to `now_ms`: "just now", "12 s ago", "3 min ago", "5 h ago", "4 d ago",
/// "in 2 h". Hours run up to two days so "30 h ago" stays precise for yesterday's work.
pub fn relative(ms: i64, now_ms: i64) -> String {
    let secs = now_ms.saturating_sub(ms) / 1000;
    if secs == 0 {
        return "just now".into();
    }
    let amount = span(secs.unsigned_abs());
    if secs > 0 {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

/// The largest whole unit of a span: "12 s", "3 min", "5 h", "4 d".
fn span(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// `2026-12-07T01:23:27Z`; the raw number when it is no representable time.
pub fn absolute(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// An uptime: the two largest units, "3 d 4 h", "2 h 5 min", "5 min 3 s", "12 s".
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, _) => format!("{m} min {s} s"),
        (0, _, _) => format!("{h} h {m} min"),
        _ => format!("{d} d {h} h"),
    }
}
