//! The liveness check of running instances: one `status` call per instance every
//! `every` (60 s by default, each instance at its own phase), answered within `timeout`
//! or the instance counts as hung. With thousands of instances the checks are paced:
//! at most `per_sec` a second in all ([`Pacer`]), so the host's periodic work stays the
//! same however many channels it carries, and each instance's period stretches to
//! channels / `per_sec` instead (10,000 channels at 50 a second: every 200 s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often each instance's `status` is asked, how long its answer may take before the
/// plugin counts as wedged, and the daemon-wide pace (`[plugins]` in the config).
#[derive(Clone, Debug)]
pub struct Liveness {
    pub every: Duration,
    pub timeout: Duration,
    pacer: Arc<Pacer>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new(Duration::from_secs(60), Duration::from_secs(10), 50)
    }
}

impl Liveness {
    pub fn new(every: Duration, timeout: Duration, per_sec: u32) -> Liveness {
        Liveness {
            every,
            timeout,
            pacer: Arc::new(Pacer::new(per_sec)),
        }
    }

    /// When an instance's first check falls due: somewhere in [every/2, 3·every/2)
    /// after its start, by a hash of its id, so instances started together do not
    /// check together.
    pub(super) fn first_due(&self, instance: u64) -> Instant {
        let spread = instance.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
        let frac = spread as f64 / (1u64 << 53) as f64;
        Instant::now() + self.every.mul_f64(0.5 + frac)
    }

    /// When the next check falls due, after one that just ended.
    pub(super) fn next_due(&self) -> Instant {
        Instant::now() + self.every
    }

    /// A check that is due now runs at the returned time (now, or later when the pace
    /// is taken). Taken only once due, so the times handed out are never more than the
    /// instances waiting for one, whatever stopped or restarted meanwhile.
    pub(super) fn pace(&self, now: Instant) -> Instant {
        self.pacer.slot(now)
    }
}

/// Hands out check times at least `gap` apart across all instances.
#[derive(Debug)]
struct Pacer {
    gap: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(per_sec: u32) -> Pacer {
        Pacer {
            gap: Duration::from_secs(1) / per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// The first free time no sooner than `due`, taken.
    fn slot(&self, due: Instant) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let at = (*next).max(due);
        *next = at + self.gap;
        at
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Liveness, Pacer};

    #[test]
    fn slots_are_never_early_and_at_least_a_gap_apart() {
        let pacer = Pacer::new(50);
        let now = Instant::now();
        let slots: Vec<Instant> = (0..200).map(|_| pacer.slot(now)).collect();
        assert!(slots.iter().all(|&s| s >= now));
        assert!(
            slots
                .windows(2)
                .all(|w| w[1] - w[0] >= Duration::from_millis(20)),
            "50 a second"
        );
        // A check due well after the backlog gets its own time.
        let later = now + Duration::from_secs(3600);
        assert_eq!(pacer.slot(later), later);
    }

    #[test]
    fn first_checks_spread_and_a_quiet_daemon_checks_when_due() {
        let l = Liveness::new(Duration::from_secs(60), Duration::from_secs(10), 50);
        let start = Instant::now();
        let firsts: Vec<Duration> = (1..=20).map(|i| l.first_due(i) - start).collect();
        assert!(
            firsts
                .iter()
                .all(|d| *d >= Duration::from_secs(30) && *d < Duration::from_secs(91))
        );
        assert!(firsts.iter().any(|d| *d < Duration::from_secs(60)));
        assert!(firsts.iter().any(|d| *d >= Duration::from_secs(60)));
        let next = l.next_due() - Instant::now();
        assert!(next > Duration::from_secs(59) && next <= Duration::from_secs(61));
        // Nobody else checking: a due check runs at once.
        let now = Instant::now();
        assert_eq!(l.pace(now), now);
    }
}
