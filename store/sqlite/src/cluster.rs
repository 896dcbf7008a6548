//! `Cluster` on SQLite: the same nodes and channel leases as on PostgreSQL, for
//! daemons sharing one store file on one host (and so one clock: times are this
//! process's `now_ms`). Writes go through the one writer connection, and SQLite's
//! write lock orders them across processes.

use async_trait::async_trait;

use patchbay_jobs::model::{Id, now_ms};
use patchbay_jobs::store::*;

use crate::SqliteStore;

fn ids_json(ids: &[Id]) -> String {
    serde_json::Value::from(ids.to_vec()).to_string()
}

#[async_trait]
impl Cluster for SqliteStore {
    async fn node_heartbeat(&self, node: &NodeInfo<'_>, ttl_ms: i64) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO nodes (id, name, started_at, heartbeat_at, expires_at, max_channels, \
             host, pid) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET \
             heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at, \
             max_channels = excluded.max_channels",
        )
        .bind(node.id)
        .bind(node.name)
        .bind(node.started_at)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .bind(node.max_channels)
        .bind(node.host)
        .bind(node.pid)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn reap_node(&self, id: &str) -> StoreResult<u64> {
        let mut tx = self.begin_write().await?;
        let released =
            sqlx::query("UPDATE channel_leases SET owner = NULL, expires_at = 0 WHERE owner = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn node_leave(&self, id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn live_nodes(&self) -> StoreResult<Vec<NodeRow>> {
        Ok(sqlx::query_as(
            "SELECT n.id, n.name, n.started_at, n.heartbeat_at, n.expires_at, n.max_channels, \
             n.host, n.pid, \
             (SELECT COUNT(*) FROM channel_leases l WHERE l.owner = n.id AND l.expires_at > $1) \
             AS channels FROM nodes n WHERE n.expires_at > $1 ORDER BY n.id",
        )
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn purge_nodes(&self, older_than_ms: i64) -> StoreResult<u64> {
        Ok(sqlx::query("DELETE FROM nodes WHERE expires_at < $1")
            .bind(now_ms().saturating_sub(older_than_ms))
            .execute(&self.writer)
            .await?
            .rows_affected())
    }

    async fn renew_leases(&self, node: &str, ttl_ms: i64) -> StoreResult<Vec<(Id, i64)>> {
        let now = now_ms();
        Ok(sqlx::query_as(
            "UPDATE channel_leases SET expires_at = $2 WHERE owner = $1 AND expires_at > $3 \
             RETURNING channel_id, epoch",
        )
        .bind(node)
        .bind(now.saturating_add(ttl_ms))
        .bind(now)
        .fetch_all(&self.writer)
        .await?)
    }

    async fn acquire_leases(
        &self,
        node: &str,
        channels: &[Id],
        ttl_ms: i64,
    ) -> StoreResult<Vec<(Id, i64)>> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // `WHERE true` tells SQLite's parser the ON CONFLICT belongs to the INSERT.
        Ok(sqlx::query_as(
            "INSERT INTO channel_leases (channel_id, owner, epoch, expires_at) \
             SELECT value, $2, 1, $3 FROM json_each($1) WHERE true \
             ON CONFLICT (channel_id) DO UPDATE SET owner = excluded.owner, \
             epoch = channel_leases.epoch + 1, expires_at = excluded.expires_at \
             WHERE channel_leases.owner IS NULL OR channel_leases.expires_at <= $4 \
             RETURNING channel_id, epoch",
        )
        .bind(ids_json(channels))
        .bind(node)
        .bind(now.saturating_add(ttl_ms))
        .bind(now)
        .fetch_all(&self.writer)
        .await?)
    }

    async fn release_leases(&self, node: &str, channels: Option<&[Id]>) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE channel_leases SET owner = NULL, expires_at = 0 WHERE owner = $1 \
             AND ($2 IS NULL OR channel_id IN (SELECT value FROM json_each($2)))",
        )
        .bind(node)
        .bind(channels.map(ids_json))
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    async fn channel_leases(&self) -> StoreResult<Vec<LeaseRow>> {
        Ok(sqlx::query_as(
            "SELECT l.channel_id AS channel, l.owner, l.epoch, l.expires_at, \
             (l.owner IS NOT NULL AND l.expires_at > $1) AS live \
             FROM channel_leases l JOIN channels c ON c.id = l.channel_id \
             WHERE c.status NOT IN ('removed', 'suspended') ORDER BY l.channel_id",
        )
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn disconnect_unowned(&self, reason: &str) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE channels SET status = 'disconnected', status_reason = $1 \
             WHERE status IN ('connected', 'connecting') AND NOT EXISTS \
             (SELECT 1 FROM channel_leases l WHERE l.channel_id = channels.id \
             AND l.owner IS NOT NULL AND l.expires_at > $2)",
        )
        .bind(reason)
        .bind(now_ms())
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    async fn channel_lease(&self, channel: Id) -> StoreResult<Option<LeaseRow>> {
        Ok(sqlx::query_as(
            "SELECT channel_id AS channel, owner, epoch, expires_at, \
             (owner IS NOT NULL AND expires_at > $2) AS live \
             FROM channel_leases WHERE channel_id = $1",
        )
        .bind(channel)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// Whether `fence` still holds for the channel of message `id` (see `claim_send`).
pub(crate) async fn fence_holds(store: &SqliteStore, id: Id, fence: &Fence) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM messages m JOIN channel_leases l \
         ON l.channel_id = m.channel_id WHERE m.id = $1 AND l.owner = $2 AND l.epoch = $3 \
         AND l.expires_at > $4)",
    )
    .bind(id)
    .bind(&fence.node)
    .bind(fence.epoch)
    .bind(now_ms())
    .fetch_one(&store.writer)
    .await?)
}
