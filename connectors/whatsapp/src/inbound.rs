//! A verified webhook body → the events of each channel it names: every `entry` and
//! every `change`, grouped by `value.metadata.phone_number_id`. Messages become
//! inbound events (every type: the known ones as text and typed attachments, any other
//! as an `unsupported` attachment naming the raw type); `statuses[]` become receipts;
//! `value.errors` are returned for the log.

use std::collections::BTreeMap;

use patchbay_connector_sdk::chrono::{DateTime, Utc};
use patchbay_connector_sdk::json_limits::{MAX_JSON_DEPTH, check_depth};
use patchbay_connector_sdk::{Event, Inbound, Receipt, ReceiptStatus, Sender};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::graph;
use crate::payload::{Contact, GraphError, Message, MessageStatus, Metadata, Notification};

/// What the send request's `biz_opaque_callback_data` starts with; the host's message
/// id follows, so a status names its message without any state in the connector.
pub const CALLBACK_PREFIX: &str = "patchbay:";

/// The events of one webhook body.
#[derive(Debug, Default)]
pub struct Parsed {
    /// By phone_number_id, in the body's order.
    pub routes: BTreeMap<String, Vec<Event>>,
    /// Lines for the operator's log (info): ignored fields, statuses that name no
    /// patchbay message.
    pub notes: Vec<String>,
    /// Lines for the log at warn: `value.errors`, unreadable messages and statuses.
    pub warnings: Vec<String>,
    /// `messages` changes whose metadata is unreadable, so no channel can be named:
    /// the webhook answers 503 for them after storing the rest.
    pub unroutable: usize,
}

impl Parsed {
    pub fn events(&self) -> usize {
        self.routes.values().map(Vec::len).sum()
    }
}

/// Why a verified body was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// Parses a body whose signature has been checked.
pub fn parse(body: &[u8]) -> Result<Parsed, BodyError> {
    check_depth(body, MAX_JSON_DEPTH).map_err(|e| BodyError(format!("invalid JSON: {e}")))?;
    let n: Notification =
        serde_json::from_slice(body).map_err(|e| BodyError(format!("invalid JSON: {e}")))?;
    let mut out = Parsed::default();
    // Another product's notification on a shared callback URL: acknowledged (a 400
    // would make Meta retry it for days), noted.
    if n.object != "whatsapp_business_account" {
        out.notes.push(format!(
            "ignoring a notification for object {:?} (only \"whatsapp_business_account\" is handled)",
            n.object
        ));
        return Ok(out);
    }
    for entry in n.entry {
        for change in entry.changes {
            if change.field != "messages" {
                out.notes.push(format!(
                    "ignoring a {:?} change (only \"messages\" is handled)",
                    change.field
                ));
                continue;
            }
            change_events(&change.value, &mut out);
        }
    }
    Ok(out)
}

/// How much of an unreadable item's JSON is kept (in events and log lines).
pub const MAX_RAW: usize = 4096;

/// `v` as JSON, cut to `MAX_RAW` bytes (on a char boundary).
pub fn bounded_raw(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > MAX_RAW {
        let mut end = MAX_RAW;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The array under `key`; absent or not an array is empty.
fn items<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn change_events(value: &Value, out: &mut Parsed) {
    let metadata = value
        .get("metadata")
        .ok_or_else(|| "no metadata".to_owned())
        .and_then(|m| Metadata::deserialize(m).map_err(|e| e.to_string()));
    let number = match metadata {
        Ok(m) => m.phone_number_id,
        Err(e) => {
            out.unroutable += 1;
            out.warnings.push(format!(
                "a messages change with unreadable metadata ({e}), not acknowledged: {}",
                bounded_raw(value)
            ));
            return;
        }
    };
    for e in items(value, "errors") {
        let e = GraphError::deserialize(e).unwrap_or_default();
        out.warnings
            .push(format!("number {number}: webhook error {}", e.describe()));
    }
    // A contact that does not parse only costs the sender's name.
    let contacts: Vec<Contact> = items(value, "contacts")
        .iter()
        .filter_map(|c| Contact::deserialize(c).ok())
        .collect();
    let mut events = Vec::new();
    for raw in items(value, "messages") {
        let inbound = match Message::deserialize(raw) {
            Ok(m) => to_inbound(&m, &contacts),
            Err(e) => {
                out.warnings.push(format!(
                    "number {number}: an unreadable message ({e}) stored as unsupported: {}",
                    bounded_raw(raw)
                ));
                unreadable_inbound(raw, &contacts)
            }
        };
        events.push(Event::Inbound(inbound));
    }
    for raw in items(value, "statuses") {
        match MessageStatus::deserialize(raw) {
            Ok(s) => match to_receipt(&s) {
                Ok(Some(r)) => events.push(Event::Receipt(r)),
                Ok(None) => {}
                Err(note) => out.notes.push(format!("number {number}: {note}")),
            },
            // No message id to attach a receipt to: the log is all there is.
            Err(e) => out.warnings.push(format!(
                "number {number}: skipping an unreadable status ({e}): {}",
                bounded_raw(raw)
            )),
        }
    }
    if !events.is_empty() {
        out.routes.entry(number).or_default().extend(events);
    }
}

/// An inbound event too large for the host, cut down: its text to 4096 chars and its
/// attachments to one `unsupported` attachment with their bounded JSON. `None` for a
/// receipt (always small).
pub fn shrunk(event: &Event) -> Option<Event> {
    let Event::Inbound(m) = event else {
        return None;
    };
    let mut m = m.clone();
    m.text = m.text.chars().take(4096).collect();
    let raw = bounded_raw(&Value::Array(std::mem::take(&mut m.attachments)));
    m.attachments = vec![json!({"type": "unsupported", "raw_type": "too_large", "raw": raw})];
    m.sender.name = m.sender.name.map(|n| n.chars().take(256).collect());
    Some(Event::Inbound(m))
}

/// A message that does not fit `Message`, kept as an `unsupported` attachment with
/// its raw JSON (bounded). Without a readable id, the id is derived from the raw JSON,
/// so a redelivery of the same bytes is still stored once.
fn unreadable_inbound(raw: &Value, contacts: &[Contact]) -> Inbound {
    let from = str_of(raw, "from").unwrap_or("unknown").to_owned();
    let raw_json = bounded_raw(raw);
    let id = str_of(raw, "id").map(str::to_owned).unwrap_or_else(|| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.to_string().hash(&mut h);
        format!("unreadable:{:016x}", h.finish())
    });
    let mut u = Map::new();
    u.insert("type".into(), "unsupported".into());
    if let Some(kind) = str_of(raw, "type") {
        u.insert("raw_type".into(), kind.into());
    }
    u.insert("raw".into(), raw_json.into());
    Inbound {
        external_chat_id: from.clone(),
        external_message_id: id,
        sender: sender(&from, contacts),
        text: String::new(),
        attachments: vec![Value::Object(u)],
        sent_at: sent_at(str_of(raw, "timestamp")),
    }
}

/// A wa_id ("16505551234") as E.164 ("+16505551234"); `None` without digits.
pub fn e164(wa_id: &str) -> Option<String> {
    let digits: String = wa_id.chars().filter(char::is_ascii_digit).collect();
    (!digits.is_empty() && digits.len() <= 15).then(|| format!("+{digits}"))
}

fn sender(from: &str, contacts: &[Contact]) -> Sender {
    // The contact whose wa_id is the sender's; a one-contact change names it alone.
    let contact = contacts
        .iter()
        .find(|c| c.wa_id.as_deref() == Some(from))
        .or_else(|| (contacts.len() == 1).then(|| &contacts[0]));
    let name = contact
        .and_then(|c| c.profile.as_ref())
        .and_then(|p| p.name.as_deref())
        .map(|n| n.trim().chars().take(256).collect::<String>())
        .filter(|n| !n.is_empty());
    Sender {
        id: Some(from.to_owned()).filter(|f| !f.trim().is_empty()),
        phone: e164(from),
        username: None,
        name,
    }
}

fn sent_at(
    timestamp: Option<&str>,
) -> patchbay_connector_sdk::chrono::DateTime<patchbay_connector_sdk::chrono::FixedOffset> {
    timestamp
        .and_then(|t| t.trim().parse::<i64>().ok())
        .and_then(|secs| DateTime::<Utc>::from_timestamp(secs, 0))
        .unwrap_or_else(Utc::now)
        .fixed_offset()
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Copies `keys` of `from` that are present into `to`.
fn copy(to: &mut Map<String, Value>, from: &Value, keys: &[&str]) {
    for k in keys {
        if let Some(v) = from.get(*k).filter(|v| !v.is_null()) {
            to.insert((*k).into(), v.clone());
        }
    }
}

/// Media types: the object under the type's name has the media id and metadata.
const MEDIA: &[&str] = &["image", "audio", "video", "document", "sticker"];

/// The text and attachments of one message, by type.
fn content(m: &Message) -> (String, Vec<Value>) {
    let body = m.rest.get(&m.kind).cloned().unwrap_or(Value::Null);
    let mut text = String::new();
    let mut attachments = Vec::new();
    let mut a = Map::new();
    a.insert("type".into(), m.kind.clone().into());
    match m.kind.as_str() {
        "text" => text = str_of(&body, "body").unwrap_or_default().to_owned(),
        kind if MEDIA.contains(&kind) => {
            if let Some(id) = body.get("id") {
                a.insert("media_id".into(), id.clone());
            }
            copy(
                &mut a,
                &body,
                &[
                    "mime_type",
                    "sha256",
                    "caption",
                    "filename",
                    "animated",
                    "voice",
                ],
            );
            text = str_of(&body, "caption").unwrap_or_default().to_owned();
            attachments.push(Value::Object(a));
        }
        "location" => {
            copy(
                &mut a,
                &body,
                &["latitude", "longitude", "name", "address", "url"],
            );
            attachments.push(Value::Object(a));
        }
        "contacts" => {
            // `contacts` is an array of vCard-like objects: kept as WhatsApp gives it.
            a.insert(
                "contacts".into(),
                m.rest.get("contacts").cloned().unwrap_or(json!([])),
            );
            attachments.push(Value::Object(a));
        }
        "interactive" => {
            // button_reply / list_reply {id, title, description?}; nfm_reply (flows).
            let kind = str_of(&body, "type").unwrap_or("unknown").to_owned();
            let reply = body.get(&kind).cloned().unwrap_or(Value::Null);
            a.insert("kind".into(), kind.clone().into());
            copy(
                &mut a,
                &reply,
                &["id", "title", "description", "response_json", "name"],
            );
            text = str_of(&reply, "title").unwrap_or_default().to_owned();
            attachments.push(Value::Object(a));
        }
        "button" => {
            // A template's quick-reply button.
            copy(&mut a, &body, &["payload", "text"]);
            text = str_of(&body, "text").unwrap_or_default().to_owned();
            attachments.push(Value::Object(a));
        }
        "reaction" => {
            // An empty emoji removes the reaction.
            if let Some(id) = str_of(&body, "message_id") {
                a.insert("external_message_id".into(), id.into());
            }
            copy(&mut a, &body, &["emoji"]);
            text = str_of(&body, "emoji").unwrap_or_default().to_owned();
            attachments.push(Value::Object(a));
        }
        raw => {
            // Never dropped: an operator sees that something arrived and what.
            let mut u = Map::new();
            u.insert("type".into(), "unsupported".into());
            u.insert("raw_type".into(), raw.into());
            if let Some(errors) = m.rest.get("errors") {
                u.insert("errors".into(), errors.clone());
            }
            if !body.is_null() {
                u.insert("raw".into(), body);
            }
            attachments.push(Value::Object(u));
        }
    }
    (text, attachments)
}

/// One customer message as an inbound event. The chat is the customer's wa_id; the
/// message id is the wamid, which WhatsApp repeats on a re-delivery.
pub fn to_inbound(m: &Message, contacts: &[Contact]) -> Inbound {
    let (text, mut attachments) = content(m);
    if let Some(id) = m.context.as_ref().and_then(|c| c.id.as_deref()) {
        let mut reply = json!({"type": "reply", "external_message_id": id});
        if let (Some(from), Some(o)) = (
            m.context.as_ref().and_then(|c| c.from.as_deref()),
            reply.as_object_mut(),
        ) {
            o.insert("from".into(), from.into());
        }
        attachments.push(reply);
    }
    Inbound {
        external_chat_id: m.from.clone(),
        external_message_id: m.id.clone(),
        sender: sender(&m.from, contacts),
        text,
        attachments,
        sent_at: sent_at(m.timestamp.as_deref()),
    }
}

/// A status as a receipt: `delivered`, `read`, `failed` (with a reason a person
/// understands). `sent` is what the send already recorded, so `None`; so is a status
/// of a message patchbay did not send (no callback data of ours). `Err` is a note.
pub fn to_receipt(s: &MessageStatus) -> Result<Option<Receipt>, String> {
    let status = match s.status.as_str() {
        "delivered" => ReceiptStatus::Delivered,
        "read" => ReceiptStatus::Read,
        "failed" => ReceiptStatus::Failed,
        "sent" => return Ok(None),
        other => return Err(format!("ignoring status {other:?} of {}", s.id)),
    };
    let Some(message) = s
        .biz_opaque_callback_data
        .as_deref()
        .and_then(|d| d.strip_prefix(CALLBACK_PREFIX))
        .and_then(|id| id.parse::<i64>().ok())
    else {
        return Err(format!(
            "status {:?} of {} names no patchbay message (sent by another application?)",
            s.status, s.id
        ));
    };
    let reason = (status == ReceiptStatus::Failed).then(|| {
        s.errors
            .first()
            .map(graph::failure_reason)
            .unwrap_or_else(|| "WhatsApp reported the message failed".into())
    });
    Ok(Some(Receipt {
        message,
        status,
        external_message_id: Some(s.id.clone()),
        reason,
    }))
}
