//! Prints results for people: arrays of objects as tables, objects as two-column
//! tables, nested values as compact JSON. `--json` bypasses all of it.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};
use serde_json::Value;

/// Unix-millisecond times (`created_at`, `cutoff`, …) shown as UTC dates for people.
fn time_cell(key: &str, v: &Value) -> Option<String> {
    if !(key.ends_with("_at") || key == "cutoff") {
        return None;
    }
    let ms = v.as_i64()?;
    let t = chrono::DateTime::from_timestamp_millis(ms)?;
    Some(t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn keyed_cell(key: &str, v: &Value) -> String {
    time_cell(key, v).unwrap_or_else(|| cell(v))
}

pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    t
}

pub fn render(v: &Value) -> String {
    match v {
        Value::Array(rows) if rows.is_empty() => "(none)".into(),
        Value::Array(rows) if rows.iter().all(Value::is_object) => {
            let mut columns: Vec<String> = Vec::new();
            for row in rows {
                for key in row.as_object().into_iter().flat_map(|o| o.keys()) {
                    if !columns.contains(key) {
                        columns.push(key.clone());
                    }
                }
            }
            let mut t = table();
            t.set_header(columns.iter().map(|c| c.replace('_', " ")));
            for row in rows {
                t.add_row(
                    columns
                        .iter()
                        .map(|c| keyed_cell(c, row.get(c).unwrap_or(&Value::Null))),
                );
            }
            format!("{t}\n{} row(s)", rows.len())
        }
        Value::Object(map) => {
            let mut t = table();
            for (k, v) in map {
                let shown = match v {
                    Value::Object(inner) => inner
                        .iter()
                        .map(|(ik, iv)| format!("{ik}: {}", keyed_cell(ik, iv)))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    other => keyed_cell(k, other),
                };
                t.add_row(vec![k.replace('_', " "), shown]);
            }
            t.to_string()
        }
        other => cell(other),
    }
}
