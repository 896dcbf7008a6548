//! The plugin side: the safe `Connector` trait authors implement, the `Host` handle they
//! emit events and log through, and the `extern "C"` shims `export_connector!` wires into
//! a descriptor. All `unsafe` of a Rust plugin lives here.
//!
//! Every shim catches panics: a panic becomes `PB_PANICKED` plus an error JSON naming
//! it, and the instance refuses every later call except `destroy`.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::Duration;

use crate::abi::{self, pb_host, pb_instance, pb_sink};
use crate::events::{ErrorBody, Event, Outbound, Reply, Request, Sent, Status};

/// A connector: one instance per channel. The host calls these one at a time per
/// instance (never concurrently), from varying threads; see the header for the lifecycle.
pub trait Connector: Send + Sized + 'static {
    /// Validates `config` (the channel's config object) and builds an instance. Start
    /// nothing here: no threads, no connections.
    fn create(config: serde_json::Value, host: Host) -> Result<Self, ConnectorError>;

    /// Starts connecting; spawn your threads here. Report progress with status events.
    /// On error, leave no thread running.
    fn start(&mut self) -> Result<(), ConnectorError>;

    /// Sends one message.
    fn send(&mut self, msg: Outbound) -> Result<Sent, ConnectorError>;

    /// The current state (cheap: called for dashboards).
    fn status(&self) -> Status;

    /// Disconnects and joins every thread `start` spawned: after this returns, nothing
    /// may emit for this instance (the host refuses it anyway).
    fn stop(&mut self) -> Result<(), ConnectorError>;
}

/// An error a connector reports; it crosses as `{"type":"error",...}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectorError {
    /// snake_case, stable, for machines (`invalid_config`, `unauthorized`, ...).
    pub code: String,
    /// For people.
    pub message: String,
    /// Whether the same call may succeed later (network trouble, rate limits).
    pub retryable: bool,
}

impl ConnectorError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ConnectorError {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }

    /// A bad channel configuration (code `invalid_config`).
    pub fn config(message: impl Into<String>) -> Self {
        Self::new("invalid_config", message)
    }

    /// Marks the error as worth retrying.
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.clone(),
            message: self.message.clone(),
            retryable: self.retryable,
        }
    }
}

/// Why the host did not take an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// The host's queue for this instance is full: back off and retry.
    #[error("host event queue is full; back off and retry")]
    Busy,
    /// The instance is not running (before start, after stop, poisoned, destroyed).
    #[error("host refuses events: the instance is not running")]
    Closed,
    /// The event is larger than `PB_MAX_PAYLOAD_BYTES`.
    #[error("event larger than the host accepts")]
    TooLarge,
}

/// Why `Host::flush` did not confirm that the events are recorded. In every case the
/// events must not be acknowledged to the messenger yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    /// The host did not record them within the timeout (it is behind): flush again, or
    /// leave them unacknowledged.
    #[error("the host has not recorded the events yet")]
    Timeout,
    /// They may never be recorded: the instance is stopping or not running, or the host
    /// lost one of its events (it will replace the instance). Do not acknowledge.
    #[error("the host will not confirm the events: the instance is stopping or failed")]
    Closed,
    /// The host predates durable acknowledgement (header revision 1.0): emit is all it
    /// offers, so acknowledging after emit is the best there is.
    #[error("the host does not support flush")]
    Unsupported,
}

/// Log levels, as in `PB_LOG_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Level {
    Error = abi::PB_LOG_ERROR,
    Warn = abi::PB_LOG_WARN,
    Info = abi::PB_LOG_INFO,
    Debug = abi::PB_LOG_DEBUG,
    Trace = abi::PB_LOG_TRACE,
}

#[derive(Clone, Copy)]
struct RawHost {
    ctx: *mut c_void,
    emit: abi::pb_emit_fn,
    log: Option<abi::pb_log_fn>,
    /// `None` for hosts of header revision 1.0.
    flush: Option<abi::pb_flush_fn>,
}

// SAFETY: the header makes `emit` and `log` thread-safe for their `ctx`, and the `ctx`
// valid until destroy returns; `HostInner` forgets the pointers before that.
unsafe impl Send for RawHost {}
unsafe impl Sync for RawHost {}

struct HostInner {
    // Read-locked for each callback, write-locked (and cleared) by destroy, so a thread
    // that outlives its instance gets `Closed` instead of touching a freed host ctx.
    raw: RwLock<Option<RawHost>>,
}

/// The host's callbacks for one instance: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Host {
    fn new(raw: RawHost) -> Self {
        Host {
            inner: Arc::new(HostInner {
                raw: RwLock::new(Some(raw)),
            }),
        }
    }

    /// A host that refuses every event and drops every log line: for unit-testing a
    /// connector's logic without loading it.
    pub fn detached() -> Self {
        Host {
            inner: Arc::new(HostInner {
                raw: RwLock::new(None),
            }),
        }
    }

    fn close(&self) {
        let mut raw = self.inner.raw.write().unwrap_or_else(|p| p.into_inner());
        *raw = None;
    }

    fn is_closed(&self) -> bool {
        self.inner.raw.read().map(|r| r.is_none()).unwrap_or(true)
    }

    /// Hands an event to the host. Never blocks; see `emit_with_backoff` for `Busy`.
    pub fn emit(&self, event: &Event) -> Result<(), EmitError> {
        // Serializing our own types cannot fail (string keys, no non-finite floats
        // that serde_json refuses: it writes them as null).
        let bytes = serde_json::to_vec(event).map_err(|_| EmitError::Closed)?;
        self.emit_raw(&bytes)
    }

    /// Hands raw bytes to the host as an event, unchecked. For connectors that build
    /// their JSON themselves, and for tests of the host's validation.
    pub fn emit_raw(&self, json: &[u8]) -> Result<(), EmitError> {
        if json.len() > abi::PB_MAX_PAYLOAD_BYTES {
            return Err(EmitError::TooLarge);
        }
        let guard = self.inner.raw.read().unwrap_or_else(|p| p.into_inner());
        let Some(raw) = *guard else {
            return Err(EmitError::Closed);
        };
        // SAFETY: `raw` is live while the read lock is held (destroy takes the write
        // lock before the host frees ctx); the slice is valid for the call.
        let status = unsafe { (raw.emit)(raw.ctx, json.as_ptr(), json.len()) };
        match status {
            abi::PB_OK => Ok(()),
            abi::PB_BUSY => Err(EmitError::Busy),
            _ => Err(EmitError::Closed),
        }
    }

    /// Emits, sleeping with exponential backoff (1 ms to 50 ms) while the host is busy,
    /// until it is taken, refused, or `cancel` is set.
    pub fn emit_with_backoff(&self, event: &Event, cancel: &AtomicBool) -> Result<(), EmitError> {
        let bytes = serde_json::to_vec(event).map_err(|_| EmitError::Closed)?;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.emit_raw(&bytes) {
                Err(EmitError::Busy) if !cancel.load(Ordering::Relaxed) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Blocks until every event this instance emitted before the call is durably
    /// recorded by the host (header section 6), for at most `timeout`. Acknowledge
    /// messages to the messenger (advance an offset, answer 200) only after `Ok`.
    /// Call it from your own threads (or `send`), never while holding a lock that
    /// `stop` needs; `stop` wakes it with `Closed`.
    pub fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let guard = self.inner.raw.read().unwrap_or_else(|p| p.into_inner());
        let Some(raw) = *guard else {
            return Err(FlushError::Closed);
        };
        let Some(flush) = raw.flush else {
            return Err(FlushError::Unsupported);
        };
        // SAFETY: as in emit_raw; destroy waits for the read lock, and the host wakes
        // flushes when stop begins, which comes before destroy.
        match unsafe { flush(raw.ctx, ms) } {
            abi::PB_OK => Ok(()),
            abi::PB_BUSY => Err(FlushError::Timeout),
            _ => Err(FlushError::Closed),
        }
    }

    /// Logs one line through the host's `tracing`.
    pub fn log(&self, level: Level, msg: &str) {
        let guard = self.inner.raw.read().unwrap_or_else(|p| p.into_inner());
        if let Some(RawHost {
            ctx,
            log: Some(log),
            ..
        }) = *guard
        {
            // SAFETY: as in emit_raw.
            unsafe { log(ctx, level as i32, msg.as_ptr(), msg.len()) };
        }
    }
}

/// What a Rust plugin's `pb_instance *` points to.
struct Instance<C> {
    conn: Mutex<Option<C>>,
    poisoned: AtomicBool,
    host: Host,
}

/// The descriptor in a `static`: raw pointers are not `Sync`, but these point at
/// static strings and functions, so sharing is sound.
#[doc(hidden)]
#[repr(transparent)]
pub struct StaticDescriptor(pub abi::pb_connector_v1);

// SAFETY: every pointer in it is to immutable static data or code.
unsafe impl Sync for StaticDescriptor {}

/// `[a-z0-9_]{1,PB_MAX_KIND_LEN}`, checked at compile time by `export_connector!`.
#[doc(hidden)]
pub const fn valid_kind(kind: &str) -> bool {
    let b = kind.as_bytes();
    if b.is_empty() || b.len() > abi::PB_MAX_KIND_LEN {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_') {
            return false;
        }
        i += 1;
    }
    true
}

/// One name for `secret_keys`: 1..=`PB_MAX_SECRET_KEY_LEN` bytes without NUL, checked
/// at compile time by `export_connector!`.
#[doc(hidden)]
pub const fn valid_secret_key(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty() && b.len() <= abi::PB_MAX_SECRET_KEY_LEN && no_nul(b)
}

/// Whether `b` holds no NUL byte (a C string's end); usable at compile time.
#[doc(hidden)]
pub const fn no_nul(b: &[u8]) -> bool {
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0 {
            return false;
        }
        i += 1;
    }
    true
}

/// Builds the descriptor for connector type `C`; used by `export_connector!`.
/// `secret_keys` is the header's list (`"a\0b\0\0"`) or `None`.
#[doc(hidden)]
pub const fn descriptor<C: Connector>(
    kind: &'static str,
    version: &'static str,
    secret_keys: Option<&'static str>,
) -> StaticDescriptor {
    StaticDescriptor(abi::pb_connector_v1 {
        struct_size: std::mem::size_of::<abi::pb_connector_v1>() as u32,
        abi_version: abi::PB_ABI_VERSION,
        kind: kind.as_ptr().cast(),
        version: version.as_ptr().cast(),
        create: Some(create::<C>),
        start: Some(start::<C>),
        send: Some(send::<C>),
        status: Some(status::<C>),
        stop: Some(stop::<C>),
        destroy: Some(destroy::<C>),
        secret_keys: match secret_keys {
            Some(list) => list.as_ptr().cast(),
            None => std::ptr::null(),
        },
    })
}

/// The entry function's body: refuses hosts that do not speak version 1.
#[doc(hidden)]
pub fn entry(
    host_abi_version: u32,
    desc: &'static StaticDescriptor,
) -> *const abi::pb_connector_v1 {
    if host_abi_version == abi::PB_ABI_VERSION {
        &desc.0
    } else {
        std::ptr::null()
    }
}

fn write(sink: *const pb_sink, bytes: &[u8]) {
    if sink.is_null() {
        return;
    }
    // SAFETY: a non-null sink is valid for the call (header, section 2).
    let sink = unsafe { &*sink };
    if let Some(w) = sink.write {
        // SAFETY: the host's write callback with its own ctx; bytes valid for the call.
        unsafe { w(sink.ctx, bytes.as_ptr(), bytes.len()) };
    }
}

fn write_reply(sink: *const pb_sink, reply: &Reply) {
    if let Ok(bytes) = serde_json::to_vec(reply) {
        write(sink, &bytes);
    }
}

fn write_error(sink: *const pb_sink, code: &str, message: impl Into<String>, retryable: bool) {
    let body = ErrorBody {
        code: code.into(),
        message: message.into(),
        retryable,
    };
    write_reply(sink, &Reply::Error(body));
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("connector panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("connector panicked: {s}")
    } else {
        "connector panicked".to_owned()
    }
}

/// Leaks a caught panic's payload: its `Drop` runs plugin code outside `catch_unwind`,
/// and a panic there would unwind into the host (undefined behaviour) or abort it.
fn forget_panic(payload: Box<dyn Any + Send>) {
    std::mem::forget(payload);
}

fn bytes<'a>(ptr: *const u8, len: usize) -> Option<&'a [u8]> {
    if len == 0 {
        Some(&[])
    } else if ptr.is_null() {
        None
    } else {
        // SAFETY: the host passes `len` readable bytes, borrowed for the call.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }
}

/// Runs `f` on the instance's connector: checks poisoning and concurrent calls, and
/// turns a panic into `PB_PANICKED` (poisoning the instance).
fn with_instance<C: Connector>(
    inst: *mut pb_instance,
    sink: *const pb_sink,
    f: impl FnOnce(&mut C, *const pb_sink) -> i32,
) -> i32 {
    if inst.is_null() {
        write_error(sink, "invalid_argument", "instance pointer is NULL", false);
        return abi::PB_ERROR;
    }
    // SAFETY: non-null instances come from our create and live until destroy.
    let inst = unsafe { &*(inst as *const Instance<C>) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        if inst.poisoned.load(Ordering::Acquire) {
            write_error(sink, "poisoned", "instance panicked earlier", false);
            return abi::PB_PANICKED;
        }
        let mut guard = match inst.conn.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => {
                write_error(
                    sink,
                    "busy",
                    "another call on this instance is running",
                    true,
                );
                return abi::PB_BUSY;
            }
            Err(TryLockError::Poisoned(_)) => {
                write_error(sink, "poisoned", "instance panicked earlier", false);
                return abi::PB_PANICKED;
            }
        };
        match guard.as_mut() {
            Some(conn) => f(conn, sink),
            None => {
                write_error(sink, "poisoned", "instance panicked earlier", false);
                abi::PB_PANICKED
            }
        }
    }));
    match result {
        Ok(status) => status,
        Err(payload) => {
            inst.poisoned.store(true, Ordering::Release);
            let msg = panic_message(payload.as_ref());
            forget_panic(payload);
            inst.host.log(Level::Error, &msg);
            write_error(sink, "panicked", msg, false);
            abi::PB_PANICKED
        }
    }
}

fn report(sink: *const pb_sink, r: Result<(), ConnectorError>) -> i32 {
    match r {
        Ok(()) => abi::PB_OK,
        Err(e) => {
            write_reply(sink, &Reply::Error(e.body()));
            abi::PB_ERROR
        }
    }
}

unsafe extern "C" fn create<C: Connector>(
    host: *const pb_host,
    config_json: *const u8,
    config_len: usize,
    out: *mut *mut pb_instance,
    err: *const pb_sink,
) -> i32 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        if host.is_null() || out.is_null() {
            write_error(
                err,
                "invalid_argument",
                "host or out pointer is NULL",
                false,
            );
            return abi::PB_ERROR;
        }
        // SAFETY: non-null host stays valid until destroy; every revision starts with
        // the two u32s.
        let (struct_size, abi_version) = unsafe {
            let head = host.cast::<u32>();
            (head.read_unaligned(), head.add(1).read_unaligned())
        };
        if abi_version != abi::PB_ABI_VERSION || (struct_size as usize) < abi::PB_HOST_V1_MIN_SIZE {
            write_error(
                err,
                "unsupported_host",
                "host callbacks are not ABI version 1",
                false,
            );
            return abi::PB_UNSUPPORTED;
        }
        // Copy no more than the host declared: a revision-1.0 host's struct ends after
        // `log`, and the fields beyond it stay zero (NULL) here.
        let mut local = std::mem::MaybeUninit::<pb_host>::zeroed();
        let n = (struct_size as usize).min(std::mem::size_of::<pb_host>());
        // SAFETY: the host promises struct_size readable bytes; all-zero is a valid
        // pb_host (null ctx, no callbacks).
        let h = unsafe {
            std::ptr::copy_nonoverlapping(host.cast::<u8>(), local.as_mut_ptr().cast::<u8>(), n);
            local.assume_init()
        };
        let Some(emit) = h.emit else {
            write_error(err, "invalid_argument", "host emit callback is NULL", false);
            return abi::PB_ERROR;
        };
        let Some(config) = bytes(config_json, config_len) else {
            write_error(err, "invalid_argument", "config pointer is NULL", false);
            return abi::PB_ERROR;
        };
        let config: serde_json::Value = match serde_json::from_slice(config) {
            Ok(v) => v,
            Err(e) => {
                write_error(
                    err,
                    "invalid_config",
                    format!("config is not JSON: {e}"),
                    false,
                );
                return abi::PB_ERROR;
            }
        };
        let host = Host::new(RawHost {
            ctx: h.ctx,
            emit,
            log: h.log,
            flush: h.flush,
        });
        match C::create(config, host.clone()) {
            Ok(conn) => {
                let inst = Box::new(Instance {
                    conn: Mutex::new(Some(conn)),
                    poisoned: AtomicBool::new(false),
                    host,
                });
                // SAFETY: out is non-null and writable (header).
                unsafe { *out = Box::into_raw(inst).cast() };
                abi::PB_OK
            }
            Err(e) => {
                host.close();
                write_reply(err, &Reply::Error(e.body()));
                abi::PB_ERROR
            }
        }
    }));
    result.unwrap_or_else(|payload| {
        let msg = panic_message(payload.as_ref());
        forget_panic(payload);
        write_error(err, "panicked", msg, false);
        abi::PB_PANICKED
    })
}

unsafe extern "C" fn start<C: Connector>(inst: *mut pb_instance, err: *const pb_sink) -> i32 {
    with_instance::<C>(inst, err, |c, err| report(err, c.start()))
}

unsafe extern "C" fn send<C: Connector>(
    inst: *mut pb_instance,
    msg_json: *const u8,
    msg_len: usize,
    out: *const pb_sink,
) -> i32 {
    with_instance::<C>(inst, out, |c, out| {
        let Some(raw) = bytes(msg_json, msg_len) else {
            write_error(out, "invalid_argument", "message pointer is NULL", false);
            return abi::PB_ERROR;
        };
        let msg = match serde_json::from_slice::<Request>(raw) {
            Ok(Request::Send(m)) => m,
            Err(e) => {
                write_error(
                    out,
                    "invalid_message",
                    format!("bad send payload: {e}"),
                    false,
                );
                return abi::PB_ERROR;
            }
        };
        match c.send(msg) {
            Ok(sent) => {
                write_reply(out, &Reply::Sent(sent));
                abi::PB_OK
            }
            Err(e) => {
                write_reply(out, &Reply::Error(e.body()));
                abi::PB_ERROR
            }
        }
    })
}

unsafe extern "C" fn status<C: Connector>(inst: *mut pb_instance, out: *const pb_sink) -> i32 {
    with_instance::<C>(inst, out, |c, out| {
        write_reply(out, &Reply::Status(c.status()));
        abi::PB_OK
    })
}

unsafe extern "C" fn stop<C: Connector>(inst: *mut pb_instance, err: *const pb_sink) -> i32 {
    with_instance::<C>(inst, err, |c, err| report(err, c.stop()))
}

unsafe extern "C" fn destroy<C: Connector>(inst: *mut pb_instance) {
    if inst.is_null() {
        return;
    }
    // SAFETY: created by Box::into_raw in create; the host calls destroy exactly once.
    let inst = unsafe { Box::from_raw(inst as *mut Instance<C>) };
    // First cut the host off, so threads that outlive the connector cannot call into a
    // host ctx that is about to be freed.
    inst.host.close();
    let dropped = catch_unwind(AssertUnwindSafe(move || drop(inst)));
    if let Err(payload) = dropped {
        forget_panic(payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert!(valid_kind("loopback"));
        assert!(valid_kind("tg_2"));
        assert!(!valid_kind(""));
        assert!(!valid_kind("Loopback"));
        assert!(!valid_kind("a-b"));
        assert!(!valid_kind(&"a".repeat(65)));
    }

    /// Keeps its host so the test can call it.
    struct Keeper(Host);

    impl Connector for Keeper {
        fn create(_: serde_json::Value, host: Host) -> Result<Self, ConnectorError> {
            Ok(Keeper(host))
        }
        fn start(&mut self) -> Result<(), ConnectorError> {
            Ok(())
        }
        fn send(&mut self, _: Outbound) -> Result<Sent, ConnectorError> {
            Err(ConnectorError::new("unsupported", "no"))
        }
        fn status(&self) -> Status {
            Status::new(crate::events::ChannelState::Connected)
        }
        fn stop(&mut self) -> Result<(), ConnectorError> {
            Ok(())
        }
    }

    unsafe extern "C" fn ok_emit(_: *mut c_void, _: *const u8, _: usize) -> i32 {
        abi::PB_OK
    }

    unsafe extern "C" fn slow_flush(_: *mut c_void, timeout_ms: u32) -> i32 {
        if timeout_ms == 0 {
            abi::PB_BUSY
        } else {
            abi::PB_OK
        }
    }

    /// Creates a `Keeper` through the C entry point; returns the instance and its host.
    fn create_keeper(host: &pb_host) -> Result<(*mut pb_instance, Host), i32> {
        let mut out: *mut pb_instance = std::ptr::null_mut();
        // SAFETY: a valid host struct and config, as the header describes.
        let status =
            unsafe { create::<Keeper>(host, b"{}".as_ptr(), 2, &mut out, std::ptr::null()) };
        if status != abi::PB_OK {
            assert!(out.is_null());
            return Err(status);
        }
        // SAFETY: created just above by create::<Keeper>, not yet destroyed.
        let inst = unsafe { &*(out as *const Instance<Keeper>) };
        let h = inst.conn.lock().unwrap().as_ref().unwrap().0.clone();
        Ok((out, h))
    }

    #[test]
    fn flush_maps_statuses_and_old_hosts() {
        let mut host = pb_host {
            struct_size: std::mem::size_of::<pb_host>() as u32,
            abi_version: abi::PB_ABI_VERSION,
            ctx: std::ptr::null_mut(),
            emit: Some(ok_emit),
            log: None,
            flush: Some(slow_flush),
        };
        let (inst, h) = create_keeper(&host).unwrap();
        assert_eq!(h.flush(Duration::from_millis(5)), Ok(()));
        assert_eq!(h.flush(Duration::ZERO), Err(FlushError::Timeout));
        // SAFETY: destroy exactly once.
        unsafe { destroy::<Keeper>(inst) };
        assert_eq!(h.flush(Duration::from_millis(5)), Err(FlushError::Closed));

        // A revision-1.0 host: struct_size ends after `log`; whatever lies beyond (here
        // a flush pointer) must not be read.
        host.struct_size = abi::PB_HOST_V1_MIN_SIZE as u32;
        let (inst, h) = create_keeper(&host).unwrap();
        assert_eq!(
            h.flush(Duration::from_millis(5)),
            Err(FlushError::Unsupported)
        );
        assert_eq!(h.emit_raw(b"{}"), Ok(()));
        // SAFETY: destroy exactly once.
        unsafe { destroy::<Keeper>(inst) };

        // Smaller than revision 1.0: refused.
        host.struct_size -= 1;
        assert_eq!(create_keeper(&host).unwrap_err(), abi::PB_UNSUPPORTED);
    }

    /// A panic payload whose own `Drop` panics.
    struct DropBomb;

    impl Drop for DropBomb {
        fn drop(&mut self) {
            panic!("the payload's drop panicked");
        }
    }

    /// Panics with a `DropBomb` in create (config `{"in": "create"}`) or start.
    struct Bomber;

    impl Connector for Bomber {
        fn create(config: serde_json::Value, _: Host) -> Result<Self, ConnectorError> {
            if config["in"] == "create" {
                std::panic::panic_any(DropBomb);
            }
            Ok(Bomber)
        }
        fn start(&mut self) -> Result<(), ConnectorError> {
            std::panic::panic_any(DropBomb)
        }
        fn send(&mut self, _: Outbound) -> Result<Sent, ConnectorError> {
            Err(ConnectorError::new("unsupported", "no"))
        }
        fn status(&self) -> Status {
            Status::new(crate::events::ChannelState::Connected)
        }
        fn stop(&mut self) -> Result<(), ConnectorError> {
            Ok(())
        }
    }

    #[test]
    fn a_panic_payload_that_panics_on_drop_is_leaked() {
        // Were the payload dropped outside catch_unwind, its panic would leave an
        // extern "C" function and abort this test binary.
        let host = pb_host {
            struct_size: std::mem::size_of::<pb_host>() as u32,
            abi_version: abi::PB_ABI_VERSION,
            ctx: std::ptr::null_mut(),
            emit: Some(ok_emit),
            log: None,
            flush: None,
        };
        let mut out: *mut pb_instance = std::ptr::null_mut();
        let config = br#"{"in":"create"}"#;
        // SAFETY: a valid host struct and config, as the header describes.
        let status = unsafe {
            create::<Bomber>(
                &host,
                config.as_ptr(),
                config.len(),
                &mut out,
                std::ptr::null(),
            )
        };
        assert_eq!(status, abi::PB_PANICKED);
        assert!(out.is_null());

        // SAFETY: as above.
        let status =
            unsafe { create::<Bomber>(&host, b"{}".as_ptr(), 2, &mut out, std::ptr::null()) };
        assert_eq!(status, abi::PB_OK);
        // SAFETY: a live instance from create; destroy exactly once.
        unsafe {
            assert_eq!(start::<Bomber>(out, std::ptr::null()), abi::PB_PANICKED);
            destroy::<Bomber>(out);
        }
    }

    #[test]
    fn detached_host_refuses() {
        let h = Host::detached();
        let ev = Event::Status(Status::new(crate::events::ChannelState::Connecting));
        assert_eq!(h.emit(&ev), Err(EmitError::Closed));
        assert_eq!(h.flush(Duration::from_secs(1)), Err(FlushError::Closed));
        h.log(Level::Info, "dropped");
    }
}
