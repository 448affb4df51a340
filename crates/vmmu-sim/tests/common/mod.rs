//! Shared by the sim's integration tests: a short run of the default machine on the real MMU.

use std::time::Duration;
use vmmu::bugs::BugSet;
use vmmu::spte::FormatKind;
use vmmu_sim::host::HostConfig;
use vmmu_sim::machine::{Machine, MachineConfig};
use vmmu_sim::{RealMmu, RealMmuConfig, Report};

/// Runs the default machine (2 vCPUs, MAXPHYADDR 46) on the real MMU for `duration` and at least
/// `min_updates` memslot updates, with `bugs` re-injected.
pub fn run_real(
    format: FormatKind,
    caching: bool,
    bugs: BugSet,
    seed: u64,
    duration: Duration,
    min_updates: u64,
) -> Report {
    let machine = Machine::new(MachineConfig {
        vcpus: 2,
        seed,
        duration,
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
        },
    )
    .expect("mmu");
    machine.run(&mmu).expect("run")
}
