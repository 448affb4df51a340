//! What a careless or hostile user can do to `vmmu`: readers that leave early, inputs that ask for
//! huge amounts of memory, options that name nothing. Each case here once misbehaved (ran on for
//! nobody, allocated gigabytes, or succeeded having done nothing).
mod common;
use common::{repo, temp_file, text, vmmu};

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `vmmu ARGS`, killed if it has not ended within `secs` seconds (`None` then).
fn vmmu_within(args: &[&str], secs: u64) -> Option<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmmu");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().expect("collect"))
}

/// `vmmu scenario FILE | head -1`: once the reader has gone, the run stops (exit 1, no panic)
/// instead of running every remaining step for nobody.
#[test]
fn scenario_stops_when_the_reader_leaves() {
    let mut s = String::from("vm\nmem b size=4K\nslot 1 gpa=0x10000000 size=4K mem=b\n");
    // Several seconds of steps on the software machine (7 s here, unread); parsing them takes
    // well under a second.
    s.push_str(&"read 0 gpa=0x10000000 size=8\n".repeat(1_000_000));
    let path = temp_file("long.scn", &s);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["scenario", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmmu");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).expect("first line");
    assert_eq!(first, "{\"step\":3,\"op\":\"slot\",\"result\":\"ok\"}\n");
    // The reader is gone (dropped above). The run must end soon.
    let deadline = Instant::now() + Duration::from_secs(4);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("collect");
    let _ = std::fs::remove_file(&path);
    let status = status.expect("vmmu scenario ran on after its reader left");
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(1), "{err}");
}

/// `vmmu diff --expected DIR` with a DIR that does not exist, or is a file, is a bad argument
/// (exit 2, naming it), not a run that silently compares with no recording and exits 0.
#[test]
fn diff_expected_must_be_a_directory() {
    let scenario = repo("tests/scenarios/create_read_write.scn");
    let file = temp_file("not-a-dir", "x");
    let missing = std::env::temp_dir().join(format!("vmmu-hostile-{}-none", std::process::id()));
    for dir in [missing.to_str().unwrap(), file.to_str().unwrap()] {
        let out = vmmu(&["diff", "--no-kvm", "--expected", dir, &scenario]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--expected {dir}: {err}");
        assert!(err.contains("--expected") && err.contains(dir), "{err}");
        assert!(out.stdout.is_empty(), "nothing runs: {}", text(&out.stdout));
    }
    let _ = std::fs::remove_file(&file);
    // A directory without NAME.jsonl: the run goes on, and says it compared with no recording.
    let out = vmmu(&["diff", "--no-kvm", "--expected", &repo("tests/traces"), &scenario]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("no recorded output"), "{err}");
    assert!(!text(&out.stdout).contains("expected"), "{}", text(&out.stdout));
}

/// `vmmu selftest --delay-us N` takes at most 10 s (10000000): 2^64 - 1 used to be accepted and
/// slept for ever before the first iteration.
#[test]
fn selftest_delay_is_bounded() {
    let args = [
        "selftest",
        "memslot-modification-stress",
        "--quick",
        "--no-kvm",
        "--delay-us",
        "18446744073709551615",
    ];
    let out = vmmu_within(&args, 10).expect("vmmu selftest --delay-us 2^64-1 did not end");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--delay-us") && err.contains("0..=10000000"), "{err}");
}

/// `vmmu run` with guest paging and more vCPUs than its table area holds is refused up front
/// (exit 2, saying the limit), not run into thousands of oracle violations ("the guest page-table
/// area is full") as 64 vCPUs were; the limit itself runs clean.
#[test]
fn run_with_guest_paging_bounds_its_vcpus() {
    for args in [
        &["run", "--guest-paging", "--vcpus", "64", "--seconds", "0.3"][..],
        &["run", "--format", "shadow", "--vcpus", "49", "--seconds", "0.3"][..],
    ] {
        let out = vmmu(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("at most 48"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = vmmu(&["run", "--format", "shadow", "--vcpus", "48", "--seconds", "0.3", "--json"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}{}", text(&out.stdout));
}

/// A negative number is named as a bad value of its option (exit 2), not reported as an unknown
/// argument `-1`, which left the user looking for a flag they never meant.
#[test]
fn negative_numbers_are_bad_values() {
    for args in [
        &["run", "--seconds", "-1"][..],
        &["run", "--vcpus", "-1"][..],
        &["scenario", "x.scn", "--phys-bits", "-1"][..],
        &["replay", "x.trace.jsonl", "--phys-bits", "-1"][..],
        &["selftest", "all", "--delay-us", "-1"][..],
    ] {
        let out = vmmu(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("invalid value '-1'"), "{args:?}: {err}");
    }
}

/// A directory named where a scenario or trace file goes (`vmmu diff tests/scenarios`) is
/// refused saying it is a directory and what to give instead (its files), with exit 2.
#[test]
fn a_directory_instead_of_a_file_says_what_to_give() {
    let dir = repo("tests/scenarios");
    for args in [
        &["scenario", &dir][..],
        &["diff", "--no-kvm", &dir][..],
        &["replay", "--no-kvm", &repo("tests/traces")][..],
    ] {
        let out = vmmu(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("is a directory, not a file: name the files in it"),
            "{args:?}: {err}"
        );
    }
}

/// An input that never ends (`/dev/zero`) is read up to the inputs' size limit and refused
/// (exit 2, saying so), instead of being read until memory runs out.
#[test]
fn an_endless_input_is_refused_at_the_size_limit() {
    if !std::path::Path::new("/dev/zero").exists() {
        return;
    }
    for args in [&["scenario", "/dev/zero"][..], &["replay", "--no-kvm", "/dev/zero"][..]] {
        let out = vmmu_within(args, 20).expect("vmmu read /dev/zero for more than 20 s");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("/dev/zero: more than 512 MiB"), "{args:?}: {err}");
        // Only a trace may be larger as a regular file; a scenario is not told to be one.
        assert_eq!(err.contains("trace"), args[0] == "replay", "{args:?}: {err}");
    }
}

/// The stress test's memory beyond what a side can hold (`--vcpus 64` at the default 1 GiB per
/// vCPU is 64 GiB; the KVM half takes under 32 GiB) is a bad argument saying the limit (exit 2),
/// not a FAIL of both sides with "raise max_frames or phys_bits"; tests that do not use it are
/// not held to it.
#[test]
fn selftest_stress_memory_is_bounded_up_front() {
    let out = vmmu(&["selftest", "--vcpus", "64", "memslot-modification-stress"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("65536 MiB") && err.contains("at most 32767 MiB"), "{err}");
    assert!(out.stdout.is_empty(), "nothing runs: {}", text(&out.stdout));
    let out = vmmu(&[
        "selftest",
        "--no-kvm",
        "--vcpus",
        "64",
        "--mib-per-vcpu",
        "16384",
        "memslot-modification-stress",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("at most 524288 MiB"), "{err}");
    let out = vmmu(&["selftest", "--vcpus", "64", "--no-kvm", "--quick", "set-memory-region-move"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// A scenario with no steps (empty, only comments) or a trace with no events is valid and runs
/// (exit 0), but says that nothing was run or checked: `scenario` on stderr, `diff` in its
/// verdict line only (once), `replay` in the report's warnings.
#[test]
fn inputs_with_nothing_to_run_say_so() {
    let scenario = temp_file("comments.scn", "# only a comment\n\n   # another\n");
    let s = scenario.to_str().unwrap();
    for args in [&["scenario", s][..], &["diff", "--no-kvm", s][..]] {
        let out = vmmu(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        if args[0] == "diff" {
            // Nothing was compared: no `equal` verdict (hunt 43s N2), and no second message.
            let verdict = text(&out.stdout);
            assert!(verdict.starts_with(&format!("skipped {s}: no steps")), "{verdict}");
            assert!(!err.contains("no steps"), "said twice: {err}");
        } else {
            assert!(err.contains("no steps"), "{args:?}: {err}");
        }
    }
    let _ = std::fs::remove_file(&scenario);
    let trace = temp_file("header.trace.jsonl", "{\"vmmu_trace\":1,\"source\":\"x\"}\n");
    let out = vmmu(&["replay", "--no-kvm", "--format", "ept", trace.to_str().unwrap()]);
    let _ = std::fs::remove_file(&trace);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("the trace has no events"), "{}", text(&out.stdout));
}

/// `--report FILE` on a run that is killed (Ctrl-C, a timeout) leaves an earlier report as it
/// was and creates no empty file: the path is checked at the start, written at the end.
#[test]
fn an_interrupted_run_leaves_the_report_path_alone() {
    let old = temp_file("old-report.html", "<p>an earlier report</p>\n");
    let new = std::env::temp_dir().join(format!("vmmu-hostile-{}-new.html", std::process::id()));
    for path in [&old, &new] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
            .args(["run", "--seconds", "30", "--vcpus", "1", "--report"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vmmu");
        std::thread::sleep(Duration::from_millis(300));
        child.kill().expect("kill vmmu");
        let _ = child.wait();
    }
    let kept = std::fs::read_to_string(&old).unwrap_or_default();
    let _ = std::fs::remove_file(&old);
    let created = new.exists();
    let _ = std::fs::remove_file(&new);
    assert_eq!(kept, "<p>an earlier report</p>\n", "the earlier report was truncated");
    assert!(!created, "an empty report file was left behind");
}

/// A trace's free-text `source` with a terminal escape sequence is printed escaped, not sent to
/// the terminal (it could clear the screen or retitle the window of whoever replays the trace).
#[test]
fn a_traces_source_cannot_drive_the_terminal() {
    let trace = temp_file(
        "escape.trace.jsonl",
        "{\"vmmu_trace\":1,\"source\":\"QEMU\\u001b[2J\\u001b]0;owned\\u0007\"}\n",
    );
    let out = vmmu(&["replay", "--no-kvm", "--format", "ept", trace.to_str().unwrap()]);
    let _ = std::fs::remove_file(&trace);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!stdout.contains('\u{1b}') && !stdout.contains('\u{7}'), "{stdout:?}");
    assert!(stdout.contains("source: QEMU\\u{1b}[2J\\u{1b}]0;owned\\u{7}"), "{stdout}");
}

/// A recorded output whose bad line quotes a terminal escape sequence is reported with it
/// escaped (it reached the terminal raw), and without Rust's `None` in the message.
#[test]
fn a_recordings_bad_line_cannot_drive_the_terminal() {
    let dir = std::env::temp_dir().join(format!("vmmu-hostile-{}-expected", std::process::id()));
    std::fs::create_dir_all(&dir).expect("make a directory");
    std::fs::write(
        dir.join("create_read_write.jsonl"),
        "{\"step\":3,\"op\":\"sl\\u001b[2Jot\",\"result\":\"ok\"}\n",
    )
    .expect("write the recording");
    let scenario = repo("tests/scenarios/create_read_write.scn");
    let out = vmmu(&["diff", "--no-kvm", "--expected", dir.to_str().unwrap(), &scenario]);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!stdout.contains('\u{1b}') && !stdout.contains("None"), "{stdout:?}");
    assert!(stdout.contains("unknown op `sl\\u{1b}[2Jot`"), "{stdout}");
}

/// `vmmu scenario --backend kvm` where `/dev/kvm` is not usable: exit 1 with why, and what to run
/// instead. Checked where KVM is unusable, or as root by dropping to `nobody` with `setpriv`
/// (which cannot open the root-only `/dev/kvm`); skipped elsewhere.
#[test]
fn scenario_on_an_unusable_kvm_says_what_to_run_instead() {
    let scenario = repo("tests/scenarios/create_read_write.scn");
    let args = ["scenario", "--backend", "kvm", scenario.as_str()];
    let out = if vmmu_kvm::probe().is_err() {
        vmmu(&args)
    } else {
        let root = Command::new("id").arg("-u").output().map(|o| text(&o.stdout));
        let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let (Ok("0\n"), Some(setpriv)) = (root.as_deref(), setpriv) else {
            println!("skipped: /dev/kvm is usable here and it cannot be made unusable");
            return;
        };
        Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_vmmu"))
            .args(args)
            .output()
            .expect("run vmmu as nobody")
    };
    let err = text(&out.stderr);
    if err.contains("cannot read") {
        println!("skipped: nobody cannot read the scenario here: {err}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(err.contains("/dev/kvm not usable") && err.contains("`--backend sim`"), "{err}");
}

/// A parse error quoting a megabyte-long "word" of a garbage file shows its start and end, not
/// the whole word (it printed all of it).
#[test]
fn parse_errors_quote_long_words_shortened() {
    let scenario = temp_file("long-word.scn", &format!("vm\nmem b size={}\n", "9".repeat(1 << 20)));
    let trace = temp_file(
        "long-word.trace.jsonl",
        &format!(
            "{{\"vmmu_trace\":1,\"source\":\"x\"}}\n{{\"t\":0.000000,\"op\":\"{}\"}}\n",
            "q".repeat(1 << 20)
        ),
    );
    let s = scenario.to_str().unwrap();
    let t = trace.to_str().unwrap();
    for args in [&["scenario", s][..], &["diff", "--no-kvm", s][..], &["replay", "--no-kvm", t][..]]
    {
        let out = vmmu(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(err.len() < 1000 && err.contains("characters left out"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_file(&scenario);
    let _ = std::fs::remove_file(&trace);
}

/// A file given to the wrong command (a trace to `scenario`, a scenario to `replay`, a recording
/// to `diff`) is still a parse error (exit 2), followed by what the file looks like and which
/// command takes it.
#[test]
fn a_file_for_another_command_says_which() {
    for (args, hint) in [
        (["scenario", &repo("tests/traces/seabios-kvm.small.trace.jsonl")], "`vmmu replay FILE`"),
        (["replay", &repo("tests/scenarios/create_read_write.scn")], "`vmmu scenario FILE`"),
        (["diff", &repo("tests/expected/create_read_write.jsonl")], "recorded output"),
    ] {
        let out = vmmu(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(hint), "{args:?}: {err}");
    }
}

/// `run` is the default command: its options work without it (`vmmu --seconds 0.1` was refused as
/// an unexpected argument), and `vmmu --help` / `--version` stay the top level's.
#[test]
fn run_options_work_without_the_run_command() {
    let out = vmmu(&["--seconds", "0.1", "--vcpus", "1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(v["config"]["vcpus"], 1);
    let out = vmmu(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).starts_with("vmmu "), "{}", text(&out.stdout));
    let help = text(&vmmu(&["--help"]).stdout);
    assert!(help.contains("Commands:") && help.contains("selftest"), "{help}");
}

/// `-` names standard input, as for most tools (it was looked for as a file named `-`).
#[test]
fn a_dash_reads_standard_input() {
    use std::io::Write;
    let scenario = std::fs::read(repo("tests/scenarios/create_read_write.scn")).expect("read");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["scenario", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmmu");
    child.stdin.take().unwrap().write_all(&scenario).expect("feed the scenario");
    let out = child.wait_with_output().expect("collect");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let expected = std::fs::read(repo("tests/expected/create_read_write.jsonl")).expect("read");
    assert_eq!(text(&out.stdout), text(&expected));
}

/// `-` named twice: standard input was read whole for the first, so the second is refused as a
/// bad input (exit 2) saying so, not compared as an empty scenario.
#[test]
fn standard_input_named_twice_is_refused() {
    use std::io::Write;
    let scenario = std::fs::read(repo("tests/scenarios/create_read_write.scn")).expect("read");
    let trace = std::fs::read(repo("tests/traces/hand-aliases-move-delete-rom.trace.jsonl"));
    let trace = trace.expect("read");
    for (args, input) in [
        (&["diff", "--no-kvm", "--no-expected", "-", "-"][..], &scenario),
        (&["replay", "--no-kvm", "--format", "ept", "-", "-"][..], &trace),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmmu");
        child.stdin.take().unwrap().write_all(input).expect("feed the input");
        let out = child.wait_with_output().expect("collect");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("standard input was read already"), "{args:?}: {err}");
    }
}

/// A dirty-log step whose bitmap (256 MiB for a slot of 2^31 - 1 pages) cannot be allocated is
/// a backend failure naming the step and the size (exit 1), not an abort of the whole process
/// ("memory allocation of 268435456 bytes failed", SIGABRT). The saved input's slots fill a
/// 2 GiB address-space limit (the later ones get ENOMEM, as from KVM), leaving no room for it.
#[cfg(target_os = "linux")]
#[test]
fn a_dirty_bitmap_that_cannot_be_allocated_is_a_backend_failure() {
    use std::os::unix::process::CommandExt;
    let input = repo("tests/hostile/sim-dirty-log-bitmap-abort.scn");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmmu"));
    cmd.args(["scenario", &input]);
    // SAFETY: `setrlimit` is async-signal-safe and touches only the child's own limits.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 2 << 30, rlim_max: 2 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run vmmu");
    let err = text(&out.stderr);
    assert!(!err.contains("memory allocation of"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("line 51, `dirty-log`"), "{err}");
    assert!(err.contains("cannot allocate the 256 MiB dirty bitmap of slot 1"), "{err}");
}
