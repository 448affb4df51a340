//! Memslots: guest-physical regions mapped to host memory, validated with KVM's rules, looked up
//! by gfn, and updated with KVM's generation protocol (facts §2, §5, §6).
//!
//! - [`region`]: the userspace request, KVM's limits, the request-only checks, [`MemslotError`];
//! - [`slot`]: one [`Memslot`];
//! - [`set`]: a [`MemslotSet`] (lookup by gfn, by id, by gfn range), over its indexes
//!   `gfn_index`, `id_table` and `hva_index`;
//! - [`cache`]: the per-vCPU [`SlotCache`];
//! - `metadata`: dirty bitmaps, the allocation that can fail with `ENOMEM`;
//! - this module: [`Memslots`], the VM-level object: both address spaces, the SRCU domain, the
//!   slots lock, and the update protocol.
//!
//! # Double buffering (KVM `kvm->__memslots[as][2]`)
//! Each address space has two sets; `active` names the published one. An update changes only the
//! inactive set, publishes it, waits for a grace period, and then applies the same change to the
//! set it replaced, so both hold the same slots again. Each change is one edit of each set's
//! indexes (`O(log n)`, plus a bounded block move in the gfn index); nothing copies a whole set.
//!
//! Safety invariant (what `MemslotSet::replace` relies on): when a swap begins, the inactive
//! set has not been published since the `synchronize` of the previous swap of its address space
//! returned (or ever), so no reader holds it. A swap that a hook's panic cut short breaks this
//! (its `synchronize` may not have returned), so it marks the memslots torn and every later
//! update panics instead of editing that set (`tests/memslot_panic_safety.rs`). Readers reach a set only through a
//! [`MemslotsGuard`] (an SRCU read section); the slots lock serialises updaters.
//!
//! # One swap (facts §2.2, `kvm_swap_active_memslots`)
//! ```text
//! G = active.gen;  inactive.gen = G | IN_PROGRESS      (Relaxed: not yet reachable)
//! hooks.publish(|| {                                   (the VM: no host invalidation in flight)
//!   published_gen[as] = G | IN_PROGRESS                (the mirror `generation()` reads;
//!                                                       before the set is reachable)
//!   active := inactive                                 (Release: publishes maps + gen)
//! })
//! srcu.synchronize()                                   (drains readers of the old set)
//! hooks.memslots_updated(as, G + nr_as)                (MMIO-generation wrap check)
//! inactive.gen = G + nr_as                             (Release; pairs with readers' Acquire)
//! published_gen[as] = G + nr_as                        (Release)
//! old active set gets the same edit                    (no reader can reach it now)
//! ```
//! A reader that sees the final generation got the new set: the generation lives in the set,
//! and a reader whose section began before the publication was drained before the final store
//! (`tests/loom_memslot.rs` checks this with the real code).
//!
//! Swaps per request: create 1, flags-only 1, delete 2 (invalid copy + flush, then remove), move
//! 2 (invalid copy + flush, then install at the new place), no-op 0. A move whose preparation
//! fails after the invalid copy was published swaps the old slot back (2 swaps, then the error),
//! as KVM's `kvm_set_memslot` does.

pub mod cache;
mod gfn_index;
mod hva_index;
mod id_table;
mod metadata;
pub mod region;
pub mod set;
pub mod slot;

pub use cache::SlotCache;
use region::Requester;
pub use region::{
    FixedField, InternalMemoryRegion, InternalSlot, MemslotError, UserspaceMemoryRegion,
    KVM_MEMSLOT_INVALID, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY, KVM_MEM_SLOTS_NUM, KVM_USER_MEM_SLOTS, TASK_SIZE_MAX,
};
pub use set::MemslotSet;
use set::SetRoom;
pub use slot::Memslot;

use crate::bugs::{Bug, BugSet};
use crate::dirty::{DirtyBitmap, DirtyLogError, DirtyLogMode};
use crate::heap::TryArc;
use crate::srcu::{ReadGuard, ReaderFences, ReaderId, Srcu, SrcuError};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, DefaultRelax, Mutex, Ordering, Relax};
use crate::types::{AsId, Generation, Gfn, SlotId};
use alloc::boxed::Box;
use alloc::vec::Vec;
use metadata::SlotMetadata;

/// What a successful `set_memory_region` did (KVM `enum kvm_mr_change`, plus no-op).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MemslotChange {
    /// A new slot (1 swap).
    Create,
    /// The slot was removed (2 swaps).
    Delete,
    /// The slot's base gfn changed (2 swaps).
    Move,
    /// Only `LOG_DIRTY_PAGES` changed (1 swap).
    FlagsOnly,
    /// The request matched the slot exactly: nothing happened, no generation change.
    NoOp,
}

/// What the MMU does at the protocol's steps. All calls happen with the slots lock held, outside
/// any read section, so a hook may itself wait for a grace period.
pub trait MemslotHooks {
    /// After the invalid copy of `old` was published (delete/move; that swap is complete,
    /// final generation included): zap everything mapping `old` and flush TLBs
    /// (KVM `kvm_arch_flush_shadow_memslot`).
    fn flush_slot(&self, old: &Memslot);
    /// Between the grace period and the store of the final generation `new_gen` of `as_id`
    /// (KVM `kvm_arch_memslots_updated`: the MMIO-generation wrap check).
    fn memslots_updated(&self, as_id: AsId, new_gen: Generation);
    /// One turn of the update's wait for a grace period (the VM passes its host's
    /// [`crate::host::Sched::relax`]).
    fn relax(&self) {
        DefaultRelax::default().relax();
    }
    /// Runs `publish`, the stores that make a swap's new set reachable (KVM
    /// `rcu_assign_pointer` in `kvm_swap_active_memslots`). The VM runs it where no host
    /// invalidation is in flight, under its `mn_invalidate_lock`, and lets invalidations begin
    /// again right after, before the grace period. An implementation must call `publish` once
    /// before it returns; if it does not, the update publishes right after it returns, since the
    /// rest of the swap edits the set `publish` replaces.
    fn publish(&self, publish: &mut dyn FnMut()) {
        publish();
    }
}

/// A hooks object's wait policy as a [`crate::sync::Relax`].
struct HooksRelax<'a, K: MemslotHooks + ?Sized>(&'a K);

impl<K: MemslotHooks + ?Sized> crate::sync::Relax for HooksRelax<'_, K> {
    fn relax(&self) {
        self.0.relax();
    }
}

/// Hooks that do nothing (no MMU attached).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl MemslotHooks for NoHooks {
    fn flush_slot(&self, _old: &Memslot) {}
    fn memslots_updated(&self, _as_id: AsId, _new_gen: Generation) {}
}

/// A VM's memslot configuration.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemslotsConfig {
    /// Address spaces: 1, or 2 (x86 with SMM: 0 normal, 1 SMM).
    pub nr_address_spaces: u16,
    /// Guest-physical address width the MMU maps: host MAXPHYADDR with TDP, 52 with shadow
    /// paging. The highest gfn is `(1 << (max_gpa_bits - 12)) - 1`. 13..=64.
    pub max_gpa_bits: u8,
    /// `access_ok` limit for `userspace_addr + memory_size` (x86-64: [`TASK_SIZE_MAX`]).
    pub user_va_limit: u64,
    /// SRCU reader records: one per vCPU, at most [`MAX_READERS`] (each is allocated up front).
    pub max_readers: usize,
    /// Historical bugs to re-inject (empty normally).
    pub bugs: BugSet,
    /// First generation counter; address space `i` starts at `generation_base + i`. Must be a
    /// multiple of `nr_address_spaces` so that AS `i` keeps generations `= i mod nr_as`. KVM uses
    /// 0 (before v5.1 it started at `-150` to hit the MMIO-generation wrap early; set e.g.
    /// `(1 << 19) - 4` here for the same purpose).
    pub generation_base: u64,
    /// The most pages all slots together may have (KVM: they must fit an `unsigned long`, so
    /// `u64::MAX` on 64-bit hosts, `u32::MAX` on 32-bit ones).
    pub max_total_pages: u64,
    /// Cap on slot metadata bytes (dirty bitmaps); `None`: only real allocation failure counts.
    pub metadata_limit: Option<u64>,
}

impl Default for MemslotsConfig {
    fn default() -> Self {
        MemslotsConfig {
            nr_address_spaces: 2,
            max_gpa_bits: 52,
            user_va_limit: TASK_SIZE_MAX,
            max_readers: 64,
            bugs: BugSet::NONE,
            generation_base: 0,
            max_total_pages: u64::MAX,
            metadata_limit: None,
        }
    }
}

/// The most SRCU reader records a [`MemslotsConfig`] may ask for: one per vCPU of a VM with
/// [`crate::vm::KVM_MAX_VCPUS`] vCPUs, plus the VM's own three.
pub const MAX_READERS: usize = crate::vm::KVM_MAX_VCPUS + 3;

/// An unusable [`MemslotsConfig`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ConfigError {
    /// `max_readers` is above [`MAX_READERS`]: the records are allocated up front, so a count
    /// near `usize::MAX` could not be.
    #[error(
        "max_readers {0} is above {MAX_READERS}: one reader record per vCPU (at most \
         KVM_MAX_VCPUS) plus the VM's own three"
    )]
    TooManyReaders(usize),
    /// `nr_address_spaces` is not 1 or 2.
    #[error("nr_address_spaces must be 1 or 2, not {0}")]
    AddressSpaces(u16),
    /// `max_gpa_bits` is outside 13..=64.
    #[error("max_gpa_bits must be in 13..=64, not {0}")]
    MaxGpaBits(u8),
    /// `generation_base` is not a multiple of the address-space count, or uses bit 62 or 63.
    #[error("generation_base {base} must be a multiple of {nr} and below 2^62")]
    GenerationBase {
        /// The base given.
        base: u64,
        /// The address-space count.
        nr: u16,
    },
}

impl MemslotsConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nr = self.nr_address_spaces;
        if !(1..=2).contains(&nr) {
            return Err(ConfigError::AddressSpaces(nr));
        }
        if !(13..=64).contains(&self.max_gpa_bits) {
            return Err(ConfigError::MaxGpaBits(self.max_gpa_bits));
        }
        if self.generation_base % nr as u64 != 0 || self.generation_base >= 1 << 62 {
            return Err(ConfigError::GenerationBase { base: self.generation_base, nr });
        }
        if self.max_readers > MAX_READERS {
            return Err(ConfigError::TooManyReaders(self.max_readers));
        }
        Ok(())
    }

    /// The highest gfn the MMU maps (KVM `kvm_mmu_max_gfn`).
    pub fn max_gfn(&self) -> u64 {
        u64::MAX >> (64 - (self.max_gpa_bits as u32 - crate::types::PAGE_SHIFT))
    }
}

/// One address space: the double-buffered sets and which one is published.
struct AddressSpace {
    active: AtomicUsize,
    sets: [MemslotSet; 2],
}

impl AddressSpace {
    /// The published set, for a reader in a read section. Acquire: pairs with the Release
    /// publication in `swap`, so the set's maps and generation written before it are visible.
    #[inline]
    fn published(&self) -> &MemslotSet {
        &self.sets[self.active.load(Ordering::Acquire) & 1]
    }
}

/// State guarded by the slots lock.
struct SlotsState {
    /// Pages in all slots of all address spaces (KVM `kvm->nr_memslot_pages`).
    nr_memslot_pages: u64,
    meta: SlotMetadata,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (KVM `kvm->manual_dirty_log_protect`).
    dirty_log_mode: DirtyLogMode,
}

/// A VM's memslots: both address spaces, their SRCU domain and the slots lock (KVM's
/// `kvm->memslots`, `kvm->srcu`, `kvm->slots_lock`). `Send + Sync`; readers never block.
pub struct Memslots {
    cfg: MemslotsConfig,
    /// The generation of each address space's published set, mirrored in one word per space
    /// for [`Self::generation`] (the MMIO fast path): two dependent loads from the VM instead of
    /// four. It takes the set's values in the same order, but never runs behind the set towards
    /// a final generation: `swap` stores the in-progress value *before* it publishes the new set
    /// (so a vCPU that reached the new set, say in its own slow path a moment ago, cannot then
    /// read the old final generation here and hit an MMIO SPTE or cache entry of the old slots;
    /// in KVM the generation lives in the set the vCPU reaches), and the final value *after*
    /// the set's own final store (a reader that sees it in progress a moment too long only
    /// misses a hit). Release/Acquire as the set's own word; read without a read section.
    published_gen: [AtomicU64; 2],
    srcu: Srcu,
    spaces: Box<[AddressSpace]>,
    slots_lock: Mutex<SlotsState>,
    /// A swap began and did not end: a hook panicked in it (its grace-period wait's `relax`, the
    /// wrap hook), and the unwinding released the slots lock. The set that swap unpublished may
    /// still be held by readers its grace period never waited for, and the two sets of the
    /// space no longer hold the same slots, so no later update may run (it would `replace` in
    /// that set). Written and read by the slots-lock holder only (the lock orders it: Relaxed).
    torn: AtomicBool,
}

impl core::fmt::Debug for Memslots {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let gens: Vec<Generation> =
            (0..self.cfg.nr_address_spaces).map(|i| self.generation(AsId(i))).collect();
        f.debug_struct("Memslots").field("cfg", &self.cfg).field("generations", &gens).finish()
    }
}

/// An SRCU read section over a VM's memslots: the only way to reach a [`MemslotSet`].
pub struct MemslotsGuard<'a> {
    slots: &'a Memslots,
    _section: ReadGuard<'a>,
}

impl MemslotsGuard<'_> {
    /// The published set of `as_id`, read now (each call reads the pointer again, as
    /// `kvm_memslots()` does).
    ///
    /// # Panics
    /// If `as_id` is not below the VM's number of address spaces.
    #[inline]
    pub fn set(&self, as_id: AsId) -> &MemslotSet {
        self.slots.space(as_id).published()
    }
}

impl Memslots {
    /// A VM's memslots, all address spaces empty.
    ///
    /// # Panics
    /// If the configuration is invalid ([`MemslotsConfig::validate`]); use [`Self::try_new`]
    /// to get the error instead.
    pub fn new(cfg: MemslotsConfig) -> Self {
        match Self::try_new(cfg) {
            Ok(m) => m,
            Err(e) => panic!("invalid memslots configuration: {e}"),
        }
    }

    /// A VM's memslots, or why the configuration is unusable.
    pub fn try_new(cfg: MemslotsConfig) -> Result<Self, ConfigError> {
        Self::try_with_fences(cfg, ReaderFences::Full)
    }

    /// [`Self::try_new`] with the readers' fence kind (asymmetric when the host offers a
    /// process-wide barrier: [`crate::host::Sched::process_barrier`]).
    pub fn try_with_fences(cfg: MemslotsConfig, fences: ReaderFences) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let spaces: Vec<AddressSpace> = (0..cfg.nr_address_spaces)
            .map(|i| {
                let g = Generation::from_raw(cfg.generation_base + i as u64);
                AddressSpace {
                    active: AtomicUsize::new(0),
                    sets: [MemslotSet::new(g), MemslotSet::new(g)],
                }
            })
            .collect();
        let gen_of = |i: u64| AtomicU64::new(cfg.generation_base + i);
        Ok(Memslots {
            cfg,
            published_gen: [gen_of(0), gen_of(1)],
            srcu: Srcu::with_fences(cfg.max_readers, fences),
            spaces: spaces.into_boxed_slice(),
            slots_lock: Mutex::new(SlotsState {
                nr_memslot_pages: 0,
                meta: SlotMetadata::new(cfg.metadata_limit),
                dirty_log_mode: DirtyLogMode::Auto,
            }),
            torn: AtomicBool::new(false),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MemslotsConfig {
        &self.cfg
    }

    /// The number of address spaces.
    pub fn nr_address_spaces(&self) -> u16 {
        self.cfg.nr_address_spaces
    }

    /// The SRCU domain readers use (e.g. to reuse a vCPU's read section for other state).
    pub fn srcu(&self) -> &Srcu {
        &self.srcu
    }

    /// Claims a reader record: one per vCPU, at most `max_readers`.
    pub fn register_reader(&self) -> Result<ReaderId, SrcuError> {
        self.srcu.register()
    }

    /// Gives back a reader record (see [`Srcu::unregister`]).
    pub fn unregister_reader(&self, r: &mut ReaderId) {
        self.srcu.unregister(r)
    }

    /// Opens a read section for reader `r`. Wait-free.
    #[inline]
    pub fn read<'a>(&'a self, r: &'a ReaderId) -> MemslotsGuard<'a> {
        MemslotsGuard { slots: self, _section: self.srcu.read_lock(r) }
    }

    /// The current generation of `as_id`, as a reader starting now would see it (for stats).
    ///
    /// # Panics
    /// If `as_id` is not below the VM's number of address spaces.
    #[inline]
    pub fn generation(&self, as_id: AsId) -> Generation {
        // Only the published generation is read (its mirror, `published_gen`), never a map, so
        // no read section is needed. The MMIO fast path relies on this: it compares
        // generations only. Acquire: an update that returned before the caller began is seen.
        match self.published_gen.get(usize::from(as_id.0)) {
            Some(g) if as_id.0 < self.cfg.nr_address_spaces => {
                Generation::from_raw(g.load(Ordering::Acquire))
            }
            _ => no_such_space(as_id),
        }
    }

    #[inline]
    fn space(&self, as_id: AsId) -> &AddressSpace {
        match self.spaces.get(as_id.0 as usize) {
            Some(s) => s,
            None => panic!(
                "address space {} does not exist (this VM has {})",
                as_id.0, self.cfg.nr_address_spaces
            ),
        }
    }

    /// Pages in all slots (KVM `kvm->nr_memslot_pages`). Takes the slots lock: do not call it
    /// inside a read section.
    pub fn nr_memslot_pages(&self) -> u64 {
        self.slots_lock.lock().nr_memslot_pages
    }

    /// Bytes of slot metadata (dirty bitmaps) allocated now. Takes the slots lock.
    pub fn metadata_bytes(&self) -> u64 {
        self.slots_lock.lock().meta.bytes()
    }

    /// The size of slot `(as_id, id)`'s dirty bitmap, if it has one. Takes the slots lock.
    pub fn dirty_bitmap_bytes(&self, as_id: AsId, id: SlotId) -> Option<u64> {
        self.slots_lock.lock().meta.bitmap_of((as_id.0, id.0))
    }

    /// Sets how `KVM_GET_DIRTY_LOG` treats bitmaps from now on (KVM `KVM_ENABLE_CAP` of
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`). Takes the slots lock.
    pub fn set_dirty_log_mode(&self, mode: DirtyLogMode) {
        self.slots_lock.lock().dirty_log_mode = mode;
    }

    /// The dirty-log mode. Takes the slots lock.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.slots_lock.lock().dirty_log_mode
    }

    /// Runs `f` on slot `(as_id, id)` and its dirty bitmap with the slots lock held (KVM's
    /// dirty-log ioctls hold `slots_lock`, so the slot cannot change meanwhile): KVM's first
    /// checks in KVM's order (`EINVAL` for an address space or id out of range, then `pre`, then
    /// `ENOENT` for no slot or no dirty logging). The slot is read from the published set, which
    /// only the lock holder changes.
    pub(crate) fn with_dirty_log<R>(
        &self,
        as_id: u16,
        id: u16,
        pre: impl FnOnce() -> Result<(), DirtyLogError>,
        f: impl FnOnce(&Memslot, &DirtyBitmap, DirtyLogMode) -> Result<R, DirtyLogError>,
    ) -> Result<R, DirtyLogError> {
        crate::dirty::check_ids(as_id, id, self.cfg.nr_address_spaces)?;
        pre()?;
        let st = self.slots_lock.lock();
        let slot = self.space(AsId(as_id)).published().get(SlotId(id)).copied();
        let bitmap = st.meta.get((as_id, id)).cloned();
        match (slot, bitmap) {
            (Some(s), Some(b)) if s.dirty_logging() => f(&s, &b, st.dirty_log_mode),
            _ => Err(DirtyLogError::NoLog { as_id, id }),
        }
    }

    /// KVM's `KVM_SET_USER_MEMORY_REGION`: validates `r` with KVM's rules in KVM's order, then
    /// creates, deletes, moves or re-flags the slot with the generation protocol, calling
    /// `hooks` at the protocol's steps. Serialised by the slots lock; must not be called inside
    /// a read section of this VM (it waits for grace periods).
    ///
    /// # Panics
    /// If a hook panicked in the middle of an earlier update (as a `std` mutex is poisoned): that
    /// update left a set that readers may still hold where the next update would edit it.
    pub fn set_memory_region(
        &self,
        r: &UserspaceMemoryRegion,
        hooks: &dyn MemslotHooks,
    ) -> Result<MemslotChange, MemslotError> {
        self.set_region(r, Requester::User, hooks)
    }

    /// KVM's `__x86_set_memory_region` for one address space: creates, moves or deletes an
    /// [`InternalSlot`] as [`Self::set_memory_region`] does a user slot (every rule but the
    /// user-id rule, the same protocol and hooks; its flags are always 0).
    ///
    /// # Panics
    /// As [`Self::set_memory_region`].
    pub fn set_internal_memory_region(
        &self,
        r: &InternalMemoryRegion,
        hooks: &dyn MemslotHooks,
    ) -> Result<MemslotChange, MemslotError> {
        self.set_region(&r.as_request(), Requester::Internal, hooks)
    }

    /// [`Self::set_memory_region`] for a request `from` a VMM or KVM itself.
    pub(crate) fn set_region(
        &self,
        r: &UserspaceMemoryRegion,
        from: Requester,
        hooks: &dyn MemslotHooks,
    ) -> Result<MemslotChange, MemslotError> {
        let req =
            region::check_request(r, from, self.cfg.nr_address_spaces, self.cfg.user_va_limit)?;
        let mut st = self.slots_lock.lock();
        if self.torn.load(Ordering::Relaxed) {
            torn_update();
        }
        let sp = self.space(req.as_id);
        // The updater reads the published set without a read section: only the slots-lock
        // holder changes sets, and never the published one.
        let cur = sp.published();
        let old = cur.get(req.id).copied();
        let key = (req.as_id.0, req.id.0);

        if req.npages == 0 {
            let Some(old) = old else {
                return Err(MemslotError::DeleteMissingSlot { as_id: req.as_id.0, id: req.id.0 });
            };
            debug_assert!(st.nr_memslot_pages >= old.npages(), "page accounting");
            let old_bitmap = st.meta.get(key).cloned();
            // A delete needs no room: it removes.
            let invalid = self.invalidate(req.as_id, &old, old_bitmap.as_ref(), None, hooks);
            // Preparing a delete cannot fail.
            self.swap(req.as_id, Some(&invalid), None, None, None, hooks);
            st.nr_memslot_pages -= old.npages();
            st.meta.free(key);
            return Ok(MemslotChange::Delete);
        }

        let total = st.nr_memslot_pages;
        let Some(update) = classify(&req, old.as_ref(), total, self.cfg.max_total_pages)? else {
            return Ok(MemslotChange::NoOp);
        };

        let end = Gfn(req.base_gfn.0 + req.npages);
        if matches!(update, Update::Create | Update::Move) {
            if let Some(other) = cur.overlapping(req.id, req.base_gfn, end) {
                return Err(MemslotError::Overlap {
                    as_id: req.as_id.0,
                    id: req.id.0,
                    other: other.id().0,
                    start: req.base_gfn.0,
                    end: end.0,
                });
            }
        }

        let new = Memslot::new(req.as_id, req.id, req.base_gfn, req.npages, req.hva, req.flags);
        // Room for `new` in both sets before anything is published (KVM allocates its new
        // memslot before its first swap): out of heap, ENOMEM with nothing changed. The first
        // swap hands the published set its room once no reader can reach that set.
        let mut room = Some(self.make_room(req.as_id, &new)?);
        // KVM `kvm_prepare_memory_region`: a slot that keeps logging keeps its bitmap (and its
        // bits, across a move); one that starts logging gets a fresh one (below).
        let old_bitmap = st.meta.get(key).cloned();
        let invalid = match (&old, update) {
            (Some(o), Update::Move) => {
                Some(self.invalidate(req.as_id, o, old_bitmap.as_ref(), room.take(), hooks))
            }
            _ => None,
        };

        let fresh_bitmap = match self.prepare(&mut st, old.as_ref(), &new, update) {
            Ok(b) => b,
            Err(e) => {
                if let Some(inv) = invalid {
                    // Revert the invalidation: publish the old slot again.
                    self.swap(req.as_id, Some(&inv), old, old_bitmap.as_ref(), None, hooks);
                }
                return Err(e);
            }
        };

        let new_bitmap = match &fresh_bitmap {
            _ if !new.dirty_logging() => None,
            Some(b) => Some(b),
            None => old_bitmap.as_ref(),
        };
        match update {
            Update::Create => {
                self.swap(req.as_id, None, Some(new), new_bitmap, room.take(), hooks);
                st.nr_memslot_pages += new.npages();
            }
            Update::Move => {
                self.swap(req.as_id, invalid.as_ref(), Some(new), new_bitmap, room.take(), hooks)
            }
            Update::FlagsOnly => {
                self.swap(req.as_id, old.as_ref(), Some(new), new_bitmap, room.take(), hooks)
            }
        }
        // KVM `kvm_commit_memory_region`: a move or flags change that stops dirty logging
        // frees the old bitmap; one that starts it installs the bitmap prepared above.
        if !new.dirty_logging() {
            st.meta.free(key);
        }
        if let Some(b) = fresh_bitmap {
            st.meta.install(key, b);
        }
        Ok(update.into())
    }

    /// KVM `kvm_prepare_memory_region` + x86 `kvm_arch_prepare_memory_region`: the dirty
    /// bitmap (if logging is being turned on), then the max-gfn rule, in that order. Returns a
    /// bitmap to install on commit.
    fn prepare(
        &self,
        st: &mut SlotsState,
        old: Option<&Memslot>,
        new: &Memslot,
        change: Update,
    ) -> Result<Option<TryArc<DirtyBitmap>>, MemslotError> {
        let fresh = if new.dirty_logging() && !old.is_some_and(Memslot::dirty_logging) {
            let b = st.meta.alloc_bitmap(new.npages())?;
            if st.dirty_log_mode == DirtyLogMode::InitiallySet {
                // KVM `kvm_prepare_memory_region`: `bitmap_set` of every page.
                b.set_all();
            }
            Some(b)
        } else {
            None
        };
        if matches!(change, Update::Create | Update::Move) {
            let last_gfn = new.end_gfn().0 - 1;
            let max_gfn = self.cfg.max_gfn();
            if last_gfn > max_gfn {
                if let Some(b) = fresh {
                    st.meta.release(b);
                }
                return Err(MemslotError::BeyondMaxGfn { last_gfn, max_gfn });
            }
        }
        Ok(fresh)
    }

    /// Room for `new` in both sets of `as_id` ([`MemslotSet::room_for`]), made fallibly: the set
    /// no reader can reach takes its room now; the published set's room is returned, for the
    /// update's first swap to hand over once no reader can reach that set either.
    fn make_room(&self, as_id: AsId, new: &Memslot) -> Result<SetRoom, MemslotError> {
        let sp = self.space(as_id);
        // Relaxed: `active` is stored only by the slots-lock holder, which is this thread.
        let cur = sp.active.load(Ordering::Relaxed) & 1;
        let oom = MemslotError::OutOfMemory { bytes: SetRoom::BYTES };
        let for_next = sp.sets[cur ^ 1].room_for(new).ok_or(oom)?;
        let for_published = sp.sets[cur].room_for(new).ok_or(oom)?;
        // SAFETY: as for `swap`'s first `replace`: the set is not published, and the
        // synchronize of the swap that unpublished it returned before that swap ended, so no
        // reader can reach it; we hold the slots lock.
        unsafe { sp.sets[cur ^ 1].take_room(for_next) };
        Ok(for_published)
    }

    /// KVM `kvm_invalidate_memslot`: publish `old` marked invalid, then flush it. Returns the
    /// invalid copy now in both sets. `room` as [`Self::swap`]'s.
    fn invalidate(
        &self,
        as_id: AsId,
        old: &Memslot,
        bitmap: Option<&TryArc<DirtyBitmap>>,
        room: Option<SetRoom>,
        hooks: &dyn MemslotHooks,
    ) -> Memslot {
        let invalid = old.invalidated();
        self.swap(as_id, Some(old), Some(invalid), bitmap, room, hooks);
        hooks.flush_slot(old);
        invalid
    }

    /// One swap (module doc): replace `old` by `new` in the inactive set, publish it with the
    /// in-progress generation, wait for a grace period, run the hook, store the final
    /// generation, then make the same replacement in the set that was replaced. `bitmap` is
    /// `new`'s dirty bitmap (`Some` iff `new` logs). `room`, from [`Self::make_room`], goes to
    /// the set that was published, before its replacement (the update's first swap passes it).
    fn swap(
        &self,
        as_id: AsId,
        old: Option<&Memslot>,
        new: Option<Memslot>,
        bitmap: Option<&TryArc<DirtyBitmap>>,
        room: Option<SetRoom>,
        hooks: &dyn MemslotHooks,
    ) {
        let sp = self.space(as_id);
        // Relaxed: `active` is stored only by the slots-lock holder, which is this thread.
        let cur = sp.active.load(Ordering::Relaxed) & 1;
        let (was_active, next) = (&sp.sets[cur], &sp.sets[cur ^ 1]);

        // Cleared at the end: a panic in between (a hook's) leaves it set (`torn`'s doc).
        self.torn.store(true, Ordering::Relaxed);
        // SAFETY: `next` is not published, and the synchronize of the previous swap of this
        // address space (which unpublished it) returned before that swap ended, so no reader
        // can reach it (module doc, "Safety invariant"); a swap that did not end leaves `torn`
        // set, and no update runs after it. We hold the slots lock.
        unsafe { next.replace(old, new, bitmap) };

        let g = was_active.generation();
        debug_assert!(!g.in_progress(), "a swap began while another was in progress");
        let final_gen = g.next_final(self.cfg.nr_address_spaces);
        let no_second_increment = self.cfg.bugs.has(Bug::NoSecondIncrement);
        let hook_after_publish = self.cfg.bugs.has(Bug::WrapHookAfterPublish);

        // Relaxed: `next` is unreachable until the Release publication below.
        if no_second_increment {
            // Bug (pre-2014): the new set carries its final generation from the start.
            next.store_generation(final_gen, Ordering::Relaxed);
        } else {
            next.store_generation(g.mark_in_progress(), Ordering::Relaxed);
        }
        // The mirror says "in progress" before the new set is reachable (field doc): a vCPU
        // that has used the new set must never read the old final generation afterwards.
        let mirror = &self.published_gen[usize::from(as_id.0)];
        let publish = || {
            mirror.store(next.generation().raw(), Ordering::Release);
            // Release: a reader that loads `active` (Acquire) sees the maps and generation
            // above, and the mirror's in-progress value.
            sp.active.store(cur ^ 1, Ordering::Release);
        };
        let mut published = false;
        hooks.publish(&mut || {
            publish();
            published = true;
        });
        if !published {
            // `MemslotHooks` is a safe trait: a hook that did not run the publication must not
            // make the edit of `was_active` below one of the set readers still reach.
            publish();
        }

        // Every reader that could hold `was_active` has left its section after this.
        self.srcu.synchronize(&HooksRelax(hooks));

        if !no_second_increment {
            if !hook_after_publish {
                hooks.memslots_updated(as_id, final_gen);
            }
            // Release: pairs with `MemslotSet::generation`'s Acquire.
            next.store_generation(final_gen, Ordering::Release);
            mirror.store(final_gen.raw(), Ordering::Release);
            if hook_after_publish {
                // Bug (pre-2019): the wrap hook runs after the final generation is visible.
                hooks.memslots_updated(as_id, final_gen);
            }
        } else {
            hooks.memslots_updated(as_id, final_gen);
        }

        if let Some(room) = room {
            // SAFETY: as for the replace below.
            unsafe { was_active.take_room(room) };
        }
        // SAFETY: `was_active` was unpublished above and the synchronize drained every reader
        // that could hold it; new readers reach only `next`. We hold the slots lock.
        unsafe { was_active.replace(old, new, bitmap) };
        self.torn.store(false, Ordering::Relaxed);
    }
}

/// A change that is neither a delete nor a no-op: what [`classify`] finds a request to be, and
/// what the rest of an update is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Update {
    Create,
    Move,
    FlagsOnly,
}

impl From<Update> for MemslotChange {
    fn from(u: Update) -> Self {
        match u {
            Update::Create => MemslotChange::Create,
            Update::Move => MemslotChange::Move,
            Update::FlagsOnly => MemslotChange::FlagsOnly,
        }
    }
}

/// Which change a request that is not a delete makes to the slot it names (`old`: that slot
/// now), with KVM's checks of `kvm_set_memory_region` in its order: a create must keep the
/// pages of all slots within `max_total_pages` (`total_pages` now); a change of an existing slot
/// may not touch its host address, its size or its READONLY flag; then it is a move, a change
/// of flags only, or nothing (`None`).
fn classify(
    req: &region::Request,
    old: Option<&Memslot>,
    total_pages: u64,
    max_total_pages: u64,
) -> Result<Option<Update>, MemslotError> {
    let Some(o) = old else {
        if total_pages.checked_add(req.npages).is_none_or(|t| t > max_total_pages) {
            return Err(MemslotError::TotalPagesOverflow {
                total: total_pages,
                npages: req.npages,
            });
        }
        return Ok(Some(Update::Create));
    };
    let fixed = |field| MemslotError::FixedFieldChanged { id: req.id.0, field };
    if req.hva != o.userspace_addr() {
        return Err(fixed(FixedField::UserspaceAddr));
    }
    if req.npages != o.npages() {
        return Err(fixed(FixedField::Size));
    }
    if (req.flags ^ o.user_flags()) & KVM_MEM_READONLY != 0 {
        return Err(fixed(FixedField::Readonly));
    }
    Ok(if req.base_gfn != o.base_gfn() {
        Some(Update::Move)
    } else if req.flags != o.user_flags() {
        Some(Update::FlagsOnly)
    } else {
        None
    })
}

/// The panic of [`Memslots::set_memory_region`] after a torn swap, out of line.
#[cold]
#[inline(never)]
fn torn_update() -> ! {
    panic!(
        "memslots left in the middle of an update by a panic (in a hook: the grace-period wait's \
         relax, a flush or the wrap hook); no further update can run safely"
    )
}

/// The panic of [`Memslots::generation`], out of the fast path.
#[cold]
#[inline(never)]
fn no_such_space(as_id: AsId) -> ! {
    panic!("address space {} does not exist in this VM", as_id.0)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn create_lookup_delete() {
        let m = Memslots::new(MemslotsConfig::default());
        let r = m.register_reader().unwrap();
        let c = m.set_memory_region(
            &UserspaceMemoryRegion::new(1, 0, 0x10_0000, 0x4000, 0x7000_0000),
            &NoHooks,
        );
        assert_eq!(c, Ok(MemslotChange::Create));
        {
            let g = m.read(&r);
            let s = g.set(AsId(0)).find(Gfn(0x101)).copied().unwrap();
            assert_eq!(s.hva_of(Gfn(0x101)).raw(), 0x7000_1000);
            assert!(g.set(AsId(1)).find(Gfn(0x101)).is_none(), "address spaces are separate");
        }
        assert_eq!(m.generation(AsId(0)).raw(), 2);
        assert_eq!(m.generation(AsId(1)).raw(), 1);
        assert_eq!(m.nr_memslot_pages(), 4);
        let c = m.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 0, 0, 0), &NoHooks);
        assert_eq!(c, Ok(MemslotChange::Delete));
        assert_eq!(m.generation(AsId(0)).raw(), 6, "delete takes two swaps");
        assert!(m.read(&r).set(AsId(0)).is_empty());
        assert_eq!(m.nr_memslot_pages(), 0);
    }

    /// The mirror `generation()` reads takes the published set's values: in progress while the
    /// wrap hook runs (between the grace period and the final store), final after the update.
    #[test]
    fn the_generation_mirror_follows_the_published_set() {
        struct Probe<'a> {
            m: &'a Memslots,
            r: &'a ReaderId,
            seen: core::cell::RefCell<Vec<(Generation, Generation)>>,
        }
        impl MemslotHooks for Probe<'_> {
            fn flush_slot(&self, _old: &Memslot) {}
            fn memslots_updated(&self, as_id: AsId, _new_gen: Generation) {
                let published = self.m.read(self.r).set(as_id).generation();
                self.seen.borrow_mut().push((self.m.generation(as_id), published));
            }
        }
        let m = Memslots::new(MemslotsConfig::default());
        let r = m.register_reader().unwrap();
        let probe = Probe { m: &m, r: &r, seen: Default::default() };
        let create = UserspaceMemoryRegion::new(1, 0, 0x10_0000, 0x4000, 0x7000_0000);
        m.set_memory_region(&create, &probe).unwrap();
        m.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 0, 0, 0), &probe).unwrap();
        let seen = probe.seen.into_inner();
        assert_eq!(seen.len(), 3, "create: one swap; delete: two");
        for (mirror, published) in seen {
            assert!(mirror.in_progress(), "{mirror:?} during the update");
            assert_eq!(mirror, published);
        }
        assert_eq!(m.generation(AsId(0)), m.read(&r).set(AsId(0)).generation());
        assert!(!m.generation(AsId(0)).in_progress());
    }

    #[test]
    fn both_buffers_stay_in_step() {
        let m = Memslots::new(MemslotsConfig { nr_address_spaces: 1, ..Default::default() });
        for i in 0..4u32 {
            let gpa = (i as u64) << 20;
            m.set_memory_region(&UserspaceMemoryRegion::new(i, 0, gpa, 0x1000, 0), &NoHooks)
                .unwrap();
        }
        m.set_memory_region(&UserspaceMemoryRegion::new(2, 0, 0x4000_0000, 0x1000, 0), &NoHooks)
            .unwrap();
        let sp = m.space(AsId(0));
        let ids = |s: &MemslotSet| {
            s.iter().map(|x| (x.id(), x.base_gfn(), x.flags())).collect::<Vec<_>>()
        };
        assert_eq!(ids(&sp.sets[0]), ids(&sp.sets[1]));
        assert_eq!(sp.sets[0].len(), 4);
    }

    #[test]
    fn config_is_validated() {
        let bad = |c: MemslotsConfig| Memslots::try_new(c).err();
        assert_eq!(
            bad(MemslotsConfig { nr_address_spaces: 3, ..Default::default() }),
            Some(ConfigError::AddressSpaces(3))
        );
        assert_eq!(
            bad(MemslotsConfig { max_gpa_bits: 12, ..Default::default() }),
            Some(ConfigError::MaxGpaBits(12))
        );
        assert!(bad(MemslotsConfig { generation_base: 3, ..Default::default() }).is_some());
        assert_eq!(
            MemslotsConfig { max_gpa_bits: 52, ..Default::default() }.max_gfn(),
            (1 << 40) - 1
        );
        assert_eq!(
            MemslotsConfig { max_gpa_bits: 64, ..Default::default() }.max_gfn(),
            (1 << 52) - 1
        );
    }
}
