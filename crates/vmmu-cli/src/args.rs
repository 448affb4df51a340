//! The value types the subcommands' flags share (`--format`, `--mmio-caching`, `--dirty-log`),
//! each declared once with its mapping onto the engine's own types.

use clap::ValueEnum;
use vmmu::spte::FormatKind;

/// The MMU and its SPTE format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Intel EPT.
    Ept,
    /// AMD NPT (x86 page-table entries).
    Npt,
    /// Shadow paging (KVM with TDP off): x86 page-table SPTEs that shadow the guest's own page
    /// tables.
    Shadow,
}

impl Format {
    /// The core's SPTE format (shadow paging uses the x86 page-table format, as NPT does).
    pub const fn kind(self) -> FormatKind {
        match self {
            Format::Ept => FormatKind::Ept,
            Format::Npt | Format::Shadow => FormatKind::Npt,
        }
    }

    /// The scenario engine's name for it.
    pub const fn scenario(self) -> vmmu_scenario::Format {
        match self {
            Format::Ept => vmmu_scenario::Format::Ept,
            Format::Npt => vmmu_scenario::Format::Npt,
            Format::Shadow => vmmu_scenario::Format::Shadow,
        }
    }
}

/// An on/off switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

impl OnOff {
    /// Whether it is on.
    pub const fn on(self) -> bool {
        matches!(self, OnOff::On)
    }
}

/// How dirty pages are collected (KVM's three modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirtyLog {
    /// KVM_GET_DIRTY_LOG clears and write-protects again.
    Auto,
    /// Manual protect: KVM_GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG of what it returned.
    Manual,
    /// Manual protect with KVM_DIRTY_LOG_INITIALLY_SET (QEMU's mode, and the C test's default
    /// where offered): logging starts with every page dirty and nothing write-protected; each
    /// CLEAR protects and splits what it clears.
    InitiallySet,
}

impl DirtyLog {
    /// The software machine's migration mode.
    pub const fn machine(self) -> vmmu_sim::migration::DirtyLogMode {
        match self {
            DirtyLog::Auto => vmmu_sim::migration::DirtyLogMode::Auto,
            DirtyLog::Manual => vmmu_sim::migration::DirtyLogMode::Manual,
            DirtyLog::InitiallySet => vmmu_sim::migration::DirtyLogMode::InitiallySet,
        }
    }

    /// The selftest's collection (both sides).
    pub const fn protect(self) -> vmmu_selftest::dirty_log_perf::Protect {
        use vmmu_selftest::dirty_log_perf::Protect;
        match self {
            DirtyLog::Auto => Protect::Auto,
            DirtyLog::Manual => Protect::Manual,
            DirtyLog::InitiallySet => Protect::InitiallySet,
        }
    }
}
