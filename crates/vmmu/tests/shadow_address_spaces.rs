//! Two address spaces (SMM) over the same guest page tables: write tracking is by gfn across
//! address spaces (KVM's `for_each_gfn_valid_sp_with_gptes` ignores `role.smm`), so a guest
//! table that one space shadows traps writes made through the other's mappings, and a trapped
//! write reaches both spaces' shadows.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use vmmu::fault::EmulateSource;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::{AsId, Gpa, Gva};

/// Two address spaces whose slots alias the same RAM (as QEMU sets up SMM): vCPU A in AS0 and
/// vCPU B in AS1 (SMM) run on the same guest page tables. A rewrites a PTE (the write is
/// trapped and emulated: the table is shadowed), both INVLPG: B must see the new page.
#[test]
fn a_trapped_table_write_reaches_the_other_address_spaces_shadow() {
    let (vm, host, next) = shadow_vm_with(|c| c.nr_address_spaces = 2);
    vm.set_memory_region(&UserspaceMemoryRegion::new(1 << 16, 0, 0, RAM_SIZE, RAM_HVA)).unwrap();
    let s = Space::new(&host, &next);
    const X: u64 = 0x4000_0000;
    let pte = s.map4k(X, 0x20_0000, P | RW | US);
    // The guest maps its last-level table so it can edit it.
    s.map4k(0x5000_0000, pte & !0xfff, P | RW | US);
    let mut a = vcpu_in(&vm, long4(s.cr3));
    let mut b = vcpu_in(&vm, long4(s.cr3));
    b.set_as_id(AsId(1)).unwrap();
    assert_eq!(access(&mut a, X, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut b, X, false), Seen::Ram(ram_pfn(0x20_0000)));
    // A writes the PTE through its mapping of the table: trapped, emulated, reported.
    let at = 0x5000_0000 + (pte & 0xfff);
    assert_eq!(access(&mut a, at, true), Seen::Mmio(Gpa(pte), EmulateSource::WriteProtected));
    host.write_u64(RAM_HVA + pte, 0x30_0000 | P | RW | US);
    a.track_write(Gpa(pte), 8).unwrap();
    a.invlpg(Gva(X)).unwrap();
    b.invlpg(Gva(X)).unwrap();
    assert_eq!(access(&mut a, X, false), Seen::Ram(ram_pfn(0x30_0000)));
    assert_eq!(access(&mut b, X, false), Seen::Ram(ram_pfn(0x30_0000)), "B (AS1) after INVLPG");
}

/// B (AS1) shadows a last-level table T; A (AS0), on other tables, maps T as data and writes
/// it: the write is trapped (KVM would make B's page unsync and resync it at B's INVLPG; with
/// every shadowed table write-protected, the trap is how B's shadow learns of it). After B's
/// INVLPG, B translates through what T holds now.
#[test]
fn a_table_one_space_shadows_is_write_protected_in_the_other() {
    let (vm, host, next) = shadow_vm_with(|c| c.nr_address_spaces = 2);
    vm.set_memory_region(&UserspaceMemoryRegion::new(1 << 16, 0, 0, RAM_SIZE, RAM_HVA)).unwrap();
    let sb = Space::new(&host, &next);
    let sa = Space::new(&host, &next);
    const X: u64 = 0x4000_0000;
    let pte = sb.map4k(X, 0x20_0000, P | RW | US);
    let t = pte & !0xfff;
    sa.map4k(0x6000_0000, t, P | RW | US);
    let mut b = vcpu_in(&vm, long4(sb.cr3));
    b.set_as_id(AsId(1)).unwrap();
    let mut a = vcpu_in(&vm, long4(sa.cr3));
    assert_eq!(access(&mut b, X, false), Seen::Ram(ram_pfn(0x20_0000)));
    // A writes T's entry for X through its data mapping of T: trapped (T is shadowed, by the
    // other address space), emulated, reported.
    let at = 0x6000_0000 + (pte & 0xfff);
    assert_eq!(access(&mut a, at, true), Seen::Mmio(Gpa(pte), EmulateSource::WriteProtected));
    host.write_u64(RAM_HVA + pte, 0x30_0000 | P | RW | US);
    a.track_write(Gpa(pte), 8).unwrap();
    b.invlpg(Gva(X)).unwrap();
    assert_eq!(access(&mut b, X, false), Seen::Ram(ram_pfn(0x30_0000)), "B (AS1) after INVLPG");
}
