//! Embedding the core as a hypervisor would: its own page-table frame pool, its own view of host
//! memory, its own "IPI" to kick a vCPU, and a vCPU loop that enters guest mode, walks the
//! second-level tables like the hardware on a TLB miss, and handles the two exits the MMU cares
//! about: EPT violation and EPT misconfiguration.
//!
//! Run: `cargo run -p vmmu --example embed`. It prints what each guest access ended as and exits
//! non-zero if anything is not what KVM would do (CI runs it).
//!
//! Nothing here uses the crate's test host: a bare-metal hypervisor would replace `std::sync`
//! with its own spin locks and the thread with a physical CPU, and keep the rest
//! (`crates/vmmu-bare` does, without std, and builds for `x86_64-unknown-none`).

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::host::{
    FrameAllocator, HostAccess, HostFault, HostMemory, HostPage, Sched, TableEntries,
    ENTRIES_PER_TABLE,
};
use vmmu::memslot::UserspaceMemoryRegion;
// The core's own types where it takes them (table entries, the host handle): its sync shim's,
// which are loom's when the lint run builds every target under `--cfg loom`.
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, AtomicU64};
use vmmu::tdp::HwWalk;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, FaultAccess, Gpa, Hva, Level, Pfn};

/// The host's physical layout, as the hypervisor knows it: guest RAM's frames start at
/// `RAM_BASE_PFN`, the table pool's at `POOL_BASE_PFN` (both below the 46-bit MAXPHYADDR).
const RAM_BASE_PFN: u64 = 0x1000;
const POOL_BASE_PFN: u64 = 0x10_0000;

/// The hypervisor's host: a fixed pool of table pages, guest RAM in one buffer, and one "IPI
/// pending" flag per vCPU.
struct Host {
    pool: Box<[TableEntries]>,
    live: Box<[AtomicBool]>,
    free: Mutex<Vec<usize>>,
    ram: Box<[u8]>,
    ipi: [AtomicBool; 2],
}

impl Host {
    fn new(pages: usize, ram_bytes: usize) -> Self {
        let pool: Vec<TableEntries> =
            (0..pages).map(|_| std::array::from_fn(|_| AtomicU64::new(0))).collect();
        Host {
            pool: pool.into_boxed_slice(),
            live: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            free: Mutex::new((0..pages).rev().collect()),
            // One page more, so a page-aligned window of `ram_bytes` fits (memslots need it).
            ram: vec![0u8; ram_bytes + 4096].into_boxed_slice(),
            ipi: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }

    /// The host virtual address of guest RAM (where the memslot points): page aligned.
    fn ram_hva(&self) -> u64 {
        (self.ram.as_ptr() as u64 + 0xfff) & !0xfff
    }
}

// SAFETY: pool pages live in a boxed slice that lives as long as the host and never moves; a
// page is handed out only from the free list (so never twice while live) and initialised before
// `alloc_table` returns; `table` answers `None` for numbers outside the pool or not live.
// Type-stable: a freed page stays in the pool, is reused only as a table page, and the only
// stores this host makes into pages (the initialisation) are `Release`. Table memory is never
// guest memory: guest RAM is a separate buffer, not carved from the pool.
unsafe impl FrameAllocator for Host {
    fn type_stable_tables(&self) -> bool {
        // A fixed pool of table pages, as a bare-metal hypervisor keeps: the fast MMIO path's
        // leaf-table cache hit then needs no read section.
        true
    }

    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        let i = self.free.lock().ok()?.pop()?;
        for e in self.pool[i].iter() {
            // Release: type-stable table memory (`FrameAllocator`'s `# Safety`).
            e.store(init, Ordering::Release);
        }
        // Release: the initialised entries are visible to whoever sees the page live.
        self.live[i].store(true, Ordering::Release);
        Some(Pfn(POOL_BASE_PFN + i as u64))
    }

    unsafe fn free_table(&self, pfn: Pfn) {
        let i = (pfn.raw() - POOL_BASE_PFN) as usize;
        self.live[i].store(false, Ordering::Release);
        if let Ok(mut free) = self.free.lock() {
            free.push(i);
        }
    }

    fn table(&self, pfn: Pfn) -> Option<NonNull<TableEntries>> {
        let i = usize::try_from(pfn.raw().checked_sub(POOL_BASE_PFN)?).ok()?;
        let page = self.pool.get(i)?;
        if !self.live.get(i)?.load(Ordering::Acquire) {
            return None;
        }
        debug_assert_eq!(page.len(), ENTRIES_PER_TABLE);
        Some(NonNull::from(page))
    }
}

impl HostMemory for Host {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        let _ = access; // RAM here is always writable: a read and a write map alike.
        let base = self.ram_hva();
        if hva.raw() < base || hva.raw() >= base + self.ram.len() as u64 - 4096 {
            return Err(HostFault::Unmapped(hva));
        }
        // The host frame behind the address (4 KiB pages here).
        let pfn = Pfn(RAM_BASE_PFN + ((hva.raw() - base) >> 12));
        Ok(HostPage { pfn, writable: true, level: Level::L4K })
    }
}

impl Sched for Host {
    fn kick(&self, vcpu_index: usize) {
        // The IPI: the vCPU's "interrupt handler" is its check of this flag between accesses.
        self.ipi[vcpu_index].store(true, Ordering::Release);
    }
}

/// One guest access the way the CPU and the hypervisor's exit handler do it together.
fn access(vcpu: &mut Vcpu<Host>, tlb: &mut HashMap<u64, Pfn>, gpa: u64) -> (String, Vec<String>) {
    let mut exits = Vec::new();
    for _ in 0..16 {
        // Before VM entry: requests (TLB flush, root reload, kicks).
        if vcpu.service_requests().expect("a root").flush_tlb {
            tlb.clear();
        }
        let walk = {
            let Ok(guest) = vcpu.enter_guest() else { continue }; // a request arrived: retry
            if let Some(pfn) = tlb.get(&(gpa >> 12)) {
                return (format!("RAM frame {:#x} (TLB hit)", pfn.raw()), exits);
            }
            guest.walk(Gpa(gpa), Access::NONE)
        }; // VM exit
        let outcome = match walk {
            HwWalk::Translated { pfn, .. } => {
                tlb.insert(gpa >> 12, pfn);
                return (format!("RAM frame {:#x}", pfn.raw()), exits);
            }
            HwWalk::Violation { .. } => {
                exits.push("EPT violation".to_string());
                vcpu.handle_ept_violation(Gpa(gpa), FaultAccess::READ)
            }
            HwWalk::Misconfig { .. } => {
                exits.push("EPT misconfig".to_string());
                vcpu.handle_ept_misconfig(Gpa(gpa))
            }
            HwWalk::Broken { dump } => panic!("the tables reference an unknown frame: {dump}"),
        };
        match outcome {
            Ok(FaultOutcome::Emulate { source, .. }) => {
                return (format!("MMIO, emulated ({source:?})"), exits)
            }
            Ok(other) => exits.push(format!("-> {other:?}")),
            Err(e) => panic!("the vCPU must stop: {e}"),
        }
    }
    panic!("access to {gpa:#x} did not complete: {exits:?}");
}

fn main() {
    let host = Arc::new(Host::new(64, 2 << 20));
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).expect("EPT with 46 physical bits");
    cfg.max_vcpus = 2;
    let vm = Vm::new(cfg, host.clone()).expect("a VM");
    let ram = UserspaceMemoryRegion::new(0, 0, 0, 2 << 20, host.ram_hva());
    vm.set_memory_region(&ram).expect("a RAM slot at gpa 0");
    let mut vcpu = vm.create_vcpu().expect("vCPU 0");
    let mut tlb = HashMap::new();
    let mut failures = 0;
    let mut check = |what: &str, (seen, exits): (String, Vec<String>), want: &str| {
        println!("{what:<34} {seen:<40} exits: {exits:?}");
        if !seen.contains(want) {
            println!("  expected {want}");
            failures += 1;
        }
    };

    let ram_frame = format!("RAM frame {:#x}", RAM_BASE_PFN + 1);
    check("read RAM at 0x1000", access(&mut vcpu, &mut tlb, 0x1000), &ram_frame);
    check("read it again", access(&mut vcpu, &mut tlb, 0x1000), "TLB hit");
    let slow = format!("{:?}", EmulateSource::SlowPathMmio);
    check("read the APIC at 0xfee00000", access(&mut vcpu, &mut tlb, 0xfee0_0000), &slow);
    let hit = format!("{:?}", EmulateSource::VcpuCacheHit);
    check("read it again", access(&mut vcpu, &mut tlb, 0xfee0_0000), &hit);
    // Other devices, as many as the per-vCPU cache holds: the APIC's entry goes.
    for i in 0..vmmu::vcpu::mmio_cache::ENTRIES as u64 {
        let gpa = 0xfec0_0000 + i * 0x1000;
        check(&format!("read a device at {gpa:#x}"), access(&mut vcpu, &mut tlb, gpa), &slow);
    }
    // No longer cached, but its MMIO SPTE (with the current generation) answers at once.
    let spte_hit = format!("{:?}", EmulateSource::MmioSpteHit);
    check("read the APIC again", access(&mut vcpu, &mut tlb, 0xfee0_0000), &spte_hit);

    // The VMM deletes the RAM slot while the vCPU sits in guest mode: the MMU zaps, flushes, and
    // kicks the vCPU before it frees the unlinked tables; the vCPU's "IPI handler" exits.
    let deleter = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            // A delete: size 0 (KVM ignores the other fields but the slot number).
            vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0))
        })
    };
    vcpu.enter_guest_mode().ok();
    while !deleter.is_finished() {
        if vcpu.requests_pending() || host.ipi[0].swap(false, Ordering::AcqRel) {
            vcpu.exit_guest_mode();
            if vcpu.service_requests().expect("a root").flush_tlb {
                tlb.clear();
            }
            vcpu.enter_guest_mode().ok();
        }
        std::hint::spin_loop();
    }
    vcpu.exit_guest_mode();
    deleter.join().expect("deleter").expect("the delete");
    check("read 0x1000 after the delete", access(&mut vcpu, &mut tlb, 0x1000), &slow);

    if failures > 0 {
        eprintln!("{failures} accesses were not what KVM would do");
        std::process::exit(1);
    }
    println!("ok: every access ended as KVM's MMU would end it");
}
