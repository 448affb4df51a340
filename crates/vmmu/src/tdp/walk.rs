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
//! A vCPU's fast path remembers the last level-1 table its lockless walk reached
//! ([`LeafTableCache`]: the root, which 2 MiB of the address space, the table's frame, and the
//! MMU's *table epoch* when the walk began). The next RSVD fault in the same 2 MiB under the same
//! root reads the entry of that table instead of walking from the root, if the epoch is
//! unchanged. Seven earlier tables are kept as spares, looked at only when the last one does not
//! match (a guest's devices often sit in different 2 MiB). The epoch ([`TdpMmu::table_epoch`])
//! is bumped after every change of an entry that linked a table (unlink, or replacement:
//! `change.rs`) and when table pages are queued for freeing (`defer_free`), before any grace
//! period that frees them. Why a hit is right:
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
//! Only MMIO SPTEs are answered from a hit; anything else found there walks again from the root,
//! so errors (with their full dumps), retries and re-injected bugs behave as without the cache.
//! There is nothing to clear on a root change: the root is part of the key, and a freed root's
//! frame can come back only after the bump of its `defer_free`.

use super::TdpMmu;
use crate::bugs::{Bug, BugSet};
use crate::host::{FrameAllocator, Host, TableEntries};
use crate::spte::{HwEntry, RsvdReason, SpteDump, SpteFormat};
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

/// What [`TdpMmu::walk_lockless_cached`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum CachedWalk {
    /// An MMIO SPTE (of any generation: the caller checks it).
    Mmio(u64),
    /// Anything else, from a whole walk.
    Walked(LocklessWalk),
}

/// Level-1 tables a vCPU remembers besides the one it used last: a guest drives several devices
/// (a register page, a BAR, a doorbell), often in different 2 MiB.
const SPARE_TABLES: usize = 7;

/// A vCPU's last level-1 tables of its lockless walks (see the module doc). Owned by the vCPU.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LeafTableCache {
    /// The table used last: the only one the inline hit path looks at.
    entry: Option<LeafTable>,
    /// Earlier ones, looked at by the out-of-line miss path before it walks: a hit there
    /// swaps with `entry`. Replaced round robin.
    spare: [Option<LeafTable>; SPARE_TABLES],
    spare_next: u8,
}

#[derive(Clone, Copy, Debug)]
struct LeafTable {
    root: Pfn,
    /// `gfn >> 9`: the 2 MiB of address space the table maps.
    region: u64,
    /// The table's entries, as the host's frame table gave them at the fill (valid until the
    /// host frees the frame, which the epoch check rules out: module doc).
    table: NonNull<TableEntries>,
    /// Its frame: debug and loom builds ask the host on every hit whether it is still a live
    /// table (the test host counts a lookup of a freed frame as a use after free).
    #[cfg(any(debug_assertions, loom))]
    pfn: Pfn,
    epoch: u64,
}

// SAFETY: the pointer is dereferenced only by the owning vCPU's fast path, under the epoch check
// of the module doc, and points to atomics (`Sync`); moving the cache to another thread moves
// that right with the vCPU.
unsafe impl Send for LeafTableCache {}

impl LeafTableCache {
    #[inline]
    fn lookup(
        &self,
        root: Pfn,
        gfn: Gfn,
        epoch: u64,
        bugs: BugSet,
        host: &impl FrameAllocator,
    ) -> Option<NonNull<TableEntries>> {
        Self::valid(self.entry, root, gfn, epoch, bugs, host)
    }

    /// `e`'s table if `e` holds `gfn`'s 2 MiB under `root` at `epoch`.
    #[inline]
    fn valid(
        e: Option<LeafTable>,
        root: Pfn,
        gfn: Gfn,
        epoch: u64,
        bugs: BugSet,
        #[cfg_attr(not(any(debug_assertions, loom)), allow(unused_variables))]
        host: &impl FrameAllocator,
    ) -> Option<NonNull<TableEntries>> {
        match e {
            Some(e)
                if e.root == root
                    && e.region == gfn.raw() >> 9
                    && (e.epoch == epoch || bugs.has(Bug::LeafCacheIgnoresEpoch)) =>
            {
                #[cfg(any(debug_assertions, loom))]
                let _ = host.table(e.pfn);
                Some(e.table)
            }
            _ => None,
        }
    }

    /// The miss path: a spare that holds `gfn`'s 2 MiB becomes the entry used last (swapping
    /// places with it).
    fn promote_spare(
        &mut self,
        root: Pfn,
        gfn: Gfn,
        epoch: u64,
        bugs: BugSet,
        host: &impl FrameAllocator,
    ) -> Option<NonNull<TableEntries>> {
        let i = self
            .spare
            .iter()
            .position(|&e| Self::valid(e, root, gfn, epoch, bugs, host).is_some())?;
        core::mem::swap(&mut self.entry, &mut self.spare[i]);
        Self::valid(self.entry, root, gfn, epoch, bugs, host)
    }

    /// Makes `t` the entry used last; the one it replaces becomes a spare (round robin), unless
    /// it held the same 2 MiB.
    fn fill(&mut self, t: LeafTable) {
        if let Some(old) = self.entry {
            if !(old.root == t.root && old.region == t.region) {
                let i = usize::from(self.spare_next) % SPARE_TABLES;
                self.spare[i] = Some(old);
                self.spare_next = ((i + 1) % SPARE_TABLES) as u8;
            }
        }
        self.entry = Some(t);
    }
}

impl<H: Host> TdpMmu<H> {
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
        if let Some(table) = cache.lookup(root_pfn, gfn, epoch, self.cfg.bugs, &*self.host) {
            if let Some(spte) = self.cached_mmio_spte(table, gfn) {
                return CachedWalk::Mmio(spte);
            }
        }
        self.walk_and_fill(cache, root_pfn, root_level, gfn, epoch)
    }

    /// The entry for `gfn` in `table`, a table of the vCPU's leaf-table cache that `lookup` or
    /// `promote_spare` just validated, if it is an MMIO SPTE.
    #[inline]
    fn cached_mmio_spte(&self, table: NonNull<TableEntries>, gfn: Gfn) -> Option<u64> {
        // SAFETY: the caller holds a table read section, and the table's epoch equals the one
        // read inside it: the table was not unlinked or queued for freeing before the section
        // began, so the grace period before its free waits for this section and the host's
        // pointer stays valid (`FrameAllocator::table`; module doc).
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
        let bugs = self.cfg.bugs;
        if let Some(table) = cache.promote_spare(root_pfn, gfn, epoch, bugs, &*self.host) {
            if let Some(spte) = self.cached_mmio_spte(table, gfn) {
                return CachedWalk::Mmio(spte);
            }
        }
        let (walk, leaf_table) = self.walk_lockless(root_pfn, root_level, gfn);
        if let Some((_pfn, table)) = leaf_table {
            cache.fill(LeafTable {
                root: root_pfn,
                region: gfn.raw() >> 9,
                table,
                #[cfg(any(debug_assertions, loom))]
                pfn: _pfn,
                epoch,
            });
        }
        match walk {
            LocklessWalk::Leaf { leaf, .. } if self.cfg.codec.is_mmio(leaf) => {
                CachedWalk::Mmio(leaf)
            }
            w => CachedWalk::Walked(w),
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
    ) -> (LocklessWalk, Option<(Pfn, NonNull<TableEntries>)>) {
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
    /// A table frame the host does not know: an internal inconsistency, never a guest-visible
    /// outcome.
    Broken {
        /// Everything read.
        dump: SpteDump,
    },
}

/// The walk the CPU performs on a TLB miss, classifying each entry exactly as
/// [`SpteFormat::classify`] says. `tables` resolves table frames (the host's frame table).
///
/// Safe callers use [`crate::vcpu::GuestMode::walk`] or [`crate::vcpu::Vcpu::walk`], which hold
/// the vCPU's table read section.
///
/// # Safety
/// Every table page reachable from `root` must stay allocated for the whole call: the caller
/// holds a read section of the MMU's table SRCU (a vCPU in guest mode) or the MMU lock, and
/// `root` is a root the caller keeps (its vCPU's current root, or one on the root list), or the
/// caller otherwise knows nothing frees those pages meanwhile (a test with no concurrent zap).
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
                perms = perms.intersect(p);
                readable &= r;
                if leaf {
                    // Data accesses need R (execute-only EPT entries allow fetches only).
                    let read_ok = readable || need.contains(Access::EXEC);
                    if !perms.contains(need) || !read_ok {
                        return (HwWalk::Violation { present: true, dump }, leaf_table);
                    }
                    let offset = gfn.raw() & (level.pages() - 1);
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
