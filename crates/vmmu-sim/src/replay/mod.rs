//! Replay of recorded VM boots: vmmu traces (format v1, `../shared/design/traces.md`) run on the
//! software machine with the real MMU, checked against what the recording KVM did.
//!
//! - [`mod@parse`]: the strict reader of the trace format (errors name the line);
//! - [`memory`]: the recording VMM's `uaddr` ranges mapped onto host buffers (aliases kept);
//! - [`engine`]: one replay under one machine configuration (the TDP MMU with EPT or NPT, or the
//!   shadow MMU), with the replay's own RAM probes and their oracle;
//! - [`identity`]: the identity-mapped guest page tables a replay under the shadow MMU runs on;
//! - [`inflight`]: which recorded accesses may have raced another thread's slot request;
//! - [`report`]: what a replay reports (text, and JSON with stable keys).
//!
//! ```
//! use vmmu_sim::replay::{parse::parse, engine::{replay, ReplayConfig}};
//! let trace = parse(concat!(
//!     "{\"vmmu_trace\":1,\"source\":\"doc\"}\n",
//!     "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x10000\",\"uaddr\":\"0x7f0000000000\"}\n",
//!     "{\"t\":0.000001,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"0xfee00030\",\"len\":4,\"value\":\"0x14\",\"exit\":\"kernel\"}\n",
//! ))?;
//! let cfg = ReplayConfig::new(vmmu::spte::FormatKind::Ept, true);
//! let report = replay(&trace, &cfg)?;
//! assert!(report.passed());
//! assert_eq!(report.mmio.classified_mmio, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod engine;
pub mod identity;
pub mod inflight;
mod live;
pub mod memory;
pub mod parse;
pub mod report;

pub use engine::{
    highest_gpa, highest_telling_gpa, phys_bits_for, replay, ReplayConfig, ReplayError,
    DEFAULT_PHYS_BITS,
};
pub use parse::{parse, ParseError, Trace};
pub use report::{KvmReport, RunReport, TraceReport, Verdict};
