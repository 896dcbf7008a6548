//! Issue 21 on the real daemon: thousands of loopback channels on few threads, a few
//! hundred Telegram channels long-polling a fake Bot API on few threads too, status
//! changes reaching `channel.list` by event (no poll), and a hanging instance still
//! replaced by the liveness check.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, install_connector};
use crate::telegram::{FakeBotApi, TOKEN};

fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads line")
}

async fn channel(d: &Daemon, account: i64, id: i64) -> Option<Value> {
    let list = d.ok("channel.list", json!({"account": account})).await;
    list.as_array()?.iter().find(|c| c["id"] == id).cloned()
}

/// `Some` once exactly `want` of the account's channels are connected.
async fn all_connected(d: &Daemon, account: i64, want: usize) -> Option<()> {
    let list = d.ok("channel.list", json!({"account": account})).await;
    let n = list
        .as_array()?
        .iter()
        .filter(|c| c["status"] == "connected")
        .count();
    (n == want).then_some(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_emitted_status_reaches_channel_list_within_a_second() {
    // Liveness checks every 10 minutes: only the event can tell the daemon in time.
    let d = Daemon::start_env(
        Backend::Sqlite,
        "",
        &[("PATCHBAY__PLUGINS__LIVENESS_CHECK_MS", "600000")],
    );
    let (acc, admin) = d.account("ev").await;
    let id = d
        .loopback(
            acc,
            admin,
            json!({"report_error": "went away", "report_error_after_ms": 2000, "fault_starts": 1}),
        )
        .await;
    let connected = Instant::now();
    let c = d
        .until("the error status", Duration::from_secs(10), || async {
            channel(&d, acc, id).await.filter(|c| c["status"] == "error")
        })
        .await;
    let seen = connected.elapsed();
    assert_eq!(c["status_reason"], "went away", "{c}");
    // Emitted 2 s after connected; seen within 1 s of that (plus the 50 ms list poll).
    assert!(seen < Duration::from_millis(3000), "seen after {seen:?}");
    // The grace runs from the event too: replaced, then clean (fault_starts 1).
    d.until("replaced and connected", Duration::from_secs(40), || async {
        let replaced = d
            .log()
            .contains("the connector has reported an error for");
        let c = channel(&d, acc, id).await?;
        (replaced && c["status"] == "connected").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_hangs_is_replaced() {
    let d = Daemon::start_env(
        Backend::Sqlite,
        "",
        &[
            ("PATCHBAY__PLUGINS__LIVENESS_CHECK_MS", "500"),
            ("PATCHBAY__PLUGINS__LIVENESS_TIMEOUT_MS", "1000"),
        ],
    );
    let (acc, admin) = d.account("hang").await;
    let id = d
        .loopback(acc, admin, json!({"hang_status_ms": 4000, "fault_starts": 1}))
        .await;
    d.until("the hang noticed", Duration::from_secs(20), || async {
        d.log()
            .contains("did not answer a liveness check")
            .then_some(())
    })
    .await;
    d.until("a fresh instance connected", Duration::from_secs(30), || async {
        channel(&d, acc, id)
            .await
            .filter(|c| c["status"] == "connected")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_loopback_channels_on_few_threads() {
    const N: usize = 2000;
    // Above the daemon's base: the connector runtime (at most 4 workers and 8 blocking
    // threads) and a few blocking threads of the daemon's own pool in use at a time.
    const BOUND: usize = 32;
    let d = Daemon::start(Backend::Sqlite);
    let (acc, admin) = d.account("dense").await;
    // One channel first, so the plugin's runtime is part of the base being compared.
    let first = d.loopback(acc, admin, json!({})).await;
    let base = threads(d.pid());
    let mut ids = vec![first];
    for i in 1..N {
        let ch = d
            .ok(
                "channel.add",
                json!({"account": acc, "actor": admin, "kind": "loopback", "name": format!("lb{i}"), "config": {}}),
            )
            .await;
        ids.push(ch["id"].as_i64().expect("id"));
    }
    let connected = |want: usize| all_connected(&d, acc, want);
    d.until("all connected", Duration::from_secs(120), || connected(N))
        .await;
    // Blocking threads used to start them retire after 10 s idle.
    d.until("threads back near the base", Duration::from_secs(60), || async {
        (threads(d.pid()) <= base + BOUND).then_some(())
    })
    .await;

    let (gone, kept) = ids.split_at(N / 2);
    for &id in gone {
        d.ok(
            "channel.remove",
            json!({"account": acc, "actor": admin, "channel": id}),
        )
        .await;
    }
    let list = d.ok("channel.list", json!({"account": acc})).await;
    let by_id = |id: i64| {
        list.as_array()
            .and_then(|l| l.iter().find(|c| c["id"] == id).cloned())
    };
    for &id in gone {
        if let Some(c) = by_id(id) {
            assert_eq!(c["status"], "removed", "{c}");
        }
    }
    for &id in kept {
        let c = by_id(id).expect("kept channel listed");
        assert_eq!(c["status"], "connected", "{c}");
    }
    // The removed ones' instances are stopped: each logged its stop, the kept did not.
    assert!(threads(d.pid()) <= base + BOUND + 16);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_telegram_channels_on_few_threads() {
    const N: usize = 200;
    // As for loopback: the plugin's runtime is in the base; above it only a few blocking
    // threads (flushes, the daemon's own pool) at a time.
    const BOUND: usize = 32;
    let api = FakeBotApi::start();
    let d = Daemon::start_full(Backend::Sqlite, "", |dir| {
        install_connector(dir, "telegram")
    });
    let (acc, admin) = d.account("bots").await;
    // Long polls held 25 s by the fake, as the real Bot API holds them.
    let config = json!({"token": TOKEN, "api_base": api.server.url(), "poll_timeout_secs": 25});
    let add = |i: usize| {
        let d = &d;
        let config = config.clone();
        async move {
            d.ok(
                "channel.add",
                json!({"account": acc, "actor": admin, "kind": "telegram", "name": format!("bot{i}"), "config": config}),
            )
            .await["id"]
                .as_i64()
                .expect("id")
        }
    };
    let connected = |want: usize| all_connected(&d, acc, want);
    // One channel first, so the plugin's runtime is part of the base being compared.
    add(0).await;
    d.until("the first bot connected", Duration::from_secs(30), || {
        connected(1)
    })
    .await;
    let base = threads(d.pid());
    for i in 1..N {
        add(i).await;
    }
    d.until("all bots connected", Duration::from_secs(120), || connected(N))
        .await;
    // Blocking threads used to start them retire after 10 s idle.
    let settle = Instant::now();
    let mut now = threads(d.pid());
    while now > base + BOUND && settle.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = threads(d.pid());
    }
    eprintln!("daemon threads: {base} with 1 telegram channel, {now} with {N}");
    assert!(now <= base + BOUND, "{now} threads, base {base}");
}
