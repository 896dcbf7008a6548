//! Configuration: every bad value exits 78 (EX_CONFIG) with one line naming the key;
//! environment variables override the file.

use std::process::Command;

use crate::harness::PATCHBAYD;

fn check(file_text: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.toml");
    std::fs::write(&path, file_text).expect("write");
    let out = Command::new(PATCHBAYD)
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_invalid_key_exits_78_naming_it() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("[queue]\nbackend = \"kafka\"\n", &[], "queue.backend"),
        (
            "[queue]\nbackend = \"redis\"\nredis_url = \"http://x\"\n",
            &[],
            "queue.redis_url",
        ),
        (
            "[queue]\nshutdown_timeout_secs = -1\n",
            &[],
            "queue.shutdown_timeout_secs",
        ),
        ("[store]\nurl = \"mysql://db\"\n", &[], "store.url"),
        ("[mail]\ntransport = \"pigeon\"\n", &[], "mail.transport"),
        ("[mail]\ntransport = \"smtp\"\n", &[], "mail.smtp_url"),
        ("[billing]\nrun_at = \"midnight\"\n", &[], "billing.run_at"),
        (
            "[billing.prices]\ntelegram = -100\n",
            &[],
            "billing.prices.telegram",
        ),
        ("[deletion]\nbatch_size = 0\n", &[], "deletion.batch_size"),
        ("[log]\nlevel = \"loud[\"\n", &[], "log.level"),
        (
            "[queue.max_attempts]\ntopup = 0\n",
            &[],
            "queue.max_attempts.topup",
        ),
        ("[contorl]\nsocket = \"x\"\n", &[], "contorl"),
        // These once passed --check-config and failed the start with exit 1.
        ("[mail]\nfrom = \"not an address\"\n", &[], "mail.from"),
        (
            "[queue]\nbackend = \"redis\"\nredis_url = \"redis://[::bad\"\n",
            &[],
            "queue.redis_url",
        ),
        (
            "[mail]\ntransport = \"smtp\"\nsmtp_url = \"smtpz://relay:25\"\n",
            &[],
            "mail.smtp_url",
        ),
        ("[control]\nsocket = \"\"\n", &[], "control.socket"),
        ("", &[("PATCHBAY__MAIL__FROM", "nobody")], "mail.from"),
        ("this is not toml", &[], "TOML"),
        ("", &[("PATCHBAY__QUEUE__BACKEND", "mq")], "queue.backend"),
        (
            "",
            &[("PATCHBAY__DELETION__BATCH_SIZE", "lots")],
            "deletion.batch_size",
        ),
    ];
    for (text, env, key) in cases {
        let (code, _, stderr) = check(text, env);
        assert_eq!(code, Some(78), "{text:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(key),
            "{text:?} {env:?} should name {key}: {stderr}"
        );
    }
}

/// The daemon itself (not only --check-config) refuses these with 78 before doing
/// anything, and a password in a URL never reaches the terminal or the journal.
#[test]
fn bad_urls_stop_the_start_with_78_and_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, key) in [
        (
            "[mail]\ntransport = \"smtp\"\nsmtp_url = \"http://mailer:hunter2@relay:25\"\n",
            "mail.smtp_url",
        ),
        (
            "[queue]\nbackend = \"redis\"\nredis_url = \"redis://:hunter2@[::bad/\"\n",
            "queue.redis_url",
        ),
    ] {
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).expect("write");
        let out = Command::new(PATCHBAYD)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{text:?}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains(":***@"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
        assert!(
            !dir.path().join("var").exists(),
            "a bad config creates nothing"
        );
    }
}

#[test]
fn valid_config_and_env_overrides() {
    let (code, stdout, stderr) = check("[queue]\nbackend = \"sqlite\"\n", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("queue sqlite"));
    let (code, stdout, _) = check(
        "",
        &[
            ("PATCHBAY__QUEUE__BACKEND", "redis"),
            ("PATCHBAY__CONTROL__SOCKET", "/tmp/x.sock"),
        ],
    );
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("queue redis") && stdout.contains("/tmp/x.sock"),
        "{stdout}"
    );
    let missing = Command::new(PATCHBAYD)
        .args(["--check-config", "--config", "/nonexistent/p.toml"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(78));
}

/// The shipped files document real, working values.
#[test]
fn shipped_configuration_files_pass_the_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The production example takes its secrets from the environment, as it says.
    let token = ("PATCHBAY__HTTP__TOKEN", "from-the-environment-0123456789");
    for (file, env) in [
        ("config/patchbayd.toml", None),
        ("config/production.example.toml", Some(token)),
    ] {
        let out = Command::new(PATCHBAYD)
            .arg("--check-config")
            .arg("--config")
            .arg(root.join(file))
            .envs(env)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
