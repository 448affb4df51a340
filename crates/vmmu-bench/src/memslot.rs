//! Group 3: memslot updates (`set_memory_region` with the MMU's hooks) and their latency as the
//! VM holds more slots, with the vCPU idle or busy faulting.
//!
//! One cycle on a 2 MiB slot: create, flags change (dirty logging on, then off: two samples),
//! move by 2 MiB, delete. The cycle runs with 0, 10, 1000 and 32000 other (one-page) slots
//! present. "Busy" means one vCPU thread calls the fault handler back to back on its own RAM slot
//! (each fault is a memslot read section, which every update's grace period must wait out).
//! The issuing thread is pinned to CPU 0, the vCPU thread to CPU 1. The last row times creating
//! 32764 slots in a fresh VM.
//!
//! [`cycle`] is shared with the KVM group, so both sides issue exactly the same requests.

use crate::table::{Row, RunInfo, Unit};
use crate::timing::{helper_cpu, pin, Latencies};
use crate::{region, set, BenchError, Options};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES;
use vmmu::vm::Vm;
use vmmu::{FaultAccess, Gpa};
use vmmu_sim::host::SimHost;

const G: &str = "memslot";
/// Other slots present during the cycles.
pub const OTHERS: [u32; 4] = [0, 10, 1000, 32000];
/// The measured operations, in row order.
pub const OPS: [&str; 4] = ["create", "flags change", "move", "delete"];
/// Guest-physical address of the cycled slot (4 GiB).
pub const TEST_GPA: u64 = 1 << 32;
/// Its size.
pub const TEST_SIZE: u64 = 2 << 20;
/// The cycled slot's id in the vmmu VM.
const TEST_SLOT: u32 = 32763;
/// The busy vCPU's RAM: slot 0 at 1 GiB.
const WORK_GPA: u64 = 1 << 30;
const WORK_BUF: u64 = 64 << 20;
/// Where the other slots start (64 GiB), one page every 8 KiB.
const OTHERS_GPA: u64 = 64 << 30;

/// One request of the cycle: flags, guest address, size (0 deletes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Req {
    /// Index into [`OPS`] of what it measures.
    pub op: usize,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// Guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The requests of one cycle, in order.
pub const CYCLE: [Req; 5] = [
    Req { op: 0, flags: 0, gpa: TEST_GPA, size: TEST_SIZE },
    Req { op: 1, flags: KVM_MEM_LOG_DIRTY_PAGES, gpa: TEST_GPA, size: TEST_SIZE },
    Req { op: 1, flags: 0, gpa: TEST_GPA, size: TEST_SIZE },
    Req { op: 2, flags: 0, gpa: TEST_GPA + TEST_SIZE, size: TEST_SIZE },
    Req { op: 3, flags: 0, gpa: TEST_GPA + TEST_SIZE, size: 0 },
];

/// Latencies of each operation of [`OPS`].
#[derive(Debug, Default)]
pub struct OpLatencies(pub [Latencies; 4]);

/// Runs `cycles` cycles through `issue`, timing each request.
pub fn cycle<E>(
    lat: &mut OpLatencies,
    cycles: usize,
    mut issue: impl FnMut(&Req) -> Result<(), E>,
) -> Result<(), E> {
    for _ in 0..cycles {
        for r in &CYCLE {
            let t = Instant::now();
            issue(r)?;
            lat.0[r.op].record(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(())
}

/// A vCPU thread calling the fault handler back to back.
struct Busy {
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicU64>,
    thread: JoinHandle<Result<(), String>>,
}

impl Busy {
    fn start(vm: &Vm<SimHost>, pages: u64) -> Result<Busy, BenchError> {
        let mut v = vm.create_vcpu()?;
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        let (s, f) = (stop.clone(), faults.clone());
        let started = Arc::new(AtomicBool::new(false));
        let st = started.clone();
        let thread = std::thread::spawn(move || {
            if let Some(c) = helper_cpu() {
                pin(c)?;
            }
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                if i == 0 || v.requests_pending() {
                    v.service_requests().map_err(|e| e.to_string())?;
                }
                let gpa = Gpa(WORK_GPA + (i % pages) * 4096);
                v.handle_ept_violation(gpa, FaultAccess::WRITE).map_err(|e| e.to_string())?;
                i += 1;
                if i & 1023 == 0 {
                    f.store(i, Ordering::Relaxed);
                    st.store(true, Ordering::Relaxed);
                }
            }
            Ok(())
        });
        while !started.load(Ordering::Relaxed) && !thread.is_finished() {
            std::thread::yield_now();
        }
        Ok(Busy { stop, faults, thread })
    }

    fn stop(self) -> Result<u64, BenchError> {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.faults.load(Ordering::Relaxed);
        match self.thread.join() {
            Ok(Ok(())) => Ok(n),
            Ok(Err(e)) => Err(BenchError::Harness(format!("busy vCPU: {e}"))),
            Err(_) => Err(BenchError::Harness("busy vCPU panicked".into())),
        }
    }
}

/// Results of one mode (idle or busy) at one slot count.
type Cell = (u32, bool, OpLatencies);

fn measure(opts: &Options) -> Result<(Vec<Cell>, f64, u64), BenchError> {
    let cycles = opts.n(150, 2000);
    let host = crate::sim_host(1 << 20)?;
    let work = host.add_buffer("work", WORK_BUF)?;
    work.fill_words(|o| o);
    let mut cells = Vec::new();
    let mut busy_faults = 0;
    for n in OTHERS {
        let vm = crate::vm(&host, true, 2, false)?;
        // The busy vCPU's slot: 4 KiB off the 2 MiB congruence, so it maps 4 KiB pages.
        let work_size = WORK_BUF - (2 << 20);
        set(&vm, &region(0, 0, WORK_GPA, work_size, work.hva().raw() + 4096))?;
        for i in 0..n {
            let id = i + 1;
            let gpa = OTHERS_GPA + u64::from(i) * 8192;
            set(&vm, &region(id, 0, gpa, 4096, 0x2000_0000_0000 + u64::from(i) * 4096))?;
        }
        let hva = 0x3000_0000_0000u64;
        let issue = |r: &Req| set(&vm, &region(TEST_SLOT, r.flags, r.gpa, r.size, hva));
        for busy in [false, true] {
            let b = if busy { Some(Busy::start(&vm, work_size / 4096)?) } else { None };
            let mut lat = OpLatencies::default();
            cycle(&mut lat, cycles / 10, issue)?; // warm-up
            lat = OpLatencies::default();
            cycle(&mut lat, cycles, issue)?;
            if let Some(b) = b {
                busy_faults += b.stop()?;
            }
            cells.push((n, busy, lat));
        }
    }
    // Setup of 32764 slots in a fresh VM.
    let vm = crate::vm(&host, true, 1, false)?;
    let t = Instant::now();
    for id in 0..32764u32 {
        let gpa = OTHERS_GPA + u64::from(id) * 8192;
        set(&vm, &region(id, 0, gpa, 4096, 0x2000_0000_0000 + u64::from(id) * 4096))?;
    }
    let setup = t.elapsed().as_secs_f64();
    Ok((cells, setup, busy_faults))
}

/// The group's rows. Row names: `"{op}, {n} other slots, vCPU idle|busy"`, and
/// `"set up 32764 slots"`.
pub fn run(opts: &Options, info: &mut RunInfo) -> Result<Vec<Row>, BenchError> {
    let o = opts.clone();
    let res = std::thread::spawn(move || {
        let pinned = pin(0);
        measure(&o).map(|r| (r, pinned))
    })
    .join()
    .map_err(|_| BenchError::Harness("memslot thread panicked".into()))?;
    let ((cells, setup, busy_faults), pinned) = res?;
    info.notes.push(match pinned {
        Ok(()) => format!(
            "memslot: updates issued from a thread pinned to CPU 0; busy vCPU thread on CPU {} \
             ({busy_faults} faults while busy)",
            helper_cpu().map_or("(none: 1 CPU)".into(), |c| c.to_string())
        ),
        Err(e) => format!("memslot: could not pin the issuing thread: {e}"),
    });
    let mut rows = Vec::new();
    for busy in [false, true] {
        let mode = if busy { "vCPU busy" } else { "vCPU idle" };
        for (op, name) in OPS.iter().enumerate() {
            let at10 = cells
                .iter()
                .find(|c| c.0 == 10 && c.1 == busy)
                .map_or(f64::NAN, |c| c.2 .0[op].summary().median);
            for (n, _, lat) in cells.iter().filter(|c| c.1 == busy) {
                let s = lat.0[op].summary().us();
                let mut row =
                    Row::new(G, format!("{name}, {n} other slots, {mode}"), Unit::Us, s.median)
                        .p99(s.p99)
                        .ratio(s.median * 1e3 / at10, "x at 10 slots");
                if *n == 32000 {
                    let met = s.median * 1e3 <= 1.5 * at10;
                    row = row.target("<= 1.5x at 10 slots", met);
                }
                rows.push(row);
            }
        }
    }
    rows.push(
        Row::new(G, "set up 32764 slots (fresh VM)", Unit::S, setup)
            .ratio(setup / 0.59, "x KVM published (0.59 s, Xeon 8167M)")
            .target("<= 0.05 s", setup <= 0.05),
    );
    Ok(rows)
}
