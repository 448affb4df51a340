//! A vCPU's shadow roots (shadow facts §5-§6): a root shadow page for a 4-level guest, or a
//! *special* root for a PAE guest or a guest without paging (KVM `pae_root`: a page of four
//! PDPTE-level entries that has no shadow page of its own, each entry linking a level-2 shadow
//! page that the root pins). Previous roots of a 4-level guest are kept for CR3 switches (KVM
//! `prev_roots`, 3 entries; special roots are never kept).
//!
//! Invariants: a root pins every shadow page it links (`root_count`), so none of them is freed
//! while the vCPU may walk it; a special root's frame is private to its vCPU and freed after a
//! grace period when the vCPU drops it; a special root is stale exactly while a
//! free-obsolete-roots request is pending for its vCPU (it has no page to mark obsolete).

use super::pages::{ShadowState, SpId, ZapBatch};
use super::role::SpRole;
use crate::fault::RootState;
use crate::guest::{GuestCpu, PagingMode};
use crate::host::Host;
use crate::spte::SpteFormat;
use crate::tdp::TdpMmu;
use crate::types::{Access, AsId, Gfn, Level, Pfn};
use alloc::vec::Vec;

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
    /// A special root: its own frame, and the level-2 pages its four entries link.
    Special { pfn: Pfn, sps: [Option<SpId>; 4] },
}

/// A previous root kept for a CR3 switch back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct PrevRoot {
    pub(crate) cr3: u64,
    pub(crate) sp: SpId,
    pub(crate) pfn: Pfn,
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

    /// Unpins what the root pins; a special root's frame goes to `frames` (freed after a grace
    /// period by the caller).
    pub(crate) fn release<H: Host>(
        self,
        core: &TdpMmu<H>,
        st: &mut ShadowState,
        batch: &mut ZapBatch,
        frames: &mut Vec<Pfn>,
    ) {
        match self {
            ShadowRoot::Page { sp, .. } => st.put_root(core, sp, batch),
            ShadowRoot::Special { pfn, sps } => {
                for sp in sps.into_iter().flatten() {
                    st.put_root(core, sp, batch);
                }
                frames.push(pfn);
            }
        }
    }

    /// Builds the root for `cpu` in address space `as_id` (KVM `mmu_alloc_shadow_roots`), under
    /// the shadow lock. `None`: the host had no frame.
    pub(crate) fn alloc<H: Host>(
        core: &TdpMmu<H>,
        stats: &super::ShadowStats,
        st: &mut ShadowState,
        cpu: &GuestCpu,
        as_id: AsId,
        batch: &mut ZapBatch,
    ) -> Option<ShadowRoot> {
        match cpu.mode {
            PagingMode::Long4 => {
                let gfn = Gfn((cpu.cr3 & crate::guest::pte::addr_mask(cpu.maxphyaddr)) >> 12);
                let role =
                    SpRole::new(Level::L4, false, Access::ALL, as_id).with_cr0_wp(cpu.cr0_wp);
                let (sp, _) = st.get_page(core, stats, gfn, role, batch)?;
                let s = st.sp_mut(sp);
                s.root_count += 1;
                s.flood = 0;
                Some(ShadowRoot::Page { sp, pfn: s.spt, cr3: cpu.cr3 })
            }
            PagingMode::Pae { pdptrs } => {
                // CR3 holds 32 bits in PAE paging: the root lies below 4 GiB.
                let pfn = core.alloc_table_below_4g()?;
                let mut sps = [None; 4];
                for (i, pdpte) in pdptrs.iter().enumerate() {
                    if pdpte & crate::guest::pte::P == 0 {
                        continue;
                    }
                    let gfn = Gfn((pdpte & crate::guest::pte::addr_mask(cpu.maxphyaddr)) >> 12);
                    let role =
                        SpRole::new(Level::L2M, false, Access::ALL, as_id).with_cr0_wp(cpu.cr0_wp);
                    let Some((sp, _)) = st.get_page(core, stats, gfn, role, batch) else {
                        Self::Special { pfn, sps }.release(core, st, batch, &mut Vec::new());
                        core.free_unpublished_table(pfn);
                        return None;
                    };
                    sps[i] = Some(sp);
                    Self::link_special(core, st, pfn, i, sp);
                }
                Some(ShadowRoot::Special { pfn, sps })
            }
            PagingMode::NonPaging => {
                // Four direct level-2 pages cover the 4 GiB a guest without paging reaches; the
                // guest runs in PAE paging on them, so the root lies below 4 GiB too.
                let pfn = core.alloc_table_below_4g()?;
                let mut sps = [None; 4];
                for i in 0..sps.len() {
                    let role =
                        SpRole::new(Level::L2M, true, Access::ALL, as_id).with_cr0_wp(cpu.cr0_wp);
                    let Some((sp, _)) =
                        st.get_page(core, stats, Gfn((i as u64) << 18), role, batch)
                    else {
                        // Unpin the pages linked so far, as the PAE arm does.
                        Self::Special { pfn, sps }.release(core, st, batch, &mut Vec::new());
                        core.free_unpublished_table(pfn);
                        return None;
                    };
                    sps[i] = Some(sp);
                    Self::link_special(core, st, pfn, i, sp);
                }
                Some(ShadowRoot::Special { pfn, sps })
            }
        }
    }

    /// Entry `i` of special root `root` links `sp`, which the root pins.
    fn link_special<H: Host>(
        core: &TdpMmu<H>,
        st: &mut ShadowState,
        root: Pfn,
        i: usize,
        sp: SpId,
    ) {
        let s = st.sp_mut(sp);
        s.root_count += 1;
        let link = core.cfg.format.make_pae_root_entry(s.spt);
        // SAFETY: `root` is the vCPU's own special root frame, allocated above and not yet
        // reachable by anyone else.
        if let Some(t) = unsafe { core.table(root) } {
            t[i].store(link, crate::sync::Ordering::Release);
        }
        debug_assert!(SpteFormat::is_mmu_present(link));
    }
}
