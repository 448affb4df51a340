//! `vmmu replay`: the committed recordings of real VM boots replay cleanly on every machine
//! configuration; malformed traces exit 2 naming file and line; refusals and misclassifications
//! exit 1. The software machine always runs; `/dev/kvm` joins only in the test that asks for it.
mod common;
use common::{kvm_usable, repo, temp_file, text, u, vmmu};
use serde_json::Value;
use std::path::PathBuf;

/// Runs `vmmu replay --json --no-kvm` on `file`; returns the exit code and the trace's report.
fn replay_json(file: &str, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec!["replay", "--json", "--no-kvm"];
    args.extend_from_slice(extra);
    args.push(file);
    let out = vmmu(&args);
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&out.stdout), text(&out.stderr)));
    (out.status.code(), doc["traces"][0].clone())
}

fn assert_clean(file: &str) -> Value {
    let (code, t) = replay_json(file, &[]);
    assert_eq!(code, Some(0), "{t:#}");
    let runs = t["runs"].as_array().expect("runs");
    let names: Vec<&str> = runs.iter().map(|r| r["config"].as_str().unwrap()).collect();
    assert_eq!(names, ["ept-on", "ept-off", "npt-on", "npt-off", "shadow-on", "shadow-off"]);
    for r in runs {
        let c = &r["config"];
        if c.as_str().is_some_and(|c| c.starts_with("shadow"))
            && t["source"].as_str().is_some_and(|s| s.contains("kvm.tdp_mmu=N"))
        {
            // The recording KVM shadowed the guest's tables, as this MMU does: a memslot
            // delete or move is a fast zap-all on both, and so is an MMIO generation wrap, one
            // for one, request by request.
            let z = &r["zaps"];
            assert_eq!(z["per_request"], true, "{c}: {z:#}");
            assert_eq!(u(&z["requests_differing"]), 0, "{c}: {z:#}");
            assert_eq!(z["zap_all_fast_total"], z["recorded_zap_all_fast"], "{c}: {z:#}");
            assert_eq!(u(&z["zap_range"]), 0, "{c}: {z:#}");
        }
        assert_eq!(u(&r["slots"]["refused"]), 0, "{c}: {:#}", r["slots"]);
        assert_eq!(u(&r["slots"]["applied"]), u(&t["events"]["slot"]), "{c}");
        let d = &r["dirty_log"];
        let calls = u(&t["events"]["get-dirty-log"]) + u(&t["events"]["clear-dirty-log"]);
        assert_eq!((u(&d["accepted"]), u(&d["refused"])), (calls, 0), "{c}: {d:#}");
        assert_eq!(u(&r["mmio"]["misclassified"]), 0, "{c}: {:#}", r["mmio"]);
        // An access that raced the slot request before it (another vCPU's, while the request
        // was in flight) is neither: only in a recording of several vCPU threads.
        let raced = u(&r["mmio"]["raced_slot_request"]);
        assert!(raced == 0 || u(&t["vcpu_threads"]) > 1, "{c}: raced with one vCPU thread");
        assert_eq!(u(&r["mmio"]["classified_mmio"]) + raced, u(&t["events"]["mmio"]), "{c}");
        assert_eq!(u(&r["oracle"]["violations"]), 0, "{c}: {:#}", r["oracle"]);
        assert!(u(&r["oracle"]["checked"]) > 0, "{c}: the replay's own accesses ran");
        let applied = u(&r["events_applied"]);
        let total: u64 = t["events"].as_object().unwrap().values().map(u).sum();
        assert_eq!(applied, total, "{c}: every event applied or counted");
    }
    assert_eq!(t["kvm"]["skipped"], "--no-kvm");
    t
}

/// Every committed trace, whether a test below names it or not (a recording added to
/// `tests/traces` is checked the moment it lands).
#[test]
fn every_committed_trace_replays_cleanly() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("tests/traces"))
        .expect("tests/traces")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".trace.jsonl"))
        .collect();
    files.sort();
    assert!(files.len() >= 19, "{files:?}");
    for f in &files {
        assert_clean(&f.to_string_lossy());
    }
}

/// The hand-made traces of `tests/traces-outside/` (an outside tester wrote them from traces.md
/// alone: moves, flags-only changes, address space 1, dirty-log ranges, slot edges, read-only
/// slots, and malformed files) get the verdict `EXPECTED` gives, and every configuration of the
/// machine names the same first line.
#[test]
fn outside_traces_get_the_verdicts_traces_md_requires() {
    let dir = repo("tests/traces-outside");
    let expected = std::fs::read_to_string(format!("{dir}/EXPECTED")).expect("EXPECTED");
    let mut n = 0;
    for row in expected.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let mut w = row.split_whitespace();
        let (file, verdict, line) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
        let path = format!("{dir}/{file}");
        let out = vmmu(&["replay", "--no-kvm", "--json", &path]);
        let code = out.status.code();
        if verdict == "malformed" {
            assert_eq!(code, Some(2), "{file}: {}", text(&out.stdout));
            let err = text(&out.stderr);
            assert!(err.contains(&format!("{file}:{line}:")), "{file}: {err}");
            n += 1;
            continue;
        }
        let want = match verdict {
            "pass" => 0,
            "fail" => 1,
            "untrusted" => 3,
            v => panic!("EXPECTED: {file}: unknown verdict {v}"),
        };
        assert_eq!(code, Some(want), "{file}: {}", text(&out.stderr));
        let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
        let runs = doc["traces"][0]["runs"].as_array().expect("runs");
        assert_eq!(runs.len(), 6, "{file}: every configuration ran");
        for r in runs {
            let mut lines: Vec<u64> = Vec::new();
            for k in [&r["slots"]["first_refusals"], &r["mmio"]["first_misclassified"]] {
                lines.extend(k.as_array().unwrap().iter().map(|x| u(&x["line"])));
            }
            for d in r["dirty_log"]["first_refusals"].as_array().unwrap() {
                let d = d.as_str().unwrap();
                let at = d.strip_prefix("line ").and_then(|d| d.split(':').next());
                lines.push(at.and_then(|l| l.parse().ok()).expect(d));
            }
            let first = lines.into_iter().min().map_or("-".to_string(), |l| l.to_string());
            assert_eq!(first, line, "{file}: {}", r["config"]);
        }
        n += 1;
    }
    assert!(n >= 39, "{n} traces checked");
}

/// Two vCPUs, one reading the flash while the other takes it away and back 1500 times: the
/// reads recorded after the request that re-created the flash's slot (the kit stamps a request
/// when it starts; KVM installed the slot after those reads) are counted as raced on every
/// configuration, and the rest of the trace is clean (hunt 43r L1: it failed with 903
/// misclassified). On KVM the same reads reach memory and are counted as raced too.
#[test]
fn a_two_vcpu_recording_racing_slot_re_creations_replays_cleanly() {
    let file = repo("tests/traces/pflashsmp-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    assert_eq!(u(&t["vcpu_threads"]), 2);
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(u(&r["mmio"]["raced_slot_request"]), 903, "{}", r["config"]);
        let first = &r["mmio"]["first_raced"][0];
        assert_eq!(first["gpa"], "0xfffc0010", "{first}");
    }
    let out = vmmu(&["replay", "--json", "--format", "ept", "--mmio-caching", "on", &file]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    if let Some(k) = kvm_half_that_ran(&doc["traces"][0]) {
        assert_eq!(u(&k["mmio_not_mmio"]), 0, "{k:#}");
        assert!(u(&k["mmio_raced"]) > 0, "{k:#}");
    }
}

/// A real recording of a guest that died (hunt 44r): four vCPUs, an AP fetched its next
/// instruction from the RAM slot QEMU was re-creating, KVM failed to emulate it and QEMU paused
/// the VM. The MMU's verdict is clean; the warning says that the recorded guest stopped there.
#[test]
fn a_recorded_vm_that_died_is_named_in_the_warnings() {
    let t = assert_clean(&repo("tests/traces/apfetch-smp4-kvm.cut.trace.jsonl"));
    assert_eq!(u(&t["vcpu_threads"]), 4);
    let warnings: Vec<&str> =
        t["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    let stopped = "the recorded VM stopped on KVM_EXIT_INTERNAL_ERROR (1)";
    assert!(warnings.iter().any(|w| w.starts_with(stopped)), "{warnings:?}");
    // A recording of eight vCPUs whose guest ran to its end: no such warning.
    let t = assert_clean(&repo("tests/traces/pamsmp8-kvm.small.trace.jsonl"));
    assert_eq!(u(&t["vcpu_threads"]), 8);
    let warnings = t["warnings"].as_array().unwrap();
    assert!(!warnings.iter().any(|w| w.as_str().unwrap().contains("stopped on")), "{warnings:?}");
}

/// OVMF on q35, as far as the recording host ran it: its code flash a read-only slot just
/// below 4 GiB, its variable store beside it, and q35's low RAM split around the legacy holes.
#[test]
fn ovmf_firmware_map_replays_cleanly() {
    let file = repo("tests/traces/ovmf-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    assert_eq!(u(&t["events"]["slot"]), 12);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(r#""flags":["readonly"],"gpa":"0xffc84000""#), "the code flash");
}

#[test]
fn seabios_boot_replays_cleanly() {
    let t = assert_clean(&repo("tests/traces/seabios-kvm.small.trace.jsonl"));
    assert_eq!(u(&t["events"]["slot"]), 48);
    for r in t["runs"].as_array().unwrap() {
        // Every delete on the recording host was followed by its zap_all_fast.
        assert_eq!(r["zaps"]["recorded_after_delete"], r["zaps"]["deletes_and_moves"]);
        // SeaBIOS stays below 4 GiB: under the shadow MMU the guest runs without paging, on a
        // special root, as it did on the recording host.
        let shadow = r["config"].as_str().is_some_and(|c| c.starts_with("shadow"));
        let guest = r["guest"].as_str().unwrap_or("");
        assert_eq!(shadow, guest.contains("special root"), "{}: {guest}", r["config"]);
    }
}

/// QEMU q35 with `-m 4608`: RAM split at 2 GiB and 4 GiB (the second part above 4 GiB), the
/// TSEG slot made and dropped, and PCIe config space through MMCONFIG at `0xb0000000` (MMIO).
#[test]
fn q35_boot_with_ram_above_4_gib_replays_cleanly() {
    let file = repo("tests/traces/q35-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    assert_eq!(u(&t["events"]["slot"]), 51);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"gpa\":\"0x100000000\",\"size\":\"0xa0000000\""), "RAM above 4 GiB");
    assert!(text.contains("\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xb00"), "MMCONFIG reads");
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(r["zaps"]["recorded_after_delete"], r["zaps"]["deletes_and_moves"]);
        assert_eq!(u(&r["phys_bits"]), 46);
        // RAM above 4 GiB: under the shadow MMU the guest needs paging to reach it.
        let shadow = r["config"].as_str().is_some_and(|c| c.starts_with("shadow"));
        let guest = r["guest"].as_str().unwrap_or("");
        assert_eq!(
            shadow,
            guest.contains("long mode, identity-mapped"),
            "{}: {guest}",
            r["config"]
        );
    }
}

/// A boot sector sets VGA mode 13h: QEMU maps VRAM at `0xa0000` as a dirty-logged slot (chain-4)
/// and drops it again as the mode changes, over the range that is VGA MMIO in text mode, and
/// reads the slot's dirty log for display updates (no migration).
#[test]
fn vga_mode_13h_maps_vram_at_0xa0000_and_replays_cleanly() {
    let file = repo("tests/traces/vga13-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    let vram = "\"flags\":[\"dirty_log\"],\"gpa\":\"0xa0000\",\"size\":\"0x10000\"";
    assert!(text.matches(vram).count() >= 2, "VRAM mapped at 0xa0000 more than once");
    for r in t["runs"].as_array().unwrap() {
        let d = &r["dirty_log"];
        assert_eq!(u(&d["get"]), u(&t["events"]["get-dirty-log"]));
        assert!(u(&d["get"]) > 0);
        assert_eq!(u(&d["refused"]), 0, "{d:#}");
        assert!(u(&r["own_accesses"]["hole_reads"]) > 0, "0xa0000 probed while unmapped");
    }
}

/// A boot sector on a Cirrus VGA (recorded with `scripts/regen-traces cirrus`) turns on extended
/// mode, so QEMU maps a 64 KiB window into VRAM at `0xa0000`: a dirty-logged slot over the same
/// buffer as the linear framebuffer BAR at `0xfc000000`. Moving the window's offset 64 times
/// deletes it and re-creates it 4 KiB further into that buffer, so the same gpa is backed by a
/// different host page after each create, and the display's dirty-log reads go in between.
#[test]
fn cirrus_vram_window_moving_through_its_buffer_replays_cleanly() {
    let file = repo("tests/traces/cirrus-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    let events: Vec<Value> =
        text.lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    // The `uaddr` of every dirty-logged slot request at `gpa` of `size`.
    let logged = |gpa: &str, size: &str| -> Vec<u64> {
        let logged = serde_json::json!(["dirty_log"]);
        let at = |e: &&Value| e["op"] == "slot" && e["gpa"] == gpa && e["size"] == size;
        let hex = |e: &Value| {
            let uaddr = e["uaddr"].as_str().unwrap();
            u64::from_str_radix(uaddr.trim_start_matches("0x"), 16).unwrap()
        };
        events.iter().filter(at).filter(|e| e["flags"] == logged).map(hex).collect()
    };
    let lfb_uaddr = *logged("0xfc000000", "0x400000").first().expect("the linear framebuffer slot");
    let offsets: std::collections::BTreeSet<u64> =
        logged("0xa0000", "0x10000").into_iter().map(|u| u - lfb_uaddr).collect();
    assert_eq!(offsets.len(), 64, "64 windows, each at its own offset into VRAM: {offsets:?}");
    assert!(offsets.iter().all(|o| o % 0x1000 == 0 && o + 0x10000 <= 0x400000), "{offsets:?}");
    for r in t["runs"].as_array().unwrap() {
        let d = &r["dirty_log"];
        assert_eq!((u(&d["get"]), u(&d["refused"])), (63, 0), "{d:#}");
        assert!(u(&r["own_accesses"]["alias_reads"]) > 0, "the window and the BAR are aliases");
    }
}

/// A boot sector moves the VGA's VRAM BAR (a 16 MiB dirty-logged slot) from `0xfd000000` to
/// `0xe0000000` and back 8 times through PCI config space, and turns its memory decoding off and
/// on (`scripts/regen-traces barmove`). Each move is a delete and a create; between them the
/// guest reads and writes the place the BAR left, so the recording holds MMIO accesses at gpas
/// that are RAM just before and just after: a stale translation makes the recorded access reach
/// RAM, a stale "this is MMIO" makes the replay's probe of the re-created slot exit.
#[test]
fn a_bar_moved_away_and_back_replays_cleanly() {
    let file = repo("tests/traces/barmove-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    for gpa in ["0xe0000000", "0xfd000000"] {
        let slot = format!(r#""flags":["dirty_log"],"gpa":"{gpa}","size":"0x1000000""#);
        let mmio = format!(r#""op":"mmio","dir":"read","gpa":"{gpa}""#);
        assert!(text.matches(&slot).count() >= 8, "the BAR at {gpa} 8 times or more");
        assert!(text.matches(&mmio).count() >= 8, "reads at {gpa} while the BAR is elsewhere");
    }
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(u(&r["dirty_log"]["refused"]), 0, "{r:#}");
        assert!(u(&r["own_accesses"]["hole_reads"]) > 0, "{r:#}");
    }
}

/// SeaBIOS runs iPXE's e1000 option ROM (`scripts/regen-traces ipxe`): the 256 KiB ROM BAR at
/// `0xfeb80000` mapped read-only while SeaBIOS copies it, and iPXE reading VGA text memory back
/// (thousands of reads that exit to QEMU, where the firmware boots only write).
#[test]
fn ipxe_option_rom_and_vga_text_reads_replay_cleanly() {
    let file = repo("tests/traces/ipxe-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(r#""flags":["readonly"],"gpa":"0xfeb80000","size":"0x40000""#));
    let reads = text.matches(r#""op":"mmio","dir":"read","gpa":"0xb8"#).count();
    assert!(reads > 1000, "VGA text reads: {reads}");
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(r["zaps"]["recorded_after_delete"], r["zaps"]["deletes_and_moves"]);
    }
}

#[test]
fn migration_replays_cleanly_and_applies_its_dirty_log_calls() {
    let t = assert_clean(&repo("tests/traces/migrate-kvm.small.trace.jsonl"));
    for r in t["runs"].as_array().unwrap() {
        let d = &r["dirty_log"];
        assert_eq!(u(&d["get"]), u(&t["events"]["get-dirty-log"]));
        assert_eq!(u(&d["clear"]), u(&t["events"]["clear-dirty-log"]));
        assert!(u(&d["get"]) > 0);
        assert_eq!(d["applied"], true);
        assert_eq!(u(&d["refused"]), 0, "the core accepts every call KVM accepted: {d:#}");
        assert!(u(&d["pages"]) > 0, "the replay's own writes are in the collections: {d:#}");
        assert!(d["note"].as_str().unwrap().contains("manual protect"));
        assert!(u(&r["slots"]["flags_only"]) >= 16, "dirty logging on and off for every slot");
    }
}

/// QEMU pc-i440fx with `-m 1G,slots=4,maxmem=4G` and a 256 MiB pc-dimm, recorded with the kit:
/// after SeaBIOS, two pc-dimms hotplugged through the HMP monitor (slots created at run time at
/// `0x110000000` and `0x130000000`, above the boot's own RAM), then a migration that logs every
/// slot, the hotplugged ones too.
#[test]
fn memory_hotplug_then_migration_replays_cleanly() {
    let file = repo("tests/traces/hotplug-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    assert_eq!(u(&t["events"]["slot"]), 60);
    let text = std::fs::read_to_string(&file).unwrap();
    for gpa in ["0x110000000", "0x130000000"] {
        let dirty = format!("\"flags\":[\"dirty_log\"],\"gpa\":\"{gpa}\"");
        assert!(text.contains(&dirty), "{gpa} is logged during the migration");
    }
    for r in t["runs"].as_array().unwrap() {
        let d = &r["dirty_log"];
        assert_eq!((u(&d["get"]), u(&d["clear"]), u(&d["refused"])), (24, 19, 0), "{d:#}");
        assert_eq!(u(&r["slots"]["flags_only"]), 22, "logging on and off for 11 slots");
    }
}

/// QEMU q35 with `-m 5G` and two vCPUs, recorded with the kit: SeaBIOS, then a migration that
/// logs 3 GiB of RAM above 4 GiB and clears it in 1 GiB calls (`first_page` 0, 2^18, 2^19). The
/// replay warns that v1 does not say which of the two vCPUs made an access, and still passes:
/// every recorded access was outside every live slot, whichever vCPU made it.
#[test]
fn two_vcpu_q35_migration_with_ram_above_4_gib_replays_cleanly() {
    let file = repo("tests/traces/q35mig-smp2-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    assert_eq!(u(&t["vcpu_threads"]), 2);
    let warnings = t["warnings"].to_string();
    assert!(warnings.contains("2 vCPU threads recorded"), "{warnings}");
    let text = std::fs::read_to_string(&file).unwrap();
    let high = r#""flags":["dirty_log"],"gpa":"0x100000000","size":"0xc0000000""#;
    assert!(text.contains(high), "RAM above 4 GiB is logged");
    assert!(text.contains(r#""id":1,"first_page":524288,"num_pages":262144"#), "its last GiB");
    for r in t["runs"].as_array().unwrap() {
        let d = &r["dirty_log"];
        assert_eq!((u(&d["get"]), u(&d["clear"]), u(&d["refused"])), (30, 20, 0), "{d:#}");
        assert_eq!(u(&r["slots"]["flags_only"]), 18, "logging on and off for 9 slots");
        let shadow = r["config"].as_str().is_some_and(|c| c.starts_with("shadow"));
        let guest = r["guest"].as_str().unwrap_or("");
        assert_eq!(shadow, guest.contains("identity-mapped"), "{}: {guest}", r["config"]);
    }
}

/// QEMU pc-i440fx with `max-ram-below-4g=2047M` and `-m 3G`, recorded with the kit: RAM below
/// 4 GiB ends at `0x7ff00000` and the rest starts at 4 GiB 1 MiB into its 2 MiB block of the
/// VMM's buffer, so no 2 MiB mapping can cover RAM at 4 GiB (guest and host offsets differ) and
/// the last 2 MiB block of each part is partly outside its slot.
#[test]
fn ram_split_off_2_mib_alignment_replays_cleanly() {
    let file = repo("tests/traces/below4g-odd-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"gpa\":\"0x0\",\"size\":\"0x7ff00000\""));
    assert!(text
        .contains("\"gpa\":\"0x100000000\",\"size\":\"0x40100000\",\"uaddr\":\"0x7fa02d100000\""));
    for r in t["runs"].as_array().unwrap() {
        if r["config"].as_str().is_some_and(|c| c.starts_with("shadow")) {
            assert!(r["guest"].as_str().unwrap_or("").contains("long mode"), "{}", r["guest"]);
        }
    }
}

/// KVM traces MMIO as its emulator's fragments: a 4-byte store across a page boundary is two
/// events (1 + 3 bytes at `0xb8fff`, 3 + 1 at `0xb9ffd`) and a 16-byte SSE store (`movdqu`) is
/// one. Recorded with the kit (a boot sector writing VGA text memory) and cut to the MMIO exits,
/// the first in-kernel accesses and the boot sector's; it was refused as malformed before.
#[test]
fn page_split_and_sse_mmio_accesses_replay_cleanly() {
    let file = repo("tests/traces/vgasplit-kvm.cut.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    for ev in [
        "\"gpa\":\"0xb8fff\",\"len\":1,",
        "\"gpa\":\"0xb9000\",\"len\":3,",
        "\"gpa\":\"0xb9ffd\",\"len\":3,",
        "\"gpa\":\"0xba000\",\"len\":1,",
        "\"gpa\":\"0xb8100\",\"len\":16,",
    ] {
        assert!(text.contains(ev), "{ev}");
    }
    assert!(u(&t["kernel_mmio_dropped"]) > 0);
}

/// QEMU q35 with `-m 6G` and an `ivshmem-plain` device over a 4 GiB memory backend: SeaBIOS
/// places its RAM BAR at 8 GiB, above the RAM at 4 GiB, and QEMU makes it a slot of its own
/// buffer mid-boot. The KVM half's guest window must go above both.
#[test]
fn ivshmem_ram_bar_at_8_gib_replays_cleanly() {
    let file = repo("tests/traces/ivshmem-bar-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    assert_eq!(u(&t["events"]["slot"]), 52);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"gpa\":\"0x100000000\",\"size\":\"0x100000000\""), "RAM at 4 GiB");
    assert!(text.contains("\"gpa\":\"0x200000000\",\"size\":\"0x100000000\""), "the BAR");
    for r in t["runs"].as_array().unwrap() {
        assert!(u(&r["own_accesses"]["reads"]) > 0, "{:#}", r["own_accesses"]);
    }
}

/// A Linux kernel's early boot (Debian's 6.1 cloud kernel through `-kernel`, no initrd), recorded
/// with the kit's `ftrace-capture.sh` until the recording host's instruction emulator stopped it:
/// after SeaBIOS, the kernel clears VGA text memory, reads the screen back, programs the IOAPIC
/// and the LAPIC (in-kernel devices) and touches the HPET (exits to QEMU). Cut by hand like
/// `vgasplit`: every slot, zap and user-exit MMIO event and every in-kernel access outside VGA
/// low memory, but only the first 2000 in-kernel VGA writes.
#[test]
fn linux_early_boot_replays_cleanly() {
    let file = repo("tests/traces/linux-kvm.cut.trace.jsonl");
    let t = assert_clean(&file);
    assert_eq!(u(&t["events"]["slot"]), 35);
    assert!(u(&t["kernel_mmio_dropped"]) > 0);
    let text = std::fs::read_to_string(&file).unwrap();
    let count = |needle: &str| text.matches(needle).count();
    let ioapic = "\"op\":\"mmio\",\"dir\":\"write\",\"gpa\":\"0xfec00";
    assert!(count(ioapic) > 300, "IOAPIC programming");
    assert!(count("\"gpa\":\"0xfed00") > 20, "HPET registers");
    assert!(count("\"gpa\":\"0xfee00") > 5, "LAPIC registers");
    for r in t["runs"].as_array().unwrap() {
        // The kernel runs below 4 GiB, as SeaBIOS did: the shadow MMU's guest needs no paging.
        if r["config"].as_str().is_some_and(|c| c.starts_with("shadow")) {
            assert!(r["guest"].as_str().unwrap_or("").contains("special root"), "{}", r["guest"]);
        }
        assert_eq!(r["zaps"]["recorded_after_delete"], r["zaps"]["deletes_and_moves"]);
    }
}

/// A real VM writing to a read-only slot (`scripts/regen-traces romwrite`): a boot sector enters
/// protected mode and writes into the BIOS ROM at `0xfffc0000`, which QEMU maps read-only; each
/// write exits to QEMU, which drops it. The ROM writes are a byte, a word, a dword, the second
/// halves of two dwords that cross a page (one from the ROM's own previous page, one from the
/// unmapped page below the ROM) and four of `rep stosl`: nine in the file, all classified as
/// emulated writes to a read-only slot, none as RAM. (KVM exits to QEMU for each fragment of a
/// split write but traces both before the first exit; the kit's converter pairs that exit with
/// the second fragment and files the first as an in-kernel access, which the reduction dropped.)
#[test]
fn writes_into_the_bios_rom_replay_as_read_only_slot_writes() {
    let file = repo("tests/traces/romwrite-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    for ev in [
        "\"dir\":\"write\",\"gpa\":\"0xfffff000\",\"len\":1,\"value\":\"0x5a\"",
        "\"dir\":\"write\",\"gpa\":\"0xfffc0000\",\"len\":2,",
        "\"dir\":\"read\",\"gpa\":\"0xfffbfffc\",\"len\":4,",
        "\"dir\":\"write\",\"gpa\":\"0xfffff10c\",\"len\":4,",
    ] {
        assert!(text.contains(ev), "{ev}");
    }
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(u(&r["mmio"]["readonly_writes"]), 9, "{}: {:#}", r["config"], r["mmio"]);
    }
}

/// A real VM's BIOS flash (`scripts/regen-traces pflash`): QEMU maps a pflash device as a
/// read-only slot while the flash is in array mode. The guest's CFI commands are writes to that
/// read-only slot (emulated, six of them); each takes the flash out of array mode, so QEMU
/// deletes the slot and the flash's reads that follow exit as MMIO, until the read-array command
/// makes QEMU create the slot again: the same range read-only slot, no slot, read-only slot,
/// six times over, with accesses checked in each state.
#[test]
fn a_flash_leaving_and_entering_array_mode_replays_cleanly() {
    let file = repo("tests/traces/pflash-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    let flash = "\"gpa\":\"0xfffc0000\",\"size\":\"0x40000\"";
    let created = text.matches(&format!("\"flags\":[\"readonly\"],{flash}")).count();
    let deleted = text.matches("\"gpa\":\"0xfffc0000\",\"size\":\"0x0\"").count();
    assert_eq!((created, deleted), (7, 6), "created at boot, then deleted and re-created 6 times");
    assert!(text.contains("\"dir\":\"read\",\"gpa\":\"0xfffc0020\",\"len\":1,"), "CFI query read");
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(u(&r["mmio"]["readonly_writes"]), 6, "{}: {:#}", r["config"], r["mmio"]);
    }
}

/// The flash of `pflash` toggled in a loop while QEMU migrates (`scripts/regen-traces
/// pflashmig`): the flash's read-only slot is deleted and re-created over a hundred times, once
/// with `dirty_log` and `readonly` together while logging is on for the migration (KVM accepts
/// the pair, and no guest write can dirty such a slot), among the flags-only changes and
/// dirty-log calls of the migration itself.
#[test]
fn a_flash_toggled_during_a_migration_replays_cleanly() {
    let file = repo("tests/traces/pflashmig-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    let logged_rom = "\"flags\":[\"dirty_log\",\"readonly\"],\"gpa\":\"0xfffc0000\"";
    assert!(text.contains(logged_rom), "the flash re-created while logging is on");
    assert!(u(&t["events"]["slot"]) > 300, "{:#}", t["events"]);
    for r in t["runs"].as_array().unwrap() {
        let (s, d) = (&r["slots"], &r["dirty_log"]);
        assert!(u(&s["deletes"]) > 100 && u(&s["flags_only"]) >= 16, "{}: {s:#}", r["config"]);
        assert_eq!(u(&d["get"]) + u(&d["clear"]), u(&d["on_logged_slot"]), "{d:#}");
        assert!(u(&r["mmio"]["readonly_writes"]) > 100, "{:#}", r["mmio"]);
    }
}

/// A real VM's long-mode MMIO at 72 GiB, above the 64 GiB the KVM half identity-maps
/// (`scripts/regen-traces mmio64`): 8-byte loads and stores, the second fragments of stores KVM
/// split at a page boundary, the read and write of a locked read-modify-write (`xchg`, `lock
/// inc`), and `rep movsq` from MMIO to MMIO as alternating 8-byte reads and writes.
#[test]
fn long_mode_mmio_at_72_gib_replays_cleanly() {
    let file = repo("tests/traces/mmio64-kvm.small.trace.jsonl");
    assert_clean(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    for ev in [
        "\"dir\":\"write\",\"gpa\":\"0x1200000100\",\"len\":8,\"value\":\"0x1122334455667788\"",
        "\"dir\":\"read\",\"gpa\":\"0x1200000100\",\"len\":8,",
        "\"dir\":\"write\",\"gpa\":\"0x1200002000\",\"len\":1,",
        "\"dir\":\"read\",\"gpa\":\"0x1200003004\",\"len\":4,",
        "\"dir\":\"write\",\"gpa\":\"0x1200003004\",\"len\":4,\"value\":\"0x1\"",
        "\"dir\":\"read\",\"gpa\":\"0x1200004010\",\"len\":8,",
        "\"dir\":\"write\",\"gpa\":\"0x1200005010\",\"len\":8,",
    ] {
        assert!(text.contains(ev), "{ev}");
    }
}

#[test]
fn hand_written_trace_covers_aliases_move_delete_and_rom_writes() {
    let t = assert_clean(&repo("tests/traces/hand-aliases-move-delete-rom.trace.jsonl"));
    for r in t["runs"].as_array().unwrap() {
        let s = &r["slots"];
        assert_eq!((u(&s["moves"]), u(&s["deletes"]), u(&s["flags_only"])), (1, 1, 1));
        assert_eq!(u(&r["mmio"]["readonly_writes"]), 2, "writes to the ROM and its alias");
        assert!(u(&r["own_accesses"]["alias_reads"]) > 0);
        assert!(u(&r["own_accesses"]["hole_reads"]) > 0, "moved and deleted ranges are probed");
    }
}

#[test]
fn flags_pin_the_configuration_and_text_output_names_each_run() {
    let f = repo("tests/traces/hand-aliases-move-delete-rom.trace.jsonl");
    let (code, t) = replay_json(&f, &["--format", "npt", "--mmio-caching", "off"]);
    assert_eq!(code, Some(0));
    assert_eq!(t["runs"].as_array().unwrap().len(), 1);
    assert_eq!(t["runs"][0]["config"], "npt-off");
    let out = vmmu(&["replay", "--no-kvm", "--format", "ept", &f]);
    assert_eq!(out.status.code(), Some(0));
    let s = text(&out.stdout);
    assert!(s.starts_with("PASS "), "{s}");
    assert!(s.contains("sim-ept-on [ok]") && s.contains("sim-ept-off [ok]"), "{s}");
    assert!(s.contains("kvm: skipped: --no-kvm"), "{s}");
}

const HEADER: &str = "{\"vmmu_trace\":1,\"source\":\"test\"}\n";
const RAM: &str = "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x100000\",\"uaddr\":\"0x7f0000000000\"}\n";

#[test]
fn malformed_traces_exit_2_naming_file_and_line() {
    let cases = [
        ("version", "{\"vmmu_trace\":2,\"source\":\"x\"}\n".to_string(), 1, "version 1"),
        (
            "order",
            format!("{HEADER}{}", RAM.replace("\"as\":0,\"id\":0", "\"id\":0,\"as\":0")),
            2,
            "keys",
        ),
        ("hex", format!("{HEADER}{}", RAM.replace("0x100000", "0x0100000")), 2, "leading zeros"),
        ("upper", format!("{HEADER}{}", RAM.replace("0x100000", "0x10000A")), 2, "lowercase"),
        (
            "op",
            format!(
                "{HEADER}{RAM}{}",
                RAM.replace("0.000000", "0.000001").replace("slot", "teleport")
            ),
            3,
            "unknown op",
        ),
        ("time", format!("{HEADER}{RAM}{}", RAM.replace("0.000000", "0.5")), 3, "six decimals"),
        ("json", format!("{HEADER}{RAM}{{\"t\":\n"), 3, "JSON"),
    ];
    for (name, contents, line, want) in cases {
        let p = temp_file(&format!("{name}.trace.jsonl"), &contents);
        let shown = p.display().to_string();
        let out = vmmu(&["replay", "--no-kvm", &shown]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(&format!("{shown}:{line}:")), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
    }
    // Not UTF-8 (a Latin-1 byte in `source`): refused naming the line and column.
    let p = temp_file("latin1.trace.jsonl", "");
    std::fs::write(&p, b"{\"vmmu_trace\":1,\"source\":\"caf\xe9\"}\n").unwrap();
    let shown = p.display().to_string();
    let out = vmmu(&["replay", "--no-kvm", &shown]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{shown}:1:30: not UTF-8 text (byte 0xe9)")), "{err}");
    let out = vmmu(&["replay", "--no-kvm", "/nonexistent/x.trace.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read /nonexistent/x.trace.jsonl"));
}

#[test]
fn a_refused_request_or_a_recorded_mmio_access_that_hits_ram_exits_1() {
    // Slot 1 overlaps slot 0: the core refuses with EEXIST (KVM's overlap rule).
    let overlap = RAM.replace("0.000000", "0.000001").replace("\"id\":0", "\"id\":1");
    let p = temp_file("refused.trace.jsonl", &format!("{HEADER}{RAM}{overlap}"));
    let (code, t) = replay_json(&p.display().to_string(), &["--format", "ept"]);
    assert_eq!(code, Some(1), "{t:#}");
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(u(&r["slots"]["refused"]), 1);
        let f = &r["slots"]["first_refusals"][0];
        assert_eq!((u(&f["line"]), f["errno"].as_str()), (3, Some("EEXIST")), "{f}");
    }
    // A recorded MMIO read inside a RAM slot: the MMU reaches RAM, a divergence.
    let mmio = "{\"t\":0.000001,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x1000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n";
    let p = temp_file("misclassified.trace.jsonl", &format!("{HEADER}{RAM}{mmio}"));
    let (code, t) = replay_json(&p.display().to_string(), &["--mmio-caching", "on"]);
    assert_eq!(code, Some(1), "{t:#}");
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(u(&r["mmio"]["misclassified"]), 1);
        assert_eq!(u(&r["mmio"]["first_misclassified"][0]["line"]), 3);
    }
    assert_eq!(t["passed"], false);
}

/// A capture that lost events (converted with `--allow-lost`): traces.md says a replayer must not
/// trust its MMIO/RAM verdicts, so a misclassification against it is shown but not judged, and a
/// clean replay is not a pass either: `UNTRUSTED`, exit 3 (the kit's status for such a capture).
#[test]
fn a_capture_that_lost_events_is_untrusted_not_passed_or_failed() {
    let summary = |mmio: u64| {
        format!(
            "{{\"op\":\"summary\",\"span\":0.1,\"events\":{{\"slot\":1,\"mmio\":{mmio}}},\
             \"kernel_mmio_dropped\":0,\"lost_events\":5,\"vcpu_threads\":1}}\n"
        )
    };
    let mmio = "{\"t\":0.000001,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x1000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n";
    let hole = mmio.replace("0x1000", "0xfee00000");
    for (name, body, misclassified) in [
        ("lost-clean", format!("{RAM}{hole}"), 0),
        ("lost-misclassified", format!("{RAM}{mmio}"), 1),
    ] {
        let p = temp_file(&format!("{name}.trace.jsonl"), &format!("{HEADER}{body}{}", summary(1)));
        let f = p.display().to_string();
        let (code, t) = replay_json(&f, &["--format", "ept"]);
        assert_eq!(code, Some(3), "{name}: {t:#}");
        assert_eq!((t["verdict"].as_str(), &t["passed"]), (Some("untrusted"), &Value::Bool(false)));
        for r in t["runs"].as_array().unwrap() {
            assert_eq!(u(&r["mmio"]["misclassified"]), misclassified, "{name}");
        }
        let out = vmmu(&["replay", "--no-kvm", "--format", "ept", &f]);
        assert_eq!(out.status.code(), Some(3));
        let report = text(&out.stdout);
        assert!(report.starts_with("UNTRUSTED "), "{report}");
        assert!(report.contains("sim-ept-on [untrusted]"), "{report}");
        assert!(report.contains("lost 5 events"), "{report}");
    }
    // The same misclassification in a capture that lost nothing fails.
    let p = temp_file("complete.trace.jsonl", &format!("{HEADER}{RAM}{mmio}"));
    let (code, t) = replay_json(&p.display().to_string(), &["--format", "ept"]);
    assert_eq!((code, t["verdict"].as_str()), (Some(1), Some("fail")), "{t:#}");
}

/// A hand-written summary may give any subset of the contract's keys. A count it leaves out is
/// unknown, not 0: the report says "not given", and a summary that does not say whether the
/// capture lost events is judged as a complete capture, with a warning that says so. (It said
/// "lost 0", and warned of "vcpu_threads 0" beside the trace's MMIO accesses.)
#[test]
fn a_summary_that_leaves_counts_out_reports_them_unknown() {
    let mmio = "{\"t\":0.000001,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xfee00000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n";
    let summary = "{\"op\":\"summary\",\"events\":{\"slot\":1,\"mmio\":1}}\n";
    let p = temp_file("subset.trace.jsonl", &format!("{HEADER}{RAM}{mmio}{summary}"));
    let f = p.display().to_string();
    let (code, t) = replay_json(&f, &["--format", "ept"]);
    assert_eq!((code, t["verdict"].as_str()), (Some(0), Some("pass")), "{t:#}");
    for key in ["lost_events", "vcpu_threads", "kernel_mmio_dropped"] {
        assert_eq!(t[key], Value::Null, "{key}: {t:#}");
    }
    let warnings: Vec<&str> =
        t["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    assert!(
        warnings.iter().any(|w| w.starts_with("the summary does not say whether the capture lost")),
        "{warnings:?}"
    );
    assert!(!warnings.iter().any(|w| w.contains("vcpu_threads 0")), "{warnings:?}");
    let out = vmmu(&["replay", "--no-kvm", "--format", "ept", &f]);
    let report = text(&out.stdout);
    assert!(
        report.contains("(kernel MMIO dropped not given, lost not given, vCPU threads not given)"),
        "{report}"
    );
}

#[test]
fn a_raw_capture_is_named_as_one_not_as_a_scenario() {
    // Hunt 44r: `vmmu replay X.ftrace` (the kit's capture, before ftrace-to-trace.py) said
    // "this looks like a scenario", since the capture's comment lines start with `#`.
    let raw = "# vmmu-capture: host: Linux 6.1 x86_64; kvm vendor module: kvm_intel; kvm.mmio_caching=Y kvm.tdp_mmu=Y\n\
               # vmmu-capture: command: qemu-system-x86_64 -accel kvm -M pc\n\
               # tracer: nop\n";
    let p = temp_file("raw.ftrace", raw);
    let out = vmmu(&["replay", "--no-kvm", &p.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("malformed trace"), "{err}");
    assert!(
        err.contains("raw capture of the trace kit") && err.contains("ftrace-to-trace.py"),
        "{err}"
    );
    assert!(!err.contains("looks like a scenario"), "{err}");
}

#[test]
fn json_names_each_file_it_could_not_replay() {
    // Hunt 44r: a capture broken by another capture unmounting tracefs under it converts to an
    // empty trace file (the converter exits 1, the shell's redirection has made the file). With
    // `--json` the report must say which file was not replayed and why, not only
    // `"passed": false` next to the traces that did run.
    let good = temp_file("good.trace.jsonl", &format!("{HEADER}{RAM}"));
    let empty = temp_file("empty.trace.jsonl", "");
    let (good, empty) = (good.display().to_string(), empty.display().to_string());
    let out = vmmu(&["replay", "--json", "--no-kvm", "--format", "ept", &good, &empty]);
    assert_eq!(out.status.code(), Some(2));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["passed"], false);
    assert_eq!(doc["traces"].as_array().map(Vec::len), Some(1));
    let errors = doc["input_errors"].as_array().expect("input_errors");
    assert_eq!(errors.len(), 1, "{doc:#}");
    assert_eq!(errors[0]["file"], empty.as_str());
    let why = errors[0]["error"].as_str().unwrap();
    assert!(why.starts_with(&format!("{empty}:1: malformed trace: empty file")), "{why}");
    let missing = format!("{empty}.missing");
    let out = vmmu(&["replay", "--json", "--no-kvm", &missing]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (out.status.code(), &doc["input_errors"][0]["file"]),
        (Some(2), &Value::from(missing))
    );
}

/// A summary that counts no vCPU thread beside recorded MMIO accesses (which only a vCPU's
/// KVM_RUN makes) contradicts its trace: the replay says so (newcomer audit 44: it was silent).
#[test]
fn a_summary_without_vcpu_threads_beside_mmio_accesses_is_named() {
    let mmio = "{\"t\":0.000010,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xfee000f0\",\
                \"len\":4,\"value\":\"0xff\",\"exit\":\"kernel\"}\n";
    let summary = |threads: u32| {
        format!(
            "{{\"op\":\"summary\",\"span\":0.1,\"events\":{{\"slot\":1,\"mmio\":1}},\
             \"kernel_mmio_dropped\":0,\"lost_events\":0,\"vcpu_threads\":{threads}}}\n"
        )
    };
    let said = "the summary counts no vCPU thread (vcpu_threads 0) but the trace has 1 MMIO";
    for threads in [0, 1] {
        let body = format!("{HEADER}{RAM}{mmio}{}", summary(threads));
        let p = temp_file(&format!("threads{threads}.trace.jsonl"), &body);
        let (code, t) = replay_json(&p.display().to_string(), &["--format", "ept"]);
        assert_eq!((code, t["verdict"].as_str()), (Some(0), Some("pass")), "{t:#}");
        let warned = t["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.starts_with(said)));
        assert_eq!(warned, threads == 0, "{threads}: {t:#}");
    }
}

#[test]
fn a_recording_whose_vm_stopped_on_an_internal_error_says_so_and_still_judges_the_mmu() {
    // Hunt 44r: four vCPUs, one toggling SMRAM; QEMU deleted and re-created the RAM slot the
    // other vCPUs ran from, one fetched an instruction in between, KVM failed to emulate it and
    // QEMU paused the VM. The trace (its slot and MMIO events) is right and replays cleanly;
    // only its summary says the guest died, and the report must say it too.
    let summary = |exits: &str| {
        format!(
            "{{\"op\":\"summary\",\"span\":0.1,\"events\":{{\"slot\":3}},\"kernel_mmio_dropped\":0,\
             \"lost_events\":0,\"vcpu_threads\":4,\"userspace_exits\":{{{exits}}}}}\n"
        )
    };
    let body = format!(
        "{RAM}{}{}",
        RAM.replace("0.000000", "0.000010").replace("0x100000\"", "0x0\""),
        RAM.replace("0.000000", "0.000020").replace("0x100000\"", "0xa0000\"")
    );
    let stopped = "the recorded VM stopped on KVM_EXIT_INTERNAL_ERROR (1)";
    for (name, exits, warned) in [
        ("died", "\"KVM_EXIT_INTERNAL_ERROR\":1,\"KVM_EXIT_IO\":9,\"error\":3", true),
        // `error` alone is KVM_RUN's -EAGAIN for an AP waiting for its SIPI: nothing died.
        ("alive", "\"KVM_EXIT_IO\":9,\"error\":3,\"restart\":2", false),
    ] {
        let p =
            temp_file(&format!("{name}.trace.jsonl"), &format!("{HEADER}{body}{}", summary(exits)));
        let f = p.display().to_string();
        let (code, t) = replay_json(&f, &["--format", "ept"]);
        assert_eq!((code, t["verdict"].as_str()), (Some(0), Some("pass")), "{name}: {t:#}");
        let warnings: Vec<&str> =
            t["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
        assert_eq!(warnings.iter().any(|w| w.starts_with(stopped)), warned, "{name}: {warnings:?}");
        let out = vmmu(&["replay", "--no-kvm", "--format", "ept", &f]);
        assert_eq!(text(&out.stdout).contains(stopped), warned, "{name}");
    }
}

#[test]
fn a_trace_with_more_ram_than_the_frame_space_replays_cleanly() {
    // 2 TiB of RAM, more than the software machine's 1 TiB of frames (QEMU's `-m 1100G` was
    // recorded and replayed, `reserve=off`): its pages get frames as the MMU translates them.
    let big = RAM.replace("0x100000", "0x20000000000");
    let p = temp_file("two-tib.trace.jsonl", &format!("{HEADER}{big}"));
    let (code, t) = replay_json(&p.display().to_string(), &[]);
    assert_eq!(code, Some(0), "{t:#}");
    assert_eq!(t["run_errors"].as_array().map(Vec::len), Some(0), "{t:#}");
    for r in t["runs"].as_array().expect("runs") {
        assert_eq!(u(&r["slots"]["applied"]), 1, "{r:#}");
        assert_eq!(u(&r["oracle"]["violations"]), 0, "{r:#}");
        assert!(u(&r["oracle"]["checked"]) > 0, "{r:#}");
        assert_eq!(r["host_frames_on_demand"], true, "{r:#}");
    }
    let out = vmmu(&["replay", "--no-kvm", "--format", "shadow", &p.display().to_string()]);
    let s = text(&out.stdout);
    assert!(s.contains("host: 2048 GiB in 1 buffers, past the machine's frame space"), "{s}");
}

#[test]
fn a_trace_the_machine_cannot_set_up_fails_and_says_why_in_every_output() {
    // 20 slots of 2^31 - 1 pages (the most KVM accepts in one slot), at disjoint `uaddr`s:
    // 160 TiB of host memory, more than a 4-level host's user address space, so the machine's
    // host cannot stand for them all. (A request KVM refuses by its shape gets no memory: it is
    // refused, naming its line, `requests_kvm_refuses_by_their_shape_...`.)
    let size = ((1u64 << 31) - 1) << 12;
    let slots: String = (0..20u64)
        .map(|i| {
            format!(
                "{{\"t\":0.{i:06},\"op\":\"slot\",\"as\":0,\"id\":{i},\"flags\":[],\"gpa\":\"{:#x}\",\"size\":\"{size:#x}\",\"uaddr\":\"{:#x}\"}}\n",
                i << 43,
                0x1000_0000 + (i << 43)
            )
        })
        .collect();
    let p = temp_file("too-large.trace.jsonl", &format!("{HEADER}{slots}"));
    let shown = p.display().to_string();
    let (code, t) = replay_json(&shown, &["--format", "npt"]);
    assert_eq!(code, Some(1), "{t:#}");
    assert_eq!(t["passed"], false);
    assert!(t["runs"].as_array().unwrap().is_empty(), "{t:#}");
    let errors: Vec<&str> =
        t["run_errors"].as_array().expect("run_errors").iter().filter_map(|e| e.as_str()).collect();
    assert_eq!(errors.len(), 2, "{t:#}");
    assert!(errors[0].starts_with("sim-npt-on: cannot replay: "), "{errors:?}");
    assert!(errors[0].contains("host memory for the trace's slots"), "{errors:?}");
    let out = vmmu(&["replay", "--no-kvm", "--format", "npt", "--mmio-caching", "off", &shown]);
    assert_eq!(out.status.code(), Some(1));
    let s = text(&out.stdout);
    assert!(s.starts_with("FAIL ") && s.contains("[FAIL] sim-npt-off: cannot replay: "), "{s}");
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{shown}: sim-npt-off: cannot replay")), "{err}");
}

#[test]
fn a_bar_above_2_pow_46_replays_with_the_phys_bits_the_trace_needs() {
    // A 64-bit BAR as firmware places one near the top of a 48-bit host's space, and a read
    // just past it (MMIO): the recording host accepted the slot, so it had more than 46 bits.
    let bar = RAM
        .replace("0.000000", "0.000001")
        .replace("\"id\":0", "\"id\":1")
        .replace("\"gpa\":\"0x0\"", "\"gpa\":\"0x7ff000000000\"")
        .replace("0x7f0000000000", "0x7f1000000000");
    let mmio = "{\"t\":0.000002,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x7ff000100000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n";
    let p = temp_file("high-bar.trace.jsonl", &format!("{HEADER}{RAM}{bar}{mmio}"));
    let shown = p.display().to_string();
    let (code, t) = replay_json(&shown, &["--format", "ept"]);
    assert_eq!(code, Some(0), "{t:#}");
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(u(&r["phys_bits"]), 47, "{r:#}");
        assert_eq!(u(&r["slots"]["refused"]), 0);
        assert_eq!(u(&r["mmio"]["classified_mmio"]), 1);
    }
    assert!(t["warnings"][0].as_str().unwrap().contains("MAXPHYADDR 47"), "{t:#}");
    // Pinned below what the trace needs, the machine refuses the BAR as KVM would, and the
    // report says the refusal comes from the option.
    let (code, t) = replay_json(&shown, &["--format", "ept", "--phys-bits", "46"]);
    assert_eq!(code, Some(1), "{t:#}");
    assert_eq!(u(&t["runs"][0]["slots"]["refused"]), 1);
    assert_eq!(t["warnings"].as_array().map(Vec::len), Some(1), "{t:#}");
    let w = t["warnings"][0].as_str().unwrap();
    assert!(w.starts_with("--phys-bits 46 is below the 47 bits"), "{w}");
    assert!(w.contains("0x7ff000100003"), "{w}");
    // Pinned at or above it: no warning.
    let (code, t) = replay_json(&shown, &["--format", "ept", "--phys-bits", "47"]);
    assert_eq!((code, t["warnings"].as_array().map(Vec::len)), (Some(0), Some(0)), "{t:#}");
}

#[test]
fn a_vm_with_more_ram_than_phys_bits_addresses_replays_with_frames_on_demand() {
    // `-m 70G` as QEMU pc-i440fx records it (3 GiB below the PCI hole, 67 GiB from 4 GiB up,
    // one RAM block) and a read in the PCI hole. Pinned at 36 bits the machine has 64 GiB of
    // frames: its buffers get frames on first translation, and the slot that ends above 2^36
    // is refused as KVM would refuse it (the host could not be made before: "out of host
    // frames"). At 37 bits everything fits.
    let slot = |t: &str, id: u32, gpa: &str, size: &str, uaddr: &str| {
        format!("{{\"t\":{t},\"op\":\"slot\",\"as\":0,\"id\":{id},\"flags\":[],\"gpa\":\"{gpa}\",\"size\":\"{size}\",\"uaddr\":\"{uaddr}\"}}\n")
    };
    let low = slot("0.000000", 0, "0x0", "0xc0000000", "0x7f87dfe00000");
    let high = slot("0.000001", 1, "0x100000000", "0x10c0000000", "0x7f889fe00000");
    let mmio = "{\"t\":0.000002,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xfebf0000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n";
    let p = temp_file("70g.trace.jsonl", &format!("{HEADER}{low}{high}{mmio}"));
    let shown = p.display().to_string();
    let (code, t) = replay_json(&shown, &["--format", "ept", "--phys-bits", "36"]);
    assert_eq!(code, Some(1), "{t:#}");
    assert_eq!(t["run_errors"].as_array().map(Vec::len), Some(0), "{t:#}");
    let runs = t["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "ept-on and ept-off ran: {t:#}");
    for r in runs {
        assert_eq!(r["host_frames_on_demand"], true, "{r:#}");
        assert_eq!(u(&r["slots"]["applied"]), 1, "{r:#}");
        assert_eq!(u(&r["slots"]["refused"]), 1, "{r:#}");
        assert_eq!(u(&r["mmio"]["classified_mmio"]), 1, "{r:#}");
    }
    let (code, t) = replay_json(&shown, &["--format", "ept", "--phys-bits", "37"]);
    assert_eq!(code, Some(0), "{t:#}");
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(r["host_frames_on_demand"], false, "{r:#}");
        assert_eq!(u(&r["slots"]["refused"]), 0, "{r:#}");
    }
}

#[test]
fn kvm_half_agrees_with_the_recordings_where_usable() {
    let kvm = kvm_usable("checking less");
    for f in [
        "hand-aliases-move-delete-rom",
        "seabios-kvm.small",
        "q35-kvm.small",
        "vga13-kvm.small",
        "vgasplit-kvm.cut",
        "hotplug-kvm.small",
        "below4g-odd-kvm.small",
        "linux-kvm.cut",
        "ivshmem-bar-kvm.small",
        "romwrite-kvm.small",
        "pflash-kvm.small",
        "pflashmig-kvm.small",
        "mmio64-kvm.small",
        "q35mig-smp2-kvm.small",
        "cirrus-kvm.small",
        "ipxe-kvm.small",
        "barmove-kvm.small",
        "savevm-reset-kvm.small",
        "oddimm-kvm.small",
        "dimms120-kvm.small",
        "hotunplug-kvm.small",
        "q35-62g-mig-kvm.small",
        "pflashsmp-kvm.small",
    ] {
        let file = repo(&format!("tests/traces/{f}.trace.jsonl"));
        let out = vmmu(&["replay", "--json", "--format", "ept", "--mmio-caching", "on", &file]);
        let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
        let t = &doc["traces"][0];
        assert_eq!(out.status.code(), Some(0), "{:#}", t["kvm"]);
        let k = &t["kvm"];
        if !kvm {
            assert!(k["skipped"].as_str().unwrap().contains("/dev/kvm not usable"), "{k}");
            continue;
        }
        assert_eq!(k["ran"], true, "{k:#}");
        assert_eq!(k["error"], Value::Null, "{k:#}");
        assert_eq!(u(&k["slots_refused"]), 0, "{k:#}");
        assert_eq!(u(&k["slots_applied"]), u(&t["events"]["slot"]));
        assert_eq!(u(&k["mmio_not_mmio"]), 0, "{k:#}");
        assert_eq!(u(&k["mmio_exits"]) + u(&k["mmio_raced"]), u(&k["mmio_checked"]));
        // Up to 3000 MMIO events are checked whole; a longer trace, every k-th and the first
        // access to each page in each direction after every slot request.
        let mmio = u(&t["events"]["mmio"]);
        let every = mmio.div_ceil(3000).max(1);
        let checked = u(&k["mmio_checked"]);
        assert!((mmio.div_ceil(every)..=mmio).contains(&checked), "{f}: {k:#}");
        assert_eq!(checked == mmio, mmio <= 3000, "small traces are checked whole: {f}");
        let dirty = u(&t["events"]["get-dirty-log"]) + u(&t["events"]["clear-dirty-log"]);
        assert_eq!((u(&k["dirty_log_applied"]), u(&k["dirty_log_refused"])), (dirty, 0), "{k:#}");
    }
    if kvm {
        // KVM, too, reaches RAM for an "MMIO" access inside a RAM slot, refuses an overlap, and
        // refuses the dirty log of a slot without dirty logging.
        let mmio = "{\"t\":0.000001,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x1000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n";
        let overlap = RAM.replace("0.000000", "0.000002").replace("\"id\":0", "\"id\":1");
        let get = "{\"t\":0.000003,\"op\":\"get-dirty-log\",\"as\":0,\"id\":0}\n";
        let p =
            temp_file("kvm-diverges.trace.jsonl", &format!("{HEADER}{RAM}{mmio}{overlap}{get}"));
        let out = vmmu(&[
            "replay",
            "--json",
            "--format",
            "npt",
            "--mmio-caching",
            "off",
            &p.display().to_string(),
        ]);
        assert_eq!(out.status.code(), Some(1));
        let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
        let k = &doc["traces"][0]["kvm"];
        assert_eq!((u(&k["mmio_not_mmio"]), u(&k["slots_refused"])), (1, 1), "{k:#}");
        assert_eq!(k["first_refusals"][0]["errno"], "EEXIST");
        assert_eq!(u(&k["dirty_log_refused"]), 1, "{k:#}");
        assert_eq!(k["first_refusals"][1]["reason"], "KVM_GET_DIRTY_LOG");
    }
}

/// A q35-style boot with SMM has memslots in address space 1 (SMRAM). The machine applies them
/// all; on a kernel without an SMM address space the KVM half leaves exactly those out (a guest
/// outside SMM cannot see them) and still checks everything else, so the trace passes.
#[test]
fn smm_requests_replay_on_the_machine_and_are_left_out_on_kvm_without_smm() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: SMRAM in address space 1, as QEMU q35 makes it\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0xa0000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000050,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[],\"gpa\":\"0x100000\",\"size\":\"0x7f00000\",\"uaddr\":\"0x7f0000100000\"}\n",
        "{\"t\":0.000100,\"op\":\"slot\",\"as\":1,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0xa0000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000200,\"op\":\"slot\",\"as\":1,\"id\":1,\"flags\":[],\"gpa\":\"0xa0000\",\"size\":\"0x20000\",\"uaddr\":\"0x7f00000a0000\"}\n",
        "{\"t\":0.000300,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xa0000\",\"len\":1,\"value\":\"0x0\",\"exit\":\"user\"}\n",
        "{\"t\":0.000400,\"op\":\"slot\",\"as\":1,\"id\":1,\"flags\":[],\"gpa\":\"0xa0000\",\"size\":\"0x0\",\"uaddr\":\"0x7f00000a0000\"}\n",
        "{\"t\":0.000500,\"op\":\"mmio\",\"dir\":\"write\",\"gpa\":\"0xfee000b0\",\"len\":4,\"value\":\"0x0\",\"exit\":\"kernel\"}\n",
    );
    let p = temp_file("smm.trace.jsonl", trace);
    let file = p.display().to_string();
    // The machine: every request applied, and 0xa0000 (SMRAM only in address space 1) is MMIO
    // for a guest outside SMM.
    assert_clean(&file);
    let out = vmmu(&["replay", "--json", "--format", "ept", &file]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    let k = &doc["traces"][0]["kvm"];
    assert_eq!(out.status.code(), Some(0), "{k:#}");
    let Ok(info) = vmmu_kvm::probe() else {
        assert!(k["skipped"].as_str().is_some(), "{k:#}");
        return;
    };
    assert_eq!(k["ran"], true, "{k:#}");
    assert_eq!(u(&k["mmio_exits"]), 2, "{k:#}");
    if info.address_spaces >= 2 {
        assert_eq!((u(&k["slots_applied"]), u(&k["smm_skipped"])), (5, 0), "{k:#}");
    } else {
        assert_eq!((u(&k["slots_applied"]), u(&k["smm_skipped"])), (2, 3), "{k:#}");
        assert!(k["method"].as_str().unwrap().contains("3 address-space-1 (SMM) requests"));
    }
}

/// A VM with RAM above 4 GiB (QEMU `-m 4G` maps the part above 3 GiB at `0x100000000`) leaves
/// the KVM replayer's preferred window taken: `traces.md` says a replayer puts its own memory
/// "where the trace places no slot and no access", so the KVM half moves its guest to a free
/// window (and says where) instead of skipping the trace.
#[test]
fn kvm_half_runs_a_trace_with_ram_at_4_gib() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: RAM below 3 GiB and above 4 GiB, as QEMU -m 4G maps it\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0xa0000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000050,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[],\"gpa\":\"0x100000000\",\"size\":\"0x800000\",\"uaddr\":\"0x7f00c0000000\"}\n",
        "{\"t\":0.000100,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x100800000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n",
        "{\"t\":0.000200,\"op\":\"mmio\",\"dir\":\"write\",\"gpa\":\"0xfee000b0\",\"len\":4,\"value\":\"0x0\",\"exit\":\"kernel\"}\n",
    );
    let p = temp_file("ram-above-4g.trace.jsonl", trace);
    let file = p.display().to_string();
    assert_clean(&file);
    let out = vmmu(&["replay", "--json", "--format", "ept", "--mmio-caching", "on", &file]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    let k = &doc["traces"][0]["kvm"];
    assert_eq!(out.status.code(), Some(0), "{k:#}");
    if !kvm_usable("checking less") {
        assert!(k["skipped"].as_str().is_some(), "{k:#}");
        return;
    }
    assert_eq!(k["skipped"], Value::Null, "{k:#}");
    assert_eq!(k["ran"], true, "{k:#}");
    assert_eq!(k["error"], Value::Null, "{k:#}");
    assert_eq!((u(&k["slots_applied"]), u(&k["slots_refused"])), (2, 0), "{k:#}");
    assert_eq!((u(&k["mmio_exits"]), u(&k["mmio_not_mmio"])), (2, 0), "{k:#}");
    // The window right after the trace's RAM above 4 GiB and its MMIO access.
    assert!(k["method"].as_str().unwrap().contains("guest at 0x100c00000"), "{k:#}");
}

/// Firmware may put 64-bit BARs far above RAM. The KVM half reaches accesses beyond its guest's
/// 64 GiB identity map through a high alias window, and still tells MMIO from RAM there: a write
/// to a read-only slot at 96 GiB and a read where no slot is (256 GiB) exit as MMIO, a recorded
/// "MMIO" read inside a RAM slot at 96 GiB does not (a divergence, as on the machine).
#[test]
fn kvm_half_reaches_accesses_above_64_gib() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: BARs above 64 GiB\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0xa0000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000010,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[\"readonly\"],\"gpa\":\"0x1800000000\",\"size\":\"0x4000\",\"uaddr\":\"0x7f0100000000\"}\n",
        "{\"t\":0.000020,\"op\":\"slot\",\"as\":0,\"id\":2,\"flags\":[],\"gpa\":\"0x1800200000\",\"size\":\"0x200000\",\"uaddr\":\"0x7f0200000000\"}\n",
        "{\"t\":0.000030,\"op\":\"mmio\",\"dir\":\"write\",\"gpa\":\"0x1800000008\",\"len\":4,\"value\":\"0x12345678\",\"exit\":\"user\"}\n",
        "{\"t\":0.000040,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x4000000ffc\",\"len\":4,\"value\":\"0xffffffff\",\"exit\":\"user\"}\n",
        "{\"t\":0.000050,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x1800201000\",\"len\":8,\"value\":\"0x0\",\"exit\":\"user\"}\n",
    );
    let p = temp_file("above-64g.trace.jsonl", trace);
    let file = p.display().to_string();
    let out = vmmu(&["replay", "--json", "--format", "ept", "--mmio-caching", "on", &file]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    let t = &doc["traces"][0];
    let k = &t["kvm"];
    // The machine, too, finds the RAM read.
    assert_eq!(u(&t["runs"][0]["mmio"]["misclassified"]), 1, "{t:#}");
    assert_eq!(out.status.code(), Some(1), "{k:#}");
    if !kvm_usable("checking less") {
        assert!(k["skipped"].as_str().is_some(), "{k:#}");
        return;
    }
    assert_eq!((k["ran"].clone(), k["error"].clone()), (Value::Bool(true), Value::Null), "{k:#}");
    assert_eq!((u(&k["slots_applied"]), u(&k["slots_refused"])), (3, 0), "{k:#}");
    assert_eq!((u(&k["mmio_exits"]), u(&k["mmio_not_mmio"])), (2, 1), "{k:#}");
    assert_eq!(u(&k["first_not_mmio"][0]["line"]), 7, "{k:#}");
    assert!(
        k["method"].as_str().unwrap().contains("high alias window for 3 2 MiB frames"),
        "{k:#}"
    );
}

/// The KVM half of trace report `t` where `/dev/kvm` is usable, having checked that it ran
/// (no skip, no error); elsewhere `None`, having checked that it says why it skipped.
fn kvm_half_that_ran(t: &Value) -> Option<&Value> {
    let k = &t["kvm"];
    if !kvm_usable("checking less") {
        assert!(k["skipped"].as_str().is_some(), "{k:#}");
        return None;
    }
    let ran = (k["ran"].clone(), k["skipped"].clone(), k["error"].clone());
    assert_eq!(ran, (Value::Bool(true), Value::Null, Value::Null), "{k:#}");
    Some(k)
}

/// `trace` (saved as `name`) replayed under EPT with caching and on KVM where usable, which must
/// fail (exit 1: something refused); the trace's JSON report.
fn replay_refusing(name: &str, trace: &str) -> Value {
    let file = temp_file(name, trace).display().to_string();
    let out = vmmu(&["replay", "--json", "--format", "ept", "--mmio-caching", "on", &file]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let mut doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    doc["traces"][0].take()
}

/// A dirty-log call on address space 1 in a trace that never made an address-space-1 slot is
/// invalid on any kernel (`traces.md`: both calls must succeed): the machine refuses it (ENOENT,
/// as a recording host with that address space would), and the
/// KVM half asks KVM, which refuses it too, instead of counting it as an SMM request this host
/// cannot make.
#[test]
fn a_dirty_log_call_on_an_address_space_without_slots_is_refused_by_both_halves() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: GET on address space 1, which has no slot\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":3,\"flags\":[\"dirty_log\"],\"gpa\":\"0x0\",\"size\":\"0x100000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000100,\"op\":\"get-dirty-log\",\"as\":1,\"id\":3}\n",
        "{\"t\":0.000200,\"op\":\"mmio\",\"dir\":\"write\",\"gpa\":\"0xfee000b0\",\"len\":4,\"value\":\"0x0\",\"exit\":\"kernel\"}\n",
    );
    let t = &replay_refusing("as1-get-no-slots.trace.jsonl", trace);
    let d = &t["runs"][0]["dirty_log"];
    assert_eq!((u(&d["accepted"]), u(&d["refused"])), (0, 1), "{d:#}");
    assert!(d["first_refusals"][0].as_str().unwrap().starts_with("line 3:"), "{d:#}");
    // The machine's VM has address space 1, as the recording host had (the trace names it):
    // no slot there is ENOENT, as on that host, not a one-space VM's EINVAL.
    assert!(d["first_refusals"][0].as_str().unwrap().ends_with(": ENOENT"), "{d:#}");
    let Some(k) = kvm_half_that_ran(t) else { return };
    assert_eq!((u(&k["dirty_log_applied"]), u(&k["dirty_log_refused"])), (0, 1), "{k:#}");
    assert_eq!(u(&k["smm_skipped"]), 0, "{k:#}");
}

/// A slot of 2^31 pages, one more than KVM allows (`KVM_MEM_MAX_NR_PAGES`), is refused on any
/// host: the KVM half does not count its range when it places its guest (it said "no free
/// window" and skipped the trace), and asks KVM, which refuses it as the machine does.
#[test]
fn a_slot_kvm_refuses_on_any_host_leaves_room_for_the_kvm_halfs_guest() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: a slot of 2^31 pages\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x80000000000\",\"uaddr\":\"0x100000000000\"}\n",
    );
    let t = &replay_refusing("too-many-pages.trace.jsonl", trace);
    let r = &t["runs"][0]["slots"];
    assert_eq!((u(&r["applied"]), u(&r["refused"])), (0, 1), "{r:#}");
    let Some(k) = kvm_half_that_ran(t) else { return };
    assert_eq!((u(&k["slots_applied"]), u(&k["slots_refused"])), (0, 1), "{k:#}");
}

/// Dirty-log calls on slots the trace never created: the KVM half asks KVM rather than saying
/// ENOENT itself, so the errno is KVM's: EINVAL for an id at or above `KVM_USER_MEM_SLOTS`,
/// ENOENT for a user slot id that has no slot; the machine answers the same.
#[test]
fn dirty_log_calls_on_slots_never_created_get_kvms_errno() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: GET on ids never created\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":3,\"flags\":[\"dirty_log\"],\"gpa\":\"0x0\",\"size\":\"0x100000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000100,\"op\":\"get-dirty-log\",\"as\":0,\"id\":32764}\n",
        "{\"t\":0.000200,\"op\":\"get-dirty-log\",\"as\":0,\"id\":5}\n",
        "{\"t\":0.000300,\"op\":\"mmio\",\"dir\":\"write\",\"gpa\":\"0xfee000b0\",\"len\":4,\"value\":\"0x0\",\"exit\":\"kernel\"}\n",
    );
    let t = &replay_refusing("get-never-created.trace.jsonl", trace);
    let d = &t["runs"][0]["dirty_log"];
    let seen: Vec<&str> = d["first_refusals"]
        .as_array()
        .expect("refusals")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(seen[0].starts_with("line 3:") && seen[0].ends_with("EINVAL"), "{d:#}");
    assert!(seen[1].starts_with("line 4:") && seen[1].ends_with("ENOENT"), "{d:#}");
    let Some(k) = kvm_half_that_ran(t) else { return };
    let errnos: Vec<(u64, &str)> = k["first_refusals"]
        .as_array()
        .expect("refusals")
        .iter()
        .map(|f| (u(&f["line"]), f["errno"].as_str().expect("errno")))
        .collect();
    assert_eq!(errnos, [(3, "EINVAL"), (4, "ENOENT")], "{k:#}");
}

/// Slot requests KVM refuses on every host by their shape: one of 2^51 pages (more than
/// `KVM_MEM_MAX_NR_PAGES`) and one whose `uaddr` is a kernel address. Both are refused, each
/// naming its line, and the rest of the trace is replayed; the replay does not try to give the
/// huge one host memory (it once failed whole, allocating 8 EiB, naming no line).
#[test]
fn requests_kvm_refuses_by_their_shape_are_refused_naming_their_lines() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: two requests no KVM accepts\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x100000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000100,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[],\"gpa\":\"0x100000000\",\"size\":\"0x7ffffffffffff000\",\"uaddr\":\"0x1000\"}\n",
        "{\"t\":0.000200,\"op\":\"slot\",\"as\":0,\"id\":2,\"flags\":[],\"gpa\":\"0x200000\",\"size\":\"0x1000\",\"uaddr\":\"0xffff800000000000\"}\n",
        "{\"t\":0.000300,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x200000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n",
    );
    let t = &replay_refusing("refused-shapes.trace.jsonl", trace);
    assert_eq!(t["run_errors"], Value::Array(vec![]), "{t:#}");
    let r = &t["runs"][0];
    let sl = &r["slots"];
    assert_eq!((u(&sl["applied"]), u(&sl["refused"])), (1, 2), "{sl:#}");
    let first = sl["first_refusals"].as_array().expect("refusals");
    let lines: Vec<u64> = first.iter().map(|f| u(&f["line"])).collect();
    assert_eq!(lines, [3, 4], "{sl:#}");
    assert!(first.iter().all(|f| f["errno"] == "EINVAL"), "{sl:#}");
    let m = &r["mmio"];
    assert_eq!((u(&m["classified_mmio"]), u(&m["misclassified"])), (1, 0), "{m:#}");
    let Some(k) = kvm_half_that_ran(t) else { return };
    assert_eq!((u(&k["slots_applied"]), u(&k["slots_refused"])), (1, 2), "{k:#}");
    assert_eq!(u(&k["mmio_exits"]), 1, "{k:#}");
}

/// A trace that names slot 32760 (the KVM replay guest's usual slot) still replays on KVM: the
/// guest takes an id the trace never names.
#[test]
fn a_trace_naming_the_replay_guests_slot_id_still_runs_on_kvm() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: slot id 32760\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":32760,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x100000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000100,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x100000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n",
    );
    let file = temp_file("slot-32760.trace.jsonl", trace).display().to_string();
    assert_clean(&file);
    let out = vmmu(&["replay", "--json", "--format", "ept", "--mmio-caching", "on", &file]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(out.status.code(), Some(0), "{doc:#}");
    let Some(k) = kvm_half_that_ran(&doc["traces"][0]) else { return };
    assert_eq!((u(&k["slots_applied"]), u(&k["mmio_exits"])), (1, 1), "{k:#}");
}

/// A trace cut before its summary line (optional in v1) still replays, and the report says the
/// summary's counts are unknown rather than printing them as 0 (a cut of a two-vCPU recording
/// would otherwise claim "vCPU threads 0").
#[test]
fn a_trace_without_its_summary_says_its_counts_are_unknown() {
    let full = std::fs::read_to_string(repo("tests/traces/q35mig-smp2-kvm.small.trace.jsonl"))
        .expect("the recording");
    let cut: String =
        full.lines().filter(|l| !l.contains(r#""op":"summary""#)).flat_map(|l| [l, "\n"]).collect();
    assert!(cut.len() < full.len(), "the recording has a summary to cut");
    let p = temp_file("no-summary.trace.jsonl", &cut);
    let (code, t) = replay_json(&p.to_string_lossy(), &[]);
    assert_eq!(code, Some(0), "{t:#}");
    assert_eq!(t["has_summary"], false);
    let out = vmmu(&["replay", "--no-kvm", "--format", "ept", &p.to_string_lossy()]);
    let shown = text(&out.stdout);
    assert!(shown.contains("(no summary line)"), "{shown}");
    assert!(!shown.contains("vCPU threads 0"), "{shown}");
}

/// A DIMM hot-plugged at `0xfee2bfe00000` (QEMU `host-phys-bits=on` on a 48-bit host, recorded
/// with the kit, `tests/traces/RECORDED-BY-HAND.md`): the replay picks MAXPHYADDR 48, says so,
/// and every MMU accepts the slot as the recording KVM did; pinned below that, the TDP MMUs
/// refuse it (the option's doing, as the warning says) while the shadow MMU still takes it.
#[test]
fn a_dimm_near_the_top_of_a_48_bit_space_replays_with_48_bits() {
    let file = repo("tests/traces/highdimm-kvm.small.trace.jsonl");
    let t = assert_clean(&file);
    let warnings = t["warnings"].to_string();
    assert!(warnings.contains("MAXPHYADDR 48"), "{warnings}");
    let (code, t) = replay_json(&file, &["--phys-bits", "46", "--format", "ept"]);
    assert_eq!(code, Some(1), "{t:#}");
    assert!(t["warnings"].to_string().contains("--phys-bits 46 is below the 48 bits"), "{t:#}");
    assert!(u(&t["runs"][0]["slots"]["refused"]) > 0, "{t:#}");
    let (code, t) = replay_json(&file, &["--phys-bits", "46", "--format", "shadow"]);
    assert_eq!(code, Some(0), "{t:#}");
}

/// Buffers that take every frame below 4 GiB before the first page table (one RAM slot of
/// 4 GiB - 2 MiB at 0; or 2 GiB of RAM and a 512 MiB RAM BAR plugged four times, each time
/// with a new backend, as a VMM does): the shadow configurations' guest stays below 4 GiB, so it
/// runs without paging on a special root, whose frame must lie below 4 GiB (KVM's DMA32
/// `pae_root`). The host keeps frames for that; the replay ran out of them before (a panic,
/// with no report for any configuration).
#[test]
fn buffers_filling_the_first_4_gib_of_frames_leave_the_special_root_its_frame() {
    let one_slot = "{\"vmmu_trace\":1,\"source\":\"one RAM slot of 4 GiB - 2 MiB at 0\"}\n\
        {\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0xffe00000\",\"uaddr\":\"0x7f0000000000\"}\n\
        {\"t\":0.000001,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xfffff000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n";
    let mut replugged = String::from(
        "{\"vmmu_trace\":1,\"source\":\"2 GiB RAM, a 512 MiB RAM BAR plugged four times\"}\n\
         {\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x80000000\",\"uaddr\":\"0x7f0000000000\"}\n",
    );
    for i in 0..4u64 {
        let uaddr = 0x7e00_0000_0000u64 - (i << 40);
        for size in ["0x20000000", "0x0"].iter().take(if i == 3 { 1 } else { 2 }) {
            replugged += &format!(
                "{{\"t\":0.{:06},\"op\":\"slot\",\"as\":0,\"id\":5,\"flags\":[],\"gpa\":\"0xc0000000\",\"size\":\"{size}\",\"uaddr\":\"{uaddr:#x}\"}}\n",
                i * 2 + 1 + u64::from(*size == "0x0")
            );
        }
    }
    replugged += "{\"t\":0.900000,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xfee00030\",\"len\":4,\"value\":\"0x50014\",\"exit\":\"kernel\"}\n";
    for (name, trace) in [("low-one-slot", one_slot), ("low-replugged", replugged.as_str())] {
        let p = temp_file(&format!("{name}.trace.jsonl"), trace);
        let t = assert_clean(&p.display().to_string());
        let shadow = &t["runs"][4];
        assert_eq!(shadow["config"], "shadow-on");
        assert!(
            shadow["guest"].as_str().is_some_and(|g| g.contains("special root")),
            "{name}: {:#}",
            shadow["guest"]
        );
    }
}

/// A delete names whatever `uaddr` the VMM passed (`traces.md`), which KVM checks only for its
/// shape: page-aligned and within the recording host's user address space. On a host with
/// 5-level paging that space reaches 2^56 - 4096 (the limit `memory::ANY_HOST_USER_LIMIT`
/// already grants creates), so a delete naming 2^47 succeeded there, and every recorded request
/// succeeded. No union of the trace's ranges holds a delete's `uaddr` when it is not the slot's
/// own, and it went to the machine and to KVM as recorded: refused against this host's 4-level
/// limit, a divergence the MMU did not make.
#[test]
fn a_delete_naming_a_uaddr_only_a_5_level_host_has_replays_cleanly() {
    let trace = concat!(
        "{\"vmmu_trace\":1,\"source\":\"hand: a delete with a uaddr above 2^47 (5-level host)\"}\n",
        "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":3,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x100000\",\"uaddr\":\"0x7f0000000000\"}\n",
        "{\"t\":0.000100,\"op\":\"slot\",\"as\":0,\"id\":3,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x0\",\"uaddr\":\"0x800000000000\"}\n",
        "{\"t\":0.000100,\"op\":\"kvm\",\"event\":\"zap_all_fast\"}\n",
        "{\"t\":0.000200,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0x1000\",\"len\":4,\"value\":\"0x0\",\"exit\":\"user\"}\n",
    );
    let file = temp_file("delete-uaddr-5-level.trace.jsonl", trace).display().to_string();
    let t = assert_clean(&file);
    for r in t["runs"].as_array().unwrap() {
        assert_eq!(u(&r["slots"]["deletes"]), 1, "{:#}", r["slots"]);
    }
    let out = vmmu(&["replay", "--json", "--format", "ept", "--mmio-caching", "on", &file]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
    let Some(k) = kvm_half_that_ran(&doc["traces"][0]) else { return };
    assert_eq!((u(&k["slots_applied"]), u(&k["slots_refused"])), (2, 0), "{k:#}");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
