//! `Store` on a SQLite file: the embedded default.
//!
//! WAL with `synchronous = NORMAL` (durable across a process crash, which is the failure
//! the daemon must survive), foreign keys on, a busy timeout so concurrent writers wait
//! instead of failing, and `BEGIN IMMEDIATE` for read-modify-write transactions so two
//! writers never deadlock on a lock upgrade.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use chrono::NaiveDate;

use crate::billing::Prices;
use crate::error::DomainError;
use crate::fields::{FieldDef, FieldType};
use crate::kind::{InboundMessage, JobKind};
use crate::model::{
    Account, CHANNEL_STATUSES, Channel, Chat, Contact, DeletionRun, Id, JobRecord, JobState,
    LedgerEntry, Message, Role, Settings, User, now_ms,
};
use crate::store::{
    BatchOutcome, BatchedJob, ChargeJob, Charged, ChatFilter, CheckJob, InboundJob, JobFilter,
    JournalInsert, NewAccount, NewUser, Notification, Store, StoreResult,
};
use crate::validate;

mod background;
mod batch_journal;
mod billing;
mod inbound_batch;

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

macro_rules! account_columns {
    () => {
        "id, name, currency, balance, reset_responsible_on_close, \
     mark_read_on_open, phone_format, balance_notify_days, created_at"
    };
}

fn account_from_row(r: &SqliteRow) -> StoreResult<Account> {
    Ok(Account {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        currency: r.try_get("currency")?,
        balance: r.try_get("balance")?,
        settings: Settings {
            reset_responsible_on_close: r.try_get("reset_responsible_on_close")?,
            mark_read_on_open: r.try_get("mark_read_on_open")?,
            phone_format: r.try_get("phone_format")?,
            balance_notify_days: r.try_get("balance_notify_days")?,
        },
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! user_columns {
    () => {
        "id, account_id, name, email, role, created_at"
    };
}

fn user_from_row(r: &SqliteRow) -> StoreResult<User> {
    let role: String = r.try_get("role")?;
    Ok(User {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        name: r.try_get("name")?,
        email: r.try_get("email")?,
        role: Role::from_str(&role)?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! ledger_columns {
    () => {
        "id, account_id, kind, amount, balance_after, reference, channel_id, day, created_at"
    };
}

fn ledger_from_row(r: &SqliteRow) -> StoreResult<LedgerEntry> {
    Ok(LedgerEntry {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        kind: r.try_get("kind")?,
        amount: r.try_get("amount")?,
        balance_after: r.try_get("balance_after")?,
        reference: r.try_get("reference")?,
        channel: r.try_get("channel_id")?,
        day: r.try_get("day")?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! job_columns {
    () => {
        "id, kind, payload, state, attempts, max_attempts, last_error, \
     idempotency_key, created_at, updated_at, run_at"
    };
}

fn job_from_row(r: &SqliteRow) -> StoreResult<JobRecord> {
    let kind: String = r.try_get("kind")?;
    let state: String = r.try_get("state")?;
    let payload: String = r.try_get("payload")?;
    let attempts: i64 = r.try_get("attempts")?;
    let max_attempts: i64 = r.try_get("max_attempts")?;
    Ok(JobRecord {
        id: r.try_get("id")?,
        kind: JobKind::from_str(&kind)?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| DomainError::Unavailable(format!("corrupt job payload: {e}")))?,
        state: JobState::from_str(&state)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        max_attempts: u32::try_from(max_attempts).unwrap_or(u32::MAX),
        last_error: r.try_get("last_error")?,
        idempotency_key: r.try_get("idempotency_key")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        run_at: r.try_get("run_at")?,
    })
}

macro_rules! channel_columns {
    () => {
        "id, account_id, kind, name, config, status, status_reason, number, display_name, \
         created_at, removed_at"
    };
}

fn channel_from_row(r: &SqliteRow) -> StoreResult<Channel> {
    let config: String = r.try_get("config")?;
    Ok(Channel {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        kind: r.try_get("kind")?,
        name: r.try_get("name")?,
        config: serde_json::from_str(&config)
            .map_err(|e| DomainError::Unavailable(format!("corrupt channel config: {e}")))?,
        status: r.try_get("status")?,
        status_reason: r.try_get("status_reason")?,
        number: r.try_get("number")?,
        display_name: r.try_get("display_name")?,
        created_at: r.try_get("created_at")?,
        removed_at: r.try_get("removed_at")?,
    })
}

macro_rules! field_columns {
    () => {
        "id, account_id, name, type, options, created_at"
    };
}

fn field_from_row(r: &SqliteRow) -> StoreResult<FieldDef> {
    let t: String = r.try_get("type")?;
    let options: Option<String> = r.try_get("options")?;
    Ok(FieldDef {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        name: r.try_get("name")?,
        field_type: FieldType::from_str(&t)?,
        options: options
            .map(|o| serde_json::from_str(&o))
            .transpose()
            .map_err(|e| DomainError::Unavailable(format!("corrupt field options: {e}")))?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! chat_columns {
    () => {
        "c.id, c.account_id, c.channel_id, c.contact_id, c.external_chat_id, c.status, \
         c.responsible_user_id, c.unread, c.last_message_at, c.created_at"
    };
}

fn chat_from_row(r: &SqliteRow) -> StoreResult<Chat> {
    Ok(Chat {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        channel: r.try_get("channel_id")?,
        contact: r.try_get("contact_id")?,
        external_chat_id: r.try_get("external_chat_id")?,
        status: r.try_get("status")?,
        responsible: r.try_get("responsible_user_id")?,
        unread: r.try_get("unread")?,
        last_message_at: r.try_get("last_message_at")?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! message_columns {
    () => {
        "id, chat_id, channel_id, direction, external_message_id, author_user_id, text, \
         attachments, status, status_reason, sent_at, created_at"
    };
}

fn message_from_row(r: &SqliteRow) -> StoreResult<Message> {
    let attachments: String = r.try_get("attachments")?;
    Ok(Message {
        id: r.try_get("id")?,
        chat: r.try_get("chat_id")?,
        channel: r.try_get("channel_id")?,
        direction: r.try_get("direction")?,
        external_message_id: r.try_get("external_message_id")?,
        author: r.try_get("author_user_id")?,
        text: r.try_get("text")?,
        attachments: serde_json::from_str(&attachments).unwrap_or(serde_json::Value::Null),
        status: r.try_get("status")?,
        status_reason: r.try_get("status_reason")?,
        sent_at: r.try_get("sent_at")?,
        created_at: r.try_get("created_at")?,
    })
}

macro_rules! run_columns {
    () => {
        "id, account_id, cutoff, epoch, state, deleted_messages, deleted_chats, \
         deleted_contacts, started_at, finished_at"
    };
}

fn run_from_row(r: &SqliteRow) -> StoreResult<DeletionRun> {
    Ok(DeletionRun {
        id: r.try_get("id")?,
        account: r.try_get("account_id")?,
        cutoff: r.try_get("cutoff")?,
        epoch: r.try_get("epoch")?,
        state: r.try_get("state")?,
        deleted_messages: r.try_get("deleted_messages")?,
        deleted_chats: r.try_get("deleted_chats")?,
        deleted_contacts: r.try_get("deleted_contacts")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

async fn find_or_create_chat(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    (channel, account): (Id, Id),
    epoch: i64,
    external_chat_id: &str,
    contact: Id,
    now: i64,
) -> StoreResult<Chat> {
    let find = || {
        sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM chats c WHERE c.channel_id = $1 AND c.external_chat_id = $2 AND c.epoch = $3"
        ))
        .bind(channel)
        .bind(external_chat_id)
        .bind(epoch)
    };
    if let Some(row) = find().fetch_optional(&mut **tx).await? {
        return chat_from_row(&row);
    }
    sqlx::query(
        "INSERT INTO chats (account_id, epoch, channel_id, contact_id, external_chat_id, status, \
         created_at) VALUES ($1, $2, $3, $4, $5, 'open', $6) \
         ON CONFLICT (channel_id, external_chat_id, epoch) DO NOTHING",
    )
    .bind(account)
    .bind(epoch)
    .bind(channel)
    .bind(contact)
    .bind(external_chat_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    chat_from_row(&find().fetch_one(&mut **tx).await?)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_account(&self, new: &NewAccount) -> StoreResult<(Account, User)> {
        let name = validate::name("name", &new.name)?;
        let currency = validate::currency(&new.currency)?;
        let admin_name = validate::name("admin.name", &new.admin.name)?;
        let admin_email = validate::email("admin.email", &new.admin.email)?;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(concat!(
            "INSERT INTO accounts (name, currency, created_at) VALUES ($1, $2, $3) \
             RETURNING ",
            account_columns!()
        ))
        .bind(&name)
        .bind(&currency)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let account = account_from_row(&row)?;
        let row = sqlx::query(concat!(
            "INSERT INTO users (account_id, name, email, role, created_at) \
             VALUES ($1, $2, $3, 'administrator', $4) RETURNING ",
            user_columns!()
        ))
        .bind(account.id)
        .bind(&admin_name)
        .bind(&admin_email)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let admin = user_from_row(&row)?;
        tx.commit().await?;
        Ok((account, admin))
    }

    async fn account(&self, id: Id) -> StoreResult<Account> {
        let row = sqlx::query(concat!(
            "SELECT ",
            account_columns!(),
            " FROM accounts WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("account", id))?;
        account_from_row(&row)
    }

    async fn topup(&self, account: Id, amount: i64, reference: &str) -> StoreResult<LedgerEntry> {
        let (amount, reference) = validate::topup(amount, reference)?;
        let mut tx = self.begin_write().await?;
        let existing = sqlx::query(concat!(
            "SELECT ",
            ledger_columns!(),
            " FROM ledger WHERE account_id = $1 AND reference = $2"
        ))
        .bind(account)
        .bind(reference)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = existing {
            let entry = ledger_from_row(&row)?;
            if entry.amount != amount {
                return Err(DomainError::Conflict(format!(
                    "reference {reference:?} was already used for a top-up of {}",
                    entry.amount
                )));
            }
            return Ok(entry);
        }
        let before: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DomainError::not_found("account", account))?;
        if before
            .checked_add(amount)
            .is_none_or(|b| b > validate::MAX_BALANCE)
        {
            return Err(DomainError::InvalidValue(format!(
                "a top-up of {amount} would take the balance of account {account} ({before}) \
                 above the largest allowed, {} minor units",
                validate::MAX_BALANCE
            )));
        }
        let balance: i64 = sqlx::query_scalar(
            "UPDATE accounts SET balance = balance + $1 WHERE id = $2 RETURNING balance",
        )
        .bind(amount)
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| DomainError::not_found("account", account))?;
        let row = sqlx::query(concat!(
            "INSERT INTO ledger (account_id, kind, amount, balance_after, reference, created_at) \
             VALUES ($1, 'topup', $2, $3, $4, $5) RETURNING ",
            ledger_columns!()
        ))
        .bind(account)
        .bind(amount)
        .bind(balance)
        .bind(reference)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        let entry = ledger_from_row(&row)?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn ledger(&self, account: Id, limit: u32) -> StoreResult<Vec<LedgerEntry>> {
        self.account(account).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            ledger_columns!(),
            " FROM ledger WHERE account_id = $1 ORDER BY id DESC LIMIT $2"
        ))
        .bind(account)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ledger_from_row).collect()
    }

    async fn add_user(&self, account: Id, user: &NewUser, role: Role) -> StoreResult<User> {
        let name = validate::name("name", &user.name)?;
        let email = validate::email("email", &user.email)?;
        self.account(account).await?;
        let mut tx = self.begin_write().await?;
        // Addresses that differ only in case are one mailbox in practice. The UNIQUE
        // constraint is case-sensitive, so this check (in the write transaction, so no
        // insert races it) is what refuses Ann@ beside ann@. lower() folds ASCII only in
        // SQLite.
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT email FROM users WHERE account_id = $1 AND lower(email) = lower($2)",
        )
        .bind(account)
        .bind(&email)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(taken) = taken {
            return Err(DomainError::Conflict(format!(
                "account {account} already has a user {taken} (e-mail addresses are compared \
                 ignoring case)"
            )));
        }
        let row = sqlx::query(concat!(
            "INSERT INTO users (account_id, name, email, role, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING ",
            user_columns!()
        ))
        .bind(account)
        .bind(&name)
        .bind(&email)
        .bind(role.as_str())
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                DomainError::Conflict(format!("account {account} already has a user {email}"))
            } else {
                e.into()
            }
        })?;
        let user = user_from_row(&row)?;
        tx.commit().await?;
        Ok(user)
    }

    async fn user(&self, id: Id) -> StoreResult<User> {
        let row = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("user", id))?;
        user_from_row(&row)
    }

    async fn active_channel_kinds(&self, account: Id) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT kind FROM channels WHERE account_id = $1 \
             AND status NOT IN ('removed', 'suspended') ORDER BY id",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn channel_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(
            sqlx::query_as("SELECT status, COUNT(*) FROM channels GROUP BY status ORDER BY status")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn stopped_channels(&self, ids: &[Id]) -> StoreResult<Vec<Id>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(
            "SELECT id FROM channels WHERE id IN (SELECT value FROM json_each($1)) \
             AND status IN ('suspended', 'removed')",
        )
        .bind(serde_json::Value::from(ids.to_vec()).to_string())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn channels_per_kind(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT kind, COUNT(*) FROM channels WHERE status <> 'removed' \
             GROUP BY kind ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn journal_mark_dead(&self, rec: &JobRecord, reason: &str) -> StoreResult<()> {
        // Two conflict clauses: the id's row is updated; another row's idempotency key
        // leaves everything as it is.
        sqlx::query(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, last_error, \
             idempotency_key, created_at, updated_at, run_at) \
             VALUES ($1, $2, $3, 'dead', $4, $5, $6, $7, $8, $8, $8) \
             ON CONFLICT (id) DO UPDATE SET state = 'dead', attempts = jobs.attempts + 1, \
             last_error = excluded.last_error, updated_at = excluded.updated_at \
             WHERE jobs.state NOT IN ('done', 'dead') \
             ON CONFLICT DO NOTHING",
        )
        .bind(&rec.id)
        .bind(rec.kind.as_str())
        .bind(crate::model::bounded_payload(rec.payload.clone()).to_string())
        .bind(i64::from(rec.attempts.max(1)))
        .bind(i64::from(rec.max_attempts))
        .bind(reason)
        .bind(&rec.idempotency_key)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn journal_insert(&self, rec: &JobRecord) -> StoreResult<JournalInsert> {
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, last_error, \
             idempotency_key, created_at, updated_at, run_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .bind(&rec.id)
        .bind(rec.kind.as_str())
        .bind(rec.payload.to_string())
        .bind(rec.state.as_str())
        .bind(i64::from(rec.attempts))
        .bind(i64::from(rec.max_attempts))
        .bind(&rec.last_error)
        .bind(&rec.idempotency_key)
        .bind(rec.created_at)
        .bind(rec.updated_at)
        .bind(rec.run_at)
        .execute(&self.writer)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(JournalInsert::Inserted);
        }
        let existing: Option<String> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1 OR id = $2")
                .bind(&rec.idempotency_key)
                .bind(&rec.id)
                .fetch_optional(&self.pool)
                .await?;
        existing
            .map(JournalInsert::Existing)
            .ok_or_else(|| DomainError::Unavailable("job journal insert lost a race".into()))
    }

    async fn journal_insert_many(
        &self,
        recs: &[JobRecord],
        pushed: bool,
    ) -> StoreResult<Vec<bool>> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for the whole batch (rows as a JSON array): this sits on the
        // inbound path, where a statement per job was a measurable share of the cost.
        let rows: Vec<serde_json::Value> = recs
            .iter()
            .map(|r| {
                serde_json::json!([
                    r.id,
                    r.kind.as_str(),
                    r.payload.to_string(),
                    r.state.as_str(),
                    r.max_attempts,
                    r.idempotency_key,
                    r.created_at
                ])
            })
            .collect();
        let inserted: std::collections::HashSet<String> = sqlx::query_scalar(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, \
             idempotency_key, created_at, updated_at, run_at, pushed) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, 0, value ->> 4, \
             value ->> 5, value ->> 6, value ->> 6, value ->> 6, $2 FROM json_each($1) WHERE true \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(serde_json::Value::from(rows).to_string())
        .bind(pushed)
        .fetch_all(&self.writer)
        .await?
        .into_iter()
        .collect();
        Ok(recs.iter().map(|r| inserted.contains(&r.id)).collect())
    }

    async fn journal_get(&self, id: &str) -> StoreResult<JobRecord> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("job", id))?;
        job_from_row(&row)
    }

    async fn journal_by_key(&self, key: &str) -> StoreResult<Option<JobRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn journal_list(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE ($1 IS NULL OR state = $1) \
             AND ($2 IS NULL OR kind = $2) ORDER BY created_at DESC, id DESC LIMIT $3"
        ))
        .bind(filter.state.map(JobState::as_str))
        .bind(filter.kind.map(JobKind::as_str))
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn journal_start(&self, rec: &JobRecord) -> StoreResult<Option<JobRecord>> {
        // One autocommit statement in the usual case (the job was journalled when it
        // was queued): this runs once per job, so every round trip counts.
        let start = || {
            sqlx::query(concat!(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = $1 \
                 WHERE id = $2 AND state NOT IN ('done', 'dead') RETURNING ",
                job_columns!()
            ))
            .bind(now_ms())
            .bind(&rec.id)
        };
        if let Some(row) = start().fetch_optional(&self.writer).await? {
            return job_from_row(&row).map(Some);
        }
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(&rec.id)
            .fetch_optional(&self.pool)
            .await?;
        if state.is_some() {
            return Ok(None);
        }
        // Not journalled when it was queued (an inbound message from a connector, a
        // charge from a fan-out on the SQLite queue), or the daemon died in between:
        // create the entry, dated from the job's ULID so a data deletion's cutoff sees
        // when it was queued, with `rec`'s idempotency key (a charge's (account, day)).
        // If another row holds that key, nothing is inserted and the job does not run:
        // that row's job is the one for the key, as an enqueue would have answered.
        let now = now_ms();
        let created = crate::model::job_created_at(&rec.id, now);
        sqlx::query(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, \
             created_at, updated_at, run_at, idempotency_key) \
             VALUES ($1, $2, $3, 'pending', 0, $4, $6, $5, $5, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&rec.id)
        .bind(rec.kind.as_str())
        .bind(rec.payload.to_string())
        .bind(i64::from(rec.max_attempts))
        .bind(now)
        .bind(created)
        .bind(&rec.idempotency_key)
        .execute(&self.writer)
        .await?;
        start()
            .fetch_optional(&self.writer)
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()
    }

    async fn journal_finish(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        run_at: i64,
    ) -> StoreResult<()> {
        // A done inbound job keeps no copy of the message (batch_journal::SCRUBBED_INBOUND).
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET state = $1, last_error = COALESCE($2, last_error), \
             updated_at = $3, run_at = $4, \
             payload = CASE WHEN $1 = 'done' THEN {} ELSE payload END \
             WHERE id = $5 AND state <> 'done'",
            batch_journal::SCRUBBED_INBOUND
        )))
        .bind(state.as_str())
        .bind(error)
        .bind(now_ms())
        .bind(run_at)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn journal_purge(&self, before: i64, limit: u32) -> StoreResult<u64> {
        // Job ids are ULIDs, ordered by creation time: the oldest jobs are a range at the
        // start of the primary key, found on a reader without scanning the retention
        // window, then deleted by id, so the writer is held only for the delete.
        let floor = u64::try_from(before)
            .map(|ms| ulid::Ulid::from_parts(ms, 0).to_string())
            .unwrap_or_default();
        let ids: Vec<String> = sqlx::query_scalar(
            // `+state`: not through the state index, which would walk every done job.
            "SELECT id FROM jobs WHERE id < $1 AND +state = 'done' AND updated_at < $2 LIMIT $3",
        )
        .bind(&floor)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        Ok(sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT value FROM json_each($1)) AND state = 'done'",
        )
        .bind(serde_json::Value::from(ids).to_string())
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    async fn journal_mark_pushed(&self, ids: &[String], pushed: bool) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE jobs SET pushed = $2 \
             WHERE id IN (SELECT value FROM json_each($1)) AND pushed <> $2",
        )
        .bind(serde_json::Value::from(ids).to_string())
        .bind(pushed)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn journal_claim_lost(
        &self,
        now: i64,
        grace_ms: i64,
        stale_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<JobRecord>> {
        // Claimed rows stay unpushed until `App::push` succeeds; the fresh `updated_at`
        // keeps other sweeps off them for the grace, after which a push that never
        // happened (a crash mid-sweep) is claimed again.
        let rows = sqlx::query(concat!(
            "UPDATE jobs SET pushed = FALSE, state = 'pending', run_at = $1, updated_at = $1 \
             WHERE id IN ( \
             SELECT id FROM jobs WHERE state = 'pending' AND NOT pushed AND updated_at < $2 \
             UNION ALL SELECT id FROM jobs WHERE state = 'failed' AND run_at < $2 \
             UNION ALL SELECT id FROM jobs WHERE state = 'pending' AND pushed AND updated_at < $4 \
             LIMIT $3) \
             RETURNING ",
            job_columns!()
        ))
        .bind(now)
        .bind(now.saturating_sub(grace_ms))
        .bind(i64::from(limit))
        .bind(now.saturating_sub(stale_ms))
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn journal_revive(&self, id: &str) -> StoreResult<JobRecord> {
        let now = now_ms();
        // Not pushed until App::push succeeds: a crash in between leaves it to the sweep.
        let row = sqlx::query(concat!(
            "UPDATE jobs SET state = 'pending', attempts = 0, pushed = FALSE, updated_at = $1, \
             run_at = $1 \
             WHERE id = $2 AND state = 'dead' RETURNING ",
            job_columns!()
        ))
        .bind(now)
        .bind(id)
        .fetch_optional(&self.writer)
        .await?;
        match row {
            Some(row) => job_from_row(&row),
            None => {
                let job = self.journal_get(id).await?;
                Err(DomainError::Conflict(format!(
                    "job {id} is {}, only dead jobs can be retried",
                    job.state
                )))
            }
        }
    }

    async fn journal_counts(&self) -> StoreResult<Vec<(JobKind, JobState, i64)>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state ORDER BY kind, state",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(k, s, n)| Ok((JobKind::from_str(&k)?, JobState::from_str(&s)?, n)))
            .collect()
    }

    async fn set_setting(
        &self,
        account: Id,
        setting: &crate::settings::Setting,
    ) -> StoreResult<Settings> {
        use crate::settings::Setting;
        // Only the changed column: rewriting all four from an earlier read would undo a
        // concurrent change of another setting.
        macro_rules! update {
            ($column:literal) => {
                sqlx::query(concat!(
                    "UPDATE accounts SET ",
                    $column,
                    " = $1 WHERE id = $2 RETURNING reset_responsible_on_close, \
                     mark_read_on_open, phone_format, balance_notify_days"
                ))
            };
        }
        let query = match setting {
            Setting::ResetResponsibleOnClose(b) => update!("reset_responsible_on_close").bind(*b),
            Setting::MarkReadOnOpen(b) => update!("mark_read_on_open").bind(*b),
            Setting::PhoneFormat(mask) => update!("phone_format").bind(mask.as_str()),
            Setting::BalanceNotifyDays(days) => update!("balance_notify_days").bind(*days),
        };
        let row = query
            .bind(account)
            .fetch_optional(&self.writer)
            .await?
            .ok_or_else(|| DomainError::not_found("account", account))?;
        Ok(Settings {
            reset_responsible_on_close: row.try_get("reset_responsible_on_close")?,
            mark_read_on_open: row.try_get("mark_read_on_open")?,
            phone_format: row.try_get("phone_format")?,
            balance_notify_days: row.try_get("balance_notify_days")?,
        })
    }

    async fn add_channel(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
    ) -> StoreResult<Channel> {
        self.account(account).await?;
        let row = sqlx::query(concat!(
            "INSERT INTO channels (account_id, kind, name, config, status, created_at) \
             VALUES ($1, $2, $3, $4, 'connecting', $5) RETURNING ",
            channel_columns!()
        ))
        .bind(account)
        .bind(kind)
        .bind(name)
        .bind(config.to_string())
        .bind(now_ms())
        .fetch_one(&self.writer)
        .await?;
        channel_from_row(&row)
    }

    async fn channel(&self, id: Id) -> StoreResult<Channel> {
        let row = sqlx::query(concat!(
            "SELECT ",
            channel_columns!(),
            " FROM channels WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("channel", id))?;
        channel_from_row(&row)
    }

    async fn channels(&self, account: Id) -> StoreResult<Vec<Channel>> {
        self.account(account).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            channel_columns!(),
            " FROM channels WHERE account_id = $1 AND status <> 'removed' ORDER BY id"
        ))
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(channel_from_row).collect()
    }

    async fn runnable_channels(&self) -> StoreResult<Vec<Channel>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            channel_columns!(),
            " FROM channels WHERE status NOT IN ('removed', 'suspended') ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(channel_from_row).collect()
    }

    async fn set_channel_status(
        &self,
        id: Id,
        status: &str,
        reason: Option<&str>,
    ) -> StoreResult<()> {
        if !CHANNEL_STATUSES.contains(&status) {
            return Err(DomainError::InvalidValue(format!(
                "unknown channel status {status:?}"
            )));
        }
        // A removed channel stays removed, and a suspended one suspended until a top-up
        // resumes it, whatever a late connector event or a restart says.
        sqlx::query(
            "UPDATE channels SET status = $1, status_reason = $2, \
             removed_at = CASE WHEN $1 = 'removed' THEN $3 ELSE removed_at END \
             WHERE id = $4 AND status <> 'removed' AND (status <> 'suspended' OR $1 = 'removed')",
        )
        .bind(status)
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn set_channel_identity(
        &self,
        id: Id,
        number: Option<&str>,
        display_name: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE channels SET number = COALESCE($1, number), \
             display_name = COALESCE($2, display_name) WHERE id = $3",
        )
        .bind(number)
        .bind(display_name)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn add_field(
        &self,
        account: Id,
        name: &str,
        field_type: FieldType,
        options: Option<&[String]>,
    ) -> StoreResult<FieldDef> {
        self.account(account).await?;
        let options_json = options.map(|o| serde_json::Value::from(o.to_vec()).to_string());
        let row = sqlx::query(concat!(
            "INSERT INTO field_definitions (account_id, name, name_key, type, options, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
            field_columns!()
        ))
        .bind(account)
        .bind(name)
        .bind(name.to_lowercase())
        .bind(field_type.as_str())
        .bind(options_json)
        .bind(now_ms())
        .fetch_one(&self.writer)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                DomainError::Conflict(format!(
                    "account {account} already has a field named {name:?} (names ignore case)"
                ))
            } else {
                e.into()
            }
        })?;
        field_from_row(&row)
    }

    async fn fields(&self, account: Id) -> StoreResult<Vec<FieldDef>> {
        self.account(account).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            field_columns!(),
            " FROM field_definitions WHERE account_id = $1 ORDER BY id"
        ))
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(field_from_row).collect()
    }

    async fn field(&self, id: Id) -> StoreResult<FieldDef> {
        let row = sqlx::query(concat!(
            "SELECT ",
            field_columns!(),
            " FROM field_definitions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("field", id))?;
        field_from_row(&row)
    }

    async fn remove_field(&self, id: Id) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM field_values WHERE field_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("DELETE FROM field_definitions WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(DomainError::not_found("field", id));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_field_value(
        &self,
        chat: Id,
        field: Id,
        value: &serde_json::Value,
    ) -> StoreResult<()> {
        if value.is_null() {
            sqlx::query("DELETE FROM field_values WHERE chat_id = $1 AND field_id = $2")
                .bind(chat)
                .bind(field)
                .execute(&self.writer)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO field_values (chat_id, field_id, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (chat_id, field_id) DO UPDATE SET value = excluded.value",
            )
            .bind(chat)
            .bind(field)
            .bind(value.to_string())
            .execute(&self.writer)
            .await?;
        }
        Ok(())
    }

    async fn field_values(&self, chat: Id) -> StoreResult<Vec<(Id, serde_json::Value)>> {
        let rows: Vec<(Id, String)> = sqlx::query_as(
            "SELECT field_id, value FROM field_values WHERE chat_id = $1 ORDER BY field_id",
        )
        .bind(chat)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, v)| {
                serde_json::from_str(&v)
                    .map(|v| (id, v))
                    .map_err(|e| DomainError::Unavailable(format!("corrupt field value: {e}")))
            })
            .collect()
    }

    async fn create_chat(&self, channel: &Channel, phone: &str) -> StoreResult<Chat> {
        let mut tx = self.begin_write().await?;
        // After the write lock: see inbound_batch::store_messages.
        let now = now_ms();
        let epoch: i64 = sqlx::query_scalar("SELECT data_epoch FROM accounts WHERE id = $1")
            .bind(channel.account)
            .fetch_one(&mut *tx)
            .await?;
        let sender = inbound_batch::Sender {
            phone: Some(phone),
            id: None,
            username: None,
            name: None,
        };
        let contact =
            inbound_batch::find_or_create_contact(&mut tx, (channel.account, epoch), sender, now)
                .await?;
        let chat = find_or_create_chat(
            &mut tx,
            (channel.id, channel.account),
            epoch,
            phone,
            contact,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(chat)
    }

    async fn chat(&self, id: Id) -> StoreResult<Chat> {
        let row = sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM chats c JOIN accounts a ON a.id = c.account_id \
             WHERE c.id = $1 AND c.epoch = a.data_epoch"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("chat", id))?;
        chat_from_row(&row)
    }

    async fn contact(&self, id: Id) -> StoreResult<Contact> {
        let row = sqlx::query(
            "SELECT id, phone, username, name, email, url, notes FROM contacts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("contact", id))?;
        Ok(Contact {
            id: row.try_get("id")?,
            phone: row.try_get("phone")?,
            username: row.try_get("username")?,
            name: row.try_get("name")?,
            email: row.try_get("email")?,
            url: row.try_get("url")?,
            notes: row.try_get("notes")?,
        })
    }

    async fn chats(&self, account: Id, filter: &ChatFilter) -> StoreResult<Vec<Chat>> {
        self.account(account).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM chats c JOIN accounts a ON a.id = c.account_id \
             WHERE c.account_id = $1 AND c.epoch = a.data_epoch \
             AND ($2 IS NULL OR c.responsible_user_id IS NULL OR c.responsible_user_id = $2) \
             AND ($3 IS NULL OR c.status = $3) \
             ORDER BY COALESCE(c.last_message_at, c.created_at) DESC, c.id DESC LIMIT $4"
        ))
        .bind(account)
        .bind(filter.visible_to_operator)
        .bind(&filter.status)
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(chat_from_row).collect()
    }

    async fn messages(
        &self,
        chat: Id,
        limit: u32,
        before: Option<Id>,
    ) -> StoreResult<Vec<Message>> {
        self.chat(chat).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE chat_id = $1 AND ($2 IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(chat)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn assign_chat(&self, chat: Id, user: Option<Id>) -> StoreResult<Chat> {
        self.chat(chat).await?;
        sqlx::query("UPDATE chats SET responsible_user_id = $1 WHERE id = $2")
            .bind(user)
            .bind(chat)
            .execute(&self.writer)
            .await?;
        self.chat(chat).await
    }

    async fn mark_read(&self, chat: Id) -> StoreResult<Chat> {
        self.chat(chat).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE messages SET status = 'read' WHERE chat_id = $1 AND direction = 'in' \
             AND status = 'received'",
        )
        .bind(chat)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE chats SET unread = 0 WHERE id = $1")
            .bind(chat)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.chat(chat).await
    }

    async fn close_chat(
        &self,
        chat: Id,
        reset_responsible: bool,
        requested_at: Option<i64>,
    ) -> StoreResult<Chat> {
        self.chat(chat).await?;
        sqlx::query(
            // As if the close had run before the client wrote: the responsible is
            // reset (when the setting says so), the chat stays open.
            "UPDATE chats SET status = CASE WHEN $3 IS NOT NULL AND EXISTS (SELECT 1 \
             FROM messages WHERE chat_id = $2 AND direction = 'in' AND created_at > $3) \
             THEN status ELSE 'closed' END, \
             responsible_user_id = CASE WHEN $1 THEN NULL ELSE responsible_user_id END \
             WHERE id = $2",
        )
        .bind(reset_responsible)
        .bind(chat)
        .bind(requested_at)
        .execute(&self.writer)
        .await?;
        self.chat(chat).await
    }

    async fn add_outbound(&self, chat: &Chat, author: Id, text: &str) -> StoreResult<Message> {
        // One statement, so the epoch check and the insert see the same state: a data
        // deletion run started since the caller read the chat makes it `not_found`
        // rather than adding a message after the cutoff to a chat about to be deleted.
        let row = sqlx::query(concat!(
            "INSERT INTO messages (account_id, chat_id, channel_id, direction, author_user_id, \
             text, status, sent_at, created_at) \
             SELECT c.account_id, c.id, c.channel_id, 'out', $2, $3, 'queued', $4, $4 \
             FROM chats c JOIN accounts a ON a.id = c.account_id \
             WHERE c.id = $1 AND c.epoch = a.data_epoch \
             RETURNING ",
            message_columns!()
        ))
        .bind(chat.id)
        .bind(author)
        .bind(text)
        .bind(now_ms())
        .fetch_optional(&self.writer)
        .await?
        .ok_or_else(|| DomainError::not_found("chat", chat.id))?;
        message_from_row(&row)
    }

    async fn message(&self, id: Id) -> StoreResult<Message> {
        let row = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("message", id))?;
        message_from_row(&row)
    }

    async fn set_message_status(
        &self,
        id: Id,
        status: &str,
        reason: Option<&str>,
        external_id: Option<&str>,
    ) -> StoreResult<()> {
        let update = |external_id: Option<&str>| {
            sqlx::query(
                // Never back from delivered/read: a receipt can overtake the send's own
                // update.
                "UPDATE messages SET status = $1, status_reason = $2, \
                 external_message_id = COALESCE(external_message_id, $3) WHERE id = $4 \
                 AND NOT (status IN ('delivered', 'read') AND $1 IN ('queued', 'sent', 'failed')) \
                 AND NOT (status = 'read' AND $1 = 'delivered')",
            )
            .bind(status)
            .bind(reason)
            .bind(external_id.map(str::to_owned))
            .bind(id)
        };
        match update(external_id).execute(&self.writer).await {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                // The messenger reused an id the channel already has: the status still
                // counts (a sent message left `queued` would be sent again).
                tracing::warn!(
                    message = id,
                    external_id,
                    "the connector reported an external message id the channel already has; \
                     the status is recorded without it"
                );
                update(None).execute(&self.writer).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn claim_send(&self, id: Id, until: i64) -> StoreResult<bool> {
        let claimed = sqlx::query(
            "UPDATE messages SET send_lease_until = $2 WHERE id = $1 AND direction = 'out' \
             AND status IN ('queued', 'failed') \
             AND (send_lease_until IS NULL OR send_lease_until <= $3)",
        )
        .bind(id)
        .bind(until)
        .bind(now_ms())
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(claimed == 1)
    }

    async fn release_send(&self, id: Id, until: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE messages SET send_lease_until = NULL \
             WHERE id = $1 AND send_lease_until = $2",
        )
        .bind(id)
        .bind(until)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn fail_unsent(&self, id: Id, reason: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE messages SET status = 'failed', status_reason = $2 \
             WHERE id = $1 AND direction = 'out' AND status = 'queued' \
             AND (send_lease_until IS NULL OR send_lease_until <= $3)",
        )
        .bind(id)
        .bind(reason)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn store_inbound(&self, msg: &InboundMessage, phone: Option<&str>) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let out = inbound_batch::store_messages(&mut tx, &[(msg, phone)], now).await?;
        tx.commit().await?;
        match out.first() {
            Some(inbound_batch::Stored::New) => Ok(true),
            Some(inbound_batch::Stored::Duplicate) => Ok(false),
            _ => Err(DomainError::not_found("channel", msg.channel)),
        }
    }

    async fn run_inbound_batch(&self, jobs: &[InboundJob]) -> StoreResult<Vec<BatchedJob>> {
        inbound_batch::run(self, jobs).await
    }

    async fn start_deletion(&self, account: Id) -> StoreResult<(DeletionRun, bool)> {
        let mut tx = self.begin_write().await?;
        let active = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE account_id = $1 AND state = 'running'"
        ))
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = active {
            return Ok((run_from_row(&row)?, false));
        }
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE accounts SET data_epoch = data_epoch + 1 WHERE id = $1 RETURNING data_epoch",
        )
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| DomainError::not_found("account", account))?;
        let now = now_ms();
        let row = sqlx::query(concat!(
            "INSERT INTO deletion_runs (account_id, cutoff, epoch, state, started_at) \
             VALUES ($1, $2, $3, 'running', $2) RETURNING ",
            run_columns!()
        ))
        .bind(account)
        .bind(now)
        .bind(epoch)
        .fetch_one(&mut *tx)
        .await?;
        let run = run_from_row(&row)?;
        tx.commit().await?;
        Ok((run, true))
    }

    async fn deletion_run(&self, id: Id) -> StoreResult<DeletionRun> {
        let row = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("deletion run", id))?;
        run_from_row(&row)
    }

    async fn latest_deletion(&self, account: Id) -> StoreResult<Option<DeletionRun>> {
        self.account(account).await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE account_id = $1 ORDER BY id DESC LIMIT 1"
        ))
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn running_deletions(&self) -> StoreResult<Vec<DeletionRun>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE state = 'running' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn delete_batch(&self, run: Id, limit: u32) -> StoreResult<BatchOutcome> {
        let run = self.deletion_run(run).await?;
        if run.state != "running" {
            return Ok(BatchOutcome {
                deleted: 0,
                finished: true,
            });
        }
        let limit = i64::from(limit.max(1));
        // Holding the writer's connection keeps every other write out while the batch
        // runs on the niced background connection: nobody races it for SQLite's lock.
        let _writer = self.writer.acquire().await?;
        let mut tx = self.background.begin_with("BEGIN IMMEDIATE").await?;
        // Messages first (the bulk), then what referenced them, then contacts: each
        // step only when the one before is empty, so foreign keys always hold.
        let messages = sqlx::query(
            "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m \
             JOIN chats c ON c.id = m.chat_id \
             WHERE c.account_id = $1 AND c.epoch < $2 LIMIT $3)",
        )
        .bind(run.account)
        .bind(run.epoch)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let mut chats = 0;
        let mut contacts = 0;
        let mut journal = 0;
        if messages == 0 {
            sqlx::query(
                "DELETE FROM field_values WHERE chat_id IN (SELECT id FROM chats \
                 WHERE account_id = $1 AND epoch < $2 LIMIT $3)",
            )
            .bind(run.account)
            .bind(run.epoch)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
            chats = sqlx::query(
                "DELETE FROM chats WHERE id IN (SELECT c.id FROM chats c \
                 WHERE c.account_id = $1 AND c.epoch < $2 \
                 AND NOT EXISTS (SELECT 1 FROM field_values v WHERE v.chat_id = c.id) LIMIT $3)",
            )
            .bind(run.account)
            .bind(run.epoch)
            .bind(limit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if chats == 0 {
                contacts = sqlx::query(
                    "DELETE FROM contacts WHERE id IN (SELECT id FROM contacts \
                     WHERE account_id = $1 AND epoch < $2 LIMIT $3)",
                )
                .bind(run.account)
                .bind(run.epoch)
                .bind(limit)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            if contacts == 0 {
                // Inbound jobs that never stored their message keep its text in the
                // journal (done ones keep none): pre-cutoff ones of the account go too.
                journal = sqlx::query(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                     WHERE state = 'dead' AND kind = 'inbound_message' AND created_at < $2 \
                     AND payload ->> 'channel' IN (SELECT id FROM channels WHERE account_id = $1) \
                     LIMIT $3)",
                )
                .bind(run.account)
                .bind(run.cutoff)
                .bind(limit)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
        }
        let finished = messages == 0 && chats == 0 && contacts == 0 && journal == 0;
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE deletion_runs SET deleted_messages = deleted_messages + $1, \
             deleted_chats = deleted_chats + $2, deleted_contacts = deleted_contacts + $3, \
             state = CASE WHEN $4 THEN 'done' ELSE state END, \
             finished_at = CASE WHEN $4 THEN $5 ELSE finished_at END WHERE id = $6",
        )
        .bind(to_i64(messages))
        .bind(to_i64(chats))
        .bind(to_i64(contacts))
        .bind(finished)
        .bind(now_ms())
        .bind(run.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(BatchOutcome {
            deleted: messages + chats + contacts,
            finished,
        })
    }

    async fn deletion_remaining(&self, run: &DeletionRun) -> StoreResult<i64> {
        let (messages, chats): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id \
             WHERE c.account_id = $1 AND c.epoch < $2), \
             (SELECT COUNT(*) FROM chats WHERE account_id = $1 AND epoch < $2)",
        )
        .bind(run.account)
        .bind(run.epoch)
        .fetch_one(&self.pool)
        .await?;
        let contacts: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM contacts WHERE account_id = $1 AND epoch < $2",
        )
        .bind(run.account)
        .bind(run.epoch)
        .fetch_one(&self.pool)
        .await?;
        Ok(messages + chats + contacts)
    }

    async fn add_channel_charged(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Channel, bool)> {
        let price = prices.price(kind);
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let (balance, notify_days): (i64, i64) =
            sqlx::query_as("SELECT balance, balance_notify_days FROM accounts WHERE id = $1")
                .bind(account)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| DomainError::not_found("account", account))?;
        if balance < price {
            return Err(DomainError::InsufficientFunds(format!(
                "the balance {balance} cannot pay today's price {price} of a {kind} channel; \
                 top the account up first"
            )));
        }
        let row = sqlx::query(concat!(
            "INSERT INTO channels (account_id, kind, name, config, status, created_at) \
             VALUES ($1, $2, $3, $4, 'connecting', $5) RETURNING ",
            channel_columns!()
        ))
        .bind(account)
        .bind(kind)
        .bind(name)
        .bind(config.to_string())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let channel = channel_from_row(&row)?;
        let left = balance.saturating_sub(price);
        let charge = billing::LedgerCharge {
            account,
            channel: channel.id,
            price,
            balance_after: left,
        };
        billing::insert_charges(&mut tx, &[charge], day, now).await?;
        billing::set_balances(&mut tx, &[(account, left)].into_iter().collect()).await?;
        // A charge happened: the warning rules apply as after a daily run.
        let kinds: Vec<String> = sqlx::query_scalar(
            "SELECT kind FROM channels WHERE account_id = $1 \
             AND status NOT IN ('removed', 'suspended')",
        )
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        let total = crate::billing::daily_total(prices, &kinds);
        let notice = billing::Notice::warning(account, left, total, notify_days, day);
        let noticed = billing::record_notices(&mut tx, notice.as_slice(), now).await?;
        tx.commit().await?;
        Ok((channel, !noticed.is_empty()))
    }

    async fn charge_day(
        &self,
        account: Id,
        day: NaiveDate,
        day_start: i64,
        day_end: i64,
        prices: &Prices,
    ) -> StoreResult<Charged> {
        billing::charge_day(self, account, day, day_start, day_end, prices).await
    }

    async fn charge_accounts(
        &self,
        jobs: &[ChargeJob],
        prices: &Prices,
    ) -> StoreResult<Vec<(BatchedJob, Option<Charged>)>> {
        billing::charge_accounts(self, jobs, prices).await
    }

    async fn resume_suspended(
        &self,
        account: Id,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Vec<Channel>, bool)> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let (balance, notify_days, suspended_on): (i64, i64, Option<String>) = sqlx::query_as(
            "SELECT balance, balance_notify_days, suspended_on FROM accounts WHERE id = $1",
        )
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| DomainError::not_found("account", account))?;
        // The unpaid day, or today if later (ISO dates compare as strings).
        let day = suspended_on
            .and_then(|d| d.parse::<NaiveDate>().ok())
            .filter(|d| *d > day)
            .unwrap_or(day);
        let channels: Vec<(Id, String, String, bool)> = sqlx::query_as(
            "SELECT c.id, c.kind, c.status, \
             EXISTS (SELECT 1 FROM ledger l WHERE l.channel_id = c.id AND l.day = $2) \
             FROM channels c WHERE c.account_id = $1 AND c.status <> 'removed' ORDER BY c.id",
        )
        .bind(account)
        .bind(day.to_string())
        .fetch_all(&mut *tx)
        .await?;
        if !channels.iter().any(|c| c.2 == "suspended") {
            return Ok((Vec::new(), false));
        }
        let needed = channels
            .iter()
            .filter(|c| !c.3)
            .fold(0i64, |s, c| s.saturating_add(prices.price(&c.1)));
        if balance < needed {
            return Ok((Vec::new(), false));
        }
        let mut left = balance;
        let charges: Vec<billing::LedgerCharge> = channels
            .iter()
            .filter(|c| !c.3)
            .map(|c| {
                let price = prices.price(&c.1);
                left = left.saturating_sub(price);
                billing::LedgerCharge {
                    account,
                    channel: c.0,
                    price,
                    balance_after: left,
                }
            })
            .collect();
        billing::insert_charges(&mut tx, &charges, day, now).await?;
        billing::set_balances(&mut tx, &[(account, left)].into_iter().collect()).await?;
        sqlx::query("UPDATE accounts SET suspended_on = NULL WHERE id = $1")
            .bind(account)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(concat!(
            "UPDATE channels SET status = 'connecting', status_reason = NULL \
             WHERE account_id = $1 AND status = 'suspended' RETURNING ",
            channel_columns!()
        ))
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        let resumed = rows
            .iter()
            .map(channel_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        let kinds: Vec<String> = channels.into_iter().map(|c| c.1).collect();
        let total = crate::billing::daily_total(prices, &kinds);
        let notice = billing::Notice::warning(account, left, total, notify_days, day);
        let noticed = billing::record_notices(&mut tx, notice.as_slice(), now).await?;
        tx.commit().await?;
        Ok((resumed, !noticed.is_empty()))
    }

    async fn suspended_accounts(&self) -> StoreResult<Vec<Id>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT account_id FROM channels WHERE status = 'suspended' ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn account_ids(&self, after: Id, limit: u32) -> StoreResult<Vec<Id>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn mail_recipients(&self, accounts: &[Id]) -> StoreResult<Vec<(Account, Vec<String>)>> {
        let ids = serde_json::Value::from(accounts.to_vec()).to_string();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM accounts WHERE id IN (SELECT value FROM json_each($1))",
            account_columns!()
        )))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let emails: Vec<(Id, String)> = sqlx::query_as(
            "SELECT account_id, email FROM users WHERE role = 'administrator' \
             AND account_id IN (SELECT value FROM json_each($1)) ORDER BY id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut to: HashMap<Id, Vec<String>> = HashMap::new();
        for (account, email) in emails {
            to.entry(account).or_default().push(email);
        }
        rows.iter()
            .map(|r| {
                let acc = account_from_row(r)?;
                let emails = to.remove(&acc.id).unwrap_or_default();
                Ok((acc, emails))
            })
            .collect()
    }

    async fn claim_notifications(
        &self,
        account: Id,
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Vec<Notification>> {
        billing::claim_notifications(self, account, now, lease_ms).await
    }

    // Each settles only its own claim: a sender whose lease ran out must not undo a
    // claim another sender has taken since.
    async fn release_notification(&self, n: &Notification) -> StoreResult<()> {
        sqlx::query(
            "UPDATE notifications SET claimed_until = NULL WHERE id = $1 AND claimed_until = $2",
        )
        .bind(n.id)
        .bind(n.lease)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn mark_notification_sent(&self, n: &Notification) -> StoreResult<()> {
        sqlx::query(
            "UPDATE notifications SET sent_at = $1, claimed_until = NULL \
             WHERE id = $2 AND claimed_until = $3",
        )
        .bind(now_ms())
        .bind(n.id)
        .bind(n.lease)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn claim_balance_checks(
        &self,
        jobs: &[CheckJob],
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Vec<(BatchedJob, Vec<Notification>)>> {
        billing::claim_balance_checks(self, jobs, now, lease_ms).await
    }

    async fn settle_balance_checks(
        &self,
        sent: &[Notification],
        unsent: &[Notification],
        done: &[String],
    ) -> StoreResult<()> {
        billing::settle_balance_checks(self, sent, unsent, done).await
    }

    async fn accounts_with_unsent_notifications(
        &self,
        before: i64,
        limit: u32,
    ) -> StoreResult<Vec<Id>> {
        // Skips accounts whose balance_check is still queued or retrying, or died since
        // `before`: a relay that refuses every e-mail gets a new job once per grace, not
        // one (dead at once) per sweep.
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT n.account_id FROM notifications n \
             WHERE n.sent_at IS NULL \
             AND n.created_at < $1 AND (n.claimed_until IS NULL OR n.claimed_until < $1) \
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.kind = 'balance_check' \
             AND (j.state IN ('pending', 'running', 'failed') \
                  OR (j.state = 'dead' AND j.updated_at >= $1)) \
             AND j.payload ->> 'account' = n.account_id) LIMIT $2",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn topup_is_applied_once_per_reference() {
        let (_dir, s) = store().await;
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

    #[tokio::test]
    async fn bad_input_changes_nothing() {
        let (_dir, s) = store().await;
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

    /// A rejected job is marked dead without its row being read: a row whose payload
    /// no longer parses cannot make it fail for good; done and dead rows stay.
    #[tokio::test]
    async fn mark_dead_needs_no_readable_row() {
        let (_dir, s) = store().await;
        let job =
            |id: &str| pending_job(id, JobKind::SendMessage, serde_json::json!({"message": 1}));
        s.journal_insert(&job("corrupt")).await.expect("insert");
        sqlx::query("UPDATE jobs SET payload = '[[[not json' WHERE id = 'corrupt'")
            .execute(&s.writer)
            .await
            .expect("corrupt it");
        s.journal_mark_dead(&job("corrupt"), "poison")
            .await
            .expect("mark");
        s.journal_mark_dead(&job("fresh"), "poison")
            .await
            .expect("mark");
        let done = job("done");
        s.journal_insert(&done).await.expect("insert");
        s.journal_finish("done", JobState::Done, None, 2)
            .await
            .expect("finish");
        s.journal_mark_dead(&done, "late").await.expect("mark");
        let states: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT id, state, last_error FROM jobs ORDER BY id")
                .fetch_all(&s.pool)
                .await
                .expect("read");
        assert_eq!(
            states,
            vec![
                ("corrupt".into(), "dead".into(), Some("poison".into())),
                ("done".into(), "done".into(), None),
                ("fresh".into(), "dead".into(), Some("poison".into())),
            ]
        );
    }

    #[tokio::test]
    async fn a_lost_job_is_claimed_until_a_push_is_recorded() {
        let (_dir, s) = store().await;
        let id = ulid::Ulid::from_parts(1, 1).to_string();
        let rec = pending_job(&id, JobKind::SendMessage, serde_json::json!({"message": 1}));
        s.journal_insert_many(&[rec], false).await.expect("insert");
        let (grace, stale) = (1_000, 60_000);
        let claimed = s
            .journal_claim_lost(10_000, grace, stale, 10)
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1, "journalled, never pushed: lost");
        assert!(
            s.journal_claim_lost(10_500, grace, stale, 10)
                .await
                .expect("claim")
                .is_empty(),
            "within the grace another sweep leaves it to the first"
        );
        // The first sweep died before its push: after the grace it is claimed again.
        let again = s
            .journal_claim_lost(12_000, grace, stale, 10)
            .await
            .expect("claim");
        assert_eq!(again.len(), 1, "a claim whose push never happened");
        s.journal_mark_pushed(std::slice::from_ref(&id), true)
            .await
            .expect("pushed");
        assert!(
            s.journal_claim_lost(20_000, grace, stale, 10)
                .await
                .expect("claim")
                .is_empty(),
            "a pushed job is not lost"
        );
        // Queued, and no worker ever started it: the queue lost it (Redis restarted
        // empty). After `stale` it is queued again.
        let requeued = s
            .journal_claim_lost(12_000 + stale + 1, grace, stale, 10)
            .await
            .expect("claim");
        assert_eq!(requeued.len(), 1, "queued long ago and never started");
    }

    #[tokio::test]
    async fn jobs_journalled_as_pushed_are_lost_only_once_stale() {
        let (_dir, s) = store().await;
        let id = ulid::Ulid::from_parts(1, 1).to_string();
        let rec = pending_job(&id, JobKind::InboundMessage, serde_json::json!({"x": 1}));
        s.journal_insert_many(&[rec], true).await.expect("insert");
        let (grace, stale) = (1_000, 60_000);
        assert!(
            s.journal_claim_lost(10_000, grace, stale, 10)
                .await
                .expect("claim")
                .is_empty(),
            "recorded as queued: not lost after the grace"
        );
        let requeued = s
            .journal_claim_lost(1 + stale + 1, grace, stale, 10)
            .await
            .expect("claim");
        assert_eq!(
            requeued.len(),
            1,
            "the push never happened (a crash): stale, queued again"
        );
    }

    #[tokio::test]
    async fn the_journal_keeps_finished_jobs_for_the_retention_only() {
        let (_dir, s) = store().await;
        // Ids are ULIDs: the purge finds old jobs by their creation time in the id.
        let id = |n: u128| ulid::Ulid::from_parts(1, n).to_string();
        let (done_id, dead_id, pending_id) = (id(1), id(2), id(3));
        let rec = |id: &str, kind: JobKind| {
            let payload =
                serde_json::json!({"channel": 1, "external_message_id": "m", "text": "t"});
            pending_job(id, kind, payload)
        };
        let recs = [
            rec(&done_id, JobKind::InboundMessage),
            rec(&dead_id, JobKind::InboundMessage),
            rec(&pending_id, JobKind::SendMessage),
        ];
        s.journal_insert_many(&recs, false).await.expect("insert");
        s.journal_finish(&done_id, JobState::Done, None, 1)
            .await
            .expect("done");
        s.journal_finish(&dead_id, JobState::Dead, Some("x"), 1)
            .await
            .expect("dead");
        let done = s.journal_get(&done_id).await.expect("get");
        assert_eq!(
            done.payload,
            serde_json::json!({"channel": 1, "external_message_id": "m"}),
            "a done inbound job keeps no text"
        );
        assert_eq!(
            s.journal_get(&dead_id).await.expect("get").payload["text"],
            "t"
        );
        assert_eq!(s.journal_purge(0, 10).await.expect("nothing old"), 0);
        assert_eq!(
            s.journal_purge(now_ms() + 1, 10).await.expect("purge"),
            1,
            "only the done job goes"
        );
        assert!(
            s.journal_get(&pending_id).await.is_ok(),
            "unfinished jobs stay"
        );
        assert!(
            s.journal_get(&dead_id).await.is_ok(),
            "dead jobs stay for an operator to retry"
        );
        assert!(matches!(
            s.journal_get(&done_id).await,
            Err(DomainError::NotFound(_))
        ));
        // A finished job cannot be finished again into another state.
        s.journal_finish(&dead_id, JobState::Done, None, 2)
            .await
            .expect("done after dead");
        assert_eq!(
            s.journal_get(&dead_id).await.expect("get").state,
            JobState::Done
        );
        s.journal_finish(&dead_id, JobState::Dead, Some("late"), 3)
            .await
            .expect("no-op");
        assert_eq!(
            s.journal_get(&dead_id).await.expect("get").state,
            JobState::Done,
            "a done job stays done"
        );
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
