//! Chats, settings and additional fields (SPEC §5), each rule its own test, through the
//! real socket; the inbound_message job is enqueued directly with `job.enqueue`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon};

struct Setup {
    d: Daemon,
    acc: i64,
    admin: i64,
    op1: i64,
    op2: i64,
    channel: i64,
}

async fn setup(backend: Backend) -> Setup {
    let d = Daemon::start(backend);
    let (acc, admin) = d.account("chats").await;
    let op = |name: &str| json!({"account": acc, "name": name, "email": format!("{name}@chats.test"), "role": "operator"});
    let op1 = d.ok("user.add", op("olga")).await["id"]
        .as_i64()
        .expect("id");
    let op2 = d.ok("user.add", op("oleg")).await["id"]
        .as_i64()
        .expect("id");
    // A quiet loopback channel: traffic comes from job.enqueue below.
    let channel = d
        .loopback(acc, admin, json!({"rate_per_sec": 0, "id_prefix": "q"}))
        .await;
    Setup {
        d,
        acc,
        admin,
        op1,
        op2,
        channel,
    }
}

fn inbound(channel: i64, chat: &str, msg: &str, phone: &str) -> Value {
    json!({"kind": "inbound_message", "payload": {
        "channel": channel, "external_chat_id": chat, "external_message_id": msg,
        "sender": {"phone": phone, "name": "Client"}, "text": format!("text of {msg}"),
        "attachments": [], "sent_at": "2026-11-25T10:00:00Z"}})
}

/// Enqueues an inbound message and waits for its job to finish.
async fn deliver(s: &Setup, chat: &str, msg: &str) {
    let r =
        s.d.ok("job.enqueue", inbound(s.channel, chat, msg, "+79161234567"))
            .await;
    s.d.job_until(
        r["id"].as_str().expect("id"),
        &["done"],
        Duration::from_secs(20),
    )
    .await;
}

async fn the_chat(s: &Setup) -> Value {
    let chats = s.d.ok("chat.list", json!({"account": s.acc})).await;
    chats
        .as_array()
        .and_then(|c| c.first().cloned())
        .expect("one chat")
}

async fn visible(s: &Setup, user: i64) -> usize {
    let chats =
        s.d.ok("chat.list", json!({"account": s.acc, "as_user": user}))
            .await;
    chats.as_array().map_or(0, Vec::len)
}

async fn close(s: &Setup, chat: &Value, actor: i64) {
    let r =
        s.d.ok("chat.close", json!({"chat": chat["id"], "actor": actor}))
            .await;
    s.d.job_until(
        r["job"].as_str().expect("job"),
        &["done"],
        Duration::from_secs(20),
    )
    .await;
}

async fn same_inbound_job_three_times_stores_one_message(backend: Backend) {
    let s = setup(backend).await;
    for _ in 0..3 {
        deliver(&s, "c1", "m1").await;
    }
    let chat = the_chat(&s).await;
    assert_eq!(chat["unread"], 1, "unread bumped once");
    let msgs = s.d.ok("chat.messages", json!({"chat": chat["id"]})).await;
    assert_eq!(msgs.as_array().map(Vec::len), Some(1));
    let card = s.d.ok("chat.get", json!({"chat": chat["id"]})).await;
    assert_eq!(card["contact"]["phone"], "+79161234567");
    assert_eq!(card["contact"]["name"], "Client");
    let done =
        s.d.ok(
            "job.list",
            json!({"kind": "inbound_message", "state": "done"}),
        )
        .await;
    assert_eq!(done.as_array().map(Vec::len), Some(3), "three jobs ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_is_stored_once_sqlite() {
    same_inbound_job_three_times_stores_one_message(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_is_stored_once_redis() {
    same_inbound_job_three_times_stores_one_message(Backend::Redis).await;
}

/// With reset on, closing clears the responsible user; the client writing again reopens
/// the chat with nobody responsible, so an operator who could not see it now can.
async fn reset_on_close_and_reopen(backend: Backend) {
    let s = setup(backend).await;
    s.d.ok("settings.set", json!({"account": s.acc, "actor": s.admin, "key": "reset_responsible_on_close", "value": true})).await;
    deliver(&s, "c1", "m1").await;
    let chat = the_chat(&s).await;
    s.d.ok(
        "chat.assign",
        json!({"chat": chat["id"], "actor": s.admin, "user": s.op1}),
    )
    .await;
    assert_eq!(visible(&s, s.op1).await, 1);
    assert_eq!(
        visible(&s, s.op2).await,
        0,
        "assigned to op1: op2 cannot see it"
    );
    assert_eq!(
        visible(&s, s.admin).await,
        1,
        "administrators see every chat"
    );
    s.d.fails(
        "chat.open",
        json!({"chat": chat["id"], "actor": s.op2}),
        "forbidden",
    )
    .await;

    close(&s, &chat, s.op1).await;
    let closed = s.d.ok("chat.get", json!({"chat": chat["id"]})).await;
    assert_eq!(closed["status"], "closed");
    assert_eq!(closed["responsible"], Value::Null);

    deliver(&s, "c1", "m2").await;
    let reopened = s.d.ok("chat.get", json!({"chat": chat["id"]})).await;
    assert_eq!(reopened["status"], "open");
    assert_eq!(
        reopened["responsible"],
        Value::Null,
        "reopening keeps the cleared responsible empty"
    );
    assert_eq!(visible(&s, s.op2).await, 1, "now visible to every operator");
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_responsible_on_close_sqlite() {
    reset_on_close_and_reopen(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_responsible_on_close_redis() {
    reset_on_close_and_reopen(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_reset_close_keeps_the_responsible_user() {
    let s = setup(Backend::Sqlite).await;
    deliver(&s, "c1", "m1").await;
    let chat = the_chat(&s).await;
    s.d.ok(
        "chat.assign",
        json!({"chat": chat["id"], "actor": s.admin, "user": s.op1}),
    )
    .await;
    close(&s, &chat, s.admin).await;
    deliver(&s, "c1", "m2").await;
    let reopened = s.d.ok("chat.get", json!({"chat": chat["id"]})).await;
    assert_eq!(reopened["status"], "open");
    assert_eq!(reopened["responsible"], s.op1);
    assert_eq!(visible(&s, s.op2).await, 0);
    let closed =
        s.d.ok("chat.list", json!({"account": s.acc, "status": "closed"}))
            .await;
    assert_eq!(closed.as_array().map(Vec::len), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn mark_read_on_open_on_and_off() {
    let s = setup(Backend::Sqlite).await;
    deliver(&s, "c1", "m1").await;
    deliver(&s, "c1", "m2").await;
    let chat = the_chat(&s).await;
    assert_eq!(chat["unread"], 2);

    s.d.ok(
        "settings.set",
        json!({"account": s.acc, "actor": s.admin, "key": "mark_read_on_open", "value": false}),
    )
    .await;
    let opened =
        s.d.ok("chat.open", json!({"chat": chat["id"], "actor": s.op1}))
            .await;
    assert_eq!(opened["unread"], 2, "setting off: opening changes nothing");
    let msgs = s.d.ok("chat.messages", json!({"chat": chat["id"]})).await;
    assert!(
        msgs.as_array()
            .expect("msgs")
            .iter()
            .all(|m| m["status"] == "received")
    );

    s.d.ok(
        "settings.set",
        json!({"account": s.acc, "actor": s.admin, "key": "mark_read_on_open", "value": true}),
    )
    .await;
    let opened =
        s.d.ok("chat.open", json!({"chat": chat["id"], "actor": s.op1}))
            .await;
    assert_eq!(opened["unread"], 0);
    let msgs = s.d.ok("chat.messages", json!({"chat": chat["id"]})).await;
    assert!(
        msgs.as_array()
            .expect("msgs")
            .iter()
            .all(|m| m["status"] == "read")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_defaults_and_validation() {
    let s = setup(Backend::Sqlite).await;
    let got = s.d.ok("settings.get", json!({"account": s.acc})).await;
    assert_eq!(
        got,
        json!({"reset_responsible_on_close": false, "mark_read_on_open": true, "phone_format": "none", "balance_notify_days": 3})
    );
    for (key, value) in [
        ("balance_notify_days", json!(0)),
        ("balance_notify_days", json!(31)),
        ("balance_notify_days", json!("3")),
        ("mark_read_on_open", json!(1)),
        ("phone_format", json!("+7 (XXX)")),
        ("colour", json!("red")),
    ] {
        let msg =
            s.d.fails(
                "settings.set",
                json!({"account": s.acc, "actor": s.admin, "key": key, "value": value}),
                "invalid_value",
            )
            .await;
        assert!(!msg.is_empty());
    }
    assert_eq!(
        s.d.ok("settings.get", json!({"account": s.acc})).await,
        got,
        "nothing changed"
    );
}

/// SPEC §5 phone masks: digits fill '#', punctuation may be typed or left out.
/// Under "+7 (###) ###-##-##": "+7 (916) 123-45-67" fits; "89161234567" does not,
/// because its first digit 8 contradicts the mask's fixed 7 (8 is a trunk prefix).
#[tokio::test(flavor = "multi_thread")]
async fn phone_mask_accepts_and_rejects() {
    let s = setup(Backend::Sqlite).await;
    let mask = "+7 (###) ###-##-##";
    s.d.ok(
        "settings.set",
        json!({"account": s.acc, "actor": s.admin, "key": "phone_format", "value": mask}),
    )
    .await;
    let create = |phone: &str| json!({"account": s.acc, "actor": s.op1, "channel": s.channel, "phone": phone});
    for ok in ["+7 (916) 123-45-67", "79161234567", "916 123 45 67"] {
        let chat = s.d.ok("chat.create", create(ok)).await;
        assert_eq!(chat["external_chat_id"], "+79161234567", "{ok}");
    }
    let chats = s.d.ok("chat.list", json!({"account": s.acc})).await;
    assert_eq!(
        chats.as_array().map(Vec::len),
        Some(1),
        "one contact, one chat"
    );
    for bad in ["89161234567", "+7 916 123", "+7 (916) 123-45-6x"] {
        let msg = s.d.fails("chat.create", create(bad), "invalid_value").await;
        assert!(msg.contains(mask), "names the expected mask: {msg}");
    }
    s.d.ok(
        "settings.set",
        json!({"account": s.acc, "actor": s.admin, "key": "phone_format", "value": "none"}),
    )
    .await;
    s.d.ok("chat.create", create("+44 20 7946 0958")).await;
    s.d.fails("chat.create", create("1234"), "invalid_value")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn additional_fields_on_the_chat_card() {
    let s = setup(Backend::Sqlite).await;
    deliver(&s, "c1", "m1").await;
    let chat = the_chat(&s).await;
    let add = |name: &str, t: &str, options: Value| json!({"account": s.acc, "actor": s.admin, "name": name, "type": t, "options": options});
    let mut ids = std::collections::HashMap::new();
    for (name, t, good, bad) in [
        ("Comment", "text", json!("likes tea"), json!(42)),
        ("Orders", "number", json!(3), json!("three")),
        ("Birthday", "date", json!("1990-02-28"), json!("1990-02-30")),
        (
            "Site",
            "link",
            json!("https://client.test/"),
            json!("javascript:alert(1)"),
        ),
        ("Work mail", "email", json!("c@work.test"), json!("c@")),
        (
            "Second phone",
            "phone",
            json!("+7 916 000-00-00"),
            json!("call me"),
        ),
        ("Consent", "checkbox", json!(true), json!("yes")),
    ] {
        let f = s.d.ok("field.add", add(name, t, Value::Null)).await;
        let id = f["id"].as_i64().expect("id");
        ids.insert(name, id);
        s.d.ok(
            "chat.set_field",
            json!({"chat": chat["id"], "actor": s.op1, "field": id, "value": good}),
        )
        .await;
        s.d.fails(
            "chat.set_field",
            json!({"chat": chat["id"], "actor": s.op1, "field": id, "value": bad}),
            "invalid_value",
        )
        .await;
    }
    let tier =
        s.d.ok("field.add", add("Tier", "list", json!(["new", "vip"])))
            .await["id"]
            .clone();
    s.d.ok(
        "chat.set_field",
        json!({"chat": chat["id"], "actor": s.op1, "field": tier, "value": "vip"}),
    )
    .await;
    s.d.fails(
        "chat.set_field",
        json!({"chat": chat["id"], "actor": s.op1, "field": tier, "value": "gold"}),
        "invalid_value",
    )
    .await;

    s.d.fails("field.add", add("tier", "text", Value::Null), "conflict")
        .await;
    s.d.fails(
        "field.add",
        add("E-mail", "text", Value::Null),
        "invalid_value",
    )
    .await;
    s.d.fails(
        "field.add",
        add("Size", "list", Value::Null),
        "invalid_value",
    )
    .await;
    s.d.fails(
        "field.add",
        add("Size", "colour", Value::Null),
        "invalid_value",
    )
    .await;

    let card = s.d.ok("chat.get", json!({"chat": chat["id"]})).await;
    let value = |name: &str| {
        card["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| f["value"].clone())
    };
    assert_eq!(value("Second phone"), Some(json!("+79160000000")));
    assert_eq!(value("Tier"), Some(json!("vip")));
    assert_eq!(value("Birthday"), Some(json!("1990-02-28")));

    s.d.ok(
        "field.remove",
        json!({"account": s.acc, "actor": s.admin, "field": ids["Comment"]}),
    )
    .await;
    let card = s.d.ok("chat.get", json!({"chat": chat["id"]})).await;
    assert!(
        card["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .all(|f| f["name"] != "Comment")
    );
    assert_eq!(
        s.d.ok("field.list", json!({"account": s.acc}))
            .await
            .as_array()
            .map(Vec::len),
        Some(7)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_are_refused_every_admin_only_method() {
    let s = setup(Backend::Sqlite).await;
    let before_channels = s.d.ok("channel.list", json!({"account": s.acc})).await;
    let before_settings = s.d.ok("settings.get", json!({"account": s.acc})).await;
    let field =
        s.d.ok(
            "field.add",
            json!({"account": s.acc, "actor": s.admin, "name": "Tier", "type": "text"}),
        )
        .await;
    for (method, params) in [
        (
            "channel.add",
            json!({"account": s.acc, "actor": s.op1, "kind": "loopback", "name": "x", "config": {}}),
        ),
        (
            "channel.remove",
            json!({"account": s.acc, "actor": s.op1, "channel": s.channel}),
        ),
        (
            "settings.set",
            json!({"account": s.acc, "actor": s.op1, "key": "mark_read_on_open", "value": false}),
        ),
        (
            "field.add",
            json!({"account": s.acc, "actor": s.op1, "name": "Other", "type": "text"}),
        ),
        (
            "field.remove",
            json!({"account": s.acc, "actor": s.op1, "field": field["id"]}),
        ),
    ] {
        let msg = s.d.fails(method, params, "forbidden").await;
        assert!(msg.contains("only administrators may"), "{method}: {msg}");
    }
    // A user of another account may not act here at all.
    let (_, stranger) = s.d.account("other").await;
    s.d.fails(
        "settings.set",
        json!({"account": s.acc, "actor": stranger, "key": "mark_read_on_open", "value": false}),
        "forbidden",
    )
    .await;
    assert_eq!(
        s.d.ok("channel.list", json!({"account": s.acc})).await,
        before_channels
    );
    assert_eq!(
        s.d.ok("settings.get", json!({"account": s.acc})).await,
        before_settings
    );
    assert_eq!(
        s.d.ok("field.list", json!({"account": s.acc}))
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn message_send_is_delivered_through_the_connector() {
    let s = setup(Backend::Sqlite).await;
    deliver(&s, "c1", "m1").await;
    let chat = the_chat(&s).await;
    let sent =
        s.d.ok(
            "message.send",
            json!({"chat": chat["id"], "actor": s.op1, "text": "Hello!"}),
        )
        .await;
    s.d.job_until(
        sent["job"].as_str().expect("job"),
        &["done"],
        Duration::from_secs(20),
    )
    .await;
    s.d.until("delivered receipt", Duration::from_secs(20), || async {
        let msgs = s.d.ok("chat.messages", json!({"chat": chat["id"]})).await;
        let out = msgs
            .as_array()?
            .iter()
            .find(|m| m["id"] == sent["message"])?
            .clone();
        (out["status"] == "delivered" && out["external_message_id"].is_string()).then_some(())
    })
    .await;
    s.d.fails(
        "message.send",
        json!({"chat": chat["id"], "actor": s.op1, "text": "  "}),
        "invalid_value",
    )
    .await;
    // A malformed inbound payload is dead at once, with the reason.
    let r =
        s.d.ok("job.enqueue", inbound(s.channel, "c2", "m9", "not a phone"))
            .await;
    let dead =
        s.d.job_until(
            r["id"].as_str().expect("id"),
            &["dead"],
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(dead["attempts"], 1);
    assert!(
        dead["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("not a phone number"),
        "{dead}"
    );
}
