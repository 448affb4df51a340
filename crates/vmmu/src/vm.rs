//! A VM: memslots and the MMU tied together (KVM's `struct kvm` for the parts this crate
//! covers): `set_memory_region` with the MMU's hooks (zap on delete/move, zap all on an MMIO
//! generation wrap), vCPU creation, `zap_all_fast`, host invalidations, and the MMIO caching state.
//! The MMU is chosen per VM ([`MmuKind`]): the TDP MMU (EPT or NPT tables keyed by
//! guest-physical address) or the shadow MMU (tables that shadow the guest's own page tables,
//! keyed by guest-virtual address). Both take the same memslot hooks, flushes and requests.

use crate::bugs::BugSet;
use crate::dirty::{DirtyLogError, DirtyLogMode};
use crate::host::Host;
use crate::memslot::region::Requester;
use crate::memslot::{
    InternalMemoryRegion, Memslot, MemslotChange, MemslotError, MemslotHooks, Memslots,
    MemslotsConfig, UserspaceMemoryRegion,
};
use crate::mmu_core::{MmuConfig, MmuCore, MmuError};
pub use crate::notifier::HvaInvalidation;
use crate::shared::{VmMmu, VmShared};
use crate::spte::{FormatKind, HostCpu, MmioCachingPolicy, SpteConfigError, SpteFormat};
use crate::stats::VmStatsSnapshot;
use crate::sync::Arc;
use crate::tdp::{Tdp, TdpMmu};
use crate::types::{AsId, Generation, Gfn, Hva, Level, SlotId, PAGE_SHIFT};
use crate::vcpu::Vcpu;
use alloc::vec::Vec;

/// Which MMU a VM uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum MmuKind {
    /// Two-dimensional paging: the MMU maps guest-physical addresses (KVM with TDP on).
    #[default]
    Tdp,
    /// Shadow paging: the MMU shadows the guest's page tables (KVM with TDP off). The SPTEs are
    /// x86 page-table entries, so the format must be NPT-like ([`FormatKind::Npt`]).
    Shadow,
}

impl core::fmt::Display for MmuKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            MmuKind::Tdp => "TDP",
            MmuKind::Shadow => "shadow-paging",
        })
    }
}

/// How to build a [`Vm`].
#[derive(Clone, Copy, Debug)]
pub struct VmConfig {
    /// The SPTE format (EPT, NPT, NPT with an SEV C-bit).
    pub format: FormatKind,
    /// The host CPU (MAXPHYADDR, L1TF).
    pub host_cpu: HostCpu,
    /// The user's wish for MMIO caching (KVM's `kvm.mmio_caching` module parameter).
    pub mmio_caching: bool,
    /// Address spaces: 1, or 2 (SMM).
    pub nr_address_spaces: u16,
    /// The most vCPUs, 1 to [`KVM_MAX_VCPUS`] ([`VmError::TooManyVcpus`] otherwise).
    pub max_vcpus: usize,
    /// 4- or 5-level tables ([`VmConfig::new`]: 5 when `phys_bits` is above 48). A TDP VM
    /// refuses 4 levels with `phys_bits` above 48 ([`VmError::RootTooShallow`]).
    pub root_level: Level,
    /// Delete/move zaps everything (KVM_X86_QUIRK_SLOT_ZAP_ALL, which KVM has on unless the VMM
    /// disables it) instead of only what the slot backs (TDP: its range; shadow paging: the
    /// leaves mapping its frames and the shadow pages whose gfn it holds). Off in
    /// [`VmConfig::new`] (the quirk disabled: the narrower zap); set it for KVM's default.
    pub slot_zap_all: bool,
    /// First memslot generation counter (see [`MemslotsConfig::generation_base`]); 0 as in KVM.
    pub generation_base: u64,
    /// Historical bugs to re-inject (empty normally).
    pub bugs: BugSet,
    /// The MMU.
    pub mmu: MmuKind,
    /// Shadow paging: the most shadow pages before the oldest are recycled (KVM
    /// `n_max_mmu_pages`). `Some(n)`: as if `KVM_SET_NR_MMU_PAGES(n)` had been called, fixed
    /// until [`Vm::set_nr_mmu_pages`]; below 64 [`Vm::new`] refuses it as KVM's ioctl does
    /// ([`VmError::TooFewShadowPages`]). `None` (the default): KVM's default limit,
    /// recomputed at every memslot creation and deletion as 2% of the pages of all memslots, at
    /// least 64 (`kvm_mmu_calculate_default_mmu_pages`), so a small VM recycles shadow pages
    /// as KVM does (which a guest sees in dirty logs: a read through a recycled table faults
    /// and maps a dirty guest page writable again, marking it dirty).
    pub shadow_max_pages: Option<usize>,
    /// TDP: prefetch neighbour leaves after a 4 KiB RAM fault, as KVM's legacy direct MMU
    /// (`tdp_mmu=N`) and its shadow MMU below a guest's 2 MiB pages do; KVM's TDP MMU does not
    /// (the default, `false`). A prefetched leaf keeps a later read of its page from faulting,
    /// which a dirty log shows (see [`crate::shadow`]'s prefetch). The shadow MMU always
    /// prefetches, as KVM's does.
    pub tdp_prefetch: bool,
    /// Shadow paging: an MMIO fault builds no shadow page (and so recycles none to make room);
    /// its MMIO SPTE goes only where the shadow path to it exists already. KVM with MMIO caching
    /// off emulates such a fault before `FNAME(fetch)` and builds nothing; with caching on it
    /// builds the path (the default, `false`), and the different page count shows through
    /// recycling: a recycled table's dirty guest pages fault again, map writable and are logged.
    /// A host that must observe the same with caching on and off (the scenario backend, whose
    /// reference KVM runs with caching off) sets it.
    pub shadow_mmio_path_only: bool,
    /// The highest host address (exclusive) a memslot's `userspace_addr + memory_size` may
    /// reach (KVM's `access_ok`, which checks it against the user address limit). The default
    /// is x86-64's [`TASK_SIZE_MAX`](crate::memslot::TASK_SIZE_MAX), as for a VMM process; a
    /// hypervisor that names guest RAM by its own (kernel, higher-half) addresses raises it,
    /// up to `u64::MAX`. Only the range check uses it: the addresses go to
    /// [`HostMemory::translate`](crate::host::HostMemory::translate) as they are.
    pub user_va_limit: u64,
}

impl VmConfig {
    /// A shadow-paging configuration (x86 page-table SPTEs) on a host with `phys_bits`.
    pub fn shadow(phys_bits: u8) -> Result<Self, VmError> {
        let mut cfg = VmConfig::new(FormatKind::Npt, phys_bits)?;
        cfg.mmu = MmuKind::Shadow;
        Ok(cfg)
    }

    /// A configuration for `format` on a host with `phys_bits` of physical address, caching as
    /// the user allows, one address space, at most 8 vCPUs (`max_vcpus`), and 4-level tables, or
    /// 5-level ones when `phys_bits` is above 48: a 4-level table reaches 48 bits of
    /// guest-physical address, a host with a larger MAXPHYADDR has 5-level EPT/NPT, and KVM uses
    /// it when the guest's MAXPHYADDR is above 48 (`kvm_mmu_get_tdp_level`), as a guest given
    /// the host's is.
    pub fn new(format: FormatKind, phys_bits: u8) -> Result<Self, VmError> {
        Ok(VmConfig {
            format,
            host_cpu: HostCpu::new(phys_bits)?,
            mmio_caching: true,
            nr_address_spaces: 1,
            max_vcpus: 8,
            root_level: if phys_bits > 48 { Level::L5 } else { Level::L4 },
            slot_zap_all: false,
            generation_base: 0,
            bugs: BugSet::NONE,
            mmu: MmuKind::Tdp,
            shadow_max_pages: None,
            tdp_prefetch: false,
            shadow_mmio_path_only: false,
            user_va_limit: crate::memslot::TASK_SIZE_MAX,
        })
    }
}

/// The most vCPUs a VM may have (x86 KVM's `KVM_MAX_VCPUS`, the largest
/// `CONFIG_KVM_MAX_NR_VCPUS`): [`VmConfig::max_vcpus`] above it is refused.
pub const KVM_MAX_VCPUS: usize = 4096;

/// Why a VM could not be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum VmError {
    /// The SPTE format or host CPU is unusable.
    #[error(transparent)]
    Spte(#[from] SpteConfigError),
    /// The memslot configuration is unusable.
    #[error(transparent)]
    Memslots(#[from] crate::memslot::ConfigError),
    /// The MMU configuration is unusable, or a vCPU could not be added.
    #[error(transparent)]
    Mmu(#[from] MmuError),
    /// Shadow paging needs x86 page-table SPTEs.
    #[error("shadow paging needs the x86 page-table SPTE format (FormatKind::Npt), not {0:?}")]
    ShadowNeedsX86Format(FormatKind),
    /// [`VmConfig::max_vcpus`] is 0 (a VM on which every `create_vcpu` would fail) or above
    /// [`KVM_MAX_VCPUS`]: the VM's per-vCPU state (request words, reader records) is allocated
    /// up front, so a count near `usize::MAX` could not be.
    #[error("max_vcpus {max_vcpus} is not between 1 and KVM_MAX_VCPUS ({KVM_MAX_VCPUS})")]
    TooManyVcpus {
        /// The count asked for.
        max_vcpus: usize,
    },
    /// A TDP VM with 4-level tables on a host whose MAXPHYADDR is above 48: memslots would be
    /// accepted up to the MAXPHYADDR, but a 4-level walk reaches only 48 bits (a gpa above would
    /// alias a lower one).
    #[error("a 4-level TDP root reaches 48 bits of guest-physical address; MAXPHYADDR {phys_bits} needs root_level 5")]
    RootTooShallow {
        /// The host MAXPHYADDR.
        phys_bits: u8,
    },
    /// `KVM_SET_NR_MMU_PAGES` (or [`VmConfig::shadow_max_pages`]) below KVM's minimum of
    /// [`crate::shadow::MIN_ALLOC_PAGES`]: KVM answers `EINVAL`.
    #[error("a shadow page limit of {requested} pages is below KVM's minimum of 64 (KVM_SET_NR_MMU_PAGES answers EINVAL); ask for at least 64")]
    TooFewShadowPages {
        /// The limit asked for.
        requested: usize,
    },
    /// [`crate::bugs::Bug::LeafCacheIgnoresEpoch`] on a host whose table memory may be given
    /// back after `free_table` ([`crate::host::FrameAllocator::retains_table_memory`]): the
    /// bug reads freed tables, which is undefined behaviour there.
    #[cfg(feature = "historical-bugs")]
    #[error("the leaf-cache-ignores-epoch bug reads freed table pages: it needs a host that keeps table memory (FrameAllocator::retains_table_memory)")]
    BugNeedsRetainedTables,
}

/// KVM `kvm_vm_ioctl_set_nr_mmu_pages`: a limit below `KVM_MIN_ALLOC_MMU_PAGES` is `EINVAL`.
fn check_nr_mmu_pages(n: usize) -> Result<(), VmError> {
    if n < crate::shadow::MIN_ALLOC_PAGES {
        return Err(VmError::TooFewShadowPages { requested: n });
    }
    Ok(())
}

/// A read-only view of a VM's memslots.
#[derive(Clone, Copy)]
pub struct MemslotsView<'a>(&'a Memslots);

impl MemslotsView<'_> {
    /// The current generation of `as_id` (see [`Memslots::generation`]); `None` for an address
    /// space the VM does not have (not below [`Self::nr_address_spaces`]), as every entry point
    /// of the VM that takes an `as_id` answers such a one without a panic.
    pub fn generation(&self, as_id: AsId) -> Option<Generation> {
        (as_id.0 < self.0.nr_address_spaces()).then(|| self.0.generation(as_id))
    }

    /// The number of address spaces (1, or 2 with SMM).
    pub fn nr_address_spaces(&self) -> u16 {
        self.0.nr_address_spaces()
    }
}

/// A VM. Cheap to clone (shared).
///
/// Its state lives until the last of its handles goes: the `Vm` clones, its [`Vcpu`]s and its
/// [`HvaInvalidation`]s. Then (KVM `kvm_destroy_vm`) every page-table page the MMU still holds
/// goes back to the host through [`crate::host::FrameAllocator::free_table`], on the thread that
/// dropped that handle. The VM holds its host (`Arc<H>`): a host that keeps a `Vm` of its own
/// (to call [`Self::gfn_to_hva`] from a callback, say) makes a cycle that keeps both alive; keep
/// a [`WeakVm`] ([`Self::downgrade`]) in the host instead.
///
/// ```
/// use std::sync::Arc;
/// use vmmu::memslot::UserspaceMemoryRegion;
/// use vmmu::spte::FormatKind;
/// use vmmu::testing::TestHost; // your hypervisor's host instead: see examples/embed.rs
/// use vmmu::vm::{Vm, VmConfig};
///
/// let host = Arc::new(TestHost::new(16));
/// host.map(0x4000_0000, 1 << 20, 0x4_0000, vmmu::Level::L4K, true);
/// let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46)?, host)?;
/// // KVM_SET_USER_MEMORY_REGION: 1 MiB of RAM at gpa 0, slot 0.
/// vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 1 << 20, 0x4000_0000))?;
/// // KVM's rules and errnos: an overlapping slot is EEXIST.
/// let err = vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 0, 4096, 0x4000_0000));
/// assert_eq!(err.unwrap_err().errno().to_string(), "EEXIST");
/// assert!(vm.mmio_caching_enabled(), "EPT can always cache MMIO");
/// # Ok::<(), vmmu::Error>(())
/// ```
pub struct Vm<H: Host> {
    inner: Arc<VmShared<H>>,
}

impl<H: Host> Clone for Vm<H> {
    fn clone(&self) -> Self {
        Vm { inner: self.inner.clone() }
    }
}

/// A handle to a VM that does not keep it alive (`Weak` to [`Vm`]'s `Arc`), for a host that
/// needs its VM from a callback: the VM holds its host, so a host holding a [`Vm`] would keep
/// both alive for ever. [`Self::upgrade`] gives a [`Vm`] while any other handle lives.
///
/// An upgraded handle dropped inside a host callback is never the VM's last: the callback runs
/// under a call on a [`Vm`], [`Vcpu`] or invalidation the caller still holds, so the VM's
/// teardown cannot run inside a callback; in the teardown's own callbacks
/// ([`crate::host::FrameAllocator::free_table`]) `upgrade` gives `None`.
#[cfg(not(loom))]
pub struct WeakVm<H: Host> {
    inner: crate::sync::Weak<VmShared<H>>,
}

#[cfg(not(loom))]
impl<H: Host> Clone for WeakVm<H> {
    fn clone(&self) -> Self {
        WeakVm { inner: self.inner.clone() }
    }
}

#[cfg(not(loom))]
impl<H: Host> core::fmt::Debug for WeakVm<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WeakVm").field("alive", &(self.inner.strong_count() > 0)).finish()
    }
}

#[cfg(not(loom))]
impl<H: Host> WeakVm<H> {
    /// The VM, while any of its handles ([`Vm`] clones, [`Vcpu`]s, invalidations in flight)
    /// lives; `None` once the last has gone (its teardown has run or is running).
    pub fn upgrade(&self) -> Option<Vm<H>> {
        self.inner.upgrade().map(|inner| Vm { inner })
    }
}

/// Points inside one memslot update where a test may act (a stand-in for another thread running
/// at that instant). Only with the `testing` feature ([`Vm::set_memory_region_probed`]).
#[cfg(feature = "testing")]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UpdateProbe {
    /// Delete/move: the invalid copy of the slot is published and the MMU has zapped what mapped
    /// it (KVM `kvm_arch_flush_shadow_memslot` has returned); the second swap has not begun.
    Flushed,
    /// KVM `kvm_arch_memslots_updated`: the new set is published and the old set's readers are
    /// drained; the final generation `new_gen` is not stored yet. Before the MMU's wrap check.
    Updated {
        /// The generation about to be stored.
        new_gen: Generation,
    },
    /// The update wraps the MMIO generation and the MMU's wrap zap (KVM
    /// `kvm_mmu_invalidate_mmio_sptes`) has returned; the final generation is not stored yet.
    MmioWrapZapped,
}

/// The MMU's side of the memslot protocol (KVM `kvm_arch_flush_shadow_memslot` and
/// `kvm_arch_memslots_updated`).
struct MmuHooks<'a, H: Host> {
    core: &'a MmuCore<H>,
    mmu: &'a VmMmu,
    nr_as: u16,
    mn_lock: &'a crate::sync::Mutex<crate::srcu::ReaderId>,
    mn_active: &'a crate::sync::AtomicU32,
    /// `mn_lock`, taken by the update's wait for invalidations and held until its first
    /// publication ([`MemslotHooks::publish`]), so no invalidation begins in between.
    mn_held: core::cell::Cell<Option<crate::sync::MutexGuard<'a, crate::srcu::ReaderId>>>,
    #[cfg(feature = "testing")]
    probe: Option<&'a dyn Fn(UpdateProbe)>,
}

impl<'a, H: Host> MmuHooks<'a, H> {
    fn new(inner: &'a VmShared<H>) -> Self {
        MmuHooks {
            core: &inner.core,
            mmu: &inner.mmu,
            nr_as: inner.memslots.nr_address_spaces(),
            mn_lock: &inner.mn_lock,
            mn_active: &inner.mn_active,
            mn_held: core::cell::Cell::new(None),
            #[cfg(feature = "testing")]
            probe: None,
        }
    }

    /// `mn_lock` once no host invalidation is in flight (KVM `kvm_swap_active_memslots`'s
    /// wait under `mn_invalidate_lock`): the lock is let go while waiting, so the
    /// invalidations can end; the caller holds `vmm_lock`.
    fn mn_lock_quiet(&self) -> crate::sync::MutexGuard<'a, crate::srcu::ReaderId> {
        loop {
            let mn = self.mn_lock.lock_fair_with(&self.core.relax());
            if self.mn_active.load(crate::sync::Ordering::Acquire) == 0 {
                return mn;
            }
            drop(mn);
            crate::host::Sched::relax(&*self.core.host);
        }
    }
}

impl<H: Host> MemslotHooks for MmuHooks<'_, H> {
    fn flush_slot(&self, old: &Memslot) {
        // KVM `kvm_arch_flush_shadow_memslot`: everything with KVM_X86_QUIRK_SLOT_ZAP_ALL (KVM's
        // default, `VmConfig::slot_zap_all`), else only what the slot backs.
        let (as_id, start, end) = (old.as_id(), old.base_gfn(), old.end_gfn());
        let core = self.core;
        if core.config().slot_zap_all {
            self.mmu.zap_all_fast(core);
        } else {
            match self.mmu {
                VmMmu::Shadow(shadow) => shadow.zap_memslot(core, as_id, start, end),
                VmMmu::Tdp(tdp) => Tdp { core, tdp }.zap_gfn_range(as_id, start, end),
            }
        }
        #[cfg(feature = "testing")]
        if let Some(probe) = self.probe {
            probe(UpdateProbe::Flushed);
        }
    }

    fn memslots_updated(&self, _as_id: AsId, new_gen: Generation) {
        #[cfg(feature = "testing")]
        if let Some(probe) = self.probe {
            probe(UpdateProbe::Updated { new_gen });
        }
        self.wrap_check(new_gen);
    }

    fn relax(&self) {
        crate::host::Sched::relax(&*self.core.host);
    }

    fn publish(&self, publish: &mut dyn FnMut()) {
        // The first publication keeps the lock the update's wait took; a later one (the
        // second swap of a delete or move) waits again: invalidations may have begun during
        // the first swap's grace period and the flush, as in KVM.
        let mn = self.mn_held.take().unwrap_or_else(|| self.mn_lock_quiet());
        publish();
        // Invalidations that begin from now on map their host ranges through the new set.
        // The grace period that follows waits for vCPUs' read sections, and a vCPU may be
        // inside `HostMemory::translate` waiting for the very thread that begins one (a host
        // holding its address-space lock across the begin, as Linux's `mmap_lock`): a begin
        // must not wait for that, so `mn_lock` goes now.
        drop(mn);
    }
}

impl<H: Host> MmuHooks<'_, H> {
    fn wrap_check(&self, new_gen: Generation) {
        // KVM `kvm_mmu_invalidate_mmio_sptes`: on a wrap of the MMIO generation bits (address
        // space modifier stripped), no MMIO SPTE may survive, or an old one could match again.
        if new_gen.is_mmio_wrap(self.nr_as) {
            self.core.stats.mmio_gen_wraps.add(1);
            crate::host::Sched::preempt_point(
                &*self.core.host,
                crate::host::PreemptPoint::MmioGenerationWrap,
            );
            self.mmu.zap_all_fast(self.core);
            #[cfg(feature = "testing")]
            if let Some(probe) = self.probe {
                probe(UpdateProbe::MmioWrapZapped);
            }
        }
    }
}

/// The TDP half of [`Vm::set_memory_region`] when dirty logging stops on region `r`: tables
/// whose block one huge leaf could map again (the slot's alignment and the host's current
/// mapping allow it) are replaced by that leaf in place.
fn recover_huge_pages<H: Host>(
    tdp: Tdp<'_, H>,
    memslots: &Memslots,
    serial: &crate::srcu::ReaderId,
    r: &UserspaceMemoryRegion,
) {
    let (as_id, id) = crate::types::SlotId::split(r.slot);
    let guard = memslots.read(serial);
    let Some(slot) = guard.set(as_id).get(id).copied() else {
        return;
    };
    drop(guard);
    let host = &*tdp.host;
    let max_leaf = tdp.cfg.format.max_leaf_level();
    let huge_ok = |gfn: Gfn, level: Level| {
        crate::host::HostMemory::mapping_level(host, slot.hva_of(gfn))
            .is_some_and(|hl| crate::fault::max_mapping_level(&slot, gfn, hl, max_leaf) >= level)
    };
    tdp.recover_huge_pages(as_id, slot.base_gfn(), slot.end_gfn(), &huge_ok);
}

impl<H: Host> Vm<H> {
    /// A handle that does not keep the VM alive (see [`WeakVm`]).
    #[cfg(not(loom))]
    pub fn downgrade(&self) -> WeakVm<H> {
        WeakVm { inner: Arc::downgrade(&self.inner) }
    }

    /// Builds a VM on `host`.
    pub fn new(cfg: VmConfig, host: Arc<H>) -> Result<Self, VmError> {
        if cfg.mmu == MmuKind::Shadow && cfg.format != FormatKind::Npt {
            return Err(VmError::ShadowNeedsX86Format(cfg.format));
        }
        if cfg.max_vcpus == 0 || cfg.max_vcpus > KVM_MAX_VCPUS {
            return Err(VmError::TooManyVcpus { max_vcpus: cfg.max_vcpus });
        }
        if let Some(n) = cfg.shadow_max_pages {
            check_nr_mmu_pages(n)?;
        }
        // The one re-injected bug that is not memory-safe on every host: its fast path reads a
        // cached table without the epoch check, so possibly after the table was freed.
        #[cfg(feature = "historical-bugs")]
        if cfg.bugs.has(crate::bugs::Bug::LeafCacheIgnoresEpoch)
            && !crate::host::FrameAllocator::retains_table_memory(&*host)
        {
            return Err(VmError::BugNeedsRetainedTables);
        }
        let format = SpteFormat::new(cfg.format, cfg.host_cpu.phys_bits())?;
        let phys_bits = cfg.host_cpu.phys_bits();
        if cfg.mmu == MmuKind::Tdp && cfg.root_level == Level::L4 && phys_bits > 48 {
            return Err(VmError::RootTooShallow { phys_bits });
        }
        let policy =
            MmioCachingPolicy::for_format(cfg.mmio_caching, cfg.host_cpu, cfg.format, cfg.bugs);
        let codec = policy.vm_codec();
        let mcfg = MemslotsConfig {
            nr_address_spaces: cfg.nr_address_spaces,
            // TDP: the MMU maps up to the host's MAXPHYADDR (facts §5.3, arch prepare); shadow
            // paging: up to 2^52 (scenarios.md, backend notes).
            max_gpa_bits: match cfg.mmu {
                MmuKind::Tdp => cfg.host_cpu.phys_bits(),
                MmuKind::Shadow => 52,
            },
            // One record per vCPU, the VMM's (`vmm_lock`), the notifier's (`mn_lock`) and the
            // lookups' (`lookup_reader`).
            max_readers: cfg.max_vcpus + 3,
            bugs: cfg.bugs,
            generation_base: cfg.generation_base,
            user_va_limit: cfg.user_va_limit,
            ..MemslotsConfig::default()
        };
        // KVM `kvm_mmu_max_gfn`, and never above what an MMIO SPTE can hold: the codec stores
        // the host's physical-address bits only, and a shadow-paging guest (whose MAXPHYADDR
        // may be above the host's, up to the memslot limit of 52 bits) reaches gfns above it.
        // Cached, such a gfn would decode as the lower gfn its low bits name (aliasing); above
        // the limit the slow path emulates without an SPTE.
        let max_gfn = Gfn(mcfg.max_gfn().min(codec.max_gfn().raw()));
        let memslots = Memslots::try_with_fences(mcfg, host.reader_fences())?;
        let vmm_reader = memslots.register_reader().map_err(|_| MmuError::TooManyVcpus(0))?;
        let lookup_reader = memslots.register_reader().map_err(|_| MmuError::TooManyVcpus(0))?;
        let mn_reader = memslots.register_reader().map_err(|_| MmuError::TooManyVcpus(0))?;
        let core = MmuCore::new(
            host,
            MmuConfig {
                format,
                codec,
                root_level: cfg.root_level,
                max_gfn,
                slot_zap_all: cfg.slot_zap_all,
                bugs: cfg.bugs,
                max_vcpus: cfg.max_vcpus,
                direct_prefetch: cfg.tdp_prefetch,
                shadow_mmio_path_only: cfg.shadow_mmio_path_only,
            },
        )?;
        Ok(Vm {
            inner: Arc::new(VmShared {
                memslots,
                core,
                mmu: match cfg.mmu {
                    MmuKind::Tdp => VmMmu::Tdp(TdpMmu::new()),
                    MmuKind::Shadow => {
                        VmMmu::Shadow(crate::shadow::ShadowMmu::new(cfg.shadow_max_pages))
                    }
                },
                policy,
                bugs: cfg.bugs,
                vmm_lock: crate::sync::Mutex::new(vmm_reader),
                lookup_reader: crate::sync::Mutex::new(lookup_reader),
                mn_lock: crate::sync::Mutex::new(mn_reader),
                mn_active: crate::sync::AtomicU32::new(0),
            }),
        })
    }

    /// `KVM_SET_USER_MEMORY_REGION`: KVM's checks and errnos, the generation protocol, and the
    /// MMU's zaps.
    pub fn set_memory_region(
        &self,
        r: &UserspaceMemoryRegion,
    ) -> Result<MemslotChange, MemslotError> {
        self.update_memory_region(r, Requester::User, MmuHooks::new(&self.inner))
    }

    /// KVM's `__x86_set_memory_region` in one address space: creates, moves or deletes one of
    /// KVM's [`InternalSlot`](crate::memslot::InternalSlot)s, the ids above the user ones, with
    /// the checks, protocol and zaps of [`Self::set_memory_region`] (but the user-id rule). An
    /// embedder that needs guest memory of its own (KVM's real-mode TSS or identity page table)
    /// gets a slot no VMM request can name or collide with by id.
    pub fn set_internal_memory_region(
        &self,
        r: &InternalMemoryRegion,
    ) -> Result<MemslotChange, MemslotError> {
        self.update_memory_region(&r.as_request(), Requester::Internal, MmuHooks::new(&self.inner))
    }

    /// [`Self::set_memory_region`] with the MMU's side of the protocol in `hooks` (which carry
    /// a probe in test builds).
    fn update_memory_region(
        &self,
        r: &UserspaceMemoryRegion,
        from: Requester,
        hooks: MmuHooks<'_, H>,
    ) -> Result<MemslotChange, MemslotError> {
        let inner = &*self.inner;
        // KVM's swap waits until no host invalidation is in flight. This first wait holds no
        // lock: a thread that holds an invalidation may begin another, or call the VM's other
        // `vmm_lock` methods, meanwhile (KVM's `invalidate_range_start` never waits for a memslot
        // update either). Once it reads 0 under `mn_lock`, `mn_lock` is held until the first
        // publication (`MemslotHooks::publish`), so no invalidation begins in between; after a
        // publication invalidations may begin again, and a later publication (a delete's or
        // move's second swap) waits for them under `vmm_lock`, as KVM's does under
        // `slots_lock`. As in KVM, a stream of invalidations that never leaves the count at 0
        // starves the update.
        let serial = loop {
            // Fair: a thread that takes `vmm_lock` back to back (dirty-log collection) or
            // begins invalidations one after another cannot keep the update out for long.
            let serial = inner.vmm_lock.lock_fair_with(&inner.core.relax());
            let mn = hooks.mn_lock.lock_fair_with(&inner.core.relax());
            if inner.mn_active.load(crate::sync::Ordering::Acquire) == 0 {
                hooks.mn_held.set(Some(mn));
                break serial;
            }
            drop((mn, serial));
            crate::host::Sched::relax(&*inner.core.host);
        };
        let change = inner.memslots.set_region(r, from, &hooks);
        // A request refused before it published anything lets `mn_lock` go here.
        drop(hooks.mn_held.take());
        let change = change?;
        if let (VmMmu::Shadow(shadow), MemslotChange::Create | MemslotChange::Delete) =
            (&inner.mmu, change)
        {
            // KVM `kvm_arch_commit_memory_region`: the default page limit follows the memslots
            // (`kvm->nr_memslot_pages`, which the memslots keep as every update commits).
            shadow.set_default_max_pages(&inner.core, inner.memslots.nr_memslot_pages());
        }
        // KVM's `kvm_mmu_slot_apply_flags`: nothing more for a create, move or delete, nor for
        // a read-only slot, which no guest write can dirty and whose mappings stay as they are.
        // Otherwise the change toggled dirty logging (the only flag a flags-only change can).
        if change == MemslotChange::FlagsOnly && r.flags & crate::memslot::KVM_MEM_READONLY == 0 {
            if r.flags & crate::memslot::KVM_MEM_LOG_DIRTY_PAGES != 0 {
                if inner.memslots.dirty_log_mode() == DirtyLogMode::InitiallySet {
                    // Every page is dirty already: nothing to protect (the clears do it, page
                    // by page). `vmm_lock`, held, keeps the mode as the bitmap was made.
                    return Ok(change);
                }
                // Logging starts: write-protect the slot's mappings so writes fault (and map
                // 4 KiB) while reads still hit (a zap would make the next read fault, and a read
                // fault can dirty a page).
                let (as_id, _) = crate::types::SlotId::split(r.slot);
                let start = Gfn(r.guest_phys_addr >> PAGE_SHIFT);
                let end = Gfn((r.guest_phys_addr + r.memory_size) >> PAGE_SHIFT);
                let core = &inner.core;
                match &inner.mmu {
                    VmMmu::Shadow(shadow) => {
                        shadow.write_protect_gfn_range(core, as_id, start, end)
                    }
                    VmMmu::Tdp(tdp) => Tdp { core, tdp }.write_protect_gfn_range(as_id, start, end),
                }
            } else if let Some(tdp) = inner.tdp() {
                // Logging stopped: recover the huge mappings it split. The shadow MMU keeps its
                // 4 KiB leaves (KVM recovers those too, through the rmap: not modelled, only
                // slower).
                recover_huge_pages(tdp, &inner.memslots, &serial, r);
            }
        }
        Ok(change)
    }

    /// A new vCPU (in address space 0).
    pub fn create_vcpu(&self) -> Result<Vcpu<H>, VmError> {
        Ok(Vcpu::new(self.inner.clone())?)
    }

    /// KVM `kvm_mmu_zap_all_fast`, serialised with other callers of this method (KVM holds the
    /// slots lock).
    pub fn zap_all_fast(&self) {
        let _g = self.inner.vmm_lock.lock_fair_with(&self.inner.core.relax());
        self.inner.mmu.zap_all_fast(&self.inner.core);
    }

    /// Host invalidation start for host addresses `[start, end)` (KVM's MMU notifier
    /// `invalidate_range_start`): every memslot mapping them, in every address space, is zapped
    /// for the overlap, and faults there retry until the returned [`HvaInvalidation`] is ended
    /// or dropped (`invalidate_range_end`).
    ///
    /// A memslot update waits for every invalidation in flight: a thread must not update the
    /// memslots while it holds one (it would wait for itself). If a host callback panics inside
    /// the begin, the begin is undone before the panic leaves it.
    ///
    /// As KVM's `invalidate_range_start`, a begin never waits for a memslot update's grace
    /// period (so never for a vCPU's fault, which may be inside [`crate::host::HostMemory::translate`]
    /// waiting for the thread that begins): an update holds the lock a begin takes only while
    /// it publishes a set, and only with no invalidation in flight. An update that has not yet
    /// published waits for the invalidations in flight holding no lock, so a thread holding an
    /// invalidation may begin another, or call the VM's other methods. The second publication
    /// of a delete or move waits for invalidations begun after the first holding the VMM lock,
    /// as KVM's holds `slots_lock`: a thread that began one then must end it before it calls
    /// the VM's dirty-log, `zap_all_fast` or memslot methods. (As in KVM, invalidations that
    /// keep the count from reaching 0 starve updates.)
    ///
    /// A host's [`crate::host::HostMemory::translate`] or [`crate::host::GuestMemory::cmpxchg_u64`]
    /// may begin and end one itself, as Linux breaks copy-on-write inside KVM's `hva_to_pfn`:
    /// the fault that called it retries and translates again (`tests/embedder_audit.rs`).
    pub fn invalidate_hva_range_begin(&self, start: Hva, end: Hva) -> HvaInvalidation<H> {
        crate::notifier::begin(&self.inner, start, end)
    }

    /// A read-only view of the memslots (generation, address spaces). Updates go through
    /// [`Self::set_memory_region`] only, so the MMU's hooks always run.
    pub fn memslots(&self) -> MemslotsView<'_> {
        MemslotsView(&self.inner.memslots)
    }

    /// [`Self::set_memory_region`], all of it, with `probe` called at the points of
    /// [`UpdateProbe`] (after the MMU's own hook work for `Flushed` and `MmioWrapZapped`, before
    /// it for `Updated`).
    /// Test builds only: the deterministic way to run something "in the window" of an update.
    #[cfg(feature = "testing")]
    pub fn set_memory_region_probed(
        &self,
        r: &UserspaceMemoryRegion,
        probe: &dyn Fn(UpdateProbe),
    ) -> Result<MemslotChange, MemslotError> {
        let mut hooks = MmuHooks::new(&self.inner);
        hooks.probe = Some(probe);
        self.update_memory_region(r, Requester::User, hooks)
    }

    /// Zaps `[start, end)` of `as_id` in every root and flushes (what a delete's hook does),
    /// outside any memslot update. Test builds only.
    #[cfg(feature = "testing")]
    pub fn zap_gfn_range_for_tests(&self, as_id: AsId, start: Gfn, end: Gfn) {
        let inner = &*self.inner;
        let _g = inner.vmm_lock.lock_fair_with(&inner.core.relax());
        let core = &inner.core;
        match &inner.mmu {
            VmMmu::Shadow(shadow) => shadow.unmap_gfn_ranges(core, &[(as_id, start, end)][..]),
            VmMmu::Tdp(tdp) => Tdp { core, tdp }.zap_gfn_range(as_id, start, end),
        }
    }

    /// A remote TLB flush of every vCPU (KVM `kvm_flush_remote_tlbs`). Test builds only.
    #[cfg(feature = "testing")]
    pub fn flush_remote_tlbs_for_tests(&self) {
        self.inner.core.flush_remote_tlbs();
    }

    /// Test-only (feature `testing`; takes the shadow lock): what zapped shadow pages still make
    /// reachable, which must be 0 while no zap is in progress: MMU-present SPTEs in pages that
    /// are invalid (zapped while pinned by a root) or obsolete, and parent links from a freed,
    /// invalid or obsolete page (a table installed below a zapped page). For models and tests
    /// of the staleness check. `None` for a TDP VM.
    #[cfg(feature = "testing")]
    pub fn stale_shadow_entries_for_tests(&self) -> Option<usize> {
        let shadow = self.inner.shadow()?;
        Some(shadow.stale_entries_for_tests(&self.inner.core))
    }

    /// What both MMUs share: the configuration, the host, the VM-wide counters, the table
    /// pages waiting for a grace period.
    pub fn core(&self) -> &MmuCore<H> {
        &self.inner.core
    }

    /// The TDP MMU (its roots), for a TDP VM; `None` under shadow paging
    /// ([`Self::shadow_mmu`]).
    pub fn tdp(&self) -> Option<Tdp<'_, H>> {
        self.inner.tdp()
    }

    /// The effective MMIO caching state and, when off, why (like reading `kvm.mmio_caching`).
    pub fn mmio_caching(&self) -> &MmioCachingPolicy {
        &self.inner.policy
    }

    /// Whether this VM installs MMIO SPTEs (the per-VM value, facts §1.4).
    pub fn mmio_caching_enabled(&self) -> bool {
        self.inner.core.config().codec.enabled()
    }

    /// A snapshot of the VM-wide counters.
    pub fn stats(&self) -> VmStatsSnapshot {
        self.inner.core.stats.snapshot()
    }

    /// The host address of guest frame `gfn` in address space `as_id` under the current
    /// memslots (KVM `gfn_to_hva`), for an emulator that writes guest RAM (e.g. after a
    /// write-protection exit); `None` where no usable slot maps it (a slot being deleted or
    /// moved included).
    ///
    /// A memslot read section, as KVM's (`srcu_read_lock(&kvm->srcu)`): it never waits for a
    /// memslot update, so a host may call it while it holds an [`HvaInvalidation`] or from its
    /// own callbacks (a [`crate::host::HostMemory::translate`] that asks which gfn it serves).
    pub fn gfn_to_hva(&self, as_id: AsId, gfn: Gfn) -> Option<Hva> {
        let inner = &*self.inner;
        if as_id.0 >= inner.memslots.nr_address_spaces() {
            return None;
        }
        // Not `vmm_lock`: a memslot update holds that while it waits for the read sections of
        // faults, whose host callbacks may be the caller.
        let reader = inner.lookup_reader.lock_with(&inner.core.relax());
        let guard = inner.memslots.read(&reader);
        let slot = guard.set(as_id).find(gfn).filter(|s| !s.is_invalid())?;
        Some(slot.hva_of(gfn))
    }

    /// The shadow MMU (stats, page count), for a shadow-paging VM.
    pub fn shadow_mmu(&self) -> Option<&crate::shadow::ShadowMmu> {
        self.inner.shadow()
    }

    /// The shadow page limit (KVM `n_max_mmu_pages`); `None` for a TDP VM.
    pub fn shadow_max_pages(&self) -> Option<usize> {
        let shadow = self.inner.shadow()?;
        Some(shadow.lock(&self.inner.core).n_max)
    }

    /// Which MMU the VM uses.
    pub fn mmu_kind(&self) -> MmuKind {
        match self.inner.mmu {
            VmMmu::Tdp(_) => MmuKind::Tdp,
            VmMmu::Shadow(_) => MmuKind::Shadow,
        }
    }

    /// `KVM_SET_NR_MMU_PAGES`: a new shadow page limit; the oldest pages no root pins are
    /// zapped down to it. Below 64 it is refused as KVM refuses it
    /// ([`VmError::TooFewShadowPages`], KVM's `EINVAL`) and nothing changes. A TDP VM accepts
    /// it and has no shadow pages to limit.
    pub fn set_nr_mmu_pages(&self, n: usize) -> Result<(), VmError> {
        check_nr_mmu_pages(n)?;
        match &self.inner.mmu {
            VmMmu::Shadow(shadow) => shadow.set_max_pages(&self.inner.core, n),
            VmMmu::Tdp(_) => {}
        }
        Ok(())
    }

    /// The host's memory shrinker asks for `nr` shadow pages back (KVM `mmu_shrink_scan`): the
    /// oldest pages no root pins are zapped while vCPUs keep running. Returns how many. 0 for a
    /// TDP VM.
    pub fn shrink_shadow_pages(&self, nr: usize) -> usize {
        match &self.inner.mmu {
            VmMmu::Shadow(shadow) => shadow.shrink(&self.inner.core, nr),
            VmMmu::Tdp(_) => 0,
        }
    }

    /// Frees the table pages zaps have unlinked and queued (vCPUs that drop roots queue some,
    /// freed in batches): it waits for a grace period first, kicking every vCPU in guest mode
    /// ([`crate::host::Sched::kick`]), so it returns once each of them has left guest mode
    /// (or had left it). Like a memslot update it must not be called on a thread whose vCPU is in
    /// guest mode ([`Vcpu::enter_guest_mode`]), nor from a host callback: it would wait for
    /// that thread itself. Every zap and memslot update of the VM reclaims already; a host
    /// calls this when it wants the frames back sooner ([`MmuCore::pending_free`] counts them).
    pub fn reclaim(&self) {
        self.inner.core.reclaim();
    }
}

/// Dirty logging (`crate::dirty`): the ioctls, on the VM's memslots and MMU.
impl<H: Host> Vm<H> {
    /// `KVM_GET_DIRTY_LOG` on slot `id` of address space `as_id`: the slot's dirty bitmap (bit
    /// `i` of word `w` = page `64w + i` of the slot; [`crate::dirty::pages_of`] lists them).
    /// In [`DirtyLogMode::Auto`] the returned pages are cleared and write-protected again, and
    /// if a leaf lost its write right every vCPU's TLB is flushed before this returns. Errors
    /// in KVM's order: `EINVAL` for an address space or id out of range, `ENOENT` for no slot
    /// or no dirty logging; then `ENOMEM` ([`DirtyLogError::OutOfHeap`]) if the heap cannot
    /// hold the bitmap, found before any bit is taken, so nothing is lost.
    pub fn get_dirty_log(&self, as_id: AsId, id: SlotId) -> Result<Vec<u64>, DirtyLogError> {
        self.inner.get_dirty_log(as_id.0, id.0)
    }

    /// [`Self::get_dirty_log`] into `out`, the caller's buffer (KVM copies into the VMM's
    /// `dirty_bitmap`), without allocating: for a hypervisor that collects dirty logs from a
    /// fixed buffer (a bare-metal one with a bounded heap, or one that collects with interrupts
    /// off). Fills the first `n` words of `out` and returns `n`, the slot's bitmap length
    /// (`npages` rounded up to 64 pages, in words); the words after them are left as they were.
    /// The same checks in the same order, then `EFAULT`
    /// ([`DirtyLogError::BitmapTooShort`]) if `out` has fewer than `n` words: checked before
    /// any bit is taken, so a short buffer loses nothing (KVM's `copy_to_user` fails after the
    /// collection).
    pub fn get_dirty_log_into(
        &self,
        as_id: AsId,
        id: SlotId,
        out: &mut [u64],
    ) -> Result<usize, DirtyLogError> {
        self.inner.get_dirty_log_into(as_id.0, id.0, out)
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears the bits of `bitmap` (bit `j` of word `k` = page
    /// `first + 64k + j`) over pages `[first, first + count)` of the slot and write-protects the
    /// pages that were dirty, flushing before it returns if a leaf lost its write right. KVM's
    /// checks in KVM's order: ids (`EINVAL`), `first` a multiple of 64 (`EINVAL`), the slot logs
    /// (`ENOENT`), the range fits and `count` is a multiple of 64 unless it ends at the slot's end
    /// (`EINVAL`); then `bitmap` must cover the range (`EFAULT`). As in KVM it works without manual
    /// protect too.
    pub fn clear_dirty_log(
        &self,
        as_id: AsId,
        id: SlotId,
        first: u64,
        count: u32,
        bitmap: &[u64],
    ) -> Result<(), DirtyLogError> {
        self.inner.clear_dirty_log(as_id.0, id.0, first, count, Some(bitmap))
    }

    /// [`Self::clear_dirty_log`] with every bit of the range set, without a bitmap: what a VMM
    /// asks when it clears a whole range. Same checks, in the same order, except that there is
    /// no bitmap to be too short; a range KVM refuses costs nothing, however large `count`.
    pub fn clear_dirty_log_all(
        &self,
        as_id: AsId,
        id: SlotId,
        first: u64,
        count: u32,
    ) -> Result<(), DirtyLogError> {
        self.inner.clear_dirty_log(as_id.0, id.0, first, count, None)
    }

    /// Enables or disables manual dirty-log protection (`KVM_ENABLE_CAP` of
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, with or without "initially set": see
    /// [`DirtyLogMode`]). The mode applies to slots that start logging from now on (a slot
    /// logging already keeps its bitmap) and to every later `KVM_GET_DIRTY_LOG`. Waits for a
    /// memslot update in flight, so an update sees one mode from start to end.
    pub fn set_dirty_log_mode(&self, mode: DirtyLogMode) {
        let _serial = self.inner.vmm_lock.lock_fair_with(&self.inner.core.relax());
        self.inner.memslots.set_dirty_log_mode(mode);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    //! Regression tests of issue 11's defects that need the MMU's insides (a fault's decision
    //! taken at one moment and applied at another). Races on real threads are in
    //! `tests/tdp_races.rs`, exhaustive interleavings in the loom models.
    use super::*;
    use crate::fault::{FaultOutcome, PageFault, PfErr};
    use crate::memslot::UserspaceMemoryRegion;
    use crate::spte::FormatKind;
    use crate::tdp::{HwWalk, LeafSpec, MapOutcome};
    use crate::testing::TestHost;
    use crate::types::{Access, FaultAccess, Gpa, Pfn};
    use alloc::collections::BTreeMap;

    const RAM_HVA: u64 = 0x4000_0000;
    const GPA: u64 = 0x10_0000;

    fn vm(format: FormatKind) -> (Vm<TestHost>, Arc<TestHost>) {
        let host = Arc::new(TestHost::new(64));
        host.map(RAM_HVA, 1 << 24, RAM_HVA >> 12, Level::L4K, true);
        let mut cfg = VmConfig::new(format, 46).unwrap();
        cfg.max_vcpus = 2;
        (Vm::new(cfg, host.clone()).unwrap(), host)
    }

    /// `get_dirty_log_into` answers as `get_dirty_log` does, in both modes, into the caller's
    /// buffer; a buffer one word short is EFAULT and takes no bit (the next GET still has them).
    #[test]
    fn get_dirty_log_into_fills_the_callers_buffer_and_a_short_one_loses_nothing() {
        use crate::memslot::KVM_MEM_LOG_DIRTY_PAGES;
        for manual in [false, true] {
            let (vm, _host) = vm(FormatKind::Ept);
            if manual {
                vm.set_dirty_log_mode(DirtyLogMode::Manual);
            }
            // 130 pages: three words, the last partial.
            let logged =
                UserspaceMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, GPA, 130 << 12, RAM_HVA);
            vm.set_memory_region(&logged).unwrap();
            let mut v = vm.create_vcpu().unwrap();
            v.service_requests().unwrap();
            for page in [1u64, 64, 129] {
                let gpa = Gpa(GPA + (page << 12));
                assert_eq!(
                    v.handle_ept_violation(gpa, FaultAccess::WRITE),
                    Ok(FaultOutcome::Fixed)
                );
            }
            let want = [1u64 << 1, 1, 1 << 1];
            let mut short = [7u64; 2];
            assert!(matches!(
                vm.get_dirty_log_into(AsId(0), SlotId(0), &mut short),
                Err(DirtyLogError::BitmapTooShort { words: 2, needed: 3 })
            ));
            assert_eq!(short, [7, 7], "nothing written into a short buffer");
            let mut out = [u64::MAX; 4];
            assert_eq!(vm.get_dirty_log_into(AsId(0), SlotId(0), &mut out), Ok(3));
            assert_eq!(out[..3], want, "manual: {manual}");
            assert_eq!(out[3], u64::MAX, "the word after the bitmap is left alone");
            // Auto mode took the bits (as get_dirty_log does); manual mode keeps them.
            let again = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
            assert_eq!(again, if manual { want.to_vec() } else { alloc::vec![0; 3] });
            // KVM's checks first: no slot is ENOENT, whatever the buffer.
            assert!(matches!(
                vm.get_dirty_log_into(AsId(0), SlotId(9), &mut []),
                Err(DirtyLogError::NoLog { .. })
            ));
        }
    }

    /// A hypervisor that names guest RAM by its own higher-half address: refused with the
    /// default limit (KVM's `access_ok` for a VMM process), accepted and mapped once
    /// `VmConfig::user_va_limit` allows it.
    #[test]
    fn user_va_limit_lets_a_hypervisor_name_higher_half_ram() {
        const HIGH: u64 = 0xffff_8880_0000_0000;
        let host = Arc::new(TestHost::new(64));
        host.map(HIGH, 1 << 20, 0x5000, Level::L4K, true);
        let region = UserspaceMemoryRegion::new(0, 0, 0, 1 << 20, HIGH);
        let cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        let vm = Vm::new(cfg, host.clone()).unwrap();
        assert!(matches!(
            vm.set_memory_region(&region),
            Err(crate::memslot::MemslotError::HvaRangeNotUser { .. })
        ));
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.user_va_limit = u64::MAX;
        let vm = Vm::new(cfg, host).unwrap();
        vm.set_memory_region(&region).unwrap();
        // The last page below the limit is still refused past it.
        let mut low = VmConfig::new(FormatKind::Ept, 46).unwrap();
        low.user_va_limit = HIGH + (1 << 20) - 4096;
        let vm2 = Vm::new(low, Arc::new(TestHost::new(4))).unwrap();
        assert!(vm2.set_memory_region(&region).is_err());
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        assert_eq!(v.handle_ept_violation(Gpa(0x1000), FaultAccess::READ), Ok(FaultOutcome::Fixed));
        let walk = v.enter_guest().unwrap().walk(Gpa(0x1000), Access::NONE);
        assert!(matches!(walk, HwWalk::Translated { pfn: Pfn(0x5001), .. }), "{walk:?}");
    }

    /// The test host, claiming no more than the trait's minimum about freed table memory.
    #[cfg(feature = "historical-bugs")]
    struct FreesTables(TestHost);

    // SAFETY: every call is the test host's; `retains_table_memory` and `type_stable_tables`
    // promise less than it keeps (`false`).
    #[cfg(feature = "historical-bugs")]
    unsafe impl crate::host::FrameAllocator for FreesTables {
        fn retains_table_memory(&self) -> bool {
            false
        }
        fn alloc_table(&self, init: u64) -> Option<Pfn> {
            self.0.alloc_table(init)
        }
        unsafe fn free_table(&self, pfn: Pfn) {
            // SAFETY: the caller's contract, passed on.
            unsafe { self.0.free_table(pfn) }
        }
        fn table(&self, pfn: Pfn) -> Option<core::ptr::NonNull<crate::host::TableEntries>> {
            self.0.table(pfn)
        }
    }

    #[cfg(feature = "historical-bugs")]
    impl crate::host::HostMemory for FreesTables {
        fn translate(
            &self,
            hva: crate::types::Hva,
            access: crate::host::HostAccess,
        ) -> core::result::Result<crate::host::HostPage, crate::host::HostFault> {
            self.0.translate(hva, access)
        }
    }

    #[cfg(feature = "historical-bugs")]
    impl crate::host::Sched for FreesTables {}

    /// The bug that reads freed tables is refused on a host that may give their memory back,
    /// and taken on one that keeps it.
    #[cfg(feature = "historical-bugs")]
    #[test]
    fn leaf_cache_ignores_epoch_needs_a_host_that_keeps_table_memory() {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.bugs = crate::bugs::BugSet::only(crate::bugs::Bug::LeafCacheIgnoresEpoch);
        let freeing = Arc::new(FreesTables(TestHost::new(4)));
        assert_eq!(Vm::new(cfg, freeing).err(), Some(VmError::BugNeedsRetainedTables));
        assert!(Vm::new(cfg, Arc::new(TestHost::new(4))).is_ok());
        cfg.bugs = crate::bugs::BugSet::only(crate::bugs::Bug::NoTlbFlushOnZap);
        assert!(Vm::new(cfg, Arc::new(FreesTables(TestHost::new(4)))).is_ok());
    }

    /// A vCPU with a TLB (gfn -> frame) that it flushes when asked, as the hardware does.
    struct TlbVcpu {
        vcpu: Vcpu<TestHost>,
        tlb: BTreeMap<u64, Pfn>,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Seen {
        Ram(Pfn),
        Mmio,
    }

    impl TlbVcpu {
        fn read(&mut self, gpa: u64) -> Seen {
            for _ in 0..100 {
                if self.vcpu.service_requests().unwrap().flush_tlb {
                    self.tlb.clear();
                }
                let walk = {
                    let Ok(g) = self.vcpu.enter_guest() else { continue };
                    if let Some(pfn) = self.tlb.get(&(gpa >> 12)) {
                        return Seen::Ram(*pfn);
                    }
                    g.walk(Gpa(gpa), Access::NONE)
                };
                let o = match walk {
                    HwWalk::Translated { pfn, .. } => {
                        self.tlb.insert(gpa >> 12, pfn);
                        return Seen::Ram(pfn);
                    }
                    HwWalk::Violation { .. } => {
                        self.vcpu.handle_ept_violation(Gpa(gpa), FaultAccess::READ).unwrap()
                    }
                    HwWalk::Misconfig { .. } => self.vcpu.handle_ept_misconfig(Gpa(gpa)).unwrap(),
                    HwWalk::Broken { dump } => panic!("broken walk {dump:?}"),
                };
                if let FaultOutcome::Emulate { .. } = o {
                    return Seen::Mmio;
                }
            }
            panic!("read of {gpa:#x} did not complete");
        }
    }

    /// An internal slot maps guest memory as a user slot does, is out of the VMM's reach by id
    /// (a user request naming it breaks rule 0), still counts for overlaps, and its delete
    /// takes its memory away from the guest.
    #[test]
    fn an_internal_slot_maps_guest_memory_that_no_vmm_request_can_name() {
        use crate::memslot::{InternalMemoryRegion, InternalSlot};
        let (vm, _host) = vm(FormatKind::Ept);
        let mut v = TlbVcpu { vcpu: vm.create_vcpu().unwrap(), tlb: BTreeMap::new() };
        let mut r = InternalMemoryRegion {
            as_id: AsId(0),
            slot: InternalSlot::IdentityPageTable,
            guest_phys_addr: GPA,
            memory_size: 0x2000,
            userspace_addr: RAM_HVA,
        };
        assert_eq!(vm.set_internal_memory_region(&r), Ok(MemslotChange::Create));
        assert_eq!(v.read(GPA + 0x1000), Seen::Ram(Pfn((RAM_HVA >> 12) + 1)));
        let by_user = vm.set_memory_region(&UserspaceMemoryRegion::new(32766, 0, GPA, 0, 0));
        assert_eq!(by_user.unwrap_err().rule(), "slot-id-not-user");
        let over = vm.set_memory_region(&UserspaceMemoryRegion::new(3, 0, GPA, 0x1000, RAM_HVA));
        assert!(matches!(over, Err(MemslotError::Overlap { other: 32766, .. })), "{over:?}");
        r.memory_size = 0;
        assert_eq!(vm.set_internal_memory_region(&r), Ok(MemslotChange::Delete));
        assert_eq!(v.read(GPA + 0x1000), Seen::Mmio, "the deleted internal slot still maps");
    }

    /// Defect 1, deterministically: during a slot create, vCPU A decided "MMIO" from the old
    /// memslot set while vCPU B installed the RAM leaf from the new set and cached it in its TLB.
    /// A's decision then reaches the tables (what A's slow path does next, replayed here with the
    /// generation A saw). It must not replace B's leaf silently: after the slot is deleted, B must
    /// not read the deleted slot's frame.
    #[test]
    fn a_stale_mmio_decision_does_not_hide_a_present_leaf_from_the_delete_flush() {
        let (vm, host) = vm(FormatKind::Ept);
        let mut a = vm.create_vcpu().unwrap();
        let mut b = TlbVcpu { vcpu: vm.create_vcpu().unwrap(), tlb: BTreeMap::new() };
        a.service_requests().unwrap();
        let old_gen = vm.memslots().generation(AsId(0)).unwrap();
        let frame = Pfn(RAM_HVA >> 12);
        vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, GPA, 0x1000, RAM_HVA)).unwrap();
        assert_eq!(b.read(GPA), Seen::Ram(frame), "B maps the new slot and caches it");

        let mmu = vm.inner.tdp().unwrap();
        let codec = mmu.config().codec;
        let spte = codec.make(Gpa(GPA).gfn(), old_gen, Access::ALL);
        let root = a.root().unwrap().clone();
        let outcome = {
            let shared = crate::tdp::MmuRead::Lock(mmu.tdp.mmu_lock.read(&mmu.relax()));
            let fault = PageFault::tdp(Gpa(GPA), PfErr::from_access(FaultAccess::READ, false));
            mmu.map(&shared, &root, &fault, LeafSpec::Mmio(spte), crate::stats::StripeKey::Vcpu(0))
        };

        vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, GPA, 0, 0)).unwrap();
        let seen = b.read(GPA);
        assert_eq!(seen, Seen::Mmio, "B used the deleted slot's frame {frame:?} after the delete");
        assert_eq!(outcome, MapOutcome::PresentLeafAllows, "the present leaf serves the access");
        assert_eq!(host.use_after_free(), 0);
    }

    /// Any fault that does replace a present leaf (here: a write that the read-only leaf does not
    /// allow, decided "MMIO" from an older set) flushes remote TLBs: B's cached translation of
    /// the replaced leaf goes.
    #[test]
    fn replacing_a_present_leaf_flushes_remote_tlbs() {
        let (vm, _host) = vm(FormatKind::Npt);
        let mut a = vm.create_vcpu().unwrap();
        a.service_requests().unwrap();
        let mut b = vm.create_vcpu().unwrap();
        b.service_requests().unwrap();
        let old_gen = vm.memslots().generation(AsId(0)).unwrap();
        let ro = crate::memslot::KVM_MEM_READONLY;
        vm.set_memory_region(&UserspaceMemoryRegion::new(1, ro, GPA, 0x1000, RAM_HVA)).unwrap();
        let mmu = vm.inner.tdp().unwrap();
        let root = a.root().unwrap().clone();
        let gfn = Gpa(GPA).gfn();
        let ram = LeafSpec::Ram {
            base_pfn: Pfn(RAM_HVA >> 12),
            max_level: Level::L4K,
            access: Access::ALL,
            writable: false,
            kind: crate::host::FrameKind::Ram,
        };
        let shared = crate::tdp::MmuRead::Lock(mmu.tdp.mmu_lock.read(&mmu.relax()));
        let read = PageFault::tdp(Gpa(GPA), PfErr::from_access(FaultAccess::READ, false));
        let o = mmu.map(&shared, &root, &read, ram, crate::stats::StripeKey::Vcpu(0));
        assert_eq!(o, MapOutcome::Installed { level: Level::L4K });
        let flushes = mmu.stats.remote_tlb_flush_requests.get();
        let spte = mmu.config().codec.make(gfn, old_gen, Access::ALL);
        let write = PageFault::tdp(Gpa(GPA), PfErr::from_access(FaultAccess::WRITE, false));
        let o =
            mmu.map(&shared, &root, &write, LeafSpec::Mmio(spte), crate::stats::StripeKey::Vcpu(0));
        assert_eq!(o, MapOutcome::Installed { level: Level::L4K });
        assert_eq!(
            mmu.stats.remote_tlb_flush_requests.get(),
            flushes + 1,
            "the dropped leaf was flushed"
        );
        drop(shared);
        let pending = mmu.vcpus[b.index()].pending();
        assert!(pending.has(crate::requests::Request::TlbFlush), "B must flush its TLB");
    }
}
