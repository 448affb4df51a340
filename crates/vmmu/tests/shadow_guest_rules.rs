//! Guest-visible rules at the shadow MMU's edges, each once broken (session 35's shadow-MMU
//! review): INVLPG of a 1 GiB guest page clears the GVA cache entries inside it; a 1-byte
//! table write is not a `mmu_pde_zapped`; a fetch from an NX device page is a guest #PF however
//! the fault arrives; a page-crossing emulated write updates the shadow of every page it wrote.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use vmmu::bugs::BugSet;
use vmmu::fault::EmulateSource;
use vmmu::guest::GuestCpu;
use vmmu::{Gpa, Gva};

/// A second no-slot window (5 GiB), 1 GiB aligned.
const MMIO_GPA2: u64 = 0x1_4000_0000;

fn long4_1g(cr3: u64) -> GuestCpu {
    GuestCpu { gbpages: true, ..GuestCpu::long4(cr3, 46) }
}

/// A guest that remaps a 1 GiB page and invalidates it by its base address (INVLPG of any
/// address of a page drops the whole page's translation, SDM vol. 3 §4.10.4.1) must not find a
/// GVA cache entry 4 MiB into the page afterwards. The MMIO-SPTE fast path, which does not know
/// the guest page's size, once recorded 2 MiB: the next RSVD fault there, on a path another
/// vCPU rebuilt with an MMIO SPTE for the new target, was answered from the cache with the old
/// device address.
#[test]
fn invlpg_of_a_1g_guest_page_clears_the_gva_cache_entries_inside_it() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    const V: u64 = 0x40_0000_0000; // 256 GiB, 1 GiB aligned
    let pdpte_gpa = s.entry_gpa(V, 3);
    host.write_u64(RAM_HVA + pdpte_gpa, MMIO_GPA | P | RW | US | PS);
    let mut v0 = vcpu_in(&vm, long4_1g(s.cr3));
    let mut v1 = vcpu_in(&vm, long4_1g(s.cr3));
    let x = V + 0x40_0010; // 4 MiB into the 1 GiB page
                           // vCPU 0 builds the shadow path and an MMIO SPTE for the old target.
    assert_eq!(
        access(&mut v0, x, false),
        Seen::Mmio(Gpa(MMIO_GPA + 0x40_0010), EmulateSource::SlowPathMmio)
    );
    // vCPU 1 hits that MMIO SPTE (RSVD fault) and fills its GVA cache from the fast path.
    assert_eq!(
        access(&mut v1, x, false),
        Seen::Mmio(Gpa(MMIO_GPA + 0x40_0010), EmulateSource::MmioSpteHit)
    );
    // The guest remaps the 1 GiB page to another device window (an emulated store to its
    // PDPT, which is write-protected) and shoots down the page by its base address on both
    // vCPUs, as an OS does.
    host.write_u64(RAM_HVA + pdpte_gpa, MMIO_GPA2 | P | RW | US | PS);
    v0.track_write(Gpa(pdpte_gpa), 8).unwrap();
    v0.invlpg(Gva(V)).unwrap();
    v1.invlpg(Gva(V)).unwrap();
    // vCPU 0 accesses the address again: the new target, and a new MMIO SPTE for it.
    assert_eq!(
        access(&mut v0, x, false),
        Seen::Mmio(Gpa(MMIO_GPA2 + 0x40_0010), EmulateSource::SlowPathMmio)
    );
    // vCPU 1 must see the new target too (hardware: the TLB entry of the page is gone).
    let seen = access(&mut v1, x, false);
    assert_eq!(
        seen,
        Seen::Mmio(Gpa(MMIO_GPA2 + 0x40_0010), EmulateSource::MmioSpteHit),
        "vCPU 1 emulated the access at the device address the guest unmapped"
    );
}

/// `mmu_pde_zapped` does not count a 1-byte emulated write to an upper-level gPTE. KVM's
/// `kvm_mmu_track_write` counts it only when `gentry != 0`, and `mmu_pte_write_fetch_gpte`
/// reads `gentry` only for 4- and 8-byte writes (0 otherwise), so a 1-byte write (Linux's
/// `clear_bit`/`andb` on an entry, the case `detect_write_misaligned` lets through) never
/// counts. Shadow facts §4.3 and §10: "SPTE zapped by a tracked write in a level > 4K sp, new
/// gPTE != 0".
#[test]
fn one_byte_write_to_a_pde_does_not_count_as_pde_zapped() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    let before = vm.shadow_mmu().unwrap().stats.snapshot();
    // The guest clears RW in its PDE with a 1-byte store at the entry's first byte (emulated:
    // the PD is write-protected).
    let pde_gpa = s.entry_gpa(0x4000_0000, 2);
    let pde = s.read(pde_gpa);
    host.write_u64(RAM_HVA + pde_gpa, pde & !RW);
    v.track_write(Gpa(pde_gpa), 1).unwrap();
    let after = vm.shadow_mmu().unwrap().stats.snapshot();
    assert_eq!(after.mmu_pte_write, before.mmu_pte_write + 1, "the write was tracked");
    assert_eq!(
        after.mmu_flooded, before.mmu_flooded,
        "a 1-byte write at an entry start is aligned"
    );
    assert_eq!(
        after.mmu_pde_zapped, before.mmu_pde_zapped,
        "KVM's gentry is 0 for a 1-byte write: mmu_pde_zapped must not move"
    );
}

const NX: u64 = 1 << 63;

/// An instruction fetch from a device page the guest maps no-execute (NX, with
/// EFER.NX on) must be a #PF with P|U|I (SDM vol. 3 §4.6, §4.7; shadow facts §2.4: `|= FETCH`
/// for a fetch with EFER.NX), also once a read made an MMIO SPTE and filled the GVA cache:
/// neither records X, so the RSVD fast path must leave fetches to the guest walk (it once
/// answered them from the cache or the MMIO SPTE, emulating a fetch from the device page). KVM
/// lands in the emulator, whose instruction fetch walks with PFERR_FETCH and injects the #PF.
#[test]
fn fetch_from_an_nx_device_page_is_a_page_fault_even_after_a_read_cached_it() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, MMIO_GPA, P | RW | US | NX);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    // The slow path knows: fetch, user, NX page -> P|U|I.
    assert_eq!(access_with(&mut v, 0x4000_0010, false, true, true), Seen::GuestPf(0x15));
    // A read makes the MMIO SPTE and fills the GVA cache.
    assert_eq!(
        access(&mut v, 0x4000_0010, false),
        Seen::Mmio(Gpa(MMIO_GPA + 0x10), EmulateSource::SlowPathMmio)
    );
    // The same fetch again: still a #PF for the guest.
    let seen = access_with(&mut v, 0x4000_0010, false, true, true);
    assert_eq!(seen, Seen::GuestPf(0x15), "a fetch from an NX page was emulated: {seen:?}");
}

/// The same on another vCPU, which finds only the MMIO SPTE (no cache entry).
#[test]
fn fetch_from_an_nx_device_page_is_a_page_fault_on_an_mmio_spte_hit() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, MMIO_GPA, P | RW | US | NX);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(
        access(&mut v, 0x4000_0010, false),
        Seen::Mmio(Gpa(MMIO_GPA + 0x10), EmulateSource::SlowPathMmio)
    );
    // Another vCPU, which finds only the MMIO SPTE (no cache entry).
    let mut v2 = vcpu_in(&vm, long4(s.cr3));
    let seen = access_with(&mut v2, 0x4000_0010, false, true, true);
    assert_eq!(seen, Seen::GuestPf(0x15), "MMIO SPTE hit answered a fetch from NX: {seen:?}");
}

/// `Vcpu::track_write` of a write that crosses a page boundary tracks every page it wrote, as
/// KVM's emulator splits a page-crossing access into one `emulator_write_phys` per page, each
/// reaching `kvm_mmu_track_write` (it once looked only at the first byte's page, so a shadowed
/// guest table in the second page kept the SPTE of the entry the write changed). Here the
/// guest rewrites gPTE 0 of a last-level table with an 8-byte store starting 4 bytes before the
/// table (so its last 4 bytes, the low half of the entry with the frame address, land in the
/// table), then INVLPGs the address: the vCPU must reach the new frame.
#[test]
fn a_page_crossing_emulated_write_drops_the_spte_it_changed_in_the_second_page() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    // GVA 0x4000_0000 is entry 0 of its last-level table, and the page before that table is
    // plain guest RAM (not a page table).
    s.entry_gpa(0x4000_0000, 2);
    let _plain = alloc_table(&next);
    let pte_gpa = s.map4k(0x4000_0000, 0x20_0000, P | RW | US);
    assert_eq!(pte_gpa, _plain + 0x1000);
    assert_eq!(pte_gpa & 0xfff, 0, "entry 0 of its table");
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
    // The guest's store: 8 bytes at pte_gpa - 4. The low 4 bytes of the gPTE become the new
    // frame 0x30_0000 (same flags); the 4 bytes before the table are left as they were.
    let new_pte = 0x30_0000 | P | RW | US | 0x20; // A already set
    let before = s.read(pte_gpa - 8);
    host.write_u64(RAM_HVA + pte_gpa, new_pte);
    assert_eq!(s.read(pte_gpa - 8), before);
    v.track_write(Gpa(pte_gpa - 4), 8).unwrap();
    v.invlpg(Gva(0x4000_0000)).unwrap();
    let seen = access(&mut v, 0x4000_0000, false);
    assert_eq!(
        seen,
        Seen::Ram(ram_pfn(0x30_0000)),
        "the guest table maps 0x30_0000 now, but the stale shadow leaf still maps 0x20_0000"
    );
}

/// A prefetch that stops at a neighbour gPTE that no longer qualifies drops that neighbour's
/// SPTE too (KVM `FNAME(prefetch_invalid_gpte)`). The MMIO SPTE there was made for what the gPTE
/// said before the host cleared it behind the write tracking's back (a VMM or device write to
/// guest memory does not exit); once the prefetch has seen the gPTE clear, an access there is
/// the guest's not-present #PF, not an emulated access at the old device address.
#[test]
fn prefetch_at_an_invalid_gpte_drops_its_mmio_spte() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    const V: u64 = 0x4000_0000;
    s.map4k(V, 0x20_0000, P | RW | US);
    let dev_pte = s.map4k(V + 0x1000, MMIO_GPA, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(
        access(&mut v, V + 0x1000, false),
        Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::SlowPathMmio)
    );
    // The host clears the device PTE (no exit, no emulated write).
    host.write_u64(RAM_HVA + dev_pte, 0);
    // A fault on the neighbour maps it and prefetches the group: the cleared gPTE ends that.
    assert_eq!(access(&mut v, V, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(
        access(&mut v, V + 0x1000, false),
        Seen::GuestPf(0x4),
        "an access through the cleared gPTE was answered from its old MMIO SPTE"
    );
}

/// KVM `FNAME(fetch)` re-reads each guest PTE after the table holding it is shadowed (so
/// write-protected) and **before** it links the child shadow page that PTE leads to: a gPTE
/// changed since the walk read it (the guest wrote the table before it was protected, or the
/// write was trapped and its `kvm_mmu_track_write` ran before this fault took the lock) ends the
/// fault with RET_PF_RETRY and nothing linked for the old value (shadow facts §3.2, §12). Here
/// the guest repoints a PDE from one page table to another between the walk of a fault under it
/// and that fault's install; the old table is shadowed already (another PDE shares it) and holds
/// a leaf. A fetch that links first and re-checks only at the end leaves the new directory's
/// shadow linking the old table's shadow page, and a later access elsewhere under the PDE
/// translates through the old table, INVLPG or not (this MMU's INVLPG drops no synced leaf).
#[test]
fn a_gpte_changed_under_a_fault_links_no_child_for_its_old_value() {
    use vmmu::fault::{FaultOutcome, PfErr};
    use vmmu::host::PreemptPoint;
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    // PT_A, reached through PD2 (gva 2 GiB up): entry 5 maps Q.
    let (q, q_new) = (0x30_5000, 0x31_5000);
    let pt_a_entry = s.map4k(0x8000_5000, q, P | RW | US);
    let pt_a = pt_a_entry & !0xfff;
    s.map4k(0x8000_0000, 0x30_0000, P | RW | US);
    // PD1 (gva 1 GiB up) shares PT_A through its entry 0.
    let pd1_entry = s.entry_gpa(0x4000_0000, 2);
    host.write_u64(RAM_HVA + pd1_entry, pt_a | P | RW | US);
    // PT_B, which the guest is about to put in PD1's entry 0 instead: entry 5 maps Q'.
    let pt_b = alloc_table(&next);
    host.write_u64(RAM_HVA + pt_b + 5 * 8, q_new | P | RW | US);
    host.write_u64(RAM_HVA + pt_b, 0x31_0000 | P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    // PT_A is shadowed, with its leaf for entry 5.
    assert_eq!(access(&mut v, 0x8000_5000, false), Seen::Ram(ram_pfn(q)));
    // A fault under PD1 (never shadowed): another vCPU stores the new PDE (straight to RAM:
    // nothing write-protects PD1 yet) between this fault's walk and its install.
    let racer = host.clone();
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |p| {
        if p == PreemptPoint::FaultDecided {
            racer.write_u64(RAM_HVA + pd1_entry, pt_b | P | RW | US);
        }
    })));
    v.service_requests().unwrap();
    let r = v.handle_page_fault(Gva(0x4000_0000), PfErr(PfErr::USER));
    vmmu::testing::preempt::on_this_thread(None);
    assert!(matches!(r, Ok(FaultOutcome::Retry(_))), "the changed PDE retries the fault: {r:?}");
    // The guest invalidates what it changed, as an OS does after repointing a PDE.
    v.invlpg(Gva(0x4000_0000)).unwrap();
    v.invlpg(Gva(0x4000_5000)).unwrap();
    assert_eq!(
        access(&mut v, 0x4000_5000, false),
        Seen::Ram(ram_pfn(q_new)),
        "entry 5 under PD1 is PT_B's now, not the old table's"
    );
}
