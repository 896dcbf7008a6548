//! `--watch` for data deletion: polls `data.deletion_status` and draws a live progress
//! bar (indicatif) with rate and ETA until the run is done.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::ctl::client::{CallError, Client};

fn deleted(v: &Value) -> u64 {
    ["messages", "chats", "contacts"]
        .iter()
        .filter_map(|k| v["deleted"][k].as_u64())
        .sum()
}

pub async fn deletion(client: &mut Client, account: i64) -> Result<Value, CallError> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} deleting [{bar:40}] {pos}/{len} rows  {per_sec}  eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut first = true;
    loop {
        let status = client
            .call("data.deletion_status", json!({ "account": account }))
            .await?;
        if status.is_null() {
            bar.finish_and_clear();
            return Ok(status);
        }
        let done = deleted(&status);
        let remaining = status["remaining_estimate"].as_u64().unwrap_or(0);
        bar.set_length(done + remaining);
        bar.set_position(done);
        if std::mem::take(&mut first) {
            // Attached to a run already under way: its rows so far are not our rate.
            bar.reset_eta();
        }
        bar.set_message(format!("run {}", status["run"]));
        // A run whose job went dead would never finish: say so instead of waiting.
        if status["state"] == "running" && status["job"]["state"] == "dead" {
            bar.abandon_with_message(format!(
                "run {} stalled: its job is dead ({}); `patchbayctl data delete` restarts it",
                status["run"], status["job"]["last_error"]
            ));
            return Ok(status);
        }
        if status["state"] != "running" {
            bar.finish_with_message(format!("run {} {}", status["run"], status["state"]));
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
