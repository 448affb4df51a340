//! What the core needs from its host, as small traits: page-table frames and host-virtual to
//! host-frame translation. The software machine implements them with std; a bare-metal
//! hypervisor implements them with its own allocator and page tables; loom models implement them
//! with boxed tables.
//!
//! Contracts:
//! - [`FrameAllocator::table`] is on the lockless hot path: O(1), no lock, no allocation;
//! - a table frame is freed only by the MMU, only after a grace period since it was unlinked, so
//!   no walker (the MMU's own lockless walk, or the hardware walker) can still read it;
//! - [`HostMemory::translate`] may fail: KVM reports that at fault time (`-EFAULT` from
//!   `KVM_RUN`), never by turning the access into MMIO.
//!
//! # Calling context (every trait here)
//! - **Threads.** The MMU calls a host's methods from any thread that drives it: vCPU threads
//!   (faults, [`crate::vcpu::Vcpu::service_requests`], a vCPU's drop), threads calling
//!   [`crate::vm::Vm`] methods, and the thread that drops a VM's last handle (which gives the
//!   VM's table pages back). Several at once, for one VM or for every VM sharing the host.
//! - **Inside the MMU's critical sections.** [`HostMemory::translate`] runs inside the
//!   faulting vCPU's memslot read section; [`HostMemory::translate_mapped_writable`],
//!   [`HostMemory::mapping_level`] and [`FrameAllocator::alloc_table`] run with the MMU lock or
//!   the shadow lock held, and [`Sched::kick`] often does; [`GuestMemory::read_u64`] runs
//!   inside a memslot read section, some calls with the shadow lock held (KVM reads gPTEs
//!   atomically under `mmu_lock` there); [`GuestMemory::cmpxchg_u64`] runs inside a memslot
//!   read section with no lock held (the guest walk's A/D update); [`FrameAllocator::free_table`]
//!   may run with the VMM's lock held.
//! - **No calls back into the VM.** None of these methods may call a method of the VM (or of
//!   its vCPUs, or end an [`crate::vm::HvaInvalidation`]) that takes a lock or waits for other
//!   threads: those locks are not reentrant, and a memslot update or zap waits for the very
//!   read section the callback runs in. Either way the call never returns. The exceptions:
//!   [`crate::vm::Vm::gfn_to_hva`], a read section that never waits; reading a VM's
//!   counters ([`crate::vm::Vm::stats`]), which takes no lock; and, from
//!   [`HostMemory::translate`] and [`GuestMemory::cmpxchg_u64`] only (neither runs under an
//!   MMU lock), a host invalidation ([`crate::vm::Vm::invalidate_hva_range_begin`], then its
//!   end), as Linux breaks copy-on-write inside KVM's `hva_to_pfn` and inside the guest walk's
//!   A/D-bit cmpxchg on user memory: the fault retries, and its next `translate` names the
//!   copy (`tests/embedder_audit.rs` shows both, alone and while a create, delete or move
//!   waits for the fault's read section). A host reaches its VM through
//!   a [`crate::vm::WeakVm`]: a `Vm` held by the host would keep the VM and the host alive.
//! - **Keep them short.** Every memslot update, zap and host invalidation of the VM waits for
//!   the read sections and locks these run in: a `read_u64` that sleeps can hold up every
//!   shadow fault of the VM, and a `translate` that sleeps (a host paging memory in, as
//!   get_user_pages may) holds up the VM's memslot updates for that long, as in KVM. A
//!   `translate` may wait for a thread inside [`crate::vm::Vm::invalidate_hva_range_begin`] (a
//!   host that holds its address-space lock across the begin, as Linux's `mmap_lock`): a begin
//!   waits for the MMU lock, never for a vCPU's memslot read section, even while a memslot
//!   update waits for that section (`tests/notifier_vs_update.rs`).
//! - **Panics** unwind out of the VM or vCPU call that made them, releasing the MMU's locks and
//!   read sections (`tests/embedder_audit.rs` shows a panicking `translate`, `read_u64` and
//!   `alloc_table` leave the VM usable). A shadow zap's owed remote TLB flush and the pages it
//!   prepared are kept in the shadow MMU's state, not on the unwinding call's stack, so the next
//!   commit (any later fault, root load, zap or host invalidation) flushes and frees them
//!   (`tests/embedder_hostile_impls.rs`); the tables a TDP zap unlinked are queued for freeing
//!   as it unwinds, with a TLB flush made pending on every vCPU first
//!   (`tests/host_misbehaviour.rs`). A panic in `free_table` while the thread is already
//!   unwinding (a VM dropped by a panicking thread) aborts the process, as any panic in `Drop`
//!   during unwinding does.

use crate::sync::{AtomicU64, Relax};
use crate::types::{Hva, Level, Pfn};
use core::ptr::NonNull;

/// Entries in one page-table page.
pub const ENTRIES_PER_TABLE: usize = 512;

/// The entries of one page-table page: 512 atomic 64-bit SPTEs.
pub type TableEntries = [AtomicU64; ENTRIES_PER_TABLE];

/// Page-table frames for the MMU's tables.
///
/// # Safety
/// The MMU dereferences the pointers [`Self::table`] returns, from any thread, without locks, so
/// an implementation must guarantee:
/// - `table(pfn)` for a frame handed out by [`Self::alloc_table`] and not yet freed returns a
///   pointer to 512 initialised `AtomicU64`s, properly aligned, that stays valid (not moved, not
///   unmapped, not reused) until `free_table(pfn)` is called for that frame;
/// - `alloc_table` never hands out a frame that is live (allocated and not freed), and fills
///   every entry with `init` before returning;
/// - `table` returns `None` for any other frame number, or (for a freed frame of an
///   implementation that keeps freed table memory, as the test host does) a pointer that is
///   still valid for atomic reads of 512 `AtomicU64`s: never a dangling pointer;
/// - table memory is never guest memory: for a type that is also the VM's [`HostMemory`] (a
///   [`Host`]), no guest access through a frame its translations name (a [`HostPage`]'s frame,
///   or any frame of the block its `level` promises, or a frame of
///   [`HostMemory::translate_mapped_writable`]) reads or writes the memory of a live table page.
///   The MMU maps the frames the host names into the guest and never checks them against its
///   tables; a guest that could write its own SPTEs could make the MMU follow links to frames
///   it never allocated and hand them to `free_table`;
/// - for the same reason, nothing but the MMU stores into a live table page's entries (a
///   type-stable implementation's `Release` initialisation and poisoning, below, are stores
///   into pages that are not live). The entries are safe atomics, so the host's own safe code
///   could write them; a stray store could link one table under two parents, or another VM's
///   table under this one, and the MMU would then free a page another walker still reads.
///
/// The MMU in turn frees a frame only after nothing can reach it (see [`Self::free_table`]).
///
/// An implementation whose [`Self::type_stable_tables`] returns `true` also guarantees:
/// - *type-stable table memory*: every pointer `table` ever returned stays valid for atomic
///   reads of its 512 `AtomicU64`s for as long as the allocator lives, also after `free_table`:
///   a freed frame's memory is kept (reused only as a table page of this allocator, or left as it
///   is), never unmapped, moved or given back to another allocator while the allocator lives
///   (Linux's `SLAB_TYPESAFE_BY_RCU` caches make the same promise);
/// - every store the implementation makes into a table page's entries (the initialisation in
///   `alloc_table`, poisoning a freed page) is a `Release` store (or a read-modify-write at
///   least `Release`), so that a reader that sees such a store also sees the MMU's table-epoch
///   bump that preceded the free (the MMU's own stores into tables are all `Release` or
///   stronger).
///
/// The MMU then answers the fast MMIO path's leaf-table cache hits without a table read section
/// (the `mmu_core` walk module: a sequence check of the table epoch around the read instead).
///
/// An implementation whose [`Self::retains_table_memory`] returns `true` guarantees the first
/// of these two only: every pointer `table` ever returned stays valid for atomic reads of its
/// 512 `AtomicU64`s for as long as the allocator lives, also after `free_table`.
pub unsafe trait FrameAllocator: Send + Sync {
    /// Whether this allocator's table memory is type-stable (see the trait's `# Safety`). The
    /// default, `false`, promises nothing beyond the pointer's validity until `free_table`. Read
    /// on the fast MMIO path: return a constant, or a field that never changes.
    #[inline(always)]
    fn type_stable_tables(&self) -> bool {
        false
    }

    /// Whether table memory stays readable after `free_table` for the allocator's life (see the
    /// trait's `# Safety`). Asked once, when a VM is built: only a test build that re-injects
    /// [`crate::bugs::Bug::LeafCacheIgnoresEpoch`] needs it, and such a VM is refused on a host
    /// that answers `false`. The default is [`Self::type_stable_tables`], which promises more.
    fn retains_table_memory(&self) -> bool {
        self.type_stable_tables()
    }

    /// A new table page with every entry set to `init` (the format's non-present value), or
    /// `None` when the host is out of frames (the fault then fails with an out-of-memory error).
    ///
    /// The frame should lie below 2^`phys_bits` of every VM this allocator serves: an SPTE holds
    /// bits `12..phys_bits` of a table's address. The MMU checks each frame it gets, and gives
    /// one beyond them back at once (a plain `free_table`) and fails that allocation as
    /// out-of-memory, counted in the VM's `tables_refused` stat; it never links it. So a
    /// frame out of range costs an allocation, never soundness.
    fn alloc_table(&self, init: u64) -> Option<Pfn>;

    /// A new table page below 4 GiB (pfn below 2^20), as [`Self::alloc_table`] otherwise. The
    /// shadow MMU's special root for a PAE guest or a guest without paging needs one: in PAE
    /// paging CR3 holds a 32-bit address (KVM allocates `pae_root` with `__GFP_DMA32`). The
    /// default takes a page from `alloc_table` and gives it back if it lies higher, so a host
    /// whose table frames can lie above 4 GiB should override it, or such guests fail to load
    /// their root ([`crate::mmu_core::MmuError::NoTableBelow4G`] from the shadow vCPU's first
    /// root load: a vCPU starts with paging off). The MMU checks this frame too, as it checks
    /// `alloc_table`'s, and refuses one at or above 4 GiB.
    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
        let pfn = self.alloc_table(init)?;
        if pfn.raw() < 1 << 20 {
            return Some(pfn);
        }
        // SAFETY: `pfn` came from `alloc_table` just now and was never published: no other
        // thread can reach it.
        unsafe { self.free_table(pfn) };
        None
    }

    /// Returns a table page to the host.
    ///
    /// # Safety
    /// `pfn` came from [`Self::alloc_table`] of this allocator, has not been freed since, and no
    /// thread can reach it any more: it was unlinked and a grace period has passed since.
    unsafe fn free_table(&self, pfn: Pfn);

    /// The entries of a live table page, or `None` if `pfn` is not a table page of this
    /// allocator. The pointer stays valid until `free_table(pfn)`.
    fn table(&self, pfn: Pfn) -> Option<NonNull<TableEntries>>;
}

/// The host's view of a guest page's backing: the frame and how large a page maps it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HostPage {
    /// The frame backing the translated address. It must fit the VM's `phys_bits` (a fault that
    /// gets one that does not fails with [`crate::fault::FaultError::HostFrameBeyondPhysBits`])
    /// and its memory must not be one of the MMU's own table pages: the MMU would map the guest
    /// onto its own SPTEs. Guest memory and table memory are disjoint, as a VMM's RAM and the
    /// kernel's page-table pages are; [`FrameAllocator`]'s `# Safety` makes this the host's
    /// promise, since soundness depends on it.
    pub pfn: Pfn,
    /// Whether the leaf may be writable (KVM `map_writable`): for a write, the host mapping
    /// allows writes; for a read, the host maps the page writable *already* (KVM's
    /// `hva_to_pfn` maps a read fault writable only if a write-GUP succeeds without faulting, so
    /// a never-written anonymous page, the zero page, is mapped read-only). A writable leaf in a
    /// dirty-logged slot marks its page dirty, so this decides whether a guest read dirties a
    /// page, as in KVM.
    pub writable: bool,
    /// The largest level at which the host maps this address contiguously: the naturally aligned
    /// block of that size around the address is backed by naturally aligned contiguous frames
    /// (KVM: `host_pfn_mapping_level`). A page whose `pfn` is not at the address's place in
    /// such a block breaks this; the MMU then maps that one frame with a 4 KiB leaf. The block
    /// must also be one mapping as to writes: `writable` holds for every page of it (as a
    /// PMD-mapped huge page has one write permission), since a huge leaf made writable for one
    /// page lets the guest write them all (and the recovery of huge leaves after dirty logging
    /// gives the block the rights of its first small leaf). A host whose pages of one block
    /// differ there (a copy-on-write page among writable ones) reports a smaller `level`.
    pub level: Level,
}

/// Why a host-virtual address could not be translated.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum HostFault {
    /// Nothing is mapped at the address (KVM: `-EFAULT` from `KVM_RUN`).
    #[error("host address {0} is not mapped")]
    Unmapped(Hva),
    /// The mapping forbids the access (e.g. a write to a read-only host mapping).
    #[error("host address {0} does not allow this access")]
    Protected(Hva),
}

/// What a host translation is for (KVM `hva_to_pfn`'s `write_fault`, get_user_pages'
/// `FOLL_WRITE`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HostAccess {
    /// A read (or an instruction fetch): a page never written may be given as the zero page or
    /// read-only.
    Read,
    /// A write: the host breaks copy-on-write and gives a writable page, or refuses.
    Write,
}

/// What a host frame is, for the memory type of the EPT leaves that map it (KVM
/// `kvm_is_mmio_pfn`, which `make_spte` passes to `vmx_get_mt_mask`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum FrameKind {
    /// Host RAM: EPT leaves map it write-back with ignore-PAT (the guest's PAT cannot make its
    /// RAM uncached; KVM without non-coherent DMA).
    #[default]
    Ram,
    /// Device memory (a device's BAR passed through to the guest, a frame that is not host
    /// RAM): EPT leaves map it uncacheable without ignore-PAT, so registers are never cached
    /// and the guest's PAT may still ask for write-combining (a framebuffer). NPT and the
    /// shadow MMU's x86 formats carry no memory type: the guest's PAT and the host's MTRRs
    /// decide there.
    Device,
}

/// Host-virtual to host-frame translation (KVM: `hva_to_pfn` / get_user_pages).
pub trait HostMemory: Send + Sync {
    /// Translates `hva` for `access`. For [`HostAccess::Write`] the page must be writable
    /// ([`HostPage::writable`]), or the answer [`HostFault::Protected`]: the MMU takes a
    /// read-only page given for a write as that refusal
    /// ([`crate::fault::FaultError::HostFault`]), since a read-only mapping would make the
    /// write fault again for ever.
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault>;

    /// The frame of `hva` if the host maps it writable *already*, found without faulting
    /// anything in (KVM's prefetch: `get_user_pages_fast_only` with `FOLL_WRITE`): `None` for a
    /// page never touched, one only read (the zero page) or a read-only mapping. The shadow MMU
    /// prefetches neighbour SPTEs only through this; the default finds nothing, so a host that
    /// does not implement it gets no prefetching.
    fn translate_mapped_writable(&self, hva: Hva) -> Option<Pfn> {
        let _ = hva;
        None
    }

    /// The level at which the host maps `hva` now ([`HostPage::level`] as [`Self::translate`]
    /// would give it), found without faulting anything in (KVM `host_pfn_mapping_level`, a walk
    /// of the host's page tables); `None` where nothing is mapped. When dirty logging stops, the
    /// TDP MMU recovers huge mappings only where this says the host maps at least that size;
    /// the default says nothing, so a host that does not implement it keeps 4 KiB mappings
    /// after dirty logging (correct, only slower).
    fn mapping_level(&self, hva: Hva) -> Option<Level> {
        let _ = hva;
        None
    }

    /// What `pfn`, a frame [`Self::translate`] or [`Self::translate_mapped_writable`] named,
    /// is (KVM `kvm_is_mmio_pfn`): asked for every leaf an EPT VM makes from a host frame (other
    /// formats carry no memory type and never ask), so keep it cheap. The default says RAM for every frame: a host that passes device memory
    /// through a memslot must answer [`FrameKind::Device`] for it, or EPT maps the device's
    /// registers write-back.
    fn frame_kind(&self, pfn: Pfn) -> FrameKind {
        let _ = pfn;
        FrameKind::Ram
    }
}

/// Guest memory as the shadow MMU reads and updates it: 8-byte words at host-virtual addresses
/// (KVM `get_user` / `__try_cmpxchg_user` on the memslot's host mapping). Only shadow paging
/// needs it (the guest's page tables live in guest memory); TDP VMs never call it, so the
/// shadow MMU's entry points are available only for hosts that implement it.
pub trait GuestMemory: Send + Sync {
    /// Reads the 8-byte word at `hva` (8-aligned).
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFault>;
    /// Replaces the 8-byte word at `hva` (8-aligned) with `new` if it equals `old`, atomically
    /// with respect to the guest's own accesses: `Ok(true)` replaced, `Ok(false)` it had changed.
    fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<bool, HostFault>;
}

/// The host's scheduler, as the MMU needs it: getting a vCPU out of guest mode (KVM
/// `kvm_vcpu_kick`: an IPI to the CPU running it), and how the MMU's waits wait (grace periods,
/// remote-flush acknowledgements, host invalidations in flight).
///
/// The MMU calls [`Self::kick`] after it made a request to a vCPU that was in guest mode: a remote
/// TLB flush, a free-obsolete-roots request, or a plain kick before it waits for a grace period
/// that the vCPU's guest-mode read section would otherwise hold up forever (a vCPU that never
/// faults never leaves guest mode by itself). The vCPU must then leave guest mode soon (a VM
/// exit) and call [`crate::vcpu::Vcpu::service_requests`] before entering again. A host whose
/// vCPUs poll [`crate::vcpu::Vcpu::requests_pending`] between guest accesses (the software
/// machine) needs to do nothing here: the default does nothing.
pub trait Sched: Send + Sync {
    /// Interrupts the guest-mode period of vCPU `vcpu_index`. Must not block.
    ///
    /// On hardware: an IPI to the CPU that runs the vCPU (a VM exit by external-interrupt
    /// exiting); the handler itself need do nothing. For no request to be missed, the vCPU's CPU
    /// keeps interrupts off from [`crate::vcpu::Vcpu::enter_guest`] to VM entry, so a kick sent
    /// in between stays pending and exits the guest at once (the crate doc, "Using the core
    /// without std", gives the whole entry order).
    fn kick(&self, vcpu_index: usize) {
        let _ = vcpu_index;
    }

    /// One turn of a wait loop: the MMU waits for other threads (vCPUs leaving read sections or
    /// acknowledging a flush). Spin, yield, or park for a while: the host's choice, which it
    /// should make knowing how many runnable threads share its CPUs. The default yields to the OS
    /// scheduler with `std`, and spins with the CPU's pause hint without it.
    ///
    /// With more runnable threads than CPUs, the thread waited for is often the one this waiter
    /// preempted, and a yield alone hands it the CPU for the rest of its time slice (Linux's
    /// EEVDF charges the yielder a slice). A host whose vCPU threads can tell that someone waits
    /// should have them leave guest mode and yield once between accesses, as a KVM vCPU thread
    /// that is scheduled out leaves guest mode (the software machine does: `vmmu-sim`'s
    /// `handoff` module).
    ///
    /// It runs with the MMU's locks held (the memslot and VMM locks, the MMU lock, the shadow
    /// lock): it must not call back into the VM or its vCPUs, whose locks are not reentrant. A
    /// `relax` (or a `kick`) that panics unwinds out of the MMU without leaving a lock claimed,
    /// a host invalidation in flight or a vCPU without a request it was sent.
    fn relax(&self) {
        crate::sync::DefaultRelax::default().relax();
    }

    /// A process-wide memory barrier, if the host has one: it must make every thread that may be
    /// inside an MMU read section (every vCPU thread) execute a full memory barrier before it
    /// returns (Linux: `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, registered once). With it,
    /// the MMU's read sections (every fault's memslot lookup, the fast MMIO path's walk) need no
    /// fence of their own; without it (the default) they use a full fence
    /// ([`crate::srcu::ReaderFences`]). The MMU's memory safety rests on that promise, so the
    /// barrier is a [`crate::srcu::ProcessBarrier`], which only `unsafe` code can make.
    fn process_barrier(&self) -> Option<crate::srcu::ProcessBarrier> {
        None
    }

    /// A point in the MMU where a real CPU could be preempted or take a long interrupt: the MMU
    /// calls it and goes on. The default does nothing (and compiles away). Test hosts and the
    /// software machine use it to widen race windows on purpose (a vCPU's decision made from
    /// one memslot set and installed much later), so that tests and `vmmu run --stress-paths`
    /// reach interleavings that are otherwise rare. It must not take MMU locks or update
    /// memslots on the calling thread (a fault's points are inside a memslot read section; the
    /// wrap point is inside a memslot update).
    #[inline(always)]
    fn preempt_point(&self, point: PreemptPoint) {
        let _ = point;
    }

    /// The SRCU fence kind this host allows.
    fn reader_fences(&self) -> crate::srcu::ReaderFences {
        match self.process_barrier() {
            Some(barrier) => crate::srcu::ReaderFences::Asymmetric(barrier),
            None => crate::srcu::ReaderFences::Full,
        }
    }
}

/// Where [`Sched::preempt_point`] is called.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum PreemptPoint {
    /// A fault's slow path has decided what to install (RAM leaf or MMIO SPTE) from the memslot
    /// set it read, and is about to take the MMU lock, check staleness and install it.
    FaultDecided,
    /// A TDP fault found a lower table where its huge leaf goes, has let go of the shared MMU
    /// lock and is about to take it exclusive to replace the table (another vCPU may map or zap
    /// the block meanwhile).
    TableInTheWay,
    /// A fault's install has run (it may have found nothing to do, or a table in the way) and
    /// the fault still holds the MMU lock it installed under (TDP: shared; shadow: the shadow
    /// lock): other vCPUs' hardware walks already see a leaf it installed, and a collection's
    /// GET, which takes no MMU lock, can run.
    FaultInstalled,
    /// A memslot update's hook found that the MMIO generation wraps with this update and is
    /// about to zap every MMIO SPTE (KVM `kvm_mmu_invalidate_mmio_sptes`). Called on the
    /// updating thread, which holds the VM's update lock and no memslot read section. The new
    /// generation is not visible yet (the hook runs before it is stored; the
    /// `wrap-hook-after-publish` bug runs it after, and a host that delays here widens that
    /// window).
    MmioGenerationWrap,
}

/// [`Sched::relax`] as a [`Relax`] for the MMU's wait loops.
pub(crate) struct HostRelax<'a, S: Sched + ?Sized>(pub(crate) &'a S);

impl<S: Sched + ?Sized> Relax for HostRelax<'_, S> {
    #[inline]
    fn relax(&self) {
        self.0.relax();
    }
}

/// Everything the MMU needs from its host, as one bound.
pub trait Host: FrameAllocator + HostMemory + Sched {}

impl<T: FrameAllocator + HostMemory + Sched> Host for T {}
