//! Behaviour of the TDP MMU's zaps (`tdp/zap.rs`) that mutation testing found no test pinning:
//! each test here fails with the mutant its doc names applied, and shows what a vCPU would use
//! (a translation, an SPTE left in a root) or a KVM counter, not an internal flag.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

mod common;

use common::{access, region, vm, Seen, RAM_HVA};
use vmmu::spte::{FormatKind, SpteFormat};
use vmmu::tdp::root::Root;
use vmmu::testing::TestHost;
use vmmu::vm::Vm;
use vmmu::{Gpa, Level, Pfn};

/// The 4 KiB entry for `gpa` under `root`, if the tables reach it and it is not empty.
fn entry(vm: &Vm<TestHost>, root: &Root, gpa: u64) -> Option<u64> {
    // SAFETY: single-threaded: the entry is read at once, before anything else runs.
    let e = unsafe { vm.mmu().entry_for_tests(root, Gpa(gpa).gfn(), Level::L4K) }?;
    let v = e.load(std::sync::atomic::Ordering::Acquire);
    (v != SpteFormat::NONPRESENT).then_some(v)
}

/// `zap_all_fast` zaps the whole of every obsolete root, up to the top of the guest-physical
/// space it maps (2^36 gfns under a 4-level root), not only its low gigabytes: a leaf at 4 GiB
/// is gone from the root before its vCPU handled the reload request (in KVM a vCPU may still
/// run on the obsolete root until its next entry). Kills, in `zap_root_locked`'s end gfn
/// `1 << (shift + 9 - PAGE_SHIFT)`, `+` -> `-` (the zap stopped at 1 GiB) and `+` -> `*` (at 2
/// GiB in release, where the shift wraps).
#[test]
fn zap_all_fast_zaps_an_obsolete_root_above_the_first_gigabytes() {
    const HIGH: u64 = 0x1_0010_0000; // 4 GiB + 1 MiB
    let (vm, _host) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, HIGH, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert_eq!(access(&mut v, HIGH, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    let root = v.root().unwrap().clone();
    assert!(entry(&vm, &root, HIGH).is_some(), "setup: the leaf is in the root");
    vm.zap_all_fast();
    assert_eq!(entry(&vm, &root, HIGH), None, "the obsolete root kept its leaf at 4 GiB");
    assert!(v.service_requests().unwrap().flush_tlb, "the vCPU reloads and flushes");
    assert_eq!(access(&mut v, HIGH, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
}
