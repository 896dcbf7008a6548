//! `settings.get`, `settings.set`: the account's four general settings.

use patchbay_jobs::model::Id;
use patchbay_jobs::{access, settings};
use serde::Deserialize;
use serde_json::Value;

use super::to_json;
use crate::app::App;
use crate::control::rpc::RpcError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetParams {
    account: Id,
}

pub async fn get(app: &App, p: GetParams) -> Result<Value, RpcError> {
    to_json(&app.store.account(p.account).await?.settings)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetParams {
    account: Id,
    actor: Id,
    key: String,
    value: Value,
}

pub async fn set(app: &App, p: SetParams) -> Result<Value, RpcError> {
    access::administrator(&*app.store, p.account, p.actor, "change settings").await?;
    let setting = settings::parse(&p.key, &p.value)?;
    to_json(&app.store.set_setting(p.account, &setting).await?)
}
