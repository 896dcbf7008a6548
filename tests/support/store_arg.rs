//! An argument of a portable SQL query on either store (SQLite or PostgreSQL), and
//! `bind_args!`, which binds a slice of them to a query of either database: shared by
//! the e2e harness and the benches (`daemon/benches/common/store.rs`), each including
//! this file with `#[macro_use] #[path = …] mod store_arg;`. The macro names
//! `StoreArg`, which must be in scope where it is used.

#![allow(dead_code)]

#[derive(Clone, Debug)]
pub enum StoreArg {
    Int(i64),
    Text(String),
    Bool(bool),
}

impl From<i64> for StoreArg {
    fn from(v: i64) -> Self {
        StoreArg::Int(v)
    }
}

impl From<&str> for StoreArg {
    fn from(v: &str) -> Self {
        StoreArg::Text(v.to_owned())
    }
}

impl From<String> for StoreArg {
    fn from(v: String) -> Self {
        StoreArg::Text(v)
    }
}

impl From<bool> for StoreArg {
    fn from(v: bool) -> Self {
        StoreArg::Bool(v)
    }
}

/// Binds `StoreArg`s to a query of either database (one loop, whatever the query type).
macro_rules! bind_args {
    ($query:expr, $args:expr) => {{
        let mut q = $query;
        for a in $args {
            q = match a {
                StoreArg::Int(v) => q.bind(*v),
                StoreArg::Text(v) => q.bind(v.clone()),
                StoreArg::Bool(v) => q.bind(*v),
            };
        }
        q
    }};
}
