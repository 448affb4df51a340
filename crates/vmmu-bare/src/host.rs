//! The hypervisor's side of the core's `Host` traits, written as a bare-metal hypervisor writes
//! it: no locks from an OS, no threads, no thread-locals. Table pages come from a fixed pool with
//! a lock-free free list (safe to call with interrupts off, allocation-free after construction);
//! a kick is an "IPI" (a per-CPU pending flag that the target CPU's exit path polls, as a real
//! hypervisor's IPI handler would set it); waits spin with the CPU's pause hint.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use vmmu::host::{
    FrameAllocator, GuestMemory, HostAccess, HostFault, HostMemory, HostPage, Sched, TableEntries,
};
use vmmu::{Hva, Level, Pfn};

/// The host frame of the first page of guest RAM (the hypervisor's physical layout).
pub const RAM_BASE_PFN: u64 = 0x1000;
/// The host frame of the first page of the table pool (2 GiB: the pool lies below 4 GiB).
pub const POOL_BASE_PFN: u64 = 0x8_0000;
/// The address guest RAM has in the hypervisor's own address space: the higher half, as a
/// bare-metal hypervisor that maps all of physical memory there would have it. `VmConfig`'s
/// `user_va_limit` must let a memslot name it (the default is Linux's user-space limit).
pub const RAM_HVA: u64 = 0xffff_8880_0000_0000;

/// No free page: the free list's empty head.
const EMPTY: u32 = u32::MAX;

/// The hypervisor's host: a fixed pool of table pages, guest RAM, and per-CPU IPI flags.
pub struct BareHost {
    pool: Box<[TableEntries]>,
    live: Box<[AtomicBool]>,
    /// Free-list links: `next[i]` is the page after `i` (or `EMPTY`).
    next: Box<[AtomicU32]>,
    /// The free list's head: a tag (bits 63:32, bumped by every pop against ABA) and a page.
    head: AtomicU64,
    /// Guest RAM as 8-byte words (the shadow MMU reads and updates guest tables as words).
    ram: Box<[AtomicU64]>,
    /// One "IPI pending" flag per physical CPU (vCPU `i` runs on CPU `i`).
    ipi: Box<[AtomicBool]>,
    kicks: AtomicUsize,
    relaxes: AtomicUsize,
}

impl BareHost {
    /// A host with `pages` table pages, `ram_bytes` of guest RAM (a multiple of 4 KiB) and
    /// `cpus` CPUs. All allocation happens here, before any VM exists.
    pub fn new(pages: usize, ram_bytes: u64, cpus: usize) -> Self {
        // The whole pool lies below 4 GiB, so PAE special roots can come from it too.
        assert!(POOL_BASE_PFN + pages as u64 <= 1 << 20 && ram_bytes % 4096 == 0);
        let pool: Vec<TableEntries> =
            (0..pages).map(|_| core::array::from_fn(|_| AtomicU64::new(0))).collect();
        let next = (0..pages)
            .map(|i| AtomicU32::new(if i + 1 < pages { i as u32 + 1 } else { EMPTY }))
            .collect();
        BareHost {
            pool: pool.into_boxed_slice(),
            live: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            next,
            head: AtomicU64::new(if pages == 0 { EMPTY as u64 } else { 0 }),
            ram: (0..ram_bytes / 8).map(|_| AtomicU64::new(0)).collect(),
            ipi: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
            kicks: AtomicUsize::new(0),
            relaxes: AtomicUsize::new(0),
        }
    }

    /// Table pages handed out and not yet given back.
    pub fn live_tables(&self) -> usize {
        self.live.iter().filter(|l| l.load(Ordering::Acquire)).count()
    }

    /// Kicks sent so far.
    pub fn kicks(&self) -> usize {
        self.kicks.load(Ordering::Relaxed)
    }

    /// Turns of the MMU's wait loops so far.
    pub fn relaxes(&self) -> usize {
        self.relaxes.load(Ordering::Relaxed)
    }

    /// The IPI handler's half: takes CPU `cpu`'s pending IPI.
    pub fn take_ipi(&self, cpu: usize) -> bool {
        self.ipi.get(cpu).is_some_and(|f| f.swap(false, Ordering::AcqRel))
    }

    /// Bytes of guest RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.len() as u64 * 8
    }

    /// The hypervisor writes guest-physical `gpa` (guest RAM starts at gpa 0 in the scenarios:
    /// `gpa` is an offset into RAM), as a loader writes the guest's page tables.
    pub fn write_ram(&self, offset: u64, val: u64) {
        self.ram[(offset / 8) as usize].store(val, Ordering::SeqCst);
    }

    /// Reads guest RAM at `offset`.
    pub fn read_ram(&self, offset: u64) -> u64 {
        self.ram[(offset / 8) as usize].load(Ordering::SeqCst)
    }

    fn word(&self, hva: Hva) -> Result<&AtomicU64, HostFault> {
        let off = hva.raw().checked_sub(RAM_HVA).ok_or(HostFault::Unmapped(hva))?;
        if off % 8 != 0 {
            return Err(HostFault::Unmapped(hva));
        }
        self.ram.get((off / 8) as usize).ok_or(HostFault::Unmapped(hva))
    }

    fn push_free(&self, i: u32) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            self.next[i as usize].store(head as u32, Ordering::Relaxed);
            let new = (head & !0xffff_ffff) | i as u64;
            // Release: the link store above is visible to the pop that takes `i`.
            match self.head.compare_exchange_weak(head, new, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    fn pop_free(&self) -> Option<u32> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let i = head as u32;
            if i == EMPTY {
                return None;
            }
            let next = self.next[i as usize].load(Ordering::Relaxed);
            // The tag changes with every pop, so a head that was popped and pushed back meanwhile
            // (with another `next`) fails the exchange.
            let new = ((head >> 32).wrapping_add(1) << 32) | next as u64;
            match self.head.compare_exchange_weak(head, new, Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => return Some(i),
                Err(h) => head = h,
            }
        }
    }
}

// SAFETY: pool pages live in a boxed slice as long as the host and never move; a page is handed
// out only by a pop of the lock-free free list (the tagged head makes a page leave the list once
// per push, so never twice while live) and every entry is initialised before `alloc_table`
// returns; `table` answers `None` for frames outside the pool or not live. Type-stable: a freed
// page stays in the pool, is reused only as a table page, and the only stores this host makes
// into pages (the initialisation) are `Release`. Table memory is never guest memory: guest RAM is
// a separate buffer, and no translation names a pool frame. Nothing else stores into a live page.
unsafe impl FrameAllocator for BareHost {
    fn type_stable_tables(&self) -> bool {
        true
    }

    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        let i = self.pop_free()? as usize;
        for e in self.pool[i].iter() {
            // Release: type-stable table memory (`FrameAllocator`'s `# Safety`).
            e.store(init, Ordering::Release);
        }
        self.live[i].store(true, Ordering::Release);
        Some(Pfn(POOL_BASE_PFN + i as u64))
    }

    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
        // The whole pool lies below 4 GiB (`Self::new` checks it).
        self.alloc_table(init)
    }

    unsafe fn free_table(&self, pfn: Pfn) {
        let i = (pfn.raw() - POOL_BASE_PFN) as usize;
        let was_live = self.live[i].swap(false, Ordering::AcqRel);
        debug_assert!(was_live, "double free of {pfn:?}");
        self.push_free(i as u32);
    }

    fn table(&self, pfn: Pfn) -> Option<NonNull<TableEntries>> {
        let i = usize::try_from(pfn.raw().checked_sub(POOL_BASE_PFN)?).ok()?;
        let page = self.pool.get(i)?;
        self.live.get(i)?.load(Ordering::Acquire).then(|| NonNull::from(page))
    }
}

impl HostMemory for BareHost {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        let _ = access; // guest RAM is always writable here
        let off = hva.raw().checked_sub(RAM_HVA).ok_or(HostFault::Unmapped(hva))?;
        if off >= self.ram_bytes() {
            return Err(HostFault::Unmapped(hva));
        }
        Ok(HostPage { pfn: Pfn(RAM_BASE_PFN + (off >> 12)), writable: true, level: Level::L4K })
    }

    fn translate_mapped_writable(&self, hva: Hva) -> Option<Pfn> {
        self.translate(hva, HostAccess::Write).ok().map(|p| p.pfn)
    }
}

impl GuestMemory for BareHost {
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFault> {
        Ok(self.word(hva)?.load(Ordering::SeqCst))
    }

    fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<bool, HostFault> {
        Ok(self.word(hva)?.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }
}

impl Sched for BareHost {
    fn kick(&self, vcpu_index: usize) {
        // The IPI: a real hypervisor writes the local APIC's ICR here; the target CPU's guest
        // exits and its handler finds the flag. Must not block, and does not.
        self.kicks.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self.ipi.get(vcpu_index) {
            f.store(true, Ordering::Release);
        }
    }

    fn relax(&self) {
        // No scheduler: spin with the pause hint. (The core's default does the same only in a
        // build without `std`; overriding makes the policy the same in every build.)
        self.relaxes.fetch_add(1, Ordering::Relaxed);
        core::hint::spin_loop();
    }
}
