//! Property test of the shadow MMU (issue 13 point 9): random sequences of guest page-table
//! edits (made as a guest makes them: stores reported with `track_write`, then INVLPG on every
//! vCPU), CR3 switches, memslot deletes and re-creates, fast zap-alls, shrinker calls and page
//! limit changes, CR0.WP toggles, with user and supervisor accesses by two vCPUs. Every access
//! must see what a plain walk of the
//! guest's tables over the current memslots says (RAM frame, MMIO at the translated GPA, or the
//! guest #PF with its error code), however the shadow pages were zapped, recycled or reused.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use proptest::prelude::*;
use std::sync::Arc;
use vmmu::bugs::BugSet;
use vmmu::guest::{GpteWriteError, GuestCpu, GuestPteMemory, WalkError};
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::{FaultAccess, Gpa, Gva, Hva};

/// Page-table spaces: more than a vCPU's current and previous roots (4), so some spaces' shadow
/// pages outlive every root that reached them, and only write tracking keeps them right.
const SPACES: usize = 6;
/// GVAs the ops pick from: two share a last-level table, one is in another 1 GiB region.
const GVAS: [u64; 4] = [0x4000_0000, 0x4000_1000, 0x4020_0000, 0x8000_0000];
/// The RAM slot that can be deleted and re-created.
const TOGGLE_GPA: u64 = 0x8000_0000;
const TOGGLE_SLOT: u32 = 5;
/// Targets: two pages of the fixed RAM slot, one of the toggled slot, one device page.
const TARGETS: [u64; 4] = [0x20_0000, 0x20_1000, TOGGLE_GPA, MMIO_GPA];

#[derive(Clone, Debug)]
enum GuestOp {
    Map {
        space: usize,
        gva: usize,
        target: usize,
        readonly: bool,
    },
    Unmap {
        space: usize,
        gva: usize,
    },
    Cr3 {
        vcpu: usize,
        space: usize,
    },
    Access {
        vcpu: usize,
        gva: usize,
        write: bool,
        user: bool,
    },
    /// The vCPU sets or clears CR0.WP (a role change: its roots go).
    Wp {
        vcpu: usize,
        wp: bool,
    },
    ToggleSlot,
    ZapAll,
    Shrink(usize),
    Limit(usize),
}

fn op() -> impl Strategy<Value = GuestOp> {
    prop_oneof![
        3 => (0..SPACES, 0..4usize, 0..4usize, any::<bool>())
            .prop_map(|(space, gva, target, readonly)| GuestOp::Map { space, gva, target, readonly }),
        1 => (0..SPACES, 0..4usize).prop_map(|(space, gva)| GuestOp::Unmap { space, gva }),
        2 => (0..2usize, 0..SPACES).prop_map(|(vcpu, space)| GuestOp::Cr3 { vcpu, space }),
        6 => (0..2usize, 0..4usize, any::<bool>(), any::<bool>())
            .prop_map(|(vcpu, gva, write, user)| GuestOp::Access { vcpu, gva, write, user }),
        2 => (0..2usize, any::<bool>()).prop_map(|(vcpu, wp)| GuestOp::Wp { vcpu, wp }),
        1 => Just(GuestOp::ToggleSlot),
        1 => Just(GuestOp::ZapAll),
        1 => (1..20usize).prop_map(GuestOp::Shrink),
        1 => prop_oneof![Just(64usize), Just(4096usize)].prop_map(GuestOp::Limit),
    ]
}

/// The guest's tables as the reference reads them: straight from host memory, A/D updates
/// dropped (the reference must not change what the MMU under test sees).
struct Reference<'a> {
    host: &'a TestHost,
}

impl GuestPteMemory for Reference<'_> {
    fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
        vmmu::host::GuestMemory::read_u64(self.host, Hva(RAM_HVA + gpa.raw())).ok()
    }
    fn cmpxchg_gpte(&self, _: Gpa, _: u64, _: u64) -> Result<bool, GpteWriteError> {
        Err(GpteWriteError::NotWritable)
    }
}

fn expected(host: &TestHost, cpu: GuestCpu, gva: u64, write: bool, user: bool, live: bool) -> Seen {
    let toggle_live = live;
    let access = FaultAccess { write, exec: false, user };
    match vmmu::guest::walk(&cpu, &Reference { host }, Gva(gva), access) {
        Ok(w) => {
            let gpa = w.gpa.raw();
            let in_fixed = gpa < RAM_SIZE;
            let in_toggle = toggle_live && (TOGGLE_GPA..TOGGLE_GPA + 0x1000).contains(&gpa);
            if in_fixed || in_toggle {
                let hva_gpa = if in_toggle { gpa - TOGGLE_GPA + 0x300_0000 } else { gpa };
                Seen::Ram(ram_pfn(hva_gpa & !0xfff))
            } else {
                Seen::Mmio(Gpa(gpa), vmmu::fault::EmulateSource::SlowPathMmio)
            }
        }
        Err(WalkError::PageFault(pf)) => Seen::GuestPf(pf.error_code.0),
        Err(e) => panic!("{e}"),
    }
}

fn toggle_region(size: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(TOGGLE_SLOT, 0, TOGGLE_GPA, size, RAM_HVA + 0x300_0000)
}

fn run(ops: Vec<GuestOp>) -> Result<(), TestCaseError> {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    vm.set_memory_region(&toggle_region(0x1000)).unwrap();
    let mut toggle_live = true;
    let spaces: Vec<Space> = (0..SPACES).map(|_| Space::new(&host, &next)).collect();
    // Build every table the ops may touch, so guest edits are single PTE stores.
    let pte_gpas: Vec<Vec<u64>> =
        spaces.iter().map(|s| GVAS.iter().map(|&g| s.entry_gpa(g, 1)).collect()).collect();
    let mut vcpus: Vec<Vcpu<TestHost>> = (0..2)
        .map(|_| {
            let mut v = vm.create_vcpu().unwrap();
            v.set_guest_cpu(GuestCpu { ..long4(spaces[0].cr3) }).unwrap();
            v
        })
        .collect();
    let mut cur = [0usize; 2];
    let mut wps = [true; 2];
    let cpu_of = |space: usize, wp: bool| GuestCpu { cr0_wp: wp, ..long4(spaces[space].cr3) };
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            GuestOp::Map { space, gva, target, readonly } => {
                let flags = P | US | if readonly { 0 } else { RW };
                guest_store(&host, &mut vcpus, pte_gpas[space][gva], TARGETS[target] | flags);
                shootdown(&mut vcpus, GVAS[gva]);
            }
            GuestOp::Unmap { space, gva } => {
                guest_store(&host, &mut vcpus, pte_gpas[space][gva], 0);
                shootdown(&mut vcpus, GVAS[gva]);
            }
            GuestOp::Cr3 { vcpu, space } => {
                vcpus[vcpu].load_cr3(spaces[space].cr3).unwrap();
                cur[vcpu] = space;
            }
            GuestOp::Wp { vcpu, wp } => {
                vcpus[vcpu].set_guest_cpu(cpu_of(cur[vcpu], wp)).unwrap();
                wps[vcpu] = wp;
            }
            GuestOp::Access { vcpu, gva, write, user } => {
                let cpu = cpu_of(cur[vcpu], wps[vcpu]);
                let want = expected(&host, cpu, GVAS[gva] + 8, write, user, toggle_live);
                let seen = access_at(&mut vcpus[vcpu], GVAS[gva] + 8, write, user);
                let same = match (want, seen) {
                    (Seen::Mmio(a, _), Seen::Mmio(b, _)) => a == b,
                    (a, b) => a == b,
                };
                prop_assert!(
                    same,
                    "op {i}: vCPU {vcpu} gva {:#x} (user {user}, wp {}): want {want:?}, seen {seen:?}",
                    GVAS[gva],
                    wps[vcpu]
                );
            }
            GuestOp::ToggleSlot => {
                let size = if toggle_live { 0 } else { 0x1000 };
                vm.set_memory_region(&toggle_region(size)).unwrap();
                toggle_live = !toggle_live;
            }
            GuestOp::ZapAll => vm.zap_all_fast(),
            GuestOp::Shrink(n) => {
                vm.shrink_shadow_pages(n);
            }
            GuestOp::Limit(n) => vm.set_nr_mmu_pages(n).unwrap(),
        }
    }
    prop_assert_eq!(host.use_after_free(), 0);
    Ok(())
}

/// A guest store of a page-table entry: the bytes land in memory, and the MMU hears of it (a
/// store to a shadowed table exits and is emulated; elsewhere `track_write` finds nothing).
fn guest_store(host: &Arc<TestHost>, vcpus: &mut [Vcpu<TestHost>], gpa: u64, value: u64) {
    host.write_u64(RAM_HVA + gpa, value);
    vcpus[0].track_write(Gpa(gpa), 8).unwrap();
}

fn shootdown(vcpus: &mut [Vcpu<TestHost>], gva: u64) {
    for v in vcpus.iter_mut() {
        v.invlpg(Gva(gva)).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn every_access_sees_what_the_guest_tables_say(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
