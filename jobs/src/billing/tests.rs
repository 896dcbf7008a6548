//! The billing rules, example by example.

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

fn funds(balance: i64) -> Funds {
    Funds {
        balance,
        notify_days: 3,
        suspended: false,
    }
}

fn channel(id: Id, price: i64, paid: bool, running: bool) -> DayChannel {
    DayChannel {
        id,
        price,
        paid,
        running,
    }
}

/// One account, one day: the day's unpaid channels are charged in order, each ledger
/// row carrying the balance it left; the paid one is not charged again, and the
/// warning's daily total counts only the channels that run now.
#[test]
fn a_charge_pays_the_unpaid_channels_of_the_day() {
    let day = date("2026-11-25");
    let accounts = HashMap::from([(7, funds(650))]);
    let channels = HashMap::from([(
        (7, day),
        vec![
            channel(1, 100, true, true),
            channel(2, 100, false, true),
            channel(3, 200, false, false),
        ],
    )]);
    let plan = plan_charges(&[(7, day)], &accounts, channels);
    assert_eq!(
        plan.outcomes,
        [Some(ChargeOutcome::Charged {
            total: 300,
            balance: 350,
            channels: 2
        })]
    );
    let rows: Vec<(Id, i64, i64)> = plan
        .charges
        .iter()
        .map(|c| (c.channel, c.price, c.balance_after))
        .collect();
    assert_eq!(rows, [(2, 100, 550), (3, 200, 350)]);
    assert!(plan.charges.iter().all(|c| c.account == 7 && c.day == day));
    assert_eq!(plan.deltas, [(7, -300)]);
    assert!(plan.suspend.is_empty());
    // 350 left at 200 a day (channels 1 and 2 run): suspension in 2 days, no warning.
    assert!(plan.notices.is_empty(), "{:?}", plan.notices);
}

/// SPEC §5: all or nothing. A balance short of the day's total charges nothing,
/// suspends the account and records the disconnection with what was needed.
#[test]
fn a_balance_short_of_the_total_suspends_and_charges_nothing() {
    let day = date("2026-11-25");
    let accounts = HashMap::from([(7, funds(150))]);
    let channels = HashMap::from([(
        (7, day),
        vec![channel(1, 100, false, true), channel(2, 100, false, true)],
    )]);
    let plan = plan_charges(&[(7, day)], &accounts, channels);
    assert_eq!(
        plan.outcomes,
        [Some(ChargeOutcome::Suspended {
            needed: 200,
            balance: 150,
            channels: vec![]
        })]
    );
    assert!(plan.charges.is_empty() && plan.deltas.is_empty());
    assert_eq!(plan.suspend, [(7, day)]);
    assert_eq!(plan.notices, [Notice::disconnected(7, day, 150, 200)]);
    assert_eq!(
        (plan.notices[0].kind.as_str(), plan.notices[0].days),
        ("disconnected", 0)
    );

    // Suspended already (a past day charged late): suspended again, not told again.
    let told = HashMap::from([(
        7,
        Funds {
            suspended: true,
            ..funds(150)
        },
    )]);
    let channels = HashMap::from([((7, day), vec![channel(1, 200, false, false)])]);
    let plan = plan_charges(&[(7, day)], &told, channels);
    assert_eq!(plan.suspend, [(7, day)]);
    assert!(plan.notices.is_empty());
}

#[test]
fn nothing_due_unknown_accounts_and_warnings() {
    let day = date("2026-11-25");
    let accounts = HashMap::from([(1, funds(500)), (2, funds(350))]);
    let channels = HashMap::from([
        ((1, day), vec![channel(10, 100, true, true)]),
        ((2, day), vec![channel(20, 100, false, true)]),
    ]);
    let plan = plan_charges(&[(1, day), (3, day), (2, day)], &accounts, channels);
    assert_eq!(
        plan.outcomes,
        [
            Some(ChargeOutcome::NothingDue { balance: 500 }),
            None,
            Some(ChargeOutcome::Charged {
                total: 100,
                balance: 250,
                channels: 1
            }),
        ]
    );
    // SPEC §5's example: 250 left, 100 a day, setting 3 → the 3-day warning.
    assert_eq!(
        plan.notices,
        [Notice {
            account: 2,
            kind: "warning_3_days".into(),
            disconnect_date: date("2026-11-28"),
            days: 3,
            balance: 250,
            daily_total: 100,
        }]
    );
    // No channels at all: nothing due.
    let plan = plan_charges(&[(1, day)], &accounts, HashMap::new());
    assert_eq!(
        plan.outcomes,
        [Some(ChargeOutcome::NothingDue { balance: 500 })]
    );
}

/// Several items of one account in a batch: each starts from the balance the earlier
/// ones left, the delta is their sum, and once suspended nothing runs to charge.
#[test]
fn a_batch_carries_an_accounts_balance_from_item_to_item() {
    let (d1, d2, d3) = (date("2026-11-23"), date("2026-11-24"), date("2026-11-25"));
    let accounts = HashMap::from([(9, funds(250)), (4, funds(1_000))]);
    let day_channels = || vec![channel(1, 100, false, true)];
    let channels = HashMap::from([
        ((9, d1), day_channels()),
        ((9, d2), day_channels()),
        ((9, d3), day_channels()),
        ((4, d1), vec![channel(5, 100, false, true)]),
    ]);
    let items = [(9, d1), (4, d1), (9, d2), (9, d3), (9, d3), (9, d1)];
    let plan = plan_charges(&items, &accounts, channels);
    assert_eq!(
        plan.outcomes,
        [
            Some(ChargeOutcome::Charged {
                total: 100,
                balance: 150,
                channels: 1
            }),
            Some(ChargeOutcome::Charged {
                total: 100,
                balance: 900,
                channels: 1
            }),
            Some(ChargeOutcome::Charged {
                total: 100,
                balance: 50,
                channels: 1
            }),
            Some(ChargeOutcome::Suspended {
                needed: 100,
                balance: 50,
                channels: vec![]
            }),
            Some(ChargeOutcome::NothingDue { balance: 50 }),
            Some(ChargeOutcome::NothingDue { balance: 50 }),
        ]
    );
    assert_eq!(plan.deltas, [(4, -100), (9, -200)], "ascending accounts");
    assert_eq!(plan.suspend, [(9, d3)]);
    let after: Vec<i64> = plan.charges.iter().map(|c| c.balance_after).collect();
    assert_eq!(after, [150, 900, 50]);
}

/// The same (account, day) twice in one batch is charged once.
#[test]
fn a_day_repeated_in_a_batch_is_paid_by_its_first_item() {
    let day = date("2026-11-25");
    let accounts = HashMap::from([(1, funds(1_000))]);
    let channels = HashMap::from([((1, day), vec![channel(1, 100, false, true)])]);
    let plan = plan_charges(&[(1, day), (1, day)], &accounts, channels);
    assert_eq!(plan.charges.len(), 1);
    assert_eq!(
        plan.outcomes[1],
        Some(ChargeOutcome::NothingDue { balance: 900 })
    );
    assert_eq!(plan.deltas, [(1, -100)]);
}

#[test]
fn charged_names_the_stopped_channels_and_new_e_mails() {
    let day = date("2026-11-25");
    let items = [(1, day), (2, day), (3, day)];
    let outcomes = vec![
        Some(ChargeOutcome::Suspended {
            needed: 100,
            balance: 0,
            channels: vec![],
        }),
        Some(ChargeOutcome::NothingDue { balance: 5 }),
        None,
    ];
    let stopped = HashMap::from([(1, vec![11, 12])]);
    let noticed = HashSet::from([1]);
    assert_eq!(
        charged(&items, outcomes, &stopped, &noticed),
        [
            Some(Charged {
                outcome: ChargeOutcome::Suspended {
                    needed: 100,
                    balance: 0,
                    channels: vec![11, 12]
                },
                notices: true
            }),
            Some(Charged {
                outcome: ChargeOutcome::NothingDue { balance: 5 },
                notices: false
            }),
            None,
        ]
    );
}

#[test]
fn a_new_channel_pays_today_or_is_refused() {
    let prices = Prices {
        default_price: 100,
        by_kind: BTreeMap::from([("telegram".to_owned(), 300)]),
    };
    let day = date("2026-11-25");
    let running = ["loopback".to_owned()];
    let c = charge_new_channel(1, funds(450), "telegram", &running, &prices, day).unwrap();
    // 150 left, 400 a day with the new one: the next run cannot pay.
    assert_eq!((c.price, c.balance_after), (300, 150));
    let notice = c.notice.unwrap();
    assert_eq!(
        (notice.kind.as_str(), notice.daily_total, notice.balance),
        ("warning_1_day", 400, 150)
    );
    let c = charge_new_channel(1, funds(1_000), "loopback", &[], &prices, day).unwrap();
    assert_eq!((c.balance_after, c.notice), (900, None));
    let err = charge_new_channel(1, funds(299), "telegram", &[], &prices, day).unwrap_err();
    assert_eq!(err.kind(), "insufficient_funds");
    assert!(err.to_string().contains("balance 299"), "{err}");
}

#[test]
fn a_resume_pays_the_unpaid_day_for_every_channel() {
    let (today, unpaid) = (date("2026-11-24"), date("2026-11-25"));
    assert_eq!(resume_day(Some(unpaid), today), unpaid);
    assert_eq!(resume_day(Some(date("2026-11-20")), today), today);
    assert_eq!(resume_day(None, today), today);

    let ch = |id, suspended, paid| ResumeChannel {
        id,
        price: 100,
        suspended,
        paid,
    };
    let channels = [ch(1, true, false), ch(2, true, true), ch(3, false, false)];
    assert_eq!(plan_resume(1, funds(199), unpaid, &channels), None);
    let plan = plan_resume(1, funds(250), unpaid, &channels).unwrap();
    let rows: Vec<(Id, i64)> = plan
        .charges
        .iter()
        .map(|c| (c.channel, c.balance_after))
        .collect();
    assert_eq!(rows, [(1, 150), (3, 50)]);
    assert!(plan.charges.iter().all(|c| c.day == unpaid));
    assert_eq!((plan.balance, plan.delta), (50, -200));
    // All three run once resumed: 300 a day against 50.
    let notice = plan.notice.unwrap();
    assert_eq!(
        (notice.kind.as_str(), notice.daily_total),
        ("warning_1_day", 300)
    );
    // Nothing suspended: nothing to resume, whatever the balance.
    assert_eq!(
        plan_resume(1, funds(1_000), unpaid, &[ch(3, false, false)]),
        None
    );
}

#[test]
fn a_charge_batch_runs_each_day_of_an_account_once() {
    let ids = [
        "new",
        "redelivered",
        "held",
        "mine",
        "twin",
        "twin",
        "dup-a",
        "dup-b",
        "dead",
    ];
    let keys: Vec<String> = [
        "k-new", "k-re", "k-held", "k-mine", "k-twin", "k-twin", "k-dup", "k-dup", "k-dead",
    ]
    .map(String::from)
    .to_vec();
    let row = |id: &str, key: Option<&str>, state: &str| {
        (id.to_owned(), key.map(String::from), state.to_owned())
    };
    let rows = [
        row("redelivered", Some("k-re"), "done"),
        row("other", Some("k-held"), "pending"),
        row("held", None, "pending"),
        row("mine", Some("k-mine"), "running"),
        row("dead", Some("k-dead"), "dead"),
    ];
    let mut out = vec![BatchedJob::Done; ids.len()];
    let live = charges_to_run(&ids, &keys, &rows, &mut out);
    let run = |index, journalled, charge| ChargeRun {
        index,
        journalled,
        charge,
    };
    assert_eq!(
        live,
        [
            // No row, key free: charges; the batch writes its row.
            run(0, false, true),
            // Its own row, another row holds the key: only its row is finished.
            run(2, true, false),
            // Its own row holds the key: charges.
            run(3, true, true),
            run(4, false, true),
            // The first job of a key charges; the second has no row: nothing to do.
            run(6, false, true),
        ]
    );
    let finished: Vec<usize> = out
        .iter()
        .enumerate()
        .filter(|(_, o)| **o == BatchedJob::AlreadyFinished)
        .map(|(i, _)| i)
        .collect();
    // Done already; the same job twice; a second job of a key; dead already.
    assert_eq!(finished, [1, 5, 7, 8]);
}
