//! KVM's memslot selftests (`tools/testing/selftests/kvm/`) restated on the software machine:
//! the real MMU ([`RealMmu`]) on a [`SimHost`], one [`HwVcpu`] per guest vCPU on its own thread
//! (its "guest code" is Rust making the same accesses the C guest makes), the host side on the
//! calling thread. `vmmu selftest` runs the same tests on `/dev/kvm` (`vmmu_kvm::selftest`) and
//! prints both side by side.
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

use crate::host::SimHost;
use crate::hw_vcpu::{Data, HwVcpu};
use crate::ram::Width;
use crate::real::{RealMmu, RealMmuConfig};
use crate::seam::AccessKind;
use std::sync::Arc;
use vmmu::bugs::BugSet;
use vmmu::spte::FormatKind;
use vmmu::Gpa;

/// The MMU the tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuChoice {
    /// SPTE format.
    pub format: FormatKind,
    /// MMIO caching requested.
    pub mmio_caching: bool,
    /// Historical KVM bugs to re-inject (to show the tests catch them; needs the
    /// `historical-bugs` feature to have an effect).
    pub bugs: BugSet,
}

impl Default for MmuChoice {
    /// EPT, MMIO caching on, no bugs.
    fn default() -> Self {
        MmuChoice { format: FormatKind::Ept, mmio_caching: true, bugs: BugSet::NONE }
    }
}

impl MmuChoice {
    /// A fresh real MMU on `host` for `vcpus` vCPUs (MAXPHYADDR 46).
    fn mmu(&self, host: &Arc<SimHost>, vcpus: usize) -> Result<RealMmu> {
        RealMmu::new(
            host.clone(),
            RealMmuConfig {
                format: self.format,
                phys_bits: 46,
                mmio_caching: self.mmio_caching,
                vcpus,
                generation_base: 0,
                slot_zap_all: false,
                bugs: self.bugs,
                tdp_prefetch: false,
                shadow_mmio_path_only: false,
            },
        )
        .map_err(setup)
    }
}

pub use vmmu_selftest::{Result, SelftestError, SYNC_TIMEOUT};

fn setup(e: impl std::fmt::Display) -> SelftestError {
    SelftestError::Setup(e.to_string())
}

/// One guest store or load of 8 bytes at `gpa` on `hw`: RAM must be at one of `want_hva`; an
/// MMIO exit is handled by `mmio` (which may refuse it with a message) after leaving guest mode,
/// as `KVM_RUN` returning does.
fn access8(
    hw: &mut HwVcpu<'_, RealMmu>,
    gpa: u64,
    store: Option<u64>,
    want_hva: &[u64],
    mmio: &mut dyn FnMut(u64, AccessKind) -> std::result::Result<u64, String>,
) -> std::result::Result<u64, String> {
    match hw.load_store(Gpa(gpa), Width::W8, store) {
        Data::Ram { hva, value } => {
            if !want_hva.contains(&hva.raw()) {
                let want: Vec<String> =
                    want_hva.iter().filter(|&&h| h != 0).map(|h| format!("{h:#x}")).collect();
                return Err(format!(
                    "guest {} of gpa {gpa:#x} reached host address {:#x}, the memslots map it to \
                     {} (a stale translation)",
                    if store.is_some() { "write" } else { "read" },
                    hva.raw(),
                    if want.is_empty() { "nothing".to_string() } else { want.join(" or ") }
                ));
            }
            Ok(value)
        }
        Data::Mmio => {
            hw.exit_guest();
            let v = mmio(gpa, AccessKind::from_write(store.is_some()));
            hw.enter_guest();
            v
        }
        Data::Error(e) => Err(format!("guest access at gpa {gpa:#x} failed: {e}")),
    }
}
