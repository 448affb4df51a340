//! The vCPU threads of the scenario backend: what one simulated vCPU does for each job the
//! driver sends it, in the three ways a scenario can run:
//! - `Plain` (version 1, TDP): the guest-physical access through [`HwVcpu`];
//! - `TdpPaging` (version 2 with `format=ept|npt`): the simulated hardware walks the guest's
//!   tables, each table access translated through the second-level tables (a two-dimensional
//!   walk: every table read is a guest-physical load through [`HwVcpu`], and may fault into the
//!   MMU), then the data access at the translated guest-physical address;
//! - `Shadow` (`format=shadow`): the hardware walks the shadow tables by guest-virtual address;
//!   #PF exits go to the MMU's shadow entry points; a write the MMU write-protects (a guest page
//!   table) is emulated here and reported with `track_write`.
//!
//! No vCPU caches guest-virtual translations in a TLB of its own: every step after a `map`,
//! `unmap` or `cr3` sees the change, which the format promises (the guest invalidates every
//! vCPU after each change).

use crate::host::SimHost;
use crate::hw_vcpu::{Data, HwVcpu};
use crate::machine_paging::{finish_shadow_walk, RamOp, ShadowWalkStep};
use crate::ram::Width as RamWidth;
use crate::real::{RealMmu, RealVcpu};
use std::cell::RefCell;
use std::sync::mpsc::{Receiver, Sender};
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::guest::{GpteWriteError, GuestCpu, GuestPteMemory, PagingMode, WalkError};
use vmmu::{Access as Rights, AsId, FaultAccess, Gpa, Gva};

/// What a vCPU thread is asked to do.
pub(crate) enum Job {
    /// One guest access at the address the guest uses (gpa with paging off, else gva).
    Access { addr: u64, width: RamWidth, write: Option<u64>, reply: Sender<Result<Access, String>> },
    /// The guest stores these page-table entries (8 bytes each, in order).
    TableWrites { writes: Vec<(u64, u64)>, reply: Sender<Result<(), String>> },
    /// INVLPG of `pages` 4 KiB pages from a guest-virtual address up (the KVM backend's loop for
    /// more than one), in a routine of its own or at the end of the one that made the table
    /// writes.
    Invlpg { gva: u64, pages: u32, routine: InvlpgRoutine, reply: Sender<Result<(), String>> },
    /// MOV CR3: by the guest's own routine (`guest`: with the VM entries around it), or the
    /// loader's initial CR3 (no entry: the vCPU's first one loads the root).
    Cr3 { cr3: u64, guest: bool, reply: Sender<Result<(), String>> },
}

/// Where a vCPU's INVLPG of a shootdown runs (the KVM backend's CPL0 routines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InvlpgRoutine {
    /// A routine of its own (the other vCPUs): a VM entry, then the INVLPG.
    Own,
    /// The end of the routine that made the table writes (vCPU 0), then one more VM entry that
    /// settles the requests the writes made (a flooded root is replaced within the step).
    AfterTableWrites,
}

/// What one guest access did.
pub(crate) enum Access {
    /// RAM: the value loaded (or stored).
    Ram(u64),
    /// An MMIO exit at this guest-physical address.
    Mmio(u64),
    /// A guest page fault.
    PageFault { gva: u64, error: u64 },
}

/// How a vCPU thread runs its accesses.
pub(crate) enum Mode {
    /// Version 1 on a TDP MMU.
    Plain,
    /// Guest paging on a TDP MMU.
    TdpPaging(GuestCpu),
    /// Shadow paging.
    Shadow(GuestCpu),
}

/// Runs jobs until the driver hangs up.
pub(crate) fn vcpu_thread(
    mmu: &RealMmu,
    host: &SimHost,
    state: RealVcpu,
    mode: Mode,
    jobs: Receiver<Job>,
) {
    match mode {
        Mode::Plain | Mode::TdpPaging(_) => {
            let mut cpu = match mode {
                Mode::TdpPaging(c) => Some(c),
                _ => None,
            };
            let hw = RefCell::new(HwVcpu::with_state(mmu, host, state, 64));
            while let Ok(job) = jobs.recv() {
                match job {
                    Job::Access { addr, width, write, reply } => {
                        let r = tdp_access(&hw, cpu.as_ref(), addr, width, write);
                        let _ = reply.send(r);
                    }
                    Job::TableWrites { writes, reply } => {
                        let r = writes.iter().try_for_each(|&(gpa, v)| {
                            match gpa_access(&hw, gpa, RamWidth::W8, Some(v)) {
                                Ok(Access::Ram(_)) => Ok(()),
                                _ => Err(format!("guest page-table store at {gpa:#x} failed")),
                            }
                        });
                        let _ = reply.send(r);
                    }
                    // No guest-virtual TLB: nothing to invalidate.
                    Job::Invlpg { reply, .. } => {
                        let _ = reply.send(Ok(()));
                    }
                    Job::Cr3 { cr3, reply, .. } => {
                        let r = match cpu.as_mut() {
                            Some(c) => load_cr3_tdp(&hw, c, cr3),
                            None => Err("cr3 without guest paging".into()),
                        };
                        let _ = reply.send(r);
                    }
                }
            }
        }
        Mode::Shadow(cpu) => shadow_thread(mmu, host, state, cpu, jobs),
    }
}

/// A guest-physical access through the TDP MMU.
fn gpa_access(
    hw: &RefCell<HwVcpu<'_, RealMmu>>,
    gpa: u64,
    width: RamWidth,
    write: Option<u64>,
) -> Result<Access, String> {
    let mut hw = hw.borrow_mut();
    hw.enter_guest();
    let r = match hw.load_store(Gpa(gpa), width, write) {
        Data::Ram { value, .. } => Ok(Access::Ram(value)),
        Data::Mmio => Ok(Access::Mmio(gpa)),
        Data::Error(e) => Err(e.to_string()),
    };
    hw.exit_guest();
    r
}

/// Guest tables read through the second-level tables (the two-dimensional walk).
struct TwoDimensional<'h, 'a> {
    hw: &'h RefCell<HwVcpu<'a, RealMmu>>,
}

impl GuestPteMemory for TwoDimensional<'_, '_> {
    fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
        match gpa_access(self.hw, gpa.raw(), RamWidth::W8, None) {
            Ok(Access::Ram(v)) => Some(v),
            _ => None,
        }
    }

    fn cmpxchg_gpte(&self, gpa: Gpa, old: u64, new: u64) -> Result<bool, GpteWriteError> {
        // One vCPU runs at a time in a scenario: load, compare and store cannot interleave with
        // another guest store.
        match gpa_access(self.hw, gpa.raw(), RamWidth::W8, None) {
            Ok(Access::Ram(v)) if v != old => Ok(false),
            Ok(Access::Ram(_)) => match gpa_access(self.hw, gpa.raw(), RamWidth::W8, Some(new)) {
                Ok(Access::Ram(_)) => Ok(true),
                _ => Err(GpteWriteError::NotWritable),
            },
            _ => Err(GpteWriteError::Unreadable),
        }
    }
}

fn load_cr3_tdp(
    hw: &RefCell<HwVcpu<'_, RealMmu>>,
    cpu: &mut GuestCpu,
    cr3: u64,
) -> Result<(), String> {
    if let PagingMode::Pae { .. } = cpu.mode {
        let pdptrs = vmmu::guest::load_pdptrs(&TwoDimensional { hw }, cr3, cpu.maxphyaddr)
            .map_err(|e| format!("loading the PAE PDPTEs failed (#GP for the guest): {e}"))?;
        cpu.mode = PagingMode::Pae { pdptrs };
    }
    cpu.cr3 = cr3;
    Ok(())
}

fn user_access(write: bool) -> FaultAccess {
    FaultAccess { write, exec: false, user: true }
}

fn tdp_access(
    hw: &RefCell<HwVcpu<'_, RealMmu>>,
    cpu: Option<&GuestCpu>,
    addr: u64,
    width: RamWidth,
    write: Option<u64>,
) -> Result<Access, String> {
    let Some(cpu) = cpu else {
        return gpa_access(hw, addr, width, write);
    };
    let mem = TwoDimensional { hw };
    match vmmu::guest::walk(cpu, &mem, Gva(addr), user_access(write.is_some())) {
        Ok(w) => gpa_access(hw, w.gpa.raw(), width, write),
        Err(WalkError::PageFault(pf)) => {
            Ok(Access::PageFault { gva: pf.addr.raw(), error: pf.error_code.0 })
        }
        Err(e) => Err(e.to_string()),
    }
}

fn shadow_thread(
    mmu: &RealMmu,
    host: &SimHost,
    mut state: RealVcpu,
    cpu: GuestCpu,
    jobs: Receiver<Job>,
) {
    let set = state.vcpu_mut().set_guest_cpu(cpu).map_err(|e| e.to_string());
    while let Ok(job) = jobs.recv() {
        let v = state.vcpu_mut();
        match job {
            Job::Access { addr, width, write, reply } => {
                let r = match &set {
                    Ok(()) => shadow_access(mmu, host, v, addr, width, write),
                    Err(e) => Err(e.clone()),
                };
                let _ = reply.send(r);
            }
            // The guest's own routines (table stores, INVLPG, MOV CR3) run in guest mode as the
            // KVM backend's CPL0 code does: each starts with a VM entry, which loads a root
            // if the vCPU has none (KVM `kvm_mmu_reload`: after a CR3 switch to a space no
            // previous root holds, or after its root was zapped), and MOV CR3 is followed by
            // another entry (the routine goes on to its sync store), which loads the new root.
            // Table stores and the INVLPG after them are one routine on vCPU 0, followed by one
            // more entry (the KVM backend's settling run): a root the stores flooded is replaced
            // there, after the INVLPG and within the step. (Without that entry KVM's host
            // decides: its emulator usually runs the routine to its end, and the new root came
            // with vCPU 0's next step, but a reschedule in between makes an entry earlier.)
            // A root takes a shadow page, may recycle others to make room, and pins itself:
            // when that happens decides which pages KVM recycles (paging_cr3_root_at_entry.scn).
            Job::TableWrites { writes, reply } => {
                // The guest's stores: a store to a shadowed (write-protected) table exits and is
                // emulated, one to any other table goes straight to RAM; either way the bytes
                // land in guest memory and the MMU learns of it through `track_write` (which
                // changes nothing where nothing is shadowed; it counts `mmu_pte_write` for every
                // store while the VM has indirect pages, as KVM counts the emulator's writes, and
                // on the reference host the emulator runs this CPL0 routine).
                let r = entry(v).and_then(|()| {
                    writes.iter().try_for_each(|&(gpa, value)| {
                        host_store(mmu, host, gpa, RamWidth::W8, value)?;
                        v.track_write(Gpa(gpa), 8).map_err(|e| e.to_string())
                    })
                });
                let _ = reply.send(r);
            }
            Job::Invlpg { gva, pages, routine, reply } => {
                let invlpg = |v: &mut vmmu::vcpu::Vcpu<SimHost>| {
                    (0..u64::from(pages.max(1)))
                        .try_for_each(|i| v.invlpg(Gva(gva + (i << 12))))
                        .map_err(|e| e.to_string())
                };
                let r = match routine {
                    InvlpgRoutine::Own => entry(v).and_then(|()| invlpg(v)),
                    InvlpgRoutine::AfterTableWrites => invlpg(v).and_then(|()| entry(v)),
                };
                let _ = reply.send(r);
            }
            Job::Cr3 { cr3, guest, reply } => {
                let guest_entry = |v: &mut vmmu::vcpu::Vcpu<SimHost>| match guest {
                    true => entry(v),
                    false => Ok(()),
                };
                let r = guest_entry(v)
                    .and_then(|()| v.load_cr3(cr3).map(|_| ()).map_err(|e| e.to_string()))
                    .and_then(|()| guest_entry(v));
                let _ = reply.send(r);
            }
        }
    }
}

/// A VM entry of the guest's own routines: pending requests handled and a root loaded, as
/// before any guest instruction runs.
fn entry(v: &mut vmmu::vcpu::Vcpu<SimHost>) -> Result<(), String> {
    v.service_requests().map(|_| ()).map_err(|e| e.to_string())
}

/// A store by the emulator into guest RAM at `gpa` (through the current memslots).
fn host_store(
    mmu: &RealMmu,
    host: &SimHost,
    gpa: u64,
    width: RamWidth,
    value: u64,
) -> Result<(), String> {
    let hva = mmu
        .vm()
        .gfn_to_hva(AsId(0), Gpa(gpa).gfn())
        .ok_or_else(|| format!("no memslot maps {gpa:#x}"))?;
    let at = vmmu::Hva(hva.raw() + Gpa(gpa).page_offset());
    let (buf, off) = host.locate(at).ok_or_else(|| format!("{at} is not a host buffer"))?;
    buf.write(off, width, value).map_err(|e| e.to_string())
}

fn shadow_access(
    mmu: &RealMmu,
    host: &SimHost,
    v: &mut vmmu::vcpu::Vcpu<SimHost>,
    gva: u64,
    width: RamWidth,
    write: Option<u64>,
) -> Result<Access, String> {
    let need = if write.is_some() { Rights::WRITE.union(Rights::USER) } else { Rights::USER };
    for _ in 0..1000 {
        v.service_requests().map_err(|e| e.to_string())?;
        if v.enter_guest_mode().is_err() {
            continue;
        }
        let walk = v.walk_gva(Gva(gva), need);
        v.exit_guest_mode();
        let err = match finish_shadow_walk(host, walk, gva, width, RamOp::from_store(write))? {
            ShadowWalkStep::Ram { value, .. } => return Ok(Access::Ram(value)),
            ShadowWalkStep::Fault(err) => err,
        };
        match v.handle_page_fault(Gva(gva), err).map_err(|e| e.to_string())? {
            FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_) => {}
            FaultOutcome::GuestPageFault { addr, error_code } => {
                return Ok(Access::PageFault { gva: addr.raw(), error: error_code.0 })
            }
            FaultOutcome::Emulate { gpa, source: EmulateSource::WriteProtected, .. } => {
                // The emulator performs the store to the guest table and reports it.
                let val = write.ok_or("a read exited as a write-protection fault")?;
                host_store(mmu, host, gpa.raw(), width, val)?;
                v.track_write(gpa, width.bytes() as u32).map_err(|e| e.to_string())?;
                return Ok(Access::Ram(val));
            }
            FaultOutcome::Emulate { gpa, .. } => return Ok(Access::Mmio(gpa.raw())),
        }
    }
    Err(format!("access to {gva:#x} did not complete after 1000 faults"))
}
