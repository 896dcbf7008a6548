//! The telegram connector in the real daemon against a fake Bot API on 127.0.0.1 that
//! follows the documented shapes: getMe, getUpdates with offset confirmation and long
//! polling, sendMessage, a 429 with retry_after (on a send and on a poll), 409 while
//! another client holds the bot, and 401 for an unknown token.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_http::{FakeServer, Request, Response};
use crate::harness::{Backend, Daemon, install_connector};

pub(crate) const TOKEN: &str = "123456:TEST-token_ok";
pub(crate) const BAD_TOKEN: &str = "999:WRONG-token";
/// A bot whose updates a webhook receives: getUpdates answers 409.
const CONFLICT_TOKEN: &str = "777:CONFLICT-token";

/// The fake bot's state: pending updates (dropped once confirmed by a later offset),
/// what getUpdates was asked, what was sent.
#[derive(Default)]
struct Bot {
    updates: Vec<Value>,
    next_update: i64,
    next_message: i64,
    offsets: Vec<Option<i64>>,
    sent: Vec<Request>,
    rate_limit_next_send: bool,
    rate_limit_next_poll: bool,
}

pub(crate) struct FakeBotApi {
    state: Arc<(Mutex<Bot>, Condvar)>,
    pub(crate) server: FakeServer,
}

fn answer(result: Value) -> Response {
    Response::json(200, json!({"ok": true, "result": result}))
}

impl FakeBotApi {
    pub(crate) fn start() -> FakeBotApi {
        let state: Arc<(Mutex<Bot>, Condvar)> = Arc::default();
        state.0.lock().unwrap().next_update = 1;
        state.0.lock().unwrap().next_message = 100;
        let s = state.clone();
        let server = FakeServer::start(move |req| handle(&s, req));
        FakeBotApi { state, server }
    }

    fn bot(&self) -> std::sync::MutexGuard<'_, Bot> {
        self.state.0.lock().unwrap()
    }

    /// Queues a `message` update from user 42 in their private chat.
    fn push(&self, extra: Value) {
        let mut bot = self.bot();
        let (update_id, message_id) = (bot.next_update, bot.next_message);
        bot.next_update += 1;
        bot.next_message += 1;
        let mut message = json!({
            "message_id": message_id, "date": 1_700_000_000 + message_id,
            "from": {"id": 42, "is_bot": false, "first_name": "Ann", "last_name": "Lee", "username": "annlee"},
            "chat": {"id": 42, "type": "private", "first_name": "Ann"},
        });
        message
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        bot.updates
            .push(json!({"update_id": update_id, "message": message}));
        drop(bot);
        self.state.1.notify_all();
    }

    /// Requests made with `token`, by method.
    fn calls(&self, token: &str, method: &str) -> Vec<Request> {
        let path = format!("/bot{token}/{method}");
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

fn handle(state: &(Mutex<Bot>, Condvar), req: &Request) -> Response {
    let Some((token, method)) = req
        .path
        .strip_prefix("/bot")
        .and_then(|p| p.split_once('/'))
    else {
        return Response::json(
            404,
            json!({"ok": false, "error_code": 404, "description": "Not Found"}),
        );
    };
    if token == CONFLICT_TOKEN && method == "getUpdates" {
        return Response::json(
            409,
            json!({"ok": false, "error_code": 409,
                   "description": "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first"}),
        );
    }
    if token != TOKEN && token != CONFLICT_TOKEN {
        return Response::json(
            401,
            json!({"ok": false, "error_code": 401, "description": "Unauthorized"}),
        );
    }
    let params = req.json();
    match method {
        "getMe" => answer(json!({
            "id": 123456, "is_bot": true, "first_name": "Patchbay Test", "username": "patchbay_test_bot"
        })),
        "getUpdates" => {
            let offset = params["offset"].as_i64();
            let timeout = Duration::from_secs(params["timeout"].as_u64().unwrap_or(0));
            let deadline = Instant::now() + timeout;
            let mut bot = state.0.lock().unwrap();
            if std::mem::take(&mut bot.rate_limit_next_poll) {
                return Response::json(
                    429,
                    json!({"ok": false, "error_code": 429,
                           "description": "Too Many Requests: retry after 2",
                           "parameters": {"retry_after": 2}}),
                );
            }
            bot.offsets.push(offset);
            // Documented: an offset confirms every update below it; they are gone.
            if let Some(o) = offset {
                bot.updates
                    .retain(|u| u["update_id"].as_i64().unwrap() >= o);
            }
            while bot.updates.is_empty() && Instant::now() < deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                bot = state.1.wait_timeout(bot, left).unwrap().0;
            }
            let batch: Vec<Value> = bot.updates.iter().take(100).cloned().collect();
            answer(Value::Array(batch))
        }
        "sendMessage" => {
            let mut bot = state.0.lock().unwrap();
            bot.sent.push(req.clone());
            if std::mem::take(&mut bot.rate_limit_next_send) {
                return Response::json(
                    429,
                    json!({"ok": false, "error_code": 429,
                           "description": "Too Many Requests: retry after 1",
                           "parameters": {"retry_after": 1}}),
                );
            }
            let id = bot.next_message;
            bot.next_message += 1;
            answer(json!({
                "message_id": id, "date": 1_700_000_000,
                "chat": {"id": params["chat_id"], "type": "private"},
                "text": params["text"],
            }))
        }
        _ => Response::json(
            404,
            json!({"ok": false, "error_code": 404, "description": "Not Found: method not found"}),
        ),
    }
}

async fn inbound(d: &Daemon, account: i64) -> Vec<Value> {
    let mut all = d.account_messages(account).await;
    all.retain(|m| m["direction"] == "in");
    all
}

async fn channel(d: &Daemon, account: i64, id: i64) -> Option<Value> {
    let list = d.ok("channel.list", json!({"account": account})).await;
    list.as_array()?.iter().find(|c| c["id"] == id).cloned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bot_api_polling_sending_and_errors() {
    let api = FakeBotApi::start();
    api.push(json!({"text": "one"}));
    api.push(json!({"caption": "two", "photo": [
        {"file_id": "small", "file_unique_id": "s", "width": 90, "height": 90},
        {"file_id": "big", "file_unique_id": "b", "width": 900, "height": 900}
    ]}));
    api.push(
        json!({"contact": {"phone_number": "15550004242", "first_name": "Ann", "user_id": 42}}),
    );

    let mut d = Daemon::start_full(Backend::Sqlite, "", |dir| {
        install_connector(dir, "telegram")
    });
    let state_dir = d.dir.path().join("telegram-state");
    let (acc, admin) = d.account("tg").await;
    let cfg = json!({
        "token": TOKEN, "api_base": api.server.url(), "poll_timeout_secs": 1,
        "state_dir": state_dir,
    });
    let id = d
        .ok(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "telegram", "name": "bot", "config": cfg}),
        )
        .await["id"]
        .as_i64()
        .expect("id");
    let c = d
        .until("telegram connected", Duration::from_secs(20), || async {
            channel(&d, acc, id)
                .await
                .filter(|c| c["status"] == "connected")
        })
        .await;
    assert_eq!(c["number"], "@patchbay_test_bot", "{c}");
    assert_eq!(c["display_name"], "Patchbay Test", "{c}");

    // Inbound: the three queued updates, once each.
    d.until("3 inbound", Duration::from_secs(20), || async {
        (inbound(&d, acc).await.len() == 3).then_some(())
    })
    .await;
    let msgs = inbound(&d, acc).await;
    let by_id = |mid: &str| {
        msgs.iter()
            .find(|m| m["external_message_id"] == mid)
            .unwrap_or_else(|| panic!("{mid} in {msgs:?}"))
            .clone()
    };
    assert_eq!(by_id("42:100")["text"], "one");
    let photo = by_id("42:101");
    assert_eq!(photo["text"], "two");
    assert_eq!(photo["attachments"][0]["type"], "photo");
    assert_eq!(photo["attachments"][0]["file_id"], "big");
    assert_eq!(by_id("42:102")["attachments"][0]["type"], "contact");
    let chats = d.ok("chat.list", json!({"account": acc})).await;
    assert_eq!(chats.as_array().map(Vec::len), Some(1), "{chats}");

    // The offset reaches Telegram (confirming updates 1..=3) and the state file.
    d.until("offset 4 confirmed", Duration::from_secs(10), || async {
        api.bot().offsets.contains(&Some(4)).then_some(())
    })
    .await;
    let file = state_dir.join("telegram-123456.offset");
    assert_eq!(
        std::fs::read_to_string(&file).expect("offset file").trim(),
        "4"
    );

    // Crash, two more updates meanwhile, restart: only the new ones are added.
    d.kill9();
    let polls_before = api.bot().offsets.len();
    api.push(json!({"text": "four"}));
    api.push(json!({"text": "five"}));
    d.spawn();
    d.until(
        "5 inbound after restart",
        Duration::from_secs(30),
        || async { (inbound(&d, acc).await.len() >= 5).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let msgs = inbound(&d, acc).await;
    let ids: HashSet<String> = msgs
        .iter()
        .map(|m| m["external_message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(msgs.len(), 5, "nothing lost or doubled: {ids:?}");
    assert_eq!(ids.len(), 5);
    // The restarted connector resumed from the saved offset.
    assert_eq!(api.bot().offsets[polls_before], Some(4));

    // The offset is confirmed only once the daemon has the update durably: killed the
    // moment Telegram learns of it, the restarted daemon still stores the message.
    api.push(json!({"text": "six"}));
    d.until("offset 7 confirmed", Duration::from_secs(20), || async {
        api.bot().offsets.contains(&Some(7)).then_some(())
    })
    .await;
    d.kill9();
    d.spawn();
    d.until(
        "6 inbound after a crash",
        Duration::from_secs(30),
        || async { (inbound(&d, acc).await.len() >= 6).then_some(()) },
    )
    .await;

    // A 429 on getUpdates: the poller waits retry_after (2 s) before polling again,
    // where it otherwise polls back to back (1 s long polls).
    let before = api.calls(TOKEN, "getUpdates").len();
    api.bot().rate_limit_next_poll = true;
    // "seven" answers "one" (42:100): the reply survives as an attachment.
    api.push(json!({"text": "seven", "reply_to_message": {
        "message_id": 100, "date": 1_700_000_100, "chat": {"id": 42, "type": "private"}, "text": "one"
    }}));
    d.until("7 inbound", Duration::from_secs(30), || async {
        (inbound(&d, acc).await.len() >= 7).then_some(())
    })
    .await;
    d.until(
        "polling again after the 429",
        Duration::from_secs(20),
        || async {
            let polls = api.calls(TOKEN, "getUpdates");
            let gaps: Vec<Duration> = polls[before..]
                .windows(2)
                .map(|w| w[1].at.duration_since(w[0].at))
                .collect();
            (!api.bot().rate_limit_next_poll
                && gaps.iter().any(|g| *g >= Duration::from_millis(1900)))
            .then_some(())
        },
    )
    .await;
    let status = channel(&d, acc, id).await.expect("channel");
    assert_eq!(status["status"], "connected", "a 429 is no error: {status}");
    let seven = inbound(&d, acc)
        .await
        .into_iter()
        .find(|m| m["text"] == "seven")
        .expect("seven stored");
    assert_eq!(
        seven["attachments"][0],
        json!({"type": "reply", "external_message_id": "42:100", "text": "one"}),
        "{seven}"
    );
    let msgs = inbound(&d, acc).await;
    assert_eq!(msgs.len(), 7, "nothing lost or doubled: {msgs:?}");

    // Send, with a 429 first: the connector waits retry_after, then sends once.
    api.bot().rate_limit_next_send = true;
    let chat = chats[0]["id"].clone();
    let sent = d
        .ok(
            "message.send",
            json!({"chat": chat, "actor": admin, "text": "hello from patchbay"}),
        )
        .await;
    let out_id = sent["message"].as_i64().expect("message id");
    let msg = d
        .until("reply sent", Duration::from_secs(30), || async {
            let m = d
                .ok("chat.messages", json!({"chat": chat, "limit": 100}))
                .await;
            m.as_array()?
                .iter()
                .find(|m| m["id"] == out_id && m["status"] == "sent")
                .cloned()
        })
        .await;
    let sends = api.calls(TOKEN, "sendMessage");
    assert_eq!(sends.len(), 2, "one 429, one success: {sends:?}");
    assert!(
        sends[1].at.duration_since(sends[0].at) >= Duration::from_millis(950),
        "retry_after honoured: {:?}",
        sends[1].at.duration_since(sends[0].at)
    );
    assert_eq!(sends[1].json()["chat_id"], 42);
    assert_eq!(sends[1].json()["text"], "hello from patchbay");
    let ext = msg["external_message_id"].as_str().expect("external id");
    assert!(ext.starts_with("42:"), "{ext}");

    // A bad token: channel error "invalid token", and no retry storm.
    let bad = d
        .ok(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "telegram", "name": "bad",
                   "config": {"token": BAD_TOKEN, "api_base": api.server.url(), "poll_timeout_secs": 1}}),
        )
        .await["id"]
        .as_i64()
        .expect("id");
    let c = d
        .until("bad token in error", Duration::from_secs(20), || async {
            channel(&d, acc, bad)
                .await
                .filter(|c| c["status"] == "error")
        })
        .await;
    assert!(
        c["status_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid token"),
        "{c}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = api.calls(BAD_TOKEN, "getMe").len() + api.calls(BAD_TOKEN, "getUpdates").len();
    assert_eq!(tries, 1, "a refused token is not retried");
    // The good channel is unaffected.
    assert_eq!(channel(&d, acc, id).await.unwrap()["status"], "connected");

    // 409: a webhook holds the bot. The channel shows error with what to do about it.
    let held = d
        .ok(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "telegram", "name": "held",
                   "config": {"token": CONFLICT_TOKEN, "api_base": api.server.url(), "poll_timeout_secs": 1}}),
        )
        .await["id"]
        .as_i64()
        .expect("id");
    let c = d
        .until("conflict explained", Duration::from_secs(20), || async {
            channel(&d, acc, held)
                .await
                .filter(|c| c["status"] == "error")
        })
        .await;
    let reason = c["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("conflict") && reason.contains("deleteWebhook"),
        "{c}"
    );
    assert!(reason.contains("another getUpdates poller"), "{c}");
    // Not a retry storm either: one poll, then the 30 s wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.calls(CONFLICT_TOKEN, "getUpdates").len(), 1);

    // Removing a channel stops its connector inside the daemon: the long poll in
    // flight is cancelled and the poller joined, so no call follows.
    d.ok(
        "channel.remove",
        json!({"account": acc, "actor": admin, "channel": id}),
    )
    .await;
    let polls = api.calls(TOKEN, "getUpdates").len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        api.calls(TOKEN, "getUpdates").len(),
        polls,
        "no poll after stop"
    );
    let log = std::fs::read_to_string(d.log_path()).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

/// A Telegram user with no @username who never shared a phone — most users — is known
/// by `from.id` alone: the message is stored, the next one lands in the same chat and
/// contact, and the offset passes an update only once the store has its message.
#[tokio::test(flavor = "multi_thread")]
async fn users_known_only_by_their_id_are_stored() {
    let api = FakeBotApi::start();
    let bob = |text: &str| {
        json!({"text": text, "from": {"id": 43, "first_name": "Bob"},
               "chat": {"id": 43, "type": "private", "first_name": "Bob"}})
    };
    api.push(bob("hello"));
    let d = Daemon::start_full(Backend::Sqlite, "", |dir| {
        install_connector(dir, "telegram")
    });
    let (acc, admin) = d.account("tg").await;
    let cfg = json!({
        "token": TOKEN, "api_base": api.server.url(), "poll_timeout_secs": 1,
        "state_dir": d.dir.path().join("telegram-state"),
    });
    d.ok(
        "channel.add",
        json!({"account": acc, "actor": admin, "kind": "telegram", "name": "bot", "config": cfg}),
    )
    .await;
    let stored = "SELECT COUNT(*) FROM messages WHERE external_message_id LIKE '43:%'";
    // The offset confirming update 1 comes only once its message is durably recorded:
    // stored, or waiting in the SQLite queue's file (connector events are acknowledged
    // once queued there, ARCHITECTURE.md "Durable acknowledgement").
    d.until("offset 2 confirmed", Duration::from_secs(20), || async {
        api.bot().offsets.contains(&Some(2)).then_some(())
    })
    .await;
    let queued = {
        use sqlx::Connection;
        let url = format!(
            "sqlite://{}?mode=ro",
            d.dir.path().join("var/queue.db").display()
        );
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("open the queue");
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM Jobs WHERE CAST(job AS TEXT) LIKE '%\"43:100\"%'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("queue query")
    };
    assert!(
        d.store_count(stored).await + queued >= 1,
        "the message was recorded before the offset moved"
    );
    d.until("first message stored", Duration::from_secs(20), || async {
        (d.store_count(stored).await == 1).then_some(())
    })
    .await;
    api.push(bob("again"));
    d.until("second message stored", Duration::from_secs(20), || async {
        (d.store_count(stored).await == 2).then_some(())
    })
    .await;
    let chats = d.ok("chat.list", json!({"account": acc})).await;
    let chats = chats.as_array().expect("chats");
    assert_eq!(chats.len(), 1, "one chat: {chats:?}");
    let card = d.ok("chat.get", json!({"chat": chats[0]["id"]})).await;
    assert_eq!(card["contact"]["name"], "Bob", "{card}");
    let texts: Vec<Value> = inbound(&d, acc)
        .await
        .iter()
        .map(|m| m["text"].clone())
        .collect();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts.contains(&json!("hello")) && texts.contains(&json!("again")));
    assert_eq!(d.store_count("SELECT COUNT(*) FROM contacts").await, 1);
    assert_eq!(
        d.store_count("SELECT COUNT(*) FROM contacts WHERE sender_id = '43'")
            .await,
        1
    );
}
