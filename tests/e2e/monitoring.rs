//! The operators' HTTP listener: `/metrics` after a known workload, `/readyz` through a
//! Redis outage, the dashboard in a real browser (Debian's chromium, headless) and its
//! retry action behind `http.token` and the CSRF check, and the refusal of a public
//! listener without a token.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, Daemon, PATCHBAYD};

const TOKEN: &str = "monitoring-test-token-0123456789";

/// `http://IP:PORT` of the daemon's listener, from `status`.
async fn base(d: &Daemon) -> String {
    let status = d.ok("status", json!({})).await;
    let addr = status["http"].as_str().expect("status.http: the listener address");
    format!("http://{addr}")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

/// Every sample of the scrape, keyed by name and sorted labels but `node`, after
/// checking that the whole text parses as the Prometheus exposition format and that
/// every sample names this node.
async fn scrape(base: &str, node: &str) -> HashMap<String, f64> {
    let reply = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(reply.status(), 200);
    let content_type = reply.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = reply.text().await.expect("body");
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        // Each sample line: a name, optional labels, one value.
        let value = line.rsplit(' ').next().unwrap_or("");
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "not a sample line: {line:?}"
        );
    }
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        assert_eq!(s.labels.get("node"), Some(node), "{} names its node", s.metric);
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != "node")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
    }
    out
}

fn sample(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have: {:?}", samples.keys().collect::<Vec<_>>()))
}

/// After N inbound messages from a connector, M sends and one dead job, the counters
/// say N, M and 1; the dashboard, loaded in chromium, shows the dead job and the
/// channels' statuses; retrying the job needs the token and this dashboard's CSRF
/// token, and then the job runs.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_the_dashboard_show_a_known_workload() {
    const N: u64 = 40;
    const M: usize = 3;
    let d = Daemon::start_with(
        Backend::Sqlite,
        &format!("[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[node]\nname = \"mon-1\"\n"),
    );
    let base = base(&d).await;
    let (acc, admin) = d.account("monitoring").await;
    let channel = d
        .loopback(
            acc,
            admin,
            json!({"burst": N, "limit": N, "id_prefix": "mon", "clients": 2}),
        )
        .await;
    d.until("N messages stored", Duration::from_secs(30), || async {
        (d.store_count("SELECT COUNT(*) FROM messages WHERE direction = 'in'").await == N as i64)
            .then_some(())
    })
    .await;
    let chats = d.ok("chat.list", json!({"account": acc})).await;
    let chat = chats[0]["id"].clone();
    for i in 0..M {
        let sent = d
            .ok(
                "message.send",
                json!({"chat": chat, "actor": admin, "text": format!("reply {i}")}),
            )
            .await;
        d.job_until(sent["job"].as_str().expect("job"), &["done"], Duration::from_secs(20))
            .await;
    }
    // Dead at once: the channel does not exist yet. The next channel added gets its id.
    let dead = d
        .ok(
            "job.enqueue",
            json!({"kind": "inbound_message", "payload": {
                "channel": channel + 1, "external_chat_id": "later", "external_message_id": "x1",
                "sender": {"phone": "+79161234567"}, "text": "early", "attachments": [],
                "sent_at": "2026-11-25T10:00:00Z"}}),
        )
        .await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    d.job_until(&dead, &["dead"], Duration::from_secs(20)).await;

    let m = scrape(&base, "mon-1").await;
    assert_eq!(sample(&m, "patchbay_inbound_messages_total{connector=loopback}"), N as f64);
    assert_eq!(
        sample(&m, "patchbay_connector_events_total{connector=loopback,outcome=accepted,type=inbound}"),
        N as f64
    );
    assert_eq!(
        sample(&m, "patchbay_outbound_messages_total{connector=loopback,outcome=sent}"),
        M as f64
    );
    assert_eq!(sample(&m, "patchbay_dead_jobs{kind=inbound_message}"), 1.0);
    assert_eq!(sample(&m, "patchbay_jobs_total{kind=inbound_message,outcome=dead}"), 1.0);
    assert_eq!(sample(&m, "patchbay_jobs_total{kind=inbound_message,outcome=done}"), N as f64);
    assert_eq!(sample(&m, "patchbay_jobs_total{kind=send_message,outcome=done}"), M as f64);
    assert_eq!(sample(&m, "patchbay_channels{status=connected}"), 1.0);
    assert_eq!(sample(&m, "patchbay_up{part=store}"), 1.0);
    assert!(m.contains_key("patchbay_job_duration_seconds_count{kind=send_message}"));
    assert!(m.contains_key("patchbay_job_queue_latency_seconds_count{kind=inbound_message}"));

    // A second channel that its messenger refuses: shown with its reason.
    let refused = d
        .ok(
            "channel.add",
            json!({"account": acc, "actor": admin, "kind": "loopback", "name": "refused",
                   "config": {"report_error": "token revoked <by the messenger>"}}),
        )
        .await["id"]
        .as_i64()
        .expect("id");
    assert_eq!(refused, channel + 1, "the dead job's channel");
    d.until("channel in error", Duration::from_secs(20), || async {
        let list = d.ok("channel.list", json!({"account": acc})).await;
        list.as_array()?
            .iter()
            .any(|c| c["id"] == refused && c["status"] == "error")
            .then_some(())
    })
    .await;

    let dom = chromium(&d, &format!("{base}/"), &["--dump-dom"]);
    let shot = d.dir.path().join("dashboard.png");
    chromium(
        &d,
        &format!("{base}/"),
        &[&format!("--screenshot={}", shot.display()), "--window-size=1280,1700"],
    );
    assert!(
        std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false),
        "a screenshot of the dashboard at {}",
        shot.display()
    );
    assert!(dom.contains(&format!("data-job=\"{dead}\"")), "the dead job is listed:\n{dom}");
    assert!(dom.contains("does not exist"), "with its last error");
    assert!(dom.contains("data-status=\"connected\""), "channel statuses");
    assert!(dom.contains("data-status=\"error\""));
    assert!(
        dom.contains("token revoked &lt;by the messenger&gt;"),
        "the reason, escaped"
    );
    assert!(dom.contains("sign in to retry"), "no retry button before signing in");
    assert!(dom.contains("node mon-1"), "the node's name in the header");

    let http = client();
    let retry_url = format!("{base}/jobs/{dead}/retry");
    let anonymous = http.post(&retry_url).form(&[("csrf", "x")]).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "a retry without the token is refused");
    let wrong = http.post(format!("{base}/login")).form(&[("token", "wrong")]).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let login = http.post(format!("{base}/login")).form(&[("token", TOKEN)]).send().await.unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let page = http
        .get(format!("{base}/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a retry form with its CSRF token once signed in")
        .to_owned();
    let forged = http
        .post(&retry_url)
        .header("cookie", &cookie)
        .form(&[("csrf", "00")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403, "the session alone is not enough");
    let foreign = http
        .post(&retry_url)
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403, "another site's form");
    assert_eq!(d.ok("job.get", json!({"id": dead})).await["state"], "dead", "nothing retried yet");
    let retried = http
        .post(&retry_url)
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 303);
    assert_eq!(retried.headers()["location"], format!("/?retried={dead}"));
    d.job_until(&dead, &["done"], Duration::from_secs(20)).await;
    // A script retries with the bearer token alone and gets JSON.
    let again = http
        .post(&retry_url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409, "the job is done now: nothing to retry");
    let body: Value = again.json().await.unwrap();
    assert!(body["error"].as_str().unwrap_or("").contains("only dead jobs"), "{body}");
    assert_eq!(
        d.store_count(&format!(
            "SELECT COUNT(*) FROM messages WHERE channel_id = {refused} AND external_message_id = 'x1'"
        ))
        .await,
        1,
        "the retried job stored its message"
    );
}

/// Loads `url` in headless chromium with a fresh profile and no network beyond
/// loopback; returns what it printed (the DOM with `--dump-dom`).
fn chromium(d: &Daemon, url: &str, args: &[&str]) -> String {
    let bin = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium must be installed (.ci/run installs Debian's chromium)");
    let profile = tempfile::tempdir_in(d.dir.path()).expect("profile dir");
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/readyz` turns 503, naming the queue, while the test's Redis is down, and 200 once
/// it is back; `/healthz` answers throughout.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_says_what_is_down_while_redis_is_stopped() {
    let mut d = Daemon::start(Backend::Redis);
    let base = base(&d).await;
    let http = client();
    let ready = || async {
        let r = http.get(format!("{base}/readyz")).send().await.expect("GET /readyz");
        let code = r.status().as_u16();
        (code, r.json::<Value>().await.expect("JSON body"))
    };
    let (code, body) = ready().await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["ready"], true);
    // The dashboard on the Redis queue, too; read-only without http.token.
    let page = http.get(format!("{base}/")).send().await.expect("GET /");
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let page = page.text().await.expect("page");
    assert!(page.contains("All parts up") && page.contains("data-kind=\"inbound_message\""));
    assert!(page.contains("read-only"));
    let retry = http.post(format!("{base}/jobs/x/retry")).send().await.unwrap();
    assert_eq!(retry.status(), 403, "no token configured: no actions");
    // A name re-pointed at 127.0.0.1 by another site (DNS rebinding) reads nothing.
    let rebound = http
        .get(format!("{base}/metrics"))
        .header("host", "evil.example:9464")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 421);
    d.redis.as_mut().expect("redis").stop();
    let (code, body) = ready().await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["queue"]["ok"], false, "{body}");
    assert!(body["down"][0].as_str().unwrap_or("").contains("queue down"), "{body}");
    let health = http.get(format!("{base}/healthz")).send().await.expect("GET /healthz");
    assert_eq!(health.status(), 200, "the process is alive");
    d.redis.as_mut().expect("redis").restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = ready().await;
        if code == 200 {
            assert_eq!(body["ready"], true);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still not ready: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A listener others can reach needs `http.token`: without it the daemon does not
/// start (exit 78, naming the key); with one, pages and `/metrics` need it.
#[tokio::test(flavor = "multi_thread")]
async fn a_public_listener_needs_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "[http]\nlisten = \"0.0.0.0:0\"\n").expect("config");
    let out = Command::new(PATCHBAYD)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run patchbayd");
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.token"), "{err}");

    let d = Daemon::start_with(
        Backend::Sqlite,
        &format!("[http]\nlisten = \"0.0.0.0:0\"\ntoken = \"{TOKEN}\"\n"),
    );
    let port = base(&d).await.rsplit(':').next().unwrap().to_owned();
    let base = format!("http://127.0.0.1:{port}");
    let http = client();
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 401, "the dashboard asks for the token");
    assert!(page.text().await.unwrap().contains("name=\"token\""));
    assert_eq!(http.get(format!("{base}/metrics")).send().await.unwrap().status(), 401);
    let scraped = http
        .get(format!("{base}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("patchbay_up"));
}
