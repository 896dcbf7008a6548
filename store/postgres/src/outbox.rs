//! `Outbox` on PostgreSQL: the balance e-mails a charge recorded (`billing`), their
//! claims and their recipients.
//!
//! A claim is a lease (`claimed_until`) taken with `FOR UPDATE SKIP LOCKED`: two
//! daemons claiming the same account's e-mails at once never both get one — the second
//! skips the rows the first has locked, and a row the first claimed and committed no
//! longer matches (PostgreSQL re-checks a locked row's condition on its newest
//! version). Only the holder of a claim may release it or mark it sent (`claimed_until`
//! must still be its lease), so a sender whose lease ran out cannot undo another's.

use std::collections::HashMap;

use async_trait::async_trait;

use patchbay_jobs::account_columns;
use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{Account, Id, now_ms};
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;

use crate::PgStore;
use crate::batch_journal;

/// Claims the unsent, unclaimed e-mails of these accounts until `now + lease_ms`,
/// oldest first, skipping rows another transaction holds (see the module doc).
async fn claim<'c, E>(
    conn: E,
    accounts: &[Id],
    now: i64,
    lease_ms: i64,
) -> StoreResult<Vec<Notification>>
where
    E: sqlx::PgExecutor<'c>,
{
    let lease = now.saturating_add(lease_ms);
    let rows: Vec<(Id, Id, String, String, i64, i64, i64)> = sqlx::query_as(
        "UPDATE notifications SET claimed_until = $2 \
         WHERE id IN (SELECT id FROM notifications WHERE account_id = ANY($1::BIGINT[]) \
           AND sent_at IS NULL AND (claimed_until IS NULL OR claimed_until < $3) \
           ORDER BY id FOR UPDATE SKIP LOCKED) \
         RETURNING id, account_id, kind, disconnect_date, days, balance, daily_total",
    )
    .bind(accounts)
    .bind(lease)
    .bind(now)
    .fetch_all(conn)
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

/// The (ids, leases) of these claims, in id order.
fn claims(ns: &[Notification]) -> (Vec<Id>, Vec<i64>) {
    let mut pairs: Vec<(Id, i64)> = ns.iter().map(|n| (n.id, n.lease)).collect();
    pairs.sort_unstable();
    pairs.into_iter().unzip()
}

#[async_trait]
impl Outbox for PgStore {
    async fn outbox_counts(&self, since: i64) -> StoreResult<OutboxCounts> {
        let (unsent, sent_since): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM notifications WHERE sent_at IS NULL)::BIGINT, \
             (SELECT COUNT(*) FROM notifications WHERE sent_at >= $1)::BIGINT",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxCounts { unsent, sent_since })
    }

    async fn mail_recipients(&self, accounts: &[Id]) -> StoreResult<Vec<(Account, Vec<String>)>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            account_columns!(),
            " FROM accounts WHERE id = ANY($1::BIGINT[])"
        ))
        .bind(accounts)
        .fetch_all(&self.pool)
        .await?;
        let emails: Vec<(Id, String)> = sqlx::query_as(
            "SELECT account_id, email FROM users WHERE role = 'administrator' \
             AND account_id = ANY($1::BIGINT[]) ORDER BY id",
        )
        .bind(accounts)
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
        claim(&self.pool, &[account], now, lease_ms).await
    }

    // Each a single conditional UPDATE of one row, under its own claim.
    async fn release_notification(&self, n: &Notification) -> StoreResult<()> {
        sqlx::query(
            "UPDATE notifications SET claimed_until = NULL WHERE id = $1 AND claimed_until = $2",
        )
        .bind(n.id)
        .bind(n.lease)
        .execute(&self.pool)
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
        .execute(&self.pool)
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
        // Locks the jobs' journal rows first (`batch_journal::start`: a redelivered copy
        // on another daemon waits, then reads them finished or claimed nothing), then
        // claims the e-mails, skipping locked ones.
        let mut tx = self.pool.begin().await?;
        let ids: Vec<&str> = jobs.iter().map(|j| j.job.as_str()).collect();
        let live = batch_journal::start(&mut tx, &ids, &mut out).await?;
        let mut accounts: Vec<Id> = live.iter().map(|&i| jobs[i].account).collect();
        accounts.sort_unstable();
        accounts.dedup();
        let mut claimed: HashMap<Id, Vec<Notification>> = HashMap::new();
        if !accounts.is_empty() {
            for n in claim(&mut *tx, &accounts, now, lease_ms).await? {
                claimed.entry(n.account).or_default().push(n);
            }
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
        let now = now_ms();
        // Each e-mail only under its own claim, as `mark_notification_sent` /
        // `release_notification`; then the jobs' rows (ascending ids).
        let mut tx = self.pool.begin().await?;
        if !sent.is_empty() {
            let (ids, leases) = claims(sent);
            sqlx::query(
                "UPDATE notifications SET sent_at = $3, claimed_until = NULL \
                 FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS c(id, lease) \
                 WHERE notifications.id = c.id AND notifications.claimed_until = c.lease",
            )
            .bind(&ids)
            .bind(&leases)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if !unsent.is_empty() {
            let (ids, leases) = claims(unsent);
            sqlx::query(
                "UPDATE notifications SET claimed_until = NULL \
                 FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS c(id, lease) \
                 WHERE notifications.id = c.id AND notifications.claimed_until = c.lease",
            )
            .bind(&ids)
            .bind(&leases)
            .execute(&mut *tx)
            .await?;
        }
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
        // one (dead at once) per sweep. Payloads are TEXT: the CASE parses only those of
        // balance checks (PostgreSQL may evaluate the conditions in any order).
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT n.account_id FROM notifications n \
             WHERE n.sent_at IS NULL \
             AND n.created_at < $1 AND (n.claimed_until IS NULL OR n.claimed_until < $1) \
             AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.kind = 'balance_check' \
             AND (j.state IN ('pending', 'running', 'failed') \
                  OR (j.state = 'dead' AND j.updated_at >= $1)) \
             AND CASE WHEN j.kind = 'balance_check' THEN j.payload::json ->> 'account' END \
                 = n.account_id::TEXT) \
             ORDER BY 1 LIMIT $2",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }
}
