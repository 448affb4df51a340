//! # vmmu-kvm: scenarios on real `/dev/kvm`
//!
//! [`KvmBackend`] implements [`vmmu_scenario::Backend`] with the kernel's own MMU (Linux,
//! x86-64). It ignores `format`, `mmio_caching` and `phys_bits`: they must not change what is
//! observed. Each scenario gets a fresh VM:
//!
//! - the guest is a 64-bit long-mode machine whose access code runs at CPL3 (see [`guest`]),
//!   with an identity map of the low 64 GiB in 2 MiB user pages; its code, tables and stacks
//!   sit below 8 MiB in slot 32760 of address space 0, which scenarios may not use;
//! - a `slot` step is one raw `KVM_SET_USER_MEMORY_REGION` with the fields exactly as written
//!   (misaligned or nonsensical values included), and the result is KVM's errno name;
//! - a `read`/`write` step writes a few instructions ([`code`]) to the code page, sets RIP and
//!   runs the vCPU until the guest's closing store to the sync address; a `KVM_EXIT_MMIO` before
//!   that is the MMIO observation (reads get the current `mmio-reply`);
//! - `dirty-log` / `clear-dirty-log` are `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG` (all bits
//!   of the range set), and `vm dirty_log=manual` enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
//!   without "initially set" (a kernel without it skips the scenario);
//! - anything else (an exception in the guest, a shutdown, an internal error, `KVM_RUN` failing,
//!   an access through a slot beyond its buffer, other than a store through a read-only slot,
//!   which exits as MMIO) is a backend failure, never an observation.
//!
//! Version-2 scenarios with `paging=4level` run with guest page tables (`paging` module): eight
//! page-table spaces in a pool below 8 MiB (slot 32761), each mapping the backend's own low
//! 8 MiB; `map`/`unmap` are guest stores to the tables at CPL0 followed by INVLPG on every vCPU,
//! `cr3` is the guest's own MOV CR3, accesses run at CPL3 through the vCPU's current space, and
//! a guest page fault goes to the guest's #PF handler, which reports CR2 and the error code (the
//! `page-fault` observation). `paging=pae` runs a 32-bit PAE guest where KVM allows it; a kernel
//! that keeps CR0.PG clear outside long mode (kvm-pvm) makes it a `skipped` scenario.
//!
//! Without a usable `/dev/kvm` (or on another OS) [`KvmBackend::start`] fails with
//! [`vmmu_scenario::BackendError::Unavailable`] and a message saying why.
#![deny(missing_docs)]

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod bench;
pub mod code;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod dirty;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod errno;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod guest;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod machine;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod mapping;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod paging;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod replay;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod selftest;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod stats;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub use machine::{probe, KvmError, KvmInfo};

/// The crate's one error type: everything that fails here fails with a [`KvmError`].
pub type Error = KvmError;
/// `Result` with the crate's [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

use vmmu_scenario::{Backend, BackendError, Scenario, Start};

/// The real-KVM backend (`--backend kvm`).
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmBackend;

impl Backend for KvmBackend {
    fn name(&self) -> &str {
        "kvm"
    }

    fn start(&self, scenario: &Scenario) -> Result<Start, BackendError> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        {
            machine::start(scenario)
        }
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        {
            let _ = scenario;
            Err(BackendError::Unavailable(
                "/dev/kvm not usable: this backend needs Linux on x86-64".into(),
            ))
        }
    }
}
