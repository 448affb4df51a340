//! The MMIO SPTE codec: an entry that says "this gfn is emulated MMIO, as of memslot generation
//! G, with guest access A" and that the CPU cannot use, so every access to it exits to the MMU's
//! fast MMIO path (KVM's `make_mmio_spte`, `get_mmio_spte_gfn`, `get_mmio_spte_generation`,
//! `get_mmio_spte_access`, `is_mmio_spte`).
//!
//! Layout of an MMIO SPTE (facts §1.1):
//!
//! | bits | content |
//! |---|---|
//! | 2:0 | EPT: the value `110` (W+X without R: a misconfiguration). NPT: `P = 1`, bits 1, 2 = guest access W, U (through the access mask) |
//! | 10:3 | generation bits 7:0 |
//! | 11 | 0: an MMIO SPTE is never MMU-present |
//! | 51:12 | the GPA; with the L1TF mitigation the 5 bits `[cache_bits-5, cache_bits)` are forced to 1 and the GPA bits there move 5 bits up |
//! | 51 (or `mask_bit..=51` with SEV) | NPT: reserved PA bits, part of the value, so the CPU faults with RSVD |
//! | 62:52 | generation bits 18:8 |
//! | 63 | EPT: 0 (in the mask, so the non-present value, which has it set, never matches) |
//!
//! A codec is `Copy` and is what the fast path holds: no lock, no allocation. It is made by
//! [`super::MmioCachingPolicy::vm_codec`]; the invariants the policy's sanity checks establish
//! (mask inside [`SPTE_MMIO_ALLOWED_MASK`], value inside the mask, value clear of the L1TF
//! relocation and not matching [`SpteFormat::FROZEN`]) hold for every enabled codec.

use super::SpteFormat;
use crate::types::{Access, Generation, Gfn, PAGE_SHIFT};

/// Generation bits 7:0 live in SPTE bits 10:3 (KVM `MMIO_SPTE_GEN_LOW_MASK`).
pub const MMIO_SPTE_GEN_LOW_MASK: u64 = 0x7F8;
/// Generation bits 18:8 live in SPTE bits 62:52 (KVM `MMIO_SPTE_GEN_HIGH_MASK`).
pub const MMIO_SPTE_GEN_HIGH_MASK: u64 = 0x7FF0_0000_0000_0000;
const GEN_LOW_SHIFT: u32 = 3;
const GEN_HIGH_SHIFT: u32 = 52 - 8;
/// The bits an MMIO mask may use (KVM `SPTE_MMIO_ALLOWED_MASK`): 63, 51..=12, 2..=0.
pub const SPTE_MMIO_ALLOWED_MASK: u64 = 0x800F_FFFF_FFFF_F007;
/// Width of the L1TF relocation (KVM `SHADOW_NONPRESENT_OR_RSVD_MASK_LEN`).
pub const NONPRESENT_OR_RSVD_MASK_LEN: u32 = 5;

const _: () = assert!(Generation::MMIO_GEN_BITS == 8 + 11);
const _: () = assert!(
    SPTE_MMIO_ALLOWED_MASK
        & (MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK | SpteFormat::MMU_PRESENT)
        == 0
);

/// The generation bits of an SPTE for the 19-bit MMIO generation `gen`.
#[inline]
pub const fn encode_gen(gen: u64) -> u64 {
    debug_assert!(gen & !Generation::MMIO_GEN_MASK == 0);
    ((gen << GEN_LOW_SHIFT) & MMIO_SPTE_GEN_LOW_MASK)
        | ((gen << GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK)
}

/// The 19-bit MMIO generation stored in `spte`.
#[inline]
pub const fn decode_gen(spte: u64) -> u64 {
    ((spte & MMIO_SPTE_GEN_LOW_MASK) >> GEN_LOW_SHIFT)
        | ((spte & MMIO_SPTE_GEN_HIGH_MASK) >> GEN_HIGH_SHIFT)
}

/// The masks an MMIO SPTE is built and recognised with, for one VM.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MmioSpteCodec {
    pub(super) value: u64,
    pub(super) mask: u64,
    pub(super) access_mask: u64,
    pub(super) nonpresent_or_rsvd_mask: u64,
    pub(super) lower_gfn_mask: u64,
    pub(super) enabled: bool,
}

impl MmioSpteCodec {
    /// A codec that caches nothing: [`Self::is_mmio`] is always false.
    pub const DISABLED: MmioSpteCodec = MmioSpteCodec {
        value: 0,
        mask: 0,
        access_mask: 0,
        nonpresent_or_rsvd_mask: 0,
        lower_gfn_mask: 0,
        enabled: false,
    };

    /// The MMIO SPTE for `gfn`, as of generation `gen`, with guest access `access` (KVM's
    /// `make_mmio_spte`). Only the low 19 bits of the generation are stored; the in-progress flag
    /// is dropped, so an entry made during an update carries the pre-update bits and can never
    /// hit later. Callers make MMIO SPTEs only when [`Self::enabled`]; `gfn` must lie below
    /// the host's physical-address limit (both debug-asserted).
    #[inline]
    pub fn make(&self, gfn: Gfn, gen: Generation, access: Access) -> u64 {
        debug_assert!(self.enabled, "MMIO SPTE made while caching is disabled");
        let gpa = gfn.gpa().raw();
        debug_assert!(
            gpa & !(self.lower_gfn_mask | self.nonpresent_or_rsvd_mask) == 0,
            "{gfn:?} beyond what an MMIO SPTE can hold"
        );
        let mut spte = encode_gen(gen.mmio_bits())
            | self.value
            | (access.bits() as u64 & self.access_mask)
            | gpa
            | self.nonpresent_or_rsvd_mask;
        spte |= (gpa & self.nonpresent_or_rsvd_mask) << NONPRESENT_OR_RSVD_MASK_LEN;
        spte
    }

    /// Whether `spte` is an MMIO SPTE of this VM: `(spte & mask) == value` while caching is
    /// enabled (KVM's `is_mmio_spte`).
    #[inline]
    pub const fn is_mmio(&self, spte: u64) -> bool {
        (spte & self.mask) == self.value && self.enabled
    }

    /// The gfn an MMIO SPTE caches, undoing the L1TF relocation (KVM's `get_mmio_spte_gfn`).
    #[inline]
    pub const fn gfn(&self, spte: u64) -> Gfn {
        let gpa = (spte & self.lower_gfn_mask)
            | ((spte >> NONPRESENT_OR_RSVD_MASK_LEN) & self.nonpresent_or_rsvd_mask);
        Gfn(gpa >> PAGE_SHIFT)
    }

    /// The 19 generation bits an MMIO SPTE holds (KVM's `get_mmio_spte_generation`).
    #[inline]
    pub const fn generation_bits(&self, spte: u64) -> u64 {
        decode_gen(spte)
    }

    /// The guest access an MMIO SPTE caches: `spte & access_mask` (W|U for NPT, none for EPT).
    #[inline]
    pub const fn access(&self, spte: u64) -> Access {
        Access::from_bits((spte & self.access_mask) as u8)
    }

    /// Whether this VM caches MMIO in SPTEs.
    #[inline]
    pub const fn enabled(&self) -> bool {
        self.enabled
    }

    /// The MMIO value (0 when disabled).
    #[inline]
    pub const fn value(&self) -> u64 {
        self.value
    }

    /// The MMIO mask.
    #[inline]
    pub const fn mask(&self) -> u64 {
        self.mask
    }

    /// The access mask (`ACC_*` bits stored in the entry).
    #[inline]
    pub const fn access_mask(&self) -> u64 {
        self.access_mask
    }

    /// The L1TF bits forced to 1 in every MMIO SPTE (0 without the mitigation).
    #[inline]
    pub const fn nonpresent_or_rsvd_mask(&self) -> u64 {
        self.nonpresent_or_rsvd_mask
    }

    /// The GPA bits stored in place (below the L1TF bits, or below MAXPHYADDR).
    #[inline]
    pub const fn lower_gfn_mask(&self) -> u64 {
        self.lower_gfn_mask
    }

    /// The largest gfn an MMIO SPTE of this codec can hold.
    #[inline]
    pub const fn max_gfn(&self) -> Gfn {
        Gfn((self.lower_gfn_mask | self.nonpresent_or_rsvd_mask) >> PAGE_SHIFT)
    }

    /// This codec with a per-VM MMIO value (KVM's `kvm_mmu_set_mmio_spte_value`, since v6.10
    /// `kvm->arch.shadow_mmio_value`); the mask and access mask stay global.
    ///
    /// A value of 0 (what KVM sets for TDX guests) turns caching off for this VM only. KVM keeps
    /// installing value-0 entries for TDX, which then raise #VE inside the guest; the model has
    /// no #VE, so here the VM simply does not cache. A value that would break the policy's
    /// sanity checks (outside the mask, overlapping the L1TF relocation, matching the frozen
    /// value) also disables caching for the VM rather than risk a false hit. A VM cannot enable
    /// caching the host policy has disabled.
    #[must_use]
    pub const fn with_vm_value(self, value: u64) -> Self {
        let sane = value != 0
            && value & !self.mask == 0
            && value & (self.nonpresent_or_rsvd_mask << NONPRESENT_OR_RSVD_MASK_LEN) == 0
            && (SpteFormat::FROZEN & self.mask) != value;
        MmioSpteCodec { value: if sane { value } else { 0 }, enabled: self.enabled && sane, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spte::genmask;

    fn codec(
        value: u64,
        mask: u64,
        access_mask: u64,
        phys: u32,
        cache: Option<u32>,
    ) -> MmioSpteCodec {
        let (low, nprsvd) = match cache {
            Some(c) => (c - 5, genmask(c - 1, c - 5)),
            None => (phys, 0),
        };
        MmioSpteCodec {
            value,
            mask,
            access_mask,
            nonpresent_or_rsvd_mask: nprsvd,
            lower_gfn_mask: genmask(low - 1, 12),
            enabled: true,
        }
    }

    #[test]
    fn generation_bit_positions() {
        assert_eq!(encode_gen(0), 0);
        assert_eq!(encode_gen(1), 1 << 3);
        assert_eq!(encode_gen(0xFF), 0x7F8);
        assert_eq!(encode_gen(0x100), 1 << 52);
        assert_eq!(encode_gen(0x7FFFF), 0x7FF0_0000_0000_07F8);
        assert_eq!(decode_gen(0x7FF0_0000_0000_07F8), 0x7FFFF);
        assert_eq!(decode_gen(!0), 0x7FFFF, "only the generation bits are read");
    }

    #[test]
    fn make_drops_the_in_progress_flag() {
        let c = codec(0x6, 0x8000_0000_0000_0007, 0, 46, None);
        let g = Generation::from_raw(0x1_2345_6789).mark_in_progress();
        let spte = c.make(Gfn(0x42), g, Access::ALL);
        assert_eq!(c.generation_bits(spte), 0x1_2345_6789 & 0x7FFFF);
        assert_eq!(spte & (1 << 63), 0, "bit 63 of an EPT MMIO SPTE stays clear");
        assert_eq!(c.access(spte), Access::NONE, "EPT stores no access bits");
    }

    #[test]
    fn l1tf_relocation_example_from_the_facts() {
        // cache_bits 46: bits 41..=45 forced to 1, GFN bits there stored at 46..=50.
        let v = 1 << 51 | 1;
        let c = codec(v, v, 0x6, 46, Some(46));
        assert_eq!(c.nonpresent_or_rsvd_mask(), genmask(45, 41));
        let gpa = 1u64 << 43 | 1 << 20;
        let spte = c.make(Gfn(gpa >> 12), Generation::from_raw(0), Access::WRITE);
        assert_eq!(spte & genmask(45, 41), genmask(45, 41), "cache bits forced to 1");
        assert_ne!(spte & (1 << 48), 0, "gpa bit 43 relocated to 48");
        assert_eq!(c.gfn(spte), Gfn(gpa >> 12));
        assert_eq!(c.access(spte), Access::WRITE);
        assert!(c.is_mmio(spte));
        assert_eq!(c.max_gfn(), Gfn(genmask(45, 12) >> 12));
    }

    #[test]
    fn disabled_codecs_match_nothing() {
        assert!(!MmioSpteCodec::DISABLED.is_mmio(0));
        let mut c = codec(0, 0, 0, 52, None);
        c.enabled = false;
        assert!(!c.is_mmio(0x1234), "mask 0 would match everything if not for the flag");
    }

    #[test]
    fn per_vm_value_zero_disables_only_that_vm() {
        let global = codec(0x6, 0x8000_0000_0000_0007, 0, 46, None);
        let tdx = global.with_vm_value(0);
        assert!(global.enabled() && !tdx.enabled());
        let spte = global.make(Gfn(1), Generation::from_raw(2), Access::ALL);
        assert!(global.is_mmio(spte) && !tdx.is_mmio(spte));
        assert!(global.with_vm_value(0x6).enabled());
        assert!(!global.with_vm_value(0x8).enabled(), "outside the mask");
        assert!(!global.with_vm_value(1 << 63).enabled(), "would match the frozen value");
    }

    /// A per-VM value with a bit where the L1TF mitigation stores relocated GFN bits turns
    /// caching off for the VM: an MMIO SPTE made with it would decode to another gfn (the value
    /// bit reads back as a GFN bit), so the VM would emulate at the wrong address. Kills
    /// `nonpresent_or_rsvd_mask << 5` -> `>> 5` in `with_vm_value`, which checked bits that hold
    /// no relocated GFN bits and accepted the value.
    #[test]
    fn a_per_vm_value_in_the_l1tf_relocation_bits_disables_caching() {
        // cache_bits 46: GFN bits 41..=45 live at 46..=50; the mask covers 46..=51 and P.
        let mask = genmask(51, 46) | 1;
        let global = codec(1 << 51 | 1, mask, 0x6, 46, Some(46));
        assert!(global.with_vm_value(1 << 51 | 1).enabled());
        let bad_value = 1 << 48 | 1;
        assert!(!global.with_vm_value(bad_value).enabled(), "bit 48 holds GFN bit 43");
        // What accepting it would do: the gfn read back from its MMIO SPTE is not the gfn.
        let unchecked = MmioSpteCodec { value: bad_value, ..global };
        let spte = unchecked.make(Gfn(1), Generation::from_raw(0), Access::NONE);
        assert_eq!(unchecked.gfn(spte), Gfn(1 | 1 << (43 - 12)));
    }

    /// A sane per-VM value is the value that VM's MMIO SPTEs carry and are recognised by (KVM
    /// `kvm->arch.shadow_mmio_value`): an entry made with the global value is not MMIO for it.
    /// Kills deleting `value:` from `with_vm_value`'s result, which kept the global value.
    #[test]
    fn a_per_vm_value_is_what_that_vms_mmio_sptes_carry() {
        let global = codec(0x6, 0x8000_0000_0000_0007, 0, 46, None);
        let vm = global.with_vm_value(0x2);
        assert!(vm.enabled());
        let g = Generation::from_raw(2);
        let spte = vm.make(Gfn(0x42), g, Access::ALL);
        assert_eq!(spte & vm.mask(), 0x2);
        assert!(vm.is_mmio(spte) && !global.is_mmio(spte));
        assert!(!vm.is_mmio(global.make(Gfn(0x42), g, Access::ALL)));
    }
}
