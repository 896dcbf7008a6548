//! `data.delete` and `data.deletion_status`: background deletion of an account's
//! messages, chats and contacts from before a cutoff.

use patchbay_jobs::access;
use patchbay_jobs::model::{DeletionRun, Id};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::control::rpc::RpcError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteParams {
    account: Id,
    actor: Id,
}

/// Starts a run (cutoff = now) or returns the one already running.
pub async fn delete(app: &App, p: DeleteParams) -> Result<Value, RpcError> {
    access::administrator(&*app.store, p.account, p.actor, "delete the account's data").await?;
    let (run, created) = app.store.start_deletion(p.account).await?;
    // Also for a run found running: its job may never have been queued (a crash right
    // after the run was recorded) or may have run out of attempts.
    app.ensure_deletion_job(run.id).await?;
    // No remaining count here: counting pre-cutoff rows waits on the writer lock, and
    // `data.deletion_status` answers it.
    let mut view = view(app, &run, false).await?;
    view["created"] = json!(created);
    Ok(view)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusParams {
    account: Id,
}

pub async fn status(app: &App, p: StatusParams) -> Result<Value, RpcError> {
    match app.store.latest_deletion(p.account).await? {
        Some(run) => view(app, &run, true).await,
        None => Ok(Value::Null),
    }
}

async fn view(app: &App, run: &DeletionRun, count_remaining: bool) -> Result<Value, RpcError> {
    let remaining = match (run.state.as_str(), count_remaining) {
        ("running", true) => json!(app.store.deletion_remaining(run).await?),
        ("running", false) => Value::Null,
        _ => json!(0),
    };
    let job = app
        .store
        .journal_by_key(&patchbay_jobs::kind::data_deletion_key(run.id))
        .await?
        .map(|j| json!({"id": j.id, "state": j.state, "attempts": j.attempts, "last_error": j.last_error}));
    Ok(json!({
        "run": run.id,
        "job": job,
        "account": run.account,
        "cutoff": run.cutoff,
        "state": run.state,
        "deleted": {
            "messages": run.deleted_messages,
            "chats": run.deleted_chats,
            "contacts": run.deleted_contacts,
        },
        "remaining_estimate": remaining,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }))
}
