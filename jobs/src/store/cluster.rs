//! The cluster's shared state: the live nodes, one lease per running channel, and the
//! fence a send checks.
//!
//! Times are the store's clock (PostgreSQL's `clock_timestamp()`, SQLite's one host),
//! so nodes on hosts whose clocks disagree still agree on when a lease ends. A node's
//! own safety margin (stopping its instances before its leases end) runs on its
//! monotonic clock, not on these times.

use async_trait::async_trait;
use serde::Serialize;

use super::StoreResult;
use crate::model::Id;

/// One daemon process, as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct NodeRow {
    /// Unique per process: `<node.name>/<ULID of the start>`.
    pub id: String,
    /// `node.name`, for people; two processes may share it.
    pub name: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    /// The heartbeat ends here; a node past it is dead.
    pub expires_at: i64,
    /// `node.max_channels`, when set.
    pub max_channels: Option<i64>,
    /// Channels whose unexpired lease it holds.
    pub channels: i64,
    /// The kernel boot id and PID namespace it runs in, and its pid (see `Leases`).
    pub host: Option<String>,
    pub pid: Option<i64>,
}

/// What a node registers about itself.
#[derive(Clone, Copy, Debug)]
pub struct NodeInfo<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub started_at: i64,
    pub max_channels: Option<i64>,
    pub host: Option<&'a str>,
    pub pid: i64,
}

/// A channel's lease as the store has it (possibly expired, or released: no owner).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct LeaseRow {
    pub channel: Id,
    pub owner: Option<String>,
    /// Grows by one at every new holder; a write carries it so a stale holder's fails.
    pub epoch: i64,
    pub expires_at: i64,
    /// Whether `expires_at` is still ahead on the store's clock.
    pub live: bool,
}

/// What claiming a send found (`Chats::claim_send`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendClaim {
    /// Claimed: the caller may hand the message to the connector.
    Claimed,
    /// Sent since, or another attempt holds its lease: nothing to do.
    Taken,
    /// The fence did not hold: this node no longer runs the channel under that epoch.
    Fenced,
}

/// The holder a write must still be: this node, under this epoch of the channel's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub node: String,
    pub epoch: i64,
}

/// Nodes and channel leases (see ARCHITECTURE.md, "Several daemons").
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Registers the node or renews its heartbeat until now + `ttl_ms`.
    async fn node_heartbeat(&self, node: &NodeInfo<'_>, ttl_ms: i64) -> StoreResult<()>;

    /// A node known to be dead (its process is gone): releases its leases and removes
    /// it, so others take its channels without waiting for the TTL.
    async fn reap_node(&self, id: &str) -> StoreResult<u64>;

    /// Removes the node (a clean stop); its leases must be released first.
    async fn node_leave(&self, id: &str) -> StoreResult<()>;

    /// Nodes whose heartbeat has not expired, with their live lease counts, by id.
    async fn live_nodes(&self) -> StoreResult<Vec<NodeRow>>;

    /// Deletes nodes dead for longer than `older_than_ms` (their history only).
    async fn purge_nodes(&self, older_than_ms: i64) -> StoreResult<u64>;

    /// Extends every unexpired lease `node` holds to now + `ttl_ms`, in one statement;
    /// returns them (channel, epoch). A lease that expired meanwhile is not renewed:
    /// another node may hold it already.
    async fn renew_leases(&self, node: &str, ttl_ms: i64) -> StoreResult<Vec<(Id, i64)>>;

    /// Takes those of `channels` whose lease is missing, expired or released, each
    /// under a new epoch (one more than the last), until now + `ttl_ms`; returns what it
    /// took. Of two nodes taking one channel at once, one gets it.
    async fn acquire_leases(
        &self,
        node: &str,
        channels: &[Id],
        ttl_ms: i64,
    ) -> StoreResult<Vec<(Id, i64)>>;

    /// Gives up `node`'s leases of `channels` (all of them when `None`) at once, so
    /// another node may take them without waiting for the TTL.
    async fn release_leases(&self, node: &str, channels: Option<&[Id]>) -> StoreResult<u64>;

    /// The leases of runnable channels (not removed, not suspended), by channel.
    async fn channel_leases(&self) -> StoreResult<Vec<LeaseRow>>;

    /// Channels that say `connected` or `connecting` but whose lease no live node holds
    /// (its node died or was cut off) become `disconnected` with `reason`: a status
    /// never claims a connection nobody runs. One statement; the count changed.
    async fn disconnect_unowned(&self, reason: &str) -> StoreResult<u64>;

    /// One channel's lease, if it ever had one.
    async fn channel_lease(&self, channel: Id) -> StoreResult<Option<LeaseRow>>;
}
