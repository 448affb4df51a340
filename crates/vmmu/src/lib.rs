//! # vmmu: a virtual MMU with generation-checked MMIO caching
//!
//! The core library: memslots and their generation protocol, SPTE formats and the MMIO SPTE codec,
//! the VM-wide MMU core ([`mmu_core`]), the TDP MMU and the shadow MMU with their fault paths,
//! per-vCPU MMIO info cache and zapping, and dirty logging. It mirrors Linux KVM's x86 MMU (see
//! `../shared/design/kvm-mmu-facts.md`, beside the repository); where a type mirrors a KVM concept
//! its doc says which.
//!
//! `#![no_std]` + `alloc`: the host provides page-table frames and address translation through
//! the traits in [`host`], and chooses how waiters wait ([`host::Sched::relax`]). The `std`
//! feature (on by default) adds only the yielding wait policy (`Yield`, a [`Relax`]), which then
//! becomes the default of [`host::Sched::relax`]; nothing else of the API depends on it.
//!
//! # Using the core without std (a bare-metal hypervisor)
//! Take it with `default-features = false`; it needs a global allocator and nothing else from
//! its environment. `crates/vmmu-bare` is such an embedder, built for `x86_64-unknown-none`.
//! - **Errors**: every error type implements `core::error::Error` and `Display` in both builds.
//! - **The host** ([`host::Host`]): [`host::FrameAllocator`] (a fixed pool of table pages is
//!   enough; its `table` must be O(1) and lock-free; under shadow paging some of its frames
//!   must lie below 4 GiB, [`host::FrameAllocator::alloc_table_below_4g`]), [`host::HostMemory`]
//!   (a write translation gives a writable page or refuses), [`host::Sched`], and
//!   [`host::GuestMemory`] for shadow paging. None needs an OS.
//! - **Waits**: every wait of a VM (grace periods, flush acknowledgements, the VM's locks) turns
//!   [`host::Sched::relax`]. Without `std` its default spins with the pause hint; with `std` it
//!   yields to the OS. Override it to get the same policy in both builds. No wait parks, sleeps
//!   or uses a thread-local.
//! - **Memslot addresses**: a memslot's `userspace_addr` is checked against
//!   [`vm::VmConfig::user_va_limit`], Linux's user-space limit unless raised: a hypervisor that
//!   names guest RAM by its own higher-half addresses raises it.
//! - **Device memory** passed through a memslot (a BAR): [`host::HostMemory::frame_kind`] must
//!   say [`host::FrameKind::Device`] for its frames, so EPT maps them uncacheable (the default
//!   says RAM: write-back).
//! - **VM entry and kicks** (KVM's order): [`vcpu::Vcpu::service_requests`] (flush the TLB if it
//!   says so), then disable interrupts, then [`vcpu::Vcpu::enter_guest`] (an `Err` means a
//!   request arrived: enable interrupts and service again), load the root it gives
//!   ([`vcpu::GuestMode::root`]) and enter the guest; after the VM exit drop the guard, enable
//!   interrupts and call the exit's handler. [`host::Sched::kick`] must make the CPU running
//!   the vCPU exit (an IPI): with interrupts off between `enter_guest` and VM entry, a kick sent
//!   in that window stays pending and exits the guest at once, so no request is missed.
//! - **Allocation** from the global allocator (which a hypervisor may not be able to use with
//!   interrupts off): on a TDP VM the exit handlers ([`vcpu::Vcpu::handle_ept_violation`],
//!   [`vcpu::Vcpu::handle_ept_misconfig`], [`vcpu::Vcpu::handle_npf`]), guest entry and exit,
//!   [`vcpu::Vcpu::service_requests`] when it loads no new root, and
//!   [`vm::Vm::get_dirty_log_into`] allocate nothing (table frames come from the host's
//!   [`host::FrameAllocator`]; `crates/vmmu-bare/tests/exit_path_alloc.rs` checks it), but for
//!   one rare fault: a huge leaf that replaces a lower table (the host now maps the block huge)
//!   promises the detached table's place in the queue of pages to free, which may grow that
//!   queue's list of trees, fallibly: out of heap the fault reports
//!   [`fault::FaultError::OutOfHeap`] with nothing changed. Loading a TDP root (the first
//!   `service_requests`, and after a zap of all roots) allocates the root's record
//!   ([`tdp::RootRef`]), its place on the root list and its place in the queue of pages to free,
//!   all fallibly: out of heap, [`mmu_core::MmuError::OutOfHeap`] with nothing made, and the
//!   vCPU may enter again. [`vm::Vm::get_dirty_log`] allocates the bitmap it returns, fallibly:
//!   out of heap, [`dirty::DirtyLogError::OutOfHeap`] before any bit is taken. Creating a vCPU
//!   allocates nothing (its records are made with the VM); creating a VM allocates infallibly
//!   (out of heap, the allocator's error handler: on a bare-metal target a panic). The TDP
//!   MMU's zaps of whole roots (a memslot delete or move with [`vm::VmConfig::slot_zap_all`],
//!   the zap of every root when a memslot update wraps the MMIO generation, and a root's last
//!   user dropping an obsolete root) need no heap: a root no vCPU uses is freed whole, with the
//!   tables it links, and out of heap a root still in use keeps the tables the zap could not
//!   list, emptied, until its last user drops it (`tests/tdp_update_heap_exhaustion.rs`). Under shadow paging the vCPU's paths are heap-fallible: a #PF
//!   ([`vcpu::Vcpu::handle_page_fault`]) allocates its bookkeeping under the shadow lock (new
//!   shadow pages, parent links, reverse-map entries) fallibly, each reservation made before
//!   anything changes (KVM tops up its caches before the MMU lock): out of heap, the fault
//!   reports [`fault::FaultError::OutOfHeap`] with nothing half made, and the guest may retry
//!   once the hypervisor has memory again; a root load ([`vcpu::Vcpu::service_requests`])
//!   reports [`mmu_core::MmuError::OutOfHeap`] the same way. Zapping shadow pages allocates
//!   nothing (the zapped pages are listed through themselves, and each page's frame has its room
//!   in the free queue from its creation), so recycling at the page limit, dropping roots (CR3
//!   loads, paging-mode changes, a vCPU's drop), emulated writes to shadowed tables
//!   ([`vcpu::Vcpu::track_write`]) and unprotecting one ([`vcpu::Vcpu::unprotect_gfn`]) cannot
//!   run out of heap (`tests/shadow_heap_exhaustion.rs` fails every allocation during each of
//!   these). The VMM-side shadow zaps of a gfn range (a
//!   memslot delete or move, a host invalidation, dirty-log protection) list a long range's
//!   mapped gfns only if the heap holds the list, else they visit the range gfn by gfn; a host
//!   invalidation ([`vm::Vm::invalidate_hva_range_begin`]) needs no heap on either MMU. Table
//!   frames ([`fault::FaultError::OutOfMemory`]) and dirty bitmaps (`ENOMEM` from a memslot
//!   update: the bitmap, its shared handle and its bookkeeping) report exhaustion too. A
//!   memslot update makes room for its slot in the memslot sets' indexes before it publishes
//!   anything, as KVM allocates its new memslot first: out of heap, `ENOMEM` with nothing
//!   changed (the MMU's allocations listed above aside). A TDP VM's zap of a deleted or moved
//!   slot unlinks the tables inside the slot only where it can list them (KVM zaps the leaves
//!   alone), and its recovery of huge pages when a slot stops dirty logging is optional work:
//!   out of heap, the one leaves the tables linked, emptied, and the other leaves the blocks
//!   mapped by small leaves (`tests/tdp_update_heap_exhaustion.rs`).
//!   What the guest can make the shadow MMU take is bounded by its page limit
//!   ([`vm::Vm::set_nr_mmu_pages`], KVM's `n_max_mmu_pages`), not by how much memory the guest
//!   touches: at most 64 KiB of heap per allowed page plus a fixed part per VM (about 43 KiB
//!   per page measured when every leaf maps a frame of its own, the worst case;
//!   `tests/shadow_heap_bound.rs`), so a hypervisor can size its heap for the limit it sets.
//! - **Panics** (a caller bug, such as [`vcpu::Vcpu::walk`] outside guest mode) abort on a
//!   target whose panic strategy is `abort`, as `x86_64-unknown-none`'s is; what [`host`]
//!   says about panics unwinding out of the MMU applies to unwinding builds only.
//! - **Features** unify across a Cargo build: a workspace build in which any crate enables
//!   `vmmu/std` builds it with std for every crate (`cargo tree -e features -i vmmu` shows it).
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
pub mod heap;
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
