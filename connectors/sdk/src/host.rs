//! The host side (feature `host`): checking plugin files, loading libraries, and running
//! instances behind a safe, blocking API. All `unsafe` of the host lives here.
//!
//! - `check_file` is the file-safety gate: it checks the file and its folders and holds
//!   the file open; `load_checked` loads that open file, so the file checked is the
//!   file loaded (`load` loads a path unchecked, for tools and tests).
//! - Loading opens a library (never unloaded), calls its entry symbol and validates the
//!   descriptor, turning every way a plugin can be unfit into a `LoadError`.
//! - Secrets (header section 7): `Library::redact_config` shows a config without the
//!   values of the keys the plugin declared secret, and each `Instance` scrubs those
//!   values from the plugin's errors, statuses, event reasons and log lines.
//! - `Instance` is one channel's connector: `create`, then blocking `start`, `send`,
//!   `status`, `stop` (call them from a blocking thread, one at a time), and `Drop`
//!   destroys it. An instance counts as stopped only once the plugin's own `stop` ran:
//!   `stop` waits (bounded) for a call in progress, and `Drop` runs the plugin's `stop`
//!   if it never completed, or leaks the instance rather than destroy it under threads
//!   that may still call the host. Events the plugin emits arrive as `RawEvent`s on the `EventSink` the
//!   instance was created with; each instance may have at most `capacity` events in
//!   flight (emitted and not yet dropped by the host), beyond which emit returns BUSY.
//! - Durable acknowledgement (header section 6): the host marks each `RawEvent` with
//!   `RawEvent::settle` once it is recorded (or deliberately dropped); a plugin thread
//!   blocked in `flush` returns once every event it emitted before the call is settled.
//!   An event dropped without `settle` counts as lost: every later flush of its
//!   instance fails (`Instance::lost_events` tells the host to replace the instance).
//!
//! Every host callback catches panics; a plugin call that reports `PB_PANICKED` poisons
//! the instance, after which only `destroy` (in `Drop`) reaches the plugin.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ffi::c_void;
use std::fs;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::abi::{self, pb_connector_v1, pb_host, pb_instance, pb_sink};
use crate::events::{Event, EventError, Outbound, Reply, Request, Sent, Status, snippet};

/// Why a plugin file was not loaded. `Display` is the log line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {path}: cannot read it: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("plugin {path}: group- or world-writable (mode {mode:04o}); refusing to load it")]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "plugin {path}: owned by uid {uid}, not by root or the daemon's user; refusing to load it"
    )]
    Owner { path: PathBuf, uid: u32 },
    #[error(
        "plugin {path}: folder {folder} is group- or world-writable (mode {mode:04o}); refusing to load it"
    )]
    FolderWritable {
        path: PathBuf,
        folder: PathBuf,
        mode: u32,
    },
    #[error(
        "plugin {path}: folder {folder} is owned by uid {uid}, not by root or the daemon's user; refusing to load it"
    )]
    FolderOwner {
        path: PathBuf,
        folder: PathBuf,
        uid: u32,
    },
    #[error("plugin {path}: resolves to {resolved}, outside the plugin folder {dir}")]
    OutsideDir {
        path: PathBuf,
        resolved: PathBuf,
        dir: PathBuf,
    },
    #[error("plugin {path}: cannot load the library: {source}")]
    Open {
        path: PathBuf,
        source: libloading::Error,
    },
    #[error("plugin {path}: no entry symbol `{symbol}`; not a patchbay connector (ABI version 1)")]
    MissingSymbol { path: PathBuf, symbol: &'static str },
    #[error("plugin {path}: refused the host's ABI version {host_abi}")]
    Refused { path: PathBuf, host_abi: u32 },
    #[error("plugin {path}: ABI version {found}, but this host speaks version {expected}")]
    WrongAbiVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("plugin {path}: descriptor is {size} bytes, smaller than the {need} of ABI version 1")]
    StructTooSmall {
        path: PathBuf,
        size: u32,
        need: usize,
    },
    #[error("plugin {path}: bad kind {kind:?}: must be 1..=64 characters of [a-z0-9_]")]
    BadKind { path: PathBuf, kind: String },
    #[error("plugin {path}: bad version string: {problem}")]
    BadVersion { path: PathBuf, problem: String },
    #[error("plugin {path}: bad secret_keys list: {problem}")]
    BadSecretKeys { path: PathBuf, problem: String },
    #[error("plugin {path}: required function `{function}` is NULL")]
    MissingFunction {
        path: PathBuf,
        function: &'static str,
    },
}

/// A plugin file that passed `check_file`, held open: `load_checked` loads this very
/// file (through its descriptor), whatever happens to the path after the check.
#[derive(Debug)]
pub struct CheckedFile {
    path: PathBuf,
    fd: OwnedFd,
}

impl CheckedFile {
    /// The canonical path the file was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Refuses a plugin file the daemon must not load and opens the one it may, so that the
/// file checked is the file loaded (`load_checked`):
///
/// - `path` must resolve (symlinks followed, so a link inside the folder to a file
///   inside it is fine) to a file inside the canonical `plugin_dir`; that resolved path
///   is opened with `O_NOFOLLOW`, so a link swapped in after the resolution is refused;
/// - on the open descriptor (`fstat`): a regular file, not group- or world-writable,
///   owned by root or by one of `allowed_uids` (pass the daemon's own uid and nothing
///   else: whoever owns a plugin file decides what the daemon runs);
/// - every folder from the file's up to `/` (like sshd's StrictModes) is owned by root
///   or one of `allowed_uids` and is not group- or world-writable, except that a folder
///   above `plugin_dir` may be a root-owned sticky one such as `/tmp` (mode 1777: others
///   may add entries there but cannot rename or remove ours). `plugin_dir` and the
///   folders inside it get no such exception.
pub fn check_file(
    path: &Path,
    plugin_dir: &Path,
    allowed_uids: &[u32],
) -> Result<CheckedFile, LoadError> {
    use rustix::fs::{FileType, Mode, OFlags};
    let io = |source| LoadError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = fs::canonicalize(plugin_dir).map_err(|source| LoadError::Io {
        path: plugin_dir.to_owned(),
        source,
    })?;
    let resolved = fs::canonicalize(path).map_err(io)?;
    if !resolved.starts_with(&dir) || resolved == dir {
        return Err(LoadError::OutsideDir {
            path: path.to_owned(),
            resolved,
            dir,
        });
    }
    check_folders(path, &resolved, &dir, allowed_uids)?;
    // NONBLOCK: opening a FIFO must not hang the scan (fstat refuses it next).
    let fd = rustix::fs::open(
        resolved.as_path(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io(e.into()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(LoadError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(LoadError::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    let uid = st.st_uid;
    if uid != 0 && !allowed_uids.contains(&uid) {
        return Err(LoadError::Owner {
            path: path.to_owned(),
            uid,
        });
    }
    Ok(CheckedFile { path: resolved, fd })
}

/// The folder half of `check_file`: every ancestor of the canonical `resolved`.
fn check_folders(
    path: &Path,
    resolved: &Path,
    dir: &Path,
    allowed_uids: &[u32],
) -> Result<(), LoadError> {
    for folder in resolved.ancestors().skip(1) {
        // Canonical, so no ancestor is a symlink: metadata describes the folder itself.
        let meta = fs::symlink_metadata(folder).map_err(|source| LoadError::Io {
            path: folder.to_owned(),
            source,
        })?;
        let (mode, uid) = (meta.mode() & 0o7777, meta.uid());
        if uid != 0 && !allowed_uids.contains(&uid) {
            return Err(LoadError::FolderOwner {
                path: path.to_owned(),
                folder: folder.to_owned(),
                uid,
            });
        }
        let above_plugin_dir = !folder.starts_with(dir);
        let sticky_root = mode & 0o1000 != 0 && uid == 0;
        if mode & 0o022 != 0 && !(above_plugin_dir && sticky_root) {
            return Err(LoadError::FolderWritable {
                path: path.to_owned(),
                folder: folder.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}

/// The functions of a loaded descriptor, copied out of the plugin.
#[derive(Clone, Copy)]
struct VTable {
    create: abi::pb_create_fn,
    start: abi::pb_start_fn,
    send: Option<abi::pb_send_fn>,
    status: Option<abi::pb_status_fn>,
    stop: abi::pb_stop_fn,
    destroy: abi::pb_destroy_fn,
}

struct LibInner {
    path: PathBuf,
    kind: String,
    version: String,
    abi_version: u32,
    /// The config keys the plugin declared secret (header section 7).
    secret_keys: Vec<String>,
    vtable: VTable,
}

/// A loaded connector library. Cheap to clone; the library itself is never unloaded.
#[derive(Clone)]
pub struct Library {
    inner: Arc<LibInner>,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.inner.path)
            .field("kind", &self.inner.kind)
            .field("version", &self.inner.version)
            .finish()
    }
}

impl Library {
    /// The connector kind, e.g. `loopback` (`[a-z0-9_]+`).
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }

    /// The plugin's own version string.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The ABI version it was loaded with.
    pub fn abi_version(&self) -> u32 {
        self.inner.abi_version
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the connector implements `send` (receive-only connectors need not).
    pub fn supports_send(&self) -> bool {
        self.inner.vtable.send.is_some()
    }

    /// The top-level config keys whose values are credentials (header section 7);
    /// empty for a plugin that declares none (or predates revision 1.2).
    pub fn secret_keys(&self) -> &[String] {
        &self.inner.secret_keys
    }

    /// `config` as it may be shown: the values of this connector's secret keys
    /// replaced by `REDACTED`.
    pub fn redact_config(&self, config: &serde_json::Value) -> serde_json::Value {
        redact_config(config, Some(self.secret_keys()))
    }
}

/// What a secret value is shown as.
pub const REDACTED: &str = "***";

/// `config` with the values of `secret_keys` (top-level keys) replaced by `REDACTED`,
/// and scrubbed from the other values too (one pasted into another key); with `None`
/// (a kind that is not loaded, whose secrets nobody can tell) every top-level value is
/// replaced. Null values stay null: they hide nothing.
pub fn redact_config(
    config: &serde_json::Value,
    secret_keys: Option<&[String]>,
) -> serde_json::Value {
    let mut out = config.clone();
    if let Some(keys) = secret_keys {
        Redactor::new(keys, config).scrub_value(&mut out);
    }
    if let serde_json::Value::Object(map) = &mut out {
        for (key, value) in map.iter_mut() {
            let secret = secret_keys.is_none_or(|keys| keys.iter().any(|k| k == key));
            if secret && !value.is_null() {
                *value = serde_json::Value::String(REDACTED.into());
            }
        }
    }
    out
}

/// The secret values of one instance's config, to scrub from whatever text the plugin
/// hands the host (errors, statuses, event reasons, log lines) before it is stored or
/// logged. Values shorter than `MIN_SCRUBBED` are not hunted in text (they would
/// mangle it, and protect nothing); config views redact them all the same.
#[derive(Debug, Default)]
struct Redactor {
    /// Longest first, so a secret containing another is replaced whole.
    values: Vec<String>,
}

const MIN_SCRUBBED: usize = 4;

impl Redactor {
    fn new(secret_keys: &[String], config: &serde_json::Value) -> Redactor {
        fn leaves(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::String(s) => {
                    out.push(s.clone());
                    // As the plugin may have written it inside its own JSON output.
                    if let Ok(quoted) = serde_json::to_string(s) {
                        out.push(quoted[1..quoted.len() - 1].to_owned());
                    }
                }
                serde_json::Value::Number(n) => out.push(n.to_string()),
                serde_json::Value::Array(a) => a.iter().for_each(|v| leaves(v, out)),
                serde_json::Value::Object(o) => o.values().for_each(|v| leaves(v, out)),
                serde_json::Value::Bool(_) | serde_json::Value::Null => {}
            }
        }
        let mut values = Vec::new();
        for key in secret_keys {
            if let Some(v) = config.get(key) {
                leaves(v, &mut values);
            }
        }
        values.retain(|v| v.len() >= MIN_SCRUBBED);
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Redactor { values }
    }

    fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for secret in &self.values {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
            }
        }
        out
    }

    fn scrub_string(&self, s: &mut String) {
        if let Cow::Owned(clean) = self.scrub(s) {
            *s = clean;
        }
    }

    fn scrub_opt(&self, s: &mut Option<String>) {
        if let Some(s) = s {
            self.scrub_string(s);
        }
    }

    fn scrub_value(&self, v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => self.scrub_string(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| self.scrub_value(v)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|v| self.scrub_value(v)),
            _ => {}
        }
    }

    fn scrub_error(&self, mut e: PluginError) -> PluginError {
        self.scrub_string(&mut e.code);
        self.scrub_string(&mut e.message);
        e
    }

    fn scrub_status(&self, s: &mut Status) {
        self.scrub_opt(&mut s.number);
        self.scrub_opt(&mut s.display_name);
        self.scrub_opt(&mut s.reason);
        if let Some(d) = &mut s.details {
            self.scrub_value(d);
        }
    }

    /// The fields of an event that end up in the store or the log as text; an inbound
    /// message's own content is the client's and stays as it is.
    fn scrub_event(&self, event: &mut Event) {
        match event {
            Event::Status(s) => self.scrub_status(s),
            Event::Receipt(r) => self.scrub_opt(&mut r.reason),
            _ => {}
        }
    }

    fn scrub_event_error(&self, e: EventError) -> EventError {
        if self.values.is_empty() || matches!(self.scrub(&e.to_string()), Cow::Borrowed(_)) {
            return e;
        }
        match e {
            EventError::Json { source, snippet } => EventError::Json {
                source: serde::de::Error::custom(self.scrub(&source.to_string())),
                snippet: self.scrub(&snippet).into_owned(),
            },
            EventError::Invalid { kind, problem } => EventError::Invalid {
                kind,
                problem: self.scrub(&problem).into_owned(),
            },
            // Carries only a number.
            EventError::TooDeep(d) => EventError::TooDeep(d),
        }
    }
}

/// Reads a NUL-terminated string of at most `max` bytes; `None` when the NUL is missing
/// within `max + 1` bytes or the pointer is NULL.
///
/// SAFETY: `ptr` is NULL or points at a NUL-terminated string (the header's promise).
unsafe fn bounded_cstr(ptr: *const std::ffi::c_char, max: usize) -> Option<Vec<u8>> {
    if ptr.is_null() {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..=max {
        // SAFETY: stops at the first NUL, so never reads past the string.
        let b = unsafe { *ptr.cast::<u8>().add(i) };
        if b == 0 {
            return Some(out);
        }
        out.push(b);
    }
    None
}

/// Loads a connector library: opens it (running its initialisers: the file is trusted
/// code, so call `check_file` first), calls `patchbay_connector_v1(1)` and validates the
/// descriptor. The library is never unloaded, also when it is refused. Load each file
/// once per process.
///
/// Symbols are bound at load (`RTLD_NOW`): a library that needs a symbol nothing
/// provides is refused here, instead of crashing the daemon at its first call.
/// `RTLD_LOCAL` keeps one plugin's symbols from resolving another's.
///
/// This loads whatever `path` names when it is opened; the daemon uses `check_file` and
/// `load_checked` instead, which load the file that was checked.
pub fn load(path: &Path) -> Result<Library, LoadError> {
    load_from(path, path)
}

/// `load` for a file `check_file` passed: loads it through its open descriptor
/// (`/proc/self/fd/N`), so a file swapped in at the same path after the check is never
/// the one loaded. The library's `path` is the checked canonical path.
///
/// Once the library is open the descriptor stays open for the life of the process, as
/// the library stays loaded: the dynamic loader knows it by the name `/proc/self/fd/N`
/// and answers a later `dlopen` of the same name with it, so the number must never be
/// handed to another file.
pub fn load_checked(file: CheckedFile) -> Result<Library, LoadError> {
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.fd.as_raw_fd()));
    let loaded = load_from(&by_fd, &file.path);
    if !matches!(loaded, Err(LoadError::Open { .. })) {
        let _ = file.fd.into_raw_fd();
    }
    loaded
}

/// Opens `open` and names it `shown` in the library and every error.
fn load_from(open: &Path, shown: &Path) -> Result<Library, LoadError> {
    use libloading::os::unix::{Library as UnixLibrary, RTLD_LOCAL, RTLD_NOW};
    let path = shown;
    let p = || path.to_owned();
    // SAFETY: loading runs the library's initialisers; the plugin folder is trusted
    // (check_file), which is the premise of any plugin host.
    let lib = unsafe { UnixLibrary::open(Some(open), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|source| LoadError::Open { path: p(), source })?;
    // Never unloaded: code, statics and thread-locals of the plugin stay valid.
    let lib: &'static UnixLibrary = Box::leak(Box::new(lib));
    // SAFETY: the symbol's type is fixed by the header.
    let entry = unsafe { lib.get::<abi::pb_entry_v1_fn>(abi::ENTRY_SYMBOL_V1) }.map_err(|_| {
        LoadError::MissingSymbol {
            path: p(),
            symbol: "patchbay_connector_v1",
        }
    })?;
    // SAFETY: calling the entry as the header describes; it returns NULL or a static.
    let desc = unsafe { entry(abi::PB_ABI_VERSION) };
    if desc.is_null() {
        return Err(LoadError::Refused {
            path: p(),
            host_abi: abi::PB_ABI_VERSION,
        });
    }
    // SAFETY: every descriptor starts with these two u32s.
    let (struct_size, abi_version) = unsafe {
        let head = desc.cast::<u32>();
        (head.read_unaligned(), head.add(1).read_unaligned())
    };
    if abi_version != abi::PB_ABI_VERSION {
        return Err(LoadError::WrongAbiVersion {
            path: p(),
            found: abi_version,
            expected: abi::PB_ABI_VERSION,
        });
    }
    if (struct_size as usize) < abi::PB_CONNECTOR_V1_MIN_SIZE {
        return Err(LoadError::StructTooSmall {
            path: p(),
            size: struct_size,
            need: abi::PB_CONNECTOR_V1_MIN_SIZE,
        });
    }
    // Copy no more than the plugin declared (nor than we know): fields a newer host adds
    // stay zero, i.e. NULL, for an older plugin.
    let mut local = std::mem::MaybeUninit::<pb_connector_v1>::zeroed();
    let n = (struct_size as usize).min(std::mem::size_of::<pb_connector_v1>());
    // SAFETY: the plugin promises struct_size readable bytes; all-zero is a valid
    // pb_connector_v1 (null pointers, None functions).
    let d = unsafe {
        std::ptr::copy_nonoverlapping(desc.cast::<u8>(), local.as_mut_ptr().cast::<u8>(), n);
        local.assume_init()
    };
    // SAFETY: static NUL-terminated strings (header); reads are bounded.
    let kind = unsafe { bounded_cstr(d.kind, abi::PB_MAX_KIND_LEN) };
    let kind = match kind {
        Some(k) if crate::plugin::valid_kind(&String::from_utf8_lossy(&k)) => {
            String::from_utf8_lossy(&k).into_owned()
        }
        Some(k) => {
            return Err(LoadError::BadKind {
                path: p(),
                kind: snippet(&k),
            });
        }
        None => {
            return Err(LoadError::BadKind {
                path: p(),
                kind: "<NULL or too long>".into(),
            });
        }
    };
    // SAFETY: as for kind.
    let version = unsafe { bounded_cstr(d.version, abi::PB_MAX_VERSION_LEN) }.ok_or_else(|| {
        LoadError::BadVersion {
            path: p(),
            problem: format!("NULL or longer than {} bytes", abi::PB_MAX_VERSION_LEN),
        }
    })?;
    let version = String::from_utf8(version).map_err(|_| LoadError::BadVersion {
        path: p(),
        problem: "not UTF-8".into(),
    })?;
    let missing = |function| LoadError::MissingFunction {
        path: p(),
        function,
    };
    // Revision 1.2; zero (no secrets) for an older, shorter descriptor.
    // SAFETY: NULL or the header's static list; reads are bounded.
    let secret_keys = unsafe { read_secret_keys(d.secret_keys) }
        .map_err(|problem| LoadError::BadSecretKeys { path: p(), problem })?;
    let vtable = VTable {
        create: d.create.ok_or_else(|| missing("create"))?,
        start: d.start.ok_or_else(|| missing("start"))?,
        send: d.send,
        status: d.status,
        stop: d.stop.ok_or_else(|| missing("stop"))?,
        destroy: d.destroy.ok_or_else(|| missing("destroy"))?,
    };
    Ok(Library {
        inner: Arc::new(LibInner {
            path: p(),
            kind,
            version,
            abi_version,
            secret_keys,
            vtable,
        }),
    })
}

/// Reads the header's `secret_keys` list ("a\0b\0\0"); NULL is an empty list. Stops at
/// the first byte past the bounds, so a missing terminator is an error, not a runaway.
///
/// SAFETY: `ptr` is NULL or points at NUL-terminated names ended by an empty one.
unsafe fn read_secret_keys(ptr: *const std::ffi::c_char) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    if ptr.is_null() {
        return Ok(keys);
    }
    let mut name = Vec::new();
    let mut i = 0;
    loop {
        // SAFETY: every byte read is before or at the list's end (the checks below stop
        // before reading beyond a name or list that breaks the bounds).
        let b = unsafe { *ptr.cast::<u8>().add(i) };
        i += 1;
        if b != 0 {
            if keys.len() == abi::PB_MAX_SECRET_KEYS {
                return Err(format!("more than {} names", abi::PB_MAX_SECRET_KEYS));
            }
            if name.len() == abi::PB_MAX_SECRET_KEY_LEN {
                return Err(format!(
                    "a name longer than {} bytes",
                    abi::PB_MAX_SECRET_KEY_LEN
                ));
            }
            name.push(b);
            continue;
        }
        if name.is_empty() {
            return Ok(keys);
        }
        let key = String::from_utf8(std::mem::take(&mut name))
            .map_err(|e| format!("a name is not UTF-8: {}", snippet(e.as_bytes())))?;
        keys.push(key);
    }
}

/// An error from a plugin call: the plugin's own `{"type":"error",...}`, or one the host
/// made up (see `codes`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct PluginError {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

/// The codes the host itself uses in `PluginError`; plugins use their own besides.
pub mod codes {
    /// The call panicked; the instance is now poisoned.
    pub const PANICKED: &str = "panicked";
    /// The instance panicked earlier; the plugin was not called.
    pub const POISONED: &str = "poisoned";
    /// Another call on the instance is running (host or plugin side). Retryable.
    pub const BUSY: &str = "busy";
    /// The connector does not implement the function.
    pub const UNSUPPORTED: &str = "unsupported";
    /// The call needs another lifecycle state (e.g. send before start). Retryable.
    pub const NOT_RUNNING: &str = "not_running";
    /// The plugin wrote output the host cannot use (not JSON, wrong shape, too large).
    pub const BAD_OUTPUT: &str = "bad_output";
    /// The plugin returned a status code outside the ABI.
    pub const BAD_STATUS: &str = "bad_status";
    /// The plugin rejected the configuration (plugins use this code by convention).
    pub const INVALID_CONFIG: &str = "invalid_config";
}

impl PluginError {
    fn host(code: &str, message: impl Into<String>, retryable: bool) -> Self {
        PluginError {
            code: code.to_owned(),
            message: message.into(),
            retryable,
        }
    }

    /// Whether the plugin panicked now or before (its instance is poisoned).
    pub fn is_panic(&self) -> bool {
        self.code == codes::PANICKED || self.code == codes::POISONED
    }
}

/// Why an `EventSink` did not take an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkError {
    /// Full: the plugin gets `PB_BUSY` and retries.
    Full,
    /// The receiver is gone: the plugin gets `PB_ERROR`.
    Closed,
}

/// Where an instance's events go. Called from plugin threads: must not block. A refused
/// event is handed back, so the host can withdraw it without counting it as lost.
pub trait EventSink: Send + Sync + 'static {
    fn try_send(&self, event: RawEvent) -> Result<(), (SinkError, RawEvent)>;
}

impl EventSink for tokio::sync::mpsc::Sender<RawEvent> {
    fn try_send(&self, event: RawEvent) -> Result<(), (SinkError, RawEvent)> {
        use tokio::sync::mpsc::error::TrySendError;
        tokio::sync::mpsc::Sender::try_send(self, event).map_err(|e| match e {
            TrySendError::Full(ev) => (SinkError::Full, ev),
            TrySendError::Closed(ev) => (SinkError::Closed, ev),
        })
    }
}

impl EventSink for tokio::sync::mpsc::UnboundedSender<RawEvent> {
    fn try_send(&self, event: RawEvent) -> Result<(), (SinkError, RawEvent)> {
        self.send(event).map_err(|e| (SinkError::Closed, e.0))
    }
}

impl EventSink for std::sync::mpsc::SyncSender<RawEvent> {
    fn try_send(&self, event: RawEvent) -> Result<(), (SinkError, RawEvent)> {
        use std::sync::mpsc::TrySendError;
        std::sync::mpsc::SyncSender::try_send(self, event).map_err(|e| match e {
            TrySendError::Full(ev) => (SinkError::Full, ev),
            TrySendError::Disconnected(ev) => (SinkError::Closed, ev),
        })
    }
}

impl EventSink for std::sync::mpsc::Sender<RawEvent> {
    fn try_send(&self, event: RawEvent) -> Result<(), (SinkError, RawEvent)> {
        self.send(event).map_err(|e| (SinkError::Closed, e.0))
    }
}

/// Per-instance bookkeeping of emitted events until the host settles them: the in-flight
/// budget and what `flush` waits for. Shared with the `RawEvent`s, which may outlive the
/// instance.
struct Tracker {
    capacity: usize,
    ledger: Mutex<Ledger>,
    /// Notified whenever an event is settled or the instance stops taking flushes.
    changed: Condvar,
    /// Notified when something the host's supervisor must react to happens (an event
    /// lost, the instance poisoned): see `Instance::changes`.
    alarm: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Ledger {
    /// The sequence number the next emitted event gets.
    next_seq: u64,
    /// Events handed to the sink and not yet settled or dropped.
    outstanding: BTreeSet<u64>,
    /// Events dropped without being settled: the host could not record them.
    lost: u64,
    /// Set when `stop` begins (or the instance fails): flushes answer PB_ERROR.
    closing: bool,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // Only plain field updates happen under the lock; a poisoned one is consistent.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot and a sequence number, or `None` when the budget is used up.
    fn reserve(&self) -> Option<u64> {
        let mut l = self.lock();
        if l.outstanding.len() >= self.capacity {
            return None;
        }
        let seq = l.next_seq;
        l.next_seq += 1;
        l.outstanding.insert(seq);
        Some(seq)
    }

    fn finish(&self, seq: u64, lost: bool) {
        let mut l = self.lock();
        l.outstanding.remove(&seq);
        if lost {
            l.lost += 1;
        }
        drop(l);
        self.changed.notify_all();
        if lost {
            self.alarm.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closing = true;
        self.changed.notify_all();
    }
}

/// How a `RawEvent` leaves its instance's ledger when dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Dropped unhandled: lost.
    Pending,
    /// `settle` was called: recorded (or deliberately dropped).
    Settled,
    /// The sink refused it; the plugin got BUSY or ERROR and keeps it.
    Withdrawn,
}

/// One event as the plugin emitted it: unchecked bytes (use `parse`) tagged with the
/// instance. Holds one of the instance's in-flight slots until dropped. Call `settle`
/// once it is durably recorded, or handled, or dropped on purpose (malformed, stale);
/// dropping it without `settle` tells the plugin's `flush` that it was lost.
pub struct RawEvent {
    /// The tag given to `Instance::create` (the daemon's channel id).
    pub tag: i64,
    /// `Instance::id` of the emitting instance: tells a restarted channel's old
    /// instance from its new one.
    pub instance: u64,
    /// The bytes as emitted: not checked to be JSON, UTF-8 or an event.
    pub json: Vec<u8>,
    seq: u64,
    tracker: Arc<Tracker>,
    redactor: Arc<Redactor>,
    fate: Fate,
}

impl RawEvent {
    /// Parses and checks the event; the error says what is wrong, for a log line. The
    /// channel's secret values are scrubbed from the status and receipt texts and from
    /// the error (header section 7).
    pub fn parse(&self) -> Result<Event, EventError> {
        match Event::parse(&self.json) {
            Ok(mut event) => {
                self.redactor.scrub_event(&mut event);
                Ok(event)
            }
            Err(e) => Err(self.redactor.scrub_event_error(e)),
        }
    }

    /// Marks the event as durably recorded (or handled, or dropped on purpose) and frees
    /// its slot: flushes waiting for it may return.
    pub fn settle(mut self) {
        self.fate = Fate::Settled;
    }
}

impl Drop for RawEvent {
    fn drop(&mut self) {
        self.tracker.finish(self.seq, self.fate == Fate::Pending);
    }
}

impl std::fmt::Debug for RawEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawEvent")
            .field("tag", &self.tag)
            .field("instance", &self.instance)
            .field("json", &self.redactor.scrub(&snippet(&self.json)))
            .finish()
    }
}

/// Lifecycle state of an `Instance`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Created, not started.
    Created,
    /// `start` entered (and did not fail); emits are accepted.
    Running,
    /// `stop` returned, or `start` failed; emits are refused.
    Stopped,
    /// A call panicked; only `destroy` reaches the plugin now.
    Poisoned,
}

const CREATED: u8 = 0;
const RUNNING: u8 = 1;
const STOPPED: u8 = 2;
const POISONED: u8 = 3;

/// Counters of an instance's emits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmitStats {
    /// Events queued to the sink.
    pub accepted: u64,
    /// Emits answered `PB_BUSY` (queue or in-flight limit full).
    pub busy: u64,
    /// Emits refused with `PB_ERROR` (not running, too large, sink closed).
    pub refused: u64,
}

/// What the host callbacks' `ctx` points at.
struct Shared {
    tag: i64,
    id: u64,
    kind: String,
    redactor: Arc<Redactor>,
    state: AtomicU8,
    tracker: Arc<Tracker>,
    sink: Box<dyn EventSink>,
    accepted: AtomicU64,
    busy: AtomicU64,
    refused: AtomicU64,
}

impl Shared {
    fn new(
        tag: i64,
        kind: &str,
        redactor: Redactor,
        capacity: usize,
        sink: Box<dyn EventSink>,
    ) -> Shared {
        Shared {
            tag,
            id: NEXT_INSTANCE_ID.fetch_add(1, Ordering::Relaxed),
            kind: kind.to_owned(),
            redactor: Arc::new(redactor),
            state: AtomicU8::new(CREATED),
            tracker: Arc::new(Tracker {
                capacity: capacity.max(1),
                ledger: Mutex::new(Ledger::default()),
                changed: Condvar::new(),
                alarm: Arc::new(tokio::sync::Notify::new()),
            }),
            sink,
            accepted: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn emit(&self, json: &[u8]) -> i32 {
        if self.state.load(Ordering::Acquire) != RUNNING {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return abi::PB_ERROR;
        }
        if json.len() > abi::PB_MAX_PAYLOAD_BYTES {
            let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            // The plugin is told (PB_ERROR); operators see it too, at the 1st, 2nd,
            // 4th, 8th ... refusal, so a plugin that keeps trying cannot flood the log.
            if n.is_power_of_two() {
                tracing::warn!(
                    kind = %self.kind,
                    channel = self.tag,
                    bytes = json.len(),
                    refused = n,
                    "refused an event larger than {} bytes (the plugin was told)",
                    abi::PB_MAX_PAYLOAD_BYTES
                );
            }
            return abi::PB_ERROR;
        }
        let Some(seq) = self.tracker.reserve() else {
            self.busy.fetch_add(1, Ordering::Relaxed);
            return abi::PB_BUSY;
        };
        let event = RawEvent {
            tag: self.tag,
            instance: self.id,
            json: json.to_vec(),
            seq,
            tracker: self.tracker.clone(),
            redactor: self.redactor.clone(),
            fate: Fate::Pending,
        };
        match self.sink.try_send(event) {
            Ok(()) => {
                self.accepted.fetch_add(1, Ordering::Relaxed);
                abi::PB_OK
            }
            Err((refusal, mut event)) => {
                // Not taken, so not lost: the plugin was told and still holds it.
                event.fate = Fate::Withdrawn;
                drop(event);
                if refusal == SinkError::Full {
                    self.busy.fetch_add(1, Ordering::Relaxed);
                    abi::PB_BUSY
                } else {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    abi::PB_ERROR
                }
            }
        }
    }

    /// Waits until every event emitted before the call is settled (header section 6).
    fn flush(&self, timeout_ms: u32) -> i32 {
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        let tracker = &self.tracker;
        let mut l = tracker.lock();
        // Every event emitted (and taken) before this call has a lower number.
        let target = l.next_seq;
        loop {
            if l.closing || l.lost > 0 || self.state.load(Ordering::Acquire) != RUNNING {
                return abi::PB_ERROR;
            }
            if l.outstanding.first().is_none_or(|&oldest| oldest >= target) {
                return abi::PB_OK;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return abi::PB_BUSY;
            }
            l = tracker
                .changed
                .wait_timeout(l, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn log(&self, level: i32, msg: &[u8]) {
        const MAX: usize = 8 * 1024;
        let msg = String::from_utf8_lossy(&msg[..msg.len().min(MAX)]);
        let msg = self.redactor.scrub(msg.trim_end());
        let (kind, channel) = (self.kind.as_str(), self.tag);
        match level {
            abi::PB_LOG_ERROR => {
                tracing::error!(target: "patchbay::plugin", kind, channel, "{msg}")
            }
            abi::PB_LOG_WARN => tracing::warn!(target: "patchbay::plugin", kind, channel, "{msg}"),
            abi::PB_LOG_DEBUG => {
                tracing::debug!(target: "patchbay::plugin", kind, channel, "{msg}")
            }
            abi::PB_LOG_TRACE => {
                tracing::trace!(target: "patchbay::plugin", kind, channel, "{msg}")
            }
            _ => tracing::info!(target: "patchbay::plugin", kind, channel, "{msg}"),
        }
    }
}

unsafe extern "C" fn host_emit(ctx: *mut c_void, json: *const u8, len: usize) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        if ctx.is_null() || (json.is_null() && len > 0) {
            return abi::PB_ERROR;
        }
        // SAFETY: ctx is the Shared this host struct was made for, alive until destroy
        // returns; json is `len` readable bytes for the call.
        let shared = unsafe { &*(ctx as *const Shared) };
        let bytes = if len == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(json, len) }
        };
        shared.emit(bytes)
    }))
    .unwrap_or(abi::PB_ERROR)
}

unsafe extern "C" fn host_flush(ctx: *mut c_void, timeout_ms: u32) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        if ctx.is_null() {
            return abi::PB_ERROR;
        }
        // SAFETY: as in host_emit.
        let shared = unsafe { &*(ctx as *const Shared) };
        shared.flush(timeout_ms)
    }))
    .unwrap_or(abi::PB_ERROR)
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: i32, msg: *const u8, len: usize) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if ctx.is_null() || (msg.is_null() && len > 0) {
            return;
        }
        // SAFETY: as in host_emit.
        let shared = unsafe { &*(ctx as *const Shared) };
        let bytes = if len == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(msg, len) }
        };
        shared.log(level, bytes);
    }));
}

/// The buffer behind a `pb_sink` for one call.
#[derive(Default)]
struct Output {
    // A Mutex, not a RefCell: a misbehaving plugin might write from another thread.
    buf: Mutex<(Vec<u8>, bool)>,
}

unsafe extern "C" fn sink_write(ctx: *mut c_void, ptr: *const u8, len: usize) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if ctx.is_null() || ptr.is_null() || len == 0 {
            return;
        }
        // SAFETY: ctx is the Output of the running call; ptr is `len` readable bytes.
        let out = unsafe { &*(ctx as *const Output) };
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        let mut guard = out.buf.lock().unwrap_or_else(|p| p.into_inner());
        let (buf, overflow) = &mut *guard;
        if buf.len() + bytes.len() > abi::PB_MAX_PAYLOAD_BYTES {
            *overflow = true;
        } else {
            buf.extend_from_slice(bytes);
        }
    }));
}

/// Runs one plugin call with a fresh output sink; returns its status and output.
fn with_sink(f: impl FnOnce(*const pb_sink) -> i32) -> (i32, Result<Vec<u8>, PluginError>) {
    let out = Output::default();
    let sink = pb_sink {
        ctx: (&out as *const Output).cast_mut().cast(),
        write: Some(sink_write),
    };
    let status = f(&sink);
    let (buf, overflow) = out.buf.into_inner().unwrap_or_else(|p| p.into_inner());
    let output = if overflow {
        Err(PluginError::host(
            codes::BAD_OUTPUT,
            format!(
                "plugin output larger than {} bytes",
                abi::PB_MAX_PAYLOAD_BYTES
            ),
            false,
        ))
    } else {
        Ok(buf)
    };
    (status, output)
}

/// The error a non-OK status means, from the plugin's error JSON where it wrote one.
fn status_error(status: i32, output: Result<Vec<u8>, PluginError>) -> PluginError {
    let body = output
        .ok()
        .and_then(|b| match serde_json::from_slice::<Reply>(&b) {
            Ok(Reply::Error(e)) => Some(e),
            _ => None,
        });
    match status {
        abi::PB_ERROR => match body {
            Some(e) => PluginError {
                code: e.code,
                message: e.message,
                retryable: e.retryable,
            },
            None => PluginError::host(
                codes::BAD_OUTPUT,
                "plugin reported an error without a valid error object",
                false,
            ),
        },
        abi::PB_PANICKED => PluginError::host(
            codes::PANICKED,
            body.map(|e| e.message)
                .unwrap_or_else(|| "plugin panicked".into()),
            false,
        ),
        abi::PB_BUSY => PluginError::host(codes::BUSY, "plugin is busy with another call", true),
        abi::PB_UNSUPPORTED => PluginError::host(
            codes::UNSUPPORTED,
            body.map(|e| e.message)
                .unwrap_or_else(|| "not supported by this connector".into()),
            false,
        ),
        other => PluginError::host(
            codes::BAD_STATUS,
            format!("plugin returned status {other}"),
            false,
        ),
    }
}

static NEXT_INSTANCE_ID: AtomicU64 = AtomicU64::new(1);

/// How long `Instance::stop` waits for a call in progress on the instance (a slow send,
/// say) before giving up with a `busy` error.
pub const STOP_WAIT: Duration = Duration::from_secs(30);

/// How long `Drop` keeps asking a plugin whose `stop` answers `PB_BUSY` before it leaks
/// the instance instead of destroying it.
const DROP_STOP_WAIT: Duration = Duration::from_secs(5);

/// One plugin call at a time per instance. A flag and a condvar rather than a
/// `Mutex<()>`, because `stop` has to wait for a call in progress with a bound, which a
/// std mutex cannot do.
#[derive(Default)]
struct CallLock {
    busy: Mutex<bool>,
    released: Condvar,
}

struct CallGuard<'a>(&'a CallLock);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        *self.0.lock() = false;
        self.0.released.notify_one();
    }
}

impl CallLock {
    fn lock(&self) -> MutexGuard<'_, bool> {
        // Only the flag is written under the lock; a poisoned one is consistent.
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_acquire(&self) -> Option<CallGuard<'_>> {
        let mut busy = self.lock();
        if *busy {
            return None;
        }
        *busy = true;
        Some(CallGuard(self))
    }

    /// Waits up to `wait` for the call in progress to return.
    fn acquire_within(&self, wait: Duration) -> Option<CallGuard<'_>> {
        let deadline = Instant::now() + wait;
        let mut busy = self.lock();
        while *busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            busy = self
                .released
                .wait_timeout(busy, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *busy = true;
        Some(CallGuard(self))
    }
}

/// One running connector instance (one channel). Blocking calls: run them off the async
/// runtime (`spawn_blocking`), one at a time; a second concurrent `start`, `send` or
/// `status` gets a `busy` error instead of waiting, while `stop` waits for the call in
/// progress (up to `STOP_WAIT`). `Drop` stops a running instance and destroys it, so
/// drop it on a blocking thread too.
pub struct Instance {
    lib: Library,
    raw: *mut pb_instance,
    shared: Arc<Shared>,
    // Boxed so its address is stable: the plugin may keep the pointer. Taken (and
    // leaked) by `Drop` when the plugin never stopped.
    host: Option<Box<pb_host>>,
    calls: CallLock,
}

// SAFETY: the header requires instances to be callable from any host thread; `calls`
// keeps calls one at a time; the callbacks' ctx (Shared) is Sync.
unsafe impl Send for Instance {}
unsafe impl Sync for Instance {}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("kind", &self.lib.kind())
            .field("tag", &self.shared.tag)
            .field("id", &self.shared.id)
            .field("state", &self.state())
            .finish()
    }
}

impl Instance {
    /// Creates an instance of `lib` with the channel's `config` object. Its events go to
    /// `events` tagged with `tag`; at most `capacity` (at least 1) of them may be in
    /// flight before emit answers BUSY.
    pub fn create(
        lib: &Library,
        tag: i64,
        config: &serde_json::Value,
        events: impl EventSink,
        capacity: usize,
    ) -> Result<Instance, PluginError> {
        let json = serde_json::to_vec(config)
            .map_err(|e| PluginError::host(codes::INVALID_CONFIG, e.to_string(), false))?;
        let redactor = Redactor::new(lib.secret_keys(), config);
        let shared = Arc::new(Shared::new(
            tag,
            lib.kind(),
            redactor,
            capacity,
            Box::new(events),
        ));
        let host = Box::new(pb_host {
            struct_size: std::mem::size_of::<pb_host>() as u32,
            abi_version: abi::PB_ABI_VERSION,
            ctx: Arc::as_ptr(&shared).cast_mut().cast(),
            emit: Some(host_emit),
            log: Some(host_log),
            flush: Some(host_flush),
        });
        let mut raw: *mut pb_instance = std::ptr::null_mut();
        let (status, output) = with_sink(|err| {
            // SAFETY: the header's create; host and config outlive the call (and host
            // outlives the instance, owned by the Instance below).
            unsafe { (lib.inner.vtable.create)(&*host, json.as_ptr(), json.len(), &mut raw, err) }
        });
        if status != abi::PB_OK {
            return Err(shared.redactor.scrub_error(status_error(status, output)));
        }
        if raw.is_null() {
            return Err(PluginError::host(
                codes::BAD_OUTPUT,
                "create returned OK but no instance",
                false,
            ));
        }
        Ok(Instance {
            lib: lib.clone(),
            raw,
            shared,
            host: Some(host),
            calls: CallLock::default(),
        })
    }

    /// The library this instance runs.
    pub fn library(&self) -> &Library {
        &self.lib
    }

    /// Unique per process: `RawEvent::instance` of this instance's events.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The tag given at create.
    pub fn tag(&self) -> i64 {
        self.shared.tag
    }

    pub fn state(&self) -> InstanceState {
        match self.shared.state.load(Ordering::Acquire) {
            CREATED => InstanceState::Created,
            RUNNING => InstanceState::Running,
            STOPPED => InstanceState::Stopped,
            _ => InstanceState::Poisoned,
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.state() == InstanceState::Poisoned
    }

    /// Events of this instance the host dropped without settling them. Once it is not
    /// zero every flush of the instance fails, so the plugin acknowledges nothing more:
    /// replace the instance (its successor gets the unacknowledged messages again).
    pub fn lost_events(&self) -> u64 {
        self.shared.tracker.lock().lost
    }

    /// Notified (one stored permit, so none is missed) when the instance loses an
    /// event or is poisoned: a supervisor can wait on it instead of polling
    /// `lost_events` and `state`.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.shared.tracker.alarm.clone()
    }

    pub fn emit_stats(&self) -> EmitStats {
        EmitStats {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            busy: self.shared.busy.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }

    /// Runs one plugin call under the call lock, or answers `busy` if another call is
    /// running; poisons on PANICKED.
    fn call(
        &self,
        f: impl FnOnce(&VTable, *mut pb_instance, *const pb_sink) -> i32,
    ) -> Result<Vec<u8>, PluginError> {
        let Some(_guard) = self.calls.try_acquire() else {
            return Err(PluginError::host(
                codes::BUSY,
                "another call on this instance is in progress",
                true,
            ));
        };
        self.call_held(f)
    }

    /// Runs one plugin call; the caller holds the call lock (or owns the instance).
    fn call_held(
        &self,
        f: impl FnOnce(&VTable, *mut pb_instance, *const pb_sink) -> i32,
    ) -> Result<Vec<u8>, PluginError> {
        if self.is_poisoned() {
            return Err(PluginError::host(
                codes::POISONED,
                "connector panicked earlier",
                false,
            ));
        }
        let (status, output) = with_sink(|sink| f(&self.lib.inner.vtable, self.raw, sink));
        let scrub = |e| self.shared.redactor.scrub_error(e);
        match status {
            abi::PB_OK => output.map_err(scrub),
            abi::PB_PANICKED => {
                self.shared.state.store(POISONED, Ordering::Release);
                self.shared.tracker.close();
                self.shared.tracker.alarm.notify_one();
                Err(scrub(status_error(status, output)))
            }
            _ => Err(scrub(status_error(status, output))),
        }
    }

    /// Starts the connector. Only from `Created`; emits are accepted from now on.
    pub fn start(&self) -> Result<(), PluginError> {
        if self
            .shared
            .state
            .compare_exchange(CREATED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(self.wrong_state("start"));
        }
        // SAFETY: the header's start on our live instance.
        let r = self.call(|vt, inst, err| unsafe { (vt.start)(inst, err) });
        if r.is_err() {
            // A failed start leaves nothing running: refuse its later emits.
            self.shared.tracker.close();
            let _ = self.shared.state.compare_exchange(
                RUNNING,
                STOPPED,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        r.map(drop)
    }

    /// Sends one message; only while running. The result must be `{"type":"sent"}` with
    /// a non-empty `external_message_id`; anything else is a `bad_output` error.
    pub fn send(&self, msg: &Outbound) -> Result<Sent, PluginError> {
        if self.shared.state.load(Ordering::Acquire) != RUNNING {
            return Err(self.wrong_state("send"));
        }
        let Some(send) = self.lib.inner.vtable.send else {
            return Err(PluginError::host(
                codes::UNSUPPORTED,
                "connector cannot send",
                false,
            ));
        };
        let request = serde_json::to_vec(&Request::Send(msg.clone()))
            .map_err(|e| PluginError::host(codes::BAD_OUTPUT, e.to_string(), false))?;
        // SAFETY: the header's send; request outlives the call.
        let out =
            self.call(|_, inst, out| unsafe { send(inst, request.as_ptr(), request.len(), out) })?;
        match serde_json::from_slice::<Reply>(&out) {
            Ok(Reply::Sent(s)) if !s.external_message_id.is_empty() => Ok(s),
            _ => Err(self.shared.redactor.scrub_error(PluginError::host(
                codes::BAD_OUTPUT,
                format!(
                    "send result is not {{\"type\":\"sent\",\"external_message_id\":\"...\"}}: {}",
                    snippet(&out)
                ),
                false,
            ))),
        }
    }

    /// The connector's own view of its state. A result that is not a valid status
    /// (wrong shape, over-long strings) is a `bad_output` error.
    pub fn status(&self) -> Result<Status, PluginError> {
        let Some(status) = self.lib.inner.vtable.status else {
            return Err(PluginError::host(
                codes::UNSUPPORTED,
                "connector has no status",
                false,
            ));
        };
        // SAFETY: the header's status on our live instance.
        let out = self.call(|_, inst, out| unsafe { status(inst, out) })?;
        let redactor = &self.shared.redactor;
        let bad =
            |why: String| redactor.scrub_error(PluginError::host(codes::BAD_OUTPUT, why, false));
        match serde_json::from_slice::<Reply>(&out) {
            Ok(Reply::Status(mut s)) => match s.check() {
                Ok(()) => {
                    redactor.scrub_status(&mut s);
                    Ok(s)
                }
                Err(problem) => Err(bad(format!("status result: {problem}"))),
            },
            _ => Err(bad(format!(
                "status result is not {{\"type\":\"status\",...}}: {}",
                snippet(&out)
            ))),
        }
    }

    /// Stops the connector (joining its threads); emits are refused once it returns.
    /// A no-op before start or after a previous stop. Waits up to `STOP_WAIT` for a call
    /// in progress; see `stop_within`.
    pub fn stop(&self) -> Result<(), PluginError> {
        self.stop_within(STOP_WAIT)
    }

    /// `stop`, waiting at most `wait` for a call in progress. The instance becomes
    /// `Stopped` only once the plugin's `stop` ran: if the wait runs out, or the plugin
    /// answers `PB_BUSY`, the error is `busy` and the instance stays `Running` (its
    /// threads may still emit), so call `stop` again or leave it to `Drop`.
    pub fn stop_within(&self, wait: Duration) -> Result<(), PluginError> {
        match self.shared.state.load(Ordering::Acquire) {
            RUNNING => {}
            CREATED | STOPPED => {
                let _ = self.shared.state.compare_exchange(
                    CREATED,
                    STOPPED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return Ok(());
            }
            _ => return Err(self.wrong_state("stop")),
        }
        // Wake plugin threads blocked in flush before stop joins them; a call in
        // progress may be one of those waiting for a flush.
        self.shared.tracker.close();
        let Some(_guard) = self.calls.acquire_within(wait) else {
            return Err(PluginError::host(
                codes::BUSY,
                format!("another call on this instance did not return within {wait:?}"),
                true,
            ));
        };
        // The call we waited for may have been a stop, or a start that failed.
        match self.shared.state.load(Ordering::Acquire) {
            RUNNING => self.stop_held(),
            POISONED => Err(self.wrong_state("stop")),
            _ => Ok(()),
        }
    }

    /// Calls the plugin's `stop`; the caller holds the call lock (or owns the instance).
    fn stop_held(&self) -> Result<(), PluginError> {
        // SAFETY: the header's stop on our live instance.
        let r = self.call_held(|vt, inst, err| unsafe { (vt.stop)(inst, err) });
        match &r {
            // PB_BUSY: the plugin did not stop, its threads may still emit.
            Err(e) if e.code == codes::BUSY => {}
            // Any other return, even an error, ends the emit window (header section 5);
            // a panicked stop stays poisoned.
            _ => {
                let _ = self.shared.state.compare_exchange(
                    RUNNING,
                    STOPPED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        r.map(drop)
    }

    fn wrong_state(&self, call: &str) -> PluginError {
        match self.state() {
            InstanceState::Poisoned => {
                PluginError::host(codes::POISONED, "connector panicked earlier", false)
            }
            state => PluginError::host(
                codes::NOT_RUNNING,
                format!("cannot {call}: instance is {state:?}"),
                true,
            ),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.shared.tracker.close();
        // A stop that never completed (it found the instance busy, the plugin answered
        // PB_BUSY, or nobody called it): destroying now would free the host struct under
        // plugin threads that may still emit. Nothing else can call in here (we own the
        // instance), so a PB_BUSY is the plugin's own; ask again for a while.
        let deadline = Instant::now() + DROP_STOP_WAIT;
        let mut pause = Duration::from_millis(10);
        while self.state() == InstanceState::Running {
            match self.stop_held() {
                Err(e) if e.code == codes::BUSY && Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                _ => break,
            }
        }
        if self.state() == InstanceState::Running {
            tracing::error!(
                kind = self.lib.kind(),
                channel = self.shared.tag,
                "connector did not stop; leaking its instance instead of destroying it \
                 under threads that may still use it"
            );
            // Emits are refused from now on; the host struct and its ctx stay valid for
            // whatever the plugin still does, and the plugin is never called again.
            self.shared.state.store(STOPPED, Ordering::Release);
            std::mem::forget(self.shared.clone());
            if let Some(host) = self.host.take() {
                Box::leak(host);
            }
            return;
        }
        if !self.is_poisoned() {
            self.shared.state.store(STOPPED, Ordering::Release);
        }
        // SAFETY: destroy exactly once, last; the host struct and ctx stay alive until
        // it returns (fields drop after this body).
        unsafe { (self.lib.inner.vtable.destroy)(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_cross_threads() {
        // The daemon moves instances into spawn_blocking and events across tasks.
        send_sync::<Instance>();
        send_sync::<Library>();
        send_sync::<RawEvent>();
        send_sync::<LoadError>();
        send_sync::<PluginError>();
    }

    fn running(capacity: usize, sink: impl EventSink) -> Shared {
        let shared = Shared::new(5, "t", Redactor::default(), capacity, Box::new(sink));
        shared.state.store(RUNNING, Ordering::Release);
        shared
    }

    #[test]
    fn redaction_of_views_and_text() {
        let keys = ["token".to_owned(), "nested".to_owned(), "short".to_owned()];
        let config = serde_json::json!({
            "token": "12:abc\"def", "nested": {"k": ["inner-secret", 123456]},
            "short": "abc", "public": "token-free", "none": null, "pasted": "x inner-secret",
        });
        assert_eq!(
            redact_config(&config, Some(&keys)),
            serde_json::json!({"token": "***", "nested": "***", "short": "***",
                               "public": "token-free", "none": null, "pasted": "x ***"})
        );
        assert_eq!(
            redact_config(&config, None),
            serde_json::json!({"token": "***", "nested": "***", "short": "***",
                               "public": "***", "none": null, "pasted": "***"})
        );
        let r = Redactor::new(&keys, &config);
        // Raw and JSON-escaped forms, nested leaves, numbers; a 3-byte value is left.
        assert_eq!(
            r.scrub(r#"got 12:abc"def and 12:abc\"def, inner-secret, 123456, abc"#),
            "got *** and ***, ***, ***, abc"
        );
        assert!(matches!(r.scrub("nothing here"), Cow::Borrowed(_)));
        let mut e = PluginError::host("x", "bad token 12:abc\"def", false);
        e = r.scrub_error(e);
        assert_eq!(e.message, "bad token ***");
    }

    #[test]
    fn permits_bound_in_flight_events() {
        let (tx, rx) = std::sync::mpsc::sync_channel(10);
        let shared = running(2, tx);
        assert_eq!(shared.emit(b"1"), abi::PB_OK);
        assert_eq!(shared.emit(b"2"), abi::PB_OK);
        assert_eq!(shared.emit(b"3"), abi::PB_BUSY);
        let first = rx.recv().unwrap();
        assert_eq!((first.tag, first.json.as_slice()), (5, &b"1"[..]));
        first.settle();
        assert_eq!(shared.emit(b"4"), abi::PB_OK);
        shared.state.store(STOPPED, Ordering::Release);
        assert_eq!(shared.emit(b"5"), abi::PB_ERROR);
    }

    #[test]
    fn flush_waits_for_earlier_events_only() {
        let (tx, rx) = std::sync::mpsc::sync_channel(10);
        let shared = Arc::new(running(10, tx));
        assert_eq!(shared.flush(0), abi::PB_OK, "nothing emitted yet");
        assert_eq!(shared.emit(b"1"), abi::PB_OK);
        assert_eq!(shared.emit(b"2"), abi::PB_OK);
        assert_eq!(shared.flush(10), abi::PB_BUSY, "two unsettled");
        let flusher = {
            let shared = shared.clone();
            std::thread::spawn(move || shared.flush(5_000))
        };
        std::thread::sleep(Duration::from_millis(20));
        // A later event does not hold up a flush that began before it.
        assert_eq!(shared.emit(b"3"), abi::PB_OK);
        let (one, two) = (rx.recv().unwrap(), rx.recv().unwrap());
        // Settling out of order is fine.
        two.settle();
        assert!(!flusher.is_finished());
        one.settle();
        assert_eq!(flusher.join().unwrap(), abi::PB_OK);
        assert_eq!(shared.flush(10), abi::PB_BUSY, "event 3 is still out");
        rx.recv().unwrap().settle();
        assert_eq!(shared.flush(10), abi::PB_OK);
    }

    #[test]
    fn refused_events_are_not_lost() {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let shared = running(10, tx);
        assert_eq!(shared.emit(b"1"), abi::PB_OK);
        assert_eq!(shared.emit(b"2"), abi::PB_BUSY, "the channel is full");
        rx.recv().unwrap().settle();
        assert_eq!(
            shared.flush(0),
            abi::PB_OK,
            "the refused event is not waited for"
        );
        drop(rx);
        assert_eq!(shared.emit(b"3"), abi::PB_ERROR);
        assert_eq!(shared.flush(0), abi::PB_OK);
        assert_eq!(shared.tracker.lock().lost, 0);
    }

    #[test]
    fn a_lost_event_fails_every_later_flush() {
        let (tx, rx) = std::sync::mpsc::sync_channel(10);
        let shared = Arc::new(running(10, tx));
        assert_eq!(shared.emit(b"1"), abi::PB_OK);
        let flusher = {
            let shared = shared.clone();
            std::thread::spawn(move || shared.flush(5_000))
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(rx.recv().unwrap()); // dropped without settle: the host lost it
        assert_eq!(flusher.join().unwrap(), abi::PB_ERROR);
        assert_eq!(shared.emit(b"2"), abi::PB_OK);
        rx.recv().unwrap().settle();
        assert_eq!(shared.flush(0), abi::PB_ERROR, "sticky until replaced");
        assert_eq!(shared.tracker.lock().lost, 1);
    }

    #[test]
    fn closing_wakes_flushes() {
        let (tx, rx) = std::sync::mpsc::sync_channel(10);
        let shared = Arc::new(running(10, tx));
        assert_eq!(shared.emit(b"1"), abi::PB_OK);
        let flusher = {
            let shared = shared.clone();
            std::thread::spawn(move || shared.flush(60_000))
        };
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        shared.tracker.close();
        assert_eq!(flusher.join().unwrap(), abi::PB_ERROR);
        assert!(t.elapsed() < Duration::from_secs(5));
        // Still running (emits allowed inside stop), but flushes answer at once.
        assert_eq!(shared.emit(b"2"), abi::PB_OK);
        assert_eq!(shared.flush(60_000), abi::PB_ERROR);
        drop(rx);
    }
}
