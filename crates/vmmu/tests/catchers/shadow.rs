//! Catchers of the shadow MMU's re-injectable bugs: each shows a wrong translation or a stale MMIO
//! decision that a guest access uses (see `super` for the contract).

use super::Harm;
use crate::common::shadow::*;
use std::sync::Arc;
use vmmu::bugs::BugSet;
use vmmu::fault::EmulateSource;
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
