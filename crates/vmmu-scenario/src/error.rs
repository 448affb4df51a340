//! The crate's one error type (as in rust-vmm crates): each module's error converts into it.

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A scenario file does not parse (the message names line and column).
    #[error(transparent)]
    Parse(#[from] crate::ParseError),
    /// An observation stream (JSON Lines) does not parse.
    #[error(transparent)]
    Observation(#[from] crate::ObservationError),
    /// A backend cannot run a scenario.
    #[error(transparent)]
    Backend(#[from] crate::BackendError),
    /// A scenario run failed at a step.
    #[error(transparent)]
    Run(#[from] crate::RunError),
}

/// `Result` with the crate's [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;
