//! `Journal` on PostgreSQL: the job journal's single-job statements, its retention, and
//! the lost-job sweep; batch journalling is in `batch_journal`.
//!
//! Most writes are one conditional statement (`… WHERE state NOT IN ('done', 'dead')`),
//! which PostgreSQL applies atomically per row: a concurrent writer's change is waited
//! for and the condition re-checked on the newest row, so no read-modify-write needs a
//! lock of its own. The sweep claims with `FOR UPDATE SKIP LOCKED` so that two daemons
//! sweeping one store never claim the same job.

use std::str::FromStr;

use async_trait::async_trait;

use patchbay_jobs::error::DomainError;
use patchbay_jobs::job_columns;
use patchbay_jobs::kind::JobKind;
use patchbay_jobs::model::{JobRecord, JobState, bounded_payload, job_created_at, now_ms};
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;

use crate::PgStore;
use crate::batch_journal::SCRUBBED_INBOUND;

#[async_trait]
impl Journal for PgStore {
    async fn journal_mark_dead(&self, rec: &JobRecord, reason: &str) -> StoreResult<()> {
        // SQLite does this in one upsert with two conflict clauses; PostgreSQL allows
        // one. Insert first, target-less ON CONFLICT DO NOTHING: a row with this id, or
        // another row holding the key, keeps the insert out (a concurrent insert of
        // either is waited for). Only then the id's row, if any, is marked dead. In
        // this order a row committed by another writer in between is still marked;
        // nothing is read back, so a payload past repair cannot fail it. No
        // transaction: when the insert did nothing there is nothing to undo.
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, last_error, \
             idempotency_key, created_at, updated_at, run_at) \
             VALUES ($1, $2, $3, 'dead', $4, $5, $6, $7, $8, $8, $8) ON CONFLICT DO NOTHING",
        )
        .bind(&rec.id)
        .bind(rec.kind.as_str())
        .bind(bounded_payload(rec.payload.clone()).to_string())
        .bind(i64::from(rec.attempts.max(1)))
        .bind(i64::from(rec.max_attempts))
        .bind(reason)
        .bind(&rec.idempotency_key)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 0 {
            sqlx::query(
                "UPDATE jobs SET state = 'dead', attempts = attempts + 1, last_error = $2, \
                 updated_at = $3 WHERE id = $1 AND state NOT IN ('done', 'dead')",
            )
            .bind(&rec.id)
            .bind(reason)
            .bind(now)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn journal_insert(&self, rec: &JobRecord) -> StoreResult<JournalInsert> {
        // ON CONFLICT waits for a concurrent insert of the id or key to commit, so the
        // SELECT below then sees that row.
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, last_error, \
             idempotency_key, created_at, updated_at, run_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .bind(&rec.id)
        .bind(rec.kind.as_str())
        .bind(rec.payload.to_string())
        .bind(rec.state.as_str())
        .bind(i64::from(rec.attempts))
        .bind(i64::from(rec.max_attempts))
        .bind(&rec.last_error)
        .bind(&rec.idempotency_key)
        .bind(rec.created_at)
        .bind(rec.updated_at)
        .bind(rec.run_at)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(JournalInsert::Inserted);
        }
        let existing: Option<String> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1 OR id = $2 LIMIT 1")
                .bind(&rec.idempotency_key)
                .bind(&rec.id)
                .fetch_optional(&self.pool)
                .await?;
        existing
            .map(JournalInsert::Existing)
            .ok_or_else(|| DomainError::Unavailable("job journal insert lost a race".into()))
    }

    async fn journal_insert_many(
        &self,
        recs: &[JobRecord],
        pushed: bool,
    ) -> StoreResult<Vec<bool>> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for the whole batch (rows as arrays): this sits on the inbound
        // path, where a statement per job was a measurable share of the cost. Rows go
        // in ascending id order, so two daemons inserting overlapping batches (a
        // redelivery) wait on each other's unique-index entries in one order, never in
        // a cycle.
        let mut sorted: Vec<&JobRecord> = recs.iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        let ids: Vec<&str> = sorted.iter().map(|r| r.id.as_str()).collect();
        let kinds: Vec<&str> = sorted.iter().map(|r| r.kind.as_str()).collect();
        let payloads: Vec<String> = sorted.iter().map(|r| r.payload.to_string()).collect();
        let states: Vec<&str> = sorted.iter().map(|r| r.state.as_str()).collect();
        let max_attempts: Vec<i64> = sorted.iter().map(|r| i64::from(r.max_attempts)).collect();
        let keys: Vec<Option<&str>> = sorted
            .iter()
            .map(|r| r.idempotency_key.as_deref())
            .collect();
        let created: Vec<i64> = sorted.iter().map(|r| r.created_at).collect();
        let inserted: std::collections::HashSet<String> = sqlx::query_scalar(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, \
             idempotency_key, created_at, updated_at, run_at, pushed) \
             SELECT t.id, t.kind, t.payload, t.state, 0, t.max_attempts, t.key, \
             t.created_at, t.created_at, t.created_at, $8 \
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], \
             $6::TEXT[], $7::BIGINT[]) AS t(id, kind, payload, state, max_attempts, key, created_at) \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&ids)
        .bind(&kinds)
        .bind(&payloads)
        .bind(&states)
        .bind(&max_attempts)
        .bind(&keys)
        .bind(&created)
        .bind(pushed)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        Ok(recs.iter().map(|r| inserted.contains(&r.id)).collect())
    }

    async fn journal_get(&self, id: &str) -> StoreResult<JobRecord> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("job", id))?;
        decode::<JobRecord, _>(&row)
    }

    async fn journal_by_key(&self, key: &str) -> StoreResult<Option<JobRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode::<JobRecord, _>).transpose()
    }

    async fn journal_list(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let (clause, values) = filter.sql_where();
        let n = values.len();
        let sql = format!(
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE {} ORDER BY created_at DESC, id DESC LIMIT ${} OFFSET ${}"
            ),
            clause,
            n + 1,
            n + 2
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for v in values {
            query = query.bind(v);
        }
        let rows = query
            .bind(i64::from(filter.limit))
            .bind(i64::from(filter.offset))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode::<JobRecord, _>).collect()
    }

    async fn journal_start(&self, rec: &JobRecord) -> StoreResult<Option<JobRecord>> {
        // One autocommit statement in the usual case (the job was journalled when it
        // was queued): this runs once per job, so every round trip counts. Two daemons
        // starting one job both count an attempt, as two starts on SQLite would.
        let start = || {
            sqlx::query(concat!(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = $1 \
                 WHERE id = $2 AND state NOT IN ('done', 'dead') RETURNING ",
                job_columns!()
            ))
            .bind(now_ms())
            .bind(&rec.id)
        };
        if let Some(row) = start().fetch_optional(&self.pool).await? {
            return decode::<JobRecord, _>(&row).map(Some);
        }
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(&rec.id)
            .fetch_optional(&self.pool)
            .await?;
        if state.is_some() {
            return Ok(None);
        }
        // Not journalled when it was queued (an inbound message from a connector, a
        // charge from a fan-out on the SQLite queue), or the daemon died in between:
        // create the entry, dated from the job's ULID so a data deletion's cutoff sees
        // when it was queued, with `rec`'s idempotency key (a charge's (account, day)).
        // If another row holds that key, nothing is inserted and the job does not run:
        // that row's job is the one for the key, as an enqueue would have answered.
        // Another daemon creating the same entry at once is waited for by ON CONFLICT.
        let now = now_ms();
        sqlx::query(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, \
             created_at, updated_at, run_at, idempotency_key) \
             VALUES ($1, $2, $3, 'pending', 0, $4, $6, $5, $5, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&rec.id)
        .bind(rec.kind.as_str())
        .bind(rec.payload.to_string())
        .bind(i64::from(rec.max_attempts))
        .bind(now)
        .bind(job_created_at(&rec.id, now))
        .bind(&rec.idempotency_key)
        .execute(&self.pool)
        .await?;
        start()
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(decode::<JobRecord, _>)
            .transpose()
    }

    async fn journal_finish(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        run_at: i64,
    ) -> StoreResult<()> {
        // A done inbound job keeps no copy of the message (batch_journal::SCRUBBED_INBOUND).
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET state = $1, last_error = COALESCE($2, last_error), \
             updated_at = $3, run_at = $4, \
             payload = CASE WHEN $1 = 'done' THEN {SCRUBBED_INBOUND} ELSE payload END \
             WHERE id = $5 AND state <> 'done'"
        )))
        .bind(state.as_str())
        .bind(error)
        .bind(now_ms())
        .bind(run_at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn journal_purge(&self, before: i64, limit: u32) -> StoreResult<u64> {
        // Job ids are ULIDs, ordered by creation time: the oldest jobs are a range at the
        // start of the primary key. Done is final (nothing moves a job out of it), so a
        // row found done is deleted as it is; SKIP LOCKED lets two daemons purging at
        // once take different rows instead of waiting on each other's.
        let floor = u64::try_from(before)
            .map(|ms| ulid::Ulid::from_parts(ms, 0).to_string())
            .unwrap_or_default();
        Ok(sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
             WHERE id < $1 AND state = 'done' AND updated_at < $2 \
             LIMIT $3 FOR UPDATE SKIP LOCKED)",
        )
        .bind(&floor)
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn journal_mark_pushed(&self, ids: &[String], pushed: bool) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE jobs SET pushed = $2 WHERE id = ANY($1::TEXT[]) AND pushed <> $2")
            .bind(ids)
            .bind(pushed)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn journal_claim_lost(
        &self,
        now: i64,
        grace_ms: i64,
        stale_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<JobRecord>> {
        // Claimed rows stay unpushed until `App::push` succeeds; the fresh `updated_at`
        // keeps other sweeps off them for the grace, after which a push that never
        // happened (a crash mid-sweep) is claimed again.
        //
        // Locks: the candidates are locked FOR UPDATE SKIP LOCKED, so a second daemon
        // sweeping at the same moment passes over the rows this one holds and takes
        // others. Should it read a row this sweep has claimed and committed meanwhile,
        // locking makes PostgreSQL re-check the conditions on the claimed version, whose
        // fresh `updated_at` no longer matches: a job is never claimed twice.
        let rows = sqlx::query(concat!(
            "UPDATE jobs SET pushed = FALSE, state = 'pending', run_at = $1, updated_at = $1 \
             WHERE id IN ( \
             SELECT id FROM jobs WHERE state IN ('pending', 'failed') AND ( \
             (state = 'pending' AND NOT pushed AND updated_at < $2) \
             OR (state = 'failed' AND run_at < $2) \
             OR (state = 'pending' AND pushed AND updated_at < $4)) \
             LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING ",
            job_columns!()
        ))
        .bind(now)
        .bind(now.saturating_sub(grace_ms))
        .bind(i64::from(limit))
        .bind(now.saturating_sub(stale_ms))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::<JobRecord, _>).collect()
    }

    async fn journal_revive(&self, id: &str) -> StoreResult<JobRecord> {
        let now = now_ms();
        // Not pushed until App::push succeeds: a crash in between leaves it to the sweep.
        // One conditional statement: of two daemons reviving one job, one gets the row.
        let row = sqlx::query(concat!(
            "UPDATE jobs SET state = 'pending', attempts = 0, pushed = FALSE, updated_at = $1, \
             run_at = $1 \
             WHERE id = $2 AND state = 'dead' RETURNING ",
            job_columns!()
        ))
        .bind(now)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => decode::<JobRecord, _>(&row),
            None => {
                let job = self.journal_get(id).await?;
                Err(DomainError::Conflict(format!(
                    "job {id} is {}, only dead jobs can be retried",
                    job.state
                )))
            }
        }
    }

    async fn journal_counts(&self) -> StoreResult<Vec<(JobKind, JobState, i64)>> {
        job_counts(&self.pool, "").await
    }

    async fn journal_open_counts(&self) -> StoreResult<Vec<(JobKind, JobState, i64)>> {
        job_counts(
            &self.pool,
            "WHERE state IN ('pending', 'running', 'failed', 'dead')",
        )
        .await
    }
}

/// Jobs by kind and state, of the rows `filter` (a WHERE clause or nothing) keeps.
async fn job_counts(
    pool: &sqlx::PgPool,
    filter: &'static str,
) -> StoreResult<Vec<(JobKind, JobState, i64)>> {
    let sql = format!(
        "SELECT kind, state, COUNT(*) FROM jobs {filter} GROUP BY kind, state ORDER BY kind, state"
    );
    let rows: Vec<(String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?;
    rows.into_iter()
        .map(|(k, s, n)| Ok((JobKind::from_str(&k)?, JobState::from_str(&s)?, n)))
        .collect()
}
