//! What this node may run right now: its identity in the store, the channel leases it
//! holds with their epochs, and until when it may trust them by its own monotonic clock.
//!
//! On a SQLite store the daemon is alone (a second one on the file is refused, see
//! `store_guard`): it runs every runnable channel and holds no leases. On PostgreSQL a
//! channel runs here only while this node holds its lease, and every send carries the
//! lease's epoch as its fence.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use patchbay_jobs::model::{Id, now_ms};
use patchbay_jobs::store::{Fence, NodeInfo, NodeRow};
use tokio::sync::Notify;

/// This node holds no lease of the channel.
#[derive(Debug, thiserror::Error)]
#[error("this node does not run the channel")]
pub struct NotHeld;

pub struct Leases {
    /// `<node.name>/<ULID of this start>`: unique per process, so processes sharing a
    /// host name (or a `node.name`) are never taken for one node.
    pub node_id: String,
    pub name: String,
    pub started_at: i64,
    /// Whether channels are shared through leases (a PostgreSQL store).
    pub shared: bool,
    pub ttl: Duration,
    pub max_channels: Option<u64>,
    /// False (`node.run_channels`): this node holds no channel, on either store.
    pub runs_channels: bool,
    pub moves_per_round: usize,
    /// The kernel's boot id and this process's PID namespace: two nodes with the same
    /// `host` see the same pids, so one may tell whether the other's process is gone.
    pub host: Option<String>,
    held: Mutex<Held>,
    /// Taken by every statement that changes which leases this node holds (renew,
    /// acquire, release) together with the map update, so none overwrites another's.
    pub(super) ops: tokio::sync::Mutex<()>,
    /// Held across "is the lease held? then start" (reconcile) and "forget every lease,
    /// then see what runs" (self-fencing), so no start slips between the two.
    pub(super) deciding: Mutex<()>,
    /// Wakes the reconcile loop: a channel added, removed, suspended or resumed here.
    wake: Notify,
    /// Signalled when leases are taken while none were held: the fence deadline the
    /// renewal loop waits for has just appeared.
    armed: Notify,
}

#[derive(Default)]
struct Held {
    epochs: HashMap<Id, i64>,
    /// Given up here and stopping; the store still has them until their release
    /// commits, so a renewal meanwhile must not bring them back.
    releasing: HashSet<Id>,
    /// The leases end no sooner than this on the store's clock, as seen from here: the
    /// start of the last renewal that answered, plus the TTL.
    valid_until: Option<Instant>,
}

impl Leases {
    pub fn new(
        name: &str,
        shared: bool,
        node: &crate::node::NodeConfig,
        config: &super::config::LeasesConfig,
    ) -> Leases {
        Leases {
            node_id: format!("{name}/{}", ulid::Ulid::new()),
            name: name.to_owned(),
            started_at: now_ms(),
            shared,
            ttl: Duration::from_secs(config.ttl_secs),
            // A cap of 0 in the node table: the others' shares cover every channel.
            max_channels: if node.run_channels {
                (node.max_channels > 0).then_some(u64::from(node.max_channels))
            } else {
                Some(0)
            },
            runs_channels: node.run_channels,
            moves_per_round: config.moves_per_round as usize,
            host: host_identity(),
            held: Mutex::default(),
            ops: tokio::sync::Mutex::new(()),
            deciding: Mutex::new(()),
            wake: Notify::new(),
            armed: Notify::new(),
        }
    }

    /// What this node registers about itself.
    pub fn info(&self) -> NodeInfo<'_> {
        NodeInfo {
            id: &self.node_id,
            name: &self.name,
            started_at: self.started_at,
            max_channels: self.max_channels.map(|c| c as i64),
            host: self.host.as_deref(),
            pid: i64::from(std::process::id()),
        }
    }

    /// Whether `node`, seen in the store, is a process of this host that is gone: a
    /// daemon restarted after a crash then takes its predecessor's channels at once
    /// instead of after the TTL. Anything unsure (another host, another PID namespace,
    /// a pid in use, even by another program) counts as alive.
    pub fn is_dead_here(&self, node: &NodeRow) -> bool {
        let (Some(mine), Some(theirs), Some(pid)) = (&self.host, &node.host, node.pid) else {
            return false;
        };
        if mine != theirs || node.id == self.node_id {
            return false;
        }
        let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How often leases are renewed: a third of the TTL, so one lost renewal still
    /// leaves time for the next.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// When this node must have stopped its connectors if no renewal answers: a third
    /// of the TTL before the leases can end, which leaves that long for the stops.
    pub fn fence_at(&self) -> Option<Instant> {
        let held = self.lock();
        if held.epochs.is_empty() {
            return None;
        }
        self.fence_point(&held)
    }

    /// `valid_until` less the third of the TTL the stops are given.
    fn fence_point(&self, held: &Held) -> Option<Instant> {
        held.valid_until.map(|t| t - self.ttl / 3)
    }

    /// The fence a send on `channel` must pass: `Ok(None)` when the daemon is alone
    /// (SQLite), `Err` when this node does not hold the channel.
    pub fn fence(&self, channel: Id) -> Result<Option<Fence>, NotHeld> {
        if !self.shared {
            return Ok(None);
        }
        let epoch = self.lock().epochs.get(&channel).copied().ok_or(NotHeld)?;
        Ok(Some(Fence {
            node: self.node_id.clone(),
            epoch,
        }))
    }

    /// Whether `channel` may run here now. On PostgreSQL: its lease is held and the
    /// fence point has not passed (a round right after a pause must not start a
    /// connector the renewal loop is about to fence).
    pub fn holds(&self, channel: Id) -> bool {
        if !self.runs_channels {
            return false;
        }
        if !self.shared {
            return true;
        }
        let held = self.lock();
        held.epochs.contains_key(&channel)
            && self.fence_point(&held).is_some_and(|t| Instant::now() < t)
    }

    pub fn held(&self) -> HashMap<Id, i64> {
        self.lock().epochs.clone()
    }

    pub fn epoch(&self, channel: Id) -> Option<i64> {
        self.lock().epochs.get(&channel).copied()
    }

    /// A renewal sent at `sent` answered with these leases (the others ran out);
    /// those being released here stay out.
    pub(super) fn renewed(&self, sent: Instant, leases: &[(Id, i64)]) {
        let mut held = self.lock();
        let epochs: HashMap<Id, i64> = leases
            .iter()
            .copied()
            .filter(|(id, _)| !held.releasing.contains(id))
            .collect();
        let lost = held.epochs.keys().any(|id| !epochs.contains_key(id));
        held.epochs = epochs;
        held.valid_until = Some(sent + self.ttl);
        drop(held);
        if lost {
            // Another node took some: their connectors stop at once, not next round.
            self.wake();
        }
    }

    /// Leases taken by a statement sent at `sent`: they end no sooner than `sent` +
    /// TTL, which is no sooner than the last renewal's.
    /// An answer that came after the fence point of `sent` is not trusted: those leases
    /// stay unused here (a later renewal brings them back, or they run out).
    pub(super) fn acquired(&self, sent: Instant, leases: &[(Id, i64)]) {
        if leases.is_empty() || Instant::now() >= sent + self.ttl - self.ttl / 3 {
            return;
        }
        let mut held = self.lock();
        // Nothing held until now (no deadline, or only an empty renewal's): the fence
        // deadline a waiting `fence_due` needs has just appeared.
        let arming = held.epochs.is_empty();
        held.epochs.extend(leases.iter().copied());
        // While nothing was held an older deadline vouched for nothing: these leases
        // set it. Otherwise the older (earlier) one stands for all.
        if arming || held.valid_until.is_none() {
            held.valid_until = Some(sent + self.ttl);
        }
        drop(held);
        if arming {
            self.armed.notify_waiters();
        }
    }

    /// Resolves when this node must fence itself; while it holds no lease, it waits
    /// for leases to be taken and then for their deadline.
    pub(super) async fn fence_due(&self) {
        loop {
            let armed = self.armed.notified();
            tokio::pin!(armed);
            // Registered before the deadline is read: a take in between is not missed.
            armed.as_mut().enable();
            match self.fence_at() {
                // Read off the monotonic clock, not left to the timer: after a pause
                // (SIGSTOP, a stalled VM) tokio's timer wheel fires past deadlines only
                // at its next turn, and a renewal answering first would let the node
                // carry on as if it had never lost its leases.
                Some(t) if Instant::now() >= t => return,
                Some(t) => return tokio::time::sleep_until(t.into()).await,
                None => armed.await,
            }
        }
    }

    /// Stops counting `channels` as held: their connectors are about to stop and
    /// their leases to be released (`released` when that committed or failed).
    pub(super) fn forget(&self, channels: &[Id]) {
        let mut held = self.lock();
        for ch in channels {
            held.epochs.remove(ch);
            held.releasing.insert(*ch);
        }
    }

    pub(super) fn released(&self, channels: &[Id]) {
        let mut held = self.lock();
        for ch in channels {
            held.releasing.remove(ch);
        }
    }

    /// Drops every lease (they ran out, or were released at shutdown).
    pub(super) fn forget_all(&self) {
        let mut held = self.lock();
        held.epochs.clear();
        held.valid_until = None;
    }

    /// Asks the reconcile loop for a round now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub(super) async fn woken(&self) {
        self.wake.notified().await;
    }
}

/// `<boot id>/<pid namespace>`, or `None` where /proc does not tell.
fn host_identity() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), ns.display()))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use futures::FutureExt;

    use super::Leases;
    use crate::cluster::config::LeasesConfig;
    use crate::node::NodeConfig;

    fn shared() -> Leases {
        Leases::new("t", true, &NodeConfig::default(), &LeasesConfig::default())
    }

    #[tokio::test]
    async fn a_fence_whose_time_passed_is_due_at_once_and_a_lost_lease_wakes_the_loop() {
        let leases = shared();
        assert!(leases.fence_due().now_or_never().is_none(), "nothing held");
        // The last renewal that answered was sent a whole TTL ago (the node slept).
        let Some(long_ago) = Instant::now().checked_sub(leases.ttl) else {
            return; // a host up for less than a TTL
        };
        leases.renewed(long_ago, &[(1, 1), (2, 1)]);
        assert!(!leases.holds(1), "past the fence point nothing may start");
        assert!(
            leases.fence_due().now_or_never().is_some(),
            "due by the clock, without waiting for the timer"
        );
        assert!(leases.woken().now_or_never().is_none(), "none lost yet");
        leases.renewed(Instant::now(), &[(1, 1)]);
        assert!(
            leases.woken().now_or_never().is_some(),
            "channel 2 went elsewhere: the reconcile loop stops it now"
        );
        assert!(leases.holds(1) && !leases.holds(2));
        assert!(
            leases.fence_at().expect("held") > Instant::now(),
            "renewed now"
        );
        assert!(leases.fence_due().now_or_never().is_none());
    }

    #[test]
    fn a_worker_only_node_holds_nothing_and_registers_a_cap_of_zero() {
        let node = NodeConfig {
            run_channels: false,
            ..NodeConfig::default()
        };
        for shared in [false, true] {
            let leases = Leases::new("w", shared, &node, &LeasesConfig::default());
            assert!(!leases.holds(7));
            assert_eq!(leases.info().max_channels, Some(0));
        }
        assert!(Leases::new("s", false, &NodeConfig::default(), &LeasesConfig::default()).holds(7));
    }
}
