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
mod cluster;
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
