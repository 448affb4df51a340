//! Host memory and host frames for the software machine: named, zero-filled, page-aligned buffers
//! standing for the VMM's guest-memory mappings, page-table pages for the MMU, and the frame
//! table that gives every one of them a host frame number (pfn).
//!
//! [`SimHost`] implements the core's [`HostMemory`] (hva -> pfn, what KVM does with
//! get_user_pages), [`FrameAllocator`] (page-table pages) and [`GuestMemory`] (8-byte reads and
//! compare-exchanges of guest RAM, for the shadow MMU's guest page-table walks).
//!
//! Invariants this module owns:
//! - every pfn handed out is below `2^(phys_bits - 12)` and below the configured frame capacity;
//!   pfn 0 is never handed out, so a zeroed SPTE never names a live frame;
//! - a buffer's frames are contiguous; a buffer of 2 MiB or more is 2 MiB aligned both in host
//!   virtual memory and in frame space, so [`HostPage::level`] can report 2 MiB blocks. Except
//!   with [`HostConfig::lazy_frames`]: then each page gets its frame on its first translation
//!   (as Linux backs an anonymous mapping on first touch), frames are not contiguous and every
//!   host page is 4 KiB;
//! - RAM frames and table frames come from the same frame space and never overlap;
//! - a buffer lives as long as the [`SimHost`]: a guest may hold translations to it at any time,
//!   so it is never unmapped while the host exists (the machine's MMU-notifier invalidations,
//!   for `--stress-paths` poison, a selftest's `MADV_DONTNEED` or a zero page's first write,
//!   change what a page holds or whether it maps writable, never its frame or its mapping);
//! - the frame table maps pfn -> host pointer with one atomic word per frame: lookups
//!   ([`SimHost::ram_page`], [`FrameAllocator::table`]) are O(1), take no lock and allocate
//!   nothing once the entry is there. Ordering: a frame's entry is stored with `Release` after
//!   its memory is initialised, and loaded with `Acquire`, so a reader that finds the entry also
//!   sees the initialised memory;
//! - a contiguous buffer reserves its frames when made but writes their entries when one of
//!   them is first looked up, a 2 MiB chunk (the span of one huge host page) at a time, under
//!   the `buffers` read lock: a buffer costs frame-table memory for the chunks the guest uses,
//!   not for its size (a 900 GiB VM's replay wrote 235 million entries, 1.9 GB, up front).
//!   A RAM entry, once written, never changes.

use crate::handoff::Handoff;
use crate::ram::{self, Width};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use serde::Serialize;
use std::alloc::{self, Layout};
use std::sync::{Arc, Mutex, RwLock};
use vmmu::host::{
    FrameAllocator, GuestMemory, HostAccess, HostFault, HostMemory, HostPage, TableEntries,
    ENTRIES_PER_TABLE,
};
use vmmu::types::{Hva, Level, Pfn, PAGE_SIZE};

/// Why [`SimHost::ram_access`] refused an access.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RamAccessError {
    /// The frame is not guest RAM of this host (a table frame, or none).
    #[error("{0:?} is not a RAM frame of this host")]
    NotRam(Pfn),
    /// The access does not lie naturally aligned inside the page.
    #[error("a {width:?} access at byte {offset:#x} of a page is not naturally aligned inside it")]
    Misplaced {
        /// The byte offset asked for.
        offset: u64,
        /// The access width.
        width: Width,
    },
}

/// Bytes in a 2 MiB block.
pub const SIZE_2M: u64 = 2 << 20;
const PAGES_PER_2M: u64 = SIZE_2M / PAGE_SIZE;

/// The most frames a host tracks: 2^28 frames, 1 TiB of RAM and tables (a 2 GiB table at that
/// size). A host's table is as large as its configured capacity, and only the entries of frames
/// looked up (a 2 MiB chunk of RAM frames at a time) or handed out as tables are written, so a
/// host costs what it uses, not what its buffers could hold.
pub const MAX_FRAME_TABLE: u64 = 1 << 28;

/// Frames kept at the bottom of the frame space (from pfn 1) for page tables that must lie below
/// 4 GiB (a shadow vCPU's PAE root, KVM's `__GFP_DMA32` `pae_root`), one per vCPU a host may
/// need, on top of [`HostConfig::max_frames`]: buffers never take them.
pub const LOW_TABLE_FRAMES: u64 = 64;

/// The most frames a host with MAXPHYADDR `phys_bits` can hand out: every pfn is below
/// `2^(phys_bits - 12)`, and the table holds at most [`MAX_FRAME_TABLE`]. `phys_bits` outside
/// 36..=52 (which [`SimHost::new`] refuses) counts as the nearest valid value.
pub fn frame_space(phys_bits: u8) -> u64 {
    MAX_FRAME_TABLE.min(1u64 << (phys_bits.clamp(36, 52) - 12))
}

/// Kind tags in the low bits of a frame-table entry (host pointers are page aligned).
const KIND_RAM: usize = 1;
const KIND_TABLE: usize = 2;
const KIND_MASK: usize = 3;

/// How the host's frame space is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// The host MAXPHYADDR, 36..=52: every pfn is below `2^(phys_bits - 12)`.
    pub phys_bits: u8,
    /// How many frames (RAM and table pages together) the host may hand out at most, besides
    /// the [`LOW_TABLE_FRAMES`] it keeps for tables below 4 GiB. Their sum is the size of the
    /// frame table (one word per frame), capped at `2^(phys_bits - 12)` and at
    /// [`MAX_FRAME_TABLE`]; [`SimHost::config`] reports that size.
    pub max_frames: u64,
    /// How the MMU's SRCU readers order their entry against an updater: a full fence each
    /// (the default), or nothing but a compiler fence, the updater paying a process-wide
    /// `membarrier` instead ([`ReaderFenceKind`]).
    pub reader_fences: ReaderFenceKind,
    /// Model Linux's anonymous memory for reads: a page nobody wrote yet is the shared zero
    /// page, so a read translation of it is not writable (KVM maps such a read fault read-only,
    /// and a read of a page the host or guest wrote before writable, which dirties it in a
    /// dirty-logged slot). Writes through a translation and [`SimHost::host_wrote`] mark pages.
    /// Off: every read translation of a writable buffer is writable.
    pub track_writes: bool,
    /// Give a buffer's pages their frames on first translation, as Linux gives the pages of an
    /// anonymous mapping frames on first touch, instead of a contiguous run when the buffer is
    /// made: buffers then cost frames only for the pages the MMU maps, so their total size is
    /// not bounded by the frame capacity (a scenario's `mem` may be as large as on a real host).
    /// Every host page is 4 KiB then ([`SimHost::set_huge_pages`] has no effect), and a
    /// translation that finds the frame space full fails as unmapped (`-EFAULT`).
    pub lazy_frames: bool,
}

impl HostConfig {
    /// `phys_bits` with the default capacity of 2^20 frames (4 GiB of frames, an 8 MiB table).
    pub fn new(phys_bits: u8) -> HostConfig {
        HostConfig {
            phys_bits,
            max_frames: 1 << 20,
            reader_fences: ReaderFenceKind::Full,
            track_writes: false,
            lazy_frames: false,
        }
    }
}

/// Which side of an SRCU grace period pays for ordering reader entries (`vmmu::srcu::
/// ReaderFences`).
///
/// `Full` is the default because on the VMs this project runs on a `membarrier` IPI costs the
/// updater tens of microseconds and interrupts every vCPU, while the readers' fence sits only
/// on paths that are slow anyway: the fast MMIO paths (per-vCPU cache, type-stable leaf-table
/// cache) open no read section. Measured on this 2-CPU VM (`vmmu run`, and `vmmu bench`): update
/// latency p50 about 20 us with full fences against 55-70 us with `membarrier`; the churn row's
/// kept vCPU throughput 93 % against 48 %; MMIO fast paths and demand faults within noise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReaderFenceKind {
    /// A `SeqCst` fence in every reader entry and in the updater.
    #[default]
    Full,
    /// A compiler fence in readers; the updater calls Linux
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` ([`crate::membarrier`]). Falls back to
    /// `Full` where the kernel lacks it.
    Membarrier,
}

impl ReaderFenceKind {
    /// The name reports use (the JSON value and the `--reader-fences` value).
    pub const fn name(self) -> &'static str {
        match self {
            ReaderFenceKind::Full => "full",
            ReaderFenceKind::Membarrier => "membarrier",
        }
    }
}

/// Why the host refused a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// `phys_bits` outside 36..=52.
    #[error("phys_bits {0} is outside 36..=52 (the x86 MAXPHYADDR range this machine supports)")]
    PhysBits(u8),
    /// A buffer of size 0.
    #[error("buffer {0:?} has size 0; give it at least one byte")]
    ZeroSize(String),
    /// Two buffers with one name.
    #[error("a buffer named {0:?} already exists")]
    DuplicateName(String),
    /// The frame space is full.
    #[error("out of host frames: {needed} more needed, {available} left (raise max_frames or phys_bits)")]
    OutOfFrames {
        /// Frames the request needs.
        needed: u64,
        /// Frames still free.
        available: u64,
    },
    /// The system allocator failed.
    #[error("the host could not allocate {0:#x} bytes")]
    AllocFailed(u64),
    /// A host-side access outside its buffer or misaligned.
    #[error("host access at offset {offset:#x} of {width} bytes is outside buffer {name:?} (size {size:#x}) or misaligned")]
    BadAccess {
        /// The buffer.
        name: String,
        /// Offset of the access.
        offset: u64,
        /// Bytes accessed.
        width: u64,
        /// The buffer's size.
        size: u64,
    },
}

/// One host buffer: zero-filled, page-aligned memory (`crate::anon`) with contiguous frames.
#[derive(Debug)]
pub struct HostBuffer {
    name: String,
    index: usize,
    /// The buffer's first byte, inside `mem`.
    ptr: NonNull<u8>,
    /// The memory holding the buffer, held for its drop (which frees it).
    _mem: crate::anon::AnonMemory,
    len: u64,
    frames: BufferFrames,
    host_writable: AtomicBool,
    /// Pages written since the buffer was made (one bit each), when the host tracks writes
    /// ([`HostConfig::track_writes`]).
    written: Option<Box<[std::sync::atomic::AtomicU64]>>,
}

/// Where a buffer's pages get their frames.
#[derive(Debug)]
enum BufferFrames {
    /// Page `i` has frame `first + i`, all given when the buffer was made.
    Contiguous(Pfn),
    /// Page -> frame, given on the page's first translation ([`HostConfig::lazy_frames`]).
    Lazy(Mutex<std::collections::HashMap<u64, Pfn>>),
}

// SAFETY: the buffer owns its allocation; every access to the bytes goes through atomic
// operations (`ram::load`/`ram::store`), so sharing and sending it across threads is sound.
unsafe impl Send for HostBuffer {}
// SAFETY: as above.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// The buffer's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its position in creation order (0-based), a stable small id.
    pub fn index(&self) -> usize {
        self.index
    }
    /// Its host-virtual address: the real host pointer value.
    pub fn hva(&self) -> Hva {
        Hva(self.ptr.as_ptr() as u64)
    }
    /// Its size in bytes (a whole number of pages).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the buffer is empty (never: sizes are at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The frame of its first page, page `i` having frame `first_pfn + i`; `None` for a buffer
    /// whose pages get frames on first translation ([`HostConfig::lazy_frames`]).
    pub fn first_pfn(&self) -> Option<Pfn> {
        match self.frames {
            BufferFrames::Contiguous(first) => Some(first),
            BufferFrames::Lazy(_) => None,
        }
    }
    /// Whether `hva` lies inside the buffer.
    pub fn contains(&self, hva: Hva) -> bool {
        hva.0.wrapping_sub(self.hva().0) < self.len
    }
    /// Whether the host mapping allows guest writes (an `mprotect` stand-in).
    pub fn host_writable(&self) -> bool {
        self.host_writable.load(Ordering::Relaxed)
    }
    /// Whether page `page` was written (always `true` when the host does not track writes).
    #[inline]
    fn was_written(&self, page: u64) -> bool {
        let Some(w) = &self.written else { return true };
        w.get((page / 64) as usize)
            .is_some_and(|x| x.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
    }

    /// Marks page `page` written (a load first: the word is shared by 64 pages); whether it was
    /// not marked before.
    #[inline]
    fn mark_written(&self, page: u64) -> bool {
        if let Some(x) = self.written.as_ref().and_then(|w| w.get((page / 64) as usize)) {
            let bit = 1 << (page % 64);
            if x.load(Ordering::Relaxed) & bit == 0 {
                return x.fetch_or(bit, Ordering::Relaxed) & bit == 0;
            }
        }
        false
    }

    /// Makes the host mapping writable or read-only for later translations.
    pub fn set_host_writable(&self, writable: bool) {
        self.host_writable.store(writable, Ordering::Relaxed);
    }

    fn check(&self, offset: u64, width: Width) -> Result<*mut u8, HostError> {
        let end = offset.checked_add(width.bytes());
        if end.is_none_or(|e| e > self.len) || !width.is_aligned(offset) {
            return Err(HostError::BadAccess {
                name: self.name.clone(),
                offset,
                width: width.bytes(),
                size: self.len,
            });
        }
        // SAFETY: `offset + width <= len`, so the result stays inside the allocation.
        Ok(unsafe { self.ptr.as_ptr().add(offset as usize) })
    }

    /// The host reads its own buffer (a VMM access, bypassing the guest).
    pub fn read(&self, offset: u64, width: Width) -> Result<u64, HostError> {
        let p = self.check(offset, width)?;
        // SAFETY: `check` proved the access is inside the live allocation and aligned; all
        // accesses to buffers are atomic.
        Ok(unsafe { ram::load(p, width) })
    }

    /// The host writes its own buffer.
    pub fn write(&self, offset: u64, width: Width, value: u64) -> Result<(), HostError> {
        let p = self.check(offset, width)?;
        // SAFETY: as in `read`.
        unsafe { ram::store(p, width, value) };
        Ok(())
    }

    /// Fills every 8-byte word with `f(word offset)`.
    pub fn fill_words(&self, f: impl Fn(u64) -> u64) {
        for off in (0..self.len).step_by(8) {
            // In bounds and aligned by construction of the loop.
            let p = self.ptr.as_ptr().wrapping_add(off as usize);
            // SAFETY: `off + 8 <= len` (len is a multiple of the page size), 8-aligned.
            unsafe { ram::store(p, Width::W8, f(off)) };
        }
    }
}

/// Every buffer, in creation order and by name: adding one costs O(log n) with a name check, so
/// a scenario or trace with many buffers runs in time linear in them (a duplicate-name scan over a
/// list made 100 000 `mem` lines take a minute).
#[derive(Default)]
struct Buffers {
    by_index: Vec<Arc<HostBuffer>>,
    by_name: std::collections::BTreeMap<String, Arc<HostBuffer>>,
}

/// The buffers as `translate` sees them: runs sorted by host address, together every buffer once,
/// with run lengths strictly decreasing (a binary counter: adding a buffer merges equal runs), so
/// a snapshot has O(log n) runs, shared with the snapshots before it.
#[derive(Default)]
struct Snapshot {
    runs: Vec<Arc<[Arc<HostBuffer>]>>,
}

impl Snapshot {
    /// This snapshot with `buf` added.
    fn with(&self, buf: Arc<HostBuffer>) -> Snapshot {
        let mut runs = self.runs.clone();
        let mut add: Vec<Arc<HostBuffer>> = vec![buf];
        while runs.last().is_some_and(|r| r.len() <= add.len()) {
            let Some(last) = runs.pop() else { break };
            let mut merged = Vec::with_capacity(last.len() + add.len());
            let (mut a, mut b) = (last.iter().peekable(), add.iter().peekable());
            while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
                if x.hva() < y.hva() {
                    merged.extend(a.next().cloned());
                } else {
                    merged.extend(b.next().cloned());
                }
            }
            merged.extend(a.cloned());
            merged.extend(b.cloned());
            add = merged;
        }
        runs.push(add.into());
        Snapshot { runs }
    }

    /// The buffer containing `hva` and the offset of `hva` in it.
    fn find(&self, hva: Hva) -> Option<(&Arc<HostBuffer>, u64)> {
        self.runs.iter().find_map(|run| {
            let i = run.partition_point(|b| b.hva() <= hva);
            let b = run.get(i.checked_sub(1)?)?;
            b.contains(hva).then(|| (b, hva.0 - b.hva().0))
        })
    }

    /// Buffer entries in all runs (for the retention test).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.runs.iter().map(|r| r.len()).sum()
    }
}

/// A page-table page's memory, owned by the allocator.
#[derive(Clone, Copy)]
struct TablePage(NonNull<TableEntries>);
// SAFETY: the page is plain atomics; ownership moves between threads only under the allocator's
// mutex.
unsafe impl Send for TablePage {}

const TABLE_LAYOUT: Layout = match Layout::from_size_align(4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!("4 KiB page layout"),
};

struct AllocState {
    /// The next never-used pfn.
    next_pfn: u64,
    /// The next never-used pfn of the frames kept for tables below 4 GiB
    /// ([`LOW_TABLE_FRAMES`], from pfn 1).
    low_next: u64,
    /// Freed table pages (pfn and memory), reused before new frames.
    free_tables: Vec<(Pfn, TablePage)>,
    /// Every table page ever allocated, for `Drop`.
    all_tables: Vec<TablePage>,
}

/// Counters of table-page traffic, for the report and for leak tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TableStats {
    /// `alloc_table` calls that returned a page.
    pub allocated: u64,
    /// `free_table` calls.
    pub freed: u64,
    /// Pages allocated and not freed now.
    pub live: u64,
    /// The largest `live` seen.
    pub high_water: u64,
    /// `alloc_table` calls that found no frame left (the MMU failed the access with its
    /// out-of-memory error, KVM's `-ENOMEM`).
    pub exhausted: u64,
}

/// The software machine's host: buffers, table pages, and the frame table between them.
pub struct SimHost {
    config: HostConfig,
    /// pfn -> host pointer | kind, one word per frame; 0 = no frame.
    frames: Box<[AtomicUsize]>,
    /// Buffers by creation index and by name (`translate` and `locate` use the snapshot).
    buffers: RwLock<Buffers>,
    /// A snapshot of `buffers` for `translate`, which every fault calls: read with one Acquire
    /// load instead of the `RwLock`'s two shared-line RMWs. Replaced on every `add_buffer`; old
    /// snapshots are kept in `retired` until the host drops, so a pointer once loaded stays valid.
    /// A snapshot is a few sorted runs of buffers shared between snapshots ([`Snapshot`]), so
    /// keeping every one costs O(n log n) words for n buffers, not the O(n^2) of whole copies.
    snapshot: AtomicPtr<Snapshot>,
    // Boxed: `snapshot` points at the `Snapshot` itself, which must not move when `retired` grows.
    #[allow(clippy::vec_box)]
    retired: Mutex<Vec<Box<Snapshot>>>,
    alloc: Mutex<AllocState>,
    allocated: AtomicU64,
    freed: AtomicU64,
    /// Table pages allocated and not freed. Its own counter: `allocated - freed` read as two
    /// loads while other threads allocate and free can run below the truth, or wrap.
    live: AtomicU64,
    high_water: AtomicU64,
    /// `alloc_table` calls that found no frame left.
    exhausted: AtomicU64,
    /// A host-address range whose translations are slow (a page being faulted in by the host,
    /// e.g. swapped in): `[slow_start, slow_end)`, `slow_ns` long; 0 ns = none.
    slow_start: AtomicU64,
    slow_end: AtomicU64,
    slow_ns: AtomicU64,
    /// Set when a slow translation starts.
    slow_entered: AtomicBool,
    /// Stress runs: every [`JITTER_EVERY`]th table lookup of a thread yields its CPU (a cache
    /// miss or a preemption in the middle of a walk or an installation), which widens the
    /// windows between an MMU's decision and its table update so races show end to end.
    table_jitter: AtomicBool,
    /// Whether 2 MiB blocks of a buffer count as huge pages (Linux THP on, the default).
    huge_pages: AtomicBool,
    /// Threads waiting in the MMU's wait loops, for vCPUs to give way to ([`crate::handoff`]).
    handoff: Handoff,
}

/// Table lookups of one thread between two jitter yields.
const JITTER_EVERY: u32 = 512;
/// Slow-path fault decisions of one thread between two preemptions (`preempt_jitter`).
const PREEMPT_EVERY: u32 = 4;
/// How long a memslot update sleeps at an MMIO generation wrap before its zap
/// ([`vmmu::host::PreemptPoint::MmioGenerationWrap`]).
const WRAP_PREEMPT_FOR: std::time::Duration = std::time::Duration::from_millis(5);
/// How long a preempted fault sleeps between its decision and its installation.
const PREEMPT_FOR: std::time::Duration = std::time::Duration::from_micros(300);

std::thread_local! {
    static JITTER_COUNT: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    static PREEMPT_COUNT: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

impl core::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimHost").field("config", &self.config).finish_non_exhaustive()
    }
}

impl SimHost {
    /// A host with no buffers.
    pub fn new(config: HostConfig) -> Result<SimHost, HostError> {
        if !(36..=52).contains(&config.phys_bits) {
            return Err(HostError::PhysBits(config.phys_bits));
        }
        // The frames kept for tables below 4 GiB come on top of `max_frames`.
        let capacity = config
            .max_frames
            .saturating_add(LOW_TABLE_FRAMES)
            .min(frame_space(config.phys_bits))
            .max(2 + LOW_TABLE_FRAMES);
        let len = usize::try_from(capacity).map_err(|_| HostError::AllocFailed(capacity))?;
        // `vec![0; n]` allocates zeroed memory, which the system hands out lazily, so a large
        // table costs little until used.
        let zeroed: Box<[usize]> = vec![0usize; len].into_boxed_slice();
        // SAFETY: `AtomicUsize` has the same size, alignment and bit validity as `usize` (its
        // documented guarantee), so the allocation is a valid `[AtomicUsize]` of the same length,
        // and ownership moves from one box to the other.
        let frames: Box<[AtomicUsize]> =
            unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicUsize]) };
        Ok(SimHost {
            config: HostConfig { max_frames: capacity, ..config },
            frames,
            buffers: RwLock::new(Buffers::default()),
            snapshot: AtomicPtr::new(std::ptr::null_mut()),
            retired: Mutex::new(Vec::new()),
            alloc: Mutex::new(AllocState {
                next_pfn: 1 + LOW_TABLE_FRAMES,
                low_next: 1,
                free_tables: Vec::new(),
                all_tables: Vec::new(),
            }),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            live: AtomicU64::new(0),
            high_water: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
            slow_start: AtomicU64::new(0),
            slow_end: AtomicU64::new(0),
            slow_ns: AtomicU64::new(0),
            table_jitter: AtomicBool::new(false),
            huge_pages: AtomicBool::new(true),
            handoff: Handoff::new(),
            slow_entered: AtomicBool::new(false),
        })
    }

    /// The configuration in force (`max_frames` capped to what `phys_bits` allows).
    pub fn config(&self) -> HostConfig {
        self.config
    }

    fn lock_alloc(&self) -> std::sync::MutexGuard<'_, AllocState> {
        // A panic while holding the lock leaves the state consistent (every update is a single
        // push/pop or a bump), so poisoning is ignored.
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a zero-filled buffer of `size` bytes rounded up to whole pages.
    pub fn add_buffer(&self, name: &str, size: u64) -> Result<Arc<HostBuffer>, HostError> {
        if size == 0 {
            return Err(HostError::ZeroSize(name.to_string()));
        }
        let len = size.checked_next_multiple_of(PAGE_SIZE).ok_or(HostError::AllocFailed(size))?;
        let lazy = self.config.lazy_frames;
        let huge = len >= SIZE_2M && !lazy;
        let align = if huge { SIZE_2M } else { PAGE_SIZE };
        let npages = len / PAGE_SIZE;
        let mut buffers = self.buffers.write().unwrap_or_else(|e| e.into_inner());
        if buffers.by_name.contains_key(name) {
            return Err(HostError::DuplicateName(name.to_string()));
        }
        let mut st = self.lock_alloc();
        let first = if huge { st.next_pfn.next_multiple_of(PAGES_PER_2M) } else { st.next_pfn };
        let cap = self.frames.len() as u64;
        if !lazy && first.saturating_add(npages) > cap {
            return Err(HostError::OutOfFrames {
                needed: npages,
                available: cap.saturating_sub(st.next_pfn),
            });
        }
        // Mapped as a VMM maps guest RAM: zero pages on first touch, so a scenario's `mem big
        // size=8G` costs the pages it touches, and placed where KVM's `access_ok` sees a VMM's
        // buffers (`crate::anon`).
        let (mem, ptr) = usize::try_from(len)
            .ok()
            .and_then(|l| crate::anon::AnonMemory::new(l, align as usize))
            .ok_or(HostError::AllocFailed(len))?;
        let frames = if lazy {
            drop(st);
            BufferFrames::Lazy(Mutex::new(std::collections::HashMap::new()))
        } else {
            // The frames are reserved here; their entries are written when first looked up
            // (`ram_page_cold`).
            st.next_pfn = first + npages;
            drop(st);
            BufferFrames::Contiguous(Pfn(first))
        };
        let written = if self.config.track_writes {
            let words =
                usize::try_from(npages.div_ceil(64)).map_err(|_| HostError::AllocFailed(len))?;
            Some(zeroed_atomics(words))
        } else {
            None
        };
        let buf = Arc::new(HostBuffer {
            name: name.to_string(),
            index: buffers.by_index.len(),
            ptr,
            _mem: mem,
            len,
            frames,
            host_writable: AtomicBool::new(true),
            written,
        });
        buffers.by_index.push(buf.clone());
        buffers.by_name.insert(buf.name.clone(), buf.clone());
        // Publish the new snapshot for `translate` (Release: it is complete before the pointer),
        // keeping every snapshot ever published alive until the host drops. Built from the
        // current one under the `buffers` write lock, which serialises adders.
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let mut snap = Box::new(match retired.last() {
            Some(last) => last.with(buf.clone()),
            None => Snapshot::default().with(buf.clone()),
        });
        let ptr: *mut Snapshot = &mut *snap;
        retired.push(snap);
        drop(retired);
        self.snapshot.store(ptr, Ordering::Release);
        Ok(buf)
    }

    /// The host (the VMM) wrote `[hva, hva + len)` itself, as a store through its own mapping:
    /// those pages are no longer the zero page ([`HostConfig::track_writes`]). Returns whether a
    /// page was written for the first time: on Linux that write replaced the zero page by a new
    /// page, and the MMU notifier invalidated whatever mapped the old one (the caller tells the
    /// MMU: `GuestMmu::invalidate_hva_range`).
    pub fn host_wrote(&self, hva: Hva, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let Some((buf, offset)) = self.find(hva) else { return false };
        let last = (offset + len - 1).min(buf.len - 1);
        let mut first = false;
        for page in offset / PAGE_SIZE..=last / PAGE_SIZE {
            first |= buf.mark_written(page);
        }
        first
    }

    /// The buffer named `name`.
    pub fn buffer(&self, name: &str) -> Option<Arc<HostBuffer>> {
        self.buffers.read().unwrap_or_else(|e| e.into_inner()).by_name.get(name).cloned()
    }

    /// Every buffer, in creation order.
    pub fn buffers(&self) -> Vec<Arc<HostBuffer>> {
        self.buffers.read().unwrap_or_else(|e| e.into_inner()).by_index.clone()
    }

    /// The buffer containing `hva` and the offset of `hva` in it.
    pub fn locate(&self, hva: Hva) -> Option<(Arc<HostBuffer>, u64)> {
        self.find(hva).map(|(b, off)| (b.clone(), off))
    }

    /// The buffer containing `hva` and the offset in it, from the published snapshot (no lock:
    /// `translate` calls it on every fault).
    fn find(&self, hva: Hva) -> Option<(&Arc<HostBuffer>, u64)> {
        let ptr = self.snapshot.load(Ordering::Acquire);
        if ptr.is_null() {
            return None;
        }
        // SAFETY: a non-null snapshot points into a box in `retired`, which keeps it unchanged
        // and alive until the host drops, and the host outlives this borrow of it; the Acquire
        // load pairs with the Release store that published it, after it was complete.
        let snapshot: &Snapshot = unsafe { &*ptr };
        snapshot.find(hva)
    }

    /// The host pointer of RAM frame `pfn` (its first byte), or `None` if `pfn` is not a RAM
    /// frame. O(1), lock-free, allocation-free: the page walker calls it on every leaf. The
    /// pointer stays valid as long as the host.
    #[inline]
    pub fn ram_page(&self, pfn: Pfn) -> Option<NonNull<u8>> {
        let e = self.frames.get(usize::try_from(pfn.0).ok()?)?.load(Ordering::Acquire);
        if e & KIND_MASK == KIND_RAM {
            NonNull::new((e & !KIND_MASK) as *mut u8)
        } else if e == 0 {
            self.ram_page_cold(pfn)
        } else {
            None
        }
    }

    /// [`SimHost::ram_page`] for a frame whose entry is not written: if a contiguous buffer
    /// reserved `pfn`, writes the entries of its 2 MiB chunk (all frames a huge host page there
    /// could name) and returns its page; otherwise (a free or freed frame) `None`.
    #[cold]
    fn ram_page_cold(&self, pfn: Pfn) -> Option<NonNull<u8>> {
        let buffers = self.buffers.read().unwrap_or_else(|e| e.into_inner());
        // Contiguous buffers take their frames from a counter that only grows, so in creation
        // order their first frames increase (lazy buffers write their own entries, and a host
        // has buffers of one kind only: `HostConfig::lazy_frames`).
        let i = buffers.by_index.partition_point(|b| b.first_pfn().is_some_and(|f| f <= pfn));
        let buf = buffers.by_index.get(i.checked_sub(1)?)?;
        let first = buf.first_pfn()?;
        let page = pfn.0 - first.0;
        let npages = buf.len / PAGE_SIZE;
        if page >= npages {
            return None;
        }
        let chunk = page - page % PAGES_PER_2M;
        for p in chunk..(chunk + PAGES_PER_2M).min(npages) {
            let at = buf.ptr.as_ptr() as usize + (p * PAGE_SIZE) as usize;
            // Release: publishes the page (zeroed when the buffer was made) to `ram_page`
            // readers; racing writers store the same value.
            self.frames[(first.0 + p) as usize].store(at | KIND_RAM, Ordering::Release);
        }
        NonNull::new((buf.ptr.as_ptr() as usize + (page * PAGE_SIZE) as usize) as *mut u8)
    }

    /// One guest access of `width` bytes at byte `offset` of RAM frame `pfn`: a store of
    /// `store`, or a load. Returns the host address accessed and the value stored or loaded.
    /// The one place the machine touches guest RAM through a frame.
    #[inline]
    pub fn ram_access(
        &self,
        pfn: Pfn,
        offset: u64,
        width: Width,
        store: Option<u64>,
    ) -> Result<(Hva, u64), RamAccessError> {
        if offset >= PAGE_SIZE || !width.is_aligned(offset) {
            return Err(RamAccessError::Misplaced { offset, width });
        }
        let page = self.ram_page(pfn).ok_or(RamAccessError::NotRam(pfn))?;
        let p = page.as_ptr().wrapping_add(offset as usize);
        let value = match store {
            Some(v) => {
                // SAFETY: `page` is a RAM frame of this host, and a buffer's memory lives as
                // long as the host (module invariant), which `&self` borrows; the access is
                // naturally aligned and starts inside the page (checked above), so it and the
                // aligned 8-byte word holding it lie in the page; buffer memory is accessed
                // only atomically (`ram`).
                unsafe { ram::store(p, width, v) };
                v
            }
            // SAFETY: as for the store.
            None => unsafe { ram::load(p, width) },
        };
        Ok((Hva(p as u64), value))
    }

    /// Makes translations of host addresses in `[start, end)` take `delay` (a host page fault
    /// that sleeps, as swap-in does: KVM holds its memslot read lock meanwhile), or turns that off
    /// with `None`. For one thread at a time (the device manager).
    /// Stress runs: makes table lookups yield the CPU now and then (see `table_jitter`).
    pub fn set_table_jitter(&self, on: bool) {
        self.table_jitter.store(on, Ordering::Relaxed);
    }

    /// Turns huge host pages on (the default: a naturally aligned 2 MiB block of a buffer is one
    /// transparent huge page, [`HostPage::level`] 2 MiB) or off (THP disabled: every host page
    /// is 4 KiB, so the MMU maps everything with 4 KiB leaves). Set it before the MMU maps
    /// anything: the level is read at each translation.
    pub fn set_huge_pages(&self, on: bool) {
        self.huge_pages.store(on, Ordering::Relaxed);
    }

    /// Whether 2 MiB blocks of a buffer are huge host pages ([`SimHost::set_huge_pages`]).
    pub fn huge_pages(&self) -> bool {
        self.huge_pages.load(Ordering::Relaxed)
    }

    /// The reader fences in effect: [`HostConfig::reader_fences`], or `Full` where the kernel
    /// has no `membarrier` to offer.
    pub fn reader_fences(&self) -> ReaderFenceKind {
        match vmmu::host::Sched::process_barrier(self) {
            Some(_) => ReaderFenceKind::Membarrier,
            None => ReaderFenceKind::Full,
        }
    }

    /// The threads waiting in the MMU's wait loops (the vCPUs give way to them:
    /// [`crate::HwVcpu::give_way`]).
    #[inline(always)]
    pub fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    /// Slow translations of a host-address range (or none).
    pub fn set_slow_translations(&self, slow: Option<(Hva, Hva, std::time::Duration)>) {
        match slow {
            Some((start, end, delay)) => {
                self.slow_start.store(start.0, Ordering::Relaxed);
                self.slow_end.store(end.0, Ordering::Relaxed);
                self.slow_entered.store(false, Ordering::SeqCst);
                let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX).max(1);
                self.slow_ns.store(ns, Ordering::SeqCst);
            }
            None => self.slow_ns.store(0, Ordering::SeqCst),
        }
    }

    /// Whether a slow translation (see [`SimHost::set_slow_translations`]) has started since
    /// the range was set.
    pub fn slow_translation_entered(&self) -> bool {
        self.slow_entered.load(Ordering::SeqCst)
    }

    /// Table-page counters.
    pub fn table_stats(&self) -> TableStats {
        let allocated = self.allocated.load(Ordering::Relaxed);
        let freed = self.freed.load(Ordering::Relaxed);
        TableStats {
            allocated,
            freed,
            live: self.live.load(Ordering::Relaxed),
            high_water: self.high_water.load(Ordering::Relaxed),
            exhausted: self.exhausted.load(Ordering::Relaxed),
        }
    }
}

impl SimHost {
    /// The level of the host mapping of `hva` (backed by `pfn`) in a buffer of contiguous frames:
    /// 2 MiB if the naturally aligned 2 MiB block around it lies in the buffer and hva and pfn
    /// agree modulo 2 MiB (then the block's frames are the aligned, contiguous run the buffer
    /// owns) and the host uses huge pages; else 4 KiB.
    fn contiguous_level(&self, buf: &HostBuffer, hva: Hva, pfn: Pfn) -> Level {
        let block = hva.0 & !(SIZE_2M - 1);
        let in_buffer = block >= buf.hva().0 && block + SIZE_2M <= buf.hva().0 + buf.len;
        let congruent = (hva.0 / PAGE_SIZE) % PAGES_PER_2M == pfn.0 % PAGES_PER_2M;
        if in_buffer && congruent && self.huge_pages.load(Ordering::Relaxed) {
            Level::L2M
        } else {
            Level::L4K
        }
    }

    /// The frame of page `page` of `buf` (a [`BufferFrames::Lazy`] buffer, whose page -> frame
    /// map is `given`), given now if the page has none yet; `None` when the frame space is full.
    fn lazy_frame(
        &self,
        buf: &HostBuffer,
        given: &Mutex<std::collections::HashMap<u64, Pfn>>,
        page: u64,
    ) -> Option<Pfn> {
        let mut given = given.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&pfn) = given.get(&page) {
            return Some(pfn);
        }
        let mut st = self.lock_alloc();
        if st.next_pfn >= self.frames.len() as u64 {
            return None;
        }
        let pfn = Pfn(st.next_pfn);
        st.next_pfn += 1;
        drop(st);
        let at = buf.ptr.as_ptr() as usize + (page * PAGE_SIZE) as usize;
        // Release: publishes the page to `ram_page` readers (see the module doc).
        self.frames[pfn.0 as usize].store(at | KIND_RAM, Ordering::Release);
        given.insert(page, pfn);
        Some(pfn)
    }
}

/// `n` zeroed atomic words, allocated as zeroed memory (which the system hands out lazily, so a
/// large bitmap costs the pages used).
fn zeroed_atomics(n: usize) -> Box<[AtomicU64]> {
    let zeroed: Box<[u64]> = vec![0u64; n].into_boxed_slice();
    // SAFETY: `AtomicU64` has the same size, alignment and bit validity as `u64` (its documented
    // guarantee), so the allocation is a valid `[AtomicU64]` of the same length, and ownership
    // moves from one box to the other.
    unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU64]) }
}

impl HostMemory for SimHost {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        let write = access == HostAccess::Write;
        let slow = self.slow_ns.load(Ordering::Relaxed);
        if slow != 0
            && (self.slow_start.load(Ordering::Relaxed)..self.slow_end.load(Ordering::Relaxed))
                .contains(&hva.0)
        {
            self.slow_entered.store(true, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_nanos(slow));
        }
        // Like `locate`, but borrowing the buffer instead of cloning its Arc: every fault
        // translates, and a clone and drop are two atomic RMWs on a line all vCPU threads share
        // (`vmmu bench --only faults`, 2 threads).
        let Some((buf, offset)) = self.find(hva) else {
            return Err(HostFault::Unmapped(hva));
        };
        if write && !buf.host_writable() {
            return Err(HostFault::Protected(hva));
        }
        let page = offset / PAGE_SIZE;
        let writable = buf.host_writable() && (write || buf.was_written(page));
        if write {
            // A guest write through KVM breaks the zero page the same way; the MMU replaces its
            // own leaf (a write fault), so nothing else maps the old page.
            let _ = buf.mark_written(page);
        }
        let pfn = match &buf.frames {
            BufferFrames::Contiguous(first) => Pfn(first.0 + page),
            BufferFrames::Lazy(given) => {
                let pfn = self.lazy_frame(buf, given, page).ok_or(HostFault::Unmapped(hva))?;
                return Ok(HostPage { pfn, writable, level: Level::L4K });
            }
        };
        let level = self.contiguous_level(buf, hva, pfn);
        Ok(HostPage { pfn, writable, level })
    }

    fn mapping_level(&self, hva: Hva) -> Option<Level> {
        let (buf, offset) = self.find(hva)?;
        match &buf.frames {
            BufferFrames::Contiguous(first) => {
                Some(self.contiguous_level(buf, hva, Pfn(first.0 + offset / PAGE_SIZE)))
            }
            // Frames given one by one, when first touched: never a huge mapping.
            BufferFrames::Lazy(_) => Some(Level::L4K),
        }
    }

    fn translate_mapped_writable(&self, hva: Hva) -> Option<Pfn> {
        let (buf, offset) = self.find(hva)?;
        let page = offset / PAGE_SIZE;
        // Written pages are the ones the host maps writable (`translate`): a page never
        // written is unmapped or the zero page, which a fast write-GUP does not take.
        if !buf.host_writable() || !buf.was_written(page) {
            return None;
        }
        match &buf.frames {
            BufferFrames::Contiguous(first) => Some(Pfn(first.0 + page)),
            BufferFrames::Lazy(given) => self.lazy_frame(buf, given, page),
        }
    }
}

/// Guest memory for the shadow MMU (guest page tables in RAM buffers): 8-byte words read and
/// compare-exchanged in place, atomically with respect to every other access to the buffer
/// (all of which are atomic, see `ram`). An address outside every buffer is unmapped; a
/// compare-exchange on a buffer the host made read-only is refused (`Protected`), as a
/// `__try_cmpxchg_user` on a read-only mapping faults.
impl GuestMemory for SimHost {
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFault> {
        let (buf, offset) = self.find(hva).ok_or(HostFault::Unmapped(hva))?;
        // The word containing `hva` (the trait's addresses are 8-aligned; align down regardless).
        let p = buf.check(offset & !7, Width::W8).map_err(|_| HostFault::Unmapped(hva))?;
        // SAFETY: `check` proved the word lies inside the live allocation (buffers live as long
        // as the host) and is 8-aligned; every access to buffer memory is atomic.
        Ok(unsafe { ram::load(p, Width::W8) })
    }

    fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<bool, HostFault> {
        let (buf, offset) = self.find(hva).ok_or(HostFault::Unmapped(hva))?;
        if !buf.host_writable() {
            return Err(HostFault::Protected(hva));
        }
        let p = buf.check(offset & !7, Width::W8).map_err(|_| HostFault::Unmapped(hva))?;
        // SAFETY: as in `read_u64`: in bounds, 8-aligned, live for the host's life, and every
        // concurrent access to these bytes is atomic, as `AtomicU64::from_ptr` requires.
        let word = unsafe { AtomicU64::from_ptr(p as *mut u64) };
        // SeqCst: the guest's own locked RMW on its page-table entry (a full barrier on x86).
        Ok(word.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }
}

/// The machine's vCPUs poll their request word between accesses (`GuestMmu::poll_tlb_flush`),
/// which is the kick: nothing to send.
impl vmmu::host::Sched for SimHost {
    /// Stress runs (`table_jitter`): now and then a vCPU is "preempted" for a while between its
    /// fault's decision and its installation, so that memslot updates and other vCPUs' faults
    /// land inside that window (issue 11 defect 1 needs a create and another vCPU's fault there).
    ///
    /// At an MMIO generation wrap the updater is "preempted" for `WRAP_PREEMPT_FOR` (5 ms) before
    /// it zaps, as a loaded host may preempt it (once per 2^19 generations): a correct MMU has
    /// not made the wrapped generation visible yet, and one that has (`wrap-hook-after-publish`)
    /// shows it to the wrap trap's sweep for that long.
    fn preempt_point(&self, point: vmmu::host::PreemptPoint) {
        match point {
            vmmu::host::PreemptPoint::FaultDecided if self.table_jitter.load(Ordering::Relaxed) => {
                preempt_jitter();
            }
            vmmu::host::PreemptPoint::MmioGenerationWrap => std::thread::sleep(WRAP_PREEMPT_FOR),
            _ => {}
        }
    }

    /// A wait turn that tells the vCPUs someone waits, so that the one it waits for, once it
    /// runs and leaves its section, gives the CPU back at its next access ([`crate::handoff`]).
    fn relax(&self) {
        self.handoff.wait_turn();
    }

    fn process_barrier(&self) -> Option<vmmu::srcu::ProcessBarrier> {
        match self.config.reader_fences {
            ReaderFenceKind::Full => None,
            ReaderFenceKind::Membarrier => crate::membarrier::process_barrier(),
        }
    }
}

impl SimHost {
    /// `FrameAllocator::alloc_table` with a frame number below `limit`.
    /// The kept low frames ([`LOW_TABLE_FRAMES`]) serve only a `limit` below the top (a table
    /// below 4 GiB), first.
    fn alloc_table_under(&self, init: u64, limit: u64) -> Option<Pfn> {
        let mut st = self.lock_alloc();
        let low = limit != u64::MAX;
        let low_end = 1 + LOW_TABLE_FRAMES;
        let reused =
            st.free_tables.iter().rposition(|(pfn, _)| (pfn.0 < low_end) == low && pfn.0 < limit);
        let (pfn, page) = match reused {
            Some(i) => st.free_tables.swap_remove(i),
            None => {
                let from_low = low && st.low_next < low_end;
                if !from_low && st.next_pfn >= (self.frames.len() as u64).min(limit) {
                    self.exhausted.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                // SAFETY: the layout has a non-zero size.
                let raw = unsafe { alloc::alloc_zeroed(TABLE_LAYOUT) } as *mut TableEntries;
                let page = TablePage(NonNull::new(raw)?);
                st.all_tables.push(page);
                let counter = if from_low { &mut st.low_next } else { &mut st.next_pfn };
                let pfn = Pfn(*counter);
                *counter += 1;
                (pfn, page)
            }
        };
        drop(st);
        // SAFETY: the page is either fresh (zeroed, 4 KiB, page aligned, so a valid
        // `[AtomicU64; 512]`) or was freed, which by `free_table`'s contract means no thread can
        // reach it; either way this thread has it alone until it is published below.
        let entries = unsafe { page.0.as_ref() };
        for e in entries.iter() {
            // Release: type-stable table memory (`FrameAllocator`'s `# Safety`): a leaf-table
            // cache hit that reads this store also sees the MMU's epoch bump before the free.
            e.store(init, Ordering::Release);
        }
        debug_assert_eq!(entries.len(), ENTRIES_PER_TABLE);
        // Release: the stores of `init` above are visible to whoever finds this entry with the
        // Acquire load in `table`.
        self.frames[pfn.0 as usize].store(page.0.as_ptr() as usize | KIND_TABLE, Ordering::Release);
        self.allocated.fetch_add(1, Ordering::Relaxed);
        // The free of this page comes after this add in the counter's order (it happens after
        // this allocation returned), so `live` never goes below 0.
        let live = self.live.fetch_add(1, Ordering::Relaxed) + 1;
        self.high_water.fetch_max(live, Ordering::Relaxed);
        Some(pfn)
    }
}

// SAFETY: table pages are 4 KiB zeroed allocations kept in `all_tables` for the host's whole
// life (freed pages go to `free_tables` for reuse, never back to the allocator), so a pointer
// from `table` stays valid until the frame is freed and handed out again; `alloc_table_under` takes a
// frame from the free list or a fresh one, initialises every entry before publishing it, and
// `table` answers `None` for any frame not published as a table. Type-stable: a freed page's
// memory stays allocated until the host drops and is reused only as a table page, and the only
// stores this host makes into a table page, `alloc_table`'s initialisation, are `Release`.
// Table memory is never guest memory: guest RAM lives in the host's own buffers, which no table
// page is carved from, and guest accesses reach only those buffers.
unsafe impl FrameAllocator for SimHost {
    #[inline(always)]
    fn type_stable_tables(&self) -> bool {
        true
    }

    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        self.alloc_table_under(init, u64::MAX)
    }

    /// A PAE special root: a freed table frame below 4 GiB, one of the [`LOW_TABLE_FRAMES`]
    /// kept for this at the bottom of the frame space, or a new one while the frame counter is
    /// still below 4 GiB. (Buffers take frames from the counter: without the kept frames, a
    /// host whose buffers filled the first 4 GiB of frames had none to give, and a replay of a
    /// trace with that much RAM below 4 GiB could not run a guest without paging.)
    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
        self.alloc_table_under(init, 1 << 20)
    }

    unsafe fn free_table(&self, pfn: Pfn) {
        let Some(slot) = self.frames.get(pfn.0 as usize) else {
            debug_assert!(false, "free_table of pfn {pfn:?} outside the frame table");
            return;
        };
        let e = slot.swap(0, Ordering::AcqRel);
        debug_assert_eq!(e & KIND_MASK, KIND_TABLE, "free_table of a pfn that is not a live table");
        let Some(p) = NonNull::new((e & !KIND_MASK) as *mut TableEntries) else {
            return;
        };
        if e & KIND_MASK != KIND_TABLE {
            return;
        }
        self.freed.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.lock_alloc().free_tables.push((pfn, TablePage(p)));
    }

    #[inline]
    fn table(&self, pfn: Pfn) -> Option<NonNull<TableEntries>> {
        if self.table_jitter.load(Ordering::Relaxed) {
            jitter();
        }
        let e = self.frames.get(usize::try_from(pfn.0).ok()?)?.load(Ordering::Acquire);
        if e & KIND_MASK == KIND_TABLE {
            NonNull::new((e & !KIND_MASK) as *mut TableEntries)
        } else {
            None
        }
    }
}

/// One fault decision under jitter: every [`PREEMPT_EVERY`]th of this thread sleeps
/// [`PREEMPT_FOR`], about as long as a memslot update's publish-to-return.
#[cold]
fn preempt_jitter() {
    PREEMPT_COUNT.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        if n % PREEMPT_EVERY == 0 {
            std::thread::sleep(PREEMPT_FOR);
        }
    });
}

/// One table lookup under jitter: every `JITTER_EVERY`th lookup of this thread yields.
#[cold]
fn jitter() {
    JITTER_COUNT.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        if n % JITTER_EVERY == 0 {
            std::thread::yield_now();
        }
    });
}

impl Drop for SimHost {
    fn drop(&mut self) {
        let st = self.alloc.get_mut().unwrap_or_else(|e| e.into_inner());
        for p in st.all_tables.drain(..) {
            // SAFETY: every table page came from `alloc_zeroed(TABLE_LAYOUT)` and appears once in
            // `all_tables`; the host is being dropped, so nothing can reach the page any more.
            unsafe { alloc::dealloc(p.0.as_ptr() as *mut u8, TABLE_LAYOUT) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(bits: u8) -> SimHost {
        SimHost::new(HostConfig { max_frames: 1 << 16, ..HostConfig::new(bits) }).expect("host")
    }

    #[test]
    fn rejects_phys_bits_out_of_range() {
        assert_eq!(SimHost::new(HostConfig::new(35)).err(), Some(HostError::PhysBits(35)));
        assert_eq!(SimHost::new(HostConfig::new(53)).err(), Some(HostError::PhysBits(53)));
        assert!(SimHost::new(HostConfig::new(36)).is_ok());
    }

    #[test]
    fn a_buffers_frame_entries_are_written_a_2m_chunk_at_a_time_when_first_looked_up() {
        let h = host(40);
        let small = h.add_buffer("small", 3 * PAGE_SIZE).expect("small");
        let big = h.add_buffer("big", 4 * SIZE_2M + 5 * PAGE_SIZE).expect("big");
        let table = h.alloc_table(0).expect("a table frame");
        let first = big.first_pfn().expect("contiguous").0;
        let written = |pfns: core::ops::Range<u64>| {
            pfns.filter(|&p| h.frames[p as usize].load(Ordering::Relaxed) != 0).count() as u64
        };
        let end = first + big.len() / PAGE_SIZE;
        assert_eq!(written(first..end), 0, "nothing written when made");
        // A page of the third chunk: that chunk's 512 entries, no other.
        let pfn = first + 2 * PAGES_PER_2M + 7;
        let page = h.ram_page(Pfn(pfn)).expect("a reserved frame is RAM");
        assert_eq!(page.as_ptr() as u64, big.hva().0 + (pfn - first) * PAGE_SIZE);
        assert_eq!(written(first..end), PAGES_PER_2M);
        assert_eq!(written(first + 2 * PAGES_PER_2M..first + 3 * PAGES_PER_2M), PAGES_PER_2M);
        // Every frame of the chunk now reads its own page, the way a 2 MiB leaf names them.
        for i in [0, 1, PAGES_PER_2M - 1] {
            let p = h.ram_page(Pfn(first + 2 * PAGES_PER_2M + i)).expect("ram");
            assert_eq!(p.as_ptr() as u64, big.hva().0 + (2 * PAGES_PER_2M + i) * PAGE_SIZE);
        }
        // The short last chunk stops at the buffer's end; past it, and table frames, are not RAM.
        assert!(h.ram_page(Pfn(end - 1)).is_some());
        assert_eq!(written(first + 4 * PAGES_PER_2M..end), 5);
        assert_eq!((h.ram_page(Pfn(end)), h.ram_page(table)), (None, None));
        let s = small.first_pfn().expect("contiguous").0;
        assert_eq!(h.ram_page(Pfn(s + 2)).map(|p| p.as_ptr() as u64), Some(small.hva().0 + 0x2000));
        assert!(s + 3 < first, "the big buffer starts at a 2 MiB frame");
        assert_eq!((h.ram_page(Pfn(s + 3)), h.ram_page(Pfn(0))), (None, None), "between, before");
    }

    #[test]
    fn buffers_are_aligned_zeroed_and_translate_to_contiguous_frames() {
        let h = host(40);
        let small = h.add_buffer("small", 5000).expect("small");
        let big = h.add_buffer("big", 3 * SIZE_2M).expect("big");
        assert_eq!(small.len(), 2 * PAGE_SIZE);
        assert!(small.hva().is_page_aligned());
        assert_eq!(big.hva().0 % SIZE_2M, 0);
        assert_eq!(big.first_pfn().expect("contiguous").0 % PAGES_PER_2M, 0);
        assert_eq!(big.read(0x1234 & !7, Width::W8), Ok(0));
        for (off, want_level) in [(0, Level::L2M), (SIZE_2M + 0x5123, Level::L2M)] {
            let p = h.translate(Hva(big.hva().0 + off), HostAccess::Read).expect("mapped");
            assert_eq!(p.pfn, Pfn(big.first_pfn().expect("contiguous").0 + off / PAGE_SIZE));
            assert_eq!(p.level, want_level);
            let page = h.ram_page(p.pfn).expect("ram frame");
            assert_eq!(page.as_ptr() as u64, (big.hva().0 + off) & !(PAGE_SIZE - 1));
        }
        assert_eq!(h.translate(small.hva(), HostAccess::Write).map(|p| p.level), Ok(Level::L4K));
        let outside = Hva(small.hva().0 + small.len());
        if !big.contains(outside) {
            assert_eq!(h.translate(outside, HostAccess::Read), Err(HostFault::Unmapped(outside)));
        }
        assert_eq!(h.translate(Hva(8), HostAccess::Read), Err(HostFault::Unmapped(Hva(8))));
    }

    #[test]
    fn tracked_reads_are_writable_only_after_a_write() {
        let h = SimHost::new(HostConfig {
            max_frames: 1 << 16,
            track_writes: true,
            ..HostConfig::new(40)
        })
        .expect("host");
        let b = h.add_buffer("b", 4 * PAGE_SIZE).expect("b");
        let at = |page: u64| Hva(b.hva().0 + page * PAGE_SIZE + 8);
        let writable = |page| h.translate(at(page), HostAccess::Read).map(|p| p.writable);
        assert_eq!(writable(0), Ok(false), "a page nobody wrote is the zero page");
        assert_eq!(h.translate(at(0), HostAccess::Write).map(|p| p.writable), Ok(true));
        assert_eq!(writable(0), Ok(true), "written through a write translation");
        assert!(h.host_wrote(at(2), 8), "the first write replaces the zero page");
        assert!(!h.host_wrote(at(2), 8), "later writes do not");
        assert_eq!((writable(1), writable(2), writable(3)), (Ok(false), Ok(true), Ok(false)));
        // Untracked hosts: every read of a writable buffer is writable.
        let u = host(40);
        let d = u.add_buffer("d", PAGE_SIZE).expect("d");
        assert_eq!(u.translate(d.hva(), HostAccess::Read).map(|p| p.writable), Ok(true));
    }

    #[test]
    fn pfns_fit_phys_bits_and_capacity() {
        let h =
            SimHost::new(HostConfig { max_frames: u64::MAX, ..HostConfig::new(36) }).expect("host");
        assert_eq!(h.config().max_frames, 1 << 24);
        let h = host(36);
        let b = h.add_buffer("a", 1 << 20).expect("a");
        assert!(b.first_pfn().expect("contiguous").0 + 256 <= 1 << 16);
        assert!(matches!(h.add_buffer("huge", 1 << 30), Err(HostError::OutOfFrames { .. })));
        assert_eq!(h.add_buffer("a", 4096).err(), Some(HostError::DuplicateName("a".into())));
        assert_eq!(h.add_buffer("z", 0).err(), Some(HostError::ZeroSize("z".into())));
    }

    #[test]
    fn reader_fence_names_are_the_json_values() {
        for k in [ReaderFenceKind::Full, ReaderFenceKind::Membarrier] {
            assert_eq!(serde_json::to_value(k).expect("json"), k.name());
        }
    }

    #[test]
    fn lazy_frames_are_given_on_first_translation_and_kept() {
        let h =
            SimHost::new(HostConfig { max_frames: 8, lazy_frames: true, ..HostConfig::new(36) })
                .expect("host");
        // Far more pages than frames: only translated pages take one.
        let big = h.add_buffer("big", 1 << 34).expect("big");
        let alias = h.add_buffer("small", 4 * SIZE_2M).expect("small");
        assert_eq!(big.first_pfn(), None);
        let at = |b: &HostBuffer, page: u64| Hva(b.hva().0 + page * PAGE_SIZE + 8);
        let last = (1 << 34) / PAGE_SIZE - 1;
        let p = h.translate(at(&big, last), HostAccess::Write).expect("mapped");
        assert_eq!(p.level, Level::L4K, "lazy frames are never a 2 MiB block");
        assert_eq!(h.translate(at(&big, last), HostAccess::Read).map(|q| q.pfn), Ok(p.pfn), "kept");
        let page = h.ram_page(p.pfn).expect("ram frame");
        assert_eq!(page.as_ptr() as u64, big.hva().0 + last * PAGE_SIZE);
        let q = h.translate(at(&alias, 512), HostAccess::Read).expect("mapped");
        assert_ne!(q.pfn, p.pfn);
        assert_eq!(q.level, Level::L4K);
        let t = h.alloc_table(0).expect("table");
        assert!(t != p.pfn && t != q.pfn, "tables and RAM share the frame space");
        // Frames 1..8: three taken, four left; then translations of new pages fail.
        for i in 0..4 {
            assert!(h.translate(at(&big, i), HostAccess::Read).is_ok());
        }
        assert_eq!(
            h.translate(at(&big, 9), HostAccess::Read),
            Err(HostFault::Unmapped(at(&big, 9)))
        );
        assert!(
            h.translate(at(&big, last), HostAccess::Read).is_ok(),
            "a page with a frame keeps it"
        );
    }

    #[test]
    fn many_buffers_translate_and_snapshots_stay_small() {
        let h = host(40);
        let n = 3000usize;
        let bufs: Vec<_> =
            (0..n).map(|i| h.add_buffer(&format!("b{i}"), PAGE_SIZE).expect("buffer")).collect();
        for (i, b) in bufs.iter().enumerate() {
            let (found, off) = h.locate(Hva(b.hva().0 + 8)).expect("found");
            assert_eq!((found.index(), off), (i, 8));
            assert!(h.translate(Hva(b.hva().0 + 0xff8), HostAccess::Read).is_ok());
        }
        // By name and in creation order, and a name taken stays taken.
        assert!(bufs.iter().all(|b| h.buffer(&b.name).is_some_and(|f| Arc::ptr_eq(&f, b))));
        assert!(h.buffers().iter().zip(&bufs).all(|(x, y)| Arc::ptr_eq(x, y)));
        let dup = h.add_buffer("b1234", PAGE_SIZE).err();
        assert_eq!(dup, Some(HostError::DuplicateName("b1234".into())));
        // Every snapshot is kept, but they share their runs: O(n log n) entries in all, where
        // whole copies would hold n (n + 1) / 2.
        let retired = h.retired.lock().expect("lock");
        assert_eq!(retired.len(), n);
        let last = retired.last().expect("snapshot");
        assert_eq!(last.entries(), n);
        assert!(last.runs.len() <= 12, "{} runs", last.runs.len());
        assert!(last.runs.windows(2).all(|w| w[0].len() > w[1].len()));
        let mut seen = std::collections::HashSet::new();
        let held: usize = retired
            .iter()
            .flat_map(|s| s.runs.iter())
            .filter(|r| seen.insert(Arc::as_ptr(r) as *const Arc<HostBuffer> as usize))
            .map(|r| r.len())
            .sum();
        assert!(held <= n * 13, "{held} entries held for {n} buffers");
    }

    #[test]
    fn readonly_host_mapping_refuses_writes() {
        let h = host(40);
        let b = h.add_buffer("ro", 4096).expect("ro");
        b.set_host_writable(false);
        assert_eq!(h.translate(b.hva(), HostAccess::Write), Err(HostFault::Protected(b.hva())));
        assert!(!h.translate(b.hva(), HostAccess::Read).expect("read").writable);
    }

    #[test]
    fn host_accesses_are_bounds_and_alignment_checked() {
        let h = host(40);
        let b = h.add_buffer("b", 4096).expect("b");
        b.write(8, Width::W4, 0xdead_beef).expect("in bounds");
        assert_eq!(b.read(8, Width::W2), Ok(0xbeef));
        assert!(b.read(4096, Width::W1).is_err());
        assert!(b.read(4094, Width::W4).is_err());
        assert!(b.write(3, Width::W2, 0).is_err());
    }

    #[test]
    fn guest_memory_reads_and_compare_exchanges_buffer_words() {
        let h = host(40);
        let b = h.add_buffer("ram", 8192).expect("ram");
        b.write(0x1008, Width::W8, 0x1234).expect("in bounds");
        let at = Hva(b.hva().0 + 0x1008);
        assert_eq!(h.read_u64(at), Ok(0x1234));
        assert_eq!(h.cmpxchg_u64(at, 0x1234, 0x1267), Ok(true));
        assert_eq!(b.read(0x1008, Width::W8), Ok(0x1267));
        assert_eq!(h.cmpxchg_u64(at, 0x1234, 0x9999), Ok(false), "the word had changed");
        assert_eq!(b.read(0x1008, Width::W8), Ok(0x1267));
        let outside = Hva(8);
        assert_eq!(h.read_u64(outside), Err(HostFault::Unmapped(outside)));
        assert_eq!(h.cmpxchg_u64(outside, 0, 1), Err(HostFault::Unmapped(outside)));
        b.set_host_writable(false);
        assert_eq!(h.cmpxchg_u64(at, 0x1267, 0), Err(HostFault::Protected(at)));
        assert_eq!(h.read_u64(at), Ok(0x1267), "reads still work on a read-only mapping");
    }

    #[test]
    fn table_pages_are_initialised_reused_and_counted() {
        let h = host(40);
        let ram = h.add_buffer("ram", 4096).expect("ram");
        let a = h.alloc_table(0x55).expect("a");
        let b = h.alloc_table(0).expect("b");
        assert_ne!(a, b);
        assert_ne!(a, ram.first_pfn().expect("contiguous"));
        assert!(h.ram_page(a).is_none(), "a table frame is not RAM");
        assert!(
            h.table(ram.first_pfn().expect("contiguous")).is_none(),
            "a RAM frame is not a table"
        );
        // SAFETY: `table(a)` is live until freed below; only this thread uses it.
        let ta = unsafe { h.table(a).expect("live").as_ref() };
        assert!(ta.iter().all(|e| e.load(Ordering::Relaxed) == 0x55));
        ta[3].store(7, Ordering::Relaxed);
        // SAFETY: `a` came from `alloc_table`, is freed once, and nothing links to it.
        unsafe { h.free_table(a) };
        assert!(h.table(a).is_none());
        let c = h.alloc_table(0x99).expect("c");
        assert_eq!(c, a, "freed pages are reused");
        // SAFETY: as above.
        let tc = unsafe { h.table(c).expect("live").as_ref() };
        assert_eq!(tc[3].load(Ordering::Relaxed), 0x99, "a reused page is re-initialised");
        let s = h.table_stats();
        assert_eq!((s.allocated, s.freed, s.live, s.high_water), (3, 1, 2, 2));
    }

    #[test]
    fn concurrent_alloc_free_and_lookup_stay_consistent() {
        let h = host(40);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let h = &h;
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..500u64 {
                        let pfn = h.alloc_table(t).expect("frames");
                        // SAFETY: `pfn` is live and owned by this thread until it frees it.
                        let e = unsafe { h.table(pfn).expect("live table").as_ref() };
                        assert_eq!(
                            e[511].load(Ordering::Relaxed),
                            t,
                            "initialised before published"
                        );
                        e[0].store(t << 32 | i, Ordering::Relaxed);
                        mine.push(pfn);
                        if i % 3 == 0 {
                            let p = mine.swap_remove(0);
                            // SAFETY: allocated by this thread, freed once, never linked anywhere.
                            unsafe { h.free_table(p) };
                        }
                    }
                    for p in mine {
                        // SAFETY: as above.
                        unsafe { h.free_table(p) };
                    }
                });
            }
        });
        let s = h.table_stats();
        assert_eq!((s.allocated, s.freed, s.live), (2000, 2000, 0), "no leak");
        assert!(s.high_water <= 2000 && s.high_water >= 300);
    }

    #[test]
    fn table_allocation_fails_when_frames_run_out() {
        let h = SimHost::new(HostConfig { max_frames: 4, ..HostConfig::new(36) }).expect("host");
        let got: Vec<_> = (0..5).filter_map(|_| h.alloc_table(0)).collect();
        assert_eq!(got.len(), 3, "pfn 0 is reserved, so 3 of 4 frames are usable");
    }
}
