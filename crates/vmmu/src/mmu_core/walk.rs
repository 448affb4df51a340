//! Walks that take no lock: the MMU's lockless walk for the fast MMIO path (KVM `get_mmio_spte`
//! under `rcu_read_lock`, facts §3.5) and the hardware walker that a vCPU in guest mode performs
//! (what the CPU does on a TLB miss: classify each entry, raise a violation or a
//! misconfiguration/RSVD fault).
//!
//! Both read entries with Acquire loads (pairing with the Release of the compare-and-swap that
//! linked a table, rule 5 of [`crate::tdp`]) and must run inside a `table_srcu` read section of the
//! walking vCPU, so no page they reach is freed under them (rule 2/3).
//!
//! # The leaf-table cache (issue 17 target 2, issue 13 point 12)
//! A vCPU's fast path remembers the level-1 tables its lockless walks reached ([`LeafTableCache`]:
//! the root, which 2 MiB of the address space, the table's frame, and the MMU's *table epoch*
//! when the walk began). The next RSVD fault in the same 2 MiB under the same root reads the
//! entry of that table instead of walking from the root, if the epoch is unchanged. The cache
//! holds sixteen tables, two per set, the set chosen by a hash of the 2 MiB: a guest's devices
//! often sit in different 2 MiB, and each must hit without a walk. The epoch
//! ([`MmuCore::table_epoch`]) is bumped after every change of an entry that linked a table
//! (unlink, or replacement: `change.rs`) and when table pages are queued for freeing
//! (`defer_free`), before any grace period that frees them. Why a hit is right:
//! - *the page is live*: a hit reads the epoch inside the vCPU's table read section and finds
//!   the value of before the bump; had its section begun after the grace period that precedes the
//!   free, it would see every store made before that grace period, the bump included. So the
//!   grace period waits for the section, and the frame stays allocated while it is read;
//! - *the path is current*: the fill loads the epoch (Acquire) *before* it walks, and the bump
//!   follows the unlink in program order (Release); a fill that saw the bump therefore walks
//!   after the unlink and cannot reach the unlinked table. A path that changes after the fill
//!   bumps the epoch past the cached value, and the next hit misses;
//! - an entry read through a hit races with a concurrent unlink exactly as an entry read by a
//!   whole walk does: the fault linearises before the change.
//!
//! # Type-stable hosts: the hit without a read section
//! A host whose table memory is type-stable ([`FrameAllocator::type_stable_tables`]: a freed
//! frame stays readable as a table page for the host's life, and the host's own stores into
//! table pages are `Release`) lets the fast path answer a hit with no table read section
//! ([`MmuCore::walk_mmio_fast`]), as a seqlock reader: load the epoch (Acquire), find the cache
//! entry filled at that epoch, load the entry (Acquire), load the epoch again, and answer only if
//! it is unchanged. Why that is right although no grace period waits for it:
//! - *the memory is there*: the pointer came from `table` at the fill, and type-stable memory
//!   stays valid for atomic reads while the host lives (the MMU holds the host);
//! - *what it read is the table's*: a frame is freed only after the bump of its `defer_free`, and
//!   every store into a table page after its free (the host's initialisation or poison, the MMU's
//!   SPTE stores and compare-and-swaps into the reused page, including the leaves a huge page split
//!   writes into a table before linking it) is `Release` and happens after that bump.
//!   `tests/sync_shim_audit.rs` fails on a `Relaxed` store in the table modules. If the entry load
//!   reads such a store, its Acquire makes the bump happen before the second epoch load, which
//!   therefore differs, and the hit is dropped. If it reads an older store, it read the table as it
//!   was while linked (or unlinked but before the bump), which is the race with a concurrent zap
//!   that the section-based hit has too;
//! - everything else is as above: a match of the first load with the fill's epoch means no
//!   unlink since the fill.
//!
//! When the check fails (or the entry is not an MMIO SPTE, or nothing is cached) the fast path
//! opens a section and does the section-based lookup and walk. `tests/loom_mmu.rs` races such
//! a hit against a zap that frees the cached table and a fault that reuses its frame, and shows
//! the model failing without the second epoch load and with a `Relaxed` entry load.
//!
//! Only MMIO SPTEs are answered from a hit; anything else found there walks again from the root,
//! so errors (with their full dumps), retries and re-injected bugs behave as without the cache.
//! A root change needs nothing cleared when the root is a page of its own: the root is part of
//! the key, and a freed root's frame can come back only after the bump of its `defer_free`. A
//! special root (shadow paging: a PAE guest or one without paging) is not such a page: every
//! special root of a vCPU lives in the vCPU's one `pae_root` frame, rewritten in place with no
//! bump, so the vCPU clears its cache whenever it loads a special root
//! (`vcpu::shadow_path`); only that vCPU's cache can name the frame.

use crate::bugs::{Bug, BugSet};
use crate::host::{FrameAllocator, Host, TableEntries};
use crate::mmu_core::MmuCore;
use crate::spte::{HwEntry, PdpteEntry, RsvdReason, SpteDump, SpteFormat};
use crate::srcu::ReaderId;
use crate::sync::Ordering;
use crate::types::{Access, Gfn, Level, Pfn};
use core::ptr::NonNull;

/// What the MMU's lockless walk found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LocklessWalk {
    /// The walk ended at `leaf` (a non-present entry, an MMIO SPTE, or a present leaf).
    Leaf {
        /// The last entry read.
        leaf: u64,
        /// Its level.
        level: Level,
        /// Everything read.
        dump: SpteDump,
    },
    /// A present entry above the leaf has reserved bits set: a genuine misconfiguration
    /// (KVM: `WARN_ONCE` and `-EINVAL`).
    Reserved {
        /// The level of the bad entry.
        level: Level,
        /// The rule it breaks.
        reason: RsvdReason,
        /// Everything read.
        dump: SpteDump,
    },
    /// A table page could not be resolved (a host allocator inconsistency).
    Broken {
        /// Everything read.
        dump: SpteDump,
    },
}

/// What [`MmuCore::walk_lockless_cached`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum CachedWalk {
    /// An MMIO SPTE (of any generation: the caller checks it).
    Mmio(u64),
    /// Anything else, from a whole walk.
    Walked(LocklessWalk),
}

/// Sets of the leaf-table cache, of [`WAYS`] tables each: a guest drives several devices (a
/// register page, a BAR, a doorbell), often in different 2 MiB, and each must hit inline.
const SETS: usize = 8;
/// Tables per set. A set is one cache line in release builds (two 32-byte entries).
const WAYS: usize = 2;

/// The set of a 2 MiB region ([`crate::hash::bucket`]: regions a fixed stride apart, device
/// windows at round addresses, spread over the sets).
#[inline]
const fn set_of(region: u64) -> usize {
    crate::hash::bucket(region, SETS)
}

/// A level-1 table a walk read its last entry from: its frame and its entries.
type LeafTableRef = (Pfn, NonNull<TableEntries>);

/// A vCPU's level-1 tables of its lockless walks (see the module doc), two-way set-associative by
/// 2 MiB region. Owned by the vCPU.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LeafTableCache {
    sets: [Set; SETS],
}

/// One set: the table filled last first; a fill moves it to the second way, whose table is
/// dropped.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(64))]
struct Set([Option<LeafTable>; WAYS]);

#[derive(Clone, Copy, Debug)]
struct LeafTable {
    root: Pfn,
    /// `gfn >> 9`: the 2 MiB of address space the table maps.
    region: u64,
    /// The table's entries, as the host's frame table gave them at the fill (valid until the
    /// host frees the frame, which the epoch check rules out: module doc).
    table: NonNull<TableEntries>,
    /// Its frame: debug and loom builds ask the host on every hit inside a table read section
    /// whether it is still a live table (the test host counts a lookup of a freed frame as a use
    /// after free). A type-stable hit, outside a section, does not ask: it may read a freed
    /// frame, and its epoch recheck discards what it read there.
    #[cfg(any(debug_assertions, loom))]
    pfn: Pfn,
    epoch: u64,
}

// SAFETY: the pointers are dereferenced only by the owning vCPU's fast path (through `&mut` of
// the cache or `&` of its vCPU, which is not `Sync`), under the epoch check of the module doc
// (or, with the re-injected `Bug::LeafCacheIgnoresEpoch`, on a host that keeps freed table
// memory: `cached_mmio_spte`), and point to atomics (`Sync`); moving the cache to another
// thread moves that right with the vCPU.
unsafe impl Send for LeafTableCache {}

impl LeafTableCache {
    /// The cached table of `gfn`'s 2 MiB under `root`, if it was filled at `epoch`. With
    /// `CHECK_LIVE`, debug and loom builds ask the host whether the frame is still a live table
    /// (only a caller inside a table read section may: see [`LeafTable::pfn`]).
    #[inline]
    fn lookup<const CHECK_LIVE: bool>(
        &self,
        root: Pfn,
        gfn: Gfn,
        epoch: u64,
        bugs: BugSet,
        host: &impl FrameAllocator,
    ) -> Option<NonNull<TableEntries>> {
        let region = gfn.raw() >> 9;
        let [a, b] = self.sets[set_of(region)].0;
        Self::valid::<CHECK_LIVE>(a, root, region, epoch, bugs, host)
            .or_else(|| Self::valid::<CHECK_LIVE>(b, root, region, epoch, bugs, host))
    }

    /// `e`'s table if `e` holds `region` under `root` at `epoch`.
    #[inline]
    fn valid<const CHECK_LIVE: bool>(
        e: Option<LeafTable>,
        root: Pfn,
        region: u64,
        epoch: u64,
        bugs: BugSet,
        #[cfg_attr(not(any(debug_assertions, loom)), allow(unused_variables))]
        host: &impl FrameAllocator,
    ) -> Option<NonNull<TableEntries>> {
        match e {
            Some(e)
                if e.root == root
                    && e.region == region
                    && (e.epoch == epoch || bugs.has(Bug::LeafCacheIgnoresEpoch)) =>
            {
                #[cfg(any(debug_assertions, loom))]
                if CHECK_LIVE {
                    let _ = host.table(e.pfn);
                }
                Some(e.table)
            }
            _ => None,
        }
    }

    /// Forgets every table (a special root was loaded: its frame, the key's root, now names other
    /// tables; module doc).
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// Remembers `t` first in its set. A stale entry for the same 2 MiB and root is replaced
    /// where it is; otherwise the first way's table moves to the second way.
    fn fill(&mut self, t: LeafTable) {
        let set = &mut self.sets[set_of(t.region)].0;
        let same =
            |e: &Option<LeafTable>| e.is_some_and(|e| e.root == t.root && e.region == t.region);
        if !same(&set[0]) {
            set[1] = set[0];
        }
        set[0] = Some(t);
    }
}

impl<H: Host> MmuCore<H> {
    /// The fast MMIO path's walk for `gfn` under the vCPU's root (both MMUs; under shadow paging
    /// `gfn` is the GVA's page number): with a type-stable host
    /// ([`FrameAllocator::type_stable_tables`]), first a leaf-table cache hit with no read
    /// section ([`Self::mmio_spte_type_stable`]); otherwise, or when that does not answer,
    /// [`Self::walk_lockless_cached`] inside a table read section of `reader` (the vCPU's).
    #[inline(always)]
    pub(crate) fn walk_mmio_fast(
        &self,
        cache: &mut LeafTableCache,
        reader: &ReaderId,
        root_pfn: Pfn,
        root_level: Level,
        gfn: Gfn,
    ) -> CachedWalk {
        if self.host.type_stable_tables() {
            if let Some(spte) = self.mmio_spte_type_stable(cache, root_pfn, gfn) {
                return CachedWalk::Mmio(spte);
            }
        }
        let _section = self.table_srcu.read_lock(reader);
        self.walk_lockless_cached(cache, root_pfn, root_level, gfn)
    }

    /// A leaf-table cache hit without a table read section, for a type-stable host: the MMIO
    /// SPTE for `gfn` in its cached level-1 table, if the table epoch is the cache entry's both
    /// before and after the entry is read (module doc, "Type-stable hosts"). `None`: no entry,
    /// not an MMIO SPTE, or the epoch moved; the caller walks inside a section.
    #[inline(always)]
    fn mmio_spte_type_stable(
        &self,
        cache: &LeafTableCache,
        root_pfn: Pfn,
        gfn: Gfn,
    ) -> Option<u64> {
        debug_assert!(self.host.type_stable_tables(), "a sectionless hit on a host that is not");
        // Acquire: as in `walk_lockless_cached`.
        let epoch = self.table_epoch.load(Ordering::Acquire);
        let table = cache.lookup::<false>(root_pfn, gfn, epoch, self.cfg.bugs, &*self.host)?;
        // SAFETY: the host's table memory is type-stable (`FrameAllocator::type_stable_tables`):
        // the pointer, which `table` returned for a live frame at the fill, stays valid for
        // atomic reads while the host lives, and `self` holds the host. Whether the table was
        // still the one the cache entry names when it was read is the epoch check below.
        let entries = unsafe { table.as_ref() };
        // Acquire: if this reads a store made after a free (the host's reinitialisation or
        // poison, or the MMU's stores into the reused page: all `Release`), the epoch bump that
        // preceded the free happens before the load below, which then cannot return `epoch`.
        #[cfg(not(loom))]
        let order = Ordering::Acquire;
        #[cfg(loom)]
        let order = match super::loom_knobs::RELAXED_ENTRY_LOAD
            .load(core::sync::atomic::Ordering::Relaxed)
        {
            true => Ordering::Relaxed,
            false => Ordering::Acquire,
        };
        let spte = entries[Level::L4K.index(gfn)].load(order);
        #[cfg(loom)]
        if super::loom_knobs::SKIP_EPOCH_RECHECK.load(core::sync::atomic::Ordering::Relaxed) {
            return self.cfg.codec.is_mmio(spte).then_some(spte);
        }
        // Relaxed: ordered after the entry load by its Acquire.
        if self.table_epoch.load(Ordering::Relaxed) != epoch {
            return None;
        }
        self.cfg.codec.is_mmio(spte).then_some(spte)
    }

    /// The lockless walk through the vCPU's leaf-table cache: an MMIO SPTE in the cached level-1
    /// table is the answer ([`CachedWalk::Mmio`], no dump built); anything else is a whole
    /// [`Self::walk_lockless`], which refills the cache. Same contract as `walk_lockless`.
    #[inline]
    pub(crate) fn walk_lockless_cached(
        &self,
        cache: &mut LeafTableCache,
        root_pfn: Pfn,
        root_level: Level,
        gfn: Gfn,
    ) -> CachedWalk {
        // Acquire: pairs with the Release bump after an unlink (module doc: the fill walks after
        // any unlink whose bump it saw).
        let epoch = self.table_epoch.load(Ordering::Acquire);
        if let Some(table) = cache.lookup::<true>(root_pfn, gfn, epoch, self.cfg.bugs, &*self.host)
        {
            if let Some(spte) = self.cached_mmio_spte(table, gfn) {
                return CachedWalk::Mmio(spte);
            }
        }
        self.walk_and_fill(cache, root_pfn, root_level, gfn, epoch)
    }

    /// The entry for `gfn` in `table`, a table of the vCPU's leaf-table cache that `lookup` just
    /// validated, if it is an MMIO SPTE.
    #[inline]
    fn cached_mmio_spte(&self, table: NonNull<TableEntries>, gfn: Gfn) -> Option<u64> {
        // SAFETY: the caller holds a table read section, and the table's epoch equals the one
        // read inside it: the table was not unlinked or queued for freeing before the section
        // began, so the grace period before its free waits for this section and the host's
        // pointer stays valid (`FrameAllocator::table`; module doc). With the re-injected
        // `Bug::LeafCacheIgnoresEpoch` `lookup` skips that comparison and the table may have been
        // freed: then the host promised that freed table memory stays readable
        // (`FrameAllocator::retains_table_memory`), which `Vm::new` checks before it accepts
        // the bug.
        let table = unsafe { table.as_ref() };
        let spte = table[Level::L4K.index(gfn)].load(Ordering::Acquire);
        self.cfg.codec.is_mmio(spte).then_some(spte)
    }

    /// The miss side of [`Self::walk_lockless_cached`], out of line.
    #[inline(never)]
    fn walk_and_fill(
        &self,
        cache: &mut LeafTableCache,
        root_pfn: Pfn,
        root_level: Level,
        gfn: Gfn,
        epoch: u64,
    ) -> CachedWalk {
        let fill = |cache: &mut LeafTableCache, (_pfn, table): LeafTableRef| {
            cache.fill(LeafTable {
                root: root_pfn,
                region: gfn.raw() >> 9,
                table,
                #[cfg(any(debug_assertions, loom))]
                pfn: _pfn,
                epoch,
            })
        };
        if let Some((spte, leaf_table)) = self.walk_lockless_to_mmio(root_pfn, root_level, gfn) {
            if let Some(t) = leaf_table {
                fill(cache, t);
            }
            return CachedWalk::Mmio(spte);
        }
        let (walk, leaf_table) = self.walk_lockless(root_pfn, root_level, gfn);
        if let Some(t) = leaf_table {
            fill(cache, t);
        }
        match walk {
            LocklessWalk::Leaf { leaf, .. } if self.cfg.codec.is_mmio(leaf) => {
                CachedWalk::Mmio(leaf)
            }
            w => CachedWalk::Walked(w),
        }
    }

    /// [`Self::walk_lockless`] for the fast path's common end, an MMIO SPTE, without building the
    /// dump: that SPTE and the level-1 table it is in (if it is at level 1). `None` for any
    /// other end (not present, reserved bits, a present leaf, an unknown frame): the caller walks
    /// again with [`Self::walk_lockless`], which builds the dump and classifies. Same contract.
    #[inline]
    fn walk_lockless_to_mmio(
        &self,
        root_pfn: Pfn,
        root_level: Level,
        gfn: Gfn,
    ) -> Option<(u64, Option<LeafTableRef>)> {
        let fmt = self.cfg.format;
        let mut pfn = root_pfn;
        let mut level = root_level;
        loop {
            // SAFETY: as in `walk_lockless`.
            let table = unsafe { self.table(pfn) }?;
            let spte = table[level.index(gfn)].load(Ordering::Acquire);
            if !SpteFormat::is_mmu_present(spte) {
                if !self.cfg.codec.is_mmio(spte) {
                    return None;
                }
                let leaf_table = (level == Level::L4K).then(|| (pfn, NonNull::from(table)));
                return Some((spte, leaf_table));
            }
            if fmt.has_reserved_bits(spte, level).is_some() || fmt.is_leaf(spte, level) {
                return None;
            }
            level = level.lower()?;
            pfn = fmt.pfn(spte);
        }
    }

    /// The lockless walk of KVM's `get_mmio_spte`: root to leaf for `gfn`, checking reserved bits
    /// on every MMU-present entry (a non-present leaf, which includes MMIO SPTEs, is not checked).
    ///
    /// The caller holds a `table_srcu` read section and holds `root_pfn` as its current root.
    /// Also returns the level-1 table the walk read its last entry from (frame and entries), if
    /// it got that far.
    fn walk_lockless(
        &self,
        root_pfn: Pfn,
        root_level: Level,
        gfn: Gfn,
    ) -> (LocklessWalk, Option<LeafTableRef>) {
        let fmt = self.cfg.format;
        let mut dump = SpteDump::default();
        let mut pfn = root_pfn;
        let mut level = root_level;
        loop {
            // SAFETY: reached from the caller's root inside its table read section (see above).
            let Some(table) = (unsafe { self.table(pfn) }) else {
                return (LocklessWalk::Broken { dump }, None);
            };
            let spte = table[level.index(gfn)].load(Ordering::Acquire);
            dump.push(level, spte);
            let leaf_table = (level == Level::L4K).then(|| (pfn, NonNull::from(table)));
            if !SpteFormat::is_mmu_present(spte) {
                return (LocklessWalk::Leaf { leaf: spte, level, dump }, leaf_table);
            }
            if let Some(reason) = fmt.has_reserved_bits(spte, level) {
                return (LocklessWalk::Reserved { level, reason, dump }, None);
            }
            if fmt.is_leaf(spte, level) {
                return (LocklessWalk::Leaf { leaf: spte, level, dump }, leaf_table);
            }
            match level.lower() {
                Some(l) => {
                    pfn = fmt.pfn(spte);
                    level = l;
                }
                None => return (LocklessWalk::Leaf { leaf: spte, level, dump }, leaf_table),
            }
        }
    }
}

/// What the hardware's walk of the second-level tables decided for one access.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HwWalk {
    /// A present leaf grants the access: the translation the TLB may cache.
    Translated {
        /// The frame of the 4 KiB page holding the address.
        pfn: Pfn,
        /// The level of the leaf that mapped it.
        level: Level,
        /// The leaf's rights (reads implied).
        perms: Access,
    },
    /// Not present, or present without the right: an EPT violation / #NPF without RSVD.
    Violation {
        /// Whether the entry where the walk stopped was present (a permission fault).
        present: bool,
        /// Everything read.
        dump: SpteDump,
    },
    /// Reserved bits or an illegal combination: an EPT misconfiguration / #NPF with RSVD.
    Misconfig {
        /// The rule broken.
        reason: RsvdReason,
        /// Everything read.
        dump: SpteDump,
    },
    /// A table frame the host does not know, or a PAE root above 4 GiB or with an entry with
    /// reserved bits set (which the CPU would refuse to load with CR3): an internal
    /// inconsistency, never a guest-visible outcome.
    Broken {
        /// Everything read.
        dump: SpteDump,
    },
}

/// The rights a second-level (TDP) walk checks for a guest access that needs `need`: on NPT
/// every guest access, the guest's own page-table reads included, is a user access (AMD APM
/// vol. 2, "Nested Paging": nested table walks treat all accesses as user), so a nested entry
/// without U faults; EPT has no user bit (its entries grant USER, so adding it changes nothing).
/// Shadow-paging walks take the guest's own need (its CPL decides USER) and do not use this.
#[inline]
pub const fn tdp_need(need: Access) -> Access {
    need.union(Access::USER)
}

/// The walk the CPU performs on a TLB miss, classifying each entry exactly as
/// [`SpteFormat::classify`] says; under a PAE root (three levels, not EPT) the root's entries are
/// PDPTEs ([`SpteFormat::classify_pdpte`]) and the entries below follow PAE paging's stricter
/// reserved bits ([`SpteFormat::pae_reserved_bits`]). `tables` resolves table frames (the host's
/// frame table).
///
/// Safe callers use [`crate::vcpu::GuestMode::walk`] or [`crate::vcpu::Vcpu::walk`], which hold
/// the vCPU's table read section.
///
/// # Safety
/// Every table page reachable from `root` must stay allocated for the whole call: the caller
/// holds a read section of the MMU's table SRCU (a vCPU in guest mode), or the MMU lock for a
/// TDP root (shadow pages are unlinked under the shadow lock, which the MMU lock does not hold
/// off), and `root` is a root of that MMU the caller keeps (its vCPU's current root, or one on
/// the root list), or the caller otherwise knows nothing frees those pages meanwhile (a test
/// with no concurrent zap). `tables` is that MMU's host.
#[inline]
pub unsafe fn hw_walk(
    format: &SpteFormat,
    tables: &dyn FrameAllocator,
    root: Pfn,
    root_level: Level,
    gfn: Gfn,
    need: Access,
) -> HwWalk {
    // SAFETY: the same contract, passed on.
    unsafe { hw_walk_leaf_table(format, tables, root, root_level, gfn, need).0 }
}

/// [`hw_walk`], and the level-1 table whose entry it read last, if the walk got that far (what
/// the hardware's paging-structure caches keep, for a model of them).
///
/// # Safety
/// As for [`hw_walk`].
#[inline(always)]
pub unsafe fn hw_walk_leaf_table(
    format: &SpteFormat,
    tables: &dyn FrameAllocator,
    root: Pfn,
    root_level: Level,
    gfn: Gfn,
    need: Access,
) -> (HwWalk, Option<Pfn>) {
    let mut dump = SpteDump::default();
    let mut pfn = root;
    let mut level = root_level;
    let mut perms = Access::ALL;
    let mut readable = true;
    let mut leaf_table = None;
    let pae = root_level == Level::L1G && !format.is_ept();
    if pae {
        // A PAE root (the shadow MMU's special root): its four entries are PDPTEs, which the
        // CPU loads with CR3 and which grant no rights. A root above 4 GiB (CR3 holds 32 bits
        // in PAE paging) or an entry with reserved bits set could never have been loaded: no
        // access runs under it, an internal inconsistency of the MMU.
        if root.raw() >= 1 << 20 {
            return (HwWalk::Broken { dump }, None);
        }
        let Some(ptr) = tables.table(root) else {
            return (HwWalk::Broken { dump }, None);
        };
        // SAFETY: as below: the caller keeps the root alive; entries are atomics.
        let e = unsafe { ptr.as_ref() }[Level::L1G.index(gfn)].load(Ordering::Acquire);
        dump.push(Level::L1G, e);
        match format.classify_pdpte(e) {
            PdpteEntry::NotPresent => return (HwWalk::Violation { present: false, dump }, None),
            PdpteEntry::Reserved { .. } => return (HwWalk::Broken { dump }, None),
            PdpteEntry::Present { table } => {
                pfn = table;
                level = Level::L2M;
            }
        }
    }
    loop {
        let Some(ptr) = tables.table(pfn) else {
            // The hardware would read whatever is at that physical address; our frames are all
            // known, so this is an internal inconsistency.
            return (HwWalk::Broken { dump }, leaf_table);
        };
        // SAFETY: the caller keeps reachable pages alive (see above); entries are atomics.
        let table = unsafe { ptr.as_ref() };
        let spte = table[level.index(gfn)].load(Ordering::Acquire);
        dump.push(level, spte);
        if level == Level::L4K {
            leaf_table = Some(pfn);
        }
        match format.classify(spte, level) {
            HwEntry::NotPresent => return (HwWalk::Violation { present: false, dump }, leaf_table),
            HwEntry::Misconfig(reason) => return (HwWalk::Misconfig { reason, dump }, leaf_table),
            HwEntry::Present { leaf, pfn: next, perms: p, readable: r } => {
                // PAE paging's reserved bits beyond the format's (an MMIO SPTE breaks the
                // format's first, and keeps that reason).
                if let Some(reason) = pae.then(|| format.pae_reserved_bits(spte, level)).flatten() {
                    return (HwWalk::Misconfig { reason, dump }, leaf_table);
                }
                perms = perms.intersect(p);
                readable &= r;
                if leaf {
                    // Data accesses need R (execute-only EPT entries allow fetches only).
                    let read_ok = readable || need.contains(Access::EXEC);
                    if !perms.contains(need) || !read_ok {
                        return (HwWalk::Violation { present: true, dump }, leaf_table);
                    }
                    let offset = level.offset_in_block(gfn);
                    return (
                        HwWalk::Translated { pfn: Pfn(next.raw() + offset), level, perms },
                        leaf_table,
                    );
                }
                match level.lower() {
                    Some(l) => {
                        pfn = next;
                        level = l;
                    }
                    None => return (HwWalk::Broken { dump }, leaf_table),
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::testing::{TestHost, TABLE_PFN_BASE};
    use alloc::vec::Vec;

    fn table(host: &TestHost, init: u64) -> (Pfn, NonNull<TableEntries>) {
        let pfn = host.alloc_table(init).expect("a free table frame");
        (pfn, host.table(pfn).expect("a live frame"))
    }

    fn entry(root: Pfn, region: u64, (pfn, table): (Pfn, NonNull<TableEntries>)) -> LeafTable {
        #[cfg(not(any(debug_assertions, loom)))]
        let _ = pfn;
        LeafTable {
            root,
            region,
            table,
            #[cfg(any(debug_assertions, loom))]
            pfn,
            epoch: 7,
        }
    }

    fn gfn_in(region: u64) -> Gfn {
        Gfn((region << 9) + 3)
    }

    fn all_hit(regions: &[u64]) {
        let host = TestHost::new(32);
        let root = Pfn(TABLE_PFN_BASE + 31);
        let mut cache = LeafTableCache::default();
        let tables: Vec<_> = regions.iter().map(|_| table(&host, 0)).collect();
        for (&r, &t) in regions.iter().zip(&tables) {
            cache.fill(entry(root, r, t));
        }
        for (&r, &(_, t)) in regions.iter().zip(&tables) {
            let hit = cache.lookup::<true>(root, gfn_in(r), 7, BugSet::NONE, &host);
            assert_eq!(hit, Some(t), "region {r:#x} of {regions:x?}");
        }
    }

    /// Under a PAE root (the shadow MMU's tables for a PAE guest) the CPU walks in PAE paging,
    /// where bits 62:52 of a PDE or PTE are reserved; under a 4-level root it ignores them.
    #[test]
    fn under_a_pae_root_bits_62_52_of_a_pde_or_pte_are_reserved() {
        use crate::spte::FormatKind;
        let host = TestHost::new(8);
        let f = SpteFormat::new(FormatKind::Npt, 46).unwrap();
        let entries = |pfn: Pfn| {
            let ptr = host.table(pfn).expect("a live table");
            // SAFETY: the test host keeps its tables for its own life; entries are atomics.
            unsafe { ptr.as_ref() }
        };
        let pae_root = host.alloc_table_below_4g(SpteFormat::NONPRESENT).unwrap();
        let pml4 = host.alloc_table(SpteFormat::NONPRESENT).unwrap();
        let pd = host.alloc_table(SpteFormat::NONPRESENT).unwrap();
        let pt = host.alloc_table(SpteFormat::NONPRESENT).unwrap();
        let pdpt = host.alloc_table(SpteFormat::NONPRESENT).unwrap();
        entries(pae_root)[0].store(f.make_pae_root_entry(pd), Ordering::Release);
        entries(pml4)[0].store(f.make_nonleaf(pdpt), Ordering::Release);
        entries(pdpt)[0].store(f.make_nonleaf(pd), Ordering::Release);
        entries(pd)[0].store(f.make_nonleaf(pt), Ordering::Release);
        let leaf = f.make_leaf(Pfn(0x100), Level::L4K, Access::ALL, true);
        entries(pt)[0].store(leaf, Ordering::Release);
        let walk = |root, level| {
            // SAFETY: nothing frees the test host's tables during the walk.
            unsafe { hw_walk(&f, &host, root, level, Gfn(0), Access::USER) }
        };
        let translated =
            HwWalk::Translated { pfn: Pfn(0x100), level: Level::L4K, perms: Access::ALL };
        assert_eq!(walk(pae_root, Level::L1G), translated);
        for (table, level) in [(pt, 1u8), (pd, 2)] {
            for bit in [52u8, 58, 62] {
                let e = &entries(table)[0];
                let clean = e.load(Ordering::Acquire);
                e.store(clean | 1 << bit, Ordering::Release);
                let w = walk(pae_root, Level::L1G);
                let want = RsvdReason::ReservedBit { bit, level };
                assert!(
                    matches!(w, HwWalk::Misconfig { reason, .. } if reason == want),
                    "bit {bit} at level {level}: {w:?}"
                );
                assert_eq!(walk(pml4, Level::L4), translated, "4-level: bit {bit} ignored");
                e.store(clean, Ordering::Release);
            }
        }
    }

    #[test]
    fn each_device_region_of_the_default_machine_hits_without_a_walk() {
        // The device window, the BAR's three positions, the DIMM's two 2 MiB.
        all_hit(&[0x680, 0x600, 0x604, 0x5ff, 0x800, 0x801]);
    }

    #[test]
    fn eight_neighbouring_regions_hit_without_a_walk() {
        all_hit(&(0x600..0x608).collect::<Vec<_>>());
        all_hit(&(0..8).map(|i| 0x600 + 2 * i).collect::<Vec<_>>());
    }

    /// The pattern of `vmmu bench`'s whole-walk row: 32 neighbouring regions cycled in order
    /// never hit (every set holds at least three of them, and keeps the two latest).
    #[test]
    fn cycling_32_neighbouring_regions_always_walks() {
        let host = TestHost::new(40);
        let root = Pfn(TABLE_PFN_BASE + 39);
        let mut cache = LeafTableCache::default();
        let regions: Vec<u64> = (0xa00..0xa20).collect();
        let tables: Vec<_> = regions.iter().map(|_| table(&host, 0)).collect();
        for round in 0..3 {
            for (&r, &t) in regions.iter().zip(&tables) {
                let hit = cache.lookup::<true>(root, gfn_in(r), 7, BugSet::NONE, &host);
                assert_eq!(hit, None, "round {round}, region {r:#x}");
                cache.fill(entry(root, r, t));
            }
        }
    }

    #[test]
    fn a_set_keeps_its_two_latest_tables() {
        let host = TestHost::new(8);
        let root = Pfn(TABLE_PFN_BASE + 7);
        // Three regions of one set.
        let same: Vec<u64> = (0..4096).filter(|&r| set_of(r) == set_of(0)).take(3).collect();
        let t: Vec<_> = same.iter().map(|_| table(&host, 0)).collect();
        let mut cache = LeafTableCache::default();
        for i in 0..3 {
            cache.fill(entry(root, same[i], t[i]));
        }
        let look = |r: u64| cache.lookup::<true>(root, gfn_in(r), 7, BugSet::NONE, &host);
        assert_eq!(look(same[0]), None, "the oldest table is dropped");
        assert_eq!(look(same[1]), Some(t[1].1));
        assert_eq!(look(same[2]), Some(t[2].1));
        // Refilling a held region replaces it in place: the other table stays.
        cache.fill(entry(root, same[1], t[0]));
        let look = |r: u64| cache.lookup::<true>(root, gfn_in(r), 7, BugSet::NONE, &host);
        assert_eq!(look(same[1]), Some(t[0].1));
        assert_eq!(look(same[2]), Some(t[2].1));
    }

    #[test]
    fn another_root_or_epoch_misses() {
        let host = TestHost::new(4);
        let root = Pfn(TABLE_PFN_BASE + 3);
        let t = table(&host, 0);
        let mut cache = LeafTableCache::default();
        cache.fill(entry(root, 0x680, t));
        assert_eq!(cache.lookup::<true>(root, gfn_in(0x680), 7, BugSet::NONE, &host), Some(t.1));
        assert_eq!(cache.lookup::<true>(root, gfn_in(0x681), 7, BugSet::NONE, &host), None);
        assert_eq!(
            cache.lookup::<true>(Pfn(root.raw() - 1), gfn_in(0x680), 7, BugSet::NONE, &host),
            None
        );
        assert_eq!(cache.lookup::<true>(root, gfn_in(0x680), 8, BugSet::NONE, &host), None);
        assert_eq!(host.use_after_free(), 0);
    }

    #[test]
    fn a_set_is_one_cache_line_in_release_builds() {
        #[cfg(not(debug_assertions))]
        assert_eq!(core::mem::size_of::<Set>(), 64);
        assert_eq!(core::mem::align_of::<Set>(), 64);
    }
}
