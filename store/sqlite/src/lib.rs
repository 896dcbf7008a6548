//! patchbay's store on a SQLite file: the embedded default. One file per concept of
//! `patchbay_jobs::store` (`accounts`, `users`, `channels`, `chats`, `fields`,
//! `journal`, `billing`, `deletion`, `outbox`); `rows` maps rows to the domain's types.
//!
//! WAL with `synchronous = NORMAL` (durable across a process crash, which is the failure
//! the daemon must survive), foreign keys on, a busy timeout so concurrent writers wait
//! instead of failing, and `BEGIN IMMEDIATE` for read-modify-write transactions so two
//! writers never deadlock on a lock upgrade.

use std::path::Path;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use patchbay_jobs::error::DomainError;
use patchbay_jobs::store::StoreResult;

mod accounts;
mod background;
mod batch_journal;
mod billing;
mod channels;
mod chats;
mod deletion;
mod fields;
mod inbound_batch;
mod journal;
mod outbox;
mod rows;
mod users;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection for every write: writers queue here, in order and without
    /// sleeping, instead of racing for SQLite's write lock and backing off in its busy
    /// handler (1-100 ms sleeps).
    writer: SqlitePool,
    /// Data deletion batches: a niced connection (see `background`), used only while
    /// holding `writer`'s connection.
    background: SqlitePool,
}

/// Rows a query hands from the connection's thread to the waiting task at a time.
pub const ROW_BUFFER: usize = 1024;

impl SqliteStore {
    /// Opens (creating if missing) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, DomainError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // Reads through a memory map and a larger page cache than SQLite's 2 MB:
            // the inbound path's lookups otherwise spend their time in pread().
            .pragma("mmap_size", "268435456")
            .pragma("cache_size", "-16384")
            // Rows cross from the connection's thread to the task in batches of this
            // many; sqlx's 50 made a batch's 1,500-row lookups wait on ~30 hand-offs.
            .row_buffer_size(ROW_BUFFER);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .map_err(|e| {
                DomainError::Unavailable(format!("cannot open store {}: {e}", path.display()))
            })?;
        MIGRATOR.run(&pool).await.map_err(|e| {
            DomainError::Unavailable(format!("cannot migrate store {}: {e}", path.display()))
        })?;
        // The writer leaves checkpoints to `checkpoint()`, which the daemon runs from a
        // reader ten times a second: a commit that has to checkpoint stalls every writer
        // behind it. The limit is a backstop should nobody call it (40 MB of WAL).
        let options = options.pragma("wal_autocheckpoint", "10000");
        let cannot_open = |e: sqlx::Error| {
            DomainError::Unavailable(format!("cannot open store {}: {e}", path.display()))
        };
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(cannot_open)?;
        let background = background::open(options).await.map_err(cannot_open)?;
        Ok(SqliteStore {
            pool,
            writer,
            background,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Copies committed pages from the WAL into the database file as far as readers
    /// allow (a PASSIVE checkpoint: it waits for nobody), on a reader connection.
    pub async fn checkpoint(&self) -> StoreResult<()> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_jobs::kind::{InboundMessage, JobKind};
    use patchbay_jobs::model::{Id, JobRecord, JobState, Message, now_ms};
    use patchbay_jobs::store::*;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("t.db"))
            .await
            .expect("open");
        (dir, store)
    }

    fn acme() -> NewAccount {
        NewAccount {
            name: "Acme".into(),
            currency: "EUR".into(),
            admin: NewUser {
                name: "Ann".into(),
                email: "ann@acme.test".into(),
            },
        }
    }

    /// A pending job recorded at the epoch's first millisecond (the store's tests share it).
    pub(super) fn pending_job(id: &str, kind: JobKind, payload: serde_json::Value) -> JobRecord {
        JobRecord {
            id: id.into(),
            kind,
            payload,
            state: JobState::Pending,
            attempts: 0,
            max_attempts: 8,
            last_error: None,
            idempotency_key: None,
            created_at: 1,
            updated_at: 1,
            run_at: 1,
        }
    }

    /// An outbound message in a fresh chat: (store, message, channel).
    async fn outbound(s: &SqliteStore) -> (Message, Id) {
        let (acc, admin) = s.create_account(&acme()).await.expect("create");
        let ch = s
            .add_channel(acc.id, "loopback", "Demo", &serde_json::json!({}))
            .await
            .expect("channel");
        let inbound: InboundMessage = serde_json::from_value(serde_json::json!({
            "channel": ch.id, "external_chat_id": "c1", "external_message_id": "in-1",
            "sender": {"phone": "+4915112345678"}, "text": "hello",
            "sent_at": "2026-11-25T10:00:00Z",
        }))
        .expect("inbound");
        assert!(
            s.store_inbound(&inbound, Some("+4915112345678"))
                .await
                .expect("store")
        );
        let filter = ChatFilter {
            visible_to_operator: None,
            status: None,
            limit: 10,
        };
        let chat = s.chats(acc.id, &filter).await.expect("chats").remove(0);
        let msg = s.add_outbound(&chat, admin.id, "hi").await.expect("send");
        (msg, ch.id)
    }

    #[tokio::test]
    async fn one_send_attempt_at_a_time_holds_a_message() {
        let (_dir, s) = store().await;
        let (msg, _) = outbound(&s).await;
        let status = |id: Id| {
            let s = &s;
            async move { s.message(id).await.expect("message").status }
        };
        let until = now_ms() + 60_000;
        assert!(s.claim_send(msg.id, until).await.expect("claim"));
        assert!(
            !s.claim_send(msg.id, until + 1).await.expect("claim again"),
            "a second attempt must not take a held message"
        );
        // Only the holder's token gives the lease back.
        s.release_send(msg.id, until + 1).await.expect("release");
        assert!(!s.claim_send(msg.id, until).await.expect("still held"));
        // A send that gave up fails the message only once nobody holds it.
        s.fail_unsent(msg.id, "gave up").await.expect("fail");
        assert_eq!(
            status(msg.id).await,
            "queued",
            "a held message may yet be sent"
        );
        s.release_send(msg.id, until).await.expect("release");
        assert!(s.claim_send(msg.id, until).await.expect("after release"));
        // A lease that ran out (its daemon died mid-send) can be taken again.
        sqlx::query("UPDATE messages SET send_lease_until = 1 WHERE id = $1")
            .bind(msg.id)
            .execute(&s.writer)
            .await
            .expect("expire");
        assert!(s.claim_send(msg.id, until).await.expect("expired"));
        s.set_message_status(msg.id, "sent", None, Some("ext-1"))
            .await
            .expect("sent");
        assert!(
            !s.claim_send(msg.id, until + 2).await.expect("sent"),
            "a sent message is never claimed again"
        );
        s.fail_unsent(msg.id, "gave up").await.expect("fail sent");
        assert_eq!(
            status(msg.id).await,
            "sent",
            "a sent message is never failed"
        );
        // An inbound message is never claimed for sending.
        let inbound: Id =
            sqlx::query_scalar("SELECT id FROM messages WHERE direction = 'in' LIMIT 1")
                .fetch_one(&s.pool)
                .await
                .expect("inbound");
        assert!(!s.claim_send(inbound, until).await.expect("inbound"));
    }

    #[tokio::test]
    async fn a_reused_external_id_still_records_the_status() {
        let (_dir, s) = store().await;
        let (msg, _) = outbound(&s).await;
        // "in-1" is the inbound message's id on the same channel.
        s.set_message_status(msg.id, "sent", None, Some("in-1"))
            .await
            .expect("status without the id");
        let stored = s.message(msg.id).await.expect("message");
        assert_eq!(stored.status, "sent");
        assert_eq!(stored.external_message_id, None);
    }

    #[tokio::test]
    async fn a_close_asked_for_before_the_client_wrote_again_leaves_the_chat_open() {
        let (_dir, s) = store().await;
        let (msg, _) = outbound(&s).await;
        let admin = msg.author.expect("author");
        s.assign_chat(msg.chat, Some(admin)).await.expect("assign");
        // The client's message (stored by `outbound`) came after this close was asked.
        let late = s.close_chat(msg.chat, true, Some(1)).await.expect("late");
        assert_eq!(
            late.status, "open",
            "a late or repeated close leaves it open"
        );
        assert_eq!(
            late.responsible, None,
            "the reset applies as if it ran first"
        );
        let closed = s
            .close_chat(msg.chat, false, Some(now_ms() + 1))
            .await
            .expect("close");
        assert_eq!(closed.status, "closed");
    }
}
