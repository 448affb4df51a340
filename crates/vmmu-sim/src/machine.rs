//! The software machine: vCPU threads running the access mix through a [`GuestMmu`], a device
//! manager applying the memslot schedule, and the oracle judging every outcome.
//!
//! One access, on its vCPU's thread, a [`HwVcpu`] (nothing here takes a lock or touches shared
//! memory other than the oracle's clock, the MMU and the accessed RAM):
//! 1. poll the MMU's requests (`poll_tlb_flush`), flushing the TLB if asked;
//! 2. read the oracle's clock (the access's start stamp);
//! 3. TLB lookup; on a miss `translate`: RAM -> insert into the TLB; `Retry` -> back to 1;
//! 4. RAM: one atomic load or store on host memory; MMIO: the bus (an exit to userspace leaves
//!    guest mode and re-enters, as `KVM_RUN` returning would);
//! 5. read the clock again (end stamp) and let the vCPU's checker judge the outcome.
//!
//! Steps 1, 3 and the RAM half of 4 are [`HwVcpu::load_store_with`]; the machine adds the stamps
//! and excuses retries while a memslot update is in flight from the livelock limit.
//!
//! vCPUs run batches of accesses in guest mode (`enter_guest` .. `exit_guest`) and check the stop
//! flag between batches. The device manager runs the schedule's requests in a loop with a short
//! pause between them, ticking the clock before and after each. The main thread reports progress
//! and stops the run after the configured time or access count.
//!
//! `stress_paths` (`vmmu run --stress-paths`) adds, to reach the MMU's racy paths end to end:
//! - after each memslot request, a host invalidation (the MMU notifier) of 1 to 4 pages of a
//!   live slot's buffer: begin, overwrite the pages with [`POISON`], restore them, end. No vCPU
//!   may touch them in between (see the oracle), and they are re-faulted after the end;
//! - hot spots in the mix ([`AccessGen::with_hot_spots`]) and more BAR and DIMM accesses, so all
//!   vCPUs fault on the same not-yet-mapped GPA inside a slot's create, move or delete;
//! - table lookups that now and then yield the CPU in the middle of a walk or an installation
//!   (`SimHost::set_table_jitter`), as a cache miss or a preemption would, so that a vCPU's
//!   decision and its table update are far apart in time now and then;
//! - 4 KiB host pages only (`SimHost::set_huge_pages`, Linux with THP off), so every page of a
//!   slot is faulted, mapped and raced for on its own, as a huge leaf would hide it, unless
//!   [`MachineConfig::host_pages`] asks for [`HostPages::Huge`]: then the same races meet 2 MiB
//!   leaves (their install over a table, their zap by a one-page invalidation, their split by
//!   dirty logging);
//! - with 3 or more vCPUs, the last one is a spinner: private RAM only (TLB hits once warm) and
//!   it never leaves guest mode by itself between batches, only when the MMU makes it (a request,
//!   a fault) or the run stops. An MMU whose memslot update waits for a grace period that only a
//!   guest exit ends, with no kick, stalls the device manager until the run stops (then the
//!   report shows few updates and one huge update latency; the run itself stays bounded).
//!
//! `wrap_trap` (`vmmu run --wrap-trap`, on the real MMU started with
//! [`Machine::wrap_trap_generation_base`]) reaches the MMIO-generation wrap end to end, which
//! needs an MMIO SPTE made 2^19 generations before the wrap, so that its generation bits match
//! again. Nobody but vCPU 0 touches the DIMM. Arm: the static slots end exactly on a wrap
//! (generation bits 0); vCPU 0 sweeps the absent DIMM, leaving an MMIO SPTE with generation bits
//! 0 on each of its pages. The schedule then runs until the DIMM is plugged (dirty-logged, so
//! 4 KiB leaves and one SPTE per page). Age: with the vCPUs paused outside guest mode, the
//! device manager toggles dirty logging on a one-page dummy slot (one generation swap each, no
//! clock tick: the map the vCPUs see does not change) until one swap is left before the next
//! wrap. Spring: vCPU 1 (if there is one) takes a slow host page fault on the dummy slot's page
//! (its only access there, not judged), so the wrapping swap's grace period waits for its
//! memslot read section, as for a vCPU swapping a page in; the device manager makes that last
//! swap and vCPU 0 sweeps the DIMM. An MMU that lets the wrapped
//! generation be seen before its wrap zap (`wrap-hook-after-publish`, `no-second-increment`)
//! answers some of those reads from the 2^19-generation-old MMIO SPTEs: MMIO where the DIMM is
//! RAM, a violation. The arm costs one sweep, the age about 2^19 swaps (about 0.3 s here).
//!
//! [`POISON`]: crate::oracle::POISON

use crate::bus::{BusError, BusOutcome, MmioBus, RegisterDevice};
use crate::host::{HostConfig, HostError, SimHost, SIZE_2M};
use crate::hw_vcpu::{Attempts, Data, HwVcpu};
use crate::layout::{MachineLayout, MachineMemory};
use crate::machine_paging::{
    shadow_access, PagingEvent, RamOp, ShadowAccess, Shootdown, VcpuPaging,
};

/// The page of shared RAM the shootdowns' GVA maps (beyond the words the vCPUs use).
const SHARED_RAM_OFFSET: u64 = 0x10_0000;
use crate::migration::{DirtyLogMode, Migration, Recorder};
use crate::mix::{AccessGen, GuestAccess, MixKind, MixWeights};
use crate::mmio_timing::{elapsed_ns, Sampler};
use crate::oracle::{Clock, Observed, Oracle, OracleReport, VcpuChecker, Violation, POISON};
use crate::ram::Width;
use crate::report::{
    ConfigReport, MemslotReport, MmioCachingReport, Percentiles, Report, VcpuReport,
};
use crate::schedule::{Schedule, ScheduleError};
use crate::seam::{AccessKind, Errno, GuestMmu, MmuExits, SlotRequest};
use crate::slots::SlotTable;
use crate::timeline::{new_histogram, LatencyHistogram, Sample, Timeline};
use crate::tlb::TlbStats;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use hdrhistogram::Histogram;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmmu::fault::PfErr;
use vmmu::memslot::MemslotError;
use vmmu::spte::FormatKind;
use vmmu::types::{Access, Generation, Gpa, Hva, PAGE_SIZE};

/// Retries of one access, outside memslot updates, before the machine calls it a livelock (the
/// one retry policy of [`crate::hw_vcpu`]).
pub use crate::hw_vcpu::RETRY_LIMIT;

/// A memslot request or host invalidation that took at least this long and returned only after
/// the run was stopped (the vCPUs left guest mode for good) is reported as a stall: it was
/// waiting for a vCPU that nothing asked to leave guest mode.
pub const STALL: Duration = Duration::from_secs(1);

/// How many times the device manager yields to the vCPUs while a host invalidation's pages are
/// poisoned (`stress_paths`).
const POISON_HOLD_YIELDS: u32 = 16;

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
    /// Pause of the device manager between two requests (inside a burst, with
    /// [`UpdateProfile::Boot`]).
    pub update_pause: Duration,
    /// How the device manager paces its memslot requests.
    pub update_profile: UpdateProfile,
    /// Accesses per guest-mode batch.
    pub batch: usize,
    /// TLB entries per vCPU.
    pub tlb_entries: usize,
    /// The access mix.
    pub weights: MixWeights,
    /// Host frame space.
    pub host: HostConfig,
    /// SPTE format, for the report.
    pub format: FormatKind,
    /// Whether MMIO caching was requested, for the report.
    pub mmio_caching_requested: bool,
    /// Stop once the device manager has made this many memslot updates (churn runs); the
    /// duration still bounds the run.
    pub max_updates: Option<u64>,
    /// Stress the racy paths (module doc): host invalidations, hot spots, a spinner vCPU.
    pub stress_paths: bool,
    /// Set the MMIO-generation wrap trap (module doc). The MMU must start at
    /// [`Machine::wrap_trap_generation_base`].
    pub wrap_trap: bool,
    /// Guest paging (`crate::machine_paging`): every access through a guest-virtual address of
    /// the vCPU's own page tables, with remaps, unmaps and CR3 switches. Under a shadow-paging
    /// MMU the hardware walks the shadow; else it walks the guest tables two-dimensionally.
    pub guest_paging: bool,
    /// Record a [`Timeline`] in the report (per-interval samples, every MMIO access timed):
    /// for `--report`. Costs a clock read per access.
    pub timeline: bool,
    /// Dirty logging on the RAM slots, collected by a migration thread and checked by its
    /// oracle ([`crate::migration`]); `None`: no logging.
    pub dirty_log: Option<DirtyLogMode>,
    /// With `dirty_log`: `None` logs the RAM slots from their creation; `Some(n)` makes
    /// migration after migration of `n` collections each, turning logging on and off on the live
    /// slots ([`crate::migration`]).
    pub dirty_log_rounds: Option<std::num::NonZeroU32>,
    /// The host's page size for guest RAM (transparent huge pages or not).
    pub host_pages: HostPages,
}

/// The host page size behind guest RAM, which bounds the MMU's leaf size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostPages {
    /// [`HostPages::Huge`], except under `stress_paths`, where [`HostPages::Small`] (module
    /// doc).
    #[default]
    Auto,
    /// 4 KiB pages only (THP off): every leaf is 4 KiB.
    Small,
    /// A naturally aligned 2 MiB block of a buffer is one transparent huge page, so the MMU may
    /// map it with one 2 MiB leaf (where the slot and dirty logging allow).
    Huge,
}

impl HostPages {
    /// Whether the host backs aligned 2 MiB blocks with huge pages in a run with `stress_paths`.
    pub fn huge(self, stress_paths: bool) -> bool {
        match self {
            HostPages::Auto => !stress_paths,
            HostPages::Small => false,
            HostPages::Huge => true,
        }
    }
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
            update_profile: UpdateProfile::Steady,
            batch: 64,
            tlb_entries: 256,
            weights: MixWeights::default(),
            host: HostConfig::new(46),
            format: FormatKind::Ept,
            mmio_caching_requested: true,
            max_updates: None,
            stress_paths: false,
            wrap_trap: false,
            guest_paging: false,
            timeline: false,
            dirty_log: None,
            dirty_log_rounds: None,
            host_pages: HostPages::Auto,
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
    #[error("the MMU refused static memslot {request:?} with {errno}: {error}", errno = Errno::of(error))]
    Setup {
        /// The request.
        request: SlotRequest,
        /// The rule it broke.
        error: MemslotError,
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
    gave_way: u64,
    errors: u64,
    guest_page_faults: u64,
    /// MMIO handling latency (with `MachineConfig::timeline`).
    mmio_latency: Option<Histogram<u64>>,
    /// Which shadow-paging accesses to time (the MMU times its own translations).
    sampler: Sampler,
}

/// A vCPU's exit counts, published after each batch for the timeline's sampler (relaxed: the
/// sampler wants recent counts, not a consistent cut).
#[repr(align(128))]
#[derive(Default)]
struct LiveExits([AtomicU64; 5]);

impl LiveExits {
    fn store(&self, e: &MmuExits) {
        let v = [e.violation, e.misconfig, e.mmio_spte_hit, e.mmio_cache_hit, e.mmio_slow_path];
        for (a, v) in self.0.iter().zip(v) {
            a.store(v, Ordering::Relaxed);
        }
    }

    fn add_to(&self, e: &mut MmuExits) {
        let l = |i: usize| self.0[i].load(Ordering::Relaxed);
        e.violation += l(0);
        e.misconfig += l(1);
        e.mmio_spte_hit += l(2);
        e.mmio_cache_hit += l(3);
        e.mmio_slow_path += l(4);
    }
}

impl VcpuCounters {
    /// Counts the start of access `a`; returns whether it is a write.
    fn begin(&mut self, a: &GuestAccess) -> bool {
        let write = a.kind.is_write();
        self.accesses += 1;
        if write {
            self.writes += 1;
        } else {
            self.reads += 1;
        }
        write
    }

    /// Counts how access `a` ended.
    fn end(&mut self, a: &GuestAccess, seen: &Observed) {
        match seen {
            Observed::Ram { .. } => self.ram += 1,
            Observed::Mmio { device: true, .. } => self.mmio_device += 1,
            Observed::Mmio { device: false, .. } => {
                self.mmio_userspace += 1;
                if a.kind == MixKind::RomWrite {
                    self.readonly_write += 1;
                }
            }
            Observed::Error(_) => self.errors += 1,
            Observed::GuestPageFault { .. } => self.guest_page_faults += 1,
        }
    }
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
    /// The wrap trap's sweep handshake between the device manager and vCPU 0 (`SWEEP_*`).
    sweep: &'a AtomicU8,
    /// The wrap trap's dummy slot (`wrap_trap`).
    trap_slot: Option<SlotRequest>,
    /// The wrap trap's hold handshake between the device manager and vCPU 1 (`HOLD_*`).
    hold: &'a AtomicU8,
    /// Whether there is a vCPU 1 to hold.
    has_holder: bool,
    /// The wrap trap's age: the vCPUs wait outside guest mode (paused by the VMM), so that the
    /// 2^19 swaps do not wait for them.
    paused: &'a AtomicBool,
    /// Set once the wrap trap has been sprung or given up (a budget run waits for it).
    trap_done: &'a AtomicBool,
    /// When the run started.
    started: Instant,
    /// Per vCPU, its exits so far (`MachineConfig::timeline`).
    live: &'a [LiveExits],
    /// Host invalidations in flight (`stress_paths`), from before the MMU's begin to after its
    /// end: a fault there retries until the host is done, however long a loaded host makes it
    /// (KVM's faults wait the same way), so those retries do not count towards the livelock
    /// limit. Relaxed: a hint for the retry policy, nothing the oracle reads.
    invalidating: &'a AtomicU32,
}

/// Wrap-trap hold handshake: idle.
const HOLD_IDLE: u8 = 0;
/// Device manager: fault on the dummy slot's page now (its host translation is slow).
const HOLD_ASK: u8 = 1;

/// How long the holder's host page fault lasts during the spring.
const HOLD_TIME: Duration = Duration::from_millis(20);

/// Wrap-trap sweep handshake states.
const SWEEP_IDLE: u8 = 0;
/// Device manager: sweep the DIMM now (arm).
const SWEEP_ARM: u8 = 1;
/// Device manager: get ready to sweep on `SWEEP_GO` (spring).
const SWEEP_SPRING: u8 = 2;
/// vCPU 0: ready, waiting for `SWEEP_GO`.
const SWEEP_READY: u8 = 3;
/// Device manager: go (it starts the wrapping swap right after).
const SWEEP_GO: u8 = 4;
/// vCPU 0: sweeping.
const SWEEP_BUSY: u8 = 5;

/// The wrap trap's dummy slot: id, GPA (nothing else is there; only the spring's holder,
/// vCPU 1, accesses it).
const TRAP_SLOT: u16 = 12;
const TRAP_GPA: u64 = 0x3000_0000;

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
        let dimm_flags = if config.wrap_trap { SlotRequest::LOG_DIRTY_PAGES } else { 0 };
        let phys_bits = host.config().phys_bits;
        let schedule = Arc::new(Schedule::device_manager_with(&memory, phys_bits, dimm_flags)?);
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

    /// The first memslot generation (one address space) for a wrap-trap run: the static slots'
    /// creates (one swap each) end exactly on an MMIO-generation wrap.
    pub fn wrap_trap_generation_base(&self) -> u64 {
        (1u64 << Generation::MMIO_GEN_BITS) - self.memory.static_requests().len() as u64
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
        // Stress runs stretch the MMU's decision-to-install windows (see `SimHost::table`), and
        // by default map with 4 KiB leaves only, so that vCPUs race per page.
        self.host().set_table_jitter(cfg.stress_paths);
        self.host().set_huge_pages(cfg.host_pages.huge(cfg.stress_paths));
        let states: Vec<M::Vcpu> = (0..n).map(|i| mmu.create_vcpu(i)).collect();
        let l = self.layout();
        let logged = [&l.shared, &l.private[0], &l.private[1]];
        let migration =
            cfg.dirty_log.map(|mode| Migration::new(mode, &logged, cfg.dirty_log_rounds));
        let mut collector = migration.as_ref().map(Migration::collector);
        if let Some(c) = &collector {
            if !c.prepare(mmu) {
                collector = None; // this MMU has no dirty logging: nothing to collect
            }
        }
        for request in self.memory.static_requests() {
            let request = match (&migration, &mut collector) {
                (Some(m), Some(c)) => {
                    c.remember(&request);
                    m.flag(request)
                }
                _ => request,
            };
            mmu.set_memory_region(&request).map_err(|error| SimError::Setup { request, error })?;
        }
        let tables = if cfg.guest_paging {
            let buf = self.host().add_buffer("guest_tables", crate::machine_paging::TABLES_SIZE)?;
            let request = crate::machine_paging::tables_slot(&buf);
            mmu.set_memory_region(&request).map_err(|error| SimError::Setup { request, error })?;
            // The shared GVA starts mapping an unused page of shared RAM (module doc of
            // `machine_paging`), through the shared table.
            let first = self.layout().shared.gpa.0 + SHARED_RAM_OFFSET;
            let at = Shootdown::pte_gpa() - crate::machine_paging::TABLES_GPA;
            buf.write(at, Width::W8, Shootdown::pte(first))?;
            Some((buf, Arc::new(Shootdown::new(first))))
        } else {
            None
        };
        let logging = collector.is_some();
        let oracle = Oracle::new(self.memory.clone(), self.schedule.clone());
        let checkers: Vec<VcpuChecker<'_>> = (0..n).map(|i| oracle.checker(i)).collect();
        let clock = Clock::new();
        let stop = AtomicBool::new(false);
        let counters: Vec<Padded> = (0..n).map(|_| Padded::default()).collect();
        let updates = AtomicU64::new(0);
        let sweep = AtomicU8::new(SWEEP_IDLE);
        let hold = AtomicU8::new(HOLD_IDLE);
        let paused = AtomicBool::new(false);
        let trap_done = AtomicBool::new(false);
        let invalidating = AtomicU32::new(0);
        let live: Vec<LiveExits> = (0..n).map(|_| LiveExits::default()).collect();
        let l = self.layout();
        // The dummy slot aliases the shared buffer's last page, which vCPUs never use.
        let trap_slot = cfg
            .wrap_trap
            .then(|| self.memory.request(TRAP_SLOT, Gpa(TRAP_GPA), l.shared.name, PAGE_SIZE, false))
            .flatten()
            .map(|r| SlotRequest {
                userspace_addr: r.userspace_addr + l.shared.size - PAGE_SIZE,
                ..r
            });
        let shared = Shared {
            mmu,
            host: self.host(),
            bus: &self.bus,
            clock: &clock,
            stop: &stop,
            sweep: &sweep,
            trap_slot,
            hold: &hold,
            has_holder: cfg.vcpus >= 2,
            paused: &paused,
            trap_done: &trap_done,
            started: Instant::now(),
            live: &live,
            invalidating: &invalidating,
        };
        let started = Instant::now();
        let interval = Timeline::interval_for(cfg.duration);
        let mut samples: Vec<Sample> = Vec::new();
        let mut sample = |elapsed: Duration, accesses: u64, updates: u64| {
            let mut exits = MmuExits::default();
            live.iter().for_each(|l| l.add_to(&mut exits));
            let t_us = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
            samples.push(Sample { t_us, accesses, updates, exits });
        };
        if cfg.timeline {
            sample(Duration::ZERO, 0, 0);
        }
        let mut next_sample = interval;

        let (vcpu_results, dm, elapsed, collector) = std::thread::scope(|s| {
            let handles: Vec<_> = states
                .into_iter()
                .zip(checkers)
                .enumerate()
                .map(|(i, (state, checker))| {
                    let (shared, counter) = (&shared, &counters[i].0);
                    let tables = tables.clone();
                    let recorder = migration.as_ref().filter(|_| logging).map(|m| m.recorder(i));
                    s.spawn(move || {
                        let out = (shared, cfg, self.layout(), i, state, checker, counter);
                        vcpu_thread(out, recorder, tables)
                    })
                })
                .collect();
            let dm = s.spawn(|| device_manager(&shared, &self.schedule, cfg, &updates));
            // The migration thread: collections back to back, a short pause apart (and, in
            // migrations, logging turned on and off).
            let migrator = collector.map(|mut c| {
                let (stop, mmu) = (&stop, mmu);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        c.step(mmu);
                    }
                    c
                })
            });
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
                if cfg.timeline && elapsed >= next_sample {
                    sample(elapsed, snap.accesses, snap.updates);
                    next_sample += interval;
                }
                let budget_done = cfg.accesses_per_vcpu.is_some_and(|max| {
                    counters.iter().all(|c| c.0.load(Ordering::Relaxed) >= max)
                        && snap.updates >= cfg.min_updates
                        && (!cfg.wrap_trap || trap_done.load(Ordering::SeqCst))
                });
                let churn_done = cfg.max_updates.is_some_and(|m| snap.updates >= m);
                let crashed = handles.iter().any(|h| h.is_finished())
                    || dm.is_finished()
                    || migrator.as_ref().is_some_and(|m| m.is_finished());
                if elapsed >= cfg.duration || budget_done || churn_done || crashed {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
            let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
            let elapsed = started.elapsed();
            let collector = migrator.map(|m| m.join().unwrap_or_else(|panic| resume_unwind(panic)));
            (results, dm.join(), elapsed, collector)
        });
        if cfg.timeline {
            let accesses = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
            sample(elapsed, accesses, updates.load(Ordering::Relaxed));
        }
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
                mmu: mmu.mmu_kind(),
                guest_paging: cfg.guest_paging,
                format: cfg.format,
                phys_bits: self.host().config().phys_bits,
                vcpus: n,
                seed: cfg.seed,
                mmio_caching: MmioCachingReport {
                    requested: cfg.mmio_caching_requested,
                    ..MmioCachingReport::default()
                },
                reader_fences: self.host().reader_fences(),
            },
            elapsed_seconds: elapsed.as_secs_f64(),
            ..Report::default()
        };
        let caching = mmu.mmio_caching();
        report.config.mmio_caching.effective = caching.effective;
        report.config.mmio_caching.reason = caching.reason;
        let mut oracle_report = OracleReport::default();
        let mut mmio_latency = cfg.timeline.then(new_histogram);
        for (index, (c, tlb, mut checker)) in vcpus.into_iter().enumerate() {
            if let (Some(all), Some(mine)) = (mmio_latency.as_mut(), c.mmio_latency.as_ref()) {
                // Same bounds on both sides, so this cannot fail; a failure would only lose
                // this vCPU's part of the histogram.
                let _ = all.add(mine);
            }
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
                gave_way: c.gave_way,
                errors: c.errors,
                tlb,
            });
            checkers.push(checker);
        }
        oracle_report.merge(dm.oracle);
        oracle_report.merge(oracle.final_checks(&checkers));
        if let Some(c) = collector {
            // The vCPUs have stopped and handed their last windows over: close them all.
            let (verdict, stats) = c.finish(mmu);
            oracle_report.merge(verdict);
            report.dirty_log = Some(stats);
        }
        report.oracle = oracle_report;
        report.fill_mmu(&mmu.stats());
        let mmu_memslots = report.memslots.clone();
        report.memslots = MemslotReport {
            updates: dm.updates,
            refused: dm.refused,
            host_invalidations: dm.invalidations,
            wrap_trap: dm.trap,
            latency_ns: Percentiles::of(&dm.latency),
            ..mmu_memslots
        };
        report.tables = self.host().table_stats();
        if cfg.timeline {
            report.timeline = Some(Timeline {
                clock: "wall time".into(),
                interval_us: interval.as_micros() as u64,
                samples,
                update_latency: LatencyHistogram::of(&dm.latency),
                mmio_latency: mmio_latency.as_ref().map(LatencyHistogram::of).unwrap_or_default(),
            });
        }
        Ok(report)
    }
}

type VcpuResult<'o> = (VcpuCounters, TlbStats, VcpuChecker<'o>);

/// What a vCPU thread gets: the shared state, the configuration, the layout, its index, its MMU
/// state, its checker and its progress counter.
type VcpuArgs<'a, 's, 'o, M> = (
    &'a Shared<'s, M>,
    &'a MachineConfig,
    &'a MachineLayout,
    usize,
    <M as GuestMmu>::Vcpu,
    VcpuChecker<'o>,
    &'a AtomicU64,
);

fn vcpu_thread<'o, M: GuestMmu>(
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
fn access<M: GuestMmu>(
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

/// The data access of a translated guest access: `width` bytes at `gva`'s offset in `page`.
fn ram_at(page: std::ptr::NonNull<u8>, gva: u64, width: Width, store: Option<u64>) -> Observed {
    let p = page.as_ptr().wrapping_add((gva & 0xfff) as usize);
    let value = match store {
        // SAFETY: `page` is a RAM frame of the machine's host (from `ram_page` or a TLB entry
        // made from one), valid while the host lives; the access is naturally aligned (the mix
        // makes it so), so it stays in the page; buffer memory is only accessed atomically.
        Some(v) => unsafe {
            crate::ram::store(p, width, v);
            v
        },
        // SAFETY: as for the store.
        None => unsafe { crate::ram::load(p, width) },
    };
    Observed::Ram { hva: Hva(p as u64), value }
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
        match p.tlb.lookup(gva, need).and_then(|pfn| sh.host.ram_page(pfn)) {
            Some(page) => ram_at(page, gva, a.width, store),
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
                            ram_at(e.page, gva, a.width, store)
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

struct DmResult {
    updates: u64,
    refused: u64,
    invalidations: u64,
    trap: crate::report::WrapTrapReport,
    latency: Histogram<u64>,
    oracle: OracleReport,
}

/// How the device manager paces its memslot requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateProfile {
    /// Back to back, `update_pause` apart, for the whole run: a stress far beyond what a VM does
    /// (over 1000 updates per second).
    Steady,
    /// Like a recorded boot (`tests/traces/seabios-kvm.small.trace.jsonl`: 48 updates in 3.6 s,
    /// in bursts of 10 to 15 within a millisecond or two, with quiet gaps of 0.3 to 2.3 s):
    /// bursts of `burst` requests `update_pause` apart, then `quiet`.
    Boot {
        /// Requests per burst.
        burst: u32,
        /// The pause after each burst.
        quiet: Duration,
    },
}

impl UpdateProfile {
    /// The boot-like profile with rates from the recorded SeaBIOS boot: bursts of 12, 600 ms
    /// apart (about 20 updates per second).
    pub const BOOT: UpdateProfile =
        UpdateProfile::Boot { burst: 12, quiet: Duration::from_millis(600) };

    /// The pause after request number `done` (1-based) given the in-burst `pause`.
    fn pause_after(self, done: u64, pause: Duration) -> Duration {
        match self {
            UpdateProfile::Steady => pause,
            UpdateProfile::Boot { burst, quiet } => {
                if done % u64::from(burst.max(1)) == 0 {
                    quiet
                } else {
                    pause
                }
            }
        }
    }
}

fn device_manager<M: GuestMmu>(
    sh: &Shared<'_, M>,
    schedule: &Schedule,
    cfg: &MachineConfig,
    progress: &AtomicU64,
) -> DmResult {
    let pause = cfg.update_pause;
    let mut rng = fastrand::Rng::with_seed(cfg.seed ^ 0x5eed_d3a1_u64);
    let mut invalidate = cfg.stress_paths;
    let mut r = DmResult {
        updates: 0,
        refused: 0,
        invalidations: 0,
        trap: Default::default(),
        // 1 ns to 60 s with 3 significant digits: valid bounds, so this cannot fail. Longer
        // latencies saturate at 60 s.
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
        oracle: OracleReport::default(),
    };
    if let Some(trap) = sh.trap_slot {
        arm_wrap_trap(sh, &mut r.trap);
        r.trap.dummy_slot_gpa = trap.guest_phys_addr;
        if !r.trap.armed {
            sh.trap_done.store(true, Ordering::SeqCst);
        }
    } else {
        sh.trap_done.store(true, Ordering::SeqCst);
    }
    let dimm = sh
        .trap_slot
        .and_then(|_| schedule.steps().iter().find(|s| s.label.starts_with("dimm: hot")));
    while !sh.stop.load(Ordering::Relaxed) {
        if let (Some(trap), Some(d)) = (sh.trap_slot, dimm) {
            let plugged = schedule
                .version(r.updates)
                .lookup(vmmu::types::Gfn(d.request.guest_phys_addr >> 12))
                .is_some();
            if r.trap.armed && !sh.trap_done.load(Ordering::Relaxed) && plugged {
                spring_wrap_trap(sh, trap, &mut r.trap);
                r.trap.sprung_after_ms = sh.started.elapsed().as_millis() as u64;
                sh.trap_done.store(true, Ordering::SeqCst);
            }
        }
        let step = schedule.step(r.updates);
        sh.clock.tick();
        let t = Instant::now();
        let got = sh.mmu.set_memory_region(&step.request);
        let took = t.elapsed();
        let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        sh.clock.tick();
        if took >= STALL && sh.stop.load(Ordering::Relaxed) {
            r.oracle.push(stall(&format!("memslot request {} ({})", r.updates, step.label), took));
        }
        r.latency.saturating_record(ns.max(1));
        r.updates += 1;
        r.oracle.checked += 1;
        if step.expect.is_err() {
            r.refused += 1;
        }
        let want = step.expect;
        let got = got.map_err(Errno::from);
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
        if invalidate && !sh.stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            // The slot the request just mapped (a create or move), if any: its first pages are
            // being faulted in by every vCPU right now, which is where a stale decision installed
            // over another vCPU's fresh leaf would leave a translation unflushed.
            let mapped =
                (step.request.memory_size != 0).then_some((step.request.slot & 0xffff) as u16);
            invalidate = host_invalidation(sh, schedule.version(r.updates), mapped, &mut rng);
            r.invalidations += u64::from(invalidate);
            let took = t.elapsed();
            if took >= STALL && sh.stop.load(Ordering::Relaxed) {
                r.oracle.push(stall("host invalidation", took));
            }
        }
        let pause = cfg.update_profile.pause_after(r.updates, pause);
        if pause.is_zero() {
            std::thread::yield_now();
        } else {
            // In slices, so a long quiet gap does not hold the run past its end.
            let until = Instant::now() + pause;
            while !sh.stop.load(Ordering::Relaxed) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(10)));
            }
        }
    }
    r
}

/// One host invalidation (`stress_paths`) of 1 to 4 pages of a slot live in `slots` (the map in
/// force: only the device manager changes it; slot `prefer` if it is live, else a random one):
/// MMU-notifier begin, poison, restore, end. Half the time the range starts at the slot's first
/// page, where the vCPUs' private areas, the used shared words and the hot spots are. Returns `false` if the MMU takes no host invalidations.
fn host_invalidation<M: GuestMmu>(
    sh: &Shared<'_, M>,
    slots: &SlotTable,
    prefer: Option<u16>,
    rng: &mut fastrand::Rng,
) -> bool {
    let live = slots.slots();
    if live.is_empty() {
        return true;
    }
    let s = match prefer.and_then(|id| live.iter().find(|s| s.id == id)) {
        Some(s) => *s,
        None => live[rng.usize(..live.len())],
    };
    let pages = rng.u64(1..=4).min(s.npages);
    let first = if rng.bool() { 0 } else { rng.u64(0..=s.npages - pages) };
    let start = Hva(s.userspace_addr + first * PAGE_SIZE);
    let len = pages * PAGE_SIZE;
    let Some((buf, off)) = sh.host.locate(start) else { return true };
    // The notifier range covers the whole 2 MiB blocks around the pages, clipped to the buffer:
    // a host changes part of a transparent huge page only after splitting it, and the split
    // invalidates the whole block (Linux `split_huge_pmd`). Invalidating less would let a fault
    // on another page of the block map the block with one huge leaf while its pages are changed.
    let b0 = buf.hva().0;
    let lo = (start.0 & !(SIZE_2M - 1)).max(b0);
    let hi = (start.0 + len).next_multiple_of(SIZE_2M).min(b0 + buf.len());
    sh.invalidating.fetch_add(1, Ordering::Relaxed);
    if !sh.mmu.invalidate_hva_range_begin(Hva(lo), Hva(hi)) {
        sh.invalidating.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    // No vCPU may touch the pages now: whatever they read before the end is poison.
    let words = (off..off + len).step_by(8);
    let saved: Vec<u64> = words.clone().map(|o| buf.read(o, Width::W8).unwrap_or(0)).collect();
    for o in words.clone() {
        // In bounds: the range lies in the slot, and the slot in its buffer.
        let _ = buf.write(o, Width::W8, POISON);
    }
    // Keep the pages poisoned while the vCPUs run a little: an MMU that let them keep a
    // translation would show it now (a correct one makes their faults there retry meanwhile).
    for _ in 0..POISON_HOLD_YIELDS {
        std::thread::yield_now();
    }
    for (o, v) in words.zip(saved) {
        let _ = buf.write(o, Width::W8, v);
    }
    sh.mmu.invalidate_hva_range_end();
    sh.invalidating.fetch_sub(1, Ordering::Relaxed);
    true
}

fn stall(what: &str, took: Duration) -> Violation {
    Violation {
        vcpu: None,
        gpa: None,
        what: what.to_string(),
        expected: format!("to complete while the vCPUs run (in less than {STALL:?})"),
        seen: format!(
            "it took {took:.1?} and returned only after the run stopped: a stall (a wait for a \
             vCPU in guest mode that nothing made leave)"
        ),
    }
}

/// vCPU 0 of a wrap-trap run: one sweep of the DIMM (one 8-byte read per page) when the device
/// manager asks, right away (arm) or on its go (spring).
fn sweep_dimm<'o, M: GuestMmu>(
    sh: &Shared<'_, M>,
    layout: &MachineLayout,
    hw: &mut HwVcpu<'_, M>,
    c: &mut VcpuCounters,
    checker: &mut VcpuChecker<'o>,
) {
    let cas =
        |from, to| sh.sweep.compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst).is_ok();
    if cas(SWEEP_SPRING, SWEEP_READY) {
        // Spring: wait for the go, then for the wrapping swap to publish a final (not in
        // progress) generation; sweeping earlier would only replace traps (their generation
        // does not match yet). A correct MMU zaps them before it publishes that generation.
        let before = sh.mmu.generation();
        while sh.sweep.load(Ordering::SeqCst) != SWEEP_GO
            || sh.mmu.generation() & Generation::UPDATE_IN_PROGRESS != 0
            || sh.mmu.generation() == before
        {
            if sh.stop.load(Ordering::Relaxed) {
                return;
            }
            // Still a vCPU: it answers requests (flushes, kicks) while it waits.
            hw.poll();
        }
        sh.sweep.store(SWEEP_BUSY, Ordering::SeqCst);
    } else if !cas(SWEEP_ARM, SWEEP_BUSY) {
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
    sh.sweep.store(SWEEP_IDLE, Ordering::SeqCst);
}

/// Stores `ask` into the sweep handshake and waits until it reads `until` (or the run stops).
fn sweep_handshake<M: GuestMmu>(sh: &Shared<'_, M>, ask: u8, until: u8) -> bool {
    sh.sweep.store(ask, Ordering::SeqCst);
    while sh.sweep.load(Ordering::SeqCst) != until {
        if sh.stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// The wrap trap's arm (module doc): only if the generation sits exactly on a wrap.
fn arm_wrap_trap<M: GuestMmu>(sh: &Shared<'_, M>, t: &mut crate::report::WrapTrapReport) {
    let gen = sh.mmu.generation();
    t.armed_at = gen;
    if gen == 0 || gen & Generation::MMIO_GEN_MASK != 0 {
        return;
    }
    t.armed = sweep_handshake(sh, SWEEP_ARM, SWEEP_IDLE);
}

/// The wrap trap's age and spring (module doc).
fn spring_wrap_trap<M: GuestMmu>(
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
    if !sweep_handshake(sh, SWEEP_SPRING, SWEEP_READY) {
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
        sh.hold.store(HOLD_ASK, Ordering::SeqCst);
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
    sh.sweep.store(SWEEP_GO, Ordering::SeqCst);
    flags ^= SlotRequest::LOG_DIRTY_PAGES;
    t.sprung = swap(t, flags);
    sh.host.set_slow_translations(None);
    t.sprung_at = sh.mmu.generation();
    while (sh.sweep.load(Ordering::SeqCst) != SWEEP_IDLE
        || sh.hold.load(Ordering::SeqCst) != HOLD_IDLE)
        && !sh.stop.load(Ordering::Relaxed)
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
