//! Shadow-MMU behaviours that mutation testing (`cargo mutants` on `src/shadow`, `src/guest` and
//! `src/dirty`) found unpinned: each test names the mutant it kills and shows the harm as the
//! guest would see it (a wrong translation, a write that escapes the dirty log, a guest table
//! write the MMU does not see), not as an internal flag.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::collections::HashMap;
use vmmu::bugs::BugSet;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::host::HostAccess;
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::Vm;
use vmmu::{Access, AsId, Gva, Pfn, SlotId};

/// A logged slot's guest-physical base, its host address and the GVA the tests map it at.
const LOG_GPA: u64 = 0x1_0020_0000;
const LOG_HVA: u64 = RAM_HVA + 0x100_0000;
const LOG_GVA: u64 = 0x5000_0000;

fn log_region(flags: u32) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(7, flags, LOG_GPA, 0x4000, LOG_HVA)
}

/// The logged slot's dirty pages (auto mode: collected, cleared and re-protected).
fn dirty(vm: &Vm<TestHost>) -> Vec<u64> {
    vmmu::dirty::pages_of(&vm.get_dirty_log(AsId(0), SlotId(7)).unwrap()).collect()
}

/// A shadow vCPU with a TLB, as the hardware has: translations (with their write right) stay
/// cached across accesses until a flush request empties the TLB, so an MMU that forgets to
/// flush after taking a right away is caught by the next access through the stale entry.
struct TlbVcpu {
    v: Vcpu<TestHost>,
    tlb: HashMap<u64, (Pfn, bool)>,
}

impl TlbVcpu {
    fn new(vm: &Vm<TestHost>, cr3: u64) -> Self {
        TlbVcpu { v: vcpu_in(vm, long4(cr3)), tlb: HashMap::new() }
    }

    /// Whether `gva` is still in the TLB once pending requests (a flush) are serviced.
    fn cached(&mut self, gva: u64) -> bool {
        if self.v.service_requests().unwrap().flush_tlb {
            self.tlb.clear();
        }
        self.tlb.contains_key(&(gva >> 12))
    }

    /// One user access to `gva` to completion, through the TLB first.
    fn access(&mut self, gva: u64, write: bool) -> Seen {
        let need = if write { Access::WRITE.union(Access::USER) } else { Access::USER };
        for _ in 0..50 {
            if self.v.service_requests().unwrap().flush_tlb {
                self.tlb.clear();
            }
            if let Some(&(pfn, w)) = self.tlb.get(&(gva >> 12)) {
                if w || !write {
                    return Seen::Ram(pfn);
                }
            }
            if self.v.enter_guest_mode().is_err() {
                continue;
            }
            let walk = self.v.walk_gva(Gva(gva), need);
            self.v.exit_guest_mode();
            let user_write = PfErr::USER | if write { PfErr::WRITE } else { 0 };
            let err = match walk {
                HwWalk::Translated { pfn, perms, .. } => {
                    self.tlb.insert(gva >> 12, (pfn, perms.contains(Access::WRITE)));
                    return Seen::Ram(pfn);
                }
                HwWalk::Violation { present, .. } => {
                    user_write | if present { PfErr::PRESENT } else { 0 }
                }
                HwWalk::Misconfig { .. } => user_write | PfErr::RSVD | PfErr::PRESENT,
                HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
            };
            match self.v.handle_page_fault(Gva(gva), PfErr(err)).unwrap() {
                FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_) => {}
                FaultOutcome::Emulate { gpa, source, .. } => return Seen::Mmio(gpa, source),
                FaultOutcome::GuestPageFault { error_code, .. } => {
                    return Seen::GuestPf(error_code.0)
                }
            }
        }
        panic!("access to {gva:#x} did not complete");
    }
}

/// Logging starts on a slot whose pages the guest already wrote through writable shadow leaves
/// (cached in its TLB): the leaves must lose their write right (KVM
/// `kvm_mmu_slot_gfn_write_protect` through the rmap) and the TLBs be flushed, else later writes
/// go through them without a fault and the page never reaches the dirty log.
/// Kills `shadow/dirty.rs`: `ShadowMmu::write_protect_gfn_range` replaced with `()`, and its
/// `batch.flush |=` replaced with `&=` (no flush).
#[test]
fn starting_dirty_logging_write_protects_leaves_that_were_writable() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    vm.set_memory_region(&log_region(0)).unwrap();
    for i in 0..4 {
        s.map4k(LOG_GVA + i * 0x1000, LOG_GPA + i * 0x1000, P | RW | US);
    }
    let mut v = TlbVcpu::new(&vm, s.cr3);
    for i in 0..4 {
        assert!(matches!(v.access(LOG_GVA + i * 0x1000, true), Seen::Ram(_)));
    }
    vm.set_memory_region(&log_region(KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    assert_eq!(dirty(&vm), Vec::<u64>::new(), "nothing written since logging started");
    assert!(matches!(v.access(LOG_GVA + 0x2008, true), Seen::Ram(_)));
    assert_eq!(dirty(&vm), vec![2], "the write after logging started is logged");
}

fn mapped(v: &mut Vcpu<TestHost>, gva: u64) -> bool {
    matches!(hw(v, gva, false), HwWalk::Translated { .. })
}

/// A guest store of `value` at `gva` as the machine does it: through a writable translation
/// straight into memory, or, when the MMU write-protects the page (a shadowed guest table),
/// emulated by the hypervisor, which reports the write to the MMU.
fn guest_store(v: &mut TlbVcpu, host: &TestHost, gva: u64, value: u64) {
    match v.access(gva, true) {
        Seen::Ram(pfn) => host.write_u64((pfn.0 << 12) | (gva & 0xfff), value),
        Seen::Mmio(gpa, vmmu::fault::EmulateSource::WriteProtected) => {
            host.write_u64(RAM_HVA + gpa.0, value);
            v.v.track_write(gpa, 8).unwrap();
        }
        other => panic!("store to {gva:#x}: {other:?}"),
    }
}

/// The guest's INVLPG: the hardware drops its own TLB entry, the hypervisor is told.
fn invlpg(v: &mut TlbVcpu, gva: u64) {
    v.tlb.remove(&(gva >> 12));
    v.v.invlpg(Gva(gva)).unwrap();
}

const A: u64 = 0x4000_0000;
/// Where the guest maps its own page tables (another last-level table than `A`'s).
const X: u64 = 0x6000_0000;

/// The guest wrote its last-level table through a writable mapping while nothing shadowed it,
/// then used the table: shadowing it must take the write right from that mapping (KVM
/// `account_shadowed` write-protects the gfn through the rmap) and flush the TLB before the
/// leaf is built, so the guest's next edit of the table traps and the MMU sees it. Without
/// that, the edit goes straight to memory and the shadow keeps translating the old gPTE.
/// Kills `shadow/pages.rs`: `account_shadowed`'s `*n == 1` test negated or its
/// `write_protect_gfn` skipped, `write_protect_gfn` returning early or never clearing W;
/// `shadow/fetch.rs`: the flush after new shadowing skipped.
#[test]
fn shadowing_a_table_write_protects_a_writable_mapping_of_it() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte_a = s.map4k(A, 0x20_0000, P | RW | US);
    let table = pte_a & !0xfff;
    s.map4k(X, table, P | RW | US);
    let mut v = TlbVcpu::new(&vm, s.cr3);
    let at = X + (pte_a & 0xfff);
    // A write while the table is not shadowed: a writable leaf, now in the TLB.
    guest_store(&mut v, &host, at, 0x20_0000 | P | RW | US);
    assert_eq!(v.access(A, false), Seen::Ram(ram_pfn(0x20_0000)));
    // The guest remaps A and invalidates it, as an OS does.
    guest_store(&mut v, &host, at, 0x30_0000 | P | RW | US);
    invlpg(&mut v, A);
    assert_eq!(v.access(A, false), Seen::Ram(ram_pfn(0x30_0000)), "the shadow saw the edit");
}

/// Once no shadow page shadows a guest table any more (all zapped), its frame is ordinary RAM:
/// a write to it maps writable and does not exit for emulation (KVM `unaccount_shadowed`).
/// Kills `shadow/pages.rs`: `unaccount_shadowed` replaced with `()` or its count kept above 0,
/// `prepare_zap` skipping it.
#[test]
fn a_table_nothing_shadows_any_more_is_written_without_emulation() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte_a = s.map4k(A, 0x20_0000, P | RW | US);
    s.map4k(X, pte_a & !0xfff, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let at = X + (pte_a & 0xfff);
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    let emulated = Seen::Mmio(vmmu::Gpa(pte_a), vmmu::fault::EmulateSource::WriteProtected);
    assert_eq!(access(&mut v, at, true), emulated, "shadowed: the write is emulated");
    vm.zap_all_fast();
    assert_eq!(access(&mut v, at, true), Seen::Ram(ram_pfn(pte_a & !0xfff)), "not shadowed");
}

/// An emulated write into a shadowed last-level table (KVM `kvm_mmu_track_write`): a write
/// within one gPTE drops just that SPTE, so the neighbours stay mapped; a misaligned one (it
/// crosses a gPTE, or is shorter than 4 bytes and not a 1-byte write at a gPTE's start) zaps
/// the whole shadow page; a 4-byte write to a half of a gPTE counts as its aligned 8-byte gPTE
/// first, and one that crosses into the next gPTE is misaligned. The written gPTE's own SPTE
/// always goes, so the new gPTE is used.
/// Kills `shadow/track.rs`: each comparison of `detect_write_misaligned` and the index of the
/// dropped SPTE.
#[test]
fn emulated_table_writes_drop_one_spte_or_zap_the_page_when_misaligned() {
    let cases: [(u64, u32, bool); 12] = [
        (0, 8, false),
        (0, 4, false),
        (4, 4, false),
        (0, 1, false),
        (1, 1, true),
        (0, 2, true),
        (0, 3, true),
        (4, 8, true),
        // 8-byte gPTEs: a 4-byte write within one entry is taken as that entry (KVM
        // `mmu_pte_write_fetch_gpte`); one that crosses into the next changes both, so it is
        // misaligned (KVM widens it too, and leaves the next entry's SPTE stale).
        (2, 4, false),
        (5, 4, true),
        (6, 4, true),
        (2, 2, true),
    ];
    for (off, bytes, zaps) in cases {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        let pages = [(A, 0x21_0000), (A + 0x1000, 0x20_0000), (A + 0x2000, 0x22_0000)];
        let ptes: Vec<u64> =
            pages.iter().map(|&(gva, gpa)| s.map4k(gva, gpa, P | RW | US)).collect();
        let pte_a = ptes[1];
        let mut v = vcpu_in(&vm, long4(s.cr3));
        for (gva, gpa) in pages {
            assert_eq!(access(&mut v, gva, false), Seen::Ram(ram_pfn(gpa)));
        }
        host.write_u64(RAM_HVA + pte_a, 0x30_0000 | P | RW | US | 0x60);
        v.track_write(vmmu::Gpa(pte_a + off), bytes).unwrap();
        let what = format!("{bytes} bytes at offset {off}");
        assert_eq!(mapped(&mut v, A), !zaps, "{what}: the neighbour below");
        assert_eq!(mapped(&mut v, A + 0x2000), !zaps, "{what}: the neighbour above");
        assert!(!mapped(&mut v, A + 0x1000), "{what}: the written gPTE's SPTE");
        assert_eq!(access(&mut v, A + 0x1000, false), Seen::Ram(ram_pfn(0x30_0000)), "{what}");
    }
}

/// Emulated writes into a shadowed upper-level table flood it after three without the table
/// being used in between: the third zaps its shadow page (and so what it maps; for the root, the
/// vCPU reloads an empty one), a fault through the table starts the count again (KVM's
/// `write_flooding_count`, reset by `FNAME(fetch)` on every level it walks, the root included).
/// Writes to a last-level table never flood.
/// Kills `shadow/track.rs`: the flood test (`level > L4K`, the increment, `>= 3`);
/// `shadow/fetch.rs`: the flood reset of the root and of a reused child.
#[test]
fn three_unused_writes_flood_an_upper_level_table() {
    for level in [2u8, 4] {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        s.map4k(A, 0x20_0000, P | RW | US);
        s.map4k(A + 0x1000, 0x21_0000, P | RW | US);
        // A's entry of the table is at index 0 or 1; the guest writes the unused entry 5.
        let unused = vmmu::Gpa((s.entry_gpa(A, level) & !0xfff) + 5 * 8);
        let mut v = vcpu_in(&vm, long4(s.cr3));
        assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
        for _ in 0..2 {
            v.track_write(unused, 8).unwrap();
        }
        assert!(mapped(&mut v, A), "level {level}: two writes do not flood");
        // A fault through the table (the neighbour page) uses it: the count starts again.
        assert_eq!(access(&mut v, A + 0x1000, false), Seen::Ram(ram_pfn(0x21_0000)));
        for _ in 0..2 {
            v.track_write(unused, 8).unwrap();
        }
        assert!(mapped(&mut v, A), "level {level}: two writes since the last use do not flood");
        v.track_write(unused, 8).unwrap();
        assert!(!mapped(&mut v, A), "level {level}: the third zaps the table's shadow page");
        assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
        // A last-level table is never flooded.
        let pte = vmmu::Gpa(s.entry_gpa(A, 1) + 5 * 8);
        for _ in 0..4 {
            v.track_write(pte, 8).unwrap();
        }
        assert!(mapped(&mut v, A), "last-level tables do not flood");
    }
}

/// Another vCPU rewrites a gPTE of A's path (as the hypervisor emulates it: into memory, then
/// reported to the MMU) after this vCPU's fault walked it and before the fault takes the lock.
/// Below the root the table is not shadowed yet, so the report changes nothing; the root table
/// is, and the report drops its SPTE, which the fault would link again from its old walk. So
/// once the fault holds the lock and has shadowed (protected) the tables, it must re-read every
/// gPTE it used and retry if one changed (KVM `FNAME(gpte_changed)`); else it installs the old
/// translation, and no later write traps to correct it.
/// Kills `shadow/fetch.rs`: `gpte_changed_at` returning `false`, or a level left unchecked.
#[test]
fn a_gpte_rewritten_while_the_fault_is_in_flight_is_not_installed_stale() {
    for level in 1u8..=4 {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        s.map4k(A, 0x20_0000, P | RW | US);
        // Another space maps A to 0x30_0000 through tables of its own: the racer points A's
        // entry at `level` at that space's table (or page) one level down.
        let s2 = Space::new(&host, &next);
        s2.map4k(A, 0x30_0000, P | RW | US);
        let at = s.entry_gpa(A, level);
        let new = s2.read(s2.entry_gpa(A, level));
        let mut v = vcpu_in(&vm, long4(s.cr3));
        let mut racer = Some((host.clone(), vcpu_in(&vm, long4(s.cr3))));
        vmmu::testing::preempt::on_this_thread(Some(Box::new(move |_| {
            if let Some((host, mut v2)) = racer.take() {
                host.write_u64(RAM_HVA + at, new);
                v2.track_write(vmmu::Gpa(at), 8).unwrap();
            }
        })));
        let seen = access(&mut v, A, false);
        vmmu::testing::preempt::on_this_thread(None);
        assert_eq!(seen, Seen::Ram(ram_pfn(0x30_0000)), "level {level} gPTE rewritten");
    }
}

/// Two GVAs map two guest 2 MiB pages; each is shadowed by a direct page of 4 KiB leaves keyed
/// by the 2 MiB page's first frame. Keys that collide would share one direct page between the
/// two, and the second access would rewrite the first one's leaf (a wrong translation).
/// Kills `shadow/fetch.rs`: `direct_base`'s arithmetic.
#[test]
fn two_guest_2m_pages_get_their_own_direct_pages() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let (g1, g2) = (0x8000_0000, 0xc000_0000);
    s.map2m(g1, 0x40_0000, P | RW | US);
    s.map2m(g2, 0x60_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let off = 0x5_3000;
    assert_eq!(access(&mut v, g1 + off, false), Seen::Ram(ram_pfn(0x40_0000 + off)));
    assert_eq!(access(&mut v, g2 + off, false), Seen::Ram(ram_pfn(0x60_0000 + off)));
    assert_eq!(access(&mut v, g1 + off, false), Seen::Ram(ram_pfn(0x40_0000 + off)));
    // The same 2 MiB page seen at a second GVA shares the direct page, and a page inside it.
    s.map2m(0x1_0000_0000, 0x40_0000, P | RW | US);
    assert_eq!(access(&mut v, 0x1_0000_0000 + off, false), Seen::Ram(ram_pfn(0x40_0000 + off)));
}

/// One guest 2 MiB page mapped writable at one GVA and read-only at another: the direct pages
/// that shadow it are keyed by those rights too (KVM's `role.access`), so the read-only GVA never
/// reaches the leaf that the writable one made writable: its write is the guest's #PF.
/// Kills `shadow/fetch.rs`: a direct page keyed without the walk's rights.
#[test]
fn a_read_only_alias_of_a_2m_page_does_not_share_writable_leaves() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let (rw, ro) = (0x8000_0000, 0xc000_0000);
    s.map2m(rw, 0x40_0000, P | RW | US);
    s.map2m(ro, 0x40_0000, P | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let off = 0x5_3000;
    assert_eq!(access(&mut v, ro + off, false), Seen::Ram(ram_pfn(0x40_0000 + off)));
    assert_eq!(access(&mut v, rw + off, true), Seen::Ram(ram_pfn(0x40_0000 + off)));
    assert_eq!(
        access(&mut v, ro + off, true),
        Seen::GuestPf(0x7),
        "P|W|U: read-only for the guest"
    );
}

/// A page of a read-only memslot that the guest maps writable and dirty: a read maps it
/// read-only (the slot refuses W even though the guest grants it), so a later write exits to be
/// emulated as a ROM write instead of changing the memory.
/// Kills `shadow/fetch.rs`: `install_leaf`'s `writable && guest_w && !tracked` loosened.
#[test]
fn a_read_only_slot_is_never_mapped_writable() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let ro = vmmu::memslot::KVM_MEM_READONLY;
    vm.set_memory_region(&UserspaceMemoryRegion::new(7, ro, LOG_GPA, 0x4000, LOG_HVA)).unwrap();
    s.map4k(LOG_GVA, LOG_GPA, P | RW | US | 0x60);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut v, LOG_GVA, false), Seen::Ram(_)));
    let w = access(&mut v, LOG_GVA, true);
    assert!(matches!(w, Seen::Mmio(_, vmmu::fault::EmulateSource::ReadOnlyWrite)), "{w:?}");
}

/// A leaf as the hardware walks of a user read and a user write find it: `None` not mapped,
/// `Some((frame if a user read is allowed, whether a user write is))` present.
type Leaf = Option<(Option<Pfn>, bool)>;

/// The leaf of `gva` (no fault handled).
fn leaf(v: &mut Vcpu<TestHost>, gva: u64) -> Leaf {
    let read = match hw(v, gva, false) {
        HwWalk::Translated { pfn, .. } => Some(Some(pfn)),
        HwWalk::Violation { present: true, .. } => Some(None),
        HwWalk::Violation { present: false, .. } => None,
        other => panic!("{gva:#x}: {other:?}"),
    };
    read.map(|pfn| (pfn, matches!(hw(v, gva, true), HwWalk::Translated { .. })))
}

const AC: u64 = 0x20;
const DT: u64 = 0x40;

/// Makes the host map `n` pages from host address `hva` writable (as after writes by the VMM or
/// by the guest before): only such pages are prefetched (a fast write-GUP that never faults).
fn host_written(host: &TestHost, hva: u64, n: u64) {
    for i in 0..n {
        vmmu::host::HostMemory::translate(host, vmmu::Hva(hva + i * 0x1000), HostAccess::Write)
            .unwrap();
    }
}

/// A fault prefetches the neighbour gPTEs of its 8-entry group in order (KVM
/// `FNAME(pte_prefetch)`): each with the guest's rights (no W while the gPTE is clean, no U for
/// a supervisor page) and its own frame; a gPTE that is not present, never accessed or has a
/// reserved bit is not prefetched and ends the prefetch (the guest must see its #PF, and set A
/// itself). Here the faulting page is entry 2 of its group, the neighbour under test entry 0,
/// and entry 1 would be prefetched if entry 0 did not stop it.
/// Kills `shadow/prefetch.rs`: each test of `usable`, the rights (`intersect`, the clean-gPTE
/// rule), the group's and each neighbour's gPTE address, the stop at the first that fails.
#[test]
fn prefetch_takes_the_guest_rights_and_stops_at_the_first_unusable_gpte() {
    let rsvd = 1u64 << 51; // above the guest's MAXPHYADDR of 46
    let user = Some(ram_pfn(0x21_0000));
    // The neighbour's gPTE flags, and what its leaf must be after the fault on entry 2.
    let cases: [(u64, Leaf); 7] = [
        (P | RW | US | AC | DT, Some((user, true))),
        (P | RW | US | AC, Some((user, false))), // clean: W once the guest's write sets D
        (P | US | AC | DT, Some((user, false))), // read-only
        (P | RW | AC | DT, Some((None, false))), // supervisor: present, no user access
        (P | RW | US | AC | DT | rsvd, None),
        (P | RW | US | DT, None),  // never accessed
        (RW | US | AC | DT, None), // not present
    ];
    for (flags, want) in cases {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        s.map4k(A + 0x2000, 0x20_0000, P | RW | US);
        s.map4k(A, 0x21_0000, flags);
        s.map4k(A + 0x1000, 0x22_0000, P | RW | US | AC | DT);
        host_written(&host, RAM_HVA + 0x21_0000, 1);
        host_written(&host, RAM_HVA + 0x22_0000, 1);
        let mut v = vcpu_in(&vm, long4(s.cr3));
        assert_eq!(access(&mut v, A + 0x2000, false), Seen::Ram(ram_pfn(0x20_0000)));
        assert_eq!(leaf(&mut v, A), want, "gPTE flags {flags:#x}");
        let after = want.map(|_| (Some(ram_pfn(0x22_0000)), true));
        assert_eq!(leaf(&mut v, A + 0x1000), after, "entry 1 after gPTE flags {flags:#x}");
    }
}

/// Prefetching never makes a leaf that would let a write escape the dirty log: in a logged slot
/// a run with the write right is refused (KVM `kvm_mmu_prefetch_sptes` checks the slot), so
/// each written page faults and is logged, for guest 4 KiB pages (indirect) and for a guest
/// 2 MiB page (direct runs).
/// Kills `shadow/prefetch.rs`: `run_slot`'s dirty-logging test.
#[test]
fn prefetch_leaves_no_writable_leaf_in_a_logged_slot() {
    for huge in [false, true] {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        let log = KVM_MEM_LOG_DIRTY_PAGES;
        vm.set_memory_region(&UserspaceMemoryRegion::new(7, log, LOG_GPA, 0x20_0000, LOG_HVA))
            .unwrap();
        if huge {
            s.map2m(LOG_GVA, LOG_GPA, P | RW | US | AC | DT);
        } else {
            for i in 0..8 {
                s.map4k(LOG_GVA + i * 0x1000, LOG_GPA + i * 0x1000, P | RW | US | AC | DT);
            }
        }
        host_written(&host, LOG_HVA, 8);
        let mut v = vcpu_in(&vm, long4(s.cr3));
        assert!(matches!(access(&mut v, LOG_GVA + 0x3000, true), Seen::Ram(_)));
        assert_eq!(dirty(&vm), vec![3], "huge {huge}");
        assert!(matches!(access(&mut v, LOG_GVA + 0x5000, true), Seen::Ram(_)));
        assert_eq!(dirty(&vm), vec![5], "huge {huge}: the neighbour's write is logged");
    }
}

/// A guest 2 MiB page is shadowed by a direct page; a fault there prefetches the not-present
/// entries of its 8-entry group with the guest's rights (KVM `__direct_pte_prefetch`), and
/// nothing outside the group.
/// Kills `shadow/prefetch.rs`: `direct_runs`' group bounds and run lengths, the direct branch.
#[test]
fn a_fault_in_a_guest_2m_page_prefetches_its_group() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let g = 0x8000_0000;
    s.map2m(g, 0x40_0000, P | RW | US | AC | DT);
    host_written(&host, RAM_HVA + 0x40_0000, 512);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, g + 0xb000, false), Seen::Ram(ram_pfn(0x40_b000)));
    for i in 0..24u64 {
        let want = (8..16).contains(&i).then_some((Some(ram_pfn(0x40_0000 + i * 0x1000)), true));
        assert_eq!(leaf(&mut v, g + i * 0x1000), want, "page {i}");
    }
    // Page 12 is present now: a fault on page 9 prefetches nothing new, and page 12 keeps its
    // leaf; a fault on page 17 maps 16..24.
    assert_eq!(access(&mut v, g + 0x11000, false), Seen::Ram(ram_pfn(0x41_1000)));
    for i in 16..24u64 {
        assert!(mapped(&mut v, g + i * 0x1000), "page {i}");
    }
    assert!(!mapped(&mut v, g + 0x18000));
}

/// While a host invalidation is in progress, a fault outside its range may complete but
/// prefetches nothing: a neighbour inside the range would otherwise be mapped to the frame the
/// host is taking away, and stay mapped after the invalidation ends.
/// Kills `shadow/prefetch.rs`: the in-progress test.
#[test]
fn no_prefetch_while_a_host_invalidation_is_in_progress() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    for i in 0..8 {
        s.map4k(A + i * 0x1000, 0x20_0000 + i * 0x1000, P | RW | US | AC | DT);
    }
    host_written(&host, RAM_HVA + 0x20_0000, 8);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let hva = vmmu::Hva(RAM_HVA + 0x20_5000);
    let inv = vm.invalidate_hva_range_begin(hva, vmmu::Hva(hva.0 + 0x1000));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert!(!mapped(&mut v, A + 0x5000), "page 5 is being invalidated");
    inv.end();
    assert!(!mapped(&mut v, A + 0x5000), "still not mapped after the invalidation");
}

/// A direct prefetch run takes frames only from a slot that holds all of them (KVM
/// `kvm_mmu_prefetch_sptes` refuses the whole run otherwise): a guest 2 MiB page over a 4-page
/// slot leaves the gfns past the slot's end to MMIO, never to whatever host memory follows the
/// slot's.
/// Kills `shadow/prefetch.rs`: `run_slot`'s length test.
#[test]
fn a_direct_prefetch_run_never_leaves_its_slot() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    vm.set_memory_region(&log_region(0)).unwrap();
    s.map2m(LOG_GVA, LOG_GPA, P | RW | US | AC | DT);
    host_written(&host, LOG_HVA, 8);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut v, LOG_GVA + 0x1000, false), Seen::Ram(_)));
    assert!(!mapped(&mut v, LOG_GVA + 0x2000), "the run 2..8 does not fit the slot");
    for i in 4..8 {
        let gva = LOG_GVA + i * 0x1000;
        assert!(matches!(access(&mut v, gva, false), Seen::Mmio(..)), "page {i} is MMIO");
    }
}

/// A neighbour gPTE that maps one of the guest's own shadowed page tables is prefetched
/// read-only even when the gPTE is dirty and writable (KVM: `make_spte` refuses W for a
/// write-tracked gfn), so the guest's next edit of that table traps.
/// Kills `shadow/prefetch.rs`: `run` ignoring write tracking.
#[test]
fn a_prefetched_mapping_of_a_shadowed_table_is_read_only() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte = s.map4k(A + 0x2000, 0x20_0000, P | RW | US);
    let table = pte & !0xfff;
    s.map4k(A, table, P | RW | US | AC | DT);
    host_written(&host, RAM_HVA + table, 1);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A + 0x2000, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(leaf(&mut v, A), Some((Some(ram_pfn(table)), false)), "prefetched read-only");
    let emulated = Seen::Mmio(vmmu::Gpa(table), vmmu::fault::EmulateSource::WriteProtected);
    assert_eq!(access(&mut v, A, true), emulated);
}

/// A fault that runs while a memslot is being deleted (its invalid copy published, its mappings
/// zapped) may complete for a page of another slot, but prefetches nothing from the slot going
/// away: a leaf made then would outlive the deletion and map a frame the guest no longer has.
/// Kills `shadow/prefetch.rs`: `run_slot` accepting an invalid slot.
#[test]
fn no_prefetch_from_a_slot_being_deleted() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    vm.set_memory_region(&log_region(0)).unwrap();
    s.map4k(A + 0x2000, 0x20_0000, P | RW | US);
    s.map4k(A, LOG_GPA, P | RW | US | AC | DT);
    host_written(&host, LOG_HVA, 1);
    let v = std::cell::RefCell::new(vcpu_in(&vm, long4(s.cr3)));
    let delete = UserspaceMemoryRegion::new(7, 0, LOG_GPA, 0, LOG_HVA);
    vm.set_memory_region_probed(&delete, &|p| {
        if p == vmmu::vm::UpdateProbe::Flushed {
            let seen = access(&mut v.borrow_mut(), A + 0x2000, false);
            assert_eq!(seen, Seen::Ram(ram_pfn(0x20_0000)));
        }
    })
    .unwrap();
    let mut v = v.into_inner();
    assert!(matches!(access(&mut v, A, false), Seen::Mmio(..)), "the slot is gone");
}

/// A PAE guest's GVAs in each quarter of the 4 GiB go through the special root's entry for that
/// quarter (`gva[31:30]`): a fault in the third quarter builds under the third PDPTE's page, and
/// both quarters translate to their own pages.
/// Kills `shadow/fetch.rs`: the special root's entry index.
#[test]
fn a_pae_guest_faults_in_every_quarter_through_its_own_pdpte() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let alloc = || alloc_table(&next);
    let pdpt = alloc();
    let mut v = vm.create_vcpu().unwrap();
    for (quarter, page) in [(0u64, 0x20_0000u64), (2, 0x30_0000)] {
        let (pd, pt) = (alloc(), alloc());
        host.write_u64(RAM_HVA + pdpt + 8 * quarter, pd | P);
        host.write_u64(RAM_HVA + pd + 8 * 2, pt | P | RW | US);
        host.write_u64(RAM_HVA + pt + 8 * 3, page | P | RW | US);
    }
    let cpu =
        vmmu::guest::GuestCpu { mode: vmmu::guest::PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) };
    v.set_guest_cpu(cpu).unwrap();
    v.load_cr3(pdpt).unwrap();
    let low = 0x40_3000; // quarter 0, PD entry 2, PT entry 3
    let high = (2 << 30) | low;
    assert_eq!(access(&mut v, high, false), Seen::Ram(ram_pfn(0x30_0000)));
    assert_eq!(access(&mut v, low, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, high, false), Seen::Ram(ram_pfn(0x30_0000)));
}

/// The host (not the guest through an emulated write) rewrites a guest directory entry, so the
/// MMU is not told; the next fault under that entry finds the shadow child linked for the old
/// entry and must reuse it only if its gfn **and** role match the new walk's (KVM 0cb2af2ea66a,
/// 81ccda30b4e8: reusing it left leaves outside the child's range, a use-after-free). Otherwise
/// it unlinks it, so no address under the entry keeps translating through the old child:
/// - `gfn`: a 2 MiB page moves to another 2 MiB page (same role, another gfn);
/// - `role`: an entry that pointed to a last-level table at 2 MiB-aligned frame T becomes a
///   2 MiB page at T (same gfn, direct instead of indirect).
///
/// Kills `shadow/fetch.rs`: the reuse test's `&&` replaced with `||`.
#[test]
fn a_changed_directory_entry_never_reuses_a_child_of_another_gfn_or_role() {
    for case in ["gfn", "role"] {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        let g = 0x8000_0000;
        let table = 0x80_0000; // 2 MiB aligned
        let pde = match case {
            "gfn" => s.map2m(g, 0x40_0000, P | RW | US | AC | DT),
            _ => {
                let pde = s.entry_gpa(g, 2);
                host.write_u64(RAM_HVA + pde, table | P | RW | US | AC);
                host.write_u64(RAM_HVA + table, 0x40_0000 | P | RW | US | AC | DT);
                pde
            }
        };
        let mut v = vcpu_in(&vm, long4(s.cr3));
        assert_eq!(access(&mut v, g, false), Seen::Ram(ram_pfn(0x40_0000)), "{case}");
        let new_base = if case == "gfn" { 0x60_0000 } else { table };
        host.write_u64(RAM_HVA + pde, new_base | P | RW | US | AC | DT | PS);
        // A fault elsewhere under the entry (nothing is mapped there yet).
        let far = g + 0x10_0000;
        assert_eq!(access(&mut v, far, false), Seen::Ram(ram_pfn(new_base + 0x10_0000)), "{case}");
        assert_eq!(access(&mut v, g, false), Seen::Ram(ram_pfn(new_base)), "{case}: old child");
    }
}

/// Guest page tables read straight from the test host's RAM (guest-physical = offset).
struct RamTables<'a>(&'a TestHost);

impl vmmu::guest::GuestPteMemory for RamTables<'_> {
    fn read_gpte(&self, gpa: vmmu::Gpa) -> Option<u64> {
        vmmu::host::GuestMemory::read_u64(self.0, vmmu::Hva(RAM_HVA + gpa.0)).ok()
    }
    fn cmpxchg_gpte(
        &self,
        gpa: vmmu::Gpa,
        old: u64,
        new: u64,
    ) -> Result<bool, vmmu::guest::GpteWriteError> {
        vmmu::host::GuestMemory::cmpxchg_u64(self.0, vmmu::Hva(RAM_HVA + gpa.0), old, new)
            .map_err(|_| vmmu::guest::GpteWriteError::Unreadable)
    }
}

/// A PAE CR3 may carry PWT/PCD (bits 3 and 4); the PDPT is at `cr3 & !0x1f`, and the walk
/// reports where each PDPTE was loaded from at that address.
/// Kills `guest/walk.rs`: the PDPT address without the `& !0x1f`.
#[test]
fn a_pae_walk_reports_the_pdpte_address_without_cr3_flag_bits() {
    use vmmu::guest::{load_pdptrs, walk, GuestCpu, PagingMode};
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let pdpt = Space::new(&host, &next).cr3;
    let (pd, pt) = (pdpt + 0x1000, pdpt + 0x2000);
    next.set(pdpt + 0x3000);
    host.write_u64(RAM_HVA + pdpt + 8, pd | P);
    host.write_u64(RAM_HVA + pd, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt, 0x20_0000 | P | RW | US | AC | DT);
    drop(vm);
    let mem = RamTables(&host);
    let cr3 = pdpt | 0x18;
    let pdptrs = load_pdptrs(&mem, cr3, 46).unwrap();
    let cpu = GuestCpu { mode: PagingMode::Pae { pdptrs }, cr3, ..long4(0) };
    let w = walk(&cpu, &mem, Gva(1 << 30), vmmu::FaultAccess::READ).unwrap();
    assert_eq!(w.gpa, vmmu::Gpa(0x20_0000));
    assert_eq!(w.pte_gpas[2], vmmu::Gpa(pdpt + 8));
}

/// A PAE guest: the fault re-reads the PD and PT entries it used (a racer's rewrite of the PT
/// entry is not installed stale), but never the PDPTE, which comes from the register loaded at
/// CR3 load: a PDPT rewritten in memory without a CR3 load neither changes the translation nor
/// makes the fault retry forever.
/// Kills `shadow/fetch.rs`: `gpte_changed_at`'s PAE rule (`pae_pdpte`) in either direction.
#[test]
fn a_pae_fault_rechecks_its_pd_and_pt_entries_but_not_the_pdpte() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let alloc = || alloc_table(&next);
    let (pdpt, pd, pt) = (alloc(), alloc(), alloc());
    host.write_u64(RAM_HVA + pdpt, pd | P);
    host.write_u64(RAM_HVA + pd + 8 * 2, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt + 8 * 3, 0x20_0000 | P | RW | US);
    host.write_u64(RAM_HVA + pt + 8 * 4, 0x21_0000 | P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    let mode = vmmu::guest::PagingMode::Pae { pdptrs: [0; 4] };
    v.set_guest_cpu(vmmu::guest::GuestCpu { mode, ..long4(0) }).unwrap();
    v.load_cr3(pdpt).unwrap();
    let racer = host.clone();
    let mut once = true;
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |_| {
        if std::mem::take(&mut once) {
            racer.write_u64(RAM_HVA + pt + 8 * 3, 0x30_0000 | P | RW | US);
        }
    })));
    let seen = access(&mut v, 0x40_3000, false);
    vmmu::testing::preempt::on_this_thread(None);
    assert_eq!(seen, Seen::Ram(ram_pfn(0x30_0000)), "the PT entry rewritten in flight");
    // The PDPT in memory now says "not present"; the loaded PDPTE still holds until CR3 loads.
    host.write_u64(RAM_HVA + pdpt, 0);
    assert_eq!(access(&mut v, 0x40_4000, false), Seen::Ram(ram_pfn(0x21_0000)));
}

/// An MMIO fault installs its MMIO SPTE but prefetches nothing around it (KVM with MMIO caching
/// off makes no MMIO SPTE and so no prefetch, and no MMU setting may change what the guest
/// observes): the RAM neighbour still faults on its first access.
/// Kills `shadow/fetch.rs`: prefetching after an MMIO leaf (`ram && ..` -> `||`).
#[test]
fn an_mmio_fault_prefetches_nothing() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A + 0x2000, MMIO_GPA, P | RW | US);
    s.map4k(A, 0x20_0000, P | RW | US | AC | DT);
    host_written(&host, RAM_HVA + 0x20_0000, 1);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut v, A + 0x2000, false), Seen::Mmio(..)));
    assert_eq!(v.stats.pf_mmio_spte_created, 1);
    assert_eq!(leaf(&mut v, A), None, "no prefetch after an MMIO SPTE");
}

/// The host rewrites a guest PTE (the MMU is not told) from a RAM page to an MMIO address or
/// to another RAM page; a vCPU's write fault then replaces the present read-only leaf with an
/// MMIO SPTE or a leaf for the new page. The old leaf leaves the rmap, so the TLBs must be
/// flushed right then (KVM aad885e77496 for the MMIO SPTE, `mmu_set_spte` for another frame):
/// no later host invalidation of the old frame finds the leaf to flush, and another vCPU would
/// go on reaching the frame the host took away through its TLB.
/// Kills `shadow/fetch.rs`: `install_leaf`'s flushes of a replaced leaf (`batch.flush |=` ->
/// `&=` in both arms, the MMIO bug gate negated).
#[test]
fn a_leaf_replaced_by_a_fault_is_flushed_from_the_tlbs() {
    for to in [MMIO_GPA, 0x30_0000] {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        let pte = s.map4k(A, 0x20_0000, P | RW | US); // clean: a read maps it read-only
        let mut reader = TlbVcpu::new(&vm, s.cr3);
        assert_eq!(reader.access(A, false), Seen::Ram(ram_pfn(0x20_0000)));
        host.write_u64(RAM_HVA + pte, to | P | RW | US | AC | DT);
        let mut writer = vcpu_in(&vm, long4(s.cr3));
        let want = if to == MMIO_GPA { None } else { Some(Seen::Ram(ram_pfn(to))) };
        let seen = access(&mut writer, A, true);
        assert!(want.is_none_or(|w| w == seen), "{seen:?}");
        let hva = RAM_HVA + 0x20_0000;
        let inv = vm.invalidate_hva_range_begin(vmmu::Hva(hva), vmmu::Hva(hva + 0x1000));
        inv.end();
        let seen = reader.access(A, false);
        assert_ne!(seen, Seen::Ram(ram_pfn(0x20_0000)), "the reader reaches the old frame");
    }
}

/// A guest 2 MiB page is RAM, not a page table: its frames are not write-tracked, so a write to
/// its first 4 KiB page (the direct page's key) goes straight through.
/// Kills `shadow/pages.rs`: `has_gptes` true for direct pages.
#[test]
fn a_guest_2m_page_is_not_write_protected() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map2m(0x8000_0000, 0x40_0000, P | RW | US | AC | DT);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x8000_0008, true), Seen::Ram(ram_pfn(0x40_0000)));
    assert_eq!(access(&mut v, 0x8000_1008, true), Seen::Ram(ram_pfn(0x40_1000)));
}

/// Every way a shadow leaf goes away flushes the TLBs before the operation returns, so no vCPU
/// keeps reaching the frame through a cached translation: a host invalidation (through the
/// rmap), the shrinker and a lower page limit (recycling), a fast zap-all, a memslot delete, a
/// misaligned emulated write to the table, an aligned one to the leaf's own gPTE, and writes
/// that flood the root table (the root page alone is zapped: no parent link to clear).
/// Kills `shadow/pages.rs`: `unmap_gfn_range`'s and `prepare_zap`'s flush bookkeeping,
/// `commit_zap`'s flush test; `shadow/track.rs`: the flush after a dropped SPTE.
#[test]
fn every_zap_of_a_leaf_flushes_the_tlbs() {
    type Op = fn(&Vm<TestHost>, &mut TlbVcpu, u64, u64);
    let ops: [(&str, Op); 8] = [
        ("host invalidation", |vm, _, _, _| {
            let hva = RAM_HVA + 0x20_0000;
            vm.invalidate_hva_range_begin(vmmu::Hva(hva), vmmu::Hva(hva + 0x1000)).end();
        }),
        ("shrinker", |vm, _, _, _| {
            vm.shrink_shadow_pages(1000);
        }),
        ("page limit", |vm, _, _, _| vm.set_nr_mmu_pages(64).unwrap()),
        ("zap-all", |vm, _, _, _| vm.zap_all_fast()),
        ("memslot delete", |vm, _, _, _| {
            vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, RAM_HVA)).unwrap();
        }),
        ("misaligned table write", |_, v, pte, _| v.v.track_write(vmmu::Gpa(pte + 4), 8).unwrap()),
        ("gPTE write", |_, v, pte, _| v.v.track_write(vmmu::Gpa(pte), 8).unwrap()),
        ("flooded root", |_, v, _, cr3| {
            for _ in 0..3 {
                v.v.track_write(vmmu::Gpa(cr3 + 5 * 8), 8).unwrap();
            }
        }),
    ];
    for (what, op) in ops {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        let pte = s.map4k(A, 0x20_0000, P | RW | US);
        // Enough pages that a limit of 64 recycles the oldest, A's among them.
        for i in 2..71u64 {
            s.map4k(i << 30, 0x30_0000, P | RW | US);
        }
        let mut v = TlbVcpu::new(&vm, s.cr3);
        assert_eq!(v.access(A, false), Seen::Ram(ram_pfn(0x20_0000)));
        if what == "page limit" {
            for i in 2..40u64 {
                assert!(matches!(v.access(i << 30, false), Seen::Ram(_)));
            }
        }
        assert!(v.cached(A), "{what}");
        op(&vm, &mut v, pte, s.cr3);
        assert!(!v.cached(A), "{what}: A's translation survived in the TLB");
    }
}

/// A root page zapped while in use (here: flooded by emulated writes to the guest's top-level
/// table) is invalid even though made in the current generation: its vCPU drops it at the
/// reload request and builds a fresh, write-protected root, so a later edit of the top-level
/// table is seen. Keeping the invalid root (nothing tracks its table any more) would translate
/// through the old entry for ever.
/// Kills `shadow/pages.rs`: `is_obsolete`'s `invalid || stale generation` with `&&`.
#[test]
fn a_root_zapped_in_use_is_replaced_and_later_table_edits_are_seen() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, 0x20_0000, P | RW | US);
    let s2 = Space::new(&host, &next);
    s2.map4k(A, 0x30_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    for _ in 0..3 {
        v.track_write(vmmu::Gpa(s.cr3 + 5 * 8), 8).unwrap();
    }
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    // The guest (emulated) points A's top-level entry at the other space's tables.
    let at = s.entry_gpa(A, 4);
    host.write_u64(RAM_HVA + at, s2.read(s2.entry_gpa(A, 4)));
    v.track_write(vmmu::Gpa(at), 8).unwrap();
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x30_0000)));
}

/// A guest without paging: GVA = GPA, shadowed by four direct level-2 pages, one per GiB
/// (`gfn = i << 18`). An MMIO access in the second GiB must not touch the first GiB's mapping.
/// Kills `shadow/root.rs`: the non-paging root's page keys.
#[test]
fn a_non_paging_guest_maps_each_gib_through_its_own_page() {
    let (vm, _host, _next) = shadow_vm(BugSet::NONE);
    let mut v = vm.create_vcpu().unwrap();
    let mode = vmmu::guest::PagingMode::NonPaging;
    v.set_guest_cpu(vmmu::guest::GuestCpu { mode, ..long4(0) }).unwrap();
    assert_eq!(access(&mut v, 0x1000, false), Seen::Ram(ram_pfn(0x1000)));
    let far = (1 << 30) | 0x1000; // no slot there
    assert!(matches!(access(&mut v, far, false), Seen::Mmio(g, _) if g.0 == far));
    assert_eq!(access(&mut v, 0x1000, false), Seen::Ram(ram_pfn(0x1000)));
    assert_eq!(access(&mut v, 0x2000, true), Seen::Ram(ram_pfn(0x2000)));
}

/// The shadow MMU's VM stats that KVM defines (shadow facts §10), counted exactly as KVM counts
/// them through a short history: page creations (`mmu_cache_miss`), emulated writes while the VM
/// has indirect pages (`mmu_pte_write`, whichever frame they wrote; none before the first
/// indirect page), directory entries zapped by such a
/// write with a non-zero new entry (`mmu_pde_zapped`), pages zapped by a misaligned write
/// (`mmu_flooded`), pages zapped by the shrinker (`mmu_recycled`).
/// Kills `shadow/track.rs`: the early return without indirect pages, the `mmu_pde_zapped` test
/// (`level > L4K && new_gpte != 0`) and the counters; `shadow/pages.rs`: the counters.
#[test]
fn shadow_stats_count_as_kvm_does() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte = s.map4k(A, 0x20_0000, P | RW | US);
    let pde = s.entry_gpa(A, 2);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let shadow = vm.shadow_mmu().unwrap();
    let stats = || shadow.stats.snapshot();
    v.track_write(vmmu::Gpa(pte), 8).unwrap();
    assert_eq!(stats().mmu_pte_write, 0, "no indirect page yet (KVM returns first)");
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    let st = stats();
    assert_eq!((st.mmu_cache_miss, st.shadow_pages), (4, 4), "root, PDPT, PD and PT pages");
    v.track_write(vmmu::Gpa(0x20_0000), 8).unwrap();
    let st = stats();
    assert_eq!((st.mmu_pte_write, st.mmu_shadow_zapped), (1, 0), "a data page: counted only");
    v.track_write(vmmu::Gpa(pte), 8).unwrap();
    let st = stats();
    assert_eq!((st.mmu_pte_write, st.mmu_pde_zapped, st.mmu_flooded), (2, 0, 0), "a PTE");
    // A directory entry written with a non-zero value counts; with zero it does not.
    host.write_u64(RAM_HVA + pde + 8, 0x30_0000 | P | RW | US);
    v.track_write(vmmu::Gpa(pde + 8), 8).unwrap();
    assert_eq!(stats().mmu_pde_zapped, 1, "a non-zero PDE");
    host.write_u64(RAM_HVA + pde + 16, 0);
    v.track_write(vmmu::Gpa(pde + 16), 8).unwrap();
    let st = stats();
    assert_eq!((st.mmu_pte_write, st.mmu_pde_zapped, st.mmu_flooded), (4, 1, 0), "two PDEs");
    v.track_write(vmmu::Gpa(pte + 4), 8).unwrap();
    let st = stats();
    assert_eq!((st.mmu_pte_write, st.mmu_flooded, st.mmu_shadow_zapped), (5, 1, 1), "misaligned");
    assert_eq!(st.shadow_pages, 3);
    let n = vm.shrink_shadow_pages(1000) as u64;
    let st = stats();
    assert_eq!((n, st.mmu_recycled), (2, 2), "PDPT and PD: the root is pinned");
    assert_eq!((st.mmu_shadow_zapped, st.shadow_pages), (3, 1));
}

/// An emulated write to the first frame of a guest 2 MiB page (the key of the direct page that
/// maps it) is a write to RAM, not to a shadowed table: it is counted (`mmu_pte_write`, as every
/// emulated write while indirect pages exist) but nothing is dropped (KVM walks only the valid
/// pages *with guest PTEs* at the gfn), and the mapping stays.
/// Kills `shadow/pages.rs`: `shadowing` admitting direct pages (`gfn == gfn && has_gptes`
/// with `||`).
#[test]
fn an_emulated_write_to_a_guest_2m_page_touches_no_shadow_page() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map2m(0x8000_0000, 0x40_0000, P | RW | US | AC | DT);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x8000_0000, false), Seen::Ram(ram_pfn(0x40_0000)));
    v.track_write(vmmu::Gpa(0x40_0000), 8).unwrap();
    let st = vm.shadow_mmu().unwrap().stats.snapshot();
    assert_eq!((st.mmu_pte_write, st.mmu_shadow_zapped), (1, 0));
    assert!(mapped(&mut v, 0x8000_0000), "the leaf stays");
}

/// Two guest tables whose frames share a bucket of the shadow page hash (KVM's `hash_64(gfn,
/// 12)`: frames 0x1000 and 0x1a18): an emulated write to one table drops the SPTE it covers in
/// that table's shadow page only; the other table's shadow page, found in the same bucket,
/// keeps its leaf at the same index.
/// Kills `shadow/pages.rs`: `shadowing`'s key (`gfn`, `as_id`, validity) loosened with `||`,
/// and `get_page`'s lookup key (`gfn`, `role`, generation) loosened the same way.
#[test]
fn an_emulated_write_leaves_a_table_in_the_same_hash_bucket_alone() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let b = A + 0x20_0000; // same directory, another last-level table
    next.set((0x1000 - 2) << 12); // A's PDPT, PD and PT: the PT at frame 0x1000
    let pte_a = s.map4k(A, 0x20_0000, P | RW | US);
    next.set(0x1a18 << 12);
    let pte_b = s.map4k(b, 0x21_0000, P | RW | US);
    assert_eq!((pte_a >> 12, pte_b >> 12), (0x1000, 0x1a18));
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, b, false), Seen::Ram(ram_pfn(0x21_0000)));
    assert!(
        matches!(hw(&mut v, A, false), HwWalk::Translated { pfn, .. } if pfn == ram_pfn(0x20_0000)),
        "B's table has its own shadow page: A's leaf is untouched"
    );
    v.track_write(vmmu::Gpa(pte_a), 8).unwrap();
    assert!(!mapped(&mut v, A), "the written gPTE's SPTE goes");
    assert!(mapped(&mut v, b), "the other table's leaf at the same index stays");
}

/// The GVA half of a vCPU's MMIO cache is cleared by INVLPG of that page (KVM
/// `vcpu_clear_mmio_info(gva)` in `kvm_mmu_invalidate_addr`): the guest remaps an MMIO GVA to
/// another MMIO address and shoots it down on every vCPU; a vCPU that had cached the old
/// translation and then takes an RSVD fault on the new MMIO SPTE must emulate the new address.
/// Kills `vcpu/shadow_path.rs`: `invlpg` not clearing the GVA cache entry.
#[test]
fn invlpg_clears_the_gva_mmio_cache_entry() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte = s.map4k(A, MMIO_GPA, P | RW | US | AC | DT);
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    let mut v2 = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut v1, A, false), Seen::Mmio(..)));
    let new = MMIO_GPA + 0x5000;
    host.write_u64(RAM_HVA + pte, new | P | RW | US | AC | DT);
    v2.track_write(vmmu::Gpa(pte), 8).unwrap();
    v1.invlpg(Gva(A)).unwrap();
    v2.invlpg(Gva(A)).unwrap();
    assert!(matches!(access(&mut v2, A, false), Seen::Mmio(g, _) if g.0 == new));
    let seen = access(&mut v1, A, false);
    assert!(matches!(seen, Seen::Mmio(g, _) if g.0 == new), "stale GVA cache entry: {seen:?}");
}

/// A protection #PF the walk gives the guest clears the GVA's MMIO cache entry (KVM
/// `kvm_inject_emulated_page_fault` invalidates the address first): the guest made an MMIO
/// mapping read-only; the cached entry still has W, and once another vCPU's read installs a
/// read-only MMIO SPTE, an RSVD write fault must not be answered from that entry: the guest gets
/// its #PF, not an emulated write.
/// Kills `vcpu/shadow_fault.rs`: the protection fault not clearing the GVA cache entry.
#[test]
fn a_guest_protection_fault_clears_the_gva_mmio_cache_entry() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte = s.map4k(A, MMIO_GPA, P | RW | US | AC | DT);
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    let mut v2 = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut v1, A, false), Seen::Mmio(..)));
    host.write_u64(RAM_HVA + pte, MMIO_GPA | P | US | AC | DT);
    v2.track_write(vmmu::Gpa(pte), 8).unwrap();
    assert_eq!(access(&mut v1, A, true), Seen::GuestPf(0x7), "P|W|U");
    assert!(matches!(access(&mut v2, A, false), Seen::Mmio(..)));
    assert_eq!(access(&mut v1, A, true), Seen::GuestPf(0x7), "answered from a stale entry");
}

/// One guest table shadowed twice (reached through a writable and a read-only directory entry:
/// two roles). When the shrinker zaps one of the two shadow pages, the other still shadows the
/// table, so the table stays write-protected (KVM counts shadowers per gfn): the guest's later
/// edit of an entry traps and reaches the surviving page. Else the edit goes straight to
/// memory, and once a fault through the read-only entry links that page again, its old leaf
/// for the edited entry translates the old page.
/// Kills `shadow/pages.rs`: `unaccount_shadowed` dropping the count at the first unshadowing.
#[test]
fn a_table_shadowed_twice_stays_protected_until_both_pages_go() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pte = s.map4k(A, 0x20_0000, P | RW | US);
    s.map4k(A + 0x1000, 0x21_0000, P | RW | US);
    let table = pte & !0xfff;
    let ro = A + 0x20_0000; // the next directory entry: the same table, read-only
    host.write_u64(RAM_HVA + s.entry_gpa(ro, 2), table | P | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, ro, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, ro + 0x1000, false), Seen::Ram(ram_pfn(0x21_0000)));
    // Oldest first: the PDPT's, the directory's and the writable path's table pages.
    assert_eq!(vm.shrink_shadow_pages(3), 3);
    s.map4k(X, table, P | RW | US);
    let mut tv = TlbVcpu { v, tlb: HashMap::new() };
    guest_store(&mut tv, &host, X + (pte & 0xfff) + 8, 0x30_0000 | P | RW | US);
    invlpg(&mut tv, ro + 0x1000);
    let mut v = tv.v;
    assert_eq!(access(&mut v, ro, false), Seen::Ram(ram_pfn(0x20_0000)));
    let seen = access(&mut v, ro + 0x1000, false);
    assert_eq!(seen, Seen::Ram(ram_pfn(0x30_0000)), "the edit was seen");
}

/// A PAE guest with one present PDPTE: the special root links a shadow page for that PDPTE only
/// (a not-present PDPTE shadows nothing, so guest frame 0, which such an entry's address bits
/// name, is ordinary RAM: a write to it goes through), and every CR3 load, which replaces the
/// special root, gives the old root's frame back to the host after the grace period.
/// Kills `shadow/root.rs`: a special root shadowing not-present PDPTEs; `release` keeping a
/// special root's frame.
#[test]
fn a_pae_special_root_shadows_present_pdptes_only_and_frees_its_frame() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let alloc = || alloc_table(&next);
    let (pdpt, pd, pt) = (alloc(), alloc(), alloc());
    host.write_u64(RAM_HVA + pdpt, pd | P);
    host.write_u64(RAM_HVA + pd, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt + 8, P | RW | US | AC | DT); // gva 0x1000 -> gpa 0
    let mut v = vm.create_vcpu().unwrap();
    let mode = vmmu::guest::PagingMode::Pae { pdptrs: [0; 4] };
    v.set_guest_cpu(vmmu::guest::GuestCpu { mode, ..long4(0) }).unwrap();
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x1000, true), Seen::Ram(ram_pfn(0)), "frame 0 is not a table");
    vm.reclaim();
    let tables = host.tables_in_use();
    for _ in 0..8 {
        v.load_cr3(pdpt).unwrap();
        assert_eq!(access(&mut v, 0x1000, false), Seen::Ram(ram_pfn(0)));
    }
    vm.reclaim();
    assert_eq!(host.tables_in_use(), tables, "special root frames are freed");
}

/// A leaf dropped by an emulated write of its gPTE leaves the reverse map with it (KVM
/// `drop_spte` removes the rmap entry): after the page is zapped and freed, a host invalidation
/// and the start of dirty logging on the frame find nothing stale to touch, and the guest's
/// next access maps the frame again.
/// Kills `shadow/pages.rs`: `drop_spte` treating a present leaf as a link (`present &&
/// !is_leaf` with `||`), which leaves its rmap entry behind.
#[test]
fn a_dropped_leaf_leaves_the_reverse_map() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    vm.set_memory_region(&log_region(0)).unwrap();
    let pte = s.map4k(A, LOG_GPA, P | RW | US);
    s.map4k(A + 0x1000, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut v, A, true), Seen::Ram(_)));
    v.track_write(vmmu::Gpa(pte), 8).unwrap();
    vm.zap_all_fast();
    let inv = vm.invalidate_hva_range_begin(vmmu::Hva(LOG_HVA), vmmu::Hva(LOG_HVA + 0x1000));
    inv.end();
    vm.set_memory_region(&log_region(KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    assert!(matches!(access(&mut v, A, true), Seen::Ram(_)));
    assert_eq!(dirty(&vm), vec![0]);
}

/// Two GVAs of one last-level table map the same logged frame writable; an emulated write drops
/// the first one's leaf. The reverse map must still hold the second (only the dropped entry
/// leaves it), so starting dirty logging write-protects it and its next write is logged.
/// Kills `shadow/pages.rs`: `drop_spte`'s rmap removal matching by page or index alone.
#[test]
fn dropping_one_leaf_keeps_the_other_leaves_of_its_frame_in_the_reverse_map() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    vm.set_memory_region(&log_region(0)).unwrap();
    let pte = s.map4k(A, LOG_GPA, P | RW | US);
    s.map4k(A + 0x1000, LOG_GPA, P | RW | US);
    let mut v = TlbVcpu::new(&vm, s.cr3);
    assert!(matches!(v.access(A, true), Seen::Ram(_)));
    assert!(matches!(v.access(A + 0x1000, true), Seen::Ram(_)));
    v.v.track_write(vmmu::Gpa(pte), 8).unwrap();
    vm.set_memory_region(&log_region(KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    assert!(matches!(v.access(A + 0x1008, true), Seen::Ram(_)));
    assert_eq!(dirty(&vm), vec![0], "the write through the second GVA is logged");
}

/// An emulated write to a directory entry unlinks the table page below it without zapping it;
/// the unlinked page's parent list forgets that link. When the directory's page is later zapped
/// and freed, and then the table page, nothing refers to the freed directory page.
/// Kills `shadow/pages.rs`: `drop_spte` keeping the child's parent link (its `retain` test).
#[test]
fn an_unlinked_table_page_forgets_its_parent() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, 0x20_0000, P | RW | US);
    let pde = s.entry_gpa(A, 2);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    v.track_write(vmmu::Gpa(pde), 8).unwrap(); // unlinks A's table page
    v.track_write(vmmu::Gpa(pde + 4), 8).unwrap(); // misaligned: zaps the directory's page
    assert!(vm.shrink_shadow_pages(1000) > 0); // the table page, among others
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(vm.stale_shadow_entries_for_tests().unwrap(), 0);
}

/// One guest table linked from two directories at the same index (one shadow page, two parent
/// links). Unlinking it from the first directory keeps the second link in its parent list, so
/// when the page is zapped and freed the second directory's link goes too: no walk through that
/// directory reaches the freed page.
/// Kills `shadow/pages.rs`: `drop_spte`'s parent-list removal matching by page or index alone.
#[test]
fn a_table_linked_twice_loses_only_the_unlinked_parent() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let a2 = 1 << 39; // another top-level entry, the same directory index 0
    let pde = s.entry_gpa(A, 2);
    s.map4k(A, 0x20_0000, P | RW | US);
    host.write_u64(RAM_HVA + s.entry_gpa(a2, 2), s.read(pde));
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, a2, false), Seen::Ram(ram_pfn(0x20_0000)));
    v.track_write(vmmu::Gpa(pde), 8).unwrap(); // unlinks the table from A's directory
                                               // Oldest first: A's PDPT's page, A's directory's and the table's; a2's path stays.
    assert_eq!(vm.shrink_shadow_pages(3), 3);
    assert_eq!(vm.stale_shadow_entries_for_tests().unwrap(), 0);
    assert_eq!(access(&mut v, a2, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(host.use_after_free(), 0);
}

/// KVM `make_mmu_pages_available`: a fault recycles only when fewer than 5 pages are free
/// (`KVM_MIN_FREE_MMU_PAGES`), and then zaps the oldest unpinned pages up to 25 free
/// (`KVM_REFILL_PAGES - avail`), counted in `mmu_recycled`.
/// Kills `shadow/mod.rs`: the `avail >= MIN_FREE_PAGES` boundary and the refill count;
/// `shadow/pages.rs`: `free_page` not giving the page back to the count.
#[test]
fn a_fault_recycles_only_below_five_free_pages_and_refills_to_25() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    vm.set_nr_mmu_pages(64).unwrap();
    let s = Space::new(&host, &next);
    // A: a directory and a table page; A + 2 MiB: one more table; then two pages per GiB.
    let gvas: Vec<u64> =
        [A, A + 0x20_0000].into_iter().chain((2..32u64).map(|i| i << 30)).collect();
    for &g in &gvas {
        s.map4k(g, 0x20_0000, P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let shadow = vm.shadow_mmu().unwrap();
    // Root and PDPT, 2 + 1 for A's pair, 2 for each of 27 more: 59 pages, 5 free.
    for &g in &gvas[..29] {
        assert_eq!(access(&mut v, g, false), Seen::Ram(ram_pfn(0x20_0000)));
    }
    assert_eq!((shadow.pages_in_use(), shadow.stats.snapshot().mmu_recycled), (59, 0));
    assert_eq!(access(&mut v, gvas[29], false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!((shadow.pages_in_use(), shadow.stats.snapshot().mmu_recycled), (61, 0), "5 free");
    assert_eq!(access(&mut v, gvas[30], false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(shadow.stats.snapshot().mmu_recycled, 22, "3 free: 22 zapped to have 25");
    // Freed pages are free again: after the shrinker, faults need no recycling for a while.
    let n = vm.shrink_shadow_pages(30) as u64;
    assert_eq!(shadow.stats.snapshot().mmu_recycled, 22 + n);
    for &g in &gvas[..4] {
        assert_eq!(access(&mut v, g, false), Seen::Ram(ram_pfn(0x20_0000)));
    }
    assert_eq!(shadow.stats.snapshot().mmu_recycled, 22 + n, "freed pages count as free");
}

/// Prefetching skips entries that are present already (KVM prefetches only not-present SPTEs):
/// a present neighbour whose host page is not mapped writable (it was only read) neither gets
/// rebuilt nor ends the prefetch, so the not-present neighbour after it is still prefetched.
/// Kills `shadow/prefetch.rs`: the indirect prefetch's skip of present entries.
#[test]
fn prefetch_skips_present_neighbours() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, 0x20_0000, P | RW | US);
    let pte1 = s.map4k(A + 0x1000, 0x21_0000, P | RW | US); // not accessed yet
    s.map4k(A + 0x2000, 0x22_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(leaf(&mut v, A + 0x1000), None, "not accessed: not prefetched");
    // The guest's other vCPU used page 1 meanwhile (A and D set; its host page written).
    host.write_u64(RAM_HVA + pte1, 0x21_0000 | P | RW | US | AC | DT);
    host_written(&host, RAM_HVA + 0x21_0000, 1);
    assert_eq!(access(&mut v, A + 0x2000, false), Seen::Ram(ram_pfn(0x22_0000)));
    assert_eq!(leaf(&mut v, A + 0x1000), Some((Some(ram_pfn(0x21_0000)), true)));
}

/// The direct prefetch's runs stop at present entries: in a guest 2 MiB page whose first page
/// is mapped already (only read, so its host page is not mapped writable), a fault on page 1
/// prefetches the run 2..8 after it and does not try page 0 again (a run that fails ends the
/// prefetch).
/// Kills `shadow/prefetch.rs`: `direct_runs` not splitting runs at present entries.
#[test]
fn the_direct_prefetch_runs_stop_at_present_entries() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let g = 0x8000_0000;
    s.map2m(g, 0x40_0000, P | RW | US | AC | DT);
    host_written(&host, RAM_HVA + 0x40_2000, 6);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, g, false), Seen::Ram(ram_pfn(0x40_0000)));
    assert_eq!(leaf(&mut v, g + 0x2000), None, "the run 1..8 failed at page 1");
    assert_eq!(access(&mut v, g + 0x1000, false), Seen::Ram(ram_pfn(0x40_1000)));
    for i in 2..8u64 {
        let want = Some((Some(ram_pfn(0x40_0000 + i * 0x1000)), true));
        assert_eq!(leaf(&mut v, g + i * 0x1000), want, "page {i}");
    }
}

/// A lookup that finds an existing shadow page resets its flood count too (KVM
/// `kvm_mmu_find_shadow_page` clears `write_flooding_count` on a hit): a directory reached from
/// a second top-level path is found, not created, and that use restarts the count.
/// Kills `shadow/pages.rs`: `get_page`'s flood reset on a hit.
#[test]
fn finding_a_shadow_page_restarts_its_flood_count() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, 0x20_0000, P | RW | US);
    let a2 = 2 << 30; // the next PDPT entry, pointed at A's directory
    let pdpte = s.entry_gpa(A, 3);
    host.write_u64(RAM_HVA + pdpte + 8, s.read(pdpte));
    let unused = vmmu::Gpa((s.entry_gpa(A, 2) & !0xfff) + 5 * 8);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    for _ in 0..2 {
        v.track_write(unused, 8).unwrap();
    }
    // The first fault through the second path finds the directory's page and links it.
    assert_eq!(access(&mut v, a2, false), Seen::Ram(ram_pfn(0x20_0000)));
    for _ in 0..2 {
        v.track_write(unused, 8).unwrap();
    }
    assert!(mapped(&mut v, A), "two writes since the lookup do not flood");
    v.track_write(unused, 8).unwrap();
    assert!(!mapped(&mut v, A), "the third does");
}

/// A PAE guest's page directory is shadowed under its own frame (the PDPTE's address bits), so
/// it is write-protected and an emulated edit of a directory entry reaches its shadow page: the
/// remapped address translates to the new page.
/// Kills `shadow/root.rs`: the PAE root pages' gfn computed from the PDPTE wrongly.
#[test]
fn a_pae_directory_edit_is_seen() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let alloc = || alloc_table(&next);
    let (pdpt, pd, pt, pt2) = (alloc(), alloc(), alloc(), alloc());
    host.write_u64(RAM_HVA + pdpt, pd | P);
    host.write_u64(RAM_HVA + pd + 8 * 2, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt + 8 * 3, 0x20_0000 | P | RW | US);
    host.write_u64(RAM_HVA + pt2 + 8 * 3, 0x30_0000 | P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    let mode = vmmu::guest::PagingMode::Pae { pdptrs: [0; 4] };
    v.set_guest_cpu(vmmu::guest::GuestCpu { mode, ..long4(0) }).unwrap();
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x20_0000)));
    host.write_u64(RAM_HVA + pd + 8 * 2, pt2 | P | RW | US);
    v.track_write(vmmu::Gpa(pd + 8 * 2), 8).unwrap();
    v.invlpg(Gva(0x40_3000)).unwrap();
    assert_eq!(access(&mut v, 0x40_3000, false), Seen::Ram(ram_pfn(0x30_0000)));
}

/// The shadow MMU's half of `tdp_faults.rs`'
/// `a_host_invalidation_between_translation_and_install_makes_the_fault_retry`: a host
/// invalidation of the data page begins and ends while the fault is parked between its
/// translation of the host address and taking the shadow lock. The invalidation's begin and end
/// run under the TDP MMU's lock, not the shadow lock, so only the sequence count (moved) tells
/// the fault, under the shadow lock, that what it translated is gone: it must retry, and the next
/// access map the new frame. Kills the sequence comparison in `Invalidation::retry_range` for
/// the shadow path.
#[test]
fn a_host_invalidation_between_translation_and_install_retries_the_shadow_fault() {
    const DATA_GPA: u64 = 0x20_0000;
    const NEW_PFN: u64 = 0x7_7000;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, DATA_GPA, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    v.service_requests().unwrap();
    let (racer, h) = (vm.clone(), host.clone());
    let mut once = true;
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |_| {
        if std::mem::take(&mut once) {
            let hva = RAM_HVA + DATA_GPA;
            let inv = racer.invalidate_hva_range_begin(vmmu::Hva(hva), vmmu::Hva(hva + 0x1000));
            h.map_over(hva, 0x1000, NEW_PFN, vmmu::Level::L4K, true);
            inv.end();
        }
    })));
    let o = v.handle_page_fault(Gva(A), PfErr(PfErr::USER));
    vmmu::testing::preempt::on_this_thread(None);
    assert_eq!(o.unwrap(), FaultOutcome::Retry(vmmu::stats::RetryCause::HostInvalidation));
    assert_eq!(access(&mut v, A, false), Seen::Ram(Pfn(NEW_PFN)));
}

/// A paging-mode change (KVM `kvm_mmu_reset_context` -> `kvm_mmu_unload`) lets go of the
/// vCPU's roots: no page of the old root stays pinned, so the shrinker (KVM `mmu_shrink_scan`)
/// can take all four pages, the root's too, and the guest's next access builds them again.
/// Kills `vcpu/shadow_path.rs`: `ShadowVcpu::unload` releasing its roots only when it took none
/// (`!roots.is_empty()` with the `!` deleted: the old root stayed pinned for good).
#[test]
fn a_paging_mode_change_unpins_the_old_root() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    v.set_guest_cpu(long4(s.cr3)).unwrap();
    assert_eq!(vm.shrink_shadow_pages(1000), 4, "root, PDPT, PD and PT: nothing is pinned");
    assert_eq!(vm.shadow_mmu().unwrap().stats.snapshot().shadow_pages, 0);
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
}

/// INVLPG is counted once per instruction (KVM's `invlpg` vCPU stat).
/// Kills `vcpu/shadow_path.rs`: `invlpg`'s `+= 1` -> `*= 1`.
#[test]
fn invlpg_counts_each_invalidation() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    for n in 1..=3 {
        v.invlpg(Gva(A + (n << 12))).unwrap();
        assert_eq!(v.stats.invlpg, n);
    }
}

/// The previous-root cache when a CR3 load finds no current root (it was just switched away
/// from, and no entry built a new one): KVM `cached_root_find_without_current` takes the hit
/// out of its slot and moves the later roots up, so the three slots stay filled in recency
/// order. The next switch (a miss) then pushes the current root in front and drops nothing,
/// and a switch back to any of the three cached spaces reuses its root: no new root is loaded.
/// Kills `shadow/root.rs`: `PrevRoots::find_without_current` without its move-up (`rotate_left`)
/// (the hit left a hole in the middle; the next miss dropped the oldest root, whose space then
/// needed a new root).
#[test]
fn a_cr3_load_without_a_current_root_keeps_the_previous_roots_in_order() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let spaces: Vec<Space> = (0..5).map(|_| Space::new(&host, &next)).collect();
    for s in &spaces {
        s.map4k(A, 0x20_0000, P | RW | US);
    }
    let cr3 = |i: usize| spaces[i].cr3;
    let mut v = vcpu_in(&vm, long4(cr3(0)));
    // Roots for spaces 0..4 in turn: previous roots 2, 1, 0 (most recent first).
    for i in 0..4 {
        if i > 0 {
            v.load_cr3(cr3(i)).unwrap();
        }
        assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    }
    assert_eq!(v.stats.root_loads, 4);
    // To space 4 (a miss: 3, 2, 1 cached, 0 dropped), and at once to space 2, before any entry
    // built space 4's root: 2 is taken from the middle slot without a current root.
    v.load_cr3(cr3(4)).unwrap();
    v.load_cr3(cr3(2)).unwrap();
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(v.stats.root_loads, 4, "space 2's root was reused");
    // A miss (space 0) with 2 current: 2, 3, 1 cached.
    v.load_cr3(cr3(0)).unwrap();
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(v.stats.root_loads, 5);
    for i in [1, 3, 2] {
        v.load_cr3(cr3(i)).unwrap();
        assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
        assert_eq!(v.stats.root_loads, 5, "space {i}'s root was cached");
    }
}

/// A shadow vCPU counts its #PF exits by kind (an RSVD fault as a misconfiguration, any other
/// as a violation, as the TDP vCPU counts EPT misconfigurations and violations) and its MMIO
/// fast-path answers by where they came from: the per-vCPU cache, an MMIO SPTE of the current
/// generation, or an MMIO SPTE of an older generation sent to the slow path; a RAM fault the
/// slow path fixes counts in KVM's `pf_fixed`.
/// Kills `vcpu/shadow_fault.rs`: `handle_page_fault`'s `misconfig_exits += 1` and
/// `violation_exits += 1` -> `*= 1`, `shadow_mmio_fast`'s `stale_gen_misses += 1` and
/// `mmio_spte_hits += 1` -> `*= 1`, `count_outcome`'s `pf_fixed += 1` -> `*= 1`.
#[test]
fn a_shadow_vcpu_counts_its_exits_and_mmio_fast_path_answers() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, MMIO_GPA, P | RW | US);
    s.map4k(X, 0x20_0000, P | RW | US);
    let counts = |v: &Vcpu<TestHost>| {
        let st = &v.stats;
        (st.violation_exits, st.misconfig_exits, st.mmio_cache_hits, st.mmio_spte_hits)
    };
    let mmio = |seen: Seen| matches!(seen, Seen::Mmio(g, _) if g.0 == MMIO_GPA);
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    let mut v2 = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v1, X, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(counts(&v1), (1, 0, 0, 0), "RAM: one not-present fault");
    assert_eq!(v1.stats.pf_fixed, 1);
    assert!(mmio(access(&mut v1, A, false)));
    assert_eq!(counts(&v1), (2, 0, 0, 0), "MMIO: a not-present fault, then the slow path");
    assert!(mmio(access(&mut v1, A, false)));
    assert_eq!(counts(&v1), (2, 1, 1, 0), "the RSVD fault answered from v1's cache");
    assert!(mmio(access(&mut v2, A, false)));
    assert_eq!(counts(&v2), (0, 1, 0, 1), "v2's cache is empty: the MMIO SPTE answers");
    // A memslot update: the MMIO SPTE's generation is old now.
    vm.set_memory_region(&log_region(0)).unwrap();
    assert_eq!(v2.stats.stale_gen_misses, 0);
    assert!(mmio(access(&mut v2, A, false)));
    assert_eq!(counts(&v2), (0, 2, 0, 1), "the stale SPTE is no fast-path answer");
    assert_eq!(v2.stats.stale_gen_misses, 1);
    assert!(mmio(access(&mut v2, A, false)));
    assert_eq!(counts(&v2), (0, 3, 1, 1), "the slow path filled the cache again");
}

/// A guest write to a page of a read-only memslot is emulated by the slow path and counted as
/// KVM counts it: in `pf_emulate`, and in the read-only write count, once per fault.
/// Kills `vcpu/fault_path.rs`: `readonly_write`'s (which `shadow_slow` calls)
/// `readonly_write_emulations += 1` and `pf_emulate += 1` -> `*= 1`.
#[test]
fn a_shadow_rom_write_counts_as_an_emulation() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let ro = vmmu::memslot::KVM_MEM_READONLY;
    vm.set_memory_region(&UserspaceMemoryRegion::new(7, ro, LOG_GPA, 0x4000, LOG_HVA)).unwrap();
    s.map4k(LOG_GVA, LOG_GPA, P | RW | US | AC | DT);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    for n in 1..=2 {
        let w = access(&mut v, LOG_GVA, true);
        assert!(matches!(w, Seen::Mmio(_, vmmu::fault::EmulateSource::ReadOnlyWrite)), "{w:?}");
        assert_eq!((v.stats.pf_emulate, v.stats.readonly_write_emulations), (n, n));
    }
}

/// The highest gfn the MMU maps (KVM `kvm_mmu_max_gfn`) still gets an MMIO SPTE under shadow
/// paging too: a guest mapping of the top guest-physical page emulates from the slow path once,
/// and a second vCPU's access is answered by the MMIO SPTE on the fast path.
/// Kills `mmu_core/mod.rs`: `MmuConfig::noslot_mmio_spte`'s `gfn <= self.max_gfn` -> `<` (the
/// top page was emulated without an SPTE, through the slow path on every access).
#[test]
fn the_highest_mappable_gfn_gets_a_shadow_mmio_spte() {
    use vmmu::fault::EmulateSource::{MmioSpteHit, SlowPathMmio};
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let top = vm.core().config().max_gfn.raw() << 12;
    assert_eq!(top, ((1 << 34) - 1) << 12, "46 physical bits");
    let s = Space::new(&host, &next);
    s.map4k(A, top, P | RW | US);
    let mut v0 = vcpu_in(&vm, long4(s.cr3));
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v0, A + 8, false), Seen::Mmio(vmmu::Gpa(top + 8), SlowPathMmio));
    assert_eq!(access(&mut v1, A + 8, false), Seen::Mmio(vmmu::Gpa(top + 8), MmioSpteHit));
    assert_eq!(v0.stats.pf_mmio_spte_created, 1);
}

/// An MMIO fault that builds its shadow path makes room first, as any fault that may allocate
/// shadow pages (KVM `make_mmu_pages_available` in `FNAME(page_fault)`, before the MMIO check of
/// `FNAME(fetch)`): with 3 of 64 pages free, it recycles the oldest pages up to 25 free.
/// Kills `shadow/mod.rs`: `ShadowMmu::install_fault`'s `!(Mmio && shadow_mmio_path_only)` with
/// `&&` -> `||` (an MMIO fault never made room: it recycled nothing).
#[test]
fn an_mmio_fault_that_builds_its_path_recycles_below_five_free_pages() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    vm.set_nr_mmu_pages(64).unwrap();
    let s = Space::new(&host, &next);
    // As in `a_fault_recycles_only_below_five_free_pages_and_refills_to_25`: A's directory and
    // table, A + 2 MiB's table, then two pages per GiB; the last GiB maps a device page.
    let gvas: Vec<u64> =
        [A, A + 0x20_0000].into_iter().chain((2..31u64).map(|i| i << 30)).collect();
    for &g in &gvas[..30] {
        s.map4k(g, 0x20_0000, P | RW | US);
    }
    s.map4k(gvas[30], MMIO_GPA, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let shadow = vm.shadow_mmu().unwrap();
    for &g in &gvas[..30] {
        assert_eq!(access(&mut v, g, false), Seen::Ram(ram_pfn(0x20_0000)));
    }
    assert_eq!((shadow.pages_in_use(), shadow.stats.snapshot().mmu_recycled), (61, 0));
    assert!(matches!(access(&mut v, gvas[30], false), Seen::Mmio(g, _) if g.0 == MMIO_GPA));
    assert_eq!(shadow.stats.snapshot().mmu_recycled, 22, "3 free: 22 zapped to have 25");
}

/// A fault that another vCPU fixed between the exit and its handling finds the leaf there: it
/// is spurious (KVM's `pf_spurious`), not fixed again.
/// Kills `vcpu/shadow_fault.rs`: `count_outcome`'s `pf_spurious += 1` -> `*= 1`.
#[test]
fn a_fault_fixed_meanwhile_counts_as_spurious() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, 0x20_0000, P | RW | US);
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    let mut v2 = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(hw(&mut v1, A, false), HwWalk::Violation { present: false, .. }));
    assert_eq!(access(&mut v2, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    let o = v1.handle_page_fault(Gva(A), PfErr(PfErr::USER)).unwrap();
    assert_eq!(o, FaultOutcome::Spurious);
    assert_eq!((v1.stats.pf_spurious, v1.stats.pf_fixed), (1, 0));
    assert_eq!(access(&mut v1, A, false), Seen::Ram(ram_pfn(0x20_0000)));
}

/// Another vCPU rewrites the gPTE in a loop (toggling a bit the hardware ignores), so the
/// walk's dirty-bit update loses every race. The fault must not map the page from a walk whose D
/// bit never reached guest memory: a writable shadow leaf over a clean gPTE lets the guest write
/// a page its OS believes clean (and would drop rather than write back). Returning the last
/// attempt was not saved by the fault's re-check of the gPTEs (`gpte_changed_at`): one more toggle
/// before it (the table is not shadowed yet, so the guest writes it freely) makes memory equal
/// the attempt's read again. The fault answers Retry; once the racer stops, the write maps the
/// page and the gPTE is dirty.
/// Kills `guest/walk.rs`: giving up after `MAX_RESTARTS` lost races by returning the last attempt.
#[test]
fn a_write_whose_dirty_bit_keeps_losing_its_race_is_retried_not_mapped_writable() {
    const D: u64 = 1 << 6;
    const ACCESSED: u64 = 1 << 5;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let at = s.map4k(A, 0x20_0000, P | RW | US | ACCESSED);
    host.race_cmpxchgs(RAM_HVA + at, vmmu::guest::MAX_RESTARTS);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    v.service_requests().unwrap();
    let racer = host.clone();
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |_| {
        let now = vmmu::host::GuestMemory::read_u64(&*racer, vmmu::Hva(RAM_HVA + at)).unwrap();
        racer.write_u64(RAM_HVA + at, now ^ (1 << 9));
    })));
    let out = v.handle_page_fault(Gva(A), PfErr(PfErr::WRITE | PfErr::USER));
    vmmu::testing::preempt::on_this_thread(None);
    assert_eq!(s.read(at) & D, 0, "the racer won every time");
    assert!(
        !matches!(hw(&mut v, A, true), HwWalk::Translated { .. }),
        "A is writable in the shadow while its gPTE is clean"
    );
    assert_eq!(out, Ok(FaultOutcome::Retry(vmmu::stats::RetryCause::Race)));
    // The racer is done: the write completes and the gPTE is dirty.
    assert_eq!(access(&mut v, A, true), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(s.read(at) & (ACCESSED | D), ACCESSED | D);
}

/// A vCPU with a TLB writes page 2 of the logged slot, the VMM collects (a GET, and in manual
/// mode a CLEAR of what it returned), the vCPU writes page 2 again: the pages of the next
/// collection.
fn write_collect_write_collect(bugs: BugSet, mode: vmmu::dirty::DirtyLogMode) -> Vec<u64> {
    let (vm, host, next) = shadow_vm(bugs);
    vm.set_dirty_log_mode(mode);
    let s = Space::new(&host, &next);
    vm.set_memory_region(&log_region(KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    s.map4k(LOG_GVA + 0x2000, LOG_GPA + 0x2000, P | RW | US);
    let collect = || {
        let words = vm.get_dirty_log(AsId(0), SlotId(7)).unwrap();
        if mode == vmmu::dirty::DirtyLogMode::Manual {
            vm.clear_dirty_log(AsId(0), SlotId(7), 0, 4, &words).unwrap();
        }
        vmmu::dirty::pages_of(&words).collect::<Vec<_>>()
    };
    let mut v = TlbVcpu::new(&vm, s.cr3);
    assert!(matches!(v.access(LOG_GVA + 0x2000, true), Seen::Ram(_)));
    assert_eq!(collect(), [2], "{mode:?}");
    assert!(matches!(v.access(LOG_GVA + 0x2008, true), Seen::Ram(_)));
    collect()
}

/// A collection under shadow paging write-protects the pages it takes through the reverse map
/// and flushes the TLBs before it returns, in auto mode (the GET) and in manual mode (the
/// CLEAR): a vCPU that cached a writable translation of the page faults on its next write,
/// which is in the next collection. Kills `shadow/dirty.rs`: `ShadowProtect`'s
/// `flush_remote_tlbs` -> `()` and `skip_flush -> true` (the write went through the stale TLB
/// entry and was in no collection: a lost dirty page).
#[test]
fn a_write_through_a_cached_shadow_translation_after_a_collection_is_logged() {
    use vmmu::dirty::DirtyLogMode;
    for mode in [DirtyLogMode::Auto, DirtyLogMode::Manual] {
        assert_eq!(write_collect_write_collect(BugSet::NONE, mode), [2], "{mode:?}");
    }
}

/// The re-injected `Bug::DirtyLogNoFlush` removes the flush under shadow paging too: the same
/// write is lost (the catcher of `bugs_caught` runs on EPT only). Kills `ShadowProtect`'s
/// `skip_flush -> false`, under which the bug could not be re-injected in a shadow VM.
#[cfg(feature = "historical-bugs")]
#[test]
fn the_dirty_log_no_flush_bug_loses_the_write_under_shadow_paging_too() {
    use vmmu::dirty::DirtyLogMode;
    let bug = BugSet::only(vmmu::bugs::Bug::DirtyLogNoFlush);
    for mode in [DirtyLogMode::Auto, DirtyLogMode::Manual] {
        assert_eq!(write_collect_write_collect(bug, mode), [] as [u64; 0], "{mode:?}");
    }
}

/// A fault that finds the MMIO SPTE it would install already there (another vCPU sharing the
/// root installed it between this vCPU's #PF and its handling) still emulates, and counts the
/// SPTE as created: KVM's `mmu_set_spte` handles a no-slot pfn before it compares anything.
/// Kills `vcpu/shadow_fault.rs`: `FetchOutcome::Spurious` left out of the `pf_mmio_spte_created`
/// arm (the second vCPU counted nothing).
#[test]
fn a_shadow_fault_that_finds_its_mmio_spte_there_counts_and_emulates() {
    use vmmu::fault::EmulateSource::SlowPathMmio;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, MMIO_GPA, P | RW | US);
    let mut v0 = vcpu_in(&vm, long4(s.cr3));
    let mut v1 = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v0, A, false), Seen::Mmio(vmmu::Gpa(MMIO_GPA), SlowPathMmio));
    assert_eq!(v0.stats.pf_mmio_spte_created, 1);
    // v1 shares the root, so the hardware would now take the RSVD exit; this one is the
    // not-present #PF it took before v0's SPTE was there.
    v1.service_requests().unwrap();
    let o = v1.handle_page_fault(Gva(A), PfErr(PfErr::USER)).unwrap();
    assert!(
        matches!(o, FaultOutcome::Emulate { source: SlowPathMmio, gpa, .. }
            if gpa.raw() == MMIO_GPA),
        "{o:?}"
    );
    assert_eq!((v1.stats.pf_mmio_spte_created, v1.stats.pf_spurious), (1, 0));
    let cached = Seen::Mmio(vmmu::Gpa(MMIO_GPA), vmmu::fault::EmulateSource::VcpuCacheHit);
    assert_eq!(access(&mut v1, A, false), cached, "v1's own fault filled its GVA cache");
}

/// A page limit below the pages that roots pin (`KVM_SET_NR_MMU_PAGES` while many roots are
/// loaded) zaps what it can and keeps as limit what is still in use, as KVM's
/// `kvm_mmu_change_mmu_pages` does, so the next fault does not find the MMU over its limit.
/// Kills `shadow/mod.rs`: `change_max_pages` keeping the goal as the limit.
#[test]
fn a_page_limit_below_the_pinned_pages_becomes_what_is_pinned() {
    let host = std::sync::Arc::new(TestHost::new(4096));
    host.map(RAM_HVA, RAM_SIZE, RAM_HVA >> 12, vmmu::Level::L4K, true);
    let mut cfg = vmmu::vm::VmConfig::shadow(46).unwrap();
    cfg.max_vcpus = 17;
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, RAM_SIZE, RAM_HVA)).unwrap();
    let next = std::rc::Rc::new(std::cell::Cell::new(TABLES_GPA));
    // 17 vCPUs, each in 4 spaces of its own: 68 roots, each pinned (the current root and the 3
    // previous ones).
    let mut vcpus = Vec::new();
    for _ in 0..17 {
        let spaces: Vec<Space> = (0..4).map(|_| Space::new(&host, &next)).collect();
        for s in &spaces {
            s.map4k(A, 0x20_0000, P | RW | US);
        }
        let mut v = vcpu_in(&vm, long4(spaces[0].cr3));
        for s in &spaces {
            v.load_cr3(s.cr3).unwrap();
            assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
        }
        vcpus.push(v);
    }
    let shadow = vm.shadow_mmu().unwrap();
    assert!(shadow.pages_in_use() > 68, "{}", shadow.pages_in_use());
    vm.set_nr_mmu_pages(64).unwrap();
    assert_eq!(shadow.pages_in_use(), 68, "every unpinned page zapped");
    assert_eq!(vm.shadow_max_pages(), Some(68), "the limit is what is still in use");
}

/// MOV CR3 with a bit at or above MAXPHYADDR is #GP and changes nothing (KVM `kvm_set_cr3`,
/// `kvm_vcpu_is_legal_cr3`): the vCPU keeps its root and its translations; the highest legal
/// CR3 loads.
/// Kills `vcpu/shadow_path.rs`: the legality check of `load_cr3` (the bits were dropped and a
/// root built for another table).
#[test]
fn a_cr3_beyond_maxphyaddr_is_refused() {
    use vmmu::vcpu::ShadowError;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    for bad in [s.cr3 | 1 << 46, s.cr3 | 1 << 63] {
        let e = v.load_cr3(bad).unwrap_err();
        assert_eq!(e, ShadowError::IllegalCr3 { cr3: bad, maxphyaddr: 46 });
        assert!(e.to_string().contains("#GP"), "{e}");
        assert_eq!(v.guest_cpu().unwrap().cr3, s.cr3);
        assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(0x20_0000)));
    }
    let top = ((1u64 << 46) - 1) & !0xfff;
    v.load_cr3(top).unwrap();
    assert_eq!(v.guest_cpu().unwrap().cr3, top);
}
