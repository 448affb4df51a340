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
//!
//! Retries: an access retries for as long as a memslot request of the test's host thread is in
//! flight (a MOVE or DELETE makes the slot invalid first, and KVM's faults wait for it), however
//! long a loaded host keeps that thread off the CPU; only retries outside requests count towards
//! the machine's livelock limit (`hw_vcpu::RETRY_LIMIT`), as in the machine's own runs.

use super::{setup, MmuChoice, Result, SelftestMmu};
use crate::host::SimHost;
use crate::hw_vcpu::{Attempts, Data, HwVcpu};
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
        let mmu = self.hw.mmu();
        let Some((tlb, tables)) = self.shadow.as_mut() else {
            let mut waits = SlotUpdateWaits(mmu);
            return match self.hw.load_store_with(Gpa(gpa), Width::W8, store, &mut waits) {
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
        let op = RamOp::from_store(store);
        let counts = || !mmu.slot_update_in_flight();
        match shadow_access(&mut self.hw, self.host, tlb, gva, Width::W8, op, counts) {
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

/// A selftest vCPU's retry policy on the TDP MMU (module doc): a retry while a memslot request
/// is in flight waits for it and does not count.
struct SlotUpdateWaits<'a>(&'a RealMmu);

impl Attempts for SlotUpdateWaits<'_> {
    #[inline]
    fn counts(&mut self) -> bool {
        !self.0.slot_update_in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostConfig;
    use crate::hw_vcpu::AccessError;
    use crate::real::RealMmuConfig;
    use crate::seam::{GuestMmu, SlotRequest};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vmmu::spte::FormatKind;
    use vmmu::types::Hva;

    /// [`SlotUpdateWaits`], or every retry counting, with a livelock limit of 10.
    struct Ten<'a>(SlotUpdateWaits<'a>, bool);

    impl Attempts for Ten<'_> {
        fn counts(&mut self) -> bool {
            !self.1 || self.0.counts()
        }
        fn limit(&self) -> u32 {
            10
        }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(10), "{what} never happened");
            std::thread::yield_now();
        }
    }

    #[test]
    fn retries_while_a_slot_request_is_in_flight_wait_for_it_and_count_for_no_livelock() {
        // The window is the slow fault's sleep: a thread kept off the CPU for longer (a loaded
        // 2-core CI machine) finds the move done, which says nothing either way, so that attempt
        // is run again with a longer sleep.
        for hold_ms in [300, 1_000, 3_000, 10_000] {
            if move_in_flight_attempt(Duration::from_millis(hold_ms)) {
                return;
            }
            eprintln!("the {hold_ms} ms window was overrun: trying a longer one");
        }
        panic!("every window was overrun: the checks never ran inside one");
    }

    /// Slot 1 moves while a vCPU's slow host fault in slot 0 holds the memslot read lock, so
    /// the move stays in flight (its slot invalid) for the fault's `hold`: a vCPU's access to
    /// the old place retries all along. Counted, ten retries make a livelock; excused, the
    /// access waits and then exits as MMIO (nothing is there after the move). `false` when the
    /// counted access may have run after the window (no verdict).
    fn move_in_flight_attempt(hold: Duration) -> bool {
        let host = Arc::new(SimHost::new(HostConfig::new(40)).expect("host"));
        let a = host.add_buffer("a", 2 << 20).expect("a");
        let b = host.add_buffer("b", 2 << 20).expect("b");
        let cfg = RealMmuConfig {
            format: FormatKind::Ept,
            phys_bits: 40,
            mmio_caching: true,
            vcpus: 3,
            generation_base: 0,
            slot_zap_all: false,
            bugs: vmmu::bugs::BugSet::NONE,
            tdp_prefetch: false,
            shadow_mmio_path_only: false,
            shadow_pages: None,
        };
        let mmu = &RealMmu::new(host.clone(), cfg).expect("mmu");
        let slot = |id: u32, gpa: u64, hva: Hva| SlotRequest {
            slot: id,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 2 << 20,
            userspace_addr: hva.raw(),
        };
        mmu.set_memory_region(&slot(0, 0, a.hva())).expect("slot 0");
        mmu.set_memory_region(&slot(1, 0x20_0000, b.hva())).expect("slot 1");
        host.set_slow_translations(Some((a.hva(), Hva(a.hva().raw() + 0x1000), hold)));
        assert!(!mmu.slot_update_in_flight());
        let generation = || mmu.vm().memslots().generation(vmmu::AsId(0)).expect("AS 0");
        let before_move = generation();
        // The slow fault starts after this, so its read section lasts at least until
        // `started + hold`.
        let started = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut hw = HwVcpu::new(mmu, &host, 0, 8);
                hw.enter_guest();
                hw.load_store(Gpa(0), Width::W8, None)
            });
            wait_for("the slow fault", || host.slow_translation_entered());
            let mover = s.spawn(|| mmu.set_memory_region(&slot(1, 0x40_0000, b.hva())));
            // Not `slot_update_in_flight`, which counts the request before the MMU starts it:
            // a fault before the move publishes its invalid slot maps the old slot's RAM, as
            // KVM's does. Published, the move waits for the slow fault.
            wait_for("the move's invalid slot", || generation() != before_move);
            let mut hw = HwVcpu::new(mmu, &host, 2, 8);
            hw.enter_guest();
            let counted = hw.load_store_with(
                Gpa(0x20_0000),
                Width::W8,
                None,
                &mut Ten(SlotUpdateWaits(mmu), false),
            );
            let in_flight = mmu.slot_update_in_flight();
            let inside = started.elapsed() < hold;
            if inside {
                assert_eq!(
                    counted,
                    Data::Error(AccessError::Livelock { gpa: Gpa(0x20_0000), retries: 10 }),
                    "the move was still in flight"
                );
                assert!(in_flight, "the fault holds the move for {hold:?}");
            }
            let excused = hw.load_store_with(
                Gpa(0x20_0000),
                Width::W8,
                None,
                &mut Ten(SlotUpdateWaits(mmu), true),
            );
            assert_eq!(excused, Data::Mmio);
            assert_eq!(mover.join().expect("mover"), Ok(()));
            assert!(!mmu.slot_update_in_flight());
            inside
        })
    }
}
