//! Group `shadow`: one guest MMIO access under the shadow-paging MMU (issue 13 point 12), a #PF
//! exit resolved three ways.
//!
//! - **GVA cache hit**: an RSVD #PF (`USER|RSVD|PRESENT`, what the hardware reports for an MMIO
//!   SPTE) on a GVA whose MMIO info the per-vCPU cache holds: no table is read at all (KVM
//!   `handle_mmio_page_fault` -> `vcpu_match_mmio_gva`);
//! - **MMIO SPTE hit**: the same fault on a GVA the cache does not hold, so the lockless shadow
//!   walk finds the MMIO SPTE (and refills the cache). One GVA more than the cache has entries
//!   ([`vmmu::vcpu::mmio_cache::ENTRIES`]), each mapping its own MMIO gfn, 16 KiB apart so that
//!   all select the same entry of the direct-mapped cache, is cycled in order: the entry holds
//!   the GVA just used, so the next one in the cycle is never there.
//!   Each call therefore costs one cache miss (as every SPTE hit does) plus the walk: nothing
//!   else (no CR3 reload, no cache clearing) is timed;
//! - **uncached**: a VM with MMIO caching off (`mmio_caching = false`, KVM `kvm.mmio_caching=0`)
//!   installs no MMIO SPTE and so takes the hardware's not-present #PF (`USER`) on every
//!   access: the slow path walks the guest's 4-level tables in guest RAM, searches the memslots,
//!   finds no slot and emulates. Two GVAs alternate (as the `mmio` group's slow path does).
//!
//! The guest's page tables are real: written into a RAM buffer of the software host, which the
//! MMU reads through [`vmmu::host::GuestMemory`]. Every VM has the same 10 RAM slots as the
//! `mmio` group's (slot 0 holds the tables), so the memslot search is not trivially short.
//! Before timing, each path is run and its outcome (and the hardware walk that leads to it)
//! checked; after timing, the vCPU's counters must show that the calls took the path the row
//! names. The paths are timed in turns, a batch of each per round ([`Rounds`]); a ratio is the
//! median over rounds of the two paths' times in that round.

use crate::table::{Row, Unit};
use crate::timing::{Rounds, Summary};
use crate::{all_took, region, set, BenchError, Options};
use std::hint::black_box;
use std::sync::Arc;
use vmmu::fault::{EmulateSource, FaultOutcome, PfErr};
use vmmu::guest::GuestCpu;
use vmmu::tdp::HwWalk;
use vmmu::vcpu::mmio_cache::ENTRIES;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, Gpa, Gva};
use vmmu_sim::host::{HostBuffer, SimHost};
use vmmu_sim::ram::Width;

const G: &str = "shadow";
/// RAM slots per VM (slot 0 is the real buffer with the guest's tables).
const RAM_SLOTS: u64 = 10;
/// The guest's PML4; the PDPT, PD and PT follow it page by page.
const CR3: u64 = 0x1000;
/// The GVAs used (a 4 KiB page each, 16 KiB apart): PML4 index 0, PDPT index 1, PD index 0.
const GVA_BASE: u64 = 0x4000_0000;
/// Offset of the access inside its page.
const OFFSET: u64 = 0x10;
/// The MMIO gfns: no slot covers them (a device window at 4 GiB), 8 KiB apart.
const MMIO_BASE: u64 = 0x1_0000_0000;
/// GVAs mapped: one more than the per-vCPU cache holds.
const GVAS: usize = ENTRIES + 1;
/// Calls per timed batch.
const BATCH: usize = 1000;

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;

fn gva(i: usize) -> Gva {
    Gva(GVA_BASE + i as u64 * 0x4000 + OFFSET)
}

fn mmio_gpa(i: usize) -> Gpa {
    Gpa(MMIO_BASE + i as u64 * 0x2000 + OFFSET)
}

fn harness(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Harness(format!("{what}: {e}"))
}

/// Writes the guest's 4-level tables into `ram` (guest-physical 0): GVA `i` maps MMIO gfn `i`,
/// present, writable, user.
fn write_tables(ram: &HostBuffer) -> Result<(), BenchError> {
    let w = |gpa: u64, v: u64| ram.write(gpa, Width::W8, v).map_err(|e| harness("guest table", e));
    let (pml4, pdpt, pd, pt) = (CR3, CR3 + 0x1000, CR3 + 0x2000, CR3 + 0x3000);
    w(pml4 + ((GVA_BASE >> 39) & 511) * 8, pdpt | P | RW | US)?;
    w(pdpt + ((GVA_BASE >> 30) & 511) * 8, pd | P | RW | US)?;
    w(pd + ((GVA_BASE >> 21) & 511) * 8, pt | P | RW | US)?;
    for i in 0..GVAS {
        let g = gva(i).raw();
        w(pt + ((g >> 12) & 511) * 8, (mmio_gpa(i).raw() & !0xfff) | P | RW | US)?;
    }
    Ok(())
}

/// A shadow VM with MMIO caching on or off, its 10 RAM slots and one vCPU in 4-level paging
/// with its root built.
fn shadow_vcpu(host: &Arc<SimHost>, caching: bool) -> Result<Vcpu<SimHost>, BenchError> {
    let name = if caching { "shadow-ram-cached" } else { "shadow-ram-uncached" };
    let ram = host.add_buffer(name, 2 << 20)?;
    write_tables(&ram)?;
    let mut c = VmConfig::shadow(46)?;
    c.mmio_caching = caching;
    c.max_vcpus = 1;
    let vm = Vm::new(c, host.clone())?;
    set(&vm, &region(0, 0, 0, ram.len(), ram.hva().raw()))?;
    for i in 1..RAM_SLOTS {
        // 2 MiB of RAM every 256 MiB; these host addresses are never translated here.
        set(&vm, &region(i as u32, 0, i << 28, 2 << 20, 0x1000_0000_0000 + (i << 21)))?;
    }
    let mut v = vm.create_vcpu()?;
    let cpu = GuestCpu::long4(CR3, 46);
    v.set_guest_cpu(cpu).map_err(|e| harness("set_guest_cpu", e))?;
    v.service_requests().map_err(|e| harness("root", e))?;
    Ok(v)
}

/// What the hardware does on a user read of `gva`: walk the shadow in guest mode.
fn hw_walk(v: &mut Vcpu<SimHost>, gva: Gva) -> Result<HwWalk, BenchError> {
    v.service_requests().map_err(|e| harness("service_requests", e))?;
    v.enter_guest_mode().map_err(|r| harness("enter_guest_mode", format!("{r:?}")))?;
    let w = v.walk_gva(gva, Access::USER);
    v.exit_guest_mode();
    Ok(w)
}

/// One #PF exit with error code `err`, checked to emulate `want` from `source`.
fn expect(
    v: &mut Vcpu<SimHost>,
    gva: Gva,
    err: u64,
    want: Gpa,
    source: EmulateSource,
) -> Result<(), BenchError> {
    match v.handle_page_fault(gva, PfErr(err)) {
        Ok(FaultOutcome::Emulate { gpa, source: s, .. }) if gpa == want && s == source => Ok(()),
        other => Err(BenchError::Harness(format!(
            "#PF {err:#x} at {gva:?}: expected {source:?} at {want:?}, got {other:?}"
        ))),
    }
}

/// The paths, in the order each round times them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Spte,
    Cache,
    Uncached,
}
const PATHS: usize = 3;

/// Per-call medians and p99s (ns) of the three paths, and their ratios to the uncached path,
/// each taken over the rounds of one run ([`Rounds`]).
#[derive(Clone, Copy, Debug)]
pub struct ShadowNumbers {
    /// Per-vCPU GVA cache hit.
    pub cache: Summary,
    /// MMIO SPTE hit through the lockless shadow walk.
    pub spte: Summary,
    /// Uncached: guest walk, memslot search, emulate.
    pub uncached: Summary,
    /// Cache hit / uncached, the median over rounds.
    pub cache_per_uncached: f64,
    /// MMIO SPTE hit / uncached.
    pub spte_per_uncached: f64,
}

/// Measures the three paths: `rounds` rounds, each timing one batch of 1000 calls of each.
pub fn measure(rounds: usize) -> Result<ShadowNumbers, BenchError> {
    let host = crate::sim_host(1 << 16)?;
    const RSVD: u64 = PfErr::USER | PfErr::RSVD | PfErr::PRESENT;

    let mut on = shadow_vcpu(&host, true)?;
    // Install the MMIO SPTEs: the first access to each GVA is a not-present #PF, the slow path.
    for i in 0..GVAS {
        if !matches!(hw_walk(&mut on, gva(i))?, HwWalk::Violation { present: false, .. }) {
            return Err(BenchError::Harness(format!("GVA {i}: expected a not-present walk")));
        }
        expect(&mut on, gva(i), PfErr::USER, mmio_gpa(i), EmulateSource::SlowPathMmio)?;
        // Now the hardware finds the MMIO SPTE: an RSVD #PF.
        if !matches!(hw_walk(&mut on, gva(i))?, HwWalk::Misconfig { .. }) {
            return Err(BenchError::Harness(format!("GVA {i}: no MMIO SPTE installed")));
        }
    }
    // Cycling GVAS GVAs through one entry of the cache: every one misses it (twice round, so the
    // check covers the steady state the timing sees).
    for i in (0..GVAS).chain(0..GVAS) {
        expect(&mut on, gva(i), RSVD, mmio_gpa(i), EmulateSource::MmioSpteHit)?;
    }
    // The cache-hit path's GVA: cached after one more hit (filled by it if not already).
    let _ = on.handle_page_fault(gva(0), PfErr(RSVD));
    expect(&mut on, gva(0), RSVD, mmio_gpa(0), EmulateSource::VcpuCacheHit)?;

    let mut off = shadow_vcpu(&host, false)?;
    for i in [0, 1] {
        expect(&mut off, gva(i), PfErr::USER, mmio_gpa(i), EmulateSource::SlowPathMmio)?;
        // Caching off: no MMIO SPTE, so the hardware keeps reporting a not-present #PF.
        if !matches!(hw_walk(&mut off, gva(i))?, HwWalk::Violation { present: false, .. }) {
            return Err(BenchError::Harness("caching off: an MMIO SPTE was installed".into()));
        }
    }

    let mut r = Rounds::<PATHS>::new(rounds, BATCH);
    // The SPTE-hit cycle goes on where the check left it (at the last GVA).
    let mut next = GVAS - 1;
    let mut flip = false;
    let (mut spte_hits, mut spte_cache_hits, mut cache_hits, mut slow, mut taken) = (0, 0, 0, 0, 0);
    for _ in 0..rounds.max(1) {
        let (h, c) = (on.stats.mmio_spte_hits, on.stats.mmio_cache_hits);
        r.time(Path::Spte as usize, || {
            next = crate::cycle_next(next, GVAS);
            black_box(crate::emulated_gpa(on.handle_page_fault(black_box(gva(next)), PfErr(RSVD))));
        });
        spte_hits += on.stats.mmio_spte_hits - h;
        spte_cache_hits += on.stats.mmio_cache_hits - c;
        let c = on.stats.mmio_cache_hits;
        r.time(Path::Cache as usize, || {
            black_box(crate::emulated_gpa(on.handle_page_fault(black_box(gva(0)), PfErr(RSVD))));
        });
        cache_hits += on.stats.mmio_cache_hits - c;
        let (s, t) = (off.stats.slow_path_mmio, off.stats.pf_taken);
        r.time(Path::Uncached as usize, || {
            flip = !flip;
            let g = gva(usize::from(flip));
            black_box(crate::emulated_gpa(off.handle_page_fault(black_box(g), PfErr(PfErr::USER))));
        });
        slow += off.stats.slow_path_mmio - s;
        taken += off.stats.pf_taken - t;
    }
    // After the cache path, the SPTE-hit cycle may meet the cached GVA once, and after the SPTE
    // hits the cache path misses once: one warm-up call per round.
    let slack = rounds.max(1) as u64;
    all_took("MMIO SPTE hit", spte_hits, r.calls(Path::Spte as usize), slack)?;
    if spte_cache_hits > slack {
        return Err(BenchError::Harness("MMIO SPTE hit: calls hit the GVA cache".into()));
    }
    all_took("GVA cache hit", cache_hits, r.calls(Path::Cache as usize), slack)?;
    all_took("uncached (slow path MMIO)", slow, r.calls(Path::Uncached as usize), 0)?;
    all_took("uncached (faults taken)", taken, r.calls(Path::Uncached as usize), 0)?;
    let ratio = |x: Path| r.ratio(x as usize, Path::Uncached as usize);
    Ok(ShadowNumbers {
        cache: r.summary(Path::Cache as usize),
        spte: r.summary(Path::Spte as usize),
        uncached: r.summary(Path::Uncached as usize),
        cache_per_uncached: ratio(Path::Cache),
        spte_per_uncached: ratio(Path::Spte),
    })
}

/// The group's rows.
pub fn run(opts: &Options) -> Result<Vec<Row>, BenchError> {
    let m = measure(opts.n(300, 3000))?;
    let slow = m.uncached.median;
    let target = ">= 10x faster than uncached";
    Ok(vec![
        Row::new(G, "GVA cache hit (#PF RSVD, per-vCPU MMIO cache)", Unit::Ns, m.cache.median)
            .p99(m.cache.p99)
            .ratio(m.cache_per_uncached, "x uncached")
            .target(target, m.cache_per_uncached <= 0.1)
            .note("same GVA every call; no table read"),
        Row::new(G, "MMIO SPTE hit (#PF RSVD, lockless shadow walk)", Unit::Ns, m.spte.median)
            .p99(m.spte.p99)
            .ratio(m.spte_per_uncached, "x uncached")
            .target(target, m.spte_per_uncached <= 0.1)
            .note(format!(
                "{GVAS} GVAs ({GVAS} MMIO gfns) cycled through one entry of the {ENTRIES}-entry \
                 cache: every call misses it, then walks"
            )),
        Row::new(G, "uncached: guest walk + memslot search + emulate", Unit::Ns, slow)
            .p99(m.uncached.p99)
            .ratio(1.0 / m.spte_per_uncached, "x MMIO SPTE hit")
            .note("mmio_caching off: not-present #PF, 4-level guest walk, 10 slots, no slot"),
    ])
}
