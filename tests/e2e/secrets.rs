//! Connector secrets stay secret: the values of the config keys a connector declares
//! secret (telegram `token`, webhook `secret`/`outbound_secret`, loopback `secret`) appear
//! in no control result and nowhere in the daemon's log, also where a connector quotes
//! one in an error, a status reason or a log line; the store keeps the real values, so
//! the connectors still work. And the plugin folder's own permissions are checked.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, install_connector};
use crate::telegram::{BAD_TOKEN, FakeBotApi, TOKEN};

const WEBHOOK_SECRET: &str = "wh-inbound-secret-0123456789";
const WEBHOOK_OUTBOUND: &str = "wh-outbound-secret-9876543210";
const LOOPBACK_SECRET: &str = "lb-secret-quoted-by-its-connector";
/// Given as a number, which loopback refuses with serde's error quoting it.
const NUMBER_SECRET: i64 = 9_876_543_210_123;

fn leaks(text: &str) -> Vec<String> {
    [
        TOKEN.to_owned(),
        BAD_TOKEN.to_owned(),
        WEBHOOK_SECRET.to_owned(),
        WEBHOOK_OUTBOUND.to_owned(),
        LOOPBACK_SECRET.to_owned(),
        NUMBER_SECRET.to_string(),
    ]
    .into_iter()
    .filter(|s| text.contains(s.as_str()))
    .collect()
}

fn assert_clean(what: &str, v: &Value) {
    let text = v.to_string();
    assert!(
        leaks(&text).is_empty(),
        "{what} leaks {:?}: {text}",
        leaks(&text)
    );
}

async fn channel(d: &Daemon, account: i64, id: &Value) -> Option<Value> {
    let list = d.ok("channel.list", json!({"account": account})).await;
    list.as_array()?.iter().find(|c| c["id"] == *id).cloned()
}

#[tokio::test(flavor = "multi_thread")]
async fn declared_secrets_appear_in_no_result_and_no_log_line() {
    let api = FakeBotApi::start();
    let d = Daemon::start_full(Backend::Sqlite, "", |dir| {
        install_connector(dir, "telegram");
        install_connector(dir, "webhook");
    });
    let (acc, admin) = d.account("secrets").await;
    let daemon = &d;
    let add = |name: &str, kind: &str, config: Value| {
        let params =
            json!({"account": acc, "actor": admin, "kind": kind, "name": name, "config": config});
        async move { daemon.ok("channel.add", params).await }
    };
    let telegram = add(
        "bot",
        "telegram",
        json!({"token": TOKEN, "api_base": api.server.url(), "poll_timeout_secs": 1}),
    )
    .await;
    assert_eq!(telegram["config"]["token"], "***", "{telegram}");
    assert_eq!(
        telegram["config"]["api_base"],
        api.server.url(),
        "{telegram}"
    );
    // The fake Bot API answers 401 for this one: errors about a token.
    let refused = add(
        "refused",
        "telegram",
        json!({"token": BAD_TOKEN, "api_base": api.server.url(), "poll_timeout_secs": 1}),
    )
    .await;
    let webhook = add(
        "gw",
        "webhook",
        json!({"secret": WEBHOOK_SECRET, "outbound_secret": WEBHOOK_OUTBOUND,
               "listen": "127.0.0.1:0", "path": "/in"}),
    )
    .await;
    assert_eq!(webhook["config"]["secret"], "***", "{webhook}");
    assert_eq!(webhook["config"]["outbound_secret"], "***", "{webhook}");
    assert_eq!(webhook["config"]["path"], "/in", "{webhook}");
    // loopback logs its secret on purpose, and here reports it in a status reason.
    let quoting = add(
        "quoting",
        "loopback",
        json!({"secret": LOOPBACK_SECRET, "report_error": format!("upstream refused {LOOPBACK_SECRET}")}),
    )
    .await;
    let mistyped = add("mistyped", "loopback", json!({"secret": NUMBER_SECRET})).await;
    assert_eq!(mistyped["config"]["secret"], "***", "{mistyped}");
    for result in [&telegram, &refused, &webhook, &quoting, &mistyped] {
        assert_clean("channel.add", result);
    }
    // A credential put where no config belongs is not echoed either.
    let stray = d
        .fails(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "webhook", "name": "x", "config": WEBHOOK_SECRET}),
            "invalid_value",
        )
        .await;
    assert!(
        stray.contains("got a string") && leaks(&stray).is_empty(),
        "{stray}"
    );

    // Each channel where it ends up: the store kept the real values (telegram and the
    // webhook connect), and what the connectors said is scrubbed.
    let wait = |id: Value, what: &'static str, done: fn(&Value) -> bool| {
        let d = &d;
        async move {
            d.until(what, Duration::from_secs(30), || async {
                channel(d, acc, &id).await.filter(done)
            })
            .await
        }
    };
    wait(telegram["id"].clone(), "telegram connected", |c| {
        c["status"] == "connected"
    })
    .await;
    wait(webhook["id"].clone(), "webhook connected", |c| {
        c["status"] == "connected"
    })
    .await;
    let c = wait(quoting["id"].clone(), "the quoted reason", |c| {
        c["status_reason"] == "upstream refused ***"
    })
    .await;
    assert_clean("channel", &c);
    let c = wait(
        mistyped["id"].clone(),
        "loopback refusing its config",
        |c| c["status"] == "error",
    )
    .await;
    let reason = c["status_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("invalid type: integer `***`"), "{c}");
    wait(refused["id"].clone(), "the refused token", |c| {
        c["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("invalid token"))
    })
    .await;
    d.until("loopback's log line", Duration::from_secs(20), || async {
        d.log().contains("connected with secret ***").then_some(())
    })
    .await;

    let list = d.ok("channel.list", json!({"account": acc})).await;
    assert_eq!(list.as_array().map(Vec::len), Some(5), "{list}");
    assert_clean("channel.list", &list);
    assert_clean("status", &d.ok("status", json!({})).await);
    let plugins = d.ok("plugin.list", json!({})).await;
    let secret_keys = |kind: &str| {
        plugins
            .as_array()
            .and_then(|l| l.iter().find(|p| p["kind"] == kind))
            .map(|p| p["secret_keys"].clone())
    };
    assert_eq!(secret_keys("telegram"), Some(json!(["token"])), "{plugins}");
    assert_eq!(
        secret_keys("webhook"),
        Some(json!(["secret", "outbound_secret"])),
        "{plugins}"
    );
    assert_eq!(
        secret_keys("loopback"),
        Some(json!(["secret"])),
        "{plugins}"
    );
    for ch in list.as_array().into_iter().flatten() {
        let removed = d
            .ok(
                "channel.remove",
                json!({"account": acc, "actor": admin, "channel": ch["id"]}),
            )
            .await;
        assert_eq!(removed["status"], "removed", "{removed}");
        assert_clean("channel.remove", &removed);
    }
    // The token did reach the Bot API: the connector got the real value.
    assert!(
        api.server
            .requests()
            .iter()
            .any(|r| r.path == format!("/bot{TOKEN}/getMe")),
        "no getMe with the real token"
    );
    let log = d.log();
    assert!(
        leaks(&log).is_empty(),
        "the log leaks {:?}:\n{log}",
        leaks(&log)
    );
}

/// A plugin folder others may write to is refused, one line per library in it, and the
/// daemon runs on without connectors; fixing the folder lets a rescan load them.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_writable_plugin_folder_is_refused() {
    let d = Daemon::start_full(Backend::Sqlite, "", |dir| {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o770)).expect("chmod");
    });
    let line = "libloopback.so: folder ";
    d.until("the refusal", Duration::from_secs(20), || async {
        d.log().contains(line).then_some(())
    })
    .await;
    let log = d.log();
    let refusal = log
        .lines()
        .find(|l| l.contains(line))
        .expect("refusal line");
    assert!(
        refusal.contains("plugins is group- or world-writable (mode 0770); refusing to load it"),
        "{refusal}"
    );
    assert_eq!(d.ok("plugin.list", json!({})).await, json!([]));

    let plugins = d.dir.path().join("plugins");
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let pid = d.ok("status", json!({})).await["pid"]
        .as_u64()
        .expect("pid");
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    d.until(
        "loopback loaded on rescan",
        Duration::from_secs(20),
        || async {
            let list = d.ok("plugin.list", json!({})).await;
            (list.as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    assert_eq!(d.log().matches(line).count(), 1, "{}", d.log());
}
