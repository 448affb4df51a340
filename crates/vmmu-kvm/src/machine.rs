//! One scenario's VM on `/dev/kvm`: creation, the per-step ioctls, and the run loop.
//!
//! Invariants:
//! - the VM (and its vCPUs) is dropped before the buffers its memslots point into (field order);
//! - `slots` mirrors the memslots KVM accepted in address space 0 (updated only on success), so
//!   an access through a slot beyond its buffer is refused before the guest makes it (except a
//!   store through a read-only slot, which exits as MMIO and touches no host memory);
//! - a vCPU runs only inside [`KvmMachine::run_vcpu`] (for a scenario access or one of the
//!   backend's CPL0 routines), on this thread, while no host-side copy of guest memory is in
//!   progress;
//! - with guest paging, the host writes the page-table pool only before the first vCPU runs;
//!   afterwards every change to the guest's tables is a guest store at CPL0 (which KVM's shadow
//!   MMU sees as a write to a write-tracked guest table), followed by INVLPG on every vCPU, and
//!   every CR3 load after the first is the guest's own MOV CR3. `GuestPaging::tables` is the
//!   host's copy, used to place new tables and to refuse accesses beyond a slot's buffer.

use crate::code::{self, Invlpg, EXCEPTION_PORT, SYNC_GPA};
use crate::errno;
use crate::guest::{self, CodeMode, Cpl, CODE, KSTACK_TOP, OWN_SIZE, OWN_SLOT};
use crate::mapping::Mapping;
use crate::paging::{self, Tables, POOL_GPA, POOL_SIZE, POOL_SLOT, REPORT_GPA};
use kvm_bindings::{
    kvm_userspace_memory_region, KVM_CAP_MULTI_ADDRESS_SPACE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use std::collections::BTreeMap;
use vmmu_scenario::{
    AccessKind, BackendError, ClearDirtyLogOp, Cr3Op, DirtyLogMode, DirtyLogOp, DirtyLogResult,
    HostReadOp, HostWriteOp, Machine, MapOp, MemDecl, MemId, Paging, ReadExit, ReadOp, Scenario,
    ShadowCounters, SlotOp, SlotResult, Start, UnmapOp, Width, WriteExit, WriteOp,
};

/// What went wrong in the KVM backend.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// An ioctl the backend needs (not one the scenario asked for) failed.
    #[error("{what} failed: {errno}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The errno name.
        errno: String,
    },
    /// A host buffer could not be mapped.
    #[error("cannot map a host buffer of {size:#x} bytes: {source}")]
    Mmap {
        /// Its size.
        size: u64,
        /// Why.
        source: std::io::Error,
    },
    /// A slot request KVM could accept would make it allocate more kernel memory than this
    /// host can give (not sent: the kernel's OOM killer would end processes of the host).
    #[error(
        "not sent to KVM: with this slot KVM's per-slot metadata (reverse maps of 8 bytes per \
         4 KiB page under shadow paging, large-page counts, dirty bitmaps) would take about \
         {need_mib} MiB of kernel memory, more than three quarters of this host's available \
         memory ({available_mib} MiB); KVM would run the host out of memory"
    )]
    KernelMemory {
        /// What the live slots and this one would take, in MiB.
        need_mib: u64,
        /// `MemAvailable` at the start, in MiB.
        available_mib: u64,
    },
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed with {errno} (a guest access through memory the host cannot map?)")]
    Run {
        /// The errno name.
        errno: String,
    },
    /// The guest took an exception.
    #[error("the guest took exception vector {vector} at rip {rip:#x} (error code {error_code:#x}, cr2 {cr2:#x})")]
    Exception {
        /// The vector.
        vector: u8,
        /// The faulting instruction.
        rip: u64,
        /// The error code (0 if the vector has none).
        error_code: u64,
        /// CR2 (the faulting address for a page fault).
        cr2: u64,
    },
    /// The vCPU stopped with an exit the access code never causes.
    #[error("unexpected vCPU exit: {0}")]
    Exit(String),
    /// The MMIO exit does not match the access.
    #[error("MMIO exit at {gpa:#x} len {len} does not match the access at {want_gpa:#x} size {want_len}")]
    MmioMismatch {
        /// Exit address.
        gpa: u64,
        /// Exit length.
        len: usize,
        /// Access address.
        want_gpa: u64,
        /// Access size.
        want_len: u32,
    },
    /// The access would go through a slot to host memory that is not one of its buffers.
    #[error("guest access at {gpa:#x} goes through slot {slot} to host address {hva:#x}, outside its buffer; scenarios must not access that part of a slot")]
    Unbacked {
        /// The address.
        gpa: u64,
        /// The slot id.
        slot: u32,
        /// The host address it maps to.
        hva: u64,
    },
    /// The guest took a page fault outside a scenario access (in the backend's own code).
    #[error("the guest took a page fault at {gva:#x} (error code {error:#x}) in the backend's own CPL0 code")]
    OwnPageFault {
        /// CR2.
        gva: u64,
        /// The error code.
        error: u64,
    },
    /// A slot request built in code (the parser refuses it) would take what the backend's own
    /// guest code uses: its slots, or the guest-physical range below 8 MiB where its code,
    /// stack, tables and MMIO sync addresses live.
    #[error("the slot request uses {0}, which the KVM backend keeps for its own guest code")]
    Reserved(vmmu_scenario::ReservedUse),
    /// The page-table pool is full.
    #[error(transparent)]
    Pool(#[from] paging::PoolExhausted),
    /// The VM needs more vCPUs than this kernel allows.
    #[error("the scenario needs {want} vCPUs; this kernel allows {max}")]
    TooManyVcpus {
        /// Wanted.
        want: u32,
        /// KVM_CAP_MAX_VCPUS.
        max: i32,
    },
}

impl From<KvmError> for BackendError {
    fn from(e: KvmError) -> Self {
        BackendError::Other(Box::new(e))
    }
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::Ioctl { what, errno: errno::name(e.errno()) }
}

/// CR0.PG.
const CR0_PG: u64 = 1 << 31;

/// Why `paging=pae` is skipped on a kernel that keeps CR0.PG clear outside long mode (kvm-pvm
/// does: it logs that it "supports paging only in long mode", and a guest `mov cr0` that sets
/// PG with EFER.LME clear takes #GP).
pub(crate) const PAE_UNSUPPORTED: &str = "paging=pae: this kernel's KVM does not run 32-bit PAE \
    paging (KVM_SET_SREGS left CR0.PG clear with EFER.LME clear; kvm-pvm supports guest paging \
    only in long mode)";

/// What this kernel's KVM offers (for messages and test output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmInfo {
    /// `KVM_CAP_NR_MEMSLOTS`.
    pub nr_memslots: i32,
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`.
    pub address_spaces: i32,
    /// The MAXPHYADDR KVM offers a guest (supported CPUID 0x80000008 EAX bits 7:0; 36 if that
    /// leaf is missing): the guest's page tables can name guest-physical addresses below
    /// `2^guest_phys_bits` only.
    pub guest_phys_bits: u8,
}

/// Whether `/dev/kvm` can be opened and a VM created; `Err` says why not.
pub fn probe() -> Result<KvmInfo, String> {
    let (kvm, vm) = open()?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("/dev/kvm not usable: KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let guest_phys_bits = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(36, |e| (e.eax & 0xff) as u8);
    Ok(KvmInfo {
        nr_memslots: vm.check_extension_int(Cap::NrMemslots),
        address_spaces: vm.check_extension_raw(KVM_CAP_MULTI_ADDRESS_SPACE.into()),
        guest_phys_bits,
    })
}

fn open() -> Result<(Kvm, VmFd), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm not usable: cannot open it: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("/dev/kvm not usable: KVM_CREATE_VM: {e}"))?;
    Ok((kvm, vm))
}

/// One slot KVM accepted in address space 0.
#[derive(Debug, Clone, Copy)]
struct SlotState {
    gpa: u64,
    size: u64,
    uaddr: u64,
    /// `KVM_MEM_READONLY`: a guest store through the slot exits as MMIO without touching the
    /// host address (KVM refuses the write fault before it looks the address up).
    readonly: bool,
    /// The memory a guest access through the slot must stay inside.
    backing: Backing,
}

/// What host memory a slot is meant to map: a guest access through it must land inside it.
#[derive(Clone, Copy, Debug)]
enum Backing {
    /// The backend's own memory (code, sync page, stacks).
    Own,
    /// The page-table pool of a paging scenario.
    Pool,
    /// The scenario buffer its `mem=` names (`scenarios.md`: an access through the part of a
    /// slot past the end of its buffer is a backend failure, even where another buffer or
    /// nothing lies there).
    Buffer(MemId),
    /// No buffer named (the parser allows that for a delete only).
    Unnamed,
}

/// A running scenario.
pub struct KvmMachine {
    // Field order is drop order: vCPUs and VM before the memory they use.
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    own: Mapping,
    bufs: Vec<Mapping>,
    _kvm: Kvm,
    /// Accepted AS0 slots by id (including the backend's own).
    slots: BTreeMap<u16, SlotState>,
    /// Guest paging (`paging=4level` or `pae`); `None` for version-1 scenarios.
    paging: Option<GuestPaging>,
    /// Sizes of the accepted slots of every address space, by KVM's `slot` number (the size of
    /// the bitmap `KVM_GET_DIRTY_LOG` writes).
    sizes: BTreeMap<u32, u64>,
    /// The kernel memory KVM took for each accepted slot, by KVM's `slot` number, and what the
    /// host has ([`crate::replay::TraceVm::host_memory`]): see [`KernelMemory`].
    kernel_memory: KernelMemory,
}

/// KVM's kernel memory for the slots of a run: a scenario may legally make a slot of up to
/// 2^31 - 1 pages over a 4 KiB buffer (a slot may reach past its buffer), for which a
/// shadow-paging KVM allocates about 16 GiB of reverse maps at once, in kernel memory no
/// `ulimit` bounds (such a run had the kernel's OOM killer end other processes of the host). A
/// request KVM would accept by its shape is not sent when the live slots and it would take more
/// than three quarters of the host's available memory.
struct KernelMemory {
    /// `(reverse maps allocated up front, MemAvailable in bytes)`; `None`: unknown, no check.
    host: Option<(bool, u64)>,
    /// [`user_address_limit`].
    user_limit: u64,
    /// The accepted slots, by KVM's `slot` number.
    live: BTreeMap<u32, LiveSlot>,
}

/// A slot KVM accepted, as [`KernelMemory`] needs it.
struct LiveSlot {
    /// The kernel memory KVM took for it.
    bytes: u64,
    gpa: u64,
    size: u64,
    uaddr: u64,
    flags: vmmu_scenario::SlotFlags,
}

/// KVM's `KVM_MEM_MAX_NR_PAGES`: the most pages a slot may have.
const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;

/// x86 KVM's `KVM_USER_MEM_SLOTS`: slot ids at or above it are refused.
const KVM_USER_MEM_SLOTS: u32 = 32764;

/// The end of the user address range x86-64 `access_ok` allows: `TASK_SIZE_MAX` from Linux 6.12
/// on (47 bits with 4-level paging, 56 with 5-level paging, taken where the CPU has `la57`, even
/// if the kernel runs 4-level, which only makes the check stricter); before 6.12, or when the
/// release cannot be read, 2^63, since some earlier kernels (with LAM support) checked only bit
/// 63, and a limit too high only counts requests KVM would refuse.
fn user_address_limit() -> u64 {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let la57 = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "la57"))
    });
    user_address_limit_of(&release, la57)
}

/// [`user_address_limit`] for kernel release `release` (as `uname -r` prints it).
fn user_address_limit_of(release: &str, la57: bool) -> u64 {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let mut number = || parts.next().and_then(|p| p.parse::<u32>().ok());
    let version = number().zip(number());
    match version {
        Some(v) if v >= (6, 12) && la57 => (1 << 56) - 4096,
        Some(v) if v >= (6, 12) => (1 << 47) - 4096,
        _ => 1 << 63,
    }
}

impl KernelMemory {
    /// What KVM would allocate if it accepted `op` with host address `uaddr`; 0 for a delete
    /// and for a request KVM refuses by its shape before allocating anything (address space 2
    /// and up, a reserved id, misaligned, more than [`KVM_MEM_MAX_NR_PAGES`] pages, a host range
    /// past [`user_address_limit`], a guest range past 2^52, a change of a live slot's size, host
    /// address or read-only flag). A flags-only change of a live slot keeps its metadata (x86
    /// `kvm_arch_prepare_memory_region` copies `old->arch`): only the dirty bitmaps are new when
    /// logging turns on; a request that changes nothing allocates nothing. Other refusals (an
    /// overlap) are not foreseen: such a request counts.
    fn need(&self, op: &SlotOp, uaddr: u64) -> u64 {
        let Some((rmaps, _)) = self.host else { return 0 };
        let shape_ok = op.size > 0
            && op.as_id < 2
            && u32::from(op.id) < KVM_USER_MEM_SLOTS
            && (uaddr | op.size | op.gpa) % 4096 == 0
            && op.size / 4096 <= KVM_MEM_MAX_NR_PAGES
            && uaddr.checked_add(op.size).is_some_and(|end| end <= self.user_limit)
            && op.gpa.checked_add(op.size).is_some_and(|end| end <= 1 << 52);
        if !shape_ok {
            return 0;
        }
        let full = crate::replay::TraceVm::slot_metadata(op.size, op.flags.dirty_log, rmaps);
        match self.live.get(&op.kvm_slot()) {
            // KVM_MR_CREATE.
            None => full,
            Some(old)
                if old.uaddr != uaddr
                    || old.size != op.size
                    || old.flags.readonly != op.flags.readonly =>
            {
                0
            }
            // KVM_MR_MOVE: new metadata while the old is live.
            Some(old) if old.gpa != op.gpa => full,
            // KVM_MR_FLAGS_ONLY turning logging on: the bitmaps.
            Some(old) if op.flags.dirty_log && !old.flags.dirty_log => {
                full - crate::replay::TraceVm::slot_metadata(op.size, false, rmaps)
            }
            Some(_) => 0,
        }
    }

    /// Whether a request that needs `need` may go to KVM: KVM allocates a changed slot's new
    /// metadata before it frees the old, so every live slot counts.
    fn admit(&self, need: u64) -> Result<(), KvmError> {
        let Some((_, available)) = self.host else { return Ok(()) };
        let total = self.live.values().map(|s| s.bytes).sum::<u64>().saturating_add(need);
        if need > 0 && total > available / 4 * 3 {
            return Err(KvmError::KernelMemory {
                need_mib: total >> 20,
                available_mib: available >> 20,
            });
        }
        Ok(())
    }

    /// KVM accepted `op` with host address `uaddr`: what it holds for the slot replaces what
    /// it held.
    fn accepted(&mut self, op: &SlotOp, uaddr: u64) {
        match self.host {
            Some((rmaps, _)) if op.size > 0 => {
                let bytes =
                    crate::replay::TraceVm::slot_metadata(op.size, op.flags.dirty_log, rmaps);
                let (gpa, size, flags) = (op.gpa, op.size, op.flags);
                self.live.insert(op.kvm_slot(), LiveSlot { bytes, gpa, size, uaddr, flags });
            }
            _ => {
                self.live.remove(&op.kvm_slot());
            }
        }
    }
}

/// The state of a paging guest that the host keeps.
struct GuestPaging {
    /// The page-table pool (slot [`POOL_SLOT`]); dropped after the VM like the other buffers.
    pool: Mapping,
    /// The host's model of the guest's tables (the guest makes every change itself).
    tables: Tables,
    /// The guest's code: 32-bit protected mode under `paging=pae`, else 64-bit long mode.
    code: CodeMode,
    /// The space each vCPU has loaded.
    space: Vec<u8>,
    /// The privilege level each vCPU is at now (CPL0 after a CPL0 routine or a page fault).
    cpl: Vec<Cpl>,
}

/// Creates the VM for `scenario`, or skips it when the kernel cannot honour its `vm` line.
pub fn start(scenario: &Scenario) -> Result<Start, BackendError> {
    let (kvm, vm) = open().map_err(BackendError::Unavailable)?;
    if scenario.vm.address_spaces == 2 {
        let n = vm.check_extension_raw(KVM_CAP_MULTI_ADDRESS_SPACE.into());
        if n < 2 {
            return Ok(Start::Skip(format!(
                "address_spaces=2 needs KVM_CAP_MULTI_ADDRESS_SPACE >= 2; this kernel reports {n}"
            )));
        }
    }
    if scenario.vm.dirty_log == DirtyLogMode::Manual {
        if let Err(why) = crate::dirty::enable_manual(&vm, crate::dirty::Initially::Clean) {
            return Ok(Start::Skip(format!("dirty_log=manual: {why}")));
        }
    }
    let max = vm.check_extension_int(Cap::MaxVcpus);
    if i64::from(scenario.vm.vcpus) > i64::from(max) {
        return Err(KvmError::TooManyVcpus { want: scenario.vm.vcpus, max }.into());
    }
    let own = Mapping::new(OWN_SIZE)
        .map_err(|source| KvmError::Mmap { size: OWN_SIZE as u64, source })?;
    for (gpa, bytes) in guest::image() {
        own.write_bytes(gpa as usize, &bytes);
    }
    let mode = scenario.vm.paging;
    let paging = mode != Paging::Off;
    let pae = mode == Paging::Pae;
    // #PF goes to the guest's own handler, which reports CR2 and the error code.
    if pae {
        for (gpa, bytes) in guest::image32(paging::PF_HANDLER) {
            own.write_bytes(gpa as usize, &bytes);
        }
        own.write_bytes(paging::PF_HANDLER as usize, &code::pf_handler32(REPORT_GPA));
    } else if paging {
        own.write_bytes(guest::IDT as usize + 14 * 16, &guest::gate(paging::PF_HANDLER));
        own.write_bytes(paging::PF_HANDLER as usize, &code::pf_handler(REPORT_GPA));
    }
    let region = kvm_userspace_memory_region {
        slot: OWN_SLOT,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: OWN_SIZE as u64,
        userspace_addr: own.addr(),
    };
    // SAFETY: the region is the backend's own mapping, which outlives the VM (field order of
    // KvmMachine) and which nothing else in this process uses.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(ioctl("KVM_SET_USER_MEMORY_REGION (own)"))?;
    let pool = if paging {
        let pool = Mapping::new(POOL_SIZE)
            .map_err(|source| KvmError::Mmap { size: POOL_SIZE as u64, source })?;
        for (off, bytes) in paging::pool_image(mode) {
            pool.write_bytes(off as usize, &bytes);
        }
        let region = kvm_userspace_memory_region {
            slot: POOL_SLOT,
            flags: 0,
            guest_phys_addr: POOL_GPA,
            memory_size: POOL_SIZE as u64,
            userspace_addr: pool.addr(),
        };
        // SAFETY: the region is the backend's own pool mapping, which outlives the VM (it is
        // dropped with KvmMachine::paging, after the VM) and which nothing else in this process
        // uses.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION (page tables)"))?;
        Some(pool)
    } else {
        None
    };
    let cpuid =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for i in 0..scenario.vm.vcpus {
        let v = vm.create_vcpu(u64::from(i)).map_err(ioctl("KVM_CREATE_VCPU"))?;
        v.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let s = v.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        // With paging, the initial CR3 is space 0, as a loader leaves it; every later load is
        // the guest's own.
        let s = if pae {
            guest::sregs32(s, paging::root(0))
        } else if paging {
            kvm_bindings::kvm_sregs { cr3: paging::root(0), ..guest::sregs(s) }
        } else {
            guest::sregs(s)
        };
        v.set_sregs(&s).map_err(ioctl("KVM_SET_SREGS"))?;
        if pae {
            let now = v.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            if now.cr0 & CR0_PG == 0 {
                return Ok(Start::Skip(PAE_UNSUPPORTED.into()));
            }
        }
        vcpus.push(v);
    }
    let mut slots = BTreeMap::new();
    let own_id = u16::try_from(OWN_SLOT).unwrap_or(u16::MAX);
    slots.insert(
        own_id,
        SlotState {
            gpa: 0,
            size: OWN_SIZE as u64,
            uaddr: own.addr(),
            readonly: false,
            backing: Backing::Own,
        },
    );
    let paging = pool.map(|pool| {
        let pool_id = u16::try_from(POOL_SLOT).unwrap_or(u16::MAX);
        slots.insert(
            pool_id,
            SlotState {
                gpa: POOL_GPA,
                size: POOL_SIZE as u64,
                uaddr: pool.addr(),
                readonly: false,
                backing: Backing::Pool,
            },
        );
        let n = vcpus.len();
        let tables = Tables::new(mode);
        let code = if pae { CodeMode::Protected32 } else { CodeMode::Long64 };
        GuestPaging { pool, tables, code, space: vec![0; n], cpl: vec![Cpl::User; n] }
    });
    let bufs = Vec::new();
    let sizes = BTreeMap::from([(OWN_SLOT, OWN_SIZE as u64)]);
    let kernel_memory = KernelMemory {
        host: crate::replay::TraceVm::host_memory(),
        user_limit: user_address_limit(),
        live: BTreeMap::new(),
    };
    let m = KvmMachine { vcpus, vm, own, bufs, _kvm: kvm, slots, paging, sizes, kernel_memory };
    Ok(Start::Run(Box::new(m)))
}

/// How a run of the guest ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The code reached its sync store.
    Sync,
    /// The guest's #PF handler reported a page fault.
    PageFault {
        /// CR2.
        gva: u64,
        /// The error code.
        error: u64,
    },
}

/// What one access did besides its final register state.
#[derive(Debug, Clone, Copy)]
struct Mmio {
    gpa: u64,
    len: u32,
    data: u64,
}

fn le(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0, |acc, b| (acc << 8) | u64::from(*b))
}

/// Exception vectors that push an error code.
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

impl KvmMachine {
    fn buffer(&self, id: MemId) -> &Mapping {
        // The parser only lets declared buffers be referenced, and `mem` runs before any use.
        &self.bufs[id.0]
    }

    /// Refuses an access that would reach host memory outside the memory its slot is meant to
    /// map (a scenario slot's own buffer, [`Backing`]). A store through a read-only slot reaches
    /// no host memory (it exits as MMIO), so it passes.
    fn check_backed(&self, gpa: u64, n: u64, kind: AccessKind) -> Result<(), KvmError> {
        // One slot holds the whole access only if it does not cross a page (`slot`'s SAFETY).
        debug_assert!(n.is_power_of_two() && n <= 8 && gpa % n == 0, "{gpa:#x}+{n}");
        let hit = self.slots.iter().find(|(_, s)| gpa >= s.gpa && gpa - s.gpa < s.size);
        if let Some((&id, s)) = hit.filter(|(_, s)| !(kind.is_write() && s.readonly)) {
            let hva = s.uaddr.wrapping_add(gpa - s.gpa);
            // A scenario's slot must lead into its own buffer (never into another buffer, nor the
            // backend's own tables and code), the backend's slots into its own memory.
            let backed = match s.backing {
                Backing::Own => self.own.contains(hva, n),
                Backing::Pool => self.paging.as_ref().is_some_and(|p| p.pool.contains(hva, n)),
                Backing::Buffer(m) => self.bufs.get(m.0).is_some_and(|b| b.contains(hva, n)),
                Backing::Unnamed => false,
            };
            if !backed {
                return Err(KvmError::Unbacked { gpa, slot: u32::from(id), hva });
            }
        }
        Ok(())
    }

    /// Puts vCPU `vcpu` at `cpl` through `KVM_SET_SREGS` (segments only: CR3 and the control
    /// registers stay as the guest left them). Only paging guests enter CPL0.
    fn set_cpl(&mut self, vcpu: u32, cpl: Cpl) -> Result<(), KvmError> {
        let Some(p) = &mut self.paging else { return Ok(()) };
        let i = vcpu as usize;
        if p.cpl[i] == cpl {
            return Ok(());
        }
        let v = &self.vcpus[i];
        let s = v.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let s = guest::with_cpl(s, cpl, p.code);
        v.set_sregs(&s).map_err(ioctl("KVM_SET_SREGS"))?;
        p.cpl[i] = cpl;
        Ok(())
    }

    /// Runs one scenario access (`code`, at CPL3) on vCPU `vcpu`. `gpa` is where the access goes
    /// if the host knows it (it is refused if that is beyond a slot's buffer, and an MMIO exit
    /// must name it); with guest paging it is the translation of the host's model (`None` when
    /// the access faults), and the exit's address is KVM's. Returns how the run ended, RAX and
    /// the MMIO exit, if any. MMIO reads are answered with `reply`.
    fn run_access(
        &mut self,
        vcpu: u32,
        code: &[u8],
        gpa: Option<u64>,
        kind: AccessKind,
        width: Width,
        reply: u64,
    ) -> Result<(End, u64, Option<Mmio>), KvmError> {
        if let Some(gpa) = gpa {
            self.check_backed(gpa, u64::from(width.bytes()), kind)?;
        }
        self.set_cpl(vcpu, Cpl::User)?;
        self.own.write_bytes(CODE as usize, code);
        self.vcpus[vcpu as usize].set_regs(&guest::regs()).map_err(ioctl("KVM_SET_REGS"))?;
        let want = if self.paging.is_some() { None } else { gpa };
        let (end, mmio) = self.run_vcpu(vcpu, Some((want, width)), reply)?;
        let regs = self.vcpus[vcpu as usize].get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        Ok((end, regs.rax, mmio))
    }

    /// Runs `code` at CPL0 on vCPU `vcpu` (paging guests: page-table writes, INVLPG, MOV CR3)
    /// until its sync store; it may make no other exit.
    fn run_kernel(&mut self, vcpu: u32, code: &[u8]) -> Result<(), KvmError> {
        self.set_cpl(vcpu, Cpl::Kernel)?;
        self.own.write_bytes(CODE as usize, code);
        let v = &self.vcpus[vcpu as usize];
        v.set_regs(&guest::kernel_regs()).map_err(ioctl("KVM_SET_REGS"))?;
        match self.run_vcpu(vcpu, None, 0)? {
            (End::Sync, _) => Ok(()),
            (End::PageFault { gva, error }, _) => Err(KvmError::OwnPageFault { gva, error }),
        }
    }

    /// Runs vCPU `vcpu` from the registers set until the sync store or a page fault the guest's
    /// handler reports. `access` is the scenario access the code makes (its GPA when it must
    /// match the exit, its width); without one, an MMIO exit is a failure.
    fn run_vcpu(
        &mut self,
        vcpu: u32,
        access: Option<(Option<u64>, Width)>,
        reply: u64,
    ) -> Result<(End, Option<Mmio>), KvmError> {
        let paging = self.paging.is_some();
        let v = &mut self.vcpus[vcpu as usize];
        let mut mmio: Option<Mmio> = None;
        let check = |mmio: &Option<Mmio>, addr: u64, len: usize| {
            let Some((want, width)) = access else {
                return Err(KvmError::Exit(format!(
                    "KVM_EXIT_MMIO at {addr:#x} len {len} in the backend's own CPL0 code"
                )));
            };
            if mmio.is_some() || want.is_some_and(|g| g != addr) || len != width.bytes() as usize {
                return Err(KvmError::MmioMismatch {
                    gpa: addr,
                    len,
                    want_gpa: want.unwrap_or(addr),
                    want_len: width.bytes(),
                });
            }
            Ok(width)
        };
        let exception_port = u16::from(EXCEPTION_PORT);
        let mut exception = None;
        let mut cr2 = None;
        let end = loop {
            let exit = match v.run() {
                Ok(e) => e,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(KvmError::Run { errno: errno::name(e.errno()) }),
            };
            match exit {
                VcpuExit::MmioWrite(SYNC_GPA, _) => break End::Sync,
                VcpuExit::MmioWrite(REPORT_GPA, data) if paging => cr2 = Some(le(data)),
                VcpuExit::MmioWrite(a, data) if paging && a == REPORT_GPA + 8 => {
                    let gva = cr2.ok_or_else(|| {
                        KvmError::Exit("the #PF handler reported an error code without CR2".into())
                    })?;
                    break End::PageFault { gva, error: le(data) };
                }
                VcpuExit::IoOut(p, data) if p == exception_port => {
                    exception = Some(data.first().copied().unwrap_or(0xff));
                    break End::Sync;
                }
                VcpuExit::MmioRead(addr, data) => {
                    let width = check(&mmio, addr, data.len())?;
                    let bytes = reply.to_le_bytes();
                    let n = data.len().min(8);
                    data[..n].copy_from_slice(&bytes[..n]);
                    let len = width.bytes();
                    mmio = Some(Mmio { gpa: addr, len, data: reply & width.mask() });
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let width = check(&mmio, addr, data.len())?;
                    mmio = Some(Mmio { gpa: addr, len: width.bytes(), data: le(data) });
                }
                VcpuExit::InternalError => {
                    let run = v.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active member of the exit union.
                    let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                    return Err(KvmError::Exit(format!(
                        "KVM_EXIT_INTERNAL_ERROR (suberror {sub})"
                    )));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Err(KvmError::Exit(format!(
                        "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
                    )))
                }
                VcpuExit::Shutdown => {
                    return Err(KvmError::Exit("KVM_EXIT_SHUTDOWN (triple fault?)".into()))
                }
                other => return Err(KvmError::Exit(format!("{other:?}"))),
            }
        };
        if let Some(p) = &mut self.paging {
            // An exception leaves the vCPU in its CPL0 handler.
            if exception.is_some() || matches!(end, End::PageFault { .. }) {
                p.cpl[vcpu as usize] = Cpl::Kernel;
            }
        }
        if let Some(vector) = exception {
            return Err(self.exception(vcpu, vector));
        }
        Ok((end, mmio))
    }

    /// Describes an exception the guest reported through its stub.
    fn exception(&self, vcpu: u32, vector: u8) -> KvmError {
        let v = &self.vcpus[vcpu as usize];
        let cr2 = v.get_sregs().map(|s| s.cr2).unwrap_or(0);
        // The CPU pushed [error code,] RIP, CS, RFLAGS, RSP, SS on the kernel stack (8-byte
        // slots; 4-byte ones in the 32-bit PAE guest, which came from CPL3, so SS:ESP too).
        let w: u64 = if self.pae() { 4 } else { 8 };
        let frame = if has_error_code(vector) { 6 * w } else { 5 * w };
        let mut f = [0u8; 48];
        self.own.read_bytes((KSTACK_TOP - frame) as usize, &mut f[..frame as usize]);
        let word = |i: u64| le(&f[(i * w) as usize..((i + 1) * w) as usize]);
        let (error_code, rip) =
            if has_error_code(vector) { (word(0), word(1)) } else { (0, word(0)) };
        KvmError::Exception { vector, rip, error_code, cr2 }
    }
}

impl KvmMachine {
    /// Whether the guest is the 32-bit PAE one.
    fn pae(&self) -> bool {
        self.paging.as_ref().is_some_and(|p| p.code == CodeMode::Protected32)
    }

    fn guest_paging(&mut self) -> Result<&mut GuestPaging, BackendError> {
        self.paging.as_mut().ok_or_else(|| {
            BackendError::Failed("a paging step in a scenario without guest paging".into())
        })
    }

    /// The guest-physical address an access by `vcpu` to `addr` reaches (`None`: it faults).
    fn target(&self, vcpu: u32, addr: u64, kind: AccessKind) -> Option<u64> {
        match &self.paging {
            None => Some(addr),
            Some(p) => p.tables.translate(p.space[vcpu as usize], addr, kind),
        }
    }

    /// vCPU 0 makes the entry `writes` at CPL0 and invalidates the pages of `inv`, then enters
    /// once more (`settle`); every other vCPU then invalidates them too (a TLB shootdown).
    ///
    /// The settling entry pins down when vCPU 0 replaces a root its stores flooded: KVM loads
    /// the new root at vCPU 0's next VM entry, and whether one comes before the routine's sync
    /// exit depends on the host (its instruction emulator usually runs the rest of the routine,
    /// but a reschedule in between makes an entry there; CI saw it). With one more entry the
    /// root is always replaced within the step, so KVM's shadow counters after the step do not
    /// depend on timing (the simulated machine makes the same entry).
    fn shootdown(&mut self, writes: &[(u64, u64)], inv: Invlpg) -> Result<(), KvmError> {
        let kernel_writes = if self.pae() { code::kernel_writes32 } else { code::kernel_writes };
        self.run_kernel(0, &kernel_writes(writes, Some(inv), SYNC_GPA))?;
        self.run_kernel(0, &kernel_writes(&[], None, SYNC_GPA))?;
        let flush = kernel_writes(&[], Some(inv), SYNC_GPA);
        for v in 1..self.vcpus.len() as u32 {
            self.run_kernel(v, &flush)?;
        }
        Ok(())
    }
}

impl Machine for KvmMachine {
    fn shadow_counters(&self) -> Option<ShadowCounters> {
        let stats = crate::stats::vm_stats(&self.vm).ok()?;
        let get = |name: &str| stats.get(name).copied();
        Some(ShadowCounters {
            mmu_cache_miss: get("mmu_cache_miss")?,
            mmu_shadow_zapped: get("mmu_shadow_zapped")?,
            mmu_recycled: get("mmu_recycled")?,
            mmu_flooded: get("mmu_flooded")?,
        })
    }

    fn mem(&mut self, id: MemId, decl: &MemDecl) -> Result<(), BackendError> {
        debug_assert_eq!(id.0, self.bufs.len());
        let size = usize::try_from(decl.size).map_err(|_| KvmError::Mmap {
            size: decl.size,
            source: std::io::Error::other("larger than the address space"),
        })?;
        let m = Mapping::new(size).map_err(|source| KvmError::Mmap { size: decl.size, source })?;
        m.no_huge_pages().map_err(|source| KvmError::Mmap { size: decl.size, source })?;
        self.bufs.push(m);
        Ok(())
    }

    fn slot(&mut self, op: &SlotOp) -> Result<SlotResult, BackendError> {
        // Not only the parser's rule: the backend's own guest code (the closing sync store, the
        // #PF handler's report, its stack, code and tables) stores where no scenario slot may
        // be, and `check_backed` guards only the scenario's own accesses.
        if let Some(r) = op.reserved_use() {
            return Err(KvmError::Reserved(r).into());
        }
        let uaddr = match &op.mem {
            Some(r) => self.buffer(r.mem).addr().wrapping_add(r.offset),
            None => 0,
        };
        let need = self.kernel_memory.need(op, uaddr);
        self.kernel_memory.admit(need)?;
        let region = kvm_userspace_memory_region {
            slot: op.kvm_slot(),
            flags: op.flags.bits(),
            guest_phys_addr: op.gpa,
            memory_size: op.size,
            userspace_addr: uaddr,
        };
        // SAFETY: the request goes to KVM exactly as the scenario wrote it; KVM validates it.
        // Memory safety of this process does not depend on where it points: a slot can only make
        // the guest access host memory behind it, and the guest accesses slot memory only (1) in a
        // scenario access, which `check_backed` refuses unless its host address lies inside the
        // slot's own buffer (buffers live as long as the VM), with a PROT_NONE guard after each
        // buffer as a second line of defence (`check_backed` looks at the slot of the access's
        // first byte only: that is all of it because the parser makes every access naturally
        // aligned, so none crosses a page, and under guest paging it checks the gpa the backend's
        // model of the guest tables gives, which `paging::Tables` keeps equal to what KVM walks:
        // the tables are the backend's own, written only by it), or (2) in the backend's own code,
        // whose stores all go below 8 MiB in address space 0 (its own slots, the MMIO sync and
        // report addresses), which no request here may cover or take over (`reserved_use`, above).
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => {
                self.kernel_memory.accepted(op, uaddr);
                if op.size == 0 {
                    self.sizes.remove(&op.kvm_slot());
                } else {
                    self.sizes.insert(op.kvm_slot(), op.size);
                }
                if op.as_id == 0 {
                    if op.size == 0 {
                        self.slots.remove(&op.id);
                    } else {
                        let s = SlotState {
                            gpa: op.gpa,
                            size: op.size,
                            uaddr,
                            readonly: op.flags.readonly,
                            backing: op
                                .mem
                                .as_ref()
                                .map_or(Backing::Unnamed, |m| Backing::Buffer(m.mem)),
                        };
                        self.slots.insert(op.id, s);
                    }
                }
                Ok(SlotResult::Ok)
            }
            Err(e) => Ok(SlotResult::Err(errno::name(e.errno()))),
        }
    }

    fn read(&mut self, op: &ReadOp, mmio_reply: u64) -> Result<ReadExit, BackendError> {
        let pae = self.pae();
        let code = if pae {
            code::read32(op.gpa, op.width, guest::DATA, SYNC_GPA)
        } else {
            code::read(op.gpa, op.width)
        };
        let gpa = self.target(op.vcpu, op.gpa, AccessKind::Read);
        let (end, rax, mmio) =
            self.run_access(op.vcpu, &code, gpa, AccessKind::Read, op.width, mmio_reply)?;
        let value = if pae && op.width == Width::W8 {
            // 32-bit code loads 8 bytes into MMX and stores them to DATA.
            let mut b = [0u8; 8];
            self.own.read_bytes(guest::DATA as usize, &mut b);
            u64::from_le_bytes(b)
        } else {
            rax & op.width.mask()
        };
        Ok(match (end, mmio) {
            (End::PageFault { gva, error }, _) => ReadExit::PageFault { gva, error },
            (End::Sync, None) => ReadExit::None { value },
            (End::Sync, Some(m)) => ReadExit::Mmio { gpa: m.gpa, len: m.len, value },
        })
    }

    fn write(&mut self, op: &WriteOp) -> Result<WriteExit, BackendError> {
        let code = if self.pae() {
            self.own.write_bytes(guest::DATA as usize, &op.value.to_le_bytes());
            code::write32(op.gpa, op.width, op.value, guest::DATA, SYNC_GPA)
        } else {
            code::write(op.gpa, op.width, op.value)
        };
        let gpa = self.target(op.vcpu, op.gpa, AccessKind::Write);
        let (end, _, mmio) =
            self.run_access(op.vcpu, &code, gpa, AccessKind::Write, op.width, 0)?;
        Ok(match (end, mmio) {
            (End::PageFault { gva, error }, _) => WriteExit::PageFault { gva, error },
            (End::Sync, None) => WriteExit::None,
            (End::Sync, Some(m)) => WriteExit::Mmio { gpa: m.gpa, len: m.len, data: m.data },
        })
    }

    fn map(&mut self, op: &MapOp) -> Result<(), BackendError> {
        let writes = self.guest_paging()?.tables.map(op).map_err(KvmError::from)?;
        self.shootdown(&writes, Invlpg::page(op.gva))?;
        Ok(())
    }

    fn unmap(&mut self, op: &UnmapOp) -> Result<(), BackendError> {
        let tables = &mut self.guest_paging()?.tables;
        // A 2M unmap that clears a link to a page table unmaps every 4K page under it: each is
        // invalidated (one INVLPG drops only its own page's translations).
        let pages = if tables.links_table(op) { 512 } else { 1 };
        let writes = tables.unmap(op);
        self.shootdown(&writes, Invlpg { gva: op.gva, pages })?;
        Ok(())
    }

    fn cr3(&mut self, op: &Cr3Op) -> Result<(), BackendError> {
        let root = paging::root(op.space);
        let code = if self.guest_paging()?.code == CodeMode::Protected32 {
            code::kernel_cr3_32(root, SYNC_GPA)
        } else {
            code::kernel_cr3(root, SYNC_GPA)
        };
        self.run_kernel(op.vcpu, &code)?;
        if let Some(p) = &mut self.paging {
            p.space[op.vcpu as usize] = op.space;
        }
        Ok(())
    }

    fn host_write(&mut self, op: &HostWriteOp) -> Result<(), BackendError> {
        let bytes = op.value.to_le_bytes();
        let n = op.width.bytes() as usize;
        let off =
            usize::try_from(op.at.offset).map_err(|_| BackendError::Failed("offset".into()))?;
        self.buffer(op.at.mem).write_bytes(off, &bytes[..n]);
        Ok(())
    }

    fn host_read(&mut self, op: &HostReadOp) -> Result<u64, BackendError> {
        let mut bytes = [0u8; 8];
        let n = op.width.bytes() as usize;
        let off =
            usize::try_from(op.at.offset).map_err(|_| BackendError::Failed("offset".into()))?;
        self.buffer(op.at.mem).read_bytes(off, &mut bytes[..n]);
        Ok(le(&bytes[..n]))
    }

    fn dirty_log(&mut self, op: &DirtyLogOp) -> Result<DirtyLogResult, BackendError> {
        let slot = op.kvm_slot();
        let size = self.sizes.get(&slot).copied().unwrap_or(0);
        Ok(match crate::dirty::get(&self.vm, slot, size) {
            Ok(words) => DirtyLogResult::Ok(
                words
                    .iter()
                    .enumerate()
                    .flat_map(|(w, &bits)| {
                        (0..64u64)
                            .filter(move |b| bits >> b & 1 != 0)
                            .map(move |b| w as u64 * 64 + b)
                    })
                    .collect(),
            ),
            Err(crate::dirty::DirtyError::Kvm(e)) => DirtyLogResult::Err(e),
            Err(e) => return Err(BackendError::Failed(e.to_string())),
        })
    }

    fn clear_dirty_log(&mut self, op: &ClearDirtyLogOp) -> Result<SlotResult, BackendError> {
        Ok(
            match crate::dirty::clear(
                &self.vm,
                op.kvm_slot(),
                op.first,
                op.count,
                self.sizes.get(&op.kvm_slot()).copied(),
            ) {
                Ok(()) => SlotResult::Ok,
                Err(crate::dirty::DirtyError::Kvm(e)) => SlotResult::Err(e),
                Err(e) => return Err(BackendError::Failed(e.to_string())),
            },
        )
    }
}

#[cfg(test)]
mod kernel_memory_tests {
    use super::{KernelMemory, KvmError};
    use std::collections::BTreeMap;
    use vmmu_scenario::{SlotFlags, SlotOp};

    const GIB: u64 = 1 << 30;
    /// A host address of the low half of the user range, where a slot of 2^31 - 1 pages fits.
    const LOW: u64 = 0x1000_0000_0000;

    fn host(rmaps: bool, available: u64) -> KernelMemory {
        KernelMemory {
            host: Some((rmaps, available)),
            user_limit: (1 << 47) - 4096,
            live: BTreeMap::new(),
        }
    }

    fn slot(id: u16, gpa: u64, size: u64) -> SlotOp {
        SlotOp { id, as_id: 0, gpa, size, mem: None, flags: SlotFlags::default() }
    }

    /// A slot of 2^31 - 1 pages over a 4 KiB buffer is legal, and a shadow-paging KVM allocates
    /// about 16 GiB of reverse maps for it: not sent where that is more than three quarters of
    /// what is available (a run of it had the OOM killer end other processes of a 24 GiB host).
    #[test]
    fn a_slot_whose_kernel_metadata_does_not_fit_is_not_sent() {
        let huge = slot(1, 0x80_0000, 0x7ff_ffff_f000);
        let m = host(true, 20 * GIB);
        let need = m.need(&huge, LOW);
        assert!(need > 16 * GIB && need < 17 * GIB, "{need}");
        let e = m.admit(need).unwrap_err();
        assert!(matches!(e, KvmError::KernelMemory { .. }), "{e}");
        assert!(e.to_string().contains("out of memory"), "{e}");
        assert!(host(true, 64 * GIB).admit(need).is_ok());
        // A TDP MMU allocates no reverse maps up front: some MiB of large-page counts.
        let tdp = host(false, GIB);
        assert!(tdp.admit(tdp.need(&huge, LOW)).is_ok());
        // Nothing known of the host: no check.
        let unknown = KernelMemory { host: None, ..host(true, 0) };
        assert!(unknown.admit(unknown.need(&huge, LOW)).is_ok());
    }

    /// Accepted slots add up; a delete gives its share back.
    #[test]
    fn live_slots_add_up_and_deletes_give_back() {
        let mut m = host(true, 11 * GIB);
        let half = slot(1, 0x80_0000, 0x3ff_0000_0000);
        assert!(m.admit(m.need(&half, LOW)).is_ok());
        m.accepted(&half, LOW);
        let other = slot(2, 0x400_0000_0000, 0x3ff_0000_0000);
        assert!(m.admit(m.need(&other, LOW)).is_err(), "two 4 TiB slots take about 16 GiB");
        m.accepted(&slot(1, 0x80_0000, 0), 0);
        assert!(m.admit(m.need(&other, LOW)).is_ok());
    }

    /// Requests KVM refuses by their shape before allocating anything count for nothing: a
    /// host range past the user address limit (the corpus's 8 TiB slots over a buffer mapped
    /// near the top of user space), 2^31 pages, misaligned, past 2^52, address space 2, a
    /// reserved id.
    #[test]
    fn requests_kvm_refuses_by_shape_count_for_nothing() {
        let m = host(true, GIB);
        let huge = slot(1, 0x80_0000, 0x7ff_ffff_f000);
        assert_eq!(m.need(&huge, 0x7f00_0000_0000), 0);
        assert_eq!(m.need(&slot(1, 0x80_0000, 0x800_0000_0000), LOW), 0);
        assert_eq!(m.need(&slot(1, 0x80_0000, 0x7ff_ffff_f001), LOW), 0);
        assert_eq!(m.need(&huge, LOW + 0x10), 0);
        assert_eq!(m.need(&slot(1, 0xf_ffff_f000_0000, 0x7ff_ffff_f000), LOW), 0);
        assert_eq!(m.need(&SlotOp { as_id: 2, ..huge.clone() }, LOW), 0);
        assert_eq!(m.need(&SlotOp { id: 32764, ..huge.clone() }, LOW), 0);
        assert!(m.need(&huge, LOW) > 0);
    }

    /// `access_ok`'s limit: `TASK_SIZE_MAX` from Linux 6.12 on (47 or 56 bits), 2^63 before or
    /// when the release cannot be read.
    #[test]
    fn the_user_address_limit_follows_the_kernel_release() {
        use super::user_address_limit_of as limit;
        assert_eq!(limit("6.18.44-fc-v1272", false), (1 << 47) - 4096);
        assert_eq!(limit("6.12.0", true), (1 << 56) - 4096);
        assert_eq!(limit("6.8.0-45-generic", false), 1 << 63);
        assert_eq!(limit("5.15.0", false), 1 << 63);
        assert_eq!(limit("", false), 1 << 63);
    }

    /// KVM refuses a guest address that is not page-aligned among its first checks
    /// (`__kvm_set_memory_region`: `guest_phys_addr & (PAGE_SIZE - 1)`), before it allocates.
    #[test]
    fn a_misaligned_guest_address_counts_for_nothing() {
        let m = host(true, GIB);
        assert_eq!(m.need(&slot(1, 0x80_0800, 0x7ff_ffff_f000), LOW), 0);
    }

    /// A flags-only change (`KVM_MR_FLAGS_ONLY`) keeps the slot's reverse maps and large-page
    /// counts (x86 `kvm_arch_prepare_memory_region` copies `old->arch`); KVM allocates only the
    /// dirty bitmaps when logging turns on, and nothing for a request that changes nothing.
    #[test]
    fn a_flags_only_change_of_an_accepted_slot_allocates_only_its_bitmaps() {
        let mut m = host(true, 20 * GIB);
        // About 4.5 TiB: about 9 GiB of reverse maps, under the 15 GiB allowed.
        let big = slot(1, 0x80_0000, 0x47f_0000_0000);
        assert!(m.admit(m.need(&big, LOW)).is_ok());
        m.accepted(&big, LOW);
        let logged =
            SlotOp { flags: SlotFlags { dirty_log: true, ..SlotFlags::default() }, ..big.clone() };
        let need = m.need(&logged, LOW);
        assert!(need < GIB, "dirty logging on: two bitmaps of 35 MiB each, not {need} bytes");
        assert!(m.admit(need).is_ok());
        assert_eq!(m.need(&big, LOW), 0, "the same request again: KVM changes nothing");
    }
}
