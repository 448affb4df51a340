//! Every zap reaches every root (issue 11, defect 2). A vCPU on a pageless root (the stand-in for
//! KVM's special roots) and a vCPU on the shared TDP root both map a gfn; after a slot delete, a
//! move, a host invalidation, `zap_all_fast` and an MMIO-generation wrap, nothing stale is
//! reachable from either root: the hardware walk of a vCPU that may enter guest mode does not
//! translate to the old frame, and no root still holds the old leaf or a pre-wrap MMIO SPTE.
#![cfg(not(loom))]

mod common;

use common::{access, region, spte_4k, vm, vm_with, Seen, RAM_HVA};
use vmmu::spte::FormatKind;
use vmmu::tdp::root::RootKind;
use vmmu::tdp::HwWalk;
use vmmu::tdp::RootRef;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, Gpa, Hva, Pfn};

const GPA: u64 = 0x10_0000;
const FRAME: Pfn = Pfn(RAM_HVA >> 12);

/// Two vCPUs that both mapped GPA: one on a pageless root, one on the shared root.
fn two_roots(vm: &Vm<TestHost>) -> [(Vcpu<TestHost>, RootRef); 2] {
    let mut pageless = vm.create_vcpu().unwrap();
    pageless.service_requests().unwrap();
    pageless.load_pageless_root().unwrap();
    let mut shared = vm.create_vcpu().unwrap();
    let mut out = Vec::new();
    for v in [&mut pageless, &mut shared] {
        assert_eq!(access(v, GPA, false).unwrap().0, Seen::Ram(FRAME));
    }
    let pr = pageless.root().unwrap().clone();
    let sr = shared.root().unwrap().clone();
    assert_eq!(pr.kind(), RootKind::Pageless);
    assert_eq!(sr.kind(), RootKind::Tdp);
    out.push((pageless, pr));
    out.push((shared, sr));
    out.try_into().ok().unwrap()
}

/// What the vCPU's hardware walk of `gpa` gives, after it handled its requests, if it still runs
/// on `root` (a vCPU that had to reload its root cannot walk the old one any more).
fn walk_if_still_on(v: &mut Vcpu<TestHost>, root: &RootRef, gpa: u64) -> Option<HwWalk> {
    v.service_requests().unwrap();
    if !RootRef::ptr_eq(v.root().unwrap(), root) {
        return None;
    }
    let g = v.enter_guest().ok()?;
    Some(g.walk(Gpa(gpa), Access::NONE))
}

fn assert_nothing_stale(vm: &Vm<TestHost>, vcpus: &mut [(Vcpu<TestHost>, RootRef); 2], what: &str) {
    for (v, root) in vcpus.iter_mut() {
        let kind = root.kind();
        if let Some(e) = spte_4k(vm, root, GPA) {
            panic!("{what}: the {kind:?} root still holds {e:#x} for {GPA:#x}");
        }
        if let Some(HwWalk::Translated { pfn, .. }) = walk_if_still_on(v, root, GPA) {
            panic!("{what}: a vCPU on the {kind:?} root still translates {GPA:#x} to {pfn:?}");
        }
    }
}

#[test]
fn delete_reaches_every_root() {
    let (vm, host) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, GPA, 0x1000, RAM_HVA, 0)).unwrap();
    let mut vcpus = two_roots(&vm);
    vm.set_memory_region(&region(0, GPA, 0, 0, 0)).unwrap();
    assert_nothing_stale(&vm, &mut vcpus, "after a delete");
    assert_eq!(host.use_after_free(), 0);
}

#[test]
fn move_reaches_every_root() {
    let (vm, _host) = vm(FormatKind::Npt);
    vm.set_memory_region(&region(0, GPA, 0x1000, RAM_HVA, 0)).unwrap();
    let mut vcpus = two_roots(&vm);
    vm.set_memory_region(&region(0, GPA + 0x10_0000, 0x1000, RAM_HVA, 0)).unwrap();
    assert_nothing_stale(&vm, &mut vcpus, "after a move");
}

#[test]
fn host_invalidation_reaches_every_root() {
    let (vm, _host) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, GPA, 0x1000, RAM_HVA, 0)).unwrap();
    let mut vcpus = two_roots(&vm);
    let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + 0x1000));
    // While the host changes what backs the page, nothing may translate to the old frame.
    assert_nothing_stale(&vm, &mut vcpus, "during a host invalidation");
    inv.end();
}

#[test]
fn zap_all_fast_reaches_every_root() {
    let (vm, _host) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, GPA, 0x1000, RAM_HVA, 0)).unwrap();
    let mut vcpus = two_roots(&vm);
    vm.zap_all_fast();
    // Checked before the vCPUs reload: a vCPU that has not yet handled its request may still be
    // on its root (in KVM, until its next entry).
    for (_, root) in vcpus.iter() {
        assert_eq!(spte_4k(&vm, root, GPA), None, "the {:?} root kept its leaf", root.kind());
    }
    assert_nothing_stale(&vm, &mut vcpus, "after zap_all_fast");
}

#[test]
fn generation_wrap_reaches_every_root() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.generation_base = (1 << 19) - 4;
    let (vm, _host) = vm_with(cfg);
    let mmio = 0x90_0000;
    let mut pageless = vm.create_vcpu().unwrap();
    pageless.service_requests().unwrap();
    pageless.load_pageless_root().unwrap();
    let mut shared = vm.create_vcpu().unwrap();
    for v in [&mut pageless, &mut shared] {
        assert!(matches!(access(v, mmio, false).unwrap().0, Seen::Mmio(_)));
    }
    let roots = [pageless.root().unwrap().clone(), shared.root().unwrap().clone()];
    for r in &roots {
        assert!(spte_4k(&vm, r, mmio).is_some(), "an MMIO SPTE at the pre-wrap generation");
    }
    for i in 0..4u64 {
        vm.set_memory_region(&region(1, 0x100_0000 + i * 0x1000, 0x1000, RAM_HVA, 0)).unwrap();
        vm.set_memory_region(&region(1, 0, 0, 0, 0)).unwrap();
    }
    assert_eq!(vm.stats().mmio_gen_wraps, 1);
    for r in &roots {
        let e = spte_4k(&vm, r, mmio);
        assert_eq!(e, None, "the {:?} root kept a pre-wrap MMIO SPTE", r.kind());
    }
}
