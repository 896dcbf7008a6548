//! webhook: a generic HTTP gateway connector for patchbay, built as `libwebhook.so`
//! (kind `webhook`).
//!
//! Inbound (`server`, `inbound`), it serves `POST <path>` on `listen` through the SDK's
//! shared HTTP listener: a JSON message signed with HMAC-SHA256 (`signature`), answered
//! `200` only once the host's `flush` confirmed it durably recorded, so a gateway that
//! gets anything else knows to retry. Channels with the same listen address share one
//! listener, routed by path. Outbound (`outbound`), it POSTs each message as JSON to
//! `outbound_url`, signed the same way, retrying 5xx answers and timeouts a bounded
//! number of times inside `send`, and reports `delivered` on a 2xx.
//!
//! Everything runs on the SDK's one runtime per plugin (`runtime::Tasks`): a channel
//! owns a route and tasks, not threads or a runtime. `stop` cancels the channel's
//! requests in progress (they answer 503), waits for them, and the last channel on an
//! address frees the port before `stop` returns.
//!
//! Written against the safe SDK only: this crate has no `unsafe`.

#![forbid(unsafe_code)]

pub mod config;
pub mod hook;
pub mod inbound;
pub mod outbound;
pub mod server;
pub mod signature;

use std::sync::Arc;
use std::time::Duration;

use patchbay_connector_sdk::runtime::http::{ListenError, Registration};
use patchbay_connector_sdk::runtime::{self, Tasks};
use patchbay_connector_sdk::{
    ChannelState, Connector, ConnectorError, Host, Level, Outbound, Sent, Status, export_connector,
};
use serde_json::{Value, json};

pub use config::{Config, MAX_BODY_BYTES, MAX_CONNECTIONS};
pub use inbound::{Rejection, check_body};
pub use signature::{SIGNATURE_HEADER, SignatureError, TIMESTAMP_HEADER, sign, verify};

use hook::Hook;

export_connector!(
    Webhook,
    kind = "webhook",
    version = env!("CARGO_PKG_VERSION"),
    secrets = ["secret", "outbound_secret"]
);

/// A started channel: its share of the plugin's runtime and its route on the listener.
struct Running {
    tasks: Tasks,
    registration: Registration,
}

/// One webhook channel.
pub struct Webhook {
    /// Made afresh at each start, so a request still holding the previous run's state
    /// sees it cancelled.
    hook: Arc<Hook>,
    client: reqwest::Client,
    running: Option<Running>,
}

impl Webhook {
    /// Cancels the channel's requests in progress, then takes its route off the
    /// listener, which waits for them (and frees the port if it was the last route):
    /// after this no request is handled, nor emits.
    fn shutdown(&mut self) {
        self.hook.board.close();
        let Some(r) = self.running.take() else {
            return;
        };
        let outcome = r.tasks.stop(runtime::STOP_GRACE);
        if outcome.panicked + outcome.aborted > 0 {
            self.hook
                .host()
                .log(Level::Error, &format!("webhook: stop: {outcome:?}"));
        }
        drop(r.registration);
    }
}

impl Connector for Webhook {
    fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
        let config = Config::parse(config)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.outbound_timeout_secs))
            .build()
            .map_err(|e| ConnectorError::new("internal", format!("HTTP client: {e}")))?;
        let initial = Status::new(ChannelState::Disconnected).with_reason("not started");
        Ok(Webhook {
            hook: Arc::new(Hook::new(config, host, Default::default(), initial)),
            client,
            running: None,
        })
    }

    fn start(&mut self) -> Result<(), ConnectorError> {
        if self.running.is_some() {
            return Err(ConnectorError::new(
                "already_started",
                "webhook is already running",
            ));
        }
        let tasks = Tasks::new()?;
        self.hook = Arc::new(Hook::new(
            self.hook.config.clone(),
            self.hook.host().clone(),
            tasks.token(),
            self.hook.board.current(),
        ));
        let hook = &self.hook;
        let c = &hook.config;
        hook.board.report(Status::new(ChannelState::Connecting));
        let registration = server::attach(hook.clone()).map_err(|e| {
            let reason = e.to_string();
            hook.board
                .report(Status::new(ChannelState::Error).with_reason(&reason));
            let err = ConnectorError::new("listen_failed", reason);
            match e {
                // A taken port, or this address and path still served by a previous
                // instance that is closing: worth retrying.
                ListenError::Bind { .. } | ListenError::Taken { .. } => err.retryable(),
                ListenError::Invalid(_) => err,
            }
        })?;
        let addr = registration.local_addr().to_string();
        let number = c
            .number
            .clone()
            .unwrap_or_else(|| format!("http://{addr}{}", c.path));
        hook.host().log(
            Level::Info,
            &format!("webhook listening on http://{addr}{}", c.path),
        );
        hook.board.report(Status {
            number: Some(number),
            display_name: Some(c.display_name.clone()),
            details: Some(json!({"listen": addr})),
            ..Status::new(ChannelState::Connected)
        });
        self.running = Some(Running {
            tasks,
            registration,
        });
        Ok(())
    }

    /// POSTs the message, retrying 5xx/408/429 answers and network errors up to
    /// `outbound_attempts` times with backoff (honouring a short `Retry-After`). When
    /// all attempts fail the error is retryable, so the daemon's job retries later;
    /// a 4xx is permanent. Delivery is at least once: the body carries the host's
    /// `message` id for the gateway to de-duplicate.
    fn send(&mut self, msg: Outbound) -> Result<Sent, ConnectorError> {
        let Some(url) = self.hook.config.outbound_url.clone() else {
            return Err(ConnectorError::new(
                "unsupported",
                "this webhook channel has no outbound_url, so it cannot send",
            ));
        };
        let body = outbound::body(&msg)?;
        let Some(r) = self.running.as_ref() else {
            return Err(ConnectorError::new("not_running", "webhook is not started").retryable());
        };
        r.tasks.block_on(outbound::deliver(
            &self.hook,
            &self.client,
            &url,
            &body,
            msg.message,
        ))
    }

    fn status(&self) -> Status {
        let mut s = self.hook.board.snapshot();
        if let (Some(r), Some(d)) = (
            self.running.as_ref(),
            s.details.as_mut().and_then(Value::as_object_mut),
        ) {
            // Past max_connections: answered 503, or closed unanswered.
            d.insert(
                "refused_connections".into(),
                r.registration.refused_connections().into(),
            );
        }
        s
    }

    fn stop(&mut self) -> Result<(), ConnectorError> {
        self.shutdown();
        self.hook
            .board
            .final_status(Status::new(ChannelState::Disconnected).with_reason("stopped"));
        Ok(())
    }
}

impl Drop for Webhook {
    // destroy without stop (after a panic): still stop its requests and free the port.
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
