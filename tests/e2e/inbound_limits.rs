//! Inbound events at and over the bounds every stage shares (`json_limits`, the SDK's
//! inbound limits): none stops inbound work and none is silently gone. Each is stored,
//! kept as a dead job with its reason, or refused at emit with a log line — and the
//! ordinary traffic behind them is stored, on both queue backends.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon};

/// An inbound event whose attachments nest `levels` arrays inside the attachments
/// array: the event nests `levels + 2` deep.
fn nested(levels: usize, id: &str) -> String {
    format!(
        r#"{{"type":"inbound","external_chat_id":"deep","external_message_id":"{id}","sender":{{"name":"Deep"}},"text":"{id}","attachments":[{}{}],"sent_at":"2026-12-01T10:00:00Z"}}"#,
        "[".repeat(levels),
        "]".repeat(levels)
    )
}

async fn bounds_then_traffic(backend: Backend) {
    let d = Daemon::start(backend);
    let (acc, admin) = d.account("Acme").await;
    let big_attachments = json!({
        "type": "inbound", "external_chat_id": "big", "external_message_id": "big-attachments",
        "sender": {"name": "Big"}, "text": "big", "attachments": ["x".repeat(300_000)],
        "sent_at": "2026-12-01T10:00:00Z"
    });
    let no_sender = json!({
        "type": "inbound", "external_chat_id": "c", "external_message_id": "no-sender",
        "sender": {}, "sent_at": "2026-12-01T10:00:00Z"
    });
    let raw = vec![
        nested(30, "at-limit"),
        nested(31, "over-limit"),
        // The event of the report that stopped every inbound worker for good.
        nested(124, "poison-126"),
        big_attachments.to_string(),
        no_sender.to_string(),
    ];
    let ch = d
        .loopback(
            acc,
            admin,
            json!({"raw_events": raw, "oversize_event_bytes": 1_100_000, "burst": 500,
                   "limit": 500, "clients": 5, "id_prefix": "ok"}),
        )
        .await;

    let ordinary = format!(
        "SELECT COUNT(*) FROM messages WHERE channel_id = {ch} AND external_message_id LIKE 'ok-%'"
    );
    d.until(
        "500 ordinary messages stored",
        Duration::from_secs(30),
        || async { (d.store_count(&ordinary).await == 500).then_some(()) },
    )
    .await;
    let at_limit = d
        .store_count(&format!(
            "SELECT COUNT(*) FROM messages WHERE channel_id = {ch} AND external_message_id = 'at-limit'"
        ))
        .await;
    assert_eq!(at_limit, 1, "the event at the depth bound is stored");

    // Each refused one is a dead job with its reason, never silently gone.
    let dead = d
        .until("refused events dead", Duration::from_secs(20), || async {
            let list = d
                .ok(
                    "job.list",
                    json!({"state": "dead", "kind": "inbound_message"}),
                )
                .await;
            let list = list.as_array()?.clone();
            (list.len() >= 4).then_some(list)
        })
        .await;
    let reason_of = |needle: &str| -> Option<String> {
        dead.iter()
            .find(|j| j["payload"].to_string().contains(needle))
            .and_then(|j| j["last_error"].as_str().map(str::to_owned))
    };
    for (id, why) in [
        ("over-limit", "nested deeper than 32"),
        ("poison-126", "nested deeper than 32"),
        ("big-attachments", "attachments must be at most"),
        ("no-sender", "sender needs at least one of"),
    ] {
        let reason = reason_of(id).unwrap_or_else(|| panic!("no dead job for {id}: {dead:?}"));
        assert!(reason.contains(why), "{id}: {reason}");
    }
    for j in &dead {
        assert!(
            j["payload"].to_string().len() <= patchbay_jobs::model::MAX_DEAD_PAYLOAD_BYTES,
            "a dead job keeps a bounded payload: {} bytes",
            j["payload"].to_string().len()
        );
        assert_eq!(j["payload"]["channel"], ch, "{j}");
    }
    // The 1.1 MiB one never crossed: emit refused it, and the plugin was told.
    assert!(
        d.log()
            .contains("was refused: event larger than the host accepts"),
        "{}",
        d.log()
    );
    // Retrying one that this daemon refuses would only kill it again: refused, and
    // the reason says why.
    let over: &Value = dead
        .iter()
        .find(|j| j["payload"].to_string().contains("over-limit"))
        .expect("over-limit");
    let id = over["id"].as_str().expect("id");
    let why = d.fails("job.retry", json!({"id": id}), "conflict").await;
    assert!(why.contains("cannot be retried"), "{why}");
    assert_eq!(d.store_count(&ordinary).await, 500);
}

#[tokio::test]
async fn bounds_never_stop_inbound_sqlite() {
    bounds_then_traffic(Backend::Sqlite).await;
}

#[tokio::test]
async fn bounds_never_stop_inbound_redis() {
    bounds_then_traffic(Backend::Redis).await;
}
