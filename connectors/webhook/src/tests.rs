//! Unit tests of the webhook connector: config checks, the body checks, and channels
//! started on the SDK's shared listener (routing by path, the listener's bounds, stop
//! freeing the port), driven over real sockets on 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use patchbay_connector_sdk::json_limits::MAX_JSON_DEPTH;
use patchbay_connector_sdk::runtime::http::ListenOptions;
use patchbay_connector_sdk::{ChannelState, Connector, Host, Outbound};
use serde_json::json;

use crate::{Config, Webhook, check_body, sign};

const SECRET: &str = "0123456789abcdef-secret";

fn config() -> Config {
    Config::parse(json!({"secret": SECRET, "path": "/in", "max_body_bytes": 200})).unwrap()
}

#[test]
fn config_defaults_and_validation() {
    let c = Config::parse(json!({"secret": SECRET})).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8088");
    assert_eq!(c.path, "/patchbay/inbound");
    assert_eq!(c.max_skew_secs, 300);
    for bad in [
        json!({}),
        json!({"secret": "short"}),
        json!({"secret": SECRET, "listen": "localhost"}),
        json!({"secret": SECRET, "path": "in"}),
        json!({"secret": SECRET, "max_body_bytes": 0}),
        json!({"secret": SECRET, "max_body_bytes": 2_000_000}),
        json!({"secret": SECRET, "outbound_url": "ftp://x"}),
        json!({"secret": SECRET, "outbound_attempts": 10, "outbound_timeout_secs": 20}),
        json!({"secret": SECRET, "max_skew": 3}),
    ] {
        let e = Config::parse(bad.clone()).unwrap_err();
        assert_eq!(e.code, "invalid_config", "{bad}");
        assert!(!e.message.contains(SECRET), "secret leaked: {}", e.message);
    }
}

#[test]
fn debug_output_redacts_secrets() {
    let c =
        Config::parse(json!({"secret": SECRET, "outbound_secret": "another-secret-0123456789"}))
            .unwrap();
    let shown = format!("{c:?}");
    assert!(
        !shown.contains(SECRET) && !shown.contains("another-secret"),
        "{shown}"
    );
    assert!(shown.contains("<redacted>"), "{shown}");
}

#[test]
fn body_checks() {
    let c = config();
    let now = 1_700_000_000;
    let ts = now.to_string();
    let body = json!({
        "external_chat_id": "c1", "external_message_id": "m1",
        "sender": {"phone": "+15550001111", "name": "Ann"}, "text": "hi",
        "attachments": [{"url": "https://x/y.png"}], "extra": true
    })
    .to_string();
    let sig = sign(SECRET.as_bytes(), now, body.as_bytes()).unwrap();
    let m = check_body(&c, Some(&ts), Some(&sig), body.as_bytes(), now).unwrap();
    assert_eq!(m.external_message_id, "m1");
    assert_eq!(m.sender.name.as_deref(), Some("Ann"));
    assert_eq!(m.attachments.len(), 1);

    let with_date = json!({
        "external_chat_id": "c1", "external_message_id": "m2",
        "sender": {"username": "ann"}, "sent_at": "2026-01-02T03:04:05+01:00"
    })
    .to_string();
    let sig2 = sign(SECRET.as_bytes(), now, with_date.as_bytes()).unwrap();
    let m = check_body(&c, Some(&ts), Some(&sig2), with_date.as_bytes(), now).unwrap();
    assert_eq!(m.sent_at.to_rfc3339(), "2026-01-02T03:04:05+01:00");
    assert_eq!(m.text, "");

    // Authentication comes first: a bad signature on bad JSON is still 401.
    assert_eq!(
        check_body(&c, Some(&ts), Some("sha256=00"), b"{", now)
            .unwrap_err()
            .status,
        401
    );
    let stale = check_body(&c, Some(&ts), Some(&sig), body.as_bytes(), now + 301).unwrap_err();
    assert_eq!(stale.status, 401);
    assert!(stale.message.contains("301 s"), "{}", stale.message);

    for bad in [
        "{".to_owned(),
        json!({"external_chat_id": "c"}).to_string(),
        json!({"external_chat_id": "", "external_message_id": "m", "sender": {"name": "x"}})
            .to_string(),
        json!({"external_chat_id": "c", "external_message_id": "m", "sender": {}}).to_string(),
    ] {
        let sig = sign(SECRET.as_bytes(), now, bad.as_bytes()).unwrap();
        let r = check_body(&c, Some(&ts), Some(&sig), bad.as_bytes(), now).unwrap_err();
        assert_eq!(r.status, 400, "{bad}: {r}");
    }
}

#[test]
fn a_deep_body_is_refused_after_the_signature() {
    let c = Config::parse(json!({"secret": SECRET, "path": "/in"})).unwrap();
    let now = 1_700_000_000;
    let ts = now.to_string();
    let body = |levels: usize| {
        format!(
            r#"{{"external_chat_id":"c","external_message_id":"m","sender":{{"name":"A"}},"attachments":[{}1{}]}}"#,
            "[".repeat(levels - 2),
            "]".repeat(levels - 2)
        )
    };
    let at = body(MAX_JSON_DEPTH);
    let sig = sign(SECRET.as_bytes(), now, at.as_bytes()).unwrap();
    assert!(check_body(&c, Some(&ts), Some(&sig), at.as_bytes(), now).is_ok());
    let over = body(MAX_JSON_DEPTH + 1);
    let sig = sign(SECRET.as_bytes(), now, over.as_bytes()).unwrap();
    let r = check_body(&c, Some(&ts), Some(&sig), over.as_bytes(), now).unwrap_err();
    assert_eq!(r.status, 400);
    assert!(r.message.contains("nested deeper than 32"), "{}", r.message);
    // Unsigned, the same body is an authentication failure first.
    let r = check_body(&c, Some(&ts), Some("sha256=00"), over.as_bytes(), now).unwrap_err();
    assert_eq!(r.status, 401);
    assert!(Config::parse(json!({"secret": SECRET, "max_connections": 0})).is_err());
}

#[test]
fn send_without_outbound_url_is_permanent() {
    let mut w = Webhook::create(json!({"secret": SECRET}), Host::detached()).unwrap();
    let e = w
        .send(Outbound {
            message: 1,
            external_chat_id: "c".into(),
            to: Default::default(),
            text: "x".into(),
            attachments: vec![],
        })
        .unwrap_err();
    assert_eq!(e.code, "unsupported");
    assert!(!e.retryable);
}

#[test]
fn start_listens_and_stop_frees_the_port() {
    let mut w = Webhook::create(
        json!({"secret": SECRET, "listen": "127.0.0.1:0"}),
        Host::detached(),
    )
    .unwrap();
    w.start().unwrap();
    let status = w.status();
    assert_eq!(status.state, ChannelState::Connected);
    let addr = status.details.unwrap()["listen"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(TcpStream::connect(&addr).is_ok());
    let t = Instant::now();
    w.stop().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "stop is prompt");
    // The port is free again once stop returns, so a restarted channel can bind it.
    std::net::TcpListener::bind(&addr).expect("port freed by stop");
}

/// Starts a webhook on a free port; returns it and its address.
fn started(extra: serde_json::Value) -> (Webhook, String) {
    let mut config = json!({"secret": SECRET, "listen": "127.0.0.1:0", "path": "/in"});
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let mut w = Webhook::create(config, Host::detached()).unwrap();
    w.start().unwrap();
    let addr = w.status().details.unwrap()["listen"]
        .as_str()
        .unwrap()
        .to_owned();
    (w, addr)
}

fn read_all(conn: &mut TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_stalled_body_gets_408_and_a_big_one_413() {
    let (mut w, addr) = started(json!({"max_body_bytes": 100}));
    // Declares 50 bytes, sends 5, then stalls: cut off after BODY_TIMEOUT.
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nhello")
        .unwrap();
    let t = Instant::now();
    let answer = read_all(&mut conn);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(t.elapsed() >= ListenOptions::default().body_timeout - Duration::from_secs(1));
    // Chunked (undeclared) and too large: 413 once the limit is passed.
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for _ in 0..3 {
        let _ = conn.write_all(format!("40\r\n{}\r\n", "a".repeat(64)).as_bytes());
    }
    let _ = conn.write_all(b"0\r\n\r\n");
    let answer = read_all(&mut conn);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    w.stop().unwrap();
}

#[test]
fn stop_closes_idle_and_slow_connections() {
    let (mut w, addr) = started(json!({}));
    // One idle kept-alive connection, one that sent half its headers.
    let mut idle = TcpStream::connect(&addr).unwrap();
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    w.stop().unwrap();
    assert!(
        t.elapsed() < ListenOptions::default().stop_grace + Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    // Both see their connection closed (EOF) right away, not after a timeout.
    let t = Instant::now();
    read_all(&mut idle);
    read_all(&mut slow);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// One request on a fresh connection; the answer's status line and body.
fn request(addr: &str, raw: &[u8]) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(raw).unwrap();
    read_all(&mut conn)
}

fn signed_post(path: &str, secret: &str, body: &str) -> Vec<u8> {
    let ts = chrono_now();
    let sig = sign(secret.as_bytes(), ts, body.as_bytes()).unwrap();
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Patchbay-Timestamp: {ts}\r\nX-Patchbay-Signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn chrono_now() -> i64 {
    patchbay_connector_sdk::chrono::Utc::now().timestamp()
}

#[test]
fn the_listener_refuses_wrong_paths_methods_and_sizes() {
    let (mut w, addr) = started(json!({"max_body_bytes": 100}));
    let answer = request(
        &addr,
        b"POST /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = request(
        &addr,
        b"GET /in HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let answer = request(
        &addr,
        b"POST /in HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 101\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // A query does not change the path.
    let answer = request(&addr, &signed_post("/in?x=1", SECRET, "{"));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let details = w.status().details.unwrap();
    assert_eq!(
        details["rejected"], 3,
        "405, 413 and 400 (404 names no channel): {details}"
    );
    w.stop().unwrap();
}

#[test]
fn channels_on_one_address_are_routed_by_path() {
    const OTHER: &str = "another-secret-0123456789";
    let (mut a, addr) = started(json!({}));
    let mut b = Webhook::create(
        json!({"secret": OTHER, "listen": addr, "path": "/b"}),
        Host::detached(),
    )
    .unwrap();
    b.start().unwrap();
    assert_eq!(b.status().details.unwrap()["listen"], addr.as_str());
    // Signed bad JSON: 400 where the path's channel has that secret, 401 elsewhere.
    let answer = request(&addr, &signed_post("/in", SECRET, "{"));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = request(&addr, &signed_post("/b", SECRET, "{"));
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = request(&addr, &signed_post("/b", OTHER, "{"));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A second channel on the same address and path is refused, retryably.
    let mut twin = Webhook::create(
        json!({"secret": OTHER, "listen": addr, "path": "/b"}),
        Host::detached(),
    )
    .unwrap();
    let e = twin.start().unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.retryable),
        ("listen_failed", true),
        "{e:?}"
    );
    // One leaves: its path is gone, the other still served, the port still open.
    a.stop().unwrap();
    let answer = request(&addr, &signed_post("/in", SECRET, "{"));
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = request(&addr, &signed_post("/b", OTHER, "{"));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The last one frees the port.
    b.stop().unwrap();
    std::net::TcpListener::bind(&addr).expect("port freed by the last stop");
}
