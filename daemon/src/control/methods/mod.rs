//! The control methods of SPEC §3, one file per group, and the table that routes a
//! method name to its handler.
//!
//! Each handler takes typed params (unknown or missing fields are -32602, named) and
//! returns JSON; domain errors become -32000 with `data.kind`.

mod account;
mod channel;
mod chat;
mod data;
mod field;
mod job;
mod settings;
mod status;
mod user;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::app::App;
use crate::control::rpc::{METHOD_NOT_FOUND, RpcError};

pub const METHODS: &[&str] = &[
    "status",
    "account.create",
    "account.get",
    "account.topup",
    "account.ledger",
    "user.add",
    "job.enqueue",
    "job.get",
    "job.list",
    "job.retry",
    "node.list",
    "plugin.list",
    "channel.add",
    "channel.remove",
    "channel.list",
    "settings.get",
    "settings.set",
    "field.add",
    "field.list",
    "field.remove",
    "chat.create",
    "chat.list",
    "chat.get",
    "chat.messages",
    "chat.assign",
    "chat.open",
    "chat.close",
    "chat.set_field",
    "message.send",
    "billing.run",
    "data.delete",
    "data.deletion_status",
];

pub async fn call(app: &App, method: &str, params: Value) -> Result<Value, RpcError> {
    match method {
        "status" => status::status(app, parse(method, params)?).await,
        "account.create" => account::create(app, parse(method, params)?).await,
        "account.get" => account::get(app, parse(method, params)?).await,
        "account.topup" => account::topup(app, parse(method, params)?).await,
        "account.ledger" => account::ledger(app, parse(method, params)?).await,
        "user.add" => user::add(app, parse(method, params)?).await,
        "job.enqueue" => job::enqueue(app, parse(method, params)?).await,
        "job.get" => job::get(app, parse(method, params)?).await,
        "job.list" => job::list(app, parse(method, params)?).await,
        "job.retry" => job::retry(app, parse(method, params)?).await,
        "node.list" => status::nodes(app, parse(method, params)?).await,
        "plugin.list" => channel::plugins(app, parse(method, params)?).await,
        "channel.add" => channel::add(app, parse(method, params)?).await,
        "channel.remove" => channel::remove(app, parse(method, params)?).await,
        "channel.list" => channel::list(app, parse(method, params)?).await,
        "settings.get" => settings::get(app, parse(method, params)?).await,
        "settings.set" => settings::set(app, parse(method, params)?).await,
        "field.add" => field::add(app, parse(method, params)?).await,
        "field.list" => field::list(app, parse(method, params)?).await,
        "field.remove" => field::remove(app, parse(method, params)?).await,
        "chat.create" => chat::create(app, parse(method, params)?).await,
        "chat.list" => chat::list(app, parse(method, params)?).await,
        "chat.get" => chat::get(app, parse(method, params)?).await,
        "chat.messages" => chat::messages(app, parse(method, params)?).await,
        "chat.assign" => chat::assign(app, parse(method, params)?).await,
        "chat.open" => chat::open(app, parse(method, params)?).await,
        "chat.close" => chat::close(app, parse(method, params)?).await,
        "chat.set_field" => chat::set_field(app, parse(method, params)?).await,
        "message.send" => chat::send(app, parse(method, params)?).await,
        "billing.run" => account::billing_run(app, parse(method, params)?).await,
        "data.delete" => data::delete(app, parse(method, params)?).await,
        "data.deletion_status" => data::status(app, parse(method, params)?).await,
        other => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!(
                "unknown method {other:?}; available: {}",
                METHODS.join(", ")
            ),
        )),
    }
}

fn parse<T: DeserializeOwned>(method: &str, params: Value) -> Result<T, RpcError> {
    serde_json::from_value(params)
        .map_err(|e| RpcError::invalid_params(format!("invalid params for {method}: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| {
        RpcError::new(
            crate::control::rpc::INTERNAL_ERROR,
            format!("cannot encode result: {e}"),
        )
    })
}

/// Params of methods that take none; still refuses unknown fields.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}
