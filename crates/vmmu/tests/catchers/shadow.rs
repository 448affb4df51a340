//! Catchers of the shadow MMU's re-injectable bugs: each shows a wrong translation or a stale MMIO
//! decision that a guest access uses (see `super` for the contract).

use super::Harm;
use crate::common::shadow::*;
use std::sync::Arc;
use vmmu::bugs::BugSet;
use vmmu::fault::{EmulateSource, PfErr};
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::{Gpa, Gva};

/// A guest store of `value` to `gva`, which maps the guest-physical `gpa`: the guest does it
/// itself if the MMU lets the store through, or the hypervisor emulates it after a
/// write-protection exit and reports it to the MMU.
fn guest_store(v: &mut Vcpu<TestHost>, host: &Arc<TestHost>, gva: u64, gpa: u64, value: u64) {
    match access(v, gva, true) {
        Seen::Ram(_) => host.write_u64(RAM_HVA + gpa, value),
        Seen::Mmio(g, EmulateSource::WriteProtected) if g == Gpa(gpa) => {
            host.write_u64(RAM_HVA + gpa, value);
            v.track_write(Gpa(gpa), 8).unwrap();
        }
        other => panic!("setup: store to {gva:#x} saw {other:?}"),
    }
}

/// Space A maps GVA X to device page 1, space B maps it to device page 2. The vCPU reads X in A,
/// switches to B and reads X there (its MMIO cache now holds X -> page 2), then switches back
/// to A and reads X again: A's MMIO SPTE for page 1 makes the access exit with RSVD.
///
/// Harm: the exit is answered from the cache entry made in space B: MMIO at device page 2.
pub fn catch_gva_cache_survives_root_switch(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x4000_0010;
    let (vm, host, next) = shadow_vm(bugs);
    let a = Space::new(&host, &next);
    let b = Space::new(&host, &next);
    a.map4k(X & !0xfff, MMIO_GPA, P | RW | US);
    b.map4k(X & !0xfff, MMIO_GPA + 0x1000, P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(long4(a.cr3)).unwrap();
    let page1 = Gpa(MMIO_GPA + 0x10);
    assert!(matches!(access(&mut v, X, false), Seen::Mmio(g, _) if g == page1), "setup");
    v.load_cr3(b.cr3).unwrap();
    assert!(matches!(access(&mut v, X, false), Seen::Mmio(g, _) if g == Gpa(MMIO_GPA + 0x1010)));
    v.load_cr3(a.cr3).unwrap();
    let seen = access(&mut v, X, false);
    (!matches!(seen, Seen::Mmio(g, _) if g == page1)).then(|| Harm {
        gpa: page1.raw(),
        expected: format!("MMIO at {page1:?}: space A maps GVA {X:#x} there"),
        seen: format!("{seen:?}, from the entry space B left in the MMIO cache"),
    })
}

/// Space A maps GVA X to a device page; space B maps A's last-level table at GVA T. The vCPU
/// reads X in A (an MMIO SPTE under A's root), switches to B (A's root stays as a previous
/// root), rewrites A's entry for X through T so that X maps RAM, and switches back to A. A CR3
/// switch flushes the TLB and needs no INVLPG.
///
/// Harm: the read of X in A still exits as MMIO: the shadow under A's reused root kept the SPTE
/// of the old guest entry (the table write was not trapped, or not acted on).
pub fn catch_stale_shadow_after_table_write(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x4000_0000;
    const T: u64 = 0x5000_0000;
    const RAM_GPA: u64 = 0x20_0000;
    let (vm, host, next) = shadow_vm(bugs);
    let a = Space::new(&host, &next);
    let b = Space::new(&host, &next);
    let pte = a.map4k(X, MMIO_GPA, P | RW | US);
    b.map4k(T, pte & !0xfff, P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(long4(a.cr3)).unwrap();
    assert!(matches!(access(&mut v, X, false), Seen::Mmio(..)), "setup: X is MMIO");
    v.load_cr3(b.cr3).unwrap();
    guest_store(&mut v, &host, T + (pte & 0xfff), pte, RAM_GPA | P | RW | US);
    v.load_cr3(a.cr3).unwrap();
    let seen = access(&mut v, X, false);
    let want = Seen::Ram(ram_pfn(RAM_GPA));
    (seen != want).then(|| Harm {
        gpa: Gva(X).raw(),
        expected: format!("{want:?}: the guest remapped X to RAM before switching back"),
        seen: format!("{seen:?}: the shadow kept the old guest entry"),
    })
}

/// Two vCPUs in space A, where the 2 MiB at R is mapped by guest table T1: X1 -> device page 0,
/// X2 -> device page 1. vCPU 1 reads X1 and X2 (the slow path installs their MMIO SPTEs); vCPU 0
/// reads X1, an RSVD fault whose fast path walks the shadow and keeps T1's shadow page as its
/// last level-1 table. vCPU 1 then points R's page-directory entry at a new table T2 that maps
/// X2 to device page 5 (a write-protection exit, emulated and reported), invalidates X2 on both
/// vCPUs, and reads X2 (its slow path shadows T2). vCPU 0 reads X2: the hardware finds the MMIO
/// SPTE for page 5 and exits with RSVD.
///
/// Harm: vCPU 0's fast path answers from T1's shadow page, still alive but unlinked: MMIO at
/// device page 1, the device the guest unmapped.
pub fn catch_leaf_cache_ignores_epoch(bugs: BugSet) -> Option<Harm> {
    const R: u64 = 0x4000_0000;
    const X1: u64 = R + 0x1000;
    const X2: u64 = R + 0x2000;
    const T: u64 = 0x5000_0000;
    let (vm, host, next) = shadow_vm(bugs);
    let a = Space::new(&host, &next);
    a.map4k(X1, MMIO_GPA, P | RW | US);
    a.map4k(X2, MMIO_GPA + 0x1000, P | RW | US);
    let pde = a.entry_gpa(R, 2);
    a.map4k(T, pde & !0xfff, P | RW | US);
    // T2, written before the guest links it (as an OS fills a table before it points at it).
    let t2 = next.get();
    next.set(t2 + 0x1000);
    host.write_u64(RAM_HVA + t2 + ((X2 >> 12) & 511) * 8, (MMIO_GPA + 0x5000) | P | RW | US);

    let mut v0 = vcpu_in(&vm, long4(a.cr3));
    let mut v1 = vcpu_in(&vm, long4(a.cr3));
    for x in [X1, X2] {
        assert!(matches!(access(&mut v1, x, false), Seen::Mmio(..)), "setup: {x:#x} is MMIO");
    }
    let seen = access(&mut v0, X1, false);
    assert_eq!(seen, Seen::Mmio(Gpa(MMIO_GPA), EmulateSource::MmioSpteHit), "setup: fast path");

    guest_store(&mut v1, &host, T + (pde & 0xfff), pde, t2 | P | RW | US);
    v1.invlpg(Gva(X2)).unwrap();
    v0.invlpg(Gva(X2)).unwrap();
    let page5 = Gpa(MMIO_GPA + 0x5000);
    assert!(matches!(access(&mut v1, X2, false), Seen::Mmio(g, _) if g == page5), "setup: T2");
    let seen = access(&mut v0, X2, false);
    (!matches!(seen, Seen::Mmio(g, _) if g == page5)).then(|| Harm {
        gpa: page5.raw(),
        expected: format!("MMIO at {page5:?}: the guest's new table T2 maps GVA {X2:#x} there"),
        seen: format!("{seen:?}, from the unlinked shadow of the old table T1"),
    })
}

/// One guest last-level table T reached two ways in space A: GVA X through a writable PDPTE
/// (T maps X to RAM page 1 and X + 4 KiB to page 2, both writable), GVA Y through a second
/// PDPTE without R/W whose page directory points at the same T. The guest may read page 1 at Y
/// but not write it. The vCPU writes X (the shadow of T gets a writable leaf for page 1), reads
/// Y + 4 KiB (Y's path is shadowed down to a shadow page of T), then writes Y.
///
/// Harm: the write at Y goes to RAM page 1 without the guest #PF (P, W, U) its tables demand:
/// Y's path shares the shadow page of T that X's write left a writable leaf in.
pub fn catch_role_access_last_level(bugs: BugSet) -> Option<Harm> {
    const X: u64 = 0x4000_0000; // PML4 0, PDPT 1, PD 0, PT 0
    const Y: u64 = 0x8000_0000; // PML4 0, PDPT 2, PD 0, PT 0
    const PAGE1: u64 = 0x20_0000;
    const PAGE2: u64 = 0x20_1000;
    let (vm, host, next) = shadow_vm(bugs);
    let a = Space::new(&host, &next);
    let t = a.map4k(X, PAGE1, P | RW | US) & !0xfff;
    a.map4k(X + 0x1000, PAGE2, P | RW | US);
    let pd2 = next.get();
    next.set(pd2 + 0x1000);
    host.write_u64(RAM_HVA + pd2, t | P | RW | US);
    host.write_u64(RAM_HVA + a.entry_gpa(Y, 3), pd2 | P | US);

    let mut v = vcpu_in(&vm, long4(a.cr3));
    assert_eq!(access(&mut v, X, true), Seen::Ram(ram_pfn(PAGE1)), "setup: X is writable");
    assert_eq!(access(&mut v, Y + 0x1000, false), Seen::Ram(ram_pfn(PAGE2)), "setup: Y reads");
    let want = Seen::GuestPf(PfErr::PRESENT | PfErr::WRITE | PfErr::USER);
    let seen = access(&mut v, Y, true);
    (seen != want).then(|| Harm {
        gpa: PAGE1,
        expected: format!("{want:?}: the PDPTE above GVA {Y:#x} denies writes"),
        seen: format!("{seen:?}: a leaf built for {X:#x}, through a shadow page both share"),
    })
}
