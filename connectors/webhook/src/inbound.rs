//! Inbound: one POST on the channel's path, once the SDK listener has bounded its
//! connection, time and size. Checked in this order — signature (before anything is
//! parsed), JSON nesting, the message — then emitted, and answered 200 only once the
//! host's flush confirmed it durable, so a gateway that gets anything else retries.

use std::time::Duration;

use patchbay_connector_sdk::chrono::{DateTime, FixedOffset, Utc};
use patchbay_connector_sdk::json_limits::{MAX_JSON_DEPTH, check_depth};
use patchbay_connector_sdk::runtime::http::{self, HttpRequest, HttpResponse};
use patchbay_connector_sdk::runtime::{self};
use patchbay_connector_sdk::{EmitError, Event, FlushError, Inbound, Level, Sender};
use serde::Deserialize;
use serde_json::json;

use crate::config::Config;
use crate::hook::Hook;
use crate::signature::{self, SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// How long an inbound request waits for a busy host before answering 503.
pub const EMIT_WAIT: Duration = Duration::from_secs(2);
/// How long an inbound request waits for the host to record its message durably
/// before answering 503 (nothing is lost: the gateway sends it again).
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The inbound JSON body. Unknown fields are ignored, so gateways may send more.
#[derive(Debug, Deserialize)]
struct WireInbound {
    external_chat_id: String,
    external_message_id: String,
    sender: Sender,
    #[serde(default)]
    text: String,
    #[serde(default)]
    attachments: Vec<serde_json::Value>,
    #[serde(default)]
    sent_at: Option<DateTime<FixedOffset>>,
}

/// Why an inbound request was refused: the HTTP status and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Rejection {
    pub status: u16,
    pub message: String,
}

impl Rejection {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Rejection {
            status,
            message: message.into(),
        }
    }
}

/// Authenticates and parses a body: 401 for a missing, wrong or stale signature (stale
/// is 401 rather than 408 because it is an authentication failure, not a slow client),
/// 400 for JSON that is not a valid message or nests deeper than `MAX_JSON_DEPTH`
/// (measured before parsing; the event keeps the body's nesting, which the host bounds
/// the same way).
pub fn check_body(
    config: &Config,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<Inbound, Rejection> {
    signature::verify(
        config.secret.as_bytes(),
        timestamp,
        signature,
        body,
        now,
        config.max_skew_secs,
    )
    .map_err(|e| Rejection::new(401, e.to_string()))?;
    check_depth(body, MAX_JSON_DEPTH).map_err(|e| {
        Rejection::new(
            400,
            format!("invalid message JSON: {e}; send attachments with less nesting"),
        )
    })?;
    let wire: WireInbound = serde_json::from_slice(body)
        .map_err(|e| Rejection::new(400, format!("invalid message JSON: {e}")))?;
    let msg = Inbound {
        external_chat_id: wire.external_chat_id,
        external_message_id: wire.external_message_id,
        sender: wire.sender,
        text: wire.text,
        attachments: wire.attachments,
        sent_at: wire.sent_at.unwrap_or_else(|| Utc::now().fixed_offset()),
    };
    let event = Event::Inbound(msg);
    event
        .validate()
        .map_err(|e| Rejection::new(400, e.to_string()))?;
    match event {
        Event::Inbound(m) => Ok(m),
        // validate() keeps the variant; this arm only satisfies the match.
        _ => Err(Rejection::new(500, "internal error")),
    }
}

/// Answers one POST routed to this channel: every path ends in exactly one response.
pub async fn handle(hook: &Hook, req: HttpRequest) -> HttpResponse {
    let checked = check_body(
        &hook.config,
        req.header(TIMESTAMP_HEADER),
        req.header(SIGNATURE_HEADER),
        &req.body,
        Utc::now().timestamp(),
    );
    let msg = match checked {
        Ok(m) => m,
        Err(r) => {
            hook.count("rejected");
            hook.host().log(
                Level::Debug,
                &format!("webhook: refused {} {}: {r}", req.method, req.uri),
            );
            return http::respond(r.status, &json!({"ok": false, "error": r.message}), None);
        }
    };
    let id = msg.external_message_id.clone();
    if let Err(e) = hook.emit_for(&Event::Inbound(msg), EMIT_WAIT).await {
        if e == EmitError::TooLarge {
            return http::respond(
                413,
                &json!({"ok": false, "error": "message too large for the host"}),
                None,
            );
        }
        // Busy: the daemon is behind; Closed: the channel is stopping. Either way
        // nothing was taken and the gateway should try again shortly.
        hook.count("busy");
        let retry = if e == EmitError::Busy { 1 } else { 5 };
        return http::respond(
            503,
            &json!({"ok": false, "error": e.to_string()}),
            Some(retry),
        );
    }
    // 200 promises the gateway it may forget the message: only once it is durable.
    match runtime::flush(hook.host(), FLUSH_WAIT).await {
        // A host older than flush offers nothing better than emit.
        Ok(()) | Err(FlushError::Unsupported) => {
            hook.count("accepted");
            http::respond(200, &json!({"ok": true, "external_message_id": id}), None)
        }
        Err(e) => {
            hook.count("busy");
            let retry = if e == FlushError::Timeout { 1 } else { 5 };
            http::respond(
                503,
                &json!({"ok": false, "error": format!("{e}; send it again")}),
                Some(retry),
            )
        }
    }
}
