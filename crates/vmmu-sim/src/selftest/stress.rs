//! `memslot_modification_stress_test` restated: `vcpus` vCPUs (default 1) write one word of
//! every page of their own part of the test memory (default 1 GiB each, one slot at the top of
//! the guest-physical space, as memstress puts it), pass after pass, while the host adds a
//! one-page slot (id 7) just below the test memory and deletes it again, `iterations` times
//! (default 10), sleeping `delay` before each (default 0).
//!
//! The C test passes when every vCPU exit is a `SYNC` ucall (a spurious MMIO exit or a KVM_RUN
//! error fails it); here every access must be RAM at the host address the test slot maps (an
//! MMIO outcome, an error or a stale translation fails the test). A pass over a vCPU's memory
//! is its `SYNC`. On the shadow MMU the vCPUs reach the test memory, far above 4 GiB, through
//! identity tables in an internal slot (`vcpu.rs`), as memstress's guests do through theirs.

use super::vcpu::{guest_tables, selftest_vcpus, PHYS_BITS};
use super::{setup, MmuChoice, Result, SelftestError};
use crate::host::{HostConfig, SimHost};
use crate::seam::{GuestMmu, SlotRequest};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use vmmu_selftest::stress::{Outcome, Params, DUMMY_MEMSLOT_INDEX, TEST_SLOT};

/// Runs the test on the real MMU with `format` and MMIO caching `caching`.
pub fn run(p: &Params, m: &MmuChoice) -> Result<Outcome> {
    if p.vcpus == 0 || p.bytes_per_vcpu < 4096 {
        return Err(setup("give at least 1 vCPU and 4096 bytes per vCPU"));
    }
    let per = p.bytes_per_vcpu.next_multiple_of(4096);
    let size = per * p.vcpus as u64;
    let phys_bits = PHYS_BITS;
    let pages = size / 4096;
    let host = Arc::new(
        SimHost::new(HostConfig { max_frames: pages + (1 << 16), ..HostConfig::new(phys_bits) })
            .map_err(setup)?,
    );
    let mem = host.add_buffer("test", size).map_err(setup)?;
    let dummy = host.add_buffer("dummy", 4096).map_err(setup)?;
    let mmu = m.mmu(&host, p.vcpus)?;
    // memstress: the test memory ends one page below the top of the guest-physical space.
    let max_gfn = (1u64 << (phys_bits - 12)) - 1;
    let test_gpa = (max_gfn - pages) * 4096;
    let test = SlotRequest {
        slot: TEST_SLOT,
        flags: 0,
        guest_phys_addr: test_gpa,
        memory_size: size,
        userspace_addr: mem.hva().raw(),
    };
    mmu.set_memory_region(&test).map_err(setup)?;
    let dummy_slot = SlotRequest {
        slot: DUMMY_MEMSLOT_INDEX,
        flags: 0,
        guest_phys_addr: test_gpa - 4096,
        memory_size: 4096,
        userspace_addr: dummy.hva().raw(),
    };
    let stop = AtomicBool::new(false);
    let accesses = AtomicU64::new(0);
    let passes = AtomicU64::new(0);
    let running = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let reached = [(test_gpa - 4096, test_gpa + size)];
    let tables = guest_tables(m, &mmu, &host, &reached)?;
    let vcpus = selftest_vcpus(&mmu, &host, p.vcpus, 256, tables.as_ref())?;
    let t0 = Instant::now();
    let updates = std::thread::scope(|s| {
        for (i, mut hw) in vcpus.into_iter().enumerate() {
            let (stop, accesses, passes, failure, running) =
                (&stop, &accesses, &passes, &failure, &running);
            let base_gpa = test_gpa + i as u64 * per;
            let base_hva = mem.hva().raw() + i as u64 * per;
            s.spawn(move || {
                let mut pass = 0u64;
                'run: while !stop.load(Ordering::Relaxed) {
                    pass += 1;
                    let mut off = 0;
                    while off < per {
                        hw.enter_guest();
                        for _ in 0..64 {
                            if off >= per {
                                break;
                            }
                            let gpa = base_gpa + off;
                            let mut mmio = |gpa: u64, _kind: crate::seam::AccessKind| {
                                Err(format!("vCPU {i}: unexpected MMIO exit at gpa {gpa:#x}"))
                            };
                            if let Err(e) =
                                hw.access8(gpa, Some(pass), &[base_hva + off], &mut mmio)
                            {
                                *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                                stop.store(true, Ordering::Relaxed);
                                break 'run;
                            }
                            off += 4096;
                            accesses.fetch_add(1, Ordering::Relaxed);
                        }
                        hw.exit_guest();
                        if pass == 1 && off <= 64 * 4096 {
                            running.fetch_add(1, Ordering::SeqCst);
                        }
                        if stop.load(Ordering::Relaxed) {
                            break 'run;
                        }
                    }
                    passes.fetch_add(1, Ordering::Relaxed);
                }
                hw.exit_guest();
            });
        }
        let mut updates = 0u64;
        let result = (|| -> Result<()> {
            // memstress_start_vcpu_threads: the vCPUs are running (here: past their first
            // batch of writes) before the host starts.
            let t = Instant::now();
            while running.load(Ordering::SeqCst) < p.vcpus && !stop.load(Ordering::Relaxed) {
                if t.elapsed() > Duration::from_secs(10) {
                    return Err(SelftestError::Failed(
                        "the vCPUs did not start within 10 s".into(),
                    ));
                }
                std::thread::yield_now();
            }
            for _ in 0..p.iterations {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(p.delay);
                mmu.set_memory_region(&dummy_slot).map_err(setup)?;
                mmu.set_memory_region(&SlotRequest::delete(DUMMY_MEMSLOT_INDEX)).map_err(setup)?;
                updates += 2;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result.map(|()| updates)
    })?;
    let elapsed = t0.elapsed();
    if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(SelftestError::Failed(f));
    }
    Ok(Outcome {
        updates,
        accesses: accesses.load(Ordering::Relaxed),
        passes: passes.load(Ordering::Relaxed),
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_passes() {
        for m in [MmuChoice::default(), MmuChoice::shadow()] {
            let p =
                Params { vcpus: 2, bytes_per_vcpu: 1 << 20, iterations: 50, ..Params::default() };
            let o = run(&p, &m).unwrap_or_else(|e| panic!("{:?}: {e}", m.mmu));
            assert_eq!(o.updates, 100);
            assert!(o.accesses > 0);
        }
    }
}
