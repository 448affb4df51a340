//! What a bare-metal hypervisor calls from its VM-exit handler (often with interrupts off, where
//! its global allocator may not be usable) allocates nothing from the global allocator on a TDP
//! VM: EPT violations and #NPFs, including those that link new tables (their frames come from
//! the host's pool), the MMIO paths, entering and leaving guest mode, servicing requests that
//! load no new root, and a dirty-log GET into the caller's buffer. The crate doc of `vmmu`
//! ("Using the core without std") lists what does allocate. A counting global allocator counts
//! the measuring thread's allocations only.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use vmmu::dirty::DirtyLogMode;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::spte::FormatKind;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{AsId, FaultAccess, Gpa, SlotId};
use vmmu_bare::host::RAM_HVA;
use vmmu_bare::run;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

#[track_caller]
fn no_alloc<R>(what: &str, f: impl FnOnce() -> R) -> R {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    assert_eq!(ALLOCS.with(Cell::get) - before, 0, "{what} allocated");
    r
}

#[test]
fn tdp_exit_handlers_allocate_nothing() {
    for format in [FormatKind::Ept, FormatKind::Npt] {
        for manual in [false, true] {
            let host = run::new_host();
            let mut cfg = VmConfig::new(format, 46).unwrap();
            cfg.user_va_limit = u64::MAX;
            let vm = Vm::new(cfg, host).unwrap();
            if manual {
                vm.set_dirty_log_mode(DirtyLogMode::Manual);
            }
            let logged =
                UserspaceMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 << 20, RAM_HVA);
            vm.set_memory_region(&logged).unwrap();
            let mut v = vm.create_vcpu().unwrap();
            v.service_requests().unwrap(); // loads the root: allocates (documented)
            let violation = |v: &mut vmmu::vcpu::Vcpu<_>, gpa: u64, write: bool| match format {
                FormatKind::Ept => {
                    let a = if write { FaultAccess::WRITE } else { FaultAccess::READ };
                    v.handle_ept_violation(Gpa(gpa), a)
                }
                _ => v.handle_npf(Gpa(gpa), PfErr(if write { PfErr::WRITE } else { 0 })),
            };
            let o = no_alloc("a fault that links new tables", || violation(&mut v, 0x1000, true));
            assert_eq!(o, Ok(FaultOutcome::Fixed));
            let o = no_alloc("a leaf-only fault", || violation(&mut v, 0x2000, true));
            assert_eq!(o, Ok(FaultOutcome::Fixed));
            let o = no_alloc("the MMIO slow path", || violation(&mut v, 0xfee0_0000, false));
            assert!(matches!(o, Ok(FaultOutcome::Emulate { .. })), "{o:?}");
            let o = no_alloc("the MMIO fast path", || match format {
                FormatKind::Ept => v.handle_ept_misconfig(Gpa(0xfee0_0000)),
                _ => v.handle_npf(Gpa(0xfee0_0000), PfErr(PfErr::RSVD)),
            });
            assert!(matches!(o, Ok(FaultOutcome::Emulate { .. })), "{o:?}");
            no_alloc("entering and leaving guest mode", || drop(v.enter_guest().unwrap()));
            no_alloc("servicing requests with a root loaded", || v.service_requests().unwrap());
            v.mark_page_dirty(Gpa(0x3000));
            let mut out = [0u64; 8];
            let n = no_alloc("a dirty-log GET into a buffer", || {
                vm.get_dirty_log_into(AsId(0), SlotId(0), &mut out).unwrap()
            });
            assert_eq!((n, out[0]), (8, 0b1110), "pages 1, 2 and 3");
            no_alloc("servicing the GET's flush", || v.service_requests().unwrap());
        }
    }
}
