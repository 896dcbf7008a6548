//! Unit tests of the connector's logic: config checks, webhook parsing (every entry,
//! change and message type), status receipts, the send body and Meta's error classes.

use patchbay_connector_sdk::{Event, Outbound, ReceiptStatus, Recipient};
use serde_json::{Value, json};

use crate::config::Config;
use crate::graph::{self, Failure};
use crate::{inbound, outbound, webhook};

const TOKEN: &str = "EAAG-test-access-token";
const APP_SECRET: &str = "0123456789abcdef0123456789abcdef";
const VERIFY: &str = "verify-me-please";

fn config(extra: Value) -> Result<Config, patchbay_connector_sdk::ConnectorError> {
    let mut c = json!({
        "phone_number_id": "106540352242922", "access_token": TOKEN,
        "app_secret": APP_SECRET, "verify_token": VERIFY,
    });
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    Config::parse(c)
}

#[test]
fn config_defaults_and_refusals_never_echo_secrets() {
    let c = config(json!({})).unwrap();
    assert_eq!(c.graph_base, "https://graph.facebook.com");
    assert_eq!(c.api_version, "v21.0");
    assert_eq!(
        c.graph_url("106540352242922/messages"),
        "https://graph.facebook.com/v21.0/106540352242922/messages"
    );
    // Meta's batches reach 3 MB: the default takes them, and up to 8 MiB may be set.
    assert_eq!(c.max_body_bytes, 3 * 1024 * 1024);
    assert!(config(json!({"max_body_bytes": 8 * 1024 * 1024})).is_ok());
    assert!(config(json!({"max_body_bytes": 8 * 1024 * 1024 + 1})).is_err());
    assert!(config(json!({"graph_base": "http://127.0.0.1:9/"})).is_ok());
    assert!(config(json!({"graph_base": "http://[::1]:9"})).is_ok());
    for bad in [
        json!({"graph_base": "http://graph.example.com"}),
        json!({"graph_base": "ftp://127.0.0.1"}),
        json!({"api_version": "21.0"}),
        json!({"api_version": "v21.0.1"}),
        json!({"listen": "localhost"}),
        json!({"path": "hook"}),
        json!({"phone_number_id": "+1555"}),
        json!({"access_token": " "}),
        json!({"max_body_bytes": 10}),
        json!({"display_nmae": "typo"}),
    ] {
        let e = config(bad.clone()).unwrap_err();
        assert_eq!(e.code, "invalid_config", "{bad}");
        for secret in [TOKEN, APP_SECRET, VERIFY] {
            assert!(!e.message.contains(secret), "{bad}: {}", e.message);
        }
    }
    let shown = format!("{c:?}");
    for secret in [TOKEN, APP_SECRET, VERIFY] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

fn message(id: &str, from: &str, kind: &str, body: Value) -> Value {
    let mut m = json!({"from": from, "id": id, "timestamp": "1749416383", "type": kind});
    m.as_object_mut().unwrap().insert(kind.into(), body);
    m
}

fn change(number: &str, contacts: Value, messages: Vec<Value>) -> Value {
    json!({"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": number},
        "contacts": contacts, "messages": messages,
    }})
}

fn inbound_of(events: &[Event]) -> Vec<&patchbay_connector_sdk::Inbound> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Inbound(m) => Some(m),
            _ => None,
        })
        .collect()
}

#[test]
fn every_entry_change_and_type_is_kept() {
    let ann = json!([{"profile": {"name": "Ann Lee"}, "wa_id": "16505551234"}]);
    let two = json!([
        {"profile": {"name": "Bob"}, "wa_id": "4915112345678"},
        {"profile": {"name": "Cy"}, "wa_id": "447700900123"}
    ]);
    let mut replied = message(
        "wamid.t2",
        "16505551234",
        "text",
        json!({"body": "and this?"}),
    );
    replied["context"] = json!({"from": "15550783881", "id": "wamid.out1"});
    let body = json!({"object": "whatsapp_business_account", "entry": [
        {"id": "waba1", "changes": [
            change("111", ann.clone(), vec![
                message("wamid.t1", "16505551234", "text", json!({"body": "hello"})),
                replied,
                message("wamid.i1", "16505551234", "image", json!({"id": "media1", "mime_type": "image/jpeg", "sha256": "abc", "caption": "look"})),
            ]),
            change("111", ann, vec![
                message("wamid.l1", "16505551234", "location", json!({"latitude": 52.5, "longitude": 13.4, "name": "Office"})),
                message("wamid.r1", "16505551234", "reaction", json!({"message_id": "wamid.out1", "emoji": "👍"})),
            ]),
        ]},
        {"id": "waba2", "changes": [
            change("222", two.clone(), vec![
                message("wamid.b1", "4915112345678", "interactive", json!({"type": "button_reply", "button_reply": {"id": "yes", "title": "Yes please"}})),
                message("wamid.c1", "447700900123", "contacts", json!(null)),
                message("wamid.u1", "447700900123", "order", json!({"catalog_id": "c"})),
            ]),
            {"field": "account_update", "value": {"event": "X"}},
        ]},
    ]});
    let p = inbound::parse(body.to_string().as_bytes()).unwrap();
    assert_eq!(p.routes.len(), 2);
    let first = inbound_of(&p.routes["111"]);
    assert_eq!(first.len(), 5, "both changes of entry one");
    let t1 = first[0];
    assert_eq!(t1.external_chat_id, "16505551234");
    assert_eq!(t1.external_message_id, "wamid.t1");
    assert_eq!(t1.text, "hello");
    assert_eq!(t1.sender.id.as_deref(), Some("16505551234"));
    assert_eq!(t1.sender.phone.as_deref(), Some("+16505551234"));
    assert_eq!(t1.sender.name.as_deref(), Some("Ann Lee"));
    assert_eq!(t1.sent_at.timestamp(), 1_749_416_383);
    assert_eq!(
        first[1].attachments,
        vec![json!({"type": "reply", "external_message_id": "wamid.out1", "from": "15550783881"})]
    );
    assert_eq!(first[2].text, "look");
    assert_eq!(
        first[2].attachments[0],
        json!({"type": "image", "media_id": "media1", "mime_type": "image/jpeg", "sha256": "abc", "caption": "look"})
    );
    assert_eq!(first[3].attachments[0]["type"], "location");
    assert_eq!(first[3].attachments[0]["latitude"], 52.5);
    assert_eq!(first[4].text, "👍");
    assert_eq!(first[4].attachments[0]["external_message_id"], "wamid.out1");

    let second = inbound_of(&p.routes["222"]);
    assert_eq!(second.len(), 3);
    assert_eq!(second[0].text, "Yes please");
    assert_eq!(second[0].attachments[0]["kind"], "button_reply");
    assert_eq!(second[0].sender.name.as_deref(), Some("Bob"));
    // Matched by wa_id among several contacts, not taken from the first.
    assert_eq!(second[1].sender.name.as_deref(), Some("Cy"));
    assert_eq!(second[1].attachments[0]["type"], "contacts");
    assert_eq!(
        second[2].attachments[0],
        json!({"type": "unsupported", "raw_type": "order", "raw": {"catalog_id": "c"}})
    );
    assert!(
        p.notes.iter().any(|n| n.contains("account_update")),
        "{:?}",
        p.notes
    );
    for e in p.routes.values().flatten() {
        e.validate().unwrap();
    }
}

#[test]
fn statuses_become_receipts_for_patchbay_messages() {
    let status = |s: &str, extra: Value| {
        let mut v = json!({"id": "wamid.out1", "status": s, "timestamp": "1", "recipient_id": "16505551234",
                           "biz_opaque_callback_data": "patchbay:42"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let body = json!({"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages", "value": {
        "metadata": {"phone_number_id": "111"},
        "statuses": [
            status("sent", json!({})),
            status("delivered", json!({})),
            status("read", json!({})),
            status("failed", json!({"errors": [{"code": 131047, "title": "Re-engagement message"}]})),
            status("read", json!({"biz_opaque_callback_data": null})),
        ],
        "errors": [{"code": 130429, "title": "Rate limit hit", "error_data": {"details": "slow down"}}],
    }}]}]});
    let p = inbound::parse(body.to_string().as_bytes()).unwrap();
    let receipts: Vec<_> = p.routes["111"]
        .iter()
        .map(|e| match e {
            Event::Receipt(r) => r.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let kinds: Vec<_> = receipts.iter().map(|r| r.status).collect();
    assert_eq!(
        kinds,
        [
            ReceiptStatus::Delivered,
            ReceiptStatus::Read,
            ReceiptStatus::Failed
        ]
    );
    assert!(receipts.iter().all(|r| r.message == 42));
    assert_eq!(
        receipts[0].external_message_id.as_deref(),
        Some("wamid.out1")
    );
    assert!(receipts[2].reason.as_deref().unwrap().contains("24 hours"));
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("names no patchbay message"))
    );
    assert!(
        p.warnings.iter().any(|n| n.contains("webhook error")
            && n.contains("130429")
            && n.contains("slow down")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn bad_bodies_are_refused() {
    for bad in [
        "{".to_owned(),
        format!("{}{}", "[".repeat(40), "]".repeat(40)),
    ] {
        assert!(inbound::parse(bad.as_bytes()).is_err(), "{bad}");
    }
    // Another product's notification: nothing, one note, no refusal (200).
    let page =
        json!({"object": "page", "entry": [{"changes": [change("111", json!([]), vec![])]}]});
    let p = inbound::parse(page.to_string().as_bytes()).unwrap();
    assert_eq!(p.events(), 0);
    assert!(p.notes[0].contains("\"page\""), "{:?}", p.notes);
    // A change without readable metadata is a warning and unroutable (503 after the
    // rest is stored); the others still count.
    let body = json!({"object": "whatsapp_business_account", "entry": [{"changes": [
        {"field": "messages", "value": {"no_metadata": true}},
        {"field": "messages", "value": {"metadata": {"phone_number_id": 111}}},
        change("111", json!([]), vec![message("wamid.x", "1555", "text", json!({"body": "x"}))]),
    ]}]});
    let p = inbound::parse(body.to_string().as_bytes()).unwrap();
    assert_eq!(p.events(), 1);
    assert_eq!(p.unroutable, 2);
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(p.warnings.iter().all(|w| w.contains("unreadable metadata")));
}

#[test]
fn one_unreadable_item_keeps_its_neighbours() {
    let big = "x".repeat(3 * inbound::MAX_RAW);
    let mut value = change(
        "111",
        json!([{"wa_id": 7}, {"wa_id": "1555", "profile": {"name": "Ann"}}]),
        vec![
            message("wamid.a", "1555", "text", json!({"body": "first"})),
            // `from` is a number: the old all-or-nothing parse lost the whole change.
            json!({"from": 1555, "id": "wamid.b", "type": "image", "image": {"id": big}}),
            json!({"type": "text"}),
            message("wamid.c", "1555", "text", json!({"body": "last"})),
        ],
    );
    value["value"]["statuses"] = json!([
        {"id": "wamid.out1", "status": 5},
        {"id": "wamid.out2", "status": "read", "biz_opaque_callback_data": "patchbay:9"},
    ]);
    let body = json!({"object": "whatsapp_business_account", "entry": [{"changes": [value]}]});
    let p = inbound::parse(body.to_string().as_bytes()).unwrap();
    let events = &p.routes["111"];
    let msgs = inbound_of(events);
    let ids: Vec<_> = msgs
        .iter()
        .map(|m| m.external_message_id.as_str())
        .collect();
    assert_eq!(ids[0], "wamid.a");
    assert_eq!(ids[1], "wamid.b");
    assert!(ids[2].starts_with("unreadable:"), "{ids:?}");
    assert_eq!(ids[3], "wamid.c");
    assert_eq!(msgs[0].sender.name.as_deref(), Some("Ann"));
    let u = &msgs[1].attachments[0];
    assert_eq!(u["type"], "unsupported");
    assert_eq!(u["raw_type"], "image");
    assert!(u["raw"].as_str().unwrap().len() <= inbound::MAX_RAW);
    assert!(u["raw"].as_str().unwrap().contains("wamid.b"));
    assert_eq!(msgs[2].attachments[0]["raw_type"], "text");
    // The same bytes give the same id, so a redelivery is stored once.
    let again = inbound::parse(body.to_string().as_bytes()).unwrap();
    assert_eq!(
        inbound_of(&again.routes["111"])[2].external_message_id,
        ids[2]
    );
    let receipts: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Receipt(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].message, 9);
    assert_eq!(p.unroutable, 0);
    assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
    assert!(p.warnings.iter().all(|w| w.len() < 2 * inbound::MAX_RAW));
}

#[test]
fn verify_tokens_compare_whole() {
    assert!(webhook::same_secret(VERIFY, VERIFY));
    assert!(!webhook::same_secret("verify-me-pleasE", VERIFY));
    assert!(!webhook::same_secret("", VERIFY));
    assert!(!webhook::same_secret(&format!("{VERIFY}x"), VERIFY));
}

fn outbound_msg(text: &str, attachments: Vec<Value>) -> Outbound {
    Outbound {
        message: 7,
        external_chat_id: "16505551234".into(),
        to: Recipient::default(),
        text: text.into(),
        attachments,
    }
}

#[test]
fn send_bodies() {
    assert_eq!(
        outbound::body(&outbound_msg("hi", vec![])).unwrap(),
        json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": "16505551234",
               "type": "text", "text": {"body": "hi"}, "biz_opaque_callback_data": "patchbay:7"})
    );
    let reply = outbound::body(&outbound_msg(
        "yes",
        vec![json!({"type": "reply", "external_message_id": "wamid.in1"})],
    ))
    .unwrap();
    assert_eq!(reply["context"], json!({"message_id": "wamid.in1"}));
    // A chat created by phone has no wa_id yet.
    let mut by_phone = outbound_msg("hi", vec![]);
    by_phone.external_chat_id.clear();
    by_phone.to.phone = Some("+49 151 1234 5678".into());
    assert_eq!(outbound::body(&by_phone).unwrap()["to"], "4915112345678");
    by_phone.to.phone = None;
    assert_eq!(outbound::body(&by_phone).unwrap_err().code, "no_recipient");
    for (m, code) in [
        (outbound_msg("", vec![]), "invalid_message"),
        (outbound_msg(&"x".repeat(4097), vec![]), "invalid_message"),
        (
            outbound_msg("x", vec![json!({"type": "image", "url": "https://x"})]),
            "unsupported",
        ),
    ] {
        let e = outbound::body(&m).unwrap_err();
        assert_eq!(e.code, code);
        assert!(!e.retryable);
    }
}

fn meta_error(code: i64, title: &str) -> String {
    json!({"error": {"message": format!("(#{code}) {title}"), "type": "OAuthException", "code": code,
                     "error_data": {"messaging_product": "whatsapp", "details": title}, "fbtrace_id": "x"}})
    .to_string()
}

#[test]
fn meta_error_codes_map_to_sdk_classes() {
    match graph::classify(400, &meta_error(131047, "Re-engagement message")) {
        Failure::Permanent { code, reason } => {
            assert_eq!(code, "window_closed");
            assert!(
                reason.contains("24 hours") && reason.contains("template"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        graph::classify(400, &meta_error(131026, "Message undeliverable")),
        Failure::Permanent {
            code: "undeliverable",
            ..
        }
    ));
    for code in [130429, 131056, 4, 80007] {
        assert!(
            matches!(
                graph::classify(400, &meta_error(code, "Rate limit hit")),
                Failure::Retry { .. }
            ),
            "{code}"
        );
    }
    assert!(matches!(
        graph::classify(401, &meta_error(190, "Error validating access token")),
        Failure::Auth(_)
    ));
    assert!(matches!(
        graph::classify(400, &meta_error(190, "expired")),
        Failure::Auth(_)
    ));
    assert!(matches!(graph::classify(401, "not json"), Failure::Auth(_)));
    assert!(matches!(
        graph::classify(502, "<html>"),
        Failure::Retry { .. }
    ));
    assert!(matches!(
        graph::classify(400, &meta_error(100, "Invalid parameter")),
        Failure::Permanent {
            code: "rejected",
            ..
        }
    ));
}

#[test]
fn an_event_too_large_for_the_host_is_cut_down() {
    let card = json!({"name": {"formatted_name": "x".repeat(2 * 1024 * 1024)}});
    let mut m = message("wamid.big", "1555", "contacts", json!(null));
    m["contacts"] = json!([card]);
    let body = json!({"object": "whatsapp_business_account", "entry": [{"changes": [
        change("111", json!([]), vec![m]),
    ]}]});
    let p = inbound::parse(body.to_string().as_bytes()).unwrap();
    let event = &p.routes["111"][0];
    assert!(serde_json::to_string(event).unwrap().len() > 2 * 1024 * 1024);
    let small = inbound::shrunk(event).unwrap();
    let json = serde_json::to_string(&small).unwrap();
    assert!(json.len() < 2 * inbound::MAX_RAW, "{}", json.len());
    let m = &inbound_of(std::slice::from_ref(&small))[0];
    assert_eq!(m.external_message_id, "wamid.big");
    assert_eq!(m.attachments[0]["type"], "unsupported");
    assert_eq!(m.attachments[0]["raw_type"], "too_large");
}
