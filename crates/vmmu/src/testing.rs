//! A small host for tests and models of the core: a fixed pool of table frames and an arithmetic
//! host memory (no real guest RAM: the core never dereferences guest memory, it only maps frames).
//!
//! It checks the MMU's lifetime rules: a table frame that is freed is poisoned, and any later
//! lookup of it through [`FrameAllocator::table`] is counted as a use after free
//! ([`TestHost::use_after_free`]), which tests assert to be zero.

use crate::host::{
    FrameAllocator, FrameKind, HostAccess, HostFault, HostMemory, HostPage, TableEntries,
    ENTRIES_PER_TABLE,
};
use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering};
use crate::types::{Hva, Level, Pfn, PAGE_SHIFT};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

/// The first pfn of table frames (RAM frames in tests are below it).
pub const TABLE_PFN_BASE: u64 = 0x10_0000;
/// The first of [`LOW_TABLES`] table frames below 4 GiB, for PAE special roots
/// ([`FrameAllocator::alloc_table_below_4g`]): the last 64 KiB under 4 GiB.
pub const LOW_TABLE_PFN_BASE: u64 = 0x10_0000 - LOW_TABLES as u64;
/// Table frames below 4 GiB, besides the `nr_tables` of [`TestHost::new`].
pub const LOW_TABLES: usize = 16;

/// A poisoned entry: reserved bits in every format, so a walker reading a freed page would stop.
const POISON: u64 = 0x000f_0000_0000_0ff7;

/// One host mapping: `[hva, hva + len)` backed by frames from `pfn` on, in pages of up to `level`.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    hva: u64,
    len: u64,
    pfn: u64,
    level: Level,
    writable: bool,
}

impl Mapping {
    /// The frame behind `hva` (inside the mapping) and the largest level whose naturally
    /// aligned block around `hva` lies in the mapping with frames equally aligned, and meets
    /// none of `front` (the mappings in front of this one, which hide it where they overlap: a
    /// block with one page mapped over is no longer one host page of contiguous frames).
    fn frame_and_level(&self, hva: Hva, front: &[Mapping]) -> (u64, Level) {
        let pfn = self.pfn + ((hva.raw() - self.hva) >> PAGE_SHIFT);
        let hva_pfn = hva.raw() >> PAGE_SHIFT;
        let mut level = self.level;
        while level > Level::L4K {
            let pages = level.pages();
            let block = hva_pfn & !(pages - 1);
            let (lo, hi) = (block << PAGE_SHIFT, (block + pages) << PAGE_SHIFT);
            let block_ok = lo >= self.hva
                && hi <= self.hva + self.len
                && (pfn & (pages - 1)) == (hva_pfn & (pages - 1))
                && !front.iter().any(|m| m.hva < hi && lo < m.hva + m.len);
            if block_ok {
                break;
            }
            level = level.lower().unwrap_or(Level::L4K);
        }
        (pfn, level)
    }

    fn contains(&self, hva: Hva) -> bool {
        hva.raw() >= self.hva && hva.raw() - self.hva < self.len
    }
}

/// The mapping of `hva` (the first in `maps` that contains it) and the mappings in front of it.
fn find_mapping(maps: &[Mapping], hva: Hva) -> Option<(&Mapping, &[Mapping])> {
    let i = maps.iter().position(|m| m.contains(hva))?;
    Some((&maps[i], &maps[..i]))
}

/// The test host.
pub struct TestHost {
    tables: Box<[TableEntries]>,
    live: Box<[AtomicBool]>,
    /// Free slots of the `nr_tables` frames from [`TABLE_PFN_BASE`].
    free: Mutex<Vec<u32>>,
    /// Free slots of the [`LOW_TABLES`] frames from [`LOW_TABLE_PFN_BASE`] (slots `nr_tables..`).
    free_low: Mutex<Vec<u32>>,
    nr_tables: usize,
    mappings: Mutex<Vec<Mapping>>,
    fail_alloc: AtomicBool,
    allocated: AtomicU64,
    freed: AtomicU64,
    use_after_free: AtomicU64,
    kicks: AtomicU64,
    relaxes: AtomicU64,
    /// Guest memory contents (8-byte words by host address; unwritten words read 0).
    words: Mutex<alloc::collections::BTreeMap<u64, u64>>,
    /// Reads of never-written pages are not writable (Linux's zero page), see
    /// [`TestHost::set_zero_page_reads`].
    zero_page_reads: AtomicBool,
    /// Host pages (hva >> 12) written through a write translation.
    written: Mutex<alloc::collections::BTreeSet<u64>>,
    /// [`FrameAllocator::type_stable_tables`]: see [`TestHost::new_type_stable`].
    type_stable: bool,
    /// Words whose next compare-and-swaps lose to a racing writer: (hva, swaps left), see
    /// [`TestHost::race_cmpxchgs`].
    racers: Mutex<Vec<(u64, u32)>>,
    /// Frame ranges `[first, end)` of device memory ([`HostMemory::frame_kind`]), see
    /// [`TestHost::set_device_frames`].
    device: Mutex<Vec<(u64, u64)>>,
}

impl TestHost {
    /// A host with `nr_tables` table frames from 4 GiB up (and [`LOW_TABLES`] more below 4 GiB
    /// for PAE special roots) and no host memory mapped.
    pub fn new(nr_tables: usize) -> Self {
        let all = nr_tables + LOW_TABLES;
        let tables: Vec<TableEntries> =
            (0..all).map(|_| core::array::from_fn(|_| AtomicU64::new(POISON))).collect();
        let live: Vec<AtomicBool> = (0..all).map(|_| AtomicBool::new(false)).collect();
        TestHost {
            tables: tables.into_boxed_slice(),
            live: live.into_boxed_slice(),
            free: Mutex::new((0..nr_tables as u32).rev().collect()),
            free_low: Mutex::new((nr_tables as u32..all as u32).rev().collect()),
            nr_tables,
            mappings: Mutex::new(Vec::new()),
            fail_alloc: AtomicBool::new(false),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            use_after_free: AtomicU64::new(0),
            words: Mutex::new(alloc::collections::BTreeMap::new()),
            kicks: AtomicU64::new(0),
            relaxes: AtomicU64::new(0),
            zero_page_reads: AtomicBool::new(false),
            written: Mutex::new(alloc::collections::BTreeSet::new()),
            type_stable: false,
            racers: Mutex::new(Vec::new()),
            device: Mutex::new(Vec::new()),
        }
    }

    /// [`TestHost::new`] that declares its table memory type-stable
    /// ([`FrameAllocator::type_stable_tables`]; true of every test host: the frames are a boxed
    /// slice kept for the host's life, and its stores into them are `Release`). The fast MMIO
    /// path then reads the vCPU's leaf-table cache without a table read section, as with the
    /// software machine's host, and such reads are not checked against freed frames (they may
    /// read one, and discard what they read). The default host keeps the section and the check.
    pub fn new_type_stable(nr_tables: usize) -> Self {
        TestHost { type_stable: true, ..Self::new(nr_tables) }
    }

    /// Frames `[first, first + count)` are device memory ([`HostMemory::frame_kind`] says
    /// [`FrameKind::Device`]; every other frame is RAM).
    pub fn set_device_frames(&self, first: u64, count: u64) {
        self.device.lock().push((first, first + count));
    }

    /// With `on`, a read translation of a page no write translation reached yet is not
    /// writable, as Linux's anonymous memory (the zero page) is to KVM (see
    /// [`HostPage::writable`]). Off (the default): reads of writable mappings are writable.
    pub fn set_zero_page_reads(&self, on: bool) {
        self.zero_page_reads.store(on, Ordering::Relaxed);
    }

    /// Maps host addresses `[hva, hva + len)` to frames from `pfn` on. `level` is the largest page
    /// the host uses there (blocks aligned in both hva and pfn get it).
    pub fn map(&self, hva: u64, len: u64, pfn: u64, level: Level, writable: bool) {
        self.mappings.lock().push(Mapping { hva, len, pfn, level, writable });
    }

    /// Maps `[hva, hva + len)` to frames from `pfn` on in front of every mapping made before
    /// (which it hides where they overlap): the host changing what backs an address range (a
    /// page migrated, a copy-on-write broken), which it does between a host invalidation's
    /// begin and end. A huge block of an older mapping that the new one meets is from then on
    /// mapped with smaller pages (its frames are no longer contiguous), as a host splits a huge
    /// page to remap part of it.
    pub fn map_over(&self, hva: u64, len: u64, pfn: u64, level: Level, writable: bool) {
        self.mappings.lock().insert(0, Mapping { hva, len, pfn, level, writable });
    }

    /// Writes the 8-byte word at `hva` of mapped host memory (a guest or host write, e.g. of a
    /// guest page-table entry). Panics if `hva` is unmapped or unaligned (a test bug).
    pub fn write_u64(&self, hva: u64, value: u64) {
        assert!(hva % 8 == 0 && self.is_mapped(hva), "write of unmapped or unaligned {hva:#x}");
        self.words.lock().insert(hva, value);
    }

    /// The next `n` compare-and-swaps of the word at `hva` ([`crate::host::GuestMemory`]) lose
    /// to another vCPU: each finds the word changed by a write of its bit 9 (flipped; in a gPTE
    /// a bit the hardware ignores) and fails, as a guest rewriting that gPTE in a loop makes an
    /// accessed/dirty update fail.
    pub fn race_cmpxchgs(&self, hva: u64, n: u32) {
        self.racers.lock().push((hva & !7, n));
    }

    fn is_mapped(&self, hva: u64) -> bool {
        self.mappings.lock().iter().any(|m| m.contains(Hva(hva)))
    }

    /// Makes the next table allocations fail (or succeed again).
    pub fn set_fail_alloc(&self, fail: bool) {
        self.fail_alloc.store(fail, Ordering::Relaxed);
    }

    /// Table frames handed out and not freed.
    pub fn tables_in_use(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed) - self.freed.load(Ordering::Relaxed)
    }

    /// Lookups of freed table frames (must stay 0).
    pub fn use_after_free(&self) -> u64 {
        self.use_after_free.load(Ordering::Relaxed)
    }

    /// Turns of the MMU's wait loops spent in this host's wait policy ([`crate::host::Sched`]).
    pub fn relaxes(&self) -> u64 {
        self.relaxes.load(Ordering::Relaxed)
    }

    /// Kicks the MMU sent to vCPUs in guest mode ([`crate::host::Sched`]).
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Relaxed)
    }

    fn index(&self, pfn: Pfn) -> Option<usize> {
        if let Some(i) = pfn.raw().checked_sub(TABLE_PFN_BASE) {
            return (i < self.nr_tables as u64).then_some(i as usize);
        }
        let low = pfn.raw().checked_sub(LOW_TABLE_PFN_BASE)?;
        (low < LOW_TABLES as u64).then_some(self.nr_tables + low as usize)
    }

    fn pfn_of(&self, i: usize) -> Pfn {
        match i.checked_sub(self.nr_tables) {
            Some(low) => Pfn(LOW_TABLE_PFN_BASE + low as u64),
            None => Pfn(TABLE_PFN_BASE + i as u64),
        }
    }

    fn take(&self, free: &Mutex<Vec<u32>>, init: u64) -> Option<Pfn> {
        if self.fail_alloc.load(Ordering::Relaxed) {
            return None;
        }
        let i = free.lock().pop()? as usize;
        for e in self.tables[i].iter() {
            // Release: type-stable table memory (`FrameAllocator`'s `# Safety`).
            e.store(init, Ordering::Release);
        }
        self.live[i].store(true, Ordering::Release);
        self.allocated.fetch_add(1, Ordering::Relaxed);
        Some(self.pfn_of(i))
    }
}

// SAFETY: frames are slots of a boxed slice that lives as long as the host and never moves;
// `alloc_table` pops a slot from the free list (only freed slots are on it) and initialises it;
// `table` returns `None` for numbers outside the slice; a freed slot stays mapped (poisoned), so
// even a use after free reads valid atomics, and is counted. Type-stable whatever
// `type_stable` says: the slice is never given back while the host lives, and the
// initialisation and the poison are `Release` stores. Table memory is never guest memory: this
// host's guest memory is the word map keyed by host address, apart from the table slice, so a
// mapping that names frame numbers of the table pool (tests do) gives the guest no access to a
// table page.
unsafe impl FrameAllocator for TestHost {
    fn type_stable_tables(&self) -> bool {
        self.type_stable
    }

    fn retains_table_memory(&self) -> bool {
        true
    }

    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        self.take(&self.free, init)
    }

    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
        self.take(&self.free_low, init)
    }

    unsafe fn free_table(&self, pfn: Pfn) {
        let Some(i) = self.index(pfn) else {
            debug_assert!(false, "freeing unknown frame {pfn:?}");
            return;
        };
        let was = self.live[i].swap(false, Ordering::AcqRel);
        assert!(was, "double free of table frame {pfn:?}");
        for e in self.tables[i].iter() {
            // Release: as in `alloc_table`.
            e.store(POISON, Ordering::Release);
        }
        self.freed.fetch_add(1, Ordering::Relaxed);
        let free = if i < self.nr_tables { &self.free } else { &self.free_low };
        free.lock().push(i as u32);
    }

    fn table(&self, pfn: Pfn) -> Option<NonNull<TableEntries>> {
        #[cfg(all(feature = "std", not(loom)))]
        slow::pause();
        let i = self.index(pfn)?;
        if !self.live[i].load(Ordering::Acquire) {
            self.use_after_free.fetch_add(1, Ordering::Relaxed);
        }
        Some(NonNull::from(&self.tables[i]))
    }
}

impl crate::host::Sched for TestHost {
    fn kick(&self, _vcpu_index: usize) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
    }

    fn relax(&self) {
        self.relaxes.fetch_add(1, Ordering::Relaxed);
        crate::sync::Relax::relax(&crate::sync::DefaultRelax::default());
    }

    fn preempt_point(&self, point: crate::host::PreemptPoint) {
        #[cfg(all(feature = "std", not(loom)))]
        preempt::run(point);
        #[cfg(not(all(feature = "std", not(loom))))]
        let _ = point;
    }
}

impl crate::host::GuestMemory for TestHost {
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFault> {
        if !self.is_mapped(hva.raw()) {
            return Err(HostFault::Unmapped(hva));
        }
        Ok(self.words.lock().get(&(hva.raw() & !7)).copied().unwrap_or(0))
    }

    fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<bool, HostFault> {
        if !self.is_mapped(hva.raw()) {
            return Err(HostFault::Unmapped(hva));
        }
        let at = hva.raw() & !7;
        let mut words = self.words.lock();
        let w = words.entry(at).or_insert(0);
        let mut racers = self.racers.lock();
        if let Some(r) = racers.iter_mut().find(|r| r.0 == at && r.1 > 0) {
            r.1 -= 1;
            *w ^= 1 << 9;
        }
        drop(racers);
        if *w != old {
            return Ok(false);
        }
        *w = new;
        Ok(true)
    }
}

impl HostMemory for TestHost {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        let maps = self.mappings.lock();
        let (m, front) = find_mapping(&maps, hva).ok_or(HostFault::Unmapped(hva))?;
        let write = access == HostAccess::Write;
        if write && !m.writable {
            return Err(HostFault::Protected(hva));
        }
        let (pfn, level) = m.frame_and_level(hva, front);
        let page = hva.raw() >> PAGE_SHIFT;
        let writable = m.writable
            && (write
                || !self.zero_page_reads.load(Ordering::Relaxed)
                || self.written.lock().contains(&page));
        if write {
            self.written.lock().insert(page);
        }
        Ok(HostPage { pfn: Pfn(pfn), writable, level })
    }

    /// Pages a write translation reached, in a writable mapping (Linux maps no others writable
    /// before a write fault).
    fn mapping_level(&self, hva: Hva) -> Option<Level> {
        let maps = self.mappings.lock();
        let (m, front) = find_mapping(&maps, hva)?;
        Some(m.frame_and_level(hva, front).1)
    }

    fn translate_mapped_writable(&self, hva: Hva) -> Option<Pfn> {
        let maps = self.mappings.lock();
        let (m, _) = find_mapping(&maps, hva)?;
        let written = self.written.lock().contains(&(hva.raw() >> PAGE_SHIFT));
        (m.writable && written).then(|| Pfn(m.pfn + ((hva.raw() - m.hva) >> PAGE_SHIFT)))
    }

    fn frame_kind(&self, pfn: Pfn) -> FrameKind {
        let device = self.device.lock().iter().any(|&(lo, hi)| (lo..hi).contains(&pfn.raw()));
        if device {
            FrameKind::Device
        } else {
            FrameKind::Ram
        }
    }
}

const _: () = assert!(ENTRIES_PER_TABLE == 512);

#[cfg(all(feature = "std", not(loom)))]
pub mod preempt {
    //! Per-thread hooks at the MMU's preemption points ([`crate::host::Sched::preempt_point`]):
    //! a test parks a vCPU thread at a named point (e.g. after its fault decided, before it
    //! installs) and makes other threads act meanwhile, deterministically, without timing.
    use crate::host::PreemptPoint;
    use core::cell::RefCell;
    use std::boxed::Box;

    /// A hook run at every preemption point the calling thread reaches.
    pub type Hook = Box<dyn FnMut(PreemptPoint)>;

    std::thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Sets (or with `None` clears) the calling thread's hook.
    pub fn on_this_thread(hook: Option<Hook>) {
        HOOK.with(|h| *h.borrow_mut() = hook);
    }

    pub(super) fn run(point: PreemptPoint) {
        // Taken out while it runs, so a hook that reaches a point itself does not recurse.
        let hook = HOOK.with(|h| h.borrow_mut().take());
        if let Some(mut f) = hook {
            f(point);
            HOOK.with(|h| {
                let mut slot = h.borrow_mut();
                if slot.is_none() {
                    *slot = Some(f);
                }
            });
        }
    }
}

/// A slow host for race tests: table lookups made by a chosen thread take longer (a cache miss,
/// a preemption), which widens the window between a fault's decision and its installation so a
/// race test hits the interleaving it looks for in a few rounds instead of millions.
#[cfg(all(feature = "std", not(loom)))]
pub mod slow {
    use core::cell::Cell;
    use std::time::Duration;

    std::thread_local! {
        static PAUSE: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    }

    /// Makes every table lookup of the calling thread sleep for `d` (zero: no pause).
    pub fn table_lookups_on_this_thread(d: Duration) {
        PAUSE.with(|p| p.set(d));
    }

    pub(super) fn pause() {
        let d = PAUSE.with(|p| p.get());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A page mapped over part of a 2 MiB host page splits it: every page of that block is then
    /// a 4 KiB host page (the block's frames are no longer contiguous), the remapped one with
    /// its new frame; the next block keeps its 2 MiB page.
    #[test]
    fn a_page_mapped_over_a_huge_block_splits_the_block() {
        const HVA: u64 = 0x4000_0000;
        let h = TestHost::new(1);
        h.map(HVA, 0x40_0000, HVA >> 12, Level::L2M, true);
        let page = |hva: u64| h.translate(Hva(hva), HostAccess::Read).unwrap();
        assert_eq!(page(HVA + 0x3000).level, Level::L2M);
        h.map_over(HVA + 0x5000, 0x1000, 0x7_7000, Level::L4K, true);
        assert_eq!((page(HVA + 0x5000).pfn, page(HVA + 0x5000).level), (Pfn(0x7_7000), Level::L4K));
        assert_eq!(page(HVA + 0x3000).pfn, Pfn((HVA >> 12) + 3));
        assert_eq!(page(HVA + 0x3000).level, Level::L4K, "the split block kept its 2 MiB page");
        assert_eq!(h.mapping_level(Hva(HVA)), Some(Level::L4K));
        assert_eq!(page(HVA + 0x20_3000).level, Level::L2M, "the next block is whole");
    }
}
