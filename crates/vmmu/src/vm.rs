//! A VM: memslots and the TDP MMU tied together (KVM's `struct kvm` for the parts this crate
//! covers): `set_memory_region` with the MMU's hooks (zap on delete/move, zap all on an MMIO
//! generation wrap), vCPU creation, `zap_all_fast`, host invalidations, and the MMIO caching state.

use crate::bugs::BugSet;
use crate::host::Host;
use crate::memslot::{
    Memslot, MemslotChange, MemslotError, MemslotHooks, Memslots, MemslotsConfig,
    UserspaceMemoryRegion,
};
use crate::spte::{FormatKind, HostCpu, MmioCachingPolicy, SpteConfigError, SpteFormat};
use crate::srcu::ReaderId;
use crate::stats::VmStatsSnapshot;
use crate::sync::Arc;
use crate::tdp::{TdpConfig, TdpError, TdpMmu};
use crate::types::{AsId, Generation, Gfn, Hva, Level, PAGE_SHIFT};
use crate::vcpu::Vcpu;
use alloc::vec::Vec;

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
    /// The most vCPUs.
    pub max_vcpus: usize,
    /// 4- or 5-level tables.
    pub root_level: Level,
    /// Delete/move zaps everything (KVM_X86_QUIRK_SLOT_ZAP_ALL) instead of only the slot.
    pub slot_zap_all: bool,
    /// First memslot generation counter (see [`MemslotsConfig::generation_base`]); 0 as in KVM.
    pub generation_base: u64,
    /// Historical bugs to re-inject (empty normally).
    pub bugs: BugSet,
}

impl VmConfig {
    /// A configuration for `format` on a host with `phys_bits` of physical address, caching as
    /// the user allows, one address space, `max_vcpus` vCPUs.
    pub fn new(format: FormatKind, phys_bits: u8) -> Result<Self, VmError> {
        Ok(VmConfig {
            format,
            host_cpu: HostCpu::new(phys_bits)?,
            mmio_caching: true,
            nr_address_spaces: 1,
            max_vcpus: 8,
            root_level: Level::L4,
            slot_zap_all: false,
            generation_base: 0,
            bugs: BugSet::NONE,
        })
    }
}

/// Why a VM could not be built.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum VmError {
    /// The SPTE format or host CPU is unusable.
    #[error(transparent)]
    Spte(#[from] SpteConfigError),
    /// The memslot configuration is unusable.
    #[error(transparent)]
    Memslots(#[from] crate::memslot::ConfigError),
    /// The TDP MMU configuration is unusable, or a vCPU could not be added.
    #[error(transparent)]
    Tdp(#[from] TdpError),
}

/// The state shared by a VM and its vCPUs.
pub(crate) struct VmInner<H: Host> {
    pub(crate) memslots: Memslots,
    pub(crate) mmu: TdpMmu<H>,
    pub(crate) policy: MmioCachingPolicy,
    pub(crate) bugs: BugSet,
    /// The VMM's own memslot reader (host invalidations map host addresses to gfns).
    vmm_reader: ReaderId,
    /// Serialises memslot updates, `zap_all_fast` and the start of host invalidations (KVM's
    /// `slots_lock` and `mn_invalidate_lock` roles for what this VM object does).
    vmm_lock: crate::sync::Mutex<()>,
    /// Host invalidations begun and not ended (KVM `mn_active_invalidate_count`). A memslot update
    /// waits for it to reach 0 under `vmm_lock`, so an invalidation's gfn ranges, computed from
    /// the memslots when it began, stay right until it ends (a slot cannot move meanwhile).
    mn_active: crate::sync::AtomicU32,
}

/// A VM. Cheap to clone (shared).
pub struct Vm<H: Host> {
    inner: Arc<VmInner<H>>,
}

impl<H: Host> Clone for Vm<H> {
    fn clone(&self) -> Self {
        Vm { inner: self.inner.clone() }
    }
}

/// The MMU's side of the memslot protocol (KVM `kvm_arch_flush_shadow_memslot` and
/// `kvm_arch_memslots_updated`).
struct MmuHooks<'a, H: Host> {
    mmu: &'a TdpMmu<H>,
    nr_as: u16,
}

impl<H: Host> MemslotHooks for MmuHooks<'_, H> {
    fn flush_slot(&self, old: &Memslot) {
        if self.mmu.config().slot_zap_all {
            self.mmu.zap_all_fast();
        } else {
            self.mmu.zap_gfn_range(old.as_id(), old.base_gfn(), old.end_gfn());
        }
    }

    fn memslots_updated(&self, _as_id: AsId, new_gen: Generation) {
        // KVM `kvm_mmu_invalidate_mmio_sptes`: on a wrap of the MMIO generation bits (address
        // space modifier stripped), no MMIO SPTE may survive, or an old one could match again.
        if new_gen.is_mmio_wrap(self.nr_as) {
            self.mmu.stats.mmio_gen_wraps.add(1);
            self.mmu.zap_all_fast();
        }
    }
}

impl<H: Host> Vm<H> {
    /// Builds a VM on `host`.
    pub fn new(cfg: VmConfig, host: Arc<H>) -> Result<Self, VmError> {
        let format = SpteFormat::new(cfg.format, cfg.host_cpu.phys_bits())?;
        let policy =
            MmioCachingPolicy::for_format(cfg.mmio_caching, cfg.host_cpu, cfg.format, cfg.bugs);
        let codec = policy.vm_codec();
        let mcfg = MemslotsConfig {
            nr_address_spaces: cfg.nr_address_spaces,
            // TDP: the MMU maps up to the host's MAXPHYADDR (facts §5.3, arch prepare).
            max_gpa_bits: cfg.host_cpu.phys_bits(),
            max_readers: cfg.max_vcpus + 1,
            bugs: cfg.bugs,
            generation_base: cfg.generation_base,
            ..MemslotsConfig::default()
        };
        let max_gfn = Gfn(mcfg.max_gfn());
        let memslots = Memslots::try_new(mcfg)?;
        let vmm_reader = memslots.register_reader().map_err(|_| TdpError::TooManyVcpus(0))?;
        let mmu = TdpMmu::new(
            host,
            TdpConfig {
                format,
                codec,
                root_level: cfg.root_level,
                max_gfn,
                slot_zap_all: cfg.slot_zap_all,
                bugs: cfg.bugs,
                max_vcpus: cfg.max_vcpus,
            },
        )?;
        Ok(Vm {
            inner: Arc::new(VmInner {
                memslots,
                mmu,
                policy,
                bugs: cfg.bugs,
                vmm_reader,
                vmm_lock: crate::sync::Mutex::new(()),
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
        let inner = &*self.inner;
        let _serial = inner.vmm_lock.lock();
        // KVM's swap waits until no host invalidation is in flight; holding `vmm_lock` keeps new
        // ones from starting until the update is done.
        while inner.mn_active.load(crate::sync::Ordering::Acquire) != 0 {
            crate::sync::relax();
        }
        let hooks = MmuHooks { mmu: &inner.mmu, nr_as: inner.memslots.nr_address_spaces() };
        let change = inner.memslots.set_memory_region(r, &hooks)?;
        if change == MemslotChange::FlagsOnly
            && r.flags & crate::memslot::KVM_MEM_LOG_DIRTY_PAGES != 0
        {
            // Dirty logging starts: drop huge and writable mappings so writes fault and pages
            // are 4 KiB (KVM write-protects or splits them in `kvm_mmu_slot_apply_flags`).
            let (as_id, _) = crate::types::SlotId::split(r.slot);
            let start = Gfn(r.guest_phys_addr >> PAGE_SHIFT);
            let end = Gfn((r.guest_phys_addr + r.memory_size) >> PAGE_SHIFT);
            inner.mmu.zap_gfn_range(as_id, start, end);
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
        let _g = self.inner.vmm_lock.lock();
        self.inner.mmu.zap_all_fast();
    }

    /// Host invalidation start for host addresses `[start, end)` (KVM's MMU notifier
    /// `invalidate_range_start`): every memslot mapping them, in every address space, is zapped
    /// for the overlap, and faults there retry until [`Self::invalidate_hva_range_end`].
    pub fn invalidate_hva_range_begin(&self, start: Hva, end: Hva) {
        let inner = &*self.inner;
        let mut ranges = Vec::new();
        let _serial = inner.vmm_lock.lock();
        inner.mn_active.fetch_add(1, crate::sync::Ordering::AcqRel);
        {
            let guard = inner.memslots.read(inner.vmm_reader);
            for as_id in 0..inner.memslots.nr_address_spaces() {
                for s in guard.set(AsId(as_id)).iter() {
                    let s_start = s.userspace_addr().raw();
                    let s_end = s_start + (s.npages() << PAGE_SHIFT);
                    let lo = start.raw().max(s_start);
                    let hi = end.raw().min(s_end);
                    if lo < hi {
                        let g0 = s.base_gfn().raw() + ((lo - s_start) >> PAGE_SHIFT);
                        let g1 = s.base_gfn().raw() + ((hi - s_start + 0xfff) >> PAGE_SHIFT);
                        ranges.push((AsId(as_id), Gfn(g0), Gfn(g1)));
                    }
                }
            }
        }
        inner.mmu.invalidate_begin(&ranges);
    }

    /// Host invalidation end: pairs with one [`Self::invalidate_hva_range_begin`].
    pub fn invalidate_hva_range_end(&self) {
        self.inner.mmu.invalidate_end();
        let old = self.inner.mn_active.fetch_sub(1, crate::sync::Ordering::AcqRel);
        debug_assert!(old > 0, "invalidate end without begin");
    }

    /// The memslots (generation, lookups).
    pub fn memslots(&self) -> &Memslots {
        &self.inner.memslots
    }

    /// The TDP MMU (stats, roots).
    pub fn mmu(&self) -> &TdpMmu<H> {
        &self.inner.mmu
    }

    /// The effective MMIO caching state and, when off, why (like reading `kvm.mmio_caching`).
    pub fn mmio_caching(&self) -> &MmioCachingPolicy {
        &self.inner.policy
    }

    /// Whether this VM installs MMIO SPTEs (the per-VM value, facts §1.4).
    pub fn mmio_caching_enabled(&self) -> bool {
        self.inner.mmu.config().codec.enabled()
    }

    /// A snapshot of the VM-wide counters.
    pub fn stats(&self) -> VmStatsSnapshot {
        self.inner.mmu.stats.snapshot()
    }

    /// Frees table pages whose grace period has passed.
    pub fn reclaim(&self) {
        self.inner.mmu.reclaim();
    }
}
