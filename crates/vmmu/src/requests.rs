//! A vCPU's mode and pending requests, in one atomic word (KVM: `vcpu->mode` and
//! `vcpu->requests`, plus the kick that makes a vCPU in guest mode notice).
//!
//! Layout of the word: bit 31 = `IN_GUEST_MODE`; bits 0..=30 = request bits ([`Request`]).
//!
//! # Protocol (why one word)
//! KVM keeps mode and requests apart and orders them with full barriers (a Dekker pattern: the
//! vCPU stores its mode then reads requests, the requester sets a request then reads the mode).
//! Here both live in one word and both sides use read-modify-writes on it, so the two events are
//! totally ordered in the word's modification order, without relying on SeqCst:
//! - vCPU entering guest mode: `fetch_or(IN_GUEST_MODE, AcqRel)`; if the old value had requests,
//!   it leaves at once (clears the bit) and handles them before entering again. So a request made
//!   before the entry is always seen at entry.
//! - requester: `fetch_or(req, AcqRel)`; if the old value had `IN_GUEST_MODE`, the vCPU may be
//!   using state the request invalidates (a TLB entry), so a waiting requester spins until the
//!   word shows the vCPU outside guest mode or the request handled (bit cleared). If the vCPU was
//!   outside guest mode, it will see the request at its next entry: nothing to wait for.
//! - vCPU leaving guest mode: `fetch_and(!IN_GUEST_MODE, Release)`: what it did in guest mode
//!   (reads through its TLB) happens before the requester's observing RMW (Acquire).
//! - vCPU handling a request: `fetch_and(!req, AcqRel)` after acting on it (flushing the TLB).
//!
//! This is the remote-TLB-flush contract of issue 4: a zap that removed present leaves returns only
//! after every vCPU has acknowledged or was outside guest mode. loom model `loom_tlb_flush` checks it.

use crate::sync::{AtomicU32, Ordering, Relax};

/// The vCPU is in guest mode (it may be using its TLB and walking the tables).
const IN_GUEST_MODE: u32 = 1 << 31;

/// A request to a vCPU (KVM `KVM_REQ_*`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum Request {
    /// Flush the vCPU's TLB (KVM `KVM_REQ_TLB_FLUSH`).
    TlbFlush = 1 << 0,
    /// Drop obsolete roots and load a valid one (KVM `KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`).
    FreeObsoleteRoots = 1 << 1,
    /// Just leave guest mode (KVM `kvm_vcpu_kick` with no request): the MMU waits for a grace
    /// period that the vCPU's guest-mode read section holds up.
    Kick = 1 << 2,
}

/// The set of pending requests, as returned to the vCPU.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Requests(u32);

impl Requests {
    /// Whether `r` is pending.
    #[inline]
    pub const fn has(self, r: Request) -> bool {
        self.0 & r as u32 != 0
    }
    /// Whether nothing is pending.
    #[inline]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// One vCPU's mode and request word. Shared between the vCPU thread and requesters. On a cache
/// line of its own: each vCPU changes its word on every guest entry and exit, and neighbours
/// sharing a line would bounce it between their CPUs.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct VcpuState {
    word: AtomicU32,
    /// The vCPU holds the MMU lock's shared side (`mmu_core::lock`): written only by this vCPU, on
    /// this vCPU's line.
    mmu_mark: AtomicU32,
}

impl VcpuState {
    /// A vCPU outside guest mode with nothing pending.
    pub fn new() -> Self {
        VcpuState { word: AtomicU32::new(0), mmu_mark: AtomicU32::new(0) }
    }

    /// The vCPU's MMU-lock mark (see `mmu_core::lock`).
    #[inline]
    pub(crate) fn mmu_mark(&self) -> &AtomicU32 {
        &self.mmu_mark
    }

    /// A new owner of the vCPU index: outside guest mode, nothing pending.
    ///
    /// A read-modify-write, not a store: a kick that a grace period's nudge made on the index
    /// just before (`Srcu::synchronize_nudging`) is read by the swap, which so synchronises with
    /// the nudge's counter bump, and the new vCPU's first read section sees that bump (its
    /// snapshot is not older than the grace period, which then does not wait for it). A plain
    /// store could erase the kick with nothing ordering the new vCPU after the bump (found with
    /// loom: `tests/loom_new_vcpu.rs`).
    pub(crate) fn reset(&self) {
        self.word.swap(0, Ordering::AcqRel);
    }

    /// vCPU side: try to enter guest mode. `Err(pending)` if requests are pending: the vCPU stays
    /// outside guest mode and must handle them first.
    #[inline]
    pub fn enter_guest_mode(&self) -> Result<(), Requests> {
        let old = self.word.fetch_or(IN_GUEST_MODE, Ordering::AcqRel);
        debug_assert!(old & IN_GUEST_MODE == 0, "entered guest mode twice");
        let reqs = old & !IN_GUEST_MODE;
        if reqs != 0 {
            self.word.fetch_and(!IN_GUEST_MODE, Ordering::Release);
            return Err(Requests(reqs));
        }
        Ok(())
    }

    /// vCPU side: leave guest mode (a VM exit).
    #[inline]
    pub fn exit_guest_mode(&self) {
        let old = self.word.fetch_and(!IN_GUEST_MODE, Ordering::Release);
        debug_assert!(old & IN_GUEST_MODE != 0, "left guest mode while outside it");
    }

    /// vCPU side: the pending requests (without clearing them).
    #[inline]
    pub fn pending(&self) -> Requests {
        Requests(self.word.load(Ordering::Acquire) & !IN_GUEST_MODE)
    }

    /// vCPU side: mark `r` handled, after acting on it.
    #[inline]
    pub fn clear(&self, r: Request) {
        self.word.fetch_and(!(r as u32), Ordering::AcqRel);
    }

    /// Whether the vCPU is in guest mode now (a snapshot, for stats and tests).
    pub fn in_guest_mode(&self) -> bool {
        self.word.load(Ordering::Acquire) & IN_GUEST_MODE != 0
    }

    /// Requester side: make `r` pending. Returns whether the vCPU was in guest mode at that
    /// moment (then it may still be using what the request invalidates).
    #[inline]
    pub fn request(&self, r: Request) -> bool {
        self.word.fetch_or(r as u32, Ordering::AcqRel) & IN_GUEST_MODE != 0
    }

    /// Requester side: whether the vCPU is in guest mode with `r` still pending, so that it must
    /// be kicked to see it. A vCPU outside guest mode cannot enter while `r` is pending, and one
    /// that handled `r` needs nothing; a kick of one that left and entered again since is only
    /// spurious.
    pub fn needs_kick(&self, r: Request) -> bool {
        let w = self.word.load(Ordering::Acquire);
        w & IN_GUEST_MODE != 0 && w & r as u32 != 0
    }

    /// Requester side: wait until the vCPU is outside guest mode or has handled `r`. Call after
    /// [`Self::request`] (it returns at once if either holds already).
    pub fn wait_ack(&self, r: Request, relax: &impl Relax) {
        loop {
            // RMW read (see the module doc): ordered after the vCPU's exit or clear.
            let w = self.word.fetch_add(0, Ordering::AcqRel);
            if w & IN_GUEST_MODE == 0 || w & r as u32 == 0 {
                return;
            }
            relax.relax();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::Spin;

    #[test]
    fn request_before_entry_blocks_entry() {
        let s = VcpuState::new();
        assert!(!s.request(Request::TlbFlush), "vCPU was outside guest mode");
        let pending = s.enter_guest_mode().unwrap_err();
        assert!(pending.has(Request::TlbFlush));
        assert!(!s.in_guest_mode(), "a vCPU with pending requests must not enter");
        s.clear(Request::TlbFlush);
        assert!(s.enter_guest_mode().is_ok());
        assert!(s.in_guest_mode());
    }

    #[test]
    fn request_in_guest_mode_reports_it_and_ack_by_exit() {
        let s = VcpuState::new();
        s.enter_guest_mode().unwrap();
        assert!(s.request(Request::TlbFlush), "vCPU was in guest mode");
        s.exit_guest_mode();
        s.wait_ack(Request::TlbFlush, &Spin); // returns: outside guest mode
        assert!(s.pending().has(Request::TlbFlush), "still pending until handled");
    }

    #[test]
    fn ack_by_clear_while_in_guest_mode() {
        let s = VcpuState::new();
        s.enter_guest_mode().unwrap();
        s.request(Request::FreeObsoleteRoots);
        s.clear(Request::FreeObsoleteRoots);
        s.wait_ack(Request::FreeObsoleteRoots, &Spin);
        assert!(s.in_guest_mode());
    }
}
