//! The benches' own PostgreSQL: a durable cluster of the bench process
//! (`tests/support/pg_cluster.rs`, `PgServer::start_durable`) with the settings in
//! [`SETTINGS`] (plus `BENCH_PG_SETTINGS`), a database per daemon, and the report of
//! where the server's time went (`pg_stat_statements`, `pg_stat_wal`, and with
//! `BENCH_PG_EXPLAIN=<ms>` the `EXPLAIN (ANALYZE, BUFFERS)` plans `auto_explain` logged
//! for the hottest statements).

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row as _};

use super::Res;
use super::pg_cluster::PgServer;

/// What the bench's server runs with besides durability (fsync, full_page_writes and
/// synchronous_commit on). Memory for a host of this size that also runs the daemon;
/// a WAL large enough that checkpoints come from the timer, not from every burst of
/// writes; commit timestamps for the latency clock; the statistics the report reads.
pub const SETTINGS: &[(&str, &str)] = &[
    ("shared_buffers", "1GB"),
    ("effective_cache_size", "8GB"),
    ("work_mem", "16MB"),
    ("maintenance_work_mem", "256MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "5min"),
    ("track_commit_timestamp", "on"),
    ("track_io_timing", "on"),
    ("track_wal_io_timing", "on"),
    (
        "shared_preload_libraries",
        "pg_stat_statements,auto_explain",
    ),
    ("pg_stat_statements.max", "5000"),
    ("log_checkpoints", "on"),
];

/// The role of the bench's own connections (see [`Store::open`](super::Store::open)).
pub const BENCH_ROLE: &str = "bench";

pub struct BenchPg {
    server: PgServer,
    admin: PgPool,
    /// `BENCH_PG_EXPLAIN`: auto_explain logs plans of statements slower than this (ms).
    explain_ms: Option<u64>,
}

impl BenchPg {
    pub async fn start() -> Res<BenchPg> {
        let explain_ms: Option<u64> = std::env::var("BENCH_PG_EXPLAIN")
            .ok()
            .and_then(|v| v.parse().ok());
        let mut settings: Vec<(String, String)> = SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        // BENCH_PG_SETTINGS: more `name=value` settings, comma-separated, for an A/B
        // (e.g. `synchronous_commit=off`); a later setting wins.
        let extra = std::env::var("BENCH_PG_SETTINGS").unwrap_or_default();
        for kv in extra.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("BENCH_PG_SETTINGS: {kv:?} is not name=value"))?;
            settings.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        if let Some(ms) = explain_ms {
            // Instruments every statement (timing per plan node): a diagnostic run, not
            // one whose rates are reported.
            for (k, v) in [
                ("auto_explain.log_min_duration", ms.to_string()),
                ("auto_explain.log_analyze", "on".to_owned()),
                ("auto_explain.log_buffers", "on".to_owned()),
                // Foreign-key checks run as triggers after the plan: their time too.
                ("auto_explain.log_triggers", "on".to_owned()),
            ] {
                settings.push((k.to_owned(), v));
            }
        }
        let shown: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let server = tokio::task::spawn_blocking(move || {
            let settings: Vec<(&str, &str)> = settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            PgServer::start_durable(&settings)
        })
        .await?;
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect(&server.url("postgres"))
            .await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&admin)
            .await?;
        // The daemons connect as `postgres`; the bench's own queries go as BENCH_ROLE,
        // so the report can leave them out.
        sqlx::query(AssertSqlSafe(format!(
            "CREATE ROLE {BENCH_ROLE} SUPERUSER LOGIN"
        )))
        .execute(&admin)
        .await?;
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&admin)
            .await?;
        println!(
            "PostgreSQL {version} of the bench's own (socket {}), durable, with {}{}",
            server.socket_dir().display(),
            shown.join(" "),
            explain_ms.map_or(String::new(), |ms| format!(
                "; auto_explain of statements over {ms} ms (instrumented: diagnostic figures)"
            ))
        );
        Ok(BenchPg {
            server,
            admin,
            explain_ms,
        })
    }

    pub fn url(&self, db: &str) -> String {
        self.server.url(db)
    }

    /// A new database `name` (a copy of `template`, file by file, if given); its URL.
    pub async fn create_database(&self, name: &str, template: Option<&str>) -> Res<String> {
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t} STRATEGY FILE_COPY"),
            None => format!("CREATE DATABASE {name}"),
        };
        sqlx::query(AssertSqlSafe(sql)).execute(&self.admin).await?;
        Ok(self.url(name))
    }

    /// Statements the daemons' role ran in database `db` since the server started (or
    /// the last [`reset_stats`](Self::reset_stats)).
    pub async fn statement_calls(&self, db: &str) -> Res<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(SUM(s.calls), 0)::bigint FROM pg_stat_statements s \
             JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid \
             WHERE d.datname = $1 AND r.rolname = 'postgres'",
        )
        .bind(db)
        .fetch_one(&self.admin)
        .await?)
    }

    /// One integer a query of database `db` answers, as the bench's role (so it is not
    /// counted among the daemons' statements).
    pub async fn count(&self, db: &str, sql: &str) -> Res<i64> {
        use sqlx::ConnectOptions;
        let mut conn = self
            .url(db)
            .parse::<sqlx::postgres::PgConnectOptions>()?
            .username(BENCH_ROLE)
            .connect()
            .await?;
        Ok(sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
            .fetch_one(&mut conn)
            .await?)
    }

    /// The server processes serving connections to `db` now.
    pub async fn backend_pids(&self, db: &str) -> Res<Vec<u32>> {
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
                .bind(db)
                .fetch_all(&self.admin)
                .await?;
        Ok(pids
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .collect())
    }

    pub async fn drop_database(&self, name: &str) -> Res<()> {
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&self.admin)
        .await?;
        Ok(())
    }

    /// Forgets the statement and WAL statistics: the report covers what follows.
    pub async fn reset_stats(&self) -> Res<()> {
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&self.admin)
            .await?;
        sqlx::query("SELECT pg_stat_reset_shared('wal')")
            .execute(&self.admin)
            .await?;
        Ok(())
    }

    /// Prints the `top` statements of database `db` by total execution time since the
    /// last [`reset_stats`](Self::reset_stats), the WAL's writes and syncs, and the
    /// slowest logged plan of the two hottest planned statements (`BENCH_PG_EXPLAIN`).
    pub async fn report(&self, db: &str, label: &str, top: i64) -> Res<()> {
        let rows = sqlx::query(
            "SELECT s.calls, s.total_exec_time, s.mean_exec_time, s.rows, \
             s.shared_blks_hit, s.shared_blks_read, CAST(s.wal_bytes AS float8), s.query, \
             SUM(s.total_exec_time) OVER () \
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
             JOIN pg_roles r ON r.oid = s.userid \
             WHERE d.datname = $1 AND r.rolname = 'postgres' \
             ORDER BY s.total_exec_time DESC LIMIT $2",
        )
        .bind(db)
        .bind(top)
        .fetch_all(&self.admin)
        .await?;
        let all_ms: f64 = rows.first().map_or(0.0, |r| r.get(8));
        println!(
            "  where the time goes on PostgreSQL ({label}): the daemon's top statements by total \
             time, of {:.1} s in all its statements",
            all_ms / 1000.0
        );
        println!(
            "  | total s | share | calls | mean ms | rows | blocks hit / read | WAL MB | statement |"
        );
        println!("  | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
        let mut hot = Vec::new();
        for r in &rows {
            let total: f64 = r.get(1);
            let query: String = r.get(7);
            let query = one_line(&query);
            println!(
                "  | {:.2} | {:.0} % | {} | {:.3} | {} | {} / {} | {:.0} | `{}` |",
                total / 1000.0,
                total / all_ms.max(0.001) * 100.0,
                r.get::<i64, _>(0),
                r.get::<f64, _>(2),
                r.get::<i64, _>(3),
                r.get::<i64, _>(4),
                r.get::<i64, _>(5),
                r.get::<f64, _>(6) / 1e6,
                shorten(&query, 150)
            );
            let utility = ["BEGIN", "COMMIT", "ROLLBACK", "SET", "SHOW"]
                .iter()
                .any(|u| query.starts_with(u));
            if !utility && hot.len() < 2 {
                hot.push(query);
            }
        }
        let wal = sqlx::query(
            "SELECT wal_records, CAST(wal_bytes AS float8), wal_write, wal_sync, \
             wal_write_time, wal_sync_time FROM pg_stat_wal",
        )
        .fetch_one(&self.admin)
        .await?;
        println!(
            "  WAL: {} records, {:.0} MB, {} writes ({:.1} s), {} syncs ({:.1} s)",
            wal.get::<i64, _>(0),
            wal.get::<f64, _>(1) / 1e6,
            wal.get::<i64, _>(2),
            wal.get::<f64, _>(4) / 1000.0,
            wal.get::<i64, _>(3),
            wal.get::<f64, _>(5) / 1000.0
        );
        if self.explain_ms.is_some() {
            let log = self.server.log();
            for q in hot {
                match slowest_plan(&log, &q) {
                    Some(plan) => {
                        println!("  slowest logged plan of `{}`:\n{plan}", shorten(&q, 100))
                    }
                    None => println!("  no plan logged for `{}`", shorten(&q, 100)),
                }
            }
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn shorten(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The auto_explain entry of the server log with the longest duration whose query text
/// is `query` (compared on whitespace-collapsed text), as indented lines without the
/// query text.
fn slowest_plan(log: &str, query: &str) -> Option<String> {
    // An entry starts at a line with the log prefix; its continuation lines start with
    // a tab.
    let mut entries: Vec<Vec<&str>> = Vec::new();
    for line in log.lines() {
        match entries.last_mut() {
            Some(e) if line.starts_with('\t') => e.push(line),
            _ => entries.push(vec![line]),
        }
    }
    let key = shorten(query, 80);
    let key = key.trim_end_matches('…');
    entries
        .iter()
        .filter(|e| e[0].contains("plan:"))
        .filter_map(|e| {
            let ms: f64 = e[0]
                .split("duration: ")
                .nth(1)?
                .split(" ms")
                .next()?
                .parse()
                .ok()?;
            // The query text runs from "Query Text:" to the plan's first node.
            let start = e.iter().position(|l| l.contains("Query Text:"))?;
            let plan = start
                + e[start..]
                    .iter()
                    .position(|l| l.contains("(cost=") || l.contains("(actual"))?;
            let text = one_line(&e[start..plan].join(" ").replacen("Query Text:", "", 1));
            text.starts_with(key).then(|| {
                let lines: Vec<String> = std::iter::once(format!("    duration: {ms} ms"))
                    .chain(
                        e[plan..]
                            .iter()
                            // Long arrays of parameters make long lines.
                            .map(|l| format!("    {}", shorten(l.trim_start_matches('\t'), 200))),
                    )
                    .collect();
                (ms, lines.join("\n"))
            })
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, plan)| plan)
}
