//! What every store test needs: a fresh store of either backend behind `dyn Store`, raw
//! SQL on it for what the interface does not show, and `on_both_stores!`, which turns
//! each `async fn name(b: Backend)` into one test per backend.
#![allow(dead_code)]

use std::ops::Deref;
use std::sync::Arc;

use patchbay_jobs::Store;
use patchbay_jobs::kind::JobKind;
use patchbay_jobs::model::{JobRecord, JobState};
use patchbay_jobs::store::{NewAccount, NewUser};
use patchbay_store_postgres::{PgOptions, PgStore};
use patchbay_store_sqlite::SqliteStore;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates `mod sqlite { #[tokio::test] fn name() }` and `mod postgres { … }` for
/// each listed `async fn name(b: Backend)` of the calling module.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// A fresh, empty store of one backend.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub backend: Backend,
    /// Where the store is: the SQLite file's path, or the PostgreSQL database's URL.
    pub location: String,
    raw: Raw,
    _dir: Option<tempfile::TempDir>,
}

impl Deref for TestStore {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}

impl TestStore {
    pub async fn open(backend: Backend) -> TestStore {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("store.db");
                let store = SqliteStore::open(&path).await.expect("open sqlite store");
                let raw = Raw::Sqlite(store.pool().clone());
                TestStore {
                    store: Arc::new(store),
                    backend,
                    location: path.display().to_string(),
                    raw,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let url = crate::pg_cluster::fresh_database("store");
                TestStore::open_postgres(&url).await
            }
        }
    }

    /// A second store on the same PostgreSQL database: another daemon's.
    pub async fn open_postgres(url: &str) -> TestStore {
        let store = PgStore::connect(url, &PgOptions::default())
            .await
            .expect("open postgres store");
        let raw = Raw::Postgres(store.pool().clone());
        TestStore {
            store: Arc::new(store),
            backend: Backend::Postgres,
            location: url.to_owned(),
            raw,
            _dir: None,
        }
    }

    /// A second store on the same data, of either backend: another daemon's (on SQLite,
    /// another process's connections to the same file).
    pub async fn another_daemon(&self) -> TestStore {
        match self.backend {
            Backend::Postgres => TestStore::open_postgres(&self.location).await,
            Backend::Sqlite => {
                let store = SqliteStore::open(std::path::Path::new(&self.location))
                    .await
                    .expect("reopen sqlite store");
                let raw = Raw::Sqlite(store.pool().clone());
                TestStore {
                    store: Arc::new(store),
                    backend: Backend::Sqlite,
                    location: self.location.clone(),
                    raw,
                    _dir: None,
                }
            }
        }
    }

    /// One BIGINT from a query of portable SQL (a count, a sum cast to BIGINT).
    pub async fn scalar(&self, sql: &str) -> i64 {
        let q = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.raw {
            Raw::Sqlite(p) => sqlx::query_scalar(q).fetch_one(p).await,
            Raw::Postgres(p) => sqlx::query_scalar(q).fetch_one(p).await,
        }
        .unwrap_or_else(|e| panic!("{sql:?}: {e}"))
    }

    /// Runs a statement of portable SQL (to set up what the interface cannot).
    pub async fn exec(&self, sql: &str) {
        let q = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.raw {
            Raw::Sqlite(p) => sqlx::query(q).execute(p).await.map(|_| ()),
            Raw::Postgres(p) => sqlx::query(q).execute(p).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{sql:?}: {e}"))
    }
}

pub fn acme() -> NewAccount {
    NewAccount {
        name: "Acme".into(),
        currency: "EUR".into(),
        admin: NewUser {
            name: "Ann".into(),
            email: "ann@acme.test".into(),
        },
    }
}

/// A pending job recorded at the epoch's first millisecond.
pub fn pending_job(id: &str, kind: JobKind, payload: serde_json::Value) -> JobRecord {
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
