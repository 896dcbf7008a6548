//! Unit tests of the telegram connector: config checks, the offset file, send plans,
//! and start/send/stop against a small Bot API stand-in on 127.0.0.1.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patchbay_connector_sdk::{ChannelState, Connector, Host, Outbound};
use serde_json::{Value, json};

use crate::sender::{MAX_CAPTION, MAX_TEXT};
use crate::{Config, DEFAULT_API_BASE, OffsetFile, Telegram, plan_send};

fn cfg(extra: Value) -> Value {
    let mut v = json!({"token": "123456:ABC-def_1"});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

#[test]
fn config_defaults_and_validation() {
    let c = Config::parse(cfg(json!({}))).unwrap();
    assert_eq!(c.api_base, DEFAULT_API_BASE);
    assert_eq!(c.poll_timeout_secs, 25);
    assert_eq!(c.bot_id(), "123456");
    assert!(!format!("{c:?}").contains("ABC"));
    for bad in [
        json!({}),
        json!({"token": "nocolon"}),
        json!({"token": "abc:def"}),
        json!({"token": "1:has space"}),
        cfg(json!({"api_base": "ftp://x"})),
        cfg(json!({"api_base": "http://api.telegram.org"})),
        cfg(json!({"api_base": "http://localhost:8081"})),
        cfg(json!({"api_base": "http://10.0.0.5:8081"})),
        cfg(json!({"api_base": "http://[fe80::1]:8081"})),
        cfg(json!({"api_base": "not a url"})),
        cfg(json!({"poll_timeout_secs": 51})),
        cfg(json!({"request_timeout_secs": 0})),
        cfg(json!({"poll_timeout": 1})),
    ] {
        let e = Config::parse(bad.clone()).unwrap_err();
        assert_eq!(e.code, "invalid_config", "{bad}");
        assert!(
            !e.message.contains("ABC-def"),
            "token leaked: {}",
            e.message
        );
    }
}

#[test]
fn api_base_is_https_except_to_loopback() {
    for ok in [
        "https://api.telegram.org",
        "https://bots.example.net:8443/prefix",
        "http://127.0.0.1:8081",
        "http://127.1.2.3",
        "http://[::1]:8081/",
    ] {
        let c = Config::parse(cfg(json!({ "api_base": ok })));
        assert!(c.is_ok(), "{ok}: {:?}", c.err());
    }
    for bad in [
        "http://api.telegram.org",
        "http://192.168.1.10:8081",
        "http://localhost:8081",
    ] {
        let e = Config::parse(cfg(json!({ "api_base": bad }))).unwrap_err();
        assert_eq!(e.code, "invalid_config");
        assert!(
            e.message.contains("api_base") && e.message.contains("only allowed to a loopback"),
            "{bad}: {}",
            e.message
        );
    }
}

#[test]
fn offset_file_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let f = OffsetFile::new(&dir.path().join("sub"), "42");
    assert_eq!(f.load().unwrap(), None);
    f.save(17).unwrap();
    assert_eq!(f.load().unwrap(), Some(17));
    f.save(18).unwrap();
    assert_eq!(f.load().unwrap(), Some(18));
    std::fs::write(dir.path().join("sub/telegram-42.offset"), "junk").unwrap();
    assert!(f.load().is_err());
}

#[test]
fn send_plans() {
    let chat = json!(42);
    let p = plan_send(&chat, "hi", &[]).unwrap();
    assert_eq!(
        p,
        vec![("sendMessage", json!({"chat_id": 42, "text": "hi"}))]
    );
    let long = "x".repeat(MAX_TEXT + 1);
    assert_eq!(plan_send(&chat, &long, &[]).unwrap().len(), 2);
    let p = plan_send(
        &chat,
        "see",
        &[
            json!({"type": "photo", "file_id": "F"}),
            json!({"type": "document", "url": "https://x/a.pdf"}),
        ],
    )
    .unwrap();
    assert_eq!(
        p[0],
        (
            "sendPhoto",
            json!({"chat_id": 42, "photo": "F", "caption": "see"})
        )
    );
    assert_eq!(
        p[1],
        (
            "sendDocument",
            json!({"chat_id": 42, "document": "https://x/a.pdf"})
        )
    );
    let p = plan_send(&chat, "hi", &[json!({"type": "sticker", "file_id": "S"})]).unwrap();
    assert_eq!(p.len(), 2, "stickers take no caption: {p:?}");
    assert_eq!(
        plan_send(&chat, "", &[json!({"type": "hologram", "file_id": "H"})])
            .unwrap_err()
            .code,
        "unsupported_attachment"
    );
    assert_eq!(
        plan_send(&chat, "", &[]).unwrap_err().code,
        "invalid_message"
    );
    // A reply: the first call answers the message; the reply alone sends nothing.
    let reply = json!({"type": "reply", "external_message_id": "42:5"});
    let p = plan_send(&chat, "yes", std::slice::from_ref(&reply)).unwrap();
    assert_eq!(
        p,
        vec![(
            "sendMessage",
            json!({"chat_id": 42, "text": "yes",
                   "reply_parameters": {"message_id": 5, "allow_sending_without_reply": true}})
        )]
    );
    let p = plan_send(
        &chat,
        "",
        &[
            json!({"type": "reply", "external_message_id": "7:5"}),
            json!({"type": "photo", "file_id": "F"}),
        ],
    )
    .unwrap();
    assert_eq!(
        p[0].1["reply_parameters"],
        json!({"message_id": 5, "chat_id": 7, "allow_sending_without_reply": true})
    );
    assert_eq!(
        plan_send(&chat, "", &[reply]).unwrap_err().code,
        "invalid_message"
    );
    let bad = json!({"type": "reply", "external_message_id": "nonsense"});
    assert_eq!(
        plan_send(&chat, "x", &[bad]).unwrap_err().code,
        "invalid_message"
    );
}

#[test]
fn send_needs_a_chat_id() {
    let mut t = Telegram::create(cfg(json!({})), Host::detached()).unwrap();
    let e = t
        .send(Outbound {
            message: 1,
            external_chat_id: String::new(),
            to: Default::default(),
            text: "x".into(),
            attachments: vec![],
        })
        .unwrap_err();
    assert_eq!(e.code, "no_chat");
}

/// A Bot API stand-in: answers each request by method from `answer` (status, body),
/// one connection per request, and records the methods called.
fn fake_api(
    answer: impl Fn(&str) -> (u16, Value) + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let (seen, answer) = (calls.clone(), Arc::new(answer));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (seen, answer) = (seen.clone(), answer.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn);
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let method = line.split('/').nth(2).unwrap_or("").split(' ').next();
                let method = method.unwrap_or("").to_owned();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                if method == "getUpdates" {
                    // A long poll that finds nothing.
                    std::thread::sleep(Duration::from_millis(500));
                } else {
                    seen.lock().unwrap().push(method.clone());
                }
                let (status, body) = answer(&method);
                let body = body.to_string();
                let out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = r.into_inner().write_all(out.as_bytes());
            });
        }
    });
    (url, calls)
}

#[test]
fn a_part_that_fails_after_another_was_sent_is_not_retried() {
    let (url, calls) = fake_api(|method| match method {
        "getMe" => (
            200,
            json!({"ok": true, "result": {"id": 1, "first_name": "B"}}),
        ),
        "getUpdates" => (200, json!({"ok": true, "result": []})),
        "sendPhoto" => (
            200,
            json!({"ok": true, "result": {"message_id": 7, "chat": {"id": 42}}}),
        ),
        _ => (
            502,
            json!({"ok": false, "error_code": 502, "description": "Bad Gateway"}),
        ),
    });
    let mut t = Telegram::create(
        cfg(json!({"api_base": url, "request_timeout_secs": 2, "poll_timeout_secs": 0})),
        Host::detached(),
    )
    .unwrap();
    t.start().unwrap();
    let msg = |text: String, attachments| Outbound {
        message: 1,
        external_chat_id: "42".into(),
        to: Default::default(),
        text,
        attachments,
    };
    // Photo first (caption too long to ride along), then the text: the text fails.
    let photo = vec![json!({"type": "photo", "file_id": "F"})];
    let e = t
        .send(msg("x".repeat(MAX_CAPTION + 1), photo.clone()))
        .unwrap_err();
    assert_eq!(e.code, "partially_sent", "{e:?}");
    assert!(!e.retryable, "a retry would send the photo twice");
    assert!(e.message.contains("42:7"), "{}", e.message);
    // Nothing sent yet when the first part fails: retryable as usual.
    let e = t.send(msg("hi".into(), vec![])).unwrap_err();
    assert_eq!((e.code.as_str(), e.retryable), ("unavailable", true));
    let sends: Vec<String> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.starts_with("send"))
        .cloned()
        .collect();
    assert_eq!(sends, ["sendPhoto", "sendMessage", "sendMessage"]);
    t.stop().unwrap();
}

#[test]
fn stop_cancels_a_call_in_flight_and_joins() {
    // A server that accepts and never answers: getMe hangs like a long poll.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let held = std::thread::spawn(move || silent.accept().map(|(conn, _)| conn));
    let mut t = Telegram::create(
        cfg(json!({"api_base": format!("http://{addr}"), "request_timeout_secs": 25})),
        Host::detached(),
    )
    .unwrap();
    t.start().unwrap();
    // Wait until the call is in flight.
    let conn = held.join().unwrap().unwrap();
    let started = Instant::now();
    t.stop().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(t.running.is_none());
    // The call was dropped with its connection: the server sees EOF.
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4096];
    let mut conn = conn;
    loop {
        match std::io::Read::read(&mut conn, &mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => panic!("connection still open after stop: {e}"),
        }
    }
}

#[test]
fn stop_is_prompt_even_when_the_api_is_unreachable() {
    // Port 1 on loopback refuses connections: getMe fails and backs off.
    let mut t = Telegram::create(
        cfg(json!({"api_base": "http://127.0.0.1:1", "request_timeout_secs": 1})),
        Host::detached(),
    )
    .unwrap();
    t.start().unwrap();
    let waiting = Instant::now();
    while t.status().reason.is_none() {
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "{:?}",
            t.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = t.status();
    assert_eq!(s.state, ChannelState::Connecting, "{s:?}");
    assert!(s.reason.unwrap_or_default().contains("unavailable"));
    let started = Instant::now();
    t.stop().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(t.status().state, ChannelState::Disconnected);
}

#[test]
fn stopping_one_bot_leaves_the_others_running() {
    let (url, calls) = fake_api(|method| match method {
        "getMe" => (
            200,
            json!({"ok": true, "result": {"id": 1, "first_name": "B", "username": "b"}}),
        ),
        "getUpdates" => (200, json!({"ok": true, "result": []})),
        _ => (
            200,
            json!({"ok": true, "result": {"message_id": 9, "chat": {"id": 42}}}),
        ),
    });
    let config = cfg(json!({"api_base": url, "poll_timeout_secs": 0}));
    let mut bots: Vec<Telegram> = (0..3)
        .map(|_| Telegram::create(config.clone(), Host::detached()).unwrap())
        .collect();
    for b in &mut bots {
        b.start().unwrap();
    }
    let waiting = Instant::now();
    while bots
        .iter()
        .any(|b| b.status().state != ChannelState::Connected)
    {
        assert!(waiting.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    bots[1].stop().unwrap();
    assert_eq!(bots[1].status().state, ChannelState::Disconnected);
    let msg = || Outbound {
        message: 1,
        external_chat_id: "42".into(),
        to: Default::default(),
        text: "hi".into(),
        attachments: vec![],
    };
    // The others still poll and send on the shared runtime; the stopped one does not.
    for i in [0, 2] {
        assert_eq!(bots[i].status().state, ChannelState::Connected);
        assert_eq!(bots[i].send(msg()).unwrap().external_message_id, "42:9");
    }
    assert_eq!(bots[1].send(msg()).unwrap_err().code, "not_running");
    let sends = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|m| *m == "sendMessage")
        .count();
    assert_eq!(sends, 2);
    for b in &mut bots {
        b.stop().unwrap();
    }
}

/// What the scripted Bot API stand-in does with one request.
#[derive(Clone, Copy)]
enum Reply {
    /// getMe's answer, keeping the connection open.
    Answer,
    /// getMe's answer, then the connection closed, as a server ending an idle one does.
    AnswerClose,
    /// Closes the connection without a word.
    Close,
    /// Never answers; holds the connection until the client drops it.
    Hang,
    /// Sends the head and part of the body, then closes.
    Cut,
    /// A reverse proxy's error page that quotes the request's path.
    ProxyPage,
    /// A permanent redirect.
    Redirect,
}

/// What the stand-in saw: connections accepted, and each request's connection, request
/// line and Host header.
#[derive(Default)]
struct Seen {
    accepted: usize,
    requests: Vec<(usize, String, String)>,
}

/// A keep-alive Bot API stand-in that treats request `r` of connection `c` as
/// `script(c, r)` says. Returns its URL and what it saw.
fn scripted_api(script: fn(usize, usize) -> Reply) -> (String, Arc<Mutex<Seen>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let c = {
                let mut s = log.lock().unwrap();
                s.accepted += 1;
                s.accepted - 1
            };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn);
                for n in 0.. {
                    let (mut line, mut host, mut len) = (String::new(), String::new(), 0);
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h.trim().is_empty() {
                            break;
                        }
                        let lower = h.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        } else if lower.starts_with("host:") {
                            host = h["host:".len()..].trim().to_owned();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let line = line.trim().to_owned();
                    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
                    log.lock().unwrap().requests.push((c, line, host));
                    let answer = |status: &str, kind: &str, extra: &str, body: &str| {
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let me = r#"{"ok":true,"result":{"id":7,"first_name":"K"}}"#;
                    let out = match script(c, n) {
                        Reply::Answer => answer("200 OK", "application/json", "", me),
                        Reply::AnswerClose => {
                            let out = answer("200 OK", "application/json", "", me);
                            let _ = r.get_mut().write_all(out.as_bytes());
                            return;
                        }
                        Reply::Close => return,
                        Reply::Hang => {
                            let mut sink = [0; 64];
                            while r.read(&mut sink).unwrap_or(0) > 0 {}
                            return;
                        }
                        Reply::Cut => {
                            let out = answer("200 OK", "application/json", "", me);
                            let _ = r.get_mut().write_all(&out.as_bytes()[..out.len() - 20]);
                            return;
                        }
                        Reply::ProxyPage => answer(
                            "502 Bad Gateway",
                            "text/html",
                            "",
                            &format!("<html>Cannot POST {path}</html>"),
                        ),
                        Reply::Redirect => answer(
                            "301 Moved Permanently",
                            "text/html",
                            "Location: https://elsewhere.test/\r\n",
                            "moved",
                        ),
                    };
                    r.get_mut().write_all(out.as_bytes()).unwrap();
                }
            });
        }
    });
    (url, seen)
}

/// The token of the scripted tests; no error text may contain it.
const SECRET_TOKEN: &str = "7:SECRET";

fn no_token(e: &crate::api::ApiError) {
    assert!(!e.to_string().contains("SECRET"), "{e}");
}

#[test]
fn the_poller_link_keeps_its_connection_and_reopens_a_closed_one() {
    use patchbay_connector_sdk::runtime::tokio::runtime::Builder;
    let rt = Builder::new_current_thread().enable_all().build().unwrap();
    let call_within = |link: &mut crate::link::Link, t: Duration| {
        rt.block_on(link.call::<Value>("getMe", &json!({}), t))
            .map(|me| me["id"].clone())
    };
    let call = |link: &mut crate::link::Link| call_within(link, Duration::from_secs(5));
    let link_to = |url: &str| {
        let link = crate::api::Api::new(url, SECRET_TOKEN)
            .unwrap()
            .link()
            .unwrap();
        assert!(link.is_direct(), "no proxy is set here");
        link
    };
    // Ten calls, one connection, each a well-formed request for the bot's path.
    let (url, seen) = scripted_api(|_, _| Reply::Answer);
    let mut link = link_to(&url);
    for _ in 0..10 {
        assert_eq!(call(&mut link).unwrap(), 7);
    }
    let s = seen.lock().unwrap();
    assert_eq!(s.accepted, 1);
    assert_eq!(s.requests.len(), 10);
    let host = url.trim_start_matches("http://");
    for (_, line, h) in &s.requests {
        assert_eq!(line, &format!("POST /bot{SECRET_TOKEN}/getMe HTTP/1.1"));
        assert_eq!(h, host);
    }
    drop(s);
    // The server closes each connection at its third request: no call fails, each is
    // tried again on a new connection.
    let (url, seen) = scripted_api(|_, r| if r < 2 { Reply::Answer } else { Reply::Close });
    let mut link = link_to(&url);
    for i in 0..6 {
        assert_eq!(call(&mut link).unwrap(), 7, "call {i}");
    }
    assert_eq!(seen.lock().unwrap().accepted, 3);
    // The server closes the connection after its second answer, and the next call
    // comes later (the close has arrived): tried again on a new connection.
    let (url, seen) = scripted_api(|_, r| {
        if r < 1 {
            Reply::Answer
        } else {
            Reply::AnswerClose
        }
    });
    let mut link = link_to(&url);
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(call(&mut link).unwrap(), 7, "call {i}");
    }
    assert_eq!(seen.lock().unwrap().accepted, 2);
    // No answer in time: the call fails (no second try: the server may be working on
    // it), the connection is dropped, and the next call opens a new one.
    let (url, seen) = scripted_api(|c, r| {
        if (c, r) == (0, 1) {
            Reply::Hang
        } else {
            Reply::Answer
        }
    });
    let mut link = link_to(&url);
    assert_eq!(call(&mut link).unwrap(), 7);
    let e = call_within(&mut link, Duration::from_millis(300)).unwrap_err();
    assert!(e.to_string().contains("no answer within"), "{e}");
    no_token(&e);
    assert_eq!(call(&mut link).unwrap(), 7);
    assert_eq!(seen.lock().unwrap().accepted, 2);
    // An answer cut after its head is an error, not retried (a second try would have
    // succeeded), and the connection is not reused.
    let (url, seen) = scripted_api(|c, r| {
        if (c, r) == (0, 1) {
            Reply::Cut
        } else {
            Reply::Answer
        }
    });
    let mut link = link_to(&url);
    assert_eq!(call(&mut link).unwrap(), 7);
    let e = call(&mut link).unwrap_err();
    assert!(matches!(e, crate::api::ApiError::Unavailable(_)), "{e}");
    no_token(&e);
    assert_eq!(seen.lock().unwrap().requests.len(), 2);
    assert_eq!(call(&mut link).unwrap(), 7);
    assert_eq!(seen.lock().unwrap().accepted, 2);
    // A proxy's error page quoting the path: sorted by its status, without the token.
    let (url, _) = scripted_api(|_, _| Reply::ProxyPage);
    let e = call(&mut link_to(&url)).unwrap_err();
    assert!(e.to_string().contains("HTTP 502"), "{e}");
    assert!(e.to_string().contains("/bot<token>/getMe"), "{e}");
    no_token(&e);
    // A redirect is not followed: an error that says where it points, not retried.
    let (url, seen) = scripted_api(|_, _| Reply::Redirect);
    let e = call(&mut link_to(&url)).unwrap_err();
    assert!(e.to_string().contains("https://elsewhere.test/"), "{e}");
    no_token(&e);
    assert_eq!(seen.lock().unwrap().requests.len(), 1);
    // Nobody listening: a clear error with its cause.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = call(&mut link_to(&format!("http://127.0.0.1:{port}"))).unwrap_err();
    assert!(e.to_string().contains("cannot connect"), "{e}");
    assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    no_token(&e);
}

#[test]
fn the_poller_link_leaves_proxies_and_credentials_to_the_pooled_client() {
    use hyper_util::client::proxy::matcher::Matcher;
    let direct = |base: &str, proxies: Matcher| {
        let api = crate::api::Api::new(base, SECRET_TOKEN).unwrap();
        crate::link::Link::with_proxies(&api, &proxies)
            .unwrap()
            .is_direct()
    };
    let api = "https://api.telegram.org";
    assert!(direct(api, Matcher::builder().build()));
    assert!(!direct(
        api,
        Matcher::builder().https("http://proxy.test:3128").build()
    ));
    assert!(!direct(
        api,
        Matcher::builder().all("socks5://proxy.test:1080").build()
    ));
    // A proxy for the other scheme, or NO_PROXY naming the host: direct.
    assert!(direct(
        api,
        Matcher::builder().http("http://proxy.test:3128").build()
    ));
    let skipped = Matcher::builder()
        .all("http://proxy.test:3128")
        .no("api.telegram.org")
        .build();
    assert!(direct(api, skipped));
    // Basic auth in api_base: the pooled client sends it.
    assert!(!direct(
        "https://user:pw@botapi.example",
        Matcher::builder().build()
    ));

    // The pooled route's calls work and scrub the token too. (The shared client reads
    // the real environment, which names no proxy, so it reaches the stand-in directly.)
    use patchbay_connector_sdk::runtime::tokio::runtime::Builder;
    let rt = Builder::new_current_thread().enable_all().build().unwrap();
    let (url, seen) = scripted_api(|_, r| {
        if r < 1 {
            Reply::Answer
        } else {
            Reply::ProxyPage
        }
    });
    let api = crate::api::Api::new(&url, SECRET_TOKEN).unwrap();
    let proxies = Matcher::builder().http("http://proxy.test:3128").build();
    let mut link = crate::link::Link::with_proxies(&api, &proxies).unwrap();
    assert!(!link.is_direct());
    let me: Value = rt
        .block_on(link.call("getMe", &json!({}), Duration::from_secs(5)))
        .unwrap();
    assert_eq!(me["id"], 7);
    let e = rt
        .block_on(link.call::<Value>("getMe", &json!({}), Duration::from_secs(5)))
        .unwrap_err();
    assert!(e.to_string().contains("/bot<token>/getMe"), "{e}");
    no_token(&e);
    assert_eq!(seen.lock().unwrap().requests.len(), 2);
}
