//! `Cluster` on PostgreSQL: nodes, channel leases and the send fence. Every time is
//! the database's clock (`NOW_MS`), never a node's, so hosts whose clocks drift apart
//! still agree on expiry. Each write is one statement; what it locks is said beside it.

use async_trait::async_trait;

use patchbay_jobs::model::Id;
use patchbay_jobs::store::*;

use crate::PgStore;

#[async_trait]
impl Cluster for PgStore {
    async fn node_heartbeat(&self, node: &NodeInfo<'_>, ttl_ms: i64) -> StoreResult<()> {
        // Locks the node's own row only.
        sqlx::query(concat!(
            "INSERT INTO nodes (id, name, started_at, heartbeat_at, expires_at, max_channels, \
             host, pid) VALUES ($1, $2, $3, ",
            now_ms_sql!(),
            ", ",
            now_ms_sql!(),
            " + $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET \
             heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at, \
             max_channels = excluded.max_channels"
        ))
        .bind(node.id)
        .bind(node.name)
        .bind(node.started_at)
        .bind(ttl_ms)
        .bind(node.max_channels)
        .bind(node.host)
        .bind(node.pid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn reap_node(&self, id: &str) -> StoreResult<u64> {
        // Locks the dead node's lease rows and its node row, in one transaction.
        let mut tx = self.pool.begin().await?;
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
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn live_nodes(&self) -> StoreResult<Vec<NodeRow>> {
        Ok(sqlx::query_as(concat!(
            "SELECT n.id, n.name, n.started_at, n.heartbeat_at, n.expires_at, n.max_channels, \
             n.host, n.pid, \
             (SELECT COUNT(*) FROM channel_leases l WHERE l.owner = n.id AND l.expires_at > ",
            now_ms_sql!(),
            ") AS channels FROM nodes n WHERE n.expires_at > ",
            now_ms_sql!(),
            " ORDER BY n.id"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn purge_nodes(&self, older_than_ms: i64) -> StoreResult<u64> {
        Ok(sqlx::query(concat!(
            "DELETE FROM nodes WHERE expires_at < ",
            now_ms_sql!(),
            " - $1"
        ))
        .bind(older_than_ms)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn renew_leases(&self, node: &str, ttl_ms: i64) -> StoreResult<Vec<(Id, i64)>> {
        // Locks the node's own unexpired lease rows; a takeover (below) only touches
        // expired ones, so the two never wait for each other.
        Ok(sqlx::query_as(concat!(
            "UPDATE channel_leases SET expires_at = ",
            now_ms_sql!(),
            " + $2 WHERE owner = $1 AND expires_at > ",
            now_ms_sql!(),
            " RETURNING channel_id, epoch"
        ))
        .bind(node)
        .bind(ttl_ms)
        .fetch_all(&self.pool)
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
        // ON CONFLICT locks the existing row and re-checks the WHERE on its newest
        // version: of two nodes taking one channel, the second sees the first's
        // unexpired lease and takes nothing.
        Ok(sqlx::query_as(concat!(
            "INSERT INTO channel_leases (channel_id, owner, epoch, expires_at) \
             SELECT c, $2, 1, ",
            now_ms_sql!(),
            " + $3 FROM UNNEST($1::bigint[]) AS c \
             ON CONFLICT (channel_id) DO UPDATE SET owner = excluded.owner, \
             epoch = channel_leases.epoch + 1, expires_at = excluded.expires_at \
             WHERE channel_leases.owner IS NULL OR channel_leases.expires_at <= ",
            now_ms_sql!(),
            " RETURNING channel_id, epoch"
        ))
        .bind(channels)
        .bind(node)
        .bind(ttl_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn release_leases(&self, node: &str, channels: Option<&[Id]>) -> StoreResult<u64> {
        // Locks the node's own lease rows; the epoch stays, so the next holder's is new.
        Ok(sqlx::query(
            "UPDATE channel_leases SET owner = NULL, expires_at = 0 \
             WHERE owner = $1 AND ($2::bigint[] IS NULL OR channel_id = ANY($2))",
        )
        .bind(node)
        .bind(channels)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn channel_leases(&self) -> StoreResult<Vec<LeaseRow>> {
        Ok(sqlx::query_as(concat!(
            "SELECT l.channel_id AS channel, l.owner, l.epoch, l.expires_at, \
             (l.owner IS NOT NULL AND l.expires_at > ",
            now_ms_sql!(),
            ") AS live FROM channel_leases l JOIN channels c ON c.id = l.channel_id \
             WHERE c.status NOT IN ('removed', 'suspended') ORDER BY l.channel_id"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn disconnect_unowned(&self, reason: &str) -> StoreResult<u64> {
        // Locks the channel rows it changes; a lease taken meanwhile keeps its channel
        // out (the NOT EXISTS reads the newest committed lease).
        Ok(sqlx::query(concat!(
            "UPDATE channels SET status = 'disconnected', status_reason = $1 \
             WHERE status IN ('connected', 'connecting') AND NOT EXISTS \
             (SELECT 1 FROM channel_leases l WHERE l.channel_id = channels.id \
             AND l.owner IS NOT NULL AND l.expires_at > ",
            now_ms_sql!(),
            ")"
        ))
        .bind(reason)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn channel_lease(&self, channel: Id) -> StoreResult<Option<LeaseRow>> {
        Ok(sqlx::query_as(concat!(
            "SELECT channel_id AS channel, owner, epoch, expires_at, \
             (owner IS NOT NULL AND expires_at > ",
            now_ms_sql!(),
            ") AS live FROM channel_leases WHERE channel_id = $1"
        ))
        .bind(channel)
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// Whether `fence` still holds for the channel of message `id` (no lock).
pub(crate) async fn fence_holds(store: &PgStore, id: Id, fence: &Fence) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT EXISTS (SELECT 1 FROM messages m JOIN channel_leases l \
         ON l.channel_id = m.channel_id WHERE m.id = $1 AND l.owner = $2 AND l.epoch = $3 \
         AND l.expires_at > ",
        now_ms_sql!(),
        ")"
    ))
    .bind(id)
    .bind(&fence.node)
    .bind(fence.epoch)
    .fetch_one(&store.pool)
    .await?)
}
