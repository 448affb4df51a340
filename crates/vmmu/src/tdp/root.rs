//! Roots: the top-level tables the vCPUs walk from (KVM: `kvm_mmu_page` with `role.level` = root
//! level, on `kvm->arch.tdp_mmu_roots`).
//!
//! Invariants:
//! - a [`RootKind::Tdp`] root is *obsolete* once `Root::invalidate` ran (KVM `role.invalid`,
//!   set by `zap_all_fast` under the MMU write lock); it never becomes valid again;
//! - a [`RootKind::Pageless`] root models KVM's special roots that have no shadow page (PAE roots,
//!   the dummy root): nothing marks them obsolete, so a fault on one is stale exactly while a
//!   free-obsolete-roots request is pending for its vCPU (18c841e1f411);
//! - every root, pageless ones included, is on the MMU's root list while a vCPU may walk it, so
//!   every zap reaches it;
//! - `users` counts the vCPUs holding the root as their current root; an obsolete TDP root with no
//!   users, or a pageless root its vCPU dropped, is removed from the list, its leaves zapped,
//!   and its page freed after a grace period with every table it still links (a tree in the
//!   free queue, whose place the root promised when it was made).

use crate::sync::{AtomicBool, AtomicU32, Ordering};
use crate::types::{AsId, Level, Pfn};

/// What kind of root this is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RootKind {
    /// A TDP MMU root with a page-table page and a valid/obsolete state.
    Tdp,
    /// A root with no shadow page (KVM's PAE/special roots): never marked obsolete.
    Pageless,
}

/// One root table.
#[derive(Debug)]
pub struct Root {
    pfn: Pfn,
    level: Level,
    as_id: AsId,
    kind: RootKind,
    invalid: AtomicBool,
    users: AtomicU32,
}

impl Root {
    pub(crate) fn new(pfn: Pfn, level: Level, as_id: AsId, kind: RootKind) -> Self {
        Root { pfn, level, as_id, kind, invalid: AtomicBool::new(false), users: AtomicU32::new(0) }
    }
    /// The root table's frame (what the hardware's EPTP / nCR3 holds).
    #[inline]
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }
    /// The root's level (4 or 5).
    #[inline]
    pub fn level(&self) -> Level {
        self.level
    }
    /// The address space whose memslots this root maps.
    #[inline]
    pub fn as_id(&self) -> AsId {
        self.as_id
    }
    /// The root's kind.
    #[inline]
    pub fn kind(&self) -> RootKind {
        self.kind
    }
    /// Whether the root was obsoleted (KVM `is_obsolete_sp` for TDP roots). Pageless roots never
    /// are: see the module doc.
    #[inline]
    pub fn is_obsolete(&self) -> bool {
        // Acquire pairs with the Release in `invalidate`; both happen under the MMU lock in the
        // fault path, the lock alone would do; the vCPU's request handling reads it unlocked.
        self.invalid.load(Ordering::Acquire)
    }
    /// What the fault path's stale check needs of this root.
    #[inline]
    pub(crate) fn state(&self) -> crate::fault::RootState {
        use crate::fault::RootState;
        match self.kind {
            RootKind::Pageless => RootState::NoPage,
            RootKind::Tdp if self.is_obsolete() => RootState::Obsolete,
            RootKind::Tdp => RootState::Valid,
        }
    }

    /// Whether a vCPU loading a root for `as_id` may share this one: a valid TDP root of that
    /// address space (pageless roots are private to the vCPU that made them).
    #[inline]
    pub(crate) fn is_shared_valid(&self, as_id: AsId) -> bool {
        self.kind == RootKind::Tdp && self.as_id == as_id && !self.is_obsolete()
    }
    pub(crate) fn invalidate(&self) {
        self.invalid.store(true, Ordering::Release);
    }
    /// Adds one user. The caller holds the MMU lock (`Tdp::get_root`: shared, or exclusive when
    /// the root is new), and `zap_all_fast` reads `users` holding it exclusive: the lock, not this
    /// ordering, orders a new user against the zap. AcqRel is more than that needs (one per root
    /// load, off the hot path).
    pub(crate) fn get(&self) {
        self.users.fetch_add(1, Ordering::AcqRel);
    }
    /// Drops one user; returns the users left. The last user's check of [`Self::is_obsolete`]
    /// is ordered against `zap_all_fast`'s `users` loads by a fence pair (`Tdp::put_root`).
    pub(crate) fn put(&self) -> u32 {
        let old = self.users.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(old > 0, "root put without get");
        old - 1
    }
    /// The users now. Acquire pairs with the release half of [`Self::put`]: a reader that sees a
    /// count the last user's decrement made sees that user's walks of the root as done.
    pub(crate) fn users(&self) -> u32 {
        self.users.load(Ordering::Acquire)
    }
}
