//! `Outbox` on SQLite: the balance e-mails a charge recorded.

use std::collections::HashMap;

use async_trait::async_trait;

use patchbay_jobs::model::{Account, Id, now_ms};
use patchbay_jobs::store::*;

use crate::SqliteStore;
use crate::rows::*;

#[async_trait]
impl Outbox for SqliteStore {
    async fn mail_recipients(&self, accounts: &[Id]) -> StoreResult<Vec<(Account, Vec<String>)>> {
        let ids = serde_json::Value::from(accounts.to_vec()).to_string();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM accounts WHERE id IN (SELECT value FROM json_each($1))",
            account_columns!()
        )))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let emails: Vec<(Id, String)> = sqlx::query_as(
            "SELECT account_id, email FROM users WHERE role = 'administrator' \
             AND account_id IN (SELECT value FROM json_each($1)) ORDER BY id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut to: HashMap<Id, Vec<String>> = HashMap::new();
        for (account, email) in emails {
            to.entry(account).or_default().push(email);
        }
        rows.iter()
            .map(|r| {
                let acc = decode::<Account, _>(r)?;
                let emails = to.remove(&acc.id).unwrap_or_default();
                Ok((acc, emails))
            })
            .collect()
    }

    async fn claim_notifications(
        &self,
        account: Id,
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Vec<Notification>> {
        crate::billing::claim_notifications(self, account, now, lease_ms).await
    }

    // Each settles only its own claim: a sender whose lease ran out must not undo a
    // claim another sender has taken since.
    async fn release_notification(&self, n: &Notification) -> StoreResult<()> {
        sqlx::query(
            "UPDATE notifications SET claimed_until = NULL WHERE id = $1 AND claimed_until = $2",
        )
        .bind(n.id)
        .bind(n.lease)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn mark_notification_sent(&self, n: &Notification) -> StoreResult<()> {
        sqlx::query(
            "UPDATE notifications SET sent_at = $1, claimed_until = NULL \
             WHERE id = $2 AND claimed_until = $3",
        )
        .bind(now_ms())
        .bind(n.id)
        .bind(n.lease)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn claim_balance_checks(
        &self,
        jobs: &[CheckJob],
        now: i64,
        lease_ms: i64,
    ) -> StoreResult<Vec<(BatchedJob, Vec<Notification>)>> {
        crate::billing::claim_balance_checks(self, jobs, now, lease_ms).await
    }

    async fn settle_balance_checks(
        &self,
        sent: &[Notification],
        unsent: &[Notification],
        done: &[String],
    ) -> StoreResult<()> {
        crate::billing::settle_balance_checks(self, sent, unsent, done).await
    }

    async fn accounts_with_unsent_notifications(
        &self,
        before: i64,
        limit: u32,
    ) -> StoreResult<Vec<Id>> {
        // Skips accounts whose balance_check is still queued or retrying, or died since
        // `before`: a relay that refuses every e-mail gets a new job once per grace, not
        // one (dead at once) per sweep.
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT n.account_id FROM notifications n \
             WHERE n.sent_at IS NULL \
             AND n.created_at < $1 AND (n.claimed_until IS NULL OR n.claimed_until < $1) \
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.kind = 'balance_check' \
             AND (j.state IN ('pending', 'running', 'failed') \
                  OR (j.state = 'dead' AND j.updated_at >= $1)) \
             AND j.payload ->> 'account' = n.account_id) LIMIT $2",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }
}
