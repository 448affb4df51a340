//! The bare-metal embedder's code, run on the build machine: the same scenarios the image runs,
//! plus what needs two CPUs (threads stand in for them): a memslot delete on one CPU while the
//! other sits in guest mode and is kicked out by the MMU's "IPI".
//!
//! Run alone (`cargo test -p vmmu-bare`) the core is built without `std`, as the image takes it;
//! `scripts/test` checks that with `cargo tree -e features`.

use std::sync::atomic::{AtomicBool, Ordering};
use vmmu::fault::EmulateSource;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::spte::FormatKind;
use vmmu::vm::{Vm, VmConfig};
use vmmu_bare::host::RAM_HVA;
use vmmu_bare::run::{self, BareError, Cpu, Ended};

#[test]
fn ept_scenario() {
    let s = run::tdp_scenario(FormatKind::Ept).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.dirty_pages, [3, 7]);
    assert_eq!(s.leaked_tables, 0, "the VM's drop gives every table page back");
}

#[test]
fn npt_scenario() {
    let s = run::tdp_scenario(FormatKind::Npt).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.dirty_pages, [3, 7]);
    assert_eq!(s.leaked_tables, 0);
}

#[test]
fn shadow_scenario() {
    let s = run::shadow_scenario().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.guest_page_faults, 1);
    assert_eq!(s.leaked_tables, 0);
}

/// Every public error of the core is a `core::error::Error` (so `Display` too) without `std`:
/// a bare-metal hypervisor logs them and wraps them in its own errors, as this embedder does.
#[test]
fn errors_are_core_errors_with_a_source() {
    fn is_error<E: core::error::Error + Send + Sync + 'static>(_: &E) {}
    fn error_type<E: core::error::Error + Send + Sync + 'static>() {}
    error_type::<vmmu::Error>();
    error_type::<vmmu::memslot::MemslotError>();
    error_type::<vmmu::memslot::ConfigError>();
    error_type::<vmmu::fault::FaultError>();
    error_type::<vmmu::vm::VmError>();
    error_type::<vmmu::mmu_core::MmuError>();
    error_type::<vmmu::spte::SpteConfigError>();
    error_type::<vmmu::srcu::SrcuError>();
    error_type::<vmmu::dirty::DirtyLogError>();
    error_type::<vmmu::vcpu::ShadowError>();
    error_type::<vmmu::guest::PdptrError>();
    error_type::<vmmu::guest::walk::WalkError>();
    error_type::<vmmu::guest::walk::GpteWriteError>();
    error_type::<vmmu::host::HostFault>();
    let e = BareError::from(vmmu::memslot::MemslotError::SizeNotAligned { size: 1 });
    is_error(&e);
    assert!(core::error::Error::source(&e).is_some());
    assert!(e.to_string().contains("vmmu"), "{e}");
}

/// CPU 1 sits in guest mode with RAM mapped; CPU 0 deletes the slot. The delete's flush and
/// grace period need CPU 1 out of guest mode: the MMU kicks it (the host's IPI), CPU 1 exits,
/// services the flush and enters again, and the delete completes.
#[test]
fn a_delete_kicks_the_cpu_in_guest_mode() {
    let host = run::new_host();
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 2;
    cfg.user_va_limit = u64::MAX;
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 2 << 20, RAM_HVA)).unwrap();
    let mut vcpu = vm.create_vcpu().unwrap();
    let mut cpu = Cpu { index: 0, flushes: 0 };
    assert!(matches!(run::tdp_access(&mut cpu, &mut vcpu, 0x1000, false), Ok(Ended::Ram(_))));
    let (entered, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let ipis = std::thread::scope(|s| {
        let guest = s.spawn(|| run::sit_in_guest(&mut cpu, &host, &mut vcpu, &entered, &stop));
        while !entered.load(Ordering::Acquire) && !guest.is_finished() {
            std::hint::spin_loop();
        }
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0)).unwrap();
        stop.store(true, Ordering::Release);
        guest.join().unwrap()
    })
    .unwrap_or_else(|e: BareError| panic!("{e}"));
    assert!(ipis >= 1, "the vCPU left guest mode for the delete");
    assert!(host.kicks() >= 1, "the MMU kicked it");
    assert!(cpu.flushes >= 1, "and it flushed its TLB");
    assert_eq!(
        run::tdp_access(&mut cpu, &mut vcpu, 0x1000, false).unwrap(),
        Ended::Mmio(EmulateSource::SlowPathMmio)
    );
}
