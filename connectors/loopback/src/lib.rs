//! loopback: a simulated messenger connector for demos, tests and benchmarks, built as
//! `libloopback.so` (kind `loopback`). It "connects" at once (or after
//! `connect_delay_ms`), generates inbound traffic from `clients` synthetic senders at
//! `rate_per_sec` and/or as a `burst`, accepts every send and echoes a delivery receipt,
//! and can inject faults (failing or panicking start/send, malformed events, an error
//! reported while running, a hanging `status`), on every start or only on the first few
//! of a channel.
//!
//! Each instance is one task on the plugin's shared runtime (SDK `runtime`): thousands
//! of idle loopback channels cost a few threads in all. `config` holds the config
//! object, `traffic` the task.
//!
//! Written against the safe SDK only: this crate has no `unsafe`.

#![forbid(unsafe_code)]

pub mod config;
mod exclusive;
mod traffic;

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use patchbay_connector_sdk::runtime::{Counters, STOP_GRACE, Tasks};
use patchbay_connector_sdk::{
    ChannelState, Connector, ConnectorError, Host, Level, Outbound, Receipt, ReceiptStatus, Sent,
    Status, export_connector,
};
use tokio::sync::mpsc;

pub use config::{Config, MALFORMED, MAX_CLIENTS};
use traffic::{COUNTERS, Shared};
pub use traffic::{client_chat_id, client_phone, inbound};

export_connector!(
    Loopback,
    kind = "loopback",
    version = env!("CARGO_PKG_VERSION"),
    secrets = ["secret"]
);

/// Starts so far of each configuration (its JSON text), for `fault_starts`: the daemon
/// creates a new instance for every restart, so the count lives in the library.
static STARTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Counts one more start of the configuration `key`; returns its number (1-based).
fn count_start(key: &str) -> u64 {
    let mut starts = STARTS.lock().unwrap_or_else(|p| p.into_inner());
    let n = starts.entry(key.to_owned()).or_insert(0);
    *n += 1;
    *n
}

/// One loopback channel.
pub struct Loopback {
    shared: Arc<Shared>,
    /// The configuration's JSON text, counting its starts for `fault_starts`.
    key: String,
    prefix: String,
    receipts: Option<mpsc::UnboundedSender<Receipt>>,
    tasks: Option<Tasks>,
    /// `exclusive_dir`'s lock while running.
    exclusive: Option<exclusive::Held>,
}

impl Loopback {
    fn join(&mut self) {
        self.receipts = None;
        if let Some(tasks) = self.tasks.take()
            && tasks.stop(STOP_GRACE).panicked > 0
        {
            self.shared
                .host
                .log(Level::Error, "loopback traffic task panicked");
        }
        // Only once its traffic stopped does the instance let go of its number.
        self.exclusive = None;
    }
}

impl Connector for Loopback {
    fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
        let key = config.to_string();
        // The daemon may pass null for "no config": all defaults.
        let config = if config.is_null() {
            Config::default()
        } else {
            Config::parse(config)?
        };
        let prefix = match &config.id_prefix {
            Some(p) => p.clone(),
            None => format!("lb{:08x}", RandomState::new().hash_one(0u8) as u32),
        };
        Ok(Loopback {
            shared: Arc::new(Shared {
                config,
                host,
                // Decided at start; the faults hold until then.
                faulty: AtomicBool::new(true),
                state: Mutex::new(
                    Status::new(ChannelState::Disconnected).with_reason("not started"),
                ),
                counters: Counters::new(COUNTERS),
            }),
            key,
            prefix,
            receipts: None,
            tasks: None,
            exclusive: None,
        })
    }

    fn start(&mut self) -> Result<(), ConnectorError> {
        let c = &self.shared.config;
        if self.tasks.is_some() {
            return Err(ConnectorError::new(
                "already_started",
                "loopback is already running",
            ));
        }
        let faulty = c.fault_starts == 0 || count_start(&self.key) <= c.fault_starts;
        self.shared.faulty.store(faulty, Ordering::Relaxed);
        if faulty && c.panic_on_start {
            panic!("loopback: panic_on_start is set");
        }
        let _ = self
            .shared
            .emit_status_now(Status::new(ChannelState::Connecting));
        if faulty && c.fail_start {
            let reason = "fail_start is set";
            let _ = self
                .shared
                .emit_status_now(Status::new(ChannelState::Error).with_reason(reason));
            return Err(ConnectorError::new("start_failed", reason).retryable());
        }
        if let Some(dir) = &c.exclusive_dir {
            self.exclusive = Some(exclusive::take(dir, &c.number)?);
        }
        let tasks = Tasks::new()?;
        let (tx, rx) = mpsc::unbounded_channel();
        tasks.spawn(traffic::run(
            self.shared.clone(),
            self.prefix.clone(),
            rx,
            tasks.token(),
        ));
        self.receipts = Some(tx);
        self.tasks = Some(tasks);
        Ok(())
    }

    fn send(&mut self, msg: Outbound) -> Result<Sent, ConnectorError> {
        let c = &self.shared.config;
        let faulty = self.shared.faulty.load(Ordering::Relaxed);
        if faulty && c.panic_on_send {
            panic!("loopback: panic_on_send is set");
        }
        if faulty && c.fail_send {
            return Err(ConnectorError::new("unavailable", "fail_send is set").retryable());
        }
        if msg.external_chat_id.is_empty() && msg.to.phone.is_none() && msg.to.username.is_none() {
            return Err(ConnectorError::new(
                "invalid_message",
                "no recipient: external_chat_id, to.phone and to.username are all empty",
            ));
        }
        self.shared.counters.incr("sent");
        let n = self.shared.counters.get("sent");
        let external_message_id = format!("{}-out-{n}", self.prefix);
        if let Some(tx) = self.receipts.as_ref().filter(|_| c.echo_receipts) {
            let _ = tx.send(Receipt {
                message: msg.message,
                status: c.receipt_status,
                external_message_id: Some(external_message_id.clone()),
                reason: (c.receipt_status == ReceiptStatus::Failed)
                    .then(|| "receipt_status is failed".to_owned()),
            });
        }
        Ok(Sent {
            external_message_id,
        })
    }

    fn status(&self) -> Status {
        let c = &self.shared.config;
        if c.hang_status_ms > 0 && self.shared.faulty.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(c.hang_status_ms));
        }
        let mut s = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut details = serde_json::Map::new();
        details.insert("id_prefix".into(), self.prefix.clone().into());
        self.shared.counters.write_into(&mut details);
        s.details = Some(details.into());
        s
    }

    fn stop(&mut self) -> Result<(), ConnectorError> {
        self.join();
        let _ = self
            .shared
            .emit_status_now(Status::new(ChannelState::Disconnected).with_reason("stopped"));
        Ok(())
    }
}

impl Drop for Loopback {
    // destroy without stop (after a panic, or a careless host): still join the task.
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchbay_connector_sdk::Event;
    use serde_json::json;

    #[test]
    fn defaults_and_validation() {
        assert_eq!(Config::parse(json!({})).unwrap(), Config::default());
        let c = Config::parse(json!({"rate_per_sec": 5.5, "clients": 3, "id_prefix": "run-1"}))
            .unwrap();
        assert_eq!(c.clients, 3);
        for bad in [
            json!({"rate_per_sec": -1}),
            json!({"clients": 0}),
            json!({"clients": 10001}),
            json!({"number": " "}),
            json!({"id_prefix": "has space"}),
            json!({"echo_reciepts": false}),
            json!({"receipt_status": "lost"}),
            json!("not an object"),
        ] {
            let e = Config::parse(bad.clone()).unwrap_err();
            assert_eq!(e.code, "invalid_config", "{bad}");
        }
        let e = Config::parse(json!({"clients": 0})).unwrap_err();
        assert!(
            e.message.contains("clients = 0: 1 to 10000"),
            "{}",
            e.message
        );
    }

    #[test]
    fn synthetic_messages() {
        let c = Config {
            clients: 3,
            ..Config::default()
        };
        let m = inbound(&c, "p", 4);
        assert_eq!(m.external_message_id, "p-4");
        assert_eq!(m.external_chat_id, "lb-chat-0001");
        assert_eq!(m.sender.phone.as_deref(), Some("+15550000001"));
        assert_eq!(client_phone(9999), "+15550009999");
        Event::Inbound(m).validate().unwrap();
    }

    #[test]
    fn send_without_host_and_faults() {
        let mut lb = Loopback::create(json!({"id_prefix": "t"}), Host::detached()).unwrap();
        let msg = Outbound {
            message: 1,
            external_chat_id: "lb-chat-0001".into(),
            to: Default::default(),
            text: "hi".into(),
            attachments: vec![],
        };
        assert_eq!(lb.send(msg.clone()).unwrap().external_message_id, "t-out-1");
        let no_to = Outbound {
            external_chat_id: String::new(),
            ..msg.clone()
        };
        assert_eq!(lb.send(no_to).unwrap_err().code, "invalid_message");
        let mut failing = Loopback::create(json!({"fail_send": true}), Host::detached()).unwrap();
        let e = failing.send(msg).unwrap_err();
        assert!(e.retryable);
        let mut fs = Loopback::create(json!({"fail_start": true}), Host::detached()).unwrap();
        assert_eq!(fs.start().unwrap_err().code, "start_failed");
    }

    #[test]
    fn start_stop_with_detached_host_ends_promptly() {
        let mut lb = Loopback::create(json!({"rate_per_sec": 1000}), Host::detached()).unwrap();
        lb.start().unwrap();
        lb.stop().unwrap();
        assert_eq!(lb.status().state, ChannelState::Disconnected);
    }

    #[test]
    fn faults_apply_to_the_first_starts_only() {
        // A config of its own: the start count is per configuration and process.
        let config = json!({"fail_start": true, "fault_starts": 2, "id_prefix": "fs"});
        for expect_fail in [true, true, false, false] {
            let mut lb = Loopback::create(config.clone(), Host::detached()).unwrap();
            assert_eq!(lb.start().is_err(), expect_fail);
            lb.stop().unwrap();
        }
        let mut always = Loopback::create(json!({"fail_start": true}), Host::detached()).unwrap();
        assert!(always.start().is_err(), "0 = every start");
        for bad in [
            json!({"report_error": ""}),
            json!({"report_error": "x".repeat(1025)}),
            json!({"number": "1".repeat(257)}),
            json!({"display_name": "n".repeat(257)}),
        ] {
            assert_eq!(Config::parse(bad).unwrap_err().code, "invalid_config");
        }
    }

    #[test]
    fn malformed_events_are_really_malformed() {
        for bad in MALFORMED {
            assert!(Event::parse(bad).is_err());
        }
    }
}
