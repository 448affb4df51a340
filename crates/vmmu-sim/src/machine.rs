//! The software machine: vCPU threads running the access mix through a [`GuestMmu`], a device
//! manager applying the memslot schedule, and the oracle judging every outcome.
//!
//! One access, on its vCPU's thread (nothing here takes a lock or touches shared memory other
//! than the oracle's clock, the MMU and the accessed RAM):
//! 1. poll the MMU's requests (`poll_tlb_flush`), flushing the TLB if asked;
//! 2. read the oracle's clock (the access's start stamp);
//! 3. TLB lookup; on a miss `translate`: RAM -> insert into the TLB; `Retry` -> back to 1;
//! 4. RAM: one atomic load or store on host memory; MMIO: the bus (an exit to userspace leaves
//!    guest mode and re-enters, as `KVM_RUN` returning would);
//! 5. read the clock again (end stamp) and let the vCPU's checker judge the outcome.
//!
//! vCPUs run batches of accesses in guest mode (`enter_guest` .. `exit_guest`) and check the stop
//! flag between batches. The device manager runs the schedule's requests in a loop with a short
//! pause between them, ticking the clock before and after each. The main thread reports progress
//! and stops the run after the configured time or access count.

use crate::bus::{BusError, BusOutcome, MmioBus, RegisterDevice};
use crate::host::{HostConfig, HostError, SimHost};
use crate::layout::{MachineLayout, MachineMemory};
use crate::mix::{AccessGen, AccessKind, GuestAccess, MixWeights};
use crate::oracle::{Clock, Observed, Oracle, OracleReport, VcpuChecker, Violation};
use crate::ram;
use crate::report::{
    ConfigReport, MemslotReport, MmioCachingReport, Percentiles, Report, VcpuReport,
};
use crate::schedule::{Schedule, ScheduleError};
use crate::seam::{GuestMmu, SlotRequest, Translation};
use crate::tlb::{Tlb, TlbEntry, TlbStats};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use hdrhistogram::Histogram;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmmu::types::Hva;

/// Retries of one access before the machine calls it a livelock.
pub const RETRY_LIMIT: u32 = 1_000_000;

/// How to run the machine.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineConfig {
    /// vCPUs, 1..=256.
    pub vcpus: usize,
    /// Seed of the access mix.
    pub seed: u64,
    /// Longest run time.
    pub duration: Duration,
    /// If set, stop as soon as every vCPU did this many accesses and the device manager made
    /// `min_updates` requests (or `duration` passed).
    pub accesses_per_vcpu: Option<u64>,
    /// See `accesses_per_vcpu`.
    pub min_updates: u64,
    /// Pause of the device manager between two requests.
    pub update_pause: Duration,
    /// Accesses per guest-mode batch.
    pub batch: usize,
    /// TLB entries per vCPU.
    pub tlb_entries: usize,
    /// The access mix.
    pub weights: MixWeights,
    /// Host frame space.
    pub host: HostConfig,
    /// SPTE format name, for the report (`ept` or `npt`).
    pub format: String,
    /// Whether MMIO caching was requested, for the report.
    pub mmio_caching_requested: bool,
    /// Stop once the device manager has made this many memslot updates (churn runs); the
    /// duration still bounds the run.
    pub max_updates: Option<u64>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: 2,
            seed: 1,
            duration: Duration::from_secs(5),
            accesses_per_vcpu: None,
            min_updates: 0,
            update_pause: Duration::from_micros(200),
            batch: 64,
            tlb_entries: 256,
            weights: MixWeights::default(),
            host: HostConfig::new(46),
            format: "ept".into(),
            mmio_caching_requested: true,
            max_updates: None,
        }
    }
}

/// Why the machine could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Host memory.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Device registration.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The memslot schedule.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The MMU refused a static slot.
    #[error("the MMU refused static memslot {request:?} with {errno}")]
    Setup {
        /// The request.
        request: SlotRequest,
        /// The errno name.
        errno: String,
    },
    /// vCPU count out of range.
    #[error("{0} vCPUs: the machine supports 1..=256")]
    Vcpus(usize),
}

/// What the progress callback gets, about every 10 ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressSnapshot {
    /// Time since the vCPUs started.
    pub elapsed: Duration,
    /// The configured run time.
    pub duration: Duration,
    /// Accesses done so far (all vCPUs, updated per batch).
    pub accesses: u64,
    /// Memslot requests made so far.
    pub updates: u64,
}

/// The default machine, ready to run against any [`GuestMmu`].
#[derive(Debug)]
pub struct Machine {
    config: MachineConfig,
    memory: MachineMemory,
    bus: MmioBus,
    schedule: Arc<Schedule>,
}

#[derive(Default)]
struct VcpuCounters {
    accesses: u64,
    reads: u64,
    writes: u64,
    ram: u64,
    mmio_device: u64,
    mmio_userspace: u64,
    readonly_write: u64,
    retries: u64,
    errors: u64,
}

/// A per-vCPU progress counter on its own cache line, so vCPUs do not share one.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

struct Shared<'a, M> {
    mmu: &'a M,
    host: &'a SimHost,
    bus: &'a MmioBus,
    clock: &'a Clock,
    stop: &'a AtomicBool,
}

impl Machine {
    /// Builds the host, the buffers with their patterns, the bus with its device, and the
    /// schedule for `config`.
    pub fn new(config: MachineConfig) -> Result<Machine, SimError> {
        if !(1..=256).contains(&config.vcpus) {
            return Err(SimError::Vcpus(config.vcpus));
        }
        let host = Arc::new(SimHost::new(config.host)?);
        let layout = MachineLayout::new(config.vcpus);
        let memory = layout.build(&host)?;
        let mut bus = MmioBus::new();
        bus.register(
            layout.device,
            layout.device_size,
            Arc::new(RegisterDevice::new(layout.device, config.vcpus)),
        )?;
        let max_gfn = 1u64 << (host.config().phys_bits - 12);
        let schedule = Arc::new(Schedule::device_manager(&memory, max_gfn)?);
        Ok(Machine { config, memory, bus, schedule })
    }

    /// The host (give it to the MMU as its `HostMemory` and `FrameAllocator`).
    pub fn host(&self) -> &Arc<SimHost> {
        self.memory.host()
    }
    /// The buffers and layout.
    pub fn memory(&self) -> &MachineMemory {
        &self.memory
    }
    /// The layout.
    pub fn layout(&self) -> &MachineLayout {
        self.memory.layout()
    }
    /// The device manager's schedule.
    pub fn schedule(&self) -> &Arc<Schedule> {
        &self.schedule
    }
    /// The MMIO bus.
    pub fn bus(&self) -> &MmioBus {
        &self.bus
    }
    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Runs the machine on `mmu` (a fresh MMU with no slots) and reports.
    pub fn run<M: GuestMmu>(&self, mmu: &M) -> Result<Report, SimError> {
        self.run_with_progress(mmu, &mut |_| {})
    }

    /// As [`Machine::run`], calling `progress` about every 10 ms from the calling thread.
    pub fn run_with_progress<M: GuestMmu>(
        &self,
        mmu: &M,
        progress: &mut dyn FnMut(&ProgressSnapshot),
    ) -> Result<Report, SimError> {
        let cfg = &self.config;
        let n = cfg.vcpus;
        let states: Vec<M::Vcpu> = (0..n).map(|i| mmu.create_vcpu(i)).collect();
        for request in self.memory.static_requests() {
            mmu.set_memory_region(&request).map_err(|errno| SimError::Setup { request, errno })?;
        }
        let oracle = Oracle::new(self.memory.clone(), self.schedule.clone());
        let checkers: Vec<VcpuChecker<'_>> = (0..n).map(|i| oracle.checker(i)).collect();
        let clock = Clock::new();
        let stop = AtomicBool::new(false);
        let counters: Vec<Padded> = (0..n).map(|_| Padded::default()).collect();
        let updates = AtomicU64::new(0);
        let shared = Shared { mmu, host: self.host(), bus: &self.bus, clock: &clock, stop: &stop };
        let started = Instant::now();

        let (vcpu_results, dm, elapsed) = std::thread::scope(|s| {
            let handles: Vec<_> = states
                .into_iter()
                .zip(checkers)
                .enumerate()
                .map(|(i, (state, checker))| {
                    let (shared, counter) = (&shared, &counters[i].0);
                    s.spawn(move || {
                        vcpu_thread(shared, cfg, self.layout(), i, state, checker, counter)
                    })
                })
                .collect();
            let dm =
                s.spawn(|| device_manager(&shared, &self.schedule, cfg.update_pause, &updates));
            loop {
                std::thread::sleep(Duration::from_millis(10));
                let elapsed = started.elapsed();
                let snap = ProgressSnapshot {
                    elapsed,
                    duration: cfg.duration,
                    accesses: counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum(),
                    updates: updates.load(Ordering::Relaxed),
                };
                progress(&snap);
                let budget_done = cfg.accesses_per_vcpu.is_some_and(|max| {
                    counters.iter().all(|c| c.0.load(Ordering::Relaxed) >= max)
                        && snap.updates >= cfg.min_updates
                });
                let churn_done = cfg.max_updates.is_some_and(|m| snap.updates >= m);
                let crashed = handles.iter().any(|h| h.is_finished()) || dm.is_finished();
                if elapsed >= cfg.duration || budget_done || churn_done || crashed {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
            let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
            let elapsed = started.elapsed();
            (results, dm.join(), elapsed)
        });
        let mut vcpus = Vec::new();
        let mut checkers = Vec::new();
        for r in vcpu_results {
            match r {
                Ok(v) => vcpus.push(v),
                Err(panic) => resume_unwind(panic),
            }
        }
        let dm = dm.unwrap_or_else(|panic| resume_unwind(panic));

        let mut report = Report {
            config: ConfigReport {
                format: cfg.format.clone(),
                phys_bits: self.host().config().phys_bits,
                vcpus: n,
                seed: cfg.seed,
                mmio_caching: MmioCachingReport {
                    requested: cfg.mmio_caching_requested,
                    ..MmioCachingReport::default()
                },
            },
            elapsed_seconds: elapsed.as_secs_f64(),
            ..Report::default()
        };
        let caching = mmu.mmio_caching();
        report.config.mmio_caching.effective = caching.effective;
        report.config.mmio_caching.reason = caching.reason;
        let mut oracle_report = OracleReport::default();
        for (index, (c, tlb, mut checker)) in vcpus.into_iter().enumerate() {
            oracle_report.merge(checker.take_report());
            report.exits.readonly_write += c.readonly_write;
            report.exits.mmio_device += c.mmio_device;
            report.exits.mmio_userspace += c.mmio_userspace;
            report.tlb.add(&tlb);
            report.vcpus.push(VcpuReport {
                index,
                accesses: c.accesses,
                accesses_per_sec: c.accesses as f64 / elapsed.as_secs_f64().max(1e-9),
                reads: c.reads,
                writes: c.writes,
                ram: c.ram,
                mmio_device: c.mmio_device,
                mmio_userspace: c.mmio_userspace,
                readonly_write: c.readonly_write,
                retries: c.retries,
                errors: c.errors,
                tlb,
            });
            checkers.push(checker);
        }
        oracle_report.merge(dm.oracle);
        oracle_report.merge(oracle.final_checks(&checkers));
        report.oracle = oracle_report;
        report.fill_mmu(&mmu.stats());
        let mmu_memslots = report.memslots.clone();
        report.memslots = MemslotReport {
            updates: dm.updates,
            refused: dm.refused,
            latency_ns: Percentiles::of(&dm.latency),
            ..mmu_memslots
        };
        report.tables = self.host().table_stats();
        Ok(report)
    }
}

type VcpuResult<'o> = (VcpuCounters, TlbStats, VcpuChecker<'o>);

fn vcpu_thread<'o, M: GuestMmu>(
    sh: &Shared<'_, M>,
    cfg: &MachineConfig,
    layout: &MachineLayout,
    index: usize,
    mut state: M::Vcpu,
    mut checker: VcpuChecker<'o>,
    progress: &AtomicU64,
) -> VcpuResult<'o> {
    let mut tlb = Tlb::new(cfg.tlb_entries);
    let mut gen = AccessGen::new(layout, index, cfg.seed, cfg.weights);
    let mut c = VcpuCounters::default();
    let body = catch_unwind(AssertUnwindSafe(|| {
        while !sh.stop.load(Ordering::Relaxed) {
            sh.mmu.enter_guest(&mut state);
            for _ in 0..cfg.batch.max(1) {
                let a = gen.next_access();
                let (seen, start, end) = access(sh, &mut state, &mut tlb, &mut c, &a);
                checker.check(&a, &seen, start, end);
            }
            sh.mmu.exit_guest(&mut state);
            progress.store(c.accesses, Ordering::Relaxed);
        }
    }));
    if let Err(panic) = body {
        // Leave guest mode so a memslot update waiting for this vCPU does not hang, then let the
        // run report the panic.
        sh.mmu.exit_guest(&mut state);
        sh.stop.store(true, Ordering::Relaxed);
        resume_unwind(panic);
    }
    (c, tlb.stats(), checker)
}

/// One guest access; returns the outcome and its start and end stamps.
fn access<M: GuestMmu>(
    sh: &Shared<'_, M>,
    state: &mut M::Vcpu,
    tlb: &mut Tlb,
    c: &mut VcpuCounters,
    a: &GuestAccess,
) -> (Observed, u64, u64) {
    let write = a.kind.is_write();
    let gfn = a.gpa.gfn();
    let mut start;
    let mut retries = 0u32;
    c.accesses += 1;
    if write {
        c.writes += 1;
    } else {
        c.reads += 1;
    }
    let seen = loop {
        if sh.mmu.poll_tlb_flush(state) {
            tlb.flush();
        }
        // The start stamp is taken per attempt, after the poll: only the last attempt's outcome
        // is observed, and a stamp from before earlier retries would widen its window.
        start = sh.clock.now();
        if let Some(e) = tlb.lookup(gfn, write) {
            break ram_access(e.page, a);
        }
        match sh.mmu.translate(state, a.gpa, write) {
            Translation::Ram { pfn, writable, level } => {
                if write && !writable {
                    break Observed::Error(format!(
                        "read-only translation of {} returned for a write",
                        a.gpa
                    ));
                }
                let Some(page) = sh.host.ram_page(pfn) else {
                    break Observed::Error(format!(
                        "translation of {} to {pfn:?}, which is not a RAM frame",
                        a.gpa
                    ));
                };
                tlb.insert(gfn, TlbEntry { page, pfn, writable, level });
                break ram_access(page, a);
            }
            Translation::Mmio => break mmio(sh, state, a),
            Translation::Retry => {
                c.retries += 1;
                retries += 1;
                if retries >= RETRY_LIMIT {
                    break Observed::Error(format!("{RETRY_LIMIT} retries in a row (livelock?)"));
                }
                if retries % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            Translation::Error(e) => break Observed::Error(e),
        }
    };
    match &seen {
        Observed::Ram { .. } => c.ram += 1,
        Observed::Mmio { device: true, .. } => c.mmio_device += 1,
        Observed::Mmio { device: false, .. } => {
            c.mmio_userspace += 1;
            if a.kind == AccessKind::RomWrite {
                c.readonly_write += 1;
            }
        }
        Observed::Error(_) => c.errors += 1,
    }
    let end = sh.clock.now();
    (seen, start, end)
}

#[inline]
fn ram_access(page: core::ptr::NonNull<u8>, a: &GuestAccess) -> Observed {
    let p = page.as_ptr().wrapping_add(a.gpa.page_offset() as usize);
    let value = if a.kind.is_write() {
        // SAFETY: `page` is a RAM frame of the host (from `ram_page`, directly or via the TLB),
        // whose buffer lives as long as the host, which outlives the run; the access is naturally
        // aligned (the mix only makes aligned accesses) so it stays inside the 4 KiB page; every
        // access to buffers is atomic.
        unsafe { ram::store(p, a.width, a.value) };
        a.value
    } else {
        // SAFETY: as above.
        unsafe { ram::load(p, a.width) }
    };
    Observed::Ram { hva: Hva(p as u64), value }
}

fn mmio<M: GuestMmu>(sh: &Shared<'_, M>, state: &mut M::Vcpu, a: &GuestAccess) -> Observed {
    match sh.bus.dispatch(a.gpa, a.width, a.kind.is_write().then_some(a.value)) {
        BusOutcome::Device(value) => Observed::Mmio { device: true, value },
        BusOutcome::Exit { value, .. } => {
            // KVM_RUN returns to userspace with KVM_EXIT_MMIO: out of guest mode and back.
            sh.mmu.exit_guest(state);
            sh.mmu.enter_guest(state);
            Observed::Mmio { device: false, value }
        }
    }
}

struct DmResult {
    updates: u64,
    refused: u64,
    latency: Histogram<u64>,
    oracle: OracleReport,
}

fn device_manager<M: GuestMmu>(
    sh: &Shared<'_, M>,
    schedule: &Schedule,
    pause: Duration,
    progress: &AtomicU64,
) -> DmResult {
    let mut r = DmResult {
        updates: 0,
        refused: 0,
        // 1 ns to 60 s with 3 significant digits: valid bounds, so this cannot fail. Longer
        // latencies saturate at 60 s.
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
        oracle: OracleReport::default(),
    };
    while !sh.stop.load(Ordering::Relaxed) {
        let step = schedule.step(r.updates);
        sh.clock.tick();
        let t = Instant::now();
        let got = sh.mmu.set_memory_region(&step.request);
        let ns = t.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        sh.clock.tick();
        r.latency.saturating_record(ns.max(1));
        r.updates += 1;
        r.oracle.checked += 1;
        if step.expect.is_err() {
            r.refused += 1;
        }
        let want = step.expect.map_err(str::to_string);
        if got != want {
            r.oracle.push(Violation {
                vcpu: None,
                gpa: None,
                what: format!("memslot request {} ({})", r.updates - 1, step.label),
                expected: format!("{want:?}"),
                seen: format!("{got:?}"),
            });
        }
        progress.store(r.updates, Ordering::Relaxed);
        if pause.is_zero() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause);
        }
    }
    r
}
