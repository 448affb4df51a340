//! `vmmu scenario`: exit codes, stdout/stderr contract, flag overrides.
mod common;
use common::{kvm_usable, repo, text, vmmu};
use std::path::PathBuf;

fn temp_scenario(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vmmu-cli-{}-{name}.scn", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn parse_error_exits_2_naming_file_line_and_column() {
    let p = temp_scenario("parse", "vm\nmem b size=4K\nread 0 gpa=0x10000001 size=4\n");
    for backend in ["sim", "kvm"] {
        let out = vmmu(&["scenario", p.to_str().unwrap(), "--backend", backend]);
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty(), "nothing runs");
        let err = text(&out.stderr);
        assert!(err.starts_with(&format!("{}:3:12: ", p.display())), "{err}");
        assert!(err.contains("not aligned"), "{err}");
    }
}

#[test]
fn unreadable_file_exits_2() {
    let out = vmmu(&["scenario", "/nonexistent/x.scn", "--backend", "kvm"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read /nonexistent/x.scn"));
}

#[test]
fn a_file_that_is_not_utf8_exits_2_naming_line_and_column() {
    let p = std::env::temp_dir().join(format!("vmmu-cli-{}-latin1.scn", std::process::id()));
    std::fs::write(&p, b"vm\nmem caf\xe9 size=4K\n").unwrap();
    let shown = p.display().to_string();
    for cmd in [&["scenario", &shown][..], &["diff", "--no-kvm", "--no-expected", &shown]] {
        let out = vmmu(cmd);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}");
        let err = text(&out.stderr);
        assert!(err.contains(&format!("{shown}:2:8: not UTF-8 text (byte 0xe9)")), "{err}");
    }
}

#[test]
fn bad_flags_exit_2() {
    let f = repo("tests/scenarios/create_read_write.scn");
    for bad in [
        &["--phys-bits", "60"][..],
        &["--phys-bits", "35"],
        &["--format", "vmx"],
        &["--backend", "qemu"],
        &["--mmio-caching", "yes"],
    ] {
        let mut args = vec!["scenario", f.as_str()];
        args.extend_from_slice(bad);
        assert_eq!(vmmu(&args).status.code(), Some(2), "{bad:?}");
    }
}

#[test]
fn default_backend_is_the_machine_and_prints_what_kvm_recorded() {
    let f = repo("tests/scenarios/create_read_write.scn");
    let want = std::fs::read_to_string(repo("tests/expected/create_read_write.jsonl")).unwrap();
    for extra in [&[][..], &["--format", "npt", "--mmio-caching", "off", "--phys-bits", "36"]] {
        let mut args = vec!["scenario", f.as_str()];
        args.extend_from_slice(extra);
        let out = vmmu(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), want, "{extra:?}");
        let out = vmmu(&[&args[..], &["--backend", "sim"]].concat());
        assert_eq!(text(&out.stdout), want, "{extra:?} with --backend sim");
    }
}

#[test]
fn kvm_run_prints_expected_observations_whatever_the_overrides() {
    if !kvm_usable("skipped") {
        return;
    }
    let f = repo("tests/scenarios/readonly_slot.scn");
    let want = std::fs::read_to_string(repo("tests/expected/readonly_slot.jsonl")).unwrap();
    for extra in [&[][..], &["--format", "npt", "--mmio-caching", "off", "--phys-bits", "36"]] {
        let mut args = vec!["scenario", f.as_str(), "--backend", "kvm"];
        args.extend_from_slice(extra);
        let out = vmmu(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), want);
    }
}

#[test]
fn backend_failure_exits_1_after_printing_what_ran() {
    if !kvm_usable("skipped") {
        return;
    }
    let p = temp_scenario(
        "fail",
        "mem s size=4K\nslot 1 gpa=0x10000000 size=8K mem=s\nread 0 gpa=0x10001000 size=1\n",
    );
    let out = vmmu(&["scenario", p.to_str().unwrap(), "--backend", "kvm"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "{\"step\":2,\"op\":\"slot\",\"result\":\"ok\"}\n");
    assert!(
        text(&out.stderr).contains("failed at step 3 (line 3, `read`)"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn skipped_scenario_exits_0_with_one_line() {
    let Ok(info) = vmmu_kvm::probe() else {
        println!("skipped: /dev/kvm not usable");
        return;
    };
    if info.address_spaces >= 2 {
        println!("skipped: this kernel has an SMM address space, nothing is skipped");
        return;
    }
    let out =
        vmmu(&["scenario", &repo("tests/scenarios/address_spaces_smm.scn"), "--backend", "kvm"]);
    assert_eq!(out.status.code(), Some(0));
    let s = text(&out.stdout);
    assert!(
        s.starts_with("{\"skipped\":\"") && s.ends_with("\"}\n") && s.lines().count() == 1,
        "{s}"
    );
}

/// `--counters` prints the shadow MMU's counters after every step on stderr and leaves the
/// observations on stdout as they are; a TDP machine has none.
#[test]
fn counters_go_to_stderr_one_line_per_step() {
    let f = repo("tests/scenarios/dirty_log_recycled_direct_pages.scn");
    let plain = vmmu(&["scenario", "--format", "shadow", &f]);
    let counted = vmmu(&["scenario", "--format", "shadow", "--counters", &f]);
    assert_eq!(counted.status.code(), Some(0), "{}", text(&counted.stderr));
    assert_eq!(text(&plain.stdout), text(&counted.stdout));
    let stderr = text(&counted.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() > 5, "{stderr}");
    for (i, l) in lines.iter().enumerate() {
        assert!(l.starts_with(&format!("step {} (line ", i + 1)), "{l}");
        assert!(l.contains("): mmu_cache_miss="), "{l}");
    }
    assert!(!lines.last().unwrap_or(&"").contains("mmu_cache_miss=0 "), "{stderr}");
    let tdp = vmmu(&["scenario", "--format", "ept", "--counters", &f]);
    assert!(text(&tdp.stderr).lines().all(|l| l.ends_with("): none")), "{}", text(&tdp.stderr));
}

/// `--inject BUG` re-injects a historical bug into the software machine: `dirty-log-no-flush`
/// leaves the vCPU's writable TLB entry after a collection, the next store is never logged, and
/// the machine's own dirty-log check fails the run (exit 1, naming the lost page) where the
/// same file without the bug prints both collections. On `--backend kvm` it is a bad argument.
#[cfg(feature = "historical-bugs")]
#[test]
fn an_injected_bug_that_loses_a_dirty_page_fails_the_run() {
    let p = temp_scenario(
        "inject",
        "vm format=ept\nmem buf size=8K\nslot 1 gpa=0x10000000 size=8K mem=buf flags=dirty_log\n\
         write 0 gpa=0x10000000 size=8 value=0x1\ndirty-log 1\n\
         write 0 gpa=0x10000000 size=8 value=0x2\ndirty-log 1\n",
    );
    let file = p.to_str().unwrap();
    let clean = vmmu(&["scenario", file]);
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean.stderr));
    assert_eq!(text(&clean.stdout).matches("\"pages\":[\"0x0\"]").count(), 2);
    let out = vmmu(&["scenario", file, "--inject", "dirty-log-no-flush"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("lost dirty pages"), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).matches("dirty-log").count(), 1, "fails at the second");
    let kvm = vmmu(&["scenario", file, "--backend", "kvm", "--inject", "dirty-log-no-flush"]);
    assert_eq!(kvm.status.code(), Some(2), "{}", text(&kvm.stderr));
    let _ = std::fs::remove_file(&p);
}

/// `--inject list` lists the bugs; an unknown name is a bad argument naming the known ones.
#[test]
fn inject_list_and_unknown_names() {
    let out = vmmu(&["scenario", "-", "--inject", "list"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).lines().any(|l| l == "dirty-log-no-flush"), "{}", text(&out.stdout));
    let p = temp_scenario("inject-unknown", "vm\n");
    let out = vmmu(&["scenario", p.to_str().unwrap(), "--inject", "no-such-bug"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no such bug; known:"), "{}", text(&out.stderr));
    let _ = std::fs::remove_file(&p);
}
