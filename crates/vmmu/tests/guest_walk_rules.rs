//! The guest walker's hardest rules and their use by the shadow MMU, each checked against the
//! SDM (vol. 3 ch. 4) and KVM's `paging_tmpl.h` by an audit on 2026-12-04: error codes where a
//! reserved bit or a not-present entry lies below a level that denies the access, PAE's
//! PDPTE and large-page rules, CR0.WP=0 supervisor writes, role access on paths with different
//! upper-level rights, and NX without EFER.NX.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::cell::RefCell;
use std::collections::HashMap;
use vmmu::bugs::BugSet;
use vmmu::guest::{
    load_pdptrs, walk, GpteWriteError, GuestCpu, GuestPteMemory, PagingMode, WalkError,
};
use vmmu::{FaultAccess, Gpa, Gva, Level};

const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const NX: u64 = 1 << 63;

#[derive(Default)]
struct Mem(RefCell<HashMap<u64, u64>>);
impl Mem {
    fn w(&self, gpa: u64, v: u64) {
        self.0.borrow_mut().insert(gpa, v);
    }
    fn r(&self, gpa: u64) -> u64 {
        self.0.borrow().get(&gpa).copied().unwrap_or(0)
    }
}
impl GuestPteMemory for Mem {
    fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
        // Frames 1..=0x3f are backed.
        (gpa.0 >> 12 < 0x40).then(|| self.r(gpa.0))
    }
    fn cmpxchg_gpte(&self, gpa: Gpa, old: u64, new: u64) -> Result<bool, GpteWriteError> {
        if self.r(gpa.0) != old {
            return Ok(false);
        }
        self.w(gpa.0, new);
        Ok(true)
    }
}

fn pf(r: Result<vmmu::guest::GuestWalk, WalkError>) -> u64 {
    match r {
        Err(WalkError::PageFault(f)) => f.error_code.0,
        o => panic!("expected #PF, got {o:?}"),
    }
}

/// PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; GVA index 0 at every level.
fn four(flags: [u64; 4]) -> Mem {
    let m = Mem::default();
    m.w(0x1000, 0x2000 | flags[3]);
    m.w(0x2000, 0x3000 | flags[2]);
    m.w(0x3000, 0x4000 | flags[1]);
    m.w(0x4000, 0x10_0000 | flags[0]);
    m
}

const UR: FaultAccess = FaultAccess { write: false, exec: false, user: true };
const UW: FaultAccess = FaultAccess { write: true, exec: false, user: true };
const SX: FaultAccess = FaultAccess { write: false, exec: true, user: false };

/// Reserved bit below a level that denies the access: RSVD|P (+W/U), nothing written; a
/// not-present entry below it: 0 (+W/U).
#[test]
fn reserved_or_not_present_below_a_permission_violation() {
    let cpu = GuestCpu::long4(0x1000, 40);
    let m = four([P | RW | US | (1 << 45), P | RW | US, P | RW | US, P | RW]); // PML4E: no U
    assert_eq!(pf(walk(&cpu, &m, Gva(0x123), UW)), 0b1111);
    assert_eq!(m.r(0x1000) & A, 0, "no A on a faulting walk");
    let m = four([0, P | RW | US, P | RW | US, P | RW]);
    assert_eq!(pf(walk(&cpu, &m, Gva(0x123), UW)), 0b0110);
    let m = four([P | RW | US, P | RW | US, P | RW | US, P | RW]);
    assert_eq!(pf(walk(&cpu, &m, Gva(0x123), UW)), 0b0111);
    assert!(
        [0x1000, 0x2000, 0x3000, 0x4000].iter().all(|&g| m.r(g) & (A | D) == 0),
        "permission fault: no A/D anywhere"
    );
    // FETCH rides on an RSVD fault with EFER.NX.
    let m = four([P | RW | US | (1 << 45), P | RW | US, P | RW | US, P | RW | US]);
    assert_eq!(pf(walk(&cpu, &m, Gva(0x123), SX)), 0b11001);
}

/// PAE: the PDPTE grants every right and gets no A; a write to a 2 MiB page sets A|D on the
/// PDE; NX in a PDE is reserved without EFER.NX; bits 62:52 are reserved (not ignored).
#[test]
fn pae_rules() {
    let m = Mem::default();
    m.w(0x1000, 0x3000 | P);
    m.w(0x3000, 0x20_0000 | P | RW | US | PS | (1 << 12));
    let pdptrs = load_pdptrs(&m, 0x1000, 36).unwrap();
    let cpu = GuestCpu {
        mode: PagingMode::Pae { pdptrs },
        cr3: 0x1000,
        cr0_wp: true,
        efer_nx: true,
        maxphyaddr: 36,
        gbpages: true,
    };
    let w = walk(&cpu, &m, Gva(0x1_2345), UW).unwrap();
    assert_eq!((w.gpa, w.level), (Gpa(0x21_2345), Level::L2M), "PAT bit 12 is not address");
    assert_eq!(m.r(0x3000) & (A | D), A | D);
    assert_eq!(m.r(0x1000), 0x3000 | P);
    m.w(0x3000, 0x20_0000 | P | RW | US | PS | (1 << 55));
    assert_eq!(pf(walk(&cpu, &m, Gva(0x1_2345), UR)), 0b1101);
    m.w(0x3000, 0x20_0000 | P | RW | US | PS | NX);
    let no_nx = GuestCpu { efer_nx: false, ..cpu };
    assert_eq!(pf(walk(&no_nx, &m, Gva(0x1_2345), UR)), 0b1101);
    assert_eq!(pf(walk(&cpu, &m, Gva(0x1_2345), FaultAccess { user: true, ..SX })), 0b10101);
    for bit in [1u32, 2, 5, 6, 7, 8, 36, 63] {
        m.w(0x1000, 0x3000 | P | (1 << bit));
        assert!(load_pdptrs(&m, 0x1000, 36).is_err(), "PDPTE bit {bit}");
    }
}

/// Shadow MMU, CR0.WP=0: a supervisor write to a read-only user page succeeds and dirties the
/// gPTE; the user then reads it but may not write it; a supervisor write works again.
#[test]
fn shadow_cr0_wp0_supervisor_write_then_user_accesses() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let at = s.map4k(0x4000_0000, 0x20_0000, P | US);
    let mut v = vcpu_in(&vm, GuestCpu { cr0_wp: false, ..long4(s.cr3) });
    assert_eq!(access_at(&mut v, 0x4000_0000, true, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(s.read(at) & (A | D), A | D);
    assert_eq!(access_at(&mut v, 0x4000_0000, false, true), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access_at(&mut v, 0x4000_0000, true, true), Seen::GuestPf(0x7));
    assert_eq!(access_at(&mut v, 0x4000_0000, true, false), Seen::Ram(ram_pfn(0x20_0000)));
}

/// Shadow MMU: two PML4Es link one PDPT, one without U. The shadow pages below them must not be
/// shared (role.access is what every level above grants): a user read through the supervisor
/// PML4E faults with P|U even after the other path was shadowed, and vice versa for W.
#[test]
fn shadow_role_access_separates_paths_with_different_upper_rights() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US | A | D);
    let pdpt = s.read(s.cr3) & 0x000f_ffff_ffff_f000;
    let write = |gpa: u64, v: u64| host.write_u64(RAM_HVA + gpa, v);
    write(s.cr3 + 8, pdpt | P | RW); // GVA + 512 GiB: supervisor
    write(s.cr3 + 16, pdpt | P | US); // GVA + 1 TiB: read-only
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let base = 0x4000_0000u64;
    assert_eq!(access(&mut v, base, true), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, base + (1 << 39), false), Seen::GuestPf(0x5));
    assert_eq!(access_at(&mut v, base + (1 << 39), true, false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, base + (1 << 39), false), Seen::GuestPf(0x5));
    assert_eq!(access(&mut v, base + (2 << 39), false), Seen::Ram(ram_pfn(0x20_0000)));
    assert_eq!(access(&mut v, base + (2 << 39), true), Seen::GuestPf(0x7));
    assert_eq!(access(&mut v, base, true), Seen::Ram(ram_pfn(0x20_0000)));
}

/// Shadow MMU, EFER.NX=0: bit 63 in a leaf is a reserved-bit #PF (RSVD|P|U), not NX.
#[test]
fn shadow_nx_bit_without_efer_nx_is_reserved() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(0x4000_0000, 0x20_0000, P | RW | US | NX);
    let mut v = vcpu_in(&vm, GuestCpu { efer_nx: false, ..long4(s.cr3) });
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::GuestPf(0xd));
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, 0x4000_0000, false), Seen::Ram(ram_pfn(0x20_0000)));
}
