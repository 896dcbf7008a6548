//! Unit tests of the runtime module: tasks and their stop, HMAC, the status board,
//! and the shared HTTP listener (real sockets, raw HTTP/1 from std's TcpStream).

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::http::{self, HttpRequest, ListenOptions, Route, RouteId};
use super::*;
use crate::{ChannelState, Event, Host, Status};

#[test]
fn stop_joins_only_that_instances_tasks() {
    let a = Tasks::new().unwrap();
    let b = Tasks::new().unwrap();
    let ended_a = Arc::new(AtomicUsize::new(0));
    let ticks_b = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let (token, ended) = (a.token(), ended_a.clone());
        a.spawn(async move {
            token.cancelled().await;
            // Work after cancellation still finishes before stop returns.
            tokio::time::sleep(Duration::from_millis(50)).await;
            ended.fetch_add(1, Ordering::SeqCst);
        });
    }
    let (token_b, ticks) = (b.token(), ticks_b.clone());
    b.spawn(async move {
        while !token_b.is_cancelled() {
            ticks.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let outcome = a.stop(Duration::from_secs(2));
    assert_eq!(
        outcome,
        StopOutcome {
            panicked: 0,
            aborted: 0
        }
    );
    assert_eq!(ended_a.load(Ordering::SeqCst), 3, "all of a's tasks joined");
    assert!(!b.is_stopped());
    let before = ticks_b.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(60));
    assert!(ticks_b.load(Ordering::SeqCst) > before, "b runs on");
    // Spawning after stop runs nothing.
    let late = Arc::new(AtomicUsize::new(0));
    let l = late.clone();
    a.spawn(async move {
        l.fetch_add(1, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(late.load(Ordering::SeqCst), 0);
    // A task that ignores the token is aborted after the grace, and still joined.
    let stubborn = Tasks::new().unwrap();
    stubborn.spawn(std::future::pending());
    stubborn.spawn(async { panic!("a task panicked") });
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    let outcome = stubborn.stop(Duration::from_millis(100));
    assert_eq!(
        outcome,
        StopOutcome {
            panicked: 1,
            aborted: 1
        }
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    b.stop(Duration::from_secs(1));
}

#[test]
fn instances_share_one_runtime() {
    let name = |tasks: &Tasks| {
        tasks.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
            });
            rx.await.unwrap()
        })
    };
    let (a, b) = (Tasks::new().unwrap(), Tasks::new().unwrap());
    assert_eq!(name(&a), name(&b));
    assert_eq!(name(&a).as_deref(), Some("connector-rt"));
    assert!(!configure(RuntimeOptions::default()), "too late once built");
}

#[test]
fn hmac_round_trip_and_rejections() {
    use signature::{HmacError, sign, verify};
    let key = b"test-secret";
    // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac test-secret
    let sig = sign(key, &[b"1700000000", b".", br#"{"a":1}"#]);
    assert_eq!(
        sig,
        "sha256=8cb2c3355fca388e9ac2caec004f4d5d7045d74937ab5faad61dc11682247a9f"
    );
    let body: &[u8] = br#"{"text":"hi"}"#;
    let sig = sign(key, &[body]);
    assert_eq!(verify(key, &[body], Some(&sig)), Ok(()));
    assert_eq!(
        verify(
            key,
            &[body],
            Some(&format!(
                " {} ",
                sig.to_uppercase().replace("SHA256=", "sha256=")
            ))
        ),
        Ok(())
    );
    assert_eq!(verify(key, &[body], None), Err(HmacError::Missing));
    assert_eq!(
        verify(key, &[body], Some("md5=ab")),
        Err(HmacError::Malformed)
    );
    assert_eq!(
        verify(key, &[body], Some("sha256=abcd")),
        Err(HmacError::Malformed)
    );
    assert_eq!(
        verify(key, &[body], Some("sha256=zz")),
        Err(HmacError::Malformed)
    );
    assert_eq!(verify(key, &[b"{}"], Some(&sig)), Err(HmacError::Mismatch));
    assert_eq!(
        verify(b"other", &[body], Some(&sig)),
        Err(HmacError::Mismatch)
    );
}

#[test]
fn status_board_emits_changes_and_counts() {
    let board = StatusBoard::new(
        Host::detached(),
        Status::new(ChannelState::Disconnected).with_reason("not started"),
        &["inbound", "sent"],
    );
    // A detached host refuses the event, but the status is recorded.
    assert!(!board.report(Status::new(ChannelState::Connected)));
    assert_eq!(board.current().state, ChannelState::Connected);
    assert!(
        !board.report(Status::new(ChannelState::Connected)),
        "no change"
    );
    board.counters().incr("inbound");
    board.counters().add("sent", 3);
    board.counters().incr("unknown");
    let s = board.snapshot();
    assert_eq!(s.details, Some(json!({"inbound": 1, "sent": 3})));
    board.close();
    board.report(Status::new(ChannelState::Error));
    assert_eq!(
        board.current().state,
        ChannelState::Connected,
        "closed: ignored"
    );
    board.final_status(Status::new(ChannelState::Disconnected));
    assert_eq!(board.current().state, ChannelState::Disconnected);
}

#[test]
fn emit_and_flush_on_a_closed_host() {
    let tasks = Tasks::new().unwrap();
    let host = Host::detached();
    let ev = Event::Status(Status::new(ChannelState::Connected));
    let token = tasks.token();
    tasks.block_on(async {
        assert_eq!(
            emit(&host, &ev, &token).await,
            Err(crate::EmitError::Closed)
        );
        assert_eq!(
            flush(&host, Duration::from_millis(10)).await,
            Err(crate::FlushError::Closed)
        );
    });
}

/// One request over a fresh connection; returns the status code and the body.
fn request(addr: std::net::SocketAddr, raw: &str) -> (u16, String) {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn post(addr: std::net::SocketAddr, path: &str, headers: &str, body: &str) -> (u16, String) {
    request(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn echo_route(path: &str, id: Option<&str>, max: usize) -> Route {
    let name = id.unwrap_or("default").to_owned();
    Route {
        path: path.into(),
        id: id.map(str::to_owned),
        methods: vec![hyper::Method::POST],
        max_body_bytes: max,
        handler: http::handler(move |req: HttpRequest| {
            let name = name.clone();
            async move { http::respond(200, &json!({"route": name, "bytes": req.body.len()}), None) }
        }),
        on_refused: None,
    }
}

#[test]
fn several_instances_on_one_listener_route_by_id() {
    // Reserve a port, then listen on it by number: registrations share the address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let router: RouteId = Arc::new(|req: &HttpRequest| req.header("x-channel").map(str::to_owned));
    let opts = ListenOptions::default();
    let a = http::register(
        &listen,
        echo_route("/in", Some("a"), 100),
        Some(router.clone()),
        &opts,
    )
    .unwrap();
    let b = http::register(
        &listen,
        echo_route("/in", Some("b"), 100),
        Some(router.clone()),
        &opts,
    )
    .unwrap();
    let other = http::register(&listen, echo_route("/other", None, 10), None, &opts).unwrap();
    assert_eq!(a.local_addr(), b.local_addr());
    let addr = a.local_addr();
    let taken = http::register(&listen, echo_route("/in", Some("a"), 100), None, &opts);
    assert!(
        matches!(taken, Err(http::ListenError::Taken { .. })),
        "{taken:?}"
    );

    let (s, body) = post(addr, "/in", "X-Channel: a\r\n", "hello");
    assert_eq!((s, body.contains(r#""route":"a""#)), (200, true), "{body}");
    let (s, body) = post(addr, "/in", "X-Channel: b\r\n", "hello");
    assert_eq!((s, body.contains(r#""route":"b""#)), (200, true), "{body}");
    assert_eq!(
        post(addr, "/in", "X-Channel: c\r\n", "x").0,
        404,
        "unknown id"
    );
    assert_eq!(post(addr, "/in", "", "x").0, 404, "no id on a shared path");
    assert_eq!(post(addr, "/nowhere", "", "x").0, 404);
    assert_eq!(post(addr, "/other", "", "0123456789").0, 200);
    // Body bounds: declared too large, and chunked past the limit.
    assert_eq!(post(addr, "/other", "", "0123456789a").0, 413);
    let chunked = format!(
        "POST /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        "5\r\naaaaa\r\n".repeat(3) + "0\r\n\r\n"
    );
    assert_eq!(request(addr, &chunked).0, 413);
    let get = "GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(request(addr, get).0, 405);

    // Unregistering one route leaves the others served.
    drop(a);
    assert_eq!(post(addr, "/in", "X-Channel: a\r\n", "x").0, 404);
    assert_eq!(post(addr, "/in", "X-Channel: b\r\n", "x").0, 200);
    drop(other);
    assert_eq!(post(addr, "/in", "X-Channel: b\r\n", "x").0, 200);
    // The last one closes the listener and frees the port before its drop returns.
    drop(b);
    std::net::TcpListener::bind(addr).expect("port freed by the last unregister");
}

#[test]
fn port_zero_binds_a_listener_each_and_a_stalled_body_gets_408() {
    let opts = ListenOptions {
        body_timeout: Duration::from_millis(300),
        ..ListenOptions::default()
    };
    let a = http::register("127.0.0.1:0", echo_route("/in", None, 100), None, &opts).unwrap();
    let b = http::register("127.0.0.1:0", echo_route("/in", None, 100), None, &opts).unwrap();
    assert_ne!(a.local_addr(), b.local_addr());
    let mut conn = std::net::TcpStream::connect(a.local_addr()).unwrap();
    conn.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nhello")
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408"));
    assert!(http::register("127.0.0.1:0", echo_route("in", None, 1), None, &opts).is_err());
    assert!(http::register("127.0.0.1:0", echo_route("/in", None, 0), None, &opts).is_err());
}

#[test]
fn config_helpers() {
    assert!(config::https_or_loopback("https://graph.facebook.com").is_ok());
    assert!(config::https_or_loopback("http://127.0.0.1:8080").is_ok());
    assert!(config::https_or_loopback("http://[::1]:8080").is_ok());
    assert!(config::https_or_loopback("http://localhost:8080").is_err());
    assert!(config::https_or_loopback("http://example.com").is_err());
    assert!(config::https_or_loopback("ftp://127.0.0.1").is_err());
    assert!(config::in_range("k", "n", 5, 1..=10).is_ok());
    let e = config::in_range("k", "n", 0, 1..=10).unwrap_err();
    assert_eq!(e.message, "k config: n = 0: 1 to 10");
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct C {
        a: u32,
    }
    let e = config::parse::<C>("k", json!({"a": 1, "b": 2})).unwrap_err();
    assert_eq!(e.code, "invalid_config");
    assert!(
        e.message.starts_with("k config: unknown field `b`"),
        "{}",
        e.message
    );
    // The checks after parsing run on what was parsed.
    let small = |c: &C| config::in_range("k", "a", c.a, 0..=9);
    assert!(config::parse_checked("k", json!({"a": 9}), small).is_ok());
    let e = config::parse_checked("k", json!({"a": 10}), small).unwrap_err();
    assert_eq!(e.message, "k config: a = 10: 0 to 9");
    assert_eq!(
        config::listen_addr("k", "listen", "[::]:80", 8088).unwrap(),
        "[::]:80".parse().unwrap()
    );
    let e = config::listen_addr("k", "listen", "localhost:80", 8088).unwrap_err();
    assert!(e.message.contains("127.0.0.1:8088"), "{}", e.message);
    assert!(config::url_path("k", "path", "/in", "/x").is_ok());
    for bad in ["in", "/in?x=1", "/a b", "/in#f"] {
        let e = config::url_path("k", "path", bad, "/x").unwrap_err();
        assert!(e.message.contains("e.g. /x"), "{bad}: {}", e.message);
    }
}
