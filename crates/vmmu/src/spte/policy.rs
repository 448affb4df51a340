//! Whether MMIO caching is possible on this host, and with which masks: KVM's `kvm.mmio_caching`
//! module parameter plus the state `kvm_mmu_set_mmio_spte_mask` keeps (facts §1.4, §1.5).
//!
//! Invariants:
//! - the user's wish is snapshotted once, in [`MmioCachingPolicy::new`] (KVM's
//!   `allow_mmio_caching`), and every [`MmioCachingPolicy::set_mmio_masks`] starts again from it
//!   (c3e0c8c2e8b1, 2022): a later vendor mask can re-enable caching an earlier impossible mask
//!   disabled, and a user who disallowed caching stays disallowed;
//! - the six sanity checks run in KVM's order; where KVM would `WARN` (or `BUG`), the policy
//!   records why caching is off ([`DisabledReason`]) and turns it off. Nothing here panics;
//! - enabled implies: value != 0, mask within [`SPTE_MMIO_ALLOWED_MASK`], value within mask, value
//!   clear of the L1TF relocation bits, and `FROZEN & mask != value`;
//! - the value is per VM ([`MmioCachingPolicy::vm_codec`] copies it, [`MmioSpteCodec::with_vm_value`]
//!   overrides it); the mask and access mask are global.
//!
//! The policy is configuration: it changes only while the "module" loads, before any VM exists.
//! VMs take a [`MmioSpteCodec`] copy and never look at the policy again.
//!
//! Model simplification: one `phys_bits` serves both as KVM's `boot_cpu_data.x86_phys_bits`
//! (which SME may reduce) and as the raw MAXPHYADDR that decides whether a reserved bit exists.

use super::mmio::{MmioSpteCodec, NONPRESENT_OR_RSVD_MASK_LEN, SPTE_MMIO_ALLOWED_MASK};
use super::{genmask, rsvd_bits, FormatKind, SpteConfigError, SpteFormat};
use crate::bugs::{Bug, BugSet};
use core::fmt;

/// NPT's present bit (the low bit of NPT MMIO values).
const PT_PRESENT: u64 = 1;
/// KVM's `ACC_WRITE_MASK | ACC_USER_MASK`: the access mask for NPT and shadow paging.
const ACC_WRITE_USER: u64 = 0x6;
/// KVM's `VMX_EPT_MISCONFIG_WX_VALUE`: W and X without R.
pub const EPT_MISCONFIG_WX_VALUE: u64 = 0x6;
/// KVM's `VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT`: the EPT MMIO mask.
pub const EPT_MMIO_MASK: u64 = 0x7 | 1 << 63;

/// The host CPU facts the policy reads (KVM: CPUID and `boot_cpu_data`), validated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HostCpu {
    phys_bits: u8,
    l1tf: bool,
    cache_bits: u8,
}

impl HostCpu {
    /// A host with MAXPHYADDR `phys_bits` (36..=52), not affected by L1TF.
    pub fn new(phys_bits: u8) -> Result<Self, SpteConfigError> {
        if !(36..=52).contains(&phys_bits) {
            return Err(SpteConfigError::PhysBitsOutOfRange { phys_bits });
        }
        Ok(HostCpu { phys_bits, l1tf: false, cache_bits: phys_bits })
    }

    /// This host, affected by L1TF (`X86_BUG_L1TF`), with an L1D address width of `cache_bits`
    /// (`x86_cache_bits`, in `phys_bits..=52`).
    pub fn with_l1tf(self, cache_bits: u8) -> Result<Self, SpteConfigError> {
        if cache_bits < self.phys_bits || cache_bits > 52 {
            return Err(SpteConfigError::CacheBitsOutOfRange {
                cache_bits,
                phys_bits: self.phys_bits,
            });
        }
        Ok(HostCpu { l1tf: true, cache_bits, ..self })
    }

    /// MAXPHYADDR.
    pub const fn phys_bits(&self) -> u8 {
        self.phys_bits
    }
    /// Whether the host has the L1TF bug.
    pub const fn l1tf(&self) -> bool {
        self.l1tf
    }
    /// The L1D address width (`x86_cache_bits`).
    pub const fn cache_bits(&self) -> u8 {
        self.cache_bits
    }
}

/// Why MMIO caching is off, in words (what a user reading `mmio_caching=N` wants to know).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DisabledReason {
    /// The user disallowed caching (`mmio_caching=off`).
    UserDisabled,
    /// NPT/shadow on a host with 52 physical bits: no reserved PA bit to fault on.
    NoReservedPaBit {
        /// The host MAXPHYADDR.
        phys_bits: u8,
    },
    /// SEV: the C-bit took the only reserved bit below 52.
    NoReservedBitAboveCBit {
        /// The C-bit position.
        c_bit: u8,
        /// The host MAXPHYADDR.
        phys_bits: u8,
    },
    /// The caller asked for an MMIO value of 0.
    ZeroValue,
    /// Check 1 (KVM `BUG_ON`): the access mask does not fit in 32 bits.
    AccessMaskTooWide {
        /// The access mask given.
        access_mask: u64,
    },
    /// Check 3: the mask uses bits outside `SPTE_MMIO_ALLOWED_MASK`.
    MaskOutsideAllowed {
        /// The offending bits.
        bits: u64,
    },
    /// Check 4: the value overlaps the bits the L1TF mitigation relocates GFN bits into.
    ValueOverlapsL1tfRelocation {
        /// The offending bits.
        bits: u64,
    },
    /// Check 5: the value has bits outside the mask.
    ValueOutsideMask {
        /// The offending bits.
        bits: u64,
    },
    /// Check 6: a frozen SPTE would match the MMIO value.
    FrozenMatchesMmio,
}

impl fmt::Display for DisabledReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DisabledReason::UserDisabled => f.write_str("user disabled MMIO caching"),
            DisabledReason::NoReservedPaBit { phys_bits } => write!(
                f,
                "no reserved physical-address bit with MAXPHYADDR {phys_bits}: an x86-format (NPT or shadow) MMIO \
                 SPTE could not fault with RSVD"
            ),
            DisabledReason::NoReservedBitAboveCBit { c_bit, phys_bits } => write!(
                f,
                "no reserved physical-address bit left below 52 with MAXPHYADDR {phys_bits} and \
                 the SEV C-bit at {c_bit}"
            ),
            DisabledReason::ZeroValue => f.write_str("the MMIO value is 0"),
            DisabledReason::AccessMaskTooWide { access_mask } => write!(
                f,
                "check 1: access mask {access_mask:#x} does not fit in 32 bits (KVM would BUG)"
            ),
            DisabledReason::MaskOutsideAllowed { bits } => write!(
                f,
                "check 3: MMIO mask uses bits {bits:#x} outside SPTE_MMIO_ALLOWED_MASK \
                 ({SPTE_MMIO_ALLOWED_MASK:#x})"
            ),
            DisabledReason::ValueOverlapsL1tfRelocation { bits } => write!(
                f,
                "check 4: MMIO value bits {bits:#x} collide with the L1TF GFN relocation bits"
            ),
            DisabledReason::ValueOutsideMask { bits } => {
                write!(f, "check 5: MMIO value bits {bits:#x} are outside the MMIO mask")
            }
            DisabledReason::FrozenMatchesMmio => {
                f.write_str("check 6: frozen SPTE matches MMIO value")
            }
        }
    }
}

/// The module-wide MMIO caching state: KVM's `kvm.mmio_caching` parameter, `allow_mmio_caching`,
/// and the masks `kvm_mmu_set_mmio_spte_mask` stores.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MmioCachingPolicy {
    allow: bool,
    host: HostCpu,
    bugs: BugSet,
    nonpresent_or_rsvd_mask: u64,
    lower_gfn_mask: u64,
    l1tf_relocation: bool,
    value: u64,
    mask: u64,
    access_mask: u64,
    enabled: bool,
    reason: Option<DisabledReason>,
    gfn_overlap_warning: bool,
}

impl MmioCachingPolicy {
    /// Loads the "module": snapshots the user's wish (KVM's `kvm_mmu_spte_module_init`) and runs
    /// `kvm_mmu_reset_all_pte_masks`: the L1TF masks, then the NPT/shadow default
    /// `value = mask = BIT(51) | P` (or 0 with 52 physical bits), access mask W|U.
    pub fn new(user_allows: bool, host: HostCpu, bugs: BugSet) -> Self {
        let mut low_phys_bits = host.phys_bits as u32;
        let mut nonpresent_or_rsvd_mask = 0;
        // KVM WARNs and skips the mitigation when the cache width leaves no room for 5 bits.
        let l1tf_relocation =
            host.l1tf && (host.cache_bits as u32) < 52 - NONPRESENT_OR_RSVD_MASK_LEN;
        if l1tf_relocation {
            let cache_bits = host.cache_bits as u32;
            low_phys_bits = cache_bits - NONPRESENT_OR_RSVD_MASK_LEN;
            nonpresent_or_rsvd_mask = rsvd_bits(low_phys_bits, cache_bits - 1);
        }
        let mut p = MmioCachingPolicy {
            allow: user_allows,
            host,
            bugs,
            nonpresent_or_rsvd_mask,
            lower_gfn_mask: genmask(low_phys_bits - 1, 12),
            l1tf_relocation,
            value: 0,
            mask: 0,
            access_mask: 0,
            enabled: user_allows,
            reason: None,
            gfn_overlap_warning: false,
        };
        let value = if host.phys_bits < 52 { 1 << 51 | PT_PRESENT } else { 0 };
        let why = DisabledReason::NoReservedPaBit { phys_bits: host.phys_bits };
        p.set_masks(value, value, ACC_WRITE_USER, why);
        p
    }

    /// The sequence KVM runs at load for the vendor module that uses `kind`: VMX calls
    /// [`Self::set_ept_masks`]; SVM keeps the default, or applies [`Self::svm_adjust_for_sev`]
    /// on a host with memory encryption.
    pub fn for_format(user_allows: bool, host: HostCpu, kind: FormatKind, bugs: BugSet) -> Self {
        let mut p = Self::new(user_allows, host, bugs);
        match kind {
            FormatKind::Ept => p.set_ept_masks(),
            FormatKind::Npt => {}
            FormatKind::NptSev { c_bit } => p.svm_adjust_for_sev(c_bit),
        }
        p
    }

    /// KVM's `kvm_mmu_set_mmio_spte_mask(value, mask, access_mask)`.
    pub fn set_mmio_masks(&mut self, value: u64, mask: u64, access_mask: u64) {
        self.set_masks(value, mask, access_mask, DisabledReason::ZeroValue);
    }

    /// VMX with EPT (`kvm_mmu_set_ept_masks`): value W+X (a misconfiguration), mask RWX + bit 63,
    /// no access bits. Needs no reserved PA bit, so it works with 52 physical bits.
    pub fn set_ept_masks(&mut self) {
        self.set_masks(EPT_MISCONFIG_WX_VALUE, EPT_MMIO_MASK, 0, DisabledReason::ZeroValue);
    }

    /// SVM with memory encryption (`svm_adjust_mmio_mask`): the reserved range starts at
    /// MAXPHYADDR, one bit higher if the C-bit sits exactly there; at 52 caching is impossible.
    pub fn svm_adjust_for_sev(&mut self, c_bit: u8) {
        let phys_bits = self.host.phys_bits;
        let mut mask_bit = phys_bits as u32;
        if c_bit as u32 == mask_bit {
            mask_bit += 1;
        }
        let value = if mask_bit < 52 { rsvd_bits(mask_bit, 51) | PT_PRESENT } else { 0 };
        let why = DisabledReason::NoReservedBitAboveCBit { c_bit, phys_bits };
        self.set_masks(value, value, ACC_WRITE_USER, why);
    }

    /// The body of `kvm_mmu_set_mmio_spte_mask`; `zero` names why a value of 0 was asked for,
    /// when the caller knows.
    fn set_masks(&mut self, mut value: u64, mask: u64, access_mask: u64, zero: DisabledReason) {
        let mut reason = None;
        // Check 1 (KVM: BUG_ON): the access mask must fit in 32 bits.
        if access_mask >> 32 != 0 {
            value = 0;
            reason = Some(DisabledReason::AccessMaskTooWide { access_mask });
        }
        // Check 2 (KVM: WARN only): the value should not overlap the GFN bits.
        self.gfn_overlap_warning = value & self.lower_gfn_mask != 0;
        // Start again from the user's snapshot (the 2022 fix). With the historical bug, start
        // from whatever the previous call left, so a disable sticks.
        let start =
            if self.bugs.has(Bug::StickyCachingDisable) { self.enabled } else { self.allow };
        if !start {
            value = 0;
            let previous = if self.allow { self.reason } else { None };
            reason = reason.or(previous).or(Some(DisabledReason::UserDisabled));
        }
        // Check 3: the mask may use only the bits carved out for it.
        let outside = mask & !SPTE_MMIO_ALLOWED_MASK;
        if outside != 0 {
            value = 0;
            reason = reason.or(Some(DisabledReason::MaskOutsideAllowed { bits: outside }));
        }
        // Check 4: the value must not collide with the relocated L1TF GFN bits.
        let clash = value & (self.nonpresent_or_rsvd_mask << NONPRESENT_OR_RSVD_MASK_LEN);
        if clash != 0 {
            value = 0;
            reason = reason.or(Some(DisabledReason::ValueOverlapsL1tfRelocation { bits: clash }));
        }
        // Check 5: the masked value must match itself.
        if value & mask != value {
            let bits = value & !mask;
            value = 0;
            reason = reason.or(Some(DisabledReason::ValueOutsideMask { bits }));
        }
        // Check 6: a frozen SPTE must never look like MMIO.
        if value != 0 && SpteFormat::FROZEN & mask == value {
            value = 0;
            reason = reason.or(Some(DisabledReason::FrozenMatchesMmio));
        }
        self.enabled = value != 0;
        self.reason = if self.enabled { None } else { reason.or(Some(zero)) };
        self.value = value;
        self.mask = mask;
        self.access_mask = access_mask;
    }

    /// Whether MMIO caching is on (what reading `/sys/module/kvm/parameters/mmio_caching` says).
    pub const fn enabled(&self) -> bool {
        self.enabled
    }

    /// Why caching is off, or `None` when it is on.
    pub const fn reason(&self) -> Option<DisabledReason> {
        self.reason
    }

    /// Whether the user allowed caching (the snapshot taken at load).
    pub const fn user_allows(&self) -> bool {
        self.allow
    }

    /// Whether the last masks tripped check 2 (value overlaps the GFN bits; KVM only warns).
    pub const fn gfn_overlap_warning(&self) -> bool {
        self.gfn_overlap_warning
    }

    /// Whether the L1TF GFN relocation is in use (L1TF host with `cache_bits < 47`).
    pub const fn l1tf_relocation(&self) -> bool {
        self.l1tf_relocation
    }

    /// The host this policy was computed for.
    pub const fn host(&self) -> HostCpu {
        self.host
    }

    /// The codec a new VM copies (KVM's `kvm_mmu_init_vm` copying `shadow_mmio_value`).
    pub const fn vm_codec(&self) -> MmioSpteCodec {
        MmioSpteCodec {
            value: self.value,
            mask: self.mask,
            access_mask: self.access_mask,
            nonpresent_or_rsvd_mask: self.nonpresent_or_rsvd_mask,
            lower_gfn_mask: self.lower_gfn_mask,
            enabled: self.enabled,
        }
    }
}

impl fmt::Display for MmioCachingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            None => write!(
                f,
                "mmio_caching=Y (value {:#x}, mask {:#x}, access mask {:#x})",
                self.value, self.mask, self.access_mask
            ),
            Some(r) => write!(f, "mmio_caching=N ({r})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate alloc;
    use alloc::format;
    use alloc::string::{String, ToString};

    fn host(p: u8) -> HostCpu {
        HostCpu::new(p).unwrap()
    }

    /// The 2022 sequence (c3e0c8c2e8b1) on a host with 52 physical bits, as VMX loads: the
    /// impossible NPT default disables caching, the EPT masks re-enable it; a user who
    /// disallowed caching stays disallowed. Returns what went wrong, if anything.
    fn run_2022_sequence(bugs: BugSet) -> Result<(), String> {
        let mut p = MmioCachingPolicy::new(true, host(52), bugs);
        if p.enabled() || p.reason() != Some(DisabledReason::NoReservedPaBit { phys_bits: 52 }) {
            return Err(format!("default mask at 52 bits should disable caching: {p}"));
        }
        p.set_ept_masks();
        if !p.enabled() || p.reason().is_some() {
            return Err(format!("EPT masks should re-enable caching: {p}"));
        }
        let mut q = MmioCachingPolicy::new(false, host(46), bugs);
        q.set_ept_masks();
        if q.enabled() || q.reason() != Some(DisabledReason::UserDisabled) {
            return Err(format!("user disallowed caching, it must stay off: {q}"));
        }
        // And a vendor mask can disable, then a later good one re-enable.
        let mut r = MmioCachingPolicy::new(true, host(46), bugs);
        r.set_mmio_masks(0x6, 0xF, 0);
        if r.enabled() {
            return Err("a mask with bit 3 (outside the allowed bits) must disable".into());
        }
        r.set_ept_masks();
        if !r.enabled() {
            return Err(format!("good masks after a bad one should re-enable: {r}"));
        }
        Ok(())
    }

    #[test]
    fn caching_is_fully_reevaluated_on_every_mask_change() {
        assert_eq!(run_2022_sequence(BugSet::NONE), Ok(()));
    }

    #[cfg(feature = "historical-bugs")]
    #[test]
    fn sticky_caching_disable_is_caught() {
        let bugs = BugSet::only(Bug::StickyCachingDisable);
        let err = run_2022_sequence(bugs).expect_err("the 2022 sequence must reject the bug");
        assert!(err.contains("re-enable"), "{err}");
        // The wrong answer the bug gives: caching stays off after the EPT masks.
        let mut p = MmioCachingPolicy::new(true, host(52), bugs);
        p.set_ept_masks();
        assert!(!p.enabled());
        assert_eq!(p.reason(), Some(DisabledReason::NoReservedPaBit { phys_bits: 52 }));
    }

    #[test]
    fn npt_defaults_and_the_52_bit_limit() {
        let p = MmioCachingPolicy::for_format(true, host(46), FormatKind::Npt, BugSet::NONE);
        assert!(p.enabled());
        let c = p.vm_codec();
        assert_eq!((c.value(), c.mask(), c.access_mask()), (1 << 51 | 1, 1 << 51 | 1, 0x6));
        assert_eq!(c.lower_gfn_mask(), genmask(45, 12));
        let p = MmioCachingPolicy::for_format(true, host(52), FormatKind::Npt, BugSet::NONE);
        assert!(!p.enabled() && !p.vm_codec().enabled());
        assert_eq!(p.vm_codec().value(), 0);
        assert!(p.reason().unwrap().to_string().contains("MAXPHYADDR 52"));
    }

    #[test]
    fn ept_needs_no_reserved_bit() {
        for bits in [36, 46, 52] {
            let p = MmioCachingPolicy::for_format(true, host(bits), FormatKind::Ept, BugSet::NONE);
            assert!(p.enabled(), "EPT at {bits} bits: {p}");
            let c = p.vm_codec();
            assert_eq!((c.value(), c.mask(), c.access_mask()), (0x6, 0x7 | 1 << 63, 0));
        }
    }

    #[test]
    fn c_bit_rule() {
        let sev = |p: u8, c: u8| {
            MmioCachingPolicy::for_format(
                true,
                host(p),
                FormatKind::NptSev { c_bit: c },
                BugSet::NONE,
            )
        };
        // C-bit above MAXPHYADDR: the reserved range starts at MAXPHYADDR.
        assert_eq!(sev(43, 47).vm_codec().value(), genmask(51, 43) | 1);
        // C-bit exactly at MAXPHYADDR: the range moves one bit up, leaving the C-bit out.
        let p = sev(47, 47);
        assert_eq!(p.vm_codec().value(), genmask(51, 48) | 1);
        assert_eq!(p.vm_codec().value() & (1 << 47), 0);
        // C-bit at 51 with MAXPHYADDR 51: nothing left below 52.
        let p = sev(51, 51);
        assert!(!p.enabled());
        assert_eq!(
            p.reason(),
            Some(DisabledReason::NoReservedBitAboveCBit { c_bit: 51, phys_bits: 51 })
        );
        // C-bit at 51 with MAXPHYADDR 50: bit 50 is still reserved.
        assert_eq!(sev(50, 51).vm_codec().value(), genmask(51, 50) | 1);
        // The adjust can re-enable after an earlier disable, and gives up at 52.
        let mut q = MmioCachingPolicy::new(true, host(52), BugSet::NONE);
        q.svm_adjust_for_sev(51);
        assert!(!q.enabled());
    }

    #[test]
    fn each_check_disables_with_its_reason() {
        let fresh = || MmioCachingPolicy::new(true, host(46), BugSet::NONE);
        let mut p = fresh();
        p.set_mmio_masks(0x6, 0x7, 1 << 32);
        assert_eq!(p.reason(), Some(DisabledReason::AccessMaskTooWide { access_mask: 1 << 32 }));
        let mut p = fresh();
        p.set_mmio_masks(1 << 51 | 1 << 20 | 1, 1 << 51 | 1 << 20 | 1, 6);
        assert!(p.enabled() && p.gfn_overlap_warning(), "check 2 only warns");
        let mut p = fresh();
        p.set_mmio_masks(0x6, 0x7 | 1 << 11, 0);
        assert_eq!(p.reason(), Some(DisabledReason::MaskOutsideAllowed { bits: 1 << 11 }));
        let l1tf = host(46).with_l1tf(46).unwrap();
        let mut p = MmioCachingPolicy::new(true, l1tf, BugSet::NONE);
        assert!(p.enabled() && p.l1tf_relocation(), "bit 51 is clear of 46..=50");
        p.set_mmio_masks(1 << 50 | 1, 1 << 50 | 1, 6);
        assert_eq!(p.reason(), Some(DisabledReason::ValueOverlapsL1tfRelocation { bits: 1 << 50 }));
        let mut p = fresh();
        p.set_mmio_masks(0x6, 0x4, 0);
        assert_eq!(p.reason(), Some(DisabledReason::ValueOutsideMask { bits: 0x2 }));
        let mut p = fresh();
        p.set_mmio_masks(1 << 63, 0x7 | 1 << 63, 0);
        assert_eq!(p.reason(), Some(DisabledReason::FrozenMatchesMmio));
        assert_eq!(p.reason().unwrap().to_string(), "check 6: frozen SPTE matches MMIO value");
        let mut p = fresh();
        p.set_mmio_masks(0, 0x7, 0);
        assert_eq!(p.reason(), Some(DisabledReason::ZeroValue));
        assert!(p.to_string().starts_with("mmio_caching=N"));
    }

    #[test]
    fn l1tf_is_skipped_when_the_cache_is_too_wide() {
        let h = host(46).with_l1tf(47).unwrap();
        let p = MmioCachingPolicy::new(true, h, BugSet::NONE);
        assert!(!p.l1tf_relocation());
        assert_eq!(p.vm_codec().nonpresent_or_rsvd_mask(), 0);
        assert!(host(46).with_l1tf(45).is_err());
        assert!(host(46).with_l1tf(53).is_err());
        assert!(HostCpu::new(53).is_err());
    }

    #[test]
    fn the_value_is_per_vm() {
        let p = MmioCachingPolicy::for_format(true, host(46), FormatKind::Ept, BugSet::NONE);
        let a = p.vm_codec();
        let b = p.vm_codec().with_vm_value(0);
        assert!(a.enabled() && !b.enabled(), "one VM caches, the other does not");
        assert!(p.enabled(), "the module-wide state is unchanged");
    }
}
