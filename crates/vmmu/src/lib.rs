//! # vmmu: a virtual MMU with generation-checked MMIO caching
//!
//! The core library: memslots and their generation protocol, SPTE formats and the MMIO SPTE codec,
//! the VM-wide MMU core ([`mmu_core`]), the TDP MMU and the shadow MMU with their fault paths,
//! per-vCPU MMIO info cache and zapping, and dirty logging. It mirrors Linux KVM's x86 MMU (see
//! `../shared/design/kvm-mmu-facts.md`, beside the repository); where a type mirrors a KVM concept its doc says which.
//!
//! `#![no_std]` + `alloc`: the host provides page-table frames and address translation through
//! the traits in [`host`], and chooses how waiters wait ([`sync::Relax`]). The `std` feature (on
//! by default) adds `std::error::Error` impls and the yielding wait policy.
#![no_std]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

extern crate alloc;
#[cfg(any(feature = "std", test, loom))]
extern crate std;

pub mod bugs;
pub mod dirty;
mod error;
pub mod fault;
pub mod guest;
pub mod hash;
pub mod host;
pub mod invalidate;
pub mod memslot;
pub mod mmu_core;
mod notifier;
pub mod requests;
pub mod shadow;
mod shared;
pub mod spte;
pub mod srcu;
pub mod stats;
/// The one atomics/locks shim (loom's types under `--cfg loom`). Public for the crate's loom
/// models and tests; not part of the stable API (use the re-exports [`Relax`] and [`Spin`]).
#[doc(hidden)]
pub mod sync;
pub mod tdp;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod types;
pub mod vcpu;
pub mod vm;

pub use error::{Error, Result};
#[cfg(any(feature = "std", loom))]
pub use sync::Yield;
pub use sync::{Relax, Spin};
pub use types::{Access, AsId, FaultAccess, Generation, Gfn, Gpa, Gva, Hva, Level, Pfn, SlotId};
