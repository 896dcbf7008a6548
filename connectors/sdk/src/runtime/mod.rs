//! The shared async runtime for Rust connectors (feature `runtime`): what lets one
//! plugin carry thousands of channels without a thread per channel.
//!
//! - [`Tasks`]: one per instance. Its futures run on **the plugin's runtime** — one
//!   tokio runtime per loaded plugin (a `static` in the plugin's own copy of this
//!   crate), built on the first `Tasks::new`, with a few worker threads
//!   ([`RuntimeOptions`]: `PATCHBAY_CONNECTOR_THREADS`, else the CPUs up to 4) and a
//!   small bounded blocking pool — shared by every instance of the plugin. `start`
//!   spawns, `send` may `block_on`, `stop` calls [`Tasks::stop`], which cancels the
//!   instance's [`CancellationToken`] and joins exactly that instance's tasks.
//! - [`emit`] / [`emit_within`] (async emit that backs off while the host is BUSY) and
//!   [`flush`] (the host's blocking flush without a parked thread per waiter).
//! - [`StatusBoard`] and [`Counters`]: the instance's last status, emitted only on a
//!   change, and counters merged into `status().details`.
//! - [`signature`]: HMAC-SHA256 in the `sha256=<hex>` header form, compared in
//!   constant time.
//! - [`http`]: a bounded-body HTTP/1 listener that serves several instances on one
//!   address, routing by path and, optionally, by an id taken from the request.
//! - [`config`]: parse-and-validate helpers for a connector's config object.
//!
//! A connector using it owns no thread and no runtime of its own:
//!
//! ```no_run
//! use patchbay_connector_sdk::runtime::{self, StatusBoard, Tasks};
//! use patchbay_connector_sdk::{ChannelState, ConnectorError, Event, Host, Status};
//!
//! struct Poller { host: Host, board: StatusBoard, tasks: Option<Tasks> }
//!
//! impl Poller {
//!     fn start(&mut self) -> Result<(), ConnectorError> {
//!         let tasks = Tasks::new()?;
//!         let (host, cancel) = (self.host.clone(), tasks.token());
//!         self.board.report(Status::new(ChannelState::Connected));
//!         tasks.spawn(async move {
//!             // Long-poll, emit with backoff, flush before acknowledging …
//!             let ev = Event::Status(Status::new(ChannelState::Connected));
//!             let _ = runtime::emit(&host, &ev, &cancel).await;
//!             cancel.cancelled().await;
//!         });
//!         self.tasks = Some(tasks);
//!         Ok(())
//!     }
//!     fn stop(&mut self) {
//!         self.board.close();
//!         if let Some(t) = self.tasks.take() { t.stop(runtime::STOP_GRACE); }
//!         self.board.final_status(Status::new(ChannelState::Disconnected).with_reason("stopped"));
//!     }
//! }
//! ```

pub mod config;
mod emit;
pub mod http;
pub mod signature;
mod status;
mod tasks;

pub use emit::{emit, emit_raw, emit_within, flush};
pub use status::{Counters, StatusBoard};
pub use tasks::{RuntimeOptions, STOP_GRACE, StopOutcome, Tasks, configure, handle};
pub use tokio_util::sync::CancellationToken;

// Re-exported so connectors name the same versions the SDK was built with.
pub use {http_body_util, hyper, tokio, tokio_util};

#[cfg(test)]
mod tests;
