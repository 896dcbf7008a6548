//! Our own Redis Streams backend for apalis workers (apalis-redis 1.0 wedges
//! on backlogs > ~8k jobs). Per queue: a stream + one consumer group, and a
//! ZSET of delayed jobs promoted in bounded batches.
//!
//! Job lifecycle: XADD (or ZADD when delayed) -> XREADGROUP into this worker's
//! pending list -> handler -> ack (XACK + XDEL, so XLEN + ZCARD is the depth).
//! Entries idle in a pending list longer than the visibility timeout (a
//! crashed or hung daemon) are taken over by any live worker with XAUTOCLAIM;
//! live workers refresh the idle time of the entries they hold, so a long
//! handler is not stolen. On graceful stop, fetched-but-unstarted entries are
//! re-added to the stream at once instead of waiting for the timeout.
//!
//! Entries reach the handler as their stored bytes: `queue::deliver` decodes them, and
//! one that does not decode is rejected (the daemon records it dead) and acked.

use std::{
    collections::{HashSet, VecDeque},
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicI64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use apalis_core::{
    backend::{Backend, BackendConfig, ext::BackendExt, finalize::Ephemeral},
    error::BoxDynError,
    task::{Task, builder::TaskBuilder, task_id::TaskId},
    worker::{builder::WorkerBuilder, context::WorkerContext},
};
use futures::{FutureExt, future::BoxFuture};
use redis::{
    RedisError, Script, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
    streams::{StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamReadReply},
};
use tower::{Layer, Service, limit::ConcurrencyLimitLayer};

use super::{
    Envelope, Handler, QueueError, Run, StartToken, WorkerBoard, WorkerSpec, deliver, run_monitor,
};

/// All daemons share one group per stream, so each job goes to one of them.
const GROUP: &str = "workers";
/// Stream entry field holding the JSON envelope.
const FIELD: &str = "env";
/// How often a busy worker checks the delayed ZSET (idle workers check once per `block`).
const PROMOTE_EVERY: Duration = Duration::from_millis(100);
/// Max ids per XCLAIM / requeue call.
const ID_CHUNK: usize = 500;

/// Knobs for the Redis backend.
#[derive(Clone, Debug)]
pub struct RedisTuning {
    /// A fetched entry not acked (and not refreshed by its live owner) for
    /// this long is redelivered to another worker.
    pub visibility_timeout: Duration,
    /// How often each worker scans for such abandoned entries.
    pub reclaim_interval: Duration,
    /// Longest XREADGROUP BLOCK (a worker's `poll_fallback` overrides it; at most a
    /// third of the visibility timeout). Any XADD ends a block at once; it bounds how
    /// late an idle worker promotes another process's delayed jobs that were not due
    /// when it started blocking (ours promote themselves, see `push`) and finds
    /// abandoned entries.
    pub block: Duration,
    /// Entries per XREADGROUP/XAUTOCLAIM (capped by the worker's concurrency).
    pub fetch_batch: usize,
    /// Due delayed jobs moved to the stream per script call.
    pub promote_batch: usize,
    /// XADDs per pipeline in `push_many`.
    pub push_chunk: usize,
    /// For non-blocking commands (redis-rs defaults to 500 ms, too short for
    /// a 10k-entry pipeline on a busy server).
    pub response_timeout: Duration,
}

impl Default for RedisTuning {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(30),
            reclaim_interval: Duration::from_secs(5),
            block: super::DEFAULT_POLL_FALLBACK,
            fetch_batch: 500,
            promote_batch: 200,
            push_chunk: 10_000,
            response_timeout: Duration::from_secs(10),
        }
    }
}

/// Moves due delayed jobs to the stream, at most ARGV[2] per call, so no
/// backlog size can exceed Lua's argument limits (apalis-redis' failure mode).
/// Returns how many moved and the due time (ms) of the next one still delayed, or -1:
/// an idle worker blocks no longer than until then.
const PROMOTE_LUA: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #due do
  redis.call('XADD', KEYS[2], '*', ARGV[3], due[i])
  redis.call('ZREM', KEYS[1], due[i])
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then
  return {#due, -1}
end
return {#due, tonumber(nxt[2])}
"#;

/// Ack = XACK + XDEL, atomically, so depth (XLEN) never counts finished jobs.
const ACK_LUA: &str = r#"
for i = 2, #ARGV do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return #ARGV - 1
"#;

/// Hands fetched-but-unstarted entries back: re-add at the tail, then drop
/// the original. Only entries still pending are re-added (no duplicates).
const REQUEUE_LUA: &str = r#"
for i = 3, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i + 1])
  end
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return 0
"#;

/// Deletes a consumer only if it holds no pending entries (DELCONSUMER
/// would silently drop them from the group otherwise).
const DROP_CONSUMER_LUA: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"#;

struct Scripts {
    promote: Script,
    ack: Script,
    requeue: Script,
    drop_consumer: Script,
}

#[derive(Clone, Debug)]
struct Keys {
    stream: String,
    delayed: String,
}

impl Keys {
    fn new(namespace: &str, queue: &str) -> Self {
        // Same hash tag on both keys so the scripts stay valid on a cluster.
        let tag = format!("{namespace}:{{{queue}}}");
        Self {
            stream: format!("{tag}:stream"),
            delayed: format!("{tag}:delayed"),
        }
    }
}

struct Inner {
    client: redis::Client,
    /// Shared multiplexed connection for pushes, acks and housekeeping.
    /// Never used for blocking reads (they would stall every caller).
    conn: ConnectionManager,
    namespace: String,
    tuning: RedisTuning,
    scripts: Arc<Scripts>,
}

#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

impl RedisQueue {
    pub(super) async fn open(
        url: &str,
        namespace: &str,
        tuning: RedisTuning,
    ) -> Result<Self, QueueError> {
        if tuning.fetch_batch == 0
            || tuning.promote_batch == 0
            || tuning.push_chunk == 0
            || tuning.block.is_zero()
            || tuning.visibility_timeout <= tuning.block
        {
            return Err(QueueError::Config(format!("bad redis tuning {tuning:?}")));
        }
        let client = redis::Client::open(url)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(tuning.response_timeout));
        let conn = client.get_connection_manager_with_config(cfg).await?;
        let scripts = Arc::new(Scripts {
            promote: Script::new(PROMOTE_LUA),
            ack: Script::new(ACK_LUA),
            requeue: Script::new(REQUEUE_LUA),
            drop_consumer: Script::new(DROP_CONSUMER_LUA),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn,
                namespace: namespace.to_owned(),
                tuning,
                scripts,
            }),
        })
    }

    /// `CONFIG GET append*` says `appendonly yes` and `appendfsync always` (or
    /// `everysec`, if `trust_everysec`). One glob, as Redis before 7 takes one
    /// parameter per `CONFIG GET`; read as a map, which takes both RESP2's flat pairs
    /// and RESP3's map; an error (`CONFIG` disabled, Redis down) is a no.
    pub(super) async fn keeps_acknowledged(&self, trust_everysec: bool) -> bool {
        let mut conn = self.inner.conn.clone();
        let reply: Result<std::collections::HashMap<String, String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("append*")
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(config) => {
                let fsync = config.get("appendfsync").map(String::as_str);
                config.get("appendonly").is_some_and(|v| v == "yes")
                    && (fsync == Some("always") || (trust_everysec && fsync == Some("everysec")))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read whether Redis has an append-only file; assuming not");
                false
            }
        }
    }

    fn keys(&self, queue: &str) -> Keys {
        Keys::new(&self.inner.namespace, queue)
    }

    pub(super) async fn push(
        &self,
        queue: &str,
        env: &Envelope,
        delay: Option<Duration>,
    ) -> Result<(), QueueError> {
        let keys = self.keys(queue);
        let json = serde_json::to_string(env)?;
        let mut conn = self.inner.conn.clone();
        match delay.filter(|d| !d.is_zero()) {
            Some(d) => {
                let due = now_ms().saturating_add(d.as_millis() as u64);
                redis::cmd("ZADD")
                    .arg(&keys.delayed)
                    .arg(due)
                    .arg(json)
                    .query_async::<()>(&mut conn)
                    .await?;
                self.promote_when_due(keys, d);
            }
            None => {
                redis::cmd("XADD")
                    .arg(&keys.stream)
                    .arg("*")
                    .arg(FIELD)
                    .arg(json)
                    .query_async::<()>(&mut conn)
                    .await?
            }
        }
        Ok(())
    }

    /// Moves a delayed job of ours to the stream once it is due, so a worker blocked in
    /// XREADGROUP wakes then rather than at the end of its block. Best effort: a worker
    /// promotes it anyway after its next block.
    fn promote_when_due(&self, keys: Keys, delay: Duration) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut conn = inner.conn.clone();
            let mut inv = inner.scripts.promote.key(&keys.delayed);
            inv.key(&keys.stream)
                .arg(now_ms())
                .arg(inner.tuning.promote_batch)
                .arg(FIELD);
            if let Err(e) = inv.invoke_async::<(i64, i64)>(&mut conn).await {
                tracing::debug!(error = %e, "cannot promote a due delayed job; a worker will");
            }
        });
    }

    /// One pipeline per `push_chunk` envelopes: a 100k fan-out is ~10 round
    /// trips. Not atomic across chunks; everything is encoded before sending.
    pub(super) async fn push_many(&self, queue: &str, envs: &[Envelope]) -> Result<(), QueueError> {
        let keys = self.keys(queue);
        let encoded = envs
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()?;
        let mut conn = self.inner.conn.clone();
        for chunk in encoded.chunks(self.inner.tuning.push_chunk) {
            let mut pipe = redis::pipe();
            for json in chunk {
                pipe.cmd("XADD")
                    .arg(&keys.stream)
                    .arg("*")
                    .arg(FIELD)
                    .arg(json)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    /// Acked entries are deleted, so stream length = waiting + in flight.
    pub(super) async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let keys = self.keys(queue);
        let mut conn = self.inner.conn.clone();
        let (len, delayed): (u64, u64) = redis::pipe()
            .cmd("XLEN")
            .arg(&keys.stream)
            .cmd("ZCARD")
            .arg(&keys.delayed)
            .query_async(&mut conn)
            .await?;
        Ok(len + delayed)
    }

    pub(super) async fn run_workers<H: Handler>(
        &self,
        specs: Vec<WorkerSpec>,
        handler: H,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
        run: Run,
    ) -> Result<(), QueueError> {
        // Our backend retries Redis errors itself; a worker still ends on a panic
        // outside the handlers, and is then restarted after a backoff (1 s doubling to
        // 32 s), so a fault that repeats cannot spin.
        let mut monitor = run.monitor("redis");
        let mut keepers = Vec::new();
        for (spec, (name, _)) in specs.into_iter().zip(run.names.iter().cloned()) {
            let acker = Acker {
                conn: self.inner.conn.clone(),
                keys: self.keys(&spec.queue),
                scripts: self.inner.scripts.clone(),
                owned: Owned::default(),
                consumer: name.clone(),
            };
            keepers.push(keep_leases(
                acker.clone(),
                self.inner.tuning.visibility_timeout,
            ));
            let inner = self.inner.clone();
            let handler = handler.clone();
            let up = Up {
                started: run.token(),
                board: run.board.clone(),
                queue: spec.queue.clone(),
            };
            monitor = monitor.register(move |restarts| {
                let handler = handler.clone();
                if restarts > 0 {
                    // What the ended worker held stays pending under our consumer name;
                    // no longer refreshed, it is reclaimed after the visibility timeout.
                    acker.owned.lock().clear();
                }
                let backend = StreamBackend::new(&inner, acker.clone(), &spec, up.clone())
                    .before_start(move |_| async move {
                        if restarts > 0 {
                            let secs = 1u64 << restarts.min(6).saturating_sub(1);
                            tokio::time::sleep(Duration::from_secs(secs)).await;
                        }
                        Ok::<(), RedisError>(())
                    });
                let queue = spec.queue.clone();
                WorkerBuilder::new(name.as_str())
                    .backend(backend)
                    .layer(ConcurrencyLimitLayer::new(spec.concurrency))
                    .build(move |bytes: Vec<u8>| {
                        let handler = handler.clone();
                        let queue = queue.clone();
                        async move {
                            deliver(&handler, &queue, &bytes).await;
                            Ok::<(), BoxDynError>(())
                        }
                    })
            });
        }
        // Lease keepers live exactly as long as the workers: aborting this
        // future (a "crash") stops the refreshes, so other daemons can reclaim.
        tokio::select! {
            res = run_monitor(monitor, shutdown, grace) => res,
            // Keepers never finish; `pending` also covers an empty spec list.
            _ = async {
                futures::future::join_all(keepers).await;
                std::future::pending::<()>().await
            } => Ok(()),
        }
    }
}

/// Entry ids this worker currently holds (buffered or running).
#[derive(Clone, Default)]
struct Owned(Arc<Mutex<HashSet<String>>>);

impl Owned {
    fn lock(&self) -> MutexGuard<'_, HashSet<String>> {
        // A panic while holding this lock cannot leave the set inconsistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Per-worker handle for everything done on the shared connection.
#[derive(Clone)]
struct Acker {
    conn: ConnectionManager,
    keys: Keys,
    scripts: Arc<Scripts>,
    owned: Owned,
    consumer: String,
}

impl Acker {
    async fn ack(&self, ids: &[String]) {
        let mut conn = self.conn.clone();
        for attempt in 1..=3u32 {
            let mut inv = self.scripts.ack.key(&self.keys.stream);
            inv.arg(GROUP).arg(ids);
            match inv.invoke_async::<i64>(&mut conn).await {
                Ok(_) => break,
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, "ack failed, retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                // The entry stays pending and is redelivered after the
                // visibility timeout: at-least-once, never lost.
                Err(e) => tracing::error!(error = %e, ?ids, "ack failed; job will run again"),
            }
        }
        let mut owned = self.owned.lock();
        for id in ids {
            owned.remove(id);
        }
    }

    /// Graceful stop: put unstarted entries back and leave the group.
    async fn release(self, jobs: Vec<Job>) {
        let mut conn = self.conn.clone();
        for chunk in jobs.chunks(ID_CHUNK) {
            let mut inv = self.scripts.requeue.key(&self.keys.stream);
            inv.arg(GROUP).arg(FIELD);
            for (id, bytes) in chunk {
                inv.arg(id).arg(bytes);
            }
            if let Err(e) = inv.invoke_async::<i64>(&mut conn).await {
                tracing::warn!(error = %e, "requeue on shutdown failed; entries reclaimed after the visibility timeout");
            }
        }
        {
            let mut owned = self.owned.lock();
            for (id, _) in &jobs {
                owned.remove(id);
            }
        }
        let mut inv = self.scripts.drop_consumer.key(&self.keys.stream);
        inv.arg(GROUP).arg(&self.consumer);
        if let Err(e) = inv.invoke_async::<i64>(&mut conn).await {
            tracing::debug!(error = %e, "could not remove consumer");
        }
    }

    /// Resets the idle time of entries we hold so they are not reclaimed
    /// while a long handler is still running. JUSTID: no delivery-count bump.
    async fn refresh_leases(&self) {
        let ids: Vec<String> = self.owned.lock().iter().cloned().collect();
        let mut conn = self.conn.clone();
        for chunk in ids.chunks(ID_CHUNK) {
            let res = redis::cmd("XCLAIM")
                .arg(&self.keys.stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(0)
                .arg(chunk)
                .arg("JUSTID")
                .query_async::<Value>(&mut conn)
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "lease refresh failed");
            }
        }
    }

    /// Removes consumers left behind by killed daemons once they hold
    /// nothing (live consumers touch the group every `block`).
    async fn reap_dead_consumers(&self, older_than: Duration) {
        let mut conn = self.conn.clone();
        let info: StreamInfoConsumersReply = match redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.keys.stream)
            .arg(GROUP)
            .query_async(&mut conn)
            .await
        {
            Ok(info) => info,
            Err(_) => return, // no stream/group yet
        };
        for c in info.consumers {
            if c.pending == 0 && c.idle as u128 > older_than.as_millis() && c.name != self.consumer
            {
                let mut inv = self.scripts.drop_consumer.key(&self.keys.stream);
                inv.arg(GROUP).arg(&c.name);
                let _ = inv.invoke_async::<i64>(&mut conn).await;
            }
        }
    }
}

async fn keep_leases(acker: Acker, visibility: Duration) {
    let mut tick = tokio::time::interval(visibility / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reap_every = Duration::from_secs(600);
    let mut next_reap = Instant::now() + Duration::from_secs(60);
    loop {
        tick.tick().await;
        acker.refresh_leases().await;
        if Instant::now() >= next_reap {
            next_reap = Instant::now() + reap_every;
            acker
                .reap_dead_consumers(Duration::from_secs(3600).max(visibility * 10))
                .await;
        }
    }
}

/// A stream entry's id and its stored envelope bytes.
type Job = (String, Vec<u8>);

/// How a (re)started worker reports that it runs.
#[derive(Clone)]
struct Up {
    /// The start report, first start only.
    started: StartToken,
    board: WorkerBoard,
    queue: String,
}

/// Owns the worker's dedicated blocking connection and fetch bookkeeping;
/// moved into each fetch future and handed back when it completes.
struct Fetcher {
    client: redis::Client,
    reader: Option<ConnectionManager>,
    acker: Acker,
    tuning: RedisTuning,
    count: usize,
    /// The longest XREADGROUP BLOCK of this worker.
    block: Duration,
    /// When the next delayed job is due (unix ms), as the last promotion saw it.
    next_due: Option<u64>,
    /// The reader connection's `CLIENT ID`, for `CLIENT UNBLOCK` at shutdown (0: none).
    reader_id: Arc<AtomicI64>,
    group_ready: bool,
    last_promote: Option<Instant>,
    last_reclaim: Option<Instant>,
    claim_cursor: String,
    /// Reported once the group exists on the worker's own connection.
    up: Up,
}

impl Fetcher {
    async fn reader(&mut self) -> Result<ConnectionManager, QueueError> {
        if let Some(conn) = &self.reader {
            return Ok(conn.clone());
        }
        // Own connection: a blocked XREADGROUP holds its connection. The
        // response timeout must exceed BLOCK (redis-rs default is 500 ms).
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(self.block + Duration::from_secs(5)));
        let mut conn = self.client.get_connection_manager_with_config(cfg).await?;
        // Stale after a silent reconnect: then a stop waits for the block to end.
        match redis::cmd("CLIENT")
            .arg("ID")
            .query_async::<i64>(&mut conn)
            .await
        {
            Ok(id) => self.reader_id.store(id, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(error = %e, "no CLIENT ID; a stop waits for the read's block")
            }
        }
        self.reader = Some(conn.clone());
        Ok(conn)
    }

    /// One round: promote due delayed jobs, maybe reclaim abandoned entries,
    /// else one blocking read. May return nothing (BLOCK timed out).
    async fn fetch_once(&mut self) -> Result<Vec<Job>, QueueError> {
        let res = self.fetch_inner().await;
        if let Err(QueueError::Redis(e)) = &res
            && e.code() == Some("NOGROUP")
        {
            self.group_ready = false; // stream was deleted; recreate the group
        }
        res
    }

    async fn fetch_inner(&mut self) -> Result<Vec<Job>, QueueError> {
        let mut conn = self.reader().await?;
        let stream = self.acker.keys.stream.clone();
        if !self.group_ready {
            // Group at "0" so jobs pushed before any worker existed are seen.
            let res = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async::<()>(&mut conn)
                .await;
            match res {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
            self.group_ready = true;
            self.up.started.started();
            self.up.board.up(&self.up.queue);
        }

        let now = Instant::now();
        let due = self.next_due.is_some_and(|d| d <= now_ms());
        if due || self.last_promote.is_none_or(|t| now - t >= PROMOTE_EVERY) {
            self.last_promote = Some(now);
            let mut inv = self.acker.scripts.promote.key(&self.acker.keys.delayed);
            inv.key(&stream)
                .arg(now_ms())
                .arg(self.tuning.promote_batch)
                .arg(FIELD);
            let (moved, next): (i64, i64) = inv.invoke_async(&mut conn).await?;
            if moved as usize >= self.tuning.promote_batch {
                self.last_promote = None; // more are due: promote again next round
            }
            self.next_due = u64::try_from(next).ok();
        }

        if self
            .last_reclaim
            .is_none_or(|t| now - t >= self.tuning.reclaim_interval)
        {
            self.last_reclaim = Some(now);
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.acker.consumer)
                .arg(millis(self.tuning.visibility_timeout))
                .arg(&self.claim_cursor)
                .arg("COUNT")
                .arg(self.count)
                .query_async(&mut conn)
                .await?;
            if reply.next_stream_id != "0-0" {
                self.last_reclaim = None; // scan not finished: continue next round
            }
            self.claim_cursor = reply.next_stream_id;
            if !reply.claimed.is_empty() {
                tracing::info!(count = reply.claimed.len(), stream = %stream, "reclaimed abandoned jobs");
                return Ok(self.accept(reply.claimed).await);
            }
        }

        // Until the next delayed job is due at the latest; an XADD ends it sooner.
        let block = self.next_due.map_or(self.block, |d| {
            Duration::from_millis(d.saturating_sub(now_ms())).min(self.block)
        });
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.acker.consumer)
            .arg("COUNT")
            .arg(self.count)
            .arg("BLOCK")
            .arg(millis(block))
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut conn)
            .await?;
        let entries = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        Ok(self.accept(entries).await)
    }

    /// Takes entries as they are: `deliver` decodes them, and rejects what does not
    /// decode. An entry without the envelope field hands over a description of what
    /// it holds instead, which does not decode either.
    async fn accept(&mut self, entries: Vec<StreamId>) -> Vec<Job> {
        let jobs: Vec<Job> = entries
            .into_iter()
            .map(|mut entry| {
                let bytes = match entry.map.remove(FIELD) {
                    Some(Value::BulkString(bytes)) => bytes,
                    other => format!(
                        "stream entry without an `{FIELD}` string: {other:?}, fields {:?}",
                        entry.map.keys().collect::<Vec<_>>()
                    )
                    .into_bytes(),
                };
                (entry.id, bytes)
            })
            .collect();
        let mut owned = self.acker.owned.lock();
        owned.extend(jobs.iter().map(|(id, _)| id.clone()));
        drop(owned);
        jobs
    }
}

type FetchOutput = (Fetcher, Result<Vec<Job>, QueueError>);

enum FetchState {
    Idle(Fetcher),
    Fetching(BoxFuture<'static, FetchOutput>),
    Backoff(Fetcher, Pin<Box<tokio::time::Sleep>>),
    Closing(BoxFuture<'static, ()>),
    Closed,
}

/// apalis `Backend` over one queue's stream, for one worker.
pub struct StreamBackend {
    state: FetchState,
    buffer: VecDeque<Job>,
    acker: Acker,
    tuning: RedisTuning,
    reader_id: Arc<AtomicI64>,
    /// Ends the worker's blocked read at shutdown (see `poll_close`).
    unblocker: Option<tokio::task::JoinHandle<()>>,
}

impl StreamBackend {
    fn new(inner: &Inner, acker: Acker, spec: &WorkerSpec, up: Up) -> Self {
        let reader_id = Arc::new(AtomicI64::new(0));
        // A third of the visibility timeout at most: a blocked consumer must look alive
        // to `reap_dead_consumers` and must not outwait its own leases.
        let block = spec
            .poll_fallback
            .unwrap_or(inner.tuning.block)
            .min(inner.tuning.visibility_timeout / 3);
        let fetcher = Fetcher {
            client: inner.client.clone(),
            reader: None,
            acker: acker.clone(),
            tuning: inner.tuning.clone(),
            count: inner.tuning.fetch_batch.min(spec.concurrency).max(1),
            block,
            next_due: None,
            reader_id: reader_id.clone(),
            group_ready: false,
            last_promote: None,
            last_reclaim: None,
            claim_cursor: "0-0".to_owned(),
            up,
        };
        Self {
            state: FetchState::Idle(fetcher),
            buffer: VecDeque::new(),
            acker,
            tuning: inner.tuning.clone(),
            reader_id,
            unblocker: None,
        }
    }

    /// Asks Redis to end the worker's blocked XREADGROUP (as a timeout: no entry is
    /// taken), again every 100 ms in case the read had not started blocking yet.
    fn unblock(&mut self) {
        let id = self.reader_id.load(Ordering::Relaxed);
        if id == 0 || self.unblocker.is_some() {
            return;
        }
        let mut conn = self.acker.conn.clone();
        let rounds = (self.tuning.visibility_timeout.as_millis() / 300).max(1);
        self.unblocker = Some(tokio::spawn(async move {
            for _ in 0..rounds {
                let _ = redis::cmd("CLIENT")
                    .arg("UNBLOCK")
                    .arg(id)
                    .query_async::<i64>(&mut conn)
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    fn start_fetch(mut fetcher: Fetcher) -> FetchState {
        FetchState::Fetching(
            async move {
                let res = fetcher.fetch_once().await;
                (fetcher, res)
            }
            .boxed(),
        )
    }
}

impl Backend for StreamBackend {
    type Task = Task<Vec<u8>>;
    /// Never returned: Redis errors are logged and retried with a backoff,
    /// because an error here would end the apalis worker for good.
    type Error = RedisError;

    fn poll_ready(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), RedisError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, RedisError>>> {
        loop {
            if let Some((id, bytes)) = self.buffer.pop_front() {
                // The entry id becomes the task id: the ack layer reads it back.
                let task = TaskBuilder::new(bytes)
                    .task_id(TaskId::from_string(id))
                    .build();
                return Poll::Ready(Some(Ok(task)));
            }
            self.state = match std::mem::replace(&mut self.state, FetchState::Closed) {
                FetchState::Idle(fetcher) => Self::start_fetch(fetcher),
                FetchState::Fetching(mut fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => {
                        self.state = FetchState::Fetching(fut);
                        return Poll::Pending;
                    }
                    Poll::Ready((fetcher, Ok(jobs))) => {
                        self.buffer.extend(jobs);
                        FetchState::Idle(fetcher)
                    }
                    Poll::Ready((fetcher, Err(e))) => {
                        tracing::warn!(error = %e, stream = %self.acker.keys.stream, "fetch failed; backing off");
                        let sleep = Box::pin(tokio::time::sleep(Duration::from_secs(1)));
                        FetchState::Backoff(fetcher, sleep)
                    }
                },
                FetchState::Backoff(fetcher, mut sleep) => match sleep.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.state = FetchState::Backoff(fetcher, sleep);
                        return Poll::Pending;
                    }
                    Poll::Ready(()) => FetchState::Idle(fetcher),
                },
                // Not reached: apalis stops pulling once shutdown starts.
                other @ (FetchState::Closing(_) | FetchState::Closed) => {
                    self.state = other;
                    return Poll::Ready(None);
                }
            };
        }
    }

    /// Called after in-flight handlers finished: completes a read that may
    /// already have moved entries into our pending list, then hands every
    /// unstarted entry back to the stream.
    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), RedisError>> {
        loop {
            self.state = match std::mem::replace(&mut self.state, FetchState::Closed) {
                FetchState::Fetching(mut fut) => match fut.poll_unpin(cx) {
                    Poll::Pending => {
                        self.state = FetchState::Fetching(fut);
                        self.unblock();
                        return Poll::Pending;
                    }
                    Poll::Ready((fetcher, res)) => {
                        if let Some(u) = self.unblocker.take() {
                            u.abort();
                        }
                        self.buffer.extend(res.unwrap_or_default());
                        FetchState::Idle(fetcher)
                    }
                },
                FetchState::Idle(_) | FetchState::Backoff(..) => {
                    let jobs: Vec<Job> = self.buffer.drain(..).collect();
                    FetchState::Closing(self.acker.clone().release(jobs).boxed())
                }
                FetchState::Closing(mut fut) => {
                    if fut.poll_unpin(cx).is_pending() {
                        self.state = FetchState::Closing(fut);
                        return Poll::Pending;
                    }
                    FetchState::Closed
                }
                FetchState::Closed => return Poll::Ready(Ok(())),
            };
        }
    }
}

impl BackendConfig for StreamBackend {
    type Args = Vec<u8>;
    type Id = String;
    type Kind = Ephemeral;
    type Config = RedisTuning;
    type Layer = AckLayer;

    fn config(&self) -> &RedisTuning {
        &self.tuning
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> AckLayer {
        AckLayer {
            acker: self.acker.clone(),
        }
    }
}

/// Backend middleware (outside user middleware and the handler): acks the
/// entry only once the handler's future has completed.
#[derive(Clone)]
pub struct AckLayer {
    acker: Acker,
}

impl<S> Layer<S> for AckLayer {
    type Service = AckService<S>;
    fn layer(&self, inner: S) -> AckService<S> {
        AckService {
            inner,
            acker: self.acker.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AckService<S> {
    inner: S,
    acker: Acker,
}

impl<S> Service<Task<Vec<u8>>> for AckService<S>
where
    S: Service<Task<Vec<u8>>>,
    S::Future: Send + 'static,
    S::Response: Send,
    S::Error: Into<BoxDynError>,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<S::Response, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        Poll::Ready(ready!(self.inner.poll_ready(cx)).map_err(Into::into))
    }

    fn call(&mut self, task: Task<Vec<u8>>) -> Self::Future {
        let id = task
            .task_id()
            .and_then(|t| t.as_string())
            .map(str::to_owned);
        let fut = self.inner.call(task);
        let acker = self.acker.clone();
        async move {
            let res = fut.await.map_err(Into::into);
            if let Some(id) = id {
                acker.ack(std::slice::from_ref(&id)).await;
            }
            res
        }
        .boxed()
    }
}
