//! loom model of a table grace period against a vCPU that stays in guest mode, with the real
//! code (`Vm`, `Vcpu`, `MmuCore`, `TdpMmu`, `Srcu`, `TestHost`) through the sync shim. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p vmmu --release
//! --features historical-bugs --test loom_guest_mode` (`scripts/test` does).
//!
//! A vCPU in guest mode holds a table read section until it exits, and one that never faults
//! exits only when a request is pending. A zap that unlinks tables frees them after a grace
//! period (`MmuCore::reclaim`), which therefore kicks every vCPU (`Srcu::synchronize_nudging`).
//! The kick must come *after* the grace period's counter bump: a vCPU kicked before it can exit,
//! handle the kick and enter guest mode again with a section that still counts as older than
//! the grace period, and nothing kicks it again (issue 11, defect 3; the `srcu` module doc).
//!
//! The vCPU here spins in guest mode on a TLB that needs no walk, leaving only for a pending
//! request and entering again at once, as a vCPU whose guest loops on cached translations does.
//! It gives up after a bounded number of spins (a stall: the zap waits for it and nobody kicks
//! it), so the model ends either way.
//!
//! Property: the zap returns without the vCPU giving up.
#![cfg(loom)]

mod loom_common;

use loom::sync::atomic::AtomicBool;
use loom::thread;
use loom_common::{model, run_in_guest_until};
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, Ordering};
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{AsId, FaultAccess, Gfn, Gpa};

/// A gfn with no memslot: its MMIO SPTE makes the tables the zap unlinks.
const X: u64 = 0x1234;
/// Spins of the vCPU with nothing pending before it counts as stalled. The vCPU yields at each
/// spin, and loom runs a yielding thread again only when no other thread can run, so it spins
/// only while the zap waits (for its flush to be acknowledged, or for the grace period).
const SPINS: usize = 40;

#[test]
fn a_vcpu_reentering_guest_mode_does_not_stall_a_grace_period() {
    model(|| {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.max_vcpus = 1;
        cfg.nr_address_spaces = 1;
        let vm = Vm::new(cfg, Arc::new(TestHost::new(8))).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        let o = v.handle_ept_violation(Gpa(X << 12), FaultAccess::READ).unwrap();
        assert!(
            matches!(o, FaultOutcome::Emulate { source: EmulateSource::SlowPathMmio, .. }),
            "setup: {o:?}"
        );
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let done = done.clone();
            thread::spawn(move || run_in_guest_until(&mut v, &done, SPINS))
        };
        // Unlinks the 1 GiB table and the 2 MiB table under it (a flush, then a grace period).
        vm.zap_gfn_range_for_tests(AsId(0), Gfn(0), Gfn(1 << 18));
        done.store(true, Ordering::Release);
        assert!(t.join().unwrap(), "VIOLATION: the grace period waited for a vCPU nobody kicked");
        assert_eq!(vm.core().pending_free(), 0);
    });
}
