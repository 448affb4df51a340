//! Shadow-MMU outcomes of guest walks that the other tests do not reach, from a second walker
//! audit on 2026-12-04 (no defect found): NX only at an upper level reaching the leaf (and
//! reserved without EFER.NX), A/D and rights of 2 MiB and 1 GiB guest pages, a PAE walk through
//! CR3-loaded PDPTEs, and a recursive PML4 entry whose one gPTE is read at every level.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use vmmu::bugs::BugSet;
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::testing::TestHost;

const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const NX: u64 = 1 << 63;

/// NX in the PDPTE: a read maps the page, a fetch is a #PF P|U|FETCH (the leaf SPTE is NX).
#[test]
fn shadow_nx_in_an_upper_level_reaches_the_leaf() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US | A | D);
    let pdpte = s.entry_gpa(0x4000_0000, 3);
    host.write_u64(RAM_HVA + pdpte, s.read(pdpte) | NX);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access_with(&mut v, 0x4000_0000, false, false, true), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access_with(&mut v, 0x4000_0000, false, true, true), Seen::GuestPf(0x15));
    // Without EFER.NX the same PDPTE is a reserved-bit fault, and a fetch reports no FETCH.
    let mut v = vcpu_in(&vm, GuestCpu { efer_nx: false, ..long4(s.cr3) });
    assert_eq!(access_with(&mut v, 0x4000_0000, false, true, true), Seen::GuestPf(0xd));
}

/// A 2 MiB guest page: a read leaves D clear and maps read-only; a write sets D on the PDE
/// and then works; a user fetch works (no NX); a PDE without U denies the user.
#[test]
fn shadow_2m_guest_page_a_d_and_rights() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pde = s.map2m(0x4000_0000, 0x20_0000, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let page = 0x4000_0000 + 0x5000;
    assert_eq!(access_with(&mut v, page, false, false, true), Seen::Ram(ram_pfn(0x20_5000)));
    assert_eq!(s.read(pde) & (A | D), A);
    assert_eq!(access_with(&mut v, page, true, false, true), Seen::Ram(ram_pfn(0x20_5000)));
    assert_eq!(s.read(pde) & (A | D), A | D);
    assert_eq!(
        access_with(&mut v, page + 0x1000, false, true, true),
        Seen::Ram(ram_pfn(0x20_6000))
    );
}

/// PAE through the shadow MMU: rights AND over PDE and PTE; D on the leaf only; PDPTE
/// untouched.
#[test]
fn shadow_pae_walk() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let w = |gpa: u64, val: u64| host.write_u64(RAM_HVA + gpa, val);
    let pdpt = alloc_table(&next);
    let pd = alloc_table(&next);
    let pt = alloc_table(&next);
    // GVA 0x4000_3000: PDPT index 1, PD index 0, PT index 3.
    w(pdpt + 8, pd | P);
    w(pd, pt | P | US); // no W above the leaf
    w(pt + 24, 0x20_0000 | P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    // Load the PDPTEs as MOV CR3 does.
    let cpu = GuestCpu {
        mode: PagingMode::Pae { pdptrs: [0; 4] },
        cr3: pdpt,
        cr0_wp: true,
        efer_nx: true,
        maxphyaddr: 46,
        gbpages: false,
    };
    v.set_guest_cpu(cpu).unwrap();
    v.load_cr3(pdpt).unwrap();
    assert_eq!(access_with(&mut v, 0x4000_3000, true, false, true), Seen::GuestPf(0x7));
    assert_eq!(s_read(&host, pt + 24) & (A | D), 0, "a faulting walk writes nothing");
    assert_eq!(access_with(&mut v, 0x4000_3000, false, false, true), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(s_read(&host, pt + 24) & (A | D), A);
    assert_eq!(s_read(&host, pd) & (A | D), A);
    assert_eq!(s_read(&host, pdpt + 8), pd | P);
    // Supervisor write with CR0.WP=1: denied by the PDE.
    assert_eq!(access_with(&mut v, 0x4000_3000, true, false, false), Seen::GuestPf(0x3));
}

fn s_read(host: &TestHost, gpa: u64) -> u64 {
    vmmu::host::GuestMemory::read_u64(host, vmmu::Hva(RAM_HVA + gpa)).unwrap()
}

/// A recursive PML4 slot (as Windows uses): the walk reads one gPTE at every level; a read
/// sets its A, a write its D, and the page reached is the PML4 itself (a shadowed table: the
/// write is emulated, the read maps it).
#[test]
fn shadow_recursive_pml4_slot() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US | A | D);
    let slot = s.cr3 + 8 * 255;
    host.write_u64(RAM_HVA + slot, s.cr3 | P | RW | US);
    let gva = (255u64 << 39) | (255 << 30) | (255 << 21) | (255 << 12) | 0x10;
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access_with(&mut v, 0x4000_0000, false, false, true), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access_with(&mut v, gva, false, false, true), Seen::Ram(ram_pfn(s.cr3)));
    assert_eq!(s_read(&host, slot) & (A | D), A);
    match access_with(&mut v, gva, true, false, true) {
        Seen::Mmio(gpa, _) => assert_eq!(gpa.0, s.cr3 + 0x10),
        o => panic!("{o:?}"),
    }
    assert_eq!(s_read(&host, slot) & (A | D), A | D);
}

/// A 1 GiB guest page (CPUID has them) through the shadow MMU: read, then write sets D on the
/// PDPTE; bits 29:13 of it are reserved.
#[test]
fn shadow_1g_guest_page() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x40_0000_0000, 0x20_0000, P | RW | US | A | D);
    let pdpte = s.entry_gpa(0x8000_0000, 3);
    host.write_u64(RAM_HVA + pdpte, P | RW | US | PS); // 1 GiB page at gpa 0
    let mut v = vcpu_in(&vm, GuestCpu { gbpages: true, ..long4(s.cr3) });
    assert_eq!(access_with(&mut v, 0x8030_0000, false, false, true), Seen::Ram(ram_pfn(0x30_0000)));
    assert_eq!(s_read(&host, pdpte) & (A | D), A);
    assert_eq!(access_with(&mut v, 0x8030_0000, true, false, true), Seen::Ram(ram_pfn(0x30_0000)));
    assert_eq!(s_read(&host, pdpte) & (A | D), A | D);
    host.write_u64(RAM_HVA + pdpte, P | RW | US | PS | (1 << 13));
    let mut v = vcpu_in(&vm, GuestCpu { gbpages: true, ..long4(s.cr3) });
    assert_eq!(access_with(&mut v, 0x8030_1000, false, false, true), Seen::GuestPf(0xd));
}
