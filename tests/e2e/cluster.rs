//! Several daemons on one PostgreSQL store and one Redis queue (real processes, the
//! test's own servers): every channel runs on exactly one node, a SIGTERM hands its
//! channels over within seconds, a joining node receives its share, a killed node's
//! channels run elsewhere after the lease TTL with every message stored exactly once, a
//! paused node sends nothing once it wakes, a node cut off from the network (in a
//! namespace of its own, `netns.rs`) stops its channels before the others take them and
//! gets its share back when healed, a restarted daemon takes its dead predecessor's
//! channels at once, and a worker-only node runs none. (Billing with several daemons: `billing.rs`.)
//!
//! Which channels a node runs is read from each process (`status.running_channels`,
//! the supervisor's own map), not from the store the nodes coordinate through; and the
//! loopback connectors themselves hold a lock file per channel (`exclusive_dir`): a
//! second live instance of one channel anywhere would be recorded in its `overlaps`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon};

/// Short leases so the suite waits seconds, not the production 15 s.
const TTL_SECS: u64 = 5;

fn config() -> String {
    format!("[leases]\nttl_secs = {TTL_SECS}\n")
}

fn first(name: &str) -> Daemon {
    Daemon::start_env(Backend::Redis, &config(), &[("PATCHBAY__NODE__NAME", name)])
}

fn join(a: &Daemon, name: &str) -> Daemon {
    a.sibling_with(&[("PATCHBAY__NODE__NAME", name)])
}

/// `key` → `value` of every node `node.list` returned.
fn by(nodes: &Value, key: &str, value: &str) -> BTreeMap<String, Value> {
    nodes
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| (n[key].as_str().expect("key").to_owned(), n[value].clone()))
        .collect()
}

async fn running(d: &Daemon) -> BTreeSet<i64> {
    let status = d.ok("status", json!({})).await;
    status["running_channels"]
        .as_array()
        .expect("running_channels")
        .iter()
        .map(|v| v.as_i64().expect("id"))
        .collect()
}

/// Waits until the daemons together run exactly `channels`, none twice, each within
/// `spread` of an even share; returns each daemon's set.
async fn settled(
    nodes: &[&Daemon],
    channels: &BTreeSet<i64>,
    spread: usize,
    limit: Duration,
) -> Vec<BTreeSet<i64>> {
    let start = Instant::now();
    let even = channels.len() as f64 / nodes.len() as f64;
    loop {
        let mut sets = Vec::new();
        for d in nodes {
            sets.push(running(d).await);
        }
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<i64> = sets.iter().flatten().copied().collect();
        let balanced = sets
            .iter()
            .all(|s| (s.len() as f64 - even).abs() <= spread as f64);
        if total == channels.len() && &union == channels && balanced {
            return sets;
        }
        assert!(
            start.elapsed() < limit,
            "not settled after {limit:?}: {:?}\n{}",
            sets.iter().map(BTreeSet::len).collect::<Vec<_>>(),
            nodes[0].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `exclusive_dir` probe's folder; `assert_no_overlap` at the end of a test.
struct Probe(tempfile::TempDir);

impl Probe {
    fn new() -> Probe {
        Probe(tempfile::tempdir().expect("probe dir"))
    }

    fn dir(&self) -> String {
        self.0.path().display().to_string()
    }

    fn assert_no_overlap(&self) {
        let overlaps = std::fs::read_to_string(self.0.path().join("overlaps")).unwrap_or_default();
        assert!(
            overlaps.is_empty(),
            "channels ran twice at once: {overlaps}"
        );
        let locks = std::fs::read_dir(self.0.path()).expect("probe dir").count();
        assert!(locks > 0, "the connectors used the probe");
    }
}

struct Added {
    acc: i64,
    admin: i64,
    ids: BTreeSet<i64>,
}

async fn add_channels(d: &Daemon, n: usize, config: impl Fn(usize) -> Value) -> Added {
    let (acc, admin) = d.account("cluster").await;
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let ch = d
            .ok(
                "channel.add",
                json!({"account": acc, "actor": admin, "kind": "loopback",
                       "name": format!("c{i}"), "config": config(i)}),
            )
            .await;
        ids.insert(ch["id"].as_i64().expect("id"));
    }
    Added { acc, admin, ids }
}

/// The process's own count of messages its connectors sent (its `/metrics`).
async fn sent_by(d: &Daemon) -> f64 {
    let status = d.ok("status", json!({})).await;
    let addr = status["http"].as_str().expect("status.http");
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| {
            l.starts_with("patchbay_outbound_messages_total{") && l.contains("outcome=\"sent\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// 3 daemons and 30 channels: each channel runs once; `channel.list` names its owner
/// and epoch; SIGTERM hands a node's channels to the others within seconds; a joining
/// node evens the counts out, moving a few channels at a time.
#[tokio::test(flavor = "multi_thread")]
async fn channels_run_once_and_move_on_sigterm_and_join() {
    let probe = Probe::new();
    let a = first("n1");
    let added = add_channels(
        &a,
        30,
        |i| json!({"number": format!("+1555100{i:04}"), "exclusive_dir": probe.dir()}),
    )
    .await;
    let channels = added.ids.clone();
    let b = join(&a, "n2");
    let mut c = join(&a, "n3");
    let sets = settled(&[&a, &b, &c], &channels, 1, Duration::from_secs(30)).await;
    assert!(sets.iter().all(|s| s.len() == 10), "even: {sets:?}");

    // The cluster as every node sees it.
    let nodes = a.ok("node.list", json!({})).await;
    assert_eq!(
        by(&nodes, "name", "channels"),
        BTreeMap::from([
            ("n1".into(), json!(10)),
            ("n2".into(), json!(10)),
            ("n3".into(), json!(10))
        ])
    );
    let status = b.ok("status", json!({})).await;
    assert_eq!(status["nodes"].as_array().expect("nodes").len(), 3);
    let list = c.ok("channel.list", json!({"account": added.acc})).await;
    let ids = by(&nodes, "id", "name");
    for ch in list.as_array().expect("channels") {
        let id = ch["id"].as_i64().expect("id");
        let owner = ids
            .get(ch["owner"].as_str().expect("owner"))
            .expect("a live node");
        let at = ["n1", "n2", "n3"]
            .iter()
            .position(|n| owner.as_str() == Some(*n))
            .expect("named");
        assert!(
            sets[at].contains(&id),
            "channel {id} runs where channel.list says"
        );
        assert!(ch["lease_epoch"].as_i64().expect("epoch") >= 1);
    }

    // SIGTERM: the leases are released at once, the others take the channels.
    assert_eq!(c.terminate(), Some(0));
    let stopped = Instant::now();
    settled(&[&a, &b], &channels, 0, Duration::from_secs(5)).await;
    let handover = stopped.elapsed();
    assert!(
        handover < Duration::from_secs(5),
        "handover took {handover:?}"
    );

    // Back to three, then a fourth joins: channels move a few per round, and the
    // counts end within one of even (30 over 4: 8, 8, 7, 7).
    let c = join(&a, "n3");
    settled(&[&a, &b, &c], &channels, 1, Duration::from_secs(30)).await;
    let d = join(&a, "n4");
    let sets = settled(&[&a, &b, &c, &d], &channels, 1, Duration::from_secs(30)).await;
    let mut counts: Vec<usize> = sets.iter().map(BTreeSet::len).collect();
    counts.sort_unstable();
    assert_eq!(counts, [7, 7, 8, 8], "{sets:?}");
    probe.assert_no_overlap();
}

/// kill -9 of one of three daemons while every channel generates inbound traffic with
/// fixed ids: the killed node's channels run elsewhere after the TTL, and every message
/// is stored exactly once (a successor regenerates the ids; the store keeps one each).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_loses_no_message_and_doubles_none() {
    const PER_CHANNEL: i64 = 60;
    let probe = Probe::new();
    let mut a = first("k1");
    let channels = add_channels(&a, 12, |i| {
        json!({"id_prefix": format!("k{i}"), "rate_per_sec": 20, "limit": PER_CHANNEL,
               "number": format!("+1555500{i:04}"), "exclusive_dir": probe.dir()})
    })
    .await
    .ids;
    let b = join(&a, "k2");
    let c = join(&a, "k3");
    settled(&[&a, &b, &c], &channels, 1, Duration::from_secs(30)).await;
    // Restart the traffic on the balanced cluster (channels that moved started over),
    // then kill a node in the middle of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lost = running(&a).await;
    assert!(!lost.is_empty());
    a.kill9();
    let killed = Instant::now();
    settled(&[&b, &c], &channels, 0, Duration::from_secs(TTL_SECS + 10)).await;
    let failover = killed.elapsed();
    assert!(
        failover <= Duration::from_secs(TTL_SECS + 4),
        "failover took {failover:?}"
    );
    let want = channels.len() as i64 * PER_CHANNEL;
    let stored = || async {
        b.store_count("SELECT COUNT(*) FROM messages WHERE direction = 'in'")
            .await
    };
    b.until("every message stored", Duration::from_secs(60), || async {
        (stored().await >= want).then_some(())
    })
    .await;
    // Nothing more arrives later, and each id is there once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stored().await, want, "no message twice, none lost");
    let distinct = b
        .store_count(
            "SELECT COUNT(DISTINCT external_message_id) FROM messages WHERE direction = 'in'",
        )
        .await;
    assert_eq!(distinct, want);
    probe.assert_no_overlap();
}

/// SIGSTOP a node for 2 × TTL with sends queued for its channels: the other node takes
/// the channels and sends every message once; the woken node stops its stale instances
/// and its connectors send nothing (its claims carry the old epoch).
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_node_sends_nothing_when_it_wakes() {
    let a = first("p1");
    let added = add_channels(&a, 6, |i| json!({"number": format!("+1555200{i:04}")})).await;
    let channels = added.ids.clone();
    let b = join(&a, "p2");
    settled(&[&a, &b], &channels, 0, Duration::from_secs(30)).await;
    let paused = running(&b).await;
    let pid = b.pid().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill {sig}");
    };
    signal("-STOP");
    let mut sends = 0;
    for &ch in &paused {
        let chat = a
            .ok(
                "chat.create",
                json!({"account": added.acc, "actor": added.admin, "channel": ch,
                       "phone": format!("+1555300{ch:04}")}),
            )
            .await;
        for n in 0..3 {
            a.ok(
                "message.send",
                json!({"chat": chat["id"], "actor": added.admin, "text": format!("m{ch}-{n}")}),
            )
            .await;
            sends += 1;
        }
    }
    let sent = || async {
        a.store_count(
            "SELECT COUNT(*) FROM messages WHERE direction = 'out' AND status IN ('sent', 'delivered', 'read')",
        )
        .await
    };
    // While it sleeps past its leases, the other node takes its channels (within a TTL
    // and a reconcile round; a loaded CI machine may take longer to start them).
    tokio::time::sleep(Duration::from_secs(TTL_SECS)).await;
    a.until(
        "the paused node's channels run on the other",
        Duration::from_secs(30),
        || async { running(&a).await.is_superset(&paused).then_some(()) },
    )
    .await;
    // The other node sends everything, including jobs the sleeper's queue consumer had
    // taken before it slept (Redis hands them over once their visibility timeout of
    // 30 s passes).
    a.until("every send sent", Duration::from_secs(90), || async {
        (sent().await == sends).then_some(())
    })
    .await;
    signal("-CONT");
    // The woken node finds it could not renew in time and stops its stale instances;
    // then, a live node again, it takes its share back under new epochs.
    b.until(
        "the woken node fenced itself",
        Duration::from_secs(30),
        || async {
            b.log()
                .contains("cannot renew the channel leases: stopping every connector")
                .then_some(())
        },
    )
    .await;
    settled(&[&a, &b], &channels, 0, Duration::from_secs(60)).await;
    let list = a.ok("channel.list", json!({"account": added.acc})).await;
    for ch in list.as_array().expect("channels") {
        if paused.contains(&ch["id"].as_i64().expect("id")) {
            assert!(
                ch["lease_epoch"].as_i64().expect("epoch") >= 2,
                "taken over at least once: {ch}"
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sent().await, sends, "each message sent once");
    assert_eq!(
        sent_by(&b).await,
        0.0,
        "the woken node's connectors sent nothing"
    );
    assert_eq!(
        sent_by(&a).await,
        sends as f64,
        "the other node sent each message once"
    );
}

/// A worker-only node (`node.run_channels = false`) holds no channel, however many
/// there are, while the other runs all of them; a send asked of it is made by the node
/// that runs the channel.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_only_node_runs_no_channel_and_its_sends_go_to_the_owner() {
    let a = first("o1");
    let added = add_channels(&a, 4, |i| json!({"number": format!("+1555500{i:04}")})).await;
    let w = a.sibling_with(&[
        ("PATCHBAY__NODE__NAME", "w1"),
        ("PATCHBAY__NODE__RUN_CHANNELS", "false"),
    ]);
    w.until(
        "the worker-only node in the node list",
        Duration::from_secs(30),
        || async {
            let nodes = a.ok("node.list", json!({})).await;
            (by(&nodes, "name", "max_channels").get("w1") == Some(&json!(0))).then_some(())
        },
    )
    .await;
    settled(&[&a], &added.ids, 0, Duration::from_secs(30)).await;
    // Several reconcile rounds of both nodes: the even split would give w1 two.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        running(&w).await.is_empty(),
        "the worker-only node runs nothing"
    );
    assert_eq!(running(&a).await, added.ids);
    let ch = *added.ids.first().expect("a channel");
    let chat = w
        .ok(
            "chat.create",
            json!({"account": added.acc, "actor": added.admin, "channel": ch,
                   "phone": "+15556000001"}),
        )
        .await;
    w.ok(
        "message.send",
        json!({"chat": chat["id"], "actor": added.admin, "text": "via w1"}),
    )
    .await;
    a.until("the owner sent it", Duration::from_secs(30), || async {
        (sent_by(&a).await == 1.0).then_some(())
    })
    .await;
    assert_eq!(sent_by(&w).await, 0.0, "the worker-only node sent nothing");
}

/// A daemon restarted after kill -9 (systemd's `Restart=`) takes its dead predecessor's
/// channels at once: same host, same PID namespace, its pid gone. Without that they
/// would wait out the lease TTL (here 60 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_daemon_takes_its_dead_predecessors_channels_at_once() {
    let mut a = Daemon::start_env(
        Backend::Redis,
        "[leases]\nttl_secs = 60\n",
        &[("PATCHBAY__NODE__NAME", "r1")],
    );
    let channels = add_channels(&a, 5, |i| json!({"number": format!("+1555400{i:04}")}))
        .await
        .ids;
    settled(&[&a], &channels, 0, Duration::from_secs(30)).await;
    a.kill9();
    a.spawn();
    // Well inside the 60 s TTL, or `settled` fails.
    settled(&[&a], &channels, 0, Duration::from_secs(20)).await;
    assert!(
        a.log()
            .contains("took over the leases of a node of this host whose process is gone"),
        "{}",
        a.log()
    );
    let nodes = a.ok("node.list", json!({})).await;
    assert_eq!(
        nodes.as_array().map(Vec::len),
        Some(1),
        "the dead node is gone: {nodes}"
    );
}

/// A network cut: one of three daemons runs in a network namespace of its own and
/// reaches PostgreSQL and Redis only over TCP through a veth, which the test takes down
/// (packets vanish; no error reaches either side). Unable to renew, the node stops its
/// connectors before its leases can run out, and the two others take its channels;
/// with the link back it rejoins and gets its share again. Inbound traffic with fixed
/// ids runs throughout: every message is stored once, and no channel ever ran twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_node_stops_its_channels_and_rejoins_when_healed() {
    const PER_CHANNEL: i64 = 100;
    let net = crate::netns::NetNs::new();
    let pg = crate::pg_cluster::PgServer::start_private_on(net.host_addr, &net.clients());
    let db = pg.create_database("cut");
    let redis = crate::harness::Redis::start_on(net.host_addr);
    let (pg_tcp, redis_tcp) = (pg.tcp_url(&db), redis.tcp_url());
    let probe = Probe::new();
    let store = format!("{}[store]\nurl = \"{}\"\n", config(), pg.url(&db));
    let mut a = Daemon::start_on(redis, &store, &[("PATCHBAY__NODE__NAME", "x1")]);
    a.pg_url = Some(pg.url(&db));
    let channels = add_channels(&a, 15, |i| {
        json!({"id_prefix": format!("x{i}"), "rate_per_sec": 10, "limit": PER_CHANNEL,
               "number": format!("+1555600{i:04}"), "exclusive_dir": probe.dir()})
    })
    .await
    .ids;
    let b = join(&a, "x2");
    let c = a.sibling_under(
        &net.launcher(),
        &[
            ("PATCHBAY__NODE__NAME", "x3"),
            ("PATCHBAY__STORE__URL", &pg_tcp),
            ("PATCHBAY__QUEUE__REDIS_URL", &redis_tcp),
        ],
    );
    settled(&[&a, &b, &c], &channels, 1, Duration::from_secs(30)).await;
    let cut_off = running(&c).await;
    assert!(!cut_off.is_empty(), "the namespaced node runs its share");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    net.cut();
    let cut = Instant::now();
    // The others take its channels once its leases ran out (TTL after its last renewal
    // at most, plus a reconcile round); by then it has stopped them itself.
    settled(&[&a, &b], &channels, 1, Duration::from_secs(TTL_SECS + 10)).await;
    let failover = cut.elapsed();
    // TTL, then the node row's expiry seen by a round (2 s), the round itself, slack.
    assert!(
        failover <= Duration::from_secs(TTL_SECS + 6),
        "failover took {failover:?}"
    );
    assert!(
        running(&c).await.is_empty(),
        "the cut-off node stopped its connectors"
    );
    assert!(
        c.log()
            .contains("cannot renew the channel leases: stopping every connector"),
        "the cut-off node fenced itself:\n{}",
        c.log()
    );

    // Healed: it renews again, is a live node once more and receives its share.
    net.heal();
    let sets = settled(&[&a, &b, &c], &channels, 1, Duration::from_secs(40)).await;
    assert!(!sets[2].is_empty(), "the healed node runs channels again");

    let want = channels.len() as i64 * PER_CHANNEL;
    let stored = || async {
        a.store_count("SELECT COUNT(*) FROM messages WHERE direction = 'in'")
            .await
    };
    a.until("every message stored", Duration::from_secs(90), || async {
        (stored().await >= want).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stored().await, want, "no message twice, none lost");
    let distinct = a
        .store_count(
            "SELECT COUNT(DISTINCT external_message_id) FROM messages WHERE direction = 'in'",
        )
        .await;
    assert_eq!(distinct, want);
    probe.assert_no_overlap();
}
