//! `Users` on SQLite.

use async_trait::async_trait;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{Id, Role, User, now_ms};
use patchbay_jobs::store::*;
use patchbay_jobs::validate;

use crate::SqliteStore;
use crate::is_unique_violation;
use crate::rows::*;

#[async_trait]
impl Users for SqliteStore {
    async fn add_user(&self, account: Id, user: &NewUser, role: Role) -> StoreResult<User> {
        let name = validate::name("name", &user.name)?;
        let email = validate::email("email", &user.email)?;
        self.account(account).await?;
        let mut tx = self.begin_write().await?;
        // Addresses that differ only in case are one mailbox in practice. The UNIQUE
        // constraint is case-sensitive, so this check (in the write transaction, so no
        // insert races it) is what refuses Ann@ beside ann@. lower() folds ASCII only in
        // SQLite.
        let taken: Option<String> = sqlx::query_scalar(
            "SELECT email FROM users WHERE account_id = $1 AND lower(email) = lower($2)",
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
