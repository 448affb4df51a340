//! The hypervisor's exit handling and the scenarios it runs: one vCPU loop for TDP (EPT or NPT
//! exits) and one for shadow paging (#PF exits), memslot create / move / delete, dirty logging,
//! a kick, and tear-down. Every function here is `no_std`: the bare-metal binary and the hosted
//! test run the same code.

use crate::host::{BareHost, RAM_HVA};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};
use vmmu::fault::{EmulateSource, FaultOutcome, PfErr};
use vmmu::guest::GuestCpu;
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gpa, Gva, Pfn, SlotId};

/// What a guest access ended as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Ended {
    /// The hardware walk translated it to this host frame.
    Ram(Pfn),
    /// The hypervisor emulates it as MMIO; the MMU says why.
    Mmio(EmulateSource),
    /// Shadow paging: the guest's own tables refuse it; inject #PF with this error code.
    GuestPageFault(PfErr),
}

/// Why the embedder stopped. `Display` without `std`, as a bare-metal panic handler or serial
/// log needs it.
#[derive(Debug)]
pub enum BareError {
    /// The core refused or failed something.
    Vmmu(vmmu::Error),
    /// An access did not complete after many exits.
    Livelock(u64),
    /// The MMU's tables named a frame the host does not know.
    Broken,
    /// Something was not what KVM would do.
    Unexpected(&'static str),
}

impl fmt::Display for BareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BareError::Vmmu(e) => write!(f, "vmmu: {e}"),
            BareError::Livelock(a) => write!(f, "access to {a:#x} never completed"),
            BareError::Broken => f.write_str("the MMU's tables reference an unknown frame"),
            BareError::Unexpected(what) => write!(f, "unexpected: {what}"),
        }
    }
}

impl core::error::Error for BareError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            BareError::Vmmu(e) => Some(e),
            _ => None,
        }
    }
}

impl<E: Into<vmmu::Error>> From<E> for BareError {
    fn from(e: E) -> Self {
        BareError::Vmmu(e.into())
    }
}

fn check(ok: bool, what: &'static str) -> Result<(), BareError> {
    if ok {
        Ok(())
    } else {
        Err(BareError::Unexpected(what))
    }
}

/// The per-CPU state of the CPU that runs a vCPU: its TLB, as far as this embedder models it
/// (one flag: whether it may hold translations). CPU-local, owned by the CPU's loop.
#[derive(Default)]
pub struct Cpu {
    /// Index of the physical CPU (and of the vCPU it runs).
    pub index: usize,
    /// TLB flushes done for the MMU's requests.
    pub flushes: usize,
}

impl Cpu {
    /// Before VM entry: the MMU's requests (a TLB flush, a new root).
    fn service(&mut self, vcpu: &mut Vcpu<BareHost>) -> Result<(), BareError> {
        if vcpu.service_requests()?.flush_tlb {
            // INVEPT / INVLPGA here.
            self.flushes += 1;
        }
        Ok(())
    }
}

/// One guest-physical access of a TDP vCPU: enter, let the "hardware" walk, and on an exit call
/// the MMU's entry point for it (EPT violation / misconfiguration, or #NPF with its error code).
pub fn tdp_access(
    cpu: &mut Cpu,
    vcpu: &mut Vcpu<BareHost>,
    gpa: u64,
    write: bool,
) -> Result<Ended, BareError> {
    let need = if write { Access::WRITE } else { Access::NONE };
    let fa = if write { FaultAccess::WRITE } else { FaultAccess::READ };
    let npt = vcpu.format().kind() == FormatKind::Npt;
    for _ in 0..64 {
        cpu.service(vcpu)?;
        let walk = match vcpu.enter_guest() {
            Ok(guest) => guest.walk(Gpa(gpa), need),
            Err(_) => continue, // a request arrived between service and entry
        }; // VM exit: the guard's drop leaves guest mode
        let outcome = match walk {
            HwWalk::Translated { pfn, .. } => return Ok(Ended::Ram(pfn)),
            HwWalk::Violation { present, .. } if npt => {
                vcpu.handle_npf(Gpa(gpa), PfErr::from_access(fa, false).with_present(present))?
            }
            HwWalk::Violation { .. } => vcpu.handle_ept_violation(Gpa(gpa), fa)?,
            HwWalk::Misconfig { .. } if npt => {
                vcpu.handle_npf(Gpa(gpa), PfErr::from_access(fa, true))?
            }
            HwWalk::Misconfig { .. } => vcpu.handle_ept_misconfig(Gpa(gpa))?,
            HwWalk::Broken { .. } => return Err(BareError::Broken),
        };
        match outcome {
            FaultOutcome::Emulate { source, .. } => return Ok(Ended::Mmio(source)),
            FaultOutcome::GuestPageFault { .. } => {
                return Err(BareError::Unexpected("a guest #PF from a TDP fault"))
            }
            FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_) => {}
        }
    }
    Err(BareError::Livelock(gpa))
}

/// One guest-virtual access of a shadow-paging vCPU: the "hardware" walks the shadow tables, a
/// #PF exit goes to [`Vcpu::handle_page_fault`].
pub fn shadow_access(
    cpu: &mut Cpu,
    vcpu: &mut Vcpu<BareHost>,
    gva: u64,
    write: bool,
) -> Result<Ended, BareError> {
    let need = if write { Access::WRITE } else { Access::NONE };
    let err = if write { PfErr(PfErr::WRITE) } else { PfErr(0) };
    for _ in 0..64 {
        cpu.service(vcpu)?;
        let walk = match vcpu.enter_guest() {
            Ok(guest) => guest.walk_gva(Gva(gva), need),
            Err(_) => continue,
        };
        let outcome = match walk {
            HwWalk::Translated { pfn, .. } => return Ok(Ended::Ram(pfn)),
            HwWalk::Violation { present, .. } => {
                vcpu.handle_page_fault(Gva(gva), err.with_present(present))?
            }
            HwWalk::Misconfig { .. } => {
                vcpu.handle_page_fault(Gva(gva), PfErr(err.0 | PfErr::RSVD))?
            }
            HwWalk::Broken { .. } => return Err(BareError::Broken),
        };
        match outcome {
            FaultOutcome::Emulate { source, .. } => return Ok(Ended::Mmio(source)),
            FaultOutcome::GuestPageFault { error_code, .. } => {
                return Ok(Ended::GuestPageFault(error_code))
            }
            FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_) => {}
        }
    }
    Err(BareError::Livelock(gva))
}

/// Small helper: `PfErr` with the present bit as the walk found it.
trait WithPresent {
    fn with_present(self, present: bool) -> Self;
}

impl WithPresent for PfErr {
    fn with_present(self, present: bool) -> Self {
        if present {
            PfErr(self.0 | PfErr::PRESENT)
        } else {
            self
        }
    }
}

/// What a scenario saw, for the caller to print or assert on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Accesses that ended in RAM.
    pub ram: usize,
    /// Accesses emulated as MMIO.
    pub mmio: usize,
    /// #PFs injected into the guest.
    pub guest_page_faults: usize,
    /// Pages a dirty-log GET returned.
    pub dirty_pages: Vec<u64>,
    /// Table pages still live after the VM was torn down (must be 0).
    pub leaked_tables: usize,
}

impl Summary {
    fn count(&mut self, e: Ended) -> Ended {
        match e {
            Ended::Ram(_) => self.ram += 1,
            Ended::Mmio(_) => self.mmio += 1,
            Ended::GuestPageFault(_) => self.guest_page_faults += 1,
        }
        e
    }
}

/// Guest RAM per scenario: 4 MiB.
pub const RAM_BYTES: u64 = 4 << 20;
/// Table pages per host.
pub const POOL_PAGES: usize = 256;

/// A host for one scenario (table pool, RAM, two CPUs).
pub fn new_host() -> Arc<BareHost> {
    Arc::new(BareHost::new(POOL_PAGES, RAM_BYTES, 2))
}

/// A configuration whose memslots may name the hypervisor's own (higher-half) addresses.
fn bare_config(mut cfg: VmConfig) -> VmConfig {
    cfg.max_vcpus = 2;
    cfg.user_va_limit = u64::MAX;
    cfg
}

/// A TDP VM (EPT or NPT): RAM and MMIO faults, the MMIO cache, a slot move, dirty logging, a
/// delete, and tear-down with every table page given back.
pub fn tdp_scenario(format: FormatKind) -> Result<Summary, BareError> {
    let host = new_host();
    let mut s = Summary::default();
    {
        let vm = Vm::new(bare_config(VmConfig::new(format, 46)?), host.clone())?;
        let mut cpu = Cpu::default();
        let mut vcpu = vm.create_vcpu()?;
        // Slot 0: 2 MiB of RAM at gpa 0.
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 2 << 20, RAM_HVA))?;
        let ram1 = s.count(tdp_access(&mut cpu, &mut vcpu, 0x1000, false)?);
        check(ram1 == Ended::Ram(Pfn(crate::host::RAM_BASE_PFN + 1)), "RAM at gpa 0x1000")?;
        let apic = s.count(tdp_access(&mut cpu, &mut vcpu, 0xfee0_0000, false)?);
        check(apic == Ended::Mmio(EmulateSource::SlowPathMmio), "first APIC access: slow path")?;
        let again = s.count(tdp_access(&mut cpu, &mut vcpu, 0xfee0_0000, false)?);
        check(again == Ended::Mmio(EmulateSource::VcpuCacheHit), "second: per-vCPU cache hit")?;

        // Move slot 0 to gpa 1 GiB: the old range is MMIO now, the new one RAM.
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 1 << 30, 2 << 20, RAM_HVA))?;
        let old = s.count(tdp_access(&mut cpu, &mut vcpu, 0x1000, false)?);
        check(matches!(old, Ended::Mmio(_)), "the slot's old gpa after the move")?;
        let new = s.count(tdp_access(&mut cpu, &mut vcpu, (1 << 30) + 0x1000, false)?);
        check(new == ram1, "the same frame at the slot's new gpa")?;

        // Dirty logging: turn it on (a flags-only change), write two pages, GET.
        let logged =
            UserspaceMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 1 << 30, 2 << 20, RAM_HVA);
        vm.set_memory_region(&logged)?;
        for page in [3u64, 7] {
            s.count(tdp_access(&mut cpu, &mut vcpu, (1 << 30) + page * 4096, true)?);
        }
        // Into a fixed buffer (no allocation): 2 MiB is 512 pages, 8 words.
        let mut bitmap = [0u64; 8];
        let n = vm.get_dirty_log_into(AsId(0), SlotId(0), &mut bitmap)?;
        s.dirty_pages = vmmu::dirty::pages_of(&bitmap[..n]).collect();
        // The GET write-protected them again: the next write faults and logs again.
        s.count(tdp_access(&mut cpu, &mut vcpu, (1 << 30) + 7 * 4096, true)?);
        let n = vm.get_dirty_log_into(AsId(0), SlotId(0), &mut bitmap)?;
        check(vmmu::dirty::pages_of(&bitmap[..n]).eq([7]), "the second GET: page 7 only")?;

        // Delete (size 0), with the vCPU out of guest mode on this CPU.
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0))?;
        let gone = s.count(tdp_access(&mut cpu, &mut vcpu, (1 << 30) + 0x1000, false)?);
        check(matches!(gone, Ended::Mmio(_)), "RAM of a deleted slot")?;
        // Tear-down: the vCPU, then the VM's last handle.
    }
    s.leaked_tables = host.live_tables();
    Ok(s)
}

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;

/// A shadow-paging VM: the guest's 4-level tables in RAM, a RAM access, an access its tables do
/// not map (a #PF for the guest), an MMIO access through its tables, a slot delete, tear-down.
pub fn shadow_scenario() -> Result<Summary, BareError> {
    let host = new_host();
    let mut s = Summary::default();
    // Guest tables: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; gva 0x40_0000 + 4 KiB
    // * i maps gpa 0x10_0000 + 4 KiB * i, and gva 0x60_0000 (PD entry 3, a 2 MiB page) maps
    // the APIC's gpa 0xfee0_0000 (no memslot: MMIO).
    host.write_ram(0x1000, 0x2000 | P | RW | US);
    host.write_ram(0x2000, 0x3000 | P | RW | US);
    host.write_ram(0x3000 + 2 * 8, 0x4000 | P | RW | US);
    host.write_ram(0x3000 + 3 * 8, 0xfee0_0000 | P | RW | US | (1 << 7));
    for i in 0..16u64 {
        host.write_ram(0x4000 + i * 8, (0x10_0000 + (i << 12)) | P | RW | US);
    }
    {
        let vm = Vm::new(bare_config(VmConfig::shadow(46)?), host.clone())?;
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, RAM_BYTES, RAM_HVA))?;
        let mut cpu = Cpu::default();
        let mut vcpu = vm.create_vcpu()?;
        vcpu.set_guest_cpu(GuestCpu::long4(0x1000, 46))?;
        vcpu.load_cr3(0x1000)?;
        let r = s.count(shadow_access(&mut cpu, &mut vcpu, 0x40_1000, true)?);
        check(r == Ended::Ram(Pfn(crate::host::RAM_BASE_PFN + 0x101)), "gva 0x401000 in RAM")?;
        // The walker set A and D in the guest's PTE (through `GuestMemory::cmpxchg_u64`).
        check(host.read_ram(0x4000 + 8) & 0x60 == 0x60, "A/D bits in the guest PTE")?;
        let pf = s.count(shadow_access(&mut cpu, &mut vcpu, 0x7000_0000, false)?);
        check(matches!(pf, Ended::GuestPageFault(_)), "an unmapped gva: #PF for the guest")?;
        let mmio = s.count(shadow_access(&mut cpu, &mut vcpu, 0x60_0000, false)?);
        check(matches!(mmio, Ended::Mmio(_)), "the APIC through the guest's tables")?;
        // Deleting the slot under the guest's own tables: the next walk cannot read them.
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0))?;
        let after = shadow_access(&mut cpu, &mut vcpu, 0x40_1000, false);
        check(!matches!(after, Ok(Ended::Ram(_))), "no RAM once the slot is gone")?;
    }
    s.leaked_tables = host.live_tables();
    Ok(s)
}

/// The vCPU side of a kick: the CPU sits in guest mode (as a vCPU that never faults does) until
/// `stop`, taking its IPI when one comes: the VM exit, the MMU's requests, and entry again. As
/// on hardware it does not poll [`Vcpu::requests_pending`]: without the MMU's kick it would
/// never leave guest mode, and a memslot delete would wait forever. Run
/// it on the CPU that runs the vCPU while another CPU updates the memslots; it sets `entered`
/// once it is in guest mode. Returns the IPIs taken.
pub fn sit_in_guest(
    cpu: &mut Cpu,
    host: &BareHost,
    vcpu: &mut Vcpu<BareHost>,
    entered: &AtomicBool,
    stop: &AtomicBool,
) -> Result<usize, BareError> {
    let mut ipis = 0;
    cpu.service(vcpu)?;
    while vcpu.enter_guest_mode().is_err() {
        cpu.service(vcpu)?;
    }
    entered.store(true, Ordering::Release);
    while !stop.load(Ordering::Acquire) {
        // Only the IPI gets a CPU out of guest mode: the guest runs, nobody polls requests.
        if host.take_ipi(cpu.index) || !vcpu.in_guest_mode() {
            ipis += 1;
            vcpu.exit_guest_mode();
            cpu.service(vcpu)?;
            let _ = vcpu.enter_guest_mode();
        }
        core::hint::spin_loop();
    }
    vcpu.exit_guest_mode();
    Ok(ipis)
}

/// Everything a single CPU can run (the bare-metal binary's `_start`): both TDP formats and
/// shadow paging. Returns the summaries.
pub fn run_all() -> Result<[Summary; 3], BareError> {
    Ok([tdp_scenario(FormatKind::Ept)?, tdp_scenario(FormatKind::Npt)?, shadow_scenario()?])
}
