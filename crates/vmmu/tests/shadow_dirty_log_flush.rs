//! Shadow paging against dirty logging's write protection, whose remote TLB flush runs after
//! the shadow lock is dropped (as KVM's): a guest table shadowed in that window must flush for
//! it (KVM: the MMU-writable bit; here `MmuCore::unflushed_write_protects`), or a vCPU whose
//! TLB still holds a writable translation of the table writes it untrapped and the shadow goes
//! stale for good (found by review 56d).
//!
//! Each test drives real threads whose order is forced by the MMU's own waits (a remote TLB
//! flush waits for a vCPU in guest mode), not by timing, and reports the harm as the guest
//! sees it.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use common::start_collection;
use std::sync::mpsc;
use std::time::Duration;
use vmmu::bugs::BugSet;
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::tdp::HwWalk;
use vmmu::{Access, Gva};

/// A logged slot (slot 7): its guest-physical base and its host address (inside the test
/// host's RAM mapping, far above the guest tables `Space` allocates).
const LOG_GPA: u64 = 0x1_0020_0000;
const LOG_HVA: u64 = RAM_HVA + 0x100_0000;
const AC: u64 = 0x20;
const DT: u64 = 0x40;

/// Shadow facts §4.1 (`account_shadowed` write-protects the new table's gfn "and flushes") and
/// the KVM rule behind `mmu_spte_update`'s return value: an SPTE whose W bit was cleared by a
/// write protection whose TLB flush has not happened yet may still be cached writable, so a
/// later protection that finds it read-only must flush anyway (KVM keys this on the
/// MMU-writable bit: `spte_write_protect(.., pt_protect = true)` clears it and reports a flush).
///
/// Interleaving (all of it forced, nothing timed):
/// 1. vCPU 1 writes data page D through gva A (a writable leaf; D is dirty in logged slot 7),
///    enters guest mode and caches the writable translation A -> D (its TLB entry).
/// 2. The VMM collects slot 7's dirty log (`get_dirty_log`, auto mode): under the shadow lock it
///    clears W of D's leaf, drops the lock, and then waits in its remote flush for vCPU 1,
///    which is in guest mode.
/// 3. In that window vCPU 0 faults on gva B, whose guest PDE uses D as its page table: the MMU
///    shadows D (`account_shadowed`), finds D's only leaf read-only already, owes no flush,
///    re-reads the gPTE (unchanged), and installs B -> TARGET. Its fault returns while
///    vCPU 1's writable TLB entry for D still stands.
/// 4. vCPU 1, still in guest mode and not flushed, writes D's entry 0 (B's PTE) to NEW through
///    that entry: a write to a shadowed guest page table that no fault traps and no
///    `track_write` sees. It then exits (the collection's flush completes).
/// 5. The guest invalidates B on vCPU 0 (INVLPG), as the architecture requires after the PTE
///    change, and reads B: it must reach NEW. It reaches TARGET, which the guest's tables no
///    longer map, for good (nothing will ever correct the shadow of D's entry 0).
///
/// With the flush (a correct MMU), step 3 blocks in the fault's flush until vCPU 1 leaves guest
/// mode; vCPU 1's write lands before the re-read, the fault retries and maps NEW.
#[test]
fn shadowing_a_table_whose_leaf_a_dirty_log_collection_protected_but_did_not_flush_yet() {
    collection_window(vmmu::dirty::DirtyLogMode::Auto);
}

/// The same with manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): the window is the
/// CLEAR's, which write-protects under the lock and flushes after dropping it.
#[test]
fn shadowing_a_table_whose_leaf_a_dirty_log_clear_protected_but_did_not_flush_yet() {
    collection_window(vmmu::dirty::DirtyLogMode::Manual);
}

fn collection_window(mode: vmmu::dirty::DirtyLogMode) {
    const A: u64 = 0x4000_0000; // the guest's direct map of D
    const B: u64 = 0x6000_0000; // translated through D as a page table (entry 0)
    const D: u64 = LOG_GPA;
    const TARGET: u64 = 0x21_0000;
    const NEW: u64 = 0x22_0000;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    vm.set_dirty_log_mode(mode);
    vm.set_memory_region(&UserspaceMemoryRegion::new(
        7,
        KVM_MEM_LOG_DIRTY_PAGES,
        LOG_GPA,
        0x4000,
        LOG_HVA,
    ))
    .unwrap();
    let s = Space::new(&host, &next);
    s.map4k(A, D, P | RW | US | AC | DT);
    let pde = s.entry_gpa(B, 2);
    host.write_u64(RAM_HVA + pde, D | P | RW | US | AC);
    host.write_u64(LOG_HVA, TARGET | P | RW | US | AC);
    let mut v0 = vcpu_in(&vm, long4(s.cr3));
    v0.service_requests().unwrap();
    let mut v1 = vcpu_in(&vm, long4(s.cr3));

    // 1. vCPU 1 writes D through A and keeps the writable translation in its TLB.
    assert_eq!(access(&mut v1, A, true), Seen::Ram(ram_pfn(LOG_HVA - RAM_HVA)));
    loop {
        v1.service_requests().unwrap();
        if v1.enter_guest_mode().is_ok() {
            break;
        }
    }
    match v1.walk_gva(Gva(A), Access::WRITE.union(Access::USER)) {
        HwWalk::Translated { perms, .. } => assert!(perms.contains(Access::WRITE)),
        other => panic!("vCPU 1's writable translation of A: {other:?}"),
    }

    // 2. The collection protects D's leaf and waits in its flush for vCPU 1.
    let collector = start_collection(&vm, &v1, mode);

    // 3. vCPU 0 faults on B through D (its own thread: a correct MMU makes it wait for vCPU 1).
    let (done_tx, done_rx) = mpsc::channel();
    let faulter = std::thread::spawn(move || {
        let seen = access(&mut v0, B, false);
        done_tx.send(seen).unwrap();
        v0
    });
    let fault_returned_first = done_rx.recv_timeout(Duration::from_secs(2)).ok();

    // 4. vCPU 1 writes B's PTE (entry 0 of D) through its unflushed TLB entry, then exits.
    assert!(!collector.is_finished(), "vCPU 1's TLB entry is still unflushed");
    host.write_u64(LOG_HVA, NEW | P | RW | US | AC);
    v1.exit_guest_mode();
    let words = collector.join().unwrap();
    assert_eq!(words[0] & 1, 1, "the collection took D's dirty bit");
    let fault_seen = fault_returned_first.or_else(|| done_rx.recv().ok());
    let mut v0 = faulter.join().unwrap();

    // 5. The guest invalidates B on vCPU 0 and reads it.
    v0.invlpg(Gva(B)).unwrap();
    let seen = access(&mut v0, B, false);
    assert_eq!(
        seen,
        Seen::Ram(ram_pfn(NEW)),
        "harm ({mode:?}): after the guest changed B's PTE (entry 0 of its page table D) to {NEW:#x} and \
         ran INVLPG, vCPU 0 still translates B to {TARGET:#x}. vCPU 0's fault (returned before \
         vCPU 1's write: {}, seeing {fault_seen:?}) shadowed D without flushing vCPU 1's \
         writable TLB entry for D, whose W bit the dirty-log collection had cleared but not \
         yet flushed; vCPU 1's write to the shadowed table was never trapped",
        fault_returned_first.is_some()
    );
}
