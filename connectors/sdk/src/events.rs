//! The JSON payloads that cross the boundary, as serde types shared by both sides: events
//! a plugin emits (`Event`), the message the host asks it to send (`Outbound`), its
//! answers (`Sent`, `Status`) and the error object (`ErrorBody`).
//!
//! Readers ignore unknown fields (so later revisions may add some); an unknown `"type"`
//! is an error. `Event::parse` is the host's gate for untrusted event bytes.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

/// Longest external id (chat or message) the host accepts, in bytes.
pub const MAX_EXTERNAL_ID_LEN: usize = 256;

/// Longest `number` of a status the host accepts, in characters: it is shown in every
/// channel list, so a runaway plugin must not fill the store through it.
pub const MAX_NUMBER_CHARS: usize = 256;

/// Longest `display_name` of a status the host accepts, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 256;

/// Longest `reason` (of a status or a receipt) the host accepts, in characters.
pub const MAX_REASON_CHARS: usize = 1024;

/// Longest `text` of an inbound message, in bytes. This and the other inbound bounds
/// below are the one set of limits the SDK, the host and the `inbound_message` job
/// validation share: an event inside them becomes a stored message.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Most attachments of one inbound message.
pub const MAX_ATTACHMENTS: usize = 64;

/// Largest `attachments` array of one inbound message, in bytes of compact JSON.
pub const MAX_ATTACHMENTS_BYTES: usize = 256 * 1024;

/// Longest field of an inbound `sender` (`id`, `phone`, `username`, `name`), in
/// characters.
pub const MAX_SENDER_FIELD_CHARS: usize = 256;

/// An event a plugin emits: `{"type":"status"|"inbound"|"receipt", ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Status(Status),
    Inbound(Inbound),
    Receipt(Receipt),
}

/// Connection state a connector reports. The host adds `suspended` and `removed` itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelState {
    Connecting,
    Connected,
    Disconnected,
    Error,
}

impl ChannelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelState::Connecting => "connecting",
            ChannelState::Connected => "connected",
            ChannelState::Disconnected => "disconnected",
            ChannelState::Error => "error",
        }
    }
}

/// `{"type":"status",...}`: both the status event and the answer of the `status` call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: ChannelState,
    /// The account's number (phone, bot name, ...) once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Why the state is what it is, for people (`error`/`disconnected` especially).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Free-form detail for operators (counters, last error); not interpreted by the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl Status {
    pub fn new(state: ChannelState) -> Self {
        Status {
            state,
            number: None,
            display_name: None,
            reason: None,
            details: None,
        }
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The bounds serde cannot express: `number`, `display_name` and `reason` are at
    /// most `MAX_NUMBER_CHARS`, `MAX_DISPLAY_NAME_CHARS` and `MAX_REASON_CHARS`.
    pub fn check(&self) -> Result<(), EventError> {
        bounded("status", "number", self.number.as_deref(), MAX_NUMBER_CHARS)?;
        bounded(
            "status",
            "display_name",
            self.display_name.as_deref(),
            MAX_DISPLAY_NAME_CHARS,
        )?;
        bounded("status", "reason", self.reason.as_deref(), MAX_REASON_CHARS)
    }
}

/// An optional plugin string of at most `max` characters.
fn bounded(
    kind: &'static str,
    name: &str,
    value: Option<&str>,
    max: usize,
) -> Result<(), EventError> {
    match value.map(|v| v.chars().count()) {
        Some(n) if n > max => Err(EventError::Invalid {
            kind,
            problem: format!("{name} must be at most {max} characters, got {n}"),
        }),
        _ => Ok(()),
    }
}

/// Who wrote an inbound message; at least one field must be set. The host finds the
/// client's contact by normalised `phone`, else by `id` on this channel, else by
/// `username`; a sender with only a `name` is stored in its chat's contact.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// The messenger's own stable user id (Telegram `from.id`, WhatsApp `wa_id`, a
    /// gateway's sender id), as a string. Header revision 1.2; older plugins omit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Sender {
    /// `check_sender` of this sender's fields.
    pub fn check(&self) -> Result<(), String> {
        check_sender(
            self.id.as_deref(),
            self.phone.as_deref(),
            self.username.as_deref(),
            self.name.as_deref(),
        )
    }
}

/// The checks the host makes of every inbound sender: at least one field set, none
/// empty (an empty id or username would make all such senders one contact), each at
/// most `MAX_SENDER_FIELD_CHARS`. The message says what is wrong.
pub fn check_sender(
    id: Option<&str>,
    phone: Option<&str>,
    username: Option<&str>,
    name: Option<&str>,
) -> Result<(), String> {
    let fields = [
        ("id", id),
        ("phone", phone),
        ("username", username),
        ("name", name),
    ];
    if fields.iter().all(|(_, v)| v.is_none()) {
        return Err("sender needs at least one of id, phone, username, name".into());
    }
    for (field, value) in fields {
        let Some(v) = value else { continue };
        if v.trim().is_empty() {
            return Err(format!(
                "sender.{field} must not be empty; leave it out instead"
            ));
        }
        let n = v.chars().count();
        if n > MAX_SENDER_FIELD_CHARS {
            return Err(format!(
                "sender.{field} must be at most {MAX_SENDER_FIELD_CHARS} characters, got {n}"
            ));
        }
    }
    Ok(())
}

/// The bounds on an inbound message's content that the SDK, the host and the job
/// validation share: text, attachments (count and bytes).
pub fn check_inbound_content(text: &str, attachments: &[serde_json::Value]) -> Result<(), String> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "text must be at most {MAX_TEXT_BYTES} bytes, got {}",
            text.len()
        ));
    }
    if attachments.len() > MAX_ATTACHMENTS {
        return Err(format!(
            "at most {MAX_ATTACHMENTS} attachments, got {}",
            attachments.len()
        ));
    }
    let bytes: usize = attachments
        .iter()
        .map(|a| serde_json::to_vec(a).map_or(0, |v| v.len()))
        .sum();
    if bytes > MAX_ATTACHMENTS_BYTES {
        return Err(format!(
            "attachments must be at most {MAX_ATTACHMENTS_BYTES} bytes of JSON, got {bytes}"
        ));
    }
    Ok(())
}

/// `{"type":"inbound",...}`: a message from a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inbound {
    pub external_chat_id: String,
    /// Unique and stable per channel: the host stores each id once.
    pub external_message_id: String,
    pub sender: Sender,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub attachments: Vec<serde_json::Value>,
    /// RFC 3339.
    pub sent_at: DateTime<FixedOffset>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    Delivered,
    Failed,
    Read,
}

impl Inbound {
    /// The sender and content bounds (`Sender::check`, `check_inbound_content`).
    pub fn check_content(&self) -> Result<(), String> {
        self.sender.check()?;
        check_inbound_content(&self.text, &self.attachments)
    }
}

/// `{"type":"receipt",...}`: what became of a message the host sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The host's message id, from `Outbound::message`.
    pub message: i64,
    pub status: ReceiptStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where an outbound message goes, besides `external_chat_id`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
}

/// The message the host asks a plugin to send (`{"type":"send",...}` on the wire).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outbound {
    /// The host's message id; echo it in receipts.
    pub message: i64,
    /// Empty for a chat the host created by phone that has not been seen on the wire yet.
    #[serde(default)]
    pub external_chat_id: String,
    #[serde(default)]
    pub to: Recipient,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub attachments: Vec<serde_json::Value>,
}

/// A successful send (`{"type":"sent",...}` on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub external_message_id: String,
}

/// `{"type":"error","code":...,"message":...,"retryable":...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub retryable: bool,
}

/// Host → plugin messages, tagged by `"type"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Request {
    Send(Outbound),
}

/// Plugin → host call results, tagged by `"type"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Reply {
    Sent(Sent),
    Status(Status),
    Error(ErrorBody),
}

/// Why event bytes were rejected; `Display` is a log line a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("invalid event JSON ({source}): {snippet}")]
    Json {
        source: serde_json::Error,
        snippet: String,
    },
    #[error("invalid {kind} event: {problem}")]
    Invalid { kind: &'static str, problem: String },
    #[error("invalid event: {0}")]
    TooDeep(#[from] crate::json_limits::TooDeep),
}

impl Event {
    /// Parses and checks untrusted event bytes from a plugin.
    pub fn parse(bytes: &[u8]) -> Result<Event, EventError> {
        // Before the parser recurses: a deeper event would be legal here but too deep
        // for the queue's stored job (json_limits).
        crate::json_limits::check_depth(bytes, crate::json_limits::MAX_JSON_DEPTH)?;
        let event: Event = serde_json::from_slice(bytes).map_err(|source| EventError::Json {
            source,
            snippet: snippet(bytes),
        })?;
        event.validate()?;
        Ok(event)
    }

    /// The checks serde cannot express: non-empty, bounded ids; a sender; bounded
    /// number, display name, reasons, sender fields, text and attachments.
    pub fn validate(&self) -> Result<(), EventError> {
        fn id(kind: &'static str, name: &str, value: &str) -> Result<(), EventError> {
            if value.is_empty() || value.len() > MAX_EXTERNAL_ID_LEN {
                return Err(EventError::Invalid {
                    kind,
                    problem: format!(
                        "{name} must be 1..={MAX_EXTERNAL_ID_LEN} bytes, got {}",
                        value.len()
                    ),
                });
            }
            Ok(())
        }
        match self {
            Event::Status(s) => s.check(),
            Event::Inbound(m) => {
                id("inbound", "external_chat_id", &m.external_chat_id)?;
                id("inbound", "external_message_id", &m.external_message_id)?;
                m.check_content().map_err(|problem| EventError::Invalid {
                    kind: "inbound",
                    problem,
                })
            }
            Event::Receipt(r) => {
                if let Some(x) = &r.external_message_id {
                    id("receipt", "external_message_id", x)?;
                }
                bounded("receipt", "reason", r.reason.as_deref(), MAX_REASON_CHARS)
            }
        }
    }
}

/// The start of untrusted bytes, printable, for error messages.
pub(crate) fn snippet(bytes: &[u8]) -> String {
    const MAX: usize = 120;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    if bytes.len() > MAX {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inbound_round_trips_with_type_tag() {
        let raw = json!({
            "type": "inbound", "external_chat_id": "c1", "external_message_id": "m1",
            "sender": {"phone": "+15550001234"}, "text": "hi", "attachments": [],
            "sent_at": "2026-11-25T10:00:00Z", "future_field": 1
        });
        let ev = Event::parse(raw.to_string().as_bytes()).unwrap();
        let Event::Inbound(m) = &ev else {
            panic!("{ev:?}")
        };
        assert_eq!(m.sender.phone.as_deref(), Some("+15550001234"));
        let back = serde_json::to_value(&ev).unwrap();
        assert_eq!(back["type"], "inbound");
        assert_eq!(back["sent_at"], "2026-11-25T10:00:00Z");
    }

    #[test]
    fn rejects_bad_events_with_clear_messages() {
        let bad: &[&[u8]] = &[
            b"{not json",
            br#"{"type":"bogus"}"#,
            br#"{"type":"inbound"}"#,
            br#"{"no_type":1}"#,
            b"\xff\xfe",
            br#"{"type":"receipt","message":1,"status":"lost"}"#,
        ];
        for b in bad {
            let e = Event::parse(b).unwrap_err();
            assert!(e.to_string().starts_with("invalid event JSON"), "{e}");
        }
        let no_sender = json!({
            "type": "inbound", "external_chat_id": "c", "external_message_id": "m",
            "sender": {}, "sent_at": "2026-11-25T10:00:00Z"
        });
        let e = Event::parse(no_sender.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("sender"), "{e}");
        let empty_id = json!({
            "type": "inbound", "external_chat_id": "", "external_message_id": "m",
            "sender": {"name": "x"}, "sent_at": "2026-11-25T10:00:00Z"
        });
        assert!(Event::parse(empty_id.to_string().as_bytes()).is_err());
    }

    #[test]
    fn status_and_receipt_shapes() {
        let s = Event::Status(Status {
            number: Some("+1".into()),
            ..Status::new(ChannelState::Connected)
        });
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"type":"status","state":"connected","number":"+1"})
        );
        let r: Event =
            serde_json::from_str(r#"{"type":"receipt","message":7,"status":"read"}"#).unwrap();
        assert!(matches!(r, Event::Receipt(Receipt { message: 7, .. })));
    }

    #[test]
    fn over_long_strings_are_malformed() {
        let status = |field: &str, n: usize| {
            let mut v = json!({"type": "status", "state": "error"});
            v[field] = json!("é".repeat(n));
            Event::parse(v.to_string().as_bytes())
        };
        // Characters, not bytes: "é" is two bytes.
        for (field, max) in [
            ("number", MAX_NUMBER_CHARS),
            ("display_name", MAX_DISPLAY_NAME_CHARS),
            ("reason", MAX_REASON_CHARS),
        ] {
            status(field, max).unwrap();
            let e = status(field, max + 1).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("{field} must be at most {max} characters")),
                "{e}"
            );
        }
        let receipt = |n: usize| {
            let v = json!({"type": "receipt", "message": 1, "status": "failed", "reason": "x".repeat(n)});
            Event::parse(v.to_string().as_bytes())
        };
        receipt(MAX_REASON_CHARS).unwrap();
        assert!(receipt(MAX_REASON_CHARS + 1).is_err());
    }

    #[test]
    fn inbound_bounds_are_shared_and_explained() {
        let inbound = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = json!({
                "type": "inbound", "external_chat_id": "c", "external_message_id": "m",
                "sender": {"id": "43"}, "text": "hi", "sent_at": "2026-11-25T10:00:00Z"
            });
            f(&mut v);
            Event::parse(v.to_string().as_bytes()).map_err(|e| e.to_string())
        };
        // The messenger's id alone, or a name alone, is a sender.
        assert!(inbound(&|_| {}).is_ok());
        assert!(inbound(&|v| v["sender"] = json!({"name": "Bob"})).is_ok());
        type Edit<'a> = &'a dyn Fn(&mut serde_json::Value);
        let cases: [(Edit, &str); 6] = [
            (
                &|v| v["sender"] = json!({"id": " "}),
                "sender.id must not be empty",
            ),
            (
                &|v| v["sender"] = json!({"name": "x".repeat(MAX_SENDER_FIELD_CHARS + 1)}),
                "sender.name must be at most 256 characters",
            ),
            (
                &|v| v["text"] = json!("x".repeat(MAX_TEXT_BYTES + 1)),
                "text must be at most 65536 bytes",
            ),
            (
                &|v| v["attachments"] = json!(vec![json!({}); MAX_ATTACHMENTS + 1]),
                "at most 64 attachments",
            ),
            (
                &|v| v["attachments"] = json!(["x".repeat(MAX_ATTACHMENTS_BYTES)]),
                "attachments must be at most 262144 bytes",
            ),
            (
                &|v| {
                    let deep: serde_json::Value =
                        serde_json::from_str(&format!("{}{}", "[".repeat(31), "]".repeat(31)))
                            .unwrap();
                    v["attachments"] = json!([deep]);
                },
                "nested deeper than 32",
            ),
        ];
        for (case, expected) in cases {
            let e = inbound(case).unwrap_err();
            assert!(e.contains(expected), "{e} lacks {expected}");
        }
        // At the depth bound: the event object, its array, and 30 more levels.
        assert!(
            inbound(&|v| {
                let deep: serde_json::Value =
                    serde_json::from_str(&format!("{}{}", "[".repeat(30), "]".repeat(30))).unwrap();
                v["attachments"] = json!([deep]);
            })
            .is_ok()
        );
    }

    #[test]
    fn snippet_is_bounded_and_printable() {
        let s = snippet(&[b'a'; 500]);
        assert_eq!(s.chars().count(), 121);
        assert_eq!(snippet(b"a\nb"), "a.b");
    }
}
