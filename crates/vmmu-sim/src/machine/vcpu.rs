//! A vCPU thread of the machine: batches of accesses from its mix in guest mode, each one
//! translated by the MMU (or through the vCPU's guest page tables), performed on RAM or on the
//! MMIO bus, and judged by the vCPU's checker (the steps in the parent module's doc).

use super::wrap_trap::{sweep_dimm, HOLD_ASK, HOLD_IDLE, TRAP_GPA};
use super::{MachineConfig, Shared, VcpuCounters, SHARED_RAM_OFFSET};
use crate::bus::BusOutcome;
use crate::host::SimHost;
use crate::hw_vcpu::{Attempts, Data, HwVcpu};
use crate::layout::MachineLayout;
use crate::machine_paging::{
    shadow_access, PagingEvent, RamOp, ShadowAccess, Shootdown, VcpuPaging,
};
use crate::migration::Recorder;
use crate::mix::{AccessGen, GuestAccess, MixKind, MixWeights};
use crate::mmio_timing::elapsed_ns;
use crate::oracle::{Clock, Observed, VcpuChecker};
use crate::ram::Width;
use crate::seam::{AccessKind, GuestMmu};
use crate::timeline::new_histogram;
use crate::tlb::TlbStats;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmmu::fault::PfErr;
use vmmu::types::{Access, Gpa, Pfn};

pub(super) type VcpuResult<'o> = (VcpuCounters, TlbStats, VcpuChecker<'o>);

/// What a vCPU thread gets: the shared state, the configuration, the layout, its index, its MMU
/// state, its checker and its progress counter.
pub(super) type VcpuArgs<'a, 's, 'o, M> = (
    &'a Shared<'s, M>,
    &'a MachineConfig,
    &'a MachineLayout,
    usize,
    <M as GuestMmu>::Vcpu,
    VcpuChecker<'o>,
    &'a AtomicU64,
);

pub(super) fn vcpu_thread<'o, M: GuestMmu>(
    (sh, cfg, layout, index, state, mut checker, progress): VcpuArgs<'_, '_, 'o, M>,
    mut recorder: Option<Recorder<'_>>,
    tables: Option<(Arc<crate::host::HostBuffer>, Arc<Shootdown>)>,
) -> VcpuResult<'o> {
    let mut hw = HwVcpu::with_state(sh.mmu, sh.host, state, cfg.tlb_entries);
    let shadow = sh.mmu.shadow_vcpu(hw.state()).is_some();
    let shootdown = tables.as_ref().map(|(_, sd)| sd.clone());
    let shared_ram = layout.shared.gpa.0 + SHARED_RAM_OFFSET;
    let shared_ram_hva = sh.host.buffer(layout.shared.name).map(|b| b.hva().0 + SHARED_RAM_OFFSET);
    let mut paging = match tables.map(|(buf, _)| buf) {
        Some(buf) => match VcpuPaging::new(buf, layout, index, cfg.vcpus, cfg.seed, shadow) {
            Ok(mut p) => {
                if let Some(v) = sh.mmu.shadow_vcpu(hw.state()) {
                    if let Err(e) = v.set_guest_cpu(p.cpu()) {
                        checker.note_error(&format!("guest paging setup: {e}"));
                    }
                }
                p.counters = Default::default();
                Some(p)
            }
            Err(e) => {
                checker.note_error(&format!("guest paging setup: {e}"));
                None
            }
        },
        None => None,
    };
    let spinner = cfg.stress_paths && cfg.vcpus >= 3 && index == cfg.vcpus - 1;
    let sweeper = cfg.wrap_trap && index == 0;
    let mut weights = if spinner {
        MixWeights::PRIVATE_ONLY
    } else if cfg.stress_paths && cfg.weights == MixWeights::default() {
        MixWeights::STRESS
    } else {
        cfg.weights
    };
    if cfg.wrap_trap {
        // Only the sweeps touch the DIMM: any other touch would replace a trap SPTE.
        weights.0[10] = 0;
    }
    let mut gen = AccessGen::new(layout, index, cfg.seed, weights).with_hot_spots(cfg.stress_paths);
    let mut c =
        VcpuCounters { mmio_latency: cfg.timeline.then(new_histogram), ..VcpuCounters::default() };
    let live = &sh.live[index];
    let body = catch_unwind(AssertUnwindSafe(|| {
        while !sh.stop.load(Ordering::Relaxed) {
            if sh.paused.load(Ordering::Relaxed) {
                hw.exit_guest();
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            hw.enter_guest();
            if sweeper {
                sweep_dimm(sh, layout, &mut hw, &mut c, &mut checker);
            }
            if cfg.wrap_trap && index == 1 && sh.hold.load(Ordering::SeqCst) == HOLD_ASK {
                // The holder: one fault on the dummy slot's page, whose host translation is
                // slow; the outcome is the machine's business, not the guest's, so it is not
                // judged (no vCPU accesses that GPA otherwise).
                let _ = hw.translate_once(Gpa(TRAP_GPA), AccessKind::Read);
                sh.hold.store(HOLD_IDLE, Ordering::SeqCst);
            }
            if let Some(p) = paging.as_mut() {
                match p.between_batches(&mut hw) {
                    Ok(PagingEvent::Access(a, gva)) => {
                        let (seen, start, end) = paged_access(sh, &mut hw, &mut c, &a, gva, p);
                        checker.check(&a, &seen, start, end);
                    }
                    Ok(PagingEvent::Unmapped(gva)) => {
                        let a = GuestAccess {
                            kind: MixKind::PrivateRead,
                            gpa: Gpa(0),
                            width: crate::ram::Width::W8,
                            value: 0,
                        };
                        let (seen, _, _) = paged_access(sh, &mut hw, &mut c, &a, gva, p);
                        checker.check_page_fault(gva, PfErr::USER, &seen);
                    }
                    Ok(PagingEvent::None) => {}
                    Err(e) => checker.note_error(&format!("guest paging: {e}")),
                }
                if let Some(sd) = shootdown.as_deref() {
                    if index == 0 {
                        p.initiate_shootdown(&mut hw, sd, shared_ram);
                    }
                    let from = p.follow_shootdowns(&mut hw, sd);
                    if p.wants_shared_access() {
                        let a = GuestAccess {
                            kind: MixKind::SharedRead,
                            gpa: Gpa(shared_ram),
                            width: crate::ram::Width::W4,
                            value: 0,
                        };
                        let gva = crate::machine_paging::SHARED_GVA;
                        let (seen, _, _) = paged_access(sh, &mut hw, &mut c, &a, gva, p);
                        let targets = sd.targets(from, sd.now());
                        let ram = targets.contains(&shared_ram).then_some(shared_ram_hva).flatten();
                        let device = targets.contains(&layout.device.0);
                        checker.check_shared_gva(gva, ram, device, &seen);
                    }
                }
            }
            for _ in 0..cfg.batch.max(1) {
                let a = gen.next_access();
                let t0 = c.mmio_latency.is_some().then(Instant::now);
                let before = recorder.as_ref().map(Recorder::before).unwrap_or_default();
                let (seen, start, end) = match paging.as_mut() {
                    Some(p) => match p.gva_for(&mut hw, &a) {
                        Ok(gva) => paged_access(sh, &mut hw, &mut c, &a, gva, p),
                        Err(e) => (Observed::Error(e), 0, 0),
                    },
                    None => access(sh, &mut hw, &mut c, &a),
                };
                if let (Some(t0), Some(h), Observed::Mmio { .. }) =
                    (t0, c.mmio_latency.as_mut(), &seen)
                {
                    h.saturating_record((t0.elapsed().as_nanos() as u64).max(1));
                }
                if let (Some(r), true, Observed::Ram { .. }) =
                    (recorder.as_mut(), a.kind.is_write(), &seen)
                {
                    r.wrote(a.gpa, before);
                }
                checker.check(&a, &seen, start, end);
                hw.give_way();
            }
            if cfg.timeline {
                live.store(&sh.mmu.vcpu_exits(hw.state()));
            }
            // The spinner stays in guest mode (the MMU may still take it out: requests, faults).
            if !spinner {
                hw.exit_guest();
            }
            progress.store(c.accesses, Ordering::Relaxed);
        }
        hw.exit_guest();
        if let Some(r) = recorder.as_mut() {
            r.hand_over();
        }
    }));
    if let Err(panic) = body {
        // Leave guest mode so a memslot update waiting for this vCPU does not hang, then let the
        // run report the panic.
        hw.exit_guest();
        sh.stop.store(true, Ordering::Relaxed);
        resume_unwind(panic);
    }
    c.retries = hw.retries();
    c.gave_way = hw.gave_way();
    // Under shadow paging the GVA-keyed TLB is the vCPU's only one (the GPA-keyed one only
    // follows the MMU's flush requests).
    let tlb = match paging.as_ref() {
        Some(p) if p.is_shadow() => p.tlb.stats(),
        _ => hw.tlb_stats(),
    };
    (c, tlb, checker)
}

/// The machine's view of an access's attempts: each attempt takes its start stamp after the
/// request poll (only the last attempt's outcome is observed, and a stamp from before earlier
/// retries would widen its window); retries while a memslot update (odd clock) or a host
/// invalidation is in flight wait for it, however long a loaded host makes it, and do not count
/// towards the livelock limit.
struct Stamps<'c> {
    clock: &'c Clock,
    invalidating: &'c AtomicU32,
    start: u64,
}

impl Attempts for Stamps<'_> {
    #[inline]
    fn begin(&mut self) {
        self.start = self.clock.now();
    }
    #[inline]
    fn counts(&mut self) -> bool {
        counts(self.clock.now(), self.invalidating)
    }
}

/// Whether a retry at clock value `now` counts towards the livelock limit ([`Stamps`]).
#[inline]
fn counts(now: u64, invalidating: &AtomicU32) -> bool {
    now & 1 == 0 && invalidating.load(Ordering::Relaxed) == 0
}

/// One guest access; returns the outcome and its start and end stamps.
pub(super) fn access<M: GuestMmu>(
    sh: &Shared<'_, M>,
    hw: &mut HwVcpu<'_, M>,
    c: &mut VcpuCounters,
    a: &GuestAccess,
) -> (Observed, u64, u64) {
    let write = c.begin(a);
    let mut at = Stamps { clock: sh.clock, invalidating: sh.invalidating, start: 0 };
    let seen = match hw.load_store_with(a.gpa, a.width, write.then_some(a.value), &mut at) {
        Data::Ram { hva, value } => Observed::Ram { hva, value },
        Data::Mmio => mmio(sh, hw, a),
        Data::Error(e) => Observed::Error(e.to_string()),
    };
    c.end(a, &seen);
    let end = sh.clock.now();
    (seen, at.start, end)
}

/// The data access of a translated guest access: `width` bytes at `gva`'s offset in frame `pfn`.
fn ram_at(host: &SimHost, pfn: Pfn, gva: u64, width: Width, store: Option<u64>) -> Observed {
    match host.ram_access(pfn, gva & 0xfff, width, store) {
        Ok((hva, value)) => Observed::Ram { hva, value },
        Err(e) => Observed::Error(e.to_string()),
    }
}

/// One guest access through guest-virtual address `gva` (guest paging); `a` says what the
/// oracle expects (its GPA is the one the vCPU mapped at `gva`).
fn paged_access<M: GuestMmu>(
    sh: &Shared<'_, M>,
    hw: &mut HwVcpu<'_, M>,
    c: &mut VcpuCounters,
    a: &GuestAccess,
    gva: u64,
    p: &mut VcpuPaging,
) -> (Observed, u64, u64) {
    let write = c.begin(a);
    let mut start = sh.clock.now();
    let store = write.then_some(a.value);
    let seen = if p.is_shadow() {
        let (clock, invalidating) = (sh.clock, sh.invalidating);
        let attempt = || {
            start = clock.now();
            counts(start, invalidating)
        };
        let t0 = c.sampler.start();
        match shadow_access(
            hw,
            sh.host,
            &mut p.tlb,
            gva,
            a.width,
            RamOp::from_store(store),
            attempt,
        ) {
            ShadowAccess::Ram { hva, value } => Observed::Ram { hva, value },
            ShadowAccess::Mmio(gpa) => {
                // What MMIO caching is meant to shorten: the walk, exits and the MMU's handling.
                sh.mmu.record_mmio_time(hw.state(), elapsed_ns(t0));
                mmio(sh, hw, &GuestAccess { gpa, ..*a })
            }
            ShadowAccess::PageFault(error) => Observed::GuestPageFault { error },
            ShadowAccess::Error(e) => Observed::Error(e),
        }
    } else {
        // Requests first, as the hardware path does before every TLB lookup (a flush request
        // empties the second-level TLB); then the combined TLB, which empties with it.
        hw.poll();
        p.tlb.follow(hw.tlb_stats().flushes);
        let need = if write { Access::WRITE.union(Access::USER) } else { Access::USER };
        match p.tlb.lookup(gva, need) {
            Some(pfn) => ram_at(sh.host, pfn, gva, a.width, store),
            None => match p.walk_tdp(hw, gva, write) {
                Err(o) => o,
                Ok((gpa, guest_rights)) => {
                    let mut at =
                        Stamps { clock: sh.clock, invalidating: sh.invalidating, start: 0 };
                    let kind = if write { AccessKind::Write } else { AccessKind::Read };
                    let seen = match hw.access_with(gpa, kind, &mut at) {
                        crate::hw_vcpu::Outcome::Ram(e) => {
                            p.tlb.follow(hw.tlb_stats().flushes);
                            let rights = if e.writable {
                                guest_rights
                            } else {
                                guest_rights.intersect(Access::USER.union(Access::EXEC))
                            };
                            p.tlb.insert(gva, e.pfn, rights);
                            ram_at(sh.host, e.pfn, gva, a.width, store)
                        }
                        crate::hw_vcpu::Outcome::Mmio => mmio(sh, hw, &GuestAccess { gpa, ..*a }),
                        crate::hw_vcpu::Outcome::Error(e) => Observed::Error(e.to_string()),
                    };
                    start = at.start;
                    seen
                }
            },
        }
    };
    c.end(a, &seen);
    (seen, start, sh.clock.now())
}

fn mmio<M: GuestMmu>(sh: &Shared<'_, M>, hw: &mut HwVcpu<'_, M>, a: &GuestAccess) -> Observed {
    match sh.bus.dispatch(a.gpa, a.width, a.kind.is_write().then_some(a.value)) {
        BusOutcome::Device(value) => Observed::Mmio { device: true, value },
        BusOutcome::Exit { value, .. } => {
            // KVM_RUN returns to userspace with KVM_EXIT_MMIO: out of guest mode and back.
            hw.exit_guest();
            hw.enter_guest();
            Observed::Mmio { device: false, value }
        }
    }
}
