//! loom model of a TDP root's last user letting go while `zap_all_fast` obsoletes it, with the
//! real code (`Vm`, `Vcpu`, `MmuCore`, `TdpMmu`, `TestHost`) through the sync shim. Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p vmmu --release
//! --features historical-bugs --test loom_roots` (`scripts/test` does).
//!
//! The two sides decide who retires the root without a common lock: the vCPU drops its use
//! (`Root::put`, a read-modify-write of `users`) and then reads `invalid`; `zap_all_fast` sets
//! `invalid` (under the MMU lock, which the vCPU does not take for a valid root) and later reads
//! `users`. That is a store-buffering pair: with only Acquire/Release each side may read the
//! other's old value, the vCPU sees a valid root (and leaves it for the next vCPU) while the zap
//! sees a user (and leaves it for that user), and an obsolete root nobody uses stays on the root
//! list, its page never freed, until the next `zap_all_fast` (recent KVM, as far as we recall its
//! `tdp_mmu.c`, avoids the question by letting the root list hold a reference of its own until
//! the root is invalidated; not in the design facts). A `SeqCst` fence on each
//! side (`Tdp::put_root`, `Tdp::zap_all_fast`) closes it; without either, this fails.
//!
//! Property: once both are done, no root is left on the list.
#![cfg(loom)]

mod loom_common;

use loom::thread;
use loom_common::model;
use vmmu::spte::FormatKind;
use vmmu::sync::Arc;
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig};

fn vm() -> Vm<TestHost> {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 1;
    cfg.nr_address_spaces = 1;
    Vm::new(cfg, Arc::new(TestHost::new(4))).unwrap()
}

#[test]
fn last_root_user_vs_zap_all_fast_leaves_no_root() {
    model(|| {
        let vm = vm();
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        assert_eq!(vm.tdp().expect("a TDP VM").nr_roots(), 1);
        let t = thread::spawn(move || drop(v));
        vm.zap_all_fast();
        t.join().unwrap();
        assert_eq!(
            vm.tdp().expect("a TDP VM").nr_roots(),
            0,
            "VIOLATION: an obsolete root with no user stays on the root list"
        );
    });
}
