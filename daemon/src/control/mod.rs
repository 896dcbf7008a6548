//! The control socket: a Unix stream socket speaking JSON-RPC 2.0, one object per line.
//!
//! `server` owns the listening socket and who may connect, `connection` one client's
//! framing loop, `rpc` the message shapes, and `methods` one file per group of methods.

pub mod connection;
pub mod methods;
pub mod rpc;
pub mod server;
