//! patchbayctl against a real daemon: every resource's table (header, column order,
//! column widths and alignment, relative times), `-o wide` (config with its secrets
//! masked, absolute times), `--json` / `-o json` (the RPC result unchanged), `-o yaml`
//! (the same data), `status` as a summary, `top` piped and under a pseudo-terminal, the
//! completions (`bash -n`), the man page, and a reader that closes the pipe early.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, PATCHBAYCTL, STORE, StoreKind, ctl};

const SECRET: &str = "lb-secret-for-the-ctl-tables";

/// patchbayctl's stdout, which must come with success and nothing on stderr.
fn pb(d: &Daemon, args: &[&str]) -> String {
    let out = ctl(&d.config, args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "patchbayctl {args:?}: {stderr}");
    assert!(stderr.is_empty(), "patchbayctl {args:?} wrote to stderr: {stderr}");
    stdout
}

fn pb_json(d: &Daemon, args: &[&str]) -> Value {
    let out = pb(d, &[&["-o", "json"], args].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// A cell that must be a relative time ("just now", "12 s ago", "3 min ago").
const AGO: &str = "<ago>";

fn is_ago(s: &str) -> bool {
    s == "just now"
        || s.strip_suffix(" ago").is_some_and(|amount| {
            amount
                .split_once(' ')
                .is_some_and(|(n, unit)| n.parse::<u64>().is_ok() && ["s", "min", "h", "d"].contains(&unit))
        })
}

fn cell_matches(got: &str, want: &str) -> bool {
    if want == AGO { is_ago(got) } else { got == want }
}

/// A table: the header's columns in order, one line per row, each column exactly as
/// wide as its widest cell (header included) and three spaces from the next; cells left
/// aligned except the columns in `right` (money, counts).
fn assert_table(out: &str, columns: &[&str], right: &[&str], rows: &[&[&str]]) {
    let lines: Vec<&str> = out.trim_end_matches('\n').lines().collect();
    assert_eq!(lines.len(), rows.len() + 1, "a header and {} rows:\n{out}", rows.len());
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    // A relative time's width is what the row shows; read it from the row itself.
    let mut cells: Vec<Vec<String>> = Vec::new();
    for (line, want) in lines[1..].iter().zip(rows) {
        assert_eq!(want.len(), columns.len(), "expected row of {columns:?}");
        cells.push(split_row(line, want));
    }
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let render = |row: &[String]| {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            let padded = if right.contains(&columns[i]) {
                format!("{cell:>w$}")
            } else {
                format!("{cell:<w$}")
            };
            line.push_str(&padded);
            line.push_str("   ");
        }
        line.trim_end().to_owned()
    };
    let header: Vec<String> = columns.iter().map(|c| (*c).to_owned()).collect();
    let mut want = vec![render(&header)];
    for (row, expected) in cells.iter().zip(rows) {
        for ((got, exp), column) in row.iter().zip(*expected).zip(columns) {
            assert!(cell_matches(got, exp), "column {column}: {got:?}, expected {exp:?}\n{out}");
        }
        want.push(render(row));
    }
    assert_eq!(lines, want, "layout of\n{out}");
}

/// A row's cells, found by the expected values in order (times by their shape).
fn split_row(line: &str, want: &[&str]) -> Vec<String> {
    let mut rest = line;
    let mut out = Vec::new();
    for exp in want {
        rest = rest.trim_start();
        let cell = if *exp == AGO {
            let end = rest.find(" ago").map(|i| i + 4);
            let end = if rest.starts_with("just now") { Some(8) } else { end };
            &rest[..end.unwrap_or(rest.len())]
        } else if rest.starts_with(exp) {
            &rest[..exp.len()]
        } else {
            panic!("expected {exp:?} at {rest:?} in {line:?}");
        };
        out.push(cell.to_owned());
        rest = &rest[cell.len()..];
    }
    assert!(rest.trim().is_empty(), "more than expected in {line:?}");
    out
}

/// One object: label, then its value where the longest label's column ends.
fn assert_detail(out: &str, rows: &[(&str, &str)]) {
    let lines: Vec<&str> = out.trim_end_matches('\n').lines().collect();
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0) + 3;
    assert_eq!(lines.len(), rows.len(), "{out}");
    for (line, (label, value)) in lines.iter().zip(rows) {
        let (got_label, got_value) = line.split_at(width.min(line.len()));
        assert_eq!(got_label.trim_end(), *label, "{out}");
        assert!(got_label.ends_with("   "), "label column of {line:?}");
        assert!(cell_matches(got_value, value), "{label}: {got_value:?}, expected {value:?}\n{out}");
    }
}

fn inbound(channel: i64, chat: &str, msg: &str, phone: &str) -> Value {
    json!({"kind": "inbound_message", "payload": {
        "channel": channel, "external_chat_id": chat, "external_message_id": msg,
        "sender": {"phone": phone, "name": "Client"}, "text": format!("text of {msg}"),
        "attachments": [], "sent_at": "2026-11-25T10:00:00Z"}})
}

#[tokio::test(flavor = "multi_thread")]
async fn every_resource_as_a_table_and_the_rpc_result_as_json_and_yaml() {
    let d = Daemon::start_with(Backend::Sqlite, "[billing]\ndefault_price = 100\n");

    let created = pb(
        &d,
        &["account", "create", "--name", "Acme", "--admin-name", "Ann", "--admin-email", "ann@acme.test"],
    );
    let (account, admin) = created.split_once("\n\nAdministrator:\n").expect(&created);
    assert_detail(
        account,
        &[
            ("ID", "1"),
            ("NAME", "Acme"),
            ("CURRENCY", "USD"),
            ("BALANCE (MINOR UNITS)", "0"),
            ("DAILY TOTAL (MINOR UNITS)", "0"),
            ("DAYS LEFT", "-"),
            ("CREATED", AGO),
        ],
    );
    assert_detail(
        admin,
        &[
            ("ID", "1"),
            ("NAME", "Ann"),
            ("EMAIL", "ann@acme.test"),
            ("ROLE", "administrator"),
            ("ACCOUNT", "1"),
            ("CREATED", AGO),
        ],
    );
    pb(&d, &["account", "topup", "--account", "1", "--amount", "10000", "--reference", "inv-1"]);
    let olga = pb(
        &d,
        &["user", "add", "--account", "1", "--name", "Olga", "--email", "olga@acme.test"],
    );
    assert_detail(
        &olga,
        &[
            ("ID", "2"),
            ("NAME", "Olga"),
            ("EMAIL", "olga@acme.test"),
            ("ROLE", "operator"),
            ("ACCOUNT", "1"),
            ("CREATED", AGO),
        ],
    );

    // Channels: two quiet loopbacks (one with a secret) and one removed.
    let support = d
        .loopback(1, 1, json!({"number": "+15550000100", "display_name": "Acme support", "rate_per_sec": 0, "secret": SECRET}))
        .await;
    let sales = d
        .loopback(1, 1, json!({"number": "+15550000200", "rate_per_sec": 0, "id_prefix": "s"}))
        .await;
    assert_eq!((support, sales), (1, 2));
    let gone = d.loopback(1, 1, json!({"number": "+15550000300", "rate_per_sec": 0})).await;
    let removed = pb(
        &d,
        &["channel", "remove", "--account", "1", "--actor", "1", "--channel", &gone.to_string()],
    );
    assert_detail(
        &removed,
        &[
            ("ID", "3"),
            ("NAME", "lb"),
            ("KIND", "loopback"),
            ("NUMBER", "+15550000300"),
            ("STATUS", "removed"),
            ("REASON", "removed by an administrator"),
            ("PRICE/DAY (MINOR UNITS)", "100"),
        ],
    );
    let list = pb(&d, &["channel", "list", "--account", "1"]);
    assert_eq!(
        list,
        "\
ID   NAME   KIND       NUMBER         STATUS      REASON   PRICE/DAY (MINOR UNITS)
1    lb     loopback   +15550000100   connected   -                            100
2    lb     loopback   +15550000200   connected   -                            100
"
    );
    let wide = pb(&d, &["-o", "wide", "channel", "list", "--account", "1"]);
    let first = wide.lines().nth(1).unwrap_or_default();
    let cells: Vec<&str> = first.split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
    // … OWNER (this node's id), EPOCH (the lease's on PostgreSQL, none alone on
    // SQLite), DISPLAY NAME, ACCOUNT, CREATED (RFC 3339), REMOVED, CONFIG (secrets
    // masked).
    assert_eq!(cells.len(), 14, "{wide}");
    let node = d.ok("status", json!({})).await["node_id"].clone();
    let epoch = match STORE {
        StoreKind::Sqlite => "-",
        StoreKind::Postgres => "1",
    };
    assert_eq!(cells[7..9], [node.as_str().expect("node_id"), epoch], "{wide}");
    assert_eq!(cells[9..11], ["Acme support", "1"], "{wide}");
    assert!(chrono::DateTime::parse_from_rfc3339(cells[11]).is_ok(), "{wide}");
    assert_eq!(
        cells[12..],
        ["-", "display_name=Acme support, number=+15550000100, rate_per_sec=0, secret=***"],
        "{wide}"
    );
    // The RPC result unchanged, both spellings; YAML the same data; no secret anywhere.
    let rpc = d.ok("channel.list", json!({"account": 1})).await;
    assert_eq!(pb_json(&d, &["channel", "list", "--account", "1"]), rpc);
    let legacy: Value = serde_json::from_str(&pb(&d, &["--json", "channel", "list", "--account", "1"])).expect("json");
    assert_eq!(legacy, rpc);
    let yaml = pb(&d, &["-o", "yaml", "channel", "list", "--account", "1"]);
    let from_yaml: Value = serde_norway::from_str(&yaml).expect("yaml");
    assert_eq!(from_yaml, rpc);
    for out in [&list, &wide, &yaml, &removed] {
        assert!(!out.contains(SECRET), "{out}");
    }

    let ledger = pb(&d, &["account", "ledger", "--account", "1"]);
    let ledger_columns = ["ID", "WHEN", "KIND", "AMOUNT (MINOR UNITS)", "BALANCE AFTER", "CHANNEL", "DAY", "REFERENCE"];
    let today = chrono::Utc::now().date_naive().to_string();
    assert_table(
        &ledger,
        &ledger_columns,
        &["AMOUNT (MINOR UNITS)", "BALANCE AFTER"],
        &[
            &["4", AGO, "charge", "-100", "9700", "3", &today, "-"],
            &["3", AGO, "charge", "-100", "9800", "2", &today, "-"],
            &["2", AGO, "charge", "-100", "9900", "1", &today, "-"],
            &["1", AGO, "topup", "10000", "10000", "-", "-", "inv-1"],
        ],
    );
    assert_detail(
        &pb(&d, &["account", "get", "--account", "1"]),
        &[
            ("ID", "1"),
            ("NAME", "Acme"),
            ("CURRENCY", "USD"),
            ("BALANCE (MINOR UNITS)", "9700"),
            ("DAILY TOTAL (MINOR UNITS)", "200"),
            ("DAYS LEFT", "49"),
            ("CREATED", AGO),
        ],
    );

    let plugins = pb(&d, &["plugin", "list"]);
    let file = d.dir.path().join("plugins/libloopback.so").display().to_string();
    assert_table(
        &plugins,
        &["KIND", "VERSION", "ABI", "CHANNELS", "FILE"],
        &[],
        &[&["loopback", env!("CARGO_PKG_VERSION"), "1", "2", &file]],
    );

    assert_detail(
        &pb(&d, &["settings", "get", "--account", "1"]),
        &[
            ("PHONE FORMAT", "none"),
            ("BALANCE NOTIFY DAYS", "3"),
            ("MARK READ ON OPEN", "yes"),
            ("RESET RESPONSIBLE ON CLOSE", "no"),
        ],
    );
    pb(&d, &["field", "add", "--account", "1", "--actor", "1", "--name", "Tier", "--type", "list", "--option", "new", "--option", "vip"]);
    pb(&d, &["field", "add", "--account", "1", "--actor", "1", "--name", "Notes2", "--type", "text"]);
    assert_table(
        &pb(&d, &["field", "list", "--account", "1"]),
        &["ID", "NAME", "TYPE", "OPTIONS", "CREATED"],
        &[],
        &[&["1", "Tier", "list", "new, vip", AGO], &["2", "Notes2", "text", "-", AGO]],
    );

    // Chats and messages from inbound jobs.
    for (chat, msg, phone) in [("c-1", "m-1", "+15550001001"), ("c-1", "m-2", "+15550001001"), ("c-2", "m-3", "+15550001002")] {
        let id = d.ok("job.enqueue", inbound(support, chat, msg, phone)).await["id"].as_str().expect("id").to_owned();
        d.job_until(&id, &["done"], Duration::from_secs(20)).await;
    }
    assert_table(
        &pb(&d, &["chat", "list", "--account", "1"]),
        &["ID", "CHANNEL", "EXTERNAL CHAT ID", "STATUS", "RESPONSIBLE", "UNREAD", "LAST MESSAGE"],
        &[],
        &[&["2", "1", "c-2", "open", "-", "1", AGO], &["1", "1", "c-1", "open", "-", "2", AGO]],
    );
    assert_table(
        &pb(&d, &["chat", "messages", "1"]),
        &["ID", "DIRECTION", "STATUS", "AUTHOR", "SENT", "TEXT"],
        &[],
        &[
            &["2", "in", "received", "-", AGO, "text of m-2"],
            &["1", "in", "received", "-", AGO, "text of m-1"],
        ],
    );
    let card = pb(&d, &["chat", "get", "1"]);
    let parts: Vec<&str> = card.trim_end().split("\n\n").collect();
    assert_eq!(parts.len(), 3, "{card}");
    assert_detail(
        parts[0],
        &[
            ("ID", "1"),
            ("CHANNEL", "1"),
            ("EXTERNAL CHAT ID", "c-1"),
            ("STATUS", "open"),
            ("RESPONSIBLE", "-"),
            ("UNREAD", "2"),
            ("LAST MESSAGE", AGO),
        ],
    );
    let contact = parts[1].strip_prefix("Contact:\n").expect(parts[1]);
    assert_detail(
        contact,
        &[
            ("CONTACT", "1"),
            ("PHONE", "+15550001001"),
            ("USERNAME", "-"),
            ("NAME", "Client"),
            ("EMAIL", "-"),
            ("URL", "-"),
            ("NOTES", "-"),
        ],
    );
    let fields = parts[2].strip_prefix("Fields:\n").expect(parts[2]);
    assert_table(
        fields,
        &["FIELD", "NAME", "TYPE", "VALUE"],
        &[],
        &[&["1", "Tier", "list", "-"], &["2", "Notes2", "text", "-"]],
    );

    // A dead job: its attempts out of the limit and its last error.
    let dead = d
        .ok("job.enqueue", json!({"kind": "topup", "payload": {"account": 9, "amount": 5, "reference": "r"}}))
        .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let job = d.job_until(&dead, &["dead"], Duration::from_secs(20)).await;
    let attempts = format!("{}/{}", job["attempts"], job["max_attempts"]);
    assert_table(
        &pb(&d, &["job", "list", "--state", "dead"]),
        &["ID", "KIND", "STATE", "ATTEMPTS", "CREATED", "UPDATED", "LAST ERROR"],
        &[],
        &[&[&dead, "topup", "dead", &attempts, AGO, AGO, "account 9 does not exist"]],
    );
    let dead_wide = pb(&d, &["-o", "wide", "job", "get", &dead]);
    assert!(dead_wide.contains(r#"{"account":9,"amount":5,"reference":"r"}"#), "{dead_wide}");
    assert_eq!(pb_json(&d, &["job", "list", "--state", "dead"]), d.ok("job.list", json!({"state": "dead"})).await);

    assert_eq!(pb(&d, &["data", "status", "--account", "1"]), "(none)\n");

    // status: a summary, and the queue by kind as a table. A job's journal row reads
    // done a moment before the queue drops it (the ack follows the commit): wait for
    // the inbound queue to be empty, so IN QUEUE can be pinned.
    d.until("the inbound queue drained", Duration::from_secs(20), || async {
        let s = d.ok("status", json!({})).await;
        (s["queue_depth"]["inbound_message"] == 0).then_some(())
    })
    .await;
    let status = pb(&d, &["status"]);
    let sections: Vec<&str> = status.trim_end().split("\n\n").collect();
    assert_eq!(sections.len(), 3, "{status}");
    assert!(sections[0].starts_with(&format!("patchbayd {}, node ", env!("CARGO_PKG_VERSION"))), "{status}");
    assert!(sections[0].contains(", pid "), "{status}");
    let store = match STORE {
        StoreKind::Sqlite => "sqlite",
        StoreKind::Postgres => "postgres",
    };
    let rpc_status = d.ok("status", json!({})).await;
    let http = rpc_status["http"].as_str().expect("the listener").to_owned();
    let node = rpc_status["node"].as_str().expect("node").to_owned();
    assert_eq!(
        sections[1],
        format!(
            "\
Backends:   queue sqlite, store {store}, mail file
Plugins:    loopback
HTTP:       http://{http}/ (dashboard, /metrics, /readyz)
Health:     ok
Channels:   2 connected, 1 removed
Cluster:    1 node: {node} (2 channels, this one)"
        )
    );
    assert!(
        sections[2].starts_with("KIND              IN QUEUE   PENDING   RUNNING   DONE   FAILED   DEAD\n"),
        "{status}"
    );
    assert!(sections[2].contains("\ninbound_message          0         0         0      3        0      0"), "{status}");
    // The dead job is in the journal's count; whether the queue still counts it
    // depends on when its backend drops it, so IN QUEUE is not pinned here.
    let topup: Vec<&str> = sections[2]
        .lines()
        .find(|l| l.starts_with("topup "))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!([&topup[..1], &topup[2..]].concat(), ["topup", "0", "0", "0", "0", "1"], "{status}");
    assert!(!status.contains('{'), "no JSON in the summary: {status}");
    assert!(!status.contains('\x1b'), "no colour when piped: {status:?}");
}

/// `top` piped prints one frame, with throughput from two samples; under a pseudo-
/// terminal it draws on the alternate screen, quits on `q` or Ctrl-C and leaves the
/// alternate screen again. Colour comes only at a terminal, and not with NO_COLOR.
#[tokio::test(flavor = "multi_thread")]
async fn top_and_colour_at_a_terminal_and_piped() {
    let d = Daemon::start(Backend::Sqlite);
    let frame = pb(&d, &["top"]);
    assert!(frame.starts_with("patchbayd "), "{frame}");
    assert!(
        frame.contains("KIND              IN QUEUE   PENDING   RUNNING   DONE   FAILED   DEAD   DONE/S\n"),
        "{frame}"
    );
    assert!(frame.ends_with("refreshed every 1 s; q, Esc or Ctrl-C quits\n"), "{frame}");

    // q, and Ctrl-C (which raw mode delivers as a key).
    for key in [b"q", b"\x03"] {
        let screen = at_a_terminal(&d, &["top"], &[], Some(key));
        assert!(screen.contains("\x1b[?1049h") && screen.contains("DONE/S"), "{screen:?}");
        assert!(
            screen.trim_end().ends_with("\x1b[?1049l"),
            "the terminal restored after {key:?}: {screen:?}"
        );
    }
    // Colour at a terminal (health ok in green), none with NO_COLOR.
    let green = "\x1b[38;5;10m";
    assert!(at_a_terminal(&d, &["status"], &[], None).contains(green));
    let plain = at_a_terminal(&d, &["status"], &[("NO_COLOR", "1")], None);
    assert!(plain.contains("Health:") && !plain.contains('\x1b'), "{plain:?}");
}

/// patchbayctl under a pseudo-terminal (util-linux `script`); `key`, if any, typed after
/// two refreshes. Its screen output, once it exited with success.
fn at_a_terminal(d: &Daemon, args: &[&str], env: &[(&str, &str)], key: Option<&[u8]>) -> String {
    let command = format!("{PATCHBAYCTL} --config {} {}", d.config.display(), args.join(" "));
    let mut child = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(key) = key {
        std::thread::sleep(Duration::from_millis(2500));
        stdin.write_all(key).expect("type the key");
    }
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "patchbayctl {args:?} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    let out = child.wait_with_output().expect("output");
    let screen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(status.success(), "patchbayctl {args:?}: {screen}");
    screen
}

/// Completions and the man page need no daemon; a reader that stops reading early
/// (`| head`) ends patchbayctl quietly with success, not with a panic.
#[test]
fn completions_man_page_and_a_closed_pipe() {
    let run = |args: &[&str]| {
        let out = Command::new(PATCHBAYCTL).args(args).output().expect("run patchbayctl");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let bash = run(&["completions", "bash"]);
    let mut check = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .spawn()
        .expect("bash");
    check.stdin.take().expect("stdin").write_all(&bash).expect("write");
    assert!(check.wait().expect("bash -n").success(), "bash -n refused the completions");
    assert!(String::from_utf8_lossy(&bash).contains("patchbayctl"));
    for shell in ["zsh", "fish"] {
        assert!(!run(&["completions", shell]).is_empty());
    }
    let man = String::from_utf8_lossy(&run(&["man"])).into_owned();
    assert!(man.contains(".TH patchbayctl 1") && man.contains("completions"), "{man}");

    // The reader is gone before patchbayctl writes its 100 kB.
    let out = Command::new("bash")
        .args([
            "-c",
            &format!("set -o pipefail; (sleep 0.3; exec {PATCHBAYCTL} completions bash) | true"),
        ])
        .output()
        .expect("bash");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
