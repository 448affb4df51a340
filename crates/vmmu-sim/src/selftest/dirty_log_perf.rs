//! `dirty_log_perf_test` restated: `vcpus` vCPUs (default 1) each own a part of one test slot
//! (default 1 GiB each) and write one word of every page of it per pass. Phases, each timed on
//! the host thread: populate (pass 0), enable dirty logging (a flags-only update of the live
//! slot: the MMU write-protects, and splits, what the populate mapped), then `iterations`
//! (default 2, at least 2) of: the vCPUs dirty their memory (one pass), `KVM_GET_DIRTY_LOG`, and
//! with manual protect `KVM_CLEAR_DIRTY_LOG` of what the GET returned; then disable dirty
//! logging (the MMU recovers huge mappings). The C test's default, and this one's, is manual
//! protect with "initially set" ([`DirtyLogMode::InitiallySet`]): enabling logging then protects
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

use super::{access8, setup, MmuChoice, Result, SelftestError};
use crate::host::{HostConfig, SimHost};
use crate::hw_vcpu::HwVcpu;
use crate::seam::{GuestMmu, SlotRequest};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use vmmu::dirty::DirtyLogMode;

/// The test memory's slot id (memstress's `TEST_MEM_SLOT_INDEX`).
pub const TEST_SLOT: u32 = 1;
/// The test memory's first guest-physical address (4 GiB, as memstress's default offset).
pub const TEST_GPA: u64 = 1 << 32;

/// The test's parameters (the C test's flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// `-v`: vCPUs.
    pub vcpus: usize,
    /// `-b`: bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// `-i`: iterations (at least 2).
    pub iterations: u32,
    /// How the test collects: the C test's default is manual protect
    /// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: the GET clears nothing, a CLEAR of what it
    /// returned re-protects) with "initially set" where the kernel offers it; `-g` is auto.
    pub mode: DirtyLogMode,
}

impl Default for Params {
    /// The C test's defaults: 1 vCPU, 1 GiB, 2 iterations, manual protect, initially set.
    fn default() -> Self {
        Params {
            vcpus: 1,
            bytes_per_vcpu: 1 << 30,
            iterations: 2,
            mode: DirtyLogMode::InitiallySet,
        }
    }
}

impl Params {
    /// Checks the parameters (shared with the KVM half).
    pub fn check(&self) -> Result<()> {
        if self.vcpus == 0 || self.bytes_per_vcpu < 4096 {
            return Err(setup("give at least 1 vCPU and 4096 bytes per vCPU"));
        }
        if self.iterations < 2 {
            return Err(setup("dirty_log_perf_test makes at least 2 iterations"));
        }
        Ok(())
    }
}

/// The timed phases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Pages in the slot (every vCPU's part).
    pub pages: u64,
    /// Iteration 0: every vCPU writes all its memory.
    pub populate: Duration,
    /// Turning dirty logging on for the slot.
    pub enable: Duration,
    /// Per iteration: the vCPUs dirty all their memory.
    pub dirty: Vec<Duration>,
    /// Per iteration: `KVM_GET_DIRTY_LOG`.
    pub get: Vec<Duration>,
    /// Per iteration: `KVM_CLEAR_DIRTY_LOG` (empty without manual protect).
    pub clear: Vec<Duration>,
    /// Turning dirty logging off.
    pub disable: Duration,
}

/// The mean of `d` (zero for none).
pub fn mean(d: &[Duration]) -> Duration {
    match u32::try_from(d.len()) {
        Ok(n) if n > 0 => d.iter().sum::<Duration>() / n,
        _ => Duration::ZERO,
    }
}

/// What the host asks the vCPU threads to do next.
const STOP: u64 = u64::MAX;

/// Checks that `words` (a GET's bitmap) holds every one of `pages` pages: all of them were
/// written since the previous collection.
pub fn check_all_dirty(words: &[u64], pages: u64, iteration: u32) -> Result<()> {
    let seen = vmmu::dirty::pages_of(words).filter(|&p| p < pages).count() as u64;
    if seen == pages {
        return Ok(());
    }
    let missing = (0..pages)
        .find(|&p| {
            let w = usize::try_from(p / 64).ok().and_then(|i| words.get(i)).copied().unwrap_or(0);
            w & (1 << (p % 64)) == 0
        })
        .unwrap_or(0);
    Err(SelftestError::Failed(format!(
        "iteration {iteration}: KVM_GET_DIRTY_LOG returned {seen} of the {pages} pages the vCPUs \
         wrote (lost dirty pages; first missing: page {missing:#x})"
    )))
}

/// Runs the test on the real MMU `m`.
pub fn run(p: &Params, m: &MmuChoice) -> Result<Outcome> {
    p.check()?;
    let per = p.bytes_per_vcpu.next_multiple_of(4096);
    let size = per * p.vcpus as u64;
    let pages = size / 4096;
    let host = Arc::new(
        SimHost::new(HostConfig { max_frames: pages + (1 << 16), ..HostConfig::new(46) })
            .map_err(setup)?,
    );
    let mem = host.add_buffer("test", size).map_err(setup)?;
    let mmu = m.mmu(&host, p.vcpus)?;
    if !mmu.set_dirty_log_mode(p.mode) {
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
    let states: Vec<_> = (0..p.vcpus).map(|i| mmu.create_vcpu(i)).collect();
    let mut out = Outcome { pages, ..Outcome::default() };
    std::thread::scope(|s| {
        for (i, state) in states.into_iter().enumerate() {
            let (mmu, host, go, done, pass, failed, failure) =
                (&mmu, &host, &go, &done, &pass, &failed, &failure);
            let base_gpa = TEST_GPA + i as u64 * per;
            let base_hva = mem.hva().raw() + i as u64 * per;
            s.spawn(move || {
                let mut hw = HwVcpu::with_state(mmu, host, state, 256);
                loop {
                    go.wait();
                    let value = pass.load(Ordering::SeqCst);
                    if value == STOP {
                        break;
                    }
                    let mut off = 0;
                    hw.enter_guest();
                    while off < per && !failed.load(Ordering::Relaxed) {
                        let gpa = base_gpa + off;
                        let mut mmio = |gpa: u64, _w: bool| {
                            Err(format!("vCPU {i}: unexpected MMIO exit at gpa {gpa:#x}"))
                        };
                        let r = access8(&mut hw, gpa, Some(value), &[base_hva + off], &mut mmio);
                        if let Err(e) = r {
                            *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                            failed.store(true, Ordering::Relaxed);
                        }
                        off += 4096;
                    }
                    hw.exit_guest();
                    done.wait();
                }
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
                if p.mode.is_manual() {
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
        for mode in [DirtyLogMode::InitiallySet, DirtyLogMode::Manual, DirtyLogMode::Auto] {
            let p = Params { vcpus: 2, bytes_per_vcpu: 4 << 20, iterations: 3, mode };
            let o = run(&p, &MmuChoice::default()).expect("dirty_log_perf");
            assert_eq!((o.pages, o.dirty.len(), o.get.len()), (2048, 3, 3));
            assert_eq!(o.clear.len(), if mode.is_manual() { 3 } else { 0 });
        }
    }

    #[test]
    fn a_get_missing_a_page_fails() {
        let mut words = vec![u64::MAX; 2];
        assert!(check_all_dirty(&words, 128, 1).is_ok());
        assert!(check_all_dirty(&words, 100, 1).is_ok(), "bits past the slot are ignored");
        words[1] &= !(1 << 3);
        let e = check_all_dirty(&words, 128, 2).expect_err("page 67 missing");
        assert!(e.to_string().contains("127 of the 128") && e.to_string().contains("0x43"), "{e}");
    }

    /// A CLEAR that returns without flushing lets the vCPUs write the next iteration through
    /// their cached writable translations: those pages are missing from the next GET (with
    /// "initially set", from the second GET: the first reports every page anyway).
    #[cfg(feature = "historical-bugs")]
    #[test]
    fn catches_a_clear_that_does_not_flush() {
        let m = MmuChoice {
            bugs: vmmu::bugs::BugSet::only(vmmu::bugs::Bug::DirtyLogNoFlush),
            ..MmuChoice::default()
        };
        for mode in [DirtyLogMode::Manual, DirtyLogMode::InitiallySet] {
            let p = Params { vcpus: 1, bytes_per_vcpu: 1 << 20, iterations: 2, mode };
            let e = run(&p, &m).expect_err("lost dirty pages");
            assert!(e.to_string().contains("lost dirty pages"), "{mode:?}: {e}");
        }
    }

    #[test]
    fn fewer_than_two_iterations_are_refused() {
        let p = Params { iterations: 1, ..Params::default() };
        assert!(p.check().is_err());
    }
}
