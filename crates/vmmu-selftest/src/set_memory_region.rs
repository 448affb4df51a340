//! `set_memory_region_test`'s MOVE and DELETE of a slot a running guest spins on: its constants
//! and outcome.

use std::time::Duration;

/// The region's GPA.
pub const MEM_REGION_GPA: u64 = 0xc000_0000;
/// The region's size (one 2 MiB page).
pub const MEM_REGION_SIZE: u64 = 0x20_0000;
/// The region's slot.
pub const MEM_REGION_SLOT: u32 = 10;
/// What MMIO reads return.
pub const MMIO_VAL: u64 = 0xbeef;
/// The C test's default loop count (`argv[1]` overrides it).
pub const DEFAULT_LOOPS: u32 = 10;

/// What one test (all its loops) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Loops run.
    pub loops: u32,
    /// MMIO exits the guest took on the region.
    pub mmio_exits: u64,
    /// Wall time of all loops.
    pub elapsed: Duration,
}
