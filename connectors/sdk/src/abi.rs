//! The raw C ABI, version 1: `#[repr(C)]` mirrors of `include/patchbay_connector.h`,
//! field for field. The header is normative; this module must match it, which the layout
//! tests here and the C-compiled layout check in `tests/host.rs` enforce.
//!
//! Plugin authors using the SDK never touch these types; they are public for hosts and for
//! connectors that hand-roll the boundary.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_void};

/// The ABI version this crate speaks (`PB_ABI_VERSION`).
pub const PB_ABI_VERSION: u32 = 1;

/// Name of the version-1 entry symbol, NUL-terminated for `dlsym`.
pub const ENTRY_SYMBOL_V1: &[u8] = b"patchbay_connector_v1\0";

pub const PB_OK: i32 = 0;
pub const PB_ERROR: i32 = 1;
pub const PB_PANICKED: i32 = 2;
pub const PB_BUSY: i32 = 3;
pub const PB_UNSUPPORTED: i32 = 4;

pub const PB_LOG_ERROR: i32 = 1;
pub const PB_LOG_WARN: i32 = 2;
pub const PB_LOG_INFO: i32 = 3;
pub const PB_LOG_DEBUG: i32 = 4;
pub const PB_LOG_TRACE: i32 = 5;

/// Largest emitted event or sink output the host accepts (`PB_MAX_PAYLOAD_BYTES`).
pub const PB_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Longest `kind` (`PB_MAX_KIND_LEN`), in bytes of `[a-z0-9_]`.
pub const PB_MAX_KIND_LEN: usize = 64;
/// Longest `version` (`PB_MAX_VERSION_LEN`), in bytes.
pub const PB_MAX_VERSION_LEN: usize = 64;
/// Longest name in `secret_keys` (`PB_MAX_SECRET_KEY_LEN`), in bytes.
pub const PB_MAX_SECRET_KEY_LEN: usize = 64;
/// Most names in `secret_keys` (`PB_MAX_SECRET_KEYS`).
pub const PB_MAX_SECRET_KEYS: usize = 32;

/// Opaque plugin-owned instance (`pb_instance`).
#[repr(C)]
pub struct pb_instance {
    _private: [u8; 0],
}

pub type pb_write_fn = unsafe extern "C" fn(ctx: *mut c_void, ptr: *const u8, len: usize);
pub type pb_emit_fn = unsafe extern "C" fn(ctx: *mut c_void, json: *const u8, len: usize) -> i32;
pub type pb_log_fn = unsafe extern "C" fn(ctx: *mut c_void, level: i32, msg: *const u8, len: usize);
pub type pb_flush_fn = unsafe extern "C" fn(ctx: *mut c_void, timeout_ms: u32) -> i32;

/// A host-owned output buffer for one call (`pb_sink`).
#[repr(C)]
pub struct pb_sink {
    pub ctx: *mut c_void,
    pub write: Option<pb_write_fn>,
}

/// Host callbacks for one instance (`pb_host`).
#[repr(C)]
pub struct pb_host {
    pub struct_size: u32,
    pub abi_version: u32,
    pub ctx: *mut c_void,
    pub emit: Option<pb_emit_fn>,
    pub log: Option<pb_log_fn>,
    /// Added in header revision 1.1: read it only when `struct_size` covers it
    /// (`PB_HOST_FLUSH_MIN_SIZE`).
    pub flush: Option<pb_flush_fn>,
}

/// `PB_HOST_V1_MIN_SIZE`: the host struct of header revision 1.0 (up to `log`). A plugin
/// refuses a smaller one and reads later fields only where `struct_size` covers them.
pub const PB_HOST_V1_MIN_SIZE: usize =
    std::mem::offset_of!(pb_host, log) + std::mem::size_of::<Option<pb_log_fn>>();

/// The smallest `pb_host::struct_size` that includes `flush`.
pub const PB_HOST_FLUSH_MIN_SIZE: usize =
    std::mem::offset_of!(pb_host, flush) + std::mem::size_of::<Option<pb_flush_fn>>();

pub type pb_create_fn = unsafe extern "C" fn(
    host: *const pb_host,
    config_json: *const u8,
    config_len: usize,
    out: *mut *mut pb_instance,
    err: *const pb_sink,
) -> i32;
pub type pb_start_fn = unsafe extern "C" fn(inst: *mut pb_instance, err: *const pb_sink) -> i32;
pub type pb_send_fn = unsafe extern "C" fn(
    inst: *mut pb_instance,
    msg_json: *const u8,
    msg_len: usize,
    out: *const pb_sink,
) -> i32;
pub type pb_status_fn = unsafe extern "C" fn(inst: *mut pb_instance, out: *const pb_sink) -> i32;
pub type pb_stop_fn = unsafe extern "C" fn(inst: *mut pb_instance, err: *const pb_sink) -> i32;
pub type pb_destroy_fn = unsafe extern "C" fn(inst: *mut pb_instance);

/// The descriptor returned by the entry symbol (`pb_connector_v1`).
#[repr(C)]
pub struct pb_connector_v1 {
    pub struct_size: u32,
    pub abi_version: u32,
    pub kind: *const c_char,
    pub version: *const c_char,
    pub create: Option<pb_create_fn>,
    pub start: Option<pb_start_fn>,
    pub send: Option<pb_send_fn>,
    pub status: Option<pb_status_fn>,
    pub stop: Option<pb_stop_fn>,
    pub destroy: Option<pb_destroy_fn>,
    /// Added in header revision 1.2: the config keys whose values are credentials, as
    /// NUL-terminated names followed by an empty one (`"token\0\0"`), or NULL for none.
    /// Read it only when `struct_size` covers it (`PB_CONNECTOR_SECRET_KEYS_MIN_SIZE`).
    pub secret_keys: *const c_char,
}

/// `PB_CONNECTOR_V1_MIN_SIZE`: the host refuses a smaller descriptor.
pub const PB_CONNECTOR_V1_MIN_SIZE: usize =
    std::mem::offset_of!(pb_connector_v1, destroy) + std::mem::size_of::<Option<pb_destroy_fn>>();

/// The smallest `pb_connector_v1::struct_size` that includes `secret_keys`.
pub const PB_CONNECTOR_SECRET_KEYS_MIN_SIZE: usize =
    std::mem::offset_of!(pb_connector_v1, secret_keys) + std::mem::size_of::<*const c_char>();

/// The entry symbol's type: `const pb_connector_v1 *patchbay_connector_v1(uint32_t)`.
pub type pb_entry_v1_fn = unsafe extern "C" fn(host_abi_version: u32) -> *const pb_connector_v1;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    const P: usize = size_of::<*const u8>();

    #[test]
    fn sink_layout() {
        assert_eq!(offset_of!(pb_sink, ctx), 0);
        assert_eq!(offset_of!(pb_sink, write), P);
        assert_eq!(size_of::<pb_sink>(), 2 * P);
        assert_eq!(align_of::<pb_sink>(), P);
    }

    #[test]
    fn host_layout() {
        assert_eq!(offset_of!(pb_host, struct_size), 0);
        assert_eq!(offset_of!(pb_host, abi_version), 4);
        assert_eq!(offset_of!(pb_host, ctx), 8);
        assert_eq!(offset_of!(pb_host, emit), 8 + P);
        assert_eq!(offset_of!(pb_host, log), 8 + 2 * P);
        assert_eq!(offset_of!(pb_host, flush), 8 + 3 * P);
        assert_eq!(size_of::<pb_host>(), 8 + 4 * P);
        assert_eq!(PB_HOST_V1_MIN_SIZE, 8 + 3 * P);
        assert_eq!(PB_HOST_FLUSH_MIN_SIZE, size_of::<pb_host>());
    }

    #[test]
    fn descriptor_layout() {
        assert_eq!(offset_of!(pb_connector_v1, struct_size), 0);
        assert_eq!(offset_of!(pb_connector_v1, abi_version), 4);
        let fields = [
            offset_of!(pb_connector_v1, kind),
            offset_of!(pb_connector_v1, version),
            offset_of!(pb_connector_v1, create),
            offset_of!(pb_connector_v1, start),
            offset_of!(pb_connector_v1, send),
            offset_of!(pb_connector_v1, status),
            offset_of!(pb_connector_v1, stop),
            offset_of!(pb_connector_v1, destroy),
        ];
        for (i, off) in fields.iter().enumerate() {
            assert_eq!(*off, 8 + i * P, "field {i}");
        }
        assert_eq!(offset_of!(pb_connector_v1, secret_keys), 8 + 8 * P);
        assert_eq!(size_of::<pb_connector_v1>(), 8 + 9 * P);
        assert_eq!(PB_CONNECTOR_V1_MIN_SIZE, 8 + 8 * P);
        assert_eq!(
            PB_CONNECTOR_SECRET_KEYS_MIN_SIZE,
            size_of::<pb_connector_v1>()
        );
    }

    #[test]
    fn nullable_fn_pointers_are_pointer_sized() {
        assert_eq!(size_of::<Option<pb_emit_fn>>(), P);
        assert_eq!(size_of::<Option<pb_destroy_fn>>(), P);
        assert_eq!(size_of::<Option<pb_flush_fn>>(), P);
    }
}
