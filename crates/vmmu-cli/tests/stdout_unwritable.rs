//! Every command whose output cannot be written (stdout on `/dev/full`) says so on stderr and
//! exits 1: no panic (`println!` used to panic in `run`, `bench`, `selftest` and `bugs`), and no
//! success without output (`scenario` used to exit 0 having printed nothing).
//! With stderr unwritable, the messages are lost and the exit status is kept.
mod common;
use common::repo;

use std::fs::OpenOptions;
use std::process::{Command, Output};

/// `vmmu ARGS` with stdout on `/dev/full` (every write fails with ENOSPC).
fn vmmu_to_full(args: &[&str]) -> Output {
    let full = OpenOptions::new().write(true).open("/dev/full").expect("open /dev/full");
    Command::new(env!("CARGO_BIN_EXE_vmmu")).args(args).stdout(full).output().expect("run vmmu")
}

#[test]
fn unwritable_stdout_is_an_error_not_a_panic() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("no /dev/full here: nothing to check");
        return;
    }
    let scenario = repo("tests/scenarios/create_read_write.scn");
    let cases: [&[&str]; 7] = [
        &["bugs"],
        &["run", "--inject", "list"],
        &["run", "--seconds", "0.05", "--vcpus", "1", "--json"],
        &["selftest", "--list"],
        &["selftest", "--quick", "--no-kvm", "set-memory-region-delete"],
        &["bench", "--smoke", "--no-kvm", "--only", "lookup"],
        &["scenario", &scenario],
    ];
    for args in cases {
        let out = vmmu_to_full(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "vmmu {args:?} panicked: {err}");
        assert_eq!(out.status.code(), Some(1), "vmmu {args:?}: {err}");
        assert!(err.contains("cannot write"), "vmmu {args:?} did not say why: {err}");
        assert!(err.contains("No space left on device"), "vmmu {args:?}: {err}");
    }
}

/// With stderr on `/dev/full` the commands end with the status they would have had: the message
/// is lost, not turned into a panic (`eprintln!` panicked, and every such status was 101).
#[test]
fn unwritable_stderr_keeps_the_exit_status() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("no /dev/full here: nothing to check");
        return;
    }
    let scenario = repo("tests/scenarios/create_read_write.scn");
    let cases: [(&[&str], i32); 4] = [
        (&["scenario", "/nonexistent/x.scn"], 2),
        (&["scenario", "--counters", &scenario], 0),
        (&["diff", "--no-kvm", "/nonexistent/x.scn"], 2),
        (&["replay", "--no-kvm", "/nonexistent/x.trace.jsonl"], 2),
    ];
    for (args, code) in cases {
        let full = OpenOptions::new().write(true).open("/dev/full").expect("open /dev/full");
        let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
            .args(args)
            .stderr(full)
            .output()
            .expect("run vmmu");
        assert_eq!(out.status.code(), Some(code), "vmmu {args:?}");
    }
}
