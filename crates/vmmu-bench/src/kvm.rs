//! Group 4: the memslot cycle of [`crate::memslot`] on real `/dev/kvm`, in the same run: raw
//! `KVM_SET_USER_MEMORY_REGION` on a 2 MiB slot with the vCPU idle, then with one vCPU busy at
//! CPL3 (writing its 16 MiB working set; `vmmu_kvm::bench`). The issuing thread is pinned to
//! CPU 0 (on this nested host KVM's memslot ioctls are 2-4x slower from the second CPU), the
//! vCPU thread to CPU 1. Also the time to set up as many one-page slots as KVM allows.
//!
//! Ratios are vmmu / KVM, with vmmu's numbers taken at 10 other slots (the KVM VM has 2: the
//! guest's own memory and the working set). Without a usable `/dev/kvm` every row says why.

use crate::memslot::{cycle, OpLatencies, OPS};
use crate::table::{Row, RunInfo, Unit};
use crate::timing::{helper_cpu, pin};
use crate::Options;

const G: &str = "kvm";
/// The KVM slot id of the cycled slot.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
const KVM_SLOT: u32 = 10;

fn row_name(op: &str, busy: bool) -> String {
    format!("KVM {op}, 2 MiB slot, {}", if busy { "vCPU busy at CPL3" } else { "vCPU idle" })
}

/// What the KVM side measured.
#[derive(Debug, Default)]
struct KvmNumbers {
    idle: OpLatencies,
    busy: OpLatencies,
    busy_adds: u64,
    setup: Option<(u32, f64)>,
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn measure(opts: &Options) -> Result<KvmNumbers, String> {
    use vmmu_kvm::bench::{BenchVm, BUSY_INNER, WORK_SLOT};
    use vmmu_kvm::guest::OWN_SLOT as OWN_SLOT_ID;
    let cycles = opts.n(50, 2000);
    let mut vm = BenchVm::new()?;
    let mut k = KvmNumbers::default();
    let issue = |r: &crate::memslot::Req| {
        vm.set_region(KVM_SLOT, r.flags, r.gpa, r.size, 0).map_err(|e| format!("{r:?}: {e}"))
    };
    cycle(&mut k.idle, cycles / 10 + 1, issue)?;
    k.idle = OpLatencies::default();
    cycle(&mut k.idle, cycles, issue)?;
    let busy = vm.start_busy(helper_cpu()).ok_or("the vCPU is already running")?;
    // Let the guest fault its working set in before timing.
    let t = std::time::Instant::now();
    while busy.adds() < 4 * u64::from(BUSY_INNER) && !busy.finished() && t.elapsed().as_secs() < 10
    {
        std::thread::yield_now();
    }
    let issue = |r: &crate::memslot::Req| {
        vm.set_region(KVM_SLOT, r.flags, r.gpa, r.size, 0).map_err(|e| format!("{r:?}: {e}"))
    };
    let a0 = busy.adds();
    // At least 100 ms of busy cycles, so the vCPU makes progress (it reports every
    // BUSY_INNER adds).
    let res = cycle(&mut k.busy, cycles / 10 + 1, issue).and_then(|()| {
        k.busy = OpLatencies::default();
        let t = std::time::Instant::now();
        while k.busy.0[0].len() < cycles as u64 || t.elapsed().as_millis() < 100 {
            cycle(&mut k.busy, 1, issue)?;
        }
        Ok(())
    });
    k.busy_adds = busy.adds() - a0;
    vm.stop_busy(busy)?;
    res?;
    if k.busy_adds == 0 {
        return Err("the busy vCPU made no progress".into());
    }
    drop(vm);

    // Setup: one-page slots, all aliasing the first page of the churn buffer (KVM allows it).
    let vm = BenchVm::new()?;
    let max =
        u32::try_from(vm.nr_memslots()).unwrap_or(0).min(if opts.smoke { 100 } else { 32764 });
    let ids: Vec<u32> = (0..max).filter(|&i| i != OWN_SLOT_ID && i != WORK_SLOT).collect();
    let t = std::time::Instant::now();
    for (n, id) in ids.iter().enumerate() {
        vm.set_region(*id, 0, (64 << 30) + n as u64 * 8192, 4096, 0)
            .map_err(|e| format!("setup slot {id}: {e}"))?;
    }
    k.setup = Some((ids.len() as u32, t.elapsed().as_secs_f64()));
    Ok(k)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn measure(_opts: &Options) -> Result<KvmNumbers, String> {
    Err("/dev/kvm benchmarks need Linux on x86-64".into())
}

/// The group's rows (values only; see [`with_ratios`]). Never fails: without KVM every row is
/// `n/a` with the reason.
pub fn run(opts: &Options, info: &mut RunInfo) -> Vec<Row> {
    let res = if opts.no_kvm {
        Err("--no-kvm".to_string())
    } else {
        let o = opts.clone();
        std::thread::spawn(move || {
            let pinned = pin(0);
            measure(&o).map(|k| (k, pinned))
        })
        .join()
        .unwrap_or_else(|_| Err("the KVM benchmark thread panicked".into()))
    };
    let mut rows = Vec::new();
    match res {
        Ok((k, pinned)) => {
            info.notes.push(match pinned {
                Ok(()) => format!(
                    "kvm: KVM_SET_USER_MEMORY_REGION issued from a thread pinned to CPU 0; busy \
                     vCPU thread on CPU {} ({} guest adds while busy)",
                    helper_cpu().map_or("(none: 1 CPU)".into(), |c| c.to_string()),
                    k.busy_adds
                ),
                Err(e) => format!("kvm: could not pin the issuing thread: {e}"),
            });
            for (busy, lat) in [(false, &k.idle), (true, &k.busy)] {
                for (op, name) in OPS.iter().enumerate() {
                    let s = lat.0[op].summary().us();
                    rows.push(Row::new(G, row_name(name, busy), Unit::Us, s.median).p99(s.p99));
                }
            }
            if let Some((n, secs)) = k.setup {
                rows.push(Row::new(G, format!("KVM set up {n} slots"), Unit::S, secs));
            }
        }
        Err(why) => {
            let why = format!("/dev/kvm: {why}");
            for busy in [false, true] {
                for name in OPS {
                    rows.push(Row::na(G, row_name(name, busy), Unit::Us, &why));
                }
            }
            rows.push(Row::na(G, "KVM set up slots", Unit::S, &why));
        }
    }
    rows
}

/// Adds vmmu / KVM ratios (and the issue's targets) to the KVM rows, from the vmmu rows in
/// `vmmu_rows` (the memslot group at 10 other slots).
pub fn with_ratios(kvm_rows: Vec<Row>, vmmu_rows: &[Row]) -> Vec<Row> {
    let vmmu = |name: &str| vmmu_rows.iter().find(|r| r.name == name).and_then(|r| r.value);
    kvm_rows
        .into_iter()
        .map(|row| {
            let mut found = None;
            for busy in [false, true] {
                for op in OPS {
                    if row.name == row_name(op, busy) {
                        found = Some((op, busy));
                    }
                }
            }
            if let Some((op, busy)) = found {
                let mode = if busy { "vCPU busy" } else { "vCPU idle" };
                let v = vmmu(&format!("{op}, 10 other slots, {mode}"));
                let ratio = match (v, row.value) {
                    (Some(v), Some(k)) => v / k,
                    _ => f64::NAN,
                };
                let mut row = row.ratio(ratio, "x KVM (vmmu at 10 slots / KVM)");
                if busy && op != "flags change" {
                    // Unknown, not missed, when either side was not measured.
                    let met = ratio.is_finite().then_some(ratio <= 0.25);
                    row = row.target_met("vmmu <= 0.25x KVM", met);
                }
                return row;
            }
            if row.name.starts_with("KVM set up") {
                let n: f64 = row
                    .name
                    .split_whitespace()
                    .nth(3)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::NAN);
                let ratio = match (vmmu("set up 32764 slots (fresh VM)"), row.value) {
                    (Some(v), Some(k)) => (v / 32764.0) / (k / n),
                    _ => f64::NAN,
                };
                return row.ratio(ratio, "x KVM (vmmu / KVM, per slot)");
            }
            row
        })
        .collect()
}
