//! The shadow MMU against a model, the guest's own tables read by the crate's guest walker,
//! over random operations (wider than `shadow_props.rs`): 4-level and PAE paging (PDPTEs from the last CR3 load, CR3 offsets and
//! PWT/PCD), gPTE stores at every level (any entry may point at any of a pool of tables, so
//! tables are shared across levels, spaces and as PAE PDPTs), RW/US/NX/PS/reserved bits at every
//! level, 1-, 4- and 8-byte stores, CR0.WP and paging-mode switches, guest MAXPHYADDR 36/46/52,
//! 1 GiB pages on or off, user and supervisor reads, writes and fetches, a RAM/read-only/absent
//! slot under some targets, zap-all, shrinker and page-limit calls, and VM configurations
//! (slot_zap_all, mmio_caching, shadow_mmio_path_only). Every guest store is reported
//! (`track_write`) and followed by INVLPG of every GVA, of one GVA, of none, or a guest TLB
//! flush; a GVA not invalidated since a store may keep its old translation (a TLB) and is not
//! compared until INVLPG, a CR3 load or a mode switch. EFER.NX is fixed per run: the role
//! forces efer_nx (shadow facts 1.2), so a guest that clears it keeps its shadow pages, as in
//! KVM (the last test).
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use proptest::prelude::*;
use vmmu::bugs::BugSet;
use vmmu::fault::EmulateSource;
use vmmu::guest::{load_pdptrs, GpteWriteError, GuestCpu, GuestPteMemory, PagingMode, WalkError};
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::{FaultAccess, Gpa, Gva, Hva};

const NT: usize = 8;
const POOL: u64 = 0x10_0000;
fn table(i: usize) -> u64 {
    POOL + 0x1000 * i as u64
}
const NX: u64 = 1 << 63;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const RSV: u64 = 1 << 51;

/// GVA index tuples (pml4, pdpt, pd, pt), each 1 or 2, offset 8.
fn gva(i: usize, pae: bool) -> u64 {
    let b = |k: usize| 1 + ((i >> k) & 1) as u64;
    let top = if pae { 0 } else { b(3) << 39 };
    top | (b(2) << 30) | (b(1) << 21) | (b(0) << 12) | 8
}
const NG: usize = 16;

/// Frames a gPTE may name besides the pool tables.
const FRAMES: [u64; 6] = [0x20_0000, 0x20_1000, 0x40_0000, 0x0, 0x1_0000_0000, 0x1_0020_0000];

#[derive(Clone, Debug)]
enum Op {
    Store { t: usize, idx: u64, val: Val, how: u8, inv: usize },
    Cr3 { vcpu: usize, space: usize, off: u64 },
    Mode { vcpu: usize, pae: bool, wp: bool },
    Access { vcpu: usize, g: usize, kind: u8, user: bool },
    ZapAll,
    Shrink(usize),
    Invlpg { vcpu: usize, g: usize },
    Slot(u8),
    Limit(usize),
}

#[derive(Clone, Debug)]
struct Val {
    target: usize, // < NT: a pool table, else FRAMES[target - NT]; NT+6: zero
    flags: u64,
}

fn val() -> impl Strategy<Value = Val> {
    (0..NT + 7, any::<u8>(), 0u8..16).prop_map(|(target, f, extra)| {
        let mut flags = 1u64; // P
        if f & 1 != 0 {
            flags |= 2;
        }
        if f & 2 != 0 {
            flags |= 4;
        }
        if f & 4 != 0 {
            flags |= A;
        }
        if f & 8 != 0 {
            flags |= D;
        }
        if f & 16 != 0 && f & 32 != 0 {
            flags |= NX;
        }
        if f & 64 != 0 && f & 128 != 0 {
            flags |= 1 << 7; // PS
        }
        match extra {
            0 => flags &= !1,
            1 => flags |= RSV,
            2 => flags |= 1 << 13,
            _ => {}
        }
        // Mostly all rights so that paths exist.
        if extra >= 5 {
            flags |= 2 | 4 | A;
            flags &= !NX;
        }
        Val { target, flags }
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..NT, 1u64..3, val(), 0u8..6, 0..NG + 6).prop_map(|(t, idx, val, how, inv)| Op::Store { t, idx, val, how, inv }),
        2 => (0..2usize, 0..NG).prop_map(|(vcpu, g)| Op::Invlpg { vcpu, g }),
        2 => (0..2usize, 0..5usize, prop_oneof![Just(0u64), Just(0x18u64), Just(0x20u64), Just(0x38u64)]).prop_map(|(vcpu, space, off)| Op::Cr3 { vcpu, space, off }),
        2 => (0..2usize, any::<bool>(), any::<bool>())
            .prop_map(|(vcpu, pae, wp)| Op::Mode { vcpu, pae, wp }),
        10 => (0..2usize, 0..NG, 0u8..3, any::<bool>())
            .prop_map(|(vcpu, g, kind, user)| Op::Access { vcpu, g, kind, user }),
        1 => Just(Op::ZapAll),
        2 => (0u8..4).prop_map(Op::Slot),
        1 => prop_oneof![Just(64usize), Just(4096usize)].prop_map(Op::Limit),
        1 => (1..10usize).prop_map(Op::Shrink),
    ]
}

struct Reference<'a> {
    host: &'a TestHost,
}

impl GuestPteMemory for Reference<'_> {
    fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
        if gpa.raw() >= RAM_SIZE {
            return None;
        }
        vmmu::host::GuestMemory::read_u64(self.host, Hva(RAM_HVA + gpa.raw())).ok()
    }
    fn cmpxchg_gpte(&self, _: Gpa, _: u64, _: u64) -> Result<bool, GpteWriteError> {
        Err(GpteWriteError::NotWritable)
    }
}

const TOGGLE: u64 = 0x1_0000_0000;
const TOGGLE_BACK: u64 = 0x300_0000;

fn expected(host: &TestHost, cpu: &GuestCpu, gva: u64, fa: FaultAccess, slot: u8) -> Option<Seen> {
    match vmmu::guest::walk(cpu, &Reference { host }, Gva(gva), fa) {
        Ok(w) => {
            let gpa = w.gpa.raw();
            if gpa < RAM_SIZE {
                Some(Seen::Ram(ram_pfn(gpa & !0xfff)))
            } else if slot != 0 && (TOGGLE..TOGGLE + 0x20_0000).contains(&gpa) {
                if slot == 2 && fa.write {
                    Some(Seen::Mmio(Gpa(gpa), EmulateSource::SlowPathMmio))
                } else {
                    Some(Seen::Ram(ram_pfn((gpa - TOGGLE + TOGGLE_BACK) & !0xfff)))
                }
            } else {
                Some(Seen::Mmio(Gpa(gpa), EmulateSource::SlowPathMmio))
            }
        }
        Err(WalkError::PageFault(pf)) => Some(Seen::GuestPf(pf.error_code.0)),
        Err(WalkError::NonCanonical(_)) => None,
        Err(e) => panic!("{e}"),
    }
}

fn read(host: &TestHost, gpa: u64) -> u64 {
    vmmu::host::GuestMemory::read_u64(host, Hva(RAM_HVA + gpa)).unwrap()
}

fn cpu_for(
    host: &TestHost,
    pae: bool,
    cr3: u64,
    nx: bool,
    wp: bool,
    base: GuestCpu,
) -> Option<GuestCpu> {
    let mode = if pae {
        PagingMode::Pae { pdptrs: load_pdptrs(&Reference { host }, cr3, base.maxphyaddr).ok()? }
    } else {
        PagingMode::Long4
    };
    Some(GuestCpu { mode, cr0_wp: wp, efer_nx: nx, cr3, ..base })
}

fn run(ops: &[Op], run_nx: bool, cfgbits: u8, gb: bool, mpa: u8) -> Result<(), TestCaseError> {
    let base = GuestCpu { efer_nx: run_nx, gbpages: gb, ..GuestCpu::long4(table(0), mpa) };
    let (vm, host, _next) = shadow_vm_with(|cfg| {
        cfg.bugs = BugSet::NONE;
        cfg.slot_zap_all = cfgbits & 1 != 0;
        cfg.mmio_caching = cfgbits & 2 != 0;
        cfg.shadow_mmio_path_only = cfgbits & 4 != 0;
    });
    // Initial tree: roots 0 and 1 -> 2, 3 -> 4, 5 -> 6, 7 -> frames (entries 1 and 2 each).
    let all = 1 | 2 | 4 | A | D;
    for r in [0usize, 1] {
        host.write_u64(RAM_HVA + table(r) + 8, table(2) | 1);
        host.write_u64(RAM_HVA + table(r) + 16, table(3) | if r == 0 { all } else { 1 });
    }
    for (t, kids) in [(2usize, [4usize, 5]), (3, [5, 4]), (4, [6, 7]), (5, [7, 6])] {
        host.write_u64(RAM_HVA + table(t) + 8, table(kids[0]) | all);
        host.write_u64(RAM_HVA + table(t) + 16, table(kids[1]) | all);
    }
    host.write_u64(RAM_HVA + table(6) + 8, FRAMES[0] | all);
    host.write_u64(RAM_HVA + table(6) + 16, FRAMES[4] | all);
    host.write_u64(RAM_HVA + table(7) + 8, FRAMES[1] | 1 | 4 | A);
    host.write_u64(RAM_HVA + table(7) + 16, FRAMES[5] | 1 | 2 | A);
    let mut vcpus: Vec<Vcpu<TestHost>> = (0..2)
        .map(|_| {
            let mut v = vm.create_vcpu().unwrap();
            v.set_guest_cpu(base).unwrap();
            v
        })
        .collect();
    let mut log = Vec::new();
    let mut stale = [0u32; 2];
    let mut slot = 0u8;
    for (i, op) in ops.iter().enumerate() {
        log.push(format!("{i}: {op:?}"));
        match op.clone() {
            Op::Store { t, idx, val, how, inv } => {
                let gpa = table(t) + 8 * idx;
                let frame = if val.target < NT {
                    table(val.target)
                } else if val.target < NT + 6 {
                    FRAMES[val.target - NT]
                } else {
                    0
                };
                let v = if val.target == NT + 6 { 0 } else { frame | val.flags };
                let old = read(&host, gpa);
                match how {
                    // Low byte only.
                    0 => {
                        let new = (old & !0xff) | (v & 0xff);
                        host.write_u64(RAM_HVA + gpa, new);
                        vcpus[0].track_write(Gpa(gpa), 1).unwrap();
                    }
                    // High half only.
                    1 => {
                        let new = (old & 0xffff_ffff) | (v & !0xffff_ffff);
                        host.write_u64(RAM_HVA + gpa, new);
                        vcpus[0].track_write(Gpa(gpa + 4), 4).unwrap();
                    }
                    // Low half only.
                    2 => {
                        let new = (old & !0xffff_ffff) | (v & 0xffff_ffff);
                        host.write_u64(RAM_HVA + gpa, new);
                        vcpus[0].track_write(Gpa(gpa), 4).unwrap();
                    }
                    _ => {
                        host.write_u64(RAM_HVA + gpa, v);
                        vcpus[0].track_write(Gpa(gpa), 8).unwrap();
                    }
                }
                if inv == NG + 1 {
                    for v in vcpus.iter_mut() {
                        v.flush_guest_tlb().unwrap();
                    }
                    stale = [0; 2];
                } else if inv < NG {
                    // One GVA only: the others may keep their old translation (a TLB).
                    for (k, v) in vcpus.iter_mut().enumerate() {
                        v.invlpg(Gva(gva(inv, false))).unwrap();
                        v.invlpg(Gva(gva(inv, true))).unwrap();
                        stale[k] |= !(1u32 << inv);
                        stale[k] &= !(1u32 << inv);
                    }
                } else if inv == NG + 2 {
                    for s in stale.iter_mut() {
                        *s = !0;
                    }
                } else {
                    for v in vcpus.iter_mut() {
                        for g in 0..NG {
                            v.invlpg(Gva(gva(g, false))).unwrap();
                            v.invlpg(Gva(gva(g, true))).unwrap();
                        }
                    }
                    stale = [0; 2];
                }
            }
            Op::Invlpg { vcpu, g } => {
                vcpus[vcpu].invlpg(Gva(gva(g, false))).unwrap();
                vcpus[vcpu].invlpg(Gva(gva(g, true))).unwrap();
                stale[vcpu] &= !(1 << g);
            }
            Op::Cr3 { vcpu, space, off } => {
                if vcpus[vcpu].load_cr3(table(space) + off).is_ok() {
                    stale[vcpu] = 0;
                }
            }
            Op::Mode { vcpu, pae, wp } => {
                // EFER.NX is fixed per run: the role forces efer_nx, so KVM shares pages across
                // it (shadow facts 1.2) and so does this MMU.
                let nx = run_nx;
                let cr3 = vcpus[vcpu].guest_cpu().unwrap().cr3;
                if let Some(cpu) = cpu_for(&host, pae, cr3, nx, wp, base) {
                    vcpus[vcpu].set_guest_cpu(cpu).unwrap();
                    stale[vcpu] = 0;
                }
            }
            Op::Access { vcpu, g, kind, user } => {
                let cpu = *vcpus[vcpu].guest_cpu().unwrap();
                let pae = matches!(cpu.mode, PagingMode::Pae { .. });
                let a = gva(g, pae);
                let (write, exec) = (kind == 1, kind == 2);
                let fa = FaultAccess { write, exec, user };
                let Some(want) = expected(&host, &cpu, a, fa, slot) else { continue };
                let seen = access_with(&mut vcpus[vcpu], a, write, exec, user);
                if stale[vcpu] & (1 << g) != 0 {
                    continue;
                }
                let same = match (want, seen) {
                    (Seen::Mmio(x, _), Seen::Mmio(y, _)) => x == y,
                    // A write to a frame that is a shadowed guest table is emulated.
                    (Seen::Ram(p), Seen::Mmio(y, EmulateSource::WriteProtected)) => {
                        write && ram_pfn(y.raw() & !0xfff) == p
                    }
                    (x, y) => x == y,
                };
                prop_assert!(
                    same,
                    "op {i}: vCPU {vcpu} gva {a:#x} {fa:?} cpu {cpu:?}: want {want:?}, seen {seen:?}\n{}",
                    log.join("\n")
                );
            }
            Op::ZapAll => vm.zap_all_fast(),
            Op::Limit(n) => vm.set_nr_mmu_pages(n).unwrap(),
            Op::Slot(k) => {
                let k = k % 3;
                use vmmu::memslot::UserspaceMemoryRegion as R;
                if slot != 0 {
                    vm.set_memory_region(&R::new(7, 0, TOGGLE, 0, 0)).unwrap();
                }
                if k != 0 {
                    let flags = if k == 2 { 2 } else { 0 };
                    vm.set_memory_region(&R::new(
                        7,
                        flags,
                        TOGGLE,
                        0x20_0000,
                        RAM_HVA + TOGGLE_BACK,
                    ))
                    .unwrap();
                }
                slot = k;
            }
            Op::Shrink(n) => {
                vm.shrink_shadow_pages(n);
            }
        }
    }
    prop_assert_eq!(host.use_after_free(), 0);
    Ok(())
}

proptest! {
    // 60,000 cases passed when it was written; `PROPTEST_CASES` runs more.
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
    #[test]
    fn every_access_sees_what_the_guest_tables_say(ops in proptest::collection::vec(op(), 1..120), nx in any::<bool>(), cfgbits in 0u8..8, gb in any::<bool>(), mpa in prop_oneof![Just(36u8), Just(46u8), Just(52u8)]) {
        run(&ops, nx, cfgbits, gb, mpa)?;
    }
}

/// KVM-faithful, and unlike the architecture: shadow facts §1.2, `efer_nx` is forced to 1 in the
/// role of the non-nested shadow MMU, so pages built while the guest ran with EFER.NX=1 serve it
/// after it clears EFER.NX. A PML4E with bit 63 set then keeps translating through the old
/// shadow, where the architecture (and this crate's own walker) says reserved-bit #PF. KVM's
/// `kvm_init_shadow_mmu` sets `root_role.efer_nx = true`, and `kvm_mmu_reset_context` only
/// unloads the roots, so KVM finds the same pages again. Held here so that a change to either
/// side is a decision (the model test above keeps EFER.NX fixed per run for this reason).
#[test]
fn a_guest_that_clears_efer_nx_keeps_its_shadow_pages_as_in_kvm() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let gva = 0x4000_0000u64;
    s.map4k(gva, 0x80_0000, P | RW | US);
    let pml4e = s.cr3 + 8 * ((gva >> 39) & 511);
    host.write_u64(RAM_HVA + pml4e, read(&host, pml4e) | NX);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, gva, false), Seen::Ram(ram_pfn(0x80_0000)));
    let no_nx = GuestCpu { efer_nx: false, ..long4(s.cr3) };
    v.set_guest_cpu(no_nx).unwrap();
    v.load_cr3(s.cr3).unwrap();
    let read_fa = FaultAccess { write: false, exec: false, user: true };
    let want = expected(&host, &no_nx, gva, read_fa, 0);
    assert_eq!(want, Some(Seen::GuestPf(0xd)), "the walker: RSVD|P|U");
    assert_eq!(access(&mut v, gva, false), Seen::Ram(ram_pfn(0x80_0000)), "the old shadow");
    // A shadow built from scratch under EFER.NX=0 follows the architecture.
    vm.zap_all_fast();
    assert_eq!(access(&mut v, gva, false), Seen::GuestPf(0xd));
}
