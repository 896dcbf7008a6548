//! An account's administrators and operators.

use async_trait::async_trait;
use serde::Deserialize;

use super::StoreResult;
use crate::model::{Id, Role, User};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    pub email: String,
}

/// An account's administrators and operators.
#[async_trait]
pub trait Users: Send + Sync {
    async fn add_user(&self, account: Id, user: &NewUser, role: Role) -> StoreResult<User>;

    async fn user(&self, id: Id) -> StoreResult<User>;
}
