//! The daemon's shared state — settings, store, queue — and the operations that span
//! them: enqueueing a job (journal, then queue) and retrying a dead one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchbay_jobs::handlers::Effects;
use patchbay_jobs::model::Channel;
use patchbay_jobs::model::{Account, JobRecord, JobState, now_ms};
use patchbay_jobs::store::JournalInsert;
use patchbay_jobs::{DomainError, JobError, JobKind, Store};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::plugin_host::supervisor::Supervisor;
use crate::queue::{Envelope, Queue};

pub struct App {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub queue: Queue,
    pub plugins: Arc<Supervisor>,
    pub started: Instant,
}

impl App {
    pub fn queue_name(&self, kind: JobKind) -> String {
        format!("{}:{}", self.settings.raw.queue.namespace, kind.as_str())
    }

    /// Validates, records and queues a job. A job whose idempotency key exists already
    /// is not queued again: its id comes back with `existing = true`.
    pub async fn enqueue(
        &self,
        kind: JobKind,
        payload: Value,
    ) -> Result<(String, bool), DomainError> {
        let parsed = kind.parse_payload(&payload)?;
        let now = now_ms();
        let rec = JobRecord {
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
        };
        if let JournalInsert::Existing(id) = self.store.journal_insert(&rec).await? {
            return Ok((id, true));
        }
        self.push(&rec, 0, None).await?;
        Ok((rec.id, false))
    }

    /// Puts a recorded job on the queue. If the queue refuses, the job is marked dead
    /// with the reason, so it stays visible and `job.retry` can bring it back.
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
        if let Err(e) = self
            .queue
            .push(&self.queue_name(rec.kind), &env, delay)
            .await
        {
            let reason = format!("queue unavailable: {e}");
            self.store
                .journal_finish(&rec.id, JobState::Dead, Some(&reason), now_ms())
                .await?;
            return Err(DomainError::Unavailable(format!(
                "{reason}; the job {} is recorded as dead and can be retried with job.retry",
                rec.id
            )));
        }
        Ok(())
    }

    pub async fn retry(&self, id: &str) -> Result<JobRecord, DomainError> {
        let rec = self.store.journal_revive(id).await?;
        self.push(&rec, 0, None).await?;
        Ok(rec)
    }

    /// Jobs waiting in the queue, by kind; a backend that cannot answer shows as null.
    pub async fn queue_depths(&self) -> BTreeMap<&'static str, Value> {
        let mut out = BTreeMap::new();
        for kind in JobKind::ALL {
            let depth = match self.queue.depth(&self.queue_name(kind)).await {
                Ok(n) => json!(n),
                Err(e) => {
                    tracing::warn!(error = %e, kind = %kind, "cannot read queue depth");
                    Value::Null
                }
            };
            out.insert(kind.as_str(), depth);
        }
        out
    }

    pub fn price(&self, kind: &str) -> i64 {
        let billing = &self.settings.raw.billing;
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
        let daily_total: i64 = kinds.iter().map(|k| self.price(k)).sum();
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
    async fn deliver(&self, channel: &Channel, outbound: &Value) -> Result<String, JobError> {
        self.plugins.deliver(channel, outbound).await
    }
}
