//! `Accounts` on PostgreSQL: accounts, their settings and their ledger of top-ups.
//!
//! A balance changes only by `balance = balance + $delta` under the account row's lock
//! (`FOR NO KEY UPDATE`), in the transaction that writes its ledger row: charges
//! (`billing`) and top-ups take the same lock, so a top-up racing a billing run is
//! never lost and every `balance_after` is the balance that row left. `NO KEY UPDATE`
//! rather than `UPDATE`: it excludes every other writer of the row, but not the inbound
//! path's read of the data epoch or the foreign-key checks of rows inserted for the
//! account meanwhile (chats, contacts), which take `KEY SHARE` and must not wait for a
//! charge.

use async_trait::async_trait;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{Account, Id, LedgerEntry, Settings, User, now_ms};
use patchbay_jobs::settings::Setting;
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;
use patchbay_jobs::{account_columns, ledger_columns, user_columns, validate};

use crate::PgStore;

#[async_trait]
impl Accounts for PgStore {
    async fn create_account(&self, new: &NewAccount) -> StoreResult<(Account, User)> {
        let name = validate::name("name", &new.name)?;
        let currency = validate::currency(&new.currency)?;
        let admin_name = validate::name("admin.name", &new.admin.name)?;
        let admin_email = validate::email("admin.email", &new.admin.email)?;
        let now = now_ms();
        // Two new rows; nothing else can see or lock them before the commit.
        let mut tx = self.pool.begin().await?;
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
        // Locks the account row first (see the module doc): the charges and top-ups of
        // the account wait for each other, so the balance read here is the one the
        // delta applies to, and a second top-up with the same reference, waiting here,
        // then finds this one's ledger row.
        let mut tx = self.pool.begin().await?;
        let before: i64 =
            sqlx::query_scalar("SELECT balance FROM accounts WHERE id = $1 FOR NO KEY UPDATE")
                .bind(account)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| DomainError::not_found("account", account))?;
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
            return repeated(decode::<LedgerEntry, _>(&row)?, amount, reference);
        }
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
        .fetch_one(&mut *tx)
        .await?;
        // (account, reference) is UNIQUE: the rule that makes a top-up happen once. Under
        // the lock nobody else can insert it; should anything have, the balance change
        // rolls back with this transaction and the first entry is the answer.
        let row = sqlx::query(concat!(
            "INSERT INTO ledger (account_id, kind, amount, balance_after, reference, created_at) \
             VALUES ($1, 'topup', $2, $3, $4, $5) \
             ON CONFLICT (account_id, reference) DO NOTHING RETURNING ",
            ledger_columns!()
        ))
        .bind(account)
        .bind(amount)
        .bind(balance)
        .bind(reference)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            let row = sqlx::query(concat!(
                "SELECT ",
                ledger_columns!(),
                " FROM ledger WHERE account_id = $1 AND reference = $2"
            ))
            .bind(account)
            .bind(reference)
            .fetch_one(&self.pool)
            .await?;
            return repeated(decode::<LedgerEntry, _>(&row)?, amount, reference);
        };
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

    async fn set_setting(&self, account: Id, setting: &Setting) -> StoreResult<Settings> {
        // One statement on that column alone (the row lock it takes lasts the
        // statement): rewriting all four from an earlier read would undo a concurrent
        // change of another setting.
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
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| DomainError::not_found("account", account))?;
        decode::<Settings, _>(&row)
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

/// The answer to a top-up whose reference the ledger holds: the first entry, or a
/// conflict if this one names another amount.
fn repeated(entry: LedgerEntry, amount: i64, reference: &str) -> StoreResult<LedgerEntry> {
    if entry.amount != amount {
        return Err(DomainError::Conflict(format!(
            "reference {reference:?} was already used for a top-up of {}",
            entry.amount
        )));
    }
    Ok(entry)
}
