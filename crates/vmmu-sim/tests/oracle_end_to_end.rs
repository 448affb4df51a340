//! End to end: the machine with the reference MMU runs clean; with a stale MMU the oracle
//! reports violations (it has teeth).

use std::time::Duration;
use vmmu_sim::machine::{Machine, MachineConfig};
use vmmu_sim::reference::{ReferenceMmu, StaleMmu};

fn config(seed: u64) -> MachineConfig {
    MachineConfig {
        vcpus: 2,
        seed,
        duration: Duration::from_secs(5),
        accesses_per_vcpu: Some(40_000),
        min_updates: 60,
        update_pause: Duration::from_micros(100),
        ..MachineConfig::default()
    }
}

#[test]
fn reference_mmu_runs_clean() {
    let machine = Machine::new(config(11)).expect("machine");
    let mmu = ReferenceMmu::new(machine.host().clone());
    let mut ticks = 0;
    let report = machine.run_with_progress(&mmu, &mut |_| ticks += 1).expect("run");
    eprintln!("{report}");
    assert_eq!(report.oracle.violations, 0, "{report}");
    assert!(ticks > 0, "progress was reported");
    assert!(report.memslots.updates >= 60, "{report}");
    assert!(report.memslots.refused >= 1, "the EEXIST step ran: {report}");
    assert!(report.total_accesses() >= 80_000);
    assert!(report.oracle.checked >= report.total_accesses());
    assert!(
        report.exits.mmio_device > 0
            && report.exits.mmio_userspace > 0
            && report.exits.readonly_write > 0
    );
    assert!(report.tlb.hits > 0 && report.tlb.flushes > 0, "{report}");
    assert!(report.memslots.latency_ns.max >= report.memslots.latency_ns.p50);
    assert!(report.vcpus.iter().all(|v| v.errors == 0 && v.accesses_per_sec > 0.0));
}

#[test]
fn stale_mmu_is_caught() {
    let machine = Machine::new(config(12)).expect("machine");
    let mmu = StaleMmu(ReferenceMmu::new(machine.host().clone()));
    let report = machine.run(&mmu).expect("run");
    eprintln!("{report}");
    assert!(report.oracle.violations > 0, "a stale MMU must not pass: {report}");
    let v = &report.oracle.first_violations[0];
    assert!(v.vcpu.is_some() && v.gpa.is_some(), "violations name the vCPU and GPA: {v}");
    assert!(v.what.starts_with("Bar") || v.what.starts_with("Dimm"), "{v}");
    assert!(report.to_string().contains("oracle: FAILED"));
}
