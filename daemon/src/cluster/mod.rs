//! This daemon as one node among several on one store (ARCHITECTURE.md, "Several
//! daemons"): which channels it runs (`leases`), how many it should (`balance`), and
//! the loop that gets there (`reconcile`), plus the guard that keeps a second daemon off
//! a SQLite store (`store_guard`).

mod balance;
pub mod config;
mod leases;
pub mod placement;
mod reconcile;
pub mod store_guard;
pub mod view;

pub use leases::Leases;
pub use reconcile::{leave, renew, run};
