//! The job journal: the state of every job the daemon has taken, whatever the queue backend.

use async_trait::async_trait;

use super::StoreResult;
use crate::kind::JobKind;
use crate::model::{JobRecord, JobState};

/// What `journal_insert` found: a job with the same idempotency key may exist already.
#[derive(Debug, PartialEq, Eq)]
pub enum JournalInsert {
    Inserted,
    Existing(String),
}

#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
    pub limit: u32,
    /// Jobs to skip, newest first (paging).
    pub offset: u32,
}

impl JobFilter {
    /// The WHERE clause both stores use, with `$1`… for the values returned (bind them
    /// in order, then the limit and the offset). Only the filters that are set appear,
    /// so the `(state, kind)` index serves every list: a kind alone is asked for under
    /// every state (a handful of index ranges), not by scanning the journal.
    pub fn sql_where(&self) -> (String, Vec<&'static str>) {
        match (self.state, self.kind) {
            (Some(state), Some(kind)) => (
                "state = $1 AND kind = $2".into(),
                vec![state.as_str(), kind.as_str()],
            ),
            (Some(state), None) => ("state = $1".into(), vec![state.as_str()]),
            (None, Some(kind)) => {
                let states: Vec<String> = JobState::ALL
                    .iter()
                    .map(|s| format!("'{}'", s.as_str()))
                    .collect();
                (
                    format!("state IN ({}) AND kind = $1", states.join(", ")),
                    vec![kind.as_str()],
                )
            }
            (None, None) => ("TRUE".into(), Vec::new()),
        }
    }
}

/// The job journal: the state of every job, whatever the queue backend.
#[async_trait]
pub trait Journal: Send + Sync {
    /// Records a job before it is pushed. A job whose idempotency key is taken is not
    /// recorded, and the existing job's id is returned.
    async fn journal_insert(&self, rec: &JobRecord) -> StoreResult<JournalInsert>;

    /// `journal_insert` for many jobs in one transaction; `true` where recorded.
    /// `pushed` records them as queued already: the caller is about to push them and
    /// marks them unpushed if the push fails, which saves a journal write per job on
    /// the hot paths; a crash in between leaves them to the sweep's stale-queue check.
    async fn journal_insert_many(&self, recs: &[JobRecord], pushed: bool)
    -> StoreResult<Vec<bool>>;

    async fn journal_get(&self, id: &str) -> StoreResult<JobRecord>;

    /// The job holding this idempotency key, if any.
    async fn journal_by_key(&self, key: &str) -> StoreResult<Option<JobRecord>>;

    async fn journal_list(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>>;

    /// Marks the job running and counts the attempt; `None` if it is already done or
    /// dead (a redelivered copy). `rec` recreates a missing entry, unless another entry
    /// holds its idempotency key (then `None`: that entry's job is the one for the key).
    async fn journal_start(&self, rec: &JobRecord) -> StoreResult<Option<JobRecord>>;

    async fn journal_finish(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        run_at: i64,
    ) -> StoreResult<()>;

    /// Records `rec`'s job `dead` with `reason` in one statement that reads nothing
    /// back: an existing row (whose payload may be past repair) keeps its payload and
    /// counts the attempt, a missing one is written from `rec`; a done or dead row, or
    /// another row holding `rec`'s idempotency key, is left as it is. For jobs the
    /// queue rejected, where reading the row could fail for good.
    async fn journal_mark_dead(&self, rec: &JobRecord, reason: &str) -> StoreResult<()>;

    /// Deletes up to `limit` done jobs created and finished before `before` (journal
    /// retention); returns how many went. Dead jobs stay until someone retries them.
    async fn journal_purge(&self, before: i64, limit: u32) -> StoreResult<u64>;

    /// Records whether these jobs reached the queue (a failed push leaves them to the sweep).
    async fn journal_mark_pushed(&self, ids: &[String], pushed: bool) -> StoreResult<()>;

    /// Claims up to `limit` jobs the queue lost, to be queued again: pending jobs recorded
    /// more than `grace_ms` ago that never reached the queue (the daemon died between
    /// journal and queue), and failed jobs whose retry is `grace_ms` overdue (it died
    /// before queueing the retry), and pending jobs the queue took more than `stale_ms`
    /// ago that no worker has started (a queue that lost its data: a Redis restarted
    /// without persistence). A claimed job is `pending`, unpushed, with a fresh
    /// `updated_at`: two daemons sweeping one store never claim it within the grace, and
    /// one whose push never happens is claimed again after it.
    async fn journal_claim_lost(
        &self,
        now: i64,
        grace_ms: i64,
        stale_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<JobRecord>>;

    /// Moves a dead job back to pending with a fresh attempt budget.
    async fn journal_revive(&self, id: &str) -> StoreResult<JobRecord>;

    async fn journal_counts(&self) -> StoreResult<Vec<(JobKind, JobState, i64)>>;

    /// `journal_counts` without the done jobs, which a long retention makes the bulk
    /// of the journal: cheap enough for every metrics scrape (an index range per state).
    async fn journal_open_counts(&self) -> StoreResult<Vec<(JobKind, JobState, i64)>>;
}
