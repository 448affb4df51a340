//! Group `shadow`, demand-fault row: what a guest's first touch of a RAM page costs under the
//! shadow-paging MMU, against the same touch under the TDP MMU (EPT), timed in turns.
//!
//! - **Shadow**: a not-present #PF (`USER|WRITE`) on a GVA the guest's 4-level tables map to a
//!   RAM page: the guest walk in guest RAM (its PTEs' A and D already set, so the walk writes
//!   nothing), the shadow pages of each level found by their guest table's gfn and role or
//!   created (each new one write-protects its guest table's gfn), the leaf installed and added
//!   to the reverse map, and the 7 neighbours of its aligned group of 8 prefetched (KVM
//!   `FNAME(pte_prefetch)`). A pass faults on the first GVA of every group: [`PAGES`] / 8
//!   faults over 16 last-level guest tables, one pass per round.
//! - **TDP**: an EPT violation (write) on the gfn the same GVA maps: memslot lookup, host
//!   translation, tables as needed, the leaf (4 KiB: the slot is off the 2 MiB congruence). The
//!   TDP MMU prefetches nothing (as KVM's), so its fault maps one page where the shadow fault
//!   maps eight: the ratio is per fault, the note gives both.
//!
//! Between rounds (untimed) both MMUs are emptied (`zap_all_fast`, `reclaim`) and the vCPUs'
//! roots built again, so every round pays the same first touches. Before timing, one pass of
//! each is checked (every fault `Fixed`, the hardware walk then translating to the frame the
//! guest's PTE names); after timing, every timed fault must have ended `Fixed`.

use crate::table::{Row, Unit};
use crate::timing::{quantile, Summary};
use crate::{region, set, BenchError, Options};
use std::time::Instant;
use vmmu::fault::{FaultError, FaultOutcome, PfErr};
use vmmu::guest::pte::{A, D, P, RW, US};
use vmmu::guest::GuestCpu;
use vmmu::host::{HostAccess, HostMemory};
use vmmu::tdp::HwWalk;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, FaultAccess, Gpa, Gva, Hva};
use vmmu_sim::host::{HostBuffer, SimHost};
use vmmu_sim::ram::Width;

const G: &str = "shadow";
/// RAM pages the guest touches per round: 16 last-level tables' worth.
pub const PAGES: u64 = 16 * 512;
/// The guest's PML4; PDPT, PD and the 16 PTs follow it page by page.
const CR3: u64 = 0x1000;
/// Pages one shadow fault maps: the faulting one and the 7 its prefetch maps with it (KVM
/// `PTE_PREFETCH_NUM`, aligned groups).
const GROUP: u64 = 8;
/// Faults per pass.
const FAULTS: u64 = PAGES / GROUP;
/// First GVA (PML4 index 0, PDPT index 1, PD index 0).
const GVA_BASE: u64 = 0x4000_0000;
/// First data page's guest-physical address (after the tables).
const DATA: u64 = 2 << 20;
/// Where the TDP VM's slot starts in the buffer.
const TDP_SKEW: u64 = 4096;

/// Accessed and dirty.
const AD: u64 = A | D;

fn gva(i: u64) -> Gva {
    Gva(GVA_BASE + (i << 12))
}

fn data_gpa(i: u64) -> Gpa {
    Gpa(DATA + (i << 12))
}

fn harness(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Harness(format!("{what}: {e}"))
}

/// The guest's tables in `ram`: GVA `i` maps data page `i`, present, writable, user, accessed
/// and dirty (and every table entry accessed).
fn write_tables(ram: &HostBuffer) -> Result<(), BenchError> {
    let w = |gpa: u64, v: u64| ram.write(gpa, Width::W8, v).map_err(|e| harness("guest table", e));
    let (pml4, pdpt, pd, pt0) = (CR3, CR3 + 0x1000, CR3 + 0x2000, CR3 + 0x3000);
    w(pml4 + ((GVA_BASE >> 39) & 511) * 8, pdpt | P | RW | US | AD)?;
    w(pdpt + ((GVA_BASE >> 30) & 511) * 8, pd | P | RW | US | AD)?;
    for t in 0..PAGES / 512 {
        w(pd + (((GVA_BASE >> 21) + t) & 511) * 8, (pt0 + (t << 12)) | P | RW | US | AD)?;
    }
    for i in 0..PAGES {
        let pte_at = pt0 + (i / 512) * 0x1000 + (i % 512) * 8;
        w(pte_at, data_gpa(i).raw() | P | RW | US | AD)?;
    }
    Ok(())
}

/// Empties `vm`'s MMU, gives the frames back and builds `v`'s root again (untimed).
fn reset(vm: &Vm<SimHost>, v: &mut Vcpu<SimHost>, what: &str) -> Result<(), BenchError> {
    vm.zap_all_fast();
    vm.reclaim();
    v.service_requests().map(|_| ()).map_err(|e| harness(what, e))
}

/// Faults on the first page of every prefetch group through `fault`; the number of faults
/// that did not end `Fixed`.
fn pass(mut fault: impl FnMut(u64) -> Result<FaultOutcome, FaultError>) -> u64 {
    (0..PAGES)
        .step_by(GROUP as usize)
        .filter(|&i| !matches!(fault(i), Ok(FaultOutcome::Fixed)))
        .count() as u64
}

/// Checks that the hardware walk of page `i` translated to the host frame behind the page's
/// host address (its slot at `skew` bytes into `ram`).
fn check_mapped(
    host: &SimHost,
    walk: HwWalk,
    i: u64,
    ram: &HostBuffer,
    skew: u64,
    what: &str,
) -> Result<(), BenchError> {
    let hva = Hva(ram.hva().raw() + skew + data_gpa(i).raw());
    let want =
        host.translate(hva, HostAccess::Write).map_err(|e| harness(what, format!("{e:?}")))?.pfn;
    match walk {
        HwWalk::Translated { pfn, .. } if pfn == want => Ok(()),
        other => Err(BenchError::Harness(format!(
            "{what}: page {i} should translate to frame {want:?}, the walk gave {other:?}"
        ))),
    }
}

/// Per-fault medians and p99s (ns) of the two MMUs' first touches, and their ratio.
#[derive(Clone, Copy, Debug)]
pub struct DemandNumbers {
    /// Shadow paging.
    pub shadow: Summary,
    /// The TDP MMU (EPT).
    pub tdp: Summary,
    /// Shadow / TDP, the median over rounds.
    pub shadow_per_tdp: f64,
}

/// Measures `rounds` rounds of one pass of each MMU.
pub fn measure(rounds: usize) -> Result<DemandNumbers, BenchError> {
    let host = crate::sim_host(1 << 16)?;
    let ram = host.add_buffer("shadow-demand", DATA + (PAGES << 12) + TDP_SKEW)?;
    write_tables(&ram)?;
    let slot = region(0, 0, 0, ram.len(), ram.hva().raw());

    let mut c = VmConfig::shadow(46)?;
    c.max_vcpus = 1;
    let svm = Vm::new(c, host.clone())?;
    set(&svm, &slot)?;
    let mut sv = svm.create_vcpu()?;
    sv.set_guest_cpu(GuestCpu::long4(CR3, 46)).map_err(|e| harness("set_guest_cpu", e))?;
    // The TDP slot 4 KiB off the 2 MiB congruence, so that its leaves are 4 KiB as the
    // guest's pages are (as the `faults` group's 4 KiB rows).
    let tvm = crate::vm(&host, true, 1, false)?;
    set(&tvm, &region(0, 0, 0, ram.len() - TDP_SKEW, ram.hva().raw() + TDP_SKEW))?;
    let mut tv = tvm.create_vcpu()?;

    let shadow_err = PfErr(PfErr::USER | PfErr::WRITE);
    let shadow_fault = |v: &mut Vcpu<SimHost>, i| v.handle_page_fault(gva(i), shadow_err);
    let tdp_fault =
        |v: &mut Vcpu<SimHost>, i| v.handle_ept_violation(data_gpa(i), FaultAccess::WRITE);

    // The check pass.
    reset(&svm, &mut sv, "shadow root")?;
    reset(&tvm, &mut tv, "TDP root")?;
    let missed = pass(|i| shadow_fault(&mut sv, i)) + pass(|i| tdp_fault(&mut tv, i));
    if missed != 0 {
        return Err(BenchError::Harness(format!("check pass: {missed} faults not Fixed")));
    }
    // Faulted pages on both; shadow paging also mapped their groups (page 511: prefetched).
    for i in [0, 504, 511, 512, PAGES - GROUP] {
        let enter = |v: &mut Vcpu<SimHost>| {
            v.enter_guest_mode().map_err(|r| harness("enter_guest_mode", format!("{r:?}")))
        };
        enter(&mut sv)?;
        let w = sv.walk_gva(gva(i), Access::from_bits(Access::USER.bits() | Access::WRITE.bits()));
        sv.exit_guest_mode();
        check_mapped(&host, w, i, &ram, 0, "shadow")?;
        if i % GROUP != 0 {
            continue;
        }
        enter(&mut tv)?;
        let w = tv.walk(data_gpa(i), Access::WRITE);
        tv.exit_guest_mode();
        check_mapped(&host, w, i, &ram, TDP_SKEW, "TDP")?;
    }

    let (mut s, mut t, mut missed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..rounds.max(1) {
        reset(&svm, &mut sv, "shadow root")?;
        reset(&tvm, &mut tv, "TDP root")?;
        let t0 = Instant::now();
        missed += pass(|i| shadow_fault(&mut sv, i));
        s.push(t0.elapsed().as_nanos() as f64 / FAULTS as f64);
        let t0 = Instant::now();
        missed += pass(|i| tdp_fault(&mut tv, i));
        t.push(t0.elapsed().as_nanos() as f64 / FAULTS as f64);
    }
    if missed != 0 {
        return Err(BenchError::Harness(format!("timed passes: {missed} faults not Fixed")));
    }
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v
    };
    let ratios = sorted(s.iter().zip(&t).map(|(a, b)| a / b).collect());
    let summary = |v: Vec<f64>| {
        let v = sorted(v);
        Summary { median: quantile(&v, 0.5), p99: quantile(&v, 0.99) }
    };
    Ok(DemandNumbers {
        shadow: summary(s),
        tdp: summary(t),
        shadow_per_tdp: quantile(&ratios, 0.5),
    })
}

/// The group's demand-fault row.
pub fn run(opts: &Options) -> Result<Vec<Row>, BenchError> {
    let m = measure(opts.n(10, 40))?;
    let name = "demand fault, 4 KiB guest page (#PF not present -> Fixed)";
    Ok(vec![Row::new(G, name, Unit::Ns, m.shadow.median)
        .p99(m.shadow.p99)
        .ratio(m.shadow_per_tdp, "x TDP (EPT) fault")
        .note(format!(
            "{FAULTS} faults over 16 guest PTs after a zap: guest walk, shadow pages found or \
             made (guest tables write-protected), leaf + rmap + 7 prefetched; TDP fault (1 \
             leaf, no prefetch): {:.0} ns",
            m.tdp.median
        ))])
}
