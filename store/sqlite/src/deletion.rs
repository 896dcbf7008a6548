//! `Deletion` on SQLite: runs and their batches (on the niced connection of `background`).

use async_trait::async_trait;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::{DeletionRun, Id, now_ms};
use patchbay_jobs::store::*;

use crate::SqliteStore;
use crate::rows::*;

#[async_trait]
impl Deletion for SqliteStore {
    async fn start_deletion(&self, account: Id) -> StoreResult<(DeletionRun, bool)> {
        let mut tx = self.begin_write().await?;
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
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| DomainError::not_found("account", account))?;
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
        let run = self.deletion_run(run).await?;
        if run.state != "running" {
            return Ok(BatchOutcome {
                deleted: 0,
                finished: true,
            });
        }
        let limit = i64::from(limit.max(1));
        // Holding the writer's connection keeps every other write out while the batch
        // runs on the niced background connection: nobody races it for SQLite's lock.
        let _writer = self.writer.acquire().await?;
        let mut tx = self.background.begin_with("BEGIN IMMEDIATE").await?;
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
                journal = sqlx::query(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                     WHERE state = 'dead' AND kind = 'inbound_message' AND created_at < $2 \
                     AND payload ->> 'channel' IN (SELECT id FROM channels WHERE account_id = $1) \
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
        let (messages, chats): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id \
             WHERE c.account_id = $1 AND c.epoch < $2), \
             (SELECT COUNT(*) FROM chats WHERE account_id = $1 AND epoch < $2)",
        )
        .bind(run.account)
        .bind(run.epoch)
        .fetch_one(&self.pool)
        .await?;
        let contacts: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM contacts WHERE account_id = $1 AND epoch < $2",
        )
        .bind(run.account)
        .bind(run.epoch)
        .fetch_one(&self.pool)
        .await?;
        Ok(messages + chats + contacts)
    }
}
