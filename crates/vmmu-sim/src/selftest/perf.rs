//! `memslot_perf_test` restated: the test memory (512 MiB + 4 KiB at GPA `0x10000000`, or the
//! test's smaller size) split evenly over `N - 1` slots (the last also gets the remainder; the
//! first page is the sync page), N = min(`KVM_USER_MEM_SLOTS` = 32764, the cap); slot 0 maps the
//! guest's code page. Adding the slots is timed ("slot setup"); then the host loop of the test
//! runs for `seconds` and each iteration is timed; of `runs` runs the best is reported, as the C
//! test does.
//!
//! The host's `MADV_DONTNEED` of guest memory is restated as what it does to the MMU: an
//! MMU-notifier invalidation of the range (`Vm::invalidate_hva_range_begin`, then the end of
//! the invalidation it returns), with the words the test uses zeroed in between (the pages are gone; a later guest touch faults them back in).
//! The sync page's atomics are Rust atomics shared by the two threads; a vCPU waiting for the
//! host leaves guest mode (a C guest spins in guest mode instead). The C test's `-d` checks
//! (values read back on the host before unmapping) always run here.

use super::vcpu::{SelftestVcpu, PHYS_BITS};
use super::{setup, MmuChoice, Result, SelftestError, SYNC_TIMEOUT};
use crate::host::{HostBuffer, HostConfig, SimHost};
use crate::hw_vcpu::HwVcpu;
use crate::ram::Width;
use crate::real::RealMmu;
use crate::seam::{AccessKind, GuestMmu, SlotRequest};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmmu::memslot::KVM_USER_MEM_SLOTS;
use vmmu::types::Hva;
use vmmu_selftest::perf::{host_loop, PerfHost, SlotLayout};

pub use vmmu_selftest::perf::{
    Outcome, Params, PerfTest, Sizes, DEFAULT_SECONDS, MEM_GPA, MEM_SIZE, MEM_SIZE_MAP,
    MEM_TEST_GPA, MEM_TEST_MOVE_SIZE_PAGES, MEM_TEST_UNMAP_CHUNK_PAGES, MEM_TEST_UNMAP_SIZE,
    MEM_TEST_VAL_1, MEM_TEST_VAL_2,
};

const PAGE: u64 = 4096;

/// The host/guest sync area (the C test's `struct sync_area`).
#[derive(Default)]
struct SyncArea {
    start: AtomicBool,
    exit: AtomicBool,
    sync: AtomicBool,
    /// Set by the guest when it stops (done or failed).
    gone: AtomicBool,
}

impl SyncArea {
    fn host_perform_sync(&self) -> Result<()> {
        let t = Instant::now();
        self.sync.store(true, Ordering::Release);
        while self.sync.load(Ordering::Acquire) {
            if self.gone.load(Ordering::Acquire) {
                return Err(SelftestError::Failed("the guest stopped before a sync".into()));
            }
            if t.elapsed() > SYNC_TIMEOUT {
                return Err(SelftestError::Failed("host sync timed out after 2 s".into()));
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Waits (outside guest mode) for the host's sync; false when told to exit.
    fn guest_perform_sync(&self, hw: &mut SelftestVcpu<'_>) -> bool {
        hw.exit_guest();
        loop {
            if self.exit.load(Ordering::Acquire) {
                return false;
            }
            if self
                .sync
                .compare_exchange_weak(true, false, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                hw.enter_guest();
                return true;
            }
            std::thread::yield_now();
        }
    }
}

/// One run's VM.
struct Vm {
    host: Arc<SimHost>,
    mmu: RealMmu,
    mem: Arc<HostBuffer>,
    /// The test slots (ids `1..=nslots`).
    layout: SlotLayout,
}

impl Vm {
    fn hva(&self, gpa: u64) -> u64 {
        self.mem.hva().raw() + (gpa - MEM_GPA)
    }

    fn slot_request(&self, slot: u64, gpa: u64) -> SlotRequest {
        SlotRequest {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: self.layout.slot_pages(slot) * PAGE,
            userspace_addr: self.hva(self.layout.slot_gpa(slot)),
        }
    }

    /// `MADV_DONTNEED` of `count` pages from test page `first`, cut at slot boundaries as the C
    /// test does (one call per slot piece): an invalidation each, the used words zeroed.
    fn unmap(&self, first: u64, count: u64) -> Result<()> {
        for (start, end) in self.layout.pieces(first, count) {
            let (hs, he) = (self.hva(start), self.hva(end));
            let mut zeroed = Ok(());
            let taken = self.mmu.invalidate_hva_range(Hva(hs), Hva(he), &mut || {
                zeroed = self.zero(start, end);
            });
            if !taken {
                zeroed = self.zero(start, end);
            }
            zeroed?;
        }
        Ok(())
    }

    /// Zeroes the words the test uses in the pages `[start, end)` (guest-physical).
    fn zero(&self, start: u64, end: u64) -> Result<()> {
        let mut p = start;
        while p < end {
            for off in [0, PAGE / 2] {
                self.mem.write(p - MEM_GPA + off, Width::W8, 0).map_err(setup)?;
            }
            p += PAGE;
        }
        Ok(())
    }
}

fn prepare(cap: Option<u32>, mempages: u64, m: &MmuChoice) -> Result<(Vm, Duration)> {
    let max =
        u64::from(cap.unwrap_or(u32::from(KVM_USER_MEM_SLOTS)).min(u32::from(KVM_USER_MEM_SLOTS)));
    let layout = SlotLayout::new(max, mempages)?;
    let host = Arc::new(
        SimHost::new(HostConfig { max_frames: mempages + (1 << 18), ..HostConfig::new(PHYS_BITS) })
            .map_err(setup)?,
    );
    let code = host.add_buffer("code", PAGE).map_err(setup)?;
    let mem = host.add_buffer("test", mempages * PAGE).map_err(setup)?;
    let mmu = m.mmu(&host, 1)?;
    let code_slot = SlotRequest {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: PAGE,
        userspace_addr: code.hva().raw(),
    };
    mmu.set_memory_region(&code_slot).map_err(setup)?;
    let vm = Vm { host, mmu, mem, layout };
    let t = Instant::now();
    for slot in 1..=layout.nslots {
        vm.mmu.set_memory_region(&vm.slot_request(slot, layout.slot_gpa(slot))).map_err(setup)?;
    }
    Ok((vm, t.elapsed()))
}

/// What the guest's MMIO exits may be (the C test's `mmio_ok`, `mmio_gpa_min/max`).
#[derive(Clone, Copy)]
struct MmioOk {
    ok: bool,
    min: u64,
    max: u64,
}

/// Runs `test` with `p`'s parameters on `format`; the best of `p.runs` runs.
pub fn run(test: PerfTest, p: &Params, m: &MmuChoice) -> Result<Outcome> {
    vmmu_selftest::perf::best_of(p.runs, || run_once(test, p, m))
}

fn run_once(test: PerfTest, p: &Params, m: &MmuChoice) -> Result<Outcome> {
    let mempages = p.sizes.pages(test);
    let (vm, slot_setup) = prepare(p.slots, mempages, m)?;
    let sync = SyncArea::default();
    let mut mmio = MmioOk { ok: false, min: 0, max: 0 };
    let mut move_base = 0;
    if let Some(w) = vm.layout.move_window(test)? {
        move_base = w.base;
        if let Some(r) = w.mmio {
            mmio = MmioOk { ok: true, min: *r.start(), max: *r.end() };
        }
    }
    let sizes = p.sizes;
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let mmio_exits = AtomicU64::new(0);
    let mut nloops = 0u64;
    let mut guest_runtime = Duration::ZERO;
    let host_result = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let r = guest(test, &vm, &sync, mmio, move_base, sizes, &mmio_exits);
            if let Err(e) = r {
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
            sync.gone.store(true, Ordering::Release);
        });
        let t0 = Instant::now();
        sync.start.store(true, Ordering::Release);
        let res = (|| -> Result<()> {
            loop {
                guest_runtime = t0.elapsed();
                if guest_runtime.as_secs_f64() >= p.seconds {
                    return Ok(());
                }
                host_loop(test, sizes.pages(test), &Host { vm: &vm, sync: &sync })?;
                nloops += 1;
            }
        })();
        sync.exit.store(true, Ordering::Release);
        let _ = guest.join();
        res
    });
    if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(SelftestError::Failed(f));
    }
    host_result?;
    Ok(Outcome {
        slots: (vm.layout.nslots + 1) as u32,
        pages_per_slot: vm.layout.pages_per_slot,
        slot_setup,
        iterations: nloops,
        per_iteration: (nloops > 0).then(|| guest_runtime / nloops as u32),
        mmio_exits: mmio_exits.load(Ordering::Relaxed),
    })
}

/// The test VM as the shared host loop sees it (`vmmu_selftest::perf::host_loop`).
struct Host<'a> {
    vm: &'a Vm,
    sync: &'a SyncArea,
}

impl PerfHost for Host<'_> {
    fn unmap(&self, first: u64, count: u64) -> Result<()> {
        self.vm.unmap(first, count)
    }

    fn load(&self, off: u64) -> Result<u64> {
        self.vm.mem.read(off, Width::W8).map_err(setup)
    }

    fn store(&self, off: u64, v: u64) -> Result<()> {
        self.vm.mem.write(off, Width::W8, v).map_err(setup)
    }

    fn perform_sync(&self) -> Result<()> {
        self.sync.host_perform_sync()
    }

    fn place_last_slot(&self, gpa: Option<u64>) -> Result<()> {
        let last = self.vm.layout.nslots;
        let gpa = gpa.unwrap_or_else(|| self.vm.layout.slot_gpa(last));
        self.vm.mmu.set_memory_region(&self.vm.slot_request(last, gpa)).map_err(setup)
    }
}

/// The guest's code of each test; `Err` is a guest assertion or an unexpected exit.
fn guest(
    test: PerfTest,
    vm: &Vm,
    sync: &SyncArea,
    mmio_ok: MmioOk,
    move_base: u64,
    sizes: Sizes,
    mmio_exits: &AtomicU64,
) -> std::result::Result<(), String> {
    // All of the test's memory lies below 4 GiB: no identity tables on the shadow MMU.
    let mut hw = SelftestVcpu::new(HwVcpu::new(&vm.mmu, &vm.host, 0, 8192), &vm.host, None)
        .map_err(|e| e.to_string())?;
    let mut mmio = |gpa: u64, kind: AccessKind| {
        if !mmio_ok.ok {
            return Err(format!("unexpected MMIO exit at gpa {gpa:#x}"));
        }
        if kind == AccessKind::Read {
            return Err(format!("unexpected MMIO read at gpa {gpa:#x}"));
        }
        if gpa < mmio_ok.min || gpa > mmio_ok.max {
            return Err(format!("unexpected MMIO exit address {gpa:#x}"));
        }
        mmio_exits.fetch_add(1, Ordering::Relaxed);
        Ok(0)
    };
    let mut rw = |hw: &mut SelftestVcpu<'_>, gpa: u64, store: Option<u64>| {
        hw.access8(gpa, store, &[vm.hva(gpa)], &mut mmio)
    };
    while !sync.start.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    hw.enter_guest();
    match test {
        PerfTest::MoveActive | PerfTest::MoveInactive => {
            while !sync.exit.load(Ordering::Acquire) {
                for page in 0..MEM_TEST_MOVE_SIZE_PAGES {
                    rw(&mut hw, move_base + page * PAGE, Some(MEM_TEST_VAL_1))?;
                }
                // The C guest polls nothing else in this loop; leaving guest mode once per pass
                // is this machine's interrupt window.
                hw.exit_guest();
                hw.enter_guest();
            }
        }
        PerfTest::Map => {
            let half = (sizes.map / PAGE - 1) / 2;
            loop {
                for page in 0..half {
                    rw(&mut hw, MEM_TEST_GPA + page * PAGE, Some(MEM_TEST_VAL_1))?;
                }
                if !sync.guest_perform_sync(&mut hw) {
                    break;
                }
                for page in half..2 * half {
                    rw(&mut hw, MEM_TEST_GPA + page * PAGE, Some(MEM_TEST_VAL_2))?;
                }
                if !sync.guest_perform_sync(&mut hw) {
                    break;
                }
            }
        }
        PerfTest::Unmap | PerfTest::UnmapChunked => loop {
            rw(&mut hw, MEM_TEST_GPA, Some(MEM_TEST_VAL_1))?;
            if !sync.guest_perform_sync(&mut hw) {
                break;
            }
            rw(&mut hw, MEM_TEST_GPA + sizes.unmap_test / 2, Some(MEM_TEST_VAL_2))?;
            if !sync.guest_perform_sync(&mut hw) {
                break;
            }
        },
        PerfTest::Rw => {
            let test_pages = sizes.mem / PAGE - 1;
            loop {
                for page in 0..test_pages {
                    rw(&mut hw, MEM_TEST_GPA + page * PAGE, Some(MEM_TEST_VAL_1))?;
                }
                if !sync.guest_perform_sync(&mut hw) {
                    break;
                }
                for page in 0..test_pages {
                    let gpa = MEM_TEST_GPA + page * PAGE + PAGE / 2;
                    let v = rw(&mut hw, gpa, None)?;
                    if v != MEM_TEST_VAL_2 {
                        return Err(format!(
                            "guest assertion failed: val == MEM_TEST_VAL_2 at gpa {gpa:#x}, val = \
                             {v:#x}"
                        ));
                    }
                    rw(&mut hw, gpa, Some(0))?;
                }
                if !sync.guest_perform_sync(&mut hw) {
                    break;
                }
            }
        }
    }
    hw.exit_guest();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(slots: u32) -> Params {
        Params { slots: Some(slots), seconds: 0.05, runs: 1, sizes: Sizes::scaled(5) }
    }

    #[test]
    fn every_test_passes_quickly() {
        for m in [MmuChoice::default(), MmuChoice::shadow()] {
            for t in PerfTest::ALL {
                let o = run(t, &quick(16), &m).unwrap_or_else(|e| panic!("{:?} {t:?}: {e}", m.mmu));
                assert_eq!(o.slots, 16, "{t:?}");
                assert!(o.iterations > 0, "{t:?}: {o:?}");
            }
        }
    }

    #[test]
    fn too_many_slots_is_reported_as_the_c_test_does() {
        let e = run(PerfTest::Map, &quick(32764), &MmuChoice::default()).expect_err("too many");
        assert_eq!(e, SelftestError::TooManySlots { max: Sizes::scaled(5).map / PAGE + 1 });
    }
}
