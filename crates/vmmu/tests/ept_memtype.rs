//! The memory type of EPT leaves (KVM `make_spte` -> `vmx_get_mt_mask(vcpu, gfn,
//! kvm_is_mmio_pfn(pfn))`): host RAM is mapped write-back with ignore-PAT, a frame the host
//! says is device memory (`HostMemory::frame_kind`, a device BAR passed through a memslot) is
//! mapped uncacheable without ignore-PAT, on every path that makes a leaf from a host frame: the
//! fault (4 KiB and huge), the TDP prefetch, the split of a huge leaf when dirty logging starts
//! and the huge leaf recovered when it stops. NPT leaves carry no memory type.
#![cfg(not(loom))]

mod common;

use common::{access, region, vm_with, Seen, RAM_HVA};
use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
use vmmu::spte::FormatKind;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Gpa, Level, Pfn};

/// Guest RAM: gpa 0, 2 MiB, host frames from `RAM_HVA >> 12` (mapped 2 MiB by the host).
const RAM_GPA: u64 = 0;
/// A device BAR passed through: gpa 3 GiB, 2 MiB, the host's next 2 MiB block of frames, which
/// the host says are device memory.
const BAR_GPA: u64 = 0xc000_0000;
const BAR_HVA: u64 = RAM_HVA + 0x20_0000;
const BAR_PFN: u64 = BAR_HVA >> 12;

/// EPT leaf bits 3-5: the memory type; bit 6: ignore the guest's PAT.
fn ept_memtype(spte: u64) -> (u64, bool) {
    ((spte >> 3) & 7, spte & (1 << 6) != 0)
}
const WB_IPAT: (u64, bool) = (6, true);
const UC: (u64, bool) = (0, false);

fn vm_with_a_bar(format: FormatKind, prefetch: bool) -> (Vm<TestHost>, std::sync::Arc<TestHost>) {
    let mut cfg = VmConfig::new(format, 46).unwrap();
    cfg.tdp_prefetch = prefetch;
    let (vm, host) = vm_with(cfg);
    host.set_device_frames(BAR_PFN, 0x200);
    vm.set_memory_region(&region(0, RAM_GPA, 0x20_0000, RAM_HVA, 0)).unwrap();
    vm.set_memory_region(&region(1, BAR_GPA, 0x20_0000, BAR_HVA, 0)).unwrap();
    (vm, host)
}

/// The leaf mapping `gpa` under `v`'s root and its level (the lowest non-empty entry).
fn leaf(vm: &Vm<TestHost>, v: &Vcpu<TestHost>, gpa: u64) -> (u64, Level) {
    let root = v.root().expect("a root").clone();
    for level in [Level::L4K, Level::L2M, Level::L1G] {
        // SAFETY: single-threaded: the entry is read at once, before anything else runs.
        let e = unsafe { vm.tdp().unwrap().entry_for_tests(&root, Gpa(gpa).gfn(), level) };
        if let Some(e) = e {
            let spte = e.load(std::sync::atomic::Ordering::Acquire);
            if spte != vmmu::spte::SpteFormat::NONPRESENT {
                return (spte, level);
            }
        }
    }
    panic!("no leaf maps {gpa:#x}");
}

#[test]
fn ept_maps_device_frames_uncacheable_and_ram_write_back_npt_alike() {
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _host) = vm_with_a_bar(format, false);
        let mut v = vm.create_vcpu().unwrap();
        let ram = access(&mut v, RAM_GPA + 0x5000, true).unwrap().0;
        let bar = access(&mut v, BAR_GPA + 0x5000, true).unwrap().0;
        assert_eq!(ram, Seen::Ram(Pfn((RAM_HVA >> 12) + 5)));
        assert_eq!(bar, Seen::Ram(Pfn(BAR_PFN + 5)));
        let (ram_leaf, ram_level) = leaf(&vm, &v, RAM_GPA + 0x5000);
        let (bar_leaf, bar_level) = leaf(&vm, &v, BAR_GPA + 0x5000);
        assert_eq!((ram_level, bar_level), (Level::L2M, Level::L2M), "{format:?}: huge leaves");
        if format == FormatKind::Ept {
            assert_eq!(ept_memtype(ram_leaf), WB_IPAT, "RAM {ram_leaf:#x}");
            assert_eq!(ept_memtype(bar_leaf), UC, "device memory {bar_leaf:#x}");
        } else {
            // Same rights, same level: only the frame differs.
            let ram_frame = (RAM_HVA >> 12) << 12;
            assert_eq!(ram_leaf - ram_frame, bar_leaf - (BAR_PFN << 12), "NPT has no memory type");
        }
    }
}

/// Dirty logging splits the BAR's huge leaf (its children keep the type), a write fault maps a
/// child again, and when logging stops the recovered huge leaf is uncacheable too.
#[test]
fn a_device_block_stays_uncacheable_through_dirty_logging_split_and_recovery() {
    let (vm, _host) = vm_with_a_bar(FormatKind::Ept, false);
    let mut v = vm.create_vcpu().unwrap();
    access(&mut v, BAR_GPA + 0x5000, true).unwrap();
    assert_eq!(leaf(&vm, &v, BAR_GPA).1, Level::L2M);
    let bar = |flags| region(1, BAR_GPA, 0x20_0000, BAR_HVA, flags);
    vm.set_memory_region(&bar(KVM_MEM_LOG_DIRTY_PAGES)).unwrap();
    for page in [0x5u64, 0x6, 0x1ff] {
        assert_eq!(access(&mut v, BAR_GPA + (page << 12), page != 6).unwrap().0, {
            Seen::Ram(Pfn(BAR_PFN + page))
        });
        let (spte, level) = leaf(&vm, &v, BAR_GPA + (page << 12));
        assert_eq!(level, Level::L4K, "page {page:#x} is mapped 4 KiB while logging");
        assert_eq!(ept_memtype(spte), UC, "page {page:#x}: {spte:#x}");
    }
    vm.set_memory_region(&bar(0)).unwrap();
    access(&mut v, BAR_GPA + 0x7000, false).unwrap();
    let (spte, level) = leaf(&vm, &v, BAR_GPA + 0x7000);
    assert_eq!(level, Level::L2M, "the huge leaf is recovered");
    assert_eq!(ept_memtype(spte), UC, "recovered: {spte:#x}");
}

/// The TDP prefetch maps the BAR's neighbour pages the guest did not touch yet, uncacheable.
#[test]
fn prefetched_device_leaves_are_uncacheable() {
    let (vm, host) = vm_with_a_bar(FormatKind::Ept, true);
    host.set_zero_page_reads(true);
    // 4 KiB leaves only: gpa and hva not 2 MiB-congruent.
    let slot = |size| region(1, BAR_GPA + 0x1000, size, BAR_HVA, 0);
    vm.set_memory_region(&region(1, BAR_GPA, 0, BAR_HVA, 0)).unwrap();
    vm.set_memory_region(&slot(0x10_0000)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let group = (BAR_GPA >> 12) + 8..(BAR_GPA >> 12) + 16;
    for gfn in group.clone() {
        access(&mut v, gfn << 12, true).unwrap(); // the host maps them writable from now on
    }
    vm.set_memory_region(&slot(0)).unwrap();
    vm.set_memory_region(&slot(0x10_0000)).unwrap();
    let before = vm.stats().pages_4k;
    access(&mut v, (group.end - 2) << 12, false).unwrap();
    assert_eq!(vm.stats().pages_4k - before, 8, "the fault and its prefetched group");
    for gfn in group {
        let (spte, level) = leaf(&vm, &v, gfn << 12);
        assert_eq!(level, Level::L4K);
        assert_eq!(ept_memtype(spte), UC, "gfn {gfn:#x}: {spte:#x}");
    }
}

/// A fault whose huge leaf replaces a table in its way (old MMIO SPTEs from before the BAR's
/// slot was created) makes it uncacheable too.
#[test]
fn a_huge_device_leaf_over_a_table_in_its_way_is_uncacheable() {
    let (vm, _host) = vm_with_a_bar(FormatKind::Ept, false);
    let bar = region(1, BAR_GPA, 0x20_0000, BAR_HVA, 0);
    vm.set_memory_region(&region(1, BAR_GPA, 0, BAR_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert!(matches!(access(&mut v, BAR_GPA + 0x3000, false).unwrap().0, Seen::Mmio(_)));
    assert_eq!(leaf(&vm, &v, BAR_GPA + 0x3000).1, Level::L4K, "a table of MMIO SPTEs");
    vm.set_memory_region(&bar).unwrap(); // a create zaps nothing: the table stays in the way
    let tables_zapped = vm.stats().tdp_tables_zapped;
    assert_eq!(access(&mut v, BAR_GPA + 0x5000, false).unwrap().0, Seen::Ram(Pfn(BAR_PFN + 5)));
    assert_eq!(vm.stats().tdp_tables_zapped, tables_zapped + 1, "the table was in the way");
    let (spte, level) = leaf(&vm, &v, BAR_GPA + 0x5000);
    assert_eq!(level, Level::L2M);
    assert_eq!(ept_memtype(spte), UC, "{spte:#x}");
}
