//! The bench's own access to a daemon's store, whichever database holds it: one
//! [`Store`] for the SQLite file and for a PostgreSQL database, so each read or seed
//! is written once in SQL both accept (the few dialect differences are methods here),
//! and the [`CommitClock`] that times when inbound messages became visible.

use std::path::Path;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, FromRow, SqlitePool};

use super::{Res, StoreArg, now_ms};

/// Which database a bench's daemon keeps its store in (`BENCH_STORE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }

    /// `BENCH_STORE`: `sqlite` (the default, as before the PostgreSQL store), `postgres`,
    /// or `both` (SQLite first, then PostgreSQL, alternating where a bench repeats).
    pub fn from_env() -> Res<Vec<StoreKind>> {
        match super::env_or("BENCH_STORE", "sqlite".to_owned()).as_str() {
            "sqlite" => Ok(vec![StoreKind::Sqlite]),
            "postgres" => Ok(vec![StoreKind::Postgres]),
            "both" => Ok(vec![StoreKind::Sqlite, StoreKind::Postgres]),
            other => Err(format!("BENCH_STORE={other}: want sqlite, postgres or both").into()),
        }
    }
}

/// Where one daemon keeps its store: `var/patchbay.db` in its folder, or a database.
#[derive(Clone, Debug)]
pub enum StoreAt {
    File,
    Postgres(String),
}

/// A row type both databases decode (tuples of i64, String, Option<…>).
pub trait Row: Send + Unpin + for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> {}
impl<T> Row for T where T: Send + Unpin + for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow>
{}

/// Runs `$body` with `$pool` bound to whichever pool the store has.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Sqlite($pool) => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

/// A small pool on a daemon's store for the bench's queries: read-only ones beside the
/// running daemon, seeding while it is stopped or idle.
#[derive(Clone)]
pub enum Store {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Store {
    pub async fn open(at: &StoreAt, file: &Path) -> Res<Store> {
        Ok(match at {
            StoreAt::File => {
                let opts = SqliteConnectOptions::new()
                    .filename(file)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(30));
                Store::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(2)
                        .connect_with(opts)
                        .await?,
                )
            }
            // As the bench's role, whose statements the server's report leaves out.
            StoreAt::Postgres(url) => Store::Postgres(
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect_with(
                        url.parse::<PgConnectOptions>()?
                            .username(super::postgres::BENCH_ROLE),
                    )
                    .await?,
            ),
        })
    }

    pub fn kind(&self) -> StoreKind {
        match self {
            Store::Sqlite(_) => StoreKind::Sqlite,
            Store::Postgres(_) => StoreKind::Postgres,
        }
    }

    pub async fn exec(&self, sql: &str, args: &[StoreArg]) -> Res<u64> {
        let sql = AssertSqlSafe(sql.to_owned());
        Ok(
            on_pool!(self, p => bind_args!(sqlx::query(sql), args).execute(p).await?.rows_affected()),
        )
    }

    /// Statements run in one transaction.
    pub async fn exec_all(&self, statements: &[(&str, Vec<StoreArg>)]) -> Res<()> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for (sql, args) in statements {
                let sql = AssertSqlSafe((*sql).to_owned());
                bind_args!(sqlx::query(sql), args).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn one<T: Row>(&self, sql: &str, args: &[StoreArg]) -> Res<T> {
        let sql = AssertSqlSafe(sql.to_owned());
        Ok(on_pool!(self, p => bind_args!(sqlx::query_as(sql), args).fetch_one(p).await?))
    }

    pub async fn all<T: Row>(&self, sql: &str, args: &[StoreArg]) -> Res<Vec<T>> {
        let sql = AssertSqlSafe(sql.to_owned());
        Ok(on_pool!(self, p => bind_args!(sqlx::query_as(sql), args).fetch_all(p).await?))
    }

    /// One BIGINT (or other single value) a query answers.
    pub async fn scalar<T>(&self, sql: &str, args: &[StoreArg]) -> Res<T>
    where
        (T,): Row,
    {
        Ok(self.one::<(T,)>(sql, args).await?.0)
    }

    pub async fn max_message_id(&self) -> Res<i64> {
        Ok(self
            .scalar::<Option<i64>>("SELECT MAX(id) FROM messages", &[])
            .await?
            .unwrap_or(0))
    }

    /// After seeding: the SQLite WAL folded into the file; on PostgreSQL the planner's
    /// statistics and the visibility map made (what autovacuum would do within a
    /// minute, here before anything is measured) and a checkpoint written.
    pub async fn settle(&self) -> Res<()> {
        match self {
            Store::Sqlite(p) => {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(p)
                    .await?;
            }
            Store::Postgres(p) => {
                sqlx::query("VACUUM (ANALYZE)").execute(p).await?;
                sqlx::query("CHECKPOINT").execute(p).await?;
            }
        }
        Ok(())
    }

    /// SQL for the text of `key` in the JSON text column `column`.
    pub fn json_field(&self, column: &str, key: &str) -> String {
        match self {
            Store::Sqlite(_) => format!("({column} ->> '{key}')"),
            Store::Postgres(_) => format!("({column}::json ->> '{key}')"),
        }
    }

    /// SQL for the commit time (unix ms) of a row of `messages`, where the database
    /// records it: PostgreSQL with `track_commit_timestamp` (the bench's cluster has it
    /// on); NULL on SQLite, whose commits the [`CommitClock`] times instead.
    pub fn commit_ms_sql(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "NULL",
            Store::Postgres(_) => {
                "CAST(EXTRACT(EPOCH FROM pg_xact_commit_timestamp(xmin)) * 1000 AS BIGINT)"
            }
        }
    }

    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}

/// When each inbound message became visible.
///
/// On SQLite a poller reads `MAX(id)` of `messages` every `period`: ids are assigned
/// inside the writing transaction and SQLite has one writer at a time, so id order is
/// commit order and "first poll that saw max(id) >= id" bounds the commit time from
/// above (within one period). On PostgreSQL batches commit side by side, so id order is
/// not commit order; there the row's own commit timestamp is read instead
/// ([`Store::commit_ms_sql`]) and nothing polls.
pub struct CommitClock {
    pub marks: Vec<(i64, i64)>, // (max id seen, unix ms when first seen)
}

impl CommitClock {
    pub fn spawn(
        store: Store,
        period: Duration,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<CommitClock> {
        tokio::spawn(async move {
            let mut marks: Vec<(i64, i64)> = Vec::new();
            let Store::Sqlite(pool) = store else {
                return CommitClock { marks };
            };
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                if *stop.borrow() {
                    break;
                }
                let max: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM messages")
                    .fetch_one(&pool)
                    .await
                    .ok()
                    .flatten();
                let t = now_ms();
                if let Some(m) = max
                    && marks.last().is_none_or(|l| m > l.0)
                {
                    marks.push((m, t));
                }
            }
            CommitClock { marks }
        })
    }

    /// The commit time of message `id`: `recorded` (the database's own, from
    /// [`Store::commit_ms_sql`]) if any, else the first time a max(id) >= `id` was seen.
    pub fn commit_ms(&self, id: i64, recorded: Option<i64>) -> Option<i64> {
        if recorded.is_some() {
            return recorded;
        }
        let i = self.marks.partition_point(|m| m.0 < id);
        self.marks.get(i).map(|m| m.1)
    }
}
