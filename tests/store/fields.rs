//! Custom chat fields, on both stores: names unique per account ignoring case (also
//! when two daemons add one at once), values set, replaced and cleared, and a removed
//! field taking its values with it.

use patchbay_jobs::DomainError;
use patchbay_jobs::fields::FieldType;
use serde_json::json;

use crate::common::{Backend, TestStore, acme};
use crate::deletion::store_message;

on_both_stores!(
    field_names_are_unique_per_account_ignoring_case,
    values_are_set_replaced_cleared_and_removed_with_their_field,
);

async fn field_names_are_unique_per_account_ignoring_case(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let options = ["new".to_owned(), "paid".to_owned()];
    let stage = s
        .add_field(acc.id, "Stage", FieldType::List, Some(&options))
        .await
        .expect("list");
    assert_eq!(
        (stage.account, stage.field_type, stage.options.as_deref()),
        (acc.id, FieldType::List, Some(&options[..]))
    );
    let order = s
        .add_field(acc.id, "Order", FieldType::Number, None)
        .await
        .expect("number");
    assert_eq!(s.field(order.id).await.expect("get").options, None);
    assert!(matches!(
        s.add_field(acc.id, "STAGE", FieldType::Text, None).await,
        Err(DomainError::Conflict(_))
    ));
    let mut other = acme();
    other.admin.email = "boss@other.test".into();
    let (acc2, _) = s.create_account(&other).await.expect("other");
    s.add_field(acc2.id, "stage", FieldType::Text, None)
        .await
        .expect("another account's");
    let names: Vec<String> = s
        .fields(acc.id)
        .await
        .expect("fields")
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, ["Stage", "Order"]);
    assert!(matches!(
        s.add_field(999, "X", FieldType::Text, None).await,
        Err(DomainError::NotFound(_))
    ));
    assert!(matches!(s.fields(999).await, Err(DomainError::NotFound(_))));
    assert!(matches!(s.field(999).await, Err(DomainError::NotFound(_))));

    // Two daemons add "Region" and "REGION" at once: one field, the other a conflict.
    let twin = s.another_daemon().await;
    let add = |store: std::sync::Arc<dyn patchbay_jobs::Store>, name: &'static str| {
        tokio::spawn(async move { store.add_field(acc.id, name, FieldType::Text, None).await })
    };
    let (x, y) = (
        add(s.store.clone(), "Region"),
        add(twin.store.clone(), "REGION"),
    );
    let (x, y) = (x.await.expect("x"), y.await.expect("y"));
    assert!(
        matches!(
            (&x, &y),
            (Ok(_), Err(DomainError::Conflict(_))) | (Err(DomainError::Conflict(_)), Ok(_))
        ),
        "{x:?} / {y:?}"
    );
    assert_eq!(s.fields(acc.id).await.expect("fields").len(), 3);
}

async fn values_are_set_replaced_cleared_and_removed_with_their_field(b: Backend) {
    let s = TestStore::open(b).await;
    let (acc, _) = s.create_account(&acme()).await.expect("create");
    let ch = s
        .add_channel(acc.id, "loopback", "Demo", &json!({}))
        .await
        .expect("channel");
    assert!(store_message(&s, ch.id, "c1", "m1", "+4915112345601").await);
    assert!(store_message(&s, ch.id, "c2", "m2", "+4915112345602").await);
    let chat = s.scalar("SELECT MIN(id) FROM chats").await;
    let other_chat = s.scalar("SELECT MAX(id) FROM chats").await;
    let order = s
        .add_field(acc.id, "Order", FieldType::Number, None)
        .await
        .expect("field");
    let note = s
        .add_field(acc.id, "Note", FieldType::Text, None)
        .await
        .expect("field");
    s.set_field_value(chat, note.id, &json!("call back"))
        .await
        .expect("set");
    s.set_field_value(chat, order.id, &json!(41))
        .await
        .expect("set");
    s.set_field_value(chat, order.id, &json!(42))
        .await
        .expect("replace");
    s.set_field_value(other_chat, order.id, &json!(7))
        .await
        .expect("set");
    assert_eq!(
        s.field_values(chat).await.expect("values"),
        [(order.id, json!(42)), (note.id, json!("call back"))],
        "one value per field, by field id"
    );
    s.set_field_value(chat, note.id, &serde_json::Value::Null)
        .await
        .expect("clear");
    s.set_field_value(chat, note.id, &serde_json::Value::Null)
        .await
        .expect("clear again");
    assert_eq!(
        s.field_values(chat).await.expect("values"),
        [(order.id, json!(42))]
    );
    s.remove_field(order.id).await.expect("remove");
    assert!(s.field_values(chat).await.expect("values").is_empty());
    assert!(s.field_values(other_chat).await.expect("values").is_empty());
    assert!(matches!(
        s.field(order.id).await,
        Err(DomainError::NotFound(_))
    ));
    assert!(matches!(
        s.remove_field(order.id).await,
        Err(DomainError::NotFound(_))
    ));
    assert_eq!(s.fields(acc.id).await.expect("fields").len(), 1);
}
