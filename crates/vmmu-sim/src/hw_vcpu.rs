//! One simulated hardware vCPU: what the CPU does between the guest and the MMU, for every user
//! of the software machine (the workload's vCPU threads in [`crate::machine`], the scenario
//! backend's vCPU threads in [`crate::scenario`], and trace replay).
//!
//! A [`HwVcpu`] owns its MMU state (`GuestMmu::Vcpu`) and its [`Tlb`], and borrows the MMU and
//! the host. One guest access ([`HwVcpu::access`]):
//! 1. poll the MMU's requests (`poll_tlb_flush`: the "IPI" of a remote TLB flush or a kick),
//!    flushing the TLB if asked ([`HwVcpu::poll`]);
//! 2. TLB lookup (a write needs a writable entry);
//! 3. on a miss, the MMU's `translate`: the hardware walk of its tables in guest mode and, on a
//!    violation or misconfiguration, the VM exit into the MMU's entry point (for [`RealMmu`]:
//!    `vmmu::tdp::hw_walk` and `Vcpu::handle_ept_violation` / `handle_ept_misconfig` /
//!    `handle_npf`; the reference MMUs have no tables and answer from their slot map);
//! 4. RAM: the translation goes into the TLB and the access is [`Outcome::Ram`]; MMIO:
//!    [`Outcome::Mmio`] (the caller emulates it: a device, or an exit to userspace, around which
//!    it leaves and re-enters guest mode with [`HwVcpu::exit_guest`] / [`HwVcpu::enter_guest`]);
//!    Retry: back to 1, under the one [retry policy](RETRY_LIMIT).
//!
//! Guest mode is KVM's `vcpu->mode`: [`HwVcpu::enter_guest`] before a run of accesses,
//! [`HwVcpu::exit_guest`] after it and around exits to userspace; while a vCPU is in guest mode,
//! memslot updates and host invalidations wait for it to reach its next poll (see
//! [`crate::seam`]).
//!
//! The TLB hit path takes no lock and allocates nothing.
//!
//! [`RealMmu`]: crate::real::RealMmu

use crate::host::{RamAccessError, SimHost};
use crate::ram::Width;
use crate::seam::{AccessKind, GuestMmu, Translation};
use crate::tlb::{Tlb, TlbEntry, TlbStats};
use vmmu::types::{Gpa, Hva, Pfn};

/// The retry policy (one for every user): retries of one access that the caller does not
/// excuse (see [`Attempts::counts`]) before the access fails as a livelock (a caller that runs
/// alone may set a lower limit: [`Attempts::limit`]). Every 64th counted
/// retry, and every excused one, yields the thread, so a loaded host lets the updater finish.
pub const RETRY_LIMIT: u32 = 1_000_000;

/// Counted retries between two yields.
pub(crate) const YIELD_EVERY: u32 = 64;

/// The retry policy's state for one access: how many retries counted so far (every user of the
/// machine retries through this, so all follow [`RETRY_LIMIT`] and [`YIELD_EVERY`] alike).
#[derive(Debug, Default)]
pub(crate) struct RetryBudget {
    counted: u32,
}

impl RetryBudget {
    /// After an attempt that must be retried; `counts` says whether it counts towards `limit`.
    /// Fails with the count once `limit` counted retries are reached. Yields the CPU every
    /// [`YIELD_EVERY`]th counted retry, and at every excused one: an excused retry waits for a
    /// memslot update in flight, and spinning it would keep the CPU from the updater (preempted
    /// on this CPU, often) for the rest of the time slice.
    pub(crate) fn retried(&mut self, counts: bool, limit: u32) -> Result<(), u32> {
        if !counts {
            std::thread::yield_now();
            return Ok(());
        }
        self.counted += 1;
        if self.counted >= limit {
            return Err(self.counted);
        }
        if self.counted % YIELD_EVERY == 0 {
            std::thread::yield_now();
        }
        Ok(())
    }
}

/// Why an access failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The MMU failed the access (KVM: `KVM_RUN` fails).
    #[error("{0}")]
    Mmu(String),
    /// The MMU translated the access to a frame that is not host RAM.
    #[error("translation of {gpa} to {pfn:?}, which is not a RAM frame")]
    NotRam {
        /// The guest address.
        gpa: Gpa,
        /// The frame the MMU gave.
        pfn: Pfn,
    },
    /// The MMU answered a write with a read-only translation.
    #[error("read-only translation of {gpa} returned for a write")]
    ReadOnlyForWrite {
        /// The guest address.
        gpa: Gpa,
    },
    /// The retry limit was reached.
    #[error("{retries} retries in a row (livelock?) at {gpa}")]
    Livelock {
        /// The guest address.
        gpa: Gpa,
        /// The retries counted (the caller's limit, [`Attempts::limit`]).
        retries: u32,
    },
    /// A data access that is not naturally aligned (it could cross a page).
    #[error("{width:?} access at {gpa} is not naturally aligned")]
    Unaligned {
        /// The guest address.
        gpa: Gpa,
        /// The width.
        width: Width,
    },
}

/// What an access resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Guest RAM: the translation used (from the TLB or just inserted into it).
    Ram(TlbEntry),
    /// Emulated MMIO: the caller sends the access to its bus (KVM: `RET_PF_EMULATE`).
    Mmio,
    /// The access failed.
    Error(AccessError),
}

/// What a load or store did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// RAM at host address `hva`: the value loaded, or the value stored.
    Ram {
        /// The host address accessed.
        hva: Hva,
        /// The value.
        value: u64,
    },
    /// Emulated MMIO: nothing was accessed; the caller emulates it.
    Mmio,
    /// The access failed.
    Error(AccessError),
}

/// Per-attempt hooks of an access, for callers that observe attempts (the machine's oracle
/// stamps each attempt, and excuses retries while a memslot update is in flight). `()` has none.
pub trait Attempts {
    /// Called at the start of every attempt, after the request poll.
    #[inline]
    fn begin(&mut self) {}
    /// Whether the retry that just happened counts towards [`Self::limit`].
    #[inline]
    fn counts(&mut self) -> bool {
        true
    }
    /// Counted retries in a row after which the access fails as a livelock: [`RETRY_LIMIT`],
    /// unless the caller knows that no other thread can end a retry streak (a replay, which
    /// runs one vCPU and applies every event between accesses).
    #[inline]
    fn limit(&self) -> u32 {
        RETRY_LIMIT
    }
}

impl Attempts for () {}

/// A simulated hardware vCPU (module doc).
pub struct HwVcpu<'a, M: GuestMmu> {
    mmu: &'a M,
    host: &'a SimHost,
    state: M::Vcpu,
    tlb: Tlb,
    retries: u64,
    gave_way: u64,
}

impl<'a, M: GuestMmu> HwVcpu<'a, M> {
    /// vCPU `index` of `mmu` (its state made by `create_vcpu`), over `host`, with a TLB of
    /// `tlb_entries` entries.
    pub fn new(mmu: &'a M, host: &'a SimHost, index: usize, tlb_entries: usize) -> Self {
        Self::with_state(mmu, host, mmu.create_vcpu(index), tlb_entries)
    }

    /// As [`HwVcpu::new`], with MMU state made earlier (e.g. on another thread, in vCPU order).
    pub fn with_state(mmu: &'a M, host: &'a SimHost, state: M::Vcpu, tlb_entries: usize) -> Self {
        HwVcpu { mmu, host, state, tlb: Tlb::new(tlb_entries), retries: 0, gave_way: 0 }
    }

    /// Enters guest mode (KVM: `vcpu->mode = IN_GUEST_MODE`; requests are seen at the next poll).
    #[inline]
    pub fn enter_guest(&mut self) {
        self.mmu.enter_guest(&mut self.state);
    }

    /// Leaves guest mode (KVM: `vcpu->mode = OUTSIDE_GUEST_MODE`).
    #[inline]
    pub fn exit_guest(&mut self) {
        self.mmu.exit_guest(&mut self.state);
    }

    /// Between two accesses in guest mode: if a thread waits in the host's wait loop (a memslot
    /// update's grace period, a remote flush), leaves guest mode, yields the CPU once and enters
    /// guest mode again, as a KVM vCPU thread that is scheduled out leaves guest mode
    /// ([`crate::handoff`] says why). Returns whether it gave way. One relaxed load otherwise.
    #[inline]
    pub fn give_way(&mut self) -> bool {
        if !self.host.handoff().someone_waits() {
            return false;
        }
        self.exit_guest();
        std::thread::yield_now();
        self.enter_guest();
        self.gave_way += 1;
        true
    }

    /// Times [`Self::give_way`] gave way.
    pub fn gave_way(&self) -> u64 {
        self.gave_way
    }

    /// Handles the MMU's pending requests and kicks; flushes the TLB if asked and returns whether
    /// it did. Returning is the acknowledgement remote flushes wait for.
    #[inline]
    pub fn poll(&mut self) -> bool {
        let flush = self.mmu.poll_tlb_flush(&mut self.state);
        if flush {
            self.tlb.flush();
        }
        flush
    }

    /// One guest access at `gpa` (module doc), with no per-attempt hooks.
    #[inline]
    pub fn access(&mut self, gpa: Gpa, kind: AccessKind) -> Outcome {
        self.access_with(gpa, kind, &mut ())
    }

    /// One guest access at `gpa`, calling `at` per attempt.
    pub fn access_with(&mut self, gpa: Gpa, kind: AccessKind, at: &mut impl Attempts) -> Outcome {
        let gfn = gpa.gfn();
        let write = kind.is_write();
        let mut budget = RetryBudget::default();
        loop {
            self.poll();
            at.begin();
            if let Some(e) = self.tlb.lookup(gfn, kind) {
                return Outcome::Ram(e);
            }
            match self.mmu.translate(&mut self.state, gpa, kind) {
                Translation::Ram { pfn, writable, level } => {
                    if write && !writable {
                        return Outcome::Error(AccessError::ReadOnlyForWrite { gpa });
                    }
                    if self.host.ram_page(pfn).is_none() {
                        return Outcome::Error(AccessError::NotRam { gpa, pfn });
                    }
                    let e = TlbEntry { pfn, writable, level };
                    self.tlb.insert(gfn, e);
                    return Outcome::Ram(e);
                }
                Translation::Mmio => return Outcome::Mmio,
                Translation::Error(e) => return Outcome::Error(AccessError::Mmu(e)),
                t @ (Translation::Retry | Translation::Fixed) => {
                    // Both walk again and count towards the livelock budget; only a retry is
                    // one (a fixed fault is the normal path of a TLB miss that faulted).
                    if t == Translation::Retry {
                        self.retries += 1;
                    }
                    if let Err(retries) = budget.retried(at.counts(), at.limit()) {
                        return Outcome::Error(AccessError::Livelock { gpa, retries });
                    }
                }
            }
        }
    }

    /// A load (`store == None`) or store of `width` bytes at `gpa`: the access, then the data
    /// access on host RAM. The address must be naturally aligned.
    #[inline]
    pub fn load_store(&mut self, gpa: Gpa, width: Width, store: Option<u64>) -> Data {
        self.load_store_with(gpa, width, store, &mut ())
    }

    /// As [`HwVcpu::load_store`], calling `at` per attempt.
    pub fn load_store_with(
        &mut self,
        gpa: Gpa,
        width: Width,
        store: Option<u64>,
        at: &mut impl Attempts,
    ) -> Data {
        if !width.is_aligned(gpa.0) {
            return Data::Error(AccessError::Unaligned { gpa, width });
        }
        let kind = AccessKind::from_write(store.is_some());
        let e = match self.access_with(gpa, kind, at) {
            Outcome::Ram(e) => e,
            Outcome::Mmio => return Data::Mmio,
            Outcome::Error(e) => return Data::Error(e),
        };
        match self.host.ram_access(e.pfn, gpa.page_offset(), width, store) {
            Ok((hva, value)) => Data::Ram { hva, value },
            // The TLB holds RAM frames only, and the access is aligned (checked above).
            Err(RamAccessError::NotRam(pfn)) => Data::Error(AccessError::NotRam { gpa, pfn }),
            Err(RamAccessError::Misplaced { .. }) => {
                Data::Error(AccessError::Unaligned { gpa, width })
            }
        }
    }

    /// One TLB miss resolved by the MMU, with no TLB lookup, insert or retry (a fault the
    /// caller makes for its own sake, e.g. the wrap trap's slow host fault).
    pub fn translate_once(&mut self, gpa: Gpa, kind: AccessKind) -> Translation {
        self.mmu.translate(&mut self.state, gpa, kind)
    }

    /// The host whose memory this vCPU accesses.
    pub fn host(&self) -> &'a SimHost {
        self.host
    }

    /// The MMU this vCPU runs on.
    pub fn mmu(&self) -> &'a M {
        self.mmu
    }

    /// The MMU's state of this vCPU.
    pub fn state(&mut self) -> &mut M::Vcpu {
        &mut self.state
    }

    /// Retries so far (all of them, counted or excused).
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Counts one retry made outside [`Self::access_with`] (a shadow-paging fault the MMU asked
    /// to retry: `machine_paging::shadow_access`), so [`Self::retries`] covers every MMU.
    pub(crate) fn count_retry(&mut self) {
        self.retries += 1;
    }

    /// The TLB's counters.
    pub fn tlb_stats(&self) -> TlbStats {
        self.tlb.stats()
    }

    /// Gives back the MMU state (leaving guest mode first).
    pub fn into_state(mut self) -> M::Vcpu {
        self.exit_guest();
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostConfig;
    use crate::reference::ReferenceMmu;
    use crate::seam::SlotRequest;
    use std::sync::Arc;

    fn setup() -> (Arc<SimHost>, ReferenceMmu, u64) {
        let host = Arc::new(SimHost::new(HostConfig::new(40)).expect("host"));
        let b = host.add_buffer("b", 0x4000).expect("b");
        let mmu = ReferenceMmu::new(host.clone());
        (host, mmu, b.hva().0)
    }

    fn slot(gpa: u64, hva: u64, flags: u32) -> SlotRequest {
        SlotRequest {
            slot: 1,
            flags,
            guest_phys_addr: gpa,
            memory_size: 0x4000,
            userspace_addr: hva,
        }
    }

    #[test]
    fn a_vcpu_gives_way_only_while_someone_waits() {
        let (host, mmu, _) = setup();
        let mut v = HwVcpu::new(&mmu, &host, 0, 8);
        v.enter_guest();
        assert!(!v.give_way(), "nobody waits");
        let waiting = host.handoff().announce();
        assert!(v.give_way());
        assert!(v.give_way());
        drop(waiting);
        assert!(!v.give_way());
        assert_eq!(v.gave_way(), 2);
    }

    #[test]
    fn retry_budget_counts_only_counted_retries() {
        let mut b = RetryBudget::default();
        for _ in 0..10 {
            assert_eq!(b.retried(false, 3), Ok(()), "excused retries never fail");
        }
        assert_eq!(b.retried(true, 3), Ok(()));
        assert_eq!(b.retried(false, 3), Ok(()));
        assert_eq!(b.retried(true, 3), Ok(()));
        assert_eq!(b.retried(true, 3), Err(3));
    }

    #[test]
    fn ram_through_the_tlb_mmio_and_flushes() {
        let (host, mmu, hva) = setup();
        let mut v = HwVcpu::new(&mmu, &host, 0, 8);
        v.enter_guest();
        assert_eq!(v.access(Gpa(0x100_0000), AccessKind::Read), Outcome::Mmio);
        // Updates made on this thread: outside guest mode, or they would wait for this vCPU.
        v.exit_guest();
        mmu.set_memory_region(&slot(0x100_0000, hva, 0)).expect("slot");
        v.enter_guest();
        let d = v.load_store(Gpa(0x100_1008), Width::W8, Some(0x1234));
        assert_eq!(d, Data::Ram { hva: Hva(hva + 0x1008), value: 0x1234 });
        assert_eq!(
            v.load_store(Gpa(0x100_1008), Width::W4, None),
            Data::Ram { hva: Hva(hva + 0x1008), value: 0x1234 }
        );
        assert_eq!(v.tlb_stats().hits, 1, "the second access hit the TLB");
        v.exit_guest();
        mmu.set_memory_region(&SlotRequest::delete(1)).expect("delete");
        v.enter_guest();
        assert_eq!(v.access(Gpa(0x100_1008), AccessKind::Read), Outcome::Mmio, "flushed");
        assert_eq!(v.tlb_stats().flushes, 2, "created, then deleted");
        let e = v.load_store(Gpa(0x100_1001), Width::W2, None);
        assert!(matches!(e, Data::Error(AccessError::Unaligned { .. })), "{e:?}");
    }

    #[test]
    fn read_only_slots_exit_on_writes() {
        let (host, mmu, hva) = setup();
        mmu.set_memory_region(&slot(0x100_0000, hva, SlotRequest::READONLY)).expect("slot");
        let mut v = HwVcpu::new(&mmu, &host, 0, 8);
        assert!(matches!(v.access(Gpa(0x100_0000), AccessKind::Read), Outcome::Ram(_)));
        assert_eq!(v.access(Gpa(0x100_0000), AccessKind::Write), Outcome::Mmio);
    }

    /// Retries forever; `counts` decides whether the policy counts them.
    struct Forever;
    impl GuestMmu for Forever {
        type Vcpu = ();
        fn create_vcpu(&self, _: usize) {}
        fn set_memory_region(&self, _: &SlotRequest) -> Result<(), vmmu::memslot::MemslotError> {
            Ok(())
        }
        fn translate(&self, _: &mut (), _: Gpa, _: AccessKind) -> Translation {
            Translation::Retry
        }
    }

    struct Excuse(u32);
    impl Attempts for Excuse {
        fn counts(&mut self) -> bool {
            // Excuse the first 1000 retries (an update in flight), then count.
            self.0 += 1;
            self.0 > 1000
        }
    }

    #[test]
    fn one_retry_policy_with_excused_retries() {
        let host = SimHost::new(HostConfig::new(40)).expect("host");
        let mut v = HwVcpu::new(&Forever, &host, 0, 8);
        let o = v.access_with(Gpa(0), AccessKind::Read, &mut Excuse(0));
        assert_eq!(o, Outcome::Error(AccessError::Livelock { gpa: Gpa(0), retries: RETRY_LIMIT }));
        assert_eq!(v.retries(), u64::from(RETRY_LIMIT) + 1000);
    }

    #[test]
    fn a_caller_that_runs_alone_sets_a_lower_limit() {
        struct Alone;
        impl Attempts for Alone {
            fn limit(&self) -> u32 {
                5
            }
        }
        let host = SimHost::new(HostConfig::new(40)).expect("host");
        let mut v = HwVcpu::new(&Forever, &host, 0, 8);
        let o = v.access_with(Gpa(0), AccessKind::Read, &mut Alone);
        assert_eq!(o, Outcome::Error(AccessError::Livelock { gpa: Gpa(0), retries: 5 }));
        assert_eq!(v.retries(), 5);
    }
}
