//! The end-to-end suite again, every daemon's store on PostgreSQL (see `main.rs`):
//! `harness::STORE` tells the two builds apart by their crate name.

include!("modules.rs");

// Only here: what the PostgreSQL store alone has.
mod cluster;
mod netns;
mod postgres;
