//! Guest writes to shadowed page tables (KVM `kvm_mmu_track_write`, shadow facts §4.3).
//!
//! A write the hypervisor emulated into a guest frame that valid shadow pages shadow drops the
//! SPTEs the write covers, or zaps the page when the write is misaligned (crosses an entry, or
//! is shorter than 4 bytes and not at an entry's start) or the page is flooded (three writes to
//! an upper-level table without the page being used in between). It flushes remote TLBs before
//! it returns when a present SPTE went. (INVLPG, and the invalidation before an injected #PF,
//! drop no leaf: `kvm_mmu_invalidate_addr` syncs only unsync pages, and this MMU has none.)
//!
//! The hypervisor may instead unprotect the frame (KVM `kvm_mmu_unprotect_gfn_and_retry`): every
//! valid shadow page of it is zapped, so nothing write-tracks the frame until a walk shadows it
//! again, and the guest's write, re-executed, maps it writable.

use super::ShadowMmu;
use crate::host::Host;
use crate::mmu_core::MmuCore;
use crate::types::{Gfn, Gpa, Level};

impl ShadowMmu {
    /// KVM `kvm_mmu_track_write`: `bytes` bytes were written at `gpa` (by a vCPU of either
    /// address space: the pages of both that shadow the frame are updated, as KVM's loop over
    /// the frame's pages ignores `role.smm`); `new_gpte` is the (8-byte) entry there now.
    pub(crate) fn track_write<H: Host>(
        &self,
        core: &MmuCore<H>,
        gpa: Gpa,
        bytes: u32,
        new_gpte: u64,
    ) {
        {
            let mut st = self.lock(core);
            // KVM counts every emulated write while any indirect page exists, whichever frame
            // it wrote, then looks for the pages that shadow that frame.
            if !st.has_indirect_pages() {
                return;
            }
            self.stats.mmu_pte_write.add(1);
            let gfn = gpa.gfn();
            if st.next_shadowing(gfn, 0).is_none() {
                return;
            }
            // KVM `mmu_pte_write_fetch_gpte`: with 8-byte gPTEs (PAE and 4-level paging, the
            // only modes whose tables are shadowed here) a 4-byte write to one half of a gPTE
            // (a 32-bit guest's two stores of an entry) is taken as the whole aligned entry
            // before the misaligned check. KVM widens every 4-byte write so; one at offset 5 to
            // 7 of an entry also changes the next entry's low bytes (present, writable, user,
            // frame bits 15:12), which that widening leaves shadowed as before (KVM's unsync
            // last-level pages hide it: the write does not trap, and INVLPG syncs the entry).
            // Here it is a misaligned write, which zaps the page.
            let (offset, bytes) = match bytes {
                4 if gpa.page_offset() & 3 == 0 => (gpa.page_offset() & !7, 8),
                b => (gpa.page_offset(), b),
            };
            // KVM `detect_write_misaligned`: a 1-byte write at an entry's start is allowed.
            let misaligned = (offset & 7) + u64::from(bytes) > 8
                || (bytes < 4 && !(bytes == 1 && offset & 7 == 0));
            if core.cfg.bugs.has(crate::bugs::Bug::TrackWriteKeepsSpte) {
                return;
            }
            // By position in the gfn's bucket, not a list of the pages: an emulated write needs
            // no heap. A zapped page leaves the bucket, so the next one takes its position.
            let mut from = 0;
            while let Some((pos, id)) = st.next_shadowing(gfn, from) {
                let level = st.sp(id).role.level();
                // KVM `detect_write_misaligned(..) || detect_write_flooding(..)`: a misaligned
                // write does not count towards flooding.
                let flooded = !misaligned && level > Level::L4K && {
                    let sp = st.sp_mut(id);
                    sp.flood = sp.flood.saturating_add(1);
                    sp.flood >= 3
                };
                if misaligned || flooded {
                    st.prepare_zap(core, &self.stats, id);
                    self.stats.mmu_flooded.add(1);
                    from = pos;
                    continue;
                }
                from = pos + 1;
                let idx = (offset / 8) as usize;
                let dropped = st.drop_spte(core, id, idx);
                st.owe_flush(dropped);
                if level > Level::L4K && new_gpte != 0 {
                    self.stats.mmu_pde_zapped.add(1);
                }
            }
            st.commit_zap(core, &self.stats);
        }
        core.reclaim_batched();
    }

    /// KVM `kvm_mmu_unprotect_gfn_and_retry`'s zap: zaps every valid shadow page, of either
    /// address space, that shadows guest frame `gfn` (`for_each_gfn_valid_sp_with_gptes`), and
    /// flushes remote TLBs before it returns if a present SPTE went. Whether a page was zapped.
    pub(crate) fn unprotect_gfn<H: Host>(&self, core: &MmuCore<H>, gfn: Gfn) -> bool {
        let zapped = {
            let mut st = self.lock(core);
            let mut zapped = false;
            // By position, as `track_write`: a zapped page leaves the bucket (an in-use root
            // stays, invalid, which `next_shadowing` skips).
            let mut from = 0;
            while let Some((pos, id)) = st.next_shadowing(gfn, from) {
                st.prepare_zap(core, &self.stats, id);
                zapped = true;
                from = pos;
            }
            st.commit_zap(core, &self.stats);
            zapped
        };
        core.reclaim_batched();
        zapped
    }
}
