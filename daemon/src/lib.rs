//! patchbayd and patchbayctl: the daemon that runs channels and jobs, and the admin's
//! client for its control socket. The domain lives in `patchbay-jobs`; this crate is
//! processes, sockets, queues and configuration.

pub mod app;
pub mod batcher;
pub mod billing;
pub mod cluster;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod demo;
pub mod health;
pub mod http;
pub mod logging;
pub mod mail;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod plugin_host;
pub mod queue;
pub mod reload;
pub mod store_copy;
pub mod sweep;
pub mod time_text;
pub mod worker;
