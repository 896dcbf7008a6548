//! Connecting to PostgreSQL: the pool with per-connection settings (`statement_timeout`,
//! `application_name`), the schema brought up to date first, and errors that name the
//! server by its URL with the password replaced ([`redact_url`]), since they end up in
//! logs and on the terminal.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// The schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Pool and session settings of [`connect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgOptions {
    /// Connections the pool opens at most, per daemon: the server's `max_connections`
    /// must cover this times the number of daemons.
    pub max_connections: u32,
    /// How long opening a connection, or waiting for one from the pool, may take.
    pub connect_timeout: Duration,
    /// The server cancels a statement running longer than this, so a stuck query
    /// fails its job (which is retried) instead of holding a connection for good.
    /// Zero disables it.
    pub statement_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// Why [`connect`] failed. Each message names the server by its redacted URL and says
/// what to check; the underlying error is part of the message (and kept in `cause` for
/// matching), not a `source`, so a `{:#}` chain does not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "{url} is not a valid PostgreSQL URL ({cause}); expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    )]
    InvalidUrl { url: String, cause: sqlx::Error },
    #[error("cannot connect to PostgreSQL at {url}: {cause} ({hint})")]
    Unreachable {
        url: String,
        cause: sqlx::Error,
        hint: &'static str,
    },
    #[error(
        "cannot connect to PostgreSQL at {url}: no answer within {timeout:?} (is the server up and reachable from this host?)"
    )]
    Timeout { url: String, timeout: Duration },
    #[error("cannot bring the PostgreSQL schema at {url} up to date: {cause} ({hint})")]
    Migrate {
        url: String,
        cause: MigrateError,
        hint: &'static str,
    },
}

/// Connects to the PostgreSQL database at `url`, brings its schema up to date and
/// returns the pool.
///
/// Migrations run first, on a connection of their own without `statement_timeout` (a
/// migration may rewrite a large table) and before the pool exists, so a daemon never
/// serves a schema older than its code. sqlx's migrator holds a PostgreSQL advisory
/// lock while it runs: daemons starting at once take turns, and those after the first
/// find nothing left to apply.
pub async fn connect(url: &str, opts: &PgOptions) -> Result<PgPool, ConnectError> {
    let shown = redact_url(url);
    let base = PgConnectOptions::from_str(url).map_err(|cause| ConnectError::InvalidUrl {
        url: shown.clone(),
        cause,
    })?;
    let base = if base.get_application_name().is_none() {
        base.application_name("patchbayd")
    } else {
        base
    };

    // The first connection is made by hand: the pool retries a refused connection
    // until its timeout and then reports only that, and a daemon pointed at a stopped
    // server should say so at once, with the reason.
    let migrating = base.clone().options([("statement_timeout", "0")]);
    let probe = match tokio::time::timeout(opts.connect_timeout, migrating.connect()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(cause)) => return Err(unreachable(&shown, cause)),
        Err(_) => {
            return Err(ConnectError::Timeout {
                url: shown,
                timeout: opts.connect_timeout,
            });
        }
    };
    let _ = probe.close().await;
    // A pool of one for the migrator: `Migrator::run` on a bare connection makes this
    // future "not general enough" to be spawned (sqlx's `Acquire` bound), on a pool not.
    let migrator_pool = pool_options(opts, 1)
        .connect_with(migrating)
        .await
        .map_err(|cause| pool_error(&shown, opts, cause))?;
    let migrated = migrate(&migrator_pool, &shown).await;
    migrator_pool.close().await;
    migrated?;

    let session = base.options([(
        "statement_timeout",
        format!("{}ms", opts.statement_timeout.as_millis()),
    )]);
    let pool = pool_options(opts, opts.max_connections)
        .connect_with(session)
        .await
        .map_err(|cause| pool_error(&shown, opts, cause))?;
    tracing::debug!(url = %shown, "PostgreSQL store connected, schema up to date");
    Ok(pool)
}

fn pool_options(opts: &PgOptions, max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(opts.connect_timeout)
}

fn pool_error(shown: &str, opts: &PgOptions, cause: sqlx::Error) -> ConnectError {
    match cause {
        sqlx::Error::PoolTimedOut => ConnectError::Timeout {
            url: shown.to_owned(),
            timeout: opts.connect_timeout,
        },
        cause => unreachable(shown, cause),
    }
}

async fn migrate(pool: &PgPool, shown: &str) -> Result<(), ConnectError> {
    MIGRATOR.run(pool).await.map_err(|cause| {
        let hint = match &cause {
            MigrateError::VersionMissing(_) => {
                "the database was migrated by a newer patchbayd; run that version or a newer one"
            }
            MigrateError::VersionMismatch(_) => {
                "an applied migration differs from this build's; the database belongs to another build of patchbayd"
            }
            MigrateError::Dirty(_) => {
                "a migration failed half-way earlier; restore the database from a backup"
            }
            _ => "does the role own the database, or may it create tables in its public schema?",
        };
        ConnectError::Migrate {
            url: shown.to_owned(),
            cause,
            hint,
        }
    })
}

fn unreachable(shown: &str, cause: sqlx::Error) -> ConnectError {
    let hint = match cause.as_database_error().and_then(|e| e.code()).as_deref() {
        // invalid_catalog_name
        Some("3D000") => "the database does not exist: create it, e.g. with createdb",
        // invalid_password, invalid_authorization_specification
        Some("28P01" | "28000") => "check the user name and password in store.url",
        // too_many_connections
        Some("53300") => {
            "the server has no connection slot left: raise its max_connections or lower the pool size"
        }
        _ => "is PostgreSQL running and does the database exist?",
    };
    ConnectError::Unreachable {
        url: shown.to_owned(),
        cause,
        hint,
    }
}

/// `url` with its password replaced by `***`, for messages and logs: the password of
/// the userinfo (`postgres://user:secret@host/db`) and a `password=` query parameter.
/// A URL that does not parse is redacted by hand, the same way.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return redact_by_hand(url);
    };
    if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
        return redact_by_hand(url);
    }
    if parsed.query_pairs().any(|(key, _)| key == "password") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if key == "password" {
                    "***".to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.into()
}

/// The userinfo password (between the first `:` and the last `@` of the authority) and
/// every `password=` value (up to `&`, `#` or whitespace, which also covers libpq's
/// `key=value` form) become `***`.
fn redact_by_hand(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let start = scheme_end + 3;
        let authority_end = out[start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| start + i);
        let password = out[start..authority_end].rfind('@').and_then(|at| {
            let colon = out[start..start + at].find(':')?;
            Some(start + colon + 1..start + at)
        });
        if let Some(password) = password {
            out.replace_range(password, "***");
        }
    }
    let mut from = 0;
    while let Some(i) = out[from..].find("password=") {
        let value_start = from + i + "password=".len();
        let value_end = out[value_start..]
            .find(|c: char| c == '&' || c == '#' || c.is_whitespace())
            .map_or(out.len(), |j| value_start + j);
        out.replace_range(value_start..value_end, "***");
        from = value_start + 3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_without_password_is_unchanged() {
        assert_eq!(
            redact_url("postgres://patchbay@db.example.com:5433/patchbay"),
            "postgres://patchbay@db.example.com:5433/patchbay"
        );
        assert_eq!(
            redact_url("postgres://localhost/patchbay"),
            "postgres://localhost/patchbay"
        );
    }

    #[test]
    fn redact_url_replaces_the_password() {
        assert_eq!(
            redact_url("postgres://patchbay:s3cr%40t@db.example.com/patchbay"),
            "postgres://patchbay:***@db.example.com/patchbay"
        );
        assert_eq!(
            redact_url("postgresql://u:p@[::1]:5432/d?sslmode=disable"),
            "postgresql://u:***@[::1]:5432/d?sslmode=disable"
        );
    }

    #[test]
    fn redact_url_keeps_a_socket_query() {
        assert_eq!(
            redact_url("postgres://postgres@localhost/db?host=/run/postgresql&port=5433"),
            "postgres://postgres@localhost/db?host=/run/postgresql&port=5433"
        );
        let shown = redact_url("postgres://postgres:hunter2@localhost/db?host=/tmp/pg&port=5433");
        assert_eq!(
            shown,
            "postgres://postgres:***@localhost/db?host=/tmp/pg&port=5433"
        );
    }

    #[test]
    fn redact_url_replaces_a_password_parameter() {
        let shown = redact_url("postgres://u@h/d?password=hunter2&application_name=x");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password=***"), "{shown}");
        assert!(shown.contains("application_name=x"), "{shown}");
    }

    #[test]
    fn redact_url_redacts_what_does_not_parse() {
        // An empty host with credentials, and an invalid port: not URLs the url crate takes.
        for (url, secret) in [
            ("postgres://u:hunter2@:99999/d", "hunter2"),
            ("postgres://u:hunter2@ho st/d", "hunter2"),
            ("host=/tmp password=hunter2 dbname=d", "hunter2"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.contains("***"), "{url} -> {shown}");
        }
        assert_eq!(
            redact_url("postgres://u:hunter2@ho st/d"),
            "postgres://u:***@ho st/d"
        );
    }

    #[test]
    fn defaults_are_sane() {
        let opts = PgOptions::default();
        assert_eq!(opts.max_connections, 16);
        assert_eq!(opts.connect_timeout, Duration::from_secs(10));
        assert_eq!(opts.statement_timeout, Duration::from_secs(30));
    }
}
