//! Billing arithmetic (SPEC §5 "Billing" and "Balance warnings"): daily prices, the
//! account's daily total, days until suspension, which warning is due after a charge,
//! and the billing calendar day in the configured time zone.
//!
//! Pure functions, no I/O: the `charge_account` and `balance_check` handlers call them
//! and the store enforces "once". Money is i64 minor units; sums saturate rather than
//! wrap, so an absurd price list can never turn into a negative total.

use std::collections::BTreeMap;

use chrono::{DateTime, Days, NaiveDate, NaiveTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

use crate::error::DomainError;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn price_falls_back_to_default() {
        let prices = Prices {
            default_price: 100,
            by_kind: BTreeMap::from([("telegram".to_owned(), 300)]),
        };
        assert_eq!(prices.price("telegram"), 300);
        assert_eq!(prices.price("loopback"), 100);
        let kinds = ["telegram", "loopback", "loopback"].map(String::from);
        assert_eq!(daily_total(&prices, &kinds), 500);
        assert_eq!(daily_total(&prices, &[]), 0);
    }

    #[test]
    fn daily_total_saturates() {
        let prices = Prices {
            default_price: i64::MAX,
            by_kind: BTreeMap::new(),
        };
        let kinds = ["a", "b"].map(String::from);
        assert_eq!(daily_total(&prices, &kinds), i64::MAX);
    }

    #[test]
    fn days_until_suspension_is_floor_plus_one() {
        assert_eq!(days_until_suspension(250, 100), Some(3));
        assert_eq!(days_until_suspension(200, 100), Some(3));
        assert_eq!(days_until_suspension(199, 100), Some(2));
        assert_eq!(days_until_suspension(99, 100), Some(1));
        assert_eq!(days_until_suspension(0, 100), Some(1));
        assert_eq!(days_until_suspension(-50, 100), Some(1));
        assert_eq!(days_until_suspension(-500, 100), Some(1));
        assert_eq!(days_until_suspension(i64::MAX, 1), Some(i64::MAX));
        assert_eq!(days_until_suspension(250, 0), None);
        assert_eq!(days_until_suspension(250, -1), None);
    }

    /// SPEC §5 worked example, run by run: setting 3, daily total 100, 250 left after
    /// day 0's charge. The daily run charges while it can; it suspends when it cannot.
    #[test]
    fn spec_example_day_by_day() {
        let day0 = date("2026-11-25");
        let (daily, setting) = (100, 3);
        let mut balance = 250;
        let mut log = Vec::new();
        for d in 0..6u64 {
            let today = day0 + Days::new(d);
            if d > 0 {
                if balance < daily {
                    log.push((today, "suspended".to_owned(), None));
                    break;
                }
                balance -= daily;
            }
            if let Some(w) = warning_due(balance, daily, setting, today) {
                log.push((today, w.kind, Some(w.disconnect_date)));
            }
        }
        let day3 = date("2026-11-28");
        assert_eq!(
            log,
            vec![
                (day0, "warning_3_days".to_owned(), Some(day3)),
                (date("2026-11-27"), "warning_1_day".to_owned(), Some(day3)),
                (day3, "suspended".to_owned(), None),
            ]
        );
    }

    #[test]
    fn spec_example_figures() {
        let today = date("2026-11-25");
        let w = warning_due(250, 100, 3, today).unwrap();
        assert_eq!(w.kind, "warning_3_days");
        assert_eq!(w.days, 3);
        assert_eq!(w.disconnect_date, date("2026-11-28"));
        assert_eq!(w.message_id(42), "warning_3_days-42-2026-11-28@patchbay");
        assert_eq!(warning_due(150, 100, 3, date("2026-11-26")), None);
        let w = warning_due(50, 100, 3, date("2026-11-27")).unwrap();
        assert_eq!(w.kind, "warning_1_day");
        assert_eq!(w.days, 1);
        assert_eq!(w.disconnect_date, date("2026-11-28"));
    }

    #[test]
    fn setting_one_gives_a_single_warning() {
        let today = date("2026-03-01");
        assert_eq!(warning_due(150, 100, 1, today), None);
        let w = warning_due(50, 100, 1, today).unwrap();
        assert_eq!(w.kind, "warning_1_day");
        assert_eq!(w.disconnect_date, date("2026-03-02"));
    }

    #[test]
    fn empty_or_negative_balance_warns_one_day() {
        let today = date("2026-12-31");
        for balance in [0, -1, -1000] {
            let w = warning_due(balance, 100, 3, today).unwrap();
            assert_eq!(w.kind, "warning_1_day");
            assert_eq!(w.disconnect_date, date("2027-01-01"));
        }
    }

    #[test]
    fn nothing_charged_never_warns() {
        assert_eq!(warning_due(0, 0, 3, date("2026-01-01")), None);
        assert_eq!(warning_due(-5, 0, 1, date("2026-01-01")), None);
    }

    #[test]
    fn large_settings_and_balances() {
        let today = date("2026-01-01");
        let w = warning_due(2950, 100, 30, today).unwrap();
        assert_eq!((w.kind.as_str(), w.days), ("warning_30_days", 30));
        assert_eq!(w.disconnect_date, date("2026-01-31"));
        assert_eq!(warning_due(i64::MAX, 1, 30, today), None);
    }

    #[test]
    fn billing_day_follows_the_time_zone() {
        let now = utc("2026-11-24T22:30:00Z");
        assert_eq!(billing_day(now, Tz::UTC), date("2026-11-24"));
        assert_eq!(
            billing_day(now, parse_timezone("Europe/Moscow").unwrap()),
            date("2026-11-25")
        );
        assert_eq!(
            billing_day(now, parse_timezone("America/New_York").unwrap()),
            date("2026-11-24")
        );
    }

    #[test]
    fn a_day_ends_at_the_next_local_midnight() {
        let day = |d: &str| d.parse::<NaiveDate>().expect("date");
        assert_eq!(
            day_end(day("2026-11-24"), Tz::UTC),
            utc("2026-11-25T00:00:00Z").timestamp_millis()
        );
        let moscow: Tz = "Europe/Moscow".parse().expect("tz");
        assert_eq!(
            day_end(day("2026-11-24"), moscow),
            utc("2026-11-24T21:00:00Z").timestamp_millis()
        );
        // Santiago skips local midnight when summer time starts (2026-09-06): that day
        // starts at 01:00 local, and the day before ends then.
        let santiago: Tz = "America/Santiago".parse().expect("tz");
        assert_eq!(
            day_end(day("2026-09-05"), santiago),
            utc("2026-09-06T04:00:00Z").timestamp_millis()
        );
    }

    #[test]
    fn a_day_starts_where_the_day_before_ends() {
        let day = date("2026-11-24");
        let moscow: Tz = "Europe/Moscow".parse().expect("tz");
        assert_eq!(
            day_start(day, moscow),
            utc("2026-11-23T21:00:00Z").timestamp_millis()
        );
        let santiago: Tz = "America/Santiago".parse().expect("tz");
        let gap = date("2026-09-06");
        assert_eq!(
            day_start(gap, santiago),
            day_end(date("2026-09-05"), santiago)
        );
    }

    #[test]
    fn operators_charge_neither_future_days_nor_days_beyond_the_window() {
        let today = date("2026-11-24");
        assert!(check_charge_date(today, today, 6).is_ok());
        assert!(check_charge_date(date("2026-11-18"), today, 6).is_ok());
        let future = check_charge_date(date("2026-11-25"), today, 6).unwrap_err();
        assert_eq!(future.kind(), "invalid_value");
        assert!(
            future.to_string().contains("after today (2026-11-24"),
            "{future}"
        );
        assert!(check_charge_date(date("2026-12-24"), today, 6).is_err());
        let old = check_charge_date(date("2026-11-17"), today, 6).unwrap_err();
        assert_eq!(old.kind(), "invalid_value");
        assert!(
            old.to_string()
                .contains("earliest day that may still be charged is 2026-11-18")
        );
        // A window of 0: today only.
        assert!(check_charge_date(today, today, 0).is_ok());
        assert!(check_charge_date(date("2026-11-23"), today, 0).is_err());
        // A window that reaches before the calendar's start cannot overflow.
        assert!(check_charge_date(NaiveDate::MIN, NaiveDate::MIN, u32::MAX).is_ok());
    }

    #[test]
    fn timezone_names() {
        assert_eq!(parse_timezone("UTC").unwrap(), Tz::UTC);
        assert!(parse_timezone("Europe/Moscow").is_ok());
        let err = parse_timezone("Mars/Olympus").unwrap_err();
        assert_eq!(err.kind(), "invalid_value");
        assert!(err.to_string().contains("Mars/Olympus"));
        assert!(err.to_string().contains("Europe/Moscow or UTC"));
        assert!(parse_timezone("").is_err());
    }
}
