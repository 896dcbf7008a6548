//! A control-socket client: one connection, newline-delimited JSON-RPC 2.0 calls.

use std::path::Path;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(
        "cannot connect to {path}: {source}. Is patchbayd running? Start it, or point --socket / --config at it"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the control socket closed the connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent something that is not JSON-RPC: {0}")]
    Protocol(String),
    /// The daemon answered with an error object.
    #[error("{message}")]
    Rpc {
        code: i64,
        message: String,
        kind: Option<String>,
    },
}

pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Self, CallError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| CallError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        })
    }

    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line =
            json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply).await? == 0 {
            return Err(CallError::Protocol(
                "connection closed before the reply".into(),
            ));
        }
        let mut v: Value =
            serde_json::from_str(&reply).map_err(|e| CallError::Protocol(e.to_string()))?;
        if let Some(err) = v.get("error") {
            return Err(CallError::Rpc {
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                kind: err
                    .pointer("/data/kind")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            });
        }
        v.get_mut("result")
            .map(Value::take)
            .ok_or_else(|| CallError::Protocol("reply has neither result nor error".into()))
    }
}
