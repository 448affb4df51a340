//! The machine's device manager: the memslot schedule's requests, paced by the update profile
//! and timed (a request that returns only after the run stopped is a stall), and, with
//! `stress_paths`, a host invalidation after each request.

use super::wrap_trap::{arm_wrap_trap, spring_wrap_trap};
use super::{MachineConfig, Shared, POISON_HOLD_YIELDS, STALL};
use crate::host::SIZE_2M;
use crate::oracle::{OracleReport, Violation, POISON};
use crate::ram::Width;
use crate::schedule::Schedule;
use crate::seam::{Errno, GuestMmu};
use crate::slots::SlotTable;
use core::sync::atomic::{AtomicU64, Ordering};
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};
use vmmu::types::{Hva, PAGE_SIZE};

pub(super) struct DmResult {
    pub(super) updates: u64,
    pub(super) refused: u64,
    pub(super) invalidations: u64,
    pub(super) trap: crate::report::WrapTrapReport,
    pub(super) latency: Histogram<u64>,
    pub(super) oracle: OracleReport,
}

/// How the device manager paces its memslot requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateProfile {
    /// Back to back, `update_pause` apart, for the whole run: a stress far beyond what a VM does
    /// (over 1000 updates per second).
    Steady,
    /// Like a recorded boot (`tests/traces/seabios-kvm.small.trace.jsonl`: 48 updates in 3.6 s,
    /// in bursts of 10 to 15 within a millisecond or two, with quiet gaps of 0.3 to 2.3 s):
    /// bursts of `burst` requests `update_pause` apart, then `quiet`.
    Boot {
        /// Requests per burst.
        burst: u32,
        /// The pause after each burst.
        quiet: Duration,
    },
}

impl UpdateProfile {
    /// The boot-like profile with rates from the recorded SeaBIOS boot: bursts of 12, 600 ms
    /// apart (about 20 updates per second).
    pub const BOOT: UpdateProfile =
        UpdateProfile::Boot { burst: 12, quiet: Duration::from_millis(600) };

    /// The pause after request number `done` (1-based) given the in-burst `pause`.
    fn pause_after(self, done: u64, pause: Duration) -> Duration {
        match self {
            UpdateProfile::Steady => pause,
            UpdateProfile::Boot { burst, quiet } => {
                if done % u64::from(burst.max(1)) == 0 {
                    quiet
                } else {
                    pause
                }
            }
        }
    }
}

pub(super) fn device_manager<M: GuestMmu>(
    sh: &Shared<'_, M>,
    schedule: &Schedule,
    cfg: &MachineConfig,
    progress: &AtomicU64,
) -> DmResult {
    let pause = cfg.update_pause;
    let mut rng = fastrand::Rng::with_seed(cfg.seed ^ 0x5eed_d3a1_u64);
    let mut invalidate = cfg.stress_paths;
    let mut r = DmResult {
        updates: 0,
        refused: 0,
        invalidations: 0,
        trap: Default::default(),
        // 1 ns to 60 s with 3 significant digits: valid bounds, so this cannot fail. Longer
        // latencies saturate at 60 s.
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)
            .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
        oracle: OracleReport::default(),
    };
    if let Some(trap) = sh.trap_slot {
        r.trap.requested = true;
        arm_wrap_trap(sh, &mut r.trap);
        r.trap.dummy_slot_gpa = trap.guest_phys_addr;
        if !r.trap.armed {
            sh.trap_done.store(true, Ordering::SeqCst);
        }
    } else {
        sh.trap_done.store(true, Ordering::SeqCst);
    }
    let dimm = sh
        .trap_slot
        .and_then(|_| schedule.steps().iter().find(|s| s.label.starts_with("dimm: hot")));
    while !sh.stop.load(Ordering::Relaxed) {
        if cfg.max_updates.is_some_and(|max| r.updates >= max) {
            break; // `--churn N`: exactly N updates (the run then stops)
        }
        if let (Some(trap), Some(d)) = (sh.trap_slot, dimm) {
            let plugged = schedule
                .version(r.updates)
                .lookup(vmmu::types::Gfn(d.request.guest_phys_addr >> 12))
                .is_some();
            if r.trap.armed && !sh.trap_done.load(Ordering::Relaxed) && plugged {
                spring_wrap_trap(sh, trap, &mut r.trap);
                r.trap.sprung_after_ms = sh.started.elapsed().as_millis() as u64;
                sh.trap_done.store(true, Ordering::SeqCst);
            }
        }
        let step = schedule.step(r.updates);
        sh.clock.tick();
        let t = Instant::now();
        let got = sh.mmu.set_memory_region(&step.request);
        let took = t.elapsed();
        let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        sh.clock.tick();
        if took >= STALL && sh.stop.load(Ordering::Relaxed) {
            r.oracle.push(stall(&format!("memslot request {} ({})", r.updates, step.label), took));
        }
        r.latency.saturating_record(ns.max(1));
        r.updates += 1;
        r.oracle.checked += 1;
        if step.expect.is_err() {
            r.refused += 1;
        }
        let want = step.expect;
        let got = got.map_err(Errno::from);
        if got != want {
            r.oracle.push(Violation {
                vcpu: None,
                gpa: None,
                what: format!("memslot request {} ({})", r.updates - 1, step.label),
                expected: format!("{want:?}"),
                seen: format!("{got:?}"),
            });
        }
        progress.store(r.updates, Ordering::Relaxed);
        if invalidate && !sh.stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            // The slot the request just mapped (a create or move), if any: its first pages are
            // being faulted in by every vCPU right now, which is where a stale decision installed
            // over another vCPU's fresh leaf would leave a translation unflushed.
            let mapped =
                (step.request.memory_size != 0).then_some((step.request.slot & 0xffff) as u16);
            invalidate = host_invalidation(sh, schedule.version(r.updates), mapped, &mut rng);
            r.invalidations += u64::from(invalidate);
            let took = t.elapsed();
            if took >= STALL && sh.stop.load(Ordering::Relaxed) {
                r.oracle.push(stall("host invalidation", took));
            }
        }
        let pause = cfg.update_profile.pause_after(r.updates, pause);
        if pause.is_zero() {
            std::thread::yield_now();
        } else {
            // In slices, so a long quiet gap does not hold the run past its end.
            let until = Instant::now() + pause;
            while !sh.stop.load(Ordering::Relaxed) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(10)));
            }
        }
    }
    r
}

/// One host invalidation (`stress_paths`) of 1 to 4 pages of a slot live in `slots` (the map in
/// force: only the device manager changes it; slot `prefer` if it is live, else a random one):
/// MMU-notifier begin, poison, restore, end. Half the time the range starts at the slot's first
/// page, where the vCPUs' private areas, the used shared words and the hot spots are. The
/// notifier range is the pages alone (a `prefer` slot on 4 KiB host pages) or the 2 MiB blocks
/// around them (see below). Returns `false` if the MMU takes no host invalidations.
fn host_invalidation<M: GuestMmu>(
    sh: &Shared<'_, M>,
    slots: &SlotTable,
    prefer: Option<u16>,
    rng: &mut fastrand::Rng,
) -> bool {
    let live = slots.slots();
    if live.is_empty() {
        return true;
    }
    let (s, just_mapped) = match prefer.and_then(|id| live.iter().find(|s| s.id == id)) {
        Some(s) => (*s, true),
        None => (live[rng.usize(..live.len())], false),
    };
    let pages = rng.u64(1..=4).min(s.npages);
    let first = if rng.bool() { 0 } else { rng.u64(0..=s.npages - pages) };
    let start = Hva(s.userspace_addr + first * PAGE_SIZE);
    let len = pages * PAGE_SIZE;
    let Some((buf, off)) = sh.host.locate(start) else { return true };
    // With huge host pages the notifier range covers the whole 2 MiB blocks around the pages,
    // clipped to the buffer: a host changes part of a transparent huge page only after
    // splitting it, and the split invalidates the whole block (Linux `split_huge_pmd`).
    // Invalidating less would let a fault on another page of the block map the block with one
    // huge leaf while its pages are changed. With 4 KiB host pages, a slot a request just mapped
    // gets the pages alone, as Linux's notifier for a page it migrates or swaps out: a
    // translation left on one of the first pages the vCPUs fault in is then not flushed by the
    // zap of a neighbour's leaf. Other slots still get whole blocks, as for a range unmapped at
    // once, whose zap unlinks and frees tables under the vCPUs' walks.
    let (lo, hi) = if sh.host.huge_pages() || !just_mapped {
        let b0 = buf.hva().0;
        (
            (start.0 & !(SIZE_2M - 1)).max(b0),
            (start.0 + len).next_multiple_of(SIZE_2M).min(b0 + buf.len()),
        )
    } else {
        (start.0, start.0 + len)
    };
    sh.invalidating.fetch_add(1, Ordering::Relaxed);
    let taken = sh.mmu.invalidate_hva_range(Hva(lo), Hva(hi), &mut || {
        // No vCPU may touch the pages now: whatever they read before the end is poison.
        let words = (off..off + len).step_by(8);
        let saved: Vec<u64> = words.clone().map(|o| buf.read(o, Width::W8).unwrap_or(0)).collect();
        for o in words.clone() {
            // In bounds: the range lies in the slot, and the slot in its buffer.
            let _ = buf.write(o, Width::W8, POISON);
        }
        // Keep the pages poisoned while the vCPUs run a little: an MMU that let them keep a
        // translation would show it now (a correct one makes their faults there retry
        // meanwhile).
        for _ in 0..POISON_HOLD_YIELDS {
            std::thread::yield_now();
        }
        for (o, v) in words.zip(saved) {
            let _ = buf.write(o, Width::W8, v);
        }
    });
    sh.invalidating.fetch_sub(1, Ordering::Relaxed);
    taken
}

fn stall(what: &str, took: Duration) -> Violation {
    Violation {
        vcpu: None,
        gpa: None,
        what: what.to_string(),
        expected: format!("to complete while the vCPUs run (in less than {STALL:?})"),
        seen: format!(
            "it took {took:.1?} and returned only after the run stopped: a stall (a wait for a \
             vCPU in guest mode that nothing made leave)"
        ),
    }
}
