//! Guest paging under the shadow MMU: the guest CPU's paging state ([`mode`]), the gPTE format
//! and its reserved bits ([`pte`]), and the walker that translates a guest-virtual address
//! through the guest's own tables ([`walk()`](walk::walk); KVM's `paging_tmpl.h` for 64-bit gPTEs, facts
//! `kvm-shadow-mmu-facts.md` §2).
//!
//! The walker only reads and A/D-updates guest memory through [`GuestPteMemory`]; it owns no
//! state between walks. Its faults are the guest's (#PF or #GP to inject), never MMU errors.

pub mod mode;
pub mod pte;
#[cfg(any(test, feature = "testing"))]
pub mod testmem;
pub mod walk;

pub use mode::{load_pdptrs, GuestCpu, PagingMode, PdptrError};
pub use walk::{
    gva_reachable, walk, GpteWriteError, GuestPageFault, GuestPteMemory, GuestWalk, WalkError,
    MAX_RESTARTS,
};
