//! What one `vmmu run` asks of the engine, as a plain struct ([`RunOptions`]), its checks, and
//! [`RunOptions::run`]: the default machine on the real MMU, reported as data.
//!
//! The command line (flags, parse-time messages, the progress bar, the text and JSON rendering,
//! exit codes) is the CLI's business (`crates/vmmu-cli`); [`RunOptions::validate`] applies the
//! same ranges to options built in code.

use crate::host::{HostConfig, ReaderFenceKind};
use crate::machine::{
    HostPages, Machine, MachineConfig, ProgressSnapshot, SimError, UpdateProfile,
};
use crate::real::{RealMmu, RealMmuConfig};
use crate::report::Report;
use std::time::Duration;
use vmmu::bugs::BugSet;
use vmmu::spte::FormatKind;
use vmmu::vm::VmError;

/// How far below the MMIO-generation wrap [`GenerationStart::NearWrap`] starts.
pub const NEAR_WRAP_MARGIN: u64 = 2048;

/// The MMU a run uses, and whether the machine's guest pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMmu {
    /// A TDP MMU with this SPTE format; the vCPUs access guest-physical addresses.
    Tdp(FormatKind),
    /// A TDP MMU with this SPTE format, the guest running with paging (`--guest-paging`): the
    /// hardware walks the guest's tables two-dimensionally.
    TdpGuestPaging(FormatKind),
    /// Shadow paging (`--format shadow`): the MMU shadows the guest's page tables, so the guest
    /// pages; its SPTEs have the x86 page-table format (NPT's).
    Shadow,
}

impl RunMmu {
    /// The SPTE format.
    pub const fn format(self) -> FormatKind {
        match self {
            RunMmu::Tdp(f) | RunMmu::TdpGuestPaging(f) => f,
            RunMmu::Shadow => FormatKind::Npt,
        }
    }

    /// Whether the vCPUs access memory through their own page tables.
    pub const fn guest_paging(self) -> bool {
        !matches!(self, RunMmu::Tdp(_))
    }
}

/// The shadow MMU's page limit in a run (`--shadow-pages`; TDP runs ignore it, as KVM does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowPages {
    /// KVM's default (`--shadow-pages auto`): 2% of the memslots' pages, 64 at least,
    /// recomputed as slots change. The machine's RAM is a few MiB, so this is KVM's limit for a
    /// VM that small: about 80 pages, below what the guest's shadow tables need once MMIO
    /// caching builds shadow pages for its MMIO paths (see the README).
    KvmDefault,
    /// A limit set as a VMM sets it (`KVM_SET_NR_MMU_PAGES`; QEMU's `kvm-shadow-mem` gives it
    /// in bytes); at least [`vmmu::shadow::MIN_ALLOC_PAGES`].
    Set(usize),
}

/// The machine's default page limit: [`vmmu::shadow::default_max_pages`] for 200 MiB of
/// memslots, KVM's own default for a small real guest. The machine's RAM is miniaturised (a
/// few MiB, of which the vCPUs use well under one); its guest's shadow working set (about 100
/// pages with MMIO caching on) is what a real guest's would be, and a real guest's RAM gives
/// KVM room for it.
pub const DEFAULT_SHADOW_PAGES: usize = 1024;

/// Where a run's memslot generation starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GenerationStart {
    /// At 0, as KVM.
    #[default]
    Zero,
    /// [`NEAR_WRAP_MARGIN`] swaps below the MMIO-generation wrap (`--near-wrap`).
    NearWrap,
    /// Where the MMIO-generation wrap trap needs it, with the trap set (`--wrap-trap`; see
    /// [`crate::machine`]).
    WrapTrap,
}

/// Options of one run of the default machine on the real MMU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunOptions {
    /// vCPUs (1..=256).
    pub vcpus: u16,
    /// How long to run, in seconds ([`MIN_SECONDS`]..=3600).
    pub seconds: f64,
    /// The MMU, its SPTE format, and whether the guest pages.
    pub mmu: RunMmu,
    /// Host MAXPHYADDR in bits (36..=52).
    pub phys_bits: u8,
    /// Whether MMIO caching is requested (the MMU may still turn it off, and says why).
    pub mmio_caching: bool,
    /// Seed of the vCPUs' access mix.
    pub seed: u64,
    /// Stress the MMU's racy paths (see [`crate::machine`]).
    pub stress_paths: bool,
    /// How the device manager paces memslot updates: [`UpdateProfile::BOOT`] (bursts like a
    /// recorded boot, then quiet; the default) or [`UpdateProfile::Steady`] (back to back, stress).
    /// `churn`, `stress_paths`, `wrap_trap` and injected bugs make it steady.
    pub updates: UpdateProfile,
    /// Stop after this many memslot updates, made back to back (`seconds` still bounds the run).
    pub churn: Option<u64>,
    /// Where the memslot generation starts, and whether the wrap trap is set.
    pub generation: GenerationStart,
    /// Delete and move zap every root (KVM_X86_QUIRK_SLOT_ZAP_ALL).
    pub slot_zap_all: bool,
    /// Historical bugs to re-inject.
    pub bugs: BugSet,
    /// How the MMU's SRCU readers are ordered against grace periods (the host's choice).
    pub reader_fences: ReaderFenceKind,
    /// Record the report's [`Timeline`](crate::timeline::Timeline) (for `--report`).
    pub timeline: bool,
    /// Dirty logging on the RAM slots with a migration thread and its oracle (`--dirty-log`).
    pub dirty_log: Option<crate::migration::DirtyLogMode>,
    /// With `dirty_log`: collections per migration, logging turned on and off on the live
    /// slots (`--dirty-log-rounds`); `None`: logged from creation.
    pub dirty_log_rounds: Option<std::num::NonZeroU32>,
    /// The host page size behind guest RAM (`--host-pages`).
    pub host_pages: HostPages,
    /// The shadow MMU's page limit (`--shadow-pages`).
    pub shadow_pages: ShadowPages,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            vcpus: 2,
            seconds: 5.0,
            mmu: RunMmu::Tdp(FormatKind::Ept),
            phys_bits: 46,
            mmio_caching: true,
            seed: 1,
            stress_paths: false,
            updates: UpdateProfile::BOOT,
            churn: None,
            generation: GenerationStart::Zero,
            slot_zap_all: false,
            bugs: BugSet::NONE,
            reader_fences: ReaderFenceKind::Full,
            timeline: false,
            dirty_log: None,
            dirty_log_rounds: None,
            host_pages: HostPages::Auto,
            shadow_pages: ShadowPages::Set(DEFAULT_SHADOW_PAGES),
        }
    }
}

/// A run option with a value the machine cannot use.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionsError {
    /// `--vcpus` out of range.
    #[error("--vcpus {0}: give 1 to 256 vCPUs")]
    Vcpus(u16),
    /// `--seconds` out of range.
    #[error("--seconds {0}: give a time above 0 and at most 3600 seconds")]
    Seconds(f64),
    /// `--phys-bits` out of range.
    #[error("--phys-bits {0}: x86 MAXPHYADDR must be 36 to 52")]
    PhysBits(u8),
    /// `--churn 0`: the run would stop before its first memslot update.
    #[error("--churn 0: a churn run stops after its N-th memslot update; give at least 1")]
    Churn,
    /// Too many vCPUs for guest paging's table area.
    #[error(
        "--vcpus {0} with guest paging (--guest-paging, --format shadow): at most {max} vCPUs, \
         whose page tables share the guest's 8 MiB table area",
        max = crate::machine_paging::MAX_VCPUS
    )]
    PagingVcpus(u16),
    /// `--dirty-log-rounds` without `--dirty-log`.
    #[error("--dirty-log-rounds needs --dirty-log: it says how long each migration logs")]
    RoundsWithoutDirtyLog,
    /// `--wrap-trap` with `--dirty-log-rounds`.
    #[error(
        "--wrap-trap and --dirty-log-rounds exclude each other: the trap counts the generation \
         swaps to the wrap, and every migration adds its own"
    )]
    WrapTrapMigrations,
    /// `--shadow-pages` below KVM's smallest limit.
    #[error(
        "--shadow-pages {0}: KVM refuses a shadow page limit below {min} (EINVAL from \
         KVM_SET_NR_MMU_PAGES); give at least {min}, or `auto` for KVM's default",
        min = vmmu::shadow::MIN_ALLOC_PAGES
    )]
    ShadowPages(usize),
    /// The wrap trap's sweeps and slow-fault holder access guest-physical addresses directly.
    #[error("--wrap-trap runs without guest paging: drop --format shadow / --guest-paging")]
    WrapTrapPaging,
    /// `--wrap-trap` with `--slot-zap-all`.
    #[error(
        "--wrap-trap and --slot-zap-all exclude each other: the trap keeps MMIO SPTEs made \
         before its dummy swaps until the wrap, and with --slot-zap-all the first delete or move \
         of the run's schedule zaps them all, so the wrap would find nothing to test"
    )]
    WrapTrapSlotZapAll,
}

/// Why a run could not complete (its messages are what `vmmu run` prints after `vmmu run: `).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The options are invalid.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The machine could not be built.
    #[error("machine: {0}")]
    Machine(SimError),
    /// The MMU could not be built.
    #[error("MMU: {0}")]
    Mmu(VmError),
    /// The run failed.
    #[error("run: {0}")]
    Run(SimError),
}

/// The shortest run: the machine looks at its clock every 10 ms, so a shorter run lasts that
/// long anyway.
pub const MIN_SECONDS: f64 = 0.01;

/// Parses a run time in seconds: a number from [`MIN_SECONDS`] to 3600.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v.is_finite() && v > 0.0 && v <= 3600.0 {
        if v < MIN_SECONDS {
            return Err(format!(
                "{s} is below {MIN_SECONDS} s, the shortest run (the machine checks its clock every 10 ms)"
            ));
        }
        Ok(v)
    } else {
        Err(format!("{s} is not above 0 and at most 3600"))
    }
}

impl RunOptions {
    /// Checks the ranges (the CLI checks the same at parse time).
    pub fn validate(&self) -> Result<(), OptionsError> {
        if !(1..=256).contains(&self.vcpus) {
            return Err(OptionsError::Vcpus(self.vcpus));
        }
        if !(self.seconds.is_finite() && self.seconds > 0.0 && self.seconds <= 3600.0) {
            return Err(OptionsError::Seconds(self.seconds));
        }
        if !(36..=52).contains(&self.phys_bits) {
            return Err(OptionsError::PhysBits(self.phys_bits));
        }
        if self.churn == Some(0) {
            return Err(OptionsError::Churn);
        }
        if let ShadowPages::Set(n) = self.shadow_pages {
            if n < vmmu::shadow::MIN_ALLOC_PAGES {
                return Err(OptionsError::ShadowPages(n));
            }
        }
        let wrap_trap = self.generation == GenerationStart::WrapTrap;
        if self.mmu.guest_paging() && usize::from(self.vcpus) > crate::machine_paging::MAX_VCPUS {
            return Err(OptionsError::PagingVcpus(self.vcpus));
        }
        if wrap_trap && self.mmu.guest_paging() {
            return Err(OptionsError::WrapTrapPaging);
        }
        if wrap_trap && self.slot_zap_all {
            return Err(OptionsError::WrapTrapSlotZapAll);
        }
        if self.dirty_log_rounds.is_some() && self.dirty_log.is_none() {
            return Err(OptionsError::RoundsWithoutDirtyLog);
        }
        if wrap_trap && self.dirty_log_rounds.is_some() {
            return Err(OptionsError::WrapTrapMigrations);
        }
        Ok(())
    }

    /// The run time.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.clamp(0.0, 3600.0))
    }

    /// The machine configuration for these options (validated first).
    pub fn machine_config(&self) -> Result<MachineConfig, OptionsError> {
        self.validate()?;
        let wrap_trap = self.generation == GenerationStart::WrapTrap;
        let mut mc = MachineConfig {
            vcpus: usize::from(self.vcpus),
            seed: self.seed,
            duration: self.duration(),
            host: HostConfig {
                reader_fences: self.reader_fences,
                ..HostConfig::new(self.phys_bits)
            },
            format: self.mmu.format(),
            mmio_caching_requested: self.mmio_caching,
            stress_paths: self.stress_paths,
            wrap_trap,
            guest_paging: self.mmu.guest_paging(),
            timeline: self.timeline,
            dirty_log: self.dirty_log,
            dirty_log_rounds: self.dirty_log_rounds,
            host_pages: self.host_pages,
            // Stress runs and bug hunts want every update they can get.
            update_profile: if self.stress_paths || wrap_trap || !self.bugs.is_empty() {
                UpdateProfile::Steady
            } else {
                self.updates
            },
            ..MachineConfig::default()
        };
        if let Some(n) = self.churn {
            mc.max_updates = Some(n);
            mc.update_pause = Duration::ZERO;
            mc.update_profile = UpdateProfile::Steady;
        }
        Ok(mc)
    }

    /// Runs the default machine on a fresh real MMU, calling `progress` about every 10 ms.
    pub fn run(&self, progress: &mut dyn FnMut(&ProgressSnapshot)) -> Result<Report, RunError> {
        let machine = Machine::new(self.machine_config()?).map_err(RunError::Machine)?;
        let generation_base = match self.generation {
            GenerationStart::Zero => 0,
            GenerationStart::NearWrap => {
                (1 << vmmu::types::Generation::MMIO_GEN_BITS) - NEAR_WRAP_MARGIN
            }
            GenerationStart::WrapTrap => machine.wrap_trap_generation_base(),
        };
        let cfg = RealMmuConfig {
            format: self.mmu.format(),
            phys_bits: self.phys_bits,
            mmio_caching: self.mmio_caching,
            vcpus: usize::from(self.vcpus),
            generation_base,
            slot_zap_all: self.slot_zap_all,
            bugs: self.bugs,
            tdp_prefetch: false,
            shadow_mmio_path_only: false,
            shadow_pages: match self.shadow_pages {
                ShadowPages::KvmDefault => None,
                ShadowPages::Set(n) => Some(n),
            },
        };
        let mmu = match self.mmu {
            RunMmu::Shadow => RealMmu::shadow(machine.host().clone(), cfg, 1),
            RunMmu::Tdp(_) | RunMmu::TdpGuestPaging(_) => RealMmu::new(machine.host().clone(), cfg),
        }
        .map_err(RunError::Mmu)?;
        machine.run_with_progress(&mmu, progress).map_err(RunError::Run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_issue() {
        let c = RunOptions::default().machine_config().expect("config");
        assert_eq!((c.vcpus, c.duration, c.host.phys_bits), (2, Duration::from_secs(5), 46));
        assert!(c.mmio_caching_requested && c.max_updates.is_none());
    }

    #[test]
    fn a_shadow_page_limit_below_kvms_smallest_is_refused() {
        let o = RunOptions { shadow_pages: ShadowPages::Set(63), ..RunOptions::default() };
        assert_eq!(o.validate(), Err(OptionsError::ShadowPages(63)));
        assert!(o.validate().unwrap_err().to_string().contains("at least 64"));
        for ok in [ShadowPages::Set(64), ShadowPages::KvmDefault] {
            assert_eq!(RunOptions { shadow_pages: ok, ..RunOptions::default() }.validate(), Ok(()));
        }
    }

    #[test]
    fn churn_runs_back_to_back() {
        let o = RunOptions { churn: Some(7), stress_paths: true, ..RunOptions::default() };
        let c = o.machine_config().expect("config");
        assert_eq!((c.max_updates, c.update_pause), (Some(7), Duration::ZERO));
        assert!(c.stress_paths);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let o = RunOptions { vcpus: 0, ..RunOptions::default() };
        assert_eq!(o.validate(), Err(OptionsError::Vcpus(0)));
        let o = RunOptions { phys_bits: 60, ..RunOptions::default() };
        assert!(o.machine_config().is_err());
        let o = RunOptions { seconds: 0.0, ..RunOptions::default() };
        assert_eq!(o.validate(), Err(OptionsError::Seconds(0.0)));
        let o = RunOptions {
            generation: GenerationStart::WrapTrap,
            mmu: RunMmu::Shadow,
            ..RunOptions::default()
        };
        assert_eq!(o.validate(), Err(OptionsError::WrapTrapPaging));
        let o = RunOptions {
            generation: GenerationStart::WrapTrap,
            slot_zap_all: true,
            ..RunOptions::default()
        };
        assert_eq!(o.validate(), Err(OptionsError::WrapTrapSlotZapAll));
        let o = RunOptions { churn: Some(0), ..RunOptions::default() };
        assert_eq!(o.validate(), Err(OptionsError::Churn));
        assert!(parse_seconds("x").is_err_and(|e| e.contains("not a number")));
        assert!(parse_seconds("0").is_err_and(|e| e.contains("above 0")));
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        assert_eq!(parse_seconds("0.01"), Ok(0.01));
        assert!(parse_seconds("1e-300").is_err_and(|e| e.contains("shortest run")));
    }
}
