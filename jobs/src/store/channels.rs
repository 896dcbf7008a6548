//! Messenger channels: their config, status and identity, and the counts the daemon reports.

use async_trait::async_trait;

use super::StoreResult;
use crate::model::{Channel, Id};

/// Messenger channels: their config, status and identity, and the counts the daemon reports.
#[async_trait]
pub trait Channels: Send + Sync {
    /// Kinds of the account's channels that are billed (not removed, not suspended).
    async fn active_channel_kinds(&self, account: Id) -> StoreResult<Vec<String>>;

    /// Number of channels in each status, over all accounts.
    async fn channel_counts(&self) -> StoreResult<Vec<(String, i64)>>;

    /// Number of channels that are not removed, per connector kind, over all accounts.
    async fn channels_per_kind(&self) -> StoreResult<Vec<(String, i64)>>;

    async fn add_channel(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
    ) -> StoreResult<Channel>;

    async fn channel(&self, id: Id) -> StoreResult<Channel>;

    /// The account's channels that are not removed.
    async fn channels(&self, account: Id) -> StoreResult<Vec<Channel>>;

    /// Channels of every account that should be running (not removed, not suspended).
    async fn runnable_channels(&self) -> StoreResult<Vec<Channel>>;

    /// Up to `limit` channels of every account that need an operator's eye: not
    /// connected and not removed (connecting, disconnected, error, suspended), the
    /// most recently created first.
    async fn troubled_channels(&self, limit: u32) -> StoreResult<Vec<Channel>>;

    async fn set_channel_status(
        &self,
        id: Id,
        status: &str,
        reason: Option<&str>,
    ) -> StoreResult<()>;

    async fn set_channel_identity(
        &self,
        id: Id,
        number: Option<&str>,
        display_name: Option<&str>,
    ) -> StoreResult<()>;
}
