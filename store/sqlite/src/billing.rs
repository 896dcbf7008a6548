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

#[cfg(test)]
mod tests {
    use patchbay_jobs::store::*;
    use serde_json::json;

    use super::*;
    use crate::tests::pending_job;
    use patchbay_jobs::store::{NewAccount, NewUser};
    use patchbay_jobs::{JobKind, Payload};

    fn prices() -> Prices {
        Prices {
            default_price: 100,
            by_kind: Default::default(),
        }
    }

    /// An account holding `balance` with `channels` loopback channels (not charged yet).
    async fn account(s: &SqliteStore, name: &str, balance: i64, channels: usize) -> Id {
        let new = NewAccount {
            name: name.into(),
            currency: "EUR".into(),
            admin: NewUser {
                name: "Ann".into(),
                email: format!("ann@{name}.test"),
            },
        };
        let (acc, _) = s.create_account(&new).await.expect("account");
        if balance > 0 {
            s.topup(acc.id, balance, "seed").await.expect("topup");
        }
        for i in 0..channels {
            s.add_channel(acc.id, "loopback", &format!("c{i}"), &json!({}))
                .await
                .expect("channel");
        }
        acc.id
    }

    async fn jobs(s: &SqliteStore, tag: &str, accounts: &[Id], day: NaiveDate) -> Vec<ChargeJob> {
        let mut out = Vec::new();
        let mut recs = Vec::new();
        for &account in accounts {
            let payload = json!({"account": account, "date": day});
            let Ok(Payload::ChargeAccount(_)) = JobKind::ChargeAccount.parse_payload(&payload)
            else {
                panic!("payload");
            };
            let id = format!("{tag}-{account}");
            recs.push(pending_job(&id, JobKind::ChargeAccount, payload));
            out.push(ChargeJob {
                job: id,
                account,
                day,
                day_start: i64::MIN,
                day_end: i64::MAX,
                max_attempts: 8,
            });
        }
        s.journal_insert_many(&recs, false).await.expect("journal");
        out
    }

    async fn ledger_rows(s: &SqliteStore) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM ledger WHERE kind = 'charge'")
            .fetch_one(&s.pool)
            .await
            .expect("count")
    }

    #[tokio::test]
    async fn an_unsent_e_mail_gets_a_new_check_once_per_grace_after_one_died() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("t.db"))
            .await
            .expect("open");
        let acc = account(&s, "mailless", 1000, 0).await;
        sqlx::query(
            "INSERT INTO notifications (account_id, kind, disconnect_date, days, balance, \
             daily_total, created_at) VALUES ($1, 'disconnected', '2026-12-03', 0, 0, 100, 1)",
        )
        .bind(acc)
        .execute(&s.writer)
        .await
        .expect("notification");
        assert_eq!(
            s.accounts_with_unsent_notifications(1_000, 10)
                .await
                .expect("sweep"),
            vec![acc],
            "no check at all: one is due"
        );
        // A check that died (the relay refused) at t = 5,000.
        sqlx::query(
            "INSERT INTO jobs (id, kind, payload, state, attempts, max_attempts, pushed, \
             created_at, updated_at, run_at) \
             VALUES ('dead-check', 'balance_check', $1, 'dead', 8, 8, TRUE, 1, 5000, 5000)",
        )
        .bind(json!({"account": acc}).to_string())
        .execute(&s.writer)
        .await
        .expect("dead check");
        assert!(
            s.accounts_with_unsent_notifications(4_000, 10)
                .await
                .expect("sweep")
                .is_empty(),
            "it died within the grace: no new check yet"
        );
        assert_eq!(
            s.accounts_with_unsent_notifications(6_000, 10)
                .await
                .expect("sweep"),
            vec![acc],
            "a grace after it died, the e-mail gets another check"
        );
    }

    #[tokio::test]
    async fn a_batch_of_balance_checks_claims_once_per_account_and_settles_each_claim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("c.db"))
            .await
            .expect("open");
        // Two e-mails for `warned` (a warning, then a disconnection), one for `poor`.
        let warned = account(&s, "warned", 350, 1).await;
        let poor = account(&s, "poor", 50, 1).await;
        for (acc, kind) in [
            (warned, "warning_3_days"),
            (warned, "disconnected"),
            (poor, "disconnected"),
        ] {
            sqlx::query(
                "INSERT INTO notifications (account_id, kind, disconnect_date, days, balance, \
                 daily_total, created_at) VALUES ($1, $2, '2026-11-28', 3, 250, 100, 1)",
            )
            .bind(acc)
            .bind(kind)
            .execute(&s.writer)
            .await
            .expect("notification");
        }
        let mut recs = Vec::new();
        let mut batch = Vec::new();
        for (id, account) in [("c1", warned), ("c2", warned), ("c3", poor), ("c4", poor)] {
            recs.push(pending_job(
                id,
                JobKind::BalanceCheck,
                json!({"account": account}),
            ));
            batch.push(CheckJob {
                job: id.into(),
                account,
            });
        }
        s.journal_insert_many(&recs[..3], false)
            .await
            .expect("journal");
        let claimed = s
            .claim_balance_checks(&batch, 1_000, 60_000)
            .await
            .expect("claim");
        let kinds =
            |i: usize| -> Vec<&str> { claimed[i].1.iter().map(|n| n.kind.as_str()).collect() };
        assert_eq!(claimed[0].0, BatchedJob::Done);
        assert_eq!(
            kinds(0),
            ["warning_3_days", "disconnected"],
            "in order, both"
        );
        assert_eq!(
            claimed[1],
            (BatchedJob::Done, vec![]),
            "same account: nothing left"
        );
        assert_eq!(kinds(2), ["disconnected"]);
        assert_eq!(
            claimed[3],
            (BatchedJob::NotJournalled, vec![]),
            "no journal row"
        );
        // A second claim while these are held gets nothing.
        let again = s.claim_balance_checks(&batch[..1], 2_000, 60_000).await;
        assert_eq!(again.expect("claim")[0].1, vec![]);

        // warned's first e-mail went out, its second was refused; poor's went out.
        let sent = [claimed[0].1[0].clone(), claimed[2].1[0].clone()];
        let unsent = [claimed[0].1[1].clone()];
        // A stale claim (another holder's lease) is neither marked nor released.
        let mut stale = claimed[0].1[1].clone();
        stale.lease -= 1;
        s.settle_balance_checks(&[stale.clone()], &[], &[])
            .await
            .expect("stale");
        s.settle_balance_checks(&[], &[stale], &[])
            .await
            .expect("stale");
        let held: bool = sqlx::query_scalar(
            "SELECT sent_at IS NULL AND claimed_until IS NOT NULL FROM notifications WHERE id = $1",
        )
        .bind(claimed[0].1[1].id)
        .fetch_one(&s.pool)
        .await
        .expect("row");
        assert!(
            held,
            "another holder's claim is neither marked sent nor released"
        );
        s.settle_balance_checks(&sent, &unsent, &["c2".into(), "c3".into()])
            .await
            .expect("settle");
        let rows: Vec<(String, bool, bool)> = sqlx::query_as(
            "SELECT kind, sent_at IS NOT NULL, claimed_until IS NOT NULL FROM notifications \
             ORDER BY id",
        )
        .fetch_all(&s.pool)
        .await
        .expect("rows");
        assert_eq!(
            rows,
            [
                ("warning_3_days".into(), true, false),
                ("disconnected".into(), false, false),
                ("disconnected".into(), true, false)
            ]
        );
        let states: Vec<(String, String)> =
            sqlx::query_as("SELECT id, state FROM jobs ORDER BY id")
                .fetch_all(&s.pool)
                .await
                .expect("jobs");
        let states: Vec<(&str, &str)> = states
            .iter()
            .map(|(i, s)| (i.as_str(), s.as_str()))
            .collect();
        assert_eq!(states, [("c1", "pending"), ("c2", "done"), ("c3", "done")]);
        // The released e-mail is free for the retry of c1.
        let retry = s
            .claim_balance_checks(&batch[..1], 3_000, 60_000)
            .await
            .expect("claim");
        assert_eq!(retry[0].1.len(), 1);
        assert_eq!(retry[0].1[0].kind, "disconnected");
    }

    #[tokio::test]
    async fn a_batch_charges_suspends_and_records_the_e_mails_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("b.db"))
            .await
            .expect("open");
        let day: NaiveDate = "2026-11-25".parse().expect("day");
        let rich = account(&s, "rich", 10_000, 3).await;
        // SPEC §5's example: 250 left after the charge, daily 100, setting 3 → "3 days".
        let warned = account(&s, "warned", 350, 1).await;
        let poor = account(&s, "poor", 50, 1).await;
        let batch = jobs(&s, "first", &[rich, warned, poor], day).await;
        let out = s.charge_accounts(&batch, &prices()).await.expect("charge");
        let charged: Vec<_> = out.iter().map(|(o, c)| (o.clone(), c.clone())).collect();
        assert!(charged.iter().all(|(o, _)| *o == BatchedJob::Done));
        assert_eq!(
            charged[0].1,
            Some(Charged {
                outcome: ChargeOutcome::Charged {
                    total: 300,
                    balance: 9_700,
                    channels: 3
                },
                notices: false
            })
        );
        assert!(charged[1].1.as_ref().is_some_and(|c| c.notices));
        let Some(Charged {
            outcome:
                ChargeOutcome::Suspended {
                    needed,
                    balance,
                    channels,
                },
            notices: true,
        }) = &charged[2].1
        else {
            panic!("poor account not suspended: {charged:?}");
        };
        assert_eq!((*needed, *balance, channels.len()), (100, 50, 1));
        assert_eq!(
            s.account(poor).await.expect("poor").balance,
            50,
            "all or nothing"
        );
        assert_eq!(ledger_rows(&s).await, 4);

        let mut mails: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT kind, disconnect_date, days, balance, daily_total FROM notifications ORDER BY id",
        )
        .fetch_all(&s.pool)
        .await
        .expect("notifications");
        mails.sort();
        assert_eq!(
            mails,
            vec![
                ("disconnected".into(), "2026-11-25".into(), 0, 50, 100),
                ("warning_3_days".into(), "2026-11-28".into(), 3, 250, 100),
            ]
        );

        // The same jobs again: finished. New jobs for the same day: nothing due, no mail.
        let again = s.charge_accounts(&batch, &prices()).await.expect("again");
        assert!(again.iter().all(|(o, _)| *o == BatchedJob::AlreadyFinished));
        let rerun = jobs(&s, "rerun", &[rich, warned, poor], day).await;
        for (o, c) in s.charge_accounts(&rerun, &prices()).await.expect("rerun") {
            assert_eq!(o, BatchedJob::Done);
            assert!(c.is_some_and(|c| !c.notices));
        }
        assert_eq!(ledger_rows(&s).await, 4);

        // Jobs queued without journal rows (a fan-out onto a queue that keeps its jobs):
        // charged, and journalled done by the batch; one for an unknown account has no
        // row to make dead and goes the per-job path.
        let next: NaiveDate = "2026-11-26".parse().expect("day");
        let unjournalled: Vec<ChargeJob> = [rich, 999_999]
            .into_iter()
            .map(|account| ChargeJob {
                job: format!("queued-{account}"),
                account,
                day: next,
                day_start: i64::MIN,
                day_end: i64::MAX,
                max_attempts: 8,
            })
            .collect();
        let out = s
            .charge_accounts(&unjournalled, &prices())
            .await
            .expect("unjournalled");
        assert_eq!(out[0].0, BatchedJob::Done);
        assert_eq!(out[1], (BatchedJob::NotJournalled, None));
        assert_eq!(
            ledger_rows(&s).await,
            7,
            "rich's three channels for the 26th"
        );
        let row: (String, String, i64, String) =
            sqlx::query_as("SELECT kind, state, attempts, payload FROM jobs WHERE id = $1")
                .bind(&unjournalled[0].job)
                .fetch_one(&s.pool)
                .await
                .expect("journal row");
        assert_eq!(
            (row.0.as_str(), row.1.as_str(), row.2),
            ("charge_account", "done", 1)
        );
        assert_eq!(
            serde_json::from_str::<Value>(&row.3).expect("payload"),
            json!({"account": rich, "date": "2026-11-26"})
        );
        // Redelivered: finished, nothing charged again.
        let again = s
            .charge_accounts(&unjournalled[..1], &prices())
            .await
            .expect("redelivered");
        assert_eq!(again[0].0, BatchedJob::AlreadyFinished);
        assert_eq!(ledger_rows(&s).await, 7);

        // Another job for the same (account, day), a second copy within one batch: kept
        // out by the key the first one's row holds, without a row of their own.
        let job = |id: &str, account: Id, day: NaiveDate| ChargeJob {
            job: id.into(),
            account,
            day,
            day_start: i64::MIN,
            day_end: i64::MAX,
            max_attempts: 8,
        };
        let out = s
            .charge_accounts(&[job("again", rich, next)], &prices())
            .await
            .expect("same day");
        assert_eq!(out[0], (BatchedJob::AlreadyFinished, None));
        let third: NaiveDate = "2026-11-27".parse().expect("day");
        let out = s
            .charge_accounts(
                &[job("one", rich, third), job("two", rich, third)],
                &prices(),
            )
            .await
            .expect("twice in a batch");
        assert_eq!(out[0].0, BatchedJob::Done);
        assert_eq!(out[1], (BatchedJob::AlreadyFinished, None));
        assert_eq!(ledger_rows(&s).await, 10);
        let rows: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE id IN ('again', 'two')")
                .fetch_one(&s.pool)
                .await
                .expect("count");
        assert_eq!(rows, 0);

        // A job with an unfinished row of its own for a day another job's row holds
        // (a fan-out's retry, journalled on Redis): its row is finished, nothing charged.
        s.journal_insert_many(
            &[pending_job(
                "stray",
                JobKind::ChargeAccount,
                json!({"account": rich, "date": third}),
            )],
            false,
        )
        .await
        .expect("journal");
        let out = s
            .charge_accounts(&[job("stray", rich, third)], &prices())
            .await
            .expect("stray");
        assert_eq!(out[0], (BatchedJob::Done, None));
        let state: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = 'stray'")
            .fetch_one(&s.pool)
            .await
            .expect("state");
        assert_eq!(state, "done");
        assert_eq!(ledger_rows(&s).await, 10);
        // The per-job path (a batch that failed) does not start a charge job without a
        // row whose day another row holds either.
        let mut per_job = pending_job(
            "per-job",
            JobKind::ChargeAccount,
            json!({"account": rich, "date": third}),
        );
        // As the worker's per-job path builds it.
        per_job.idempotency_key = Some(charge_account_key(rich, third));
        assert!(s.journal_start(&per_job).await.expect("start").is_none());

        // Suspended on the 26th, resumed by a top-up on the 27th (which pays the 27th):
        // a charge job for the 26th queued again later (a fan-out retried after it gave
        // up) must not charge the day the channels spent suspended.
        let late = account(&s, "late", 50, 1).await;
        let out = s
            .charge_accounts(&[job("late-1", late, next)], &prices())
            .await
            .expect("suspends");
        assert!(matches!(
            out[0].1.as_ref().map(|c| &c.outcome),
            Some(ChargeOutcome::Suspended { .. })
        ));
        s.topup(late, 500, "rescue").await.expect("topup");
        let (resumed, _) = s
            .resume_suspended(late, third, &prices())
            .await
            .expect("resume");
        assert_eq!(resumed.len(), 1);
        let out = s
            .charge_accounts(&[job("late-2", late, next)], &prices())
            .await
            .expect("again");
        assert_eq!(out[0], (BatchedJob::AlreadyFinished, None));
        let days: Vec<String> = sqlx::query_scalar(
            "SELECT day FROM ledger WHERE account_id = $1 AND kind = 'charge' ORDER BY day",
        )
        .bind(late)
        .fetch_all(&s.pool)
        .await
        .expect("ledger");
        assert_eq!(days, ["2026-11-27"], "the suspended day is not charged");
    }

    #[tokio::test]
    async fn a_day_is_charged_once_whoever_charges_it_and_only_for_channels_of_that_day() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = std::sync::Arc::new(
            SqliteStore::open(&dir.path().join("c.db"))
                .await
                .expect("open"),
        );
        let day: NaiveDate = "2026-11-25".parse().expect("day");
        let acc = account(&s, "acme", 10_000, 3).await;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.charge_day(acc, day, i64::MIN, i64::MAX, &prices()).await
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("charge");
        }
        assert_eq!(ledger_rows(&s).await, 3);
        assert_eq!(s.account(acc).await.expect("acc").balance, 9_700);
        // A catch-up for a day that ended before the channels were created charges nothing.
        let before: NaiveDate = "2026-11-20".parse().expect("day");
        let c = s
            .charge_day(acc, before, i64::MIN, 1_000, &prices())
            .await
            .expect("catch-up");
        assert!(matches!(
            c.outcome,
            ChargeOutcome::NothingDue { balance: 9_700 }
        ));
        assert_eq!(ledger_rows(&s).await, 3);
    }

    /// What a channel was on a past day decides its charge: one removed during the day
    /// or later pays it, one removed before it began does not; one suspended only since
    /// pays it, one suspended since that day does not; and an account suspended
    /// already that cannot pay a past day keeps its suspension day, told once.
    #[tokio::test]
    async fn a_past_day_charges_the_channels_of_that_day() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("p.db"))
            .await
            .expect("open");
        let day = |d: &str| d.parse::<NaiveDate>().expect("day");
        let charged_days = |acc: Id| {
            let pool = s.pool.clone();
            async move {
                sqlx::query_scalar::<_, String>(
                    "SELECT day FROM ledger WHERE account_id = $1 AND kind = 'charge' ORDER BY day",
                )
                .bind(acc)
                .fetch_all(&pool)
                .await
                .expect("ledger")
            }
        };

        // Removed at 5,000 (ms): active on a day spanning 4,000.., not on one from 6,000.
        let acc = account(&s, "removed", 1_000, 1).await;
        sqlx::query(
            "UPDATE channels SET status = 'removed', removed_at = 5000, created_at = 0 \
             WHERE account_id = $1",
        )
        .bind(acc)
        .execute(&s.pool)
        .await
        .expect("remove");
        let c = s
            .charge_day(acc, day("2026-11-24"), 6_000, i64::MAX, &prices())
            .await
            .expect("later day");
        assert!(matches!(c.outcome, ChargeOutcome::NothingDue { .. }));
        let c = s
            .charge_day(acc, day("2026-11-23"), 4_000, 6_000, &prices())
            .await
            .expect("the day of the removal");
        assert!(matches!(
            c.outcome,
            ChargeOutcome::Charged { total: 100, .. }
        ));
        assert!(!c.notices, "a removed channel is not counted in warnings");
        assert_eq!(charged_days(acc).await, ["2026-11-23"]);

        // Suspended for the 25th; the 24th, charged late, still pays.
        let acc = account(&s, "suspended", 0, 1).await;
        let c = s
            .charge_day(acc, day("2026-11-25"), i64::MIN, i64::MAX, &prices())
            .await
            .expect("suspends");
        assert!(matches!(c.outcome, ChargeOutcome::Suspended { .. }));
        s.topup(acc, 500, "late money").await.expect("topup");
        let c = s
            .charge_day(acc, day("2026-11-24"), i64::MIN, i64::MAX, &prices())
            .await
            .expect("the day before");
        assert!(matches!(
            c.outcome,
            ChargeOutcome::Charged { balance: 400, .. }
        ));
        let c = s
            .charge_day(acc, day("2026-11-25"), i64::MIN, i64::MAX, &prices())
            .await
            .expect("the suspended day");
        assert!(matches!(c.outcome, ChargeOutcome::NothingDue { .. }));
        assert_eq!(charged_days(acc).await, ["2026-11-24"]);

        // Suspended for the 25th and unable to pay the 24th: still the 25th, one e-mail.
        let acc = account(&s, "broke", 0, 1).await;
        for d in ["2026-11-25", "2026-11-24"] {
            let c = s
                .charge_day(acc, day(d), i64::MIN, i64::MAX, &prices())
                .await
                .expect("suspended");
            assert!(matches!(c.outcome, ChargeOutcome::Suspended { .. }));
            assert_eq!(c.notices, d == "2026-11-25", "{d}");
        }
        let (on, mails): (Option<String>, i64) = sqlx::query_as(
            "SELECT suspended_on, (SELECT COUNT(*) FROM notifications WHERE account_id = $1) \
             FROM accounts WHERE id = $1",
        )
        .bind(acc)
        .fetch_one(&s.pool)
        .await
        .expect("account");
        assert_eq!((on.as_deref(), mails), (Some("2026-11-25"), 1));
    }
}
