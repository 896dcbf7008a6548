//! `Deletion` on PostgreSQL: data deletion runs and their batches.
//!
//! SQLite runs a batch on a niced connection while holding its one writer; here the
//! server schedules the work among its backends, so a batch is a plain transaction on
//! the pool, beside the inbound path's. Each step of a batch is one set-based DELETE
//! (`WHERE id IN (SELECT … LIMIT n)`), never a statement per row.
//!
//! Locking: `start_deletion` locks the account row FOR UPDATE, so two runs never start
//! at once, and since FOR UPDATE conflicts with the FOR KEY SHARE an inbound batch holds
//! on the account (its read of the data epoch, and its foreign-key checks), the epoch
//! bump waits for the batches in flight and later batches see the new epoch. Every batch
//! locks its run's row first, so two daemons running one run's batches take turns: each
//! batch sees what the one before deleted, and the counts stay exact.

use async_trait::async_trait;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{DeletionRun, Id, now_ms};
use patchbay_jobs::run_columns;
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;

use crate::PgStore;

#[async_trait]
impl Deletion for PgStore {
    async fn start_deletion(&self, account: Id) -> StoreResult<(DeletionRun, bool)> {
        let mut tx = self.pool.begin().await?;
        // The account row's lock orders this against another start (which then finds
        // this run active, instead of tripping over deletion_runs_one_active) and
        // against inbound batches (see the module doc).
        let found: Option<Id> =
            sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
                .bind(account)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Err(DomainError::not_found("account", account));
        }
        let active = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE account_id = $1 AND state = 'running'"
        ))
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = active {
            return Ok((decode::<DeletionRun, _>(&row)?, false));
        }
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE accounts SET data_epoch = data_epoch + 1 WHERE id = $1 RETURNING data_epoch",
        )
        .bind(account)
        .fetch_one(&mut *tx)
        .await?;
        let now = now_ms();
        let row = sqlx::query(concat!(
            "INSERT INTO deletion_runs (account_id, cutoff, epoch, state, started_at) \
             VALUES ($1, $2, $3, 'running', $2) RETURNING ",
            run_columns!()
        ))
        .bind(account)
        .bind(now)
        .bind(epoch)
        .fetch_one(&mut *tx)
        .await?;
        let run = decode::<DeletionRun, _>(&row)?;
        tx.commit().await?;
        Ok((run, true))
    }

    async fn deletion_run(&self, id: Id) -> StoreResult<DeletionRun> {
        let row = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("deletion run", id))?;
        decode::<DeletionRun, _>(&row)
    }

    async fn latest_deletion(&self, account: Id) -> StoreResult<Option<DeletionRun>> {
        self.account(account).await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE account_id = $1 ORDER BY id DESC LIMIT 1"
        ))
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode::<DeletionRun, _>).transpose()
    }

    async fn running_deletions(&self) -> StoreResult<Vec<DeletionRun>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE state = 'running' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::<DeletionRun, _>).collect()
    }

    async fn delete_batch(&self, run: Id, limit: u32) -> StoreResult<BatchOutcome> {
        let limit = i64::from(limit.max(1));
        let mut tx = self.pool.begin().await?;
        // The serial batches need not each wait for their WAL flush: a batch lost in a
        // server crash takes its run's counts with it and is deleted again, and the
        // job's own completion (a synchronous commit, later in the WAL) flushes every
        // batch before it, so a run is never left unfinished behind a finished job.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        // The run's row, locked to the commit: another daemon's batch of this run waits
        // here, then reads the state this one leaves (done, or the counts advanced).
        let row = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM deletion_runs WHERE id = $1 FOR UPDATE"
        ))
        .bind(run)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| DomainError::not_found("deletion run", run))?;
        let run = decode::<DeletionRun, _>(&row)?;
        if run.state != "running" {
            return Ok(BatchOutcome {
                deleted: 0,
                finished: true,
            });
        }
        // Messages first (the bulk), then what referenced them, then contacts: each
        // step only when the one before is empty, so foreign keys always hold.
        let messages = sqlx::query(
            "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m \
             JOIN chats c ON c.id = m.chat_id \
             WHERE c.account_id = $1 AND c.epoch < $2 LIMIT $3)",
        )
        .bind(run.account)
        .bind(run.epoch)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let mut chats = 0;
        let mut contacts = 0;
        let mut journal = 0;
        if messages == 0 {
            sqlx::query(
                "DELETE FROM field_values WHERE chat_id IN (SELECT id FROM chats \
                 WHERE account_id = $1 AND epoch < $2 LIMIT $3)",
            )
            .bind(run.account)
            .bind(run.epoch)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
            chats = sqlx::query(
                "DELETE FROM chats WHERE id IN (SELECT c.id FROM chats c \
                 WHERE c.account_id = $1 AND c.epoch < $2 \
                 AND NOT EXISTS (SELECT 1 FROM field_values v WHERE v.chat_id = c.id) LIMIT $3)",
            )
            .bind(run.account)
            .bind(run.epoch)
            .bind(limit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if chats == 0 {
                contacts = sqlx::query(
                    "DELETE FROM contacts WHERE id IN (SELECT id FROM contacts \
                     WHERE account_id = $1 AND epoch < $2 LIMIT $3)",
                )
                .bind(run.account)
                .bind(run.epoch)
                .bind(limit)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            if contacts == 0 {
                // Inbound jobs that never stored their message keep its text in the
                // journal (done ones keep none): pre-cutoff ones of the account go too.
                // The channel is compared as text: a payload's number or string alike.
                journal = sqlx::query(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                     WHERE state = 'dead' AND kind = 'inbound_message' AND created_at < $2 \
                     AND payload::json ->> 'channel' IN \
                     (SELECT id::TEXT FROM channels WHERE account_id = $1) \
                     LIMIT $3)",
                )
                .bind(run.account)
                .bind(run.cutoff)
                .bind(limit)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
        }
        let finished = messages == 0 && chats == 0 && contacts == 0 && journal == 0;
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE deletion_runs SET deleted_messages = deleted_messages + $1, \
             deleted_chats = deleted_chats + $2, deleted_contacts = deleted_contacts + $3, \
             state = CASE WHEN $4 THEN 'done' ELSE state END, \
             finished_at = CASE WHEN $4 THEN $5 ELSE finished_at END WHERE id = $6",
        )
        .bind(to_i64(messages))
        .bind(to_i64(chats))
        .bind(to_i64(contacts))
        .bind(finished)
        .bind(now_ms())
        .bind(run.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(BatchOutcome {
            deleted: messages + chats + contacts,
            finished,
        })
    }

    async fn deletion_remaining(&self, run: &DeletionRun) -> StoreResult<i64> {
        let (messages, chats, contacts): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id \
             WHERE c.account_id = $1 AND c.epoch < $2), \
             (SELECT COUNT(*) FROM chats WHERE account_id = $1 AND epoch < $2), \
             (SELECT COUNT(*) FROM contacts WHERE account_id = $1 AND epoch < $2)",
        )
        .bind(run.account)
        .bind(run.epoch)
        .fetch_one(&self.pool)
        .await?;
        Ok(messages + chats + contacts)
    }
}
