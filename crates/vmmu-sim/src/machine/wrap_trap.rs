//! The machine's MMIO-generation wrap trap. `wrap_trap` (`vmmu run --wrap-trap`, on the real MMU
//! started with [`super::Machine::wrap_trap_generation_base`]) reaches the MMIO-generation wrap end
//! to end, which needs an MMIO SPTE made 2^19 generations before the wrap, so that its generation
//! bits match again. Nobody but vCPU 0 touches the DIMM. Arm: the static slots end exactly on a
//! wrap (generation bits 0); vCPU 0 sweeps the absent DIMM, leaving an MMIO SPTE with generation
//! bits 0 on each of its pages. The schedule then runs until the DIMM is plugged (dirty-logged, so
//! 4 KiB leaves and one SPTE per page). Age: with the vCPUs paused outside guest mode, the device
//! manager toggles dirty logging on a one-page dummy slot (one generation swap each, no clock tick:
//! the map the vCPUs see does not change) until one swap is left before the next wrap. Spring: vCPU
//! 1 (if there is one) takes a slow host page fault on the dummy slot's page (its only access
//! there, not judged), so the wrapping swap's grace period waits for its memslot read section, as
//! for a vCPU swapping a page in; the device manager makes that last swap and vCPU 0 sweeps the
//! DIMM. An MMU that lets the wrapped generation be seen during the grace period
//! (`no-second-increment`) answers some of those reads from the 2^19-generation-old MMIO SPTEs:
//! MMIO where the DIMM is RAM, a violation. One that shows it only between the final generation's
//! store and the wrap zap (`wrap-hook-after-publish`) shows it to the same sweep, which starts
//! once the final generation is visible: the machine's host preempts the updater for a few
//! milliseconds at the wrap, before its zap (`PreemptPoint::MmioGenerationWrap`; a correct MMU
//! is there before it makes the generation visible). The arm costs one sweep, the age about
//! 2^19 swaps (about 0.3 s here).

use super::vcpu::access;
use super::{Shared, VcpuCounters};
use crate::hw_vcpu::HwVcpu;
use crate::layout::MachineLayout;
use crate::mix::{GuestAccess, MixKind};
use crate::oracle::VcpuChecker;
use crate::ram::Width;
use crate::seam::{GuestMmu, SlotRequest};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};
use vmmu::types::{Generation, Gpa, Hva, PAGE_SIZE};

/// The hold handshake between the device manager and vCPU 1.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(super) enum Hold {
    /// Nothing asked (vCPU 1 sets it back after its fault).
    Idle = 0,
    /// Device manager: fault on the dummy slot's page now (its host translation is slow).
    Ask = 1,
}

/// How long the holder's host page fault lasts during the spring.
pub(super) const HOLD_TIME: Duration = Duration::from_millis(20);

/// The sweep handshake between the device manager and vCPU 0.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(super) enum Sweep {
    /// Nothing asked, or the sweep is done (vCPU 0 sets it back).
    Idle = 0,
    /// Device manager: sweep the DIMM now (arm).
    Arm = 1,
    /// Device manager: get ready to sweep on [`Sweep::Go`] (spring).
    Spring = 2,
    /// vCPU 0: ready, waiting for [`Sweep::Go`].
    Ready = 3,
    /// Device manager: go (it starts the wrapping swap right after).
    Go = 4,
    /// vCPU 0: sweeping.
    Busy = 5,
}

/// A two-party handshake word holding a `T` ([`Sweep`], [`Hold`]).
///
/// Ordering: every access is `SeqCst`. Each store hands the other party a step, and what a
/// step relies on is published by other atomics with their own orderings (the memslot
/// generation the sweep waits for, the host's slow-translation flag, `paused`), so the handshake
/// needs no more than a single total order of its own steps; `SeqCst` gives it without an
/// argument per site.
pub(super) struct Handshake<T> {
    word: AtomicU8,
    _state: core::marker::PhantomData<T>,
}

impl<T: Copy + PartialEq + Into<u8>> Handshake<T> {
    /// A handshake in state `s`.
    pub(super) fn new(s: T) -> Self {
        Handshake { word: AtomicU8::new(s.into()), _state: core::marker::PhantomData }
    }

    /// Whether it is in state `s`.
    pub(super) fn is(&self, s: T) -> bool {
        self.word.load(Ordering::SeqCst) == s.into()
    }

    /// Moves it to state `s`.
    pub(super) fn set(&self, s: T) {
        self.word.store(s.into(), Ordering::SeqCst);
    }

    /// Moves it from `from` to `to` if it is in `from`; whether it did.
    pub(super) fn advance(&self, from: T, to: T) -> bool {
        self.word
            .compare_exchange(from.into(), to.into(), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

impl From<Sweep> for u8 {
    fn from(s: Sweep) -> u8 {
        s as u8
    }
}

impl From<Hold> for u8 {
    fn from(h: Hold) -> u8 {
        h as u8
    }
}

/// The wrap trap's dummy slot: id, GPA (nothing else is there; only the spring's holder,
/// vCPU 1, accesses it).
pub(super) const TRAP_SLOT: u16 = 12;
pub(super) const TRAP_GPA: u64 = 0x3000_0000;

/// vCPU 0 of a wrap-trap run: one sweep of the DIMM (one 8-byte read per page) when the device
/// manager asks, right away (arm) or on its go (spring).
pub(super) fn sweep_dimm<'o, M: GuestMmu>(
    sh: &Shared<'_, M>,
    layout: &MachineLayout,
    hw: &mut HwVcpu<'_, M>,
    c: &mut VcpuCounters,
    checker: &mut VcpuChecker<'o>,
) {
    if sh.sweep.advance(Sweep::Spring, Sweep::Ready) {
        // Spring: wait for the go, then for the wrapping swap to publish a final (not in
        // progress) generation; sweeping earlier would only replace traps (their generation
        // does not match yet). A correct MMU zaps them before it publishes that generation.
        let before = sh.mmu.generation();
        while !sh.sweep.is(Sweep::Go)
            || sh.mmu.generation() & Generation::UPDATE_IN_PROGRESS != 0
            || sh.mmu.generation() == before
        {
            if sh.stop.load(Ordering::Relaxed) {
                return;
            }
            // Still a vCPU: it answers requests (flushes, kicks) while it waits.
            hw.poll();
        }
        sh.sweep.set(Sweep::Busy);
    } else if !sh.sweep.advance(Sweep::Arm, Sweep::Busy) {
        return;
    }
    let d = &layout.dimm;
    for page in 0..d.size / PAGE_SIZE {
        let a = GuestAccess {
            kind: MixKind::DimmRead,
            gpa: Gpa(d.gpa.0 + page * PAGE_SIZE),
            width: Width::W8,
            value: 0,
        };
        let (seen, start, end) = access(sh, hw, c, &a);
        checker.check(&a, &seen, start, end);
    }
    sh.sweep.set(Sweep::Idle);
}

/// Moves the sweep handshake to `ask` and waits until it reads `until` (or the run stops).
fn sweep_handshake<M: GuestMmu>(sh: &Shared<'_, M>, ask: Sweep, until: Sweep) -> bool {
    sh.sweep.set(ask);
    while !sh.sweep.is(until) {
        if sh.stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// The wrap trap's arm (module doc): only if the generation sits exactly on a wrap.
pub(super) fn arm_wrap_trap<M: GuestMmu>(
    sh: &Shared<'_, M>,
    t: &mut crate::report::WrapTrapReport,
) {
    let gen = sh.mmu.generation();
    t.armed_at = gen;
    if gen == 0 || gen & Generation::MMIO_GEN_MASK != 0 {
        return;
    }
    t.armed = sweep_handshake(sh, Sweep::Arm, Sweep::Idle);
}

/// The wrap trap's age and spring (module doc).
pub(super) fn spring_wrap_trap<M: GuestMmu>(
    sh: &Shared<'_, M>,
    slot: SlotRequest,
    t: &mut crate::report::WrapTrapReport,
) {
    let mut flags = 0;
    let swap = |t: &mut crate::report::WrapTrapReport, flags: u32| {
        t.swaps += 1;
        sh.mmu.set_memory_region(&SlotRequest { flags, ..slot }).is_ok()
    };
    if !swap(t, flags) {
        return;
    }
    let last = Generation::MMIO_GEN_MASK;
    sh.paused.store(true, Ordering::SeqCst);
    let _resume = Resume(sh.paused);
    loop {
        let left = last - (sh.mmu.generation() & last);
        if left == 0 {
            break;
        }
        for i in 0..left {
            flags ^= SlotRequest::LOG_DIRTY_PAGES;
            if !swap(t, flags) || (i % 1024 == 0 && sh.stop.load(Ordering::Relaxed)) {
                return;
            }
        }
    }
    sh.paused.store(false, Ordering::SeqCst);
    if !sweep_handshake(sh, Sweep::Spring, Sweep::Ready) {
        return;
    }
    // vCPU 1 (if any) holds the memslot read lock in a slow host page fault across the
    // wrapping swap, as a vCPU swapping a page in would: the swap's grace period waits for it.
    sh.host.set_slow_translations(Some((
        Hva(slot.userspace_addr),
        Hva(slot.userspace_addr + PAGE_SIZE),
        HOLD_TIME,
    )));
    if sh.has_holder {
        sh.hold.set(Hold::Ask);
        // Bounded: without the holder the trap still springs, only with a shorter window.
        let asked = Instant::now();
        while !sh.host.slow_translation_entered() && asked.elapsed() < HOLD_TIME {
            if sh.stop.load(Ordering::Relaxed) {
                sh.host.set_slow_translations(None);
                return;
            }
            std::thread::yield_now();
        }
    }
    sh.sweep.set(Sweep::Go);
    flags ^= SlotRequest::LOG_DIRTY_PAGES;
    t.sprung = swap(t, flags);
    sh.host.set_slow_translations(None);
    t.sprung_at = sh.mmu.generation();
    while (!sh.sweep.is(Sweep::Idle) || !sh.hold.is(Hold::Idle)) && !sh.stop.load(Ordering::Relaxed)
    {
        std::thread::yield_now();
    }
}

/// Unpauses the vCPUs when dropped (however the wrap trap's age ends).
struct Resume<'a>(&'a AtomicBool);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
