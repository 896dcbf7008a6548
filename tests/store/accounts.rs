//! Accounts and their ledger, on both stores.

use patchbay_jobs::DomainError;
use patchbay_jobs::model::Role;
use patchbay_jobs::settings::Setting;
use patchbay_jobs::store::NewUser;
use patchbay_jobs::validate::MAX_BALANCE;

use crate::common::{Backend, TestStore, acme};

on_both_stores!(
    topup_is_applied_once_per_reference,
    bad_input_changes_nothing,
    a_reference_raced_by_two_daemons_is_credited_once,
    settings_change_one_column_each,
    the_ledger_and_the_account_list_page,
);

async fn topup_is_applied_once_per_reference(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, admin) = s.create_account(&acme()).await.expect("create");
    assert_eq!(admin.role, Role::Administrator);
    let first = s.topup(acc.id, 500, "pay-1").await.expect("topup");
    let again = s.topup(acc.id, 500, "pay-1").await.expect("repeat");
    assert_eq!(first, again);
    assert!(matches!(
        s.topup(acc.id, 700, "pay-1").await,
        Err(DomainError::Conflict(_))
    ));
    s.topup(acc.id, 250, "pay-2").await.expect("second");
    assert_eq!(s.account(acc.id).await.expect("get").balance, 750);
    assert_eq!(s.ledger(acc.id, 10).await.expect("ledger").len(), 2);
}

async fn bad_input_changes_nothing(b: Backend) {
    let s = TestStore::open(b).await;
    let mut bad = acme();
    bad.admin.email = "nope".into();
    assert!(matches!(
        s.create_account(&bad).await,
        Err(DomainError::InvalidValue(_))
    ));
    assert!(matches!(s.account(1).await, Err(DomainError::NotFound(_))));
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let dup = NewUser {
        name: "Ann 2".into(),
        email: "ann@acme.test".into(),
    };
    assert!(matches!(
        s.add_user(acc.id, &dup, Role::Operator).await,
        Err(DomainError::Conflict(_))
    ));
    assert!(matches!(
        s.topup(acc.id, -5, "x").await,
        Err(DomainError::InvalidValue(_))
    ));
    assert!(matches!(
        s.topup(99, 5, "x").await,
        Err(DomainError::NotFound(_))
    ));
    assert_eq!(s.account(acc.id).await.expect("get").balance, 0);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM ledger").await, 0);
}

/// Eight top-ups with one reference at once, on two daemons: one ledger entry, every
/// caller gets it; one with another amount is a conflict.
async fn a_reference_raced_by_two_daemons_is_credited_once(b: Backend) {
    let s = TestStore::open(b).await;
    let other = s.another_daemon().await;
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 {
            s.store.clone()
        } else {
            other.store.clone()
        };
        tasks.push(tokio::spawn(async move {
            store.topup(acc.id, 500, " pay-1 ").await
        }));
    }
    let mut entries = Vec::new();
    for t in tasks {
        entries.push(t.await.expect("task").expect("topup"));
    }
    assert!(entries.iter().all(|e| *e == entries[0]), "{entries:?}");
    assert_eq!(entries[0].reference.as_deref(), Some("pay-1"), "trimmed");
    assert_eq!(entries[0].balance_after, 500);
    assert!(matches!(
        other.topup(acc.id, 501, "pay-1").await,
        Err(DomainError::Conflict(_))
    ));
    assert_eq!(s.account(acc.id).await.expect("get").balance, 500);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM ledger").await, 1);
}

/// Each setting changes its own column: four changes at once, on two daemons, all stick.
async fn settings_change_one_column_each(b: Backend) {
    let s = TestStore::open(b).await;
    let other = s.another_daemon().await;
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let defaults = acc.settings.clone();
    assert_eq!(
        (
            defaults.reset_responsible_on_close,
            defaults.mark_read_on_open,
            defaults.phone_format.as_str(),
            defaults.balance_notify_days
        ),
        (false, true, "none", 3)
    );
    let changes = [
        Setting::ResetResponsibleOnClose(true),
        Setting::MarkReadOnOpen(false),
        Setting::PhoneFormat("+7 (###) ###-##-##".into()),
        Setting::BalanceNotifyDays(7),
    ];
    let mut tasks = Vec::new();
    for (i, change) in changes.into_iter().enumerate() {
        let store = if i % 2 == 0 {
            s.store.clone()
        } else {
            other.store.clone()
        };
        tasks.push(tokio::spawn(async move {
            store.set_setting(acc.id, &change).await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("set");
    }
    let now = s.account(acc.id).await.expect("get").settings;
    assert_eq!(
        (
            now.reset_responsible_on_close,
            now.mark_read_on_open,
            now.phone_format.as_str(),
            now.balance_notify_days
        ),
        (true, false, "+7 (###) ###-##-##", 7)
    );
    let back = s
        .set_setting(acc.id, &Setting::MarkReadOnOpen(true))
        .await
        .expect("set");
    assert!(back.mark_read_on_open && back.reset_responsible_on_close);
    assert!(matches!(
        s.set_setting(999, &Setting::BalanceNotifyDays(2)).await,
        Err(DomainError::NotFound(_))
    ));
}

async fn the_ledger_and_the_account_list_page(b: Backend) {
    let s = TestStore::open(b).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut new = acme();
        new.name = format!("Acme {i}");
        ids.push(s.create_account(&new).await.expect("create").0.id);
    }
    assert_eq!(s.account_ids(0, 3).await.expect("page"), ids[..3]);
    assert_eq!(s.account_ids(ids[2], 10).await.expect("page"), ids[3..]);
    assert!(s.account_ids(ids[4], 10).await.expect("page").is_empty());

    let acc = ids[0];
    for (i, amount) in [100, 200, 300].into_iter().enumerate() {
        s.topup(acc, amount, &format!("r{i}")).await.expect("topup");
    }
    let ledger = s.ledger(acc, 2).await.expect("ledger");
    let rows: Vec<(i64, i64, &str)> = ledger
        .iter()
        .map(|e| (e.amount, e.balance_after, e.kind.as_str()))
        .collect();
    assert_eq!(
        rows,
        [(300, 600, "topup"), (200, 300, "topup")],
        "newest first"
    );
    assert!(matches!(
        s.ledger(999, 10).await,
        Err(DomainError::NotFound(_))
    ));
    // A top-up past the largest balance changes nothing.
    s.exec(&format!(
        "UPDATE accounts SET balance = {} WHERE id = {acc}",
        MAX_BALANCE - 10
    ))
    .await;
    assert!(matches!(
        s.topup(acc, 11, "too much").await,
        Err(DomainError::InvalidValue(_))
    ));
    assert_eq!(s.account(acc).await.expect("get").balance, MAX_BALANCE - 10);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM ledger").await, 3);
}
