//! Messenger channels, on both stores: the status rules (removed stays removed,
//! suspended stays suspended), the lists the daemon runs from, and the counts it reports.

use patchbay_jobs::DomainError;
use serde_json::json;

use crate::common::{Backend, TestStore, acme};

on_both_stores!(
    a_removed_channel_stays_removed_and_a_suspended_one_suspended,
    channel_lists_and_counts_leave_out_what_must_not_run,
);

async fn a_removed_channel_stays_removed_and_a_suspended_one_suspended(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let config = json!({"token": "t", "nested": {"b": 2, "a": 1}});
    let ch = s
        .add_channel(acc.id, "loopback", "Demo", &config)
        .await
        .expect("channel");
    assert_eq!((ch.account, ch.status.as_str()), (acc.id, "connecting"));
    assert_eq!(s.channel(ch.id).await.expect("get").config, config);
    let status = |id| {
        let s = &s;
        async move {
            let c = s.channel(id).await.expect("channel");
            (c.status, c.status_reason)
        }
    };
    s.set_channel_status(ch.id, "connected", None)
        .await
        .expect("connected");
    s.set_channel_identity(ch.id, Some("+4915112345678"), None)
        .await
        .expect("number");
    s.set_channel_identity(ch.id, None, Some("Demo Bot"))
        .await
        .expect("name");
    let c = s.channel(ch.id).await.expect("get");
    assert_eq!(
        (c.number.as_deref(), c.display_name.as_deref()),
        (Some("+4915112345678"), Some("Demo Bot")),
        "an identity update keeps what it does not name"
    );
    s.set_channel_status(ch.id, "suspended", Some("balance"))
        .await
        .expect("suspend");
    s.set_channel_status(ch.id, "connected", None)
        .await
        .expect("late event");
    assert_eq!(
        status(ch.id).await,
        ("suspended".into(), Some("balance".into())),
        "a connector event does not resume a suspended channel"
    );
    s.set_channel_status(ch.id, "removed", Some("by admin"))
        .await
        .expect("remove");
    s.set_channel_status(ch.id, "connected", None)
        .await
        .expect("late event");
    assert_eq!(status(ch.id).await.0, "removed");
    assert!(s.channel(ch.id).await.expect("get").removed_at.is_some());
    assert!(matches!(
        s.set_channel_status(ch.id, "asleep", None).await,
        Err(DomainError::InvalidValue(_))
    ));
    assert!(matches!(
        s.channel(999).await,
        Err(DomainError::NotFound(_))
    ));
    assert!(matches!(
        s.add_channel(999, "loopback", "Nope", &json!({})).await,
        Err(DomainError::NotFound(_))
    ));
    assert_eq!(s.scalar("SELECT COUNT(*) FROM channels").await, 1);
}

async fn channel_lists_and_counts_leave_out_what_must_not_run(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let mut other = acme();
    other.admin.email = "boss@other.test".into();
    let (acc2, _) = s.create_account(&other).await.expect("other");
    let add = |account, kind: &'static str, status: &'static str| {
        let s = &s;
        async move {
            let c = s
                .add_channel(account, kind, kind, &json!({}))
                .await
                .expect("channel");
            s.set_channel_status(c.id, status, None)
                .await
                .expect("status");
            c.id
        }
    };
    let live = add(acc.id, "loopback", "connected").await;
    let suspended = add(acc.id, "telegram", "suspended").await;
    add(acc.id, "loopback", "removed").await;
    let elsewhere = add(acc2.id, "webhook", "error").await;

    let ids =
        |cs: Vec<patchbay_jobs::model::Channel>| cs.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.channels(acc.id).await.expect("list")),
        [live, suspended]
    );
    assert_eq!(
        ids(s.runnable_channels().await.expect("runnable")),
        [live, elsewhere]
    );
    assert_eq!(
        s.active_channel_kinds(acc.id).await.expect("kinds"),
        ["loopback"]
    );
    assert_eq!(
        ids(s.troubled_channels(10).await.expect("troubled")),
        [elsewhere, suspended],
        "not connected, not removed, newest first"
    );
    assert_eq!(ids(s.troubled_channels(1).await.expect("one")), [elsewhere]);
    assert_eq!(
        s.channel_counts().await.expect("counts"),
        [
            ("connected".to_owned(), 1),
            ("error".to_owned(), 1),
            ("removed".to_owned(), 1),
            ("suspended".to_owned(), 1),
        ]
    );
    assert_eq!(
        s.channels_per_kind().await.expect("per kind"),
        [
            ("loopback".to_owned(), 1),
            ("telegram".to_owned(), 1),
            ("webhook".to_owned(), 1),
        ]
    );
    assert!(matches!(
        s.channels(999).await,
        Err(DomainError::NotFound(_))
    ));
}
