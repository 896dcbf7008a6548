//! Outbound: each host message POSTed as JSON to `outbound_url`, signed like inbound
//! requests, retrying 5xx/408/429 answers and network errors up to `outbound_attempts`
//! times with backoff (honouring a short `Retry-After`) within the send's budget. A 2xx
//! is the gateway's acknowledgement, reported as `delivered`; a 4xx is permanent.

use std::time::{Duration, Instant};

use patchbay_connector_sdk::chrono::Utc;
use patchbay_connector_sdk::runtime::tokio;
use patchbay_connector_sdk::{
    ConnectorError, Event, Level, Outbound, Receipt, ReceiptStatus, Sent,
};
use serde_json::json;

use crate::config::SEND_BUDGET;
use crate::hook::Hook;
use crate::inbound::EMIT_WAIT;
use crate::signature::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};

/// The JSON body of one outbound message: the host's `message` id (for the gateway to
/// de-duplicate: delivery is at least once), the chat, recipient, text, attachments.
pub fn body(msg: &Outbound) -> Result<Vec<u8>, ConnectorError> {
    serde_json::to_vec(&json!({
        "message": msg.message,
        "external_chat_id": msg.external_chat_id,
        "to": msg.to,
        "text": msg.text,
        "attachments": msg.attachments,
    }))
    .map_err(|e| ConnectorError::new("invalid_message", e.to_string()))
}

/// The outcome of one outbound POST that may be worth repeating.
enum Attempt {
    /// 2xx, with the gateway's own id for the message if it named one.
    Delivered(Option<String>),
    /// 5xx, 408, 429 or a network error; `Retry-After` seconds if given.
    Retry {
        reason: String,
        retry_after: Option<u64>,
    },
}

/// One signed POST of `body`; `Err` when retrying cannot help.
async fn post_once(
    hook: &Hook,
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
) -> Result<Attempt, ConnectorError> {
    let c = &hook.config;
    let ts = Utc::now().timestamp();
    let sig = sign(c.outbound_key(), ts, body)
        .map_err(|e| ConnectorError::new("internal", e.to_string()))?;
    let result = client
        .post(url)
        .header("Content-Type", "application/json")
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, sig)
        .body(body.to_vec())
        .send()
        .await;
    let mut resp = match result {
        Ok(r) => r,
        // A bad URL or header cannot get better; everything else (connect, timeout,
        // reset) is the network's trouble.
        Err(e) if e.is_builder() => {
            return Err(ConnectorError::new(
                "send_failed",
                format!("POST {url}: {e}"),
            ));
        }
        Err(e) => {
            return Ok(Attempt::Retry {
                reason: format!("POST {url}: {e}"),
                retry_after: None,
            });
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut text = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        text.extend_from_slice(&chunk);
        if text.len() > 64 * 1024 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text);
    match status {
        200..=299 => {
            // The gateway may name its own id for the message; otherwise ours.
            let id = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("external_message_id")?.as_str().map(str::to_owned))
                .filter(|s| !s.is_empty() && s.len() <= 256);
            Ok(Attempt::Delivered(id))
        }
        408 | 429 | 500..=599 => Ok(Attempt::Retry {
            reason: format!("POST {url}: HTTP {status}: {}", snippet(&text)),
            retry_after,
        }),
        _ => Err(ConnectorError::new(
            "rejected",
            format!("POST {url}: HTTP {status}: {}", snippet(&text)),
        )),
    }
}

/// The attempts of one send, within `SEND_BUDGET`.
pub async fn deliver(
    hook: &Hook,
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    message: i64,
) -> Result<Sent, ConnectorError> {
    let c = &hook.config;
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 1..=c.outbound_attempts {
        match post_once(hook, client, url, body).await? {
            Attempt::Delivered(id) => {
                let external_message_id = id.unwrap_or_else(|| format!("wh-out-{message}"));
                hook.count("sent");
                // A 2xx is the gateway's acknowledgement: that is what delivered
                // means for a webhook.
                let receipt = Event::Receipt(Receipt {
                    message,
                    status: ReceiptStatus::Delivered,
                    external_message_id: Some(external_message_id.clone()),
                    reason: None,
                });
                if let Err(e) = hook.emit_for(&receipt, EMIT_WAIT).await {
                    hook.host().log(
                        Level::Warn,
                        &format!("webhook: receipt for message {message} dropped: {e}"),
                    );
                }
                return Ok(Sent {
                    external_message_id,
                });
            }
            Attempt::Retry {
                reason,
                retry_after,
            } => {
                last = reason;
                if attempt == c.outbound_attempts {
                    break;
                }
                hook.count("send_retries");
                let wait = retry_after
                    .map(Duration::from_secs)
                    .unwrap_or(pause)
                    .min(Duration::from_secs(5));
                // Never let the retries push the call past the daemon's timeout.
                let next_end =
                    started.elapsed() + wait + Duration::from_secs(c.outbound_timeout_secs);
                if next_end > SEND_BUDGET {
                    break;
                }
                tokio::time::sleep(wait).await;
                pause *= 2;
            }
        }
    }
    Err(ConnectorError::new("unavailable", last).retryable())
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace(['\r', '\n'], " ")
}
