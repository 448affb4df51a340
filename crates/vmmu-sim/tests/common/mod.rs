//! Shared by the sim's integration tests: a short run of the default machine on the real MMU.

use std::time::Duration;
use vmmu::bugs::BugSet;
use vmmu::spte::FormatKind;
use vmmu_sim::host::HostConfig;
use vmmu_sim::machine::{Machine, MachineConfig};
use vmmu_sim::{RealMmu, RealMmuConfig, Report};

/// Time cap of [`run_real`]: only a starved host (many more runnable threads than cores) gets
/// near it, since memslot updates wait for both vCPUs to acknowledge.
const CAP: Duration = Duration::from_secs(60);

/// Runs the default machine (2 vCPUs, MAXPHYADDR 46) on the real MMU, with `bugs` re-injected,
/// until every vCPU made `accesses_per_vcpu` accesses and the device manager made `min_updates`
/// memslot updates (or [`CAP`] passed). A budget, not a duration: on a loaded host a fixed time
/// gave a run 25 updates where an idle one makes 2000.
pub fn run_real(
    format: FormatKind,
    caching: bool,
    bugs: BugSet,
    seed: u64,
    accesses_per_vcpu: u64,
    min_updates: u64,
) -> Report {
    let machine = Machine::new(MachineConfig {
        vcpus: 2,
        seed,
        duration: CAP,
        accesses_per_vcpu: Some(accesses_per_vcpu),
        min_updates,
        update_pause: Duration::from_micros(100),
        host: HostConfig::new(46),
        format,
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
            bugs,
            tdp_prefetch: false,
            shadow_mmio_path_only: false,
            shadow_pages: None,
        },
    )
    .expect("mmu");
    machine.run(&mmu).expect("run")
}
