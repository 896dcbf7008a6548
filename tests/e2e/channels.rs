//! Connector plugins in the real daemon: many loopback channels at once, failures and
//! panics contained to their channel and recovered from, channels coming back after a
//! daemon restart, refused plugin files (ABI, unresolved symbols, duplicates, unsafe
//! files, each logged once), and a connector written in C.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, compile_c, loopback_library};

pub(crate) async fn messages(d: &Daemon, account: i64) -> Vec<Value> {
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
    // Inbound messages skip the journal only on a queue that loses no acknowledged push.
    let mode = match backend {
        Backend::Redis | Backend::RedisEverysec => {
            "inbound messages are journalled before they are queued"
        }
        Backend::Sqlite | Backend::RedisAof => "inbound messages are queued without journal rows",
    };
    d.until(
        "the inbound mode in the log",
        Duration::from_secs(10),
        || async { d.log().contains(mode).then_some(()) },
    )
    .await;
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
    // Inbound jobs queued from connector events enter the journal when their batch
    // stores them: one done row per message, with no copy of its text or sender.
    let jobs = d
        .ok(
            "job.list",
            json!({"kind": "inbound_message", "state": "done", "limit": 5000}),
        )
        .await;
    let jobs = jobs.as_array().expect("jobs");
    let keys: HashSet<(i64, &str)> = jobs
        .iter()
        .map(|j| {
            let p = &j["payload"];
            assert_eq!(p.as_object().map(|o| o.len()), Some(2), "scrubbed: {j}");
            let key = (p["channel"].as_i64(), p["external_message_id"].as_str());
            (key.0.expect("channel"), key.1.expect("external id"))
        })
        .collect();
    assert_eq!(
        (jobs.len(), keys.len()),
        (1000, 1000),
        "one job per message"
    );
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
async fn fifty_channels_in_five_accounts_redis_with_an_append_only_file() {
    fifty_channels(Backend::RedisAof).await;
}

const JOURNALLED: &str = "inbound messages are journalled before they are queued";
const UNJOURNALLED: &str = "inbound messages are queued without journal rows";

/// Redis' default `appendfsync everysec` can lose the last second of acknowledged
/// pushes when Redis dies: inbound messages are journalled first there, unless the
/// operator opts in with `queue.redis_trust_everysec`; `appendfsync always` loses none.
#[tokio::test(flavor = "multi_thread")]
async fn inbound_messages_skip_the_journal_only_where_redis_loses_no_push() {
    let always = Daemon::start(Backend::RedisAof);
    let mut everysec = Daemon::start(Backend::RedisEverysec);
    for (d, mode) in [(&always, UNJOURNALLED), (&everysec, JOURNALLED)] {
        d.until(
            "the inbound mode in the log",
            Duration::from_secs(10),
            || async { d.log().contains(mode).then_some(()) },
        )
        .await;
    }
    assert!(!everysec.log().contains(UNJOURNALLED), "{}", everysec.log());
    // The explicit switch: everysec trusted. Stopped once it answers (its SIGTERM
    // handler is installed by then; the mode line comes earlier in the start).
    everysec.ok("status", json!({})).await;
    assert_eq!(everysec.terminate(), Some(0));
    let config = std::fs::read_to_string(&everysec.config).expect("config");
    let trusting = config.replacen("[queue]\n", "[queue]\nredis_trust_everysec = true\n", 1);
    assert_ne!(config, trusting);
    std::fs::write(&everysec.config, trusting).expect("config");
    everysec.spawn();
    everysec
        .until(
            "the trusted mode in the log",
            Duration::from_secs(10),
            || async { everysec.log().contains(UNJOURNALLED).then_some(()) },
        )
        .await;
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
        compile_c("unresolved_symbol.c", &dir.join("libunresolved.so"));
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
    // Bound at load, so refused there instead of crashing the daemon at its first call.
    assert!(
        log.lines()
            .any(|l| l.contains("libunresolved.so: cannot load the library")
                && l.contains("undefined symbol: pb_fixture_function_nobody_defines")),
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

/// The channel `id` as `channel.list` shows it.
async fn channel_of(d: &Daemon, account: i64, id: i64) -> Option<Value> {
    let list = d.ok("channel.list", json!({"account": account})).await;
    list.as_array()?.iter().find(|c| c["id"] == id).cloned()
}

/// Waits until channel `id` has `status` and its reason contains `reason`.
async fn wait_status(d: &Daemon, account: i64, id: i64, status: &str, reason: &str) -> Value {
    d.until(
        &format!("channel {id} {status} ({reason})"),
        Duration::from_secs(60),
        || async {
            let c = channel_of(d, account, id).await?;
            (c["status"] == status && c["status_reason"].as_str().unwrap_or("").contains(reason))
                .then_some(c)
        },
    )
    .await
}

/// Inbound messages stored for channel `id`.
async fn inbound_count(d: &Daemon, account: i64, id: i64) -> usize {
    messages(d, account)
        .await
        .iter()
        .filter(|m| m["channel"] == id && m["direction"] == "in")
        .count()
}

/// Whether a log line is about channel `id` (its `channel=` field, not a longer id).
fn mentions(line: &str, id: i64) -> bool {
    let field = format!("channel={id}");
    line.match_indices(&field)
        .any(|(at, _)| !line[at + field.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

fn add_channel(name: &str, account: i64, actor: i64, config: Value) -> Value {
    json!({"account": account, "actor": actor, "kind": "loopback", "name": name, "config": config})
}

/// A channel whose connector fails shows `error` with the reason and comes back once
/// the fault is gone, with backoff growing meanwhile; a connector that reports an error
/// while running is noticed through its status and replaced; the healthy channel beside
/// them keeps its instance and its traffic throughout.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_channel_shows_its_error_and_recovers_while_others_carry_on() {
    let d = Daemon::start(Backend::Sqlite);
    let (acc, admin) = d.account("recovery").await;
    let healthy = d
        .loopback(
            acc,
            admin,
            json!({"rate_per_sec": 10, "clients": 1, "id_prefix": "hl"}),
        )
        .await;
    d.until("healthy traffic", Duration::from_secs(20), || async {
        (inbound_count(&d, acc, healthy).await > 0).then_some(())
    })
    .await;
    let healthy_before = inbound_count(&d, acc, healthy).await;

    // Its first three starts fail, the fourth succeeds (the last error lasts the 4 s
    // of its backoff: long enough for a poll of a loaded machine to see it).
    let flaky = d
        .ok(
            "channel.add",
            add_channel(
                "flaky",
                acc,
                admin,
                json!({"fail_start": true, "fault_starts": 3, "id_prefix": "fl", "rate_per_sec": 5, "clients": 1}),
            ),
        )
        .await["id"]
        .as_i64()
        .expect("id");
    wait_status(
        &d,
        acc,
        flaky,
        "error",
        "connector failed to start: start_failed: fail_start is set",
    )
    .await;
    wait_status(&d, acc, flaky, "connected", "").await;
    d.until("flaky traffic", Duration::from_secs(20), || async {
        (inbound_count(&d, acc, flaky).await > 0).then_some(())
    })
    .await;
    let log = d.log();
    let retries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fail_start is set") && mentions(l, flaky))
        .filter(|l| l.contains("retry_in="))
        .collect();
    assert_eq!(retries.len(), 3, "three failed starts: {retries:?}");
    assert!(
        retries[0].contains("retry_in=1s")
            && retries[1].contains("retry_in=2s")
            && retries[2].contains("retry_in=4s"),
        "the backoff grows: {retries:?}"
    );

    // Connects, then reports an error while its threads run on: the status polls see
    // it, and after the grace period the instance is replaced by a clean one.
    let outage = d
        .ok(
            "channel.add",
            add_channel(
                "outage",
                acc,
                admin,
                json!({"report_error": "simulated outage", "fault_starts": 1, "id_prefix": "ou", "rate_per_sec": 5, "clients": 1}),
            ),
        )
        .await["id"]
        .as_i64()
        .expect("id");
    wait_status(&d, acc, outage, "error", "simulated outage").await;
    assert_eq!(
        inbound_count(&d, acc, outage).await,
        0,
        "no traffic in error"
    );
    d.until(
        "the outage noticed and the connector replaced",
        Duration::from_secs(60),
        || async {
            let replaced = d.log().lines().any(|l| {
                mentions(l, outage)
                    && l.contains("the connector has reported an error for")
                    && l.contains("(simulated outage); restarting it")
            });
            let c = channel_of(&d, acc, outage).await?;
            (replaced && c["status"] == "connected").then_some(())
        },
    )
    .await;
    d.until(
        "traffic after the recovery",
        Duration::from_secs(20),
        || async { (inbound_count(&d, acc, outage).await > 0).then_some(()) },
    )
    .await;

    // The healthy channel never noticed: same instance, traffic all along.
    let h = channel_of(&d, acc, healthy).await.expect("healthy channel");
    assert_eq!(h["status"], "connected", "{h}");
    assert!(inbound_count(&d, acc, healthy).await > healthy_before + 20);
    let healthy_starts = d
        .log()
        .lines()
        .filter(|l| mentions(l, healthy) && l.contains("loopback +15550000000 connected"))
        .count();
    assert_eq!(healthy_starts, 1, "the healthy channel was never restarted");
}

/// Every active channel starts again when the daemon restarts, and `plugin.list` counts
/// every channel of a kind that is not removed, running or not.
#[tokio::test(flavor = "multi_thread")]
async fn channels_start_again_when_the_daemon_restarts() {
    let mut d = Daemon::start(Backend::Sqlite);
    let (acc, admin) = d.account("restart").await;
    let mut running = Vec::new();
    for name in ["a", "b"] {
        let number = if name == "a" {
            "+15550000201"
        } else {
            "+15550000202"
        };
        let ch = d
            .loopback(
                acc,
                admin,
                json!({"rate_per_sec": 10, "clients": 1, "number": number}),
            )
            .await;
        running.push(ch);
    }
    // Fails every start: it is not running, but it still uses the connector.
    let broken = d
        .ok(
            "channel.add",
            add_channel("broken", acc, admin, json!({"fail_start": true})),
        )
        .await["id"]
        .as_i64()
        .expect("id");
    wait_status(&d, acc, broken, "error", "failed to start").await;
    let loopback_channels = |list: Value| {
        list.as_array()
            .and_then(|l| l.iter().find(|p| p["kind"] == "loopback"))
            .map(|p| p["channels"].clone())
    };
    assert_eq!(
        loopback_channels(d.ok("plugin.list", json!({})).await),
        Some(json!(3))
    );

    let mut before = Vec::new();
    for &ch in &running {
        let n = d
            .until(
                "traffic before the restart",
                Duration::from_secs(20),
                || async {
                    let n = inbound_count(&d, acc, ch).await;
                    (n > 0).then_some(n)
                },
            )
            .await;
        before.push(n);
    }
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    d.spawn();
    for (&ch, &n) in running.iter().zip(&before) {
        wait_status(&d, acc, ch, "connected", "").await;
        d.until(
            "traffic after the restart",
            Duration::from_secs(30),
            || async { (inbound_count(&d, acc, ch).await > n).then_some(()) },
        )
        .await;
    }
    wait_status(&d, acc, broken, "error", "failed to start").await;
    assert_eq!(
        loopback_channels(d.ok("plugin.list", json!({})).await),
        Some(json!(3))
    );
    d.ok(
        "channel.remove",
        json!({"account": acc, "actor": admin, "channel": running[1]}),
    )
    .await;
    assert_eq!(
        loopback_channels(d.ok("plugin.list", json!({})).await),
        Some(json!(2)),
        "a removed channel does not count"
    );
}

fn signal(pid: u64, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A second library of a kind already loaded, an unsafe file and one owned by a
/// control-socket user (not root, not the daemon's user) are refused with one log line
/// each, which later rescans (SIGHUP) do not repeat until the file changes.
#[tokio::test(flavor = "multi_thread")]
async fn refused_plugin_files_are_logged_once() {
    let root = rustix::process::getuid().is_root();
    // 4242 may use the control socket; that must not let it own plugins.
    let d = Daemon::start_full(
        Backend::Sqlite,
        "[control]\nallowed_uids = [4242]\n",
        |dir| {
            std::fs::copy(loopback_library(), dir.join("libloopback_copy.so")).expect("copy");
            let writable = dir.join("libwritable.so");
            std::fs::copy(loopback_library(), &writable).expect("copy");
            std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o666))
                .expect("chmod");
            if root {
                let foreign = dir.join("libforeign.so");
                compile_c("hello_connector.c", &foreign);
                std::os::unix::fs::chown(&foreign, Some(4242), None).expect("chown");
            }
        },
    );
    let duplicate = r#"libloopback_copy.so: kind "loopback" is already provided by"#;
    let writable = "libwritable.so: group- or world-writable";
    let foreign = "libforeign.so: owned by uid 4242, not by root or the daemon's user";
    d.until("the plugin scan", Duration::from_secs(20), || async {
        d.log().contains(duplicate).then_some(())
    })
    .await;
    let pid = d.ok("status", json!({})).await["pid"]
        .as_u64()
        .expect("pid");
    let reloads = || d.log().matches("configuration reloaded").count();
    let reload = || {
        let done = reloads();
        signal(pid, "HUP");
        crate::harness::wait_for(Duration::from_secs(20), || reloads() > done);
    };
    reload();
    reload();
    let log = d.log();
    assert_eq!(log.matches(duplicate).count(), 1, "{log}");
    assert_eq!(log.matches(writable).count(), 1, "{log}");
    if root {
        assert_eq!(log.matches(foreign).count(), 1, "{log}");
    }
    let kinds: Vec<Value> = d
        .ok("plugin.list", json!({}))
        .await
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["kind"].clone())
        .collect();
    assert_eq!(kinds, [json!("loopback")]);

    // A fixed file is looked at again: now it is only a duplicate, said once.
    let plugins = d.dir.path().join("plugins");
    std::fs::set_permissions(
        plugins.join("libwritable.so"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    reload();
    reload();
    let log = d.log();
    assert_eq!(log.matches(writable).count(), 1, "{log}");
    assert_eq!(
        log.matches(r#"libwritable.so: kind "loopback" is already provided by"#)
            .count(),
        1,
        "{log}"
    );
}

/// Sends `text` through a `misbehaving` C connector (its text picks the misbehaviour)
/// and waits until the message is `failed`; returns the daemon and the message.
async fn send_until_failed(account: &str, extra: &str, text: &str) -> (Daemon, Value) {
    let d = Daemon::start_full(Backend::Sqlite, extra, |dir| {
        compile_c("misbehaving.c", &dir.join("libmisbehaving.so"));
    });
    let (acc, admin) = d.account(account).await;
    let ch = d
        .ok(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "misbehaving", "name": "m", "config": {}}),
        )
        .await["id"]
        .clone();
    let chat = d
        .ok(
            "chat.create",
            json!({"account": acc, "actor": admin, "channel": ch, "phone": "+15550001234"}),
        )
        .await;
    d.ok(
        "message.send",
        json!({"chat": chat["id"], "actor": admin, "text": text}),
    )
    .await;
    let failed = d
        .until("the message failed", Duration::from_secs(30), || async {
            let msgs = d.ok("chat.messages", json!({"chat": chat["id"]})).await;
            msgs.as_array()?
                .iter()
                .find(|m| m["direction"] == "out" && m["status"] == "failed")
                .cloned()
        })
        .await;
    (d, failed)
}

/// A send result that is not `{"type":"sent"}` with an id fails the message for good,
/// even when it carries an `external_message_id`.
#[tokio::test(flavor = "multi_thread")]
async fn a_send_result_that_is_not_sent_fails_the_message() {
    let (_d, failed) = send_until_failed("badsend", "", "wrong_type").await;
    let reason = failed["status_reason"].as_str().unwrap_or("");
    assert!(reason.contains("bad_output"), "{failed}");
    assert!(failed["external_message_id"].is_null(), "{failed}");
}

/// A send that keeps failing with retryable errors (here: a connector that panics,
/// then a channel that is restarting) gives up after the kind's attempts and marks the
/// message failed with the reason, instead of leaving it queued for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_send_that_gives_up_fails_the_message() {
    let extra = "[queue.max_attempts]\nsend_message = 2\n";
    let (d, failed) = send_until_failed("giveup", extra, "panic").await;
    let reason = failed["status_reason"].as_str().unwrap_or("");
    assert!(reason.contains("gave up after 2 attempts"), "{failed}");
    let dead = d
        .ok("job.list", json!({"state": "dead", "kind": "send_message"}))
        .await;
    assert_eq!(dead.as_array().map(Vec::len), Some(1), "{dead}");
}
