//! The TDP MMU in the window where a dirty-log collection (GET in auto mode, or a CLEAR) has
//! write-protected under the MMU lock and waits, outside it, in its remote TLB flush for a vCPU
//! that holds a writable translation in guest mode: the paths that do not take the VMM lock act
//! in that window (a vCPU's write fault, a host invalidation), and each must keep its promise
//! (the write logged, the invalidation's begin not returning before the stale translation is
//! flushed). The shadow MMU broke such a promise (`tests/shadow_dirty_log_flush.rs`); these
//! hold on the TDP MMU (review 56e), and the control shows the invalidation probe catches a zap
//! without its flush. The order is forced by the MMU's own flush wait, not by timing (but for
//! how long the probe waits for a begin that should block).
#![cfg(not(loom))]

mod common;

use common::{region, RAM_HVA};
use common::{start_collection, wait_for};
use std::sync::mpsc;
use std::time::Duration;
use vmmu::dirty::{pages_of, DirtyLogMode};
use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::Vm;
use vmmu::{Access, AsId, Gpa, Hva, Pfn, SlotId};

const GPA: u64 = 0x10_0000;
const HVA: u64 = RAM_HVA + 0x10_0000;
const P: u64 = GPA + 0x1000;

fn pages(words: &[u64]) -> Vec<u64> {
    pages_of(words).collect()
}

/// A logged slot 7 of 4 pages at `GPA`, and two vCPUs.
fn setup(format: FormatKind, mode: DirtyLogMode) -> (Vm<TestHost>, Vcpu<TestHost>, Vcpu<TestHost>) {
    setup_with(format, mode, vmmu::bugs::BugSet::NONE)
}

fn setup_with(
    format: FormatKind,
    mode: DirtyLogMode,
    bugs: vmmu::bugs::BugSet,
) -> (Vm<TestHost>, Vcpu<TestHost>, Vcpu<TestHost>) {
    let mut cfg = vmmu::vm::VmConfig::new(format, 46).unwrap();
    cfg.bugs = bugs;
    let (vm, _host) = common::vm_with(cfg);
    vm.set_dirty_log_mode(mode);
    vm.set_memory_region(&region(7, GPA, 0x4000, HVA, KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    let v0 = vm.create_vcpu().unwrap();
    let v1 = vm.create_vcpu().unwrap();
    (vm, v0, v1)
}

/// vCPU `v` writes `gpa`, then stays in guest mode with the writable translation in its TLB.
fn hold_writable(v: &mut Vcpu<TestHost>, gpa: u64) -> Pfn {
    let (seen, _) = common::access(v, gpa, true).unwrap();
    let common::Seen::Ram(pfn) = seen else { panic!("{gpa:#x} is RAM") };
    loop {
        v.service_requests().unwrap();
        if v.enter_guest_mode().is_ok() {
            break;
        }
    }
    match v.walk(Gpa(gpa), Access::WRITE) {
        HwWalk::Translated { pfn: p, perms, .. } => {
            assert!(perms.contains(Access::WRITE));
            assert_eq!(p, pfn);
        }
        other => panic!("writable translation of {gpa:#x}: {other:?}"),
    }
    pfn
}

/// Dirty logging's promise across the collection's window: vCPU 1 holds a writable translation
/// of P; the collection took P's bit, protected P's leaf and waits in its flush (outside the
/// MMU lock). vCPU 0 writes P in that window (it must fault, be logged, and not wait for
/// vCPU 1); then vCPU 1 leaves guest mode and writes P again after the collection returned.
/// The next collection must report P.
fn collection_window_write(format: FormatKind, mode: DirtyLogMode) {
    let (vm, mut v0, mut v1) = setup(format, mode);
    hold_writable(&mut v1, P);
    let collector = start_collection(&vm, &v1, mode);

    let (tx, rx) = mpsc::channel();
    let faulter = std::thread::spawn(move || {
        let r = common::access(&mut v0, P, true).unwrap();
        tx.send(r.1.len()).unwrap();
        v0
    });
    let faults = rx.recv_timeout(Duration::from_secs(5));
    assert!(!collector.is_finished(), "vCPU 1 is still in guest mode");
    v1.exit_guest_mode();
    let words = collector.join().unwrap();
    let _v0 = faulter.join().unwrap();
    assert_eq!(pages(&words), [1], "the collection took P");
    assert!(faults.is_ok(), "vCPU 0's write in the window completed without vCPU 1");
    assert!(faults.unwrap() >= 1, "vCPU 0's write faulted on the protected leaf");

    // vCPU 1 (flushed) writes P after the collection returned.
    common::access(&mut v1, P, true).unwrap();
    let next = vm.get_dirty_log(AsId(0), SlotId(7)).unwrap();
    assert_eq!(pages(&next), [1], "{mode:?}: P, written after the collection, is in the next");
}

#[test]
fn tdp_get_window_write_by_another_vcpu_is_logged_ept() {
    collection_window_write(FormatKind::Ept, DirtyLogMode::Auto);
}

#[test]
fn tdp_get_window_write_by_another_vcpu_is_logged_npt() {
    collection_window_write(FormatKind::Npt, DirtyLogMode::Auto);
}

#[test]
fn tdp_clear_window_write_by_another_vcpu_is_logged_ept() {
    collection_window_write(FormatKind::Ept, DirtyLogMode::Manual);
}

/// A host invalidation of P in the collection's window: P's leaf is read-only (the collection
/// protected it) but vCPU 1's TLB still holds it; the begin must not return before vCPU 1's
/// translation is flushed (after the begin returns, the host may free P's frame).
fn invalidation_in_collection_window(format: FormatKind, mode: DirtyLogMode) {
    assert!(
        !begin_returns_early(format, mode, vmmu::bugs::BugSet::NONE),
        "harm: the host invalidation of P returned while vCPU 1 still held a translation of P"
    );
}

/// Whether the begin of the invalidation of P returned while vCPU 1 still held P. A correct
/// begin never returns before vCPU 1 leaves guest mode, so a short wait proves nothing false;
/// with a bug injected it returns at once, and the wait is long, so that a loaded machine does
/// not hide it.
fn begin_returns_early(format: FormatKind, mode: DirtyLogMode, bugs: vmmu::bugs::BugSet) -> bool {
    let (vm, _v0, mut v1) = setup_with(format, mode, bugs);
    hold_writable(&mut v1, P);
    let collector = start_collection(&vm, &v1, mode);
    let vm_i = vm.clone();
    let inval = std::thread::spawn(move || {
        vm_i.invalidate_hva_range_begin(Hva(HVA + 0x1000), Hva(HVA + 0x2000))
    });
    let wait = if bugs == vmmu::bugs::BugSet::NONE { 300 } else { 10_000 };
    let begin_returned_early = wait_for(Duration::from_millis(wait), || inval.is_finished());
    v1.exit_guest_mode();
    collector.join().unwrap();
    let inv = inval.join().unwrap();
    inv.end();
    begin_returned_early
}

#[cfg(feature = "historical-bugs")]
/// Control: the probe above has teeth. With the zap's flush removed (`Bug::NoTlbFlushOnZap`)
/// the begin returns while vCPU 1 still holds P.
#[test]
fn control_the_invalidation_probe_catches_a_zap_without_flush() {
    let bugs = vmmu::bugs::BugSet::NONE.with(vmmu::bugs::Bug::NoTlbFlushOnZap);
    assert!(begin_returns_early(FormatKind::Ept, DirtyLogMode::Auto, bugs));
}

#[test]
fn tdp_invalidation_in_get_window_waits_for_the_stale_translation() {
    invalidation_in_collection_window(FormatKind::Ept, DirtyLogMode::Auto);
}

#[test]
fn tdp_invalidation_in_clear_window_waits_for_the_stale_translation() {
    invalidation_in_collection_window(FormatKind::Npt, DirtyLogMode::Manual);
}
