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
//!   live slot's buffer (the pages alone, or the 2 MiB blocks around them: `device_manager`):
//!   begin, overwrite the pages with [`POISON`], restore them, end. No vCPU may touch them in
//!   between (see the oracle), and they are re-faulted after the end;
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
//! Its parts: `vcpu` runs a vCPU thread and its accesses, `device_manager` the memslot
//! schedule and the host invalidations, `wrap_trap` the MMIO-generation wrap trap.
//!
//! [`POISON`]: crate::oracle::POISON
//! [`HwVcpu`]: crate::hw_vcpu::HwVcpu
//! [`HwVcpu::load_store_with`]: crate::hw_vcpu::HwVcpu::load_store_with
//! [`AccessGen::with_hot_spots`]: crate::mix::AccessGen::with_hot_spots

mod device_manager;
mod vcpu;
mod wrap_trap;

pub use device_manager::UpdateProfile;
use device_manager::{device_manager, DmResult};
use vcpu::{vcpu_thread, VcpuResult, VcpuThread};
use wrap_trap::{Handshake, Hold, Sweep, TRAP_GPA, TRAP_SLOT};

use crate::bus::{BusError, MmioBus, RegisterDevice};
use crate::host::{HostBuffer, HostConfig, HostError, SimHost};
use crate::layout::{MachineLayout, MachineMemory};
use crate::machine_paging::Shootdown;
use crate::migration::{Collector, DirtyLogMode, Migration};
use crate::mix::{GuestAccess, MixKind, MixWeights};
use crate::mmio_timing::Sampler;
use crate::oracle::{Clock, Observed, Oracle, OracleReport, VcpuChecker};
use crate::ram::Width;
use crate::report::{
    ConfigReport, MemslotReport, MmioCachingReport, Percentiles, Report, VcpuReport,
};
use crate::schedule::{Schedule, ScheduleError};
use crate::seam::{Errno, GuestMmu, LiveExits, MmuExits, SlotRequest};
use crate::timeline::{new_histogram, LatencyHistogram, Sample, Timeline};
use crate::tlb::TlbStats;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use hdrhistogram::Histogram;
use std::panic::resume_unwind;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmmu::memslot::MemslotError;
use vmmu::spte::FormatKind;
use vmmu::types::{Generation, Gpa, PAGE_SIZE};

/// The page of shared RAM the shootdowns' GVA maps (beyond the words the vCPUs use).
const SHARED_RAM_OFFSET: u64 = 0x10_0000;

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
    /// With `dirty_log` and `accesses_per_vcpu`: the budget is met only once the migration
    /// thread has started this many collections (a loaded host may keep that thread off the CPU
    /// until the vCPUs have spent their accesses); `duration` still bounds the run.
    pub min_collections: u32,
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
    /// Set the MMIO-generation wrap trap (the doc of the private `wrap_trap` module). The MMU
    /// must start at [`Machine::wrap_trap_generation_base`].
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
            min_collections: 0,
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
    /// The wrap trap's sweep handshake between the device manager and vCPU 0.
    sweep: &'a Handshake<Sweep>,
    /// The wrap trap's dummy slot (`wrap_trap`).
    trap_slot: Option<SlotRequest>,
    /// The wrap trap's hold handshake between the device manager and vCPU 1.
    hold: &'a Handshake<Hold>,
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
        let migration = self.migration();
        let mut collector = dirty_log_collector(migration.as_ref(), mmu);
        self.make_static_slots(mmu, migration.as_ref(), collector.as_mut())?;
        let tables = self.guest_tables(mmu)?;
        let logging = collector.is_some();
        let oracle = Oracle::new(self.memory.clone(), self.schedule.clone());
        let checkers: Vec<VcpuChecker<'_>> = (0..n).map(|i| oracle.checker(i)).collect();
        let run = RunState::new(n);
        let recorders = migration.as_ref().filter(|_| logging);
        let threads = Threads { states, checkers, recorders, tables, collector };
        let finished = self.supervise(mmu, &run, threads, progress);
        Ok(self.report(mmu, &oracle, finished))
    }

    /// With dirty logging, the migration of the RAM slots (shared and private RAM).
    fn migration(&self) -> Option<Migration> {
        let cfg = &self.config;
        let l = self.layout();
        let logged = [&l.shared, &l.private[0], &l.private[1]];
        cfg.dirty_log.map(|mode| Migration::new(mode, &logged, cfg.dirty_log_rounds))
    }

    /// Makes the static memslots on `mmu`; with a `collector`, each is remembered by it and
    /// flagged for dirty logging as `migration` says.
    fn make_static_slots<M: GuestMmu>(
        &self,
        mmu: &M,
        migration: Option<&Migration>,
        mut collector: Option<&mut Collector<'_>>,
    ) -> Result<(), SimError> {
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
        Ok(())
    }

    /// With guest paging, the guest tables' buffer (its memslot made on `mmu`) and the
    /// shootdowns' state, the shared GVA's first mapping written into the shared table.
    fn guest_tables<M: GuestMmu>(&self, mmu: &M) -> Result<Option<GuestTables>, SimError> {
        if !self.config.guest_paging {
            return Ok(None);
        }
        let buf = self.host().add_buffer("guest_tables", crate::machine_paging::TABLES_SIZE)?;
        let request = crate::machine_paging::tables_slot(&buf);
        mmu.set_memory_region(&request).map_err(|error| SimError::Setup { request, error })?;
        // The shared GVA starts mapping an unused page of shared RAM (module doc of
        // `machine_paging`), through the shared table.
        let first = self.layout().shared.gpa.0 + SHARED_RAM_OFFSET;
        let at = Shootdown::pte_gpa() - crate::machine_paging::TABLES_GPA;
        buf.write(at, Width::W8, Shootdown::pte(first))?;
        Ok(Some(GuestTables { buf, shootdown: Arc::new(Shootdown::new(first)) }))
    }

    /// What the run's threads share, borrowing `run`'s atomics; its start time is now.
    fn shared<'a, M: GuestMmu>(&'a self, mmu: &'a M, run: &'a RunState) -> Shared<'a, M> {
        let cfg = &self.config;
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
        Shared {
            mmu,
            host: self.host(),
            bus: &self.bus,
            clock: &run.clock,
            stop: &run.stop,
            sweep: &run.sweep,
            trap_slot,
            hold: &run.hold,
            has_holder: cfg.vcpus >= 2,
            paused: &run.paused,
            trap_done: &run.trap_done,
            started: Instant::now(),
            live: &run.live,
            invalidating: &run.invalidating,
        }
    }

    /// The supervised run: starts the vCPU threads, the device manager and the migration thread,
    /// watches them from the calling thread until the run is over ([`Machine::watch`]), joins
    /// them, and takes the timeline's first and last samples.
    fn supervise<'o, 'm, M: GuestMmu>(
        &self,
        mmu: &M,
        run: &RunState,
        threads: Threads<'o, 'm, M::Vcpu>,
        progress: &mut dyn FnMut(&ProgressSnapshot),
    ) -> Finished<'o, 'm> {
        let cfg = &self.config;
        let shared = self.shared(mmu, run);
        let started = Instant::now();
        let mut timeline = Samples::new(cfg.duration);
        if cfg.timeline {
            timeline.take(&run.live, Duration::ZERO, 0, 0);
        }
        let Threads { states, checkers, recorders, tables, collector } = threads;

        let (vcpus, dm, elapsed, collector) = std::thread::scope(|s| {
            let handles: Vec<_> = states
                .into_iter()
                .zip(checkers)
                .enumerate()
                .map(|(i, (state, checker))| {
                    let (shared, counter) = (&shared, &run.counters[i].0);
                    let tables = tables.clone();
                    let recorder = recorders.map(|m| m.recorder(i));
                    s.spawn(move || {
                        vcpu_thread(VcpuThread {
                            sh: shared,
                            cfg,
                            layout: self.layout(),
                            index: i,
                            state,
                            checker,
                            progress: counter,
                            recorder,
                            tables,
                        })
                    })
                })
                .collect();
            let dm = s.spawn(|| device_manager(&shared, &self.schedule, cfg, &run.updates));
            // The migration thread: collections back to back, a short pause apart (and, in
            // migrations, logging turned on and off).
            let migrator = collector.map(|mut c| {
                let (stop, mmu) = (&run.stop, mmu);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        c.step(mmu);
                    }
                    c
                })
            });
            let collections = || recorders.map_or(0, Migration::collections_started);
            self.watch(run, started, progress, &mut timeline, collections, || {
                handles.iter().any(|h| h.is_finished())
                    || dm.is_finished()
                    || migrator.as_ref().is_some_and(|m| m.is_finished())
            });
            let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
            let elapsed = started.elapsed();
            let collector = migrator.map(|m| m.join().unwrap_or_else(|panic| resume_unwind(panic)));
            (results, dm.join(), elapsed, collector)
        });
        if cfg.timeline {
            timeline.take(&run.live, elapsed, run.accesses(), run.updates.load(Ordering::Relaxed));
        }
        Finished { vcpus, dm, elapsed, collector, timeline }
    }

    /// The supervisor's loop: every 10 ms, `progress` and, with a timeline, a sample when one is
    /// due; stops the run once its time, its access budget (with `collections` the migration
    /// thread's collections so far) or its update count is reached, or once a thread has ended
    /// (`crashed`).
    fn watch(
        &self,
        run: &RunState,
        started: Instant,
        progress: &mut dyn FnMut(&ProgressSnapshot),
        timeline: &mut Samples,
        collections: impl Fn() -> u32,
        crashed: impl Fn() -> bool,
    ) {
        let cfg = &self.config;
        loop {
            std::thread::sleep(Duration::from_millis(10));
            let elapsed = started.elapsed();
            let snap = ProgressSnapshot {
                elapsed,
                duration: cfg.duration,
                accesses: run.accesses(),
                updates: run.updates.load(Ordering::Relaxed),
            };
            progress(&snap);
            if cfg.timeline && elapsed >= timeline.next {
                timeline.take(&run.live, elapsed, snap.accesses, snap.updates);
                timeline.next += timeline.interval;
            }
            let budget_done = cfg.accesses_per_vcpu.is_some_and(|max| {
                run.counters.iter().all(|c| c.0.load(Ordering::Relaxed) >= max)
                    && snap.updates >= cfg.min_updates
                    && collections() >= cfg.min_collections
                    && (!cfg.wrap_trap || run.trap_done.load(Ordering::SeqCst))
            });
            let churn_done = cfg.max_updates.is_some_and(|m| snap.updates >= m);
            let crashed = crashed();
            if elapsed >= cfg.duration || budget_done || churn_done || crashed {
                run.stop.store(true, Ordering::Relaxed);
                break;
            }
        }
    }

    /// The run's report from how its threads ended (a vCPU's or the device manager's panic goes
    /// on unwinding here): the vCPUs' counters and verdicts, the oracle's final checks, the
    /// dirty-log verdict, the MMU's statistics and the timeline.
    fn report<M: GuestMmu>(&self, mmu: &M, oracle: &Oracle, finished: Finished<'_, '_>) -> Report {
        let cfg = &self.config;
        let Finished { vcpus: vcpu_results, dm, elapsed, collector, timeline } = finished;
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
            config: self.config_report(mmu),
            elapsed_seconds: elapsed.as_secs_f64(),
            ..Report::default()
        };
        let caching = mmu.mmio_caching();
        report.config.mmio_caching.effective = caching.effective;
        report.config.mmio_caching.reason = caching.reason;
        let mut oracle_report = OracleReport::default();
        let mut mmio_latency = cfg.timeline.then(new_histogram);
        for (index, (c, tlb, mut checker, paging)) in vcpus.into_iter().enumerate() {
            if let Some(p) = paging {
                report.guest_paging.get_or_insert_with(Default::default).add(&p);
            }
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
            report.vcpus.push(vcpu_report(index, &c, tlb, elapsed));
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
                interval_us: timeline.interval.as_micros() as u64,
                samples: timeline.samples,
                update_latency: LatencyHistogram::of(&dm.latency),
                mmio_latency: mmio_latency.as_ref().map(LatencyHistogram::of).unwrap_or_default(),
            });
        }
        report
    }

    /// The report's configuration part (MMIO caching as requested; the caller adds what the MMU
    /// made of it).
    fn config_report<M: GuestMmu>(&self, mmu: &M) -> ConfigReport {
        let cfg = &self.config;
        ConfigReport {
            mmu: mmu.mmu_kind(),
            guest_paging: cfg.guest_paging,
            format: cfg.format,
            phys_bits: self.host().config().phys_bits,
            vcpus: cfg.vcpus,
            seed: cfg.seed,
            mmio_caching: MmioCachingReport {
                requested: cfg.mmio_caching_requested,
                ..MmioCachingReport::default()
            },
            reader_fences: self.host().reader_fences(),
            shadow_pages: mmu.shadow_pages(),
        }
    }
}

/// The dirty-log collector of `migration`, `None` without one or if the MMU has no dirty
/// logging.
fn dirty_log_collector<'m, M: GuestMmu>(
    migration: Option<&'m Migration>,
    mmu: &M,
) -> Option<Collector<'m>> {
    let mut collector = migration.map(Migration::collector);
    if let Some(c) = &collector {
        if !c.prepare(mmu) {
            collector = None; // this MMU has no dirty logging: nothing to collect
        }
    }
    collector
}

/// Vcpu `index`'s part of the report, from its counters and TLB statistics after `elapsed`.
fn vcpu_report(index: usize, c: &VcpuCounters, tlb: TlbStats, elapsed: Duration) -> VcpuReport {
    VcpuReport {
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
    }
}

/// The guest tables (guest paging), which every vCPU's paging shares.
#[derive(Clone)]
struct GuestTables {
    /// Their buffer, behind its own memslot.
    buf: Arc<HostBuffer>,
    /// The shootdowns' state.
    shootdown: Arc<Shootdown>,
}

/// The atomics a run's threads share and the supervisor watches ([`Shared`] borrows them).
struct RunState {
    clock: Clock,
    stop: AtomicBool,
    /// Per vCPU, its accesses so far (stored after every batch).
    counters: Vec<Padded>,
    /// The device manager's memslot requests so far.
    updates: AtomicU64,
    sweep: Handshake<Sweep>,
    hold: Handshake<Hold>,
    paused: AtomicBool,
    trap_done: AtomicBool,
    invalidating: AtomicU32,
    live: Vec<LiveExits>,
}

impl RunState {
    /// A run's start for `n` vCPUs: the clock at 0, nothing stopped, paused or counted.
    fn new(n: usize) -> Self {
        RunState {
            clock: Clock::new(),
            stop: AtomicBool::new(false),
            counters: (0..n).map(|_| Padded::default()).collect(),
            updates: AtomicU64::new(0),
            sweep: Handshake::new(Sweep::Idle),
            hold: Handshake::new(Hold::Idle),
            paused: AtomicBool::new(false),
            trap_done: AtomicBool::new(false),
            invalidating: AtomicU32::new(0),
            live: (0..n).map(|_| LiveExits::default()).collect(),
        }
    }

    /// Accesses of all vCPUs so far.
    fn accesses(&self) -> u64 {
        self.counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

/// What a run's threads start with besides the shared state: per vCPU its MMU state and checker,
/// the migration the vCPUs record for (when its collector runs), the guest tables (guest paging)
/// and the migration thread's collector.
struct Threads<'o, 'm, V> {
    states: Vec<V>,
    checkers: Vec<VcpuChecker<'o>>,
    recorders: Option<&'m Migration>,
    tables: Option<GuestTables>,
    collector: Option<Collector<'m>>,
}

/// How a run's threads ended: each vCPU's result, the device manager's, how long the vCPUs ran,
/// the migration thread's collector and the timeline's samples.
struct Finished<'o, 'm> {
    vcpus: Vec<std::thread::Result<VcpuResult<'o>>>,
    dm: std::thread::Result<DmResult>,
    elapsed: Duration,
    collector: Option<Collector<'m>>,
    timeline: Samples,
}

/// The timeline's samples (with `MachineConfig::timeline`): at the start, about every `interval`
/// and at the end, each with the exits of all vCPUs.
struct Samples {
    interval: Duration,
    /// When the next periodic sample is due.
    next: Duration,
    samples: Vec<Sample>,
}

impl Samples {
    /// No samples yet, for a run of `duration`.
    fn new(duration: Duration) -> Self {
        let interval = Timeline::interval_for(duration);
        Samples { interval, next: interval, samples: Vec::new() }
    }

    /// A sample at `elapsed`, with the exits in `live` so far.
    fn take(&mut self, live: &[LiveExits], elapsed: Duration, accesses: u64, updates: u64) {
        let mut exits = MmuExits::default();
        live.iter().for_each(|l| l.add_to(&mut exits));
        let t_us = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        self.samples.push(Sample { t_us, accesses, updates, exits });
    }
}
