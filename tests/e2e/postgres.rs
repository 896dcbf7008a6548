//! What only the PostgreSQL store has (built into `e2e_postgres` alone): moving a SQLite
//! store there with `patchbayd store copy`, a server down at start (a clear error that
//! names `store.url` without its password), a server down under inbound load (the same
//! process rides it out and loses nothing), two daemons on one database.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::channels::messages;
use crate::harness::{Backend, Daemon, PATCHBAYD};
use crate::pg_cluster::PgServer;

fn copy(from: &str, to: &str, extra: &[&str]) -> std::process::Output {
    Command::new(PATCHBAYD)
        .args(["store", "copy", "--from", from, "--to", to, "--batch", "7"])
        .args(extra)
        .output()
        .expect("run patchbayd store copy")
}

/// A store built by a daemon on SQLite, copied to PostgreSQL, serves a daemon there
/// with the same accounts, balances, chats and messages; new rows get new ids. The
/// copy refuses a filled target, resumes into one, and replaces one when told.
#[tokio::test(flavor = "multi_thread")]
async fn store_copy_moves_a_sqlite_store_to_postgres() {
    let mut old = Daemon::start_with(
        Backend::Sqlite,
        "[store]\nurl = \"sqlite://var/patchbay.db\"\n",
    );
    let (acc, admin) = old.account("moving").await;
    old.ok(
        "account.topup",
        json!({"account": acc, "amount": 4200, "reference": "r1"}),
    )
    .await;
    let channel = old
        .loopback(
            acc,
            admin,
            json!({"rate_per_sec": 50, "limit": 30, "clients": 3, "id_prefix": "mv"}),
        )
        .await;
    old.until("30 messages stored", Duration::from_secs(30), || async {
        (messages(&old, acc).await.len() == 30).then_some(())
    })
    .await;
    let chats_before = old.ok("chat.list", json!({"account": acc})).await;
    let ledger_before = old.ok("account.ledger", json!({"account": acc})).await;
    assert_eq!(old.terminate(), Some(0));

    let from = format!(
        "sqlite://{}",
        old.dir.path().join("var/patchbay.db").display()
    );
    let to = crate::pg_cluster::fresh_database("copy");
    let out = copy(&from, &to, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("row counts and balances verified"),
        "{stdout}"
    );
    assert!(stdout.contains("messages"), "{stdout}");

    // A second copy into the filled target is refused and changes nothing.
    let again = copy(&from, &to, &[]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already holds data") && err.contains("--resume"),
        "{err}"
    );
    // Resuming finds nothing left to copy; replacing copies everything again.
    let resumed = copy(&from, &to, &["--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let replaced = copy(&from, &to, &["--replace"]);
    assert!(
        replaced.status.success(),
        "{}",
        String::from_utf8_lossy(&replaced.stderr)
    );

    let new = Daemon::start_with(Backend::Sqlite, &format!("[store]\nurl = \"{to}\"\n"));
    let account = new.ok("account.get", json!({"account": acc})).await;
    assert_eq!(account["balance"], 4200, "{account}");
    assert_eq!(
        new.ok("chat.list", json!({"account": acc})).await,
        chats_before
    );
    assert_eq!(
        new.ok("account.ledger", json!({"account": acc})).await,
        ledger_before
    );
    assert_eq!(messages(&new, acc).await.len(), 30);
    // New rows continue after the copied ids.
    let (acc2, _) = new.account("aftermove").await;
    assert!(acc2 > acc, "account {acc2} after {acc}");
    let channels = new.ok("channel.list", json!({"account": acc})).await;
    assert!(
        channels
            .as_array()
            .expect("channels")
            .iter()
            .any(|c| c["id"] == channel),
        "{channels}"
    );
}

/// `--from` that is not a SQLite store, or a missing file, is refused with what to do.
#[test]
fn store_copy_refuses_what_it_cannot_copy() {
    let to = crate::pg_cluster::fresh_database("copy-bad");
    let out = copy("postgres://x/y", &to, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from must be sqlite://PATH"));
    let out = copy("sqlite:///nonexistent/patchbay.db", &to, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no SQLite store"));
}

/// A SQLite store with a row referring to nothing (written with foreign keys off) is
/// refused before anything is copied: PostgreSQL's messages and ledger would not catch
/// it.
#[tokio::test(flavor = "multi_thread")]
async fn store_copy_refuses_a_store_with_broken_references() {
    use sqlx::ConnectOptions as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("patchbay.db");
    drop(
        patchbay_store_sqlite::SqliteStore::open(&path)
            .await
            .expect("a SQLite store"),
    );
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .foreign_keys(false)
        .connect()
        .await
        .expect("open the file");
    sqlx::query(
        "INSERT INTO messages (account_id, chat_id, channel_id, direction, text, status, \
         sent_at, created_at) VALUES (41, 42, 43, 'in', 'orphan', 'received', 1, 1)",
    )
    .execute(&mut conn)
    .await
    .expect("an orphan message");
    drop(conn);
    let to = crate::pg_cluster::fresh_database("copy-orphan");
    let out = copy(&format!("sqlite://{}", path.display()), &to, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("first: messages row 1"), "{err}");
    assert!(err.contains("PRAGMA foreign_key_check"), "{err}");
    let pg = sqlx::PgPool::connect(&to).await.expect("target");
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM messages) + (SELECT COUNT(*) FROM accounts)",
    )
    .fetch_one(&pg)
    .await
    .expect("the target's tables (its schema is brought up to date first)");
    assert_eq!(rows, 0, "nothing copied");
}

/// PostgreSQL down at start: the daemon exits non-zero, soon, with a message naming
/// store.url with its password replaced.
#[test]
fn postgres_down_at_start_is_a_clear_error() {
    let server = PgServer::start_private();
    server.stop();
    let url = format!(
        "postgres://postgres:hunter2@localhost/patchbay?host={}&port={}",
        server.socket_dir().display(),
        server.port()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("patchbayd.toml");
    std::fs::write(
        &config,
        format!("[store]\nurl = \"{url}\"\nconnect_timeout_secs = 3\n"),
    )
    .expect("config");
    let started = Instant::now();
    let out = Command::new(PATCHBAYD)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run patchbayd");
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store.url"), "{err}");
    assert!(err.contains("postgres://postgres:***@localhost"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

/// PostgreSQL down for 20 s while a loopback channel sends, on the Redis queue: the
/// same daemon stays up, and once the server is back every message is stored once.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_under_inbound_load_loses_nothing() {
    const SENT: usize = 300;
    let server = PgServer::start_private();
    let url = server.fresh_database("outage");
    let d = Daemon::start_with(
        Backend::RedisAof,
        &format!("[store]\nurl = \"{url}\"\nconnect_timeout_secs = 2\n"),
    );
    let pid = d.pid();
    let (acc, admin) = d.account("outage").await;
    d.loopback(
        acc,
        admin,
        json!({"rate_per_sec": 20, "limit": SENT, "clients": 4, "id_prefix": "pg"}),
    )
    .await;
    d.until("the first messages", Duration::from_secs(30), || async {
        (messages(&d, acc).await.len() >= 20).then_some(())
    })
    .await;
    server.stop();
    let down_at = Instant::now();
    let status = d
        .until(
            "status saying the store is down",
            Duration::from_secs(20),
            || async {
                let s = d.ok("status", json!({})).await;
                s["health"]["store"].is_string().then_some(s)
            },
        )
        .await;
    assert_eq!(status["health"]["ok"], false, "{status}");
    while down_at.elapsed() < Duration::from_secs(20) {
        let s = d.ok("status", json!({})).await;
        assert_eq!(
            s["pid"].as_u64(),
            Some(u64::from(pid)),
            "the daemon restarted"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    server.start();
    d.until("every message stored", Duration::from_secs(180), || async {
        let inbound: Vec<Value> = messages(&d, acc).await;
        let ids: std::collections::HashSet<&str> = inbound
            .iter()
            .filter_map(|m| m["external_message_id"].as_str())
            .collect();
        assert_eq!(inbound.len(), ids.len(), "a message stored twice");
        (inbound.len() == SENT).then_some(())
    })
    .await;
    let status = d.ok("status", json!({})).await;
    assert_eq!(status["pid"].as_u64(), Some(u64::from(pid)), "{status}");
}
