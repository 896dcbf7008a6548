//! An instance's status as the host sees it: the last reported `Status` (emitted only
//! when it changes, since the host learns status changes from events and polls
//! `status` only as a slow liveness check) plus named counters for `details`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::{Event, Host, Status};

/// A fixed set of named counters (`inbound`, `sent`, …), shown in `status().details`.
#[derive(Debug)]
pub struct Counters {
    names: &'static [&'static str],
    values: Box<[AtomicU64]>,
}

impl Counters {
    pub fn new(names: &'static [&'static str]) -> Counters {
        Counters {
            names,
            values: names.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn slot(&self, name: &str) -> Option<&AtomicU64> {
        let i = self.names.iter().position(|n| *n == name)?;
        self.values.get(i)
    }

    /// Adds `n` to counter `name` (a name not given to `new` is ignored).
    pub fn add(&self, name: &str, n: u64) {
        if let Some(v) = self.slot(name) {
            v.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn incr(&self, name: &str) {
        self.add(name, 1);
    }

    /// The counter's value; 0 for an unknown name.
    pub fn get(&self, name: &str) -> u64 {
        self.slot(name).map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// Writes every counter into `details` (replacing keys of the same name).
    pub fn write_into(&self, details: &mut Map<String, Value>) {
        for (name, v) in self.names.iter().zip(self.values.iter()) {
            details.insert((*name).to_owned(), v.load(Ordering::Relaxed).into());
        }
    }
}

/// The instance's last status and counters, and the emit of status changes.
#[derive(Debug)]
pub struct StatusBoard {
    host: Host,
    current: Mutex<Status>,
    counters: Counters,
    closed: AtomicBool,
}

impl StatusBoard {
    /// Starts as `initial` (typically disconnected, "not started"), emitting nothing.
    pub fn new(host: Host, initial: Status, counters: &'static [&'static str]) -> StatusBoard {
        StatusBoard {
            host,
            current: Mutex::new(initial),
            counters: Counters::new(counters),
            closed: AtomicBool::new(false),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `status` and emits it if it differs from the last one (state, reason,
    /// number, display name or details), unless `close` was called: a flapping network
    /// does not flood the host, and nothing is reported while stopping. Returns whether
    /// it was emitted. A BUSY host drops the event: the next change, or the liveness
    /// check's `status` call, tells the host again.
    pub fn report(&self, status: Status) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        {
            let mut cur = self.lock();
            if *cur == status {
                return false;
            }
            *cur = status.clone();
        }
        self.host.emit(&Event::Status(status)).is_ok()
    }

    /// From now on `report` records and emits nothing: call it as `stop` begins.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Records and emits `status` whatever came before: the last status of a stop,
    /// once the instance's tasks are joined.
    pub fn final_status(&self, status: Status) {
        self.close();
        *self.lock() = status.clone();
        let _ = self.host.emit(&Event::Status(status));
    }

    /// The last status recorded, without counters.
    pub fn current(&self) -> Status {
        self.lock().clone()
    }

    /// The last status with the counters merged into its `details` object: what
    /// `Connector::status` answers.
    pub fn snapshot(&self) -> Status {
        let mut s = self.current();
        let mut details = match s.details.take() {
            Some(Value::Object(m)) => m,
            Some(other) => {
                let mut m = Map::new();
                m.insert("value".into(), other);
                m
            }
            None => Map::new(),
        };
        self.counters.write_into(&mut details);
        s.details = Some(Value::Object(details));
        s
    }
}
