//! Host side against real libraries compiled from C at test time: the header matches the
//! Rust mirror, unfit plugins are refused with clear errors, a C connector works end to
//! end, plugin misbehaviour becomes error values, and `check_file` refuses unsafe files.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use patchbay_connector_sdk::host::{
    Instance, InstanceState, LoadError, PluginError, RawEvent, check_file, codes, load,
    load_checked,
};
use patchbay_connector_sdk::{ChannelState, Event, Outbound, Recipient};
use patchbay_connector_sdk::{abi, events, json_limits};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);

fn outbound(message: i64, text: &str) -> Outbound {
    Outbound {
        message,
        external_chat_id: "chat".into(),
        to: Recipient {
            phone: Some("+15550002000".into()),
            username: None,
        },
        text: text.into(),
        attachments: vec![],
    }
}

#[test]
fn header_layout_matches_rust_abi() {
    use std::mem::{offset_of, size_of};
    let probe = run_layout_probe();
    let c: HashMap<&str, usize> = probe
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    let rust: &[(&str, usize)] = &[
        ("pb_sink", size_of::<abi::pb_sink>()),
        ("pb_sink.ctx", offset_of!(abi::pb_sink, ctx)),
        ("pb_sink.write", offset_of!(abi::pb_sink, write)),
        ("pb_host", size_of::<abi::pb_host>()),
        ("pb_host.struct_size", offset_of!(abi::pb_host, struct_size)),
        ("pb_host.abi_version", offset_of!(abi::pb_host, abi_version)),
        ("pb_host.ctx", offset_of!(abi::pb_host, ctx)),
        ("pb_host.emit", offset_of!(abi::pb_host, emit)),
        ("pb_host.log", offset_of!(abi::pb_host, log)),
        ("pb_host.flush", offset_of!(abi::pb_host, flush)),
        ("PB_HOST_V1_MIN_SIZE", abi::PB_HOST_V1_MIN_SIZE),
        ("pb_connector_v1", size_of::<abi::pb_connector_v1>()),
        (
            "pb_connector_v1.struct_size",
            offset_of!(abi::pb_connector_v1, struct_size),
        ),
        (
            "pb_connector_v1.abi_version",
            offset_of!(abi::pb_connector_v1, abi_version),
        ),
        (
            "pb_connector_v1.kind",
            offset_of!(abi::pb_connector_v1, kind),
        ),
        (
            "pb_connector_v1.version",
            offset_of!(abi::pb_connector_v1, version),
        ),
        (
            "pb_connector_v1.create",
            offset_of!(abi::pb_connector_v1, create),
        ),
        (
            "pb_connector_v1.start",
            offset_of!(abi::pb_connector_v1, start),
        ),
        (
            "pb_connector_v1.send",
            offset_of!(abi::pb_connector_v1, send),
        ),
        (
            "pb_connector_v1.status",
            offset_of!(abi::pb_connector_v1, status),
        ),
        (
            "pb_connector_v1.stop",
            offset_of!(abi::pb_connector_v1, stop),
        ),
        (
            "pb_connector_v1.destroy",
            offset_of!(abi::pb_connector_v1, destroy),
        ),
        (
            "pb_connector_v1.secret_keys",
            offset_of!(abi::pb_connector_v1, secret_keys),
        ),
        ("PB_CONNECTOR_V1_MIN_SIZE", abi::PB_CONNECTOR_V1_MIN_SIZE),
        (
            "PB_CONNECTOR_SECRET_KEYS_MIN_SIZE",
            abi::PB_CONNECTOR_SECRET_KEYS_MIN_SIZE,
        ),
        ("PB_MAX_SECRET_KEY_LEN", abi::PB_MAX_SECRET_KEY_LEN),
        ("PB_MAX_SECRET_KEYS", abi::PB_MAX_SECRET_KEYS),
        ("PB_ABI_VERSION", abi::PB_ABI_VERSION as usize),
        ("PB_MAX_PAYLOAD_BYTES", abi::PB_MAX_PAYLOAD_BYTES),
        ("PB_MAX_JSON_DEPTH", json_limits::MAX_JSON_DEPTH),
        ("PB_MAX_TEXT_BYTES", events::MAX_TEXT_BYTES),
        ("PB_MAX_ATTACHMENTS", events::MAX_ATTACHMENTS),
        ("PB_MAX_ATTACHMENTS_BYTES", events::MAX_ATTACHMENTS_BYTES),
        ("PB_MAX_SENDER_FIELD_CHARS", events::MAX_SENDER_FIELD_CHARS),
        ("PB_OK", abi::PB_OK as usize),
        ("PB_ERROR", abi::PB_ERROR as usize),
        ("PB_PANICKED", abi::PB_PANICKED as usize),
        ("PB_BUSY", abi::PB_BUSY as usize),
        ("PB_UNSUPPORTED", abi::PB_UNSUPPORTED as usize),
    ];
    assert_eq!(c.len(), rust.len(), "probe printed {probe}");
    for (name, value) in rust {
        assert_eq!(c.get(name), Some(value), "{name}");
    }
}

#[test]
fn refuses_wrong_abi_version() {
    let so = compile_plugin("wrong_version.c", "wrong_version", &[]);
    let e = load(&so).unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::WrongAbiVersion {
                found: 999,
                expected: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("ABI version 999") && msg.contains("libwrong_version.so"),
        "{msg}"
    );
}

#[test]
fn refuses_missing_entry_symbol() {
    let so = compile_plugin("no_symbol.c", "no_symbol", &[]);
    let e = load(&so).unwrap_err();
    assert!(matches!(e, LoadError::MissingSymbol { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("no entry symbol `patchbay_connector_v1`"),
        "{e}"
    );
}

#[test]
fn refuses_broken_descriptors() {
    let dir = scratch_dir();
    type Case = (&'static str, fn(&LoadError) -> bool, &'static str);
    let cases: &[Case] = &[
        (
            "-DMODE_REFUSE",
            |e| matches!(e, LoadError::Refused { host_abi: 1, .. }),
            "refused",
        ),
        (
            "-DMODE_SMALL",
            |e| matches!(e, LoadError::StructTooSmall { size: 16, .. }),
            "smaller",
        ),
        (
            "-DMODE_BAD_KIND",
            |e| matches!(e, LoadError::BadKind { .. }),
            "\"Bad-Kind\"",
        ),
        (
            "-DMODE_NO_CREATE",
            |e| {
                matches!(
                    e,
                    LoadError::MissingFunction {
                        function: "create",
                        ..
                    }
                )
            },
            "`create`",
        ),
        (
            "-DMODE_LONG_SECRET",
            |e| matches!(e, LoadError::BadSecretKeys { .. }),
            "bad secret_keys list: a name longer than 64 bytes",
        ),
    ];
    for (i, (define, is, text)) in cases.iter().enumerate() {
        let so = compile_plugin_in(&dir, "bad_descriptor.c", &format!("bad{i}"), &[define]);
        let e = load(&so).unwrap_err();
        assert!(is(&e), "{define}: {e:?}");
        assert!(e.to_string().contains(text), "{define}: {e}");
    }
}

#[test]
fn refuses_an_unresolved_symbol_at_load() {
    // Bound lazily this library would load, and crash the process at its first create.
    let so = compile_plugin("unresolved_symbol.c", "unresolved", &[]);
    let e = load(&so).unwrap_err();
    assert!(matches!(e, LoadError::Open { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("libunresolved.so")
            && msg.contains("cannot load the library")
            && msg.contains("undefined symbol: pb_fixture_function_nobody_defines"),
        "{msg}"
    );
}

#[test]
fn refuses_a_file_that_is_not_a_library() {
    let dir = scratch_dir();
    let fake = dir.join("libfake.so");
    fs::write(&fake, "not an ELF file").unwrap();
    let e = load(&fake).unwrap_err();
    assert!(matches!(e, LoadError::Open { .. }), "{e:?}");
    assert!(e.to_string().contains("cannot load the library"), "{e}");
}

fn parse_all(events: &[RawEvent]) -> Vec<Event> {
    events.iter().map(|e| e.parse().unwrap()).collect()
}

#[test]
fn c_connector_works_end_to_end() {
    let so = compile_plugin("hello_connector.c", "hello", &[]);
    let lib = load(&so).unwrap();
    assert_eq!(
        (lib.kind(), lib.version(), lib.abi_version()),
        ("hello", "1.0.0", 1)
    );
    assert!(lib.supports_send());

    let (tx, rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 7, &json!({}), tx, 64).unwrap();
    assert_eq!(inst.state(), InstanceState::Created);
    assert_eq!(inst.status().unwrap().state, ChannelState::Disconnected);
    inst.start().unwrap();
    assert_eq!(inst.state(), InstanceState::Running);

    let got = collect_until(&rx, WAIT, |g| g.len() >= 3);
    assert!(got.iter().all(|e| e.tag == 7 && e.instance == inst.id()));
    let events = parse_all(&got);
    let Event::Status(s) = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(s.state, ChannelState::Connected);
    assert_eq!(s.number.as_deref(), Some("+15550001000"));
    let Event::Inbound(m) = &events[2] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (m.external_message_id.as_str(), m.text.as_str()),
        ("hello-1", "hello from C")
    );

    let sent = inst.send(&outbound(42, "hi")).unwrap();
    assert_eq!(sent.external_message_id, "hello-out-1");
    let receipt = collect_until(&rx, WAIT, |g| !g.is_empty());
    let Event::Receipt(r) = receipt[0].parse().unwrap() else {
        panic!()
    };
    assert_eq!(
        (r.message, r.external_message_id.as_deref()),
        (42, Some("hello-out-1"))
    );

    let sent = inst.send(&outbound(5, "x")).unwrap();
    assert_eq!(sent.external_message_id, "hello-out-2");

    inst.stop().unwrap();
    assert_eq!(inst.state(), InstanceState::Stopped);
    let rest = collect_until(&rx, WAIT, |g| g.len() >= 2);
    assert!(
        matches!(rest[1].parse().unwrap(), Event::Status(ref s) if s.state == ChannelState::Disconnected)
    );
    let e = inst.send(&outbound(43, "late")).unwrap_err();
    assert_eq!(e.code, codes::NOT_RUNNING);
    assert!(e.retryable);
    inst.stop().unwrap(); // idempotent
    assert_eq!(inst.start().unwrap_err().code, codes::NOT_RUNNING); // one lifecycle
    let stats = inst.emit_stats();
    assert_eq!((stats.accepted, stats.busy, stats.refused), (6, 0, 0));
}

#[test]
fn c_connector_errors_are_values() {
    let so = compile_plugin("hello_connector.c", "hello", &[]);
    let lib = load(&so).unwrap();
    let (tx, rx) = mpsc::sync_channel(64);
    let e = Instance::create(&lib, 1, &json!([1, 2]), tx.clone(), 8).unwrap_err();
    assert_eq!(
        e,
        PluginError {
            code: "invalid_config".into(),
            message: "config must be a JSON object".into(),
            retryable: false
        }
    );

    let inst = Instance::create(&lib, 1, &json!({"fail_start": true}), tx, 8).unwrap();
    let e = inst.start().unwrap_err();
    assert_eq!(e.code, "start_failed");
    assert_eq!(inst.state(), InstanceState::Stopped);
    let got = collect_until(&rx, WAIT, |g| g.len() >= 2);
    assert!(
        matches!(got[1].parse().unwrap(), Event::Status(ref s) if s.state == ChannelState::Error)
    );
    drop(inst);
}

type EmitFn = unsafe extern "C" fn(*const std::ffi::c_char) -> i32;
type FlushFn = unsafe extern "C" fn(u32) -> i32;
type EmitLenFn = unsafe extern "C" fn(usize) -> i32;
type CountFn = unsafe extern "C" fn() -> i32;

/// The misbehaving fixture's test hooks (the same dlopen handle the host uses).
struct Hooks {
    lib: libloading::Library,
}

impl Hooks {
    fn open(path: &std::path::Path) -> Self {
        Hooks {
            lib: unsafe { libloading::Library::new(path) }.unwrap(),
        }
    }
    fn emit(&self, json: &str) -> i32 {
        let c = std::ffi::CString::new(json).unwrap();
        unsafe { self.lib.get::<EmitFn>(b"misbehaving_emit\0").unwrap()(c.as_ptr()) }
    }
    fn emit_len(&self, len: usize) -> i32 {
        unsafe {
            self.lib
                .get::<EmitLenFn>(b"misbehaving_emit_len\0")
                .unwrap()(len)
        }
    }
    fn flush(&self, timeout_ms: u32) -> i32 {
        unsafe { self.lib.get::<FlushFn>(b"misbehaving_flush\0").unwrap()(timeout_ms) }
    }
    fn calls(&self) -> i32 {
        unsafe { self.lib.get::<CountFn>(b"misbehaving_calls\0").unwrap()() }
    }
    fn destroyed(&self) -> i32 {
        unsafe { self.lib.get::<CountFn>(b"misbehaving_destroyed\0").unwrap()() }
    }
    fn stops(&self) -> i32 {
        unsafe { self.lib.get::<CountFn>(b"misbehaving_stops\0").unwrap()() }
    }
    /// Lets a send blocked on "block" return.
    fn release(&self) {
        unsafe {
            self.lib
                .get::<unsafe extern "C" fn()>(b"misbehaving_release\0")
                .unwrap()()
        }
    }
}

const STATUS_EVENT: &str = r#"{"type":"status","state":"connecting"}"#;

#[test]
fn emit_only_between_start_and_stop() {
    let so = compile_plugin("misbehaving.c", "misbehaving", &[]);
    let lib = load(&so).unwrap();
    let hooks = Hooks::open(&so);
    let (tx, rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 3, &json!({}), tx, 64).unwrap();
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_ERROR, "before start");
    inst.start().unwrap();
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    assert_eq!(
        hooks.emit("{not json"),
        abi::PB_OK,
        "the host takes bytes; parse rejects"
    );
    assert_eq!(
        hooks.emit_len(abi::PB_MAX_PAYLOAD_BYTES + 1),
        abi::PB_ERROR,
        "too large"
    );
    inst.stop().unwrap();
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_ERROR, "after stop");
    let got: Vec<_> = rx.try_iter().collect();
    assert_eq!(got.len(), 2);
    assert!(got[0].parse().is_ok());
    let e = got[1].parse().unwrap_err();
    assert!(e.to_string().contains("invalid event JSON"), "{e}");
    assert_eq!(got[1].json, b"{not json");
    let stats = inst.emit_stats();
    assert_eq!((stats.accepted, stats.refused), (2, 3));
}

#[test]
fn emit_busy_when_in_flight_limit_or_queue_is_full() {
    let so = compile_plugin("misbehaving.c", "misbehaving", &[]);
    let lib = load(&so).unwrap();
    let hooks = Hooks::open(&so);
    // Per-instance limit 2, roomy channel.
    let (tx, rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 1, &json!({}), tx, 2).unwrap();
    inst.start().unwrap();
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_BUSY);
    drop(rx.recv().unwrap()); // handling an event frees its slot
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    assert_eq!(inst.emit_stats().busy, 1);
    inst.stop().unwrap();
    drop(inst);

    // Roomy limit, full channel; then a closed channel.
    let (tx, rx) = mpsc::sync_channel(1);
    let inst = Instance::create(&lib, 1, &json!({}), tx, 100).unwrap();
    inst.start().unwrap();
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_BUSY);
    drop(rx);
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_ERROR);
    inst.stop().unwrap();
}

#[test]
fn flush_waits_until_the_host_settles_events() {
    let so = compile_plugin("misbehaving.c", "misbehaving", &[]);
    let lib = load(&so).unwrap();
    let hooks = std::sync::Arc::new(Hooks::open(&so));
    let (tx, rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 4, &json!({}), tx, 64).unwrap();
    assert_eq!(hooks.flush(0), abi::PB_ERROR, "not running yet");
    inst.start().unwrap();
    assert_eq!(hooks.flush(0), abi::PB_OK, "nothing emitted");
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    assert_eq!(
        hooks.flush(20),
        abi::PB_BUSY,
        "timed out: nothing settled yet"
    );

    // A plugin thread blocks in flush until the host settles both events.
    let waiter = {
        let hooks = hooks.clone();
        std::thread::spawn(move || hooks.flush(10_000))
    };
    std::thread::sleep(Duration::from_millis(50));
    let first = rx.recv().unwrap();
    first.settle();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiter.is_finished(), "one event is still unsettled");
    rx.recv().unwrap().settle();
    assert_eq!(waiter.join().unwrap(), abi::PB_OK);

    // stop wakes a waiting flush at once, with PB_ERROR.
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    let waiter = {
        let hooks = hooks.clone();
        std::thread::spawn(move || hooks.flush(60_000))
    };
    std::thread::sleep(Duration::from_millis(50));
    let stopping = std::time::Instant::now();
    inst.stop().unwrap();
    assert_eq!(waiter.join().unwrap(), abi::PB_ERROR);
    assert!(stopping.elapsed() < Duration::from_secs(5));
    assert_eq!(inst.lost_events(), 0);
    rx.recv().unwrap().settle();
}

#[test]
fn an_event_dropped_unsettled_fails_flushes() {
    let so = compile_plugin("misbehaving.c", "misbehaving", &[]);
    let lib = load(&so).unwrap();
    let hooks = Hooks::open(&so);
    let (tx, rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 4, &json!({}), tx, 64).unwrap();
    inst.start().unwrap();
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    drop(rx.recv().unwrap()); // e.g. the store refused its batch
    assert_eq!(inst.lost_events(), 1);
    assert_eq!(hooks.flush(1_000), abi::PB_ERROR);
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK, "emit is unaffected");
    rx.recv().unwrap().settle();
    assert_eq!(
        hooks.flush(1_000),
        abi::PB_ERROR,
        "until the instance is replaced"
    );
    inst.stop().unwrap();
}

#[test]
fn tokio_sender_is_an_event_sink() {
    let so = compile_plugin("hello_connector.c", "hello", &[]);
    let lib = load(&so).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let inst = Instance::create(&lib, 9, &json!({}), tx, 16).unwrap();
    inst.start().unwrap();
    let ev = rx.blocking_recv().unwrap();
    assert_eq!(ev.tag, 9);
    assert!(ev.parse().is_ok());
}

#[test]
fn misbehaving_calls_become_errors() {
    let so = compile_plugin("misbehaving.c", "misbehaving", &[]);
    let lib = load(&so).unwrap();
    let hooks = Hooks::open(&so);
    let (tx, _rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 1, &json!({"huge_status": true}), tx, 64).unwrap();
    inst.start().unwrap();
    assert_eq!(
        inst.send(&outbound(1, "fine")).unwrap().external_message_id,
        "m-1"
    );
    assert_eq!(
        inst.send(&outbound(1, "garbage")).unwrap_err().code,
        codes::BAD_OUTPUT
    );
    assert_eq!(
        inst.send(&outbound(1, "wrong_type")).unwrap_err().code,
        codes::BAD_OUTPUT,
        "an external id alone does not make a send result"
    );
    assert_eq!(
        inst.send(&outbound(1, "no_body")).unwrap_err().code,
        codes::BAD_OUTPUT
    );
    assert_eq!(
        inst.send(&outbound(1, "weird")).unwrap_err().code,
        codes::BAD_STATUS
    );
    assert_eq!(
        inst.send(&outbound(1, "unsupported")).unwrap_err().code,
        codes::UNSUPPORTED
    );
    let e = inst.status().unwrap_err();
    assert_eq!(e.code, codes::BAD_OUTPUT);
    assert!(e.message.contains("larger than"), "{e}");
    assert_eq!(inst.state(), InstanceState::Running);

    let e = inst.send(&outbound(1, "panic")).unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.message.as_str()),
        (codes::PANICKED, "C++ exception: boom")
    );
    assert!(e.is_panic());
    assert_eq!(inst.state(), InstanceState::Poisoned);
    let calls = hooks.calls();
    assert_eq!(
        inst.send(&outbound(1, "fine")).unwrap_err().code,
        codes::POISONED
    );
    assert_eq!(inst.status().unwrap_err().code, codes::POISONED);
    assert_eq!(inst.stop().unwrap_err().code, codes::POISONED);
    assert_eq!(hooks.calls(), calls, "a poisoned instance is not called");
    assert_eq!(
        hooks.emit(STATUS_EVENT),
        abi::PB_ERROR,
        "a poisoned instance cannot emit"
    );
    drop(inst);
    assert_eq!(
        hooks.destroyed(),
        1,
        "destroy is still called after a panic"
    );
    assert_eq!(hooks.calls(), calls, "no stop on a poisoned instance");
}

#[test]
fn check_file_accepts_a_safe_plugin() {
    let dir = scratch_dir();
    let so = compile_plugin_in(&dir, "hello_connector.c", "hello", &[]);
    fs::set_permissions(&so, fs::Permissions::from_mode(0o755)).unwrap();
    let uid = fs::metadata(&so)
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    let ok = check_file(&so, &dir, &[uid]).unwrap();
    assert_eq!(ok.path(), fs::canonicalize(&so).unwrap());
    // A symlink inside the folder to a file inside it is fine; the real path is checked
    // and loaded.
    symlink(&so, dir.join("libalias.so")).unwrap();
    assert_eq!(
        check_file(&dir.join("libalias.so"), &dir, &[uid])
            .unwrap()
            .path(),
        ok.path()
    );
    let path = ok.path().to_owned();
    let lib = load_checked(ok).unwrap();
    assert_eq!((lib.kind(), lib.path()), ("hello", path.as_path()));
    // Loaded one after the other, each is itself: the loader knows a library by its
    // `/proc/self/fd/N` name, so that number is never reused for the next file.
    let second = compile_plugin_in(&dir, "misbehaving.c", "misbehaving", &[]);
    let lib = load_checked(check_file(&second, &dir, &[uid]).unwrap()).unwrap();
    assert_eq!(lib.kind(), "misbehaving");
}

#[test]
fn the_file_checked_is_the_file_loaded() {
    let dir = scratch_dir();
    let so = compile_plugin_in(&dir, "hello_connector.c", "swapped", &[]);
    let checked = check_file(&so, &dir, &[me()]).unwrap();
    // Replaced after the check by a library that `load` refuses, so the two are told
    // apart by loading.
    let other = compile_plugin_in(&dir, "bad_descriptor.c", "other", &["-DMODE_REFUSE"]);
    fs::rename(&other, &so).unwrap();
    assert!(
        matches!(load(&so).unwrap_err(), LoadError::Refused { .. }),
        "the path now names the other file"
    );
    let lib = load_checked(checked).unwrap();
    assert_eq!(
        lib.kind(),
        "hello",
        "the checked file is loaded, not the new one"
    );
}

#[test]
fn check_file_refuses_unsafe_folders() {
    let dir = scratch_dir();
    let so = compile_plugin_in(&dir, "hello_connector.c", "hello", &[]);
    let dir_mode = |mode| fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
    // The plugin folder itself: never group- or world-writable, sticky or not.
    for mode in [0o770, 0o707, 0o1777] {
        dir_mode(mode);
        let e = check_file(&so, &dir, &[me()]).unwrap_err();
        assert!(
            matches!(e, LoadError::FolderWritable { .. }),
            "{mode:o}: {e:?}"
        );
        let msg = e.to_string();
        let folder = fs::canonicalize(&dir).unwrap();
        assert!(
            msg.contains(&format!(
                "folder {} is group- or world-writable (mode {mode:04o}); refusing to load it",
                folder.display()
            )) && msg.contains("libhello.so"),
            "{msg}"
        );
    }
    dir_mode(0o755);
    check_file(&so, &dir, &[me()]).unwrap();

    // A folder inside it, reached through a symlink, is held to the same rule.
    let sub = dir.join("sub");
    fs::create_dir(&sub).unwrap();
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o1777)).unwrap();
    let inner = compile_plugin_in(&sub, "hello_connector.c", "inner", &[]);
    symlink(&inner, dir.join("libinner.so")).unwrap();
    let e = check_file(&dir.join("libinner.so"), &dir, &[me()]).unwrap_err();
    assert!(
        matches!(e, LoadError::FolderWritable { mode: 0o1777, .. }),
        "{e:?}"
    );

    // Above the plugin folder, a root-owned sticky folder (as /tmp) is fine, a plain
    // world-writable one is not.
    let parent = scratch_dir();
    let nested = parent.join("plugins");
    fs::create_dir(&nested).unwrap();
    let lib = compile_plugin_in(&nested, "hello_connector.c", "nested", &[]);
    let root = me() == 0;
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).unwrap();
    if root {
        check_file(&lib, &nested, &[me()]).unwrap();
    }
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o777)).unwrap();
    let e = check_file(&lib, &nested, &[me()]).unwrap_err();
    assert!(
        matches!(e, LoadError::FolderWritable { mode: 0o777, .. }),
        "{e:?}"
    );
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o700)).unwrap();

    // Folder owners: root or an allowed uid, like the file's. Changing it needs root.
    if root {
        std::os::unix::fs::chown(&parent, Some(4242), None).unwrap();
        let e = check_file(&lib, &nested, &[1000]).unwrap_err();
        assert!(
            matches!(e, LoadError::FolderOwner { uid: 4242, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("is owned by uid 4242, not by root or the daemon's user"),
            "{e}"
        );
        check_file(&lib, &nested, &[4242]).unwrap();
        // Sticky is no excuse for a folder root does not own.
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = check_file(&lib, &nested, &[4242]).unwrap_err();
        assert!(matches!(e, LoadError::FolderWritable { .. }), "{e:?}");
    }
}

#[test]
fn check_file_does_not_hang_on_a_fifo() {
    let dir = scratch_dir();
    let fifo = dir.join("libfifo.so");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let e = check_file(&fifo, &dir, &[me()]).unwrap_err();
    assert!(matches!(e, LoadError::NotAFile { .. }), "{e:?}");
}

/// The uid the tests run as: the "daemon's user" of these checks.
fn me() -> u32 {
    rustix::process::getuid().as_raw()
}

#[test]
fn secret_keys_cross_the_abi() {
    let lib = load(&compile_plugin("hello_connector.c", "hello", &[])).unwrap();
    assert_eq!(lib.secret_keys(), ["api_key"]);
    assert_eq!(
        lib.redact_config(&json!({"api_key": "k-123456", "other": 1, "none": null})),
        json!({"api_key": "***", "other": 1, "none": null})
    );
    // A plugin built against revision 1.1: a descriptor that ends at `destroy`. The
    // host reads nothing beyond it (the fixture still sets the field), sees no secrets,
    // and the connector works as before.
    let old = compile_plugin("hello_connector.c", "hello", &["-DHELLO_REVISION_1_1"]);
    let lib = load(&old).unwrap();
    assert!(lib.secret_keys().is_empty(), "{:?}", lib.secret_keys());
    assert_eq!(
        lib.redact_config(&json!({"api_key": "k-123456"})),
        json!({"api_key": "k-123456"})
    );
    let (tx, rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 1, &json!({}), tx, 64).unwrap();
    inst.start().unwrap();
    collect_until(&rx, WAIT, |g| g.len() >= 3);
    inst.stop().unwrap();
}

#[test]
fn check_file_refuses_unsafe_files() {
    let dir = scratch_dir();
    let so = compile_plugin_in(&dir, "hello_connector.c", "hello", &[]);
    let uid = fs::metadata(&so)
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();

    for mode in [0o775, 0o757, 0o777] {
        fs::set_permissions(&so, fs::Permissions::from_mode(mode)).unwrap();
        let e = check_file(&so, &dir, &[uid]).unwrap_err();
        assert!(matches!(e, LoadError::Writable { .. }), "{mode:o}: {e:?}");
        assert!(e.to_string().contains("group- or world-writable"), "{e}");
    }
    fs::set_permissions(&so, fs::Permissions::from_mode(0o755)).unwrap();

    // Escapes: a symlink out of the folder, and a path outside it.
    let outside = scratch_dir();
    let elsewhere = compile_plugin_in(&outside, "hello_connector.c", "elsewhere", &[]);
    symlink(&elsewhere, dir.join("libescape.so")).unwrap();
    let e = check_file(&dir.join("libescape.so"), &dir, &[uid]).unwrap_err();
    assert!(matches!(e, LoadError::OutsideDir { .. }), "{e:?}");
    assert!(e.to_string().contains("outside the plugin folder"), "{e}");
    let e = check_file(&elsewhere, &dir, &[uid]).unwrap_err();
    assert!(matches!(e, LoadError::OutsideDir { .. }), "{e:?}");
    let e = check_file(&dir.join("sub/../../x.so"), &dir, &[uid]).unwrap_err();
    assert!(matches!(e, LoadError::Io { .. }), "{e:?}");

    fs::create_dir(dir.join("libdir.so")).unwrap();
    let e = check_file(&dir.join("libdir.so"), &dir, &[uid]).unwrap_err();
    assert!(matches!(e, LoadError::NotAFile { .. }), "{e:?}");
    let e = check_file(&dir.join("libmissing.so"), &dir, &[uid]).unwrap_err();
    assert!(matches!(e, LoadError::Io { .. }), "{e:?}");

    // Ownership: only root or an allowed uid. Changing the owner needs root.
    if uid == 0 {
        std::os::unix::fs::chown(&so, Some(4242), None).unwrap();
        let e = check_file(&so, &dir, &[1000]).unwrap_err();
        assert!(matches!(e, LoadError::Owner { uid: 4242, .. }), "{e:?}");
        assert!(e.to_string().contains("owned by uid 4242"), "{e}");
        check_file(&so, &dir, &[4242]).unwrap();
    } else {
        let e = check_file(&so, &dir, &[me()]).unwrap_err();
        assert!(matches!(e, LoadError::Owner { .. }), "{e:?}");
    }
}

#[test]
fn stop_waits_for_a_call_in_progress() {
    let so = compile_plugin("misbehaving.c", "misbehaving", &[]);
    let lib = load(&so).unwrap();
    let hooks = std::sync::Arc::new(Hooks::open(&so));
    let (tx, _rx) = mpsc::sync_channel(64);
    let inst = std::sync::Arc::new(Instance::create(&lib, 1, &json!({}), tx, 64).unwrap());
    inst.start().unwrap();
    let calls = hooks.calls();
    let sender = {
        let inst = inst.clone();
        std::thread::spawn(move || inst.send(&outbound(1, "block")))
    };
    while hooks.calls() == calls {
        std::thread::sleep(Duration::from_millis(1));
    }

    // The send holds the instance: a short stop gives up and changes nothing.
    let e = inst.stop_within(Duration::from_millis(50)).unwrap_err();
    assert_eq!(e.code, codes::BUSY);
    assert!(e.retryable);
    assert_eq!(inst.state(), InstanceState::Running, "stop did not run");
    assert_eq!(hooks.stops(), 0);
    assert_eq!(
        hooks.emit(STATUS_EVENT),
        abi::PB_OK,
        "still running: the plugin may emit"
    );

    // A patient stop waits for the send, then stops.
    let stopper = {
        let inst = inst.clone();
        std::thread::spawn(move || inst.stop())
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!stopper.is_finished(), "waits for the send");
    hooks.release();
    assert_eq!(sender.join().unwrap().unwrap().external_message_id, "m-1");
    stopper.join().unwrap().unwrap();
    assert_eq!(inst.state(), InstanceState::Stopped);
    assert_eq!(hooks.stops(), 1);
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_ERROR);
    drop(inst);
    assert_eq!(hooks.destroyed(), 1);
}

#[test]
fn a_stop_answered_busy_is_retried_before_destroy() {
    let so = compile_plugin("misbehaving.c", "misbehaving", &[]);
    let lib = load(&so).unwrap();
    let hooks = Hooks::open(&so);
    let (tx, _rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 1, &json!({"busy_stop_once": true}), tx, 64).unwrap();
    inst.start().unwrap();
    assert_eq!(inst.stop().unwrap_err().code, codes::BUSY);
    assert_eq!(
        inst.state(),
        InstanceState::Running,
        "the plugin did not stop"
    );
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_OK);
    drop(inst);
    assert_eq!(hooks.stops(), 2, "Drop asked the plugin to stop again");
    assert_eq!(hooks.destroyed(), 1);
}

#[test]
fn a_plugin_that_never_stops_is_leaked_not_destroyed() {
    let so = compile_plugin("misbehaving.c", "misbehaving", &[]);
    let lib = load(&so).unwrap();
    let hooks = Hooks::open(&so);
    let (tx, _rx) = mpsc::sync_channel(64);
    let inst = Instance::create(&lib, 1, &json!({"busy_stop_always": true}), tx, 64).unwrap();
    inst.start().unwrap();
    let t = std::time::Instant::now();
    drop(inst);
    assert!(t.elapsed() < Duration::from_secs(30), "Drop gives up");
    assert!(hooks.stops() > 1, "Drop kept asking");
    assert_eq!(
        hooks.destroyed(),
        0,
        "never destroyed under running threads"
    );
    // The host struct is leaked, not freed: the plugin's late emit is refused safely.
    assert_eq!(hooks.emit(STATUS_EVENT), abi::PB_ERROR);
}
