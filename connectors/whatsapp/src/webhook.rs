//! Answering one webhook request for the channels on its path (the SDK listener has
//! bounded its size and time already): the GET verification handshake, and a POST
//! checked in this order — `X-Hub-Signature-256` against the app secret of the channels
//! on that path (before anything is parsed), the JSON, then each change routed to the
//! channel of its phone_number_id. 200 only once every
//! channel involved has flushed its events to the host, so anything else makes Meta
//! deliver the notification again (it is stored once).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use patchbay_connector_sdk::runtime::http::HttpRequest;
use patchbay_connector_sdk::runtime::http_body_util::Full;
use patchbay_connector_sdk::runtime::hyper::body::Bytes;
use patchbay_connector_sdk::runtime::hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use patchbay_connector_sdk::runtime::hyper::{Method, Response, StatusCode};
use patchbay_connector_sdk::runtime::tokio;
use patchbay_connector_sdk::{EmitError, Event, FlushError, Level};
use serde_json::json;

use crate::channel::Channel;
use crate::inbound;
use patchbay_connector_sdk::runtime::signature::{self, HmacError};

/// Meta's signature header: `sha256=<hex HMAC-SHA256(raw body, app_secret)>`.
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

/// Whether two secrets are equal, in time independent of where they differ: the
/// given one is checked as a MAC of a fixed message under the expected one.
pub(crate) fn same_secret(given: &str, expected: &str) -> bool {
    const MESSAGE: &[u8] = b"patchbay-whatsapp-verify-token";
    let tag = signature::sign(given.as_bytes(), &[MESSAGE]);
    signature::verify(expected.as_bytes(), &[MESSAGE], Some(&tag)).is_ok()
}

/// How long a request waits for a busy host before answering 503.
const EMIT_WAIT: Duration = Duration::from_secs(2);
/// How long a request waits for the host to record its events durably.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// The deadline of one POST's whole handling (each event may wait `EMIT_WAIT`, each
/// flush `FLUSH_WAIT`); past it, 503.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Longest `hub.challenge` echoed.
const MAX_CHALLENGE: usize = 256;

fn respond(status: u16, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn refuse(status: u16, message: &str) -> Response<Full<Bytes>> {
    respond(
        status,
        json!({"ok": false, "error": message}).to_string(),
        "application/json",
    )
}

fn busy(message: &str) -> Response<Full<Bytes>> {
    let mut r = refuse(503, message);
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(5u32));
    r
}

/// The GET handshake Meta makes when the webhook URL is registered: echo
/// `hub.challenge` if `hub.mode=subscribe` and `hub.verify_token` is one of the
/// channels' verify tokens (compared in constant time), else 403.
pub fn handshake(query: Option<&str>, channels: &[Arc<Channel>]) -> Response<Full<Bytes>> {
    let url = reqwest::Url::parse(&format!("http://x/?{}", query.unwrap_or_default()));
    let (mut mode, mut token, mut challenge) = (None, None, None);
    if let Ok(url) = &url {
        for (k, v) in url.query_pairs() {
            match &*k {
                "hub.mode" => mode = Some(v.into_owned()),
                "hub.verify_token" => token = Some(v.into_owned()),
                "hub.challenge" => challenge = Some(v.into_owned()),
                _ => {}
            }
        }
    }
    let token_ok = token.as_deref().is_some_and(|t| {
        // Every channel is tried, so the time does not tell which one matched.
        channels
            .iter()
            .filter(|c| same_secret(t, &c.config.verify_token))
            .count()
            > 0
    });
    match challenge {
        Some(ch)
            if mode.as_deref() == Some("subscribe")
                && token_ok
                && !ch.is_empty()
                && ch.len() <= MAX_CHALLENGE =>
        {
            respond(200, ch, "text/plain")
        }
        _ => refuse(
            403,
            "verification failed: wrong hub.mode, hub.verify_token or hub.challenge",
        ),
    }
}

/// Answers one request (its body read within the bounds) for the `channels` that share
/// its listener and path.
pub async fn handle(channels: &[Arc<Channel>], req: HttpRequest) -> Response<Full<Bytes>> {
    if channels.is_empty() {
        return busy("no whatsapp channel is running here yet; deliver again later");
    }
    if req.method == Method::GET {
        return handshake(req.query(), channels);
    }
    let reject = |status: u16, message: &str| {
        for c in channels {
            c.counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        channels[0].host.log(
            Level::Debug,
            &format!("whatsapp: refused a webhook POST with {status}: {message}"),
        );
        refuse(status, message)
    };
    let header = req.header(SIGNATURE_HEADER);
    if header.is_none() {
        return reject(401, "missing X-Hub-Signature-256 header");
    }
    let body = &req.body;
    // Authenticated before parsing: only the channels whose app secret signed it.
    let mut signed: Vec<&Arc<Channel>> = Vec::new();
    for c in channels {
        match signature::verify(c.config.app_secret.as_bytes(), &[body], header) {
            Ok(()) => signed.push(c),
            Err(HmacError::Mismatch) => {}
            Err(e) => return reject(403, &format!("X-Hub-Signature-256: {e}")),
        }
    }
    if signed.is_empty() {
        return reject(
            403,
            "X-Hub-Signature-256 does not match the body (is app_secret the app's secret?)",
        );
    }
    let parsed = match inbound::parse(body) {
        Ok(p) => p,
        Err(e) => return reject(400, &e.0),
    };
    for note in &parsed.notes {
        signed[0]
            .host
            .log(Level::Info, &format!("whatsapp: {note}"));
    }
    for warning in &parsed.warnings {
        signed[0]
            .host
            .log(Level::Warn, &format!("whatsapp: {warning}"));
    }
    // The served numbers' parts are stored first; the rest is answered 503 afterwards,
    // and the redelivery's served part is stored once (one per channel and external id).
    let mut routed: BTreeMap<String, (&Arc<Channel>, &Vec<Event>)> = BTreeMap::new();
    let mut unserved: Vec<&str> = Vec::new();
    for (number, events) in &parsed.routes {
        match signed.iter().find(|c| c.config.phone_number_id == *number) {
            Some(c) => {
                routed.insert(number.clone(), (c, events));
            }
            // Not running here (restarting, or not configured yet): Meta delivers it
            // again.
            None => unserved.push(number),
        }
    }
    // One deadline for the whole handling: past it nothing is acknowledged.
    match tokio::time::timeout(REQUEST_DEADLINE, store(&routed)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return busy(&format!("{e}; deliver again later")),
        Err(_) => return busy("the daemon did not store the events in time; deliver again later"),
    }
    if let Some(number) = unserved.first() {
        return busy(&format!(
            "no running channel here serves phone_number_id {number}; deliver again later"
        ));
    }
    // Unreadable metadata names no channel, so nothing could store it. 503 rather than
    // 200: Meta redelivers a non-200 for up to 7 days, which leaves time to fix the
    // cause (e.g. a connector upgrade for a changed format); a 200 would lose it.
    if parsed.unroutable > 0 {
        return busy("a messages change has unreadable metadata; deliver again later");
    }
    respond(200, json!({"ok": true}).to_string(), "application/json")
}

/// Emits every served number's events, then waits until each channel's are durable.
async fn store(routed: &BTreeMap<String, (&Arc<Channel>, &Vec<Event>)>) -> Result<(), String> {
    for (channel, events) in routed.values() {
        for event in events.iter() {
            let mut sent = channel.emit_for(event, EMIT_WAIT).await;
            // Too large for the host stays too large on every redelivery: store it cut
            // down (what Meta sent, bounded) rather than answer 503 for 7 days.
            if sent == Err(EmitError::TooLarge)
                && let Some(small) = inbound::shrunk(event)
            {
                channel.host.log(
                    Level::Warn,
                    "whatsapp: an event too large for the host is stored cut down",
                );
                sent = channel.emit_for(&small, EMIT_WAIT).await;
            }
            match sent {
                Ok(()) => {
                    let counter = match event {
                        Event::Receipt(_) => &channel.counters.receipts,
                        _ => &channel.counters.accepted,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    channel.counters.busy.fetch_add(1, Ordering::Relaxed);
                    // Busy, closed (stopping) or too large: nothing is acknowledged.
                    let e = if e == EmitError::TooLarge {
                        "an event is too large for the host".to_owned()
                    } else {
                        e.to_string()
                    };
                    return Err(e);
                }
            }
        }
    }
    // 200 tells Meta it may forget the notification: only once it is durable.
    for (channel, _) in routed.values() {
        match channel.flush(FLUSH_WAIT).await {
            Ok(()) | Err(FlushError::Unsupported) => {}
            Err(e) => {
                channel.counters.busy.fetch_add(1, Ordering::Relaxed);
                return Err(e.to_string());
            }
        }
    }
    Ok(())
}
