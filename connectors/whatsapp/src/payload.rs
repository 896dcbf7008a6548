//! The webhook notification as Meta sends it (`object: whatsapp_business_account`,
//! `entry[].changes[].value`), as serde types. Unknown fields are ignored; messages
//! stay raw JSON beside their common fields, so no message type is lost to parsing.
//! A change's parts (metadata, each message, each status) are read one by one, so
//! one unreadable item never hides its neighbours.

use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
pub struct Notification {
    pub object: String,
    #[serde(default)]
    pub entry: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
pub struct Entry {
    /// The WhatsApp Business Account id.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub changes: Vec<Change>,
}

#[derive(Debug, Deserialize)]
pub struct Change {
    #[serde(default)]
    pub field: String,
    /// Parsed as `ChangeValue` only for `field: "messages"`.
    #[serde(default)]
    pub value: Value,
}

#[derive(Debug, Default, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub display_phone_number: Option<String>,
    pub phone_number_id: String,
}

#[derive(Debug, Deserialize)]
pub struct Contact {
    #[serde(default)]
    pub profile: Option<Profile>,
    #[serde(default)]
    pub wa_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Profile {
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Context {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
}

/// One message from a customer: the common fields, the rest (the object named by
/// `type`) kept raw.
#[derive(Debug, Deserialize)]
pub struct Message {
    pub from: String,
    pub id: String,
    /// Unix seconds, as a string.
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub context: Option<Context>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `statuses[]`: what became of a message the business sent.
#[derive(Debug, Deserialize)]
pub struct MessageStatus {
    /// The wamid of the sent message.
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub recipient_id: Option<String>,
    /// Echoed from the send request; names the host's message id.
    #[serde(default)]
    pub biz_opaque_callback_data: Option<String>,
    #[serde(default)]
    pub errors: Vec<GraphError>,
}

/// An error object as webhooks (`value.errors`, `statuses[].errors`) and Graph API
/// answers (`error`) carry it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct GraphError {
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub error_data: Option<ErrorData>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ErrorData {
    #[serde(default)]
    pub details: Option<String>,
}

impl GraphError {
    /// `title: details (code N)`, for logs and reasons.
    pub fn describe(&self) -> String {
        let title = self
            .title
            .as_deref()
            .or(self.message.as_deref())
            .unwrap_or("error");
        let details = self.error_data.as_ref().and_then(|d| d.details.as_deref());
        let mut s = title.to_owned();
        if let Some(d) = details.filter(|d| *d != title) {
            s.push_str(": ");
            s.push_str(d);
        }
        if let Some(code) = self.code {
            s.push_str(&format!(" (code {code})"));
        }
        s.chars().take(500).collect()
    }
}
