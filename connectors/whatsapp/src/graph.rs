//! The Graph API calls of a channel (`GET /{phone_number_id}`, `POST
//! /{phone_number_id}/messages`) and what Meta's error codes mean for patchbay:
//! retry with backoff, fail the message with a reason a person understands, or put
//! the channel in `error` because the token is no good.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::config::Config;
use crate::payload::GraphError;

/// The reason the channel shows when Meta refuses the token.
pub const TOKEN_REASON: &str = "access token invalid or expired";

/// What one failed call means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Retrying cannot help: the message fails with `reason`.
    Permanent { code: &'static str, reason: String },
    /// Rate limits, Meta's temporary errors, 5xx, network trouble and timeouts.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// HTTP 401 or code 190: the token is invalid or expired.
    Auth(String),
}

/// Meta's error codes worth retrying: throughput (130429), pair rate (131056), app
/// (4) and account (80007) rate limits, and the temporary 1 / 2.
const RETRY_CODES: &[i64] = &[130429, 131056, 4, 80007, 1, 2];

/// The reason a failed message carries, worded for the person who sent it.
pub fn failure_reason(e: &GraphError) -> String {
    match e.code {
        Some(131047) => "more than 24 hours have passed since the customer last wrote: WhatsApp \
                         only accepts an approved template message until they write again \
                         (error 131047)"
            .into(),
        Some(131026) => "WhatsApp could not deliver the message: the number may not use \
                         WhatsApp, or has not accepted its latest terms (error 131026)"
            .into(),
        _ => format!("WhatsApp refused the message: {}", e.describe()),
    }
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: GraphError,
}

/// Classifies a non-2xx answer by Meta's `error.code` first, then by HTTP status.
pub fn classify(http: u16, body: &str) -> Failure {
    let error = serde_json::from_str::<ErrorAnswer>(body)
        .map(|a| a.error)
        .ok();
    let code = error.as_ref().and_then(|e| e.code);
    let described = error
        .as_ref()
        .map(GraphError::describe)
        .unwrap_or_else(|| format!("HTTP {http}: {}", snippet(body)));
    if http == 401 || code == Some(190) {
        return Failure::Auth(format!("{TOKEN_REASON}: {described}"));
    }
    if code.is_some_and(|c| RETRY_CODES.contains(&c)) || http == 429 || http >= 500 {
        return Failure::Retry {
            reason: described,
            after: None,
        };
    }
    let permanent = |code| Failure::Permanent {
        code,
        reason: error
            .as_ref()
            .map(failure_reason)
            .unwrap_or_else(|| described.clone()),
    };
    match code {
        Some(131047) => permanent("window_closed"),
        Some(131026) => permanent("undeliverable"),
        _ => permanent("rejected"),
    }
}

fn snippet(text: &str) -> String {
    text.chars()
        .take(200)
        .collect::<String>()
        .replace(['\r', '\n'], " ")
}

/// The number as `GET /{phone_number_id}` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NumberInfo {
    #[serde(default)]
    pub display_phone_number: Option<String>,
    #[serde(default)]
    pub verified_name: Option<String>,
}

/// A channel's Graph API client: the base URL, version and token of its config.
#[derive(Clone)]
pub struct Graph {
    client: reqwest::Client,
    config: std::sync::Arc<Config>,
}

/// Reads at most 64 KiB of an answer: Meta's answers are small, a fake's may not be.
async fn body_text(mut resp: reqwest::Response) -> String {
    let mut text = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        text.extend_from_slice(&chunk);
        if text.len() > 64 * 1024 {
            break;
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

impl Graph {
    pub fn new(config: std::sync::Arc<Config>) -> Result<Graph, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.request_timeout_secs))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Graph { client, config })
    }

    async fn call(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value, Failure> {
        let resp = req
            .bearer_auth(&self.config.access_token)
            .send()
            .await
            // No URL in the message: reqwest's errors name it, and the path is
            // harmless, but keep the line short.
            .map_err(|e| Failure::Retry {
                reason: format!("{what}: {}", e.without_url()),
                after: None,
            })?;
        let status = resp.status().as_u16();
        let after = resp
            .headers()
            .get("Retry-After")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = body_text(resp).await;
        if (200..300).contains(&status) {
            return serde_json::from_str(&text).map_err(|_| Failure::Retry {
                reason: format!("{what}: HTTP {status} with a body that is not JSON"),
                after: None,
            });
        }
        match classify(status, &text) {
            Failure::Retry { reason, .. } => Err(Failure::Retry {
                reason: format!("{what}: {reason}"),
                after,
            }),
            other => Err(other),
        }
    }

    /// `GET /{phone_number_id}?fields=display_phone_number,verified_name`.
    pub async fn number(&self) -> Result<NumberInfo, Failure> {
        let url = self.config.graph_url(&self.config.phone_number_id);
        let req = self
            .client
            .get(url)
            .query(&[("fields", "display_phone_number,verified_name")]);
        let v = self.call(req, "GET number").await?;
        serde_json::from_value(v).map_err(|e| Failure::Retry {
            reason: format!("GET number: unexpected answer: {e}"),
            after: None,
        })
    }

    /// `POST /{phone_number_id}/messages`; the wamid of `messages[0].id`.
    pub async fn send(&self, body: &Value) -> Result<String, Failure> {
        let url = self
            .config
            .graph_url(&format!("{}/messages", self.config.phone_number_id));
        let v = self
            .call(self.client.post(url).json(body), "POST messages")
            .await?;
        v.pointer("/messages/0/id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.len() <= 256)
            .map(str::to_owned)
            // Accepted, but no id: retrying could send it twice.
            .ok_or_else(|| Failure::Permanent {
                code: "no_message_id",
                reason: "WhatsApp accepted the message but named no message id".into(),
            })
    }
}
