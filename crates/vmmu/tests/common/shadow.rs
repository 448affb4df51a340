//! Shadow-paging test helpers: a shadow VM on the test host, guest page-table spaces written into
//! guest RAM, and a user-mode access loop (walk the shadow by GVA, exit, handle the #PF).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use vmmu::bugs::BugSet;
use vmmu::fault::{EmulateSource, FaultOutcome, PfErr};
use vmmu::guest::GuestCpu;
use vmmu::memslot::UserspaceMemoryRegion;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, Gpa, Gva, Level, Pfn};

pub const RAM_HVA: u64 = 0x4000_0000;
pub const RAM_SIZE: u64 = 64 << 20;
/// Guest page tables are allocated from here up.
pub const TABLES_GPA: u64 = 0x10_0000;
/// A guest-physical address no slot covers.
pub const MMIO_GPA: u64 = 0x1_0000_0000;

pub const P: u64 = 1;
pub const RW: u64 = 2;
pub const US: u64 = 4;
pub const PS: u64 = 1 << 7;

pub fn ram_pfn(gpa: u64) -> Pfn {
    Pfn((RAM_HVA + gpa) >> 12)
}

/// A guest page-table space written straight into guest RAM (as the guest OS would before it
/// loads CR3; later changes go through the MMU's write tracking).
pub struct Space {
    host: Arc<TestHost>,
    pub cr3: u64,
    next: Rc<Cell<u64>>,
}

/// The next free guest page for a page table (from the counter [`shadow_vm`] returns).
pub fn alloc_table(next: &Cell<u64>) -> u64 {
    let t = next.get();
    next.set(t + 0x1000);
    t
}

impl Space {
    pub fn new(host: &Arc<TestHost>, next: &Rc<Cell<u64>>) -> Space {
        let cr3 = alloc_table(next);
        Space { host: host.clone(), cr3, next: next.clone() }
    }

    pub fn read(&self, gpa: u64) -> u64 {
        vmmu::host::GuestMemory::read_u64(&*self.host, vmmu::Hva(RAM_HVA + gpa)).unwrap()
    }

    /// The gpa of the entry for `gva` at `level`, creating tables above it.
    pub fn entry_gpa(&self, gva: u64, level: u8) -> u64 {
        let mut table = self.cr3;
        for l in (level + 1..=4).rev() {
            let idx = (gva >> (12 + 9 * (u64::from(l) - 1))) & 511;
            let e = self.read(table + idx * 8);
            if e & P == 0 {
                let t = alloc_table(&self.next);
                self.host.write_u64(RAM_HVA + table + idx * 8, t | P | RW | US);
                table = t;
            } else {
                table = e & 0x000f_ffff_ffff_f000;
            }
        }
        table + ((gva >> (12 + 9 * (u64::from(level) - 1))) & 511) * 8
    }

    pub fn map4k(&self, gva: u64, gpa: u64, flags: u64) -> u64 {
        let at = self.entry_gpa(gva, 1);
        self.host.write_u64(RAM_HVA + at, gpa | flags);
        at
    }

    pub fn map2m(&self, gva: u64, gpa: u64, flags: u64) -> u64 {
        let at = self.entry_gpa(gva, 2);
        self.host.write_u64(RAM_HVA + at, gpa | flags | PS);
        at
    }
}

pub fn shadow_vm(bugs: BugSet) -> (Vm<TestHost>, Arc<TestHost>, Rc<Cell<u64>>) {
    shadow_vm_with(|cfg| cfg.bugs = bugs)
}

/// [`shadow_vm`] (no bugs) with `tweak` applied to the VM's configuration first.
pub fn shadow_vm_with(
    tweak: impl FnOnce(&mut VmConfig),
) -> (Vm<TestHost>, Arc<TestHost>, Rc<Cell<u64>>) {
    let host = Arc::new(TestHost::new(2048));
    host.map(RAM_HVA, RAM_SIZE, RAM_HVA >> 12, Level::L4K, true);
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.max_vcpus = 2;
    tweak(&mut cfg);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, RAM_SIZE, RAM_HVA)).unwrap();
    (vm, host, std::rc::Rc::new(std::cell::Cell::new(TABLES_GPA)))
}

pub fn long4(cr3: u64) -> GuestCpu {
    GuestCpu::long4(cr3, 46)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Seen {
    Ram(Pfn),
    Mmio(Gpa, EmulateSource),
    GuestPf(u64),
}

/// One user-mode access by `v` to `gva`, like the hardware and the hypervisor do it: walk the
/// shadow, exit on a fault, handle it, repeat.
pub fn access(v: &mut Vcpu<TestHost>, gva: u64, write: bool) -> Seen {
    access_at(v, gva, write, true)
}

/// [`access`] at CPL 3 (`user`) or CPL 0.
#[allow(dead_code)] // not every test file that includes `common` uses both privilege levels
pub fn access_at(v: &mut Vcpu<TestHost>, gva: u64, write: bool, user: bool) -> Seen {
    access_with(v, gva, write, false, user)
}

/// [`access_at`] that may also be an instruction fetch (`exec`: FETCH in the error code).
#[allow(dead_code)] // not every test file that includes `common` fetches
pub fn access_with(v: &mut Vcpu<TestHost>, gva: u64, write: bool, exec: bool, user: bool) -> Seen {
    let w = if write { Access::WRITE } else { Access::NONE };
    let x = if exec { w.union(Access::EXEC) } else { w };
    let need = if user { x.union(Access::USER) } else { x };
    for _ in 0..50 {
        v.service_requests().unwrap();
        if v.enter_guest_mode().is_err() {
            continue; // a request arrived meanwhile (e.g. the flush of the reload itself)
        }
        let walk = v.walk_gva(Gva(gva), need);
        v.exit_guest_mode();
        let user_write = if user { PfErr::USER } else { 0 }
            | if write { PfErr::WRITE } else { 0 }
            | if exec { PfErr::FETCH } else { 0 };
        let err = match walk {
            HwWalk::Translated { pfn, .. } => return Seen::Ram(pfn),
            HwWalk::Violation { present, .. } => {
                user_write | if present { PfErr::PRESENT } else { 0 }
            }
            HwWalk::Misconfig { .. } => user_write | PfErr::RSVD | PfErr::PRESENT,
            HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
        };
        match v.handle_page_fault(Gva(gva), PfErr(err)).unwrap() {
            FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_) => {}
            FaultOutcome::Emulate { gpa, source, .. } => return Seen::Mmio(gpa, source),
            FaultOutcome::GuestPageFault { error_code, addr } => {
                assert_eq!(addr, Gva(gva));
                return Seen::GuestPf(error_code.0);
            }
        }
    }
    panic!("access to {gva:#x} did not complete");
}

/// GVA 0x4000_0000 mapped to `target` in `s`, and its last-level guest table mapped as data at
/// GVA 0x5000_0000 so that the guest can edit it: the gPTE's gpa.
#[allow(dead_code)] // not every test file that includes `common` maps its own tables
pub fn map_with_own_table(s: &Space, target: u64) -> u64 {
    let pte_gpa = s.map4k(0x4000_0000, target, P | RW | US);
    s.map4k(0x5000_0000, pte_gpa & !0xfff, P | RW | US);
    pte_gpa
}

pub fn vcpu_in(vm: &Vm<TestHost>, cpu: GuestCpu) -> Vcpu<TestHost> {
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(cpu).unwrap();
    v
}

/// The hardware walk of a user access to `gva` by `v` (a write if `write`), no fault handled. A
/// request may arrive between servicing and entry (e.g. the flush of a reload): service again.
pub fn hw(v: &mut Vcpu<TestHost>, gva: u64, write: bool) -> HwWalk {
    loop {
        v.service_requests().unwrap();
        if v.enter_guest_mode().is_ok() {
            break;
        }
    }
    let need = if write { Access::WRITE.union(Access::USER) } else { Access::USER };
    let walk = v.walk_gva(Gva(gva), need);
    v.exit_guest_mode();
    walk
}
