#![allow(clippy::unwrap_used)]
//! The binary's command line: configuration errors, check-config, help.

use std::process::Command;

fn zkroute(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zkroute")).args(args).env_remove("RUST_LOG").output().unwrap()
}

#[test]
fn a_bad_config_file_fails_the_start_with_file_key_reason_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[zookeeper]\nsession_timeout = \"forever\"\n").unwrap();
    let out = zkroute(&["--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(err.contains("zookeeper.session_timeout"), "{err}");
    assert!(err.contains("not a duration"), "{err}");
}

#[test]
fn a_bad_flag_value_names_the_flag_source() {
    let out = zkroute(&["--proxy-retries", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("command line or environment") && err.contains("proxy.retries"), "{err}");
}

#[test]
fn check_config_validates_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:15001\"\n").unwrap();
    let out = zkroute(&["check-config", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[listener]]\nname = \"http\"\nbind = \"nowhere\"\n").unwrap();
    let out = zkroute(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listener[0].bind"));
}

#[test]
fn help_lists_every_key_with_its_variable() {
    let out = zkroute(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--zookeeper-connect", "--proxy-drain-timeout", "--listener", "ZKROUTE_ADMIN_BIND", "check-config"] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
