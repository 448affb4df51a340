//! A trace replay VM on `/dev/kvm` (`vmmu replay`): the recorded memslot requests go to KVM as
//! recorded (only `uaddr` remapped onto this process's buffers), and each recorded MMIO access
//! is one guest load or store whose exit says whether KVM treats the address as MMIO.
//!
//! The trace may use any GPA, the first megabyte included (`traces.md`: "a replayer that needs
//! guest memory of its own puts it where the trace places no slot and no access"), so the guest
//! of [`crate::guest`] is relocated: its code, tables and stacks sit in a window of [`WINDOW`]
//! bytes in a slot of address space 0 the trace never names ([`TraceVm::own_slot`]:
//! [`guest::OWN_SLOT`] unless the trace names it), and the access code's closing store goes
//! [`SYNC_OFFSET`] above the window's start, where no slot is. [`TraceVm::place`] picks the
//! window: [`BASE`] (4 GiB, above everything the reference recordings use) when the trace leaves
//! it free, else the first free window above it, else below it (a VM with RAM above 4 GiB maps
//! it right there). It says why when there is none (then the caller skips KVM). The guest
//! identity-maps the low [`ACCESS_LIMIT`] (64 GiB); an access above it (a 64-bit BAR that
//! firmware put high) goes through a high alias window at [`HIGH_VA`] that maps each 2 MiB frame
//! the trace accesses up there ([`TraceVm::high_frames`]; the caller skips KVM when those lie
//! above the guest's MAXPHYADDR).
//!
//! Invariants:
//! - the VM and its vCPU are dropped before the buffers its memslots point into (field order);
//! - every `uaddr` the VM is given lies in one of the buffers (remapped from a union of the
//!   trace's ranges), and each buffer is followed by a `PROT_NONE` guard (`mapping::Mapping`); a
//!   request whose recorded `uaddr` is in no union is passed on unchanged, and KVM may refuse it
//!   or, for a delete, ignore it; the guest can only reach host memory through accepted slots,
//!   which all lie in buffers;
//! - the vCPU runs only inside [`TraceVm::access`], on the calling thread.

use crate::code::{self, EXCEPTION_PORT};
use crate::errno;
use crate::guest::{self, OWN_SIZE, OWN_SLOT};
use crate::machine::KvmError;
use crate::mapping::Mapping;
use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MULTI_ADDRESS_SPACE, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use vmmu_scenario::{Width, ACCESS_LIMIT};

/// The preferred guest-physical address of the replay guest's own memory.
pub const BASE: u64 = 1 << 32;
/// Size (and alignment) of the window the replay guest keeps for itself: its memory and the sync
/// address.
pub const WINDOW: u64 = 0x40_0000;
/// Where the access code's closing store goes, from the window's start (an MMIO exit: no slot
/// there).
pub const SYNC_OFFSET: u64 = 0x20_0000;
/// Guest-virtual start of the high alias window (PML4 entry 1): an access at or above
/// [`ACCESS_LIMIT`], beyond the identity map, goes through the `i`-th 2 MiB page of this window,
/// which maps the `i`-th distinct 2 MiB frame the trace accesses up there
/// ([`TraceVm::high_frames`]).
pub const HIGH_VA: u64 = 1 << 39;
/// The most distinct 2 MiB frames at or above [`ACCESS_LIMIT`] a trace may access (one page
/// directory of the alias window; a boot touches a few BARs).
pub const MAX_HIGH_FRAMES: usize = 512;
const SIZE_2M: u64 = 0x20_0000;
/// The alias window's page-directory-pointer table and page directory, in the guest's own
/// memory right after the identity map's tables.
const HIGH_PDPT: u64 = guest::PD0 + (ACCESS_LIMIT >> 30) * 4096;
const HIGH_PD: u64 = HIGH_PDPT + 4096;
const _: () = assert!(HIGH_PD + 4096 <= OWN_SIZE as u64 && MAX_HIGH_FRAMES as u64 * 8 <= 4096);

// The guest's memory lies below the sync address, both inside the window; the preferred window
// is inside the guest's identity map.
const _: () = assert!(
    OWN_SIZE as u64 <= SYNC_OFFSET && SYNC_OFFSET < WINDOW && BASE + WINDOW <= ACCESS_LIMIT
);

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::Ioctl { what, errno: errno::name(e.errno()) }
}

/// One union of the trace's `uaddr` ranges and the buffer behind it.
struct Buffer {
    start: u64,
    end: u64,
    /// The recorded `uaddr` the mapping's first byte stands for (`start` rounded down to a page).
    base: u64,
    map: Mapping,
}

/// What one access did on KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `KVM_EXIT_MMIO` at the access's address.
    Mmio,
    /// No exit: KVM let the guest reach memory.
    Memory,
}

/// The slot id of the replay guest's own window: one the trace never names in address space 0
/// ([`TraceVm::own_slot`] makes it), so no recorded request can change or delete the guest's
/// code and tables.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct OwnSlot(u32);

impl OwnSlot {
    /// The id.
    pub fn id(self) -> u32 {
        self.0
    }
}

/// Whether every x86-64 KVM refuses a non-delete slot request with host range `[uaddr, uaddr +
/// size)` by its shape alone, whatever else it asks (`kvm_set_memory_region`: a `uaddr` or size
/// not page-aligned, more than `KVM_MEM_MAX_NR_PAGES` pages, or a range that `access_ok` refuses
/// on every host, past the 5-level user limit `(1 << 56) - 4096`): such a request maps nothing.
fn refused_by_shape(uaddr: u64, size: u64) -> bool {
    const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;
    const ANY_HOST_USER_LIMIT: u64 = (1 << 56) - 4096;
    (uaddr | size) % 4096 != 0
        || size / 4096 > KVM_MEM_MAX_NR_PAGES
        || uaddr.checked_add(size).is_none_or(|end| end > ANY_HOST_USER_LIMIT)
}

/// A VM for one trace.
pub struct TraceVm {
    // Field order is drop order: vCPU and VM before the memory they use.
    vcpu: VcpuFd,
    vm: VmFd,
    own: Mapping,
    /// The slot that maps `own`.
    own_slot: OwnSlot,
    bufs: Vec<Buffer>,
    /// Guest-physical start of the replay guest's window.
    base: u64,
    /// The 2 MiB frames mapped in the high alias window, sorted (index = page of the window).
    high: Vec<u64>,
    /// The size of every slot KVM holds from [`TraceVm::set_region`], by KVM slot number: what
    /// sizes `KVM_GET_DIRTY_LOG`'s bitmap (KVM writes as many bits as the slot has pages).
    sizes: std::collections::BTreeMap<u32, u64>,
    _kvm: Kvm,
}

impl TraceVm {
    /// The slot id the replay guest's window takes for a trace whose requests name `ids`
    /// (`(as_id, id)`): [`OWN_SLOT`] if the trace never names it in address space 0, else the
    /// highest user slot id (below `KVM_USER_MEM_SLOTS`, 32764) it never names there; `Err` if it
    /// names them all.
    pub fn own_slot(ids: impl IntoIterator<Item = (u16, u16)>) -> Result<OwnSlot, String> {
        let used: std::collections::BTreeSet<u16> =
            ids.into_iter().filter(|&(a, _)| a == 0).map(|(_, id)| id).collect();
        let preferred = u16::try_from(OWN_SLOT).unwrap_or(u16::MAX);
        std::iter::once(preferred)
            .chain((0..32764u16).rev())
            .find(|id| !used.contains(id))
            .map(|id| OwnSlot(u32::from(id)))
            .ok_or_else(|| "the trace names every slot id of address space 0".to_string())
    }

    /// Where the replay guest's window goes for a trace (its guest-physical start), or why
    /// the trace cannot run on this VM: `slots` are `(as_id, gpa, size)` of its non-delete
    /// requests, `mmio` the addresses it accesses. The window is [`BASE`] if the trace leaves it
    /// free, else the first free [`WINDOW`]-aligned window above it, else below it, inside the
    /// guest's identity map (below [`ACCESS_LIMIT`]).
    pub fn place(
        slots: impl IntoIterator<Item = (u16, u64, u64)>,
        mmio: impl IntoIterator<Item = u64>,
    ) -> Result<u64, String> {
        let mut used: Vec<(u64, u64)> = Vec::new();
        for (as_id, gpa, size) in slots {
            if as_id != 0 {
                continue;
            }
            used.push((gpa, gpa.saturating_add(size)));
        }
        for gpa in mmio {
            // An access never crosses a 4 KiB page, so never a window boundary either (accesses
            // at or above ACCESS_LIMIT go through the high alias window, `high_frames`).
            used.push((gpa, gpa.saturating_add(1)));
        }
        used.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(used.len());
        for (s, e) in used {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        // Disjoint and sorted: the ends are sorted too.
        let free = |base: u64| {
            let i = merged.partition_point(|&(_, end)| end <= base);
            merged.get(i).is_none_or(|&(start, _)| start >= base + WINDOW)
        };
        (BASE..ACCESS_LIMIT)
            .step_by(WINDOW as usize)
            .chain((0..BASE).step_by(WINDOW as usize))
            .find(|&b| free(b))
            .ok_or_else(|| {
                format!(
                    "the trace leaves no free {WINDOW:#x}-byte window below {ACCESS_LIMIT:#x} for the KVM replayer's guest"
                )
            })
    }

    /// Whether this host has the memory KVM allocates for the trace's slots, or why not.
    ///
    /// KVM allocates per-slot metadata when a slot is created, in kernel memory charged to the
    /// process: with shadow paging (or a TDP MMU that keeps reverse maps) an 8-byte reverse-map
    /// head per 4 KiB page, plus per 2 MiB and 1 GiB page a head and a large-page count, and two
    /// dirty bitmaps for a dirty-logged slot; 4 TiB of slots take about 8 GiB. A trace whose
    /// live slots at some point need more than three quarters of `available` (bytes, the host's
    /// `MemAvailable`) would have the kernel's OOM killer end this process with no report (seen:
    /// a recording whose VMM was itself OOM-killed inside its last request, which the trace
    /// still holds). `slots` are `(as_id, id, size, dirty_log)` of every request in order (a
    /// size of 0 deletes); `rmaps`: whether KVM allocates reverse maps up front (shadow paging;
    /// KVM's TDP MMU allocates them only once a shadow root exists).
    pub fn metadata_fits(
        slots: impl IntoIterator<Item = (u16, u16, u64, bool)>,
        rmaps: bool,
        available: u64,
    ) -> Result<(), String> {
        let mut live = std::collections::BTreeMap::new();
        let mut total = 0u64;
        let mut peak = 0u64;
        for (as_id, id, size, dirty_log) in slots {
            if let Some(old) = live.remove(&(as_id, id)) {
                total -= old;
            }
            if size > 0 {
                let need = Self::slot_metadata(size, dirty_log, rmaps);
                live.insert((as_id, id), need);
                total += need;
            }
            peak = peak.max(total);
        }
        if peak > available / 4 * 3 {
            return Err(format!(
                "the slots need about {} MiB of KVM's per-slot metadata at once ({}), \
                 more than three quarters of this host's available memory ({} MiB): KVM would run the \
                 host out of memory",
                peak >> 20,
                if rmaps {
                    "reverse maps of 8 bytes per 4 KiB page, as shadow paging allocates them"
                } else {
                    "large-page counts and dirty bitmaps"
                },
                available >> 20
            ));
        }
        Ok(())
    }

    /// The kernel memory KVM allocates for a slot of `size` bytes when it accepts it: with
    /// `rmaps` (shadow paging, or a TDP MMU that keeps reverse maps) an 8-byte reverse-map head
    /// per 4 KiB page, plus per 2 MiB and 1 GiB page a head and a large-page count, and two dirty
    /// bitmaps when `dirty_log`.
    pub fn slot_metadata(size: u64, dirty_log: bool, rmaps: bool) -> u64 {
        let pages = size / 4096;
        let huge = |shift: u32| (pages >> shift) + 2;
        let rmap = if rmaps { 8 * (pages + huge(9) + huge(18)) } else { 0 };
        let lpage_info = 4 * (huge(9) + huge(18));
        let bitmaps = if dirty_log { 2 * pages.div_ceil(64) * 8 } else { 0 };
        rmap + lpage_info + bitmaps
    }

    /// What [`TraceVm::metadata_fits`] needs to know of this host: whether its KVM allocates
    /// reverse maps with every slot (all but a TDP MMU on EPT or NPT: `kvm.tdp_mmu` and
    /// `kvm_intel.ept` / `kvm_amd.npt` all on; a parameter that cannot be read counts as "yes")
    /// and `MemAvailable` in bytes; `None` when `/proc/meminfo` does not say.
    pub fn host_memory() -> Option<(bool, u64)> {
        let on = |path: &str| {
            std::fs::read_to_string(path).is_ok_and(|v| matches!(v.trim(), "Y" | "y" | "1"))
        };
        let tdp = on("/sys/module/kvm/parameters/tdp_mmu")
            && (on("/sys/module/kvm_intel/parameters/ept")
                || on("/sys/module/kvm_amd/parameters/npt"));
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kib = meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix("MemAvailable:")?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })?;
        Some((!tdp, kib.saturating_mul(1024)))
    }

    /// The distinct 2 MiB frames at or above [`ACCESS_LIMIT`] (beyond the guest's identity map)
    /// that the accesses `mmio` touch, sorted, for [`TraceVm::new`]; or why the guest cannot
    /// reach them: more than [`MAX_HIGH_FRAMES`], or an address at or above `2^guest_phys_bits`
    /// (the MAXPHYADDR KVM offers the guest here; a higher one would be a reserved-bit fault).
    pub fn high_frames(
        mmio: impl IntoIterator<Item = u64>,
        guest_phys_bits: u8,
    ) -> Result<Vec<u64>, String> {
        let limit = 1u64.checked_shl(u32::from(guest_phys_bits)).unwrap_or(u64::MAX);
        let mut frames = Vec::new();
        for gpa in mmio.into_iter().filter(|&g| g >= ACCESS_LIMIT) {
            if gpa >= limit {
                return Err(format!(
                    "the trace accesses {gpa:#x}, at or above 2^{guest_phys_bits} (the MAXPHYADDR this KVM offers its guest)"
                ));
            }
            frames.push(gpa & !(SIZE_2M - 1));
        }
        frames.sort_unstable();
        frames.dedup();
        if frames.len() > MAX_HIGH_FRAMES {
            return Err(format!(
                "the trace accesses {} distinct 2 MiB frames at or above {ACCESS_LIMIT:#x}; the KVM replayer's guest maps at most {MAX_HIGH_FRAMES} there",
                frames.len()
            ));
        }
        Ok(frames)
    }

    /// The guest-virtual address through which the guest reaches `gpa`: itself below
    /// [`ACCESS_LIMIT`] (identity map), else its place in the high alias window.
    fn va(&self, gpa: u64) -> Option<u64> {
        if gpa < ACCESS_LIMIT {
            return Some(gpa);
        }
        let i = self.high.binary_search(&(gpa & !(SIZE_2M - 1))).ok()? as u64;
        Some(HIGH_VA + i * SIZE_2M + (gpa & (SIZE_2M - 1)))
    }

    /// A VM with one buffer per union `[start, end)` of recorded `uaddr` ranges, the guest
    /// relocated to the window at `base` (from [`TraceVm::place`]) with the 2 MiB frames `high`
    /// (from [`TraceVm::high_frames`]) mapped in its high alias window, and one vCPU.
    /// `address_spaces`: 2 when the trace has SMM slots.
    pub fn new(
        unions: &[(u64, u64)],
        address_spaces: u16,
        base: u64,
        own_slot: OwnSlot,
        high: Vec<u64>,
    ) -> Result<TraceVm, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Ioctl {
            what: "open /dev/kvm",
            errno: errno::name(e.errno()),
        })?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        if address_spaces > 1 {
            let n = vm.check_extension_raw(KVM_CAP_MULTI_ADDRESS_SPACE.into());
            if n < i32::from(address_spaces) {
                return Err(KvmError::Exit(format!(
                    "the trace has SMM (address space 1) slots; this kernel reports KVM_CAP_MULTI_ADDRESS_SPACE = {n}"
                )));
            }
        }
        let own = Mapping::new(OWN_SIZE)
            .map_err(|source| KvmError::Mmap { size: OWN_SIZE as u64, source })?;
        for (off, bytes) in guest::image_at(base) {
            own.write_bytes(off as usize, &bytes);
        }
        if !high.is_empty() {
            if high.len() > MAX_HIGH_FRAMES {
                return Err(KvmError::Exit(format!(
                    "{} high 2 MiB frames; at most {MAX_HIGH_FRAMES}",
                    high.len()
                )));
            }
            // PML4[1] -> PDPT; PDPT[0] -> PD; PD[i] -> the i-th frame, 2 MiB, user, writable,
            // accessed and dirty like the identity map's leaves (see `guest::image_at`).
            let table = guest::PTE_P | guest::PTE_RW | guest::PTE_US;
            own.write_bytes(guest::PML4 as usize + 8, &((base + HIGH_PDPT) | table).to_le_bytes());
            own.write_bytes(HIGH_PDPT as usize, &((base + HIGH_PD) | table).to_le_bytes());
            let pd: Vec<u8> = high
                .iter()
                .flat_map(|&f| (f | table | guest::PTE_PS | guest::PTE_AD).to_le_bytes())
                .collect();
            own.write_bytes(HIGH_PD as usize, &pd);
        }
        let region = kvm_userspace_memory_region {
            slot: own_slot.id(),
            flags: 0,
            guest_phys_addr: base,
            memory_size: OWN_SIZE as u64,
            userspace_addr: own.addr(),
        };
        // SAFETY: the region is the VM's own mapping, which outlives the VM (field order) and
        // which nothing else in this process uses.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION (own)"))?;
        let mut bufs = Vec::with_capacity(unions.len());
        for &(start, end) in unions {
            let base = start & !0xfff;
            let size = end - base;
            let len = usize::try_from(size.next_multiple_of(4096)).map_err(|_| KvmError::Mmap {
                size,
                source: std::io::Error::other("larger than the address space"),
            })?;
            let map = Mapping::new(len).map_err(|source| KvmError::Mmap { size, source })?;
            bufs.push(Buffer { start, end, base, map });
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let s = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&guest::sregs_at(s, base)).map_err(ioctl("KVM_SET_SREGS"))?;
        let sizes = std::collections::BTreeMap::new();
        Ok(TraceVm { vcpu, vm, own, own_slot, bufs, base, high, sizes, _kvm: kvm })
    }

    /// Guest-physical start of the replay guest's window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Where the access code's closing store goes.
    pub fn sync(&self) -> u64 {
        self.base + SYNC_OFFSET
    }

    /// This process's address for the recorded range `[uaddr, uaddr + size)`, if one union holds
    /// all of it.
    fn hva(&self, uaddr: u64, size: u64) -> Option<u64> {
        let end = uaddr.checked_add(size)?;
        self.bufs
            .iter()
            .find(|b| b.start <= uaddr && end <= b.end)
            .map(|b| b.map.addr() + (uaddr - b.base))
    }

    /// One `KVM_SET_USER_MEMORY_REGION` as recorded; the error is KVM's errno name (`EPERM` for
    /// the guest's own slot, which [`Self::own_slot`] keeps out of every trace). A create or
    /// change whose host range lies in no union of [`Self::new`]'s, and which KVM could accept
    /// by its shape, is refused with `EFAULT` before KVM sees it (not KVM's answer: the replay
    /// makes a union of every such range of its trace, so only a caller outside it asks this).
    pub fn set_region(
        &mut self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        uaddr: u64,
    ) -> Result<(), String> {
        if slot == self.own_slot.id() {
            // Never the trace's (`own_slot`): a caller's request there would move the guest.
            return Err("EPERM".to_string());
        }
        let userspace_addr = match self.hva(uaddr, size) {
            Some(hva) => hva,
            None if size == 0 || refused_by_shape(uaddr, size) => uaddr,
            None => return Err("EFAULT".to_string()),
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr,
        };
        // SAFETY: a non-delete request whose whole host range one union holds is remapped into
        // that union's buffer (`hva`), which lives as long as the VM; the guest can reach host
        // memory only through slots KVM accepted. Any other request passes its `uaddr` on
        // unchanged only when it maps nothing: a delete, or a shape every KVM refuses
        // (`refused_by_shape`); the rest were refused above.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| errno::name(e.errno()))?;
        // Accepted: a create, move or flags change keeps `size` (KVM refuses a size change of
        // an existing slot), a delete removes the slot.
        if size == 0 {
            self.sizes.remove(&slot);
        } else {
            self.sizes.insert(slot, size);
        }
        Ok(())
    }

    /// Enables manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), as the
    /// recording VMM did if its trace has `clear-dirty-log` calls (KVM refuses them otherwise),
    /// with `KVM_DIRTY_LOG_INITIALLY_SET` where offered, as QEMU 7.2 does.
    pub fn enable_manual_dirty_log(&mut self) -> Result<(), String> {
        let offered = self.vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        let want = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
        let args0 = u64::try_from(offered).unwrap_or(0) & want;
        if args0 & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
            return Err(format!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered ({offered})"));
        }
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [args0, 0, 0, 0],
            ..Default::default()
        };
        self.vm.enable_cap(&cap).map_err(|e| errno::name(e.errno()))
    }

    /// `KVM_GET_DIRTY_LOG` of `slot`; the bitmap is dropped. It is sized from this VM's record
    /// of the slot ([`TraceVm::set_region`] is the only way slots are made), never from the
    /// caller: a bitmap smaller than the slot would let KVM write past it. For a slot KVM does not
    /// hold (or holds without a dirty bitmap, as the replay guest's own), KVM answers before it
    /// copies anything.
    pub fn get_dirty_log(&mut self, slot: u32) -> Result<(), String> {
        let size = self.sizes.get(&slot).copied().unwrap_or(0);
        Ok(crate::dirty::get(&self.vm, slot, size).map(|_| ())?)
    }

    /// `KVM_CLEAR_DIRTY_LOG` of pages `[first_page, first_page + num_pages)` of `slot`, with every
    /// bit of the range set (the recorded bitmap is not in the trace), sized as the scenario
    /// backend's `dirty::clear` from this VM's record of the slot.
    pub fn clear_dirty_log(
        &mut self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
    ) -> Result<(), String> {
        let size = self.sizes.get(&slot).copied();
        Ok(crate::dirty::clear(&self.vm, slot, first_page, num_pages, size)?)
    }

    /// One guest access of `len` bytes at `gpa` (a store of `write`, or a load answered with
    /// `reply` if it exits); says whether it exited as MMIO at `gpa`. A recorded length other
    /// than 1, 2, 4 or 8 (a page-crossing fragment such as 3 bytes, or a 16-byte SSE access,
    /// as KVM traces them) is replayed as the widest of those that fits in it ([`access_width`]):
    /// the same address, so the same verdict.
    pub fn access(
        &mut self,
        gpa: u64,
        len: u64,
        write: Option<u64>,
        reply: u64,
    ) -> Result<Access, KvmError> {
        let width = access_width(len);
        let len = u64::from(width.bytes());
        let sync = self.sync();
        let va = self.va(gpa).ok_or_else(|| {
            KvmError::Exit(format!(
                "{gpa:#x} is beyond the identity map and not in the high window"
            ))
        })?;
        let code = match write {
            Some(v) => code::write_then_sync(va, width, v, sync),
            None => code::read_then_sync(va, width, sync),
        };
        self.own.write_bytes(guest::CODE as usize, &code);
        let v = &mut self.vcpu;
        v.set_regs(&guest::regs_at(self.base)).map_err(ioctl("KVM_SET_REGS"))?;
        let mut seen = Access::Memory;
        let mismatch = |addr: u64, n: usize| KvmError::MmioMismatch {
            gpa: addr,
            len: n,
            want_gpa: gpa,
            want_len: width.bytes(),
        };
        loop {
            let exit = match v.run() {
                Ok(e) => e,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(KvmError::Run { errno: errno::name(e.errno()) }),
            };
            match exit {
                VcpuExit::MmioWrite(addr, _) if addr == sync => return Ok(seen),
                VcpuExit::MmioRead(addr, data) => {
                    if addr != gpa || data.len() as u64 != len || seen == Access::Mmio {
                        return Err(mismatch(addr, data.len()));
                    }
                    let bytes = reply.to_le_bytes();
                    let n = data.len().min(8);
                    data[..n].copy_from_slice(&bytes[..n]);
                    seen = Access::Mmio;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if addr != gpa || data.len() as u64 != len || seen == Access::Mmio {
                        return Err(mismatch(addr, data.len()));
                    }
                    seen = Access::Mmio;
                }
                VcpuExit::IoOut(p, data) if p == u16::from(EXCEPTION_PORT) => {
                    let vector = data.first().copied().unwrap_or(0xff);
                    let cr2 = v.get_sregs().map(|s| s.cr2).unwrap_or(0);
                    return Err(KvmError::Exception { vector, rip: 0, error_code: 0, cr2 });
                }
                VcpuExit::Shutdown => {
                    return Err(KvmError::Exit("KVM_EXIT_SHUTDOWN (triple fault?)".into()))
                }
                other => return Err(KvmError::Exit(format!("{other:?}"))),
            }
        }
    }
}

/// The load or store that replays a recorded access of `len` bytes: the widest of 1, 2, 4 and 8
/// bytes that is at most `len` (1 for 0), so it never reaches past the recorded access (which
/// does not cross a page).
pub fn access_width(len: u64) -> Width {
    match len {
        0..=1 => Width::W1,
        2..=3 => Width::W2,
        4..=7 => Width::W4,
        _ => Width::W8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_recorded_lengths_replay_as_the_widest_access_inside_them() {
        let widths: Vec<u32> =
            [1, 2, 3, 4, 5, 7, 8, 10, 16, 32].map(|l| access_width(l).bytes()).to_vec();
        assert_eq!(widths, [1, 2, 2, 4, 4, 4, 8, 8, 8, 8]);
    }

    #[test]
    fn the_own_slot_is_one_the_trace_never_names() {
        let own = OWN_SLOT as u16;
        assert_eq!(TraceVm::own_slot([(0, 0), (1, own)]).map(OwnSlot::id), Ok(OWN_SLOT));
        assert_eq!(TraceVm::own_slot([(0, own)]).map(OwnSlot::id), Ok(32763));
        assert_eq!(TraceVm::own_slot([(0, own), (0, 32763)]).map(OwnSlot::id), Ok(32762));
        let all = (0..32764u16).map(|id| (0, id));
        assert!(TraceVm::own_slot(all).unwrap_err().contains("every slot id"));
    }

    #[test]
    fn the_window_goes_where_the_trace_places_nothing() {
        // The reference recordings use nothing at or above 4 GiB: the preferred window.
        assert_eq!(TraceVm::place([(0, 0, 0x1000_0000)], [0xfee0_0000]), Ok(BASE));
        // Address space 1 does not count; an access or a slot in the window moves it up.
        assert_eq!(TraceVm::place([(1, BASE, 0x1000)], []), Ok(BASE));
        assert_eq!(TraceVm::place([], [BASE + SYNC_OFFSET]), Ok(BASE + WINDOW));
        assert_eq!(TraceVm::place([(0, BASE, 0x1000)], []), Ok(BASE + WINDOW));
        // RAM above 4 GiB (QEMU -m 4G and more): the first free window after it.
        assert_eq!(
            TraceVm::place([(0, 0, 0xc000_0000), (0, BASE, 0x4000_0000)], [BASE + (1 << 30)]),
            Ok(BASE + (1 << 30) + WINDOW)
        );
        // Everything from 4 GiB up taken: below it, where the trace left room.
        let high = (0, BASE, ACCESS_LIMIT - BASE);
        assert_eq!(TraceVm::place([high, (0, 0, 0xa0000)], []), Ok(WINDOW));
        assert!(TraceVm::place([(0, 0, u64::MAX)], []).unwrap_err().contains("no free"));
        // An access beyond the identity map does not take the window (high alias window).
        assert_eq!(TraceVm::place([], [ACCESS_LIMIT, u64::MAX]), Ok(BASE));
    }

    #[test]
    fn accesses_beyond_the_identity_map_get_high_frames_below_the_guest_maxphyaddr() {
        // A 64-bit BAR near the top of a 48-bit space, read twice in one 2 MiB frame and once in
        // the next; low accesses need no frame.
        let bar = 0x7ff0_0000_0000;
        let mmio = [0xfee0_0030, bar + 0x10, bar + 0x1f_fff8, bar + 0x20_0000, ACCESS_LIMIT];
        assert_eq!(TraceVm::high_frames(mmio, 48), Ok(vec![ACCESS_LIMIT, bar, bar + SIZE_2M]));
        assert_eq!(TraceVm::high_frames([0xfee0_0030], 36), Ok(vec![]));
        let e = TraceVm::high_frames([bar], 46).unwrap_err();
        assert!(e.contains("2^46"), "{e}");
        let many = (0..=MAX_HIGH_FRAMES as u64).map(|i| ACCESS_LIMIT + i * SIZE_2M);
        assert!(TraceVm::high_frames(many, 52).unwrap_err().contains("at most 512"));
    }

    #[test]
    fn slots_whose_kvm_metadata_would_exhaust_the_host_are_said_before_any_is_made() {
        const TIB: u64 = 1 << 40;
        const GIB: u64 = 1 << 30;
        // Shadow paging: 8 bytes of reverse map per 4 KiB page, about 8 GiB for 4 TiB.
        let four_tib = [(0, 1, 4 * TIB, false)];
        // (An 8 TiB VM of this kind ran on a host with 23 GiB available; a third 4 TiB slot got
        // its VMM OOM-killed.)
        assert!(TraceVm::metadata_fits(four_tib, true, 11 * GIB).is_ok());
        let e = TraceVm::metadata_fits(four_tib, true, 10 * GIB).unwrap_err();
        assert!(e.contains("8216 MiB") && e.contains("(10240 MiB)"), "{e}");
        // What counts is what is live at once: a slot deleted (size 0) or replaced gives its
        // metadata back; address spaces are separate.
        let churn = [(0, 1, 4 * TIB, false), (0, 1, 0, false), (0, 2, 4 * TIB, false)];
        assert!(TraceVm::metadata_fits(churn, true, 11 * GIB).is_ok());
        let both = [(0, 1, 4 * TIB, false), (1, 1, 4 * TIB, false)];
        assert!(TraceVm::metadata_fits(both, true, 20 * GIB).is_err());
        // A TDP MMU allocates no reverse maps with the slot; dirty bitmaps count.
        assert!(TraceVm::metadata_fits(four_tib, false, GIB).is_ok());
        let logged = [(0, 1, 64 * TIB, true)];
        let e = TraceVm::metadata_fits(logged, false, 4 * GIB).unwrap_err();
        assert!(e.contains("dirty bitmaps"), "{e}");
    }
}
