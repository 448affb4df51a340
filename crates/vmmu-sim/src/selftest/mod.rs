//! KVM's memslot selftests (`tools/testing/selftests/kvm/`) restated on the software machine:
//! the real MMU ([`RealMmu`], TDP or shadow: [`SelftestMmu`]) on a [`SimHost`], one simulated
//! hardware vCPU per guest vCPU on its own thread (its "guest code" is Rust making the same
//! accesses the C guest makes, through identity maps on the shadow MMU: `vcpu.rs`), the host
//! side on the calling thread. `vmmu selftest` runs the same tests on `/dev/kvm`
//! (`vmmu_kvm::selftest`) and prints both side by side.
//!
//! - [`set_memory_region`]: `set_memory_region_test`'s MOVE and DELETE of a slot a running
//!   guest spins on;
//! - [`stress`]: `memslot_modification_stress_test`, vCPUs writing their memory while the host
//!   adds and deletes a one-page slot next to it;
//! - [`perf`]: the six tests of `memslot_perf_test`;
//! - [`dirty_log_perf`]: `dirty_log_perf_test`, its phases timed and every GET checked.
//!
//! Their parameters, outcomes and errors are `vmmu_selftest`'s, shared with the `/dev/kvm` side
//! and re-exported here.
//!
//! Where the software machine differs from a KVM guest, the module of each test says how. In
//! common: guest/host synchronisation (the C tests' ucalls and the sync page's atomics) uses
//! Rust atomics and channels between the two threads; an MMIO exit is the vCPU leaving guest
//! mode and handling the access on its thread, as KVM's vCPU thread does after `KVM_RUN`
//! returns; every RAM access also checks the host address the translation led to (a stale
//! translation fails the test even when the bytes happen to match).

pub mod dirty_log_perf;
pub mod perf;
pub mod set_memory_region;
pub mod stress;
mod vcpu;

use crate::host::SimHost;
use crate::real::{RealMmu, RealMmuConfig};
use std::sync::Arc;
use vmmu::bugs::BugSet;
use vmmu::spte::FormatKind;

/// Which MMU the tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelftestMmu {
    /// The TDP MMU with this SPTE format.
    Tdp(FormatKind),
    /// The shadow MMU (KVM with TDP off, as `/dev/kvm` on a nested host): the guests reach their
    /// memory through identity maps (`selftest/vcpu.rs`).
    Shadow,
}

/// The MMU the tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuChoice {
    /// The MMU, and its SPTE format.
    pub mmu: SelftestMmu,
    /// MMIO caching requested.
    pub mmio_caching: bool,
    /// Historical KVM bugs to re-inject (to show the tests catch them; needs the
    /// `historical-bugs` feature to have an effect).
    pub bugs: BugSet,
}

impl Default for MmuChoice {
    /// EPT, MMIO caching on, no bugs.
    fn default() -> Self {
        MmuChoice { mmu: SelftestMmu::Tdp(FormatKind::Ept), mmio_caching: true, bugs: BugSet::NONE }
    }
}

impl MmuChoice {
    /// The shadow MMU, MMIO caching on, no bugs.
    pub const fn shadow() -> Self {
        MmuChoice { mmu: SelftestMmu::Shadow, mmio_caching: true, bugs: BugSet::NONE }
    }

    /// A fresh real MMU on `host` for `vcpus` vCPUs (MAXPHYADDR [`vcpu::PHYS_BITS`]).
    fn mmu(&self, host: &Arc<SimHost>, vcpus: usize) -> Result<RealMmu> {
        let cfg = RealMmuConfig {
            // Shadow paging uses the x86 page-table format.
            format: match self.mmu {
                SelftestMmu::Tdp(f) => f,
                SelftestMmu::Shadow => FormatKind::Npt,
            },
            phys_bits: vcpu::PHYS_BITS,
            mmio_caching: self.mmio_caching,
            vcpus,
            generation_base: 0,
            slot_zap_all: false,
            bugs: self.bugs,
            tdp_prefetch: false,
            shadow_mmio_path_only: false,
            shadow_pages: None,
        };
        match self.mmu {
            SelftestMmu::Tdp(_) => RealMmu::new(host.clone(), cfg),
            SelftestMmu::Shadow => RealMmu::shadow(host.clone(), cfg, 1),
        }
        .map_err(setup)
    }
}

pub use vmmu_selftest::{Result, SelftestError, SYNC_TIMEOUT};

fn setup(e: impl std::fmt::Display) -> SelftestError {
    SelftestError::Setup(e.to_string())
}
