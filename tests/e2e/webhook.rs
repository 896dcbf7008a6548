//! The webhook connector in the real daemon: signed inbound requests are stored, bad
//! ones are refused with the documented status and store nothing, a 200 means the
//! message survives a kill -9 of the daemon right after it, and an outbound message
//! survives one 500 from the gateway and is delivered once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_http::{FakeServer, Response, post};
use crate::harness::{Backend, Daemon, install_connector};

const SECRET: &str = "e2e-webhook-secret-0123456789";

fn signed(ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        (webhook::TIMESTAMP_HEADER, ts.to_string()),
        (
            webhook::SIGNATURE_HEADER,
            webhook::sign(SECRET.as_bytes(), ts, body).expect("sign"),
        ),
    ]
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn all_messages(d: &Daemon, account: i64) -> Vec<Value> {
    d.account_messages(account).await
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_inbound_and_retried_outbound() {
    // The gateway: the first outbound POST gets a 500, every later one a 200.
    let posts = Arc::new(AtomicU32::new(0));
    let counter = posts.clone();
    let gateway = FakeServer::start(move |_req| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Response::json(500, json!({"error": "try again"}))
        } else {
            Response::json(200, json!({"external_message_id": "gw-1"}))
        }
    });

    let mut d = Daemon::start_full(Backend::Sqlite, "", |dir| install_connector(dir, "webhook"));
    let (acc, admin) = d.account("hooks").await;
    let config = json!({
        "secret": SECRET, "listen": "127.0.0.1:0", "path": "/in", "max_body_bytes": 2048,
        "max_skew_secs": 60, "outbound_url": format!("{}/out", gateway.url()),
        "outbound_timeout_secs": 2, "display_name": "Gateway",
    });
    let ch = d
        .ok(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "webhook", "name": "gw", "config": config}),
        )
        .await;
    let id = ch["id"].as_i64().expect("channel id");
    // Port 0 in the config: the connector reports the URL it listens on as its number.
    let url = d
        .until("webhook connected", Duration::from_secs(20), || async {
            let list = d.ok("channel.list", json!({"account": acc})).await;
            let c = list.as_array()?.iter().find(|c| c["id"] == id)?.clone();
            (c["status"] == "connected").then(|| c["number"].as_str().map(str::to_owned))?
        })
        .await;
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/in"),
        "{url}"
    );

    let message = |mid: &str| {
        json!({
            "external_chat_id": "client-7", "external_message_id": mid,
            "sender": {"phone": "+15550007777", "name": "Client Seven"},
            "text": format!("hello {mid}"), "attachments": [{"type": "image", "url": "https://example.test/a.png"}],
        })
        .to_string()
    };

    // Refused: each with its status, none stored.
    let body = message("bad");
    let (status, text) = post(&url, &[], body.as_bytes());
    assert_eq!(status, 401, "unsigned: {text}");
    assert!(text.contains("X-Patchbay-Timestamp"), "{text}");
    let mut wrong = signed(now(), body.as_bytes());
    wrong[1].1 = webhook::sign(b"not-the-secret-at-all", now(), body.as_bytes()).expect("sign");
    let (status, text) = post(&url, &wrong, body.as_bytes());
    assert_eq!(status, 401, "mis-signed: {text}");
    assert!(text.contains("does not match"), "{text}");
    let (status, text) = post(
        &url,
        &signed(now() - 3600, body.as_bytes()),
        body.as_bytes(),
    );
    assert_eq!(status, 401, "stale: {text}");
    assert!(text.contains("away from this server's clock"), "{text}");
    let big = json!({
        "external_chat_id": "client-7", "external_message_id": "big",
        "sender": {"name": "x"}, "text": "x".repeat(3000),
    })
    .to_string();
    let (status, text) = post(&url, &signed(now(), big.as_bytes()), big.as_bytes());
    assert_eq!(status, 413, "oversized: {text}");
    let (status, text) = post(&url, &signed(now(), b"{not json"), b"{not json");
    assert_eq!(status, 400, "bad JSON: {text}");
    let (status, _) = post(
        &url.replace("/in", "/elsewhere"),
        &signed(now(), body.as_bytes()),
        body.as_bytes(),
    );
    assert_eq!(status, 404, "wrong path");

    // Accepted: 200 only once the host has it; stored once even if sent twice.
    let good = message("m-1");
    let (status, text) = post(&url, &signed(now(), good.as_bytes()), good.as_bytes());
    assert_eq!(status, 200, "signed: {text}");
    let (status, _) = post(&url, &signed(now(), good.as_bytes()), good.as_bytes());
    assert_eq!(status, 200, "a replay is accepted and de-duplicated");
    let stored = d
        .until(
            "the signed message stored",
            Duration::from_secs(20),
            || async {
                let all = all_messages(&d, acc).await;
                (!all.is_empty()).then_some(all)
            },
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored_again = all_messages(&d, acc).await;
    assert_eq!(
        stored_again.len(),
        1,
        "only the signed message: {stored_again:?}"
    );
    let m = &stored[0];
    assert_eq!(m["external_message_id"], "m-1");
    assert_eq!(m["text"], "hello m-1");
    assert_eq!(m["direction"], "in");

    // Outbound: 500 once, then 200 → one successful POST, delivered.
    let chats = d.ok("chat.list", json!({"account": acc})).await;
    let chat = chats[0]["id"].clone();
    let sent = d
        .ok(
            "message.send",
            json!({"chat": chat, "actor": admin, "text": "thanks!"}),
        )
        .await;
    let out_id = sent["message"].as_i64().expect("message id");
    d.until("reply delivered", Duration::from_secs(30), || async {
        let all = all_messages(&d, acc).await;
        let out = all.iter().find(|m| m["direction"] == "out")?;
        (out["status"] == "delivered").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reqs = gateway.requests();
    assert_eq!(reqs.len(), 2, "one 500, one 200: {reqs:?}");
    assert_eq!(posts.load(Ordering::SeqCst), 2);
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/out");
        let ts = r.header("x-patchbay-timestamp").expect("timestamp header");
        let sig = r.header("x-patchbay-signature").expect("signature header");
        webhook::verify(SECRET.as_bytes(), Some(ts), Some(sig), &r.body, now(), 60)
            .expect("outbound requests are signed");
        let body = r.json();
        assert_eq!(body["message"], out_id);
        assert_eq!(body["external_chat_id"], "client-7");
        assert_eq!(body["text"], "thanks!");
        assert_eq!(body["to"]["phone"], "+15550007777");
    }
    let all = all_messages(&d, acc).await;
    let out: Vec<&Value> = all.iter().filter(|m| m["direction"] == "out").collect();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["status"], "delivered");
    assert_eq!(out[0]["external_message_id"], "gw-1");

    // 200 only once the message is durable: a kill -9 the moment the gateway has its
    // answer loses nothing; the restarted daemon stores it.
    let durable = message("m-durable");
    let (status, text) = post(&url, &signed(now(), durable.as_bytes()), durable.as_bytes());
    assert_eq!(status, 200, "{text}");
    d.kill9();
    d.spawn();
    d.until(
        "the acknowledged message stored after a crash",
        Duration::from_secs(30),
        || async {
            let all = all_messages(&d, acc).await;
            all.iter()
                .any(|m| m["external_message_id"] == "m-durable")
                .then_some(())
        },
    )
    .await;

    // Removing the channel stops the connector inside the daemon: its port is closed
    // once channel.remove returns, and the stop did not panic.
    let url = d
        .until(
            "webhook connected again",
            Duration::from_secs(20),
            || async {
                let list = d.ok("channel.list", json!({"account": acc})).await;
                let c = list.as_array()?.iter().find(|c| c["id"] == id)?.clone();
                (c["status"] == "connected").then(|| c["number"].as_str().map(str::to_owned))?
            },
        )
        .await;
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/in")
        .to_owned();
    // On PostgreSQL the store may still say `connected` from the killed process while
    // its lease runs out (leases.ttl_secs); the restarted daemon then starts the
    // connector and its port opens.
    d.until("the webhook listening again", Duration::from_secs(30), || async {
        std::net::TcpStream::connect(&addr).is_ok().then_some(())
    })
    .await;
    d.ok(
        "channel.remove",
        json!({"account": acc, "actor": admin, "channel": id}),
    )
    .await;
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the port is closed once the channel is removed"
    );
    let log = std::fs::read_to_string(d.log_path()).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

/// The inbound URL of webhook channel `id` once it is connected.
async fn connected_url(d: &Daemon, account: i64, id: i64) -> String {
    d.until("webhook connected", Duration::from_secs(20), || async {
        let list = d.ok("channel.list", json!({"account": account})).await;
        let c = list.as_array()?.iter().find(|c| c["id"] == id)?.clone();
        (c["status"] == "connected").then(|| c["number"].as_str().map(str::to_owned))?
    })
    .await
}

/// Sends a request that keeps the connection open (405 for a GET) and reads the
/// answer's head: afterwards the connector holds this connection idle.
fn keep_alive(addr: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(b"GET /in HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 405"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    conn
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_bodies_get_400_and_connections_past_the_cap_503() {
    let d = Daemon::start_full(Backend::Sqlite, "", |dir| install_connector(dir, "webhook"));
    let (acc, admin) = d.account("bounded").await;
    let config = json!({
        "secret": SECRET, "listen": "127.0.0.1:0", "path": "/in", "max_connections": 4,
    });
    let ch = d
        .ok(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "webhook", "name": "gw", "config": config}),
        )
        .await;
    let url = connected_url(&d, acc, ch["id"].as_i64().expect("channel id")).await;
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/in")
        .to_owned();
    let message = |mid: &str, attachment: Value| {
        json!({
            "external_chat_id": "client-1", "external_message_id": mid,
            "sender": {"phone": "+15550001234", "name": "Client"}, "text": mid, "attachments": [attachment],
        })
        .to_string()
    };

    // 40 levels in an attachment, signed: refused with a reason, nothing emitted.
    let mut deep = json!("x");
    for _ in 0..38 {
        deep = json!({ "a": deep });
    }
    let body = message("deep", deep);
    let (status, text) = post(&url, &signed(now(), body.as_bytes()), body.as_bytes());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("nested deeper than 32 levels"), "{text}");

    // Four idle kept-alive connections fill the cap: the next one gets 503 at once.
    let mut idle: Vec<_> = (0..4).map(|_| keep_alive(&addr)).collect();
    let good = message("fine", json!({"url": "https://example.test/a.png"}));
    let (status, text) = post(&url, &signed(now(), good.as_bytes()), good.as_bytes());
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("max_connections"), "{text}");
    // One leaves: the next request is served (its slot frees once the connector sees
    // the close).
    idle.pop();
    let start = std::time::Instant::now();
    loop {
        let (status, text) = post(&url, &signed(now(), good.as_bytes()), good.as_bytes());
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still 503: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(idle);

    // Only the accepted message was stored.
    d.until("the message stored", Duration::from_secs(20), || async {
        (!all_messages(&d, acc).await.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored = all_messages(&d, acc).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["external_message_id"], "fine");
}
