//! End-to-end tests: the real patchbayd binary, its control socket, real SQLite files
//! and a real redis-server started per test. Run with `cargo test --workspace`.
//!
//! The suite is built twice: `e2e` keeps each daemon's store in a SQLite file,
//! `e2e_postgres` (`main_postgres.rs`, this file again) in a fresh database of the test
//! binary's own PostgreSQL cluster (`harness::STORE`).

include!("modules.rs");
