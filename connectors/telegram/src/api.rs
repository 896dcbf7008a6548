//! A small async client for the Telegram Bot API: `POST {api_base}/bot{token}/{method}`
//! with a JSON body, answered by `{"ok":true,"result":…}` or
//! `{"ok":false,"error_code":…,"description":…,"parameters":{"retry_after":…}}`.
//!
//! Errors are sorted by what the caller should do about them (`ApiError`), following
//! the Bot API docs: 401/404 mean the token is wrong, 409 that another getUpdates
//! client or a webhook holds the bot, 429 carries `retry_after`, and 5xx or network
//! trouble is worth retrying. The token never appears in an error message. Calls are
//! futures, so the poller can drop a long poll the moment the channel stops.

use std::sync::OnceLock;
use std::time::Duration;

use patchbay_connector_sdk::runtime::tokio;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::link::Link;

/// Largest response body read; getUpdates with 100 updates stays far below it.
pub(crate) const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// The longest `retry_after` believed: a larger (or absurd) value from a server would
/// otherwise overflow `Instant + Duration` or park the channel for days.
pub const MAX_RETRY_AFTER_SECS: u64 = 3600;

/// What went wrong with a call, sorted by how to react.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 401 or 404: the token is wrong or revoked. Retrying will not help.
    #[error("invalid token: the Bot API answered {code} ({description})")]
    InvalidToken { code: u16, description: String },
    /// 429: wait `retry_after` seconds (1 to `MAX_RETRY_AFTER_SECS`) before the next call.
    #[error("rate limited by the Bot API: retry after {retry_after} s ({description})")]
    RateLimited {
        retry_after: u64,
        description: String,
    },
    /// 409: another client polls this bot, or a webhook is set for it.
    #[error(
        "conflict: {description}. Another program is receiving this bot's updates: a webhook \
         is set (remove it with deleteWebhook) or another getUpdates poller runs with the same \
         token; use one mode and one poller per bot"
    )]
    Conflict { description: String },
    /// Another 4xx: the request itself is wrong (bad chat id, blocked by the user, …).
    #[error("the Bot API refused the request ({code}: {description})")]
    Rejected { code: u16, description: String },
    /// 5xx, network trouble, timeouts, unreadable answers: retry with backoff.
    #[error("the Bot API is unavailable: {0}")]
    Unavailable(String),
}

impl ApiError {
    /// The same error with `token` removed from its texts.
    pub(crate) fn scrubbed(self, token: &str) -> ApiError {
        let s = |t: String| scrub(t, token);
        match self {
            ApiError::InvalidToken { code, description } => ApiError::InvalidToken {
                code,
                description: s(description),
            },
            ApiError::RateLimited {
                retry_after,
                description,
            } => ApiError::RateLimited {
                retry_after,
                description: s(description),
            },
            ApiError::Conflict { description } => ApiError::Conflict {
                description: s(description),
            },
            ApiError::Rejected { code, description } => ApiError::Rejected {
                code,
                description: s(description),
            },
            ApiError::Unavailable(text) => ApiError::Unavailable(s(text)),
        }
    }

    /// Sorts a Bot API error answer (from `error_code`, else the HTTP status).
    pub fn from_answer(code: u16, description: String, retry_after: Option<u64>) -> ApiError {
        match code {
            401 | 404 => ApiError::InvalidToken { code, description },
            409 => ApiError::Conflict { description },
            429 => ApiError::RateLimited {
                // A 429 without the parameter still means "slow down".
                retry_after: retry_after.unwrap_or(5).clamp(1, MAX_RETRY_AFTER_SECS),
                description,
            },
            400..=499 => ApiError::Rejected { code, description },
            _ => ApiError::Unavailable(format!("HTTP {code}: {description}")),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<T> {
    ok: bool,
    #[serde(default = "Option::default")]
    result: Option<T>,
    #[serde(default)]
    error_code: Option<u16>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Deserialize)]
struct Parameters {
    #[serde(default)]
    retry_after: Option<u64>,
}

/// `getMe`'s answer: the bot's own user.
#[derive(Debug, Clone, Deserialize)]
pub struct Me {
    pub id: i64,
    pub first_name: String,
    #[serde(default)]
    pub username: Option<String>,
}

/// The HTTP client of every bot of this plugin: one connection pool (keyed by host, so
/// bots on one Bot API share its connections, which the token in each path tells
/// apart), one TLS setup and one idle-connection reaper, instead of one of each per bot.
/// Its connections are tasks of the plugin's runtime, which lives as long as the plugin.
fn shared_client() -> Result<reqwest::Client, ApiError> {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(c) = CLIENT.get() {
        return Ok(c.clone());
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| ApiError::Unavailable(format!("cannot build the HTTP client: {e}")))?;
    Ok(CLIENT.get_or_init(|| client).clone())
}

/// The client for one bot token. Cheap to clone; use it on the plugin's runtime.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    /// `{api_base}/bot{token}/`, parsed once (each call only joins its method to it):
    /// secret, never logged.
    prefix: reqwest::Url,
    token: String,
}

impl Api {
    pub fn new(api_base: &str, token: &str) -> Result<Api, ApiError> {
        let prefix = format!("{}/bot{token}/", api_base.trim_end_matches('/'));
        let prefix = reqwest::Url::parse(&prefix)
            .map_err(|e| ApiError::Unavailable(format!("api_base is not a usable URL ({e})")))?;
        Ok(Api {
            client: shared_client()?,
            prefix,
            token: token.to_owned(),
        })
    }

    /// A connection of this bot's own for its poller (`link`), to the same prefix.
    pub fn link(&self) -> Result<Link, ApiError> {
        Link::new(self)
    }

    /// `{api_base}/bot{token}/`: secret.
    pub(crate) fn prefix(&self) -> &reqwest::Url {
        &self.prefix
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    fn unavailable(&self, method: &str, e: impl std::fmt::Display) -> ApiError {
        ApiError::Unavailable(scrub(format!("{method}: {e}"), &self.token))
    }

    /// Calls `method` with JSON `params`; the whole exchange is bounded by `timeout`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        params: &serde_json::Value,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let url = self
            .prefix
            .join(method)
            .map_err(|e| self.unavailable(method, e))?;
        let exchange = async {
            let mut resp = self
                .client
                .post(url)
                .json(params)
                .send()
                .await
                .map_err(|e| self.unavailable(method, e.without_url()))?;
            let status = resp.status().as_u16();
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| self.unavailable(method, e.without_url()))?
            {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(self.unavailable(method, "answer too large"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| self.unavailable(method, format!("no answer within {timeout:?}")))??;
        parse_answer(method, status, &String::from_utf8_lossy(&body))
            .map_err(|e| e.scrubbed(&self.token))
    }
}

/// Removes the token from text that may quote the URL (reqwest errors do, and so may
/// a proxy's error page: "Cannot POST /bot…/getUpdates").
pub(crate) fn scrub(text: String, token: &str) -> String {
    if token.is_empty() {
        text
    } else {
        text.replace(token, "<token>")
    }
}

/// Interprets one answer: the envelope's `ok`/`error_code` win over the HTTP status,
/// which only decides when the body is not the Bot API's JSON (a proxy's error page).
pub fn parse_answer<T: DeserializeOwned>(
    method: &str,
    status: u16,
    text: &str,
) -> Result<T, ApiError> {
    match serde_json::from_str::<Envelope<T>>(text) {
        Ok(Envelope {
            ok: true,
            result: Some(r),
            ..
        }) => Ok(r),
        Ok(Envelope { ok: true, .. }) => Err(ApiError::Unavailable(format!(
            "{method}: answer has ok=true but no result"
        ))),
        Ok(env) => Err(ApiError::from_answer(
            env.error_code.unwrap_or(status),
            env.description.unwrap_or_else(|| format!("HTTP {status}")),
            env.parameters.and_then(|p| p.retry_after),
        )),
        Err(e) if (200..300).contains(&status) => Err(ApiError::Unavailable(format!(
            "{method}: unreadable answer: {e}"
        ))),
        Err(_) => {
            let snippet: String = text.chars().take(120).collect();
            Err(ApiError::from_answer(status, snippet, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn answers_are_sorted() {
        let ok: Value = parse_answer("getMe", 200, r#"{"ok":true,"result":{"id":1}}"#).unwrap();
        assert_eq!(ok["id"], 1);
        let e = parse_answer::<Value>(
            "getMe",
            401,
            r#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::InvalidToken { code: 401, .. }));
        assert!(e.to_string().starts_with("invalid token"), "{e}");
        let e = parse_answer::<Value>(
            "getMe",
            404,
            r#"{"ok":false,"error_code":404,"description":"Not Found"}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::InvalidToken { code: 404, .. }));
        let e = parse_answer::<Value>(
            "sendMessage",
            429,
            r#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 7","parameters":{"retry_after":7}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::RateLimited { retry_after: 7, .. }));
        let e = parse_answer::<Value>(
            "getUpdates",
            409,
            r#"{"ok":false,"error_code":409,"description":"Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("deleteWebhook"), "{e}");
        let e = parse_answer::<Value>(
            "sendMessage",
            400,
            r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::Rejected { code: 400, .. }));
        // Not the Bot API's JSON: the HTTP status decides.
        let e = parse_answer::<Value>("getUpdates", 502, "<html>Bad Gateway</html>").unwrap_err();
        assert!(matches!(e, ApiError::Unavailable(_)));
        let e = parse_answer::<Value>("getUpdates", 200, "garbage").unwrap_err();
        assert!(matches!(e, ApiError::Unavailable(_)));
    }

    #[test]
    fn retry_after_is_clamped() {
        let e = ApiError::from_answer(429, "slow".into(), Some(u64::MAX));
        assert!(matches!(
            e,
            ApiError::RateLimited {
                retry_after: MAX_RETRY_AFTER_SECS,
                ..
            }
        ));
        let e = ApiError::from_answer(429, "slow".into(), Some(0));
        assert!(matches!(e, ApiError::RateLimited { retry_after: 1, .. }));
    }

    #[test]
    fn token_is_scrubbed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let api = Api::new("http://127.0.0.1:1/", "123:SECRET").unwrap();
        let e = rt
            .block_on(api.call::<Value>("getMe", &serde_json::json!({}), Duration::from_secs(2)))
            .unwrap_err();
        assert!(matches!(e, ApiError::Unavailable(_)), "{e}");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        assert_eq!(api.prefix.as_str(), "http://127.0.0.1:1/bot123:SECRET/");
    }
}
