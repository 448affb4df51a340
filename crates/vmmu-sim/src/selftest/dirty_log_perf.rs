//! `dirty_log_perf_test` restated: `vcpus` vCPUs (default 1) each own a part of one test slot
//! (default 1 GiB each) and write one word of every page of it per pass. Phases, each timed on
//! the host thread: populate (pass 0), enable dirty logging (a flags-only update of the live
//! slot: the MMU write-protects, and splits, what the populate mapped), then `iterations`
//! (default 2, at least 2) of: the vCPUs dirty their memory (one pass), `KVM_GET_DIRTY_LOG`, and
//! with manual protect `KVM_CLEAR_DIRTY_LOG` of what the GET returned; then disable dirty
//! logging (the MMU recovers huge mappings). The C test's default, and this one's, is manual
//! protect with "initially set" ([`Protect::InitiallySet`]): enabling logging then protects
//! nothing and the first GET reports every page whatever was written; the first CLEAR splits
//! and protects.
//!
//! The C test passes when every vCPU exit is a `SYNC` ucall; here every write must also reach
//! the host address the slot maps (a stale translation fails), and every GET must return every
//! page of the slot (the vCPUs wrote them all since the previous collection): a page missing is
//! a lost dirty page, a failure. The host's memory is as [`HostConfig`]'s default: 2 MiB host
//! pages where a block of the buffer is aligned (as anonymous memory with transparent huge
//! pages), so the populate maps huge leaves and enabling logging splits them.
//!
//! A collection that re-protects without flushing TLBs (`dirty-log-no-flush`) fails the GET check
//! only when a vCPU's part fits its TLB (256 entries, 1 MiB): a sweep over more evicts each
//! page's entry before the next iteration comes round to it, so every write faults anyway (as on
//! hardware, whose TLBs hold a few thousand entries).

use super::vcpu::{guest_tables, selftest_vcpus, PHYS_BITS};
use super::{setup, MmuChoice, Result, SelftestError};
use crate::host::{HostConfig, SimHost};
use crate::seam::{GuestMmu, SlotRequest};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use vmmu::dirty::DirtyLogMode;

pub use vmmu_selftest::dirty_log_perf::{
    check_all_dirty, mean, Outcome, Params, Protect, TEST_GPA, TEST_SLOT,
};

/// The MMU's dirty-log mode for the test's collection.
fn mode(p: Protect) -> DirtyLogMode {
    match p {
        Protect::Auto => DirtyLogMode::Auto,
        Protect::Manual => DirtyLogMode::Manual,
        Protect::InitiallySet => DirtyLogMode::InitiallySet,
    }
}

/// What the host asks the vCPU threads to do next.
const STOP: u64 = u64::MAX;

/// Runs the test on the real MMU `m`.
pub fn run(p: &Params, m: &MmuChoice) -> Result<Outcome> {
    p.check()?;
    let per = p.bytes_per_vcpu.next_multiple_of(4096);
    let size = per * p.vcpus as u64;
    let pages = size / 4096;
    let host = Arc::new(
        SimHost::new(HostConfig { max_frames: pages + (1 << 16), ..HostConfig::new(PHYS_BITS) })
            .map_err(setup)?,
    );
    let mem = host.add_buffer("test", size).map_err(setup)?;
    let mmu = m.mmu(&host, p.vcpus)?;
    if !mmu.set_dirty_log_mode(mode(p.protect)) {
        return Err(setup("this MMU has no dirty logging"));
    }
    let slot = SlotRequest {
        slot: TEST_SLOT,
        flags: 0,
        guest_phys_addr: TEST_GPA,
        memory_size: size,
        userspace_addr: mem.hva().raw(),
    };
    mmu.set_memory_region(&slot).map_err(setup)?;
    let count = u32::try_from(pages).map_err(|_| setup("too many pages for one slot's log"))?;
    // Host and vCPUs meet at `go` (the host has set `pass`) and at `done` (every vCPU wrote its
    // part, or failed).
    let go = Barrier::new(p.vcpus + 1);
    let done = Barrier::new(p.vcpus + 1);
    let pass = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let tables = guest_tables(m, &mmu, &host, &[(TEST_GPA, TEST_GPA + size)])?;
    let vcpus = selftest_vcpus(&mmu, &host, p.vcpus, 256, tables.as_ref())?;
    let mut out = Outcome { pages, ..Outcome::default() };
    std::thread::scope(|s| {
        for (i, mut hw) in vcpus.into_iter().enumerate() {
            let (go, done, pass, failed, failure) = (&go, &done, &pass, &failed, &failure);
            let base_gpa = TEST_GPA + i as u64 * per;
            let base_hva = mem.hva().raw() + i as u64 * per;
            s.spawn(move || loop {
                go.wait();
                let value = pass.load(Ordering::SeqCst);
                if value == STOP {
                    break;
                }
                let mut off = 0;
                hw.enter_guest();
                while off < per && !failed.load(Ordering::Relaxed) {
                    let gpa = base_gpa + off;
                    let mut mmio = |gpa: u64, _kind: crate::seam::AccessKind| {
                        Err(format!("vCPU {i}: unexpected MMIO exit at gpa {gpa:#x}"))
                    };
                    let r = hw.access8(gpa, Some(value), &[base_hva + off], &mut mmio);
                    if let Err(e) = r {
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        failed.store(true, Ordering::Relaxed);
                    }
                    off += 4096;
                }
                hw.exit_guest();
                done.wait();
            });
        }
        let vcpu_pass = |value: u64| -> Result<Duration> {
            pass.store(value, Ordering::SeqCst);
            let t = Instant::now();
            go.wait();
            done.wait();
            let d = t.elapsed();
            match failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
                Some(f) => Err(SelftestError::Failed(format!("pass {value}: {f}"))),
                None => Ok(d),
            }
        };
        let result = (|| -> Result<()> {
            out.populate = vcpu_pass(0)?;
            let logged = SlotRequest { flags: SlotRequest::LOG_DIRTY_PAGES, ..slot };
            let t = Instant::now();
            mmu.set_memory_region(&logged).map_err(|e| {
                SelftestError::Failed(format!("enabling dirty logging on the slot: {e}"))
            })?;
            out.enable = t.elapsed();
            for it in 1..=p.iterations {
                out.dirty.push(vcpu_pass(u64::from(it))?);
                let t = Instant::now();
                let words = match mmu.get_dirty_log(TEST_SLOT) {
                    Some(Ok(w)) => w,
                    Some(Err(errno)) => {
                        return Err(SelftestError::Failed(format!(
                            "iteration {it}: KVM_GET_DIRTY_LOG: {errno}"
                        )))
                    }
                    None => return Err(setup("this MMU has no dirty logging")),
                };
                out.get.push(t.elapsed());
                check_all_dirty(&words, pages, it)?;
                if p.protect != Protect::Auto {
                    let t = Instant::now();
                    match mmu.clear_dirty_log(TEST_SLOT, 0, count, Some(&words)) {
                        Some(Ok(())) => {}
                        Some(Err(errno)) => {
                            return Err(SelftestError::Failed(format!(
                                "iteration {it}: KVM_CLEAR_DIRTY_LOG: {errno}"
                            )))
                        }
                        None => return Err(setup("this MMU has no dirty logging")),
                    }
                    out.clear.push(t.elapsed());
                }
            }
            let t = Instant::now();
            mmu.set_memory_region(&slot).map_err(|e| {
                SelftestError::Failed(format!("disabling dirty logging on the slot: {e}"))
            })?;
            out.disable = t.elapsed();
            Ok(())
        })();
        pass.store(STOP, Ordering::SeqCst);
        go.wait();
        result
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_passes_in_every_mode() {
        for m in [MmuChoice::default(), MmuChoice::shadow()] {
            for protect in [Protect::InitiallySet, Protect::Manual, Protect::Auto] {
                let p = Params { vcpus: 2, bytes_per_vcpu: 4 << 20, iterations: 3, protect };
                let o = run(&p, &m).unwrap_or_else(|e| panic!("{:?} {protect:?}: {e}", m.mmu));
                assert_eq!((o.pages, o.dirty.len(), o.get.len()), (2048, 3, 3));
                assert_eq!(o.clear.len(), if protect == Protect::Auto { 0 } else { 3 });
            }
        }
    }

    /// A CLEAR that returns without flushing lets the vCPUs write the next iteration through
    /// their cached writable translations: those pages are missing from the next GET (with
    /// "initially set", from the second GET: the first reports every page anyway).
    /// On the shadow MMU too: its guest-virtual TLB keeps the writable translations the CLEAR
    /// should have flushed.
    #[cfg(feature = "historical-bugs")]
    #[test]
    fn catches_a_clear_that_does_not_flush() {
        let bugs = vmmu::bugs::BugSet::only(vmmu::bugs::Bug::DirtyLogNoFlush);
        for m in
            [MmuChoice { bugs, ..MmuChoice::default() }, MmuChoice { bugs, ..MmuChoice::shadow() }]
        {
            for protect in [Protect::Manual, Protect::InitiallySet] {
                let p = Params { vcpus: 1, bytes_per_vcpu: 1 << 20, iterations: 2, protect };
                let e = run(&p, &m).expect_err("lost dirty pages");
                assert!(e.to_string().contains("lost dirty pages"), "{:?} {protect:?}: {e}", m.mmu);
            }
        }
    }
}
