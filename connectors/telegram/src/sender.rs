//! Outbound: the Bot API calls that send one host message (`plan_send`: media by
//! `file_id` or URL, the text as a caption when it fits, else in 4096-character parts,
//! a reply's `reply_parameters` on the first call) and making them in order within the
//! send's deadline (`send_all`), sleeping through a short 429. Once a part has reached
//! Telegram a later failure is permanent, so a retry never repeats what was sent.

use std::time::{Duration, Instant};

use patchbay_connector_sdk::runtime::tokio;
use patchbay_connector_sdk::{ConnectorError, Level};
use serde_json::{Value, json};

use crate::api::ApiError;
use crate::bot::Bot;

/// Telegram's limit for one text message, in characters.
pub const MAX_TEXT: usize = 4096;
/// Telegram's limit for a media caption, in characters.
pub const MAX_CAPTION: usize = 1024;
/// The longest 429 wait `send` sleeps through itself; longer ones fail retryably.
pub const MAX_SEND_WAIT: Duration = Duration::from_secs(10);

/// Calls one send method within `deadline`, sleeping through a 429 that ends before it.
async fn call_send(
    bot: &Bot,
    method: &str,
    params: &Value,
    deadline: Instant,
) -> Result<Value, ConnectorError> {
    let timeout = bot.config.request_timeout();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectorError::new(
                "timeout",
                format!("{method}: out of time for this send; will retry"),
            )
            .retryable());
        }
        match bot
            .api
            .call::<Value>(method, params, timeout.min(left))
            .await
        {
            Ok(v) => return Ok(v),
            Err(e @ ApiError::RateLimited { retry_after, .. }) => {
                let d = bot.rate_limited(retry_after);
                if d > MAX_SEND_WAIT || Instant::now() + d >= deadline {
                    return Err(ConnectorError::new("rate_limited", e.to_string()).retryable());
                }
                bot.log(
                    Level::Info,
                    &format!("telegram: {method} rate limited; waiting {}s", d.as_secs()),
                );
                tokio::time::sleep(d).await;
            }
            Err(e @ ApiError::InvalidToken { .. }) => {
                bot.invalid_token(&e);
                return Err(ConnectorError::new("invalid_token", e.to_string()));
            }
            Err(e @ ApiError::Unavailable(_)) => {
                return Err(ConnectorError::new("unavailable", e.to_string()).retryable());
            }
            Err(e @ ApiError::Conflict { .. }) => {
                return Err(ConnectorError::new("conflict", e.to_string()).retryable());
            }
            Err(e @ ApiError::Rejected { .. }) => {
                return Err(ConnectorError::new("rejected", e.to_string()));
            }
        }
    }
}

/// Makes the calls of one message in order. Once a part has reached Telegram a
/// retry would send it twice, so a later failure is permanent, naming what was sent.
pub async fn send_all(
    bot: &Bot,
    calls: &[(&'static str, Value)],
    deadline: Instant,
) -> Result<String, ConnectorError> {
    let mut first = None;
    for (i, (method, params)) in calls.iter().enumerate() {
        let sent = match call_send(bot, method, params, deadline).await {
            Ok(v) => v,
            Err(e) if i == 0 => return Err(e),
            Err(e) => {
                return Err(ConnectorError::new(
                    "partially_sent",
                    format!(
                        "sent {i} of {} parts (first {}), then {}: {}; not retried, so the sent parts do not repeat",
                        calls.len(),
                        first.as_deref().unwrap_or("?"),
                        e.code,
                        e.message
                    ),
                ));
            }
        };
        if first.is_none() {
            let chat = sent
                .get("chat")
                .and_then(|c| c.get("id"))
                .and_then(Value::as_i64);
            let id = sent.get("message_id").and_then(Value::as_i64);
            if let (Some(chat), Some(id)) = (chat, id) {
                first = Some(format!("{chat}:{id}"));
            } else if i == 0 {
                // Telegram has the part but answered oddly: a retry would repeat it.
                return Err(ConnectorError::new(
                    "bad_answer",
                    "the Bot API answered without chat.id/message_id; not retried",
                ));
            }
        }
    }
    first.ok_or_else(|| ConnectorError::new("invalid_message", "nothing to send"))
}

/// `reply_parameters` for a `{"type":"reply","external_message_id":"<chat>:<id>"}`
/// attachment (as inbound replies carry them): the first call answers that message.
fn reply_parameters(chat_id: &Value, a: &Value) -> Result<Value, ConnectorError> {
    let bad = || {
        ConnectorError::new(
            "invalid_message",
            "a reply attachment needs external_message_id \"<chat id>:<message id>\"",
        )
    };
    let id = a
        .get("external_message_id")
        .and_then(Value::as_str)
        .ok_or_else(bad)?;
    let (chat, message) = id.rsplit_once(':').ok_or_else(bad)?;
    let message: i64 = message.parse().map_err(|_| bad())?;
    // A deleted original must not make the answer itself fail.
    let mut params = json!({"message_id": message, "allow_sending_without_reply": true});
    let same_chat = match chat_id {
        Value::String(name) => name == chat,
        other => other.as_i64().is_some_and(|n| n.to_string() == chat),
    };
    if !same_chat && let Some(p) = params.as_object_mut() {
        p.insert(
            "chat_id".into(),
            chat.parse::<i64>()
                .map_or_else(|_| chat.into(), Value::from),
        );
    }
    Ok(params)
}

/// The Bot API calls that send `msg`: media by `file_id` or `url` (the first one
/// carrying the text as caption when it fits), then the text in 4096-character parts.
/// A `reply` attachment makes the first call a reply to that message.
pub fn plan_send(
    chat_id: &Value,
    text: &str,
    attachments: &[Value],
) -> Result<Vec<(&'static str, Value)>, ConnectorError> {
    let mut calls = Vec::new();
    let mut text_done = text.is_empty();
    let mut reply_to = None;
    for a in attachments {
        let kind = a.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind == "reply" {
            reply_to = Some(reply_parameters(chat_id, a)?);
            continue;
        }
        let (method, field) = match kind {
            "photo" => ("sendPhoto", "photo"),
            "document" => ("sendDocument", "document"),
            "voice" => ("sendVoice", "voice"),
            "video" => ("sendVideo", "video"),
            "audio" => ("sendAudio", "audio"),
            "animation" => ("sendAnimation", "animation"),
            "sticker" => ("sendSticker", "sticker"),
            other => {
                return Err(ConnectorError::new(
                    "unsupported_attachment",
                    format!(
                        "attachment type {other:?}: telegram sends photo, document, voice, video, audio, animation, sticker"
                    ),
                ));
            }
        };
        let Some(file) = a
            .get("file_id")
            .or_else(|| a.get("url"))
            .and_then(Value::as_str)
        else {
            return Err(ConnectorError::new(
                "unsupported_attachment",
                format!("{kind} attachment needs a file_id or a url"),
            ));
        };
        let mut params = json!({"chat_id": chat_id, field: file});
        if !text_done
            && kind != "sticker"
            && text.chars().count() <= MAX_CAPTION
            && let Some(p) = params.as_object_mut()
        {
            p.insert("caption".into(), text.into());
            text_done = true;
        }
        calls.push((method, params));
    }
    if !text_done {
        let chars: Vec<char> = text.chars().collect();
        for part in chars.chunks(MAX_TEXT) {
            let part: String = part.iter().collect();
            calls.push(("sendMessage", json!({"chat_id": chat_id, "text": part})));
        }
    }
    if calls.is_empty() {
        return Err(ConnectorError::new(
            "invalid_message",
            "nothing to send: no text and no attachments",
        ));
    }
    if let (Some(r), Some((_, first))) = (reply_to, calls.first_mut())
        && let Some(p) = first.as_object_mut()
    {
        p.insert("reply_parameters".into(), r);
    }
    Ok(calls)
}
