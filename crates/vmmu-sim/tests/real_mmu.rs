//! The default machine on the real MMU (issue 5, point 6): a short run for each format with MMIO
//! caching on and off; the oracle finds no violation, and every exit kind the workload must
//! produce is counted.

use std::time::Duration;
use vmmu::spte::FormatKind;
use vmmu_sim::host::HostConfig;
use vmmu_sim::machine::{Machine, MachineConfig};
use vmmu_sim::{RealMmu, RealMmuConfig};

fn run(format: FormatKind, caching: bool) {
    let name = if format == FormatKind::Ept { "ept" } else { "npt" };
    let machine = Machine::new(MachineConfig {
        vcpus: 2,
        seed: 7,
        duration: Duration::from_millis(1000),
        min_updates: 30,
        update_pause: Duration::from_micros(100),
        host: HostConfig::new(46),
        format: name.into(),
        mmio_caching_requested: caching,
        ..MachineConfig::default()
    })
    .expect("machine");
    let mmu = RealMmu::new(
        machine.host().clone(),
        RealMmuConfig {
            format,
            phys_bits: 46,
            mmio_caching: caching,
            vcpus: 2,
            generation_base: 0,
            slot_zap_all: false,
            bugs: vmmu::bugs::BugSet::NONE,
        },
    )
    .expect("mmu");
    let report = machine.run(&mmu).expect("run");
    let ctx = format!("{name} caching={caching}\n{report}");
    eprintln!("{ctx}");
    assert_eq!(report.oracle.violations, 0, "{ctx}");
    assert!(report.vcpus.iter().all(|v| v.errors == 0), "{ctx}");
    assert!(report.memslots.updates >= 30, "{ctx}");
    let x = &report.exits;
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
