//! `patchbayd store copy`: moves a SQLite store to PostgreSQL, the move a growing user
//! makes when one host is no longer enough.
//!
//! Both stores are brought to their latest schema first (as a daemon's start would).
//! Every table is then copied in foreign-key order, in primary-key order and batches,
//! from one read transaction on the SQLite file (a consistent snapshot, even should
//! something write to it meanwhile) into PostgreSQL, one transaction per batch. The
//! columns are the PostgreSQL table's, read from its catalogue, so the copy follows the
//! schemas without a list of its own. At the end the identity sequences are moved past
//! the copied ids, and the copy is verified: row counts of every table, and every
//! account's balance and ledger sum, must match. A source with a row referring to a row
//! that does not exist is refused before any row is copied.
//!
//! A target with data is refused unless `--resume` (each table continues after the
//! last key the target holds: batches commit in key order, so an interrupted copy
//! resumes where it stopped — valid only while no daemon has used the SQLite store in
//! between, since rows changed since are not copied again) or `--replace` (the
//! target's tables are emptied first).

use std::path::Path;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::{PgPool, Row};

use patchbay_store_postgres::{PgOptions, PgStore, redact_url};
use patchbay_store_sqlite::SqliteStore;

/// The tables, parents before children, each with its primary key.
const TABLES: &[(&str, &[&str])] = &[
    ("accounts", &["id"]),
    ("users", &["id"]),
    ("channels", &["id"]),
    ("contacts", &["id"]),
    ("chats", &["id"]),
    ("messages", &["id"]),
    ("field_definitions", &["id"]),
    ("field_values", &["chat_id", "field_id"]),
    ("ledger", &["id"]),
    ("notifications", &["id"]),
    ("deletion_runs", &["id"]),
    ("jobs", &["id"]),
];

/// The cluster's state (nodes, channel leases): never copied, since it belongs to the
/// daemons running on a store, but emptied with the rest on `--replace`.
const RUNTIME_TABLES: &[&str] = &["channel_leases", "nodes"];

/// What to do with a target that holds data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    Refuse,
    Resume,
    Replace,
}

#[derive(Clone, Debug)]
pub struct CopyOptions {
    pub existing: Existing,
    /// Rows per batch (one PostgreSQL transaction each).
    pub batch: u32,
    pub progress: bool,
}

/// What a copy did, for the summary line.
#[derive(Clone, Debug, Default)]
pub struct CopyReport {
    pub rows: u64,
    pub tables: Vec<(String, u64)>,
    pub seconds: f64,
}

/// A column's PostgreSQL type, which decides how the value crosses over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ColumnType {
    BigInt,
    Text,
    Bool,
}

impl ColumnType {
    fn array(self) -> &'static str {
        match self {
            ColumnType::BigInt => "BIGINT[]",
            ColumnType::Text => "TEXT[]",
            ColumnType::Bool => "BOOLEAN[]",
        }
    }
}

/// One batch's values, column by column (PostgreSQL takes each as an array).
enum Column {
    BigInt(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Bool(Vec<Option<bool>>),
}

/// Copies the SQLite store at `from` (`sqlite://PATH`) to the PostgreSQL database `to`.
pub async fn run(from: &str, to: &str, opts: &CopyOptions) -> anyhow::Result<CopyReport> {
    let started = std::time::Instant::now();
    let Some(path) = from.strip_prefix("sqlite://").filter(|p| !p.is_empty()) else {
        bail!(
            "--from must be sqlite://PATH (the store to move), not {}",
            redact_url(from)
        );
    };
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        bail!(
            "--to must be postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE, not {}",
            redact_url(to)
        );
    }
    let path = Path::new(path);
    if !path.exists() {
        bail!(
            "there is no SQLite store at {} (check --from)",
            path.display()
        );
    }
    let source = SqliteStore::open(path)
        .await
        .with_context(|| format!("cannot open the SQLite store {}", path.display()))?;
    let target = PgStore::connect(
        to,
        &PgOptions {
            max_connections: 2,
            // The final counts of a large store may take longer than a daemon's limit.
            statement_timeout: std::time::Duration::ZERO,
            ..PgOptions::default()
        },
    )
    .await?;
    let (src, dst) = (source.pool(), target.pool());

    let mut holding = Vec::new();
    for (table, _) in TABLES {
        if has_rows(dst, table).await? {
            holding.push(*table);
        }
    }
    if opts.existing == Existing::Refuse && !holding.is_empty() {
        bail!(
            "the target {} already holds data (tables: {}); give --resume to continue an \
             interrupted copy, or --replace to empty it and copy from scratch",
            redact_url(to),
            holding.join(", ")
        );
    }

    // One read transaction: every table is read from the same snapshot, the check of
    // its references included, which comes before anything in the target changes.
    let mut snapshot = src.begin().await.context("cannot read the SQLite store")?;
    if opts.progress {
        eprintln!("checking the references of {} …", path.display());
    }
    check_references(&mut snapshot, path).await?;
    if opts.existing == Existing::Replace && !holding.is_empty() {
        let mut all: Vec<&str> = TABLES.iter().map(|(t, _)| *t).collect();
        all.extend(RUNTIME_TABLES);
        let sql = format!("TRUNCATE {} RESTART IDENTITY", all.join(", "));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(dst)
            .await
            .context("cannot empty the target")?;
    }

    let mut total = 0u64;
    for (table, _) in TABLES {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&mut *snapshot)
                .await?;
        total += n as u64;
    }
    let bar = if opts.progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:18} [{bar:40}] {pos}/{len} rows, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut report = CopyReport::default();
    for (table, key) in TABLES {
        bar.set_message(*table);
        let columns = target_columns(dst, table).await?;
        let copied = copy_table(&mut snapshot, dst, table, key, &columns, opts, &bar)
            .await
            .with_context(|| format!("cannot copy table {table}"))?;
        report.tables.push((table.to_string(), copied));
        report.rows += copied;
    }
    bar.finish_and_clear();
    move_sequences(dst).await?;
    verify(&mut snapshot, dst).await?;
    snapshot.rollback().await.ok();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn has_rows(pool: &PgPool, table: &str) -> anyhow::Result<bool> {
    let sql = format!("SELECT EXISTS (SELECT 1 FROM {table})");
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await?)
}

/// The target table's columns in order, with the type each is copied as.
async fn target_columns(pool: &PgPool, table: &str) -> anyhow::Result<Vec<(String, ColumnType)>> {
    let rows = sqlx::query(
        "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let name: String = r.try_get(0)?;
        let data_type: String = r.try_get(1)?;
        let t = match data_type.as_str() {
            "bigint" => ColumnType::BigInt,
            "text" => ColumnType::Text,
            "boolean" => ColumnType::Bool,
            other => bail!("column {table}.{name} has type {other}, which the copy does not know"),
        };
        out.push((name, t));
    }
    if out.is_empty() {
        bail!("the target has no table {table}: is its schema patchbay's?");
    }
    Ok(out)
}

/// Copies one table after the target's last key (all of it into an empty table).
async fn copy_table(
    snapshot: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    dst: &PgPool,
    table: &str,
    key: &[&str],
    columns: &[(String, ColumnType)],
    opts: &CopyOptions,
    bar: &ProgressBar,
) -> anyhow::Result<u64> {
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    let key_list = key.join(", ");
    // Where the target stands: resume after its greatest key.
    let descending: Vec<String> = key.iter().map(|k| format!("{k} DESC")).collect();
    let last_sql = format!(
        "SELECT {key_list} FROM {table} ORDER BY {} LIMIT 1",
        descending.join(", ")
    );
    let mut after: Option<Vec<KeyValue>> = sqlx::query(sqlx::AssertSqlSafe(last_sql))
        .fetch_optional(dst)
        .await?
        .map(|r| read_key(&r, key, columns))
        .transpose()?;
    if let Some(k) = &after {
        let skipped = count_upto(snapshot, table, key, k).await?;
        bar.inc(skipped);
    }
    let placeholders: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, t))| format!("${}::{}", i + 1, t.array()))
        .collect();
    let insert = format!(
        "INSERT INTO {table} ({}) SELECT * FROM UNNEST({})",
        names.join(", "),
        placeholders.join(", ")
    );
    let mut copied = 0u64;
    loop {
        let (cond, binds) = match &after {
            None => (String::new(), Vec::new()),
            Some(k) => {
                let marks: Vec<String> = (1..=k.len()).map(|i| format!("${i}")).collect();
                (
                    format!("WHERE ({key_list}) > ({})", marks.join(", ")),
                    k.clone(),
                )
            }
        };
        let select = format!(
            "SELECT {} FROM {table} {cond} ORDER BY {key_list} LIMIT {}",
            names.join(", "),
            opts.batch
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(select));
        for b in binds {
            q = match b {
                KeyValue::Int(v) => q.bind(v),
                KeyValue::Text(v) => q.bind(v),
            };
        }
        let rows = q.fetch_all(&mut **snapshot).await?;
        if rows.is_empty() {
            return Ok(copied);
        }
        let mut cols: Vec<Column> = columns
            .iter()
            .map(|(_, t)| match t {
                ColumnType::BigInt => Column::BigInt(Vec::with_capacity(rows.len())),
                ColumnType::Text => Column::Text(Vec::with_capacity(rows.len())),
                ColumnType::Bool => Column::Bool(Vec::with_capacity(rows.len())),
            })
            .collect();
        for r in &rows {
            for (i, col) in cols.iter_mut().enumerate() {
                match col {
                    Column::BigInt(v) => v.push(r.try_get(i)?),
                    // PostgreSQL TEXT cannot hold NUL, which SQLite keeps: the same
                    // replacement the PostgreSQL store makes on its inbound path.
                    Column::Text(v) => v.push(r.try_get::<Option<String>, _>(i)?.map(|t| {
                        if t.contains('\0') {
                            t.replace('\0', "\u{FFFD}")
                        } else {
                            t
                        }
                    })),
                    Column::Bool(v) => v.push(r.try_get(i)?),
                }
            }
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(insert.clone()));
        for col in cols {
            q = match col {
                Column::BigInt(v) => q.bind(v),
                Column::Text(v) => q.bind(v),
                Column::Bool(v) => q.bind(v),
            };
        }
        q.execute(dst).await?;
        let last = rows.last().map(|r| read_key(r, key, columns)).transpose()?;
        after = last;
        copied += rows.len() as u64;
        bar.inc(rows.len() as u64);
    }
}

#[derive(Clone, Debug)]
enum KeyValue {
    Int(i64),
    Text(String),
}

fn key_type(columns: &[(String, ColumnType)], name: &str) -> anyhow::Result<ColumnType> {
    columns
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| *t)
        .with_context(|| format!("key column {name} is missing"))
}

/// The key columns of a row of either database.
fn read_key<'r, R>(
    r: &'r R,
    key: &[&str],
    columns: &[(String, ColumnType)],
) -> anyhow::Result<Vec<KeyValue>>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    key.iter()
        .map(|k| {
            Ok(match key_type(columns, k)? {
                ColumnType::Text => KeyValue::Text(r.try_get(*k)?),
                _ => KeyValue::Int(r.try_get(*k)?),
            })
        })
        .collect()
}

/// Rows of the source up to and including `key` (already in the target on resume).
async fn count_upto(
    snapshot: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    table: &str,
    key: &[&str],
    at: &[KeyValue],
) -> anyhow::Result<u64> {
    let marks: Vec<String> = (1..=at.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT COUNT(*) FROM {table} WHERE ({}) <= ({})",
        key.join(", "),
        marks.join(", ")
    );
    let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
    for v in at {
        q = match v {
            KeyValue::Int(v) => q.bind(*v),
            KeyValue::Text(v) => q.bind(v.clone()),
        };
    }
    Ok(q.fetch_one(&mut **snapshot).await? as u64)
}

/// Identity columns continue after the copied ids, so new rows never collide.
async fn move_sequences(dst: &PgPool) -> anyhow::Result<()> {
    for (table, key) in TABLES {
        if *key != ["id"] || *table == "jobs" {
            continue;
        }
        let sql = format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
             COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(dst)
            .await
            .with_context(|| format!("cannot move the id sequence of {table}"))?;
    }
    Ok(())
}

/// Refuses a source with a row whose reference points at no row. PostgreSQL would not
/// catch all of them on the way in: its ledger and messages keep no foreign keys to
/// accounts and channels (migrations `0004`, `0005`). The daemon writes SQLite with
/// its foreign keys on, so only a file edited by hand (or written with them off) fails.
async fn check_references(
    snapshot: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    path: &Path,
) -> anyhow::Result<()> {
    let broken: Option<(String, Option<i64>, String)> =
        sqlx::query_as("SELECT \"table\", rowid, parent FROM pragma_foreign_key_check LIMIT 1")
            .fetch_optional(&mut **snapshot)
            .await
            .context("cannot check the SQLite store's references")?;
    if let Some((table, row, parent)) = broken {
        let row = row.map_or_else(
            || format!("a row of {table}"),
            |r| format!("{table} row {r}"),
        );
        bail!(
            "the SQLite store {} has rows referring to rows that do not exist (first: {row}, \
             referring to {parent}); `sqlite3 '{}' 'PRAGMA foreign_key_check'` lists them \
             all. Repair or delete them, then copy again: the target was not changed",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// Row counts of every table, and each account's balance and ledger sum, agree.
async fn verify(
    snapshot: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    dst: &PgPool,
) -> anyhow::Result<()> {
    for (table, _) in TABLES {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        let a: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_one(&mut **snapshot)
            .await?;
        let b: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(dst)
            .await?;
        if a != b {
            bail!("verification failed: {table} has {a} rows in the source and {b} in the target");
        }
    }
    let balances = "SELECT a.id, a.balance, \
                    (SELECT COALESCE(SUM(l.amount), 0) FROM ledger l WHERE l.account_id = a.id) \
                    FROM accounts a ORDER BY a.id";
    let src: Vec<(i64, i64, i64)> = sqlx::query_as(balances).fetch_all(&mut **snapshot).await?;
    let pg = "SELECT a.id, a.balance, \
              (SELECT COALESCE(SUM(l.amount), 0)::BIGINT FROM ledger l WHERE l.account_id = a.id) \
              FROM accounts a ORDER BY a.id";
    let dst: Vec<(i64, i64, i64)> = sqlx::query_as(pg).fetch_all(dst).await?;
    if src != dst {
        let first = src
            .iter()
            .zip(&dst)
            .find(|(a, b)| a != b)
            .map(|(a, _)| a.0)
            .unwrap_or_default();
        bail!("verification failed: balances differ (first at account {first})");
    }
    Ok(())
}
