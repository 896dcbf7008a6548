//! `Billing` on SQLite: charging accounts for billing days, suspension when funds run
//! out, resumption after a top-up.
//!
//! The rules are the domain's (`patchbay_jobs::billing`: `plan_charges`,
//! `charge_new_channel`, `plan_resume`); this file reads the rows they need and writes
//! what they decide — ledger rows, balance changes, suspensions and the balance e-mails
//! due (the `notifications` outbox) — one statement per step for a whole batch. Every
//! transaction here runs on the store's one writer (`BEGIN IMMEDIATE`), so what it reads
//! stays true until it commits; balances still change only by `balance = balance +
//! delta`, in the transaction that writes their ledger rows. The UNIQUE (channel, day)
//! constraint makes a second charge of a day impossible whoever attempts it.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::NaiveDate;
use serde_json::{Value, json};

use patchbay_jobs::billing::{
    self, DayChannel, Funds, LedgerCharge, Notice, Prices, ResumeChannel,
};
use patchbay_jobs::error::DomainError;
use patchbay_jobs::kind::{JobKind, charge_account_key};
use patchbay_jobs::model::{Channel, Id, now_ms};
use patchbay_jobs::store::*;

use crate::SqliteStore;
use crate::batch_journal::{self, Ran};
use crate::rows::*;

type Tx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// Writes ledger charges (one statement).
async fn insert_charges(tx: &mut Tx, charges: &[LedgerCharge], now: i64) -> StoreResult<()> {
    if charges.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = charges
        .iter()
        .map(|c| {
            json!([
                c.account,
                -c.price,
                c.balance_after,
                c.channel,
                c.day.to_string()
            ])
        })
        .collect();
    sqlx::query(
        "INSERT INTO ledger (account_id, kind, amount, balance_after, channel_id, day, created_at) \
         SELECT value ->> 0, 'charge', value ->> 1, value ->> 2, value ->> 3, value ->> 4, $2 \
         FROM json_each($1)",
    )
    .bind(Value::from(rows).to_string())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Adds each delta to its account's balance (one statement): a change, never a balance
/// computed from an earlier read.
async fn add_to_balances(tx: &mut Tx, deltas: &[(Id, i64)]) -> StoreResult<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = deltas.iter().map(|(a, d)| json!([a, d])).collect();
    sqlx::query(
        "UPDATE accounts SET balance = balance + j.d \
         FROM (SELECT value ->> 0 AS id, value ->> 1 AS d FROM json_each($1)) AS j \
         WHERE accounts.id = j.id",
    )
    .bind(Value::from(rows).to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records balance e-mails (one statement); returns the accounts that got a new one.
/// An e-mail recorded before for the same (account, kind, date) is not recorded again.
async fn record_notices(tx: &mut Tx, notices: &[Notice], now: i64) -> StoreResult<HashSet<Id>> {
    if notices.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<Value> = notices
        .iter()
        .map(|n| {
            json!([
                n.account,
                n.kind,
                n.disconnect_date.to_string(),
                n.days,
                n.balance,
                n.daily_total
            ])
        })
        .collect();
    let accounts: Vec<Id> = sqlx::query_scalar(
        "INSERT INTO notifications (account_id, kind, disconnect_date, days, balance, \
         daily_total, created_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, $2 \
         FROM json_each($1) WHERE true ON CONFLICT DO NOTHING RETURNING account_id",
    )
    .bind(Value::from(rows).to_string())
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    Ok(accounts.into_iter().collect())
}

/// The funds of those of `accounts` that exist.
async fn read_funds(tx: &mut Tx, accounts: &[Id]) -> StoreResult<HashMap<Id, Funds>> {
    let rows: Vec<(Id, i64, i64, bool)> = sqlx::query_as(
        "SELECT id, balance, balance_notify_days, suspended_on IS NOT NULL FROM accounts \
         WHERE id IN (SELECT value FROM json_each($1))",
    )
    .bind(Value::from(accounts.to_vec()).to_string())
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, balance, notify_days, suspended)| {
            let funds = Funds {
                balance,
                notify_days,
                suspended,
            };
            (id, funds)
        })
        .collect())
}

/// The channels of these accounts that were active on `day` (the instants
/// `day_start..day_end`), by what the store knows of that day: created before it ended;
/// not removed before it began (`removed_at`); and not suspended then — a suspended
/// channel (or one removed since) counts only if its account's current suspension
/// began after `day` (`accounts.suspended_on`). Earlier suspensions, lifted since, are
/// not recorded: that is why operators may charge only recent days
/// (`billing::check_charge_date`).
async fn active_channels(
    tx: &mut Tx,
    accounts: &[Id],
    day: NaiveDate,
    (day_start, day_end): (i64, i64),
    prices: &Prices,
) -> StoreResult<Vec<(Id, DayChannel)>> {
    // ISO dates compare as strings; a NULL `suspended_on` makes the comparison false.
    let rows: Vec<(Id, Id, String, bool, bool)> = sqlx::query_as(
        "SELECT c.account_id, c.id, c.kind, \
         EXISTS (SELECT 1 FROM ledger l WHERE l.channel_id = c.id AND l.day = $2), \
         c.status NOT IN ('removed', 'suspended') \
         FROM channels c JOIN accounts a ON a.id = c.account_id \
         WHERE c.account_id IN (SELECT value FROM json_each($1)) AND c.created_at < $3 \
         AND CASE c.status \
           WHEN 'removed' THEN c.removed_at >= $4 \
             AND (a.suspended_on IS NULL OR a.suspended_on > $2) \
           WHEN 'suspended' THEN a.suspended_on IS NOT NULL AND a.suspended_on > $2 \
           ELSE TRUE END \
         ORDER BY c.id",
    )
    .bind(Value::from(accounts.to_vec()).to_string())
    .bind(day.to_string())
    .bind(day_end)
    .bind(day_start)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(account, id, kind, paid, running)| {
            let channel = DayChannel {
                id,
                price: prices.price(&kind),
                paid,
                running,
            };
            (account, channel)
        })
        .collect())
}

/// Charges each (account, day, (day_start, day_end)) in order, inside `tx`, as
/// `billing::plan_charges` decides; `None` for an account that does not exist.
async fn charge(
    tx: &mut Tx,
    items: &[(Id, NaiveDate, (i64, i64))],
    prices: &Prices,
    now: i64,
) -> StoreResult<Vec<Option<Charged>>> {
    let ids: Vec<Id> = items.iter().map(|i| i.0).collect();
    let funds = read_funds(tx, &ids).await?;

    // The channels active per (account, day), looked up once per distinct day.
    let mut channels: HashMap<(Id, NaiveDate), Vec<DayChannel>> = HashMap::new();
    let mut days: Vec<(NaiveDate, (i64, i64))> = items.iter().map(|i| (i.1, i.2)).collect();
    days.sort_unstable();
    days.dedup();
    for (day, span) in days {
        let of_day: Vec<Id> = items
            .iter()
            .filter(|i| i.1 == day && funds.contains_key(&i.0))
            .map(|i| i.0)
            .collect();
        for (account, channel) in active_channels(tx, &of_day, day, span, prices).await? {
            channels.entry((account, day)).or_default().push(channel);
        }
    }

    let items: Vec<(Id, NaiveDate)> = items.iter().map(|i| (i.0, i.1)).collect();
    let plan = billing::plan_charges(&items, &funds, channels);
    insert_charges(tx, &plan.charges, now).await?;
    add_to_balances(tx, &plan.deltas).await?;
    let stopped = suspend_accounts(tx, &plan.suspend).await?;
    let noticed = record_notices(tx, &plan.notices, now).await?;
    Ok(billing::charged(&items, plan.outcomes, &stopped, &noticed))
}

/// Suspends every running channel of these accounts (reason `insufficient_funds`) and
/// remembers the unpaid day — the later one for an account suspended already, which a
/// resume pays (`resume_suspended`); returns the suspended channels per account.
async fn suspend_accounts(
    tx: &mut Tx,
    accounts: &[(Id, NaiveDate)],
) -> StoreResult<HashMap<Id, Vec<Id>>> {
    if accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<Value> = accounts
        .iter()
        .map(|(a, d)| json!([a, d.to_string()]))
        .collect();
    let rows = Value::from(rows).to_string();
    let stopped: Vec<(Id, Id)> = sqlx::query_as(
        "UPDATE channels SET status = 'suspended', status_reason = 'insufficient_funds' \
         WHERE account_id IN (SELECT value ->> 0 FROM json_each($1)) \
         AND status NOT IN ('removed', 'suspended') RETURNING account_id, id",
    )
    .bind(&rows)
    .fetch_all(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE accounts SET suspended_on = CASE WHEN suspended_on > j.day \
         THEN suspended_on ELSE j.day END \
         FROM (SELECT value ->> 0 AS id, value ->> 1 AS day FROM json_each($1)) AS j \
         WHERE accounts.id = j.id",
    )
    .bind(&rows)
    .execute(&mut **tx)
    .await?;
    let mut by_account: HashMap<Id, Vec<Id>> = HashMap::new();
    for (account, channel) in stopped {
        by_account.entry(account).or_default().push(channel);
    }
    Ok(by_account)
}

async fn charge_accounts(
    store: &SqliteStore,
    jobs: &[ChargeJob],
    prices: &Prices,
) -> StoreResult<Vec<(BatchedJob, Option<Charged>)>> {
    let mut out = vec![BatchedJob::Done; jobs.len()];
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    let keys: Vec<String> = jobs
        .iter()
        .map(|j| charge_account_key(j.account, j.day))
        .collect();
    let ids: Vec<&str> = jobs.iter().map(|j| j.job.as_str()).collect();
    // The journal rows of these jobs, and those holding their (account, day) keys.
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT id, idempotency_key, state FROM jobs WHERE id IN (SELECT value FROM json_each($1)) \
         UNION ALL SELECT id, idempotency_key, state FROM jobs \
         WHERE idempotency_key IN (SELECT value FROM json_each($2))",
    )
    .bind(Value::from(ids.clone()).to_string())
    .bind(Value::from(keys.clone()).to_string())
    .fetch_all(&mut *tx)
    .await?;
    let live = billing::charges_to_run(&ids, &keys, &rows, &mut out);
    let items: Vec<(Id, NaiveDate, (i64, i64))> = live
        .iter()
        .filter(|l| l.charge)
        .map(|l| {
            let j = &jobs[l.index];
            (j.account, j.day, (j.day_start, j.day_end))
        })
        .collect();
    let mut charged = charge(&mut tx, &items, prices, now).await?.into_iter();
    let mut ran = Vec::with_capacity(live.len());
    let mut ran_out = Vec::with_capacity(live.len());
    let mut results: Vec<Option<Charged>> = vec![None; jobs.len()];
    for l in &live {
        let j = &jobs[l.index];
        let outcome = if l.charge {
            let c = charged.next().flatten();
            let outcome = match &c {
                Some(_) => BatchedJob::Done,
                None => BatchedJob::Dead(format!("account {} does not exist", j.account)),
            };
            results[l.index] = c;
            outcome
        } else {
            BatchedJob::Done
        };
        ran_out.push(outcome);
        ran.push(Ran {
            job: &j.job,
            payload: json!({ "account": j.account, "date": j.day }),
            max_attempts: j.max_attempts,
            // A journalled job's row has its key already (or, if another row holds it,
            // must not get it).
            key: (!l.journalled).then(|| keys[l.index].clone()),
        });
    }
    batch_journal::settle(&mut tx, JobKind::ChargeAccount, &ran, &mut ran_out, now).await?;
    tx.commit().await?;
    for (l, o) in live.iter().zip(ran_out) {
        out[l.index] = o;
    }
    Ok(out.into_iter().zip(results).collect())
}

#[async_trait]
impl Billing for SqliteStore {
    async fn add_channel_charged(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Channel, bool)> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let funds = read_funds(&mut tx, &[account])
            .await?
            .remove(&account)
            .ok_or_else(|| DomainError::not_found("account", account))?;
        let running: Vec<String> = sqlx::query_scalar(
            "SELECT kind FROM channels WHERE account_id = $1 \
             AND status NOT IN ('removed', 'suspended')",
        )
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        let charge = billing::charge_new_channel(account, funds, kind, &running, prices, day)?;
        let row = sqlx::query(concat!(
            "INSERT INTO channels (account_id, kind, name, config, status, created_at) \
             VALUES ($1, $2, $3, $4, 'connecting', $5) RETURNING ",
            channel_columns!()
        ))
        .bind(account)
        .bind(kind)
        .bind(name)
        .bind(config.to_string())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let channel = decode::<Channel, _>(&row)?;
        let ledger = LedgerCharge {
            account,
            channel: channel.id,
            day,
            price: charge.price,
            balance_after: charge.balance_after,
        };
        insert_charges(&mut tx, &[ledger], now).await?;
        add_to_balances(&mut tx, &[(account, -charge.price)]).await?;
        let noticed = record_notices(&mut tx, charge.notice.as_slice(), now).await?;
        tx.commit().await?;
        Ok((channel, !noticed.is_empty()))
    }

    async fn charge_day(
        &self,
        account: Id,
        day: NaiveDate,
        day_start: i64,
        day_end: i64,
        prices: &Prices,
    ) -> StoreResult<Charged> {
        let mut tx = self.begin_write().await?;
        let items = [(account, day, (day_start, day_end))];
        let charged = charge(&mut tx, &items, prices, now_ms())
            .await?
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| DomainError::not_found("account", account))?;
        tx.commit().await?;
        Ok(charged)
    }

    async fn charge_accounts(
        &self,
        jobs: &[ChargeJob],
        prices: &Prices,
    ) -> StoreResult<Vec<(BatchedJob, Option<Charged>)>> {
        charge_accounts(self, jobs, prices).await
    }

    async fn resume_suspended(
        &self,
        account: Id,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Vec<Channel>, bool)> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let (balance, notify_days, suspended_on): (i64, i64, Option<String>) = sqlx::query_as(
            "SELECT balance, balance_notify_days, suspended_on FROM accounts WHERE id = $1",
        )
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| DomainError::not_found("account", account))?;
        let suspended_on = suspended_on.and_then(|d| d.parse::<NaiveDate>().ok());
        let day = billing::resume_day(suspended_on, day);
        let funds = Funds {
            balance,
            notify_days,
            suspended: suspended_on.is_some(),
        };
        let channels: Vec<ResumeChannel> = sqlx::query_as::<_, (Id, String, String, bool)>(
            "SELECT c.id, c.kind, c.status, \
             EXISTS (SELECT 1 FROM ledger l WHERE l.channel_id = c.id AND l.day = $2) \
             FROM channels c WHERE c.account_id = $1 AND c.status <> 'removed' ORDER BY c.id",
        )
        .bind(account)
        .bind(day.to_string())
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|(id, kind, status, paid)| ResumeChannel {
            id,
            price: prices.price(&kind),
            suspended: status == "suspended",
            paid,
        })
        .collect();
        let Some(plan) = billing::plan_resume(account, funds, day, &channels) else {
            return Ok((Vec::new(), false));
        };
        insert_charges(&mut tx, &plan.charges, now).await?;
        add_to_balances(&mut tx, &[(account, plan.delta)]).await?;
        sqlx::query("UPDATE accounts SET suspended_on = NULL WHERE id = $1")
            .bind(account)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(concat!(
            "UPDATE channels SET status = 'connecting', status_reason = NULL \
             WHERE account_id = $1 AND status = 'suspended' RETURNING ",
            channel_columns!()
        ))
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        let resumed = rows
            .iter()
            .map(decode::<Channel, _>)
            .collect::<StoreResult<Vec<_>>>()?;
        let noticed = record_notices(&mut tx, plan.notice.as_slice(), now).await?;
        tx.commit().await?;
        Ok((resumed, !noticed.is_empty()))
    }

    async fn suspended_accounts(&self) -> StoreResult<Vec<Id>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT account_id FROM channels WHERE status = 'suspended' ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
