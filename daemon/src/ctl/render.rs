//! Prints results for people, `kubectl get` style: a list as a borderless table of the
//! resource's curated columns (`columns`), one object as label/value lines, anything
//! else (`call`, small acknowledgements) generically. `-o json|yaml` never come here:
//! scripts get the RPC result unchanged (`output::machine`).

use std::collections::BTreeMap;
use std::io::IsTerminal;

use comfy_table::presets::NOTHING;
use comfy_table::{Cell, CellAlignment, Color, ContentArrangement, Table};
use serde_json::Value;

use crate::ctl::columns::{Column, Kind, Resource};
use crate::time_text;

/// What the renderers need besides the result.
pub struct Ctx<'a> {
    /// `-o wide`: the wide columns and absolute times.
    pub wide: bool,
    pub colour: bool,
    /// Unix milliseconds, for relative times.
    pub now_ms: i64,
    /// Connector kind → its secret config keys (`plugin.list`). A channel of a kind not
    /// in it has every config value masked, as the daemon does.
    pub secrets: &'a BTreeMap<String, Vec<String>>,
}

/// How a command's result is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Objects (or a list of them) of one resource.
    Of(Resource),
    /// `account.create`: the account and its first administrator.
    AccountCreated,
    /// `chat.get`: the chat, its contact and its additional fields.
    ChatCard,
    /// `status`: a summary (see `status_view`).
    Status,
    /// Any other result: keys in the daemon's order, times by the `_at` convention.
    Generic,
}

pub fn render(view: View, v: &Value, ctx: &Ctx) -> String {
    match view {
        View::Of(r) => resource(r, v, ctx),
        View::AccountCreated => [
            resource(Resource::Account, &v["account"], ctx),
            format!(
                "Administrator:\n{}",
                resource(Resource::User, &v["admin"], ctx)
            ),
        ]
        .join("\n\n"),
        View::ChatCard => [
            resource(Resource::Chat, v, ctx),
            format!(
                "Contact:\n{}",
                resource(Resource::Contact, &v["contact"], ctx)
            ),
            format!(
                "Fields:\n{}",
                resource(Resource::FieldValue, &v["fields"], ctx)
            ),
        ]
        .join("\n\n"),
        View::Status => crate::ctl::status_view::render(v, None, ctx),
        View::Generic => generic(v, ctx),
    }
}

/// A list as a table, one object as label/value lines; a result of another shape
/// (an old daemon's, `null`) generically.
pub fn resource(r: Resource, v: &Value, ctx: &Ctx) -> String {
    match v {
        Value::Array(rows) if rows.is_empty() => "(none)".into(),
        Value::Array(rows) if rows.iter().all(Value::is_object) => {
            let cols: Vec<&Column> = r.shown(ctx.wide).collect();
            let header = cols.iter().map(|c| c.header.to_owned()).collect();
            let body = rows
                .iter()
                .map(|row| {
                    cols.iter()
                        .map(|c| styled(c, row, ctx, !ctx.wide))
                        .collect()
                })
                .collect();
            grid(Some(header), body, &aligns(&cols))
        }
        Value::Object(_) => {
            let body = r
                .shown(ctx.wide)
                .map(|c| vec![Cell::new(c.header), styled(c, v, ctx, false)])
                .collect();
            grid(None, body, &[CellAlignment::Left, CellAlignment::Left])
        }
        Value::Null => "(none)".into(),
        other => generic(other, ctx),
    }
}

fn aligns(cols: &[&Column]) -> Vec<CellAlignment> {
    cols.iter()
        .map(|c| match c.kind {
            Kind::Money => CellAlignment::Right,
            _ => CellAlignment::Left,
        })
        .collect()
}

/// A cell's text: how a person reads the value at the column's path in `row`.
pub fn cell_text(c: &Column, row: &Value, ctx: &Ctx) -> String {
    let v = row.pointer(c.path).unwrap_or(&Value::Null);
    match (c.kind, v) {
        (_, Value::Null) => "-".into(),
        (Kind::Time, Value::Number(n)) => match n.as_i64() {
            Some(ms) => time(ms, ctx),
            None => n.to_string(),
        },
        (Kind::OutOf(of), v) => match row.pointer(of) {
            Some(max) if !max.is_null() => format!("{}/{}", plain(v), plain(max)),
            _ => plain(v),
        },
        (Kind::List, Value::Array(items)) if items.is_empty() => "-".into(),
        (Kind::List, Value::Array(items)) => items.iter().map(plain).collect::<Vec<_>>().join(", "),
        (Kind::Config, config) => {
            let kind = row["kind"].as_str().unwrap_or_default();
            redacted_config(config, ctx.secrets.get(kind).map(Vec::as_slice))
        }
        (Kind::Json, v) => v.to_string(),
        (_, v) => plain(v),
    }
}

/// Longest prose cell of a list table without `-o wide`, in characters.
pub const PROSE_WIDTH: usize = 60;

fn styled(c: &Column, row: &Value, ctx: &Ctx, clip: bool) -> Cell {
    let mut text = cell_text(c, row, ctx);
    if clip && c.kind == Kind::Prose {
        text = clipped(&text, PROSE_WIDTH);
    }
    let colour = match c.kind {
        Kind::Status if ctx.colour => status_colour(&text),
        _ => None,
    };
    let cell = Cell::new(text);
    match colour {
        Some(colour) => cell.fg(colour),
        None => cell,
    }
}

/// `text` cut to `max` characters, the cut marked with `…`.
pub fn clipped(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// Status words that need attention in red, the healthy ones in green, the in-between
/// ones in yellow (channel, job, message and deletion-run states alike).
pub fn status_colour(word: &str) -> Option<Color> {
    match word {
        "connected" | "done" | "sent" | "delivered" | "finished" | "ok" | "open" => {
            Some(Color::Green)
        }
        "error" | "dead" | "failed" | "down" => Some(Color::Red),
        "connecting" | "disconnected" | "suspended" | "pending" | "running" => Some(Color::Yellow),
        "removed" | "closed" => Some(Color::DarkGrey),
        _ => None,
    }
}

fn time(ms: i64, ctx: &Ctx) -> String {
    if ctx.wide {
        time_text::absolute(ms)
    } else {
        time_text::relative(ms, ctx.now_ms)
    }
}

/// A value as text: strings unquoted, booleans as yes/no, null as `-`.
pub fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// A connector config as `key=value, …`. The daemon already masks its secrets; this
/// masks them again so no table can show one even from a daemon that did not: every
/// key in `secret_keys`, and every value when the kind's secrets are unknown (`None`).
pub fn redacted_config(config: &Value, secret_keys: Option<&[String]>) -> String {
    let Value::Object(map) = config else {
        return plain(config);
    };
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(k, v)| {
            let secret = secret_keys.is_none_or(|keys| keys.iter().any(|s| s == k));
            let shown = if secret { "***".into() } else { plain(v) };
            format!("{k}={shown}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The terminal's width when stdout is one that reports a usable size (a pseudo-
/// terminal without a size says 0).
fn terminal_width() -> Option<u16> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let (width, _) = crossterm::terminal::size().ok()?;
    (width >= 40).then_some(width)
}

/// A borderless table, columns three spaces apart, no trailing blanks. Long cells wrap
/// only to a terminal's width: piped, rows are never wrapped and columns stay stable.
pub fn grid(header: Option<Vec<String>>, rows: Vec<Vec<Cell>>, align: &[CellAlignment]) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    match terminal_width() {
        Some(width) => t
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(width),
        None => t.set_content_arrangement(ContentArrangement::Disabled),
    };
    if let Some(h) = header {
        t.set_header(h);
    }
    for row in rows {
        t.add_row(row);
    }
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, 3));
        if let Some(a) = align.get(i) {
            column.set_cell_alignment(*a);
        }
    }
    t.lines()
        .map(|l| l.trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Any result: a list of objects as a table of all their keys, an object as
/// label/value lines (nested objects one `key: value` per line), a scalar as text.
pub fn generic(v: &Value, ctx: &Ctx) -> String {
    let keyed = |key: &str, v: &Value| match v.as_i64() {
        Some(ms) if key.ends_with("_at") || key == "cutoff" => time(ms, ctx),
        _ => plain(v),
    };
    match v {
        Value::Array(rows) if rows.is_empty() => "(none)".into(),
        Value::Array(rows) if rows.iter().all(Value::is_object) => {
            let mut keys: Vec<&String> = Vec::new();
            for k in rows
                .iter()
                .filter_map(Value::as_object)
                .flat_map(|o| o.keys())
            {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            let header = keys.iter().map(|k| header_of(k)).collect();
            let body = rows
                .iter()
                .map(|r| {
                    keys.iter()
                        .map(|k| Cell::new(keyed(k, r.get(*k).unwrap_or(&Value::Null))))
                        .collect()
                })
                .collect();
            grid(Some(header), body, &[])
        }
        Value::Object(map) => {
            let body = map
                .iter()
                .map(|(k, v)| {
                    let shown = match v {
                        Value::Object(inner) => inner
                            .iter()
                            .map(|(ik, iv)| format!("{ik}: {}", keyed(ik, iv)))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        other => keyed(k, other),
                    };
                    vec![Cell::new(header_of(k)), Cell::new(shown)]
                })
                .collect();
            grid(None, body, &[])
        }
        other => plain(other),
    }
}

/// `last_error` → `LAST ERROR`.
fn header_of(key: &str) -> String {
    key.replace('_', " ").to_uppercase()
}

#[cfg(test)]
mod tests;
