//! End-to-end tests: the real patchbayd binary, its control socket, real SQLite files
//! and a real redis-server started per test. Run with `cargo test --workspace`.

mod accounts;
mod billing;
mod channels;
mod chats;
mod config;
mod control;
mod control_limits;
mod deletion;
mod fake_http;
mod faults;
mod harness;
mod inbound_limits;
mod jobs;
mod lifecycle;
mod secrets;
mod systemd;
mod telegram;
mod webhook;
