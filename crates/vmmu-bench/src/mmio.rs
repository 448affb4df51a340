//! Group 1: one MMIO access, resolved six ways (three of them the fast path).
//!
//! - **fast path**: an EPT misconfiguration on a gfn whose MMIO SPTE is installed; one gfn more
//!   than the per-vCPU cache holds, 16 KiB apart so that all select one entry of the
//!   direct-mapped cache, cycled, so the cache always misses and every call takes the lockless
//!   walk (KVM `handle_mmio_page_fault`). The gfns share one 2 MiB, as a device's
//!   registers do, so the walk is answered by the vCPU's leaf-table cache (`vmmu::mmu_core` walk
//!   module: one entry read from the last level-1 table, validated by the table epoch);
//! - **fast path, six devices**: the same with one gfn in each of six 2 MiB (the default
//!   machine's MMIO regions), all selecting one entry of the per-vCPU cache, so that cache
//!   misses and the leaf-table cache must hold six tables at once;
//! - **fast path, whole walk**: the same with the gfns 2 MiB apart and more of them than the
//!   leaf-table cache holds, so it misses as well and every call walks all four levels from the
//!   root;
//! - **cache hit**: the same gfn again and again (KVM `vcpu_match_mmio_gpa`);
//! - **slow path, caching off**: an EPT violation on a gfn with no slot, in a VM that installs no
//!   MMIO SPTE, so every access searches the memslots (KVM with `kvm.mmio_caching=0`);
//! - **baseline**: what Rust VMMs do on every MMIO exit: find the device in a `BTreeMap` of
//!   address ranges behind an `RwLock` (64 devices).
//!
//! Every VM has the same 10 RAM slots, so the memslot search is not trivially short. Before
//! timing, each path is run once and its outcome checked, and after it the vCPUs' counters must
//! show that the calls took the path their row names. The paths are timed in turns, a batch of
//! each per round ([`Rounds`]); a row's ratio is the median over rounds of the two paths' times
//! in that round, so it need not equal the quotient of the two medians shown.

use crate::table::{Row, Unit};
use crate::timing::{Rounds, Summary};
use crate::{region, set, BenchError, Options};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::RwLock;
use vmmu::fault::{EmulateSource, FaultOutcome};
use vmmu::vcpu::Vcpu;
use vmmu::{FaultAccess, Gpa};
use vmmu_sim::host::SimHost;

const G: &str = "mmio";
/// The MMIO gfns: no slot covers them (a device window at 4 GiB).
const MMIO_A: u64 = 0x1_0000_0000;
const MMIO_B: u64 = MMIO_A + 0x1000;
/// Gfns of the whole-walk row, each in its own 2 MiB: twice what the vCPU's leaf-table cache
/// holds (16 tables), cycled in order, so every call misses it (the `vmmu::mmu_core` walk module's
/// test `cycling_32_neighbouring_regions_always_walks` checks this pattern).
const FAR_GFNS: u64 = 32;
/// The default machine's MMIO 2 MiB regions (device window, BAR positions, DIMM), as gfn >> 9.
const DEVICE_REGIONS: [u64; 6] = [0x680, 0x600, 0x604, 0x5ff, 0x800, 0x801];
/// RAM slots per VM.
const RAM_SLOTS: u64 = 10;

fn source(o: &FaultOutcome) -> Option<EmulateSource> {
    match o {
        FaultOutcome::Emulate { source, .. } => Some(*source),
        _ => None,
    }
}

fn vcpu_of(caching: bool, host: &std::sync::Arc<SimHost>) -> Result<Vcpu<SimHost>, BenchError> {
    let vm = crate::vm(host, caching, 1, false)?;
    for i in 0..RAM_SLOTS {
        // 2 MiB of RAM every 256 MiB; the host addresses are never translated here.
        set(&vm, &region(i as u32, 0, i << 28, 2 << 20, 0x1000_0000_0000 + (i << 21)))?;
    }
    let mut v = vm.create_vcpu()?;
    v.service_requests().map_err(|e| BenchError::Harness(format!("root: {e}")))?;
    Ok(v)
}

fn expect(
    o: Result<FaultOutcome, vmmu::fault::FaultError>,
    want: EmulateSource,
) -> Result<(), BenchError> {
    match o {
        Ok(o) if source(&o) == Some(want) => Ok(()),
        other => Err(BenchError::Harness(format!("expected {want:?}, got {other:?}"))),
    }
}

/// The Rust-VMM dispatch: 64 device ranges of 4 KiB, 64 KiB apart, in a `BTreeMap` keyed by
/// base address behind an `RwLock` (as vm-device's / Firecracker's `Bus`).
pub struct DeviceBus {
    ranges: RwLock<BTreeMap<u64, (u64, u32)>>,
}

impl Default for DeviceBus {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceBus {
    /// The 64-device bus at 4 GiB.
    pub fn new() -> DeviceBus {
        let map = (0..64u32).map(|i| (MMIO_A + u64::from(i) * 0x10000, (0x1000, i))).collect();
        DeviceBus { ranges: RwLock::new(map) }
    }

    /// The device at `addr`, if any.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<u32> {
        let m = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        m.range(..=addr)
            .next_back()
            .filter(|(base, (len, _))| addr - **base < *len)
            .map(|(_, d)| d.1)
    }

    /// Two addresses inside devices 10 and 50.
    pub fn probes() -> [u64; 2] {
        [MMIO_A + 10 * 0x10000 + 8, MMIO_A + 50 * 0x10000 + 8]
    }
}

/// The paths, in the order each round times them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Fast,
    Devices,
    Walk,
    Cache,
    SlowOff,
    Baseline,
}
const PATHS: usize = 6;

/// Per-call medians and p99s (ns) of the paths, and the ratios of the targets, each taken over
/// the rounds of one run ([`Rounds`]).
#[derive(Clone, Copy, Debug)]
pub struct MmioNumbers {
    /// Fast path (MMIO SPTE hit), through the vCPU's leaf-table cache.
    pub fast: Summary,
    /// Fast path cycling six device regions: leaf-table cache hits in six tables.
    pub fast_devices: Summary,
    /// Fast path with a leaf-table cache miss on every call: the whole lockless walk.
    pub fast_walk: Summary,
    /// Per-vCPU cache hit.
    pub cache: Summary,
    /// Slow path with caching off.
    pub slow_off: Summary,
    /// The BTreeMap baseline.
    pub baseline: Summary,
    /// Fast path / slow path, the median over rounds.
    pub fast_per_slow: f64,
    /// Six-device fast path / slow path.
    pub devices_per_slow: f64,
    /// Whole-walk fast path / slow path.
    pub walk_per_slow: f64,
    /// Cache hit / baseline.
    pub cache_per_baseline: f64,
    /// Baseline / fast path.
    pub baseline_per_fast: f64,
}

/// Installs the MMIO SPTEs of `gpas` (slow path), then checks the fast path once on each.
fn install_mmio_sptes(v: &mut Vcpu<SimHost>, gpas: &[Gpa]) -> Result<(), BenchError> {
    for &g in gpas {
        expect(v.handle_ept_violation(g, FaultAccess::READ), EmulateSource::SlowPathMmio)?;
    }
    for &g in gpas {
        expect(v.handle_ept_misconfig(g), EmulateSource::MmioSpteHit)?;
    }
    Ok(())
}

/// Measures the paths: `rounds` rounds, each timing one batch of 1000 calls of every path.
pub fn measure(rounds: usize) -> Result<MmioNumbers, BenchError> {
    let host = crate::sim_host(1 << 16)?;
    let a = Gpa(MMIO_A);
    let b = Gpa(MMIO_B);

    let mut on = vcpu_of(true, &host)?;
    // One gfn more than the per-vCPU cache holds, 16 KiB apart (so all select one entry of the
    // direct-mapped cache), cycled in order: the cache always misses, so every call walks.
    let cycle: Vec<Gpa> =
        (0..=vmmu::vcpu::mmio_cache::ENTRIES as u64).map(|i| Gpa(MMIO_A + i * 0x4000)).collect();
    install_mmio_sptes(&mut on, &cycle)?;
    // One gfn in each device region, all selecting the per-vCPU cache entry of the first.
    let devices: Vec<Gpa> = DEVICE_REGIONS
        .iter()
        .map(|&r| {
            let entry = vmmu::vcpu::mmio_cache::slot_of(DEVICE_REGIONS[0] << 9);
            let gfn = (r << 9..(r + 1) << 9)
                .find(|&g| vmmu::vcpu::mmio_cache::slot_of(g) == entry)
                .unwrap_or(r << 9);
            Gpa(gfn << 12)
        })
        .collect();
    install_mmio_sptes(&mut on, &devices)?;
    // The same, with each gfn in its own 2 MiB and more of them than the vCPU's leaf-table cache
    // holds: it misses on every call too, so each call walks from the root.
    let far: Vec<Gpa> = (0..FAR_GFNS).map(|i| Gpa(MMIO_A + (1 << 30) + i * (2 << 20))).collect();
    install_mmio_sptes(&mut on, &far)?;
    // `a` is cached after one more hit (filled by it if not already).
    let _ = on.handle_ept_misconfig(a);
    expect(on.handle_ept_misconfig(a), EmulateSource::VcpuCacheHit)?;

    let mut off = vcpu_of(false, &host)?;
    expect(off.handle_ept_violation(a, FaultAccess::READ), EmulateSource::SlowPathMmio)?;
    expect(off.handle_ept_violation(b, FaultAccess::READ), EmulateSource::SlowPathMmio)?;

    let bus = DeviceBus::new();
    let [p, q] = DeviceBus::probes();
    if bus.find(p) != Some(10) || bus.find(q) != Some(50) || bus.find(p + 0x1000).is_some() {
        return Err(BenchError::Harness("device bus lookup".into()));
    }

    let mut r = Rounds::<PATHS>::new(rounds, 1000);
    // The three fast-path rows, each cycling its gfns on from where its last batch stopped.
    let cycles = [(Path::Fast, &cycle), (Path::Devices, &devices), (Path::Walk, &far)];
    let mut next = cycles.map(|(_, gpas)| gpas.len() - 1);
    let mut flip = false;
    let mut took = [0u64; PATHS];
    for _ in 0..rounds.max(1) {
        for ((path, gpas), n) in cycles.iter().zip(&mut next) {
            let h = on.stats.mmio_spte_hits;
            r.time(*path as usize, || {
                *n = crate::cycle_next(*n, gpas.len());
                black_box(crate::emulated_gpa(on.handle_ept_misconfig(black_box(gpas[*n]))));
            });
            took[*path as usize] += on.stats.mmio_spte_hits - h;
        }
        let h = on.stats.mmio_cache_hits;
        r.time(Path::Cache as usize, || {
            black_box(crate::emulated_gpa(on.handle_ept_misconfig(black_box(a))));
        });
        took[Path::Cache as usize] += on.stats.mmio_cache_hits - h;
        let h = off.stats.slow_path_mmio;
        r.time(Path::SlowOff as usize, || {
            flip = !flip;
            black_box(crate::emulated_gpa(
                off.handle_ept_violation(black_box(if flip { a } else { b }), FaultAccess::READ),
            ));
        });
        took[Path::SlowOff as usize] += off.stats.slow_path_mmio - h;
        r.time(Path::Baseline as usize, || {
            flip = !flip;
            black_box(bus.find(black_box(if flip { p } else { q })));
        });
    }
    // After a switch, a cycle may hit the per-vCPU cache (or the cache path miss it) for at most
    // the cache's size in calls, all of them warm-up calls.
    let slack = (rounds.max(1) * vmmu::vcpu::mmio_cache::ENTRIES) as u64;
    for (path, name) in [
        (Path::Fast, "fast path"),
        (Path::Devices, "six-device fast path"),
        (Path::Walk, "whole-walk fast path"),
        (Path::Cache, "per-vCPU cache hit"),
        (Path::SlowOff, "caching off (slow path)"),
    ] {
        crate::all_took(name, took[path as usize], r.calls(path as usize), slack)?;
    }
    let s = |p: Path| r.summary(p as usize);
    let ratio = |x: Path, y: Path| r.ratio(x as usize, y as usize);
    Ok(MmioNumbers {
        fast: s(Path::Fast),
        fast_devices: s(Path::Devices),
        fast_walk: s(Path::Walk),
        cache: s(Path::Cache),
        slow_off: s(Path::SlowOff),
        baseline: s(Path::Baseline),
        fast_per_slow: ratio(Path::Fast, Path::SlowOff),
        devices_per_slow: ratio(Path::Devices, Path::SlowOff),
        walk_per_slow: ratio(Path::Walk, Path::SlowOff),
        cache_per_baseline: ratio(Path::Cache, Path::Baseline),
        baseline_per_fast: ratio(Path::Baseline, Path::Fast),
    })
}

/// The group's rows.
pub fn run(opts: &Options) -> Result<Vec<Row>, BenchError> {
    let m = measure(opts.n(300, 3000))?;
    let base = m.baseline.median;
    let fast = m.fast.median;
    Ok(vec![
        Row::new(G, "fast path: MMIO SPTE hit (EPT misconfig)", Unit::Ns, fast)
            .p99(m.fast.p99)
            .ratio(m.fast_per_slow, "x slow path")
            .target("<= 20 ns and <= 0.5x slow path", fast <= 20.0 && m.fast_per_slow <= 0.5)
            .note("5 gfns in one 2 MiB: the vCPU cache misses, the leaf-table cache hits"),
        Row::new(G, "fast path, six device regions", Unit::Ns, m.fast_devices.median)
            .p99(m.fast_devices.p99)
            .ratio(m.devices_per_slow, "x slow path")
            .note("one gfn in each of 6 2 MiB: the vCPU cache misses, 6 leaf tables hit"),
        Row::new(G, "fast path, whole walk (leaf-table cache miss)", Unit::Ns, m.fast_walk.median)
            .p99(m.fast_walk.p99)
            .ratio(m.walk_per_slow, "x slow path")
            .note("32 gfns 2 MiB apart: both caches miss, 4-level lockless walk"),
        Row::new(G, "per-vCPU MMIO cache hit", Unit::Ns, m.cache.median)
            .p99(m.cache.p99)
            .ratio(m.cache_per_baseline, "x BTreeMap baseline")
            .target("<= 5 ns", m.cache.median <= 5.0),
        Row::new(G, "slow path, caching off (EPT violation, no slot)", Unit::Ns, m.slow_off.median)
            .p99(m.slow_off.p99)
            .ratio(1.0 / m.fast_per_slow, "x fast path")
            .target("fast path >= 10x faster", m.fast_per_slow <= 0.1)
            .note(
                "missed by construction: this slow path is a memslot search, not KVM's page \
                 fault; caching pays in the main job (vmmu run --compare-caching), BENCHMARKS.md",
            ),
        Row::new(G, "baseline: RwLock<BTreeMap> range lookup, 64 devices", Unit::Ns, base)
            .p99(m.baseline.p99)
            .ratio(m.baseline_per_fast, "x fast path"),
    ])
}
