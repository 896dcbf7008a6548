//! Daily billing and balance warnings against a real SMTP server (aiosmtpd): the worked
//! example of SPEC §5 day by day, suspension and resumption, each (channel, day) charged
//! once whatever reruns, a second daemon or kill -9 do, mail that survives an SMTP
//! server that is down at first, and which days an operator may charge. Days after
//! today are refused, so tests of several days move the daemon's wall clock
//! (`Daemon::start_clocked`).

use std::time::Duration;

use chrono::{Days, NaiveDate};
use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, Smtp, header};

/// Mail through `smtp`, loopback channels at 100 a day; `billing` adds `[billing]` keys.
fn billing_config(smtp: &Smtp, billing: &str) -> String {
    format!(
        "[mail]\ntransport = \"smtp\"\nsmtp_url = \"{}\"\nfrom = \"Billing <billing@patchbay.test>\"\n\
         [billing]\ndefault_price = 0\n{billing}[billing.prices]\nloopback = 100\n",
        smtp.url()
    )
}

fn today() -> NaiveDate {
    chrono::Utc::now().date_naive()
}

async fn run_day(d: &Daemon, date: NaiveDate) {
    let r = d.ok("billing.run", json!({"date": date})).await;
    d.job_until(
        r["job"].as_str().expect("job"),
        &["done"],
        Duration::from_secs(30),
    )
    .await;
    // The fan-out's charge_account and balance_check jobs: charges wait in the queue
    // without journal rows (SQLite queue), so both the queue and the journal must be
    // empty of work.
    d.until("billing jobs finished", Duration::from_secs(60), || async {
        let depth = &d.ok("status", json!({})).await["queue_depth"];
        if depth["charge_account"] != 0 || depth["balance_check"] != 0 {
            return None;
        }
        let jobs = d.ok("job.list", json!({"limit": 10000})).await;
        jobs.as_array()?
            .iter()
            .all(|j| j["state"] == "done" || j["state"] == "dead")
            .then_some(())
    })
    .await;
}

async fn balance(d: &Daemon, acc: i64) -> i64 {
    d.ok("account.get", json!({"account": acc})).await["balance"]
        .as_i64()
        .expect("balance")
}

fn subjects(smtp: &Smtp) -> Vec<String> {
    let mut s: Vec<String> = smtp
        .messages()
        .iter()
        .filter_map(|m| header(m, "Subject"))
        .collect();
    s.sort();
    s
}

/// SPEC §5: setting 3, daily total 100, balance 250 after today's charge → "3 days"
/// warning today; at 50 two days later → "1 day"; the next run suspends.
#[tokio::test(flavor = "multi_thread")]
async fn worked_example_day_by_day() {
    let smtp = Smtp::start();
    let d = Daemon::start_clocked(Backend::Sqlite, &billing_config(&smtp, ""));
    let (acc, admin) = d.account("acme").await;
    d.ok("user.add", json!({"account": acc, "name": "Second admin", "email": "boss@acme.test", "role": "administrator"})).await;
    d.ok(
        "user.add",
        json!({"account": acc, "name": "Op", "email": "op@acme.test", "role": "operator"}),
    )
    .await;
    let t0 = today();
    let day = |n: u64| t0.checked_add_days(Days::new(n)).expect("date");

    // Day 0: the channel is charged at once; 350 - 100 = 250 → "3 days".
    d.fails(
        "channel.add",
        json!({"account": acc, "actor": admin, "kind": "loopback", "name": "x", "config": {}}),
        "insufficient_funds",
    )
    .await;
    d.ok(
        "account.topup",
        json!({"account": acc, "amount": 350, "reference": "start"}),
    )
    .await;
    let channel = d.loopback(acc, admin, json!({"rate_per_sec": 0})).await;
    let got = d.ok("account.get", json!({"account": acc})).await;
    assert_eq!(
        (got["balance"].as_i64(), got["daily_total"].as_i64()),
        (Some(250), Some(100))
    );
    assert_eq!(got["days_until_disconnection"], 3);
    let subject0 = format!(
        "acme: channels will be disconnected in 3 days (on {})",
        day(3)
    );
    d.until("the 3-day warning", Duration::from_secs(30), || async {
        (subjects(&smtp) == [subject0.clone()]).then_some(())
    })
    .await;
    let mail = smtp.messages().pop().expect("mail");
    let to = header(&mail, "To").expect("To");
    assert!(
        to.contains("admin@acme.test")
            && to.contains("boss@acme.test")
            && !to.contains("op@acme.test"),
        "{to}"
    );
    assert!(
        mail.contains("2.50 USD") && mail.contains("1.00 USD"),
        "figures in the body:\n{mail}"
    );

    // Day 1: 150 left, 2 days: no mail. Rerunning day 0 changes nothing.
    run_day(&d, day(0)).await;
    d.set_days_ahead(1).await;
    run_day(&d, day(0)).await;
    run_day(&d, day(1)).await;
    assert_eq!(balance(&d, acc).await, 150);
    // Day 2: 50 left → "1 day". Rerun of day 2: nothing twice.
    d.set_days_ahead(2).await;
    run_day(&d, day(2)).await;
    run_day(&d, day(2)).await;
    assert_eq!(balance(&d, acc).await, 50);
    let subject2 = format!(
        "acme: channels will be disconnected in 1 day (on {})",
        day(3)
    );
    d.until("the 1-day warning", Duration::from_secs(30), || async {
        (subjects(&smtp).len() == 2).then_some(())
    })
    .await;
    assert!(subjects(&smtp).contains(&subject2), "{:?}", subjects(&smtp));

    // Day 3: cannot pay → nothing charged, suspended, "disconnected" mail.
    d.set_days_ahead(3).await;
    run_day(&d, day(3)).await;
    assert_eq!(balance(&d, acc).await, 50, "all or nothing: not charged");
    let ch = d.ok("channel.list", json!({"account": acc})).await[0].clone();
    assert_eq!(
        (ch["status"].as_str(), ch["status_reason"].as_str()),
        (Some("suspended"), Some("insufficient_funds"))
    );
    d.until("the disconnected mail", Duration::from_secs(30), || async {
        (subjects(&smtp).len() == 3).then_some(())
    })
    .await;
    assert!(
        subjects(&smtp)
            .iter()
            .any(|s| s == "acme: channels disconnected, balance too low")
    );
    run_day(&d, day(3)).await;
    assert_eq!(subjects(&smtp).len(), 3, "each mail once");

    // A top-up that covers the day resumes the channel and charges day 3 once.
    let r = d
        .ok(
            "account.topup",
            json!({"account": acc, "amount": 500, "reference": "rescue"}),
        )
        .await;
    assert_eq!(r["resumed_channels"], 1);
    assert_eq!(balance(&d, acc).await, 450);
    d.until("channel reconnected", Duration::from_secs(20), || async {
        let c = d.ok("channel.list", json!({"account": acc})).await;
        (c[0]["id"] == channel && c[0]["status"] == "connected").then_some(())
    })
    .await;
    run_day(&d, day(3)).await;
    let ledger = d.ok("account.ledger", json!({"account": acc})).await;
    let charges: Vec<&Value> = ledger
        .as_array()
        .expect("ledger")
        .iter()
        .filter(|e| e["kind"] == "charge")
        .collect();
    let mut days: Vec<&str> = charges.iter().filter_map(|e| e["day"].as_str()).collect();
    days.sort();
    let want: Vec<String> = (0..4).map(|n| day(n).to_string()).collect();
    assert_eq!(days, want, "one charge per day");
    assert!(charges.iter().all(|e| e["amount"] == -100));
}

/// 40 accounts with 1-3 channels; three daemons share the Redis queue and the PostgreSQL
/// store, all start the same day's run, and one is killed mid fan-out: every (channel, day)
/// is charged exactly once and every balance is exact. On Redis the charges are
/// journalled before they are queued.
#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_and_a_kill_charge_each_channel_once() {
    three_daemons_and_a_kill(Backend::Redis).await;
}

/// The same on the SQLite queue, where the charges are queued without journal rows:
/// the killed daemon's charges in flight are redelivered, not journalled.
#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_and_a_kill_charge_each_channel_once_unjournalled() {
    three_daemons_and_a_kill(Backend::Sqlite).await;
}

async fn three_daemons_and_a_kill(backend: Backend) {
    let smtp = Smtp::start();
    // Several daemons share a PostgreSQL store (a second one on a SQLite file is
    // refused), in both builds of the suite.
    let store = format!(
        "[store]\nurl = \"{}\"\n",
        crate::pg_cluster::fresh_database("e2e")
    );
    let config = format!("{}{store}", billing_config(&smtp, ""));
    let mut a = Daemon::start_clocked(backend, &config);
    let (mut expected, mut channels) = (Vec::new(), 0);
    for i in 0..40 {
        let (acc, admin) = a.account(&format!("acc{i}")).await;
        a.ok(
            "account.topup",
            json!({"account": acc, "amount": 10_000, "reference": "t"}),
        )
        .await;
        let n = 1 + i % 3;
        for _ in 0..n {
            a.ok("channel.add", json!({"account": acc, "actor": admin, "kind": "loopback", "name": "c", "config": {"rate_per_sec": 0}})).await;
        }
        channels += n;
        expected.push((acc, 10_000 - 200 * n));
    }
    // Two more daemons on the same store, queue and clock; all live the next day.
    let b = a.sibling();
    let c = a.sibling();
    b.set_days_ahead(1).await;
    let date = today().checked_add_days(Days::new(1)).expect("date");
    let (ra, rb, rc) = tokio::join!(
        a.ok("billing.run", json!({"date": date})),
        b.ok("billing.run", json!({"date": date})),
        c.ok("billing.run", json!({"date": date}))
    );
    assert_eq!(ra["job"], rb["job"], "one billing_run per day");
    assert_eq!(ra["job"], rc["job"], "one billing_run per day");
    // Kill one daemon while charges run, then bring it back.
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.kill9();
    a.spawn();
    run_day(&b, date).await;
    d_check(&b, &expected, channels, date).await;
}

async fn d_check(d: &Daemon, expected: &[(i64, i64)], channels: i64, date: NaiveDate) {
    let mut charged = 0;
    for &(acc, want) in expected {
        d.until("balance settles", Duration::from_secs(60), || async {
            (balance(d, acc).await == want).then_some(())
        })
        .await;
        let ledger = d.ok("account.ledger", json!({"account": acc})).await;
        charged += ledger
            .as_array()
            .expect("ledger")
            .iter()
            .filter(|e| e["kind"] == "charge" && e["day"] == date.to_string())
            .count() as i64;
    }
    assert_eq!(charged, channels, "each channel charged once for {date}");
}

/// 120 accounts as in the worked example, warned together by one billing run: their
/// `balance_check`s run in batches whose e-mails go out 32 accounts at a time while
/// earlier accounts are being settled. Every administrator gets each warning once, and
/// a rerun of the day sends nothing.
#[tokio::test(flavor = "multi_thread")]
async fn one_run_warns_many_accounts_each_once() {
    const ACCOUNTS: usize = 120;
    let smtp = Smtp::start();
    let d = Daemon::start_clocked(Backend::Sqlite, &billing_config(&smtp, ""));
    let t0 = today();
    let day = |n: u64| t0.checked_add_days(Days::new(n)).expect("date");
    let mut names = Vec::new();
    for i in 0..ACCOUNTS {
        let name = format!("acc{i}");
        let (acc, admin) = d.account(&name).await;
        d.ok(
            "account.topup",
            json!({"account": acc, "amount": 350, "reference": "t"}),
        )
        .await;
        // Charged 100 at once: 250 left, the "3 days" warning (sent one by one).
        d.loopback(acc, admin, json!({"rate_per_sec": 0})).await;
        names.push(name);
    }
    d.until("the 3-day warnings", Duration::from_secs(60), || async {
        (smtp.messages().len() == ACCOUNTS).then_some(())
    })
    .await;
    // Day 1: 150 left, no mail. Day 2: 50 left, "1 day" for every account at once.
    d.set_days_ahead(1).await;
    run_day(&d, day(1)).await;
    d.set_days_ahead(2).await;
    run_day(&d, day(2)).await;
    d.until("the 1-day warnings", Duration::from_secs(60), || async {
        (smtp.messages().len() >= 2 * ACCOUNTS).then_some(())
    })
    .await;
    run_day(&d, day(2)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mails = smtp.messages();
    assert_eq!(mails.len(), 2 * ACCOUNTS, "each warning once");
    for name in &names {
        let to = format!("admin@{name}.test");
        let mut got: Vec<String> = mails
            .iter()
            .filter(|m| header(m, "To").is_some_and(|t| t.contains(&to)))
            .filter_map(|m| header(m, "Subject"))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                format!(
                    "{name}: channels will be disconnected in 1 day (on {})",
                    day(3)
                ),
                format!(
                    "{name}: channels will be disconnected in 3 days (on {})",
                    day(3)
                ),
            ],
            "{name}'s e-mails"
        );
    }
}

/// The SMTP server is down when the warning is due; the job retries with backoff and
/// the mail arrives exactly once when the server comes up.
#[tokio::test(flavor = "multi_thread")]
async fn warning_survives_an_smtp_outage() {
    let mut smtp = Smtp::reserve();
    let d = Daemon::start_with(Backend::Sqlite, &billing_config(&smtp, ""));
    let (acc, admin) = d.account("late").await;
    d.ok(
        "account.topup",
        json!({"account": acc, "amount": 150, "reference": "t"}),
    )
    .await;
    d.loopback(acc, admin, json!({"rate_per_sec": 0})).await;
    // Balance 50 after the charge: the "1 day" warning is due, the server is down.
    d.until(
        "a failed balance_check",
        Duration::from_secs(30),
        || async {
            let jobs = d.ok("job.list", json!({"kind": "balance_check"})).await;
            jobs.as_array()?
                .iter()
                .any(|j| j["state"] == "failed" && j["attempts"].as_i64() >= Some(1))
                .then_some(())
        },
    )
    .await;
    smtp.listen();
    d.until(
        "the warning after the outage",
        Duration::from_secs(60),
        || async { (smtp.messages().len() == 1).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(smtp.messages().len(), 1, "sent once");
    let jobs = d.ok("job.list", json!({"kind": "balance_check"})).await;
    assert!(
        jobs.as_array()
            .expect("jobs")
            .iter()
            .all(|j| j["state"] == "done"),
        "{jobs}"
    );
}

/// The days of each channel's charges in an account's ledger, by channel.
async fn charged_days(d: &Daemon, acc: i64) -> std::collections::BTreeMap<i64, Vec<String>> {
    let ledger = d
        .ok("account.ledger", json!({"account": acc, "limit": 1000}))
        .await;
    let mut out = std::collections::BTreeMap::<i64, Vec<String>>::new();
    for e in ledger.as_array().expect("ledger") {
        if e["kind"] == "charge" {
            let channel = e["channel"].as_i64().expect("channel");
            let day = e["day"].as_str().expect("day").to_owned();
            out.entry(channel).or_default().push(day);
        }
    }
    for days in out.values_mut() {
        days.sort();
    }
    out
}

/// An operator charges no day after today and none more than `billing.catch_up_days`
/// (2 here) before it — through `billing.run` and `job.enqueue` alike, charging nothing
/// — and a past day within the window charges each channel by what it was that day:
/// one removed during the day or later pays it, one created later does not, and one
/// suspended only since pays it too, without a second "disconnected" e-mail.
#[tokio::test(flavor = "multi_thread")]
async fn operators_charge_past_days_by_their_state_and_no_future_day() {
    let smtp = Smtp::start();
    let d = Daemon::start_clocked(
        Backend::Sqlite,
        &billing_config(&smtp, "catch_up_days = 2\n"),
    );
    let t0 = today();
    let day = |n: u64| t0.checked_add_days(Days::new(n)).expect("date");
    let lb = json!({"rate_per_sec": 0});
    // Day 0: acme's channels a, b, c and beta's d, each paid at once (100).
    let (acme, admin) = d.account("acme").await;
    d.ok(
        "account.topup",
        json!({"account": acme, "amount": 10_000, "reference": "t"}),
    )
    .await;
    let a = d.loopback(acme, admin, lb.clone()).await;
    let b = d.loopback(acme, admin, lb.clone()).await;
    let c = d.loopback(acme, admin, lb.clone()).await;
    let (beta, beta_admin) = d.account("beta").await;
    d.ok(
        "account.topup",
        json!({"account": beta, "amount": 350, "reference": "t"}),
    )
    .await;
    let ch_d = d.loopback(beta, beta_admin, lb.clone()).await;
    // Day 1: b is removed. Day 2: c is removed; beta adds e (paid at once: 150 left).
    d.set_days_ahead(1).await;
    let remove = |channel: i64| json!({"account": acme, "actor": admin, "channel": channel});
    d.ok("channel.remove", remove(b)).await;
    d.set_days_ahead(2).await;
    d.ok("channel.remove", remove(c)).await;
    let ch_e = d.loopback(beta, beta_admin, lb.clone()).await;

    // Day 3: later days and days before day 1 are refused, whoever asks.
    d.set_days_ahead(3).await;
    let before = (charged_days(&d, acme).await, charged_days(&d, beta).await);
    for date in [day(4), day(33), day(0)] {
        let msg = d
            .fails("billing.run", json!({"date": date}), "invalid_value")
            .await;
        let why = if date > day(3) {
            format!("after today ({} in the billing time zone)", day(3))
        } else {
            format!("earliest day that may still be charged is {}", day(1))
        };
        assert!(msg.contains(&why), "{msg}");
    }
    for (kind, payload) in [
        ("billing_run", json!({"date": day(4)})),
        ("billing_run", json!({"date": day(0)})),
        ("charge_account", json!({"account": acme, "date": day(4)})),
        ("charge_account", json!({"account": acme, "date": day(33)})),
        ("charge_account", json!({"account": beta, "date": day(0)})),
    ] {
        d.fails(
            "job.enqueue",
            json!({"kind": kind, "payload": payload}),
            "invalid_value",
        )
        .await;
    }
    assert_eq!(
        (charged_days(&d, acme).await, charged_days(&d, beta).await),
        before,
        "nothing charged for a refused day"
    );
    assert_eq!(
        (balance(&d, acme).await, balance(&d, beta).await),
        (9_700, 150)
    );
    // (Day 0's own run, queued at start, fanned out day 0's charges: those are there.)
    let jobs = d.ok("job.list", json!({"limit": 1000})).await;
    assert!(
        jobs.as_array().expect("jobs").iter().all(|j| {
            let date = j["payload"]["date"].as_str().unwrap_or_default();
            date.is_empty() || date <= day(3).to_string().as_str()
        }),
        "no job for a day after today: {jobs}"
    );

    // Today: acme pays for a; beta cannot pay d and e (200) and is suspended.
    run_day(&d, day(3)).await;
    assert_eq!(balance(&d, acme).await, 9_600);
    assert_eq!(balance(&d, beta).await, 150);
    let beta_channels = d.ok("channel.list", json!({"account": beta})).await;
    assert!(
        beta_channels
            .as_array()
            .expect("channels")
            .iter()
            .all(|ch| ch["status"] == "suspended"),
        "{beta_channels}"
    );
    // Day 1, caught up: a, b (removed during day 1) and c (removed on day 2) ran that
    // day, and so did d, suspended only since day 3; e did not exist yet.
    run_day(&d, day(1)).await;
    assert_eq!(balance(&d, acme).await, 9_300);
    assert_eq!(balance(&d, beta).await, 50);
    // Day 2 through job.enqueue: acme pays a and c, not b; beta cannot pay d (e paid
    // at once) and stays suspended, told once.
    for acc in [acme, beta] {
        let r = d
            .ok(
                "job.enqueue",
                json!({"kind": "charge_account", "payload": {"account": acc, "date": day(2)}}),
            )
            .await;
        d.job_until(
            r["id"].as_str().expect("id"),
            &["done"],
            Duration::from_secs(30),
        )
        .await;
    }
    assert_eq!(balance(&d, acme).await, 9_100);
    assert_eq!(balance(&d, beta).await, 50);
    let days = |ns: &[u64]| ns.iter().map(|&n| day(n).to_string()).collect::<Vec<_>>();
    assert_eq!(
        charged_days(&d, acme).await,
        [
            (a, days(&[0, 1, 2, 3])),
            (b, days(&[0, 1])),
            (c, days(&[0, 1, 2]))
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(
        charged_days(&d, beta).await,
        [(ch_d, days(&[0, 1])), (ch_e, days(&[2]))]
            .into_iter()
            .collect()
    );
    let disconnected = || {
        subjects(&smtp)
            .iter()
            .filter(|s| s.contains("channels disconnected"))
            .count()
    };
    d.until("the disconnected mail", Duration::from_secs(30), || async {
        (disconnected() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(disconnected(), 1, "{:?}", subjects(&smtp));
}

/// apalis-cron only looks ahead: a daemon started after `billing.run_at` queues that
/// day's run itself, once (a restart finds it queued already).
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_started_after_run_at_catches_up_the_day() {
    let mut d = Daemon::start_with(
        Backend::Sqlite,
        "[billing]\nrun_at = \"00:00\"\ndefault_price = 0\n",
    );
    let first = d
        .until("today's run queued", Duration::from_secs(15), || async {
            let jobs = billing_runs(&d).await;
            (!jobs.is_empty()).then_some(jobs)
        })
        .await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["payload"]["date"], json!(today()));
    d.kill9();
    d.spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        billing_runs(&d).await.len(),
        1,
        "the restart found today's run"
    );
}

async fn billing_runs(d: &Daemon) -> Vec<Value> {
    let jobs = d.ok("job.list", json!({"kind": "billing_run"})).await;
    jobs.as_array().cloned().unwrap_or_default()
}
