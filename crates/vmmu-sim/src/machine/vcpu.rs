//! A vCPU thread of the machine: batches of accesses from its mix in guest mode, each one
//! translated by the MMU (or through the vCPU's guest page tables), performed on RAM or on the
//! MMIO bus, and judged by the vCPU's checker (the steps in the parent module's doc).

use super::wrap_trap::{sweep_dimm, Hold, TRAP_GPA};
use super::{GuestTables, MachineConfig, Shared, VcpuCounters, SHARED_RAM_OFFSET};
use crate::bus::BusOutcome;
use crate::host::SimHost;
use crate::hw_vcpu::{Attempts, Data, HwVcpu};
use crate::layout::MachineLayout;
use crate::machine_paging::{
    shadow_access, user_need, PagingEvent, RamOp, ShadowAccess, Shootdown, VcpuPaging,
};
use crate::migration::Recorder;
use crate::mix::{AccessGen, GuestAccess, MixKind, MixWeights};
use crate::mmio_timing::elapsed_ns;
use crate::oracle::{Clock, Observed, VcpuChecker};
use crate::ram::Width;
use crate::seam::{AccessKind, GuestMmu, LiveExits};
use crate::timeline::new_histogram;
use crate::tlb::TlbStats;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmmu::fault::PfErr;
use vmmu::types::{Access, Gpa, Pfn};

pub(super) type VcpuResult<'o> =
    (VcpuCounters, TlbStats, VcpuChecker<'o>, Option<crate::machine_paging::PagingCounters>);

/// What a vCPU thread gets: the shared state, the configuration, the layout, its index, its MMU
/// state, its checker, its progress counter, its dirty-log recorder (when the run collects dirty
/// logs) and the guest tables' buffer with the shootdowns' state (with guest paging).
pub(super) struct VcpuThread<'a, 's, 'o, M: GuestMmu> {
    /// What every thread of the run shares.
    pub(super) sh: &'a Shared<'s, M>,
    /// The run's configuration.
    pub(super) cfg: &'a MachineConfig,
    /// The machine's layout.
    pub(super) layout: &'a MachineLayout,
    /// This vCPU's index.
    pub(super) index: usize,
    /// This vCPU's MMU state.
    pub(super) state: M::Vcpu,
    /// This vCPU's checker.
    pub(super) checker: VcpuChecker<'o>,
    /// Accesses done so far, stored after every batch for the supervisor.
    pub(super) progress: &'a AtomicU64,
    /// This vCPU's side of dirty-log collection.
    pub(super) recorder: Option<Recorder<'a>>,
    /// The guest tables (guest paging).
    pub(super) tables: Option<GuestTables>,
}

/// Runs a vCPU thread: batches until the run stops; then its counters, TLB statistics and
/// checker. A panic leaves guest mode, stops the run and goes on unwinding.
pub(super) fn vcpu_thread<'o, M: GuestMmu>(t: VcpuThread<'_, '_, 'o, M>) -> VcpuResult<'o> {
    let mut v = Running::new(t);
    let body = catch_unwind(AssertUnwindSafe(|| v.run()));
    if let Err(panic) = body {
        // Leave guest mode so a memslot update waiting for this vCPU does not hang, then let the
        // run report the panic.
        v.hw.exit_guest();
        v.sh.stop.store(true, Ordering::Relaxed);
        resume_unwind(panic);
    }
    v.finish()
}

/// A vCPU at work: its hardware vCPU, counters and checker, its guest paging and access mix,
/// and what its batches read from the run.
struct Running<'a, 's, 'o, M: GuestMmu> {
    sh: &'a Shared<'s, M>,
    cfg: &'a MachineConfig,
    layout: &'a MachineLayout,
    index: usize,
    hw: HwVcpu<'s, M>,
    checker: VcpuChecker<'o>,
    progress: &'a AtomicU64,
    recorder: Option<Recorder<'a>>,
    /// The vCPU's exits for the timeline.
    live: &'a LiveExits,
    /// The guest's paging (guest paging), `None` if it could not be set up.
    paging: Option<VcpuPaging>,
    /// The shootdowns' state (guest paging).
    shootdown: Option<Arc<Shootdown>>,
    /// The shared RAM page the shootdowns' GVA starts mapping, and its host address.
    shared_ram: u64,
    shared_ram_hva: Option<u64>,
    /// The stress runs' spinner: private RAM only, no guest exit of its own between batches.
    spinner: bool,
    /// The wrap trap's DIMM sweeper.
    sweeper: bool,
    gen: AccessGen,
    c: VcpuCounters,
}

impl<'a, 's, 'o, M: GuestMmu> Running<'a, 's, 'o, M> {
    /// Sets vCPU `t.index` up: its hardware vCPU, its guest paging and its access mix.
    fn new(t: VcpuThread<'a, 's, 'o, M>) -> Self {
        let VcpuThread { sh, cfg, layout, index, state, mut checker, progress, recorder, tables } =
            t;
        let mut hw = HwVcpu::with_state(sh.mmu, sh.host, state, cfg.tlb_entries);
        let shadow = sh.mmu.shadow_vcpu(hw.state()).is_some();
        let shootdown = tables.as_ref().map(|t| t.shootdown.clone());
        let shared_ram = layout.shared.gpa.0 + SHARED_RAM_OFFSET;
        let shared_ram_hva =
            sh.host.buffer(layout.shared.name).map(|b| b.hva().0 + SHARED_RAM_OFFSET);
        let paging = tables.and_then(|t| {
            let p = VcpuPaging::new(t.buf, layout, index, cfg.vcpus, cfg.seed, shadow);
            guest_paging(sh.mmu, &mut hw, p, &mut checker)
        });
        let spinner = cfg.stress_paths && cfg.vcpus >= 3 && index == cfg.vcpus - 1;
        let sweeper = cfg.wrap_trap && index == 0;
        let weights = mix_weights(cfg, spinner);
        let gen = AccessGen::new(layout, index, cfg.seed, weights).with_hot_spots(cfg.stress_paths);
        let c = VcpuCounters {
            mmio_latency: cfg.timeline.then(new_histogram),
            ..VcpuCounters::default()
        };
        let live = &sh.live[index];
        Running {
            sh,
            cfg,
            layout,
            index,
            hw,
            checker,
            progress,
            recorder,
            live,
            paging,
            shootdown,
            shared_ram,
            shared_ram_hva,
            spinner,
            sweeper,
            gen,
            c,
        }
    }

    /// Batches until the run stops (waiting outside guest mode while it is paused); then out of
    /// guest mode, and the last dirty-log window handed over.
    fn run(&mut self) {
        while !self.sh.stop.load(Ordering::Relaxed) {
            if self.sh.paused.load(Ordering::Relaxed) {
                self.hw.exit_guest();
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            self.batch();
        }
        self.hw.exit_guest();
        if let Some(r) = self.recorder.as_mut() {
            r.hand_over();
        }
    }

    /// One guest-mode batch: the wrap trap's sweep and hold, the guest-paging step, the
    /// generated accesses, then the exits for the timeline and the progress counter.
    fn batch(&mut self) {
        let (sh, cfg, index) = (self.sh, self.cfg, self.index);
        self.hw.enter_guest();
        if self.sweeper {
            sweep_dimm(sh, self.layout, &mut self.hw, &mut self.c, &mut self.checker);
        }
        if cfg.wrap_trap && index == 1 && sh.hold.is(Hold::Ask) {
            // The holder: one fault on the dummy slot's page, whose host translation is
            // slow; the outcome is the machine's business, not the guest's, so it is not
            // judged (no vCPU accesses that GPA otherwise).
            let _ = self.hw.translate_once(Gpa(TRAP_GPA), AccessKind::Read);
            sh.hold.set(Hold::Idle);
        }
        self.paging_step();
        self.generated_accesses();
        if cfg.timeline {
            self.live.store(&sh.mmu.vcpu_exits(self.hw.state()));
        }
        // The spinner stays in guest mode (the MMU may still take it out: requests, faults).
        if !self.spinner {
            self.hw.exit_guest();
        }
        self.progress.store(self.c.accesses, Ordering::Relaxed);
    }

    /// With guest paging, between batches: the guest's paging event (an access through a
    /// remapped GVA, or one through an unmapped GVA that must fault), then the shootdowns (vCPU
    /// 0 starts them, every vCPU follows them, and now and then reads through the shared GVA).
    fn paging_step(&mut self) {
        let Running { sh, layout, index, hw, checker, c, paging, shootdown, .. } = self;
        let (sh, layout, index) = (*sh, *layout, *index);
        let (shared_ram, shared_ram_hva) = (self.shared_ram, self.shared_ram_hva);
        let Some(p) = paging.as_mut() else {
            return;
        };
        let (clock, invalidating) = (sh.clock, sh.invalidating);
        match p.between_batches(hw, &mut || counts(clock.now(), invalidating)) {
            Ok(PagingEvent::Access(a, gva)) => judged_access(sh, hw, c, checker, &a, gva, p),
            Ok(PagingEvent::AccessThenSwitch(a, gva)) => {
                judged_access(sh, hw, c, checker, &a, gva, p);
                match p.switch_then_access(hw) {
                    Ok((a, gva)) => judged_access(sh, hw, c, checker, &a, gva, p),
                    Err(e) => checker.note_error(&format!("guest paging: {e}")),
                }
            }
            Ok(PagingEvent::Unmapped(gva)) => {
                let a = GuestAccess {
                    kind: MixKind::PrivateRead,
                    gpa: Gpa(0),
                    width: crate::ram::Width::W8,
                    value: 0,
                };
                let (seen, _, _) = paged_access(sh, hw, c, &a, gva, p);
                checker.check_page_fault(gva, PfErr::USER, &seen);
            }
            Ok(PagingEvent::Alias(a, gva, read_only)) => {
                judged_access(sh, hw, c, checker, &a, gva, p);
                let read = GuestAccess { kind: MixKind::PrivateRead, ..a };
                judged_access(sh, hw, c, checker, &read, read_only, p);
                // The same write through the read-only path: judged as a guest page fault, so
                // the oracle's record of the page keeps the first write's value.
                let (seen, _, _) = paged_access(sh, hw, c, &a, read_only, p);
                checker.check_page_fault(
                    read_only,
                    PfErr::PRESENT | PfErr::WRITE | PfErr::USER,
                    &seen,
                );
            }
            Ok(PagingEvent::None) => {}
            Err(e) => checker.note_error(&format!("guest paging: {e}")),
        }
        if let Some(sd) = shootdown.as_deref() {
            if index == 0 {
                p.initiate_shootdown(hw, sd, shared_ram);
            }
            let from = p.follow_shootdowns(hw, sd);
            if p.wants_shared_access() {
                let a = GuestAccess {
                    kind: MixKind::SharedRead,
                    gpa: Gpa(shared_ram),
                    width: crate::ram::Width::W4,
                    value: 0,
                };
                let gva = crate::machine_paging::SHARED_GVA;
                let (seen, _, _) = paged_access(sh, hw, c, &a, gva, p);
                let targets = sd.targets(from, sd.now());
                let ram = targets.contains(&shared_ram).then_some(shared_ram_hva).flatten();
                // The two device pages `S` maps in turn, by what their first register reads.
                use crate::bus::RegisterDevice as Dev;
                let pages = [
                    (layout.device.0, Dev::ID),
                    (layout.device.0 + Dev::SECOND_ID_OFFSET, Dev::SECOND_ID),
                ];
                let ids: Vec<u64> =
                    pages.iter().filter(|(p, _)| targets.contains(p)).map(|&(_, id)| id).collect();
                checker.check_shared_gva(gva, ram, &ids, &seen);
            }
        }
    }

    /// The batch's generated accesses (`cfg.batch`, at least one): each performed (through its
    /// GVA with guest paging), timed if it reached MMIO and MMIO latency is recorded, recorded
    /// for dirty logging if it wrote RAM, and judged.
    fn generated_accesses(&mut self) {
        let Running { sh, cfg, hw, checker, c, paging, recorder, gen, .. } = self;
        let sh = *sh;
        for _ in 0..cfg.batch.max(1) {
            let a = gen.next_access();
            let t0 = c.mmio_latency.is_some().then(Instant::now);
            let before = recorder.as_ref().map(Recorder::before).unwrap_or_default();
            let (seen, start, end) = match paging.as_mut() {
                Some(p) => match p.gva_for(hw, &a) {
                    Ok(gva) => paged_access(sh, hw, c, &a, gva, p),
                    Err(e) => (Observed::Error(e), 0, 0),
                },
                None => access(sh, hw, c, &a),
            };
            if let (Some(t0), Some(h), Observed::Mmio { .. }) = (t0, c.mmio_latency.as_mut(), &seen)
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
    }

    /// The thread's result: its counters (with the hardware vCPU's retries), its TLB's
    /// statistics, its checker and its guest paging's counters.
    fn finish(mut self) -> VcpuResult<'o> {
        self.c.retries = self.hw.retries();
        self.c.gave_way = self.hw.gave_way();
        // Under shadow paging the GVA-keyed TLB is the vCPU's only one (the GPA-keyed one only
        // follows the MMU's flush requests).
        let tlb = match self.paging.as_ref() {
            Some(p) if p.is_shadow() => p.tlb.stats(),
            _ => self.hw.tlb_stats(),
        };
        let paging = self.paging.as_ref().map(|p| p.counters);
        (self.c, tlb, self.checker, paging)
    }
}

/// The guest paging `p` made for a vCPU, its CPU state handed to the shadow vCPU under shadow
/// paging and its counters reset; `None` if it could not be made. Errors go to `checker`.
fn guest_paging<M: GuestMmu>(
    mmu: &M,
    hw: &mut HwVcpu<'_, M>,
    p: Result<VcpuPaging, String>,
    checker: &mut VcpuChecker<'_>,
) -> Option<VcpuPaging> {
    match p {
        Ok(mut p) => {
            if let Some(v) = mmu.shadow_vcpu(hw.state()) {
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
    }
}

/// The access mix of a vCPU: private RAM only for the spinner, the stress mix for a stress run
/// on the default mix, else the configured one; never the DIMM under the wrap trap.
fn mix_weights(cfg: &MachineConfig, spinner: bool) -> MixWeights {
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
    weights
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

/// [`paged_access`], judged by `checker` as any access of the mix.
fn judged_access<M: GuestMmu>(
    sh: &Shared<'_, M>,
    hw: &mut HwVcpu<'_, M>,
    c: &mut VcpuCounters,
    checker: &mut VcpuChecker<'_>,
    a: &GuestAccess,
    gva: u64,
    p: &mut VcpuPaging,
) {
    let (seen, start, end) = paged_access(sh, hw, c, a, gva, p);
    checker.check(a, &seen, start, end);
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
        let kind = a.kind.access();
        match p.tlb.lookup(gva, user_need(kind)) {
            Some(pfn) => ram_at(sh.host, pfn, gva, a.width, store),
            None => match p.walk_tdp(hw, gva, kind) {
                Err(o) => o,
                Ok((gpa, guest_rights)) => {
                    let mut at =
                        Stamps { clock: sh.clock, invalidating: sh.invalidating, start: 0 };
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
