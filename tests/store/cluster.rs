//! Nodes, channel leases and the send fence, on both stores: one holder per channel
//! even when two daemons take it at once, epochs that only grow, renewals that never
//! revive an expired lease, and a send claim that a stale holder cannot pass.

use patchbay_jobs::model::now_ms;
use patchbay_jobs::store::{Fence, NodeInfo, SendClaim};
use serde_json::json;

use crate::common::{Backend, TestStore, acme};

on_both_stores!(
    a_channel_has_one_holder_and_every_new_holder_a_new_epoch,
    nodes_expire_and_count_their_live_leases,
    a_stale_holder_cannot_claim_a_send,
);

async fn two_channels(s: &TestStore) -> (i64, i64) {
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let a = s
        .add_channel(acc.id, "loopback", "A", &json!({}))
        .await
        .expect("a");
    let b = s
        .add_channel(acc.id, "loopback", "B", &json!({}))
        .await
        .expect("b");
    (a.id, b.id)
}

async fn a_channel_has_one_holder_and_every_new_holder_a_new_epoch(b: Backend) {
    let s = TestStore::open(b).await;
    let other = s.another_daemon().await;
    let (a, c) = two_channels(&s).await;
    // Two nodes take the same channels at once: each channel goes to exactly one.
    let both = [a, c];
    let (one, two) = tokio::join!(
        s.acquire_leases("n1/01", &both, 60_000),
        other.acquire_leases("n2/01", &both, 60_000)
    );
    let (one, two) = (one.expect("n1"), two.expect("n2"));
    let mut taken: Vec<i64> = one.iter().chain(&two).map(|&(ch, _)| ch).collect();
    taken.sort();
    assert_eq!(
        taken,
        vec![a, c],
        "each channel exactly once: {one:?} {two:?}"
    );
    assert!(one.iter().chain(&two).all(|&(_, epoch)| epoch == 1));
    let holder = |ch| {
        if one.iter().any(|&(x, _)| x == ch) {
            "n1/01"
        } else {
            "n2/01"
        }
    };
    // A live lease is not taken; its holder renews it.
    let again = other
        .acquire_leases("n3/01", &[a], 60_000)
        .await
        .expect("n3");
    assert!(again.is_empty(), "a live lease is not taken: {again:?}");
    let renewed = s.renew_leases(holder(a), 60_000).await.expect("renew");
    assert!(renewed.contains(&(a, 1)), "{renewed:?}");

    // Released: another node takes it at once, under the next epoch.
    assert_eq!(
        s.release_leases(holder(a), Some(&[a]))
            .await
            .expect("release"),
        1
    );
    let taken = other
        .acquire_leases("n3/01", &[a], 60_000)
        .await
        .expect("take");
    assert_eq!(taken, vec![(a, 2)]);
    // Expired (its holder paused or died): the renewal does not revive it, and a
    // takeover gets the next epoch.
    s.exec(&format!(
        "UPDATE channel_leases SET expires_at = 1 WHERE channel_id = {a}"
    ))
    .await;
    let renewed = s
        .renew_leases("n3/01", 60_000)
        .await
        .expect("renew expired");
    assert!(
        renewed.is_empty(),
        "an expired lease stays expired: {renewed:?}"
    );
    let taken = s.acquire_leases("n1/01", &[a], 60_000).await.expect("take");
    assert_eq!(taken, vec![(a, 3)]);
    let leases = s.channel_leases().await.expect("leases");
    let lease = leases.iter().find(|l| l.channel == a).expect("listed");
    assert_eq!(
        (lease.owner.as_deref(), lease.epoch, lease.live),
        (Some("n1/01"), 3, true)
    );
    // Releasing everything a node holds.
    let all = s.release_leases("n1/01", None).await.expect("release all");
    assert!(all >= 1);
    let leases = s.channel_leases().await.expect("leases");
    assert!(
        leases
            .iter()
            .all(|l| l.owner.as_deref() != Some("n1/01") && (l.channel != a || !l.live))
    );
}

async fn nodes_expire_and_count_their_live_leases(b: Backend) {
    let s = TestStore::open(b).await;
    let (a, c) = two_channels(&s).await;
    let node = |id, max_channels, pid| NodeInfo {
        id,
        name: "eu-1",
        started_at: now_ms(),
        max_channels,
        host: Some("boot/pid:[1]"),
        pid,
    };
    s.node_heartbeat(&node("eu-1/01", None, 10), 60_000)
        .await
        .expect("heartbeat");
    s.node_heartbeat(&node("eu-1/02", Some(10), 11), 60_000)
        .await
        .expect("same name, other process");
    s.acquire_leases("eu-1/01", &[a, c], 60_000)
        .await
        .expect("take");
    let nodes = s.live_nodes().await.expect("nodes");
    let counts: Vec<(&str, i64, Option<i64>)> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.channels, n.max_channels))
        .collect();
    assert_eq!(
        counts,
        vec![("eu-1/01", 2, None), ("eu-1/02", 0, Some(10))],
        "two processes sharing a host name are two nodes"
    );
    assert_eq!(
        (nodes[0].host.as_deref(), nodes[0].pid),
        (Some("boot/pid:[1]"), Some(10))
    );
    // A node found dead gives its leases up at once.
    s.node_heartbeat(&node("eu-1/03", None, 12), 60_000)
        .await
        .expect("third");
    assert!(
        s.acquire_leases("eu-1/03", &[a], 60_000)
            .await
            .expect("take")
            .is_empty(),
        "a is held by eu-1/01"
    );
    assert_eq!(s.reap_node("eu-1/01").await.expect("reap"), 2);
    assert_eq!(
        s.acquire_leases("eu-1/03", &[a, c], 60_000)
            .await
            .expect("take"),
        vec![(a, 2), (c, 2)]
    );
    s.node_leave("eu-1/03").await.expect("leave");
    s.exec("UPDATE nodes SET expires_at = 1 WHERE id = 'eu-1/02'")
        .await;
    assert!(
        s.live_nodes().await.expect("nodes").is_empty(),
        "eu-1/01 reaped, eu-1/02 expired, eu-1/03 left"
    );
    assert_eq!(s.purge_nodes(0).await.expect("purge"), 1, "the expired one");
}

async fn a_stale_holder_cannot_claim_a_send(b: Backend) {
    let s = TestStore::open(b).await;
    let msg = crate::chats::outbound(&s).await;
    let ch = msg.channel;
    s.acquire_leases("old/01", &[ch], 60_000)
        .await
        .expect("take");
    let old = Fence {
        node: "old/01".into(),
        epoch: 1,
    };
    let until = now_ms() + 60_000;
    // The old holder pauses past its lease; a new one takes the channel.
    s.exec(&format!(
        "UPDATE channel_leases SET expires_at = 1 WHERE channel_id = {ch}"
    ))
    .await;
    assert_eq!(
        s.claim_send(msg.id, until, Some(&old))
            .await
            .expect("stale"),
        SendClaim::Fenced,
        "an expired lease fences even before anyone takes it over"
    );
    let taken = s
        .acquire_leases("new/01", &[ch], 60_000)
        .await
        .expect("takeover");
    assert_eq!(taken, vec![(ch, 2)]);
    assert_eq!(
        s.claim_send(msg.id, until, Some(&old))
            .await
            .expect("stale"),
        SendClaim::Fenced
    );
    let new = Fence {
        node: "new/01".into(),
        epoch: 2,
    };
    assert_eq!(
        s.claim_send(msg.id, until, Some(&new)).await.expect("new"),
        SendClaim::Claimed
    );
    assert_eq!(
        s.claim_send(msg.id, until + 1, Some(&new))
            .await
            .expect("again"),
        SendClaim::Taken,
        "held by the first claim"
    );
}
