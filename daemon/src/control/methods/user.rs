//! `user.add`: a user of an account, administrator or operator.

use patchbay_jobs::model::{Id, Role};
use patchbay_jobs::store::NewUser;
use serde::Deserialize;
use serde_json::Value;

use super::to_json;
use crate::app::App;
use crate::control::rpc::RpcError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddParams {
    account: Id,
    name: String,
    email: String,
    role: String,
}

pub async fn add(app: &App, p: AddParams) -> Result<Value, RpcError> {
    let role: Role = p.role.parse()?;
    let user = app
        .store
        .add_user(
            p.account,
            &NewUser {
                name: p.name,
                email: p.email,
            },
            role,
        )
        .await?;
    to_json(&user)
}
