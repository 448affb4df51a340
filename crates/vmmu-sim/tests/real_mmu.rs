//! The default machine on the real MMU (issue 5, point 6): a short run for each format with MMIO
//! caching on and off; the oracle finds no violation, and every exit kind the workload must
//! produce is counted.

mod common;

use vmmu::spte::FormatKind;

fn run(format: FormatKind, caching: bool) {
    let name = if format == FormatKind::Ept { "ept" } else { "npt" };
    let report = common::run_real(format, caching, vmmu::bugs::BugSet::NONE, 7, 1_000_000, 30);
    let ctx = format!("{name} caching={caching}\n{report:#?}");
    eprintln!("{ctx}");
    assert_eq!(report.oracle.violations, 0, "{ctx}");
    assert!(report.vcpus.iter().all(|v| v.errors == 0), "{ctx}");
    assert!(report.memslots.updates >= 30, "{ctx}");
    let x = &report.exits.mmu;
    assert!(x.violation > 0, "{ctx}");
    assert!(x.mmio_slow_path > 0, "{ctx}");
    assert!(report.exits.readonly_write > 0, "{ctx}");
    assert!(report.exits.mmio_device > 0 && report.exits.mmio_userspace > 0, "{ctx}");
    assert!(report.mmu.tlb_flush_requests > 0, "{ctx}");
    assert_eq!(report.config.mmio_caching.effective, caching, "{ctx}");
    if caching {
        assert!(x.misconfig > 0, "{ctx}");
        assert!(x.mmio_spte_hit > 0, "{ctx}");
        assert!(x.mmio_cache_hit > 0, "{ctx}");
        assert!(report.mmu.mmio_sptes_created > 0, "{ctx}");
    } else {
        assert_eq!(x.misconfig, 0, "no MMIO SPTE, no misconfig exit: {ctx}");
        assert_eq!(report.mmu.mmio_sptes_created, 0, "{ctx}");
    }
}

#[test]
fn ept_caching_on() {
    run(FormatKind::Ept, true);
}

#[test]
fn ept_caching_off() {
    run(FormatKind::Ept, false);
}

#[test]
fn npt_caching_on() {
    run(FormatKind::Npt, true);
}

#[test]
fn npt_caching_off() {
    run(FormatKind::Npt, false);
}
