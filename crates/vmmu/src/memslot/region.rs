//! The userspace request (`struct kvm_userspace_memory_region`), KVM's limits, and the checks
//! that depend on the request alone, run in KVM's order (facts §5.3; `kvm_vm_ioctl` +
//! `kvm_vm_ioctl_set_memory_region` + the first half of `kvm_set_memory_region`, ~v6.13).
//!
//! The checks that need the current memslot set (delete of a missing slot, total pages, modify
//! rules, overlap, the dirty bitmap's allocation, max gfn) are in [`super`], in the order KVM
//! runs them (`kvm_prepare_memory_region` allocates the bitmap before the arch hook checks the
//! max gfn: `tests/memslot_errno.rs`, "bitmap before max gfn"); every rule has one
//! [`MemslotError`] variant.
//!
//! Order note: in KVM the v1 ioctl rejects flags outside `LOG_DIRTY_PAGES | READONLY` in
//! `kvm_vm_ioctl` *before* `kvm_vm_ioctl_set_memory_region` checks the slot id, so a request that
//! breaks both fails on the flags rule. Both are `EINVAL`.

use crate::types::{AsId, Gfn, Hva, SlotId, PAGE_OFFSET_MASK, PAGE_SHIFT};
use core::fmt;

/// `KVM_MEM_LOG_DIRTY_PAGES`: track writes in a dirty bitmap.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// `KVM_MEM_READONLY`: guest writes exit to userspace as MMIO.
pub const KVM_MEM_READONLY: u32 = 1 << 1;
/// `KVM_MEM_GUEST_MEMFD`: only with the v2 ioctl and private-memory VMs; invalid here.
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
/// The flags the v1 ioctl accepts (`KVM_SET_USER_MEMORY_REGION_V1_FLAGS`).
pub const KVM_SET_USER_MEMORY_REGION_V1_FLAGS: u32 = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY;
/// KVM-internal flag of a slot being deleted or moved (`KVM_MEMSLOT_INVALID`, bit 16).
pub const KVM_MEMSLOT_INVALID: u32 = 1 << 16;

/// Slot ids userspace may use per address space (`KVM_USER_MEM_SLOTS` on x86: 32767 - 3).
pub const KVM_USER_MEM_SLOTS: u16 = 32764;
/// All slot ids, internal ones included (`KVM_MEM_SLOTS_NUM = SHRT_MAX`).
pub const KVM_MEM_SLOTS_NUM: u16 = 32767;
/// The most pages one user slot may have (`KVM_MEM_MAX_NR_PAGES`, 2^31 - 1).
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;
/// x86-64 `TASK_SIZE_MAX` with 4-level paging: the default user address limit for `access_ok`.
pub const TASK_SIZE_MAX: u64 = (1 << 47) - 4096;

/// KVM's `struct kvm_userspace_memory_region` (the v1 ioctl's argument).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct UserspaceMemoryRegion {
    /// `(as_id << 16) | id`.
    pub slot: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// First guest-physical byte.
    pub guest_phys_addr: u64,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// First host-virtual byte.
    pub userspace_addr: u64,
}

impl UserspaceMemoryRegion {
    /// A request with KVM's fields, in the struct's order.
    #[inline]
    pub const fn new(
        slot: u32,
        flags: u32,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
    ) -> Self {
        UserspaceMemoryRegion { slot, flags, guest_phys_addr, memory_size, userspace_addr }
    }

    /// The address space (high 16 bits of `slot`).
    #[inline]
    pub const fn as_id(&self) -> AsId {
        SlotId::split(self.slot).0
    }
    /// The slot id (low 16 bits of `slot`).
    #[inline]
    pub const fn id(&self) -> SlotId {
        SlotId::split(self.slot).1
    }
}

/// KVM x86's internal memslots, the ids just above the user ones (`__x86_set_memory_region`'s
/// `TSS_PRIVATE_MEMSLOT`, `APIC_ACCESS_PAGE_PRIVATE_MEMSLOT`,
/// `IDENTITY_PAGETABLE_PRIVATE_MEMSLOT`). KVM sets them up for its own use; a VMM's requests
/// cannot name them (rule 0), so they never collide with the VMM's slots, while the rest of the
/// memslot rules, the generation protocol and the MMU treat them as any slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum InternalSlot {
    /// `TSS_PRIVATE_MEMSLOT` (VMX's real-mode TSS).
    Tss,
    /// `APIC_ACCESS_PAGE_PRIVATE_MEMSLOT` (VMX's APIC-access page).
    ApicAccessPage,
    /// `IDENTITY_PAGETABLE_PRIVATE_MEMSLOT` (VMX's identity-mapped page table for a guest in
    /// real mode without unrestricted guest support).
    IdentityPageTable,
}

impl InternalSlot {
    /// The slot id: `KVM_USER_MEM_SLOTS` + 0, 1 or 2.
    pub const fn id(self) -> SlotId {
        SlotId(
            KVM_USER_MEM_SLOTS
                + match self {
                    InternalSlot::Tss => 0,
                    InternalSlot::ApicAccessPage => 1,
                    InternalSlot::IdentityPageTable => 2,
                },
        )
    }
}

/// A request for an internal slot ([`InternalSlot`]), as KVM's `__x86_set_memory_region` makes
/// one: no flags, the host range given by the caller (KVM maps anonymous memory for it), size 0
/// to delete. Checked with every rule of a user request but rule 0.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct InternalMemoryRegion {
    /// The address space (x86: 0, or 1 for SMM; KVM sets an internal slot in each).
    pub as_id: AsId,
    /// Which internal slot.
    pub slot: InternalSlot,
    /// First guest-physical byte.
    pub guest_phys_addr: u64,
    /// Size in bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// First host-virtual byte.
    pub userspace_addr: u64,
}

impl InternalMemoryRegion {
    /// The request in the ioctl's shape (the slot word names the internal id; no flags).
    pub const fn as_request(&self) -> UserspaceMemoryRegion {
        UserspaceMemoryRegion {
            slot: ((self.as_id.0 as u32) << 16) | self.slot.id().0 as u32,
            flags: 0,
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.memory_size,
            userspace_addr: self.userspace_addr,
        }
    }
}

/// Whose request a check runs on: a VMM's, which may name user slot ids only (rule 0), or
/// KVM's own for an [`InternalSlot`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Requester {
    /// `KVM_SET_USER_MEMORY_REGION`.
    User,
    /// `__x86_set_memory_region`.
    Internal,
}

/// Which fixed field a modification of an existing slot tried to change.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FixedField {
    /// `userspace_addr`.
    UserspaceAddr,
    /// The size (page count).
    Size,
    /// The `READONLY` flag.
    Readonly,
}

impl fmt::Display for FixedField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FixedField::UserspaceAddr => "userspace_addr",
            FixedField::Size => "memory_size",
            FixedField::Readonly => "READONLY flag",
        })
    }
}

/// A rejected `set_memory_region`: one variant per KVM rule, in KVM's check order. The message
/// names the rule; [`Self::errno`] gives the errno KVM returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum MemslotError {
    /// v1 ioctl with a flag outside `LOG_DIRTY_PAGES | READONLY` (rule 1, checked by KVM's ioctl
    /// before the slot id).
    #[error("flags {flags:#x} contain bits other than LOG_DIRTY_PAGES (0x1) and READONLY (0x2)")]
    InvalidFlags {
        /// The flags given.
        flags: u32,
    },
    /// The slot id is not a user slot (rule 0).
    #[error("slot id {id} is not a user slot: ids must be below {KVM_USER_MEM_SLOTS}")]
    SlotIdNotUser {
        /// The id given (low 16 bits of `slot`).
        id: u16,
    },
    /// `memory_size` is not a multiple of 4 KiB (rule 2).
    #[error("memory_size {size:#x} is not a multiple of the 4 KiB page size")]
    SizeNotAligned {
        /// The size given.
        size: u64,
    },
    /// `guest_phys_addr` is not page aligned (rule 3).
    #[error("guest_phys_addr {gpa:#x} is not 4 KiB aligned")]
    GpaNotAligned {
        /// The address given.
        gpa: u64,
    },
    /// `userspace_addr` is not page aligned (rule 4).
    #[error("userspace_addr {hva:#x} is not 4 KiB aligned")]
    HvaNotAligned {
        /// The address given.
        hva: u64,
    },
    /// `[userspace_addr, userspace_addr + memory_size)` is not inside user space (rule 4,
    /// `access_ok`).
    #[error("userspace range {hva:#x} + {size:#x} goes past the user address limit {limit:#x}")]
    HvaRangeNotUser {
        /// The address given.
        hva: u64,
        /// The size given.
        size: u64,
        /// The configured limit (x86-64: `TASK_SIZE_MAX`).
        limit: u64,
    },
    /// The address-space id is not below the VM's number of address spaces (rule 5).
    #[error("address space {as_id} does not exist: this VM has {nr} address space(s)")]
    NoSuchAddressSpace {
        /// The address space given (high 16 bits of `slot`).
        as_id: u16,
        /// The VM's number of address spaces.
        nr: u16,
    },
    /// The slot id is at or above `KVM_MEM_SLOTS_NUM` (rule 5; unreachable, since rule 0 is
    /// stricter for a user request and an [`InternalSlot`] is below it; kept for KVM's order).
    #[error("slot id {id} is not below KVM_MEM_SLOTS_NUM ({KVM_MEM_SLOTS_NUM})")]
    SlotIdTooLarge {
        /// The id given.
        id: u16,
    },
    /// `guest_phys_addr + memory_size` overflows (rule 6).
    #[error("guest range {gpa:#x} + {size:#x} wraps around the 64-bit address space")]
    GpaRangeWraps {
        /// The address given.
        gpa: u64,
        /// The size given.
        size: u64,
    },
    /// More than `KVM_MEM_MAX_NR_PAGES` pages (rule 7).
    #[error("{npages} pages is more than the {KVM_MEM_MAX_NR_PAGES} pages one slot may have")]
    TooManyPages {
        /// The page count asked for.
        npages: u64,
    },
    /// Delete (size 0) of a slot that does not exist (rule 8).
    #[error("cannot delete slot {id} of address space {as_id}: it does not exist")]
    DeleteMissingSlot {
        /// The address space.
        as_id: u16,
        /// The slot id.
        id: u16,
    },
    /// A new slot would make the VM's total page count overflow (rule 9).
    #[error("adding {npages} pages to the VM's {total} would overflow its page count limit")]
    TotalPagesOverflow {
        /// Pages in all slots now.
        total: u64,
        /// Pages of the new slot.
        npages: u64,
    },
    /// A modification of an existing slot changes a field that cannot change (rule 10).
    #[error("slot {id} exists and its {field} cannot change; delete it and create it again")]
    FixedFieldChanged {
        /// The slot id.
        id: u16,
        /// The field that differs.
        field: FixedField,
    },
    /// The new or moved slot overlaps another slot of the same address space (rule 11).
    #[error(
        "gfns {start:#x}..{end:#x} of slot {id} overlap slot {other} in address space {as_id}"
    )]
    Overlap {
        /// The address space.
        as_id: u16,
        /// The slot being created or moved.
        id: u16,
        /// The slot it overlaps (the lowest such).
        other: u16,
        /// First gfn asked for.
        start: u64,
        /// End gfn (exclusive) asked for.
        end: u64,
    },
    /// The slot's last gfn is above the MMU's highest gfn (rule 12, x86 arch prepare).
    #[error("last gfn {last_gfn:#x} is above the highest guest frame {max_gfn:#x} the MMU maps")]
    BeyondMaxGfn {
        /// The slot's last gfn.
        last_gfn: u64,
        /// `(1 << (max_gpa_bits - 12)) - 1`.
        max_gfn: u64,
    },
    /// Allocating the slot's metadata (its dirty bitmap, or room for it in the memslot sets'
    /// indexes) failed (rule 13).
    #[error(
        "out of memory allocating {bytes} bytes of slot metadata (dirty bitmap or memslot index)"
    )]
    OutOfMemory {
        /// The allocation asked for.
        bytes: u64,
    },
}

impl MemslotError {
    /// The errno KVM returns for this rule: `"EINVAL"`, `"EEXIST"` or `"ENOMEM"`.
    pub const fn errno(&self) -> &'static str {
        match self {
            MemslotError::Overlap { .. } => "EEXIST",
            MemslotError::OutOfMemory { .. } => "ENOMEM",
            _ => "EINVAL",
        }
    }

    /// The numeric errno (Linux x86: EINVAL 22, EEXIST 17, ENOMEM 12).
    pub const fn errno_value(&self) -> i32 {
        match self {
            MemslotError::Overlap { .. } => 17,
            MemslotError::OutOfMemory { .. } => 12,
            _ => 22,
        }
    }

    /// A short stable name of the rule broken (for tables and logs).
    pub const fn rule(&self) -> &'static str {
        match self {
            MemslotError::InvalidFlags { .. } => "invalid-flags",
            MemslotError::SlotIdNotUser { .. } => "slot-id-not-user",
            MemslotError::SizeNotAligned { .. } => "size-not-aligned",
            MemslotError::GpaNotAligned { .. } => "gpa-not-aligned",
            MemslotError::HvaNotAligned { .. } => "hva-not-aligned",
            MemslotError::HvaRangeNotUser { .. } => "hva-range-not-user",
            MemslotError::NoSuchAddressSpace { .. } => "no-such-address-space",
            MemslotError::SlotIdTooLarge { .. } => "slot-id-too-large",
            MemslotError::GpaRangeWraps { .. } => "gpa-range-wraps",
            MemslotError::TooManyPages { .. } => "too-many-pages",
            MemslotError::DeleteMissingSlot { .. } => "delete-missing-slot",
            MemslotError::TotalPagesOverflow { .. } => "total-pages-overflow",
            MemslotError::FixedFieldChanged { .. } => "fixed-field-changed",
            MemslotError::Overlap { .. } => "overlap",
            MemslotError::BeyondMaxGfn { .. } => "beyond-max-gfn",
            MemslotError::OutOfMemory { .. } => "out-of-memory",
        }
    }
}

/// A request that passed every check that does not need the current set.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Request {
    pub as_id: AsId,
    pub id: SlotId,
    pub flags: u32,
    pub base_gfn: Gfn,
    pub npages: u64,
    pub hva: Hva,
}

/// Rules 1, 0, 2..=7, in KVM's order (rule 0 for a [`Requester::User`] only). `nr_as` is the
/// VM's number of address spaces and `user_va_limit` the `access_ok` limit.
pub(crate) fn check_request(
    r: &UserspaceMemoryRegion,
    from: Requester,
    nr_as: u16,
    user_va_limit: u64,
) -> Result<Request, MemslotError> {
    let (as_id, id) = SlotId::split(r.slot);
    // kvm_vm_ioctl: v1 flags.
    if r.flags & !KVM_SET_USER_MEMORY_REGION_V1_FLAGS != 0 {
        return Err(MemslotError::InvalidFlags { flags: r.flags });
    }
    // kvm_vm_ioctl_set_memory_region: (u16)slot.
    if from == Requester::User && id.0 >= KVM_USER_MEM_SLOTS {
        return Err(MemslotError::SlotIdNotUser { id: id.0 });
    }
    // check_memory_region_flags: for an x86 VM without private memory or protected state it
    // accepts exactly the v1 set, so nothing is left to reject here.
    let size = r.memory_size;
    if size & PAGE_OFFSET_MASK != 0 {
        return Err(MemslotError::SizeNotAligned { size });
    }
    let gpa = r.guest_phys_addr;
    if gpa & PAGE_OFFSET_MASK != 0 {
        return Err(MemslotError::GpaNotAligned { gpa });
    }
    let hva = r.userspace_addr;
    if hva & PAGE_OFFSET_MASK != 0 {
        return Err(MemslotError::HvaNotAligned { hva });
    }
    // access_ok(hva, size), checked even for a delete.
    if size > user_va_limit || hva > user_va_limit - size {
        return Err(MemslotError::HvaRangeNotUser { hva, size, limit: user_va_limit });
    }
    if as_id.0 >= nr_as {
        return Err(MemslotError::NoSuchAddressSpace { as_id: as_id.0, nr: nr_as });
    }
    if id.0 >= KVM_MEM_SLOTS_NUM {
        return Err(MemslotError::SlotIdTooLarge { id: id.0 });
    }
    if gpa.checked_add(size).is_none() {
        return Err(MemslotError::GpaRangeWraps { gpa, size });
    }
    let npages = size >> PAGE_SHIFT;
    if npages > KVM_MEM_MAX_NR_PAGES {
        return Err(MemslotError::TooManyPages { npages });
    }
    Ok(Request {
        as_id,
        id,
        flags: r.flags,
        base_gfn: Gfn(gpa >> PAGE_SHIFT),
        npages,
        hva: Hva(hva),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(r: &UserspaceMemoryRegion, nr_as: u16, lim: u64) -> Result<Request, MemslotError> {
        check_request(r, Requester::User, nr_as, lim)
    }

    #[test]
    fn flags_are_checked_before_the_slot_id() {
        let e =
            user(&UserspaceMemoryRegion::new(40000, 4, 0, 4096, 0), 2, TASK_SIZE_MAX).unwrap_err();
        assert_eq!(e.rule(), "invalid-flags");
        let e =
            user(&UserspaceMemoryRegion::new(40000, 3, 0, 4096, 0), 2, TASK_SIZE_MAX).unwrap_err();
        assert_eq!(e.rule(), "slot-id-not-user");
    }

    #[test]
    fn an_internal_request_may_name_the_ids_above_the_user_ones_and_no_others() {
        for (slot, id) in [
            (InternalSlot::Tss, 32764),
            (InternalSlot::ApicAccessPage, 32765),
            (InternalSlot::IdentityPageTable, 32766),
        ] {
            let r = InternalMemoryRegion {
                as_id: AsId(1),
                slot,
                guest_phys_addr: 0xfeff_c000,
                memory_size: 0x3000,
                userspace_addr: 0x7000_0000,
            };
            let req = r.as_request();
            assert_eq!(req.slot, (1 << 16) | id);
            assert_eq!(req.flags, 0);
            let ok = check_request(&req, Requester::Internal, 2, TASK_SIZE_MAX).unwrap();
            assert_eq!((ok.as_id, ok.id, ok.npages), (AsId(1), SlotId(id as u16), 3));
            // The same request from a VMM breaks rule 0.
            assert_eq!(user(&req, 2, TASK_SIZE_MAX).unwrap_err().rule(), "slot-id-not-user");
        }
        // Every other rule still holds for an internal request.
        let r = InternalMemoryRegion {
            as_id: AsId(0),
            slot: InternalSlot::Tss,
            guest_phys_addr: 0x1000,
            memory_size: 0x3000,
            userspace_addr: 0x7000_0800,
        };
        let e = check_request(&r.as_request(), Requester::Internal, 1, TASK_SIZE_MAX).unwrap_err();
        assert_eq!(e.rule(), "hva-not-aligned");
    }

    #[test]
    fn access_ok_boundary() {
        let lim = TASK_SIZE_MAX;
        assert!(user(&UserspaceMemoryRegion::new(0, 0, 0, 4096, lim - 4096), 1, lim).is_ok());
        let e = user(&UserspaceMemoryRegion::new(0, 0, 0, 8192, lim - 4096), 1, lim).unwrap_err();
        assert_eq!(e.rule(), "hva-range-not-user");
        // A delete is checked too.
        let e = user(&UserspaceMemoryRegion::new(0, 0, 0, 0, lim + 4096), 1, lim).unwrap_err();
        assert_eq!(e.rule(), "hva-range-not-user");
    }

    #[test]
    fn fields_are_parsed() {
        let r = user(
            &UserspaceMemoryRegion::new(0x1_0005, 3, 0x20_0000, 0x40_0000, 0x7000_0000),
            2,
            TASK_SIZE_MAX,
        )
        .unwrap();
        assert_eq!((r.as_id, r.id), (AsId(1), SlotId(5)));
        assert_eq!((r.base_gfn, r.npages, r.hva), (Gfn(0x200), 0x400, Hva(0x7000_0000)));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            MemslotError::Overlap { as_id: 0, id: 1, other: 0, start: 0, end: 1 }.errno(),
            "EEXIST"
        );
        assert_eq!(MemslotError::OutOfMemory { bytes: 8 }.errno(), "ENOMEM");
        assert_eq!(MemslotError::BeyondMaxGfn { last_gfn: 1, max_gfn: 0 }.errno(), "EINVAL");
        assert_eq!(MemslotError::OutOfMemory { bytes: 8 }.errno_value(), 12);
    }
}
