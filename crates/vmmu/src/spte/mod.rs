//! SPTEs: how an entry of the MMU's own page tables is encoded, what the CPU makes of it, how an
//! MMIO SPTE caches "this gfn is MMIO", and whether the host can cache MMIO at all.
//!
//! Split the way KVM splits `mmu/spte.h` (encoding) from `mmu/spte.c` (policy):
//!
//! | module | owns | KVM counterpart |
//! |---|---|---|
//! | [`format`] | entry layouts per format (EPT, NPT, NPT with an SEV C-bit), present/leaf/non-present/frozen values | `spte.h`, `make_spte`, `make_nonleaf_spte` |
//! | [`classify`] | what the CPU decides for an entry: present, not present, misconfigured/reserved | the hardware walker; `shadow_zero_check`, `bad_mt_xwr` |
//! | [`mmio`] | the MMIO SPTE codec: generation, gfn (with the L1TF relocation), access, `is_mmio_spte` | `make_mmio_spte`, `get_mmio_spte_*`, `is_mmio_spte` |
//! | [`policy`] | whether MMIO caching is possible, the six sanity checks, the per-VM value | `kvm_mmu_set_mmio_spte_mask`, `kvm.mmio_caching`, `svm_adjust_mmio_mask` |
//!
//! Invariants the whole module keeps (the first three have tests that can fail in
//! `tests/spte_props.rs`; of the last, only the configuration errors are tested, in `format.rs`,
//! and the fault paths' allocation count, in `tests/hot_path_alloc.rs`):
//! - [`SpteFormat::NONPRESENT`], [`SpteFormat::FROZEN`] and every MMIO SPTE are not
//!   MMU-present (bit 11 clear), and the CPU sees the first two as not present in every format;
//! - no MMU-present SPTE a format makes, nor the non-present or frozen value, ever matches the
//!   MMIO pattern of an enabled codec;
//! - an MMIO SPTE of an enabled codec always makes the CPU exit with a misconfiguration (EPT) or
//!   a reserved-bit fault (NPT), so the fault reaches the MMIO fast path;
//! - nothing here allocates, locks or panics on input; configuration errors are
//!   [`SpteConfigError`]s.

pub mod classify;
mod dump;
pub mod format;
pub mod mmio;
pub mod policy;

pub use classify::{HwEntry, PdpteEntry, RsvdReason};
pub use dump::SpteDump;
pub use format::{FormatKind, SpteFormat};
pub use mmio::MmioSpteCodec;
pub use policy::{DisabledReason, HostCpu, MmioCachingPolicy};

/// A bad SPTE-format or host-CPU configuration (from a scenario line, a CLI flag or a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpteConfigError {
    /// The host MAXPHYADDR is outside what x86-64 allows here.
    #[error("phys_bits={phys_bits} is not supported: the host MAXPHYADDR must be in 36..=52")]
    PhysBitsOutOfRange {
        /// The rejected value.
        phys_bits: u8,
    },
    /// The SEV C-bit is not above the physical-address bits, or not below bit 52.
    #[error(
        "SEV C-bit {c_bit} is not supported with phys_bits={phys_bits}: the C-bit must be in \
         {phys_bits}..=51 (at or above MAXPHYADDR, below bit 52)"
    )]
    CBitOutOfRange {
        /// The rejected C-bit position.
        c_bit: u8,
        /// The host MAXPHYADDR it was checked against.
        phys_bits: u8,
    },
    /// The L1D cache address width is below MAXPHYADDR or above 52.
    #[error(
        "cache_bits={cache_bits} is not supported with phys_bits={phys_bits}: the L1D address \
         width (x86_cache_bits) must be in {phys_bits}..=52"
    )]
    CacheBitsOutOfRange {
        /// The rejected value.
        cache_bits: u8,
        /// The host MAXPHYADDR it was checked against.
        phys_bits: u8,
    },
}

/// `GENMASK_ULL(hi, lo)`: bits `lo..=hi` set; empty when `hi < lo`.
#[inline]
pub(crate) const fn genmask(hi: u32, lo: u32) -> u64 {
    if hi < lo || lo > 63 {
        return 0;
    }
    let hi = if hi > 63 { 63 } else { hi };
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// KVM's `rsvd_bits(s, e)`: bits `s..=e`, or 0 when `e < s`.
#[inline]
pub(crate) const fn rsvd_bits(s: u32, e: u32) -> u64 {
    genmask(e, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genmask_matches_kernel_examples() {
        assert_eq!(genmask(10, 3), 0x7F8);
        assert_eq!(genmask(62, 52), 0x7FF0_0000_0000_0000);
        assert_eq!(genmask(63, 63), 1 << 63);
        assert_eq!(genmask(0, 0), 1);
        assert_eq!(rsvd_bits(52, 51), 0, "empty when e < s");
        assert_eq!(rsvd_bits(46, 51), 0x000F_C000_0000_0000);
    }

    #[test]
    fn errors_say_what_to_change() {
        extern crate alloc;
        use alloc::string::ToString;
        let e = SpteConfigError::CBitOutOfRange { c_bit: 40, phys_bits: 46 };
        assert!(e.to_string().contains("46..=51"), "{e}");
    }
}
