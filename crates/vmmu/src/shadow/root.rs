//! A vCPU's shadow roots (shadow facts §5-§6): a root shadow page for a 4-level guest, or a
//! *special* root for a PAE guest or a guest without paging (KVM `pae_root`: a page of four
//! PDPTE-level entries that has no shadow page of its own, each entry linking a level-2 shadow
//! page that the root pins). Previous roots of a 4-level guest are kept for CR3 switches (KVM
//! `prev_roots`, 3 entries; special roots are never kept).
//!
//! Invariants: a root pins every shadow page it links (`root_count`), so none of them is freed
//! while the vCPU may walk it; a special root lives in its vCPU's one PAE root frame (KVM
//! `mmu->pae_root`, allocated with the vCPU's first special root and freed with the vCPU: later
//! special roots allocate nothing), whose entries are all 0 whenever no special root is loaded;
//! only the vCPU's own thread writes or walks that frame (a special root's entries are not
//! parent links of the pages they point to, so no zap writes them); a special root is stale
//! exactly while a free-obsolete-roots request is pending for its vCPU (it has no page to mark
//! obsolete).

use super::pages::{NewPageError, ShadowState, SpId};
use super::role::{SpKind, SpRole};
use crate::fault::RootState;
use crate::guest::{GuestCpu, PagingMode};
use crate::host::Host;
use crate::mmu_core::MmuCore;
use crate::spte::SpteFormat;
use crate::types::{Access, AsId, Gfn, Level, Pfn};

/// KVM `KVM_MMU_NUM_PREV_ROOTS`.
pub const NUM_PREV_ROOTS: usize = 3;

/// Which kind of root a vCPU walks from (for reports and tests).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShadowRootKind {
    /// A root shadow page (4-level guest).
    Page,
    /// A special root without a shadow page (PAE guest, or no paging).
    Special,
}

/// A vCPU's current shadow root.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ShadowRoot {
    /// A root shadow page for guest CR3 `cr3`.
    Page { sp: SpId, pfn: Pfn, cr3: u64 },
    /// A special root: the vCPU's PAE root frame, and the level-2 pages its four entries link.
    Special { pfn: Pfn, sps: [Option<SpId>; 4] },
}

/// A previous root kept for a CR3 switch back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct PrevRoot {
    pub(crate) cr3: u64,
    pub(crate) sp: SpId,
    pub(crate) pfn: Pfn,
}

/// The previous-root cache of one shadow vCPU (KVM `mmu->prev_roots`, [`NUM_PREV_ROOTS`]
/// entries), most recently used first, for a CR3 switch back without a rebuild. Each entry pins
/// its page as a current root does; special roots never enter it (they have no page).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct PrevRoots([Option<PrevRoot>; NUM_PREV_ROOTS]);

impl PrevRoots {
    /// KVM `cached_root_find_and_keep_current`, the fast switch from current root `cur`: `cur`
    /// takes the first slot and each entry moves one slot down, until the entry taken out is
    /// one `usable` accepts: `Ok` with it, the new current root. A miss is `Err` with what fell
    /// off the end (to release). Slots keep their places otherwise: one emptied when its root
    /// was freed stays empty until the rotation reaches it, and a miss evicts whatever the last
    /// slot holds, however recent the others.
    pub(crate) fn find_and_keep_current(
        &mut self,
        cur: PrevRoot,
        usable: impl Fn(&PrevRoot) -> bool,
    ) -> Result<PrevRoot, Option<PrevRoot>> {
        let mut out = Some(cur);
        for slot in self.0.iter_mut() {
            core::mem::swap(&mut out, slot);
            if let Some(p) = out.filter(&usable) {
                return Ok(p);
            }
        }
        Err(out)
    }

    /// KVM `cached_root_find_without_current`, the fast switch with no current root to keep:
    /// the first entry `usable` accepts comes out and the later ones move up a slot; a miss
    /// changes nothing.
    pub(crate) fn find_without_current(
        &mut self,
        usable: impl Fn(&PrevRoot) -> bool,
    ) -> Option<PrevRoot> {
        let i = self.0.iter().position(|p| p.is_some_and(|p| usable(&p)))?;
        let found = self.0[i].take();
        self.0[i..].rotate_left(1);
        found
    }

    /// Takes out every entry `pred` accepts (KVM `kvm_mmu_free_obsolete_roots` for the
    /// previous roots), leaving its slot empty, and returns them to release (no heap: a vCPU
    /// drops roots when it has none to spare).
    pub(crate) fn take_where(
        &mut self,
        mut pred: impl FnMut(&PrevRoot) -> bool,
    ) -> [Option<ShadowRoot>; NUM_PREV_ROOTS] {
        self.0.each_mut().map(|slot| slot.take_if(|p| pred(p)).map(ShadowRoot::from))
    }
}

impl From<PrevRoot> for ShadowRoot {
    fn from(p: PrevRoot) -> Self {
        ShadowRoot::Page { sp: p.sp, pfn: p.pfn, cr3: p.cr3 }
    }
}

impl ShadowRoot {
    /// The frame and level the hardware walk starts from.
    #[inline]
    pub(crate) fn hw_root(&self) -> (Pfn, Level) {
        match *self {
            ShadowRoot::Page { pfn, .. } => (pfn, Level::L4),
            ShadowRoot::Special { pfn, .. } => (pfn, Level::L1G),
        }
    }

    /// The page a software walk for `gva` starts from, and its level: the root page, or the
    /// level-2 page a special root links for the gva's quarter of 4 GiB (`None` when it links
    /// none).
    pub(crate) fn start(&self, gva: crate::types::Gva) -> Option<(SpId, Level)> {
        match *self {
            ShadowRoot::Page { sp, .. } => Some((sp, Level::L4)),
            ShadowRoot::Special { sps, .. } => {
                sps[((gva.raw() >> 30) & 3) as usize].map(|sp| (sp, Level::L2M))
            }
        }
    }

    /// The kind.
    pub(crate) fn kind(&self) -> ShadowRootKind {
        match self {
            ShadowRoot::Page { .. } => ShadowRootKind::Page,
            ShadowRoot::Special { .. } => ShadowRootKind::Special,
        }
    }

    /// What the staleness check needs (KVM `is_page_fault_stale`): a root page made before the
    /// last fast zap-all, or zapped, is obsolete; a special root has no page.
    pub(crate) fn state(&self, st: &ShadowState) -> RootState {
        match *self {
            ShadowRoot::Page { sp, .. } if st.is_obsolete(sp) => RootState::Obsolete,
            ShadowRoot::Page { .. } => RootState::Valid,
            ShadowRoot::Special { .. } => RootState::NoPage,
        }
    }

    /// Whether the vCPU must drop the root on a free-obsolete-roots request (KVM
    /// `kvm_mmu_free_obsolete_roots`: a special root counts as obsolete, facts §6.2).
    pub(crate) fn is_obsolete(&self, st: &ShadowState) -> bool {
        match *self {
            ShadowRoot::Page { sp, .. } => st.is_obsolete(sp),
            ShadowRoot::Special { .. } => true,
        }
    }

    /// Unpins what the root pins; a special root's entries are cleared, so its frame (the
    /// vCPU's, kept for the next special root) links nothing. Called by the vCPU's own thread
    /// outside guest mode.
    pub(crate) fn release<H: Host>(self, core: &MmuCore<H>, st: &mut ShadowState) {
        match self {
            ShadowRoot::Page { sp, .. } => st.put_root(core, sp),
            ShadowRoot::Special { pfn, sps } => {
                // SAFETY: `pfn` is the vCPU's PAE root frame, freed only when the vCPU drops,
                // after its last release (module invariant).
                if let Some(t) = unsafe { core.table(pfn) } {
                    for (i, sp) in sps.iter().enumerate() {
                        if sp.is_some() {
                            t[i].store(SpteFormat::NONPRESENT, crate::sync::Ordering::Release);
                        }
                    }
                }
                for sp in sps.into_iter().flatten() {
                    st.put_root(core, sp);
                }
            }
        }
    }

    /// Whether the root for `cpu` is a special root (in `pae_root`): a PAE guest's, one without
    /// paging, or a 4-level guest's whose CR3 names a frame `visible` says no memslot holds
    /// (KVM v6.6's dummy root: no shadow page shadows, and so write-tracks, a frame that is not
    /// guest memory).
    pub(crate) fn is_special_for(cpu: &GuestCpu, visible: &dyn Fn(Gfn) -> bool) -> bool {
        match cpu.mode {
            PagingMode::Long4 => !visible(Self::cr3_gfn(cpu)),
            PagingMode::Pae { .. } | PagingMode::NonPaging => true,
        }
    }

    fn cr3_gfn(cpu: &GuestCpu) -> Gfn {
        Gfn((cpu.cr3 & crate::guest::pte::addr_mask(cpu.maxphyaddr)) >> 12)
    }

    /// Builds the root for `cpu` in address space `as_id` (KVM `mmu_alloc_shadow_roots`), under
    /// the shadow lock; a special root fills `pae_root`, the vCPU's PAE root frame, which no
    /// loaded root uses. `visible` says whether a memslot (not being deleted or moved) holds a
    /// gfn: a guest table outside guest memory gets no shadow page (a PAE PDPTE naming one
    /// leaves its entry 0; a 4-level CR3 naming one gets a special root with every entry 0, KVM's
    /// dummy root), so no device frame is write-tracked; a fault that later finds the table
    /// visible reloads the root ([`Self::start`] gives `None`). Without a `pae_root` (a host with
    /// no frame below 4 GiB) such a 4-level CR3 gets a root page as any other. `Err`: the host
    /// had no frame for a shadow page (or a PAE or non-paging root needs `pae_root` and it is
    /// `None`: `NoFrame`), or the heap no room for its bookkeeping (`NoHeap`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn alloc<H: Host>(
        core: &MmuCore<H>,
        stats: &super::ShadowStats,
        st: &mut ShadowState,
        cpu: &GuestCpu,
        as_id: AsId,
        pae_root: Option<Pfn>,
        visible: &dyn Fn(Gfn) -> bool,
    ) -> Result<ShadowRoot, NewPageError> {
        let pae_root = pae_root.ok_or(NewPageError::NoFrame);
        match cpu.mode {
            PagingMode::Long4 if pae_root.is_ok() && !visible(Self::cr3_gfn(cpu)) => {
                Self::alloc_special(core, stats, st, pae_root?, [None; 4])
            }
            PagingMode::Long4 => {
                let gfn = Self::cr3_gfn(cpu);
                let role = SpRole::new(Level::L4, SpKind::Indirect, Access::ALL, as_id)
                    .with_cr0_wp(cpu.cr0_wp);
                let (sp, _) = st.get_page(core, stats, gfn, role)?;
                let s = st.sp_mut(sp);
                s.root_count += 1;
                s.flood = 0;
                Ok(ShadowRoot::Page { sp, pfn: s.spt, cr3: cpu.cr3 })
            }
            PagingMode::Pae { pdptrs } => {
                // Entry i shadows the guest's PDPTE i; a PDPTE that is not present, or names a
                // table outside guest memory, leaves it 0.
                let role = SpRole::new(Level::L2M, SpKind::Indirect, Access::ALL, as_id)
                    .with_cr0_wp(cpu.cr0_wp);
                let mask = crate::guest::pte::addr_mask(cpu.maxphyaddr);
                let pages = pdptrs.map(|pdpte| {
                    let gfn = Gfn((pdpte & mask) >> 12);
                    (pdpte & crate::guest::pte::P != 0 && visible(gfn)).then_some((gfn, role))
                });
                Self::alloc_special(core, stats, st, pae_root?, pages)
            }
            PagingMode::NonPaging => {
                // Four direct level-2 pages cover the 4 GiB a guest without paging reaches.
                let role = SpRole::new(Level::L2M, SpKind::Direct, Access::ALL, as_id)
                    .with_cr0_wp(cpu.cr0_wp);
                let pages = core::array::from_fn(|i| Some((Gfn((i as u64) << 18), role)));
                Self::alloc_special(core, stats, st, pae_root?, pages)
            }
        }
    }

    /// A special root (KVM `pae_root`, which has no shadow page of its own) in `pfn`, the vCPU's
    /// PAE root frame (below 4 GiB: the guest runs in PAE paging on it, and a PAE CR3 names only
    /// such frames; KVM allocates it with `__GFP_DMA32`): entry `i` links the level-2 page that
    /// `pages[i]` keys, pinned by the root (`None`: the entry stays 0). `Err`: why a shadow page
    /// could not be made; nothing is pinned or linked then.
    ///
    /// Every page is got before any is pinned: getting one calls the host (`alloc_table`), which
    /// may unwind, and pages pinned by a root that never came to be would stay pinned for good
    /// (`tests/embedder_hostile_impls.rs`). Pages got before a failure stay as unpinned pages,
    /// which recycling or a zap frees.
    fn alloc_special<H: Host>(
        core: &MmuCore<H>,
        stats: &super::ShadowStats,
        st: &mut ShadowState,
        pfn: Pfn,
        pages: [Option<(Gfn, SpRole)>; 4],
    ) -> Result<ShadowRoot, NewPageError> {
        let mut sps = [None; 4];
        for (sp, page) in sps.iter_mut().zip(pages) {
            if let Some((gfn, role)) = page {
                *sp = Some(st.get_page(core, stats, gfn, role)?.0);
            }
        }
        for (i, sp) in sps.iter().enumerate() {
            if let Some(sp) = *sp {
                Self::link_special(core, st, pfn, i, sp);
            }
        }
        Ok(ShadowRoot::Special { pfn, sps })
    }

    /// Entry `i` of special root `root` links `sp`, which the root pins.
    fn link_special<H: Host>(
        core: &MmuCore<H>,
        st: &mut ShadowState,
        root: Pfn,
        i: usize,
        sp: SpId,
    ) {
        let s = st.sp_mut(sp);
        s.root_count += 1;
        let link = core.cfg.format.make_pae_root_entry(s.spt);
        // SAFETY: `root` is the vCPU's PAE root frame, freed only when the vCPU drops (module
        // invariant); the vCPU is outside guest mode, so nothing walks it meanwhile.
        if let Some(t) = unsafe { core.table(root) } {
            t[i].store(link, crate::sync::Ordering::Release);
        }
        debug_assert!(SpteFormat::is_mmu_present(link));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn root(cr3: u64) -> PrevRoot {
        PrevRoot { cr3, sp: SpId(cr3 as u32), pfn: Pfn(cr3) }
    }

    fn cr3s(p: &PrevRoots) -> [Option<u64>; NUM_PREV_ROOTS] {
        p.0.map(|r| r.map(|r| r.cr3))
    }

    #[test]
    fn a_switch_keeps_the_current_root_first_and_evicts_the_last_on_a_miss() {
        let mut p = PrevRoots([Some(root(1)), Some(root(2)), Some(root(3))]);
        // Hit on the second entry: 9 goes first, 1 moves down, 2 comes out.
        assert_eq!(p.find_and_keep_current(root(9), |r| r.cr3 == 2), Ok(root(2)));
        assert_eq!(cr3s(&p), [Some(9), Some(1), Some(3)]);
        // Miss: everything moves down a slot, the last falls off.
        assert_eq!(p.find_and_keep_current(root(8), |r| r.cr3 == 7), Err(Some(root(3))));
        assert_eq!(cr3s(&p), [Some(8), Some(9), Some(1)]);
    }

    #[test]
    fn an_empty_slot_keeps_its_place_until_the_rotation_reaches_it() {
        let mut p = PrevRoots([Some(root(1)), None, Some(root(3))]);
        // The empty slot moves down with the rest; on a miss the last root falls off.
        assert_eq!(p.find_and_keep_current(root(9), |_| false), Err(Some(root(3))));
        assert_eq!(cr3s(&p), [Some(9), Some(1), None]);
        // A hit past the empty slot moves it down too.
        let mut p = PrevRoots([Some(root(1)), None, Some(root(3))]);
        assert_eq!(p.find_and_keep_current(root(9), |r| r.cr3 == 3), Ok(root(3)));
        assert_eq!(cr3s(&p), [Some(9), Some(1), None]);
    }

    #[test]
    fn without_a_current_root_a_hit_moves_the_later_entries_up_and_a_miss_changes_nothing() {
        let mut p = PrevRoots([Some(root(1)), Some(root(2)), Some(root(3))]);
        assert_eq!(p.find_without_current(|r| r.cr3 == 7), None);
        assert_eq!(cr3s(&p), [Some(1), Some(2), Some(3)]);
        assert_eq!(p.find_without_current(|r| r.cr3 == 2), Some(root(2)));
        assert_eq!(cr3s(&p), [Some(1), Some(3), None]);
    }

    #[test]
    fn take_where_empties_the_slots_it_takes() {
        let mut p = PrevRoots([Some(root(1)), Some(root(2)), Some(root(3))]);
        let out: Vec<_> = p.take_where(|r| r.cr3 != 2).into_iter().flatten().collect();
        assert_eq!(cr3s(&p), [None, Some(2), None]);
        assert_eq!(out, [ShadowRoot::from(root(1)), ShadowRoot::from(root(3))]);
    }
}
