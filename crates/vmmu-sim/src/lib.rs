//! The software machine that drives the vmmu MMU: everything around the MMU that a real machine
//! would provide, so an MMU can be run, stressed and judged without `/dev/kvm`.
//!
//! - [`host`]: host memory (page-aligned buffers with pfns from a frame table that fits
//!   `phys_bits`) and page-table frames: the core's `HostMemory` and `FrameAllocator`;
//! - [`tlb`]: a per-vCPU TLB of present leaf translations;
//! - [`hw_vcpu`]: one simulated hardware vCPU (TLB, the MMU's walk and exits, guest mode, one
//!   retry policy) that the machine, the scenario backend and trace replay all run accesses on;
//! - [`handoff`]: threads waiting in the MMU's wait loops announce themselves, and vCPUs give
//!   way to them between accesses (leave guest mode, yield once), so a memslot update does not
//!   wait out the time slice of a vCPU it preempted;
//! - [`bus`]: the MMIO bus, its register device and exit-to-userspace records;
//! - [`seam`]: the [`GuestMmu`] trait the machine drives, and what an MMU reports;
//! - [`slots`], [`reference`](mod@reference): a plain memslot table, a reference MMU built on it, and a broken
//!   ("stale") MMU that the oracle must catch;
//! - [`layout`], [`mix`], [`schedule`]: the default machine as data: regions and buffers, each
//!   vCPU's deterministic access mix, the device manager's memslot schedule;
//! - [`oracle`]: judges every access against the memslot history;
//! - [`machine`]: vCPU threads, the device manager, the run loop;
//! - [`real`]: the machine on the real MMU ([`RealMmu`]: a `vmmu::vm::Vm` on the machine's host);
//! - [`machine_paging`], [`guest_tables`]: guest page tables, of the main job's guest processes
//!   and of scenario format v2;
//! - [`migration`]: the dirty-log oracle (a collector thread racing the vCPUs' writes);
//! - [`ram`]: guest-sized atomic accesses to host memory; [`membarrier`]: the host's
//!   process-wide barrier for the MMU's SRCU readers; [`mmio_timing`]: sampled MMIO resolution
//!   times;
//! - [`options`], [`report`]: what one `vmmu run` asks of the engine (a plain struct, and
//!   [`RunOptions::run`]) and what it reports, as data (the CLI owns the flags, the progress bar
//!   and the text and JSON rendering).
//! - [`replay`]: replay of recorded VM boots (vmmu traces) on the real MMU.
//! - [`scenario`]: the machine as a scenario backend (`vmmu scenario --backend sim`).
//! - [`selftest`]: KVM's memslot selftests restated on the machine (`vmmu selftest`).
//! - [`timeline`]: per-interval samples and latency histograms of a run, for HTML reports.
//!
//! ```
//! use std::time::Duration;
//! use vmmu_sim::machine::{Machine, MachineConfig};
//! use vmmu_sim::reference::ReferenceMmu;
//!
//! let config = MachineConfig { duration: Duration::from_millis(50), ..MachineConfig::default() };
//! let machine = Machine::new(config)?;
//! let mmu = ReferenceMmu::new(machine.host().clone());
//! let report = machine.run(&mmu)?;
//! assert_eq!(report.oracle.violations, 0);
//! # Ok::<(), vmmu_sim::machine::SimError>(())
//! ```
#![deny(missing_docs)]

mod anon;
pub mod bus;
mod error;
pub mod guest_tables;
pub mod handoff;
pub mod host;
pub mod hw_vcpu;
pub mod layout;
pub mod machine;
pub mod machine_paging;
pub mod membarrier;
pub mod migration;
pub mod mix;
pub mod mmio_timing;
pub mod options;
pub mod oracle;
pub mod ram;
pub mod real;
pub mod reference;
pub mod replay;
pub mod report;
pub mod scenario;
mod scenario_dirty;
mod scenario_vcpu;
pub mod schedule;
pub mod seam;
pub mod selftest;
pub mod slots;
pub mod timeline;
pub mod tlb;

pub use error::{Error, Result};
pub use hw_vcpu::HwVcpu;
pub use machine::{HostPages, Machine, MachineConfig, SimError, UpdateProfile};
pub use options::{
    GenerationStart, RunError, RunMmu, RunOptions, ShadowPages, DEFAULT_SHADOW_PAGES,
};
pub use real::{RealMmu, RealMmuConfig};
pub use report::Report;
pub use scenario::{SimBackend, SimBackendInjected};
pub use seam::{AccessKind, Errno, GuestMmu, MmuCounters, SlotRequest, Translation};
