//! `field.add`, `field.list`, `field.remove`: additional fields of the chat card.

use patchbay_jobs::fields::{self, FieldType};
use patchbay_jobs::model::Id;
use patchbay_jobs::{DomainError, access};
use serde::Deserialize;
use serde_json::{Value, json};

use super::to_json;
use crate::app::App;
use crate::control::rpc::RpcError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddParams {
    account: Id,
    actor: Id,
    name: String,
    #[serde(rename = "type")]
    field_type: String,
    options: Option<Vec<String>>,
}

pub async fn add(app: &App, p: AddParams) -> Result<Value, RpcError> {
    access::administrator(&*app.store, p.account, p.actor, "add fields").await?;
    let field_type: FieldType = p.field_type.parse()?;
    let (name, options) = fields::check_definition(&p.name, field_type, p.options.as_deref())?;
    to_json(
        &app.store
            .add_field(p.account, &name, field_type, options.as_deref())
            .await?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    account: Id,
}

pub async fn list(app: &App, p: ListParams) -> Result<Value, RpcError> {
    to_json(&app.store.fields(p.account).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    account: Id,
    actor: Id,
    field: Id,
}

pub async fn remove(app: &App, p: RemoveParams) -> Result<Value, RpcError> {
    access::administrator(&*app.store, p.account, p.actor, "remove fields").await?;
    let field = app.store.field(p.field).await?;
    if field.account != p.account {
        return Err(DomainError::not_found("field", p.field).into());
    }
    app.store.remove_field(field.id).await?;
    Ok(json!({ "removed": field.id }))
}
