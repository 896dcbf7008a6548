//! `job.enqueue`, `job.get`, `job.list`, `job.retry`: the queue as operators see it,
//! read from the job journal so both queue backends answer alike.

use patchbay_connector_sdk::json_limits::{MAX_JSON_DEPTH, value_depth};
use patchbay_jobs::model::JobState;
use patchbay_jobs::store::JobFilter;
use patchbay_jobs::{DomainError, JobKind};
use serde::Deserialize;
use serde_json::{Value, json};

use super::to_json;
use crate::app::App;
use crate::control::rpc::RpcError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueParams {
    kind: String,
    payload: Value,
}

pub async fn enqueue(app: &App, p: EnqueueParams) -> Result<Value, RpcError> {
    let kind: JobKind = p.kind.parse()?;
    // The queue's envelope and the journal wrap the payload in levels of their own: a
    // deeper one could be stored as a job no worker can decode.
    if value_depth(&p.payload) > MAX_JSON_DEPTH {
        return Err(DomainError::InvalidValue(format!(
            "payload is nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
        ))
        .into());
    }
    // The rules of the matching methods too: billing.run's dates, account.topup's
    // bounds (in the payload's validation).
    let (id, existing) = app.enqueue_requested(kind, p.payload).await?;
    Ok(json!({ "id": id, "existing": existing }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdParams {
    id: String,
}

pub async fn get(app: &App, p: IdParams) -> Result<Value, RpcError> {
    to_json(&app.store.journal_get(&p.id).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    state: Option<String>,
    kind: Option<String>,
    limit: Option<u32>,
    /// Jobs to skip, newest first: `limit` and `offset` page through the list.
    offset: Option<u32>,
}

pub async fn list(app: &App, p: ListParams) -> Result<Value, RpcError> {
    let filter = JobFilter {
        state: p.state.as_deref().map(str::parse::<JobState>).transpose()?,
        kind: p.kind.as_deref().map(str::parse::<JobKind>).transpose()?,
        limit: p.limit.unwrap_or(100).min(10_000),
        offset: p.offset.unwrap_or(0),
    };
    to_json(&app.store.journal_list(&filter).await?)
}

pub async fn retry(app: &App, p: IdParams) -> Result<Value, RpcError> {
    let job = app.retry(&p.id).await?;
    to_json(&job)
}
