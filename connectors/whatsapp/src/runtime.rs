//! The plugin's one tokio runtime, shared by every whatsapp channel of the daemon:
//! listeners, Graph API calls and status checks are tasks on it, so a thousand
//! channels cost tasks, not threads. Built on first use and never shut down (the
//! daemon never unloads a plugin); each channel joins its own tasks on stop.

use std::sync::OnceLock;

use patchbay_connector_sdk::ConnectorError;
use tokio::runtime::{Handle, Runtime};

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The shared runtime's handle.
pub fn handle() -> Result<Handle, ConnectorError> {
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(8)
            .thread_name("whatsapp")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(ConnectorError::new(
            "start_failed",
            format!("cannot start the whatsapp runtime: {e}"),
        )
        .retryable()),
    }
}
