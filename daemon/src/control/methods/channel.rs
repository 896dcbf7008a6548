//! `channel.add`, `channel.remove`, `channel.list`, and `plugin.list`.

use patchbay_connector_sdk::host;
use patchbay_jobs::model::Id;
use patchbay_jobs::{DomainError, access, validate};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{NoParams, to_json};
use crate::app::App;
use crate::control::rpc::RpcError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddParams {
    account: Id,
    actor: Id,
    kind: String,
    name: String,
    #[serde(default)]
    config: Value,
}

pub async fn add(app: &App, p: AddParams) -> Result<Value, RpcError> {
    access::administrator(&*app.store, p.account, p.actor, "add channels").await?;
    let name = validate::name("name", &p.name)?;
    if app.plugins.registry().get(&p.kind).is_none() {
        return Err(DomainError::InvalidValue(format!(
            "no connector of kind {:?} is loaded; loaded kinds: {}",
            p.kind,
            app.plugins.registry().kinds().join(", ")
        ))
        .into());
    }
    let config = match p.config {
        Value::Null => json!({}),
        c @ Value::Object(_) => c,
        // The value itself is not echoed: it may be a credential put in the wrong place.
        other => {
            let got = match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                _ => "an array",
            };
            return Err(
                DomainError::InvalidValue(format!("config must be an object, got {got}")).into(),
            );
        }
    };
    // Charged for today at once: no channel runs a day unpaid. The charge records the
    // balance warning it makes due, like a daily run's; a balance_check sends it.
    let prices = app.prices();
    let (channel, noticed) = app
        .store
        .add_channel_charged(p.account, &p.kind, &name, &config, app.today(), &prices)
        .await?;
    crate::metrics::charged(prices.price(&p.kind));
    app.leases.wake();
    if noticed {
        let check = json!({ "account": p.account });
        app.enqueue(patchbay_jobs::JobKind::BalanceCheck, check)
            .await?;
    }
    channel_view(app, &channel)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    account: Id,
    actor: Id,
    channel: Id,
}

pub async fn remove(app: &App, p: RemoveParams) -> Result<Value, RpcError> {
    access::administrator(&*app.store, p.account, p.actor, "remove channels").await?;
    let channel = app.store.channel(p.channel).await?;
    if channel.account != p.account || channel.status == "removed" {
        return Err(DomainError::not_found("channel", p.channel).into());
    }
    // The store first: a reconcile round that reads the channels while the instance
    // stops must find it removed, not start it again.
    app.store
        .set_channel_status(channel.id, "removed", Some("removed by an administrator"))
        .await?;
    // Stopped here at once if it runs here; the reconcile loop of the node that runs
    // it (this one's too) stops it and hands its lease back.
    app.plugins.stop(channel.id).await;
    app.leases.wake();
    channel_view(app, &app.store.channel(channel.id).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    account: Id,
}

pub async fn list(app: &App, p: ListParams) -> Result<Value, RpcError> {
    let channels = app.store.channels(p.account).await?;
    let owners = crate::cluster::view::owners(app).await?;
    let views: Result<Vec<Value>, RpcError> = channels
        .iter()
        .map(|c| {
            let mut v = channel_view(app, c)?;
            if let Value::Object(m) = &mut v {
                let (owner, epoch) = owners.get(&c.id).cloned().unzip();
                m.insert("owner".into(), json!(owner));
                m.insert("lease_epoch".into(), json!(epoch.flatten()));
            }
            Ok(v)
        })
        .collect();
    Ok(Value::Array(views?))
}

/// A channel as results show it: the values of the config keys its connector declared
/// secret are `"***"`; every value is, for a kind not loaded (its secrets are unknown).
/// The store keeps the real values: the connector needs them.
fn channel_view(app: &App, c: &patchbay_jobs::model::Channel) -> Result<Value, RpcError> {
    let registry = app.plugins.registry();
    let secrets = registry.get(&c.kind).map(|lib| lib.secret_keys());
    let mut v = to_json(c)?;
    if let Value::Object(m) = &mut v {
        m.insert("config".into(), host::redact_config(&c.config, secrets));
        m.insert("daily_price".into(), json!(app.price(&c.kind)));
    }
    Ok(v)
}

pub async fn plugins(app: &App, _: NoParams) -> Result<Value, RpcError> {
    let using = app.plugins.channels_by_kind().await?;
    let list: Vec<Value> = app
        .plugins
        .registry()
        .libraries()
        .map(|lib| {
            json!({
                "kind": lib.kind(),
                "version": lib.version(),
                "abi_version": lib.abi_version(),
                "file": lib.path().display().to_string(),
                "secret_keys": lib.secret_keys(),
                "channels": using.get(lib.kind()).copied().unwrap_or(0),
            })
        })
        .collect();
    Ok(Value::Array(list))
}
