//! The control socket under bad input: every malformed request gets its JSON-RPC error
//! code and the daemon keeps answering on the same connection and on new ones.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon};

fn exchange(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &[u8]) -> Value {
    stream.write_all(line).expect("write");
    stream.write_all(b"\n").expect("write");
    let mut reply = String::new();
    reader.read_line(&mut reply).expect("read");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"))
}

fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_error_codes_and_changes_nothing() {
    let d = Daemon::start(Backend::Sqlite);
    let mode = std::fs::metadata(&d.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "control socket must be mode 0660");

    let mut stream = UnixStream::connect(&d.socket).expect("connect");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let status = br#"{"jsonrpc":"2.0","id":1,"method":"status"}"#;

    // Random bytes, including invalid UTF-8 and NULs.
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .filter(|b| *b != b'\n')
        .collect();
    assert_eq!(code(&exchange(&mut stream, &mut reader, &junk)), -32700);
    assert_eq!(
        exchange(&mut stream, &mut reader, status)["result"]["version"],
        env!("CARGO_PKG_VERSION")
    );

    // A 2 MiB line is refused without reading it into a request.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":2,"method":"status","params":{{"pad":"{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    let reply = exchange(&mut stream, &mut reader, big.as_bytes());
    assert_eq!(code(&reply), -32600);
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("longer than")
    );
    assert!(exchange(&mut stream, &mut reader, status)["result"].is_object());

    for (line, want) in [
        (&br#"{"jsonrpc":"2.0","id":3,"method":"status""#[..], -32700),
        (br#"[]"#, -32600),
        (br#"42"#, -32600),
        (br#"{"id":4,"method":"status"}"#, -32600),
        (br#"{"jsonrpc":"2.0","id":5,"method":7}"#, -32600),
        (br#"{"jsonrpc":"2.0","id":6,"method":"no.such"}"#, -32601),
        (br#"{"jsonrpc":"2.0","id":7,"method":"account.get","params":[1]}"#, -32602),
        (br#"{"jsonrpc":"2.0","id":8,"method":"account.get","params":{"account":"one"}}"#, -32602),
        (br#"{"jsonrpc":"2.0","id":9,"method":"account.get","params":{}}"#, -32602),
        (br#"{"jsonrpc":"2.0","id":10,"method":"account.topup","params":{"account":1,"amount":1.5,"reference":"r"}}"#, -32602),
        (br#"{"jsonrpc":"2.0","id":11,"method":"account.create","params":{"name":"x","admin":{"name":"a","email":"a@b.c"},"color":"red"}}"#, -32602),
        (br#"{"jsonrpc":"2.0","id":12,"method":"job.enqueue","params":{"kind":"topup","payload":{"account":1}}}"#, -32000),
        (br#"{"jsonrpc":"2.0","id":13,"method":"job.enqueue","params":{"kind":"launch_rockets","payload":{}}}"#, -32000),
    ] {
        let reply = exchange(&mut stream, &mut reader, line);
        assert_eq!(code(&reply), want, "{} -> {reply}", String::from_utf8_lossy(line));
        assert!(!reply["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    // Requests answer in order, ids echoed; a batch answers as an array.
    let batch = exchange(
        &mut stream,
        &mut reader,
        br#"[{"jsonrpc":"2.0","id":"a","method":"status"},{"jsonrpc":"2.0","id":"b","method":"nope"}]"#,
    );
    assert_eq!(batch[0]["id"], "a");
    assert_eq!(code(&batch[1]), -32601);

    // Nothing was created by any of it, and a new connection still works.
    // (The only job is today's billing run, which every daemon queues when it starts
    // after billing.run_at.)
    let status = d.ok("status", json!({})).await;
    let kinds: Vec<&String> = status["jobs"]
        .as_object()
        .map(|j| j.keys().collect())
        .unwrap_or_default();
    assert!(kinds.iter().all(|k| *k == "billing_run"), "{status}");
    d.fails("account.get", json!({"account": 1}), "not_found")
        .await;
}
