//! One client of the control socket: reads newline-delimited JSON-RPC requests and
//! answers each in order on the same connection.
//!
//! Framing is tokio-util's delimiter codec with a 1 MiB limit: an over-long line is
//! answered with -32600 and skipped, invalid UTF-8 or JSON with -32700, and the
//! connection stays open for the next request. Before a line is parsed its nesting is
//! measured (at most [`MAX_LINE_DEPTH`]), and a batch is parsed only up to
//! `control.max_batch` requests, so no line costs much more memory than its own bytes.
//!
//! A connection with no complete request for `control.idle_timeout_secs` is closed, and
//! one whose reply is not taken within `control.write_timeout_secs` is dropped. The next
//! line is read only once the previous reply is written, so a client that never reads
//! holds one reply and the kernel's socket buffers, never a growing queue.

use std::cell::Cell;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use patchbay_connector_sdk::json_limits::{MAX_JSON_DEPTH, check_depth};
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Framed};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::ControlConfig;
use crate::control::methods;
use crate::control::rpc::{self, RpcError};

pub const MAX_LINE: usize = 1024 * 1024;

/// Deepest nesting of a request line: a value in `params` may nest `MAX_JSON_DEPTH`
/// levels, inside the params object, the request object and a batch array.
pub const MAX_LINE_DEPTH: usize = MAX_JSON_DEPTH + 3;

/// The per-connection bounds from `[control]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_batch: usize,
    pub idle: Duration,
    pub write: Duration,
}

impl Limits {
    pub fn new(c: &ControlConfig) -> Self {
        Limits {
            max_batch: c.max_batch,
            idle: Duration::from_secs(c.idle_timeout_secs),
            write: Duration::from_secs(c.write_timeout_secs),
        }
    }
}

fn codec() -> AnyDelimiterCodec {
    AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE)
}

pub async fn run(stream: UnixStream, app: Arc<App>, stop: CancellationToken, limits: Limits) {
    let mut framed = Framed::new(stream, codec());
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            f = tokio::time::timeout(limits.idle, framed.next()) => match f {
                Ok(f) => f,
                Err(_) => {
                    tracing::debug!(
                        secs = limits.idle.as_secs(),
                        "control connection idle (control.idle_timeout_secs); closed"
                    );
                    break;
                }
            },
        };
        let reply = match frame {
            None => break,
            Some(Ok(line)) => handle_line(&app, &line, &limits).await,
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                // Framed ends the stream after any decode error; a fresh one over the
                // same parts keeps the codec discarding up to the next newline.
                framed = Framed::from_parts(framed.into_parts());
                Some(error_reply(
                    rpc::INVALID_REQUEST,
                    format!("request line is longer than {MAX_LINE} bytes; send smaller requests"),
                ))
            }
            Some(Err(AnyDelimiterCodecError::Io(e))) => {
                tracing::debug!(error = %e, "control connection closed");
                break;
            }
        };
        if let Some(reply) = reply {
            // The codec appends the newline.
            match tokio::time::timeout(limits.write, framed.send(reply.to_string())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "control connection closed while answering");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        secs = limits.write.as_secs(),
                        "a control client took no reply within control.write_timeout_secs; dropped"
                    );
                    break;
                }
            }
        }
    }
}

/// Answers a peer that is not served with one error line, then closes. The write never
/// waits: a new connection's socket buffer has room for one line, and a peer that
/// somehow has none loses only the explanation.
pub fn refuse(stream: UnixStream, error: RpcError) {
    let mut line = rpc::response(Value::Null, Err(error)).to_string();
    line.push('\n');
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    let _ = rustix::net::send(stream.as_fd(), line.as_bytes(), flags);
}

/// The error a peer not allowed on the socket gets.
pub fn forbidden() -> RpcError {
    RpcError {
        code: rpc::APPLICATION_ERROR,
        message: "this user may not use the control socket; ask an admin to add your uid \
                  or group to control.allowed_uids / control.allowed_gids"
            .into(),
        data: Some(json!({ "kind": "forbidden" })),
    }
}

/// The error a peer gets while `control.max_connections` clients are connected.
pub fn full(max: usize) -> RpcError {
    RpcError {
        code: rpc::APPLICATION_ERROR,
        message: format!(
            "the control socket already serves {max} clients (control.max_connections); \
             try again once one has disconnected"
        ),
        data: Some(json!({ "kind": "unavailable" })),
    }
}

fn error_reply(code: i64, message: String) -> Value {
    rpc::response(Value::Null, Err(RpcError::new(code, message)))
}

/// A request line, parsed.
enum Line {
    One(Value),
    Batch(Vec<Value>),
}

/// Parses a batch array element by element and stops at `max + 1`, so an over-size
/// batch costs `max` parsed requests, not the whole line's worth.
struct BoundedBatch {
    max: usize,
    over: Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for &BoundedBatch {
    type Value = Vec<Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<Value>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for &BoundedBatch {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a batch of requests")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        let mut out = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            if out.len() == self.max {
                self.over.set(true);
                return Err(A::Error::custom("batch too large"));
            }
            out.push(item);
        }
        Ok(out)
    }
}

/// Checks and parses one line; `Err` is the error reply.
fn parse_line(line: &[u8], max_batch: usize) -> Result<Line, Value> {
    // Not UTF-8 is a parse error even where the depth count would have refused it first.
    if let Err(e) = std::str::from_utf8(line) {
        return Err(error_reply(
            rpc::PARSE_ERROR,
            format!("not valid JSON: the line is not UTF-8 ({e})"),
        ));
    }
    if check_depth(line, MAX_LINE_DEPTH).is_err() {
        return Err(error_reply(
            rpc::INVALID_REQUEST,
            format!(
                "request nested deeper than {MAX_LINE_DEPTH} levels of arrays and objects; \
                 a value in params may nest at most {MAX_JSON_DEPTH} levels"
            ),
        ));
    }
    let not_json =
        |e: serde_json::Error| error_reply(rpc::PARSE_ERROR, format!("not valid JSON: {e}"));
    if line.first() != Some(&b'[') {
        return serde_json::from_slice(line)
            .map(Line::One)
            .map_err(not_json);
    }
    let seed = BoundedBatch {
        max: max_batch,
        over: Cell::new(false),
    };
    let mut de = serde_json::Deserializer::from_slice(line);
    match seed.deserialize(&mut de).and_then(|b| de.end().map(|()| b)) {
        Ok(batch) => Ok(Line::Batch(batch)),
        Err(_) if seed.over.get() => Err(error_reply(
            rpc::INVALID_REQUEST,
            format!(
                "a batch may hold at most {max_batch} requests (control.max_batch); \
                 split it into smaller batches"
            ),
        )),
        Err(e) => Err(not_json(e)),
    }
}

async fn handle_line(app: &App, line: &[u8], limits: &Limits) -> Option<Value> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return None;
    }
    match parse_line(trimmed, limits.max_batch) {
        Err(reply) => Some(reply),
        Ok(Line::Batch(batch)) if batch.is_empty() => Some(error_reply(
            rpc::INVALID_REQUEST,
            "an empty batch is not a request".into(),
        )),
        Ok(Line::Batch(batch)) => {
            let mut replies = Vec::new();
            for item in batch {
                replies.extend(handle_one(app, item).await);
            }
            (!replies.is_empty()).then_some(Value::Array(replies))
        }
        Ok(Line::One(single)) => handle_one(app, single).await,
    }
}

async fn handle_one(app: &App, value: Value) -> Option<Value> {
    match rpc::parse_request(value) {
        Err((id, error)) => Some(rpc::response(id, Err(error))),
        Ok(req) => {
            let result = methods::call(app, &req.method, req.params).await;
            if let Err(e) = &result {
                tracing::debug!(method = %req.method, code = e.code, message = %e.message, "control request failed");
            }
            req.id.map(|id| rpc::response(id, result))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(reply: &Value) -> i64 {
        reply["error"]["code"].as_i64().unwrap_or(0)
    }

    #[test]
    fn a_batch_is_parsed_up_to_its_cap() {
        let item = r#"{"jsonrpc":"2.0","id":1,"method":"status"}"#;
        let batch = |n: usize| format!("[{}]", vec![item; n].join(","));
        match parse_line(batch(3).as_bytes(), 3) {
            Ok(Line::Batch(b)) => assert_eq!(b.len(), 3),
            _ => panic!("a batch at the cap is parsed"),
        }
        let reply = parse_line(batch(4).as_bytes(), 3).err().unwrap_or_default();
        assert_eq!(code(&reply), rpc::INVALID_REQUEST, "{reply}");
        assert!(reply.to_string().contains("control.max_batch"), "{reply}");
        // Broken JSON in a batch is still a parse error, and trailing junk too.
        for bad in [
            format!("{},", batch(2)),
            format!("[{item},"),
            "[1] x".into(),
        ] {
            let reply = parse_line(bad.as_bytes(), 3).err().unwrap_or_default();
            assert_eq!(code(&reply), rpc::PARSE_ERROR, "{bad}: {reply}");
        }
    }

    #[test]
    fn depth_is_bounded_before_parsing() {
        let deep = |levels: usize| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{"v":{}1{}}}}}"#,
                "[".repeat(levels),
                "]".repeat(levels)
            )
        };
        // Request and params objects, then MAX_JSON_DEPTH + 1 arrays: allowed in one
        // request (a batch would add its level), left to the method to judge.
        assert!(parse_line(deep(MAX_LINE_DEPTH - 2).as_bytes(), 10).is_ok());
        let reply = parse_line(deep(MAX_LINE_DEPTH - 1).as_bytes(), 10)
            .err()
            .unwrap_or_default();
        assert_eq!(code(&reply), rpc::INVALID_REQUEST, "{reply}");
        assert!(reply.to_string().contains("nested deeper"), "{reply}");
        // Far past serde_json's own limit: refused without recursing.
        let reply = parse_line(deep(1_000_000).as_bytes(), 10)
            .err()
            .unwrap_or_default();
        assert_eq!(code(&reply), rpc::INVALID_REQUEST);
        let reply = parse_line(b"{\"a\":\"\xff\"}", 10)
            .err()
            .unwrap_or_default();
        assert_eq!(code(&reply), rpc::PARSE_ERROR);
    }
}
