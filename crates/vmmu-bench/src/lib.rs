//! # vmmu-bench: the numbers behind `vmmu bench`
//!
//! One module per row group of the table (issue 8):
//! - [`mmio`]: one MMIO access resolved by the fast path (MMIO SPTE hit), a per-vCPU cache hit,
//!   the slow path with caching off, and the Rust-VMM baseline (a `BTreeMap` range lookup behind
//!   an `RwLock` over 64 device ranges);
//! - [`shadow`]: one MMIO access under the shadow-paging MMU: a GVA-keyed per-vCPU cache hit, an
//!   MMIO SPTE hit through the lockless shadow walk, and the uncached path (guest page-table
//!   walk, memslot search, emulate), each against the uncached path;
//! - [`lookup`]: gfn -> slot at 10, 1000 and 32764 slots, and a last-used hit;
//! - [`memslot`]: create / flags change / move / delete with 0..32000 other slots, vCPU idle or
//!   busy faulting; time to set up 32764 slots;
//! - [`kvm`]: the same memslot operations on real `/dev/kvm` in the same run, and vmmu / KVM;
//! - [`faults`]: demand faults (4 KiB and 2 MiB, 1 and 2 threads) over populated host memory;
//! - [`churn`]: vCPU throughput while a 2 MiB slot is created, moved and deleted back to back,
//!   as a share of undisturbed throughput, for vmmu and for KVM;
//! - [`dirtylog`]: `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG` on 1 GiB and 4 GiB slots, GET with
//!   dirty pages, and the write fault after a re-protect, for vmmu and for KVM.
//!
//! Every row carries a ratio measured in the same run; targets are reported, never asserted.
//! The issuing thread of memslot operations is pinned to CPU 0 and busy vCPU threads to CPU 1
//! (when there are two CPUs), for vmmu and KVM alike.
#![deny(missing_docs)]

pub mod churn;
pub mod dirtylog;
pub mod faults;
pub mod kvm;
pub mod lookup;
pub mod memslot;
pub mod mmio;
pub mod shadow;
pub mod shadow_faults;
pub mod table;
pub mod timing;

use std::sync::Arc;
use std::time::Instant;
use table::{Row, RunInfo, Table};
use vmmu::memslot::{MemslotError, UserspaceMemoryRegion};
use vmmu::spte::FormatKind;
use vmmu::vm::{Vm, VmConfig, VmError};
use vmmu_sim::host::{HostConfig, HostError, SimHost};

/// The row groups, in print order.
pub const GROUPS: [&str; 8] =
    ["mmio", "shadow", "lookup", "memslot", "kvm", "faults", "churn", "dirtylog"];

/// How to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Fewer samples and shorter phases (under a minute in all).
    pub quick: bool,
    /// Token samples, for tests of the table's structure (numbers meaningless). Implies `quick`.
    pub smoke: bool,
    /// Only these groups (all when empty).
    pub only: Vec<String>,
    /// Skip the real-KVM measurements (their rows say so).
    pub no_kvm: bool,
}

impl Options {
    fn wants(&self, group: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|g| g == group)
    }

    /// Scales a sample count: `full` normally, `quick` with `--quick`, a tenth of that (at
    /// least 1) with `smoke`.
    pub(crate) fn n(&self, quick: usize, full: usize) -> usize {
        if self.smoke {
            (quick / 10).max(1)
        } else if self.quick {
            quick
        } else {
            full
        }
    }
}

/// The crate's one error type: everything that fails here fails with a [`BenchError`].
pub type Error = BenchError;
/// `Result` with the crate's [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An unknown group name in `only`.
    #[error(
        "unknown group {0:?}; groups are: mmio, shadow, lookup, memslot, kvm, faults, churn, dirtylog"
    )]
    UnknownGroup(String),
    /// The VM could not be built.
    #[error("VM: {0}")]
    Vm(#[from] VmError),
    /// The software host refused.
    #[error("host: {0}")]
    Host(#[from] HostError),
    /// A memslot request the benchmark relies on failed.
    #[error("memslot request {what} failed: {err}")]
    Memslot {
        /// Which request.
        what: String,
        /// The error.
        err: MemslotError,
    },
    /// The harness did not measure what it meant to (e.g. a fault took another path).
    #[error("benchmark harness: {0}")]
    Harness(String),
}

/// A software host with room for `frames` frames (RAM and tables).
/// What an exit handler takes from a fault's result to act on it: the guest-physical address to
/// emulate (0 for any other outcome). The timed loops consume every result through this, as a
/// hypervisor's handler would, and hand only the address to `black_box`: handing it the whole
/// `Result` (112 bytes) made every call copy it with 16-byte loads over the callee's narrower
/// stores, a store-forwarding stall of about 4 ns that no real caller pays and that made every
/// row look slower by the same amount.
#[inline(always)]
pub(crate) fn emulated_gpa(r: Result<vmmu::fault::FaultOutcome, vmmu::fault::FaultError>) -> u64 {
    match r {
        Ok(vmmu::fault::FaultOutcome::Emulate { gpa, .. }) => gpa.raw(),
        _ => 0,
    }
}

/// Checks that `took` of the `calls` calls of a timed path took the path its row names,
/// allowing `slack` calls that did not: the untimed warm-up calls right after a switch from
/// another path (a cycle of gfns settles into its steady state within the per-vCPU cache's size).
pub(crate) fn all_took(path: &str, took: u64, calls: u64, slack: u64) -> Result<(), BenchError> {
    if took + slack < calls {
        return Err(BenchError::Harness(format!("{path}: only {took} of {calls} calls took it")));
    }
    Ok(())
}

/// The next index of a timed loop that cycles through `len` addresses: a compare, not `%`,
/// whose 64-bit division (tens of cycles on this CPU, and a dependency from one call to the
/// next) would otherwise be timed with the path.
#[inline(always)]
pub(crate) fn cycle_next(i: usize, len: usize) -> usize {
    if i + 1 >= len {
        0
    } else {
        i + 1
    }
}

pub(crate) fn sim_host(frames: u64) -> Result<Arc<SimHost>, BenchError> {
    Ok(Arc::new(SimHost::new(HostConfig { max_frames: frames, ..HostConfig::new(46) })?))
}

/// An EPT VM on `host` (MAXPHYADDR 46).
pub(crate) fn vm(
    host: &Arc<SimHost>,
    caching: bool,
    vcpus: usize,
    slot_zap_all: bool,
) -> Result<Vm<SimHost>, BenchError> {
    let mut c = VmConfig::new(FormatKind::Ept, 46)?;
    c.mmio_caching = caching;
    c.max_vcpus = vcpus.max(1);
    c.slot_zap_all = slot_zap_all;
    Ok(Vm::new(c, host.clone())?)
}

/// `KVM_SET_USER_MEMORY_REGION` fields.
pub(crate) fn region(
    slot: u32,
    flags: u32,
    gpa: u64,
    size: u64,
    hva: u64,
) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(slot, flags, gpa, size, hva)
}

/// `vm.set_memory_region` that names the request on failure.
pub(crate) fn set(vm: &Vm<SimHost>, r: &UserspaceMemoryRegion) -> Result<(), BenchError> {
    vm.set_memory_region(r)
        .map(|_| ())
        .map_err(|err| BenchError::Memslot { what: format!("{r:?}"), err })
}

/// Runs the selected groups and returns the table.
pub fn run(opts: &Options) -> Result<Table, BenchError> {
    if let Some(g) = opts.only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
        return Err(BenchError::UnknownGroup(g.clone()));
    }
    let t0 = Instant::now();
    let mut info = RunInfo {
        quick: opts.quick || opts.smoke,
        cpus: timing::cpus(),
        load_before: timing::load_average(),
        ..RunInfo::default()
    };
    let mut rows: Vec<Row> = Vec::new();
    if opts.wants("mmio") {
        rows.extend(mmio::run(opts)?);
    }
    if opts.wants("shadow") {
        rows.extend(shadow::run(opts)?);
        rows.extend(shadow_faults::run(opts)?);
    }
    if opts.wants("lookup") {
        rows.extend(lookup::run(opts)?);
    }
    if opts.wants("memslot") {
        rows.extend(memslot::run(opts, &mut info)?);
    }
    if opts.wants("kvm") {
        let k = kvm::run(opts, &mut info);
        rows.extend(kvm::with_ratios(k, &rows));
    }
    if opts.wants("faults") {
        rows.extend(faults::run(opts)?);
    }
    if opts.wants("churn") {
        rows.extend(churn::run(opts, &mut info)?);
    }
    if opts.wants("dirtylog") {
        rows.extend(dirtylog::run(opts)?);
    }
    info.elapsed_s = t0.elapsed().as_secs_f64();
    Ok(Table { info, rows })
}
