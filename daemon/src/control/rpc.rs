//! JSON-RPC 2.0 messages as they cross the control socket, one per line.
//!
//! Parsing never fails as a Rust error: any input becomes either a request to run or
//! an error response with the standard code and a message a person can act on.

use patchbay_jobs::DomainError;
use serde::Serialize;
use serde_json::{Value, json};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
pub const APPLICATION_ERROR: i64 = -32000;

#[derive(Debug, Clone, Serialize)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        RpcError::new(INVALID_PARAMS, message)
    }
}

impl From<DomainError> for RpcError {
    fn from(e: DomainError) -> Self {
        RpcError {
            code: APPLICATION_ERROR,
            message: e.to_string(),
            data: Some(json!({ "kind": e.kind() })),
        }
    }
}

#[derive(Debug)]
pub struct Request {
    /// `None` for a notification: it runs, and nothing is answered.
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

/// Checks the envelope of one request object.
pub fn parse_request(v: Value) -> Result<Request, (Value, RpcError)> {
    let Value::Object(mut obj) = v else {
        return Err((
            Value::Null,
            RpcError::new(INVALID_REQUEST, "a request must be a JSON object"),
        ));
    };
    let id = obj.remove("id");
    let reply_id = id.clone().unwrap_or(Value::Null);
    if let Some(bad) = id
        .as_ref()
        .filter(|i| !(i.is_string() || i.is_number() || i.is_null()))
    {
        return Err((
            Value::Null,
            RpcError::new(
                INVALID_REQUEST,
                format!("id must be a string or a number, got {bad}"),
            ),
        ));
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((
            reply_id,
            RpcError::new(INVALID_REQUEST, "missing \"jsonrpc\": \"2.0\""),
        ));
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => {
            return Err((
                reply_id,
                RpcError::new(
                    INVALID_REQUEST,
                    "\"method\" must be a string, e.g. \"status\"",
                ),
            ));
        }
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return Err((
                reply_id,
                RpcError::new(
                    INVALID_PARAMS,
                    "params must be an object of named parameters",
                ),
            ));
        }
    };
    Ok(Request { id, method, params })
}

pub fn response(id: Value, result: Result<Value, RpcError>) -> Value {
    match result {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(error) => json!({ "jsonrpc": "2.0", "id": id, "error": error }),
    }
}
