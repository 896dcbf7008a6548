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
    assert!(text.contains("balance") && text.contains("1500"), "{text}");
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
