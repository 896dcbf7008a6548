//! patchbay's store on PostgreSQL: the shared store of several daemons on several hosts.
//!
//! One file per concept of `patchbay_jobs::store`, as in the SQLite store. Unlike
//! SQLite, PostgreSQL has many writers at once, under READ COMMITTED: every write says
//! in a comment what it locks, and every "at most once" rule is a constraint of
//! `migrations/`. Batches pass their rows as arrays (`UNNEST`).

/// Unix ms on the database's clock, for `concat!`ed SQL (`clock_timestamp()`, which
/// moves within a transaction): what leases expire by, whatever the nodes' clocks say.
macro_rules! now_ms_sql {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

mod accounts;
mod batch_journal;
mod billing;
mod channels;
mod chats;
mod cluster;
mod connection;
mod contacts;
mod deletion;
mod fields;
mod inbound_batch;
mod journal;
mod locks;
mod outbox;
mod users;

// The test process's own PostgreSQL server, for the unit tests of batch machinery.
#[cfg(test)]
#[path = "../../../tests/support/pg_cluster.rs"]
mod pg_cluster;

pub use connection::{ConnectError, MIGRATOR, PgOptions, connect, redact_url};

use sqlx::PgPool;

/// The store on one PostgreSQL database; cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects (see [`connect`]) and brings the schema up to date.
    pub async fn connect(url: &str, opts: &PgOptions) -> Result<Self, ConnectError> {
        Ok(PgStore {
            pool: connect(url, opts).await?,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A UNIQUE constraint refused the write.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}
