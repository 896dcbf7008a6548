//! Accounts, users and top-ups over the socket, and the same through patchbayctl.

use serde_json::json;

use crate::harness::{Backend, Daemon, ctl};

#[tokio::test(flavor = "multi_thread")]
async fn accounts_users_and_topups() {
    let d = Daemon::start(Backend::Sqlite);
    let (acc, admin) = d.account("acme").await;
    let got = d.ok("account.get", json!({"account": acc})).await;
    assert_eq!(got["balance"], 0);
    assert_eq!(got["daily_total"], 0);
    assert_eq!(got["settings"]["balance_notify_days"], 3);
    assert_eq!(got["settings"]["mark_read_on_open"], true);
    assert!(admin > 0);

    let first = d
        .ok(
            "account.topup",
            json!({"account": acc, "amount": 1500, "reference": "inv-1"}),
        )
        .await;
    let again = d
        .ok(
            "account.topup",
            json!({"account": acc, "amount": 1500, "reference": "inv-1"}),
        )
        .await;
    assert_eq!(
        first, again,
        "a repeated reference is the same ledger entry"
    );
    d.fails(
        "account.topup",
        json!({"account": acc, "amount": 99, "reference": "inv-1"}),
        "conflict",
    )
    .await;
    d.fails(
        "account.topup",
        json!({"account": acc, "amount": -5, "reference": "x"}),
        "invalid_value",
    )
    .await;
    d.fails(
        "account.topup",
        json!({"account": 999, "amount": 5, "reference": "x"}),
        "not_found",
    )
    .await;
    assert_eq!(
        d.ok("account.get", json!({"account": acc})).await["balance"],
        1500
    );

    let op = d
        .ok(
            "user.add",
            json!({"account": acc, "name": "Olga", "email": "olga@acme.test", "role": "operator"}),
        )
        .await;
    assert_eq!(op["role"], "operator");
    d.fails(
        "user.add",
        json!({"account": acc, "name": "Olga", "email": "olga@acme.test", "role": "operator"}),
        "conflict",
    )
    .await;
    d.fails(
        "user.add",
        json!({"account": acc, "name": "X", "email": "x@acme.test", "role": "boss"}),
        "invalid_value",
    )
    .await;
    d.fails(
        "account.create",
        json!({"name": "", "admin": {"name": "A", "email": "a@b.test"}}),
        "invalid_value",
    )
    .await;

    // patchbayctl: a table for people, JSON for scripts, non-zero exit with the reason.
    let out = ctl(
        &d.config,
        &["account", "get", "--account", &acc.to_string()],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BALANCE (MINOR UNITS)") && text.contains("1500"),
        "{text}"
    );
    let out = ctl(
        &d.config,
        &["--json", "account", "ledger", "--account", &acc.to_string()],
    );
    let ledger: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(ledger.as_array().map(Vec::len), Some(1));
    let out = ctl(&d.config, &["account", "get", "--account", "77"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("account 77 does not exist"));
}

/// Money stays an integer: a top-up above 10^15 minor units, or one that would take the
/// balance above 10^18, is `invalid_value` and changes nothing (SQLite once turned the
/// overflowing sum into a REAL, and every later read of the account failed).
#[tokio::test(flavor = "multi_thread")]
async fn huge_topups_are_refused_and_the_balance_stays_readable() {
    const MAX_TOPUP: i64 = 1_000_000_000_000_000;
    let d = Daemon::start(Backend::Sqlite);
    let (acc, _) = d.account("rich").await;
    for amount in [i64::MAX, MAX_TOPUP + 1] {
        let msg = d
            .fails(
                "account.topup",
                json!({"account": acc, "amount": amount, "reference": "huge"}),
                "invalid_value",
            )
            .await;
        assert!(msg.contains("at most 1000000000000000"), "{msg}");
    }
    // 1,000 top-ups of the largest amount reach the largest balance, 10^18, exactly.
    let mut client = d.client().await;
    for i in 0..1000 {
        client
            .call(
                "account.topup",
                json!({"account": acc, "amount": MAX_TOPUP, "reference": format!("big-{i}")}),
            )
            .await
            .unwrap_or_else(|e| panic!("top-up {i}: {e:?}"));
    }
    let msg = d
        .fails(
            "account.topup",
            json!({"account": acc, "amount": 1, "reference": "one-more"}),
            "invalid_value",
        )
        .await;
    assert!(msg.contains("above the largest allowed"), "{msg}");
    let got = d.ok("account.get", json!({"account": acc})).await;
    assert_eq!(got["balance"], 1_000_000_000_000_000_000_i64);
    let ledger = d
        .ok("account.ledger", json!({"account": acc, "limit": 2000}))
        .await;
    assert_eq!(
        ledger.as_array().map(Vec::len),
        Some(1000),
        "no entry for a refusal"
    );
    assert!(
        d.ok("status", json!({})).await.is_object(),
        "the daemon still answers"
    );
}

/// `Olga@Acme.test` is the same mailbox as `olga@acme.test`: one user per account.
#[tokio::test(flavor = "multi_thread")]
async fn user_emails_are_unique_ignoring_case() {
    let d = Daemon::start(Backend::Sqlite);
    let (acc, _) = d.account("acme").await;
    let (other, _) = d.account("other").await;
    let olga = |account: i64, email: &str| json!({"account": account, "name": "Olga", "email": email, "role": "operator"});
    let first = d.ok("user.add", olga(acc, "Olga@Acme.test")).await;
    assert_eq!(first["email"], "Olga@Acme.test", "stored as typed");
    let msg = d
        .fails("user.add", olga(acc, "olga@ACME.TEST"), "conflict")
        .await;
    assert!(msg.contains("Olga@Acme.test"), "{msg}");
    // The admin created with the account counts too.
    d.fails("user.add", olga(acc, "ADMIN@acme.test"), "conflict")
        .await;
    // Another account may have its own Olga.
    d.ok("user.add", olga(other, "olga@acme.test")).await;
}
