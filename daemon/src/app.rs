//! The daemon's shared state — settings, store, queue — and the operations that span
//! them: enqueueing a job (journal, then queue) and retrying a dead one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use patchbay_jobs::billing::{self, Prices};
use patchbay_jobs::handlers::{Effects, Notice, NoticeKind};
use patchbay_jobs::model::Channel;
use patchbay_jobs::model::{Account, Id, JobRecord, JobState, now_ms};
use patchbay_jobs::store::{
    ChargeJob, ChargeOutcome, Charged, CheckJob, InboundJob, JournalInsert,
};
use patchbay_jobs::{DomainError, JobError, JobKind, Payload, Store};
use serde_json::{Value, json};

use crate::batcher::Batcher;
use crate::config::{BillingConfig, Settings};
use crate::mail::{self, AccountFigures, Mailer};
use crate::plugin_host::supervisor::Supervisor;
use crate::queue::{Envelope, Queue, QueueError, WorkerBoard};
use tokio_util::sync::CancellationToken;

pub struct App {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub queue: Queue,
    /// Inbound messages from connectors are journalled before they are queued: only
    /// when the queue could lose an acknowledged push (a Redis without `appendonly yes`
    /// and `appendfsync always`, unless `queue.redis_trust_everysec`), see
    /// `queue_batched`. Checked at start and by every sweep.
    pub journal_inbound: AtomicBool,
    pub plugins: Arc<Supervisor>,
    /// This node's identity and channel leases; wake it after changing what runs.
    pub leases: Arc<crate::cluster::Leases>,
    /// Each queue worker: running or not, restarts (`status`, STATUS=).
    pub workers: WorkerBoard,
    pub started: Instant,
    /// `[billing]` as last loaded: SIGHUP may replace it (prices), so read it through
    /// `billing()`, not `settings.raw.billing`, which keeps the values from start.
    pub billing: std::sync::RwLock<Arc<BillingConfig>>,
    pub mailer: Mailer,
    /// Group commit for `inbound_message`, `charge_account` and `balance_check` jobs
    /// (see `batcher`).
    pub inbound: Batcher<InboundJob>,
    pub charges: Batcher<ChargeJob>,
    pub checks: Batcher<CheckJob>,
    /// Cancelled when the daemon starts to stop.
    pub stop: CancellationToken,
    /// Where the metrics, health and dashboard listener is bound (`http.listen`).
    pub http_addr: Option<std::net::SocketAddr>,
}

impl App {
    /// Whether other daemons read this daemon's queue (Redis), so a job pushed back
    /// may reach another node.
    pub fn queue_is_shared(&self) -> bool {
        matches!(self.settings.queue, crate::config::QueueBackend::Redis)
    }

    pub fn queue_name(&self, kind: JobKind) -> String {
        format!("{}:{}", self.settings.raw.queue.namespace, kind.as_str())
    }

    /// Validates, records and queues a job. A job whose idempotency key exists already
    /// is not queued again: its id comes back with `existing = true`.
    ///
    /// Once recorded, the job is accepted even if the queue refuses it: the lost-job
    /// sweep queues it when the queue is back. An error here would make a client retry
    /// a `message.send` that is already recorded, and the client would get it twice.
    pub async fn enqueue(
        &self,
        kind: JobKind,
        payload: Value,
    ) -> Result<(String, bool), DomainError> {
        let rec = self.new_record(kind, payload)?;
        if let JournalInsert::Existing(id) = self.store.journal_insert(&rec).await? {
            return Ok((id, true));
        }
        if let Err(e) = self.push(&rec, 0, None).await {
            tracing::warn!(job = %rec.id, kind = %kind, error = %e, "job recorded, not queued yet");
        }
        Ok((rec.id, false))
    }

    /// Journals a job that can never run as `dead` at once, with the reason and a
    /// bounded copy of its payload (`model::bounded_payload`): an inbound event the
    /// daemon took but cannot store is kept this way, visible in `job.list` and
    /// retryable, instead of being dropped after its connector was told it is
    /// recorded. Returns the new job's id.
    pub async fn record_dead(
        &self,
        kind: JobKind,
        payload: Value,
        reason: &str,
    ) -> Result<String, DomainError> {
        let now = now_ms();
        // One dead job per refused message, however often its messenger redelivers it
        // (a flush that failed for a sibling event keeps it unacknowledged).
        let key = match (payload.get("channel"), payload.get("external_message_id")) {
            (Some(ch), Some(Value::String(m))) => Some(format!("{kind}_refused:{ch}:{m}")),
            _ => None,
        };
        let rec = JobRecord {
            id: ulid::Ulid::new().to_string(),
            kind,
            payload: patchbay_jobs::model::bounded_payload(payload),
            state: JobState::Dead,
            attempts: 1,
            max_attempts: self.settings.max_attempts(kind),
            last_error: Some(reason.to_owned()),
            idempotency_key: key,
            created_at: now,
            updated_at: now,
            run_at: now,
        };
        match self.store.journal_insert(&rec).await? {
            JournalInsert::Inserted => Ok(rec.id),
            JournalInsert::Existing(id) => Ok(id),
        }
    }

    /// [`enqueue`](Self::enqueue) for a job an operator asked for (`job.enqueue`,
    /// `billing.run`): a `billing_run` or `charge_account` must also be for a day that
    /// may be charged now (`billing::check_charge_date`). The daemon's own billing jobs
    /// (the schedule's today, a fan-out of a day that began) do not come this way.
    pub async fn enqueue_requested(
        &self,
        kind: JobKind,
        payload: Value,
    ) -> Result<(String, bool), DomainError> {
        match kind.parse_payload(&payload)? {
            Payload::BillingRun(b) => self.check_charge_date(b.date)?,
            Payload::ChargeAccount(c) => self.check_charge_date(c.date)?,
            _ => {}
        }
        self.enqueue(kind, payload).await
    }

    /// Whether an operator may charge `date` today (`billing.catch_up_days`).
    pub fn check_charge_date(&self, date: NaiveDate) -> Result<(), DomainError> {
        billing::check_charge_date(date, self.today(), self.settings.catch_up_days())
    }

    /// A new pending journal record for a validated payload.
    fn new_record(&self, kind: JobKind, payload: Value) -> Result<JobRecord, DomainError> {
        let parsed = kind.parse_payload(&payload)?;
        let now = now_ms();
        Ok(JobRecord {
            id: ulid::Ulid::new().to_string(),
            kind,
            payload,
            state: JobState::Pending,
            attempts: 0,
            max_attempts: self.settings.max_attempts(kind),
            last_error: None,
            idempotency_key: parsed.idempotency_key(),
            created_at: now,
            updated_at: now,
            run_at: now,
        })
    }

    /// Records and queues many jobs of one kind: one journal transaction and one
    /// batched push. Jobs whose idempotency key exists are skipped.
    pub async fn enqueue_many(
        &self,
        kind: JobKind,
        payloads: Vec<Value>,
    ) -> Result<usize, DomainError> {
        let recs = payloads
            .into_iter()
            .map(|payload| self.new_record(kind, payload))
            .collect::<Result<Vec<_>, _>>()?;
        // Recorded as queued before the push (one journal write per job instead of
        // two); a refused push marks them unqueued below, and a crash between the two
        // leaves them to the sweep's check for jobs queued but never started.
        let inserted = self.store.journal_insert_many(&recs, true).await?;
        let envs: Vec<Envelope> = recs
            .iter()
            .zip(&inserted)
            .filter(|(_, new)| **new)
            .map(|(rec, _)| Envelope {
                id: rec.id.clone(),
                kind: kind.as_str().to_owned(),
                payload: rec.payload.clone(),
                attempt: 0,
            })
            .collect();
        let ids: Vec<String> = envs.iter().map(|e| e.id.clone()).collect();
        if let Err(e) = self.push_timed(kind, &envs).await {
            // Recorded and not queued: the lost-job sweep queues them once the queue
            // is back. (Marking them dead would strand jobs whose idempotency key then
            // makes every later enqueue return them.)
            self.mark_pushed(&ids, false).await;
            return Err(DomainError::Unavailable(format!(
                "queue unavailable: {e}; {} jobs are recorded and will be queued when it is back",
                envs.len()
            )));
        }
        Ok(envs.len())
    }

    /// Queues validated payloads of a kind whose batches journal them when they finish,
    /// without journal rows where that is safe; other kinds go through `enqueue_many`.
    /// These are the hot paths: a journal row per job beside the queue's own was a
    /// third of the store's writes, and the store's single writer bounds both. The
    /// per-job path writes the row of one that fails. The price: such a job shows in
    /// `job.list` once it finished, and while it waits only in the queue depth
    /// (`status`).
    /// * `inbound_message` (connector events) on a queue that loses no acknowledged push
    ///   when its server dies (the SQLite file, Redis with `appendonly yes` and
    ///   `appendfsync always`; with `everysec` only if `queue.redis_trust_everysec`).
    ///   Elsewhere they are journalled first, so the lost-job sweep queues them again
    ///   after Redis restarted without them.
    /// * `charge_account` (billing's fan-out) on the SQLite queue only: its file is as
    ///   durable as the store's. Redis' append-only file, written every second, may lose
    ///   the last second's pushes when Redis itself dies: a charge lost that way would
    ///   go unbilled without a trace, and billing on Redis has no speed target.
    ///
    /// A refused push is an error: a connector is not told its events were taken, and a
    /// fan-out retries.
    pub async fn queue_batched(
        &self,
        kind: JobKind,
        payloads: Vec<Value>,
    ) -> Result<usize, DomainError> {
        let unjournalled = match kind {
            JobKind::InboundMessage => !self.journal_inbound.load(Ordering::Relaxed),
            JobKind::ChargeAccount => matches!(self.queue, Queue::Sqlite(_)),
            _ => false,
        };
        if !unjournalled {
            return self.enqueue_many(kind, payloads).await;
        }
        let envs: Vec<Envelope> = payloads
            .into_iter()
            .map(|payload| Envelope {
                id: ulid::Ulid::new().to_string(),
                kind: kind.as_str().to_owned(),
                payload,
                attempt: 0,
            })
            .collect();
        self.push_timed(kind, &envs)
            .await
            .map_err(|e| DomainError::Unavailable(format!("queue unavailable: {e}")))?;
        Ok(envs.len())
    }

    /// One push of many jobs, timed for `patchbay_queue_push_duration_seconds`.
    async fn push_timed(&self, kind: JobKind, envs: &[Envelope]) -> Result<(), QueueError> {
        let started = Instant::now();
        let pushed = self.queue.push_many(&self.queue_name(kind), envs).await;
        crate::metrics::queue_push(started.elapsed());
        pushed
    }

    /// Reads again whether the queue keeps every job it acknowledged across its own
    /// crash (an operator may change Redis' `appendonly` / `appendfsync` at run time)
    /// and journals inbound messages first while it does not (`queue_batched`). Says
    /// which, at `start` and on every change.
    pub async fn check_queue_persistence(&self, start: bool) {
        let trust_everysec = self.settings.raw.queue.redis_trust_everysec;
        let journal = !self.queue.persists_jobs(trust_everysec).await;
        if self.journal_inbound.swap(journal, Ordering::Relaxed) != journal || start {
            if journal {
                tracing::info!(
                    trust_everysec,
                    "the queue may lose acknowledged jobs when its server dies (Redis without \
                     appendonly yes and appendfsync always): inbound messages are journalled \
                     before they are queued"
                );
            } else {
                tracing::info!(
                    trust_everysec,
                    "the queue keeps its jobs across a restart: inbound messages are queued \
                     without journal rows"
                );
            }
        }
    }

    pub fn prices(&self) -> Prices {
        let b = self.billing();
        Prices {
            default_price: b.default_price,
            by_kind: b.prices.clone(),
        }
    }

    /// Today in the billing time zone.
    pub fn today(&self) -> NaiveDate {
        billing::billing_day(chrono::Utc::now(), self.billing_tz())
    }

    /// Un-suspends the account's channels if its balance now pays for today, and starts
    /// their connectors.
    pub async fn resume(&self, account: Id) -> Result<usize, DomainError> {
        let (channels, noticed) = self
            .store
            .resume_suspended(account, self.today(), &self.prices())
            .await?;
        let n = channels.len();
        if n > 0 {
            self.leases.wake();
        }
        if noticed {
            self.enqueue(JobKind::BalanceCheck, json!({ "account": account }))
                .await?;
        }
        Ok(n)
    }

    /// The first instant (unix ms) after `day` in the billing time zone: channels
    /// created since did not exist that day.
    pub fn day_end(&self, day: NaiveDate) -> i64 {
        billing::day_end(day, self.billing_tz())
    }

    /// The first instant (unix ms) of `day` in the billing time zone: channels removed
    /// before it were not active that day.
    pub fn day_start(&self, day: NaiveDate) -> i64 {
        billing::day_start(day, self.billing_tz())
    }

    fn billing_tz(&self) -> chrono_tz::Tz {
        billing::parse_timezone(&self.billing().timezone).unwrap_or(chrono_tz::UTC)
    }

    /// What follows charges: the connectors of suspended channels stop, and accounts
    /// whose charge recorded a balance e-mail get a `balance_check` to send it.
    pub async fn after_charges(&self, charges: &[(Id, Charged)]) -> Result<(), DomainError> {
        let mut checks = Vec::new();
        for (account, charged) in charges {
            // Both ways a charge goes (its batch, or the per-job path) come here.
            if let ChargeOutcome::Charged { total, .. } = &charged.outcome {
                crate::metrics::charged(*total);
            }
            if let ChargeOutcome::Suspended {
                needed,
                balance,
                channels,
            } = &charged.outcome
            {
                tracing::info!(
                    account,
                    needed,
                    balance,
                    "account cannot pay the day; channels suspended"
                );
                // The store says suspended already: the reconcile loop stops them (not
                // here: a stop may wait out a send in flight, and the batch's other
                // jobs must not wait for it).
                if !channels.is_empty() {
                    self.leases.wake();
                }
            }
            if charged.notices {
                checks.push(json!({ "account": account }));
            }
        }
        if !checks.is_empty() {
            self.enqueue_many(JobKind::BalanceCheck, checks).await?;
        }
        Ok(())
    }

    /// Puts a recorded job on the queue. If the queue refuses, the journal row stays
    /// (a new job pending and not pushed, a retry failed) and the lost-job sweep pushes
    /// it once the queue is back; the caller gets `unavailable`.
    pub async fn push(
        &self,
        rec: &JobRecord,
        attempt: u32,
        delay: Option<Duration>,
    ) -> Result<(), DomainError> {
        let env = Envelope {
            id: rec.id.clone(),
            kind: rec.kind.as_str().to_owned(),
            payload: rec.payload.clone(),
            attempt,
        };
        let pending = rec.state == JobState::Pending;
        let started = Instant::now();
        let pushed = self
            .queue
            .push(&self.queue_name(rec.kind), &env, delay)
            .await;
        crate::metrics::queue_push(started.elapsed());
        if let Err(e) = pushed {
            // A new job stays pending and unqueued, a retry stays failed: either way
            // the lost-job sweep queues it once the queue is back.
            if pending {
                self.mark_pushed(std::slice::from_ref(&rec.id), false).await;
            }
            return Err(DomainError::Unavailable(format!(
                "queue unavailable: {e}; the job {} is recorded and will be queued when it is back",
                rec.id
            )));
        }
        if pending {
            self.mark_pushed(std::slice::from_ref(&rec.id), true).await;
        }
        Ok(())
    }

    /// Tells the journal whether these jobs are queued. Failing to record a push, the
    /// lost-job sweep queues them once more later: a duplicate delivery, which handlers
    /// are built for.
    async fn mark_pushed(&self, ids: &[String], pushed: bool) {
        if let Err(e) = self.store.journal_mark_pushed(ids, pushed).await {
            tracing::warn!(jobs = ids.len(), error = %e, "cannot record whether jobs are queued");
        }
    }

    /// Makes sure the `data_deletion` job of a running run is queued or running: queues
    /// it if it was never queued, revives it if it went dead.
    pub async fn ensure_deletion_job(&self, run: Id) -> Result<(), DomainError> {
        let (id, existing) = self
            .enqueue(JobKind::DataDeletion, json!({ "run": run }))
            .await?;
        if existing && self.store.journal_get(&id).await?.state == JobState::Dead {
            tracing::warn!(run, job = %id, "reviving the dead job of a running deletion run");
            self.retry(&id).await?;
        }
        Ok(())
    }

    pub async fn retry(&self, id: &str) -> Result<JobRecord, DomainError> {
        // A payload this daemon refuses (a cut copy of a job the queue could not
        // decode, an event outside the inbound bounds) would only die again.
        let dead = self.store.journal_get(id).await?;
        if dead.state == JobState::Dead
            && let Err(e) = dead.kind.parse_payload(&dead.payload)
        {
            return Err(DomainError::Conflict(format!(
                "job {id} cannot be retried: its payload is refused ({e})"
            )));
        }
        let rec = self.store.journal_revive(id).await?;
        self.push(&rec, 0, None).await?;
        Ok(rec)
    }

    /// The billing configuration in force now (see the `billing` field).
    pub fn billing(&self) -> Arc<BillingConfig> {
        // Only whole-Arc swaps happen under the lock, so a poisoned one is still sound.
        self.billing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn price(&self, kind: &str) -> i64 {
        let billing = self.billing();
        billing
            .prices
            .get(kind)
            .copied()
            .unwrap_or(billing.default_price)
    }

    /// An account as `account.get` shows it: with its daily total and how many daily
    /// runs it can still pay (SPEC §5: suspended at the run k + 1 days from now).
    pub async fn account_view(&self, account: Account) -> Result<Value, DomainError> {
        let kinds = self.store.active_channel_kinds(account.id).await?;
        let daily_total = patchbay_jobs::billing::daily_total(&App::prices(self), &kinds);
        let days_until_disconnection =
            (daily_total > 0).then(|| account.balance.max(0) / daily_total + 1);
        Ok(json!({
            "id": account.id,
            "name": account.name,
            "currency": account.currency,
            "balance": account.balance,
            "daily_total": daily_total,
            "days_until_disconnection": days_until_disconnection,
            "settings": account.settings,
            "created_at": account.created_at,
        }))
    }
}

#[async_trait::async_trait]
impl Effects for App {
    async fn pause(&self, d: std::time::Duration) {
        tokio::time::sleep(d).await;
    }

    async fn deliver(
        &self,
        channel: &Channel,
        outbound: &Value,
        lease_ms: i64,
    ) -> Result<Option<String>, JobError> {
        // Sends reach here only on the node that runs the channel (`worker::placement`);
        // the fence makes sure of it in the statement that claims the send.
        let fence = self.leases.fence(channel.id).map_err(|_| {
            JobError::Retryable(format!("channel {} does not run on this node", channel.id))
        })?;
        self.plugins
            .deliver(channel, outbound, lease_ms, fence.as_ref())
            .await
    }

    fn prices(&self) -> Prices {
        App::prices(self)
    }

    fn today(&self) -> NaiveDate {
        App::today(self)
    }

    async fn enqueue_many(&self, kind: JobKind, payloads: Vec<Value>) -> Result<(), JobError> {
        App::queue_batched(self, kind, payloads).await?;
        Ok(())
    }

    fn day_end(&self, day: NaiveDate) -> i64 {
        App::day_end(self, day)
    }

    fn day_start(&self, day: NaiveDate) -> i64 {
        App::day_start(self, day)
    }

    async fn charged(&self, charges: &[(Id, Charged)]) -> Result<(), JobError> {
        Ok(self.after_charges(charges).await?)
    }

    async fn account_credited(&self, account: Id) -> Result<(), JobError> {
        self.resume(account).await?;
        Ok(())
    }

    async fn send_notice(&self, notice: &Notice) -> Result<(), JobError> {
        let acc = &notice.account;
        let figures = AccountFigures {
            name: &acc.name,
            currency: &acc.currency,
            balance: acc.balance,
            daily_total: notice.daily_total,
        };
        let mail = match &notice.kind {
            NoticeKind::Warning(w) => mail::balance_warning(
                &notice.to,
                &figures,
                w.days,
                w.disconnect_date,
                &w.message_id(acc.id),
            ),
            NoticeKind::Disconnected { date } => mail::disconnected(
                &notice.to,
                &figures,
                *date,
                &format!("disconnected-{}-{date}@patchbay", acc.id),
            ),
        }?;
        self.mailer.send(&mail).await?;
        tracing::info!(account = acc.id, subject = %mail.subject, "balance e-mail sent");
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    fn deletion_pacing(&self) -> (u32, Duration) {
        let d = &self.settings.raw.deletion;
        (d.batch_size, Duration::from_millis(d.pause_ms))
    }
}
