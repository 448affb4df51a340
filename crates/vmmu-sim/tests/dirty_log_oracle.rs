//! The dirty-log oracle end to end (issue 16 point 4): the default machine with its RAM slots
//! dirty-logged and a migration thread collecting back to back, in both modes. Without a bug no
//! write is lost; with the TLB flush after the re-protect removed (`dirty-log-no-flush`) vCPUs
//! keep writing through cached writable translations and the oracle reports lost dirty pages.
//! Each run is bounded by an access budget and a time cap. Migrations (`dirty_log_rounds`) turn
//! logging on and off on the live slots, over huge host pages.

use std::num::NonZeroU32;
use std::time::Duration;
use vmmu::bugs::BugSet;
use vmmu::spte::FormatKind;
use vmmu_sim::machine::{HostPages, Machine, MachineConfig};
use vmmu_sim::migration::DirtyLogMode;
use vmmu_sim::{RealMmu, RealMmuConfig, Report};

fn run(mode: DirtyLogMode, format: FormatKind, bugs: BugSet, seed: u64) -> Report {
    run_with(mode, format, bugs, seed, |c| c)
}

fn run_with(
    mode: DirtyLogMode,
    format: FormatKind,
    bugs: BugSet,
    seed: u64,
    edit: impl FnOnce(MachineConfig) -> MachineConfig,
) -> Report {
    let cfg = edit(MachineConfig {
        seed,
        // A cap, not the run's length: a run stops once its budget (accesses and collections)
        // is met, and the checks below need the collections, which a loaded 2-core CI host may
        // take long to reach in the debug build.
        duration: Duration::from_secs(10),
        accesses_per_vcpu: Some(150_000),
        // The checks below need collections, whichever thread a loaded host runs first.
        min_collections: 3,
        format,
        dirty_log: Some(mode),
        ..MachineConfig::default()
    });
    let machine = Machine::new(cfg).expect("machine");
    let mmu = RealMmu::new(
        machine.host().clone(),
        RealMmuConfig {
            format,
            phys_bits: 46,
            mmio_caching: true,
            vcpus: machine.config().vcpus,
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

#[test]
fn no_dirty_page_is_lost_in_any_mode() {
    for (mode, format) in [
        (DirtyLogMode::Auto, FormatKind::Ept),
        (DirtyLogMode::Manual, FormatKind::Npt),
        (DirtyLogMode::InitiallySet, FormatKind::Ept),
    ] {
        let r = run(mode, format, BugSet::NONE, 3);
        let d = r.dirty_log.clone().expect("dirty-log report");
        let ctx = format!("{mode:?} {format:?}: {d:?} {:?}", r.oracle.first_violations);
        assert_eq!(r.oracle.violations, 0, "{ctx}");
        assert!(d.collections >= 3 && d.pages_reported > 0 && d.windows_checked > 0, "{ctx}");
    }
}

/// Migration after migration: logging starts on slots the vCPUs mapped with 2 MiB leaves (split
/// and write-protected), stops (huge pages recovered), starts again. With logging started by a
/// write-protect that skipped huge leaves (checked by hand), every write through a 2 MiB leaf
/// mapped before the migration was lost: the plain runs log from the slots' creation and map no
/// huge leaf in them, so only these runs see it. With "initially set" logging starts with the
/// 2 MiB leaves writable and the first CLEAR splits and protects them: with a CLEAR that skipped
/// huge leaves (checked by hand) writes through them after it were lost.
#[test]
fn no_dirty_page_is_lost_across_migrations_on_huge_host_pages() {
    let migrations = |c| MachineConfig {
        dirty_log_rounds: NonZeroU32::new(3),
        // The first migration's three and final collections, and one of the second.
        min_collections: 5,
        host_pages: HostPages::Huge,
        ..c
    };
    for (mode, format) in [
        (DirtyLogMode::Auto, FormatKind::Ept),
        (DirtyLogMode::Manual, FormatKind::Npt),
        (DirtyLogMode::InitiallySet, FormatKind::Ept),
    ] {
        let r = run_with(mode, format, BugSet::NONE, 5, migrations);
        let d = r.dirty_log.clone().expect("dirty-log report");
        let ctx = format!("{mode:?} {format:?}: {d:?} {:?}", r.oracle.first_violations);
        assert_eq!(r.oracle.violations, 0, "{ctx}");
        assert!(d.migrations >= 2 && d.pages_reported > 0 && d.windows_checked > 0, "{ctx}");
        assert!(r.tlb.inserts_huge > 0, "no 2 MiB leaf was used: {ctx}");
    }
}

#[test]
fn without_dirty_logging_there_is_no_report() {
    let cfg = MachineConfig { accesses_per_vcpu: Some(1000), ..MachineConfig::default() };
    let machine = Machine::new(cfg).expect("machine");
    let mmu = RealMmu::new(
        machine.host().clone(),
        RealMmuConfig {
            format: FormatKind::Ept,
            phys_bits: 46,
            mmio_caching: true,
            vcpus: 2,
            generation_base: 0,
            slot_zap_all: false,
            tdp_prefetch: false,
            shadow_mmio_path_only: false,
            shadow_pages: None,
            bugs: BugSet::NONE,
        },
    )
    .expect("mmu");
    let r = machine.run(&mmu).expect("run");
    assert!(r.dirty_log.is_none());
    let json = serde_json::to_value(&r).expect("json");
    assert!(json.get("dirty_log").is_none(), "the JSON keys of a run without --dirty-log stay");
}

/// The stale writable entry a collection leaves must survive until the vCPU writes its page
/// again. On the default machine the device manager's memslot updates flush every TLB a few
/// times per collection and the 256-entry TLB evicts by conflict, so three seeds all missed the
/// bug in one CI run out of several (73 of 100 seeds missed it, measured): here the device
/// manager pauses 50 ms between requests and the TLB has 4096 entries (0 of 100 seeds missed).
#[cfg(feature = "historical-bugs")]
#[test]
fn the_oracle_catches_a_missing_flush_after_the_reprotect() {
    let bug = BugSet::only(vmmu::bugs::Bug::DirtyLogNoFlush);
    let quiet =
        |c| MachineConfig { tlb_entries: 4096, update_pause: Duration::from_millis(50), ..c };
    let caught = (0..3).any(|seed| {
        let r = run_with(DirtyLogMode::Auto, FormatKind::Ept, bug, 40 + seed, quiet);
        eprintln!("seed {}: {} violations", 40 + seed, r.oracle.violations);
        r.oracle.first_violations.iter().any(|v| v.what.contains("lost dirty page"))
    });
    assert!(caught, "a write through a stale writable TLB entry went unseen");
}
