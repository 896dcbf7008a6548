//! `patchbayctl status` for people: the daemon (version, pid, uptime, backends,
//! plugins), its health with what is down, channels by status, and the queue by job
//! kind as a small table. `top` draws the same parts, with throughput.

use std::collections::BTreeMap;

use comfy_table::{Cell, CellAlignment, Color};
use serde_json::Value;

use crate::ctl::render::{Ctx, grid, plain};
use crate::time_text;

/// The journal's job states, in the order a job passes through them.
const STATES: [&str; 5] = ["pending", "running", "done", "failed", "dead"];

/// The summary; with `rates` (jobs done per second by kind, `top`), a DONE/S column.
pub fn render(status: &Value, rates: Option<&BTreeMap<String, f64>>, ctx: &Ctx) -> String {
    [
        daemon_line(status),
        labelled(status, ctx),
        jobs_table(status, rates, ctx),
    ]
    .join("\n\n")
}

/// `patchbayd 0.1.0, node eu-1, pid 4242, up 2 h 5 min`.
fn daemon_line(status: &Value) -> String {
    let uptime = status["uptime_secs"]
        .as_u64()
        .map_or_else(|| "-".into(), time_text::duration);
    format!(
        "patchbayd {}, node {}, pid {}, up {uptime}",
        plain(&status["version"]),
        plain(&status["node"]),
        plain(&status["pid"]),
    )
}

fn labelled(status: &Value, ctx: &Ctx) -> String {
    let b = &status["backends"];
    let backends = format!(
        "queue {}, store {}, mail {}",
        plain(&b["queue"]),
        plain(&b["store"]),
        plain(&b["mail"])
    );
    let plugins = match status["plugins"].as_array() {
        Some(p) if !p.is_empty() => p.iter().map(plain).collect::<Vec<_>>().join(", "),
        _ => "none loaded".into(),
    };
    let http = match status["http"].as_str() {
        Some(addr) => format!("http://{addr}/ (dashboard, /metrics, /readyz)"),
        None => "off".into(),
    };
    let mut rows = vec![
        vec![Cell::new("Backends:"), Cell::new(backends)],
        vec![Cell::new("Plugins:"), Cell::new(plugins)],
        vec![Cell::new("HTTP:"), Cell::new(http)],
        vec![Cell::new("Health:"), health(status, ctx)],
        vec![Cell::new("Channels:"), Cell::new(channels(status))],
    ];
    if let Some(nodes) = status["nodes"].as_array() {
        rows.push(vec![Cell::new("Cluster:"), Cell::new(cluster(nodes))]);
    }
    grid(None, rows, &[])
}

/// `2 nodes: eu-1 (15 channels, this one), eu-2 (15 channels)`.
fn cluster(nodes: &[Value]) -> String {
    let each: Vec<String> = nodes
        .iter()
        .map(|n| {
            let this = if n["this"] == true { ", this one" } else { "" };
            format!(
                "{} ({} channels{this})",
                plain(&n["name"]),
                plain(&n["channels"])
            )
        })
        .collect();
    let count = match nodes.len() {
        1 => "1 node".to_owned(),
        n => format!("{n} nodes"),
    };
    format!("{count}: {}", each.join(", "))
}

/// `ok`, or `degraded` and one line per part that is down.
fn health(status: &Value, ctx: &Ctx) -> Cell {
    let down: Vec<String> = status["health"]["down"]
        .as_array()
        .map(|d| d.iter().map(plain).collect())
        .unwrap_or_default();
    let ok = status["health"]["ok"].as_bool().unwrap_or(down.is_empty());
    let (text, colour) = if ok {
        ("ok".to_owned(), Color::Green)
    } else {
        let mut lines = vec!["degraded".to_owned()];
        lines.extend(down.iter().map(|d| format!("- {d}")));
        (lines.join("\n"), Color::Red)
    };
    let cell = Cell::new(text);
    if ctx.colour { cell.fg(colour) } else { cell }
}

/// `3 connected, 1 error`; `unknown` while the store does not answer.
fn channels(status: &Value) -> String {
    match status["channels"].as_object() {
        None => "unknown (the store does not answer)".into(),
        Some(m) if m.is_empty() => "none".into(),
        Some(m) => m
            .iter()
            .map(|(s, n)| format!("{} {s}", plain(n)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Per job kind: the queue's depth and the journal's jobs by state (`?` where the
/// queue or the store does not answer); with `rates` (`top`), a DONE/S column too.
fn jobs_table(status: &Value, rates: Option<&BTreeMap<String, f64>>, ctx: &Ctx) -> String {
    let depth = status["queue_depth"].as_object();
    let mut kinds: Vec<&String> = depth.into_iter().flat_map(|m| m.keys()).collect();
    for k in status["jobs"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
    {
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    kinds.sort();
    let mut header = vec!["KIND".to_owned(), "IN QUEUE".to_owned()];
    header.extend(STATES.iter().map(|s| s.to_uppercase()));
    if rates.is_some() {
        header.push("DONE/S".into());
    }
    let rows = kinds
        .iter()
        .map(|kind| {
            let queued = match depth.and_then(|m| m.get(*kind)) {
                Some(Value::Number(n)) => n.to_string(),
                _ => "?".into(),
            };
            let mut row = vec![Cell::new(kind), Cell::new(queued)];
            for state in STATES {
                // No counts at all: the store did not answer (`?`), not zero jobs.
                let n = match &status["jobs"] {
                    Value::Null => None,
                    jobs => Some(jobs[kind.as_str()][state].as_i64().unwrap_or(0)),
                };
                let cell = Cell::new(n.map_or("?".into(), |n| n.to_string()));
                let n = n.unwrap_or(0);
                row.push(match state {
                    "dead" | "failed" if n > 0 && ctx.colour => cell.fg(Color::Red),
                    _ => cell,
                });
            }
            if let Some(rates) = rates {
                let rate = rates.get(*kind).map_or("-".into(), |r| format!("{r:.1}"));
                row.push(Cell::new(rate));
            }
            row
        })
        .collect();
    let mut align = vec![CellAlignment::Left];
    align.resize(header.len(), CellAlignment::Right);
    grid(Some(header), rows, &align)
}
