//! Accounts and their ledger, on both stores.

use patchbay_jobs::DomainError;
use patchbay_jobs::model::Role;
use patchbay_jobs::store::NewUser;

use crate::common::{Backend, TestStore, acme};

on_both_stores!(
    topup_is_applied_once_per_reference,
    bad_input_changes_nothing,
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
