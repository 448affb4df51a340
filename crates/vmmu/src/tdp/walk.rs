//! Walks that take no lock: the MMU's lockless walk for the fast MMIO path (KVM `get_mmio_spte`
//! under `rcu_read_lock`, facts §3.5) and the hardware walker that a vCPU in guest mode performs
//! (what the CPU does on a TLB miss: classify each entry, raise a violation or a
//! misconfiguration/RSVD fault).
//!
//! Both read entries with Acquire loads (pairing with the Release of the compare-and-swap that
//! linked a table, rule 5 of [`crate::tdp`]) and must run inside a `table_srcu` read section of the
//! walking vCPU, so no page they reach is freed under them (rule 2/3).

use super::TdpMmu;
use crate::host::{FrameAllocator, Host};
use crate::spte::{HwEntry, RsvdReason, SpteDump, SpteFormat};
use crate::sync::Ordering;
use crate::types::{Access, Gfn, Level, Pfn};

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

impl<H: Host> TdpMmu<H> {
    /// The lockless walk of KVM's `get_mmio_spte`: root to leaf for `gfn`, checking reserved bits
    /// on every MMU-present entry (a non-present leaf, which includes MMIO SPTEs, is not checked).
    ///
    /// The caller holds a `table_srcu` read section and holds `root_pfn` as its current root.
    pub(crate) fn walk_lockless(&self, root_pfn: Pfn, root_level: Level, gfn: Gfn) -> LocklessWalk {
        let fmt = self.cfg.format;
        let mut dump = SpteDump::default();
        let mut pfn = root_pfn;
        let mut level = root_level;
        loop {
            // SAFETY: reached from the caller's root inside its table read section (see above).
            let Some(table) = (unsafe { self.table(pfn) }) else {
                return LocklessWalk::Broken { dump };
            };
            let spte = table[level.index(gfn)].load(Ordering::Acquire);
            dump.push(level, spte);
            if !SpteFormat::is_mmu_present(spte) {
                return LocklessWalk::Leaf { leaf: spte, level, dump };
            }
            if let Some(reason) = fmt.has_reserved_bits(spte, level) {
                return LocklessWalk::Reserved { level, reason, dump };
            }
            if fmt.is_leaf(spte, level) {
                return LocklessWalk::Leaf { leaf: spte, level, dump };
            }
            match level.lower() {
                Some(l) => {
                    pfn = fmt.pfn(spte);
                    level = l;
                }
                None => return LocklessWalk::Leaf { leaf: spte, level, dump },
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
pub unsafe fn hw_walk(
    format: &SpteFormat,
    tables: &dyn FrameAllocator,
    root: Pfn,
    root_level: Level,
    gfn: Gfn,
    need: Access,
) -> HwWalk {
    let mut dump = SpteDump::default();
    let mut pfn = root;
    let mut level = root_level;
    let mut perms = Access::ALL;
    let mut readable = true;
    loop {
        let Some(ptr) = tables.table(pfn) else {
            // The hardware would read whatever is at that physical address; our frames are all
            // known, so this is an internal inconsistency.
            return HwWalk::Broken { dump };
        };
        // SAFETY: the caller keeps reachable pages alive (see above); entries are atomics.
        let table = unsafe { ptr.as_ref() };
        let spte = table[level.index(gfn)].load(Ordering::Acquire);
        dump.push(level, spte);
        match format.classify(spte, level) {
            HwEntry::NotPresent => return HwWalk::Violation { present: false, dump },
            HwEntry::Misconfig(reason) => return HwWalk::Misconfig { reason, dump },
            HwEntry::Present { leaf, pfn: next, perms: p, readable: r } => {
                perms = perms.intersect(p);
                readable &= r;
                if leaf {
                    // Data accesses need R (execute-only EPT entries allow fetches only).
                    let read_ok = readable || need.contains(Access::EXEC);
                    if !perms.contains(need) || !read_ok {
                        return HwWalk::Violation { present: true, dump };
                    }
                    let offset = gfn.raw() & (level.pages() - 1);
                    return HwWalk::Translated { pfn: Pfn(next.raw() + offset), level, perms };
                }
                match level.lower() {
                    Some(l) => {
                        pfn = next;
                        level = l;
                    }
                    None => return HwWalk::Broken { dump },
                }
            }
        }
    }
}
