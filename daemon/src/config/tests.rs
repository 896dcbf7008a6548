//! The config schema's checks: defaults, limits, and the errors that name the key.

use super::*;

fn load_toml(text: &str) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).expect("write");
    load(Some(&path))
}

#[test]
fn defaults_are_valid_and_paths_follow_the_file() {
    let s = load_toml("").expect("defaults");
    assert_eq!(s.queue, QueueBackend::Sqlite);
    assert!(s.socket.is_absolute() && s.socket.ends_with("var/patchbayd.sock"));
    assert_eq!(s.retry_delay(1), Duration::from_secs(1));
    assert_eq!(s.retry_delay(3), Duration::from_secs(4));
    assert_eq!(s.retry_delay(40), Duration::from_secs(300));
}

#[test]
fn each_bad_value_names_its_key() {
    for (text, key) in [
        ("[queue]\nbackend = \"mysql\"", "queue.backend"),
        (
            "[queue]\nshutdown_timeout_secs = \"soon\"",
            "queue.shutdown_timeout_secs",
        ),
        (
            "[queue.concurrency]\nbilling = 4",
            "queue.concurrency.billing",
        ),
        ("[store]\nurl = \"postgres://x\"", "store.url"),
        ("[store]\nurl = \"mysql://x/db\"", "store.url"),
        ("[store]\npool_size = 0", "store.pool_size"),
        (
            "[store]\nurl = \"postgres://u@db/pb\"\n[node]\nrun_channels = false",
            "node.run_channels",
        ),
        ("[billing]\nrun_at = \"25:00\"", "billing.run_at"),
        ("[billing.prices]\nloopback = -1", "billing.prices.loopback"),
        (
            "[billing.prices]\nloopback = 9000000000000000000",
            "billing.prices.loopback",
        ),
        ("[billing]\ndefault_price = -5", "billing.default_price"),
        ("[queue]\nretry_max_ms = 604800001", "queue.retry_max_ms"),
        ("[log]\nformat = \"xml\"", "log.format"),
        (
            "[queue]\nlost_job_grace_secs = 0",
            "queue.lost_job_grace_secs",
        ),
        ("[control]\nsockett = \"x\"", "sockett"),
        // Each of these passed once and then failed the daemon's start with exit 1.
        ("[mail]\nfrom = \"not an address\"", "mail.from"),
        (
            "[queue]\nbackend = \"redis\"\nredis_url = \"redis://[::bad\"",
            "queue.redis_url",
        ),
        (
            "[queue]\nbackend = \"redis\"\nredis_url = \"rediss://cache.example/\"",
            "queue.redis_url",
        ),
        (
            "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtpx://relay\"",
            "mail.smtp_url",
        ),
        (
            "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtp://relay?tls=maybe\"",
            "mail.smtp_url",
        ),
        (
            "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtp://\"",
            "mail.smtp_url",
        ),
        ("[mail]\nspool_dir = \"\"", "mail.spool_dir"),
        ("[control]\nsocket = \"\"", "control.socket"),
        ("[queue]\nsqlite_path = \"\"", "queue.sqlite_path"),
        ("[control]\nmax_connections = 0", "control.max_connections"),
        ("[control]\nmax_batch = 10001", "control.max_batch"),
        (
            "[control]\nidle_timeout_secs = 0",
            "control.idle_timeout_secs",
        ),
        (
            "[control]\nwrite_timeout_secs = -1",
            "control.write_timeout_secs",
        ),
    ] {
        let err = load_toml(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(key), "{text:?} gave {err:?}");
    }
}

#[test]
fn secrets_in_urls_are_never_shown() {
    for (text, key) in [
        (
            "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtpx://mailer:hunter2@relay:25\"",
            "mail.smtp_url",
        ),
        (
            "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtp://mailer:hunter2@relay:99999\"",
            "mail.smtp_url",
        ),
        (
            "[queue]\nbackend = \"redis\"\nredis_url = \"redis://:hunter2@[::bad/\"",
            "queue.redis_url",
        ),
        (
            "[queue]\nbackend = \"redis\"\nredis_url = \"http://:hunter2@cache/\"",
            "queue.redis_url",
        ),
    ] {
        let err = load_toml(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(key) && err.contains("***"),
            "{text:?} gave {err:?}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn urls_the_daemon_accepts_pass() {
    for text in [
        "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtp://127.0.0.1:2525\"",
        "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtp://relay:587?tls=required\"",
        "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtps://user:p%40ss@smtp.example.com:465\"",
        "[queue]\nbackend = \"redis\"\nredis_url = \"redis://:secret@127.0.0.1:6379/2\"",
        "[queue]\nbackend = \"redis\"\nredis_url = \"redis+unix:///run/redis.sock\"",
        "[mail]\nfrom = \"billing@example.com\"",
    ] {
        if let Err(e) = load_toml(text) {
            panic!("{text:?}: {e}");
        }
    }
    assert!(!percent_decodes_to_utf8("%FF%FE") && percent_decodes_to_utf8("p%40ss%"));
}
