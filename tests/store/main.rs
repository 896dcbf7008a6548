//! The store on its own, on both backends. Every behaviour test here runs on SQLite and
//! on PostgreSQL (`on_both_stores!`); each test owns its store: a fresh SQLite file, or
//! a fresh database on the test binary's own throwaway PostgreSQL cluster
//! (`tests/support/pg_cluster.rs`), never the machine's shared server.

#[path = "../support/pg_cluster.rs"]
mod pg_cluster;

#[macro_use]
mod common;
mod accounts;
mod billing;
mod channels;
mod chats;
mod cluster;
mod deletion;
mod fields;
mod inbound;
mod journal;
mod users;
