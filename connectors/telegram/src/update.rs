//! Telegram `Update` objects → patchbay inbound messages.
//!
//! Only `message` updates become messages (edits, channel posts, callbacks and the
//! rest are skipped, but their update id still advances the offset). Media become
//! attachments by `file_id` (fetchable with getFile), with the metadata Telegram gives;
//! a reply carries `{"type":"reply","external_message_id":…}` naming the message it
//! answers (in the same `<chat id>:<message id>` form as inbound ids).

use patchbay_connector_sdk::chrono::{DateTime, Utc};
use patchbay_connector_sdk::{Inbound, Sender};
use serde::Deserialize;
use serde_json::{Map, Value, json};

#[derive(Debug, Deserialize)]
struct User {
    id: i64,
    first_name: String,
    #[serde(default)]
    last_name: Option<String>,
    #[serde(default)]
    username: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Chat {
    id: i64,
    #[serde(default)]
    title: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Contact {
    phone_number: String,
    #[serde(default)]
    user_id: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct Message {
    message_id: i64,
    #[serde(default)]
    from: Option<User>,
    chat: Chat,
    date: i64,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    contact: Option<Contact>,
}

/// Media fields turned into attachments, and the metadata kept for each.
const MEDIA: &[(&str, &[&str])] = &[
    ("document", &["file_name", "mime_type", "file_size"]),
    ("voice", &["duration", "mime_type", "file_size"]),
    (
        "video",
        &[
            "width",
            "height",
            "duration",
            "file_name",
            "mime_type",
            "file_size",
        ],
    ),
    ("video_note", &["length", "duration", "file_size"]),
    (
        "audio",
        &[
            "duration",
            "performer",
            "title",
            "file_name",
            "mime_type",
            "file_size",
        ],
    ),
    (
        "animation",
        &[
            "width",
            "height",
            "duration",
            "file_name",
            "mime_type",
            "file_size",
        ],
    ),
    ("sticker", &["emoji", "set_name", "width", "height"]),
];

fn attachment(kind: &str, media: &Value, keys: &[&str]) -> Option<Value> {
    let mut out = Map::new();
    out.insert("type".into(), kind.into());
    out.insert("file_id".into(), media.get("file_id")?.clone());
    if let Some(u) = media.get("file_unique_id") {
        out.insert("file_unique_id".into(), u.clone());
    }
    for k in keys {
        if let Some(v) = media.get(*k) {
            out.insert((*k).into(), v.clone());
        }
    }
    Some(Value::Object(out))
}

/// The attachments of a raw message object.
fn attachments(raw: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    // A photo comes in several sizes, smallest first: keep the largest.
    if let Some(p) = raw
        .get("photo")
        .and_then(Value::as_array)
        .and_then(|sizes| sizes.last())
        && let Some(a) = attachment("photo", p, &["width", "height", "file_size"])
    {
        out.push(a);
    }
    for (kind, keys) in MEDIA {
        if let Some(a) = raw.get(*kind).and_then(|m| attachment(kind, m, keys)) {
            out.push(a);
        }
    }
    if let Some(c) = raw.get("contact") {
        let mut a = json!({"type": "contact"});
        for k in ["phone_number", "first_name", "last_name", "user_id"] {
            if let (Some(v), Some(o)) = (c.get(k), a.as_object_mut()) {
                o.insert(k.into(), v.clone());
            }
        }
        out.push(a);
    }
    if let Some(l) = raw.get("location") {
        out.push(json!({
            "type": "location",
            "latitude": l.get("latitude"),
            "longitude": l.get("longitude"),
        }));
    }
    out
}

/// The `reply` attachment for a `reply_to_message`: which message is answered, with
/// a short quote of it for operators. `None` when it names no message.
fn reply(replied: &Value, chat_id: i64) -> Option<Value> {
    let message_id = replied.get("message_id")?.as_i64()?;
    // A reply within the chat, as Telegram sends it; the chat field wins if present.
    let chat = replied
        .get("chat")
        .and_then(|c| c.get("id"))
        .and_then(Value::as_i64)
        .unwrap_or(chat_id);
    let mut a = json!({"type": "reply", "external_message_id": format!("{chat}:{message_id}")});
    let quote = replied
        .get("text")
        .or_else(|| replied.get("caption"))
        .and_then(Value::as_str);
    if let (Some(q), Some(o)) = (quote, a.as_object_mut()) {
        o.insert(
            "text".into(),
            q.chars().take(200).collect::<String>().into(),
        );
    }
    Some(a)
}

/// A phone as Telegram shares it ("15550001111" or "+15550001111") in E.164 form.
fn normalize_phone(p: &str) -> Option<String> {
    let digits: String = p.chars().filter(char::is_ascii_digit).collect();
    (!digits.is_empty()).then(|| format!("+{digits}"))
}

/// Why an update was skipped rather than turned into a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Not a `message` update (an edit, a channel post, a callback, …).
    NotAMessage,
    /// A service message (member joined, pinned, …): no text and no media.
    Empty,
    /// A `message` we could not read; the reason is for the log.
    Malformed(String),
}

/// The update id of a raw update, which the offset needs even when the rest is unreadable.
pub fn update_id(update: &Value) -> Option<i64> {
    update.get("update_id")?.as_i64()
}

/// Turns one raw update into an inbound message.
pub fn to_inbound(update: &Value) -> Result<Inbound, Skip> {
    let raw = update.get("message").ok_or(Skip::NotAMessage)?;
    let m: Message =
        serde_json::from_value(raw.clone()).map_err(|e| Skip::Malformed(e.to_string()))?;
    let mut attachments = attachments(raw);
    let text = m.text.or(m.caption).unwrap_or_default();
    if text.is_empty() && attachments.is_empty() {
        return Err(Skip::Empty);
    }
    if let Some(r) = raw
        .get("reply_to_message")
        .and_then(|r| reply(r, m.chat.id))
    {
        attachments.push(r);
    }
    let sender = match &m.from {
        Some(u) => {
            let name = match &u.last_name {
                Some(l) if !l.is_empty() => format!("{} {l}", u.first_name),
                _ => u.first_name.clone(),
            };
            // Only a contact the sender shared about themselves is their phone.
            let phone = m
                .contact
                .as_ref()
                .filter(|c| c.user_id == Some(u.id))
                .and_then(|c| normalize_phone(&c.phone_number));
            Sender {
                // Stable for the user's life, and set when nothing else is: most users
                // have no @username and never share their phone.
                id: Some(u.id.to_string()),
                phone,
                username: u.username.clone(),
                name: Some(name),
            }
        }
        None => Sender {
            name: Some(m.chat.title.clone().unwrap_or_else(|| "Telegram".into())),
            ..Sender::default()
        },
    };
    let sent_at = DateTime::<Utc>::from_timestamp(m.date, 0)
        .unwrap_or_else(Utc::now)
        .fixed_offset();
    Ok(Inbound {
        external_chat_id: m.chat.id.to_string(),
        external_message_id: format!("{}:{}", m.chat.id, m.message_id),
        sender,
        text,
        attachments,
        sent_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_connector_sdk::Event;

    #[test]
    fn text_message() {
        let u = json!({"update_id": 10, "message": {
            "message_id": 5, "date": 1_700_000_000,
            "from": {"id": 42, "is_bot": false, "first_name": "Ann", "last_name": "Lee", "username": "annlee"},
            "chat": {"id": 42, "type": "private", "first_name": "Ann"},
            "text": "hello"
        }});
        assert_eq!(update_id(&u), Some(10));
        let m = to_inbound(&u).unwrap();
        assert_eq!(m.external_chat_id, "42");
        assert_eq!(m.external_message_id, "42:5");
        assert_eq!(m.sender.username.as_deref(), Some("annlee"));
        assert_eq!(m.sender.name.as_deref(), Some("Ann Lee"));
        assert_eq!(m.sender.phone, None);
        assert_eq!(m.text, "hello");
        assert_eq!(m.sent_at.to_rfc3339(), "2023-11-14T22:13:20+00:00");
        Event::Inbound(m).validate().unwrap();
    }

    #[test]
    fn media_and_contact() {
        let u = json!({"update_id": 11, "message": {
            "message_id": 6, "date": 1_700_000_000,
            "from": {"id": 42, "is_bot": false, "first_name": "Ann"},
            "chat": {"id": -100, "type": "group", "title": "Shop"},
            "caption": "look",
            "photo": [
                {"file_id": "small", "file_unique_id": "s", "width": 90, "height": 90},
                {"file_id": "big", "file_unique_id": "b", "width": 900, "height": 900, "file_size": 1234}
            ],
            "document": {"file_id": "doc1", "file_unique_id": "d", "file_name": "a.pdf", "mime_type": "application/pdf"}
        }});
        let m = to_inbound(&u).unwrap();
        assert_eq!(m.external_chat_id, "-100");
        assert_eq!(m.text, "look");
        assert_eq!(m.attachments.len(), 2);
        assert_eq!(m.attachments[0]["type"], "photo");
        assert_eq!(m.attachments[0]["file_id"], "big");
        assert_eq!(m.attachments[1]["file_name"], "a.pdf");

        let contact = |user_id: i64| {
            json!({"update_id": 12, "message": {
                "message_id": 7, "date": 1_700_000_000,
                "from": {"id": 42, "is_bot": false, "first_name": "Ann"},
                "chat": {"id": 42, "type": "private"},
                "contact": {"phone_number": "15550001111", "first_name": "Ann", "user_id": user_id}
            }})
        };
        let m = to_inbound(&contact(42)).unwrap();
        assert_eq!(m.sender.phone.as_deref(), Some("+15550001111"));
        assert_eq!(m.attachments[0]["type"], "contact");
        // Someone else's contact card is an attachment, not the sender's phone.
        let m = to_inbound(&contact(7)).unwrap();
        assert_eq!(m.sender.phone, None);

        for kind in ["voice", "video", "sticker"] {
            let u = json!({"update_id": 13, "message": {
                "message_id": 8, "date": 1, "from": {"id": 1, "first_name": "B"},
                "chat": {"id": 1}, kind: {"file_id": format!("{kind}-id"), "emoji": "x"}
            }});
            let m = to_inbound(&u).unwrap();
            assert_eq!(m.attachments[0]["type"], kind);
            assert_eq!(m.attachments[0]["file_id"], format!("{kind}-id"));
        }
    }

    #[test]
    fn replies_name_the_message_they_answer() {
        let u = json!({"update_id": 20, "message": {
            "message_id": 9, "date": 1, "from": {"id": 42, "first_name": "Ann"},
            "chat": {"id": 42}, "text": "yes, that one",
            "reply_to_message": {"message_id": 5, "date": 0, "chat": {"id": 42},
                                 "text": "which colour?"}
        }});
        let m = to_inbound(&u).unwrap();
        assert_eq!(
            m.attachments,
            vec![json!({"type": "reply", "external_message_id": "42:5", "text": "which colour?"})]
        );
        Event::Inbound(m).validate().unwrap();
    }

    #[test]
    fn skipped_updates() {
        let edit = json!({"update_id": 1, "edited_message": {}});
        assert_eq!(to_inbound(&edit).unwrap_err(), Skip::NotAMessage);
        let service = json!({"update_id": 2, "message": {
            "message_id": 1, "date": 1, "chat": {"id": 1}, "new_chat_members": []
        }});
        assert_eq!(to_inbound(&service).unwrap_err(), Skip::Empty);
        let broken = json!({"update_id": 3, "message": {"text": "no ids"}});
        assert!(matches!(to_inbound(&broken), Err(Skip::Malformed(_))));
        assert_eq!(update_id(&json!({})), None);
    }
}
