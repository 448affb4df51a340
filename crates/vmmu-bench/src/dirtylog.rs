//! Group 7: dirty logging (issue 16 point 5), on vmmu and on real `/dev/kvm` in the same run.
//!
//! - `KVM_GET_DIRTY_LOG` of an idle dirty-logged slot of 1 GiB and 4 GiB (nothing dirty: the
//!   cost of walking the bitmap and handing it out), and `KVM_CLEAR_DIRTY_LOG` of the whole slot
//!   with every bit set (manual protect);
//! - on KVM, GET of the busy vCPU's 16 MiB working set while the vCPU keeps dirtying it; on vmmu,
//!   GET of a 16 MiB slot with as many dirty pages as KVM's GETs found on average (spread over
//!   the slot; each taken, write-protected again, one remote flush); pages per GET in the note;
//! - the write fault on a page a collection write-protected again: vmmu, one EPT violation
//!   handled (`Vcpu::handle_ept_violation`, the leaf upgraded and the page marked); KVM, the
//!   busy vCPU's time lost per re-dirtied page while GETs run back to back on the other CPU
//!   (exit, fault, entry, and the lock and flush stalls the GETs cause), against the same vCPU
//!   without logging.
//!
//! Ratios are vmmu / KVM. The issuing thread is pinned to CPU 0, KVM's busy vCPU to CPU 1.

use crate::table::{Row, Unit};
use crate::timing::{helper_cpu, pin, Latencies};
use crate::{region, set, BenchError, Options};
use vmmu::dirty::DirtyLogMode;
use vmmu::fault::FaultOutcome;
use vmmu::{AsId, FaultAccess, Gpa, SlotId};

const G: &str = "dirtylog";
const GIB: u64 = 1 << 30;
/// The dirtied slot: 16 MiB, as KVM's working set.
const SMALL: u64 = 16 << 20;
/// Host address of the big slots on vmmu (never translated: nothing faults there).
const BIG_HVA: u64 = 0x1000_0000_0000;

/// What one side measured (ns; `None`: not measured).
#[derive(Debug, Default, Clone)]
struct Numbers {
    /// GET of the idle 1 GiB and 4 GiB slots.
    get_idle: [Option<(f64, f64)>; 2],
    /// CLEAR of the whole idle 1 GiB and 4 GiB slots.
    clear_idle: [Option<(f64, f64)>; 2],
    /// GET with dirty pages, and the pages per GET.
    get_dirty: Option<(f64, f64, f64)>,
    /// The write fault after a re-protect.
    fault: Option<f64>,
}

fn summary(l: &Latencies) -> (f64, f64) {
    let s = l.summary();
    (s.median, s.p99)
}

/// Why a row group could not be measured on KVM.
type KvmResult = Result<Numbers, String>;

/// vmmu's numbers; the dirty GET dirties `dirty` pages of the 16 MiB slot (spread over it)
/// between two GETs, as many as KVM's busy vCPU dirtied.
fn vmmu_numbers(opts: &Options, dirty: u64) -> Result<Numbers, BenchError> {
    let n = opts.n(20, 200);
    let host = crate::sim_host(1 << 16)?;
    let buf = host.add_buffer("dirty", SMALL)?;
    buf.fill_words(|o| o);
    let vm = crate::vm(&host, true, 1, false)?;
    let log = vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
    set(&vm, &region(1, log, GIB, SMALL, buf.hva().raw()))?;
    set(&vm, &region(2, log, 4 * GIB, GIB, BIG_HVA))?;
    set(&vm, &region(3, log, 8 * GIB, 4 * GIB, BIG_HVA))?;
    let harness = |e: vmmu::dirty::DirtyLogError| BenchError::Harness(e.to_string());
    let mut out = Numbers::default();
    for (i, slot) in [2u16, 3].into_iter().enumerate() {
        let mut l = Latencies::new();
        for _ in 0..n {
            l.time(|| vm.get_dirty_log(AsId(0), SlotId(slot))).map_err(harness)?;
        }
        out.get_idle[i] = Some(summary(&l));
    }
    vm.set_dirty_log_mode(DirtyLogMode::Manual);
    for (i, (slot, size)) in [(2u16, GIB), (3, 4 * GIB)].into_iter().enumerate() {
        let pages = size / 4096;
        let ones = vec![u64::MAX; (pages / 64) as usize];
        let count = u32::try_from(pages).unwrap_or(u32::MAX);
        let mut l = Latencies::new();
        for _ in 0..n {
            l.time(|| vm.clear_dirty_log(AsId(0), SlotId(slot), 0, count, &ones))
                .map_err(harness)?;
        }
        out.clear_idle[i] = Some(summary(&l));
    }
    vm.set_dirty_log_mode(DirtyLogMode::Auto);

    // Dirty every page of the 16 MiB slot, collect, and again: after the first collection each
    // write fault finds a write-protected leaf.
    let mut v = vm.create_vcpu()?;
    v.service_requests().map_err(|e| BenchError::Harness(e.to_string()))?;
    let pages = SMALL / 4096;
    let dirty = dirty.clamp(1, pages);
    let stride = pages / dirty;
    let dirty_all = |v: &mut vmmu::vcpu::Vcpu<_>| -> Result<f64, BenchError> {
        let t = std::time::Instant::now();
        for p in (0..dirty).map(|i| i * stride) {
            let gpa = Gpa(GIB + p * 4096);
            match v.handle_ept_violation(gpa, FaultAccess::WRITE) {
                Ok(FaultOutcome::Fixed) => {}
                other => {
                    return Err(BenchError::Harness(format!("write fault at {gpa}: {other:?}")))
                }
            }
        }
        Ok(t.elapsed().as_nanos() as f64 / dirty as f64)
    };
    dirty_all(&mut v)?;
    let rounds = opts.n(5, 40);
    let (mut get, mut faults, mut reported) = (Latencies::new(), Vec::new(), 0u64);
    for _ in 0..rounds {
        let words = get.time(|| vm.get_dirty_log(AsId(0), SlotId(1))).map_err(harness)?;
        reported += vmmu::dirty::pages_of(&words).count() as u64;
        v.service_requests().map_err(|e| BenchError::Harness(e.to_string()))?;
        faults.push(dirty_all(&mut v)?);
    }
    let (m, p) = summary(&get);
    out.get_dirty = Some((m, p, reported as f64 / rounds as f64));
    faults.sort_by(f64::total_cmp);
    out.fault = faults.get(faults.len() / 2).copied();
    Ok(out)
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn kvm_numbers(opts: &Options) -> KvmResult {
    use std::time::{Duration, Instant};
    use vmmu_kvm::bench::{BenchVm, WORK_SLOT};
    let n = opts.n(20, 200);
    let mut vm = BenchVm::new()?;
    vm.add_logged_slot(20, 4 * GIB, GIB)?;
    vm.add_logged_slot(21, 8 * GIB, 4 * GIB)?;
    let mut out = Numbers::default();
    for (i, slot) in [20u32, 21].into_iter().enumerate() {
        let mut l = Latencies::new();
        for _ in 0..n {
            l.time(|| vm.get_dirty_log(slot))?;
        }
        out.get_idle[i] = Some(summary(&l));
    }

    // The busy vCPU dirties its working set: its rate without logging, then with logging and
    // GETs back to back.
    let phase = Duration::from_millis(if opts.smoke {
        20
    } else if opts.quick {
        300
    } else {
        1500
    });
    let busy = vm.start_busy(helper_cpu()).ok_or("the vCPU is already running")?;
    std::thread::sleep(phase / 2); // fault the working set in
    let a0 = busy.adds();
    let t0 = Instant::now();
    std::thread::sleep(phase);
    let plain = (busy.adds() - a0) as f64 / t0.elapsed().as_secs_f64();
    vm.start_logging_working_set()?;
    let (mut get, mut reported) = (Latencies::new(), 0u64);
    let _ = vm.get_dirty_log(WORK_SLOT)?; // start from a clean log
    let a1 = busy.adds();
    let t1 = Instant::now();
    while t1.elapsed() < phase && !busy.finished() {
        let words = get.time(|| vm.get_dirty_log(WORK_SLOT))?;
        reported += vmmu::dirty::pages_of(&words).count() as u64;
        std::thread::sleep(Duration::from_millis(2));
    }
    let (adds, secs) = (busy.adds() - a1, t1.elapsed().as_secs_f64());
    vm.stop_logging_working_set()?;
    vm.stop_busy(busy)?;
    let gets = get.len().max(1);
    let (m, p) = summary(&get);
    out.get_dirty = Some((m, p, reported as f64 / gets as f64));
    if plain > 0.0 && reported > 0 {
        let lost = secs - adds as f64 / plain;
        out.fault = Some((lost / reported as f64 * 1e9).max(0.0));
    }

    vm.enable_manual_dirty_log()?;
    for (i, (slot, size)) in [(20u32, GIB), (21, 4 * GIB)].into_iter().enumerate() {
        let count = u32::try_from(size / 4096).unwrap_or(u32::MAX);
        let mut l = Latencies::new();
        for _ in 0..n {
            l.time(|| vm.clear_dirty_log(slot, 0, count))?;
        }
        out.clear_idle[i] = Some(summary(&l));
    }
    Ok(out)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn kvm_numbers(_: &Options) -> KvmResult {
    Err("/dev/kvm not usable: this benchmark needs Linux on x86-64".into())
}

/// A measured row (`value` and `p99` in ns, printed in `unit`), or why there is none.
fn row(name: String, unit: Unit, v: Result<Option<(f64, f64)>, &str>) -> Row {
    let scale = if unit == Unit::Us { 1e-3 } else { 1.0 };
    match v {
        Ok(Some((m, p))) if p > m => Row::new(G, name, unit, m * scale).p99(p * scale),
        Ok(Some((m, _))) => Row::new(G, name, unit, m * scale),
        Ok(None) => Row::na(G, name, unit, "not measured"),
        Err(why) => Row::na(G, name, unit, why),
    }
}

/// One vmmu row and its KVM row: vmmu / KVM on the vmmu row, KVM / vmmu on the KVM row. Without
/// a KVM number the vmmu row is compared with vmmu's idle 1 GiB GET (`base`, ns) and its note
/// says why.
fn pair(
    rows: &mut Vec<Row>,
    (name, unit): (&str, Unit),
    ours: Option<(f64, f64)>,
    kvm: Result<Option<(f64, f64)>, &str>,
    note: Option<String>,
    base: Option<f64>,
) {
    let mut r = row(name.to_string(), unit, Ok(ours));
    let mut k = row(format!("KVM {name}"), unit, kvm);
    match (ours, &kvm) {
        (Some((m, _)), Ok(Some((kv, _)))) => {
            r = r.ratio(m / kv, "x KVM");
            k = k.ratio(kv / m, "x vmmu");
        }
        (ours, kvm) => {
            let why = match kvm {
                Err(why) => format!("no KVM to compare with: {why}"),
                Ok(_) => "KVM not measured".to_string(),
            };
            if let (Some((m, _)), Some(b)) = (ours, base.filter(|b| *b > 0.0)) {
                r = r.ratio(m / b, "x vmmu GET, idle 1 GiB slot");
            }
            r = r.note(note.as_ref().map_or(why.clone(), |n| format!("{n}; {why}")));
        }
    }
    if r.note.is_none() {
        if let Some(n) = note {
            r = r.note(n);
        }
    }
    rows.push(r);
    rows.push(k);
}

/// The group's rows.
pub fn run(opts: &Options) -> Result<Vec<Row>, BenchError> {
    if helper_cpu().is_some() {
        // Best effort, as the other groups: the issuing thread on CPU 0, busy vCPUs on CPU 1.
        let _ = pin(0);
    }
    let kvm = if opts.no_kvm { Err("--no-kvm".to_string()) } else { kvm_numbers(opts) };
    // vmmu's dirty GET takes as many pages as KVM's did (all 4096 without KVM).
    let dirty = kvm.as_ref().ok().and_then(|n| n.get_dirty).map_or(SMALL / 4096, |d| d.2 as u64);
    let ours = vmmu_numbers(opts, dirty)?;
    let k = |f: &dyn Fn(&Numbers) -> Option<(f64, f64)>| match &kvm {
        Ok(n) => Ok(f(n)),
        Err(e) => Err(e.as_str()),
    };
    let mut rows = Vec::new();
    let base = ours.get_idle[0].map(|(m, _)| m);
    for (i, size) in ["1 GiB", "4 GiB"].into_iter().enumerate() {
        let name = format!("GET, idle {size} slot");
        pair(&mut rows, (&name, Unit::Us), ours.get_idle[i], k(&|n| n.get_idle[i]), None, base);
    }
    for (i, size) in ["1 GiB", "4 GiB"].into_iter().enumerate() {
        let name = format!("CLEAR all, idle {size} slot (manual)");
        let (o, kv) = (ours.clear_idle[i], k(&|n| n.clear_idle[i]));
        pair(&mut rows, (&name, Unit::Us), o, kv, None, base);
    }
    let per_get = |n: &Numbers| n.get_dirty.map(|(_, _, p)| p);
    let note = format!(
        "pages per GET: vmmu {}, KVM {}",
        per_get(&ours).map_or("-".into(), |p| format!("{p:.0}")),
        kvm.as_ref().ok().and_then(per_get).map_or("-".into(), |p| format!("{p:.0}"))
    );
    pair(
        &mut rows,
        ("GET, 16 MiB slot with dirty pages", Unit::Us),
        ours.get_dirty.map(|(m, p, _)| (m, p)),
        k(&|n| n.get_dirty.map(|(m, p, _)| (m, p))),
        Some(note),
        base,
    );
    let note =
        "vmmu: one fault handled; KVM: busy vCPU time lost per re-dirtied page, GETs running";
    pair(
        &mut rows,
        ("write fault after re-protect", Unit::Ns),
        ours.fault.map(|f| (f, 0.0)),
        k(&|n| n.fault.map(|f| (f, 0.0))),
        Some(note.into()),
        base,
    );
    Ok(rows)
}
