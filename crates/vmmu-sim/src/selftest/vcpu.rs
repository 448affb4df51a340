//! A selftest's vCPU: the simulated hardware vCPU, and how its guest code reaches
//! guest-physical memory on the MMU the test runs on.
//!
//! The C tests' guests address guest-physical memory through page tables that KVM's selftest
//! library builds in slot 0 (identity maps). On the TDP MMU the machine's accesses are
//! guest-physical already. On the shadow MMU (KVM with TDP off, as `/dev/kvm` on a nested host)
//! the guest's own tables are what the MMU shadows, so a vCPU here reaches a guest-physical
//! address through a guest-virtual one that maps it one to one: without paging (GVA = GPA, a
//! special root of direct shadow pages) when all of the test's memory lies below 4 GiB, else in
//! long mode on identity tables ([`IdentityTables`], 1 GiB pages) in a slot the test does not use
//! ([`guest_tables`]), with a TLB of guest-virtual pages filled by the shadow walks.
//!
//! Invariant: on the shadow MMU every address a test accesses is below 4 GiB, or inside the
//! ranges its tables were built for; an access elsewhere fails with a message (the CPU's #GP, or
//! "the tables map nothing there"), never reaches other memory.

use super::{setup, MmuChoice, Result, SelftestMmu};
use crate::host::SimHost;
use crate::hw_vcpu::{Data, HwVcpu};
use crate::machine_paging::{shadow_access, GvaTlb, RamOp, ShadowAccess};
use crate::ram::Width;
use crate::real::RealMmu;
use crate::replay::identity::{nonpaging_cpu, IdentityTables, NONPAGING_LIMIT};
use crate::seam::{AccessKind, GuestMmu, Translation};
use vmmu::Gpa;

/// The host MAXPHYADDR of every selftest VM (the C tests' x86-64 default).
pub(crate) const PHYS_BITS: u8 = 46;

/// The identity tables a test's shadow-MMU guest needs to reach `ranges` (guest-physical
/// `[start, end)`), with their slot installed; `None` on the TDP MMU and when every range lies
/// below 4 GiB (the guest runs without paging).
pub(crate) fn guest_tables(
    m: &MmuChoice,
    mmu: &RealMmu,
    host: &SimHost,
    ranges: &[(u64, u64)],
) -> Result<Option<IdentityTables>> {
    if m.mmu != SelftestMmu::Shadow || ranges.iter().all(|&(_, end)| end <= NONPAGING_LIMIT) {
        return Ok(None);
    }
    let tables = IdentityTables::for_ranges(ranges, host, PHYS_BITS).map_err(setup)?;
    mmu.vm().set_internal_memory_region(&tables.region).map_err(|e| {
        setup(format!("the guest page-table slot {:?} was refused: {e}", tables.region))
    })?;
    Ok(Some(tables))
}

/// vCPUs `0..n` of `mmu`, each with a TLB of `tlb_entries` and its guest set up on `tables`
/// ([`SelftestVcpu::new`]), made here in vCPU order to be moved to their threads.
pub(crate) fn selftest_vcpus<'a>(
    mmu: &'a RealMmu,
    host: &'a SimHost,
    n: usize,
    tlb_entries: usize,
    tables: Option<&'a IdentityTables>,
) -> Result<Vec<SelftestVcpu<'a>>> {
    (0..n)
        .map(|i| {
            let hw = HwVcpu::with_state(mmu, host, mmu.create_vcpu(i), tlb_entries);
            SelftestVcpu::new(hw, host, tables)
        })
        .collect()
}

/// What one 8-byte guest access did.
pub(crate) enum Reached {
    /// RAM at this host address: the value loaded, or the value stored.
    Ram {
        /// The host address accessed.
        hva: u64,
        /// The value.
        value: u64,
    },
    /// An MMIO exit: nothing was accessed.
    Mmio,
    /// The access failed (the message says how).
    Failed(String),
}

/// A selftest's vCPU (module doc).
pub(crate) struct SelftestVcpu<'a> {
    hw: HwVcpu<'a, RealMmu>,
    host: &'a SimHost,
    /// On the shadow MMU: the guest-virtual TLB, and the identity tables when the guest pages.
    shadow: Option<(GvaTlb, Option<&'a IdentityTables>)>,
}

impl<'a> SelftestVcpu<'a> {
    /// Sets `hw`'s guest up for the MMU it runs on: on the shadow MMU in long mode on `tables`
    /// (CR3 loaded), or without paging when there are none; on the TDP MMU nothing (`tables`
    /// must then be `None`, as [`guest_tables`] gives).
    pub(crate) fn new(
        mut hw: HwVcpu<'a, RealMmu>,
        host: &'a SimHost,
        tables: Option<&'a IdentityTables>,
    ) -> Result<Self> {
        let mmu = hw.mmu();
        let Some(v) = mmu.shadow_vcpu(hw.state()) else {
            if tables.is_some() {
                return Err(setup("identity tables for a vCPU of the TDP MMU"));
            }
            return Ok(SelftestVcpu { hw, host, shadow: None });
        };
        match tables {
            None => v.set_guest_cpu(nonpaging_cpu(PHYS_BITS)).map_err(setup)?,
            Some(t) => {
                v.set_guest_cpu(t.guest_cpu()).map_err(setup)?;
                v.load_cr3(t.cr3).map_err(setup)?;
            }
        }
        Ok(SelftestVcpu { hw, host, shadow: Some((GvaTlb::default(), tables)) })
    }

    /// Enters guest mode.
    pub(crate) fn enter_guest(&mut self) {
        self.hw.enter_guest();
    }

    /// Leaves guest mode.
    pub(crate) fn exit_guest(&mut self) {
        self.hw.exit_guest();
    }

    /// One 8-byte load (`store == None`) or store at guest-physical `gpa` (8-aligned).
    pub(crate) fn load_store8(&mut self, gpa: u64, store: Option<u64>) -> Reached {
        let Some((tlb, tables)) = self.shadow.as_mut() else {
            return match self.hw.load_store(Gpa(gpa), Width::W8, store) {
                Data::Ram { hva, value } => Reached::Ram { hva: hva.raw(), value },
                Data::Mmio => Reached::Mmio,
                Data::Error(e) => Reached::Failed(e.to_string()),
            };
        };
        let Some(gva) = tables.map_or(Some(gpa), |t| t.gva(gpa)) else {
            return Reached::Failed(format!(
                "the guest's identity tables map nothing at guest-physical {gpa:#x}"
            ));
        };
        // Every retry counts towards the livelock limit, as the TDP path's own accesses do.
        let op = RamOp::from_store(store);
        match shadow_access(&mut self.hw, self.host, tlb, gva, Width::W8, op, || true) {
            ShadowAccess::Ram { hva, value } => Reached::Ram { hva: hva.raw(), value },
            ShadowAccess::Mmio(_) => Reached::Mmio,
            ShadowAccess::PageFault(e) => {
                Reached::Failed(format!("guest page fault at {gva:#x} (error code {e:#x})"))
            }
            ShadowAccess::Error(e) => Reached::Failed(e),
        }
    }

    /// One guest store or load of 8 bytes at `gpa`: RAM must be at one of `want_hva`; an MMIO
    /// exit is handled by `mmio` (which may refuse it with a message) after leaving guest mode,
    /// as `KVM_RUN` returning does.
    pub(crate) fn access8(
        &mut self,
        gpa: u64,
        store: Option<u64>,
        want_hva: &[u64],
        mmio: &mut dyn FnMut(u64, AccessKind) -> std::result::Result<u64, String>,
    ) -> std::result::Result<u64, String> {
        match self.load_store8(gpa, store) {
            Reached::Ram { hva, value } => {
                if !want_hva.contains(&hva) {
                    let want: Vec<String> =
                        want_hva.iter().filter(|&&h| h != 0).map(|h| format!("{h:#x}")).collect();
                    return Err(format!(
                        "guest {} of gpa {gpa:#x} reached host address {hva:#x}, the memslots map \
                         it to {} (a stale translation)",
                        if store.is_some() { "write" } else { "read" },
                        if want.is_empty() { "nothing".to_string() } else { want.join(" or ") }
                    ));
                }
                Ok(value)
            }
            Reached::Mmio => {
                self.exit_guest();
                let v = mmio(gpa, AccessKind::from_write(store.is_some()));
                self.enter_guest();
                v
            }
            Reached::Failed(e) => Err(format!("guest access at gpa {gpa:#x} failed: {e}")),
        }
    }

    /// Where the MMU's tables lead a read of `gpa` now, with no TLB (for a failure message: tells
    /// a stale TLB entry from a stale SPTE). The TDP MMU's tables are walked by guest-physical
    /// address; the shadow MMU's by the guest-virtual address that maps it.
    pub(crate) fn fresh_translation(&mut self, gpa: u64) -> String {
        let Some((_, tables)) = self.shadow.as_ref() else {
            return match self.hw.translate_once(Gpa(gpa), AccessKind::Read) {
                Translation::Ram { pfn, level, .. } => {
                    let page = self.host.ram_page(pfn).map_or(0, |p| p.as_ptr() as u64);
                    format!("host page {page:#x} (level {level:?})")
                }
                other => format!("{other:?}"),
            };
        };
        let Some(gva) = tables.map_or(Some(gpa), |t| t.gva(gpa)) else {
            return "nothing (the identity tables do not map it)".into();
        };
        let mmu = self.hw.mmu();
        match mmu.shadow_vcpu(self.hw.state()) {
            Some(v) if v.in_guest_mode() => {
                format!("{:?}", v.walk_gva(vmmu::Gva(gva), vmmu::Access::USER))
            }
            Some(_) => "unknown (the vCPU is outside guest mode)".into(),
            None => "no shadow vCPU".into(),
        }
    }
}
