//! A real VM recorded now, not a fixture: the trace kit (`../shared/tools/trace`) boots QEMU +
//! SeaBIOS under this host's KVM while ftrace records its memslot requests and MMIO exits, and
//! `vmmu replay` must then replay that fresh trace cleanly under every configuration (and on
//! `/dev/kvm` where usable). Two boots: the plain one, and one migrated (flags-only changes and
//! the dirty-log calls). A recording can differ from the committed ones in timing and in how
//! many VGA writes found the coalesced ring full, which is the point: the replay must hold for
//! any boot the kit records, not for the ones in `tests/traces`.
//!
//! Needs the kit beside the repository, root, tracefs with uprobes, `/dev/kvm`, QEMU and
//! SeaBIOS (the kit's README has the apt line): without any of them the test prints
//! `skipped: <why>` (the kit's own reason: its exit status 77, or 4 when the capture cannot be
//! set up here) and passes. `VMMU_LIVE_CAPTURE=0` skips it too.
mod common;
use common::u;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn kit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tools/trace")
}

/// Why this host cannot record, if it cannot (checked before running the kit, which says the
/// rest itself).
fn cannot_record() -> Option<String> {
    if std::env::var("VMMU_LIVE_CAPTURE").is_ok_and(|v| v == "0") {
        return Some("VMMU_LIVE_CAPTURE=0".into());
    }
    let script = kit().join("boot-seabios.sh");
    if !script.exists() {
        return Some(format!("the trace kit is not at {}", kit().display()));
    }
    None
}

/// Records `variant` into `dir`; `Err(why)` when the kit says a prerequisite is missing or the
/// capture cannot be set up on this host, or when the capture lost events twice in a row (the
/// host's ftrace ring buffer filled up under load): conditions of the host, not of the trace or
/// the replay.
fn record(variant: &str, dir: &Path) -> Result<PathBuf, String> {
    for attempt in 1..=2 {
        let out = Command::new("bash")
            .arg(kit().join("boot-seabios.sh"))
            .args(["--variant", variant, "--timeout", "120"])
            .arg(dir)
            .output()
            .expect("run the trace kit");
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            // 77: a prerequisite is missing; 4: the capture could not be set up on this host
            // (no uprobes, no KVM tracepoints, tracefs not writable); the kit says which.
            Some(77) | Some(4) => {
                // The capture's own reason when it gave one, else the kit's last word.
                let said = |p: &str| stderr.lines().rev().find(|l| l.starts_with(p));
                let why = said("ftrace-capture:")
                    .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
                    .unwrap_or("");
                return Err(why.trim().to_string());
            }
            // 0: QEMU exited by itself; 124: stopped by the timeout, the capture converted anyway.
            Some(0) | Some(124) => return Ok(dir.join(format!("{variant}-kvm.trace.jsonl"))),
            // The kit's status for a capture that lost events: it converts nothing.
            Some(3) if attempt == 1 => println!("{variant}: the capture lost events; once more"),
            Some(3) => {
                let why = "the capture lost events twice (ftrace's ring buffer filled up)";
                return Err(format!("{variant}: {why}"));
            }
            other => panic!("the trace kit failed ({other:?}) recording {variant}:\n{stderr}"),
        }
    }
    unreachable!("the second attempt returns")
}

/// `vmmu replay --json` on `trace`, every configuration, `/dev/kvm` where usable.
fn replay(trace: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["replay", "--json"])
        .arg(trace)
        .output()
        .expect("run vmmu replay");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let t = doc["traces"][0].clone();
    assert_eq!(out.status.code(), Some(0), "{} did not replay cleanly: {t:#}", trace.display());
    t
}

#[test]
fn a_boot_recorded_now_replays_cleanly() {
    if let Some(why) = cannot_record() {
        println!("skipped: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmmu-live-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    for variant in ["seabios", "migrate"] {
        let trace = match record(variant, &dir) {
            Ok(t) => t,
            Err(why) => {
                println!("skipped: {why}");
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
        };
        let t = replay(&trace);
        assert_eq!(u(&t["lost_events"]), 0, "{t:#}");
        let events = &t["events"];
        assert!(u(&events["slot"]) >= 20, "a SeaBIOS boot makes dozens of slot requests: {t:#}");
        assert!(u(&events["mmio"]) >= 1000, "and thousands of MMIO accesses: {t:#}");
        for r in t["runs"].as_array().expect("runs") {
            assert_eq!(u(&r["mmio"]["classified_mmio"]), u(&events["mmio"]), "{r:#}");
            if variant == "migrate" {
                let d = &r["dirty_log"];
                assert!(u(&d["get"]) > 0 && u(&d["refused"]) == 0, "{d:#}");
                assert!(u(&r["slots"]["flags_only"]) > 0, "logging on and off: {r:#}");
            }
        }
        println!(
            "{variant}: {} slot requests, {} MMIO events, {} dirty-log calls; kvm: {}",
            events["slot"],
            events["mmio"],
            u(&events["get-dirty-log"]) + u(&events["clear-dirty-log"]),
            t["kvm"]["skipped"].as_str().unwrap_or("ran")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
