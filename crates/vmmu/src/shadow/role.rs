//! The role of a shadow page (KVM `union kvm_mmu_page_role`, shadow facts §1.2): with the guest
//! frame it shadows, the key under which shadow pages are found and shared.
//!
//! Invariants: the role is one `u32` with KVM's bit layout, so "equal except level, access and
//! quadrant" is a mask; two pages with the same gfn but different roles are different pages (a
//! child under an SPTE is reused only if gfn **and** role match: the 2026 use-after-free fixes
//! 0cb2af2ea66a and 81ccda30b4e8).

use crate::types::{Access, AsId, Level};
use core::fmt;

/// A shadow page's role.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SpRole(u32);

const LEVEL_MASK: u32 = 0xf;
const DIRECT: u32 = 1 << 7;
const ACCESS_SHIFT: u32 = 8;
const ACCESS_MASK: u32 = 0x7 << ACCESS_SHIFT;
const INVALID: u32 = 1 << 11;
const EFER_NX: u32 = 1 << 12;
const CR0_WP: u32 = 1 << 13;
const AS_SHIFT: u32 = 24;

/// What a shadow page's SPTEs stand for (KVM `role.direct`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SpKind {
    /// The page shadows a guest page table at its gfn.
    Indirect,
    /// The page maps a linear range of guest-physical memory: a guest huge page mapped with
    /// 4 KiB SPTEs, or a guest without paging.
    Direct,
}

impl SpRole {
    /// A role for a page at `level` of `kind`, with the rights `access` granted by the guest
    /// entries above it, in address space `as_id` (KVM keeps the SMM address space in
    /// `role.smm`).
    pub fn new(level: Level, kind: SpKind, access: Access, as_id: AsId) -> SpRole {
        let mut w = u32::from(level.get()) & LEVEL_MASK;
        if kind == SpKind::Direct {
            w |= DIRECT;
        }
        w |= u32::from(access.bits()) << ACCESS_SHIFT;
        // The non-nested shadow MMU forces efer_nx; CR0.WP=1 unless `with_cr0_wp` says not.
        w |= EFER_NX | CR0_WP;
        w |= (u32::from(as_id.0) & 0xff) << AS_SHIFT;
        SpRole(w)
    }

    /// This role for a guest running with CR0.WP = `wp` (KVM `role.cr0_wp`). Pages built under
    /// CR0.WP=0 may hold writable supervisor-only SPTEs for pages the guest maps read-only
    /// (`vcpu::shadow_fault`), so they must never serve a guest running with CR0.WP=1, nor the
    /// reverse.
    pub const fn with_cr0_wp(self, wp: bool) -> SpRole {
        if wp {
            SpRole(self.0 | CR0_WP)
        } else {
            SpRole(self.0 & !CR0_WP)
        }
    }

    /// Whether the page serves a guest running with CR0.WP=1.
    pub const fn cr0_wp(self) -> bool {
        self.0 & CR0_WP != 0
    }

    /// The raw word.
    pub const fn word(self) -> u32 {
        self.0
    }

    /// The level of the SPTEs in the page.
    pub fn level(self) -> Level {
        Level::new((self.0 & LEVEL_MASK) as u8).unwrap_or(Level::L4K)
    }

    /// Whether the page maps a linear range rather than shadowing a guest table.
    pub const fn direct(self) -> bool {
        self.0 & DIRECT != 0
    }

    /// The rights the guest entries above the page grant.
    pub const fn access(self) -> Access {
        Access::from_bits(((self.0 & ACCESS_MASK) >> ACCESS_SHIFT) as u8)
    }

    /// Whether the page was zapped while still a root (freed when its last root user drops it).
    pub const fn invalid(self) -> bool {
        self.0 & INVALID != 0
    }

    /// The role with `invalid` set.
    pub const fn with_invalid(self) -> SpRole {
        SpRole(self.0 | INVALID)
    }

    /// The address space the page maps.
    pub const fn as_id(self) -> AsId {
        AsId(((self.0 >> AS_SHIFT) & 0xff) as u16)
    }

    /// The role of a child page one level down (KVM `kvm_mmu_child_role`).
    pub fn child(self, kind: SpKind, access: Access) -> SpRole {
        let level = self.level().lower().unwrap_or(Level::L4K);
        SpRole::new(level, kind, access, self.as_id()).with_cr0_wp(self.cr0_wp())
    }
}

impl fmt::Debug for SpRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SpRole(level {}, {}, {:?}{}{}, as {})",
            self.level().get(),
            if self.direct() { "direct" } else { "indirect" },
            self.access(),
            if self.cr0_wp() { "" } else { ", cr0.wp=0" },
            if self.invalid() { ", invalid" } else { "" },
            self.as_id().0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_differ_by_key() {
        let r =
            SpRole::new(Level::L2M, SpKind::Indirect, Access::WRITE.union(Access::USER), AsId(1));
        assert_eq!(r.level(), Level::L2M);
        assert!(!r.direct());
        assert_eq!(r.access(), Access::from_bits(6));
        assert_eq!(r.as_id(), AsId(1));
        assert!(!r.invalid() && r.with_invalid().invalid());
        assert_ne!(r, SpRole::new(Level::L2M, SpKind::Direct, r.access(), AsId(1)));
        assert_ne!(r, SpRole::new(Level::L2M, SpKind::Indirect, Access::USER, AsId(1)));
        let c = r.child(SpKind::Direct, Access::USER);
        assert_eq!((c.level(), c.direct(), c.access()), (Level::L4K, true, Access::USER));
        let no_wp = r.with_cr0_wp(false);
        assert!(r.cr0_wp() && !no_wp.cr0_wp());
        assert_ne!(r, no_wp);
        assert!(!no_wp.child(SpKind::Indirect, Access::USER).cr0_wp(), "children inherit it");
    }
}
