//! End to end: the machine with the reference MMU runs clean; with a stale MMU the oracle
//! reports violations (it has teeth).

use std::time::Duration;
use vmmu::memslot::MemslotError;
use vmmu::types::{Gpa, Pfn};
use vmmu_sim::machine::{Machine, MachineConfig};
use vmmu_sim::reference::{ReferenceMmu, StaleMmu};
use vmmu_sim::seam::{AccessKind, GuestMmu, SlotRequest, Translation};

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
    eprintln!("{report:#?}");
    assert_eq!(report.oracle.violations, 0, "{report:#?}");
    assert!(ticks > 0, "progress was reported");
    assert!(report.memslots.updates >= 60, "{report:#?}");
    assert!(report.memslots.refused >= 1, "the EEXIST step ran: {report:#?}");
    assert!(report.total_accesses() >= 80_000);
    assert!(report.oracle.checked >= report.total_accesses());
    assert!(
        report.exits.mmio_device > 0
            && report.exits.mmio_userspace > 0
            && report.exits.readonly_write > 0
    );
    assert!(report.tlb.hits > 0 && report.tlb.flushes > 0, "{report:#?}");
    assert!(report.memslots.latency_ns.max >= report.memslots.latency_ns.p50);
    assert!(report.vcpus.iter().all(|v| v.errors == 0 && v.accesses_per_sec > 0.0));
}

#[test]
fn stale_mmu_is_caught() {
    let machine = Machine::new(config(12)).expect("machine");
    let mmu = StaleMmu(ReferenceMmu::new(machine.host().clone()));
    let report = machine.run(&mmu).expect("run");
    eprintln!("{report:#?}");
    assert!(report.oracle.violations > 0, "a stale MMU must not pass: {report:#?}");
    let v = &report.oracle.first_violations[0];
    assert!(v.vcpu.is_some() && v.gpa.is_some(), "violations name the vCPU and GPA: {v}");
    assert!(v.what.starts_with("Bar") || v.what.starts_with("Dimm"), "{v}");
    // The text verdict ("oracle: FAILED") is the CLI's rendering: crates/vmmu-cli/src/run_report.rs.
}

/// An MMU that answers every first translation of a vCPU with "retry", like a fault racing an
/// invalidation: the machine must go back through its poll point and try again.
struct RetryingMmu(ReferenceMmu);

impl GuestMmu for RetryingMmu {
    type Vcpu = (<ReferenceMmu as GuestMmu>::Vcpu, bool);
    fn create_vcpu(&self, index: usize) -> Self::Vcpu {
        (self.0.create_vcpu(index), false)
    }
    fn set_memory_region(&self, r: &SlotRequest) -> Result<(), MemslotError> {
        self.0.set_memory_region(r)
    }
    fn translate(&self, v: &mut Self::Vcpu, gpa: Gpa, access: AccessKind) -> Translation {
        v.1 = !v.1;
        if v.1 {
            return Translation::Retry;
        }
        self.0.translate(&mut v.0, gpa, access)
    }
    fn enter_guest(&self, v: &mut Self::Vcpu) {
        self.0.enter_guest(&mut v.0)
    }
    fn exit_guest(&self, v: &mut Self::Vcpu) {
        self.0.exit_guest(&mut v.0)
    }
    fn poll_tlb_flush(&self, v: &mut Self::Vcpu) -> bool {
        self.0.poll_tlb_flush(&mut v.0)
    }
}

#[test]
fn retries_tiny_tlbs_and_more_vcpus_than_cores_stay_clean() {
    let cfg = MachineConfig {
        vcpus: 3,
        tlb_entries: 2,
        accesses_per_vcpu: Some(20_000),
        min_updates: 20,
        ..config(13)
    };
    let machine = Machine::new(cfg).expect("machine");
    let mmu = RetryingMmu(ReferenceMmu::new(machine.host().clone()));
    let report = machine.run(&mmu).expect("run");
    assert_eq!(report.oracle.violations, 0, "{report:#?}");
    assert!(report.vcpus.iter().all(|v| v.retries > 0), "{report:#?}");
}

/// An MMU that maps every RAM access one page too far: a wrong (not stale) translation.
struct OffByOnePageMmu(ReferenceMmu);

impl GuestMmu for OffByOnePageMmu {
    type Vcpu = <ReferenceMmu as GuestMmu>::Vcpu;
    fn create_vcpu(&self, index: usize) -> Self::Vcpu {
        self.0.create_vcpu(index)
    }
    fn set_memory_region(&self, r: &SlotRequest) -> Result<(), MemslotError> {
        self.0.set_memory_region(r)
    }
    fn translate(&self, v: &mut Self::Vcpu, gpa: Gpa, access: AccessKind) -> Translation {
        match self.0.translate(v, gpa, access) {
            Translation::Ram { pfn, writable, level } => {
                Translation::Ram { pfn: Pfn(pfn.0 + 1), writable, level }
            }
            t => t,
        }
    }
}

#[test]
fn a_wrong_translation_is_caught_on_static_memory_too() {
    let cfg = MachineConfig { accesses_per_vcpu: Some(5_000), min_updates: 0, ..config(14) };
    let machine = Machine::new(cfg).expect("machine");
    let report =
        machine.run(&OffByOnePageMmu(ReferenceMmu::new(machine.host().clone()))).expect("run");
    assert!(report.oracle.violations > 100, "{report:#?}");
    let kinds: Vec<&str> = report.oracle.first_violations.iter().map(|v| v.what.as_str()).collect();
    assert!(kinds.iter().any(|k| k.starts_with("Private") || k.starts_with("Rom")), "{kinds:?}");
}

#[test]
fn a_machine_runs_twice_with_fresh_mmus() {
    let cfg = MachineConfig { accesses_per_vcpu: Some(10_000), min_updates: 10, ..config(15) };
    let machine = Machine::new(cfg).expect("machine");
    for _ in 0..2 {
        let report = machine.run(&ReferenceMmu::new(machine.host().clone())).expect("run");
        assert_eq!(report.oracle.violations, 0, "{report:#?}");
    }
}
