//! Building the shadow of one guest translation and installing its leaf (KVM `FNAME(fetch)` and
//! `mmu_set_spte`, shadow facts §3.2-§3.3), under the shadow lock.
//!
//! Order: walk the shadow levels from the root by guest-virtual address; at each level find or
//! create the child page that shadows the guest table the walk read there (indirect) or, below a
//! guest 2 MiB or 1 GiB page, the linear range (direct), reusing a linked child only if its gfn
//! **and** role match (else unlink it: 0cb2af2ea66a, 81ccda30b4e8). Before anything is linked
//! under an entry of a shadowed guest table (and before the leaf), the gPTE the walk read in that
//! table is read again, after the table's write protection is flushed, and the fault retries if it
//! changed (KVM `gpte_changed`, which runs before `link_shadow_page`: the guest may have written
//! the table before it was protected, or its trapped write was handled before this fault took the
//! lock; a child linked for the old value would outlive the retry, and INVLPG, which drops no
//! synced leaf, would not remove it); then the leaf. A present SPTE is dropped (and flushed)
//! before an MMIO SPTE replaces it (aad885e77496). After a RAM leaf, neighbour SPTEs are
//! prefetched (`super::prefetch`).

use super::pages::{HeapExhausted, NewPageError, ShadowState, SpId};
use super::prefetch::{prefetch, PrefetchCtx};
use super::role::{SpKind, SpRole};
use super::root::ShadowRoot;
use super::ShadowStats;
use crate::bugs::Bug;
use crate::guest::{GuestPteMemory, GuestWalk};
use crate::host::Host;
use crate::memslot::{Memslot, MemslotSet};
use crate::mmu_core::MmuCore;
use crate::spte::SpteFormat;
use crate::stats::RetryCause;
use crate::types::{Access, FaultAccess, Gfn, Gva, Level, Pfn};

/// What the fault wants at the leaf.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum LeafWant {
    /// RAM: the host frame of the 4 KiB page, whether the slot and host allow writes, and the
    /// slot (a writable leaf marks its page in the slot's dirty bitmap, if it logs).
    Ram { pfn: Pfn, writable: bool, slot: Memslot },
    /// An MMIO SPTE (already encoded with the gfn, the guest's W/U and the generation).
    Mmio(u64),
}

/// One shadow-paging fault as [`fetch`] builds it (KVM's `struct kvm_page_fault` with its
/// `guest_walker`): where the guest accessed, what its walk found, and what the fault decided
/// the leaf is. `mem` and `prefetch` read the guest's memory through the memslots the decision
/// was made under.
pub(crate) struct ShadowFault<'a, M> {
    /// The faulting guest-virtual address.
    pub(crate) gva: Gva,
    /// The access that faulted.
    pub(crate) access: FaultAccess,
    /// The guest walk of `gva`.
    pub(crate) walk: &'a GuestWalk,
    /// The guest runs without paging: every shadow page is direct.
    pub(crate) nonpaging: bool,
    /// What goes in the leaf.
    pub(crate) want: LeafWant,
    /// The guest's tables, for the re-check of the gPTEs the walk read.
    pub(crate) mem: &'a M,
    /// What the prefetch of the leaf's neighbours needs.
    pub(crate) prefetch: PrefetchCtx<'a>,
}

/// How the installation ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum FetchOutcome {
    /// The leaf was installed (`writable`: a RAM leaf the guest may write through, which
    /// dirties the page in a logged slot).
    Installed {
        /// Whether the leaf allows writes.
        writable: bool,
    },
    /// The leaf already had this value.
    Spurious,
    /// Fault again.
    Retry(RetryCause),
    /// A write to a guest page table the MMU shadows: the leaf stays read-only, the write must
    /// be emulated (and reported to [`crate::vcpu::Vcpu::track_write`]).
    WriteProtected,
    /// An MMIO leaf whose shadow path is not complete: nothing was built or changed, the access
    /// is emulated without an MMIO SPTE (see [`fetch`]).
    NoPath,
    /// No frame for a shadow page.
    OutOfMemory,
    /// No heap for the bookkeeping of a page, a link or a leaf (nothing half made: see
    /// [`super::pages::HeapExhausted`]).
    OutOfHeap,
    /// The page limit is reached and every page is pinned by a root (KVM `-ENOSPC`).
    PageLimit,
}

/// The guest-physical frame a direct page at `level` starting around `gfn` covers from.
fn direct_base(gfn: Gfn, level: Level) -> Gfn {
    Gfn(gfn.raw() & !(level.pages() * 512 - 1))
}

/// The rights the shadow page of the guest table at level `i + 1` of `walk` is keyed by: what
/// every level above it grants (`walk.pt_access`), so walks that reach one table with different
/// rights above it get different shadow pages (b1bd5cba3306).
fn table_role_access(bugs: crate::bugs::BugSet, walk: &GuestWalk, i: usize) -> Access {
    if i == 0 && bugs.has(Bug::RoleAccessLastLevel) {
        // The bug: a last-level table keyed by its PDE's rights alone.
        return crate::guest::pte::gpte_access(walk.ptes[1]);
    }
    walk.pt_access[i]
}

/// Builds the shadow path for `gva` as `walk` translated it and installs `want` (under the
/// lock; the flushes and frees it owes wait in `st` for the caller's commit).
///
/// With [`crate::mmu_core::MmuConfig::shadow_mmio_path_only`] an MMIO leaf is installed only where
/// the whole shadow path to it exists already (linked pages of the right gfn and role);
/// otherwise nothing is built or touched (no flood count is reset either) and the outcome is
/// [`FetchOutcome::NoPath`].
pub(crate) fn fetch<H: Host, M: GuestPteMemory>(
    core: &MmuCore<H>,
    stats: &ShadowStats,
    st: &mut ShadowState,
    root: &ShadowRoot,
    fault: &ShadowFault<'_, M>,
) -> FetchOutcome {
    let ShadowFault { gva, access, walk, nonpaging, want, mem, .. } = *fault;
    let pf = &fault.prefetch;
    let vgfn = Gfn(gva.raw() >> 12);
    let fmt = core.cfg.format;
    let Some((mut cur, mut level)) = root.start(gva) else {
        return FetchOutcome::Retry(RetryCause::Race);
    };
    // The staleness check again, on the page the walk starts from (for a special root, the
    // level-2 page its entry links, which a zap-all obsoletes like any page). KVM's `fetch`
    // has no such check; `Bug::NoStaleRootCheck` drops it with the fault path's.
    if st.is_obsolete(cur) && !core.cfg.bugs.has(Bug::NoStaleRootCheck) {
        return FetchOutcome::Retry(RetryCause::ObsoleteRoot);
    }
    let mmio = matches!(want, LeafWant::Mmio(_)) && core.cfg.shadow_mmio_path_only;
    if !mmio {
        st.sp_mut(cur).flood = 0;
    }
    let as_id = st.sp(cur).role.as_id();
    // Every page under a root serves the CR0.WP of the guest the root was built for.
    let wp = st.sp(cur).role.cr0_wp();
    while level > Level::L4K {
        let Some(child_level) = level.lower() else { break };
        let idx = level.index(vgfn);
        // KVM `FNAME(gpte_changed)` before `link_shadow_page`: the gPTE this entry shadows is
        // re-read now that its table is write-protected, before anything is linked for it. (An
        // MMIO leaf that builds no page links nothing: the check before its leaf is enough.)
        if !mmio && gpte_changed_at(core, st, walk, mem, nonpaging, level) {
            return FetchOutcome::Retry(RetryCause::Race);
        }
        let (gfn, role) = if !nonpaging && child_level >= walk.level {
            let i = usize::from(child_level.get() - 1);
            let access = table_role_access(core.cfg.bugs, walk, i);
            (
                walk.table_gfns[i],
                SpRole::new(child_level, SpKind::Indirect, access, as_id).with_cr0_wp(wp),
            )
        } else {
            let acc = if nonpaging { Access::ALL } else { walk.pte_access };
            let role = SpRole::new(child_level, SpKind::Direct, acc, as_id).with_cr0_wp(wp);
            (direct_base(walk.gfn, child_level), role)
        };
        let old = st.entry(core, cur, idx).load(crate::sync::Ordering::Acquire);
        if SpteFormat::is_mmu_present(old) && !fmt.is_leaf(old, level) {
            if let Some(child) = st.by_pfn(fmt.pfn(old)) {
                let c = st.sp(child);
                if c.gfn == gfn && c.role == role {
                    if !mmio {
                        st.sp_mut(child).flood = 0;
                    }
                    cur = child;
                    level = child_level;
                    continue;
                }
            }
        }
        if mmio {
            return FetchOutcome::NoPath;
        }
        if old != SpteFormat::NONPRESENT {
            // A child of another gfn or role, a leaf, or an MMIO SPTE: unlink it first.
            let dropped = st.drop_spte(core, cur, idx);
            st.owe_flush(dropped);
        }
        let child = match st.get_page(core, stats, gfn, role) {
            Ok((child, _new)) => child,
            Err(NewPageError::NoFrame) => return FetchOutcome::OutOfMemory,
            Err(NewPageError::NoHeap) => return FetchOutcome::OutOfHeap,
        };
        if st.link(core, cur, idx, child).is_err() {
            return FetchOutcome::OutOfHeap;
        }
        cur = child;
        level = child_level;
    }
    // Whatever was dropped or write-protected on the way is flushed before the leaf goes in.
    st.flush_now(core);
    // The leaf's own gPTE (a guest 4 KiB page: the entry of the last-level table); below a
    // guest huge page the loop re-read the huge entry before it linked the direct page. An MMIO
    // leaf that builds no page skipped the loop's checks: every level the walk read, now.
    let recheck =
        if mmio { walk.level.get()..=walk.max_level.get() } else { level.get()..=level.get() };
    if recheck.filter_map(Level::new).any(|l| gpte_changed_at(core, st, walk, mem, nonpaging, l)) {
        return FetchOutcome::Retry(RetryCause::Race);
    }
    let outcome = install_leaf(core, st, cur, vgfn, walk, access, want, pf.set);
    // KVM prefetches after every `mmu_set_spte` but a spurious one; after an MMIO SPTE only
    // with MMIO caching on, which this MMU leaves out (see `prefetch`).
    let ram = matches!(want, LeafWant::Ram { .. });
    if ram && matches!(outcome, FetchOutcome::Installed { .. } | FetchOutcome::WriteProtected) {
        let idx = Level::L4K.index(vgfn);
        prefetch(core, st, cur, idx, walk.pte_gpas[0], pf, mem);
    }
    outcome
}

/// KVM `FNAME(gpte_changed)` for the guest table the shadow walk is in at `level`: whether the
/// gPTE the guest walk read there differs from what guest memory holds now. Only a level whose
/// shadow page shadows a guest table the walk read from memory has one: not without paging, not
/// below a guest huge page (direct pages), not the PAE PDPTE (a register loaded with CR3). The
/// table is write-protected (it has a shadow page); if that protection is not flushed yet, it is
/// flushed first, so no vCPU writes the table through a stale writable translation after the
/// re-read (KVM's `account_shadowed` flushes at once).
fn gpte_changed_at<H: Host, M: GuestPteMemory>(
    core: &MmuCore<H>,
    st: &mut ShadowState,
    walk: &GuestWalk,
    mem: &M,
    nonpaging: bool,
    level: Level,
) -> bool {
    let pae_pdpte = walk.max_level == Level::L1G && level == Level::L1G;
    if nonpaging || level < walk.level || level > walk.max_level || pae_pdpte {
        return false;
    }
    st.flush_now(core);
    let i = usize::from(level.get() - 1);
    mem.read_gpte(walk.pte_gpas[i]) != Some(walk.ptes[i])
}

#[allow(clippy::too_many_arguments)]
fn install_leaf<H: Host>(
    core: &MmuCore<H>,
    st: &mut ShadowState,
    sp: SpId,
    vgfn: Gfn,
    walk: &GuestWalk,
    access: FaultAccess,
    want: LeafWant,
    set: &MemslotSet,
) -> FetchOutcome {
    let idx = Level::L4K.index(vgfn);
    let old = st.entry(core, sp, idx).load(crate::sync::Ordering::Acquire);
    match want {
        LeafWant::Mmio(spte) => {
            if old == spte {
                return FetchOutcome::Spurious;
            }
            // An MMIO SPTE is not present: it takes no rmap entry, and nothing can fail.
            let Ok(dropped) = st.set_leaf(core, sp, idx, spte, walk.gfn) else {
                return FetchOutcome::OutOfHeap;
            };
            // aad885e77496: the present SPTE the MMIO SPTE replaced is flushed.
            if !core.cfg.bugs.has(Bug::MmioOverPresentSpte) {
                st.owe_flush(dropped);
            }
            FetchOutcome::Installed { writable: false }
        }
        LeafWant::Ram { pfn, writable, slot } => {
            let tracked =
                st.is_write_tracked(walk.gfn) && !core.cfg.bugs.has(Bug::ShadowTableLeftWritable);
            let guest_w = walk.pte_access.contains(Access::WRITE);
            let w = writable && guest_w && !tracked;
            let new = core.cfg.format.make_leaf(pfn, Level::L4K, walk.pte_access, w);
            if w {
                // Dirty logging (KVM `make_spte`): marked before the leaf is stored, so no
                // vCPU writes through it while the bit is clear; a collection's GET reads the
                // bitmap without the shadow lock (`vcpu::fault_path`'s `mark_before_map` says
                // why the order matters). Spurious if nothing changes below, as in KVM.
                set.mark_page_dirty(&slot, walk.gfn);
            }
            let outcome = if access.write && guest_w && tracked {
                FetchOutcome::WriteProtected
            } else if old == new {
                return FetchOutcome::Spurious;
            } else {
                FetchOutcome::Installed { writable: w }
            };
            if old != new {
                match st.set_leaf(core, sp, idx, new, walk.gfn) {
                    Ok(flush) => st.owe_flush(flush),
                    Err(HeapExhausted) => return FetchOutcome::OutOfHeap,
                }
            }
            outcome
        }
    }
}
