//! The control socket's bounds on the real daemon: an over-size batch costs little
//! memory and gets one error, connections past `control.max_connections` get an error
//! line and are closed while the daemon keeps answering, a client that never reads is
//! dropped, idle ones are closed, and over-deep requests and `job.enqueue` payloads get
//! clear errors.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon};

const MIB_KB: u64 = 1024;

/// A field of /proc/<pid>/status in kB (VmRSS, VmHWM).
fn vm_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

fn connect(d: &Daemon) -> (UnixStream, BufReader<UnixStream>) {
    let stream = UnixStream::connect(&d.socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let reader = BufReader::new(stream.try_clone().expect("clone"));
    (stream, reader)
}

fn exchange(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &[u8]) -> Value {
    stream.write_all(line).expect("write");
    stream.write_all(b"\n").expect("write");
    read_reply(reader)
}

fn read_reply(reader: &mut BufReader<UnixStream>) -> Value {
    let mut reply = String::new();
    reader.read_line(&mut reply).expect("read");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"))
}

/// `control::server::ADMIN_RESERVE`: connections root may open past the cap.
const ADMIN_RESERVE: usize = 8;

const STATUS: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"status"}"#;

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

/// Raises this process's open-file soft limit to its hard limit: the test holds
/// thousands of sockets, and the daemon it spawns inherits the limit.
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("raise RLIMIT_NOFILE");
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_mib_batch_gets_one_error_and_little_memory() {
    let d = Daemon::start(Backend::Sqlite);
    let (mut stream, mut reader) = connect(&d);
    assert!(exchange(&mut stream, &mut reader, STATUS)["result"].is_object());
    let before = vm_kb(d.pid(), "VmHWM");
    // Just under the 1 MiB line limit: ~24,000 status calls, then ~500,000 invalid
    // requests, each of which would get an error object of its own.
    let item = std::str::from_utf8(STATUS).expect("utf8");
    let statuses = format!("[{}]", vec![item; 1_040_000 / (item.len() + 1)].join(","));
    let ones = format!("[{}]", vec!["1"; 520_000].join(","));
    for batch in [statuses, ones] {
        assert!(batch.len() < 1024 * 1024, "{}", batch.len());
        let reply = exchange(&mut stream, &mut reader, batch.as_bytes());
        assert!(reply.is_object(), "one error, not one per request");
        assert_eq!(error_code(&reply), -32600, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("at most 100") && message.contains("control.max_batch"),
            "{message}"
        );
    }
    let after = vm_kb(d.pid(), "VmHWM");
    assert!(
        after.saturating_sub(before) < 64 * MIB_KB,
        "peak RSS grew from {before} kB to {after} kB"
    );
    // A batch within the cap is still answered request by request, on the same line.
    let two = format!("[{item},{item}]");
    let reply = exchange(&mut stream, &mut reader, two.as_bytes());
    assert_eq!(reply.as_array().map(Vec::len), Some(2), "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_get_an_error_line_and_the_daemon_still_answers() {
    const CAP: usize = 1_500;
    const OPEN: usize = 2_000;
    let limit = raise_nofile();
    assert!(
        limit > (OPEN + CAP + 1_024) as u64,
        "RLIMIT_NOFILE hard limit {limit} is too low for this test"
    );
    let d = Daemon::start_with(
        Backend::Sqlite,
        &format!("[control]\nmax_connections = {CAP}\n"),
    );
    let mut served = Vec::new();
    for _ in 0..CAP {
        served.push(UnixStream::connect(&d.socket).expect("connect"));
    }
    // The daemon accepts in order: once the last of these answers, all hold a slot.
    let last = served.last_mut().expect("connections");
    last.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut reader = BufReader::new(last.try_clone().expect("clone"));
    assert!(exchange(last, &mut reader, STATUS)["result"].is_object());

    // Root (this test) gets a small reserve past the cap, so one client that holds
    // every slot cannot lock the administrators out.
    for _ in 0..ADMIN_RESERVE {
        let (mut s, mut r) = connect(&d);
        assert!(exchange(&mut s, &mut r, STATUS)["result"].is_object());
        served.push(s);
    }
    for i in CAP + ADMIN_RESERVE..OPEN {
        let (_stream, mut reader) = connect(&d);
        let reply = read_reply(&mut reader);
        assert_eq!(
            reply["error"]["data"]["kind"], "unavailable",
            "#{i}: {reply}"
        );
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("control.max_connections"), "{message}");
        // ...and closed: end of stream (or a reset), never a hang.
        let mut rest = Vec::new();
        match reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "#{i}: {rest:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "#{i}: {e}"),
        }
    }
    // The served ones are intact: idle, no error line waiting, and still answering.
    for (i, s) in served.iter().enumerate() {
        s.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let mut s_ref: &UnixStream = s;
        let r = s_ref.read(&mut byte);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "served connection #{i}: {r:?}"
        );
        s.set_nonblocking(false).expect("blocking");
    }
    let first = &mut served[0];
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut reader = BufReader::new(first.try_clone().expect("clone"));
    assert!(exchange(first, &mut reader, STATUS)["result"].is_object());

    // One served client leaves: its slot is free for a new connection.
    drop(reader);
    served.remove(0);
    d.until("a slot freed", Duration::from_secs(10), || async {
        // Until then this one is refused, and may be closed before the write.
        let (mut s, mut r) = connect(&d);
        let _ = s.write_all(&[STATUS, b"\n"].concat());
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let reply: Value = serde_json::from_str(&line).ok()?;
        reply["result"]["version"].is_string().then_some(())
    })
    .await;
    // 500 refusals within seconds: logged once or twice, not 500 times.
    let logged = d
        .log()
        .matches("control.max_connections are connected")
        .count();
    assert!((1..=2).contains(&logged), "refusals logged {logged} times");
}

/// 2,000 idle clients under a cap that admits them cost little, and a new
/// connection's `status` is still answered at once.
#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_idle_connections_and_status_still_answers() {
    const OPEN: usize = 2_000;
    let limit = raise_nofile();
    assert!(
        limit > (2 * OPEN + 1_024) as u64,
        "RLIMIT_NOFILE hard limit {limit} is too low for this test"
    );
    let d = Daemon::start_with(Backend::Sqlite, "[control]\nmax_connections = 4096\n");
    let pid = d.pid();
    let (mut s, mut r) = connect(&d);
    assert!(exchange(&mut s, &mut r, STATUS)["result"].is_object());
    let before = vm_kb(pid, "VmRSS");
    let mut idle = Vec::with_capacity(OPEN);
    for _ in 0..OPEN {
        idle.push(UnixStream::connect(&d.socket).expect("connect"));
    }
    let started = std::time::Instant::now();
    let (mut s, mut r) = connect(&d);
    let reply = exchange(&mut s, &mut r, STATUS);
    assert!(reply["result"]["version"].is_string(), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let grown = vm_kb(pid, "VmRSS").saturating_sub(before);
    assert!(
        grown < 64 * MIB_KB,
        "2,000 idle connections grew the daemon by {grown} kB"
    );
    // Every idle one is still open (none was refused or closed).
    for (i, c) in idle.iter().enumerate() {
        c.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let r = (&*c).read(&mut byte);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "idle connection #{i}: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_is_dropped_with_bounded_memory() {
    let d = Daemon::start_with(Backend::Sqlite, "[control]\nwrite_timeout_secs = 2\n");
    let pid = d.pid();
    let baseline = vm_kb(pid, "VmRSS");
    let stream = UnixStream::connect(&d.socket).expect("connect");
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    // Writes 10,000 requests and never reads; then keeps writing until the daemon has
    // closed the connection. Returns how many were written.
    let writer = std::thread::spawn(move || {
        let mut stream = stream;
        let line = [STATUS, b"\n"].concat();
        let start = Instant::now();
        let mut written = 0u32;
        while start.elapsed() < Duration::from_secs(60) {
            match stream.write_all(&line) {
                Ok(()) => written += 1,
                Err(e) => return Ok((written, e.kind())),
            }
            if written >= 10_000 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err(written)
    });
    let start = Instant::now();
    let mut peak = baseline;
    while !writer.is_finished() && start.elapsed() < Duration::from_secs(70) {
        peak = peak.max(vm_kb(pid, "VmRSS"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcome = writer.join().expect("writer thread");
    let (written, kind) = outcome.unwrap_or_else(|n| {
        panic!(
            "the daemon kept a non-reading client for 60 s ({n} requests written)\n{}",
            d.log()
        )
    });
    assert!(
        matches!(kind, ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
        "{kind:?}"
    );
    assert!(written < 10_000, "the daemon stopped reading: {written}");
    assert!(
        peak.saturating_sub(baseline) < 64 * MIB_KB,
        "RSS grew from {baseline} kB to {peak} kB"
    );
    assert!(
        d.log()
            .contains("took no reply within control.write_timeout_secs"),
        "{}",
        d.log()
    );
    assert!(d.ok("status", json!({})).await["version"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_too_deep_request_gets_a_clear_error_and_the_connection_stays() {
    let d = Daemon::start(Backend::Sqlite);
    let (mut stream, mut reader) = connect(&d);
    // 40 levels, and 100,000 (far past serde_json's own limit of 128).
    for levels in [40, 100_000] {
        let line = format!(
            r#"{{"jsonrpc":"2.0","id":7,"method":"status","params":{{"x":{}0{}}}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        );
        let reply = exchange(&mut stream, &mut reader, line.as_bytes());
        assert_eq!(error_code(&reply), -32600, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("nested deeper than 35 levels") && message.contains("at most 32"),
            "{message}"
        );
        let ok = exchange(&mut stream, &mut reader, STATUS);
        assert!(ok["result"]["version"].is_string(), "{ok}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn job_enqueue_refuses_a_too_deep_payload() {
    let d = Daemon::start(Backend::Sqlite);
    // 33 levels: inside the socket's line bound, past what a job may carry.
    let mut deep = json!(0);
    for _ in 0..32 {
        deep = json!([deep]);
    }
    let message = d
        .fails(
            "job.enqueue",
            json!({"kind": "topup", "payload": {"account": 1, "extra": deep}}),
            "invalid_value",
        )
        .await;
    assert!(message.contains("nested deeper than 32"), "{message}");
    let jobs = d.ok("job.list", json!({"kind": "topup"})).await;
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{jobs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_or_trickling_connection_is_closed() {
    let d = Daemon::start_with(Backend::Sqlite, "[control]\nidle_timeout_secs = 1\n");
    let (mut idle, mut idle_reader) = connect(&d);
    assert!(exchange(&mut idle, &mut idle_reader, STATUS)["result"].is_object());
    // Half a request, never finished, counts as idle too.
    let (mut trickle, mut trickle_reader) = connect(&d);
    trickle
        .write_all(br#"{"jsonrpc":"2.0","id":1,"#)
        .expect("write");
    let start = Instant::now();
    for reader in [&mut idle_reader, &mut trickle_reader] {
        let mut rest = Vec::new();
        match reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(d.ok("status", json!({})).await["version"].is_string());
}
