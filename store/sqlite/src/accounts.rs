//! `Accounts` on SQLite.

use async_trait::async_trait;
use sqlx::Row;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{Account, Id, LedgerEntry, Settings, User, now_ms};
use patchbay_jobs::store::*;
use patchbay_jobs::validate;

use crate::SqliteStore;
use crate::rows::*;

#[async_trait]
impl Accounts for SqliteStore {
    async fn create_account(&self, new: &NewAccount) -> StoreResult<(Account, User)> {
        let name = validate::name("name", &new.name)?;
        let currency = validate::currency(&new.currency)?;
        let admin_name = validate::name("admin.name", &new.admin.name)?;
        let admin_email = validate::email("admin.email", &new.admin.email)?;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(concat!(
            "INSERT INTO accounts (name, currency, created_at) VALUES ($1, $2, $3) \
             RETURNING ",
            account_columns!()
        ))
        .bind(&name)
        .bind(&currency)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let account = decode::<Account, _>(&row)?;
        let row = sqlx::query(concat!(
            "INSERT INTO users (account_id, name, email, role, created_at) \
             VALUES ($1, $2, $3, 'administrator', $4) RETURNING ",
            user_columns!()
        ))
        .bind(account.id)
        .bind(&admin_name)
        .bind(&admin_email)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let admin = decode::<User, _>(&row)?;
        tx.commit().await?;
        Ok((account, admin))
    }

    async fn account(&self, id: Id) -> StoreResult<Account> {
        let row = sqlx::query(concat!(
            "SELECT ",
            account_columns!(),
            " FROM accounts WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("account", id))?;
        decode::<Account, _>(&row)
    }

    async fn topup(&self, account: Id, amount: i64, reference: &str) -> StoreResult<LedgerEntry> {
        let (amount, reference) = validate::topup(amount, reference)?;
        let mut tx = self.begin_write().await?;
        let existing = sqlx::query(concat!(
            "SELECT ",
            ledger_columns!(),
            " FROM ledger WHERE account_id = $1 AND reference = $2"
        ))
        .bind(account)
        .bind(reference)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = existing {
            let entry = decode::<LedgerEntry, _>(&row)?;
            if entry.amount != amount {
                return Err(DomainError::Conflict(format!(
                    "reference {reference:?} was already used for a top-up of {}",
                    entry.amount
                )));
            }
            return Ok(entry);
        }
        let before: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| DomainError::not_found("account", account))?;
        if before
            .checked_add(amount)
            .is_none_or(|b| b > validate::MAX_BALANCE)
        {
            return Err(DomainError::InvalidValue(format!(
                "a top-up of {amount} would take the balance of account {account} ({before}) \
                 above the largest allowed, {} minor units",
                validate::MAX_BALANCE
            )));
        }
        let balance: i64 = sqlx::query_scalar(
            "UPDATE accounts SET balance = balance + $1 WHERE id = $2 RETURNING balance",
        )
        .bind(amount)
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| DomainError::not_found("account", account))?;
        let row = sqlx::query(concat!(
            "INSERT INTO ledger (account_id, kind, amount, balance_after, reference, created_at) \
             VALUES ($1, 'topup', $2, $3, $4, $5) RETURNING ",
            ledger_columns!()
        ))
        .bind(account)
        .bind(amount)
        .bind(balance)
        .bind(reference)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        let entry = decode::<LedgerEntry, _>(&row)?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn ledger(&self, account: Id, limit: u32) -> StoreResult<Vec<LedgerEntry>> {
        self.account(account).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            ledger_columns!(),
            " FROM ledger WHERE account_id = $1 ORDER BY id DESC LIMIT $2"
        ))
        .bind(account)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::<LedgerEntry, _>).collect()
    }

    async fn set_setting(
        &self,
        account: Id,
        setting: &patchbay_jobs::settings::Setting,
    ) -> StoreResult<Settings> {
        use patchbay_jobs::settings::Setting;
        // Only the changed column: rewriting all four from an earlier read would undo a
        // concurrent change of another setting.
        macro_rules! update {
            ($column:literal) => {
                sqlx::query(concat!(
                    "UPDATE accounts SET ",
                    $column,
                    " = $1 WHERE id = $2 RETURNING reset_responsible_on_close, \
                     mark_read_on_open, phone_format, balance_notify_days"
                ))
            };
        }
        let query = match setting {
            Setting::ResetResponsibleOnClose(b) => update!("reset_responsible_on_close").bind(*b),
            Setting::MarkReadOnOpen(b) => update!("mark_read_on_open").bind(*b),
            Setting::PhoneFormat(mask) => update!("phone_format").bind(mask.as_str()),
            Setting::BalanceNotifyDays(days) => update!("balance_notify_days").bind(*days),
        };
        let row = query
            .bind(account)
            .fetch_optional(&self.writer)
            .await?
            .ok_or_else(|| DomainError::not_found("account", account))?;
        Ok(Settings {
            reset_responsible_on_close: row.try_get("reset_responsible_on_close")?,
            mark_read_on_open: row.try_get("mark_read_on_open")?,
            phone_format: row.try_get("phone_format")?,
            balance_notify_days: row.try_get("balance_notify_days")?,
        })
    }

    async fn account_ids(&self, after: Id, limit: u32) -> StoreResult<Vec<Id>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
