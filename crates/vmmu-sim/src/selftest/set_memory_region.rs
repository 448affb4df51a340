//! `set_memory_region_test`'s MOVE and DELETE of an in-use region (x86 part), restated.
//!
//! Slot 10 maps 2 MiB at GPA `0xc0000000` (host memory zeroed); slot 0 maps the guest's "code"
//! page at GPA 0, which the guest reads once per spin iteration as an instruction fetch would.
//! The guest spins reading the u64 at `0xc0000000` until it changes, then syncs with the host
//! (the C test's `GUEST_SYNC`) and checks the value it saw; MMIO reads are answered with
//! `0xbeef` and must be 8-byte reads of exactly `0xc0000000`.
//!
//! - MOVE: the host moves slot 10 to `0xc0000000 - 4096`, writes 2 at the slot's first host
//!   word, waits 100 ms, writes 1 and moves it back. The guest may see 1 or MMIO while the slot
//!   moves, 1 or 0 while it is moved, and 1 at the end, never 2 (a stale translation).
//! - DELETE: the host deletes slot 10 (the guest must see MMIO), re-creates it on fresh zeroed
//!   memory (0), deletes it again (MMIO), then deletes slot 0. KVM then ends the run with
//!   `KVM_EXIT_SHUTDOWN` or `KVM_EXIT_INTERNAL_ERROR` with RIP in the final spin loop; here the
//!   code fetch turns into MMIO, which the machine reports as an internal error (emulating an
//!   instruction fetch from MMIO), and the guest must have been in its final loop.
//!
//! The C test waits up to 2 s for each sync and sleeps 100 ms after it; so does this one. All
//! of it lies below 4 GiB, so on the shadow MMU the guest runs without paging (`vcpu.rs`).

use super::vcpu::{Reached, SelftestVcpu, PHYS_BITS};
use super::{setup, MmuChoice, Result, SelftestError, SYNC_TIMEOUT};
use crate::host::{HostConfig, SimHost};
use crate::hw_vcpu::HwVcpu;
use crate::ram::Width;
use crate::real::RealMmu;
use crate::seam::{AccessKind, GuestMmu, SlotRequest};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use vmmu_selftest::set_memory_region::{
    Outcome, DEFAULT_LOOPS, MEM_REGION_GPA, MEM_REGION_SIZE, MEM_REGION_SLOT, MMIO_VAL,
};
/// The guest's code page (slot 0).
const CODE_GPA: u64 = 0;

/// How the guest's run ended early: its code page became MMIO (an internal error), in its
/// final spin loop or before.
#[derive(Debug)]
enum GuestEnd {
    /// KVM_EXIT_INTERNAL_ERROR (emulating an instruction fetch from MMIO).
    InternalError {
        /// Whether the guest was in its final spin loop.
        final_loop: bool,
    },
}

/// The VM of one loop: host, MMU, the region's and the code's buffers.
struct Vm {
    host: Arc<SimHost>,
    mmu: RealMmu,
    region_hva: u64,
}

fn vm(m: &MmuChoice) -> Result<Vm> {
    let host = Arc::new(
        SimHost::new(HostConfig { max_frames: 1 << 14, ..HostConfig::new(PHYS_BITS) })
            .map_err(setup)?,
    );
    let code = host.add_buffer("code", 4096).map_err(setup)?;
    let region = host.add_buffer("region-0", MEM_REGION_SIZE).map_err(setup)?;
    let mmu = m.mmu(&host, 1)?;
    for r in [
        SlotRequest {
            slot: 0,
            flags: 0,
            guest_phys_addr: CODE_GPA,
            memory_size: 4096,
            userspace_addr: code.hva().raw(),
        },
        region_request(MEM_REGION_GPA, region.hva().raw()),
    ] {
        mmu.set_memory_region(&r).map_err(setup)?;
    }
    Ok(Vm { region_hva: region.hva().raw(), host, mmu })
}

fn region_request(gpa: u64, hva: u64) -> SlotRequest {
    SlotRequest {
        slot: MEM_REGION_SLOT,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: MEM_REGION_SIZE,
        userspace_addr: hva,
    }
}

/// The guest's view of where the region's GPA leads: the host address of `0xc0000000` under
/// the current map (published by the host before and after each change; a RAM access must
/// land on it or on the previous one while a change is in flight).
struct Map {
    /// Host address of `0xc0000000` now (0: no slot).
    now: AtomicU64,
    /// Before the last change.
    before: AtomicU64,
    /// The host gave up (its wait timed out): the guest stops spinning.
    host_gone: AtomicBool,
}

/// What a guest stopped by the host reports (the host's error is the verdict then).
const HOST_GONE: &str = "stopped: the host gave up";

impl Map {
    /// Before a change: the guest may see either map until it is done.
    fn set(&self, hva: u64) {
        self.before.store(self.now.load(Ordering::SeqCst), Ordering::SeqCst);
        self.now.store(hva, Ordering::SeqCst);
    }

    /// After the change returned: only the new map. (A guest that read `before` earlier made
    /// its access earlier too, while the change was in flight.)
    fn settle(&self) {
        self.before.store(0, Ordering::SeqCst);
    }
}

/// The guest's spin: read the code page and the region's first u64 until the value differs
/// from `spin`; then sync. `Err(end)` when the code page is gone.
fn spin_on_val(
    hw: &mut SelftestVcpu<'_>,
    map: &Map,
    spin: u64,
    sync: &mpsc::Sender<()>,
    mmio_exits: &AtomicU64,
    final_loop: bool,
) -> std::result::Result<std::result::Result<u64, GuestEnd>, String> {
    loop {
        hw.enter_guest();
        let code = hw.load_store8(CODE_GPA, None);
        if matches!(code, Reached::Mmio) {
            hw.exit_guest();
            return Ok(Err(GuestEnd::InternalError { final_loop }));
        }
        // The translation is judged against the map before or after the change in flight (0:
        // no slot, never a host address); the value checks are the test's own condition.
        let now = map.now.load(Ordering::SeqCst);
        let before = map.before.load(Ordering::SeqCst);
        let mut mmio = |gpa: u64, kind: AccessKind| {
            if kind == AccessKind::Write || gpa != MEM_REGION_GPA {
                return Err(format!("unexpected MMIO exit: {kind:?}, gpa {gpa:#x}"));
            }
            mmio_exits.fetch_add(1, Ordering::Relaxed);
            Ok(MMIO_VAL)
        };
        let val = match hw.access8(MEM_REGION_GPA, None, &[now, before], &mut mmio) {
            Ok(v) => v,
            // The map may have changed between the snapshot above and the access: a host
            // address the map allows now (after the access) is no staleness either.
            Err(e)
                if e.contains("stale translation")
                    && reached(&e).is_some_and(|h| {
                        h == map.now.load(Ordering::SeqCst)
                            || h == map.before.load(Ordering::SeqCst)
                    }) =>
            {
                continue;
            }
            Err(e) if e.contains("stale translation") => {
                // Where does the MMU itself lead now (no TLB)? Tells a stale TLB entry from a
                // stale SPTE.
                let fresh = hw.fresh_translation(MEM_REGION_GPA);
                return Err(format!("{e}; a fresh walk of the MMU's tables now gives {fresh}"));
            }
            Err(e) => return Err(e),
        };
        hw.exit_guest();
        if val != spin {
            let _ = sync.send(());
            return Ok(Ok(val));
        }
        if map.host_gone.load(Ordering::SeqCst) {
            return Err(HOST_GONE.into());
        }
        std::thread::yield_now();
    }
}

/// The host address a "stale translation" error names.
fn reached(e: &str) -> Option<u64> {
    let rest = e.split("reached host address 0x").nth(1)?;
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&hex, 16).ok()
}

fn guest_assert(ok: bool, what: &str, val: u64) -> std::result::Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("guest assertion failed: {what}, val = {val:#x}"))
    }
}

fn wait_for_vcpu(rx: &mpsc::Receiver<()>, what: &str) -> Result<()> {
    rx.recv_timeout(SYNC_TIMEOUT).map_err(|_| {
        SelftestError::Failed(format!("the guest did not sync within 2 s after {what}"))
    })?;
    // The C test's wait for the vCPU thread to re-enter the guest.
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// MOVE, `loops` times (each on a fresh VM, as the C test spawns one per loop).
pub fn test_move(loops: u32, m: &MmuChoice) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut out = Outcome::default();
    for _ in 0..loops {
        out.mmio_exits += move_once(m)?;
        out.loops += 1;
    }
    out.elapsed = t0.elapsed();
    Ok(out)
}

fn move_once(m: &MmuChoice) -> Result<u64> {
    let v = vm(m)?;
    let map = Map {
        now: AtomicU64::new(v.region_hva),
        before: AtomicU64::new(0),
        host_gone: AtomicBool::new(false),
    };
    let mmio_exits = AtomicU64::new(0);
    let (tx, rx) = mpsc::channel();
    let region = v.host.buffer("region-0").ok_or_else(|| setup("region buffer missing"))?;
    std::thread::scope(|s| {
        let guest = s.spawn(|| -> std::result::Result<(), String> {
            let hw = HwVcpu::new(&v.mmu, &v.host, 0, 64);
            let mut hw = SelftestVcpu::new(hw, &v.host, None).map_err(|e| e.to_string())?;
            let _ = tx.send(()); // GUEST_SYNC(0)
            let mut spin = |val| match spin_on_val(&mut hw, &map, val, &tx, &mmio_exits, false)? {
                Ok(v) => Ok(v),
                Err(end) => Err(format!("the guest ended early: {end:?}")),
            };
            let val = spin(0)?;
            guest_assert(val == 1 || val == MMIO_VAL, "val == 1 || val == MMIO_VAL", val)?;
            let val = spin(MMIO_VAL)?;
            guest_assert(val == 1 || val == 0, "val == 1 || val == 0", val)?;
            let val = spin(0)?;
            guest_assert(val == 1 || val == MMIO_VAL, "val == 1 || val == MMIO_VAL", val)?;
            let val = spin(MMIO_VAL)?;
            guest_assert(val == 1, "val == 1", val)
        });
        let host = || -> Result<()> {
            wait_for_vcpu(&rx, "the guest started")?;
            // The misaligned move: 0xc0000000 now leads to the region's second page.
            let moved = region_request(MEM_REGION_GPA - 4096, v.region_hva);
            map.set(v.region_hva + 4096);
            v.mmu.set_memory_region(&moved).map_err(setup)?;
            map.settle();
            region.write(0, Width::W8, 2).map_err(setup)?;
            std::thread::sleep(Duration::from_millis(100));
            region.write(0, Width::W8, 1).map_err(setup)?;
            map.set(v.region_hva);
            v.mmu
                .set_memory_region(&region_request(MEM_REGION_GPA, v.region_hva))
                .map_err(setup)?;
            map.settle();
            wait_for_vcpu(&rx, "the move back")?;
            wait_for_vcpu(&rx, "the move back (deferred sync)")
        };
        let host = host();
        map.host_gone.store(host.is_err(), Ordering::SeqCst);
        let guest = guest.join().unwrap_or_else(|_| Err("the guest thread panicked".into()));
        // The guest's own verdict first: a failed guest assertion also starves the host's wait.
        match guest {
            Err(e) if e != HOST_GONE => return Err(SelftestError::Failed(e)),
            _ => {}
        }
        host
    })?;
    Ok(mmio_exits.load(Ordering::Relaxed))
}

/// DELETE, `loops` times.
pub fn test_delete(loops: u32, m: &MmuChoice) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut out = Outcome::default();
    for i in 0..loops {
        out.mmio_exits += delete_once(m, i)?;
        out.loops += 1;
    }
    out.elapsed = t0.elapsed();
    Ok(out)
}

fn delete_once(m: &MmuChoice, loop_index: u32) -> Result<u64> {
    let v = vm(m)?;
    let map = Map {
        now: AtomicU64::new(v.region_hva),
        before: AtomicU64::new(0),
        host_gone: AtomicBool::new(false),
    };
    let mmio_exits = AtomicU64::new(0);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let guest = s.spawn(|| -> std::result::Result<GuestEnd, String> {
            let hw = HwVcpu::new(&v.mmu, &v.host, 0, 64);
            let mut hw = SelftestVcpu::new(hw, &v.host, None).map_err(|e| e.to_string())?;
            let _ = tx.send(());
            let mut spin = |val, last| spin_on_val(&mut hw, &map, val, &tx, &mmio_exits, last);
            let early = |end: GuestEnd| format!("the guest ended early: {end:?}");
            let val = spin(0, false)?.map_err(early)?;
            guest_assert(val == MMIO_VAL, "val == MMIO_VAL", val)?;
            let val = spin(MMIO_VAL, false)?.map_err(early)?;
            guest_assert(val == 0, "val == 0", val)?;
            let val = spin(0, false)?.map_err(early)?;
            guest_assert(val == MMIO_VAL, "val == MMIO_VAL", val)?;
            // Spin until the code slot is deleted.
            match spin(MMIO_VAL, true)? {
                Ok(val) => {
                    Err(format!("guest assertion failed: left the final loop, val = {val:#x}"))
                }
                Err(end) => Ok(end),
            }
        });
        let host = || -> Result<()> {
            wait_for_vcpu(&rx, "the guest started")?;
            map.set(0);
            v.mmu.set_memory_region(&SlotRequest::delete(MEM_REGION_SLOT)).map_err(setup)?;
            map.settle();
            wait_for_vcpu(&rx, "the delete")?;
            // Fresh anonymous memory: a new zeroed buffer.
            let fresh = v
                .host
                .add_buffer(&format!("region-{}", loop_index + 1), MEM_REGION_SIZE)
                .map_err(setup)?;
            map.set(fresh.hva().raw());
            v.mmu
                .set_memory_region(&region_request(MEM_REGION_GPA, fresh.hva().raw()))
                .map_err(setup)?;
            map.settle();
            wait_for_vcpu(&rx, "the re-create")?;
            map.set(0);
            v.mmu.set_memory_region(&SlotRequest::delete(MEM_REGION_SLOT)).map_err(setup)?;
            map.settle();
            wait_for_vcpu(&rx, "the second delete")?;
            v.mmu.set_memory_region(&SlotRequest::delete(0)).map_err(setup)?;
            Ok(())
        };
        let host = host();
        map.host_gone.store(host.is_err(), Ordering::SeqCst);
        let end = guest.join().unwrap_or_else(|_| Err("the guest thread panicked".into()));
        let end = match end {
            Err(e) if e == HOST_GONE => return host,
            end => end.map_err(SelftestError::Failed)?,
        };
        host?;
        match end {
            GuestEnd::InternalError { final_loop: true } => Ok(()),
            other => Err(SelftestError::Failed(format!(
                "after slot 0 was deleted the run must end in an internal error in the final \
                 spin loop; it ended with {other:?}"
            ))),
        }
    })?;
    Ok(mmio_exits.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_move_and_one_delete_pass() {
        let m = test_move(1, &MmuChoice::default()).expect("move");
        assert_eq!(m.loops, 1);
        let npt = MmuChoice {
            mmu: super::super::SelftestMmu::Tdp(vmmu::spte::FormatKind::Npt),
            ..MmuChoice::default()
        };
        let d = test_delete(1, &npt).expect("delete");
        // Two deletes, each seen as MMIO at least once.
        assert!(d.mmio_exits >= 2, "{d:?}");
    }

    /// The same on the shadow MMU: the guest without paging reaches the region and its code
    /// through a special root of direct shadow pages, whose MMIO SPTEs the moves and deletes
    /// must not leave trusted.
    #[test]
    fn one_move_and_one_delete_pass_on_the_shadow_mmu() {
        let m = test_move(1, &MmuChoice::shadow()).expect("move");
        assert_eq!(m.loops, 1);
        let d = test_delete(1, &MmuChoice::shadow()).expect("delete");
        assert!(d.mmio_exits >= 2, "{d:?}");
    }
}
