//! Properties of SPTE formats, the MMIO SPTE codec and the caching policy, over every format,
//! every host MAXPHYADDR 36..=52, L1TF on and off, and every SEV C-bit position:
//!
//! - the frozen value, the non-present value and any MMIO SPTE never match each other under the
//!   MMIO mask, and no MMU-present entry a format makes is ever taken for MMIO;
//! - the CPU sees the non-present and frozen values as not present, and every MMIO SPTE as a
//!   misconfiguration (EPT) or a reserved-bit fault (NPT);
//! - encode then decode returns the gfn, the masked generation and the masked access.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

use proptest::prelude::*;
use vmmu::bugs::BugSet;
use vmmu::spte::{
    DisabledReason, FormatKind, HostCpu, HwEntry, MmioCachingPolicy, RsvdReason, SpteFormat,
};
use vmmu::{Access, Generation, Gfn, Level, Pfn};

const LEVELS: [Level; 5] = [Level::L4K, Level::L2M, Level::L1G, Level::L4, Level::L5];

/// One host/format configuration.
#[derive(Clone, Copy, Debug)]
struct Config {
    host: HostCpu,
    format: SpteFormat,
}

impl Config {
    fn policy(&self) -> MmioCachingPolicy {
        MmioCachingPolicy::for_format(true, self.host, self.format.kind(), BugSet::NONE)
    }
}

/// Every configuration: each MAXPHYADDR, each kind (SEV with every C-bit position), L1TF off
/// and on with a spread of cache widths (below, at and above the 47-bit cut-off).
fn all_configs() -> Vec<Config> {
    let mut out = Vec::new();
    for phys in 36..=52u8 {
        let mut kinds = vec![FormatKind::Ept, FormatKind::Npt];
        kinds.extend((phys..=51).map(|c_bit| FormatKind::NptSev { c_bit }));
        let mut hosts = vec![HostCpu::new(phys).unwrap()];
        for cache in [phys, phys + 4, 44, 46, 47, 52] {
            if let Ok(h) = HostCpu::new(phys).unwrap().with_l1tf(cache) {
                hosts.push(h);
            }
        }
        for kind in kinds {
            for &host in &hosts {
                out.push(Config { host, format: SpteFormat::new(kind, phys).unwrap() });
            }
        }
    }
    out
}

/// A configuration from raw random numbers (for proptest).
fn config_from(phys: u8, kind_sel: u8, c_off: u8, l1tf: bool, cache_off: u8) -> Config {
    let kind = match kind_sel % 3 {
        0 => FormatKind::Ept,
        2 if phys < 52 => FormatKind::NptSev { c_bit: phys + c_off % (52 - phys) },
        _ => FormatKind::Npt,
    };
    let mut host = HostCpu::new(phys).unwrap();
    if l1tf {
        host = host.with_l1tf(phys + cache_off % (53 - phys)).unwrap();
    }
    Config { host, format: SpteFormat::new(kind, phys).unwrap() }
}

fn expect_npt_mmio_misconfig(spte: u64, entry: HwEntry) {
    assert!(
        matches!(entry, HwEntry::Misconfig(RsvdReason::PhysAddrBit { .. })),
        "NPT MMIO SPTE {spte:#x} must fault with RSVD, got {entry:?}"
    );
}

#[test]
fn special_values_never_look_like_mmio_in_any_configuration() {
    let configs = all_configs();
    assert!(configs.len() > 500, "the sweep covers the space ({} configs)", configs.len());
    let mut enabled = 0;
    for cfg in configs {
        let p = cfg.policy();
        let c = p.vm_codec();
        let phys = cfg.format.phys_bits();
        // Whether caching must be possible: EPT always; NPT with a reserved bit; SEV with a
        // reserved bit left after the C-bit (L1TF never applies to SEV hosts in practice, so a
        // check-4 refusal there is allowed).
        match cfg.format.kind() {
            FormatKind::Ept => assert!(p.enabled(), "{cfg:?}: {p}"),
            FormatKind::Npt => assert_eq!(p.enabled(), phys < 52, "{cfg:?}: {p}"),
            FormatKind::NptSev { c_bit } => {
                let room = phys < 51 || c_bit != phys;
                if !cfg.host.l1tf() || !p.l1tf_relocation() {
                    assert_eq!(p.enabled(), room, "{cfg:?}: {p}");
                } else if !p.enabled() && room {
                    assert!(
                        matches!(
                            p.reason(),
                            Some(DisabledReason::ValueOverlapsL1tfRelocation { .. })
                        ),
                        "{cfg:?}: {p}"
                    );
                }
            }
        }
        assert_eq!(p.enabled(), p.reason().is_none(), "{cfg:?}");
        assert_eq!(c.enabled(), p.enabled());
        for codec in [c, c.with_vm_value(0)] {
            assert!(!codec.is_mmio(SpteFormat::FROZEN), "{cfg:?}: frozen taken for MMIO");
            assert!(!codec.is_mmio(SpteFormat::NONPRESENT), "{cfg:?}: non-present taken for MMIO");
        }
        if p.enabled() {
            enabled += 1;
            assert_ne!(SpteFormat::FROZEN & c.mask(), c.value(), "{cfg:?}");
            assert_ne!(SpteFormat::NONPRESENT & c.mask(), c.value(), "{cfg:?}");
            // The highest and lowest MMIO SPTEs differ from both special values.
            for spte in [
                c.make(Gfn(0), Generation::from_raw(0), Access::NONE),
                c.make(c.max_gfn(), Generation::from_raw(u64::MAX), Access::ALL),
            ] {
                assert!(spte != SpteFormat::FROZEN && spte != SpteFormat::NONPRESENT);
                assert!(!SpteFormat::is_mmu_present(spte));
            }
        }
        for level in LEVELS {
            for v in [SpteFormat::FROZEN, SpteFormat::NONPRESENT] {
                assert_eq!(cfg.format.classify(v, level), HwEntry::NotPresent, "{cfg:?} {v:#x}");
            }
        }
    }
    assert!(enabled > 0);
}

#[test]
fn max_gfn_is_the_host_limit() {
    for cfg in all_configs() {
        let c = cfg.policy().vm_codec();
        if c.enabled() {
            let limit = (1u64 << (cfg.host.phys_bits() - 12)) - 1;
            assert!(c.max_gfn().raw() >= limit, "{cfg:?}: {:?} < {limit:#x}", c.max_gfn());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Encode then decode returns the gfn, the 19 low generation bits and the stored access, and
    /// the entry is MMIO, not MMU-present, and traps in hardware at every level.
    #[test]
    fn mmio_spte_round_trips_and_traps(
        phys in 36u8..=52, kind_sel in 0u8..3, c_off: u8, l1tf: bool, cache_off: u8,
        gfn_raw: u64, gen_raw: u64, acc in 0u8..8,
    ) {
        let cfg = config_from(phys, kind_sel, c_off, l1tf, cache_off);
        let c = cfg.policy().vm_codec();
        prop_assume!(c.enabled());
        let gfn = Gfn(gfn_raw & ((1u64 << (phys - 12)) - 1));
        let gen = Generation::from_raw(gen_raw);
        let access = Access::from_bits(acc);
        let spte = c.make(gfn, gen, access);
        prop_assert!(c.is_mmio(spte), "{cfg:?}: {spte:#x} not recognised");
        prop_assert_eq!(c.gfn(spte), gfn);
        prop_assert_eq!(c.generation_bits(spte), gen_raw & 0x7FFFF);
        prop_assert_eq!(c.access(spte).bits() as u64, acc as u64 & c.access_mask());
        if cfg.format.is_ept() {
            prop_assert_eq!(c.access(spte), Access::NONE);
        } else {
            prop_assert_eq!(c.access(spte), access.intersect(Access::WRITE.union(Access::USER)));
        }
        prop_assert!(!SpteFormat::is_mmu_present(spte));
        prop_assert!(spte != SpteFormat::FROZEN && spte != SpteFormat::NONPRESENT);
        prop_assert!(!c.with_vm_value(0).is_mmio(spte));
        for level in LEVELS {
            let hw = cfg.format.classify(spte, level);
            if cfg.format.is_ept() {
                prop_assert!(
                    matches!(hw, HwEntry::Misconfig(RsvdReason::WriteWithoutRead { xwr: 0b110 })),
                    "{:?}: EPT MMIO SPTE {:#x} at {:?} gave {:?}", cfg, spte, level, hw
                );
            } else {
                expect_npt_mmio_misconfig(spte, hw);
            }
        }
    }

    /// No MMU-present entry a format makes is ever taken for an MMIO SPTE.
    #[test]
    fn present_entries_are_never_mmio(
        phys in 36u8..=52, kind_sel in 0u8..3, c_off: u8, l1tf: bool, cache_off: u8,
        pfn_raw: u64, lvl in 1u8..=3, acc in 0u8..8, writable: bool,
    ) {
        let cfg = config_from(phys, kind_sel, c_off, l1tf, cache_off);
        let c = cfg.policy().vm_codec();
        let level = Level::new(lvl).unwrap();
        let pfn = Pfn(pfn_raw & ((1u64 << (phys - 12)) - 1) & !(level.pages() - 1));
        let leaf = cfg.format.make_leaf(pfn, level, Access::from_bits(acc), writable);
        let table = cfg.format.make_nonleaf(pfn);
        for spte in [leaf, table] {
            prop_assert!(SpteFormat::is_mmu_present(spte));
            prop_assert!(!c.is_mmio(spte), "{:?}: present {:#x} taken for MMIO", cfg, spte);
            prop_assert!(spte != SpteFormat::FROZEN && spte != SpteFormat::NONPRESENT);
        }
        let hw = cfg.format.classify(leaf, level);
        let HwEntry::Present { leaf: is_leaf, pfn: got, readable, .. } = hw else {
            panic!("{cfg:?}: made leaf {leaf:#x} at {level:?} classified {hw:?}");
        };
        prop_assert!(is_leaf && readable);
        prop_assert_eq!(got, pfn);
        prop_assert_eq!(cfg.format.pfn(table), pfn);
    }
}
