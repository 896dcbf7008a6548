//! Chats, settings and additional fields (SPEC §5), each rule its own test, through the
//! real socket; the inbound_message job is enqueued directly with `job.enqueue`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, ctl};

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

/// Stored values of a field, counted in the daemon's own store.
async fn field_values_in_store(d: &Daemon, field: i64) -> i64 {
    d.store_scalar(
        "SELECT COUNT(*) FROM field_values WHERE field_id = $1",
        &[field.into()],
    )
    .await
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

async fn close_without_reset_keeps_the_responsible_user(backend: Backend) {
    let s = setup(backend).await;
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
async fn without_reset_close_keeps_the_responsible_user_sqlite() {
    close_without_reset_keeps_the_responsible_user(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_reset_close_keeps_the_responsible_user_redis() {
    close_without_reset_keeps_the_responsible_user(Backend::Redis).await;
}

async fn opening_marks_read_only_when_on(backend: Backend) {
    let s = setup(backend).await;
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
async fn mark_read_on_open_on_and_off_sqlite() {
    opening_marks_read_only_when_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mark_read_on_open_on_and_off_redis() {
    opening_marks_read_only_when_on(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_defaults_and_validation() {
    let s = setup(Backend::Sqlite).await;
    let got = s.d.ok("settings.get", json!({"account": s.acc})).await;
    assert_eq!(
        got,
        json!({"reset_responsible_on_close": false, "mark_read_on_open": true, "phone_format": "none", "balance_notify_days": 3})
    );
    let set = |key: &str, value: Value| json!({"account": s.acc, "actor": s.admin, "key": key, "value": value});
    // The ends of the range are allowed; set returns the settings as they now are.
    for days in [1, 30] {
        let now =
            s.d.ok("settings.set", set("balance_notify_days", json!(days)))
                .await;
        assert_eq!(now["balance_notify_days"], days);
    }
    s.d.ok("settings.set", set("balance_notify_days", json!(3)))
        .await;
    for (key, value, says) in [
        ("balance_notify_days", json!(0), "from 1 to 30"),
        ("balance_notify_days", json!(31), "from 1 to 30"),
        ("balance_notify_days", json!("3"), "from 1 to 30"),
        ("mark_read_on_open", json!(1), "true or false"),
        ("phone_format", json!("+7 (XXX)"), "\"+7 (###) ###-##-##\""),
        // No country code: no phone could ever fit these.
        (
            "phone_format",
            json!("8 (###) ###-##-##"),
            "starts with '+' and the country calling code",
        ),
        (
            "phone_format",
            json!("(###) ###-####"),
            "starts with '+' and the country calling code",
        ),
        (
            "phone_format",
            json!("+0 (###) ###-##-##"),
            "does not begin with a country calling code",
        ),
        (
            "colour",
            json!("red"),
            "settings are reset_responsible_on_close",
        ),
    ] {
        let msg =
            s.d.fails("settings.set", set(key, value.clone()), "invalid_value")
                .await;
        assert!(msg.contains(says), "{key} = {value}: {msg}");
    }
    assert_eq!(
        s.d.ok("settings.get", json!({"account": s.acc})).await,
        got,
        "nothing changed"
    );
}

/// settings.set stores only the setting it changes: administrators changing different
/// settings at the same time never undo each other's change.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_settings_changes_all_stick() {
    let s = setup(Backend::Sqlite).await;
    let set = |key: &str, value: Value| json!({"account": s.acc, "actor": s.admin, "key": key, "value": value});
    for round in 0..20_i64 {
        let (days, read, reset) = (1 + round % 30, round % 2 == 0, round % 3 == 0);
        let mask = if round % 2 == 0 {
            "+7 (###) ###-##-##"
        } else {
            "none"
        };
        tokio::join!(
            s.d.ok("settings.set", set("balance_notify_days", json!(days))),
            s.d.ok("settings.set", set("mark_read_on_open", json!(read))),
            s.d.ok(
                "settings.set",
                set("reset_responsible_on_close", json!(reset))
            ),
            s.d.ok("settings.set", set("phone_format", json!(mask))),
        );
        assert_eq!(
            s.d.ok("settings.get", json!({"account": s.acc})).await,
            json!({"reset_responsible_on_close": reset, "mark_read_on_open": read,
                   "phone_format": mask, "balance_notify_days": days}),
            "round {round}"
        );
    }
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
    // Why 89161234567 is refused: 11 digits fill the whole mask, fixed 7 included.
    let msg =
        s.d.fails("chat.create", create("89161234567"), "invalid_value")
            .await;
    assert!(msg.contains("the mask has 7 where 8 was typed"), "{msg}");
    s.d.ok(
        "settings.set",
        json!({"account": s.acc, "actor": s.admin, "key": "phone_format", "value": "none"}),
    )
    .await;
    s.d.ok("chat.create", create("+44 20 7946 0958")).await;
    s.d.fails("chat.create", create("1234"), "invalid_value")
        .await;
}

async fn fields_on_the_chat_card(backend: Backend) {
    let s = setup(backend).await;
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

    // Phone fields: libphonenumber-checked, stored E.164, typed in the mask or
    // internationally; a trunk-prefixed national number fits neither.
    s.d.ok(
        "settings.set",
        json!({"account": s.acc, "actor": s.admin, "key": "phone_format", "value": "+7 (###) ###-##-##"}),
    )
    .await;
    let phone = ids["Second phone"];
    for (typed, stored) in [
        ("916 123 45 67", "+79161234567"),
        ("+44 20 7946 0958", "+442079460958"),
    ] {
        let r =
            s.d.ok(
                "chat.set_field",
                json!({"chat": chat["id"], "actor": s.op1, "field": phone, "value": typed}),
            )
            .await;
        assert_eq!(r["value"], stored, "{typed}");
    }
    for bad in ["89161234567", "+7 000 000-00-00"] {
        let msg =
            s.d.fails(
                "chat.set_field",
                json!({"chat": chat["id"], "actor": s.op1, "field": phone, "value": bad}),
                "invalid_value",
            )
            .await;
        assert!(msg.contains("not a valid phone number"), "{bad}: {msg}");
    }

    let comment = ids["Comment"];
    assert_eq!(field_values_in_store(&s.d, comment).await, 1);
    s.d.ok(
        "field.remove",
        json!({"account": s.acc, "actor": s.admin, "field": comment}),
    )
    .await;
    assert_eq!(
        field_values_in_store(&s.d, comment).await,
        0,
        "removing a field removes its values"
    );
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
async fn additional_fields_on_the_chat_card_sqlite() {
    fields_on_the_chat_card(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn additional_fields_on_the_chat_card_redis() {
    fields_on_the_chat_card(Backend::Redis).await;
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
        ("data.delete", json!({"account": s.acc, "actor": s.op1})),
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
        s.d.ok("data.deletion_status", json!({"account": s.acc}))
            .await,
        Value::Null,
        "no deletion run was started"
    );
    assert_eq!(
        s.d.ok("field.list", json!({"account": s.acc}))
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

async fn send_is_delivered_and_bad_inbound_is_dead(backend: Backend) {
    let s = setup(backend).await;
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
    // A phone the messenger reported that is no phone number is no key to a contact,
    // but the message is stored all the same (in a chat of its own).
    let r =
        s.d.ok("job.enqueue", inbound(s.channel, "c2", "m9", "not a phone"))
            .await;
    s.d.job_until(
        r["id"].as_str().expect("id"),
        &["done"],
        Duration::from_secs(20),
    )
    .await;
    // A payload that can never be stored (its channel does not exist) is dead at
    // once, with the reason.
    let r =
        s.d.ok(
            "job.enqueue",
            inbound(s.channel + 1000, "c3", "m10", "+79161234567"),
        )
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
            .contains("does not exist"),
        "{dead}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn message_send_and_dead_letters_sqlite() {
    send_is_delivered_and_bad_inbound_is_dead(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn message_send_and_dead_letters_redis() {
    send_is_delivered_and_bad_inbound_is_dead(Backend::Redis).await;
}

/// An inbound message from any sender, at `sent_at`.
fn inbound_from(channel: i64, chat: &str, msg: &str, sender: Value, sent_at: &str) -> Value {
    json!({"kind": "inbound_message", "payload": {
        "channel": channel, "external_chat_id": chat, "external_message_id": msg,
        "sender": sender, "text": format!("text of {msg}"),
        "attachments": [], "sent_at": sent_at}})
}

async fn deliver_from(s: &Setup, chat: &str, msg: &str, sender: Value, sent_at: &str) {
    let r =
        s.d.ok(
            "job.enqueue",
            inbound_from(s.channel, chat, msg, sender, sent_at),
        )
        .await;
    s.d.job_until(
        r["id"].as_str().expect("id"),
        &["done"],
        Duration::from_secs(20),
    )
    .await;
}

async fn chat_by_external_id(s: &Setup, external: &str) -> Value {
    let chats = s.d.ok("chat.list", json!({"account": s.acc})).await;
    chats
        .as_array()
        .and_then(|c| c.iter().find(|c| c["external_chat_id"] == external))
        .cloned()
        .unwrap_or_else(|| panic!("no chat {external} in {chats}"))
}

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .expect("time")
        .timestamp_millis()
}

/// Contacts: found by the normalised phone however it is written, else by username;
/// each external chat id is its own chat; last_message_at follows the newest message;
/// chat.messages pages newest first.
async fn inbound_contacts_chats_and_paging(backend: Backend) {
    let s = setup(backend).await;
    let t0 = "2026-11-25T10:00:00Z";
    deliver_from(&s, "c1", "m1", json!({"phone": "79161234567"}), t0).await;
    deliver_from(
        &s,
        "c2",
        "m2",
        json!({"phone": "+7 916 123-45-67", "name": "Ann"}),
        t0,
    )
    .await;
    let (c1, c2) = (
        chat_by_external_id(&s, "c1").await,
        chat_by_external_id(&s, "c2").await,
    );
    assert_ne!(c1["id"], c2["id"], "two external chat ids, two chats");
    assert_eq!(
        c1["contact"], c2["contact"],
        "one contact for both spellings"
    );
    let card = s.d.ok("chat.get", json!({"chat": c1["id"]})).await;
    assert_eq!(card["contact"]["phone"], "+79161234567");
    assert_eq!(
        card["contact"]["name"], "Ann",
        "filled in by the later message"
    );

    deliver_from(
        &s,
        "u1",
        "m3",
        json!({"username": "ann_tg", "name": "Ann T"}),
        t0,
    )
    .await;
    deliver_from(&s, "u2", "m4", json!({"username": "ann_tg"}), t0).await;
    let (u1, u2) = (
        chat_by_external_id(&s, "u1").await,
        chat_by_external_id(&s, "u2").await,
    );
    assert_ne!(u1["id"], u2["id"]);
    assert_eq!(u1["contact"], u2["contact"], "found by username");
    assert_ne!(u1["contact"], c1["contact"]);
    let card = s.d.ok("chat.get", json!({"chat": u1["id"]})).await;
    assert_eq!(card["contact"]["username"], "ann_tg");
    assert_eq!(card["contact"]["phone"], Value::Null);

    // An empty username would make every such sender one contact: refused up front.
    let msg =
        s.d.fails(
            "job.enqueue",
            inbound_from(
                s.channel,
                "u3",
                "m5",
                json!({"phone": "+79160000001", "username": ""}),
                t0,
            ),
            "invalid_value",
        )
        .await;
    assert!(msg.contains("sender.username must not be empty"), "{msg}");

    // last_message_at: the newest message's time; an older one arriving late keeps it.
    assert_eq!(c1["last_message_at"], ms(t0));
    let t1 = "2026-11-25T10:05:00Z";
    deliver_from(&s, "c1", "m6", json!({"phone": "79161234567"}), t1).await;
    assert_eq!(
        chat_by_external_id(&s, "c1").await["last_message_at"],
        ms(t1)
    );
    deliver_from(
        &s,
        "c1",
        "m7",
        json!({"phone": "79161234567"}),
        "2026-11-25T09:00:00Z",
    )
    .await;
    let c1 = chat_by_external_id(&s, "c1").await;
    assert_eq!(c1["last_message_at"], ms(t1));
    assert_eq!(c1["unread"], 3);

    // Paging: newest first, `limit` per page, `before` a message id.
    for m in ["m8", "m9"] {
        deliver_from(&s, "c1", m, json!({"phone": "79161234567"}), t1).await;
    }
    let page = |before: Option<i64>| {
        let d = &s.d;
        let chat = c1["id"].clone();
        async move {
            let msgs = d
                .ok(
                    "chat.messages",
                    json!({"chat": chat, "limit": 2, "before": before}),
                )
                .await;
            msgs.as_array().expect("messages").clone()
        }
    };
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let msgs = page(before).await;
        if msgs.is_empty() {
            break;
        }
        assert!(msgs.len() <= 2);
        before = msgs.last().and_then(|m| m["id"].as_i64());
        seen.extend(
            msgs.iter()
                .map(|m| m["text"].as_str().unwrap_or("").to_owned()),
        );
    }
    assert_eq!(
        seen,
        ["m9", "m8", "m7", "m6", "m1"].map(|m| format!("text of {m}")),
        "newest first, every message once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_contacts_chats_and_paging_sqlite() {
    inbound_contacts_chats_and_paging(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_contacts_chats_and_paging_redis() {
    inbound_contacts_chats_and_paging(Backend::Redis).await;
}

/// Visibility on every chat method: an operator who cannot see a chat (assigned to
/// someone else) may not close it, write in it, set its fields, or get it handed out by
/// chat.create; chat.list filters by status; nobody is made responsible across accounts.
async fn visibility_and_status_filter(backend: Backend) {
    let s = setup(backend).await;
    deliver(&s, "c1", "m1").await;
    let chat = the_chat(&s).await;
    let id = chat["id"].clone();
    s.d.ok(
        "chat.assign",
        json!({"chat": id, "actor": s.admin, "user": s.op1}),
    )
    .await;
    let field =
        s.d.ok(
            "field.add",
            json!({"account": s.acc, "actor": s.admin, "name": "Note", "type": "text"}),
        )
        .await["id"]
            .clone();
    let jobs_before = s.d.ok("job.list", json!({"kind": "chat_close"})).await;
    for (method, params) in [
        ("chat.close", json!({"chat": id, "actor": s.op2})),
        (
            "message.send",
            json!({"chat": id, "actor": s.op2, "text": "hi"}),
        ),
        (
            "chat.set_field",
            json!({"chat": id, "actor": s.op2, "field": field, "value": "x"}),
        ),
        (
            "chat.assign",
            json!({"chat": id, "actor": s.op2, "user": s.op2}),
        ),
    ] {
        let msg = s.d.fails(method, params, "forbidden").await;
        assert!(
            msg.contains("assigned to another user; only they and administrators"),
            "{method}: {msg}"
        );
    }
    let card = s.d.ok("chat.get", json!({"chat": id})).await;
    assert_eq!(card["status"], "open");
    assert_eq!(card["responsible"], s.op1);
    assert_eq!(card["fields"][0]["value"], Value::Null);
    let msgs = s.d.ok("chat.messages", json!({"chat": id})).await;
    assert_eq!(msgs.as_array().map(Vec::len), Some(1), "nothing was sent");
    assert_eq!(
        s.d.ok("job.list", json!({"kind": "chat_close"})).await,
        jobs_before,
        "no chat_close job"
    );

    // A user of another account is never made responsible.
    let (_, stranger) = s.d.account("elsewhere").await;
    let msg =
        s.d.fails(
            "chat.assign",
            json!({"chat": id, "actor": s.admin, "user": stranger}),
            "forbidden",
        )
        .await;
    assert!(msg.contains("does not belong to account"), "{msg}");
    assert_eq!(
        s.d.ok("chat.get", json!({"chat": id})).await["responsible"],
        s.op1
    );

    // chat.create hands out an existing chat only to those who may see it.
    let create = |actor: i64| json!({"account": s.acc, "actor": actor, "channel": s.channel, "phone": "+7 916 555-00-11"});
    let made = s.d.ok("chat.create", create(s.op1)).await;
    s.d.ok(
        "chat.assign",
        json!({"chat": made["id"], "actor": s.admin, "user": s.op1}),
    )
    .await;
    let msg = s.d.fails("chat.create", create(s.op2), "forbidden").await;
    assert!(msg.contains("assigned to another user"), "{msg}");
    assert_eq!(
        s.d.ok("chat.create", create(s.admin)).await["id"],
        made["id"]
    );
    // A closed chat comes back as it is: closed, its responsible user kept.
    close(&s, &made, s.op1).await;
    let again = s.d.ok("chat.create", create(s.op1)).await;
    assert_eq!(again["id"], made["id"]);
    assert_eq!(again["status"], "closed");
    assert_eq!(again["responsible"], s.op1);
    s.d.fails("chat.create", create(s.op2), "forbidden").await;

    // chat.list by status, combined with visibility.
    let list = |status: &str, as_user: Option<i64>| {
        let d = &s.d;
        let params = json!({"account": s.acc, "status": status, "as_user": as_user});
        async move {
            let chats = d.ok("chat.list", params).await;
            chats
                .as_array()
                .expect("chats")
                .iter()
                .map(|c| c["id"].clone())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list("open", None).await, vec![id.clone()]);
    assert_eq!(list("closed", None).await, vec![made["id"].clone()]);
    assert_eq!(list("closed", Some(s.op2)).await, Vec::<Value>::new());
    assert_eq!(list("closed", Some(s.op1)).await, vec![made["id"].clone()]);
    let msg =
        s.d.fails(
            "chat.list",
            json!({"account": s.acc, "status": "archived"}),
            "invalid_value",
        )
        .await;
    assert!(msg.contains("use open or closed"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn visibility_on_every_chat_method_sqlite() {
    visibility_and_status_filter(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn visibility_on_every_chat_method_redis() {
    visibility_and_status_filter(Backend::Redis).await;
}

/// Runs the real patchbayctl; returns (success, stdout, stderr).
fn pb(s: &Setup, args: &[&str]) -> (bool, String, String) {
    let out = ctl(&s.d.config, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `patchbayctl --json …`, which must succeed; its output parsed.
fn pb_json(s: &Setup, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = pb(s, &all);
    assert!(ok, "patchbayctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// patchbayctl for settings, fields and chats: tables for people, --json for scripts,
/// values typed as a person types them, and a non-zero exit with the daemon's reason.
#[tokio::test(flavor = "multi_thread")]
async fn patchbayctl_settings_fields_and_chats() {
    let s = setup(Backend::Sqlite).await;
    let (acc, admin, op1, op2) = (
        s.acc.to_string(),
        s.admin.to_string(),
        s.op1.to_string(),
        s.op2.to_string(),
    );
    let mask = "+7 (###) ###-##-##";
    let (ok, out, err) = pb(
        &s,
        &[
            "settings",
            "set",
            "--account",
            &acc,
            "--actor",
            &admin,
            "phone_format",
            mask,
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("PHONE FORMAT") && out.contains(mask), "{out}");
    let now = pb_json(
        &s,
        &[
            "settings",
            "set",
            "--account",
            &acc,
            "--actor",
            &admin,
            "balance_notify_days",
            "7",
        ],
    );
    assert_eq!(now["balance_notify_days"], 7);
    assert_eq!(now["phone_format"], mask);
    let (ok, _, err) = pb(
        &s,
        &[
            "settings",
            "set",
            "--account",
            &acc,
            "--actor",
            &admin,
            "balance_notify_days",
            "31",
        ],
    );
    assert!(!ok && err.contains("from 1 to 30"), "{err}");

    let tier = pb_json(
        &s,
        &[
            "field",
            "add",
            "--account",
            &acc,
            "--actor",
            &admin,
            "--name",
            "Tier",
            "--type",
            "list",
            "--option",
            "new",
            "--option",
            "vip",
        ],
    );
    assert_eq!(tier["options"], json!(["new", "vip"]));
    let mut field = std::collections::HashMap::new();
    for (name, t) in [
        ("Code", "text"),
        ("Mobile", "phone"),
        ("Orders", "number"),
        ("Consent", "checkbox"),
    ] {
        let f = pb_json(
            &s,
            &[
                "field",
                "add",
                "--account",
                &acc,
                "--actor",
                &admin,
                "--name",
                name,
                "--type",
                t,
            ],
        );
        field.insert(name, f["id"].to_string());
    }
    field.insert("Tier", tier["id"].to_string());
    let (ok, out, _) = pb(&s, &["field", "list", "--account", &acc]);
    assert!(
        // A header and one row per field.
        ok && out.contains("Tier") && out.lines().count() == 6,
        "{out}"
    );

    let chat = pb_json(
        &s,
        &[
            "chat",
            "create",
            "--account",
            &acc,
            "--actor",
            &op1,
            "--channel",
            &s.channel.to_string(),
            "--phone",
            "916 123 45 67",
        ],
    );
    assert_eq!(chat["external_chat_id"], "+79161234567");
    let id = chat["id"].to_string();

    // Each value as typed; the daemon reads it by the field's type.
    for (name, typed, stored) in [
        ("Code", "42", json!("42")),
        ("Code", "89161234567", json!("89161234567")),
        ("Mobile", "79161234567", json!("+79161234567")),
        ("Orders", "42", json!(42)),
        ("Consent", "true", json!(true)),
        ("Tier", "vip", json!("vip")),
    ] {
        let r = pb_json(
            &s,
            &[
                "chat",
                "set-field",
                &id,
                "--actor",
                &op1,
                "--field",
                &field[name],
                typed,
            ],
        );
        assert_eq!(r["value"], stored, "{name} {typed}");
    }
    let (ok, out, err) = pb(
        &s,
        &[
            "chat",
            "set-field",
            &id,
            "--actor",
            &op1,
            "--field",
            &field["Orders"],
            "7",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("VALUE") && out.contains('7'), "a table: {out}");
    let (ok, _, err) = pb(
        &s,
        &[
            "chat",
            "set-field",
            &id,
            "--actor",
            &op1,
            "--field",
            &field["Mobile"],
            "89161234567",
        ],
    );
    assert!(!ok && err.contains("not a valid phone number"), "{err}");
    let cleared = pb_json(
        &s,
        &[
            "chat",
            "set-field",
            &id,
            "--actor",
            &op1,
            "--field",
            &field["Code"],
            "--clear",
        ],
    );
    assert_eq!(cleared["value"], Value::Null);

    let card = pb_json(&s, &["chat", "get", &id]);
    let value = |name: &str| {
        card["fields"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["name"] == name))
            .map(|f| f["value"].clone())
    };
    assert_eq!(value("Code"), Some(Value::Null));
    assert_eq!(value("Mobile"), Some(json!("+79161234567")));
    assert_eq!(value("Orders"), Some(json!(7)));
    let (ok, out, _) = pb(&s, &["chat", "get", &id]);
    assert!(
        ok && out.contains("EXTERNAL CHAT ID") && out.contains("+79161234567"),
        "{out}"
    );

    let (ok, out, _) = pb(&s, &["chat", "list", "--account", &acc]);
    assert!(
        ok && out.contains("+79161234567") && out.lines().count() == 2,
        "{out}"
    );
    let list = pb_json(&s, &["chat", "list", "--account", &acc, "--status", "open"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // Refusals: non-zero exit, the daemon's message and kind on stderr, nothing changed.
    pb_json(
        &s,
        &["chat", "assign", &id, "--actor", &admin, "--user", &op1],
    );
    let (ok, out, err) = pb(
        &s,
        &[
            "chat",
            "set-field",
            &id,
            "--actor",
            &op2,
            "--field",
            &field["Tier"],
            "new",
        ],
    );
    assert!(!ok && out.is_empty(), "{out}");
    assert!(
        err.contains("chat.set_field failed: chat")
            && err.contains("is assigned to another user")
            && err.contains("forbidden"),
        "{err}"
    );
    let (ok, _, err) = pb(
        &s,
        &[
            "settings",
            "set",
            "--account",
            &acc,
            "--actor",
            &op1,
            "mark_read_on_open",
            "false",
        ],
    );
    assert!(
        !ok && err.contains("only administrators may change settings") && err.contains("forbidden"),
        "{err}"
    );
    let card = pb_json(&s, &["chat", "get", &id]);
    let tier_value = card["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "Tier"))
        .map(|f| f["value"].clone());
    assert_eq!(tier_value, Some(json!("vip")));
    assert_eq!(
        pb_json(&s, &["settings", "get", "--account", &acc])["mark_read_on_open"],
        true
    );
}
