//! The loopback cdylib (crate `loopback`) loaded from disk through the host API: a Rust connector built
//! with the SDK's export macro, exercised the way the daemon will use it.

mod common;

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use patchbay_connector_sdk::host::{Instance, InstanceState, Library, RawEvent, codes, load};
use patchbay_connector_sdk::{ChannelState, Event, Inbound, Outbound, ReceiptStatus, Recipient};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn lib() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| load(&loopback_so()).unwrap())
}

fn instance(config: Value, capacity: usize) -> (Instance, mpsc::Receiver<RawEvent>) {
    let (tx, rx) = mpsc::channel();
    (
        Instance::create(lib(), 1, &config, tx, capacity).unwrap(),
        rx,
    )
}

fn inbound_of(events: &[RawEvent]) -> Vec<Inbound> {
    events
        .iter()
        .filter_map(|e| match e.parse() {
            Ok(Event::Inbound(m)) => Some(m),
            _ => None,
        })
        .collect()
}

fn count_inbound(events: &[RawEvent]) -> usize {
    inbound_of(events).len()
}

fn outbound(message: i64) -> Outbound {
    Outbound {
        message,
        external_chat_id: "lb-chat-0001".into(),
        to: Recipient {
            phone: Some("+15550000001".into()),
            username: None,
        },
        text: "hello".into(),
        attachments: vec![],
    }
}

#[test]
fn descriptor() {
    let lib = lib();
    assert_eq!(lib.kind(), "loopback");
    assert_eq!(lib.version(), env!("CARGO_PKG_VERSION"));
    assert!(lib.path().ends_with("libloopback.so"));
}

#[test]
fn traffic_arrives_after_connected() {
    let config = json!({"number": "+15551234567", "display_name": "Demo", "rate_per_sec": 200, "clients": 3});
    let (inst, rx) = instance(config, 1024);
    inst.start().unwrap();
    let got = collect_until(&rx, WAIT, |g| count_inbound(g) >= 12);
    let events: Vec<Event> = got.iter().map(|e| e.parse().unwrap()).collect();
    let Event::Status(first) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(first.state, ChannelState::Connecting);
    let Event::Status(second) = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(second.state, ChannelState::Connected);
    assert_eq!(second.number.as_deref(), Some("+15551234567"));
    assert_eq!(second.display_name.as_deref(), Some("Demo"));

    let msgs = inbound_of(&got);
    let ids: HashSet<_> = msgs.iter().map(|m| m.external_message_id.clone()).collect();
    assert_eq!(ids.len(), msgs.len(), "external ids are unique");
    let chats: HashSet<_> = msgs.iter().map(|m| m.external_chat_id.clone()).collect();
    assert_eq!(chats.len(), 3, "one chat per client");
    for m in &msgs {
        let client = m.external_chat_id.strip_prefix("lb-chat-").unwrap();
        assert_eq!(
            m.sender.phone.as_deref(),
            Some(format!("+1555000{client}").as_str())
        );
    }

    assert_eq!(inst.status().unwrap().state, ChannelState::Connected);
    inst.stop().unwrap();
    // Counters are final once stop has joined the traffic thread.
    let details = inst.status().unwrap().details.unwrap();
    assert!(details["inbound"].as_u64().unwrap() >= 12, "{details}");
    // After stop returns nothing more is emitted: the last event is `disconnected`.
    let rest: Vec<_> = rx.try_iter().collect();
    let last = rest.last().unwrap().parse().unwrap();
    assert!(
        matches!(last, Event::Status(ref s) if s.state == ChannelState::Disconnected),
        "{last:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err());
}

#[test]
fn send_yields_a_receipt() {
    let (inst, rx) = instance(json!({"id_prefix": "rcpt"}), 64);
    inst.start().unwrap();
    let sent = inst.send(&outbound(42)).unwrap();
    assert_eq!(sent.external_message_id, "rcpt-out-1");
    let got = collect_until(&rx, WAIT, |g| {
        g.iter().any(|e| matches!(e.parse(), Ok(Event::Receipt(_))))
    });
    let Ok(Event::Receipt(r)) = got.last().unwrap().parse() else {
        panic!()
    };
    assert_eq!((r.message, r.status), (42, ReceiptStatus::Delivered));
    assert_eq!(r.external_message_id.as_deref(), Some("rcpt-out-1"));
    inst.stop().unwrap();
}

#[test]
fn failed_receipts_and_failing_sends() {
    let (inst, rx) = instance(json!({"receipt_status": "failed"}), 64);
    inst.start().unwrap();
    inst.send(&outbound(7)).unwrap();
    let got = collect_until(&rx, WAIT, |g| {
        g.iter().any(|e| matches!(e.parse(), Ok(Event::Receipt(_))))
    });
    let Ok(Event::Receipt(r)) = got.last().unwrap().parse() else {
        panic!()
    };
    assert_eq!(r.status, ReceiptStatus::Failed);
    assert!(r.reason.is_some());

    let (inst, _rx) = instance(json!({"fail_send": true}), 64);
    inst.start().unwrap();
    let e = inst.send(&outbound(8)).unwrap_err();
    assert_eq!((e.code.as_str(), e.retryable), ("unavailable", true));
    assert_eq!(inst.state(), InstanceState::Running);
}

#[test]
fn bad_config_is_a_clear_error() {
    let (tx, _rx) = mpsc::channel();
    let e = Instance::create(lib(), 1, &json!({"clients": 0}), tx.clone(), 8).unwrap_err();
    assert_eq!(e.code, codes::INVALID_CONFIG);
    assert!(e.message.contains("clients = 0"), "{e}");
    let e = Instance::create(lib(), 1, &json!({"rate": 5}), tx, 8).unwrap_err();
    assert!(e.message.contains("unknown field `rate`"), "{e}");
}

#[test]
fn panic_on_send_poisons_the_instance() {
    let (inst, _rx) = instance(json!({"panic_on_send": true}), 64);
    inst.start().unwrap();
    let e = inst.send(&outbound(1)).unwrap_err();
    assert_eq!(e.code, codes::PANICKED);
    assert!(e.message.contains("panic_on_send is set"), "{e}");
    assert!(inst.is_poisoned());
    assert_eq!(inst.send(&outbound(2)).unwrap_err().code, codes::POISONED);
    assert_eq!(inst.status().unwrap_err().code, codes::POISONED);
    assert_eq!(inst.stop().unwrap_err().code, codes::POISONED);
    // Drop destroys it; its traffic thread is joined by the connector's Drop.
    drop(inst);
}

#[test]
fn panic_on_start_poisons_and_fail_start_fails() {
    let (inst, _rx) = instance(json!({"panic_on_start": true}), 64);
    let e = inst.start().unwrap_err();
    assert!(e.is_panic(), "{e}");
    assert_eq!(inst.state(), InstanceState::Poisoned);
    drop(inst);

    let (inst, rx) = instance(json!({"fail_start": true}), 64);
    let e = inst.start().unwrap_err();
    assert_eq!((e.code.as_str(), e.retryable), ("start_failed", true));
    assert_eq!(inst.state(), InstanceState::Stopped);
    let states: Vec<_> = rx
        .try_iter()
        .map(|e| match e.parse().unwrap() {
            Event::Status(s) => s.state,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(states, [ChannelState::Connecting, ChannelState::Error]);
}

/// loopback declares `secret`; the host scrubs its value from what the plugin says: a
/// status reason (event and `status` result) and an error that quotes it.
#[test]
fn declared_secrets_are_scrubbed_from_what_the_plugin_says() {
    const SECRET: &str = "s3cr3t-L00PBACK-value";
    assert_eq!(lib().secret_keys(), ["secret"]);
    let config = json!({"secret": SECRET, "report_error": format!("refused key {SECRET}"), "id_prefix": "sc"});
    let (inst, rx) = instance(config, 64);
    inst.start().unwrap();
    let got = collect_until(&rx, WAIT, |g| g.len() >= 3);
    let reasons: Vec<String> = got
        .iter()
        .filter_map(|e| match e.parse().unwrap() {
            Event::Status(s) => s.reason,
            _ => None,
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r == "refused key ***"),
        "{reasons:?}"
    );
    assert!(reasons.iter().all(|r| !r.contains(SECRET)), "{reasons:?}");
    let s = inst.status().unwrap();
    assert_eq!(s.reason.as_deref(), Some("refused key ***"));
    inst.stop().unwrap();
    drop(inst);

    // A secret of the wrong type, which serde's error quotes.
    let (tx, _rx) = mpsc::channel();
    let e = Instance::create(lib(), 1, &json!({"secret": 987_654_321}), tx, 8).unwrap_err();
    assert_eq!(e.code, codes::INVALID_CONFIG);
    assert!(
        e.message.contains("***") && !e.message.contains("987654321"),
        "{e:?}"
    );
}

#[test]
fn report_error_is_an_error_status_while_running() {
    let config = json!({"report_error": "simulated outage", "rate_per_sec": 500, "fault_starts": 1, "id_prefix": "re"});
    let (inst, rx) = instance(config.clone(), 64);
    inst.start().unwrap();
    let got = collect_until(&rx, WAIT, |g| g.len() >= 3);
    let states: Vec<_> = got
        .iter()
        .map(|e| match e.parse().unwrap() {
            Event::Status(s) => (s.state, s.reason),
            other => panic!("no traffic while in error: {other:?}"),
        })
        .collect();
    assert_eq!(states[1].0, ChannelState::Connected);
    assert_eq!(
        states[2],
        (ChannelState::Error, Some("simulated outage".into()))
    );
    let s = inst.status().unwrap();
    assert_eq!(
        (s.state, s.reason.as_deref()),
        (ChannelState::Error, Some("simulated outage"))
    );
    assert_eq!(inst.state(), InstanceState::Running);
    inst.stop().unwrap();
    drop(inst);

    // The second start of the same configuration runs clean.
    let (inst, rx) = instance(config, 64);
    inst.start().unwrap();
    let got = collect_until(&rx, WAIT, |g| count_inbound(g) >= 1);
    assert!(got.iter().all(|e| !matches!(
        e.parse(),
        Ok(Event::Status(ref s)) if s.state == ChannelState::Error
    )));
    inst.stop().unwrap();
}

#[test]
fn malformed_events_arrive_as_raw_bytes() {
    let (inst, rx) = instance(json!({"malformed_events": true, "burst": 3}), 64);
    inst.start().unwrap();
    let got = collect_until(&rx, WAIT, |g| count_inbound(g) >= 3);
    let bad: Vec<&[u8]> = got
        .iter()
        .filter(|e| e.parse().is_err())
        .map(|e| e.json.as_slice())
        .collect();
    assert_eq!(bad, loopback::MALFORMED);
    inst.stop().unwrap();
}

#[test]
fn busy_backpressure_loses_nothing() {
    // At most 4 events in flight: the burst of 200 must back off on BUSY and retry.
    let (inst, rx) = instance(json!({"burst": 200, "id_prefix": "bp"}), 4);
    inst.start().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while inst.emit_stats().busy == 0 {
        assert!(std::time::Instant::now() < deadline, "never got BUSY");
        std::thread::sleep(Duration::from_millis(5));
    }
    let held: Vec<_> = rx.try_iter().collect();
    assert_eq!(
        held.len(),
        4,
        "the in-flight limit holds while the host does not consume"
    );
    let mut ids: Vec<String> = inbound_of(&held)
        .into_iter()
        .map(|m| m.external_message_id)
        .collect();
    drop(held);
    // Consuming (dropping) events frees slots; everything arrives exactly once.
    while ids.len() < 200 {
        let ev = rx.recv_timeout(WAIT).expect("burst stalled");
        if let Ok(Event::Inbound(m)) = ev.parse() {
            ids.push(m.external_message_id);
        }
    }
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 200);
    assert!(
        inst.status().unwrap().details.unwrap()["busy_retries"]
            .as_u64()
            .unwrap()
            > 0
    );
    inst.stop().unwrap();
}

#[test]
fn deterministic_ids_repeat_across_restarts() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (inst, rx) = instance(json!({"burst": 3, "id_prefix": "fixed"}), 64);
        inst.start().unwrap();
        let got = collect_until(&rx, WAIT, |g| count_inbound(g) >= 3);
        inst.stop().unwrap();
        runs.push(
            inbound_of(&got)
                .into_iter()
                .map(|m| m.external_message_id)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(runs[0], ["fixed-1", "fixed-2", "fixed-3"]);
    assert_eq!(runs[0], runs[1]);
    // Without id_prefix, each start draws a fresh random prefix.
    let prefix = |v: Value| {
        let (inst, _rx) = instance(v, 8);
        inst.status().unwrap().details.unwrap()["id_prefix"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_ne!(prefix(json!({})), prefix(json!({})));
}

#[test]
fn limit_stops_generation() {
    let (inst, rx) = instance(json!({"rate_per_sec": 1000, "limit": 5}), 64);
    inst.start().unwrap();
    collect_until(&rx, WAIT, |g| count_inbound(g) >= 5);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(count_inbound(&rx.try_iter().collect::<Vec<_>>()), 0);
    inst.stop().unwrap();
}

#[test]
fn instances_run_side_by_side_on_one_sink() {
    let (tx, rx) = mpsc::channel();
    let a = Instance::create(lib(), 1, &json!({"rate_per_sec": 100}), tx.clone(), 64).unwrap();
    let b = Instance::create(lib(), 2, &json!({"rate_per_sec": 100}), tx, 64).unwrap();
    let (a, b) = (Arc::new(a), Arc::new(b));
    // Started from other threads: instances are Send + Sync.
    let threads: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|i| std::thread::spawn(move || i.start().unwrap()))
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let got = collect_until(&rx, WAIT, |g| {
        let tagged = |t| {
            g.iter()
                .filter(|e| e.tag == t && matches!(e.parse(), Ok(Event::Inbound(_))))
                .count()
        };
        tagged(1) >= 3 && tagged(2) >= 3
    });
    assert!(got.iter().all(|e| (e.tag == 1) == (e.instance == a.id())));
    a.stop().unwrap();
    b.stop().unwrap();
}

#[test]
fn drop_without_stop_is_clean() {
    let (inst, rx) = instance(json!({"rate_per_sec": 500}), 64);
    inst.start().unwrap();
    collect_until(&rx, WAIT, |g| count_inbound(g) >= 2);
    drop(inst); // stops (joining the thread), then destroys
    let rest: Vec<_> = rx.try_iter().collect();
    let last = rest.last().unwrap().parse().unwrap();
    assert!(
        matches!(last, Event::Status(ref s) if s.state == ChannelState::Disconnected),
        "{last:?}"
    );
}
