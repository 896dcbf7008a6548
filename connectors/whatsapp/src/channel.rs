//! What the listener and the connector share of one running channel: its config, its
//! host handle and cancel token, its last status and counters, and the emit/flush the
//! webhook path uses (the SDK runtime's: backing off while the host is busy, flushing
//! without parking a thread per waiter).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use patchbay_connector_sdk::runtime::{self, CancellationToken};
use patchbay_connector_sdk::{EmitError, Event, FlushError, Host, Status};
use serde_json::json;

use crate::config::Config;

#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub receipts: AtomicU64,
    pub rejected: AtomicU64,
    pub busy: AtomicU64,
    pub sent: AtomicU64,
    pub send_retries: AtomicU64,
}

pub struct Channel {
    pub config: Arc<Config>,
    pub host: Host,
    /// The instance's `Tasks` token: cancelled when the channel stops.
    pub cancel: CancellationToken,
    /// Set by a 401/190 from Graph: sends fail at once until the channel restarts.
    pub token_refused: AtomicBool,
    pub counters: Counters,
    state: Mutex<Status>,
}

impl Channel {
    pub fn new(
        config: Arc<Config>,
        host: Host,
        cancel: CancellationToken,
        initial: Status,
    ) -> Channel {
        Channel {
            config,
            host,
            cancel,
            token_refused: AtomicBool::new(false),
            counters: Counters::default(),
            state: Mutex::new(initial),
        }
    }

    pub fn set_status(&self, status: Status) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = status.clone();
        let _ = self.host.emit(&Event::Status(status));
    }

    /// The last status with the counters in `details`.
    pub fn status(&self) -> Status {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let k = &self.counters;
        let mut details = s.details.take().unwrap_or_else(|| json!({}));
        if let Some(d) = details.as_object_mut() {
            for (name, n) in [
                ("accepted", &k.accepted),
                ("receipts", &k.receipts),
                ("rejected", &k.rejected),
                ("busy", &k.busy),
                ("sent", &k.sent),
                ("send_retries", &k.send_retries),
            ] {
                d.insert(name.into(), n.load(Ordering::Relaxed).into());
            }
        }
        s.details = Some(details);
        s
    }

    /// Emits, backing off while the host is busy, for at most `wait`.
    pub async fn emit_for(&self, event: &Event, wait: Duration) -> Result<(), EmitError> {
        runtime::emit_within(&self.host, event, wait, &self.cancel).await
    }

    /// Waits until the host has durably recorded what this channel emitted so far.
    pub async fn flush(&self, wait: Duration) -> Result<(), FlushError> {
        runtime::flush(&self.host, wait).await
    }
}
