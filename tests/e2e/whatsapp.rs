//! The whatsapp connector in the real daemon, against a fake Graph API on 127.0.0.1
//! that answers as Meta documents (`GET /{phone_number_id}`, `POST
//! /{phone_number_id}/messages` with `messages[0].id`, `{"error":{"code":…}}` errors),
//! while the test plays Meta's webhook side: the verification handshake, signed
//! notifications (every entry, change and message type), status notifications, and a
//! sender that delivers again whatever got no 200 across a daemon crash.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use patchbay_connector_sdk::host::{Instance, RawEvent, load};
use patchbay_connector_sdk::{Event, Outbound, Recipient};
use serde_json::{Value, json};

use crate::fake_http::{FakeServer, Request, Response, get, post, request};
use crate::harness::{Backend, Daemon, connector_library, install_connector};

const TOKEN: &str = "EAAGtest-access-token-0123";
const APP_SECRET: &str = "e2e-app-secret-0123456789abcdef";
const VERIFY: &str = "e2e-verify-token";
const NUMBER_A: &str = "111000111";
const NUMBER_B: &str = "222000222";
const ANN: &str = "16505551234";
const BOB: &str = "4915112345678";

/// The fake Graph API's state: answers queued for the next sends, sends seen.
#[derive(Default)]
struct GraphState {
    queued: VecDeque<(u16, Value)>,
    token_revoked: bool,
    next: u64,
}

struct FakeGraph {
    state: Arc<Mutex<GraphState>>,
    server: FakeServer,
}

fn meta_error(code: i64, title: &str, details: &str) -> Value {
    json!({"error": {"message": format!("(#{code}) {title}"), "type": "OAuthException", "code": code,
                     "error_data": {"messaging_product": "whatsapp", "details": details},
                     "fbtrace_id": "AbCdEf"}})
}

impl FakeGraph {
    fn start() -> FakeGraph {
        let state: Arc<Mutex<GraphState>> = Arc::default();
        let s = state.clone();
        let server = FakeServer::start(move |req| graph_answer(&s, req));
        FakeGraph { state, server }
    }

    fn queue(&self, status: u16, body: Value) {
        self.state.lock().unwrap().queued.push_back((status, body));
    }

    /// The POSTs of host message `id` (named by its callback data).
    fn sends_of(&self, id: i64) -> Vec<Request> {
        let tag = format!("patchbay:{id}");
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.json()["biz_opaque_callback_data"] == tag)
            .collect()
    }
}

fn graph_answer(state: &Mutex<GraphState>, req: &Request) -> Response {
    let mut s = state.lock().unwrap();
    if s.token_revoked || req.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return Response::json(
            401,
            meta_error(190, "Error validating access token", "Session has expired"),
        );
    }
    let path = req.path.split('?').next().unwrap_or_default();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["v21.0", id]) if *id == NUMBER_A || *id == NUMBER_B => {
            let (display, name) = if *id == NUMBER_A {
                ("+1 555-078-3881", "Patchbay Test Co")
            } else {
                ("+1 555-078-3882", "Second Line")
            };
            Response::json(
                200,
                json!({"verified_name": name, "display_phone_number": display, "id": id, "quality_rating": "GREEN"}),
            )
        }
        ("POST", ["v21.0", _, "messages"]) => {
            if let Some((status, body)) = s.queued.pop_front() {
                return Response::json(status, body);
            }
            s.next += 1;
            let to = req.json()["to"].clone();
            Response::json(
                200,
                json!({"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}],
                       "messages": [{"id": format!("wamid.OUT{}", s.next)}]}),
            )
        }
        _ => Response::json(
            400,
            meta_error(100, "Invalid parameter", "Unsupported request"),
        ),
    }
}

/// A port that was free a moment ago: two channels must name the same address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn channel_config(graph: &FakeGraph, number: &str, port: u16) -> Value {
    json!({
        "phone_number_id": number, "access_token": TOKEN, "app_secret": APP_SECRET,
        "verify_token": VERIFY, "graph_base": graph.server.url(), "api_version": "v21.0",
        "listen": format!("127.0.0.1:{port}"), "path": "/wa", "max_body_bytes": 65536,
        "request_timeout_secs": 2,
    })
}

async fn add_channel(d: &Daemon, acc: i64, admin: i64, name: &str, config: Value) -> i64 {
    d.ok(
        "channel.add",
        json!({"account": acc, "actor": admin, "kind": "whatsapp", "name": name, "config": config}),
    )
    .await["id"]
        .as_i64()
        .expect("channel id")
}

async fn channel(d: &Daemon, account: i64, id: i64) -> Option<Value> {
    let list = d.ok("channel.list", json!({"account": account})).await;
    list.as_array()?.iter().find(|c| c["id"] == id).cloned()
}

async fn connected(d: &Daemon, account: i64, id: i64) -> Value {
    d.until("whatsapp connected", Duration::from_secs(20), || async {
        channel(d, account, id)
            .await
            .filter(|c| c["status"] == "connected")
    })
    .await
}

async fn all_messages(d: &Daemon, account: i64) -> Vec<Value> {
    d.account_messages(account).await
}

fn message(id: &str, from: &str, kind: &str, body: Value) -> Value {
    let mut m = json!({"from": from, "id": id, "timestamp": "1749416383", "type": kind});
    m.as_object_mut().unwrap().insert(kind.into(), body);
    m
}

fn contacts(wa_ids: &[(&str, &str)]) -> Value {
    wa_ids
        .iter()
        .map(|(id, name)| json!({"profile": {"name": name}, "wa_id": id}))
        .collect()
}

fn messages_change(number: &str, contacts: Value, messages: Vec<Value>) -> Value {
    json!({"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": number},
        "contacts": contacts, "messages": messages,
    }})
}

fn statuses_change(number: &str, statuses: Vec<Value>) -> Value {
    json!({"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": number},
        "statuses": statuses,
    }})
}

fn notification(entries: Vec<Vec<Value>>) -> Vec<u8> {
    let entry: Vec<Value> = entries
        .into_iter()
        .map(|changes| json!({"id": "102290129340398", "changes": changes}))
        .collect();
    json!({"object": "whatsapp_business_account", "entry": entry})
        .to_string()
        .into_bytes()
}

/// Meta's `X-Hub-Signature-256` of `body` under `secret`: written out here, not taken
/// from the connector (its rlib would bring a second plugin entry symbol into this
/// binary, beside the webhook connector's).
fn sign(secret: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn signed(body: &[u8]) -> Vec<(&'static str, String)> {
    vec![("X-Hub-Signature-256", sign(APP_SECRET.as_bytes(), body))]
}

fn wa_status(wamid: &str, message: i64, state: &str, errors: Value) -> Value {
    let mut s = json!({"id": wamid, "status": state, "timestamp": "1749416400",
                       "recipient_id": ANN, "biz_opaque_callback_data": format!("patchbay:{message}")});
    if !errors.is_null() {
        s["errors"] = errors;
    }
    s
}

/// Sends host message `text` to `chat`; returns its id once its status is one of
/// `states`, with the message.
async fn send_until(d: &Daemon, chat: &Value, admin: i64, text: &str, states: &[&str]) -> (i64, Value) {
    let sent = d
        .ok(
            "message.send",
            json!({"chat": chat, "actor": admin, "text": text}),
        )
        .await;
    let id = sent["message"].as_i64().expect("message id");
    let msg = message_until(d, chat, id, states).await;
    (id, msg)
}

async fn message_until(d: &Daemon, chat: &Value, id: i64, states: &[&str]) -> Value {
    d.until(
        &format!("message {id} {states:?}"),
        Duration::from_secs(30),
        || async {
            let m = d
                .ok("chat.messages", json!({"chat": chat, "limit": 100}))
                .await;
            m.as_array()?
                .iter()
                .find(|m| m["id"] == id && states.contains(&m["status"].as_str().unwrap_or("")))
                .cloned()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_statuses_and_sends() {
    let graph = FakeGraph::start();
    let d = Daemon::start_full(Backend::Sqlite, "", |dir| install_connector(dir, "whatsapp"));
    let plugins = d.ok("plugin.list", json!({})).await;
    assert!(
        plugins
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["kind"] == "whatsapp")),
        "{plugins}"
    );
    let (acc, admin) = d.account("wa").await;
    let port = free_port();
    let id = add_channel(&d, acc, admin, "wa", channel_config(&graph, NUMBER_A, port)).await;
    let c = connected(&d, acc, id).await;
    assert_eq!(c["number"], "+15550783881", "{c}");
    assert_eq!(c["display_name"], "Patchbay Test Co", "{c}");
    let url = format!("http://127.0.0.1:{port}/wa");

    // The verification handshake.
    let hs = |token: &str| {
        get(&format!(
            "{url}?hub.mode=subscribe&hub.verify_token={token}&hub.challenge=1158201444"
        ))
    };
    assert_eq!(hs(VERIFY), (200, "1158201444".to_owned()));
    assert_eq!(hs("wrong-token").0, 403);
    assert_eq!(
        get(&format!("{url}?hub.mode=unsubscribe&hub.verify_token={VERIFY}&hub.challenge=1")).0,
        403
    );

    // Two entries × two changes, every message type, from two customers.
    let ann = contacts(&[(ANN, "Ann Lee")]);
    let bob = contacts(&[(BOB, "Bob Berg")]);
    let mut reply = message("wamid.r1", ANN, "text", json!({"body": "about that"}));
    reply["context"] = json!({"from": "15550783881", "id": "wamid.t1"});
    let body = notification(vec![
        vec![
            messages_change(NUMBER_A, ann.clone(), vec![
                message("wamid.t1", ANN, "text", json!({"body": "hello"})),
                message("wamid.i1", ANN, "image", json!({"id": "m-img", "mime_type": "image/jpeg", "sha256": "h1", "caption": "a photo"})),
                message("wamid.a1", ANN, "audio", json!({"id": "m-aud", "mime_type": "audio/ogg; codecs=opus", "voice": true})),
                message("wamid.v1", ANN, "video", json!({"id": "m-vid", "mime_type": "video/mp4"})),
            ]),
            messages_change(NUMBER_A, bob.clone(), vec![
                message("wamid.d1", BOB, "document", json!({"id": "m-doc", "mime_type": "application/pdf", "filename": "offer.pdf", "caption": "the offer"})),
                message("wamid.s1", BOB, "sticker", json!({"id": "m-stk", "mime_type": "image/webp", "animated": false})),
                message("wamid.l1", BOB, "location", json!({"latitude": 52.52, "longitude": 13.405, "name": "Office", "address": "Main St 1"})),
            ]),
        ],
        vec![
            messages_change(NUMBER_A, ann, vec![
                message("wamid.c1", ANN, "contacts", json!(null)),
                message("wamid.b1", ANN, "interactive", json!({"type": "button_reply", "button_reply": {"id": "yes", "title": "Yes"}})),
                message("wamid.q1", ANN, "button", json!({"payload": "STOP", "text": "Stop promotions"})),
                reply,
            ]),
            messages_change(NUMBER_A, bob, vec![
                message("wamid.x1", BOB, "reaction", json!({"message_id": "wamid.d1", "emoji": "👍"})),
                message("wamid.u1", BOB, "order", json!({"catalog_id": "cat-1", "product_items": []})),
                message("wamid.b2", BOB, "interactive", json!({"type": "list_reply", "list_reply": {"id": "opt-2", "title": "Tuesday", "description": "afternoon"}})),
            ]),
        ],
    ]);
    // The contacts message carries its cards beside the type's name.
    let mut body: Value = serde_json::from_slice(&body).unwrap();
    body["entry"][1]["changes"][0]["value"]["messages"][0]["contacts"] =
        json!([{"name": {"formatted_name": "Cy Vance"}, "phones": [{"phone": "+1 555 0100", "wa_id": "15550100"}]}]);
    let body = body.to_string().into_bytes();

    // Refused before anything is parsed or stored.
    let (status, text) = post(&url, &[], &body);
    assert_eq!(status, 401, "unsigned: {text}");
    let wrong = vec![("X-Hub-Signature-256", sign(b"not-the-app-secret", &body))];
    let (status, text) = post(&url, &wrong, &body);
    assert_eq!(status, 403, "mis-signed: {text}");
    let big = vec![b' '; 70_000];
    let (status, text) = post(&url, &signed(&big), &big);
    assert_eq!(status, 413, "oversized: {text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(all_messages(&d, acc).await.is_empty(), "nothing stored");

    // Signed: 200, and again (Meta re-delivers): stored once.
    let (status, text) = post(&url, &signed(&body), &body);
    assert_eq!(status, 200, "{text}");
    let (status, _) = post(&url, &signed(&body), &body);
    assert_eq!(status, 200);
    d.until("14 inbound", Duration::from_secs(20), || async {
        (all_messages(&d, acc).await.len() >= 14).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = all_messages(&d, acc).await;
    assert_eq!(msgs.len(), 14, "each once: {msgs:#?}");
    let by_id: HashMap<&str, &Value> = msgs
        .iter()
        .map(|m| (m["external_message_id"].as_str().unwrap(), m))
        .collect();
    for (wamid, chat) in [
        ("wamid.t1", ANN),
        ("wamid.r1", ANN),
        ("wamid.c1", ANN),
        ("wamid.d1", BOB),
        ("wamid.u1", BOB),
    ] {
        assert_eq!(by_id[wamid]["chat_external_id"], chat, "{wamid}");
    }
    assert_eq!(by_id["wamid.t1"]["text"], "hello");
    assert_eq!(by_id["wamid.i1"]["text"], "a photo");
    assert_eq!(
        by_id["wamid.i1"]["attachments"][0],
        json!({"type": "image", "media_id": "m-img", "mime_type": "image/jpeg", "sha256": "h1", "caption": "a photo"})
    );
    for (wamid, kind) in [
        ("wamid.a1", "audio"),
        ("wamid.v1", "video"),
        ("wamid.d1", "document"),
        ("wamid.s1", "sticker"),
        ("wamid.l1", "location"),
        ("wamid.c1", "contacts"),
        ("wamid.b1", "interactive"),
        ("wamid.q1", "button"),
        ("wamid.x1", "reaction"),
        ("wamid.u1", "unsupported"),
    ] {
        assert_eq!(by_id[wamid]["attachments"][0]["type"], kind, "{wamid}");
    }
    assert_eq!(by_id["wamid.d1"]["attachments"][0]["filename"], "offer.pdf");
    assert_eq!(by_id["wamid.c1"]["attachments"][0]["contacts"][0]["name"]["formatted_name"], "Cy Vance");
    assert_eq!(by_id["wamid.b1"]["text"], "Yes");
    assert_eq!(by_id["wamid.b2"]["text"], "Tuesday");
    assert_eq!(by_id["wamid.q1"]["attachments"][0]["payload"], "STOP");
    assert_eq!(by_id["wamid.x1"]["attachments"][0]["external_message_id"], "wamid.d1");
    assert_eq!(by_id["wamid.u1"]["attachments"][0]["raw_type"], "order");
    assert_eq!(
        by_id["wamid.r1"]["attachments"][0],
        json!({"type": "reply", "external_message_id": "wamid.t1", "from": "15550783881"})
    );
    // One chat per customer, with name and E.164 phone.
    let chats = d.ok("chat.list", json!({"account": acc})).await;
    let chats = chats.as_array().expect("chats").clone();
    assert_eq!(chats.len(), 2, "{chats:?}");
    let chat_of = |wa: &str| {
        chats
            .iter()
            .find(|c| c["external_chat_id"] == wa)
            .unwrap_or_else(|| panic!("chat {wa}"))["id"]
            .clone()
    };
    for (wa, name, phone) in [(ANN, "Ann Lee", "+16505551234"), (BOB, "Bob Berg", "+4915112345678")] {
        let card = d.ok("chat.get", json!({"chat": chat_of(wa)})).await;
        assert_eq!(card["contact"]["name"], name, "{card}");
        assert_eq!(card["contact"]["phone"], phone, "{card}");
    }

    // A text send: the bearer token, the documented body, the wamid as external id.
    let ann_chat = chat_of(ANN);
    let (out1, msg) = send_until(&d, &ann_chat, admin, "thanks, Ann!", &["sent"]).await;
    assert_eq!(msg["external_message_id"], "wamid.OUT1");
    let sends = graph.sends_of(out1);
    assert_eq!(sends.len(), 1, "{sends:?}");
    assert_eq!(sends[0].path, format!("/v21.0/{NUMBER_A}/messages"));
    assert_eq!(sends[0].header("authorization"), Some(&*format!("Bearer {TOKEN}")));
    assert_eq!(
        sends[0].json(),
        json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": ANN,
               "type": "text", "text": {"body": "thanks, Ann!"},
               "biz_opaque_callback_data": format!("patchbay:{out1}")})
    );

    // Statuses: sent (already so) → delivered → read.
    for (state, expect) in [("sent", "sent"), ("delivered", "delivered"), ("read", "read")] {
        let body = notification(vec![vec![statuses_change(
            NUMBER_A,
            vec![wa_status("wamid.OUT1", out1, state, Value::Null)],
        )]]);
        let (code, text) = post(&url, &signed(&body), &body);
        assert_eq!(code, 200, "{text}");
        message_until(&d, &ann_chat, out1, &[expect]).await;
    }

    // A status `failed` with 131047: failed, with a reason a person understands.
    let (out2, _) = send_until(&d, &ann_chat, admin, "are you there?", &["sent"]).await;
    let errors = json!([{"code": 131047, "title": "Re-engagement message", "message": "Re-engagement message",
                         "error_data": {"details": "Message failed to send because more than 24 hours have passed since the customer last replied to this number."},
                         "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"}]);
    let body = notification(vec![vec![statuses_change(
        NUMBER_A,
        vec![wa_status("wamid.OUT2", out2, "failed", errors)],
    )]]);
    assert_eq!(post(&url, &signed(&body), &body).0, 200);
    let failed = message_until(&d, &ann_chat, out2, &["failed"]).await;
    let reason = failed["status_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("24 hours") && reason.contains("template"), "{failed}");

    // The send itself refused with 131047: failed at once, not retried.
    graph.queue(400, meta_error(131047, "Re-engagement message", "More than 24 hours have passed"));
    let (out3, failed) = send_until(&d, &ann_chat, admin, "hello again", &["failed"]).await;
    assert!(failed["status_reason"].as_str().unwrap_or_default().contains("template"), "{failed}");
    assert_eq!(graph.sends_of(out3).len(), 1, "not retried");

    // 130429 (rate limit) then success: sent once, after one retry.
    graph.queue(400, meta_error(130429, "Rate limit hit", "Cloud API message throughput has been reached"));
    let (out4, msg) = send_until(&d, &ann_chat, admin, "rate limited", &["sent"]).await;
    let sends = graph.sends_of(out4);
    assert_eq!(sends.len(), 2, "one 130429, one success: {sends:?}");
    assert!(sends[1].at.duration_since(sends[0].at) >= Duration::from_millis(900));
    assert_eq!(msg["external_message_id"], "wamid.OUT2".replace('2', "3"));
    let outs = all_messages(&d, acc).await;
    assert_eq!(
        outs.iter().filter(|m| m["text"] == "rate limited").count(),
        1
    );

    // The token revoked: channel error, the message fails, no retry storm.
    graph.state.lock().unwrap().token_revoked = true;
    let (out5, failed) = send_until(&d, &ann_chat, admin, "after revocation", &["failed"]).await;
    assert!(
        failed["status_reason"].as_str().unwrap_or_default().contains("access token invalid or expired"),
        "{failed}"
    );
    assert_eq!(graph.sends_of(out5).len(), 1, "one attempt only");
    d.until("channel error", Duration::from_secs(20), || async {
        channel(&d, acc, id).await.filter(|c| {
            c["status"] == "error"
                && c["status_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("access token invalid or expired"))
        })
    })
    .await;
    // The next send fails at once: the refused token is not tried on Graph again.
    let before = graph.server.requests().len();
    let (out6, failed) = send_until(&d, &ann_chat, admin, "still revoked", &["failed"]).await;
    assert!(
        failed["status_reason"].as_str().unwrap_or_default().contains("access token invalid or expired"),
        "{failed}"
    );
    assert!(graph.sends_of(out6).is_empty(), "no request for {out6}");
    assert_eq!(graph.server.requests().len(), before, "the fake Graph saw no request");
    let log = d.log();
    assert!(!log.contains(TOKEN) && !log.contains(APP_SECRET), "secrets stay out of the log");
    assert!(!log.contains("panicked"), "{log}");
}

/// Meta's side of the restart test: delivers each notification until it gets a 200,
/// as Meta does, in order and paced; counts the acknowledged ones in `acked`, and
/// returns how many deliveries were repeated.
fn meta_sender(
    url: String,
    bodies: Vec<Vec<u8>>,
    acked: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut retries = 0;
        for body in bodies {
            let started = Instant::now();
            loop {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "never acknowledged"
                );
                match request("POST", &url, &signed(&body), &body) {
                    Ok((200, _)) => break,
                    _ => {
                        retries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            acked.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
        }
        retries
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn two_numbers_one_listener_and_a_restart_loses_nothing() {
    let graph = FakeGraph::start();
    let mut d = Daemon::start_full(Backend::Sqlite, "", |dir| install_connector(dir, "whatsapp"));
    let (acc, admin) = d.account("wa2").await;
    let port = free_port();
    let a = add_channel(&d, acc, admin, "a", channel_config(&graph, NUMBER_A, port)).await;
    let b = add_channel(&d, acc, admin, "b", channel_config(&graph, NUMBER_B, port)).await;
    assert_eq!(connected(&d, acc, a).await["number"], "+15550783881");
    assert_eq!(connected(&d, acc, b).await["number"], "+15550783882");
    let url = format!("http://127.0.0.1:{port}/wa");

    // One notification naming both numbers: each change lands on its own channel.
    let body = notification(vec![vec![
        messages_change(NUMBER_A, contacts(&[(ANN, "Ann Lee")]), vec![message("wamid.A0", ANN, "text", json!({"body": "to A"}))]),
        messages_change(NUMBER_B, contacts(&[(BOB, "Bob Berg")]), vec![message("wamid.B0", BOB, "text", json!({"body": "to B"}))]),
    ]]);
    let (status, text) = post(&url, &signed(&body), &body);
    assert_eq!(status, 200, "{text}");
    d.until("both stored", Duration::from_secs(20), || async {
        (all_messages(&d, acc).await.len() == 2).then_some(())
    })
    .await;
    let msgs = all_messages(&d, acc).await;
    for (wamid, ch, chat) in [("wamid.A0", a, ANN), ("wamid.B0", b, BOB)] {
        let m = msgs
            .iter()
            .find(|m| m["external_message_id"] == wamid)
            .expect(wamid);
        assert_eq!(m["chat_channel"], ch, "{m}");
        assert_eq!(m["chat_external_id"], chat, "{m}");
    }
    // A number no channel serves is not acknowledged: Meta keeps it.
    let stray = notification(vec![vec![messages_change(
        "999000999",
        contacts(&[(ANN, "Ann")]),
        vec![message("wamid.Z", ANN, "text", json!({"body": "?"}))],
    )]]);
    assert_eq!(post(&url, &signed(&stray), &stray).0, 503);

    // 40 notifications, alternating numbers, while the daemon is killed and restarted:
    // what got no 200 is delivered again, what got one survives the crash.
    let bodies: Vec<Vec<u8>> = (1..=40)
        .map(|n| {
            let (number, from) = if n % 2 == 0 { (NUMBER_A, ANN) } else { (NUMBER_B, BOB) };
            notification(vec![vec![messages_change(
                number,
                contacts(&[(from, "Someone")]),
                vec![message(&format!("wamid.N{n}"), from, "text", json!({"body": format!("n{n}")}))],
            )]])
        })
        .collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let sender = meta_sender(url.clone(), bodies, acked.clone());
    d.until("traffic under way", Duration::from_secs(20), || async {
        (acked.load(Ordering::SeqCst) >= 8).then_some(())
    })
    .await;
    d.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.spawn();
    let retries = tokio::task::spawn_blocking(move || sender.join().expect("sender"))
        .await
        .expect("join");
    assert_eq!(acked.load(Ordering::SeqCst), 40);
    assert!(retries > 0, "the crash made Meta deliver again");
    d.until("all 42 stored", Duration::from_secs(30), || async {
        (all_messages(&d, acc).await.len() >= 42).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let msgs = all_messages(&d, acc).await;
    assert_eq!(msgs.len(), 42, "nothing lost or doubled");
    for n in 1..=40 {
        let wamid = format!("wamid.N{n}");
        let m: Vec<_> = msgs.iter().filter(|m| m["external_message_id"] == wamid).collect();
        assert_eq!(m.len(), 1, "{wamid}");
        assert_eq!(m[0]["chat_channel"], if n % 2 == 0 { a } else { b }, "{wamid}");
    }
}

/// A reply send through the real plugin boundary (the daemon's message.send carries no
/// reply reference): `context.message_id` reaches Graph in the documented body.
#[test]
fn a_reply_send_carries_the_context() {
    let graph = FakeGraph::start();
    let lib = load(&connector_library("whatsapp")).expect("load libwhatsapp.so");
    assert_eq!(lib.kind(), "whatsapp");
    let (tx, rx) = mpsc::channel::<RawEvent>();
    let config = channel_config(&graph, NUMBER_A, free_port());
    let inst = Instance::create(&lib, 1, &config, tx, 64).expect("create");
    inst.start().expect("start");
    // Connected once GET /{phone_number_id} answered, as the host hears it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|e| {
        matches!(e, Event::Status(s) if s.number.as_deref() == Some("+15550783881"))
    }) {
        let left = deadline.saturating_duration_since(Instant::now());
        let raw = rx.recv_timeout(left).expect("a connected status");
        seen.push(raw.parse().expect("a valid event"));
    }
    let sent = inst
        .send(&Outbound {
            message: 77,
            external_chat_id: ANN.into(),
            to: Recipient::default(),
            text: "replying".into(),
            attachments: vec![json!({"type": "reply", "external_message_id": "wamid.t1"})],
        })
        .expect("send");
    assert_eq!(sent.external_message_id, "wamid.OUT1");
    let sends = graph.sends_of(77);
    assert_eq!(sends.len(), 1);
    assert_eq!(
        sends[0].json(),
        json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": ANN,
               "type": "text", "text": {"body": "replying"}, "context": {"message_id": "wamid.t1"},
               "biz_opaque_callback_data": "patchbay:77"})
    );
    inst.stop().expect("stop");
}
