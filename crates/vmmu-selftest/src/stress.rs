//! `memslot_modification_stress_test`: vCPUs write their memory while the host adds and
//! deletes a one-page slot next to it. Its constants, parameters and outcome.

use std::time::Duration;

/// The dummy slot's id.
pub const DUMMY_MEMSLOT_INDEX: u32 = 7;
/// The test memory's slot id (memstress's `TEST_MEM_SLOT_INDEX`).
pub const TEST_SLOT: u32 = 1;

/// The test's parameters (the C test's flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// `-v`: vCPUs.
    pub vcpus: usize,
    /// `-b`: bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// `-i`: memslot add/delete iterations.
    pub iterations: u64,
    /// `-d`: sleep before each iteration.
    pub delay: Duration,
}

impl Default for Params {
    /// The C test's defaults: 1 vCPU, 1 GiB, 10 iterations, no delay.
    fn default() -> Self {
        Params { vcpus: 1, bytes_per_vcpu: 1 << 30, iterations: 10, delay: Duration::ZERO }
    }
}

/// What the run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Memslot updates made (adds and deletes).
    pub updates: u64,
    /// Guest writes, all vCPUs.
    pub accesses: u64,
    /// Complete passes over a vCPU's memory (SYNCs), all vCPUs.
    pub passes: u64,
    /// Wall time from the vCPUs' start to their join.
    pub elapsed: Duration,
}
