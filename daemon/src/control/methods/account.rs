//! `account.create`, `account.get`, `account.topup`, `account.ledger`.

use patchbay_jobs::model::Id;
use patchbay_jobs::store::NewAccount;
use serde::Deserialize;
use serde_json::{Value, json};

use super::to_json;
use crate::app::App;
use crate::control::rpc::RpcError;

pub async fn create(app: &App, p: NewAccountParams) -> Result<Value, RpcError> {
    let (account, admin) = app.store.create_account(&p.0).await?;
    let view = app.account_view(account).await?;
    Ok(json!({ "account": view, "admin": to_json(&admin)? }))
}

#[derive(Deserialize)]
#[serde(transparent)]
pub struct NewAccountParams(NewAccount);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountParams {
    account: Id,
}

pub async fn get(app: &App, p: AccountParams) -> Result<Value, RpcError> {
    let account = app.store.account(p.account).await?;
    Ok(app.account_view(account).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopupParams {
    account: Id,
    amount: i64,
    reference: String,
}

pub async fn topup(app: &App, p: TopupParams) -> Result<Value, RpcError> {
    let entry = app.store.topup(p.account, p.amount, &p.reference).await?;
    let resumed = app.resume(p.account).await?;
    let mut v = to_json(&entry)?;
    v["resumed_channels"] = json!(resumed);
    Ok(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerParams {
    account: Id,
    #[serde(default = "default_limit")]
    limit: u32,
}

fn default_limit() -> u32 {
    100
}

pub async fn ledger(app: &App, p: LedgerParams) -> Result<Value, RpcError> {
    to_json(&app.store.ledger(p.account, p.limit.min(10_000)).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingRunParams {
    date: Option<chrono::NaiveDate>,
}

/// Queues the billing run of a day (default today): for operators catching up after
/// downtime, within `billing.catch_up_days` and never after today (`invalid_value`). A
/// day already run is not run again (its idempotency key exists).
pub async fn billing_run(app: &App, p: BillingRunParams) -> Result<Value, RpcError> {
    let date = p.date.unwrap_or_else(|| app.today());
    let (id, existing) = app
        .enqueue_requested(patchbay_jobs::JobKind::BillingRun, json!({ "date": date }))
        .await?;
    Ok(json!({ "job": id, "date": date, "existing": existing }))
}
