//! Shared by the host-side test suites: compiling the C fixtures in `tests/c` with the
//! system `cc`, finding the loopback cdylib, and collecting events.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use patchbay_connector_sdk::host::RawEvent;

pub fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh folder that outlives the test (the libraries in it stay loaded anyway).
pub fn scratch_dir() -> PathBuf {
    tempfile::Builder::new()
        .prefix("pb-sdk-test")
        .tempdir()
        .unwrap()
        .keep()
}

fn cc(args: &[&str]) {
    let out = Command::new("cc")
        .args(args)
        .output()
        .expect("run cc (install gcc)");
    assert!(
        out.status.success(),
        "cc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles `tests/c/<src>` into `<dir>/lib<name>.so` with strict warnings.
pub fn compile_plugin_in(dir: &Path, src: &str, name: &str, defines: &[&str]) -> PathBuf {
    let include = sdk_dir().join("include");
    let source = sdk_dir().join("tests/c").join(src);
    let out = dir.join(format!("lib{name}.so"));
    let mut args = vec![
        "-shared", "-fPIC", "-std=c11", "-Wall", "-Wextra", "-Werror",
    ];
    args.extend_from_slice(defines);
    let include = format!("-I{}", include.display());
    args.push(&include);
    let (src, dst) = (source.to_str().unwrap(), out.to_str().unwrap());
    args.extend_from_slice(&["-o", dst, src]);
    cc(&args);
    out
}

/// Compiles a fixture into its own fresh folder (a distinct path is a distinct library,
/// with its own globals).
pub fn compile_plugin(src: &str, name: &str, defines: &[&str]) -> PathBuf {
    compile_plugin_in(&scratch_dir(), src, name, defines)
}

/// Compiles and runs `tests/c/layout.c`, returning its stdout.
pub fn run_layout_probe() -> String {
    let dir = scratch_dir();
    let exe = dir.join("layout");
    let include = format!("-I{}", sdk_dir().join("include").display());
    let src = sdk_dir().join("tests/c/layout.c");
    cc(&[
        "-std=c11",
        "-Wall",
        "-Werror",
        &include,
        "-o",
        exe.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The loopback cdylib. Cargo builds it next to this test binary because it is a
/// dev-dependency (cdylib + rlib); a plain `cargo build -p patchbay-loopback` puts it
/// one folder up. `PATCHBAY_LOOPBACK_SO` overrides both.
pub fn loopback_so() -> PathBuf {
    if let Ok(p) = std::env::var("PATCHBAY_LOOPBACK_SO") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        let candidate = dir.join("libloopback.so");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "libloopback.so not found next to {}; run `cargo build -p patchbay-loopback` or set \
         PATCHBAY_LOOPBACK_SO",
        exe.display()
    );
}

/// Receives events until `done` says so or `timeout` passes (then panics with what came).
pub fn collect_until(
    rx: &Receiver<RawEvent>,
    timeout: Duration,
    mut done: impl FnMut(&[RawEvent]) -> bool,
) -> Vec<RawEvent> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ev) => got.push(ev),
            Err(_) => panic!(
                "timed out after {timeout:?}; got {} events: {got:?}",
                got.len()
            ),
        }
    }
    got
}
