//! `Channels` on PostgreSQL: messenger channels' config, status and identity, and the
//! counts the daemon reports. Every write is one statement; a status change is a
//! conditional UPDATE, so its rule (removed stays removed, suspended stays suspended
//! until resumed) is checked on the newest row even when daemons write at once.

use async_trait::async_trait;

use patchbay_jobs::channel_columns;
use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{CHANNEL_STATUSES, Channel, Id, now_ms};
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;

use crate::PgStore;

#[async_trait]
impl Channels for PgStore {
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

    async fn channels_per_kind(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT kind, COUNT(*) FROM channels WHERE status <> 'removed' \
             GROUP BY kind ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn add_channel(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
    ) -> StoreResult<Channel> {
        // The account check and the insert in one statement (accounts are never
        // deleted, so nothing can remove it in between).
        let row = sqlx::query(concat!(
            "INSERT INTO channels (account_id, kind, name, config, status, created_at) \
             SELECT id, $2, $3, $4, 'connecting', $5 FROM accounts WHERE id = $1 RETURNING ",
            channel_columns!()
        ))
        .bind(account)
        .bind(kind)
        .bind(name)
        .bind(config.to_string())
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("account", account))?;
        decode::<Channel, _>(&row)
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
        decode::<Channel, _>(&row)
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
        rows.iter().map(decode::<Channel, _>).collect()
    }

    async fn troubled_channels(&self, limit: u32) -> StoreResult<Vec<Channel>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            channel_columns!(),
            " FROM channels WHERE status NOT IN ('connected', 'removed') ORDER BY id DESC LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::<Channel, _>).collect()
    }

    async fn runnable_channels(&self) -> StoreResult<Vec<Channel>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            channel_columns!(),
            " FROM channels WHERE status NOT IN ('removed', 'suspended') ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::<Channel, _>).collect()
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
        // resumes it, whatever a late connector event or a restart says. One statement:
        // the row lock it takes makes a concurrent suspension (or resume) wait, and the
        // condition is then checked on the row that writer left.
        sqlx::query(
            "UPDATE channels SET status = $1, status_reason = $2, \
             removed_at = CASE WHEN $1 = 'removed' THEN $3 ELSE removed_at END \
             WHERE id = $4 AND status <> 'removed' AND (status <> 'suspended' OR $1 = 'removed')",
        )
        .bind(status)
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
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
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
