//! `chat.create`, `chat.list`, `chat.get`, `chat.messages`, `chat.assign`, `chat.open`,
//! `chat.close`, `chat.set_field`, and `message.send`.

use patchbay_jobs::model::{Id, Role, now_ms};
use patchbay_jobs::store::ChatFilter;
use patchbay_jobs::{DomainError, JobKind, access, fields, phone};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::to_json;
use crate::app::App;
use crate::control::rpc::RpcError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    account: Id,
    actor: Id,
    channel: Id,
    phone: String,
}

/// A new chat to the number, or the chat the channel already has with it — as it is:
/// a closed one stays closed (and keeps its responsible user) until the client writes
/// again; messages can be sent to it meanwhile. An existing chat the actor cannot see
/// (assigned to another operator) is `forbidden`, never handed out.
pub async fn create(app: &App, p: CreateParams) -> Result<Value, RpcError> {
    let actor = access::member(&*app.store, p.account, p.actor).await?;
    let account = app.store.account(p.account).await?;
    let channel = app.store.channel(p.channel).await?;
    if channel.account != p.account || channel.status == "removed" {
        return Err(DomainError::not_found("channel", p.channel).into());
    }
    let e164 = phone::parse_with_mask(&p.phone, &account.settings.phone_format)?;
    // Checked after the lookup: create_chat leaves an existing chat (and its contact,
    // found by this very phone) untouched, and a new chat has nobody responsible, so
    // refusing here changes nothing.
    let chat = app.store.create_chat(&channel, &e164).await?;
    access::check_visible(&actor, &chat)?;
    to_json(&chat)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    account: Id,
    as_user: Option<Id>,
    status: Option<String>,
    limit: Option<u32>,
}

pub async fn list(app: &App, p: ListParams) -> Result<Value, RpcError> {
    if let Some(s) = p.status.as_deref()
        && s != "open"
        && s != "closed"
    {
        return Err(DomainError::InvalidValue(format!("status {s:?}: use open or closed")).into());
    }
    let visible_to_operator = match p.as_user {
        Some(u) => {
            let user = access::member(&*app.store, p.account, u).await?;
            (user.role == Role::Operator).then_some(user.id)
        }
        None => None,
    };
    let filter = ChatFilter {
        visible_to_operator,
        status: p.status,
        limit: p.limit.unwrap_or(100).min(10_000),
    };
    to_json(&app.store.chats(p.account, &filter).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatParams {
    chat: Id,
}

/// The chat card: the chat, its contact's built-in fields and the additional fields.
pub async fn get(app: &App, p: ChatParams) -> Result<Value, RpcError> {
    let chat = app.store.chat(p.chat).await?;
    let contact = app.store.contact(chat.contact).await?;
    let defs = app.store.fields(chat.account).await?;
    let values: std::collections::HashMap<Id, Value> =
        app.store.field_values(chat.id).await?.into_iter().collect();
    let extra: Vec<Value> = defs
        .iter()
        .map(|d| {
            json!({
                "field": d.id, "name": d.name, "type": d.field_type,
                "value": values.get(&d.id).cloned().unwrap_or(Value::Null),
            })
        })
        .collect();
    let mut card = match to_json(&chat)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    card.insert("contact".into(), to_json(&contact)?);
    card.insert("fields".into(), Value::Array(extra));
    Ok(Value::Object(card))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagesParams {
    chat: Id,
    limit: Option<u32>,
    before: Option<Id>,
}

pub async fn messages(app: &App, p: MessagesParams) -> Result<Value, RpcError> {
    let limit = p.limit.unwrap_or(50).clamp(1, 1000);
    to_json(&app.store.messages(p.chat, limit, p.before).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignParams {
    chat: Id,
    actor: Id,
    user: Option<Id>,
}

pub async fn assign(app: &App, p: AssignParams) -> Result<Value, RpcError> {
    let chat = app.store.chat(p.chat).await?;
    access::chat_actor(&*app.store, &chat, p.actor).await?;
    if let Some(u) = p.user {
        access::member(&*app.store, chat.account, u).await?;
    }
    to_json(&app.store.assign_chat(chat.id, p.user).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorParams {
    chat: Id,
    actor: Id,
}

pub async fn open(app: &App, p: ActorParams) -> Result<Value, RpcError> {
    let chat = app.store.chat(p.chat).await?;
    access::chat_actor(&*app.store, &chat, p.actor).await?;
    let account = app.store.account(chat.account).await?;
    let chat = if account.settings.mark_read_on_open {
        app.store.mark_read(chat.id).await?
    } else {
        chat
    };
    to_json(&chat)
}

pub async fn close(app: &App, p: ActorParams) -> Result<Value, RpcError> {
    let chat = app.store.chat(p.chat).await?;
    access::chat_actor(&*app.store, &chat, p.actor).await?;
    let (job, _) = app
        .enqueue(
            JobKind::ChatClose,
            json!({ "chat": chat.id, "actor": p.actor, "requested_at": now_ms() }),
        )
        .await?;
    Ok(json!({ "job": job }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetFieldParams {
    chat: Id,
    actor: Id,
    field: Id,
    value: Value,
}

pub async fn set_field(app: &App, p: SetFieldParams) -> Result<Value, RpcError> {
    let chat = app.store.chat(p.chat).await?;
    access::chat_actor(&*app.store, &chat, p.actor).await?;
    let field = app.store.field(p.field).await?;
    if field.account != chat.account {
        return Err(DomainError::not_found("field", p.field).into());
    }
    let mask = app.store.account(chat.account).await?.settings.phone_format;
    let value = fields::check_value(&field, &p.value, &mask)?;
    app.store.set_field_value(chat.id, field.id, &value).await?;
    Ok(json!({ "chat": chat.id, "field": field.id, "value": value }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    chat: Id,
    actor: Id,
    text: String,
}

pub async fn send(app: &App, p: SendParams) -> Result<Value, RpcError> {
    let chat = app.store.chat(p.chat).await?;
    access::chat_actor(&*app.store, &chat, p.actor).await?;
    if p.text.trim().is_empty() || p.text.len() > patchbay_jobs::kind::MAX_TEXT_BYTES {
        return Err(DomainError::InvalidValue(format!(
            "text must be 1 to {} bytes",
            patchbay_jobs::kind::MAX_TEXT_BYTES
        ))
        .into());
    }
    let message = app.store.add_outbound(&chat, p.actor, &p.text).await?;
    let (job, _) = app
        .enqueue(JobKind::SendMessage, json!({ "message": message.id }))
        .await?;
    Ok(json!({ "message": message.id, "job": job }))
}
