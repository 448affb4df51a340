//! The crate's one error type: every fallible operation's error converts into [`Error`] (as in
//! rust-vmm crates), so an embedder can use `vmmu::Result` throughout and still match on the
//! module error inside when it needs the detail (a memslot request's errno, a fault's report).
//! Not an error, and so not converted: the pending requests that [`crate::vcpu::Vcpu::enter_guest`]
//! and [`crate::vcpu::Vcpu::enter_guest_mode`] answer instead of entering (service them with
//! [`crate::vcpu::Vcpu::service_requests`], which loads a root if there is none, and enter
//! again).

use crate::dirty::DirtyLogError;
use crate::fault::FaultError;
use crate::guest::PdptrError;
use crate::memslot::{ConfigError, MemslotError};
use crate::mmu_core::MmuError;
use crate::spte::SpteConfigError;
use crate::srcu::SrcuError;
use crate::vcpu::ShadowError;
use crate::vm::VmError;

/// Any error of the core.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum Error {
    /// A memslot request was refused (`KVM_SET_USER_MEMORY_REGION`'s errno).
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// A fault could not be handled: the vCPU stops with this report.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// A VM could not be built.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The MMU could not be set up, or a vCPU added.
    #[error(transparent)]
    Mmu(#[from] MmuError),
    /// The SPTE format or host CPU is unusable.
    #[error(transparent)]
    Spte(#[from] SpteConfigError),
    /// The memslot configuration is unusable.
    #[error(transparent)]
    MemslotConfig(#[from] ConfigError),
    /// No reader record was free.
    #[error(transparent)]
    Srcu(#[from] SrcuError),
    /// A dirty-log request was refused (`KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG`'s errno).
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    /// A shadow-paging request of the hypervisor (a CR3 load, INVLPG, an emulated write to a
    /// guest table, the guest CPU state) failed.
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// A PAE CR3 load found a PDPTE the guest must get #GP(0) for.
    #[error(transparent)]
    Pdptr(#[from] PdptrError),
}

/// `Result` with the crate's [`Error`] by default.
pub type Result<T, E = Error> = core::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_errors_convert_and_keep_their_message() {
        let e: Error = MmuError::TooManyVcpus(2).into();
        assert_eq!(alloc::format!("{e}"), alloc::format!("{}", MmuError::TooManyVcpus(2)));
        let r: Result<()> = Err(SrcuError::TooManyReaders { max: 1 }.into());
        assert!(matches!(r, Err(Error::Srcu(_))));
    }

    /// Every public error of the crate converts, so `?` works in a `vmmu::Result` function.
    #[test]
    fn every_public_error_converts() {
        fn via<E: Into<Error>>(_: Option<E>) {}
        via::<MemslotError>(None);
        via::<FaultError>(None);
        via::<VmError>(None);
        via::<MmuError>(None);
        via::<SpteConfigError>(None);
        via::<ConfigError>(None);
        via::<SrcuError>(None);
        via::<DirtyLogError>(None);
        via::<ShadowError>(None);
        via::<PdptrError>(None);
    }
}
