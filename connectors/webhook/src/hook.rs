//! What the connector, its route on the shared listener and `send` share of one
//! running webhook channel: config, host, the instance's cancel token (its `Tasks`
//! token: cancelled as the channel stops, so a request in progress stops emitting),
//! and the status board with the counters.

use std::time::Duration;

use patchbay_connector_sdk::runtime::{self, CancellationToken, StatusBoard};
use patchbay_connector_sdk::{EmitError, Event, Host, Status};

use crate::config::Config;

/// The counters shown in `status().details`.
pub const COUNTERS: &[&str] = &["accepted", "rejected", "busy", "sent", "send_retries"];

/// One webhook channel's shared state, made afresh at each start.
pub struct Hook {
    pub config: Config,
    pub board: StatusBoard,
    pub cancel: CancellationToken,
}

impl Hook {
    pub fn new(config: Config, host: Host, cancel: CancellationToken, initial: Status) -> Hook {
        Hook {
            config,
            board: StatusBoard::new(host, initial, COUNTERS),
            cancel,
        }
    }

    pub fn host(&self) -> &Host {
        self.board.host()
    }

    pub fn count(&self, counter: &str) {
        self.board.counters().incr(counter);
    }

    /// Emits, backing off while the host is busy, for at most `wait`; `Closed` once the
    /// channel stops.
    pub async fn emit_for(&self, event: &Event, wait: Duration) -> Result<(), EmitError> {
        runtime::emit_within(self.host(), event, wait, &self.cancel).await
    }
}
