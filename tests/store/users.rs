//! An account's users, on both stores: one user per e-mail address and account,
//! addresses compared ignoring (ASCII) case, also when two daemons add them at once.

use patchbay_jobs::DomainError;
use patchbay_jobs::model::Role;
use patchbay_jobs::store::NewUser;

use crate::common::{Backend, TestStore, acme};

on_both_stores!(
    an_address_is_one_user_per_account_ignoring_case,
    two_daemons_adding_one_address_make_one_user,
);

fn new_user(name: &str, email: &str) -> NewUser {
    NewUser {
        name: name.into(),
        email: email.into(),
    }
}

async fn an_address_is_one_user_per_account_ignoring_case(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, admin) = s.create_account(&acme()).await.expect("create");
    let bob = s
        .add_user(
            acc.id,
            &new_user(" Bob ", " bob@acme.test "),
            Role::Operator,
        )
        .await
        .expect("bob");
    assert_eq!(
        (bob.account, bob.name.as_str(), bob.email.as_str(), bob.role),
        (acc.id, "Bob", "bob@acme.test", Role::Operator),
        "stored trimmed"
    );
    let read = s.user(bob.id).await.expect("user");
    assert_eq!(
        (read.id, read.email, read.role),
        (bob.id, bob.email, bob.role)
    );
    assert_eq!(
        s.user(admin.id).await.expect("admin").role,
        Role::Administrator
    );
    for taken in ["ANN@acme.test", "Bob@Acme.Test"] {
        assert!(
            matches!(
                s.add_user(acc.id, &new_user("Twin", taken), Role::Operator)
                    .await,
                Err(DomainError::Conflict(_))
            ),
            "{taken} is a user already"
        );
    }
    // Case folding is ASCII's only, on both stores alike.
    s.add_user(acc.id, &new_user("Eve", "eve@acme.test"), Role::Operator)
        .await
        .expect("eve");
    s.add_user(acc.id, &new_user("Ève", "ève@acme.test"), Role::Operator)
        .await
        .expect("a different address");
    s.add_user(acc.id, &new_user("Ève", "ÈVE@acme.test"), Role::Operator)
        .await
        .expect("È is not folded to è");
    // Another account may have the same address.
    let mut other = acme();
    other.admin.email = "boss@other.test".into();
    let (acc2, _) = s.create_account(&other).await.expect("other");
    s.add_user(
        acc2.id,
        &new_user("Bob", "BOB@acme.test"),
        Role::Administrator,
    )
    .await
    .expect("bob elsewhere");
    assert!(matches!(
        s.add_user(99, &new_user("Nobody", "n@acme.test"), Role::Operator)
            .await,
        Err(DomainError::NotFound(_))
    ));
    assert!(matches!(
        s.add_user(acc.id, &new_user("Bad", "not an address"), Role::Operator)
            .await,
        Err(DomainError::InvalidValue(_))
    ));
    assert!(matches!(s.user(999).await, Err(DomainError::NotFound(_))));
    assert_eq!(
        s.scalar(&format!(
            "SELECT COUNT(*) FROM users WHERE account_id = {}",
            acc.id
        ))
        .await,
        5
    );
}

/// Two daemons add `userN@` and `USERN@` to one account at the same moment: one of
/// each pair is added, the other refused as a conflict (never an error, never both).
async fn two_daemons_adding_one_address_make_one_user(b: Backend) {
    const PAIRS: usize = 30;
    let s = TestStore::open(b).await;
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let other = s.another_daemon().await;
    let add = |store: std::sync::Arc<dyn patchbay_jobs::Store>, upper: bool| {
        tokio::spawn(async move {
            let mut out = Vec::new();
            for n in 0..PAIRS {
                let local = if upper {
                    format!("USER{n}")
                } else {
                    format!("user{n}")
                };
                let user = new_user("Twin", &format!("{local}@acme.test"));
                out.push(store.add_user(acc.id, &user, Role::Operator).await);
            }
            out
        })
    };
    let (a, b2) = (add(s.store.clone(), false), add(other.store.clone(), true));
    let (a, b2) = (a.await.expect("a"), b2.await.expect("b"));
    for (n, (x, y)) in a.iter().zip(&b2).enumerate() {
        let conflict = |r: &Result<_, DomainError>| matches!(r, Err(DomainError::Conflict(_)));
        assert!(
            (x.is_ok() && conflict(y)) || (conflict(x) && y.is_ok()),
            "pair {n}: {x:?} / {y:?}"
        );
    }
    assert_eq!(
        s.scalar("SELECT COUNT(*) FROM users").await,
        PAIRS as i64 + 1
    );
}
