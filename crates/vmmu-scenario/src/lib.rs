//! # vmmu-scenario: the scenario format, versions 1 and 2
//!
//! A scenario is a deterministic script of memslot operations and guest accesses (the contract is
//! `shared/design/scenarios.md`). This crate owns:
//!
//! - [`parse`](fn@parse): text to a [`Scenario`]; every error names the line and column, and a scenario
//!   that parses is one every backend can run (reserved ranges, alignment and sizes are checked
//!   here, never by the backends), or decline as a whole where its host lacks a feature the
//!   scenario needs ([`Start::Skip`], e.g. SMM or PAE paging on a kernel without them);
//! - [`Observation`]: what one step showed, with the exact JSON Lines form (key order, hex form,
//!   step numbering) and its reader, so streams from different backends can be compared;
//! - [`Backend`] / [`Machine`]: what a backend implements, and [`run`], the one driver that walks
//!   the steps, numbers the observations and hands them out one by one;
//! - [`diff`]: one scenario on several sources (backends under configurations, recorded
//!   streams), compared into one [`Verdict`];
//! - [`to_text`]: a parsed scenario back to canonical text;
//! - `generate` (feature `generate`): a proptest strategy for random valid scenario files
//!   (without guest paging, or version 2 with it: `generate::Flavor`; both with dirty
//!   logging), and `mutate`: damaged variants of committed files, for robustness and
//!   differential tests.
//!
//! ```
//! use vmmu_scenario::{parse, Op};
//! let s = parse("vm vcpus=2\nmem buf size=4K\nslot 1 gpa=0x1000_0000 size=4K mem=buf\n");
//! assert!(s.is_err()); // `_` is not allowed in numbers
//! let s = parse("vm vcpus=2\nmem buf size=4K\nslot 1 gpa=0x10000000 size=4K mem=buf\n").unwrap();
//! assert_eq!(s.vm.vcpus, 2);
//! assert!(matches!(s.steps[2].op, Op::Slot(_)));
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod access;
mod backend;
pub mod diff;
mod error;
#[cfg(feature = "generate")]
pub mod generate;
#[cfg(feature = "generate")]
pub mod mutate;
mod observation;
mod parse;
mod print;
mod step;

pub use access::AccessKind;
pub use backend::{
    counter_trail, run, run_collect, run_counted, run_counted_while, Backend, BackendError,
    CounterTrail, Machine, RunError, ShadowCounters, Start,
};
pub use diff::{Verdict, VerdictLine};
pub use error::{Error, Result};
pub use observation::{
    first_difference, parse_observations, DirtyLogResult, Observation, ObservationError, ReadExit,
    SlotResult, WriteExit,
};
pub use parse::{parse, NumberProblem, ParseError, ParseErrorKind};
pub use print::to_text;
pub use step::{
    ClearDirtyLogOp, Cr3Op, DirtyLogMode, DirtyLogOp, Format, HostReadOp, HostWriteOp, MapFlags,
    MapOp, MemDecl, MemId, MemRef, Op, Overrides, PageSize, Paging, ReadOp, ReservedUse, Scenario,
    SlotFlags, SlotOp, Step, UnmapOp, VmConfig, Width, WriteOp, ACCESS_LIMIT, MAP_TABLES,
    PAGE_SIZE, RESERVED_BELOW, RESERVED_SLOT_IDS, SPACES,
};
