//! What the connector, its poller task and `send` share of one running bot: config,
//! API client, the status board (last status, emitted only on a change, with the
//! counters), the bot's identity once getMe answered, the token and rate-limit flags,
//! and the confirmed offset.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use patchbay_connector_sdk::runtime::StatusBoard;
use patchbay_connector_sdk::{ChannelState, Host, Level, Status};

use crate::api::{self, Api, ApiError, Me};
use crate::config::Config;

/// The counters shown in `status().details`.
pub const COUNTERS: &[&str] = &["inbound", "skipped", "sent", "rate_limited"];

/// One bot's shared state, made afresh at each start.
pub struct Bot {
    pub config: Config,
    pub api: Api,
    pub board: StatusBoard,
    /// Set once getMe answered: the number and name every later status repeats.
    pub me: Mutex<Option<Me>>,
    /// After a 401/404 nothing is called any more.
    pub token_invalid: AtomicBool,
    /// No send before this instant (a 429's retry_after).
    pub send_not_before: Mutex<Option<Instant>>,
    pub offset: Mutex<Option<i64>>,
}

impl Bot {
    pub fn new(config: Config, api: Api, host: Host, initial: Status) -> Bot {
        Bot {
            config,
            api,
            board: StatusBoard::new(host, initial, COUNTERS),
            me: Mutex::new(None),
            token_invalid: AtomicBool::new(false),
            send_not_before: Mutex::new(None),
            offset: Mutex::new(None),
        }
    }

    pub fn host(&self) -> &Host {
        self.board.host()
    }

    pub fn log(&self, level: Level, message: &str) {
        self.host().log(level, message);
    }

    /// The status `state` with the bot's identity once known.
    pub fn status_of(&self, state: ChannelState, reason: Option<String>) -> Status {
        let me = self.me.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Status {
            number: me
                .as_ref()
                .map(|m| format!("@{}", m.username.as_deref().unwrap_or("unknown"))),
            display_name: me.as_ref().map(|m| m.first_name.clone()),
            reason,
            ..Status::new(state)
        }
    }

    /// Reports a status (emitted only on a change, and not once stop has begun: stop
    /// reports the final state itself).
    pub fn set_status(&self, state: ChannelState, reason: Option<String>) {
        self.board.report(self.status_of(state, reason));
    }

    pub fn invalid_token(&self, e: &ApiError) {
        self.token_invalid.store(true, Ordering::Relaxed);
        self.log(
            Level::Error,
            &format!("telegram: {e}; polling stopped until the channel's token is fixed"),
        );
        self.set_status(ChannelState::Error, Some(e.to_string()));
    }

    /// Records a 429 for later sends: none before `retry_after` has passed.
    pub fn rate_limited(&self, retry_after: u64) -> Duration {
        self.board.counters().incr("rate_limited");
        let d = Duration::from_secs(retry_after.min(api::MAX_RETRY_AFTER_SECS));
        *self
            .send_not_before
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Instant::now().checked_add(d);
        d
    }
}
