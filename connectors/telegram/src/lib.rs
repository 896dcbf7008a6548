//! telegram: a patchbay connector for the Telegram Bot API, built as `libtelegram.so`
//! (kind `telegram`).
//!
//! Every bot runs on the SDK's one runtime per plugin (`runtime::Tasks`): `start`
//! spawns the bot's poller task (`poller`: `getMe`, so the channel's number becomes
//! `@username` and its display name the bot's first name, then `getUpdates` long polls,
//! each `message` update emitted as an inbound message); `send` calls `sendMessage`
//! (and `sendPhoto`/`sendDocument`/… for attachments given by `file_id` or URL) on the
//! same runtime from the host's thread (`sender`). `stop` cancels the bot's tasks and
//! joins exactly those, so nothing is emitted after it returns. A bot owns tasks, not
//! threads: hundreds of channels share the runtime's few workers.
//!
//! **Offsets.** The next offset is written to `<state_dir>/telegram-<bot id>.offset`
//! (`offset`) only after the host's `flush` confirmed that the batch's events are
//! durably recorded (on the daemon's job queue), and is sent with the next getUpdates,
//! which is also how Telegram learns the updates were consumed. A restart therefore
//! neither loses an update (an unconfirmed one is fetched again) nor stores one twice
//! (external ids are `<chat id>:<message id>`, which the daemon stores once). Without
//! `state_dir` the same holds through Telegram's own confirmation; the file only saves
//! re-fetching the last batch.
//!
//! Written against the safe SDK only: this crate has no `unsafe`.

#![forbid(unsafe_code)]

pub mod api;
pub mod bot;
pub mod config;
/// The poller's own connection; crate-private, since it retries calls (see its doc).
pub(crate) mod link;
pub mod offset;
pub mod poller;
pub mod sender;
pub mod update;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use patchbay_connector_sdk::runtime::{self, Tasks, tokio};
use patchbay_connector_sdk::{
    ChannelState, Connector, ConnectorError, Host, Level, Outbound, Sent, Status, export_connector,
};
use serde_json::Value;

use api::Api;
use bot::Bot;
pub use config::{Config, DEFAULT_API_BASE};
pub use offset::OffsetFile;
pub use sender::plan_send;

export_connector!(
    Telegram,
    kind = "telegram",
    version = env!("CARGO_PKG_VERSION"),
    secrets = ["token"]
);

/// A whole send (waits, retries, every part) stays below the daemon's 30 s call timeout.
const SEND_BUDGET: Duration = Duration::from_secs(25);

/// One Telegram bot channel.
pub struct Telegram {
    /// Made afresh at each start, so a stopped run's state never leaks into the next.
    bot: Arc<Bot>,
    /// The bot's tasks on the plugin's runtime while it runs.
    running: Option<Tasks>,
}

impl Telegram {
    /// Stops the poller and joins it: after this, nothing of this instance runs.
    fn shutdown(&mut self) {
        self.bot.board.close();
        let Some(tasks) = self.running.take() else {
            return;
        };
        // The poller gives way at every await; the grace only guards against a bug.
        let outcome = tasks.stop(runtime::STOP_GRACE);
        if outcome.panicked > 0 {
            self.bot.log(Level::Error, "telegram: the poller panicked");
        }
        if outcome.aborted > 0 {
            self.bot
                .log(Level::Error, "telegram: the poller did not stop in time");
        }
    }

    fn fresh_bot(&self, initial: Status) -> Arc<Bot> {
        let b = &self.bot;
        Arc::new(Bot::new(
            b.config.clone(),
            b.api.clone(),
            b.host().clone(),
            initial,
        ))
    }
}

/// The chat to send to: a numeric chat id, or a public `@channelusername`.
fn chat_id(external_chat_id: &str) -> Result<Value, ConnectorError> {
    let chat = external_chat_id.trim();
    if let Ok(n) = chat.parse::<i64>() {
        Ok(n.into())
    } else if chat.starts_with('@') {
        Ok(chat.into())
    } else {
        Err(ConnectorError::new(
            "no_chat",
            "a Telegram bot can only write to a chat the client opened: no chat id for this recipient",
        ))
    }
}

impl Connector for Telegram {
    fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
        let config = Config::parse(config)?;
        let api = Api::new(&config.api_base, &config.token)
            .map_err(|e| ConnectorError::new("internal", e.to_string()))?;
        let initial = Status::new(ChannelState::Disconnected).with_reason("not started");
        Ok(Telegram {
            bot: Arc::new(Bot::new(config, api, host, initial)),
            running: None,
        })
    }

    fn start(&mut self) -> Result<(), ConnectorError> {
        if self.running.is_some() {
            return Err(ConnectorError::new(
                "already_started",
                "telegram is already running",
            ));
        }
        // Long polls spend their lives waiting, and a bot's work per update is small:
        // one worker thread runs them all, so a poll's answer is handled on the thread
        // that read it instead of waking a second (10,000 idle bots: ~17 % less CPU,
        // BENCHMARKS.md round 16). Only before the runtime exists; the operator's
        // PATCHBAY_CONNECTOR_THREADS still wins.
        runtime::configure(runtime::RuntimeOptions {
            worker_threads: runtime::RuntimeOptions::threads_from_env().unwrap_or(1),
            ..Default::default()
        });
        let tasks = Tasks::new()?;
        self.bot = self.fresh_bot(self.bot.board.current());
        self.bot.set_status(ChannelState::Connecting, None);
        tasks.spawn(poller::run(self.bot.clone(), tasks.token()));
        self.running = Some(tasks);
        Ok(())
    }

    fn send(&mut self, msg: Outbound) -> Result<Sent, ConnectorError> {
        // The daemon gives a call 30 s; everything below fits in SEND_BUDGET.
        let deadline = Instant::now() + SEND_BUDGET;
        if self.bot.token_invalid.load(Ordering::Relaxed) {
            return Err(ConnectorError::new(
                "invalid_token",
                "the Bot API refused this channel's token; fix it in the channel config",
            ));
        }
        let chat_id = chat_id(&msg.external_chat_id)?;
        let calls = plan_send(&chat_id, &msg.text, &msg.attachments)?;
        let not_before = *self
            .bot
            .send_not_before
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let wait = not_before.map(|t| t.saturating_duration_since(Instant::now()));
        if let Some(left) = wait
            && left > sender::MAX_SEND_WAIT
        {
            return Err(ConnectorError::new(
                "rate_limited",
                format!("rate limited by the Bot API for {}s more", left.as_secs()),
            )
            .retryable());
        }
        let Some(tasks) = self.running.as_ref() else {
            return Err(ConnectorError::new("not_running", "telegram is not started").retryable());
        };
        let bot = &self.bot;
        let external_message_id = tasks.block_on(async {
            if let Some(left) = wait {
                tokio::time::sleep(left).await;
            }
            sender::send_all(bot, &calls, deadline).await
        })?;
        bot.board.counters().incr("sent");
        Ok(Sent {
            external_message_id,
        })
    }

    fn status(&self) -> Status {
        let mut s = self.bot.board.snapshot();
        let offset = *self.bot.offset.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = s.details.as_mut().and_then(Value::as_object_mut) {
            d.insert("bot_id".into(), self.bot.config.bot_id().into());
            d.insert("offset".into(), offset.into());
        }
        s
    }

    fn stop(&mut self) -> Result<(), ConnectorError> {
        self.shutdown();
        // The poller is joined: this is the instance's last event.
        let last = self
            .bot
            .status_of(ChannelState::Disconnected, Some("stopped".into()));
        self.bot.board.final_status(last);
        Ok(())
    }
}

impl Drop for Telegram {
    // destroy without stop (after a panic): still stop the poller.
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
