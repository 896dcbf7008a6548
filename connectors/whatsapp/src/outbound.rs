//! The host's outbound message → the body of `POST /{phone_number_id}/messages`: a
//! text to the customer's wa_id, a reply (`context.message_id`) when the message
//! carries a `{"type":"reply"}` attachment, and `biz_opaque_callback_data` naming the
//! host's message id, which WhatsApp echoes in every status webhook of it.

use patchbay_connector_sdk::{ConnectorError, Outbound};
use serde_json::{Value, json};

use crate::inbound::CALLBACK_PREFIX;

/// WhatsApp's limit for a text message body, in characters.
pub const MAX_TEXT_CHARS: usize = 4096;

/// The recipient: the chat's wa_id, else the phone the host created the chat with.
fn recipient(msg: &Outbound) -> Option<String> {
    let raw = if msg.external_chat_id.is_empty() {
        msg.to.phone.as_deref()?
    } else {
        &msg.external_chat_id
    };
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    (!digits.is_empty() && digits.len() <= 15).then_some(digits)
}

/// The send body, or a permanent error saying what cannot be sent.
pub fn body(msg: &Outbound) -> Result<Value, ConnectorError> {
    let to = recipient(msg).ok_or_else(|| {
        ConnectorError::new(
            "no_recipient",
            "the chat has no WhatsApp id and no phone number to send to",
        )
    })?;
    let mut reply_to = None;
    for a in &msg.attachments {
        match a.get("type").and_then(Value::as_str) {
            Some("reply") => {
                reply_to = a
                    .get("external_message_id")
                    .and_then(Value::as_str)
                    .filter(|id| !id.is_empty());
            }
            other => {
                return Err(ConnectorError::new(
                    "unsupported",
                    format!(
                        "the whatsapp connector sends text only; attachment type {} cannot be sent",
                        other.map_or_else(|| "(none)".to_owned(), |t| format!("{t:?}"))
                    ),
                ));
            }
        }
    }
    if msg.text.trim().is_empty() {
        return Err(ConnectorError::new(
            "invalid_message",
            "a WhatsApp text message needs text",
        ));
    }
    let n = msg.text.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(ConnectorError::new(
            "invalid_message",
            format!("WhatsApp texts are at most {MAX_TEXT_CHARS} characters, this one has {n}"),
        ));
    }
    let mut body = json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": msg.text},
        "biz_opaque_callback_data": format!("{CALLBACK_PREFIX}{}", msg.message),
    });
    if let (Some(id), Some(o)) = (reply_to, body.as_object_mut()) {
        o.insert("context".into(), json!({"message_id": id}));
    }
    Ok(body)
}
