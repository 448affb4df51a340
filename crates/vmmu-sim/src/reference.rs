//! Two stand-in MMUs for testing the machine without the real one: [`ReferenceMmu`], a plain
//! slot map under a lock with no caching and a correct remote-TLB-flush protocol, and
//! [`StaleMmu`], which never lets go of a translation it handed out, so the oracle has something
//! to catch.
//!
//! The flush protocol (KVM: `kvm_make_all_cpus_request` with `KVM_REQUEST_WAIT`):
//! - the updater changes the map, then sets every vCPU's `flush` flag, then waits for each vCPU
//!   that is `in_guest` until it has cleared its flag;
//! - a vCPU sets `in_guest` when it enters guest mode and polls its flag between accesses; the
//!   poll clears the flag (the acknowledgement) and tells the machine to flush its TLB before the
//!   next access.
//!
//! Ordering: `in_guest` store / `flush` load on the vCPU side and `flush` store / `in_guest` load on
//! the updater side are all `SeqCst`, the Dekker pattern KVM gets from `smp_mb()` after
//! `vcpu->mode = IN_GUEST_MODE`: either the updater sees the vCPU in guest mode (and waits for it),
//! or the vCPU's first poll after entering sees the request.

use crate::host::SimHost;
use crate::seam::{AccessKind, GuestMmu, MmioCachingState, MmuStats, SlotRequest, Translation};
use crate::slots::SlotTable;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use vmmu::host::{HostAccess, HostMemory};
use vmmu::memslot::MemslotError;
use vmmu::types::{Gpa, Hva, Level};

#[derive(Debug, Default)]
struct VcpuShared {
    in_guest: AtomicBool,
    flush: AtomicBool,
}

/// The reference MMU's per-vCPU state.
#[derive(Debug)]
pub struct RefVcpu {
    shared: Arc<VcpuShared>,
}

/// A correct, uncached MMU: every TLB miss looks the slot map up.
#[derive(Debug)]
pub struct ReferenceMmu {
    host: Arc<SimHost>,
    slots: RwLock<SlotTable>,
    vcpus: Mutex<Vec<Arc<VcpuShared>>>,
    updates: Mutex<()>,
    translations: AtomicU64,
    mmio: AtomicU64,
    flush_requests: AtomicU64,
    generation: AtomicU64,
    /// Host-address ranges under invalidation: translations into them retry.
    invalidating: RwLock<Vec<(u64, u64)>>,
}

impl ReferenceMmu {
    /// An MMU over `host` whose slots must end below `2^phys_bits`.
    pub fn new(host: Arc<SimHost>) -> ReferenceMmu {
        let phys_bits = host.config().phys_bits;
        ReferenceMmu {
            host,
            slots: RwLock::new(SlotTable::new(phys_bits)),
            vcpus: Mutex::new(Vec::new()),
            updates: Mutex::new(()),
            translations: AtomicU64::new(0),
            mmio: AtomicU64::new(0),
            flush_requests: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            invalidating: RwLock::new(Vec::new()),
        }
    }

    fn flush_all_and_wait(&self) {
        let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for v in &vcpus {
            v.flush.store(true, Ordering::SeqCst);
        }
        self.flush_requests.fetch_add(1, Ordering::Relaxed);
        for v in &vcpus {
            while v.in_guest.load(Ordering::SeqCst) && v.flush.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
        }
    }
}

impl GuestMmu for ReferenceMmu {
    type Vcpu = RefVcpu;

    fn create_vcpu(&self, _index: usize) -> RefVcpu {
        let shared = Arc::new(VcpuShared::default());
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner()).push(shared.clone());
        RefVcpu { shared }
    }

    fn set_memory_region(&self, r: &SlotRequest) -> Result<(), MemslotError> {
        let _serial = self.updates.lock().unwrap_or_else(|e| e.into_inner());
        self.slots.write().unwrap_or_else(|e| e.into_inner()).apply(r)?;
        self.generation.fetch_add(2, Ordering::Relaxed);
        self.flush_all_and_wait();
        Ok(())
    }

    fn translate(&self, _vcpu: &mut RefVcpu, gpa: Gpa, access: AccessKind) -> Translation {
        let write = access.is_write();
        self.translations.fetch_add(1, Ordering::Relaxed);
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = slots.lookup(gpa.gfn()) else {
            self.mmio.fetch_add(1, Ordering::Relaxed);
            return Translation::Mmio;
        };
        if write && slot.readonly() {
            self.mmio.fetch_add(1, Ordering::Relaxed);
            return Translation::Mmio;
        }
        let hva = slot.hva(gpa.0);
        let invalidating = self.invalidating.read().unwrap_or_else(|e| e.into_inner());
        if invalidating.iter().any(|(s, e)| (*s..*e).contains(&hva)) {
            return Translation::Retry;
        }
        drop(invalidating);
        let want = if write { HostAccess::Write } else { HostAccess::Read };
        match self.host.translate(Hva(hva), want) {
            Ok(p) => Translation::Ram {
                pfn: p.pfn,
                writable: p.writable && !slot.readonly(),
                level: Level::L4K,
            },
            Err(e) => Translation::Error(e.to_string()),
        }
    }

    fn invalidate_hva_range(&self, start: Hva, end: Hva, during: &mut dyn FnMut()) -> bool {
        {
            let _serial = self.updates.lock().unwrap_or_else(|e| e.into_inner());
            self.invalidating.write().unwrap_or_else(|e| e.into_inner()).push((start.0, end.0));
            // A translation that checked the ranges before the push is used by an access that
            // ends before its vCPU acknowledges this flush.
            self.flush_all_and_wait();
        }
        during();
        let mut ranges = self.invalidating.write().unwrap_or_else(|e| e.into_inner());
        // This call's own range: another thread's may have been pushed after it.
        if let Some(i) = ranges.iter().rposition(|&r| r == (start.0, end.0)) {
            ranges.remove(i);
        }
        true
    }

    fn enter_guest(&self, vcpu: &mut RefVcpu) {
        vcpu.shared.in_guest.store(true, Ordering::SeqCst);
    }

    fn exit_guest(&self, vcpu: &mut RefVcpu) {
        vcpu.shared.in_guest.store(false, Ordering::SeqCst);
    }

    fn poll_tlb_flush(&self, vcpu: &mut RefVcpu) -> bool {
        vcpu.shared.flush.load(Ordering::SeqCst) && vcpu.shared.flush.swap(false, Ordering::SeqCst)
    }

    fn stats(&self) -> MmuStats {
        let mut s = MmuStats {
            tlb_flush_requests: self.flush_requests.load(Ordering::Relaxed),
            generation: self.generation.load(Ordering::Relaxed),
            ..MmuStats::default()
        };
        s.exits.violation = self.translations.load(Ordering::Relaxed);
        s.exits.mmio_slow_path = self.mmio.load(Ordering::Relaxed);
        s
    }

    fn mmio_caching(&self) -> MmioCachingState {
        MmioCachingState { effective: false, reason: "reference MMU: no MMIO caching".into() }
    }
}

/// The stale MMU's per-vCPU state: the reference state plus a cache that is never invalidated.
#[derive(Debug)]
pub struct StaleVcpu {
    inner: RefVcpu,
    cache: HashMap<(u64, AccessKind), Translation>,
}

/// A broken MMU for the oracle's teeth: it remembers every translation (RAM and MMIO) per vCPU
/// forever and never asks the vCPU to flush its TLB, like an MMU that forgot generation checks
/// and remote flushes. It still acknowledges flush requests, so updates do not hang.
#[derive(Debug)]
pub struct StaleMmu(pub ReferenceMmu);

impl GuestMmu for StaleMmu {
    type Vcpu = StaleVcpu;

    fn create_vcpu(&self, index: usize) -> StaleVcpu {
        StaleVcpu { inner: self.0.create_vcpu(index), cache: HashMap::new() }
    }
    fn set_memory_region(&self, r: &SlotRequest) -> Result<(), MemslotError> {
        self.0.set_memory_region(r)
    }
    fn translate(&self, vcpu: &mut StaleVcpu, gpa: Gpa, access: AccessKind) -> Translation {
        let key = (gpa.gfn().0, access);
        if let Some(t) = vcpu.cache.get(&key) {
            return t.clone();
        }
        let t = self.0.translate(&mut vcpu.inner, gpa, access);
        vcpu.cache.insert(key, t.clone());
        t
    }
    fn enter_guest(&self, vcpu: &mut StaleVcpu) {
        self.0.enter_guest(&mut vcpu.inner);
    }
    fn exit_guest(&self, vcpu: &mut StaleVcpu) {
        self.0.exit_guest(&mut vcpu.inner);
    }
    fn poll_tlb_flush(&self, vcpu: &mut StaleVcpu) -> bool {
        let _acknowledged = self.0.poll_tlb_flush(&mut vcpu.inner);
        false
    }
    fn stats(&self) -> MmuStats {
        self.0.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostConfig;
    use crate::seam::Errno;
    use std::time::Duration;
    use AccessKind::{Read, Write};

    fn setup() -> (Arc<SimHost>, ReferenceMmu, u64) {
        let host = Arc::new(SimHost::new(HostConfig::new(40)).expect("host"));
        let b = host.add_buffer("b", 0x4000).expect("b");
        let mmu = ReferenceMmu::new(host.clone());
        (host, mmu, b.hva().0)
    }

    fn req(slot: u32, gpa: u64, hva: u64, flags: u32) -> SlotRequest {
        SlotRequest { slot, flags, guest_phys_addr: gpa, memory_size: 0x4000, userspace_addr: hva }
    }

    #[test]
    fn translates_ram_mmio_and_readonly_writes() {
        let (host, mmu, hva) = setup();
        let mut v = mmu.create_vcpu(0);
        mmu.set_memory_region(&req(1, 0x100_0000, hva, SlotRequest::READONLY)).expect("slot");
        let Translation::Ram { pfn, writable, .. } = mmu.translate(&mut v, Gpa(0x100_1008), Read)
        else {
            panic!("RAM expected");
        };
        assert!(!writable);
        assert_eq!(host.ram_page(pfn).map(|p| p.as_ptr() as u64), Some(hva + 0x1000));
        assert_eq!(mmu.translate(&mut v, Gpa(0x100_1008), Write), Translation::Mmio);
        assert_eq!(mmu.translate(&mut v, Gpa(0x200_0000), Read), Translation::Mmio);
        let overlap = mmu.set_memory_region(&req(2, 0x100_2000, hva, 0));
        assert_eq!(overlap.map_err(Errno::from), Err(Errno::Eexist));
    }

    #[test]
    fn an_update_waits_for_a_vcpu_in_guest_mode_until_it_polls() {
        let (_host, mmu, hva) = setup();
        let mut v = mmu.create_vcpu(0);
        mmu.enter_guest(&mut v);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                mmu.set_memory_region(&req(1, 0x100_0000, hva, 0)).expect("slot");
                done.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(30));
            assert!(
                !done.load(Ordering::SeqCst),
                "the update must wait for the vCPU's acknowledgement"
            );
            while !mmu.poll_tlb_flush(&mut v) {
                std::thread::yield_now();
            }
        });
        assert!(done.load(Ordering::SeqCst));
        // Outside guest mode nobody waits, but the request is still seen on entry.
        mmu.exit_guest(&mut v);
        mmu.set_memory_region(&SlotRequest::delete(1)).expect("delete");
        mmu.enter_guest(&mut v);
        assert!(mmu.poll_tlb_flush(&mut v));
        assert!(!mmu.poll_tlb_flush(&mut v), "one request, one flush");
    }

    #[test]
    fn stale_mmu_keeps_old_translations() {
        let (_host, mmu, hva) = setup();
        let stale = StaleMmu(mmu);
        let mut v = stale.create_vcpu(0);
        assert_eq!(stale.translate(&mut v, Gpa(0x100_0000), Read), Translation::Mmio);
        stale.set_memory_region(&req(1, 0x100_0000, hva, 0)).expect("slot");
        assert!(!stale.poll_tlb_flush(&mut v));
        assert_eq!(stale.translate(&mut v, Gpa(0x100_0000), Read), Translation::Mmio, "stale");
    }
}
