//! cluster: what running several release-built `patchbayd`s on one PostgreSQL store and
//! one Redis queue costs, and how fast channels move when a node dies.
//!
//! 1. **Lease upkeep**: `CLUSTER_NODES` daemons share `CLUSTER_CHANNELS` idle loopback
//!    channels; over `CLUSTER_IDLE_SECS` the bench counts the statements the daemons'
//!    connections ran (`pg_stat_statements`), per second and per 1,000 channels.
//! 2. **Failover**: `CLUSTER_KILLS` times, kill -9 one node (round robin) and time until
//!    the survivors run every channel (each process's own `status.running_channels`);
//!    then restart it and wait for the even split again.
//! 3. **Coordination cost**: the same total inbound traffic (`CLUSTER_RATE` msg/s over
//!    `CLUSTER_TRAFFIC_CHANNELS` channels, for `CLUSTER_SECS`) on 1 and on
//!    `CLUSTER_NODES` daemons: CPU seconds (daemons + Redis + PostgreSQL backends) per
//!    1,000 messages stored, and their ratio.
//!
//!     cargo bench -p patchbay-daemon --bench cluster
//!
//! Knobs (environment, defaults): CLUSTER_NODES (3), CLUSTER_CHANNELS (1000),
//! CLUSTER_IDLE_SECS (60), CLUSTER_KILLS (10), CLUSTER_TTL (15: `leases.ttl_secs`),
//! CLUSTER_RATE (1500), CLUSTER_TRAFFIC_CHANNELS (30), CLUSTER_SECS (30), plus
//! PATCHBAYD_BIN / LOOPBACK_LIB / BENCH_TMPDIR (see common/mod.rs).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Res<()> {
    let nodes: usize = env_or("CLUSTER_NODES", 3);
    let channels: usize = env_or("CLUSTER_CHANNELS", 1000);
    let idle_secs: u64 = env_or("CLUSTER_IDLE_SECS", 60);
    let kills: usize = env_or("CLUSTER_KILLS", 10);
    let ttl: u64 = env_or("CLUSTER_TTL", 15);
    let rate: f64 = env_or("CLUSTER_RATE", 1500.0);
    let traffic_channels: usize = env_or("CLUSTER_TRAFFIC_CHANNELS", 30);
    let secs: u64 = env_or("CLUSTER_SECS", 30);
    println!("cluster bench — {}", machine());
    println!("patchbayd: {}\n", patchbayd_bin().display());
    let pg = BenchPg::start().await?;
    let mut summary = Vec::new();

    {
        let redis = Redis::start()?;
        let url = pg.create_database("cluster_upkeep", None).await?;
        let mut cluster = Cluster::start(nodes, &redis, &url, ttl)?;
        let ids = cluster.add_channels(channels, |_| json!({})).await?;
        let started = Instant::now();
        cluster.settled(&ids, 1, Duration::from_secs(300)).await?;
        println!(
            "{nodes} nodes took {channels} channels in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(ttl)).await;
        let before = pg.statement_calls("cluster_upkeep").await?;
        tokio::time::sleep(Duration::from_secs(idle_secs)).await;
        let calls = pg.statement_calls("cluster_upkeep").await? - before;
        let per_sec = calls as f64 / idle_secs as f64;
        summary.push(format!(
            "lease upkeep: {nodes} nodes, {channels} idle channels, ttl {ttl} s: {per_sec:.1} \
             statements/s in all ({:.2} per 1,000 channels)",
            per_sec * 1000.0 / channels as f64
        ));
        println!("{}", summary.last().expect("line"));

        let mut times = Vec::new();
        for k in 0..kills {
            let victim = k % nodes;
            cluster.daemons[victim].kill9();
            let killed = Instant::now();
            let survivors: Vec<usize> = (0..nodes).filter(|&i| i != victim).collect();
            cluster
                .covered(&survivors, &ids, Duration::from_secs(ttl * 4 + 30))
                .await?;
            let took = killed.elapsed();
            println!(
                "kill {}: node {} → its channels ran elsewhere after {:.2} s",
                k + 1,
                victim + 1,
                took.as_secs_f64()
            );
            times.push(took.as_millis() as i64);
            cluster.daemons[victim].spawn()?;
            cluster.settled(&ids, 1, Duration::from_secs(300)).await?;
        }
        if !times.is_empty() {
            times.sort_unstable();
            summary.push(format!(
                "failover over {kills} kills, {channels} channels, ttl {ttl} s: p50 {:.2} s, max {:.2} s \
                 (target max ≤ ttl + 2 s = {} s)",
                pct(&times, 50.0) as f64 / 1000.0,
                times[times.len() - 1] as f64 / 1000.0,
                ttl + 2
            ));
            println!("{}", summary.last().expect("line"));
        }
        cluster.stop();
        pg.drop_database("cluster_upkeep").await?;
    }

    let mut per_k = Vec::new();
    for n in [1, nodes] {
        let redis = Redis::start()?;
        let db = format!("cluster_traffic_{n}");
        let url = pg.create_database(&db, None).await?;
        let mut cluster = Cluster::start(n, &redis, &url, ttl)?;
        let each = rate / traffic_channels as f64;
        // Idle until every channel is placed, then the traffic starts with `burst`
        // off and a fixed rate; every node's instances generate at `each` msg/s.
        let ids = cluster
            .add_channels(
                traffic_channels,
                |_| json!({"rate_per_sec": each, "clients": 50}),
            )
            .await?;
        cluster.settled(&ids, 1, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pids = cluster.pids(&redis, &pg, &db).await?;
        let cpu0: f64 = pids.iter().filter_map(|&p| cpu_secs(p)).sum();
        let stored0 = stored(&pg, &db).await?;
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let cpu1: f64 = pids.iter().filter_map(|&p| cpu_secs(p)).sum();
        let stored1 = stored(&pg, &db).await?;
        let msgs = (stored1 - stored0).max(1);
        let cpu_per_k = (cpu1 - cpu0) / msgs as f64 * 1000.0;
        per_k.push(cpu_per_k);
        summary.push(format!(
            "traffic on {n} node(s): {msgs} messages stored in {secs} s ({:.0} msg/s), {:.3} CPU s \
             per 1,000 messages (daemons + Redis + PostgreSQL backends, {} processes)",
            msgs as f64 / secs as f64,
            cpu_per_k,
            pids.len()
        ));
        println!("{}", summary.last().expect("line"));
        cluster.stop();
        pg.drop_database(&db).await?;
    }
    if let [one, many] = per_k[..] {
        summary.push(format!(
            "coordination: CPU per 1,000 messages on {nodes} nodes / on 1 = {:.2} (target ≤ 1.2)",
            many / one
        ));
    }
    println!("\n==== cluster summary (load now {}) ====", loadavg());
    for s in summary {
        println!("{s}");
    }
    Ok(())
}

/// Inbound messages in the store.
async fn stored(pg: &BenchPg, db: &str) -> Res<i64> {
    pg.count(db, "SELECT COUNT(*) FROM messages WHERE direction = 'in'")
        .await
}

struct Cluster {
    daemons: Vec<Daemon>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn start(n: usize, redis: &Redis, url: &str, ttl: u64) -> Res<Cluster> {
        let mut daemons = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..n {
            let dir = tempdir("pb-bench-cluster-");
            let extra = format!(
                "[billing]\ndefault_price = 0\n[http]\nlisten = \"127.0.0.1:0\"\n\
                 [node]\nname = \"b{}\"\n[leases]\nttl_secs = {ttl}\n",
                i + 1
            );
            daemons.push(Daemon::start(
                dir.path(),
                Backend::Redis,
                Some(redis),
                &StoreAt::Postgres(url.to_owned()),
                &extra,
            )?);
            dirs.push(dir);
        }
        Ok(Cluster {
            daemons,
            _dirs: dirs,
        })
    }

    async fn add_channels(&self, n: usize, config: impl Fn(usize) -> Value) -> Res<BTreeSet<i64>> {
        let d = &self.daemons[0];
        let (acc, admin) = d.account("cluster").await?;
        let mut ids = BTreeSet::new();
        for i in 0..n {
            ids.insert(d.loopback(acc, admin, &format!("c{i}"), config(i)).await?);
        }
        Ok(ids)
    }

    async fn running(&self, i: usize) -> Res<BTreeSet<i64>> {
        let status = self.daemons[i].call("status", json!({})).await?;
        Ok(status["running_channels"]
            .as_array()
            .ok_or("no running_channels in status")?
            .iter()
            .filter_map(Value::as_i64)
            .collect())
    }

    /// Until the nodes `among` together run every channel of `ids`, none twice.
    async fn covered(&self, among: &[usize], ids: &BTreeSet<i64>, limit: Duration) -> Res<()> {
        let start = Instant::now();
        loop {
            let mut total = 0;
            let mut union = BTreeSet::new();
            for &i in among {
                let r = self.running(i).await?;
                total += r.len();
                union.extend(r);
            }
            if &union == ids && total == ids.len() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "channels not covered after {limit:?}: {total} of {}",
                    ids.len()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Until every node runs within `spread` of an even share and all run every channel.
    async fn settled(&self, ids: &BTreeSet<i64>, spread: usize, limit: Duration) -> Res<()> {
        let start = Instant::now();
        let all: Vec<usize> = (0..self.daemons.len()).collect();
        let even = ids.len() as f64 / all.len() as f64;
        loop {
            let mut counts = Vec::new();
            for &i in &all {
                counts.push(self.running(i).await?.len());
            }
            let balanced = counts
                .iter()
                .all(|&c| (c as f64 - even).abs() <= spread as f64);
            if balanced && counts.iter().sum::<usize>() == ids.len() {
                return self.covered(&all, ids, limit).await;
            }
            if start.elapsed() > limit {
                return Err(format!("not settled after {limit:?}: {counts:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The daemons, Redis, and the PostgreSQL backends serving database `db`.
    async fn pids(&self, redis: &Redis, pg: &BenchPg, db: &str) -> Res<Vec<u32>> {
        let mut pids: Vec<u32> = self.daemons.iter().map(Daemon::pid).collect();
        pids.push(redis.pid());
        pids.extend(pg.backend_pids(db).await?);
        Ok(pids)
    }

    fn stop(&mut self) {
        for d in &mut self.daemons {
            d.terminate();
        }
    }
}
