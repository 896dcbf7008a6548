// The suite's modules, shared by both builds (`main.rs`, `main_postgres.rs`): included,
// not a module, so that each build is one crate with these modules at its root.
mod accounts;
mod billing;
mod channels;
mod chats;
mod config;
mod control;
mod control_limits;
mod ctl;
mod deletion;
mod density;
mod fake_http;
mod faults;
mod harness;
mod inbound_limits;
mod jobs;
mod lifecycle;
mod monitoring;
#[path = "../support/pg_cluster.rs"]
mod pg_cluster;
mod redis;
mod secrets;
mod systemd;
mod telegram;
mod wakeups;
mod webhook;
mod whatsapp;
