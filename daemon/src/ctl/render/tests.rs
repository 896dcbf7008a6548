//! The pure renderers: times, column choice, secret masking, tables, the status summary
//! and `top`'s frame, on results shaped like the daemon's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use serde_json::{Value, json};

use super::{Ctx, View, redacted_config, render};
use crate::ctl::columns::Resource;
use crate::ctl::top::{Sample, frame, quits, rates};
use crate::time_text::{absolute, duration, relative};

const NOW: i64 = 1_796_607_034_000;
const MIN: i64 = 60_000;

fn ctx(wide: bool, secrets: &BTreeMap<String, Vec<String>>) -> Ctx<'_> {
    Ctx {
        wide,
        colour: false,
        now_ms: NOW,
        secrets,
    }
}

#[test]
fn relative_times_name_the_largest_unit_past_and_future() {
    let cases = [
        (NOW, "just now"),
        (NOW - 999, "just now"),
        (NOW - 12_000, "12 s ago"),
        (NOW - 3 * MIN - 59_000, "3 min ago"),
        (NOW - 60 * MIN, "1 h ago"),
        (NOW - 30 * 60 * MIN, "30 h ago"),
        (NOW - 4 * 24 * 60 * MIN, "4 d ago"),
        (NOW + 2 * 60 * MIN, "in 2 h"),
        (NOW + 45_000, "in 45 s"),
    ];
    for (at, want) in cases {
        assert_eq!(relative(at, NOW), want, "{} ms from now", at - NOW);
    }
    assert_eq!(absolute(NOW), "2026-12-07T01:30:34Z");
    assert_eq!(absolute(i64::MAX), i64::MAX.to_string());
    assert_eq!(duration(12), "12 s");
    assert_eq!(duration(5 * 60 + 3), "5 min 3 s");
    assert_eq!(duration(2 * 3600 + 5 * 60 + 9), "2 h 5 min");
    assert_eq!(duration(3 * 86_400 + 4 * 3600), "3 d 4 h");
}

fn channel(id: i64, kind: &str, status: &str, reason: Value, config: Value) -> Value {
    json!({
        "id": id, "account": 1, "kind": kind, "name": format!("chan-{id}"),
        "config": config, "status": status, "status_reason": reason,
        "number": "+15550000100", "display_name": "Support",
        "created_at": NOW - 5 * MIN, "removed_at": null, "daily_price": 100,
    })
}

#[test]
fn channel_list_shows_the_curated_columns_in_order_and_wide_adds_the_rest() {
    let none = BTreeMap::new();
    let rows = json!([
        channel(
            1,
            "loopback",
            "connected",
            Value::Null,
            json!({"clients": 3})
        ),
        channel(12, "telegram", "error", json!("token refused"), json!({})),
    ]);
    let table = render(View::Of(Resource::Channel), &rows, &ctx(false, &none));
    let want = "\
ID   NAME      KIND       NUMBER         STATUS      REASON          PRICE/DAY (MINOR UNITS)
1    chan-1    loopback   +15550000100   connected   -                                   100
12   chan-12   telegram   +15550000100   error       token refused                       100";
    assert_eq!(table, want);
    assert!(
        !table.contains("clients"),
        "config only with -o wide: {table}"
    );

    let wide = render(View::Of(Resource::Channel), &rows, &ctx(true, &none));
    let header = wide.lines().next().unwrap_or_default();
    assert_eq!(
        header
            .split("   ")
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect::<Vec<_>>(),
        [
            "ID",
            "NAME",
            "KIND",
            "NUMBER",
            "STATUS",
            "REASON",
            "PRICE/DAY (MINOR UNITS)",
            "OWNER",
            "EPOCH",
            "DISPLAY NAME",
            "ACCOUNT",
            "CREATED",
            "REMOVED",
            "CONFIG"
        ]
    );
    // Wide times are absolute; default ones relative.
    assert!(wide.contains("2026-12-07T01:25:34Z"), "{wide}");
    let one = render(
        View::Of(Resource::Account),
        &json!({"created_at": NOW - 3 * MIN}),
        &ctx(false, &none),
    );
    assert!(
        one.contains("CREATED                     3 min ago"),
        "{one}"
    );
}

#[test]
fn secrets_never_show_in_any_table() {
    let secrets = BTreeMap::from([("telegram".to_owned(), vec!["token".to_owned()])]);
    // A daemon that forgot to mask: the table masks the connector's secret keys anyway.
    let config = json!({"token": "123:SECRET", "api_base": "http://127.0.0.1:9"});
    assert_eq!(
        redacted_config(&config, Some(&["token".to_owned()])),
        "api_base=http://127.0.0.1:9, token=***"
    );
    // A kind whose secrets are unknown has every value masked.
    assert_eq!(redacted_config(&config, None), "api_base=***, token=***");
    assert_eq!(redacted_config(&json!({}), None), "-");
    let rows = json!([
        channel(1, "telegram", "connected", Value::Null, config.clone()),
        channel(
            2,
            "gone",
            "connected",
            Value::Null,
            json!({"password": "p4ss"})
        ),
    ]);
    for wide in [false, true] {
        let table = render(View::Of(Resource::Channel), &rows, &ctx(wide, &secrets));
        assert!(
            !table.contains("SECRET") && !table.contains("p4ss"),
            "{table}"
        );
    }
    let one = render(View::Of(Resource::Channel), &rows[0], &ctx(true, &secrets));
    assert!(
        one.contains("token=***") && !one.contains("SECRET"),
        "{one}"
    );
}

#[test]
fn jobs_show_attempts_out_of_the_limit_and_the_last_error() {
    let none = BTreeMap::new();
    let jobs = json!([{
        "id": "01M971ZRVJPT6ZT8DFAP6KFP3H", "kind": "topup", "state": "dead",
        "attempts": 8, "max_attempts": 8, "last_error": "account 3 does not exist",
        "created_at": NOW - 2 * 60 * MIN, "updated_at": NOW - 12_000, "run_at": NOW,
        "idempotency_key": null, "payload": {"account": 3},
    }]);
    let table = render(View::Of(Resource::Job), &jobs, &ctx(false, &none));
    let want = "\
ID                           KIND    STATE   ATTEMPTS   CREATED   UPDATED    LAST ERROR
01M971ZRVJPT6ZT8DFAP6KFP3H   topup   dead    8/8        2 h ago   12 s ago   account 3 does not exist";
    assert_eq!(table, want);
    let wide = render(View::Of(Resource::Job), &jobs, &ctx(true, &none));
    assert!(
        wide.contains(r#"{"account":3}"#),
        "payload with -o wide: {wide}"
    );
    assert_eq!(
        render(View::Of(Resource::Job), &json!([]), &ctx(false, &none)),
        "(none)"
    );
    assert_eq!(
        render(
            View::Of(Resource::Deletion),
            &Value::Null,
            &ctx(false, &none)
        ),
        "(none)"
    );
}

fn status(done: i64, down: &[&str]) -> Value {
    json!({
        "version": "0.1.0", "node": "eu-1", "pid": 4242, "uptime_secs": 7509,
        "backends": {"queue": "redis", "store": "sqlite", "mail": "file"},
        "health": {"ok": down.is_empty(), "down": down},
        "plugins": ["loopback", "telegram"],
        "http": "127.0.0.1:9464",
        "channels": {"connected": 3, "error": 1},
        "queue_depth": {"inbound_message": 12, "send_message": null},
        "jobs": {"inbound_message": {"done": done, "running": 2}, "send_message": {"dead": 1}},
    })
}

#[test]
fn status_is_a_summary_with_what_is_down_and_a_table_of_job_kinds() {
    let none = BTreeMap::new();
    let text = render(View::Status, &status(100, &[]), &ctx(false, &none));
    let want = "\
patchbayd 0.1.0, node eu-1, pid 4242, up 2 h 5 min

Backends:   queue redis, store sqlite, mail file
Plugins:    loopback, telegram
HTTP:       http://127.0.0.1:9464/ (dashboard, /metrics, /readyz)
Health:     ok
Channels:   3 connected, 1 error

KIND              IN QUEUE   PENDING   RUNNING   DONE   FAILED   DEAD
inbound_message         12         0         2    100        0      0
send_message             ?         0         0      0        0      1";
    assert_eq!(text, want);
    let down = render(
        View::Status,
        &status(100, &["queue down (connection refused)"]),
        &ctx(false, &none),
    );
    assert!(
        down.contains("Health:     degraded\n            - queue down (connection refused)"),
        "{down}"
    );
    let mut store_down = status(0, &["store down (timed out)"]);
    store_down["jobs"] = Value::Null;
    let text = render(View::Status, &store_down, &ctx(false, &none));
    assert!(
        text.contains("\ninbound_message         12         ?         ?      ?        ?      ?"),
        "{text}"
    );
}

#[test]
fn top_computes_throughput_from_successive_counts() {
    let none = BTreeMap::new();
    let t0 = Instant::now();
    let first = Sample {
        at: t0,
        status: status(100, &[]),
    };
    let second = Sample {
        at: t0 + Duration::from_secs(2),
        status: status(135, &[]),
    };
    let r = rates(&first, &second);
    assert_eq!(r.get("inbound_message"), Some(&17.5));
    assert_eq!(r.get("send_message"), Some(&0.0));
    let shown = frame(
        Some(&first),
        &second,
        Duration::from_secs(2),
        &ctx(false, &none),
    );
    let row = shown
        .lines()
        .find(|l| l.starts_with("inbound_message"))
        .unwrap_or_default();
    assert_eq!(
        row,
        "inbound_message         12         0         2    135        0      0     17.5"
    );
    assert!(
        shown.ends_with("refreshed every 2 s; q, Esc or Ctrl-C quits"),
        "{shown}"
    );
    // The first frame has no rate yet.
    let first_frame = frame(None, &first, Duration::from_secs(1), &ctx(false, &none));
    assert!(first_frame.contains("DONE/S"), "{first_frame}");
    assert!(quits(&KeyEvent::new(
        KeyCode::Char('q'),
        KeyModifiers::NONE
    )));
    assert!(quits(&KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE)));
    assert!(quits(&KeyEvent::new(
        KeyCode::Char('c'),
        KeyModifiers::CONTROL
    )));
    assert!(!quits(&KeyEvent::new(
        KeyCode::Char('c'),
        KeyModifiers::NONE
    )));
}

#[test]
fn long_reasons_are_cut_in_list_tables_but_whole_in_one_object_and_with_wide() {
    let none = BTreeMap::new();
    let reason = "connector refused its configuration:".repeat(4);
    let row = channel(2, "telegram", "error", json!(reason), json!({}));
    let list = render(
        View::Of(Resource::Channel),
        &json!([row]),
        &ctx(false, &none),
    );
    let cut = format!("{}…", &reason[..59]);
    assert!(list.contains(&format!("error    {cut}   ")), "{list}");
    let wide = render(
        View::Of(Resource::Channel),
        &json!([row]),
        &ctx(true, &none),
    );
    assert!(wide.contains(&reason), "{wide}");
    let one = render(View::Of(Resource::Channel), &row, &ctx(false, &none));
    assert!(one.contains(&reason), "{one}");
}

#[test]
fn node_list_shows_names_instances_counts_and_heartbeats() {
    let none = BTreeMap::new();
    let rows = json!([
        {"id": "eu-1/01M97JN6NT", "name": "eu-1", "instance": "01M97JN6NT", "channels": 15,
         "started_at": NOW - 60 * MIN, "heartbeat_at": NOW - 1_000, "expires_at": NOW + 14_000,
         "max_channels": null, "this": true},
        {"id": "eu-2/01M97JR2KN", "name": "eu-2", "instance": "01M97JR2KN", "channels": 14,
         "started_at": NOW - 5 * MIN, "heartbeat_at": NOW - 3_000, "expires_at": NOW + 12_000,
         "max_channels": 100, "this": false},
    ]);
    let table = render(View::Of(Resource::Node), &rows, &ctx(false, &none));
    let want = "\
NAME   INSTANCE     CHANNELS   STARTED     HEARTBEAT   THIS
eu-1   01M97JN6NT   15         1 h ago     1 s ago     yes
eu-2   01M97JR2KN   14         5 min ago   3 s ago     no";
    assert_eq!(table, want);
}
