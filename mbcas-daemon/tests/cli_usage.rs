//! Exit codes of the `mbcas` binary for usage errors.

use std::process::Command;

fn mbcas(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mbcas"))
        .args(args)
        .env_remove("MBCAS_LOG_LEVEL")
        .env_remove("MBCAS_LOG_FORMAT")
        .output()
        .unwrap_or_else(|e| panic!("cannot run mbcas: {e}"))
}

#[test]
fn usage_errors_exit_64_and_name_the_flag() {
    let out = mbcas(&["--log-format", "xml", "version"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log-format"), "{err}");

    let out = mbcas(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn help_and_version_exit_0() {
    for args in [&["--help"][..], &["--version"], &["version"]] {
        let out = mbcas(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?} printed nothing");
    }
}
