//! A small input must not make `vmmu` allocate gigabytes: a few lines can announce slots of
//! 2^31 pages (KVM's limit) with dirty logging, whose bitmaps are 256 MiB each. Memory is taken
//! where the guest dirties pages, not up front.
//!
//! Alone in its test binary: the peak resident size is read with `getrusage(RUSAGE_CHILDREN)`,
//! the largest of every child this process waited for.
#![cfg(target_os = "linux")]

mod common;
use common::{temp_file, vmmu};

/// The peak resident size, in MiB, of the largest child waited for so far.
fn children_peak_mib() -> i64 {
    // SAFETY: `rusage` is plain integers, for which all-zero is a value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    ru.ru_maxrss / 1024
}

/// Eight slots of 2^31 - 1 pages with dirty logging over one 8 TiB buffer (KVM would allocate
/// their bitmaps, 4 GiB with its second buffers, as vmalloc memory it zeroes): the software
/// machine used to write its 2 GiB of bitmap words before the first step ran (and took seconds
/// doing it).
#[test]
fn scenario_slots_with_huge_dirty_bitmaps_cost_what_is_dirtied() {
    let mut s = String::from("vm format=npt phys_bits=52\nmem b size=0x7fffffff000\n");
    for i in 1..=8u64 {
        s.push_str(&format!(
            "slot {i} gpa={:#x} size=0x7fffffff000 mem=b flags=dirty_log\n",
            i << 44
        ));
    }
    let path = temp_file("bitmaps.scn", &s);
    let out = vmmu(&["scenario", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let ok = String::from_utf8_lossy(&out.stdout).matches("\"result\":\"ok\"").count();
    assert_eq!(ok, 8, "{}", String::from_utf8_lossy(&out.stdout));
    let peak = children_peak_mib();
    assert!(peak < 256, "vmmu scenario peaked at {peak} MiB for 8 untouched dirty bitmaps");
}

/// The same from a trace: eight such slots over one recorded buffer, replayed by the TDP MMU.
#[test]
fn trace_slots_with_huge_dirty_bitmaps_cost_what_is_dirtied() {
    let mut t = String::from("{\"vmmu_trace\":1,\"source\":\"huge dirty-logged slots\"}\n");
    for i in 1..=8u64 {
        t.push_str(&format!(
            "{{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":{i},\"flags\":[\"dirty_log\"],\
             \"gpa\":\"{:#x}\",\"size\":\"0x7fffffff000\",\"uaddr\":\"0x10000000000\"}}\n",
            i << 44
        ));
    }
    let path = temp_file("bitmaps.trace.jsonl", &t);
    let out = vmmu(&["replay", "--no-kvm", "--format", "ept", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("PASS"), "{err}");
    let peak = children_peak_mib();
    assert!(peak < 256, "vmmu replay peaked at {peak} MiB for 8 untouched dirty bitmaps");
}

/// Clearing the whole log of such a slot (manual protect) writes only words that had bits set:
/// a clear of 2^31 pages used to write every word of the bitmap, 256 MiB made resident.
#[test]
fn clearing_a_huge_dirty_log_costs_what_was_dirtied() {
    let s = "vm dirty_log=manual format=npt phys_bits=52\n\
             mem b size=0x7fffffff000\n\
             slot 1 gpa=0x100000000 size=0x7fffffff000 mem=b flags=dirty_log\n\
             write 0 gpa=0x100000000 size=8 value=1\n\
             clear-dirty-log 1 first=0 count=0x7fffffff\n";
    let path = temp_file("clear.scn", s);
    let out = vmmu(&["scenario", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\"result\":\"ok\"}\n"), "{err}");
    let peak = children_peak_mib();
    assert!(peak < 200, "vmmu scenario peaked at {peak} MiB clearing an all-but-empty log");
}
