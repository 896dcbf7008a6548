//! `Users` on PostgreSQL: an account's administrators and operators.

use async_trait::async_trait;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{Id, Role, User, now_ms};
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;
use patchbay_jobs::{user_columns, validate};

use crate::PgStore;
use crate::is_unique_violation;

#[async_trait]
impl Users for PgStore {
    async fn add_user(&self, account: Id, user: &NewUser, role: Role) -> StoreResult<User> {
        let name = validate::name("name", &user.name)?;
        let email = validate::email("email", &user.email)?;
        let mut tx = self.pool.begin().await?;
        // Locks the account row: the case-insensitive check below and the insert must
        // not interleave with another add_user's (Ann@ and ann@ at once would both pass
        // the check; the UNIQUE constraint is case-sensitive). SQLite gets this from its
        // single writer. FOR NO KEY UPDATE serialises add_users (and charges, which
        // update the row) without blocking the inbound path, whose epoch read and
        // foreign-key checks take only FOR KEY SHARE on the account.
        let found: Option<Id> =
            sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1 FOR NO KEY UPDATE")
                .bind(account)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Err(DomainError::not_found("account", account));
        }
        // Addresses that differ only in case are one mailbox in practice. COLLATE "C"
        // folds ASCII only, as SQLite's lower() does: both stores refuse the same pairs.
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT email FROM users WHERE account_id = $1 \
             AND lower(email COLLATE \"C\") = lower($2 COLLATE \"C\") LIMIT 1",
        )
        .bind(account)
        .bind(&email)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(taken) = taken {
            return Err(DomainError::Conflict(format!(
                "account {account} already has a user {taken} (e-mail addresses are compared \
                 ignoring case)"
            )));
        }
        let row = sqlx::query(concat!(
            "INSERT INTO users (account_id, name, email, role, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING ",
            user_columns!()
        ))
        .bind(account)
        .bind(&name)
        .bind(&email)
        .bind(role.as_str())
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                DomainError::Conflict(format!("account {account} already has a user {email}"))
            } else {
                e.into()
            }
        })?;
        let user = decode::<User, _>(&row)?;
        tx.commit().await?;
        Ok(user)
    }

    async fn user(&self, id: Id) -> StoreResult<User> {
        let row = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("user", id))?;
        decode::<User, _>(&row)
    }
}
