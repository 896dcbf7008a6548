//! patchbay's domain: job kinds and payloads, the handlers that run them, and the store
//! interface (its implementations live in `store/sqlite` and `store/postgres`).
//!
//! This crate knows nothing of sockets, queues or processes; the daemon feeds it
//! validated requests and queued jobs. Everything here must stay idempotent: a handler
//! may run any number of times for one job and its effect happens once.

pub mod access;
pub mod billing;
pub mod contact;
pub mod error;
pub mod fields;
pub mod handlers;
pub mod kind;
pub mod model;
pub mod phone;
pub mod settings;
pub mod store;
pub mod validate;

pub use error::{DomainError, JobError};
pub use kind::{JobKind, Payload};
pub use store::Store;
