//! Billing arithmetic and rules (SPEC §5 "Billing" and "Balance warnings"): daily
//! prices, the account's daily total, days until suspension, which warning is due after
//! a charge, the billing calendar day in the configured time zone — and what a charge
//! decides: which channels of a day it charges, or that it suspends the account, and
//! which balance e-mail is then due (`plan_charges`, `charge_new_channel`,
//! `plan_resume`).
//!
//! Pure functions, no I/O: the stores read the rows (under their locks), call these,
//! and write what they return; the store enforces "once". Money is i64 minor units;
//! sums saturate rather than wrap, so an absurd price list can never turn into a
//! negative total.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Days, NaiveDate, NaiveTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

use crate::error::DomainError;
use crate::model::Id;
use crate::store::{BatchedJob, ChargeOutcome, Charged};

/// Daily price per connector kind, in minor units (config `[billing]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prices {
    /// Price of a kind not listed in `by_kind`.
    pub default_price: i64,
    pub by_kind: BTreeMap<String, i64>,
}

impl Prices {
    /// The daily price of one channel of `kind`.
    pub fn price(&self, kind: &str) -> i64 {
        self.by_kind
            .get(kind)
            .copied()
            .unwrap_or(self.default_price)
    }
}

/// What an account pays per day for channels of these kinds (one entry per active channel).
pub fn daily_total(prices: &Prices, kinds: &[String]) -> i64 {
    kinds
        .iter()
        .fold(0i64, |sum, kind| sum.saturating_add(prices.price(kind)))
}

/// After today's charge left `balance`, in how many days the daily run will fail to pay
/// and suspend the channels: `floor(balance / daily_total) + 1` (SPEC §5).
///
/// `None` when nothing is charged (`daily_total <= 0`): such an account is never suspended.
/// A negative balance counts as zero — the very next run cannot pay, so 1.
pub fn days_until_suspension(balance: i64, daily_total: i64) -> Option<i64> {
    if daily_total <= 0 {
        return None;
    }
    // div_euclid is floor division for a positive divisor; k < 0 only for a debt.
    let k = balance.div_euclid(daily_total).max(0);
    Some(k.saturating_add(1))
}

/// A balance warning that is due: send it once per (account, `kind`, `disconnect_date`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// `warning_1_day`, `warning_3_days`, …: the dedup kind and the e-mail's template choice.
    pub kind: String,
    /// Days from the charge day until the run that will suspend.
    pub days: i64,
    /// The billing day whose run will suspend the channels.
    pub disconnect_date: NaiveDate,
}

impl Warning {
    /// A stable RFC 5322 message id for this warning to `account`, so a retried or rerun
    /// `balance_check` produces the same message (and the file spool overwrites it).
    pub fn message_id(&self, account: impl std::fmt::Display) -> String {
        format!("{}-{account}-{}@patchbay", self.kind, self.disconnect_date)
    }
}

/// The dedup kind of a warning `days` ahead.
pub fn warning_kind(days: i64) -> String {
    if days == 1 {
        "warning_1_day".to_owned()
    } else {
        format!("warning_{days}_days")
    }
}

/// Which warning, if any, is due after the charge for `today` left `balance`.
///
/// Due when the days until suspension equal the account's `balance_notify_days`, or 1;
/// with a setting of 1 both rules name the same warning, so it is one e-mail.
pub fn warning_due(
    balance: i64,
    daily_total: i64,
    notify_days: i64,
    today: NaiveDate,
) -> Option<Warning> {
    let days = days_until_suspension(balance, daily_total)?;
    if days != notify_days && days != 1 {
        return None;
    }
    // days is 1 or a validated setting (1–30), so the date cannot overflow in practice;
    // if it ever did there is no meaningful date to warn about.
    let disconnect_date = today.checked_add_days(Days::new(u64::try_from(days).ok()?))?;
    Some(Warning {
        kind: warning_kind(days),
        days,
        disconnect_date,
    })
}

/// The calendar day `now` falls on in the billing time zone: the day a run or a new
/// channel is charged for.
pub fn billing_day(now: DateTime<Utc>, tz: Tz) -> NaiveDate {
    now.with_timezone(&tz).date_naive()
}

/// The first instant (unix ms) after `day` in `tz`: the start of the next local day,
/// or the first wall time after it that exists when a DST change skips midnight.
pub fn day_end(day: NaiveDate, tz: Tz) -> i64 {
    day.checked_add_days(Days::new(1))
        .map_or(i64::MAX, |next| day_start(next, tz))
}

/// The first instant (unix ms) of `day` in `tz` (`day_end` of the day before): a
/// channel removed since was still active that day.
pub fn day_start(day: NaiveDate, tz: Tz) -> i64 {
    resolve_local(tz, day, NaiveTime::MIN).map_or(i64::MIN, |at| at.timestamp_millis())
}

/// Days before today an operator may still charge by default (`billing.catch_up_days`).
pub const DEFAULT_CATCH_UP_DAYS: u32 = 6;

/// Whether an operator may queue the billing of `date` (`billing.run`, or `billing_run`
/// / `charge_account` through `job.enqueue`) when it is `today` in the billing time zone:
/// never a day that has not begun — its channels are not known yet, and the charge
/// would stand in the ledger before the day — and no day more than `catch_up_days`
/// before today. The store knows a channel's creation and removal times and its
/// account's current suspension, not earlier suspensions, and the journal's
/// idempotency keys of a day's jobs outlive only a few days: beyond the window a run
/// could charge a day by what the channels are now.
/// The daemon's own runs (the daily schedule, a fan-out's charges) do not pass here.
pub fn check_charge_date(
    date: NaiveDate,
    today: NaiveDate,
    catch_up_days: u32,
) -> Result<(), DomainError> {
    if date > today {
        return Err(DomainError::InvalidValue(format!(
            "date {date} is after today ({today} in the billing time zone): a day is charged \
             once it has begun"
        )));
    }
    let earliest = today
        .checked_sub_days(Days::new(u64::from(catch_up_days)))
        .unwrap_or(NaiveDate::MIN);
    if date < earliest {
        return Err(DomainError::InvalidValue(format!(
            "date {date} is more than {catch_up_days} days before today ({today}): the \
             earliest day that may still be charged is {earliest} (billing.catch_up_days)"
        )));
    }
    Ok(())
}

/// The instant of `day` `time` in `tz`, moving forward through a DST gap.
fn resolve_local(tz: Tz, day: NaiveDate, time: NaiveTime) -> Option<DateTime<Utc>> {
    let local = day.and_time(time);
    // Gaps are at most a few hours; step by minutes to the first wall time that exists.
    for minutes in 0..=24 * 60 {
        let candidate = local + TimeDelta::minutes(minutes);
        if let Some(at) = tz.from_local_datetime(&candidate).earliest() {
            return Some(at.with_timezone(&Utc));
        }
    }
    None
}

/// Parses the billing time zone (config `billing.timezone`).
pub fn parse_timezone(name: &str) -> Result<Tz, DomainError> {
    name.parse::<Tz>().map_err(|_| {
        DomainError::InvalidValue(format!(
            "time zone {name:?} is not allowed: use an IANA time zone like Europe/Moscow or UTC"
        ))
    })
}

// What a charge decides. The stores read the account (under its row lock) and its
// channels of the day, call these, and write what they return — ledger rows, the
// balance change as `balance = balance + delta`, the suspension, the e-mail — in that
// same transaction. One set of rules for every store and every path (the daily run,
// `channel.add`, a top-up's resume).

/// An account as a charge reads it, under its row lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Funds {
    pub balance: i64,
    /// The account's `balance_notify_days` setting.
    pub notify_days: i64,
    /// Its channels are suspended for lack of funds already (`suspended_on` is set).
    pub suspended: bool,
}

/// A channel that was active on the day being charged (by what the store knows of that
/// day: see the stores' `active_channels`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DayChannel {
    pub id: Id,
    /// Its daily price (`Prices::price` of its kind).
    pub price: i64,
    /// The ledger holds its charge for the day already.
    pub paid: bool,
    /// It runs now (neither suspended nor removed): the warnings look ahead and count
    /// only these.
    pub running: bool,
}

/// One charge for the ledger: `-price` on `channel` for `day`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerCharge {
    pub account: Id,
    pub channel: Id,
    pub day: NaiveDate,
    pub price: i64,
    /// The account's balance once this row, and the account's rows before it, are paid.
    pub balance_after: i64,
}

/// A balance e-mail to record in the `notifications` outbox, with the figures it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub account: Id,
    /// `warning_<n>_days`, `warning_1_day` or `disconnected`.
    pub kind: String,
    pub disconnect_date: NaiveDate,
    /// Days from the charge until the disconnection; 0 for `disconnected`.
    pub days: i64,
    pub balance: i64,
    pub daily_total: i64,
}

impl Notice {
    /// The warning due after a charge for `day` left `balance` (SPEC §5), if any.
    pub fn warning(
        account: Id,
        balance: i64,
        daily_total: i64,
        notify_days: i64,
        day: NaiveDate,
    ) -> Option<Notice> {
        let w = warning_due(balance, daily_total, notify_days, day)?;
        Some(Notice {
            account,
            kind: w.kind,
            disconnect_date: w.disconnect_date,
            days: w.days,
            balance,
            daily_total,
        })
    }

    /// The "disconnected" e-mail of an account suspended because `balance` could not
    /// pay the `needed` of `day`.
    pub fn disconnected(account: Id, day: NaiveDate, balance: i64, needed: i64) -> Notice {
        Notice {
            account,
            kind: "disconnected".to_owned(),
            disconnect_date: day,
            days: 0,
            balance,
            daily_total: needed,
        }
    }
}

/// Charges the (channel, price) pairs from `balance`, in order: the ledger rows and
/// the balance left.
fn charge_unpaid(
    account: Id,
    day: NaiveDate,
    balance: i64,
    unpaid: impl IntoIterator<Item = (Id, i64)>,
) -> (Vec<LedgerCharge>, i64) {
    let mut left = balance;
    let charges = unpaid
        .into_iter()
        .map(|(channel, price)| {
            left = left.saturating_sub(price);
            LedgerCharge {
                account,
                channel,
                day,
                price,
                balance_after: left,
            }
        })
        .collect();
    (charges, left)
}

fn price_sum<'a>(channels: impl Iterator<Item = &'a DayChannel>) -> i64 {
    channels.fold(0i64, |s, c| s.saturating_add(c.price))
}

/// What charging a batch of (account, day) items writes, and each item's outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChargePlan {
    /// One per item, in order; `None` for an account that does not exist. The channels
    /// of a `Suspended` outcome are for the store to fill in: those its suspension
    /// stopped (see [`charged`]).
    pub outcomes: Vec<Option<ChargeOutcome>>,
    /// The ledger rows, in item order.
    pub charges: Vec<LedgerCharge>,
    /// Per account that paid, the change of its balance (negative), in ascending
    /// account order: applied as `balance = balance + delta`, never as a balance read
    /// earlier, so nothing written meanwhile is lost.
    pub deltas: Vec<(Id, i64)>,
    /// Accounts whose channels are suspended now, with the day they could not pay.
    pub suspend: Vec<(Id, NaiveDate)>,
    /// The balance e-mails now due (the outbox keeps one per account, kind and date).
    pub notices: Vec<Notice>,
}

/// Charges each (account, day) of `items` in order (SPEC §5): every channel active that
/// day and not paid for yet, all or nothing. When the balance cannot cover the day's
/// total nothing is charged and all the account's channels are suspended, with a
/// "disconnected" e-mail unless the account was suspended already (a past day charged
/// late: it was told then); after a charge, the warning the balance left makes due.
/// An account suspended by an earlier item of the batch has nothing running to charge
/// for a later one, and a later item of the same account starts from the balance the
/// earlier ones left. `accounts` holds those that exist, as read under their locks;
/// `channels` the channels active per (account, day).
pub fn plan_charges(
    items: &[(Id, NaiveDate)],
    accounts: &HashMap<Id, Funds>,
    mut channels: HashMap<(Id, NaiveDate), Vec<DayChannel>>,
) -> ChargePlan {
    let mut plan = ChargePlan::default();
    // (balance read, balance now) of the accounts that paid.
    let mut paid: HashMap<Id, (i64, i64)> = HashMap::new();
    let mut suspended: HashSet<Id> = HashSet::new();
    for &(account, day) in items {
        let Some(funds) = accounts.get(&account) else {
            plan.outcomes.push(None);
            continue;
        };
        let balance = paid.get(&account).map_or(funds.balance, |p| p.1);
        if suspended.contains(&account) {
            plan.outcomes
                .push(Some(ChargeOutcome::NothingDue { balance }));
            continue;
        }
        let list = channels.entry((account, day)).or_default();
        let daily_total = price_sum(list.iter().filter(|c| c.running));
        let needed = price_sum(list.iter().filter(|c| !c.paid));
        let unpaid = list.iter().filter(|c| !c.paid).count();
        if unpaid == 0 {
            plan.outcomes
                .push(Some(ChargeOutcome::NothingDue { balance }));
        } else if balance < needed {
            suspended.insert(account);
            plan.suspend.push((account, day));
            if !funds.suspended {
                plan.notices
                    .push(Notice::disconnected(account, day, balance, needed));
            }
            plan.outcomes.push(Some(ChargeOutcome::Suspended {
                needed,
                balance,
                channels: Vec::new(),
            }));
        } else {
            let unpaid_channels = list.iter().filter(|c| !c.paid).map(|c| (c.id, c.price));
            let (charges, left) = charge_unpaid(account, day, balance, unpaid_channels);
            for c in list.iter_mut() {
                c.paid = true;
            }
            plan.charges.extend(charges);
            paid.entry(account).or_insert((funds.balance, left)).1 = left;
            plan.notices.extend(Notice::warning(
                account,
                left,
                daily_total,
                funds.notify_days,
                day,
            ));
            plan.outcomes.push(Some(ChargeOutcome::Charged {
                total: needed,
                balance: left,
                channels: unpaid,
            }));
        }
    }
    plan.deltas = paid
        .into_iter()
        .map(|(account, (read, now))| (account, now.saturating_sub(read)))
        .collect();
    plan.deltas.sort_unstable();
    plan
}

/// Each item's `Charged` once a plan is written: a suspension's outcome lists the
/// channels it stopped (`stopped`, per account), and `notices` says whether the outbox
/// recorded a new e-mail for the account (`noticed`; one it held already is not new).
pub fn charged(
    items: &[(Id, NaiveDate)],
    outcomes: Vec<Option<ChargeOutcome>>,
    stopped: &HashMap<Id, Vec<Id>>,
    noticed: &HashSet<Id>,
) -> Vec<Option<Charged>> {
    items
        .iter()
        .zip(outcomes)
        .map(|(&(account, _), outcome)| {
            let mut outcome = outcome?;
            if let ChargeOutcome::Suspended { channels, .. } = &mut outcome {
                *channels = stopped.get(&account).cloned().unwrap_or_default();
            }
            Some(Charged {
                outcome,
                notices: noticed.contains(&account),
            })
        })
        .collect()
}

/// What adding a channel charges (SPEC §5: a channel is charged at once when added).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewChannelCharge {
    pub price: i64,
    /// The balance once the new channel's price for today is paid.
    pub balance_after: i64,
    /// The warning that charge makes due.
    pub notice: Option<Notice>,
}

/// Charges today's price of a new channel of `kind`, or refuses with
/// `insufficient_funds` when the balance cannot pay it (then nothing is created).
/// `running` are the kinds of the account's channels that run now, the new one not
/// included: the warning's daily total counts them and the new channel.
pub fn charge_new_channel(
    account: Id,
    funds: Funds,
    kind: &str,
    running: &[String],
    prices: &Prices,
    day: NaiveDate,
) -> Result<NewChannelCharge, DomainError> {
    let price = prices.price(kind);
    if funds.balance < price {
        return Err(DomainError::InsufficientFunds(format!(
            "the balance {} cannot pay today's price {price} of a {kind} channel; \
             top the account up first",
            funds.balance
        )));
    }
    let balance_after = funds.balance.saturating_sub(price);
    let total = daily_total(prices, running).saturating_add(price);
    Ok(NewChannelCharge {
        price,
        balance_after,
        notice: Notice::warning(account, balance_after, total, funds.notify_days, day),
    })
}

/// The day a resume pays: the day the suspension could not pay, or `today` if later.
pub fn resume_day(suspended_on: Option<NaiveDate>, today: NaiveDate) -> NaiveDate {
    suspended_on.filter(|d| *d > today).unwrap_or(today)
}

/// A channel of an account a top-up may resume (every channel not removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeChannel {
    pub id: Id,
    pub price: i64,
    pub suspended: bool,
    /// The ledger holds its charge for the resume's day already.
    pub paid: bool,
}

/// What a resume writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePlan {
    pub charges: Vec<LedgerCharge>,
    /// The balance left.
    pub balance: i64,
    /// Applied as `balance = balance + delta` (negative: what the day cost).
    pub delta: i64,
    pub notice: Option<Notice>,
}

/// Whether the account resumes (SPEC §5: "a top-up that covers the day resumes them
/// and charges the day"): when a channel is suspended and the balance covers `day`
/// (see [`resume_day`]) for every channel, suspended ones included, the unpaid ones are
/// charged and the suspended ones resume. `None`: nothing is suspended, or the balance
/// does not cover the day. The warning counts every channel, all running once resumed.
pub fn plan_resume(
    account: Id,
    funds: Funds,
    day: NaiveDate,
    channels: &[ResumeChannel],
) -> Option<ResumePlan> {
    if !channels.iter().any(|c| c.suspended) {
        return None;
    }
    let unpaid = || channels.iter().filter(|c| !c.paid);
    let needed = unpaid().fold(0i64, |s, c| s.saturating_add(c.price));
    if funds.balance < needed {
        return None;
    }
    let (charges, left) = charge_unpaid(
        account,
        day,
        funds.balance,
        unpaid().map(|c| (c.id, c.price)),
    );
    let total = channels.iter().fold(0i64, |s, c| s.saturating_add(c.price));
    Some(ResumePlan {
        charges,
        balance: left,
        delta: left.saturating_sub(funds.balance),
        notice: Notice::warning(account, left, total, funds.notify_days, day),
    })
}

/// A job of a charge batch that the batch journals (see [`charges_to_run`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChargeRun {
    /// Its index in the batch.
    pub index: usize,
    /// It has a journal row.
    pub journalled: bool,
    /// It charges; otherwise another job did or does its (account, day), and only its
    /// row is finished.
    pub charge: bool,
}

/// Which jobs of a charge batch to charge, and which only to journal done, from the
/// journal rows the batch read (`rows`: (id, idempotency key, state), found by the
/// jobs' ids or their (account, day) `keys`); fills `out` for the others
/// (`AlreadyFinished`, without a row of their own to finish). A job whose own row is
/// done or dead (a redelivery) does not run, nor one whose key another row holds — a
/// charge job for that day ran, runs or gave up before — or an earlier job of the batch
/// has; if such a job has an unfinished row of its own, that row is finished. Charging
/// twice would charge nothing twice, but a charge for a past day must not run after a
/// top-up on a later day resumed the channels that day suspended. Most jobs (a fan-out
/// on the SQLite queue) have no row yet: the batch writes it, with the key.
pub fn charges_to_run(
    jobs: &[&str],
    keys: &[String],
    rows: &[(String, Option<String>, String)],
    out: &mut [BatchedJob],
) -> Vec<ChargeRun> {
    let mut states: HashMap<&str, &str> = HashMap::new();
    let mut holders: HashMap<&str, &str> = HashMap::new();
    for (id, key, state) in rows {
        states.insert(id, state);
        if let Some(key) = key {
            holders.insert(key, id);
        }
    }
    let mut live = Vec::with_capacity(jobs.len());
    let mut seen: HashSet<&str> = HashSet::new();
    let mut charging: HashSet<&str> = HashSet::new();
    for (i, ((&id, key), out)) in jobs.iter().zip(keys).zip(out.iter_mut()).enumerate() {
        let state = states.get(id).copied();
        if matches!(state, Some("done" | "dead")) || !seen.insert(id) {
            *out = BatchedJob::AlreadyFinished;
            continue;
        }
        let held = holders
            .get(key.as_str())
            .is_some_and(|holder| *holder != id);
        let charge = !held && charging.insert(key);
        if charge || state.is_some() {
            live.push(ChargeRun {
                index: i,
                journalled: state.is_some(),
                charge,
            });
        } else {
            *out = BatchedJob::AlreadyFinished;
        }
    }
    live
}

#[cfg(test)]
mod tests;
