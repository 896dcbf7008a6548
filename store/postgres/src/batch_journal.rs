//! The journal side of running a batch of jobs in one store transaction: which jobs of
//! the batch still have to run, and their outcomes committed with their effects. The
//! PostgreSQL counterpart of the SQLite store's `batch_journal`, used by the inbound and
//! billing batches.
//!
//! Locking: SQLite runs a batch under its one writer, so the states `start` reads stay
//! true until the commit. Here another daemon may run a redelivered copy of the same
//! jobs at the same moment, so `start` locks the batch's journal rows (`FOR UPDATE`, in
//! ascending id order, so two overlapping batches never deadlock) and holds them to the
//! commit: the second batch waits, then reads `done` and runs nothing. Call `start`
//! before the batch locks anything else. `finish` and `settle` write only job rows, in
//! ascending id order as well.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use patchbay_jobs::kind::JobKind;
use patchbay_jobs::model::job_created_at;
use patchbay_jobs::store::{BatchedJob, StoreResult};

/// The payload a finished `inbound_message` job keeps in the journal: which message it
/// was, not its text or sender. The message itself lives in `messages`, where a data
/// deletion run can reach it; a copy here would outlive the deletion. `->` (not `->>`)
/// keeps the channel a JSON number. Columns are qualified because inside
/// `ON CONFLICT DO UPDATE` an unqualified one is ambiguous with `excluded`.
pub(crate) const SCRUBBED_INBOUND: &str = "CASE WHEN jobs.kind = 'inbound_message' THEN \
     json_build_object('channel', jobs.payload::json -> 'channel', \
     'external_message_id', jobs.payload::json -> 'external_message_id')::text \
     ELSE jobs.payload END";

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

/// Reads the jobs' journal states, locking their rows until the commit (see the module
/// doc); returns the indexes of the jobs to run and fills `out` for the others: no
/// journal row (`NotJournalled`), done or dead already, or the same job twice in one
/// batch (`AlreadyFinished`).
pub(crate) async fn start(
    tx: &mut Tx<'_>,
    jobs: &[&str],
    out: &mut [BatchedJob],
) -> StoreResult<Vec<usize>> {
    let mut ids: Vec<String> = jobs.iter().map(|j| (*j).to_owned()).collect();
    ids.sort_unstable();
    ids.dedup();
    let states: HashMap<String, String> = sqlx::query_as(
        "SELECT id, state FROM jobs WHERE id = ANY($1::TEXT[]) ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let mut live = Vec::with_capacity(jobs.len());
    let mut taken = HashSet::new();
    for (i, job) in jobs.iter().enumerate() {
        match states.get(*job).map(String::as_str) {
            None => out[i] = BatchedJob::NotJournalled,
            Some("done" | "dead") => out[i] = BatchedJob::AlreadyFinished,
            Some(_) if !taken.insert(*job) => out[i] = BatchedJob::AlreadyFinished,
            Some(_) => live.push(i),
        }
    }
    Ok(live)
}

/// The batch's `Dead` jobs as (ids, reasons), each job once (its first reason), in
/// ascending id order.
fn dead_jobs<'a>(
    jobs: impl Iterator<Item = (&'a str, &'a BatchedJob)>,
) -> (Vec<String>, Vec<String>) {
    let mut dead: Vec<(&str, &str)> = jobs
        .filter_map(|(j, o)| match o {
            BatchedJob::Dead(reason) => Some((j, reason.as_str())),
            _ => None,
        })
        .collect();
    // Stable: of a job's copies the first reason stays first and survives the dedup.
    dead.sort_by_key(|(j, _)| *j);
    dead.dedup_by_key(|(j, _)| *j);
    dead.into_iter()
        .map(|(j, r)| (j.to_owned(), r.to_owned()))
        .unzip()
}

/// Marks the given jobs dead with their reasons, each counting one attempt, unless done
/// or dead already; returns the ids it marked. One statement for the batch.
async fn mark_dead(
    tx: &mut Tx<'_>,
    ids: &[String],
    reasons: &[String],
    now: i64,
) -> StoreResult<Vec<String>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET state = 'dead', attempts = jobs.attempts + 1, last_error = t.reason, \
         updated_at = $3 \
         FROM UNNEST($1::TEXT[], $2::TEXT[]) AS t(id, reason) \
         WHERE jobs.id = t.id AND jobs.state NOT IN ('done', 'dead') \
         RETURNING jobs.id",
    )
    .bind(ids)
    .bind(reasons)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?)
}

/// Journals each job's outcome: `Done` jobs done, `Dead` ones dead with the reason,
/// each counting one attempt. Jobs that did not run are left as they are.
pub(crate) async fn finish(
    tx: &mut Tx<'_>,
    jobs: &[&str],
    out: &[BatchedJob],
    now: i64,
) -> StoreResult<()> {
    let mut done: Vec<String> = jobs
        .iter()
        .zip(out)
        .filter(|(_, o)| **o == BatchedJob::Done)
        .map(|(j, _)| (*j).to_owned())
        .collect();
    done.sort_unstable();
    done.dedup();
    if !done.is_empty() {
        sqlx::query(
            "UPDATE jobs SET state = 'done', attempts = attempts + 1, updated_at = $2 \
             WHERE id = ANY($1::TEXT[]) AND state NOT IN ('done', 'dead')",
        )
        .bind(&done)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    let (ids, reasons) = dead_jobs(jobs.iter().copied().zip(out));
    mark_dead(tx, &ids, &reasons, now).await?;
    Ok(())
}

/// A job of a batch that ran without `start`, as `settle` journals it.
pub(crate) struct Ran<'a> {
    pub job: &'a str,
    /// What a new journal row keeps: the payload, or for an inbound message only which
    /// message it was (see `SCRUBBED_INBOUND`).
    pub payload: Value,
    pub max_attempts: u32,
    /// The job's idempotency key, for a new row; the caller made sure no other row
    /// holds it.
    pub key: Option<String>,
}

/// Journals the outcomes of jobs of `kind` that ran without `start`, which only jobs
/// whose effects are idempotent may do (storing an inbound message twice stores it
/// once; a (channel, day) is charged once): `Done` jobs done — a dead one too, since
/// its effect has now happened —, and a done job the journal does not know (queued
/// without a row, see `App::queue_batched`) gets its row here; `Dead` ones dead. One
/// statement for the batch's done jobs. A job done already stays so and reads
/// `AlreadyFinished`; a dead one the journal does not know reads `NotJournalled`.
///
/// Two daemons settling the same job at once: `ON CONFLICT (id)` waits for the other
/// insert and then updates (or, done already, leaves) its row, so neither fails.
pub(crate) async fn settle(
    tx: &mut Tx<'_>,
    kind: JobKind,
    jobs: &[Ran<'_>],
    out: &mut [BatchedJob],
    now: i64,
) -> StoreResult<()> {
    // Each job once (ON CONFLICT DO UPDATE may not touch a row twice in one statement),
    // in ascending id order (the order rows are locked in).
    let mut done: Vec<&Ran<'_>> = jobs
        .iter()
        .zip(out.iter())
        .filter(|(_, o)| **o == BatchedJob::Done)
        .map(|(j, _)| j)
        .collect();
    done.sort_by_key(|j| j.job);
    done.dedup_by_key(|j| j.job);
    let mut settled: HashSet<String> = HashSet::new();
    if !done.is_empty() {
        let ids: Vec<&str> = done.iter().map(|j| j.job).collect();
        let payloads: Vec<String> = done.iter().map(|j| j.payload.to_string()).collect();
        let max_attempts: Vec<i64> = done.iter().map(|j| i64::from(j.max_attempts)).collect();
        let created: Vec<i64> = done.iter().map(|j| job_created_at(j.job, now)).collect();
        let keys: Vec<Option<&str>> = done.iter().map(|j| j.key.as_deref()).collect();
        // `pushed` is true for the inserted rows: the sweep must never queue a done job.
        let inserted: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, \
             created_at, updated_at, run_at, pushed, idempotency_key) \
             SELECT t.id, $7, t.payload, 'done', 1, t.max_attempts, t.created_at, $6, $6, \
             TRUE, t.key \
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[]) \
             AS t(id, payload, max_attempts, created_at, key) \
             ON CONFLICT (id) DO UPDATE SET state = 'done', attempts = jobs.attempts + 1, \
             updated_at = excluded.updated_at, payload = {SCRUBBED_INBOUND} \
             WHERE jobs.state <> 'done' \
             RETURNING id"
        )))
        .bind(&ids)
        .bind(&payloads)
        .bind(&max_attempts)
        .bind(&created)
        .bind(&keys)
        .bind(now)
        .bind(kind.as_str())
        .fetch_all(&mut **tx)
        .await?;
        settled.extend(inserted);
    }
    let (ids, reasons) = dead_jobs(jobs.iter().map(|j| j.job).zip(out.iter()));
    settled.extend(mark_dead(tx, &ids, &reasons, now).await?);
    // The rare rest: finished before (a redelivery), or dead and never journalled.
    let rest: Vec<&str> = jobs
        .iter()
        .map(|j| j.job)
        .filter(|j| !settled.contains(*j))
        .collect();
    if rest.is_empty() {
        return Ok(());
    }
    let known: HashSet<String> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE id = ANY($1::TEXT[])")
            .bind(&rest)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect();
    for (job, outcome) in jobs.iter().map(|j| j.job).zip(out.iter_mut()) {
        if !settled.contains(job) {
            *outcome = if known.contains(job) {
                BatchedJob::AlreadyFinished
            } else {
                BatchedJob::NotJournalled
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use sqlx::PgPool;

    use super::*;

    async fn pool() -> PgPool {
        let url = crate::pg_cluster::fresh_database("batch_journal");
        crate::connect(&url, &crate::PgOptions::default())
            .await
            .expect("connect")
    }

    async fn job(pool: &PgPool, id: &str, state: &str, payload: &str) {
        sqlx::query(
            "INSERT INTO jobs (id, kind, payload, state, max_attempts, created_at, updated_at, \
             run_at) VALUES ($1, 'inbound_message', $2, $3, 8, 1, 1, 1)",
        )
        .bind(id)
        .bind(payload)
        .bind(state)
        .execute(pool)
        .await
        .expect("job");
    }

    async fn row(pool: &PgPool, id: &str) -> Option<(String, i64, String, Option<String>, bool)> {
        sqlx::query_as(
            "SELECT state, attempts, payload, last_error, pushed FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await
        .expect("row")
    }

    #[tokio::test]
    async fn start_and_finish_journal_what_ran() {
        let pool = pool().await;
        job(&pool, "a", "pending", "{}").await;
        job(&pool, "b", "running", "{}").await;
        job(&pool, "c", "done", "{}").await;
        job(&pool, "d", "dead", "{}").await;
        let jobs = ["a", "b", "c", "d", "x", "a"];
        let mut out = vec![BatchedJob::Done; jobs.len()];
        let mut tx = pool.begin().await.expect("begin");
        let live = start(&mut tx, &jobs, &mut out).await.expect("start");
        assert_eq!(live, [0, 1]);
        assert_eq!(
            out[2..],
            [
                BatchedJob::AlreadyFinished,
                BatchedJob::AlreadyFinished,
                BatchedJob::NotJournalled,
                BatchedJob::AlreadyFinished,
            ]
        );
        let ran = ["a", "b"];
        let outcomes = [BatchedJob::Done, BatchedJob::Dead("no channel".into())];
        finish(&mut tx, &ran, &outcomes, 5).await.expect("finish");
        tx.commit().await.expect("commit");
        assert_eq!(
            row(&pool, "a").await,
            Some(("done".into(), 1, "{}".into(), None, false))
        );
        assert_eq!(
            row(&pool, "b").await,
            Some((
                "dead".into(),
                1,
                "{}".into(),
                Some("no channel".into()),
                false
            ))
        );
    }

    /// A second batch with the same job waits for the first one's commit, then finds
    /// the job done and does not run it.
    #[tokio::test]
    async fn a_concurrent_copy_of_a_batch_waits_and_runs_nothing() {
        let pool = pool().await;
        job(&pool, "a", "pending", "{}").await;
        let mut first = pool.begin().await.expect("begin");
        let mut out = vec![BatchedJob::Done];
        assert_eq!(
            start(&mut first, &["a"], &mut out).await.expect("start"),
            [0]
        );
        let second = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut tx = pool.begin().await.expect("begin");
                let mut out = vec![BatchedJob::Done];
                let live = start(&mut tx, &["a"], &mut out).await.expect("start");
                tx.commit().await.expect("commit");
                (live, out)
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !second.is_finished(),
            "the second batch must wait for the first"
        );
        finish(&mut first, &["a"], &[BatchedJob::Done], 5)
            .await
            .expect("finish");
        first.commit().await.expect("commit");
        let (live, out) = second.await.expect("second");
        assert!(live.is_empty());
        assert_eq!(out, [BatchedJob::AlreadyFinished]);
    }

    #[tokio::test]
    async fn settle_journals_jobs_that_ran_without_start() {
        let pool = pool().await;
        let stored = r#"{"channel":3,"external_message_id":"m1","text":"secret"}"#;
        job(&pool, "dead-before", "dead", stored).await;
        job(&pool, "done-before", "done", "{}").await;
        let ran = |job: &'static str| Ran {
            job,
            payload: json!({"channel": 3, "external_message_id": job}),
            max_attempts: 8,
            key: None,
        };
        let jobs = [
            ran("new"),
            ran("dead-before"),
            ran("done-before"),
            ran("dead-unknown"),
            ran("new"),
        ];
        let mut out = vec![
            BatchedJob::Done,
            BatchedJob::Done,
            BatchedJob::Done,
            BatchedJob::Dead("bad".into()),
            BatchedJob::Done,
        ];
        let mut tx = pool.begin().await.expect("begin");
        settle(&mut tx, JobKind::InboundMessage, &jobs, &mut out, 9)
            .await
            .expect("settle");
        tx.commit().await.expect("commit");
        assert_eq!(
            out,
            [
                BatchedJob::Done,
                BatchedJob::Done,
                BatchedJob::AlreadyFinished,
                BatchedJob::NotJournalled,
                BatchedJob::Done,
            ]
        );
        let (state, attempts, payload, _, pushed) = row(&pool, "new").await.expect("new row");
        assert_eq!((state.as_str(), attempts, pushed), ("done", 1, true));
        assert_eq!(
            serde_json::from_str::<Value>(&payload).expect("json"),
            json!({"channel": 3, "external_message_id": "new"})
        );
        let (state, attempts, payload, _, _) = row(&pool, "dead-before").await.expect("row");
        assert_eq!((state.as_str(), attempts), ("done", 1));
        assert_eq!(
            serde_json::from_str::<Value>(&payload).expect("json"),
            json!({"channel": 3, "external_message_id": "m1"}),
            "a done inbound job keeps no text"
        );
        assert_eq!(row(&pool, "done-before").await.expect("row").1, 0);
        assert_eq!(row(&pool, "dead-unknown").await, None);
    }
}
