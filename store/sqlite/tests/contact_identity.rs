//! Migration 0005 on a store written by the old code: every contact gets an identity
//! by the lookup priority, duplicates the old code could not make (but a hand-edited
//! store might hold) keep the first row on the key, and an insert without an identity
//! fails as it does on PostgreSQL.

use std::path::Path;

use sqlx::{Connection, SqliteConnection};

async fn apply(db: &mut SqliteConnection, upto: &str, from: Option<&str>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("migrations")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    for file in files {
        // The version: the name's leading digits.
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let version = name.get(..4).unwrap_or_default();
        if version > upto || from.is_some_and(|f| version < f) {
            continue;
        }
        let sql = std::fs::read_to_string(&file).expect("read");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *db)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

#[tokio::test]
async fn existing_contacts_get_identities_by_the_lookup_priority() {
    let mut db = SqliteConnection::connect("sqlite::memory:")
        .await
        .expect("db");
    apply(&mut db, "0004", None).await;
    sqlx::raw_sql(
        "INSERT INTO accounts (id, name, currency, created_at) VALUES (1, 'a', 'EUR', 0); \
         INSERT INTO contacts (id, account_id, epoch, phone, username, sender_channel_id, \
             sender_id, created_at) VALUES \
         (1, 1, 0, '+79161234567', 'ivan', 3, '43', 0), \
         (2, 1, 0, NULL, 'olga', 3, '44', 0), \
         (3, 1, 0, NULL, 'petr', NULL, NULL, 0), \
         (4, 1, 0, NULL, NULL, NULL, NULL, 0), \
         (5, 1, 0, '+79161234567', NULL, NULL, NULL, 0), \
         (6, 1, 1, '+79161234567', NULL, NULL, NULL, 0), \
         (7, 1, 0, NULL, 'petr', NULL, NULL, 0);",
    )
    .execute(&mut db)
    .await
    .expect("old rows");
    apply(&mut db, "0005", Some("0005")).await;

    let identities: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, identity FROM contacts ORDER BY id")
            .fetch_all(&mut db)
            .await
            .expect("read");
    let expected = [
        (1, "phone:+79161234567"),
        (2, "id:3:44"),
        (3, "user:petr"),
        (4, "legacy:4"),
        // The second contact of a phone, and of a username, in the same epoch.
        (5, "legacy:5"),
        // Another epoch (after a data deletion run) is another contact.
        (6, "phone:+79161234567"),
        (7, "legacy:7"),
    ];
    let expected: Vec<(i64, String)> = expected
        .into_iter()
        .map(|(id, i)| (id, i.to_owned()))
        .collect();
    assert_eq!(identities, expected);

    // Unique from now on, and required.
    let dup = sqlx::query(
        "INSERT INTO contacts (account_id, epoch, identity, created_at) \
         VALUES (1, 0, 'user:petr', 0)",
    )
    .execute(&mut db)
    .await
    .expect_err("a second contact of one identity");
    assert!(dup.to_string().contains("UNIQUE"), "{dup}");
    let missing =
        sqlx::query("INSERT INTO contacts (account_id, epoch, created_at) VALUES (1, 0, 0)")
            .execute(&mut db)
            .await
            .expect_err("no identity");
    assert!(
        missing.to_string().contains("contacts.identity"),
        "{missing}"
    );
    let inserted = sqlx::query(
        "INSERT INTO contacts (account_id, epoch, identity, created_at) \
         VALUES (1, 0, 'user:petr', 0) ON CONFLICT (account_id, epoch, identity) DO NOTHING",
    )
    .execute(&mut db)
    .await
    .expect("find-or-create's insert");
    assert_eq!(inserted.rows_affected(), 0);
}
