//! Who may do what (SPEC §5 "Roles and visibility"): every acting user must belong to
//! the account they act on; administrators alone add or remove channels, change
//! settings, manage fields and start data deletion.

use crate::error::DomainError;
use crate::model::{Chat, Id, Role, User};
use crate::store::Store;

/// The actor, checked to be a user of `account`.
pub async fn member(store: &dyn Store, account: Id, actor: Id) -> Result<User, DomainError> {
    let user = store.user(actor).await?;
    if user.account != account {
        return Err(DomainError::Forbidden(format!(
            "user {actor} does not belong to account {account}"
        )));
    }
    Ok(user)
}

/// The actor, checked to be an administrator of `account`; `action` names the rule.
pub async fn administrator(
    store: &dyn Store,
    account: Id,
    actor: Id,
    action: &str,
) -> Result<User, DomainError> {
    let user = member(store, account, actor).await?;
    if user.role != Role::Administrator {
        return Err(DomainError::Forbidden(format!(
            "only administrators may {action}; user {actor} is an operator"
        )));
    }
    Ok(user)
}

/// Whether `user` may see `chat`: unassigned chats are everyone's, assigned ones their
/// responsible user's and the administrators'.
pub fn can_see(user: &User, chat: &Chat) -> bool {
    user.account == chat.account
        && (user.role == Role::Administrator
            || chat.responsible.is_none()
            || chat.responsible == Some(user.id))
}

/// `forbidden`, naming the rule, unless `user` may see `chat`.
pub fn check_visible(user: &User, chat: &Chat) -> Result<(), DomainError> {
    if can_see(user, chat) {
        return Ok(());
    }
    Err(DomainError::Forbidden(format!(
        "chat {} is assigned to another user; only they and administrators may act on it",
        chat.id
    )))
}

/// The actor, checked to be a member who can see the chat.
pub async fn chat_actor(store: &dyn Store, chat: &Chat, actor: Id) -> Result<User, DomainError> {
    let user = member(store, chat.account, actor).await?;
    check_visible(&user, chat)?;
    Ok(user)
}
