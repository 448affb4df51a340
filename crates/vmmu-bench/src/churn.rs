//! Group 6: vCPU throughput while memslots churn, as a share of undisturbed throughput.
//!
//! The vCPU adds 1 to one word of each page of a 16 MiB working set, round robin (the same loop
//! the KVM guest runs, `vmmu_kvm::bench::busy_code`). On vmmu it runs as the software machine
//! does: through a per-vCPU TLB (8192 entries, so the working set fits once warm), walking the
//! MMU's tables on a miss, exiting to the fault handlers, polling requests between accesses and
//! leaving guest mode every 256 accesses. Phase 1 measures it undisturbed; in phase 2 another
//! thread (pinned to CPU 0; the vCPU is on CPU 1) creates, moves and deletes a 2 MiB slot back
//! to back. The share is rate(phase 2) / rate(phase 1). vmmu runs twice: zapping only the slot
//! (its default), and zapping everything on delete/move (KVM_X86_QUIRK_SLOT_ZAP_ALL, KVM's x86
//! default). The same phases run on real KVM with the CPL3 busy loop. A third, control phase has
//! the issuing thread spin without updates: the share it keeps is what any busy neighbour costs
//! here (shared core resources, other load), printed in each row's note.

use crate::memslot::{TEST_GPA, TEST_SIZE};
use crate::table::{Row, RunInfo, Unit};
use crate::timing::{helper_cpu, pin};
use crate::{BenchError, Options};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmmu::bugs::BugSet;
use vmmu::spte::FormatKind;
use vmmu::{Gfn, Gpa};
use vmmu_sim::host::SimHost;
use vmmu_sim::hw_vcpu::{HwVcpu, Outcome};
use vmmu_sim::ram::Width;
use vmmu_sim::seam::LiveExits;
use vmmu_sim::timeline::{new_histogram, LatencyHistogram, Sample, Timeline};
use vmmu_sim::{AccessKind, GuestMmu, RealMmu, RealMmuConfig, SlotRequest};

const G: &str = "churn";
const WORK_GPA: u64 = 1 << 30;
const WORK_SIZE: u64 = 16 << 20;
const BATCH: u64 = 256;

/// Undisturbed and churning rates (accesses or adds per second) and updates per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Share {
    /// Phase 1 rate.
    pub undisturbed: f64,
    /// Phase 2 rate.
    pub churning: f64,
    /// Memslot updates per second in phase 2.
    pub updates_per_s: f64,
    /// Phase 3 rate (control): the issuing thread spins without updates.
    pub spinning: f64,
}

impl Share {
    /// Phase 2 as a percentage of phase 1.
    pub fn percent(&self) -> f64 {
        100.0 * self.churning / self.undisturbed
    }
}

/// The three requests of one churn cycle (create, move, delete), for a slot backed at `hva`.
fn churn_cycle(slot: u32, hva: u64) -> [SlotRequest; 3] {
    [
        SlotRequest {
            slot,
            flags: 0,
            guest_phys_addr: TEST_GPA,
            memory_size: TEST_SIZE,
            userspace_addr: hva,
        },
        SlotRequest {
            slot,
            flags: 0,
            guest_phys_addr: TEST_GPA + TEST_SIZE,
            memory_size: TEST_SIZE,
            userspace_addr: hva,
        },
        SlotRequest::delete(slot),
    ]
}

/// Runs phase 1 and 2 around `churn_step` (one update per call), reading progress from `count`.
fn phases(
    secs: f64,
    count: &AtomicU64,
    stop_early: &dyn Fn() -> bool,
    mut churn_step: impl FnMut() -> Result<(), String>,
) -> Result<Share, String> {
    let t = Instant::now();
    while count.load(Ordering::Relaxed) == 0 {
        if stop_early() || t.elapsed().as_secs() > 10 {
            return Err("the vCPU made no progress".into());
        }
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(50)); // warm: working set mapped, TLB filled
    let phase = Duration::from_secs_f64(secs);
    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(phase);
    let (c1, t1) = (count.load(Ordering::Relaxed), Instant::now());
    let mut updates = 0u64;
    while t1.elapsed() < phase {
        churn_step()?;
        updates += 1;
    }
    let (c2, t2) = (count.load(Ordering::Relaxed), Instant::now());
    // Control: the issuing CPU only spins, so phase 2's loss can be split into what any busy
    // neighbour costs (shared core resources, frequency, other load) and what updates cost.
    let mut x = 1u64;
    while t2.elapsed() < phase {
        for _ in 0..1000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    let (c3, t3) = (count.load(Ordering::Relaxed), Instant::now());
    if stop_early() {
        return Err("the vCPU stopped".into());
    }
    Ok(Share {
        undisturbed: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
        churning: (c2 - c1) as f64 / (t2 - t1).as_secs_f64(),
        updates_per_s: updates as f64 / (t2 - t1).as_secs_f64(),
        spinning: (c3 - c2) as f64 / (t3 - t2).as_secs_f64(),
    })
}

/// How often the churn timeline samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

fn vcpu_loop(
    mmu: &RealMmu,
    host: &SimHost,
    stop: &AtomicBool,
    count: &AtomicU64,
    exits: &LiveExits,
) -> Result<(), String> {
    if let Some(c) = helper_cpu() {
        pin(c)?;
    }
    let mut v = HwVcpu::new(mmu, host, 0, 8192);
    let pages = WORK_SIZE >> 12;
    let base = WORK_GPA >> 12;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        v.enter_guest();
        for _ in 0..BATCH {
            let gfn = Gfn(base + i % pages);
            i += 1;
            let e = match v.access(Gpa(gfn.0 << 12), AccessKind::Write) {
                Outcome::Ram(e) => e,
                other => return Err(format!("working set access at {gfn:?}: {other:?}")),
            };
            let bump = host
                .ram_access(e.pfn, 0, Width::W8, None)
                .and_then(|(_, v)| host.ram_access(e.pfn, 0, Width::W8, Some(v.wrapping_add(1))));
            if let Err(err) = bump {
                return Err(format!("working set access at {gfn:?}: {err}"));
            }
        }
        v.exit_guest();
        count.fetch_add(BATCH, Ordering::Relaxed);
        exits.store(&mmu.vcpu_exits(v.state()));
    }
    Ok(())
}

/// `pace`: at most this many updates per second (the issuing thread spins between them, as a
/// thread inside a slower ioctl would); `None` is back to back. With `record`, also a timeline
/// of the three phases (samples every [`SAMPLE_EVERY`], every update timed).
fn vmmu_share(
    secs: f64,
    slot_zap_all: bool,
    pace: Option<f64>,
    record: bool,
) -> Result<(Share, Option<Timeline>), BenchError> {
    let host = crate::sim_host(1 << 18)?;
    let work = host.add_buffer("work", WORK_SIZE)?;
    work.fill_words(|_| 0);
    let churn_buf = host.add_buffer("churn", 2 * TEST_SIZE)?;
    let mmu = RealMmu::new(
        host.clone(),
        RealMmuConfig {
            format: FormatKind::Ept,
            phys_bits: 46,
            mmio_caching: true,
            vcpus: 1,
            generation_base: 0,
            slot_zap_all,
            bugs: BugSet::NONE,
            tdp_prefetch: false,
            shadow_mmio_path_only: false,
            shadow_pages: None,
        },
    )?;
    let ws = SlotRequest {
        slot: 0,
        flags: 0,
        guest_phys_addr: WORK_GPA,
        memory_size: WORK_SIZE,
        userspace_addr: work.hva().raw(),
    };
    mmu.set_memory_region(&ws).map_err(|e| BenchError::Harness(format!("work slot: {e}")))?;
    let stop = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let issued = AtomicU64::new(0);
    let exits = LiveExits::default();
    let sampling = AtomicBool::new(record);
    let reqs = churn_cycle(1, churn_buf.hva().raw());
    std::thread::scope(|s| {
        let vcpu = s.spawn(|| {
            let r = vcpu_loop(&mmu, &host, &stop, &count, &exits);
            done.store(true, Ordering::Relaxed);
            r
        });
        // A sleeping sampler: it wakes every 20 ms for a few relaxed loads.
        let sampler = s.spawn(|| {
            let t0 = Instant::now();
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                samples.push(Sample {
                    t_us: t0.elapsed().as_micros() as u64,
                    accesses: count.load(Ordering::Relaxed),
                    updates: issued.load(Ordering::Relaxed),
                    exits: exits.load(),
                });
                std::thread::sleep(SAMPLE_EVERY);
            }
            samples
        });
        let res = s
            .spawn(|| {
                pin(0)?;
                let mut latency = record.then(new_histogram);
                let mut k = 0usize;
                let interval = pace.map(|p| Duration::from_secs_f64(1.0 / p.max(1.0)));
                let mut next: Option<Instant> = None;
                phases(secs, &count, &|| done.load(Ordering::Relaxed), || {
                    if let Some(iv) = interval {
                        let due = next.map_or_else(Instant::now, |n| n + iv);
                        while Instant::now() < due {
                            std::hint::spin_loop();
                        }
                        next = Some(due);
                    }
                    let r = &reqs[k % 3];
                    k += 1;
                    let t = latency.as_ref().map(|_| Instant::now());
                    let got = mmu.set_memory_region(r).map_err(|e| format!("{r:?}: {e}"));
                    if let (Some(t), Some(h)) = (t, latency.as_mut()) {
                        h.saturating_record((t.elapsed().as_nanos() as u64).max(1));
                    }
                    issued.fetch_add(1, Ordering::Relaxed);
                    got
                })
                .map(|share| (share, latency))
            })
            .join()
            .unwrap_or_else(|_| Err("churn thread panicked".into()));
        sampling.store(false, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.join().unwrap_or_default();
        let v = vcpu.join().unwrap_or_else(|_| Err("vCPU thread panicked".into()));
        let (share, latency) = v.and(res).map_err(BenchError::Harness)?;
        let timeline = latency.map(|h| Timeline {
            clock: "wall time".into(),
            interval_us: SAMPLE_EVERY.as_micros() as u64,
            samples,
            update_latency: LatencyHistogram::of(&h),
            mmio_latency: LatencyHistogram::default(),
        });
        Ok((share, timeline))
    })
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn kvm_share(secs: f64) -> Result<Share, String> {
    // The VM lives on one thread (its buffers are not shared), pinned to CPU 0.
    std::thread::spawn(move || kvm_share_pinned(secs))
        .join()
        .unwrap_or_else(|_| Err("KVM churn thread panicked".into()))
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn kvm_share_pinned(secs: f64) -> Result<Share, String> {
    use vmmu_kvm::bench::BenchVm;
    pin(0)?;
    let mut vm = BenchVm::new()?;
    let busy = vm.start_busy(helper_cpu()).ok_or("the vCPU is already running")?;
    let adds = AtomicU64::new(0);
    let watcher_stop = AtomicBool::new(false);
    let res = std::thread::scope(|s| {
        // Mirror the busy vCPU's progress into `adds` for `phases`.
        let w = s.spawn(|| {
            while !watcher_stop.load(Ordering::Relaxed) {
                adds.store(busy.adds(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let mut k = 0usize;
        let reqs = [(TEST_GPA, TEST_SIZE), (TEST_GPA + TEST_SIZE, TEST_SIZE), (0, 0)];
        let r = phases(secs, &adds, &|| busy.finished(), || {
            let (gpa, size) = reqs[k % 3];
            k += 1;
            vm.set_region(10, 0, gpa, size, 0)
        });
        watcher_stop.store(true, Ordering::Relaxed);
        let _ = w.join();
        r
    });
    vm.stop_busy(busy)?;
    res
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn kvm_share(_secs: f64) -> Result<Share, String> {
    Err("/dev/kvm benchmarks need Linux on x86-64".into())
}

fn rate_note(s: &Share, what: &str) -> String {
    format!(
        "{what}: {:.1} M/s undisturbed, {:.1} M/s churning ({:.0} updates/s), {:.1} M/s with the \
         other CPU only spinning ({:.0}%)",
        s.undisturbed / 1e6,
        s.churning / 1e6,
        s.updates_per_s,
        s.spinning / 1e6,
        100.0 * s.spinning / s.undisturbed
    )
}

/// The group's rows.
pub fn run(opts: &Options, info: &mut RunInfo) -> Result<Vec<Row>, BenchError> {
    let secs = if opts.smoke {
        0.05
    } else if opts.quick {
        0.5
    } else {
        3.0
    };
    // KVM first: its update rate paces the rate-matched vmmu rows.
    let kvm = if opts.no_kvm { Err("--no-kvm".to_string()) } else { kvm_share(secs) };
    let kvm_pct = kvm.as_ref().map_or(f64::NAN, Share::percent);
    let (pace, pace_src) = match &kvm {
        Ok(k) => (k.updates_per_s, "KVM's measured rate"),
        Err(_) => (20_000.0, "20000/s, KVM not measured"),
    };
    let (zap_slot, timeline) = vmmu_share(secs, false, None, true)?;
    info.churn_timeline = timeline;
    let (zap_all, _) = vmmu_share(secs, true, None, false)?;
    let (zap_slot_paced, _) = vmmu_share(secs, false, Some(pace), false)?;
    let (zap_all_paced, _) = vmmu_share(secs, true, Some(pace), false)?;
    info.notes.push(format!(
        "churn: churning thread pinned to CPU 0, vCPU thread on CPU {}; phases of {secs} s; \
         paced rows: {pace:.0} updates/s ({pace_src})",
        helper_cpu().map_or("(none: 1 CPU)".into(), |c| c.to_string())
    ));
    let mut rows = Vec::new();
    for (s, name, what) in [
        (zap_slot, "vmmu: throughput kept while a 2 MiB slot churns", "vmmu"),
        (zap_all, "vmmu, slot_zap_all (KVM's default quirk): throughput kept", "vmmu zap-all"),
        (zap_slot_paced, "vmmu, churn paced to KVM's update rate: throughput kept", "vmmu paced"),
        (
            zap_all_paced,
            "vmmu, slot_zap_all, paced to KVM's update rate: throughput kept",
            "vmmu zap-all paced",
        ),
    ] {
        // Against KVM's share when it is a usable divisor; a short or loaded run can leave KVM's
        // guest with no progress at all while its slot churns (0 %), and then the row compares
        // with its own control phase instead.
        let row = if kvm_pct.is_finite() && kvm_pct > 0.0 {
            Row::new(G, name, Unit::Percent, s.percent())
                .ratio(s.percent() / kvm_pct, "x KVM's share")
        } else {
            Row::new(G, name, Unit::Percent, s.percent()).ratio(
                s.churning / s.spinning,
                "x the control phase (KVM's share is 0 % or not measured)",
            )
        };
        rows.push(row.target(">= 50%", s.percent() >= 50.0).note(rate_note(&s, what)));
    }
    rows.push(match kvm {
        Ok(s) => Row::new(
            G,
            "KVM: throughput kept while a 2 MiB slot churns",
            Unit::Percent,
            s.percent(),
        )
        .ratio(s.percent() / zap_slot.percent(), "x vmmu's share")
        .note(rate_note(&s, "KVM guest adds")),
        Err(why) => Row::na(
            G,
            "KVM: throughput kept while a 2 MiB slot churns",
            Unit::Percent,
            &format!("/dev/kvm: {why}"),
        )
        .ratio(f64::NAN, "x vmmu's share"),
    });
    Ok(rows)
}
