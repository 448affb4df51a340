//! A table grace period against a vCPU *created* while it runs (its index reused, or a fresh
//! one), with the real code through the sync shim. Same shape as `loom_guest_mode.rs`: the vCPU
//! spins in guest mode and leaves only for a pending request; it gives up after a bounded number
//! of spins.
//!
//! `MmuCore::reclaim` kicks every vCPU after its counter bump (`synchronize_nudging`). A vCPU
//! whose index is reused resets its request word in `add_vcpu` (`VcpuState::reset`), and a new
//! index is published with `fetch_max` on `nr_vcpus`. With a plain store for the reset (which
//! could erase the kick) or a plain load of `nr_vcpus` in the nudge (which could miss the new
//! index), nothing ordered the new vCPU's counter load after the bump: its guest-mode section
//! could count as older than the grace period, which then waited for a vCPU nobody kicked (a
//! concurrency audit found it with this model). Both are read-modify-writes now.
#![cfg(loom)]

mod loom_common;

use loom::sync::atomic::AtomicBool;
use loom::thread;
use loom_common::{model, run_in_guest_until};
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, Ordering};
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{AsId, FaultAccess, Gfn, Gpa};

const X: u64 = 0x1234;
const SPINS: usize = 40;

#[test]
fn a_vcpu_created_during_a_grace_period_does_not_stall_it() {
    run(false);
}

/// The same with a fresh index (not yet below `nr_vcpus` when the nudge reads it).
#[test]
fn a_vcpu_with_a_new_index_created_during_a_grace_period_does_not_stall_it() {
    run(true);
}

fn run(fresh_index: bool) {
    model(move || {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.max_vcpus = if fresh_index { 2 } else { 1 };
        cfg.nr_address_spaces = 1;
        let vm = Arc::new(Vm::new(cfg, Arc::new(TestHost::new(8))).unwrap());
        // Tables for the zap to unlink; this vCPU goes away (its index is reused below), or
        // stays out of guest mode (the new vCPU takes index 1).
        let mut v0 = vm.create_vcpu().unwrap();
        v0.service_requests().unwrap();
        v0.handle_ept_violation(Gpa(X << 12), FaultAccess::READ).unwrap();
        let _keep = if fresh_index {
            Some(v0)
        } else {
            drop(v0);
            None
        };
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (vm, done) = (vm.clone(), done.clone());
            thread::spawn(move || {
                let mut v = vm.create_vcpu().unwrap();
                run_in_guest_until(&mut v, &done, SPINS)
            })
        };
        vm.zap_gfn_range_for_tests(AsId(0), Gfn(0), Gfn(1 << 18));
        done.store(true, Ordering::Release);
        assert!(t.join().unwrap(), "VIOLATION: the grace period waited for a vCPU nobody kicked");
    });
}
