//! The journal side of running a batch of jobs in one store transaction: which jobs of
//! the batch still have to run, and their outcomes committed with their effects.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};

use patchbay_jobs::kind::JobKind;
use patchbay_jobs::model::job_created_at;
use patchbay_jobs::store::{BatchedJob, StoreResult};

/// The payload a finished `inbound_message` job keeps in the journal: which message it
/// was, not its text or sender. The message itself lives in `messages`, where a data
/// deletion run can reach it; a copy here would outlive the deletion.
pub(super) const SCRUBBED_INBOUND: &str = "CASE WHEN kind = 'inbound_message' THEN \
     json_object('channel', payload ->> 'channel', \
     'external_message_id', payload ->> 'external_message_id') ELSE payload END";

type Tx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// Reads the jobs' journal states; returns the indexes of the jobs to run and fills
/// `out` for the others: no journal row (`NotJournalled`), done or dead already, or the
/// same job twice in one batch (`AlreadyFinished`).
pub(super) async fn start(
    tx: &mut Tx,
    jobs: &[&str],
    out: &mut [BatchedJob],
) -> StoreResult<Vec<usize>> {
    let states: HashMap<String, String> =
        sqlx::query_as("SELECT id, state FROM jobs WHERE id IN (SELECT value FROM json_each($1))")
            .bind(Value::from(jobs.to_vec()).to_string())
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

/// Journals each job's outcome: `Done` jobs done, `Dead` ones dead with the reason,
/// each counting one attempt. Jobs that did not run are left as they are.
pub(super) async fn finish(
    tx: &mut Tx,
    jobs: &[&str],
    out: &[BatchedJob],
    now: i64,
) -> StoreResult<()> {
    let done: Vec<&str> = jobs
        .iter()
        .zip(out)
        .filter(|(_, o)| **o == BatchedJob::Done)
        .map(|(j, _)| *j)
        .collect();
    sqlx::query(
        "UPDATE jobs SET state = 'done', attempts = attempts + 1, updated_at = $2 \
         WHERE id IN (SELECT value FROM json_each($1)) AND state NOT IN ('done', 'dead')",
    )
    .bind(Value::from(done).to_string())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    for (job, outcome) in jobs.iter().zip(out) {
        if let BatchedJob::Dead(reason) = outcome {
            sqlx::query(
                "UPDATE jobs SET state = 'dead', attempts = attempts + 1, last_error = $1, \
                 updated_at = $2 WHERE id = $3 AND state NOT IN ('done', 'dead')",
            )
            .bind(reason)
            .bind(now)
            .bind(*job)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// A job of a batch that ran without `start`, as `settle` journals it.
pub(super) struct Ran<'a> {
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
pub(super) async fn settle(
    tx: &mut Tx,
    kind: JobKind,
    jobs: &[Ran<'_>],
    out: &mut [BatchedJob],
    now: i64,
) -> StoreResult<()> {
    let done: Vec<Value> = jobs
        .iter()
        .zip(out.iter())
        .filter(|(_, o)| **o == BatchedJob::Done)
        .map(|(j, _)| {
            let created = job_created_at(j.job, now);
            json!([j.job, j.payload, j.max_attempts, created, j.key])
        })
        .collect();
    // `pushed` is true for the inserted rows: the sweep must never queue a done job.
    let mut settled: HashSet<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, \
         created_at, updated_at, run_at, pushed, idempotency_key) \
         SELECT value ->> 0, $3, value -> 1, \
         'done', 1, value ->> 2, value ->> 3, $2, $2, TRUE, value ->> 4 \
         FROM json_each($1) WHERE true \
         ON CONFLICT (id) DO UPDATE SET state = 'done', attempts = attempts + 1, \
         updated_at = excluded.updated_at, payload = {SCRUBBED_INBOUND} \
         WHERE state <> 'done' \
         RETURNING id"
    )))
    .bind(Value::from(done).to_string())
    .bind(now)
    .bind(kind.as_str())
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    for (job, outcome) in jobs.iter().map(|j| j.job).zip(out.iter()) {
        if let BatchedJob::Dead(reason) = outcome {
            let dead: Option<String> = sqlx::query_scalar(
                "UPDATE jobs SET state = 'dead', attempts = attempts + 1, last_error = $1, \
                 updated_at = $2 WHERE id = $3 AND state NOT IN ('done', 'dead') RETURNING id",
            )
            .bind(reason)
            .bind(now)
            .bind(job)
            .fetch_optional(&mut **tx)
            .await?;
            settled.extend(dead);
        }
    }
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
        sqlx::query_scalar("SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each($1))")
            .bind(Value::from(rest).to_string())
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
