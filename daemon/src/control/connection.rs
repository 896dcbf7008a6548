//! One client of the control socket: reads newline-delimited JSON-RPC requests and
//! answers each in order on the same connection.
//!
//! Framing is tokio-util's delimiter codec with a 1 MiB limit: an over-long line is
//! answered with -32600 and skipped, invalid UTF-8 or JSON with -32700, and the
//! connection stays open for the next request.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Framed};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::control::methods;
use crate::control::rpc::{self, RpcError};

pub const MAX_LINE: usize = 1024 * 1024;

fn codec() -> AnyDelimiterCodec {
    AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE)
}

pub async fn run(stream: UnixStream, app: Arc<App>, stop: CancellationToken) {
    let mut framed = Framed::new(stream, codec());
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            f = framed.next() => f,
        };
        let reply = match frame {
            None => break,
            Some(Ok(line)) => handle_line(&app, &line).await,
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                // Framed ends the stream after any decode error; a fresh one over the
                // same parts keeps the codec discarding up to the next newline.
                framed = Framed::from_parts(framed.into_parts());
                Some(rpc::response(
                    Value::Null,
                    Err(RpcError::new(
                        rpc::INVALID_REQUEST,
                        format!(
                            "request line is longer than {MAX_LINE} bytes; send smaller requests"
                        ),
                    )),
                ))
            }
            Some(Err(AnyDelimiterCodecError::Io(e))) => {
                tracing::debug!(error = %e, "control connection closed");
                break;
            }
        };
        if let Some(reply) = reply {
            // The codec appends the newline.
            if framed.send(reply.to_string()).await.is_err() {
                break;
            }
        }
    }
}

/// Answers a refused peer with a `forbidden` error, then closes.
pub async fn refuse(stream: UnixStream) {
    let mut framed = Framed::new(stream, codec());
    let reply = rpc::response(
        Value::Null,
        Err(RpcError {
            code: rpc::APPLICATION_ERROR,
            message: "this user may not use the control socket; ask an admin to add your uid \
                      or group to control.allowed_uids / control.allowed_gids"
                .into(),
            data: Some(json!({ "kind": "forbidden" })),
        }),
    );
    let _ = framed.send(reply.to_string()).await;
}

async fn handle_line(app: &App, line: &[u8]) -> Option<Value> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return None;
    }
    let value: Value = match serde_json::from_slice(trimmed) {
        Ok(v) => v,
        Err(e) => {
            return Some(rpc::response(
                Value::Null,
                Err(RpcError::new(
                    rpc::PARSE_ERROR,
                    format!("not valid JSON: {e}"),
                )),
            ));
        }
    };
    match value {
        Value::Array(batch) if batch.is_empty() => Some(rpc::response(
            Value::Null,
            Err(RpcError::new(
                rpc::INVALID_REQUEST,
                "an empty batch is not a request",
            )),
        )),
        Value::Array(batch) => {
            let mut replies = Vec::new();
            for item in batch {
                replies.extend(handle_one(app, item).await);
            }
            (!replies.is_empty()).then_some(Value::Array(replies))
        }
        single => handle_one(app, single).await,
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
