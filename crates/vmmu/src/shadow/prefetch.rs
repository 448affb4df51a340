//! Prefetching neighbour SPTEs after a fault installed a 4 KiB leaf (KVM `FNAME(pte_prefetch)`
//! for a page that shadows a guest table, `__direct_pte_prefetch` for a direct page: below a
//! guest 2 MiB or 1 GiB page, or without guest paging), under the shadow lock.
//!
//! Rules (KVM v6.18 `paging_tmpl.h` / `mmu.c`, measured on /dev/kvm):
//! - Only a level-1 page, only the 8-aligned group of SPTEs around the faulting one
//!   (`PTE_PREFETCH_NUM`), only entries that are not present (an MMIO SPTE counts as not
//!   present), and not while a host invalidation is in progress.
//! - Indirect: the group's guest PTEs, in order; the first one that cannot be prefetched ends
//!   the prefetch, and the first one that does not qualify also loses its SPTE (an MMIO SPTE
//!   there goes, `prefetch_invalid_gpte`). A guest PTE qualifies when present, **accessed** and
//!   free of reserved bits; its rights are the page's role access ANDed with the gPTE's,
//!   without W unless the gPTE is dirty (`protect_clean_gpte`).
//! - Direct: the runs of not-present entries between the faulting and present ones, each from the
//!   page's linear range with the role's access; a run that cannot be prefetched at all ends the
//!   prefetch, a partly prefetched one does not.
//! - A run of `n` frames from `gfn` (KVM `kvm_mmu_prefetch_sptes`): the memslot of `gfn` (visible,
//!   not being deleted), not dirty-logged if the rights include W, not read-only, holding all `n`
//!   frames from `gfn`; then the leading frames the host maps writable already, without faulting
//!   (a fast write-GUP: [`HostMemory::translate_mapped_writable`]); none of them: the run fails.
//!   Each becomes a leaf with those rights; W also needs the gfn not to be a shadowed guest table.
//!   So a prefetched leaf never dirties a page, but it keeps the next read of that page from
//!   faulting: after dirty logging starts, a read fault of a written page in a logged slot maps
//!   it writable and dirties it; a prefetched (then write-protected) leaf does not.
//!
//! Deliberately not modelled: KVM also prefetches after installing an MMIO SPTE (MMIO caching
//! on). The reference KVM here runs with MMIO caching off (no MMIO SPTE, so no prefetch after an
//! MMIO fault), and no MMU setting may change an observation, so this MMU prefetches only after
//! a RAM leaf, with MMIO caching on or off.

use super::pages::{ShadowState, SpId};
use crate::guest::pte::{self, RsvdMasks, TableFormat};
use crate::guest::{GuestCpu, GuestPteMemory, PagingMode};
use crate::host::{Host, HostMemory};
use crate::invalidate::Invalidation;
use crate::memslot::{Memslot, MemslotSet};
use crate::mmu_core::MmuCore;
use crate::spte::SpteFormat;
use crate::types::{Access, Gfn, Gpa, Level};

/// KVM `PTE_PREFETCH_NUM`.
pub(crate) const PREFETCH_NUM: usize = 8;

/// What prefetching needs besides the shadow state: the fault's memslot set and the guest CPU
/// (for the reserved bits of the neighbour gPTEs).
pub(crate) struct PrefetchCtx<'a> {
    pub(crate) set: &'a MemslotSet,
    pub(crate) cpu: &'a GuestCpu,
    pub(crate) inval: &'a Invalidation,
}

/// Prefetches around SPTE `idx` of level-1 page `sp`, whose leaf the fault just installed;
/// `leaf_gpte_gpa` is where the walk read the guest PTE of that leaf (indirect pages only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn prefetch<'a, H: Host>(
    core: &MmuCore<H>,
    st: &mut ShadowState,
    sp: SpId,
    idx: usize,
    leaf_gpte_gpa: Gpa,
    ctx: &PrefetchCtx<'a>,
    mem: &impl GuestPteMemory,
) {
    let role = st.sp(sp).role;
    if role.level() != Level::L4K || ctx.inval.in_progress() != 0 {
        return;
    }
    let first = idx & !(PREFETCH_NUM - 1);
    let mut last = None;
    if role.direct() {
        let base = st.sp(sp).gfn.raw();
        let spt = st.sp(sp).spt;
        // SAFETY: the page is live (in the slab) and we hold the shadow lock (`st`): only
        // `commit_zap` queues a frame for freeing, once its page left the slab, and only the
        // functions that take the lock call it, after this returns (`MmuCore::table`'s second
        // case); the reference is not kept past this function.
        let Some(table) = (unsafe { core.table(spt) }) else {
            unreachable!("shadow page frame {spt:?} unknown to the host")
        };
        let present = |j: u64| {
            SpteFormat::is_mmu_present(table[j as usize].load(crate::sync::Ordering::Acquire))
        };
        direct_runs(idx as u64, present, |s, n| {
            let gfn = Gfn(base + s);
            let access = role.access();
            run(core, st, sp, s as usize, n as usize, gfn, access, ctx, &mut last) as u64
        });
        return;
    }
    let format = match ctx.cpu.mode {
        PagingMode::Long4 => TableFormat::Long4,
        PagingMode::Pae { .. } => TableFormat::Pae,
        // Without guest paging every page is direct.
        PagingMode::NonPaging => return,
    };
    let masks = RsvdMasks::of(format, ctx.cpu);
    let addr_mask = pte::addr_mask(ctx.cpu.maxphyaddr);
    let group = leaf_gpte_gpa.raw() & !(8 * PREFETCH_NUM as u64 - 1);
    for (i, j) in (first..first + PREFETCH_NUM).enumerate() {
        if j == idx || present(core, st, sp, j) {
            continue;
        }
        let Some(gpte) = mem.read_gpte(Gpa(group + 8 * i as u64)) else { return };
        let usable = gpte & pte::P != 0
            && gpte & pte::A != 0
            && masks.reserved_bits_set(Level::L4K, gpte) == 0;
        if !usable {
            // KVM `FNAME(prefetch_invalid_gpte)`: the entry's SPTE goes too. It is not present,
            // but it may be an MMIO SPTE made for what the gPTE said before a change the write
            // tracking never saw (the host or a device wrote the table, not the guest).
            let _ = st.drop_spte(core, sp, j);
            return;
        }
        let mut access = role.access().intersect(pte::gpte_access(gpte));
        if gpte & pte::D == 0 {
            access = Access::from_bits(access.bits() & !Access::WRITE.bits());
        }
        let gfn = Gfn((gpte & addr_mask) >> crate::types::PAGE_SHIFT);
        if run(core, st, sp, j, 1, gfn, access, ctx, &mut last) == 0 {
            return;
        }
    }
}

/// KVM `__direct_pte_prefetch`'s walk of the 8-aligned group around entry `fault` (numbered as
/// the caller likes: a table index, a gfn): each run of entries that are neither `fault` nor
/// `present` goes to `run(start, len)`, in order, and a run that makes no leaf ends the walk.
/// The shadow MMU's direct pages and the TDP MMU's legacy prefetch
/// ([`crate::vm::VmConfig::tdp_prefetch`]) both walk this way.
pub(crate) fn direct_runs(
    fault: u64,
    present: impl Fn(u64) -> bool,
    mut run: impl FnMut(u64, u64) -> u64,
) {
    let group = PREFETCH_NUM as u64;
    let first = fault & !(group - 1);
    let mut start = None;
    for j in first..first + group {
        if j == fault || present(j) {
            if let Some(s) = start.take() {
                if run(s, j - s) == 0 {
                    return;
                }
            }
        } else if start.is_none() {
            start = Some(j);
        }
    }
    if let Some(s) = start {
        let _ = run(s, first + group - s);
    }
}

/// The slot a prefetch run of `n` frames from `gfn` may take them from (KVM
/// `kvm_mmu_prefetch_sptes`' checks): visible and not being deleted, not read-only, not
/// dirty-logged when the rights include W (`write`), and holding all `n` frames.
pub(crate) fn run_slot(set: &MemslotSet, gfn: Gfn, n: u64, write: bool) -> Option<&Memslot> {
    run_slot_near(set, gfn, n, write, &mut None)
}

/// [`run_slot`], trying `last` (the visible slot an earlier run of the same prefetch found in
/// `set`) before searching `set`, and leaving there the slot it found: a prefetch group's
/// frames nearly always come from one slot.
fn run_slot_near<'a>(
    set: &'a MemslotSet,
    gfn: Gfn,
    n: u64,
    write: bool,
    last: &mut Option<&'a Memslot>,
) -> Option<&'a Memslot> {
    let slot = set.find_visible_near(gfn, *last)?;
    *last = Some(slot);
    let refused = slot.is_readonly() || (write && slot.dirty_logging());
    let usable = !refused && slot.end_gfn().raw() - gfn.raw() >= n;
    usable.then_some(slot)
}

/// Whether SPTE `j` of `sp` is present (an MMIO SPTE is not).
fn present<H: Host>(core: &MmuCore<H>, st: &ShadowState, sp: SpId, j: usize) -> bool {
    SpteFormat::is_mmu_present(st.entry(core, sp, j).load(crate::sync::Ordering::Acquire))
}

/// KVM `kvm_mmu_prefetch_sptes`: leaves for up to `n` frames from `gfn` at SPTEs `j..j + n` of
/// `sp` with rights `access`; returns how many it made (0: the run failed).
#[allow(clippy::too_many_arguments)]
fn run<'a, H: Host>(
    core: &MmuCore<H>,
    st: &mut ShadowState,
    sp: SpId,
    j: usize,
    n: usize,
    gfn: Gfn,
    access: Access,
    ctx: &PrefetchCtx<'a>,
    last: &mut Option<&'a Memslot>,
) -> usize {
    let write = access.contains(Access::WRITE);
    let Some(slot) = run_slot_near(ctx.set, gfn, n as u64, write, last) else { return 0 };
    let host: &dyn HostMemory = &*core.host;
    let mut made = 0;
    for k in 0..n {
        let g = Gfn(gfn.raw() + k as u64);
        let pfn = host.translate_mapped_writable(slot.hva_of(g));
        let Some(pfn) = pfn.filter(|&p| core.cfg.format.holds_pfn(p)) else { break };
        let w = write && !st.is_write_tracked(g);
        let leaf = core.cfg.format.make_leaf(pfn, Level::L4K, access, w);
        // Out of heap for the rmap: prefetching is optional, the fault itself is done.
        let Ok(flush) = st.set_leaf(core, sp, j + k, leaf, g) else { break };
        st.owe_flush(flush);
        made += 1;
    }
    made
}
