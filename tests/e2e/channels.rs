//! Connector plugins in the real daemon: many loopback channels at once, failures and
//! panics contained to their channel, ABI refusals, and a connector written in C.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, compile_c, loopback_library};

async fn messages(d: &Daemon, account: i64) -> Vec<Value> {
    let chats = d
        .ok("chat.list", json!({"account": account, "limit": 10000}))
        .await;
    let mut out = Vec::new();
    for chat in chats.as_array().expect("chats") {
        let m = d
            .ok("chat.messages", json!({"chat": chat["id"], "limit": 1000}))
            .await;
        out.extend(m.as_array().expect("messages").iter().cloned());
    }
    out
}

/// 50 loopback channels in 5 accounts, each sending 20 messages from 2 clients and
/// receiving one reply per chat: every message is stored exactly once and every
/// reply is delivered.
async fn fifty_channels(backend: Backend) {
    let d = Daemon::start(backend);
    let mut accounts = Vec::new();
    for a in 0..5 {
        let (acc, admin) = d.account(&format!("many{a}")).await;
        for c in 0..10 {
            let cfg = json!({
                "number": format!("+1555{a}{c:03}0000"), "display_name": format!("lb {a}/{c}"),
                "rate_per_sec": 40, "limit": 20, "clients": 2, "id_prefix": format!("a{a}c{c}"),
            });
            d.loopback(acc, admin, cfg).await;
        }
        accounts.push((acc, admin));
    }
    let status = d.ok("status", json!({})).await;
    assert_eq!(status["channels"]["connected"], 50, "{status}");
    for &(acc, _) in &accounts {
        d.until("200 inbound messages", Duration::from_secs(60), || async {
            let n = messages(&d, acc)
                .await
                .iter()
                .filter(|m| m["direction"] == "in")
                .count();
            assert!(n <= 200, "more messages than sent: {n}");
            (n == 200).then_some(())
        })
        .await;
    }
    for &(acc, admin) in &accounts {
        let all = messages(&d, acc).await;
        let ids: HashSet<&str> = all
            .iter()
            .filter_map(|m| m["external_message_id"].as_str())
            .collect();
        assert_eq!(ids.len(), 200, "external ids are unique: nothing doubled");
        let chats = d.ok("chat.list", json!({"account": acc})).await;
        assert_eq!(
            chats.as_array().map(Vec::len),
            Some(20),
            "10 channels x 2 clients"
        );
        for chat in chats.as_array().expect("chats") {
            d.ok(
                "message.send",
                json!({"chat": chat["id"], "actor": admin, "text": "thanks!"}),
            )
            .await;
        }
    }
    for &(acc, _) in &accounts {
        d.until("20 replies delivered", Duration::from_secs(60), || async {
            let out: Vec<Value> = messages(&d, acc)
                .await
                .into_iter()
                .filter(|m| m["direction"] == "out")
                .collect();
            assert!(out.len() <= 20);
            (out.len() == 20 && out.iter().all(|m| m["status"] == "delivered")).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_channels_in_five_accounts_sqlite() {
    fifty_channels(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_channels_in_five_accounts_redis() {
    fifty_channels(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_and_panics_stay_in_their_channel() {
    let d = Daemon::start(Backend::Sqlite);
    let (acc, admin) = d.account("faults").await;
    let healthy = d
        .loopback(
            acc,
            admin,
            json!({"rate_per_sec": 20, "clients": 1, "id_prefix": "ok"}),
        )
        .await;

    // A connector that cannot start: error with its reason, retried with backoff.
    let broken = d
        .ok("channel.add", json!({"account": acc, "actor": admin, "kind": "loopback", "name": "broken", "config": {"fail_start": true}}))
        .await["id"]
        .as_i64()
        .expect("id");
    d.until(
        "broken channel in error",
        Duration::from_secs(20),
        || async {
            let list = d.ok("channel.list", json!({"account": acc})).await;
            let c = list.as_array()?.iter().find(|c| c["id"] == broken)?.clone();
            (c["status"] == "error" && c["status_reason"].as_str()?.contains("failed to start"))
                .then_some(())
        },
    )
    .await;

    // A connector that panics on send: the channel goes to error, is restarted and
    // reconnects; the daemon and the healthy channel carry on.
    let panicky = d
        .loopback(
            acc,
            admin,
            json!({"rate_per_sec": 5, "clients": 1, "panic_on_send": true, "id_prefix": "pp"}),
        )
        .await;
    let chat = d
        .until(
            "a chat on the panicky channel",
            Duration::from_secs(20),
            || async {
                let chats = d.ok("chat.list", json!({"account": acc})).await;
                chats
                    .as_array()?
                    .iter()
                    .find(|c| c["channel"] == panicky)
                    .map(|c| c["id"].clone())
            },
        )
        .await;
    d.ok(
        "message.send",
        json!({"chat": chat, "actor": admin, "text": "boom"}),
    )
    .await;
    d.until(
        "panic logged and channel restarted",
        Duration::from_secs(30),
        || async {
            d.log()
                .contains("the connector panicked; restarting it")
                .then_some(())
        },
    )
    .await;
    d.until(
        "panicky channel reconnected",
        Duration::from_secs(30),
        || async {
            let list = d.ok("channel.list", json!({"account": acc})).await;
            list.as_array()?
                .iter()
                .any(|c| c["id"] == panicky && c["status"] == "connected")
                .then_some(())
        },
    )
    .await;

    // Malformed events are logged and dropped; the good ones among them are stored.
    let noisy = d.loopback(acc, admin, json!({"rate_per_sec": 50, "limit": 30, "clients": 1, "malformed_events": true, "id_prefix": "nz"})).await;
    d.until(
        "malformed events dropped",
        Duration::from_secs(20),
        || async {
            d.log()
                .contains("dropping a malformed connector event")
                .then_some(())
        },
    )
    .await;
    d.until(
        "noisy channel's good messages",
        Duration::from_secs(20),
        || async {
            let chats = d.ok("chat.list", json!({"account": acc})).await;
            chats
                .as_array()?
                .iter()
                .any(|c| c["channel"] == noisy)
                .then_some(())
        },
    )
    .await;

    let list = d.ok("channel.list", json!({"account": acc})).await;
    let h = list
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["id"] == healthy)
        .cloned()
        .expect("healthy");
    assert_eq!(
        h["status"], "connected",
        "the healthy channel was untouched: {h}"
    );
    assert!(
        d.ok("status", json!({})).await.is_object(),
        "daemon still answers"
    );

    // Removing a channel stops its connector; its history stays.
    d.ok(
        "channel.remove",
        json!({"account": acc, "actor": admin, "channel": healthy}),
    )
    .await;
    let list = d.ok("channel.list", json!({"account": acc})).await;
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .all(|c| c["id"] != healthy)
    );
    let plugins = d.ok("plugin.list", json!({})).await;
    assert_eq!(plugins[0]["kind"], "loopback");
}

#[tokio::test(flavor = "multi_thread")]
async fn abi_refusals_and_a_connector_written_in_c() {
    let d = Daemon::start_full(Backend::Sqlite, "", |dir| {
        compile_c("hello_connector.c", &dir.join("libhello.so"));
        compile_c("wrong_version.c", &dir.join("libwrongversion.so"));
        compile_c("no_symbol.c", &dir.join("libnosymbol.so"));
        let writable = dir.join("libwritable.so");
        std::fs::copy(loopback_library(), &writable).expect("copy");
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    });
    // The socket accepts before the plugin scan is logged: wait for the scan.
    d.until("the plugin scan", Duration::from_secs(20), || async {
        d.log().contains("libwritable.so").then_some(())
    })
    .await;
    let log = d.log();
    assert!(log.contains("libwrongversion.so: ABI version 999"), "{log}");
    assert!(
        log.contains("libnosymbol.so: no entry symbol `patchbay_connector_v1`"),
        "{log}"
    );
    assert!(
        log.contains("libwritable.so: group- or world-writable"),
        "{log}"
    );
    let kinds: Vec<String> = d
        .ok("plugin.list", json!({}))
        .await
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["kind"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(kinds, ["hello", "loopback"]);

    let (acc, admin) = d.account("c").await;
    let ch = d
        .ok(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "hello", "name": "C", "config": {}}),
        )
        .await;
    let chat = d
        .until(
            "the C connector's inbound message",
            Duration::from_secs(20),
            || async {
                let chats = d.ok("chat.list", json!({"account": acc})).await;
                chats.as_array()?.first().cloned()
            },
        )
        .await;
    let msgs = d.ok("chat.messages", json!({"chat": chat["id"]})).await;
    assert_eq!(msgs[0]["external_message_id"], "hello-1");
    let list = d.ok("channel.list", json!({"account": acc})).await;
    assert_eq!(list[0]["number"], "+15550001000");
    assert_eq!(list[0]["id"], ch["id"]);
    d.ok(
        "message.send",
        json!({"chat": chat["id"], "actor": admin, "text": "hi from Rust"}),
    )
    .await;
    d.until("C connector receipt", Duration::from_secs(20), || async {
        let msgs = d.ok("chat.messages", json!({"chat": chat["id"]})).await;
        msgs.as_array()?
            .iter()
            .any(|m| m["direction"] == "out" && m["status"] == "delivered")
            .then_some(())
    })
    .await;
}
