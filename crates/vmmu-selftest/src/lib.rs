//! # vmmu-selftest: the contract of KVM's selftests restated
//!
//! `vmmu selftest` runs four of KVM's selftests (`tools/testing/selftests/kvm/`) twice: on the
//! software machine (`vmmu_sim::selftest`, which documents each test) and on `/dev/kvm`
//! (`vmmu_kvm::selftest`), and prints both side by side. This crate owns what the two engines
//! and the command share, so that both take the same parameters and report in the same types:
//!
//! - [`SelftestError`]: why a test did not pass (the C tests' own "decrease the cap" refusals
//!   included), whichever side ran it;
//! - per test, its constants (the C test's GPAs, slot ids, values), its parameters (the C test's
//!   flags, with the C test's defaults) and its outcome: [`set_memory_region`], [`stress`],
//!   [`perf`], [`dirty_log_perf`].
//!
//! It has no engine of its own and depends on neither engine: the `/dev/kvm` side stays
//! independent of the MMU it judges.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod dirty_log_perf;
pub mod perf;
pub mod set_memory_region;
pub mod stress;

use std::time::Duration;

/// Why a selftest did not pass.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelftestError {
    /// `/dev/kvm` cannot be used here (the KVM side only; not a failure of the test).
    #[error("/dev/kvm not usable: {0}")]
    Unavailable(String),
    /// The slot cap leaves slots without pages (`memslot_perf_test` prints the same and skips).
    #[error("memslot count too high for this test, decrease the cap (max is {max})")]
    TooManySlots {
        /// The largest slot count the test's memory allows.
        max: u64,
    },
    /// The moved slot is smaller than half the move test's window.
    #[error(
        "memslot count may be too high for this test: the moved slot has {pages} pages, the \
         move window needs 25; try a lower cap"
    )]
    MoveSlotTooSmall {
        /// Pages in the last slot.
        pages: u64,
    },
    /// The move tests' window lies below the moved (last) slot, inside the slot before it: with
    /// one data slot there is none, and the guest's writes there would exit as MMIO.
    #[error("the move tests need at least two data slots (a memslot cap of 3 or more)")]
    MoveNeedsTwoSlots,
    /// The test's correctness condition was violated (what, where, expected, seen), or the
    /// VMM refused a request the test relies on.
    #[error("{0}")]
    Failed(String),
    /// The parameters or the machine could not be set up.
    #[error("setup failed: {0}")]
    Setup(String),
}

impl SelftestError {
    /// Whether the C test would not run at all with these parameters (it prints why and goes
    /// on): the slot cap leaves no room. Not a failure.
    pub fn is_not_run(&self) -> bool {
        matches!(
            self,
            SelftestError::TooManySlots { .. }
                | SelftestError::MoveSlotTooSmall { .. }
                | SelftestError::MoveNeedsTwoSlots
        )
    }
}

/// The selftests' `Result`.
pub type Result<T, E = SelftestError> = std::result::Result<T, E>;

/// The C tests' timeout for one host/guest synchronisation.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// A page.
pub(crate) const PAGE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_do() {
        let e = SelftestError::TooManySlots { max: 8194 };
        assert!(e.to_string().contains("decrease the cap (max is 8194)"));
        assert!(e.is_not_run());
        let e = SelftestError::MoveSlotTooSmall { pages: 4 };
        assert!(e.to_string().contains("lower cap") && e.is_not_run());
        let e = SelftestError::MoveNeedsTwoSlots;
        assert!(e.to_string().contains("cap of 3 or more") && e.is_not_run());
        assert!(!SelftestError::Failed("x".into()).is_not_run());
        let e = SelftestError::Unavailable("open: ENOENT".into());
        assert_eq!(e.to_string(), "/dev/kvm not usable: open: ENOENT");
    }
}
