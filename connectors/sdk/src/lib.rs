//! patchbay's connector plugin boundary: the versioned C ABI (`abi`, mirroring
//! `include/patchbay_connector.h`), the JSON payloads both sides exchange (`events`),
//! the plugin side (`Connector`, `Host`, `export_connector!`), and, behind the `host`
//! feature, the daemon's side (`host`: `check_file`, `load`, `Instance`), and behind the
//! `runtime` feature the shared async plumbing for connectors (`runtime`: one tokio
//! runtime per plugin, per-instance `Tasks`, async emit/flush, `StatusBoard`, HMAC, a
//! shared HTTP listener).
//!
//! A Rust connector implements `Connector` and calls `export_connector!`; it needs no
//! `unsafe` of its own. See `connectors/README.md` for the author's guide.
//!
//! ```
//! use patchbay_connector_sdk::{
//!     ChannelState, Connector, ConnectorError, Event, Host, Outbound, Sent, Status,
//!     export_connector,
//! };
//!
//! struct Echo {
//!     host: Host,
//!     sent: u64,
//! }
//!
//! impl Connector for Echo {
//!     fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
//!         if !config.is_object() {
//!             return Err(ConnectorError::config("expected an object"));
//!         }
//!         Ok(Echo { host, sent: 0 })
//!     }
//!     fn start(&mut self) -> Result<(), ConnectorError> {
//!         let connected = Status { number: Some("+15550000000".into()), ..Status::new(ChannelState::Connected) };
//!         let _ = self.host.emit(&Event::Status(connected));
//!         Ok(())
//!     }
//!     fn send(&mut self, _msg: Outbound) -> Result<Sent, ConnectorError> {
//!         self.sent += 1;
//!         Ok(Sent { external_message_id: format!("echo-{}", self.sent) })
//!     }
//!     fn status(&self) -> Status {
//!         Status::new(ChannelState::Connected)
//!     }
//!     fn stop(&mut self) -> Result<(), ConnectorError> {
//!         Ok(())
//!     }
//! }
//!
//! export_connector!(Echo, kind = "echo", version = "0.1.0");
//! # fn main() {}
//! ```

pub mod abi;
pub mod events;
#[cfg(feature = "host")]
pub mod host;
pub mod json_limits;
mod plugin;
#[cfg(feature = "runtime")]
pub mod runtime;

pub use events::{
    ChannelState, ErrorBody, Event, EventError, Inbound, Outbound, Receipt, ReceiptStatus,
    Recipient, Sender, Sent, Status,
};
pub use plugin::{Connector, ConnectorError, EmitError, FlushError, Host, Level};

// Re-exported so connectors can build `Event`s without naming chrono themselves.
pub use chrono;
pub use serde_json;

/// What `export_connector!` expands to; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::plugin::{StaticDescriptor, descriptor, entry, valid_kind, valid_secret_key};

    /// `version` fits `PB_MAX_VERSION_LEN` and has no NUL.
    pub const fn valid_version(version: &str) -> bool {
        let b = version.as_bytes();
        b.len() <= crate::abi::PB_MAX_VERSION_LEN && crate::plugin::no_nul(b)
    }
}

/// Exports a `Connector` type as a patchbay plugin: defines the entry symbol
/// `patchbay_connector_v1` returning a static descriptor for it.
///
/// ```text
/// patchbay_connector_sdk::export_connector!(MyConnector, kind = "my_kind", version = env!("CARGO_PKG_VERSION"));
/// ```
///
/// `kind` is a string literal of `[a-z0-9_]`, 1 to 64 characters (checked at compile
/// time); `version` a string literal or `env!`/`concat!` call. Use it once per cdylib.
/// The plugin must be built with `panic = "unwind"` (the default): with `abort`, a panic
/// would take the daemon down, so the expansion refuses to compile.
///
/// `secrets` (optional) names the top-level config keys whose values are credentials
/// (header section 7): the daemon shows them as `"***"` and scrubs their values from
/// the connector's errors, statuses and log lines. At most 32 names of 1 to 64 bytes.
///
/// ```text
/// patchbay_connector_sdk::export_connector!(MyBot, kind = "my_bot", version = "1.0.0", secrets = ["token"]);
/// ```
#[macro_export]
macro_rules! export_connector {
    (@secrets) => {
        ::core::option::Option::None
    };
    (@secrets $($secret:literal),+) => {
        ::core::option::Option::Some(::core::concat!($($secret, "\0",)+ "\0"))
    };
    (
        $ty:ty,
        kind = $kind:literal,
        version = $version:expr
        $(, secrets = [$($secret:literal),* $(,)?])?
        $(,)?
    ) => {
        #[cfg(panic = "abort")]
        compile_error!(
            "patchbay connectors must be built with panic = \"unwind\": with panic = \"abort\" a \
             panic in the plugin would abort the daemon. Remove `panic = \"abort\"` from your \
             Cargo profile."
        );

        const _: () = {
            assert!(
                $crate::__private::valid_kind($kind),
                "connector kind must be 1..=64 characters of [a-z0-9_]"
            );
            assert!(
                $crate::__private::valid_version($version),
                "connector version must be at most 64 bytes, without NUL"
            );
            $($(
                assert!(
                    $crate::__private::valid_secret_key($secret),
                    "secret key names must be 1..=64 bytes, without NUL"
                );
            )*)?
            let secrets: &[&str] = &[$($($secret),*)?];
            assert!(
                secrets.len() <= $crate::abi::PB_MAX_SECRET_KEYS,
                "at most 32 secret keys"
            );
        };

        /// The patchbay connector entry symbol, ABI version 1.
        #[unsafe(no_mangle)]
        pub extern "C" fn patchbay_connector_v1(
            host_abi_version: u32,
        ) -> *const $crate::abi::pb_connector_v1 {
            static DESCRIPTOR: $crate::__private::StaticDescriptor =
                $crate::__private::descriptor::<$ty>(
                    ::core::concat!($kind, "\0"),
                    ::core::concat!($version, "\0"),
                    $crate::export_connector!(@secrets $($($secret),*)?),
                );
            $crate::__private::entry(host_abi_version, &DESCRIPTOR)
        }
    };
}
