//! `Billing` on PostgreSQL: charging accounts for billing days, suspension when funds
//! run out, resumption after a top-up.
//!
//! The rules are the domain's (`patchbay_jobs::billing`: `plan_charges`,
//! `charge_new_channel`, `plan_resume`); this file reads the rows they need and writes
//! what they decide. A batch of accounts is a handful of statements whatever its size:
//! rows go in and out as arrays (`UNNEST`).
//!
//! Locking, the same in every transaction here: the account rows first, `FOR NO KEY
//! UPDATE` in ascending id order (two batches over the same accounts never deadlock;
//! see `accounts` for why not `FOR UPDATE`), and only then the reads a decision rests
//! on — balances, the channels and which of them the ledger holds paid, the journal
//! rows of the charge jobs. A second daemon charging the same accounts waits for the
//! lock, then reads the first one's ledger rows and journal and charges nothing twice;
//! a top-up waits as well, and balances change only by `balance = balance + delta`,
//! so none is lost. UNIQUE (channel, day) stays the rule that no day is charged twice.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::NaiveDate;
use serde_json::json;

use patchbay_jobs::billing::{
    self, DayChannel, Funds, LedgerCharge, Notice, Prices, ResumeChannel,
};
use patchbay_jobs::channel_columns;
use patchbay_jobs::error::DomainError;
use patchbay_jobs::kind::{JobKind, charge_account_key};
use patchbay_jobs::model::{Channel, Id, now_ms};
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;

use crate::PgStore;
use crate::batch_journal::{self, Ran};

type Tx = sqlx::Transaction<'static, sqlx::Postgres>;

/// The accounts of a charge, locked.
struct Locked {
    funds: HashMap<Id, Funds>,
    /// The day each suspended one's suspension could not pay (`accounts.suspended_on`).
    suspended_on: HashMap<Id, String>,
}

/// Locks these accounts' rows in ascending id order until the commit and reads their
/// funds; accounts that do not exist are left out.
async fn lock_accounts(tx: &mut Tx, accounts: &[Id]) -> StoreResult<Locked> {
    let mut ids = accounts.to_vec();
    ids.sort_unstable();
    ids.dedup();
    // The rows are locked in the order the sort returns them.
    let rows: Vec<(Id, i64, i64, Option<String>)> = sqlx::query_as(
        "SELECT id, balance, balance_notify_days, suspended_on FROM accounts \
         WHERE id = ANY($1::BIGINT[]) ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut locked = Locked {
        funds: HashMap::with_capacity(rows.len()),
        suspended_on: HashMap::new(),
    };
    for (id, balance, notify_days, suspended_on) in rows {
        let funds = Funds {
            balance,
            notify_days,
            suspended: suspended_on.is_some(),
        };
        locked.funds.insert(id, funds);
        if let Some(day) = suspended_on {
            locked.suspended_on.insert(id, day);
        }
    }
    Ok(locked)
}

/// Writes ledger charges (one statement). Every charged channel's account is locked.
async fn insert_charges(tx: &mut Tx, charges: &[LedgerCharge], now: i64) -> StoreResult<()> {
    if charges.is_empty() {
        return Ok(());
    }
    let accounts: Vec<Id> = charges.iter().map(|c| c.account).collect();
    let amounts: Vec<i64> = charges.iter().map(|c| -c.price).collect();
    let after: Vec<i64> = charges.iter().map(|c| c.balance_after).collect();
    let channels: Vec<Id> = charges.iter().map(|c| c.channel).collect();
    let days: Vec<String> = charges.iter().map(|c| c.day.to_string()).collect();
    sqlx::query(
        "INSERT INTO ledger (account_id, kind, amount, balance_after, channel_id, day, created_at) \
         SELECT t.account_id, 'charge', t.amount, t.balance_after, t.channel_id, t.day, $6 \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[]) \
         AS t(account_id, amount, balance_after, channel_id, day)",
    )
    .bind(&accounts)
    .bind(&amounts)
    .bind(&after)
    .bind(&channels)
    .bind(&days)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Adds each delta to its (locked) account's balance, in one statement: a change, never
/// a balance computed from an earlier read.
async fn add_to_balances(tx: &mut Tx, deltas: &[(Id, i64)]) -> StoreResult<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    let (ids, deltas): (Vec<Id>, Vec<i64>) = deltas.iter().copied().unzip();
    sqlx::query(
        "UPDATE accounts SET balance = accounts.balance + t.delta \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS t(id, delta) WHERE accounts.id = t.id",
    )
    .bind(&ids)
    .bind(&deltas)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records balance e-mails (one statement); returns the accounts that got a new one.
/// An e-mail recorded before for the same (account, kind, date) is not recorded again
/// (`ON CONFLICT DO NOTHING`: its writers hold the account's lock, so none is racing).
async fn record_notices(tx: &mut Tx, notices: &[Notice], now: i64) -> StoreResult<HashSet<Id>> {
    if notices.is_empty() {
        return Ok(HashSet::new());
    }
    let accounts: Vec<Id> = notices.iter().map(|n| n.account).collect();
    let kinds: Vec<&str> = notices.iter().map(|n| n.kind.as_str()).collect();
    let dates: Vec<String> = notices
        .iter()
        .map(|n| n.disconnect_date.to_string())
        .collect();
    let days: Vec<i64> = notices.iter().map(|n| n.days).collect();
    let balances: Vec<i64> = notices.iter().map(|n| n.balance).collect();
    let totals: Vec<i64> = notices.iter().map(|n| n.daily_total).collect();
    let recorded: Vec<Id> = sqlx::query_scalar(
        "INSERT INTO notifications (account_id, kind, disconnect_date, days, balance, \
         daily_total, created_at) \
         SELECT t.*, $7 FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], \
         $5::BIGINT[], $6::BIGINT[]) AS t \
         ON CONFLICT DO NOTHING RETURNING account_id",
    )
    .bind(&accounts)
    .bind(&kinds)
    .bind(&dates)
    .bind(&days)
    .bind(&balances)
    .bind(&totals)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    Ok(recorded.into_iter().collect())
}

/// One (account, day) to charge, with the instants `day_start..day_end` of the day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    account: Id,
    day: NaiveDate,
    day_start: i64,
    day_end: i64,
}

/// The channels active per (account, day) of `items` (all in one statement), by what
/// the store knows of that day: created before it ended; not removed before it began
/// (`removed_at`); and not suspended then — a suspended channel (or one removed since)
/// counts only if its account's current suspension began after the day
/// (`accounts.suspended_on`, read under the lock). Earlier suspensions, lifted since,
/// are not recorded: that is why operators may charge only recent days
/// (`billing::check_charge_date`). The accounts are locked, so no charge or resume of
/// theirs runs meanwhile.
async fn active_channels(
    tx: &mut Tx,
    items: &[Item],
    locked: &Locked,
    prices: &Prices,
) -> StoreResult<HashMap<(Id, NaiveDate), Vec<DayChannel>>> {
    // Each (account, day) once: twice would list its channels twice.
    let mut seen = HashSet::new();
    let items: Vec<&Item> = items
        .iter()
        .filter(|i| seen.insert((i.account, i.day)))
        .collect();
    let mut channels: HashMap<(Id, NaiveDate), Vec<DayChannel>> = HashMap::new();
    if items.is_empty() {
        return Ok(channels);
    }
    let accounts: Vec<Id> = items.iter().map(|i| i.account).collect();
    let days: Vec<String> = items.iter().map(|i| i.day.to_string()).collect();
    let starts: Vec<i64> = items.iter().map(|i| i.day_start).collect();
    let ends: Vec<i64> = items.iter().map(|i| i.day_end).collect();
    let suspended_on: Vec<Option<&str>> = items
        .iter()
        .map(|i| locked.suspended_on.get(&i.account).map(String::as_str))
        .collect();
    // ISO dates compare as strings; a NULL `suspended_on` makes the comparison false.
    // `i.n` numbers the items, so each row finds its item again. Whether the ledger
    // holds a channel's day is a LATERAL probe of the (channel_id, day) index per
    // channel: an EXISTS may be planned as a hash of the whole ledger, which grows by
    // every channel every day.
    let rows: Vec<(i64, Id, String, bool, bool)> = sqlx::query_as(
        "SELECT i.n, c.id, c.kind, p.paid IS NOT NULL, \
         c.status NOT IN ('removed', 'suspended') \
         FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[]) \
           WITH ORDINALITY AS i(account_id, day, day_start, day_end, suspended_on, n) \
         JOIN channels c ON c.account_id = i.account_id \
         LEFT JOIN LATERAL (SELECT TRUE AS paid FROM ledger l \
           WHERE l.channel_id = c.id AND l.day = i.day LIMIT 1) p ON TRUE \
         WHERE c.created_at < i.day_end \
         AND CASE c.status \
           WHEN 'removed' THEN c.removed_at >= i.day_start \
             AND (i.suspended_on IS NULL OR i.suspended_on > i.day) \
           WHEN 'suspended' THEN i.suspended_on IS NOT NULL AND i.suspended_on > i.day \
           ELSE TRUE END \
         ORDER BY c.id",
    )
    .bind(&accounts)
    .bind(&days)
    .bind(&starts)
    .bind(&ends)
    .bind(&suspended_on)
    .fetch_all(&mut **tx)
    .await?;
    for (n, id, kind, paid, running) in rows {
        // ORDINALITY counts from 1.
        let Some(item) = usize::try_from(n - 1).ok().and_then(|n| items.get(n)) else {
            return Err(DomainError::Unavailable(format!(
                "active channels: no item {n} in a batch of {}",
                items.len()
            )));
        };
        channels
            .entry((item.account, item.day))
            .or_default()
            .push(DayChannel {
                id,
                price: prices.price(&kind),
                paid,
                running,
            });
    }
    Ok(channels)
}

/// Suspends every running channel of these (locked) accounts, reason
/// `insufficient_funds`, and remembers the unpaid day — the later one for an account
/// suspended already, which a resume pays (`resume_suspended`); returns the suspended
/// channels per account, in id order.
async fn suspend_accounts(
    tx: &mut Tx,
    accounts: &[(Id, NaiveDate)],
) -> StoreResult<HashMap<Id, Vec<Id>>> {
    if accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<Id> = accounts.iter().map(|a| a.0).collect();
    let days: Vec<String> = accounts.iter().map(|a| a.1.to_string()).collect();
    let stopped: Vec<(Id, Id)> = sqlx::query_as(
        "UPDATE channels SET status = 'suspended', status_reason = 'insufficient_funds' \
         WHERE account_id = ANY($1::BIGINT[]) AND status NOT IN ('removed', 'suspended') \
         RETURNING account_id, id",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    // GREATEST skips a NULL: an account not suspended before takes the day.
    sqlx::query(
        "UPDATE accounts SET suspended_on = GREATEST(accounts.suspended_on, t.day) \
         FROM UNNEST($1::BIGINT[], $2::TEXT[]) AS t(id, day) WHERE accounts.id = t.id",
    )
    .bind(&ids)
    .bind(&days)
    .execute(&mut **tx)
    .await?;
    let mut by_account: HashMap<Id, Vec<Id>> = HashMap::new();
    for (account, channel) in stopped {
        by_account.entry(account).or_default().push(channel);
    }
    for list in by_account.values_mut() {
        list.sort_unstable();
    }
    Ok(by_account)
}

/// Charges each item in order inside `tx`, as `billing::plan_charges` decides; `None`
/// for an account that does not exist. `locked` are the items' accounts.
async fn charge(
    tx: &mut Tx,
    items: &[Item],
    locked: &Locked,
    prices: &Prices,
    now: i64,
) -> StoreResult<Vec<Option<Charged>>> {
    let known: Vec<Item> = items
        .iter()
        .filter(|i| locked.funds.contains_key(&i.account))
        .copied()
        .collect();
    let channels = active_channels(tx, &known, locked, prices).await?;
    let items: Vec<(Id, NaiveDate)> = items.iter().map(|i| (i.account, i.day)).collect();
    let plan = billing::plan_charges(&items, &locked.funds, channels);
    insert_charges(tx, &plan.charges, now).await?;
    add_to_balances(tx, &plan.deltas).await?;
    let stopped = suspend_accounts(tx, &plan.suspend).await?;
    let noticed = record_notices(tx, &plan.notices, now).await?;
    Ok(billing::charged(&items, plan.outcomes, &stopped, &noticed))
}

async fn charge_accounts(
    store: &PgStore,
    jobs: &[ChargeJob],
    prices: &Prices,
) -> StoreResult<Vec<(BatchedJob, Option<Charged>)>> {
    let mut out = vec![BatchedJob::Done; jobs.len()];
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = store.pool.begin().await?;
    let now = now_ms();
    // The batch's accounts first (see the module doc), then their jobs' journal.
    let accounts: Vec<Id> = jobs.iter().map(|j| j.account).collect();
    let locked = lock_accounts(&mut tx, &accounts).await?;
    let keys: Vec<String> = jobs
        .iter()
        .map(|j| charge_account_key(j.account, j.day))
        .collect();
    let ids: Vec<&str> = jobs.iter().map(|j| j.job.as_str()).collect();
    // The jobs' rows, and those holding their (account, day) keys. A key is written
    // only by a charge of that account (which holds its lock: committed, or not yet
    // begun) or by an enqueue (which does not lock; see `settle` below). One index
    // probe per id and per key (LATERAL ... LIMIT 1): with `= ANY` the planner, whose
    // statistics may predate the run, scanned the whole journal for every batch.
    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT j.* FROM UNNEST($1::TEXT[]) AS k(id) CROSS JOIN LATERAL \
           (SELECT id, idempotency_key, state FROM jobs WHERE jobs.id = k.id LIMIT 1) j \
         UNION ALL \
         SELECT j.* FROM UNNEST($2::TEXT[]) AS k(key) CROSS JOIN LATERAL \
           (SELECT id, idempotency_key, state FROM jobs \
            WHERE jobs.idempotency_key = k.key LIMIT 1) j",
    )
    .bind(&ids)
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    let live = billing::charges_to_run(&ids, &keys, &rows, &mut out);
    let items: Vec<Item> = live
        .iter()
        .filter(|l| l.charge)
        .map(|l| {
            let j = &jobs[l.index];
            Item {
                account: j.account,
                day: j.day,
                day_start: j.day_start,
                day_end: j.day_end,
            }
        })
        .collect();
    let mut charged = charge(&mut tx, &items, &locked, prices, now)
        .await?
        .into_iter();
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
    // An enqueue may have written a key of this batch since it was read (it takes no
    // account lock), and the new row's key would then violate jobs_idempotency where
    // SQLite's serial writer would have succeeded. The charges are written and hold
    // (a (channel, day) once, whoever holds the key): the settle runs in a savepoint,
    // and if it fails, once more without the keys.
    let mut first = sqlx::Connection::begin(&mut *tx).await?;
    let mut settled = ran_out.clone();
    match batch_journal::settle(&mut first, JobKind::ChargeAccount, &ran, &mut settled, now).await {
        Ok(()) => first.commit().await?,
        Err(e) => {
            first.rollback().await?;
            tracing::debug!(error = %e, "charge batch: journal settled again without keys");
            for r in &mut ran {
                r.key = None;
            }
            settled = ran_out;
            batch_journal::settle(&mut tx, JobKind::ChargeAccount, &ran, &mut settled, now).await?;
        }
    }
    tx.commit().await?;
    for (l, o) in live.iter().zip(settled) {
        out[l.index] = o;
    }
    Ok(out.into_iter().zip(results).collect())
}

#[async_trait]
impl Billing for PgStore {
    async fn add_channel_charged(
        &self,
        account: Id,
        kind: &str,
        name: &str,
        config: &serde_json::Value,
        day: NaiveDate,
        prices: &Prices,
    ) -> StoreResult<(Channel, bool)> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        // The account's lock: its balance and running channels hold until the commit.
        let funds = lock_accounts(&mut tx, &[account])
            .await?
            .funds
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
        let mut tx = self.pool.begin().await?;
        let locked = lock_accounts(&mut tx, &[account]).await?;
        let item = Item {
            account,
            day,
            day_start,
            day_end,
        };
        let charged = charge(&mut tx, &[item], &locked, prices, now_ms())
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
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        // The account's lock: a charge of the account waits, and so does a second
        // resume, which then finds nothing suspended.
        let (balance, notify_days, suspended_on): (i64, i64, Option<String>) = sqlx::query_as(
            "SELECT balance, balance_notify_days, suspended_on FROM accounts WHERE id = $1 \
             FOR NO KEY UPDATE",
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
        // Locks the channels too: a removal racing the resume must not leave a charge
        // for a channel that is not resumed.
        let channels: Vec<ResumeChannel> = sqlx::query_as::<_, (Id, String, String, bool)>(
            "SELECT c.id, c.kind, c.status, \
             EXISTS (SELECT 1 FROM ledger l WHERE l.channel_id = c.id AND l.day = $2) \
             FROM channels c WHERE c.account_id = $1 AND c.status <> 'removed' ORDER BY c.id \
             FOR NO KEY UPDATE OF c",
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
        sqlx::query(
            "UPDATE accounts SET balance = balance + $1, suspended_on = NULL WHERE id = $2",
        )
        .bind(plan.delta)
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
        let mut resumed = rows
            .iter()
            .map(decode::<Channel, _>)
            .collect::<StoreResult<Vec<_>>>()?;
        resumed.sort_unstable_by_key(|c| c.id);
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
