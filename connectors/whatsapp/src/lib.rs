//! whatsapp: a patchbay connector for the WhatsApp Business Cloud API (Meta's Graph
//! API), built as `libwhatsapp.so` (kind `whatsapp`), on the safe SDK only.
//!
//! One channel per business number (`phone_number_id`). Inbound, Meta POSTs signed
//! webhook notifications to the channel's `listen` address and `path`; channels that
//! share an address share one listener, which routes every change by phone_number_id
//! (`listener`, `webhook`, `inbound`). Outbound, `send` POSTs a text to
//! `/{phone_number_id}/messages` (`outbound`, `graph`) and the `wamid` becomes the
//! message's external id; status webhooks then become receipts. Everything runs on the
//! SDK's one runtime per plugin (`runtime::Tasks`): a channel owns tasks, not threads.

#![forbid(unsafe_code)]

pub mod channel;
pub mod config;
pub mod graph;
pub mod inbound;
pub mod listener;
pub mod outbound;
pub mod payload;
pub mod webhook;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use patchbay_connector_sdk::runtime::{CancellationToken, Tasks, tokio};
use patchbay_connector_sdk::{
    ChannelState, Connector, ConnectorError, Host, Level, Outbound, Sent, Status, export_connector,
};
use serde_json::json;

pub use config::Config;
pub use webhook::SIGNATURE_HEADER;

use channel::Channel;
use graph::{Failure, Graph, TOKEN_REASON};
use listener::Registration;

export_connector!(
    WhatsApp,
    kind = "whatsapp",
    version = env!("CARGO_PKG_VERSION"),
    secrets = ["access_token", "app_secret", "verify_token"]
);

/// The daemon runs each call under a 30 s timeout; all of a send's attempts fit this.
const SEND_BUDGET: Duration = Duration::from_secs(25);
/// Attempts of one send before it fails retryably (the daemon's job retries later).
const SEND_ATTEMPTS: u32 = 4;
/// The longest `Retry-After` a send sleeps through itself.
const MAX_SEND_PAUSE: Duration = Duration::from_secs(5);

/// A started channel: its tasks on the plugin's runtime and its place on the listener.
struct Running {
    tasks: Tasks,
    registration: Registration,
}

/// One whatsapp channel.
pub struct WhatsApp {
    channel: Arc<Channel>,
    graph: Graph,
    running: Option<Running>,
}

/// `+` and the digits of a display number ("+1 555-078-3881" → "+15550783881").
fn display_e164(display: &str) -> Option<String> {
    inbound::e164(display)
}

/// Reads the number's display phone number and verified name (`GET
/// /{phone_number_id}`) until it succeeds or the token is refused, backing off 1 s
/// doubling to 60 s; reports `connected`, `error` or `connecting` as it goes.
async fn check_number(channel: Arc<Channel>, graph: Graph, stop: CancellationToken) {
    let mut pause = Duration::from_secs(1);
    loop {
        let outcome = tokio::select! {
            r = graph.number() => r,
            () = stop.cancelled() => return,
        };
        match outcome {
            Ok(info) => {
                let display_name = channel
                    .config
                    .display_name
                    .clone()
                    .or(info.verified_name.clone());
                channel.set_status(Status {
                    number: info.display_phone_number.as_deref().and_then(display_e164),
                    display_name,
                    details: Some(json!({
                        "phone_number_id": channel.config.phone_number_id,
                        "verified_name": info.verified_name,
                    })),
                    ..Status::new(ChannelState::Connected)
                });
                return;
            }
            Err(Failure::Auth(reason)) => {
                channel.token_refused.store(true, Ordering::Relaxed);
                channel
                    .host
                    .log(Level::Warn, &format!("whatsapp: {reason}"));
                channel.set_status(Status::new(ChannelState::Error).with_reason(TOKEN_REASON));
                return;
            }
            Err(Failure::Permanent { reason, .. }) => {
                // A wrong phone_number_id, or a token without access to it.
                channel.set_status(
                    Status::new(ChannelState::Error)
                        .with_reason(format!("cannot read the number: {reason}")),
                );
                return;
            }
            Err(Failure::Retry { reason, .. }) => {
                channel.set_status(Status::new(ChannelState::Connecting).with_reason(reason));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

impl WhatsApp {
    fn shutdown(&mut self) {
        let Some(mut r) = self.running.take() else {
            return;
        };
        // Cancelled first: requests in progress stop emitting for this channel.
        let outcome = r.tasks.stop(listener::STOP_GRACE);
        if outcome.panicked + outcome.aborted > 0 {
            self.channel
                .host
                .log(Level::Warn, &format!("whatsapp: stop: {outcome:?}"));
        }
        r.registration.detach();
    }

    /// The attempts of one send within `SEND_BUDGET`: rate limits, 5xx and timeouts
    /// are retried with backoff; a refused token puts the channel in `error`.
    async fn deliver(&self, body: &serde_json::Value) -> Result<Sent, ConnectorError> {
        let started = Instant::now();
        let timeout = Duration::from_secs(self.channel.config.request_timeout_secs);
        let mut pause = Duration::from_secs(1);
        let mut last = String::new();
        for attempt in 1..=SEND_ATTEMPTS {
            match self.graph.send(body).await {
                Ok(wamid) => {
                    self.channel.counters.sent.fetch_add(1, Ordering::Relaxed);
                    return Ok(Sent {
                        external_message_id: wamid,
                    });
                }
                Err(Failure::Permanent { code, reason }) => {
                    return Err(ConnectorError::new(code, reason));
                }
                Err(Failure::Auth(reason)) => {
                    // Once: later sends fail at once rather than hammer Graph.
                    if !self.channel.token_refused.swap(true, Ordering::Relaxed) {
                        self.channel
                            .host
                            .log(Level::Warn, &format!("whatsapp: {reason}"));
                        self.channel
                            .set_status(Status::new(ChannelState::Error).with_reason(TOKEN_REASON));
                    }
                    return Err(ConnectorError::new("unauthorized", TOKEN_REASON));
                }
                Err(Failure::Retry { reason, after }) => {
                    last = reason;
                    if attempt == SEND_ATTEMPTS {
                        break;
                    }
                    // A longer Retry-After than we wait in the call: hand the send back
                    // at once as retryable; the host's job retry backs off.
                    if after.is_some_and(|a| a > MAX_SEND_PAUSE) {
                        break;
                    }
                    let wait = after.unwrap_or(pause);
                    // Never let the retries push the call past the daemon's timeout.
                    if started.elapsed() + wait + timeout > SEND_BUDGET {
                        break;
                    }
                    self.channel
                        .counters
                        .send_retries
                        .fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                    pause *= 2;
                }
            }
        }
        Err(ConnectorError::new("unavailable", last).retryable())
    }
}

impl Connector for WhatsApp {
    fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
        let config = Arc::new(Config::parse(config)?);
        let graph = Graph::new(config.clone()).map_err(|e| ConnectorError::new("internal", e))?;
        let initial = Status::new(ChannelState::Disconnected).with_reason("not started");
        Ok(WhatsApp {
            channel: Arc::new(Channel::new(
                config,
                host,
                CancellationToken::new(),
                initial,
            )),
            graph,
            running: None,
        })
    }

    fn start(&mut self) -> Result<(), ConnectorError> {
        if self.running.is_some() {
            return Err(ConnectorError::new(
                "already_started",
                "whatsapp is already running",
            ));
        }
        let tasks = Tasks::new()?;
        // A fresh Channel per start: a request still holding the previous one sees it
        // cancelled, never this run's state.
        let c = self.channel.config.clone();
        self.channel = Arc::new(Channel::new(
            c.clone(),
            self.channel.host.clone(),
            tasks.token(),
            Status::new(ChannelState::Connecting),
        ));
        self.channel
            .set_status(Status::new(ChannelState::Connecting));
        let registration = match listener::attach(self.channel.clone()) {
            Ok(r) => r,
            Err(e) => {
                let reason = e.to_string();
                self.channel
                    .set_status(Status::new(ChannelState::Error).with_reason(&reason));
                let err = ConnectorError::new("listen_failed", reason);
                // A taken port may free up; a duplicate number is a config problem.
                return Err(match e {
                    listener::AttachError::Bind(_) => err.retryable(),
                    listener::AttachError::Duplicate(_) | listener::AttachError::Invalid(_) => err,
                });
            }
        };
        self.channel.host.log(
            Level::Info,
            &format!(
                "whatsapp: number {} receives webhooks on http://{}{}",
                c.phone_number_id,
                registration.addr(),
                c.path
            ),
        );
        tasks.spawn(check_number(
            self.channel.clone(),
            self.graph.clone(),
            tasks.token(),
        ));
        self.running = Some(Running {
            tasks,
            registration,
        });
        Ok(())
    }

    fn send(&mut self, msg: Outbound) -> Result<Sent, ConnectorError> {
        let body = outbound::body(&msg)?;
        let Some(r) = self.running.as_ref() else {
            return Err(ConnectorError::new("not_running", "whatsapp is not started").retryable());
        };
        if self.channel.token_refused.load(Ordering::Relaxed) {
            return Err(ConnectorError::new("unauthorized", TOKEN_REASON));
        }
        r.tasks.block_on(self.deliver(&body))
    }

    fn status(&self) -> Status {
        let mut s = self.channel.status();
        if let (Some(r), Some(d)) = (
            self.running.as_ref(),
            s.details.as_mut().and_then(|d| d.as_object_mut()),
        ) {
            d.insert("listen".into(), r.registration.addr().to_string().into());
            d.insert("path".into(), self.channel.config.path.clone().into());
        }
        s
    }

    fn stop(&mut self) -> Result<(), ConnectorError> {
        self.shutdown();
        self.channel
            .set_status(Status::new(ChannelState::Disconnected).with_reason("stopped"));
        Ok(())
    }
}

impl Drop for WhatsApp {
    // destroy without stop (after a panic): still join the tasks and free the port.
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
