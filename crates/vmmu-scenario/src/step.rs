//! The parsed form of a scenario: the VM configuration and the steps, in file order.
//!
//! Invariants (established by the parser, relied on by every backend):
//! - `Scenario::steps` holds one [`Step`] per line that holds a step, numbered from 1;
//! - every [`MemRef`] names a buffer declared by an earlier `mem` step ([`MemId`] is the index of
//!   that declaration among the `mem` steps);
//! - accesses are naturally aligned, inside `[RESERVED_BELOW, ACCESS_LIMIT)` for the guest and
//!   inside the buffer for the host; written values fit their width; vCPU indices are below
//!   `vm.vcpus`;
//! - with guest paging (version 2) guest accesses name GVAs instead: canonical for the paging
//!   mode, at or above `RESERVED_BELOW`, outside PML4 entry 256; `map`/`unmap`/`cr3` appear only
//!   with paging on, name spaces below [`SPACES`], pages aligned to their size, `map` gpas in
//!   `[RESERVED_BELOW, ACCESS_LIMIT)`, and no `map` mixes 4K and 2M pages in one 2 MiB region
//!   of a space;
//! - nothing reserved for the backends (see [`RESERVED_SLOT_IDS`], [`RESERVED_BELOW`]) is used.
//!
//! Slot requests are *not* validated: KVM's rules decide them at run time.

use std::fmt;

/// KVM's 32-bit `slot` field of memslot and dirty-log requests: `(as_id << 16) | id`.
pub fn kvm_slot(as_id: u16, id: u16) -> u32 {
    (u32::from(as_id) << 16) | u32::from(id)
}

/// The page size of every buffer and slot (x86 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;
/// Guest-physical addresses below this (8 MiB) belong to the backends, in address space 0.
pub const RESERVED_BELOW: u64 = 0x80_0000;
/// Guest accesses must end at or below this (64 GiB): the backends identity-map this much.
pub const ACCESS_LIMIT: u64 = 64 << 30;
/// Slot ids the backends use for themselves, in address space 0.
pub const RESERVED_SLOT_IDS: std::ops::RangeInclusive<u16> = 32760..=32763;

/// The SPTE format a simulated MMU uses (`format=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Intel EPT entries.
    Ept,
    /// x86 page-table entries as AMD NPT uses them.
    Npt,
    /// Shadow paging: the MMU shadows the guest's page tables (KVM with TDP off; x86
    /// page-table SPTEs). Version 2.
    Shadow,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Ept => "ept",
            Format::Npt => "npt",
            Format::Shadow => "shadow",
        })
    }
}

/// The guest's paging mode (`paging=`, version 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Paging {
    /// No guest paging: guest virtual = guest physical (version 1; accesses name `gpa=`).
    #[default]
    Off,
    /// x86-64 4-level paging in long mode (accesses name `gva=`).
    Level4,
    /// 32-bit PAE paging: 3 levels, four PDPTEs loaded with CR3; GVAs below 4 GiB.
    Pae,
}

impl fmt::Display for Paging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Paging::Off => "off",
            Paging::Level4 => "4level",
            Paging::Pae => "pae",
        })
    }
}

/// How `dirty-log` treats the bitmap (`vm dirty_log=`): KVM without manual protect, or with
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled (without "initially set").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// GET returns, clears and write-protects again.
    #[default]
    Auto,
    /// GET only returns; `clear-dirty-log` clears and write-protects.
    Manual,
}

impl fmt::Display for DirtyLogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyLogMode::Auto => "auto",
            DirtyLogMode::Manual => "manual",
        })
    }
}

/// The size of a guest page a `map`/`unmap` step names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB.
    #[default]
    Size4K,
    /// 2 MiB.
    Size2M,
}

impl PageSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 4 << 10,
            PageSize::Size2M => 2 << 20,
        }
    }
}

/// Flags of a `map` step's leaf guest PTE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapFlags {
    /// R/W = 0.
    pub readonly: bool,
    /// U/S = 0 (a user access faults with P|U).
    pub supervisor: bool,
    /// Guest PTE bit 51 set (reserved for every MAXPHYADDR below 52: a fault with RSVD|P).
    pub reserved: bool,
}

/// A `map` step: the guest writes one PTE in page-table space `space`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOp {
    /// Page-table space, 0..=7.
    pub space: u8,
    /// Guest-virtual address, aligned to `size`.
    pub gva: u64,
    /// Guest-physical address, aligned to `size`.
    pub gpa: u64,
    /// Page size.
    pub size: PageSize,
    /// Leaf flags.
    pub flags: MapFlags,
}

/// An `unmap` step: the guest clears the entry of a `size` page at `gva` in page-table space
/// `space`, if a table holds one (a 2M one over 4K pages clears the link to their table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapOp {
    /// Page-table space, 0..=7.
    pub space: u8,
    /// Guest-virtual address, aligned to `size`.
    pub gva: u64,
    /// Page size.
    pub size: PageSize,
}

/// A `cr3` step: vCPU `vcpu` loads page-table space `space`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cr3Op {
    /// The vCPU.
    pub vcpu: u32,
    /// Page-table space, 0..=7.
    pub space: u8,
}

/// The number of page-table spaces a scenario may use.
pub const SPACES: u8 = 8;

/// The most guest page tables a file's `map` steps may hold at once, over all spaces: the
/// backends keep the guest's tables in their own memory below 8 MiB, so a `map` that needs one
/// more is a parse error. A `map` creates the tables its entry needs (with `paging=4level` a
/// page-directory-pointer table per new PML4 entry and a page directory per new PDPT entry,
/// except for the first GiB, whose tables every space has; a page table per 2 MiB region that
/// gets its first 4K mapping); a 2M `map` or `unmap` frees the page table of its region if its
/// 4K pages were all unmapped (it is clear; the backends then reuse it), and a 2M `unmap` of a
/// region with live 4K pages leaves its page table held for good (never reused).
pub const MAP_TABLES: usize = 960;

/// The `vm` line, with defaults filled in (and, in [`Scenario::vm`], command-line overrides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs, 1..=256.
    pub vcpus: u32,
    /// Number of address spaces, 1 or 2 (2 = KVM's SMM address space).
    pub address_spaces: u8,
    /// Whether the MMU may cache MMIO information in SPTEs.
    pub mmio_caching: bool,
    /// The SPTE format.
    pub format: Format,
    /// Host MAXPHYADDR, 36..=52.
    pub phys_bits: u8,
    /// The guest's paging mode (version 2).
    pub paging: Paging,
    /// The dirty-log mode (version 2).
    pub dirty_log: DirtyLogMode,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            address_spaces: 1,
            mmio_caching: true,
            format: Format::Ept,
            phys_bits: 46,
            paging: Paging::Off,
            dirty_log: DirtyLogMode::Auto,
        }
    }
}

/// Command-line overrides of the file's `vm` line (`--format`, `--mmio-caching`, `--phys-bits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Replaces `format=`.
    pub format: Option<Format>,
    /// Replaces `mmio_caching=`.
    pub mmio_caching: Option<bool>,
    /// Replaces `phys_bits=` (the caller checks the range 36..=52).
    pub phys_bits: Option<u8>,
}

/// Width of one access in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Width {
    /// 1 byte.
    W1,
    /// 2 bytes.
    W2,
    /// 4 bytes.
    W4,
    /// 8 bytes.
    W8,
}

impl Width {
    /// The width for `n` bytes, if `n` is 1, 2, 4 or 8.
    pub fn from_bytes(n: u64) -> Option<Width> {
        match n {
            1 => Some(Width::W1),
            2 => Some(Width::W2),
            4 => Some(Width::W4),
            8 => Some(Width::W8),
            _ => None,
        }
    }

    /// The number of bytes.
    pub fn bytes(self) -> u32 {
        match self {
            Width::W1 => 1,
            Width::W2 => 2,
            Width::W4 => 4,
            Width::W8 => 8,
        }
    }

    /// All-ones mask of this width (`0xff` for one byte).
    pub fn mask(self) -> u64 {
        match self {
            Width::W8 => u64::MAX,
            w => (1u64 << (8 * w.bytes())) - 1,
        }
    }
}

/// Index of a `mem` declaration among the scenario's `mem` steps (0 = the first `mem` line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemId(pub usize);

/// A `mem NAME size=SIZE` step: a zero-filled, page-aligned host buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemDecl {
    /// The buffer's name.
    pub name: String,
    /// Its size in bytes, rounded up to whole pages (never 0).
    pub size: u64,
}

/// `NAME+OFFSET`: a place in a host buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemRef {
    /// The buffer.
    pub mem: MemId,
    /// The buffer's name, as written.
    pub name: String,
    /// Byte offset from the buffer's start (for a slot: not checked, may lie past the end).
    pub offset: u64,
}

/// Slot flags (`flags=readonly,dirty_log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotFlags {
    /// `KVM_MEM_READONLY`.
    pub readonly: bool,
    /// `KVM_MEM_LOG_DIRTY_PAGES`.
    pub dirty_log: bool,
}

impl SlotFlags {
    /// `KVM_MEM_LOG_DIRTY_PAGES`.
    pub const LOG_DIRTY_PAGES: u32 = 1 << 0;
    /// `KVM_MEM_READONLY`.
    pub const READONLY: u32 = 1 << 1;

    /// The flags word of `struct kvm_userspace_memory_region`.
    pub fn bits(self) -> u32 {
        let mut b = 0;
        if self.dirty_log {
            b |= Self::LOG_DIRTY_PAGES;
        }
        if self.readonly {
            b |= Self::READONLY;
        }
        b
    }
}

/// A `slot` step: one `KVM_SET_USER_MEMORY_REGION` request, exactly as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotOp {
    /// Slot id (low 16 bits of KVM's `slot`).
    pub id: u16,
    /// Address space (high 16 bits of KVM's `slot`).
    pub as_id: u16,
    /// `guest_phys_addr`.
    pub gpa: u64,
    /// `memory_size`; 0 deletes.
    pub size: u64,
    /// The backing buffer; `None` only when `size == 0` (userspace_addr 0).
    pub mem: Option<MemRef>,
    /// Flags.
    pub flags: SlotFlags,
}

impl SlotOp {
    /// KVM's `slot` field: `(as << 16) | id`.
    pub fn kvm_slot(&self) -> u32 {
        kvm_slot(self.as_id, self.id)
    }

    /// What of the backends' own this request would use, if anything: a slot id of
    /// [`RESERVED_SLOT_IDS`] or, for a create or change, a guest-physical range starting below
    /// [`RESERVED_BELOW`], in address space 0 (a range that wraps past 2^64 is not reserved: KVM
    /// refuses it before it could map). The parser refuses such a step; a backend given a
    /// [`SlotOp`] built in code must refuse it too, since its own guest code lives there.
    pub fn reserved_use(&self) -> Option<ReservedUse> {
        if self.as_id != 0 {
            return None;
        }
        if RESERVED_SLOT_IDS.contains(&self.id) {
            return Some(ReservedUse::SlotId(self.id));
        }
        let below = self.size != 0 && self.gpa < RESERVED_BELOW;
        (below && self.gpa.checked_add(self.size).is_some()).then_some(ReservedUse::Below(self.gpa))
    }
}

/// What a slot request would take from the backends ([`SlotOp::reserved_use`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservedUse {
    /// A slot id of [`RESERVED_SLOT_IDS`] in address space 0.
    SlotId(u16),
    /// A slot starting at this address, below [`RESERVED_BELOW`] in address space 0.
    Below(u64),
}

impl std::fmt::Display for ReservedUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReservedUse::SlotId(id) => write!(
                f,
                "slot id {id} in address space 0 (ids {}..={})",
                RESERVED_SLOT_IDS.start(),
                RESERVED_SLOT_IDS.end()
            ),
            ReservedUse::Below(gpa) => write!(
                f,
                "a slot starting at {gpa:#x} in address space 0 (below 8 MiB, {RESERVED_BELOW:#x})"
            ),
        }
    }
}

/// A `read` step: one guest load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOp {
    /// The vCPU (0-based, below `vm.vcpus`).
    pub vcpu: u32,
    /// The address the guest uses, aligned to `width`: guest-physical with `paging=off`
    /// (`gpa=`), guest-virtual otherwise (`gva=`).
    pub gpa: u64,
    /// Access width.
    pub width: Width,
}

/// A `write` step: one guest store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOp {
    /// The vCPU (0-based, below `vm.vcpus`).
    pub vcpu: u32,
    /// The address the guest uses, aligned to `width`: guest-physical with `paging=off`
    /// (`gpa=`), guest-virtual otherwise (`gva=`).
    pub gpa: u64,
    /// Access width.
    pub width: Width,
    /// The value stored (fits in `width`).
    pub value: u64,
}

/// A `host-write` step: the VMM stores into its own buffer (little-endian).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostWriteOp {
    /// Where (aligned, inside the buffer).
    pub at: MemRef,
    /// Access width.
    pub width: Width,
    /// The value (fits in `width`).
    pub value: u64,
}

/// A `host-read` step: the VMM loads from its own buffer (little-endian).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReadOp {
    /// Where (aligned, inside the buffer).
    pub at: MemRef,
    /// Access width.
    pub width: Width,
}

/// A `dirty-log` step: `KVM_GET_DIRTY_LOG` on one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyLogOp {
    /// Slot id.
    pub id: u16,
    /// Address space.
    pub as_id: u16,
}

/// A `clear-dirty-log` step: `KVM_CLEAR_DIRTY_LOG` with every bit of `[first, first+count)` set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClearDirtyLogOp {
    /// Slot id.
    pub id: u16,
    /// Address space.
    pub as_id: u16,
    /// The first page (KVM's `first_page`; not checked: KVM's rules decide).
    pub first: u64,
    /// The number of pages (KVM's `num_pages`, a `u32`).
    pub count: u32,
}

impl DirtyLogOp {
    /// KVM's `slot` field: `(as << 16) | id`.
    pub fn kvm_slot(&self) -> u32 {
        kvm_slot(self.as_id, self.id)
    }
}

impl ClearDirtyLogOp {
    /// KVM's `slot` field: `(as << 16) | id`.
    pub fn kvm_slot(&self) -> u32 {
        kvm_slot(self.as_id, self.id)
    }
}

/// What a step does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `vm ...`, as written (defaults filled in, no overrides).
    Vm(VmConfig),
    /// `mem NAME size=SIZE`; the [`MemId`] is its index among the `mem` steps.
    Mem(MemId, MemDecl),
    /// `slot ...`.
    Slot(SlotOp),
    /// `read ...`.
    Read(ReadOp),
    /// `write ...`.
    Write(WriteOp),
    /// `host-write ...`.
    HostWrite(HostWriteOp),
    /// `host-read ...`.
    HostRead(HostReadOp),
    /// `mmio-reply value=V`.
    MmioReply(u64),
    /// `map ...` (version 2).
    Map(MapOp),
    /// `unmap ...` (version 2).
    Unmap(UnmapOp),
    /// `cr3 ...` (version 2).
    Cr3(Cr3Op),
    /// `dirty-log ID [as=A]`.
    DirtyLog(DirtyLogOp),
    /// `clear-dirty-log ID [as=A] first=N count=M`.
    ClearDirtyLog(ClearDirtyLogOp),
}

impl Op {
    /// The step's keyword.
    pub fn keyword(&self) -> &'static str {
        match self {
            Op::Vm(_) => "vm",
            Op::Mem(..) => "mem",
            Op::Slot(_) => "slot",
            Op::Read(_) => "read",
            Op::Write(_) => "write",
            Op::HostWrite(_) => "host-write",
            Op::HostRead(_) => "host-read",
            Op::MmioReply(_) => "mmio-reply",
            Op::Map(_) => "map",
            Op::Unmap(_) => "unmap",
            Op::Cr3(_) => "cr3",
            Op::DirtyLog(_) => "dirty-log",
            Op::ClearDirtyLog(_) => "clear-dirty-log",
        }
    }
}

/// One step: a line that holds a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Step number: counts lines that hold a step, from 1.
    pub number: u32,
    /// Line number in the file, from 1.
    pub line: u32,
    /// What it does.
    pub op: Op,
}

/// A parsed scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// The effective VM configuration: the `vm` line (or the defaults) with overrides applied.
    pub vm: VmConfig,
    /// The buffers, in declaration order (indexed by [`MemId`]).
    pub mems: Vec<MemDecl>,
    /// Every step, in file order.
    pub steps: Vec<Step>,
}

impl Scenario {
    /// Applies command-line overrides to [`Scenario::vm`] (the steps are unchanged).
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(f) = o.format {
            self.vm.format = f;
        }
        if let Some(m) = o.mmio_caching {
            self.vm.mmio_caching = m;
        }
        if let Some(p) = o.phys_bits {
            self.vm.phys_bits = p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_masks_and_bytes() {
        assert_eq!(Width::W1.mask(), 0xff);
        assert_eq!(Width::W2.mask(), 0xffff);
        assert_eq!(Width::W4.mask(), 0xffff_ffff);
        assert_eq!(Width::W8.mask(), u64::MAX);
        assert_eq!(Width::from_bytes(3), None);
        assert_eq!(Width::from_bytes(8).map(Width::bytes), Some(8));
    }

    #[test]
    fn kvm_slot_encoding_and_flag_bits() {
        let s = SlotOp {
            id: 7,
            as_id: 1,
            gpa: 0,
            size: 0,
            mem: None,
            flags: SlotFlags { readonly: true, dirty_log: true },
        };
        assert_eq!(s.kvm_slot(), 0x1_0007);
        assert_eq!(s.flags.bits(), 3);
        assert_eq!(SlotFlags { readonly: true, dirty_log: false }.bits(), 2);
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let mut s = Scenario { vm: VmConfig::default(), mems: vec![], steps: vec![] };
        s.apply(&Overrides { format: Some(Format::Npt), mmio_caching: None, phys_bits: Some(52) });
        assert_eq!(s.vm.format, Format::Npt);
        assert_eq!(s.vm.phys_bits, 52);
        assert!(s.vm.mmio_caching);
    }
}
