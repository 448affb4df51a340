//! The crate's one error type (as in rust-vmm crates): each module's error converts into it.

/// Any error of the software machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Host memory could not be set up.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// The MMIO bus refused a device or an access.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// The machine could not be built or run.
    #[error(transparent)]
    Sim(#[from] crate::machine::SimError),
    /// The run options are invalid.
    #[error(transparent)]
    Options(#[from] crate::options::OptionsError),
    /// A run of the default machine could not complete.
    #[error(transparent)]
    Run(#[from] crate::options::RunError),
    /// The memslot schedule is invalid.
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
    /// The core refused something (a VM configuration, a memslot request, a fault).
    #[error(transparent)]
    Core(#[from] vmmu::Error),
}

/// `Result` with the crate's [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;
