//! Rules of the design facts (kvm-mmu-facts.md, kvm-shadow-mmu-facts.md) pinned one by one, each
//! through what an access or a caller sees (a translation, an emulated gpa, a guest #PF, a
//! counter KVM also keeps), not through internal state. Each test names its section.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use vmmu::bugs::BugSet;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::guest::GuestCpu;
use vmmu::spte::FormatKind;
use vmmu::stats::RetryCause;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::Gva;

/// One supervisor-mode access (CPL 0) by `v` to `gva`, as [`access`] makes a user-mode one;
/// panics if it does not complete (a fault loop).
fn supervisor_access(v: &mut Vcpu<TestHost>, gva: u64, write: bool) -> Seen {
    access_at(v, gva, write, false)
}

/// Shadow facts §3.1: with CR0.WP=0 a supervisor write to a page the guest maps read-only is
/// allowed, and the shadow MMU makes the SPTE writable and supervisor-only (`access |= W,
/// &= ~U`), because the hardware running the guest always has CR0.WP=1. Without that the write
/// faults on the read-only SPTE for ever (every fault finds the same read-only leaf).
/// The user-mode read that follows must then fault and see a user SPTE again.
#[test]
fn cr0_wp0_supervisor_write_to_a_read_only_page_completes() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let data = 0x80_0000;
    s.map4k(0x4000_0000, data, P | US);
    let mut v = vcpu_in(&vm, GuestCpu { cr0_wp: false, ..long4(s.cr3) });
    assert_eq!(supervisor_access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(data)));
    // The guest's rights are unchanged for user mode: a user read works, a user write is a
    // protection #PF (P|W|U).
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(data)));
    assert_eq!(
        access(&mut v, 0x4000_0000, true),
        Seen::GuestPf(PfErr::PRESENT | PfErr::WRITE | PfErr::USER)
    );
    // With CR0.WP=1 the same supervisor write is a protection #PF (P|W).
    let mut w = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(
        supervisor_access(&mut w, 0x4000_0000, true),
        Seen::GuestPf(PfErr::PRESENT | PfErr::WRITE)
    );
}

/// Shadow facts §3.1 and §9 (facts §3.7): the WP=0 rights fix is not applied to MMIO, whose
/// SPTE and cache keep the guest's own W/U; the check of a cached hit against them is KVM's
/// `permission_fault`, under which a CR0.WP=0 supervisor write needs no W. So the second such
/// write to MMIO the guest maps read-only emulates from the MMIO SPTE, without the slow path
/// (`pf_taken` does not move), at the same gpa.
#[test]
fn cr0_wp0_supervisor_write_to_read_only_mmio_hits_the_mmio_spte() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    assert!(vm.mmio_caching_enabled());
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, MMIO_GPA, P | US);
    let mut v = vcpu_in(&vm, GuestCpu { cr0_wp: false, ..long4(s.cr3) });
    let first = supervisor_access(&mut v, 0x4000_0008, true);
    let Seen::Mmio(gpa, _) = first else { panic!("{first:?}") };
    assert_eq!(gpa.raw(), MMIO_GPA + 8);
    assert_eq!(v.stats.pf_mmio_spte_created, 1);
    let taken = v.stats.pf_taken;
    let second = supervisor_access(&mut v, 0x4000_0008, true);
    assert!(matches!(second, Seen::Mmio(g, _) if g == gpa), "{second:?}");
    assert_eq!(v.stats.pf_taken, taken, "the RSVD fault was decided on the fast path");
    assert_eq!(v.stats.mmio_spte_hits + v.stats.mmio_cache_hits, 1);
    // A user write there is the guest's protection #PF, never emulated.
    assert_eq!(
        access(&mut v, 0x4000_0008, true),
        Seen::GuestPf(PfErr::PRESENT | PfErr::WRITE | PfErr::USER)
    );
}

/// Facts §7: `pf_emulate` counts faults whose result is RET_PF_EMULATE. A no-slot fault whose
/// root went obsolete under it (a memslot deletion's fast zap) retries in `is_page_fault_stale`
/// after `kvm_handle_noslot_fault` returned CONTINUE: nothing was emulated, so `pf_emulate`
/// stays put (TDP and shadow paging alike); the retried fault then emulates and counts once.
#[test]
fn a_no_slot_fault_that_retries_on_a_stale_root_is_not_counted_as_emulated() {
    // TDP.
    let (vm, _h) = common::vm(FormatKind::Ept);
    vm.set_memory_region(&common::region(0, 0x10_0000, 0x1000, common::RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    common::access(&mut v, 0x10_0000, false).unwrap();
    vm.zap_all_fast();
    let o = v.handle_ept_violation(vmmu::Gpa(0x8000_0000), vmmu::FaultAccess::READ).unwrap();
    assert_eq!(o, FaultOutcome::Retry(RetryCause::ObsoleteRoot));
    assert_eq!(v.stats.pf_emulate, 0);
    let (seen, _) = common::access(&mut v, 0x8000_0000, false).unwrap();
    assert!(matches!(seen, common::Seen::Mmio(_)), "{seen:?}");
    assert_eq!(v.stats.pf_emulate, 1);

    // Shadow paging.
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, MMIO_GPA, P | RW | US);
    s.map4k(0x4000_1000, 0x80_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(0x80_0000)));
    vm.zap_all_fast();
    let o = v.handle_page_fault(Gva(0x4000_0000), PfErr(PfErr::USER)).unwrap();
    assert!(matches!(o, FaultOutcome::Retry(_)), "{o:?}");
    assert_eq!(v.stats.pf_emulate, 0);
    assert!(matches!(access(&mut v, 0x4000_0000, false), Seen::Mmio(..)));
    assert_eq!(v.stats.pf_emulate, 1);
}

/// Facts §8.11 (527d5cd7eece and its June 2022 fix) and shadow facts §6.2: the free-obsolete-
/// roots request frees every obsolete root, previous roots included (`prev_roots[i]` is checked,
/// not the current root again). After a fast zap, switching back to a CR3 whose root sat in the
/// previous-root cache builds a new root, and the access through it completes with the current
/// translation (the guest remapped the page while the old root was obsolete).
#[test]
fn an_obsolete_previous_root_is_freed_not_reused() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let a = Space::new(&host, &next);
    let b = Space::new(&host, &next);
    let pte = a.map4k(0x4000_0000, 0x80_0000, P | RW | US);
    b.map4k(0x4000_0000, 0x90_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(a.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(0x80_0000)));
    v.load_cr3(b.cr3).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(0x90_0000)));
    // Space a's root is now a previous root. A fast zap obsoletes both.
    vm.zap_all_fast();
    v.service_requests().unwrap();
    // While a's root is not loaded, the guest repoints its PTE (a table nobody shadows any more:
    // a plain store).
    host.write_u64(RAM_HVA + pte, 0xa0_0000 | P | RW | US);
    let loads = v.stats.root_loads;
    v.load_cr3(a.cr3).unwrap();
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0xa0_0000)));
    assert!(v.stats.root_loads > loads, "a new root for space a");
}

/// Shadow facts §1.2: `cr0_wp` is part of a shadow page's role. A page built while CR0.WP=0
/// may hold a writable supervisor-only SPTE for a page the guest maps read-only; once the guest
/// sets CR0.WP (a role change: every root goes), the pages built under WP=0 are not reused, so
/// the same supervisor write is the guest's protection #PF (P|W), not a silent write.
#[test]
fn cr0_wp_is_part_of_the_shadow_page_role() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let data = 0x80_0000;
    s.map4k(0x4000_0000, data, P | US);
    let mut v = vcpu_in(&vm, GuestCpu { cr0_wp: false, ..long4(s.cr3) });
    assert_eq!(supervisor_access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(data)));
    v.set_guest_cpu(long4(s.cr3)).unwrap();
    assert_eq!(
        supervisor_access(&mut v, 0x4000_0000, true),
        Seen::GuestPf(PfErr::PRESENT | PfErr::WRITE)
    );
    // And back: WP=0 again allows it.
    v.set_guest_cpu(GuestCpu { cr0_wp: false, ..long4(s.cr3) }).unwrap();
    assert_eq!(supervisor_access(&mut v, 0x4000_0000, true), Seen::Ram(ram_pfn(data)));
}

/// Shadow facts §11 (0cb2af2ea66a, 2026) and §12: a child page under an SPTE is reused only if
/// its gfn matches. A host-side change of a guest 2 MiB PDE (the host writes the guest's table;
/// no write-protection trap) leaves the direct page of the old 2 MiB range linked; the next fault
/// in the range wants the direct page of the new range, so the old one is unlinked with all its
/// leaves, and a page mapped before the change translates to the new range when next accessed
/// (reusing the old page would keep it on the old frame).
#[test]
fn a_direct_child_of_another_gfn_is_not_reused() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let (old, new) = (0x20_0000 * 8, 0x20_0000 * 12);
    let pde = s.map2m(0x4000_0000, old, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(old)));
    host.write_u64(RAM_HVA + pde, new | P | RW | US | PS);
    v.invlpg(Gva(0x4000_0000)).unwrap();
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(new + 0x1000)));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(new)));
}

/// Shadow facts §11 (81ccda30b4e8, 2026): reuse also needs the role to match. The host turns a
/// guest 2 MiB PDE into a pointer to a page table that sits at the same gpa (same gfn, but an
/// indirect page instead of a direct one): the next fault unlinks the direct page, and a page
/// mapped through the old 2 MiB mapping translates through the new table when next accessed.
#[test]
fn a_child_of_the_same_gfn_but_another_role_is_not_reused() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let x = 0x20_0000 * 8;
    let pde = s.map2m(0x4000_0000, x, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(x)));
    // The frame at x becomes a page table: entry 0 maps y, entry 1 maps z.
    let (y, z) = (0x20_0000 * 12, 0x20_0000 * 12 + 0x5000);
    host.write_u64(RAM_HVA + x, y | P | RW | US);
    host.write_u64(RAM_HVA + x + 8, z | P | RW | US);
    host.write_u64(RAM_HVA + pde, x | P | RW | US);
    v.invlpg(Gva(0x4000_0000)).unwrap();
    assert_eq!(access(&mut v, 0x4000_1000, false), Seen::Ram(ram_pfn(z)));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(y)));
}

/// Shadow facts §3.1 and §4.1 with CR0.WP=0: the rights fix gives a supervisor write W, but a
/// gfn the MMU shadows as a guest page table stays write-protected, so the write to a read-only
/// mapping of the guest's own top-level table is emulated (a write-protection exit), never
/// let through a writable SPTE.
#[test]
fn cr0_wp0_supervisor_write_to_a_shadowed_table_is_emulated() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x80_0000, P | RW | US);
    // The guest maps its own PML4 read-only at another gva.
    s.map4k(0x4000_1000, s.cr3, P | US);
    let mut v = vcpu_in(&vm, GuestCpu { cr0_wp: false, ..long4(s.cr3) });
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x80_0000)));
    let got = supervisor_access(&mut v, 0x4000_1008, true);
    assert!(
        matches!(got, Seen::Mmio(g, vmmu::fault::EmulateSource::WriteProtected) if g.raw() == s.cr3 + 8),
        "{got:?}"
    );
}

/// Facts §3.3 and shadow facts §3.1 (KVM v6.12 and later, as the host KVM): a write to a
/// write-protected guest table returns RET_PF_WRITE_PROTECTED, which `kvm_mmu_do_page_fault`
/// does not count in `pf_emulate` (only RET_PF_EMULATE is), while a write to a no-slot gfn is.
#[test]
fn a_write_to_a_shadowed_table_is_not_counted_in_pf_emulate() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x80_0000, P | RW | US);
    // The guest maps its own PML4 writable at another gva, and a gva with no memslot behind it.
    s.map4k(0x4000_1000, s.cr3, P | RW | US);
    s.map4k(0x4000_2000, 0x1_0000_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x80_0000)));
    let before = v.stats.clone();
    let got = access(&mut v, 0x4000_1008, true);
    assert!(
        matches!(got, Seen::Mmio(g, vmmu::fault::EmulateSource::WriteProtected) if g.raw() == s.cr3 + 8),
        "{got:?}"
    );
    assert_eq!(v.stats.write_protected_emulations, before.write_protected_emulations + 1);
    assert_eq!(v.stats.pf_emulate, before.pf_emulate, "RET_PF_WRITE_PROTECTED is not pf_emulate");
    let got = access(&mut v, 0x4000_2000, true);
    assert!(matches!(got, Seen::Mmio(g, _) if g.raw() == 0x1_0000_0000), "{got:?}");
    assert_eq!(v.stats.pf_emulate, before.pf_emulate + 1, "a no-slot write is RET_PF_EMULATE");
}

/// Shadow facts §4.1: above `RMAP_RECYCLE_THRESHOLD` (1000) leaves for one gfn, adding another
/// zaps them all (KVM `__rmap_add`; `pte_list_add` counts the leaves before the new one). With
/// 1001 GVAs mapping one page, every leaf stays: reading them all again takes no fault. With
/// 1002, the 1002nd leaf zapped every leaf of the page, so reading the first GVA faults again
/// (on this host's KVM the zap also shows in the dirty log, corpus
/// `paging_rmap_recycle_threshold.scn`).
#[test]
fn more_than_1000_leaves_for_one_gfn_zap_them_all() {
    for (n, refault) in [(1001, false), (1002, true)] {
        let (vm, host, next) = shadow_vm(BugSet::NONE);
        let s = Space::new(&host, &next);
        let data = 0x80_0000;
        let gva = |i: u64| 0x4000_0000 + i * 0x1000;
        for i in 0..n {
            s.map4k(gva(i), data, P | RW | US);
        }
        let mut v = vcpu_in(&vm, long4(s.cr3));
        for i in 0..n {
            assert_eq!(access(&mut v, gva(i), false), Seen::Ram(ram_pfn(data)), "{n} {i}");
        }
        let taken = v.stats.pf_taken;
        assert_eq!(access(&mut v, gva(0), false), Seen::Ram(ram_pfn(data)));
        assert_eq!(v.stats.pf_taken > taken, refault, "{n} GVAs: the first faults again");
        // The last GVA's access faulted again after its own leaf went with the others, and
        // mapped it: it keeps its leaf either way.
        let taken = v.stats.pf_taken;
        assert_eq!(access(&mut v, gva(n - 1), false), Seen::Ram(ram_pfn(data)));
        assert_eq!(v.stats.pf_taken, taken, "{n} GVAs: the last");
    }
}
