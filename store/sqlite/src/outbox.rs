//! `Outbox` on SQLite: the balance e-mails a charge recorded (`billing`), their claims
//! and their recipients. A claim is a lease (`claimed_until`): only its holder may
//! release it or mark it sent, so a sender whose lease ran out cannot undo another's.

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::{Value, json};

use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{Account, Id, now_ms};
use patchbay_jobs::store::*;

use crate::SqliteStore;
use crate::batch_journal;
use crate::rows::*;

/// Claims the unsent, unclaimed e-mails of these accounts until `now + lease_ms`,
/// oldest first. Runs on the writer, so no two claims overlap.
async fn claim(
    conn: &mut sqlx::SqliteConnection,
    accounts: &[Id],
    now: i64,
    lease_ms: i64,
) -> StoreResult<Vec<Notification>> {
    let lease = now.saturating_add(lease_ms);
    let rows: Vec<(Id, Id, String, String, i64, i64, i64)> = sqlx::query_as(
        "UPDATE notifications SET claimed_until = $2 \
         WHERE account_id IN (SELECT value FROM json_each($1)) AND sent_at IS NULL \
         AND (claimed_until IS NULL OR claimed_until < $3) \
         RETURNING id, account_id, kind, disconnect_date, days, balance, daily_total",
    )
    .bind(Value::from(accounts.to_vec()).to_string())
    .bind(lease)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut out: Vec<Notification> = rows
        .into_iter()
        .map(|(id, account, kind, date, days, balance, daily_total)| {
            let disconnect_date = date.parse().map_err(|e| {
                DomainError::Unavailable(format!("corrupt notification {id} date {date:?}: {e}"))
            })?;
            Ok(Notification {
                id,
                account,
                kind,
                disconnect_date,
                days,
                balance,
                daily_total,
                lease,
            })
        })
        .collect::<StoreResult<_>>()?;
    // Oldest first: a warning before the disconnection it announced.
    out.sort_by_key(|n| n.id);
    Ok(out)
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn outbox_counts(&self, since: i64) -> StoreResult<OutboxCounts> {
        let (unsent, sent_since): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM notifications WHERE sent_at IS NULL), \
             (SELECT COUNT(*) FROM notifications WHERE sent_at >= $1)",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxCounts { unsent, sent_since })
    }

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
        let mut conn = self.writer.acquire().await?;
        claim(&mut conn, &[account], now, lease_ms).await
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
        let mut out = vec![BatchedJob::Done; jobs.len()];
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await?;
        let ids: Vec<&str> = jobs.iter().map(|j| j.job.as_str()).collect();
        let live = batch_journal::start(&mut tx, &ids, &mut out).await?;
        let mut accounts: Vec<Id> = live.iter().map(|&i| jobs[i].account).collect();
        accounts.sort_unstable();
        accounts.dedup();
        let mut claimed: HashMap<Id, Vec<Notification>> = HashMap::new();
        for n in claim(&mut tx, &accounts, now, lease_ms).await? {
            claimed.entry(n.account).or_default().push(n);
        }
        tx.commit().await?;
        let mut notices = vec![Vec::new(); jobs.len()];
        for i in live {
            // The first live job of an account takes its e-mails; the others have none.
            notices[i] = claimed.remove(&jobs[i].account).unwrap_or_default();
        }
        Ok(out.into_iter().zip(notices).collect())
    }

    async fn settle_balance_checks(
        &self,
        sent: &[Notification],
        unsent: &[Notification],
        done: &[String],
    ) -> StoreResult<()> {
        if sent.is_empty() && unsent.is_empty() && done.is_empty() {
            return Ok(());
        }
        let claims = |ns: &[Notification]| {
            Value::from(
                ns.iter()
                    .map(|n| json!([n.id, n.lease]))
                    .collect::<Vec<_>>(),
            )
            .to_string()
        };
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        // Each under its own claim, as `mark_notification_sent` / `release_notification`.
        sqlx::query(
            "UPDATE notifications SET sent_at = $2, claimed_until = NULL \
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS lease FROM json_each($1)) AS c \
             WHERE notifications.id = c.id AND notifications.claimed_until = c.lease",
        )
        .bind(claims(sent))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE notifications SET claimed_until = NULL \
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS lease FROM json_each($1)) AS c \
             WHERE notifications.id = c.id AND notifications.claimed_until = c.lease",
        )
        .bind(claims(unsent))
        .execute(&mut *tx)
        .await?;
        let ids: Vec<&str> = done.iter().map(String::as_str).collect();
        batch_journal::finish(&mut tx, &ids, &vec![BatchedJob::Done; ids.len()], now).await?;
        tx.commit().await?;
        Ok(())
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
