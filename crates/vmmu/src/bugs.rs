//! Historical KVM bugs that a test build can switch back on, one at a time, to prove that the
//! checkers (loom models, the machine's oracle, named tests) would have caught them.
//!
//! A [`BugSet`] is carried by value in each subsystem's configuration (never a global, so tests
//! running in parallel cannot leak a bug into each other). Without the cargo feature
//! `historical-bugs`, [`BugSet::has`] is a constant `false` and every injection point compiles
//! away: normal builds cannot run a bug.

use core::fmt;

/// One re-injectable bug. Each names the KVM fix it undoes, except
/// [`Bug::LeafCacheIgnoresEpoch`], which undoes a check of vmmu's own.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum Bug {
    /// Undoes ee3d1570b586 "kvm: fix potentially corrupt mmio cache" (2014): the final generation
    /// is published together with the new set, with no in-progress marker and no second
    /// increment after the grace period.
    ///
    /// Harm here: a fault reads the memslot set once and tags what it decides with that set's
    /// generation, so KVM's 2014 mix (decision from the old set, generation from the new one)
    /// cannot happen; what remains is that the MMIO-generation wrap zap runs after the final
    /// generation is visible, so an access can hit a pre-wrap MMIO SPTE for a gfn that is RAM
    /// (`tests/catchers`, `catch_wrap_hook_vs_prewrap_spte`). `tests/loom_memslot.rs` catches
    /// the 2014 mix with a reader that reads the set twice, as KVM's `kvm_memslots()` users did.
    NoSecondIncrement = 0,
    /// Undoes ddfd1730fd82 "Do not cache MMIO accesses while memslots are in flux" (2019): the
    /// per-vCPU MMIO info cache is filled while an update is in progress.
    ///
    /// No harm in this design: the cache entry is tagged with the full 64-bit generation
    /// (in-progress flag included) of the very set the MMIO decision was made on, read in the
    /// same read section. An entry made in the window is tagged `G | IN_PROGRESS` and can hit
    /// only while that same set, with the same slots, is published with that same value: within
    /// the window, where it agrees with the set every reader sees. The final store makes the
    /// generation `G + nr_as`, which it never equals again (generations are 64-bit and unique
    /// per address space). KVM needed the fix because its decision and the generation it cached
    /// came from separate `kvm_memslots()` reads (an old-set decision could be tagged with the
    /// new set's in-progress value and hit during the window). `tests/catchers` keeps an
    /// invariant test of the fix (nothing is cached under an in-progress generation).
    CacheWhileInProgress = 1,
    /// Undoes 56f17dd3fbc4 "kvm: x86: fix stale mmio cache bug" (2014): the per-vCPU MMIO info
    /// cache ignores the generation.
    ///
    /// Harm: after a create puts RAM over a gpa the vCPU cached as MMIO (a create zaps nothing),
    /// the vCPU's next access there is answered from the cache entry and emulated as MMIO
    /// instead of reaching the new slot's frame.
    VcpuCacheWithoutGen = 2,
    /// Undoes 152482580a1b "Call kvm_arch_memslots_updated() before updating memslots" (2019):
    /// the wrap hook runs after the final generation is visible.
    ///
    /// Harm: between the store and the zap, an access matches a pre-wrap MMIO SPTE whose
    /// generation bits equal the post-wrap generation's and is emulated as MMIO for a gfn that is
    /// RAM in the set it reads.
    WrapHookAfterPublish = 3,
    /// Undoes c3e0c8c2e8b1 "Fully re-evaluate MMIO caching when SPTE masks change" (2022): a
    /// disable from an earlier mask sticks.
    ///
    /// Harm, in cost only: with EPT on a host whose MAXPHYADDR is 52 (the NPT default masks
    /// have no reserved PA bit, the EPT masks need none), MMIO caching stays off, so every access
    /// to an MMIO gpa takes an EPT violation and the slow path (a memslot lookup) where an MMIO
    /// SPTE would answer it; the access is still emulated at the right address. (In KVM, SEV-ES
    /// guests need MMIO caching; vmmu does not model them.)
    StickyCachingDisable = 4,
    /// Undoes the 2011 lockless-walk rule (ce88decffd17 thread): an entry zapped under a
    /// concurrent walk is reported as a genuine misconfiguration instead of Retry.
    ///
    /// Harm: an exit on an ordinary MMIO gpa whose SPTE a zap removed before the handler's walk
    /// fails the vCPU's run (KVM: -EINVAL from KVM_RUN) instead of retrying and then emulating.
    ZappedSpteIsMisconfig = 5,
    /// Undoes a955cad84cda / 18c841e1f411 "Retry page fault if root is invalidated" (2021): no
    /// stale-root check before installing an SPTE (neither the fault path's nor the shadow
    /// `fetch`'s check of the page its walk starts from, which KVM does not have).
    ///
    /// No harm in this design: the SPTE a fault installs into an obsolete root maps what the
    /// memslots and the host map at that moment, and nothing can make it stale while anyone can
    /// walk it. (1) A fault holds its memslot read section from the slot lookup to the install,
    /// so the delete or move of that slot cannot publish its second swap, nor even complete the
    /// grace period of its invalidating swap, while the fault is in flight; a fault that sees
    /// the slot invalid retries before the root check. (2) Host invalidations are caught by the
    /// notifier-sequence check, which does not depend on the root. (3) TDP: an obsolete root
    /// stays on the root list while a vCPU uses it, every later zap (of a range or of
    /// everything) walks it, and the last user's `put_root` zaps it before it is freed, so the
    /// SPTE goes when a valid root's would (no leak either, which was KVM's TDP harm). A vCPU
    /// still in guest mode on the obsolete root may translate through the new SPTE, but to the
    /// current frame. (4) Shadow: a fault builds below a root page (or a special root's
    /// level-2 page) that the zap-all emptied and made invalid while the root pinned it; the
    /// vCPU drops the root before it enters the guest again, and the release zaps the page
    /// again (KVM `mmu_free_root_page`), so what was built below it is unlinked before the page
    /// is freed. For a root without a page (18c841e1f411) KVM's harm was a NULL dereference,
    /// which has no equivalent here. Tests keep what defends against it: `tests/catchers`'
    /// invariant (the obsoleted TDP root maps nothing after `zap_all_fast`; a fault with a
    /// reload pending retries), and the shadow release's unlinking (`tests/shadow_mmu.rs`,
    /// `tests/loom_shadow.rs`: nothing stays linked from a freed page).
    NoStaleRootCheck = 6,
    /// Undoes e0c378684b65 "Retry page faults that hit an invalid memslot" (2021): a slot being
    /// deleted or moved is treated as no slot, i.e. MMIO.
    ///
    /// Harm: during a move of a slot over part of its own old range, an access to a gpa that is
    /// RAM before and after the move is emulated as MMIO, which is neither state.
    InvalidSlotAsMmio = 7,
    /// Undoes f8f559422b6c "fast invalidate all mmio sptes" (2013): an MMIO SPTE hit does not
    /// compare the generation.
    ///
    /// Harm: after a create puts RAM over a gpa that has an MMIO SPTE (a create zaps nothing),
    /// an access there hits the old SPTE and is emulated as MMIO instead of reaching the new
    /// slot's frame.
    MmioSpteIgnoresGen = 8,
    /// Undoes the remote TLB flush on zap (kvm_flush_remote_tlbs): zapping present leaves does not
    /// flush the vCPUs' TLBs.
    ///
    /// Harm: after the delete of a slot returned, a vCPU that cached the slot's translation reads
    /// the deleted slot's frame from its TLB instead of exiting as MMIO.
    NoTlbFlushOnZap = 9,
    /// Undoes aad885e77496 "Drop/zap existing present SPTE even when creating an MMIO SPTE"
    /// (2026): a fault that decided "MMIO" writes its MMIO SPTE over a present leaf, with no TLB
    /// flush. Here the decision can be older than the leaf (a fault that read the memslots
    /// before a slot create, installing after another vCPU mapped the new slot; issue 11
    /// defect 1).
    ///
    /// Harm: the other vCPU keeps the leaf's translation in its TLB; the MMIO SPTE is not
    /// present, so the later delete of the slot finds nothing to flush, and that vCPU goes on
    /// reading and writing the deleted slot's frame.
    MmioOverPresentSpte = 10,
    /// Undoes the shadow MMU's clearing of the GVA part of the per-vCPU MMIO cache on a root
    /// switch (KVM `kvm_mmu_new_pgd` after a fast switch, and 7f8a4eb426b4 "clear MMIO gva in
    /// kvm_mmu_load", 2026): a GVA-keyed entry survives a CR3 switch.
    ///
    /// This undoes more than KVM's 2026 bug, which needed a failed fast switch followed by the
    /// load of a direct root (CR0.PG=0), whose `kvm_mmu_sync_roots` clears nothing. Here every
    /// path that leaves a vCPU without a root clears the GVA part already (a paging-mode change
    /// unloads all roots, a CR3 load and a drop of obsolete roots clear it), so the clear at root
    /// load alone is a second guard with no reachable harm; undoing it together with the CR3
    /// load's clear (KVM's after a fast switch hit) gives the harm the fix is about.
    ///
    /// Harm: after switching to a space that maps the GVA to RAM, an RSVD fault or an emulated
    /// access would be answered from the entry of the previous space: MMIO at the old GPA.
    GvaCacheSurvivesRootSwitch = 11,
    /// Undoes the write protection of shadowed guest page tables (KVM `account_shadowed`, shadow
    /// facts §4.1): a guest table the MMU shadows stays writable for the guest.
    ///
    /// Harm: the guest edits a table through its own mapping without an exit, the shadow (here
    /// under a previous root) keeps the old translation, and after a CR3 switch back, which
    /// needs no INVLPG, the guest's access still uses what its table no longer maps (in
    /// `tests/catchers`: a GVA remapped from a device page to RAM still exits as MMIO).
    ShadowTableLeftWritable = 12,
    /// Undoes `kvm_mmu_track_write`'s zap (shadow facts §4.3): an emulated write to a shadowed
    /// guest table is counted but drops no SPTE, so a shadow leaf (an MMIO SPTE, say) outlives
    /// the guest entry it came from.
    ///
    /// Harm: the same CR3-switch-back sequence as `shadow-table-left-writable`: the guest's
    /// remap of a GVA from MMIO to RAM (emulated, reported) is not seen, and the access still
    /// exits as MMIO.
    TrackWriteKeepsSpte = 13,
    /// Undoes the remote TLB flush after dirty-log write protection (KVM
    /// `kvm_get_dirty_log_protect` / `kvm_clear_dirty_log_protect`: `if (flush)
    /// kvm_flush_remote_tlbs_memslot()` before the ioctl returns): a vCPU keeps writing through
    /// a cached writable translation of a page the collection just took, and the write is in no
    /// later collection (a lost dirty page).
    DirtyLogNoFlush = 14,
    /// Not a KVM fix: undoes vmmu's own check of the fast path's leaf-table cache (issue 17,
    /// `mmu_core/walk.rs`): a vCPU reads its cached level-1 table without comparing the table epoch,
    /// so a table that was unlinked since (a guest remapped the 2 MiB above it, a zap) still
    /// answers.
    ///
    /// Harm: the guest points a page directory entry at a new table that maps a GVA to another
    /// device; another vCPU's RSVD fault on that GVA is answered from the old table's shadow:
    /// MMIO at the old device's address.
    ///
    /// Memory safety: the unchecked read may reach a table page after its grace period, so it is
    /// sound only with a host that never gives table memory back to the system allocator while it
    /// lives (`SimHost` and `TestHost` keep every table page until they drop). `Vm::new` refuses
    /// it on any other host (`VmError::BugNeedsRetainedTables`: the host's
    /// `unsafe` promise [`crate::host::FrameAllocator::retains_table_memory`]).
    LeafCacheIgnoresEpoch = 15,
    /// Undoes the flush on table unlink (KVM flushes whenever it zaps a shadow-present SPTE, leaf
    /// or not: `tdp_mmu_zap_leafs`' and `handle_removed_pt`'s callers, because of the hardware's
    /// paging-structure caches): a zap that unlinks a table with no present leaf below it (only
    /// MMIO SPTEs, say) does not flush, and frees the table after the grace period.
    ///
    /// Harm: a CPU whose paging-structure cache kept the link walks the freed frame, reused for
    /// another table: a gfn made RAM since keeps exiting as MMIO and never reaches its frame.
    NoFlushOnTableUnlink = 16,
    /// Undoes the inherited role access of shadow pages (b1bd5cba3306, 2021; shadow facts §11):
    /// the shadow page of a guest last-level table is keyed by the rights of the PDE that points
    /// at it alone, not by what every level above grants. Two walks that reach the same table
    /// with different rights above it share one shadow page, and with it the leaves the other
    /// walk built.
    ///
    /// Harm: a page the guest maps writable through one path and read-only through another
    /// (a PDPTE without R/W above the second path) takes a user write through the read-only
    /// path without the guest #PF its tables demand, once the writable path built the leaf.
    RoleAccessLastLevel = 17,
}

impl Bug {
    /// Every bug, in a stable order.
    pub const ALL: [Bug; 18] = [
        Bug::NoSecondIncrement,
        Bug::CacheWhileInProgress,
        Bug::VcpuCacheWithoutGen,
        Bug::WrapHookAfterPublish,
        Bug::StickyCachingDisable,
        Bug::ZappedSpteIsMisconfig,
        Bug::NoStaleRootCheck,
        Bug::InvalidSlotAsMmio,
        Bug::MmioSpteIgnoresGen,
        Bug::NoTlbFlushOnZap,
        Bug::MmioOverPresentSpte,
        Bug::GvaCacheSurvivesRootSwitch,
        Bug::ShadowTableLeftWritable,
        Bug::TrackWriteKeepsSpte,
        Bug::DirtyLogNoFlush,
        Bug::LeafCacheIgnoresEpoch,
        Bug::NoFlushOnTableUnlink,
        Bug::RoleAccessLastLevel,
    ];

    /// The bug's command-line name.
    pub const fn name(self) -> &'static str {
        match self {
            Bug::NoSecondIncrement => "no-second-increment",
            Bug::CacheWhileInProgress => "cache-while-in-progress",
            Bug::VcpuCacheWithoutGen => "vcpu-cache-without-gen",
            Bug::WrapHookAfterPublish => "wrap-hook-after-publish",
            Bug::StickyCachingDisable => "sticky-caching-disable",
            Bug::ZappedSpteIsMisconfig => "zapped-spte-is-misconfig",
            Bug::NoStaleRootCheck => "no-stale-root-check",
            Bug::InvalidSlotAsMmio => "invalid-slot-as-mmio",
            Bug::MmioSpteIgnoresGen => "mmio-spte-ignores-gen",
            Bug::NoTlbFlushOnZap => "no-tlb-flush-on-zap",
            Bug::MmioOverPresentSpte => "mmio-over-present-spte",
            Bug::GvaCacheSurvivesRootSwitch => "gva-cache-survives-root-switch",
            Bug::ShadowTableLeftWritable => "shadow-table-left-writable",
            Bug::TrackWriteKeepsSpte => "track-write-keeps-spte",
            Bug::DirtyLogNoFlush => "dirty-log-no-flush",
            Bug::LeafCacheIgnoresEpoch => "leaf-cache-ignores-epoch",
            Bug::NoFlushOnTableUnlink => "no-flush-on-table-unlink",
            Bug::RoleAccessLastLevel => "role-access-last-level",
        }
    }

    /// The bug with this command-line name.
    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }
}

impl fmt::Display for Bug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of injected bugs (empty in every normal configuration).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct BugSet(u32);

impl BugSet {
    /// No bug: the correct behaviour.
    pub const NONE: BugSet = BugSet(0);

    /// The set holding just `bug`. Only with the `historical-bugs` feature.
    #[cfg(feature = "historical-bugs")]
    pub const fn only(bug: Bug) -> BugSet {
        BugSet(1 << bug as u8)
    }

    /// This set plus `bug`. Only with the `historical-bugs` feature.
    #[cfg(feature = "historical-bugs")]
    pub const fn with(self, bug: Bug) -> BugSet {
        BugSet(self.0 | 1 << bug as u8)
    }

    /// Whether `bug` is injected. Always `false` without the `historical-bugs` feature.
    #[inline(always)]
    pub const fn has(self, bug: Bug) -> bool {
        #[cfg(feature = "historical-bugs")]
        {
            self.0 & (1 << bug as u8) != 0
        }
        #[cfg(not(feature = "historical-bugs"))]
        {
            let _ = (self, bug);
            false
        }
    }

    /// Whether no bug is injected.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Bug::ALL {
            assert_eq!(Bug::from_name(b.name()), Some(b));
        }
        assert_eq!(Bug::from_name("no-such-bug"), None);
    }

    #[test]
    fn empty_set_has_nothing() {
        for b in Bug::ALL {
            assert!(!BugSet::NONE.has(b));
        }
    }

    #[cfg(feature = "historical-bugs")]
    #[test]
    fn only_has_one() {
        let s = BugSet::only(Bug::InvalidSlotAsMmio);
        assert!(s.has(Bug::InvalidSlotAsMmio));
        assert!(!s.has(Bug::NoSecondIncrement));
    }
}
