//! A trace replay VM on `/dev/kvm` (`vmmu replay`): the recorded memslot requests go to KVM as
//! recorded (only `uaddr` remapped onto this process's buffers), and each recorded MMIO access
//! is one guest load or store whose exit says whether KVM treats the address as MMIO.
//!
//! The trace may use any GPA, the first megabyte included (`traces.md`: "a replayer that needs
//! guest memory of its own puts it where the trace places no slot and no access"), so the guest
//! of [`crate::guest`] is relocated: its code, tables and stacks sit in a window of [`WINDOW`]
//! bytes in slot [`guest::OWN_SLOT`] of address space 0, and the access code's closing store goes
//! [`SYNC_OFFSET`] above the window's start, where no slot is. [`TraceVm::place`] picks the
//! window: [`BASE`] (4 GiB, above everything the reference recordings use) when the trace leaves
//! it free, else the first free window above it, else below it (a VM with RAM above 4 GiB maps
//! it right there). It says why when there is none, or when the trace uses the replayer's slot
//! id or an address its guest cannot reach (then the caller skips KVM).
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

/// A VM for one trace.
pub struct TraceVm {
    // Field order is drop order: vCPU and VM before the memory they use.
    vcpu: VcpuFd,
    vm: VmFd,
    own: Mapping,
    bufs: Vec<Buffer>,
    /// Guest-physical start of the replay guest's window.
    base: u64,
    _kvm: Kvm,
}

impl TraceVm {
    /// Where the replay guest's window goes for a trace (its guest-physical start), or why
    /// the trace cannot run on this VM: `slots` are `(as_id, id, gpa, size)` of its non-delete
    /// requests, `mmio` the addresses it accesses. The window is [`BASE`] if the trace leaves it
    /// free, else the first free [`WINDOW`]-aligned window above it, else below it, inside the
    /// guest's identity map (below [`ACCESS_LIMIT`]).
    pub fn place(
        slots: impl IntoIterator<Item = (u16, u16, u64, u64)>,
        mmio: impl IntoIterator<Item = u64>,
    ) -> Result<u64, String> {
        let mut used: Vec<(u64, u64)> = Vec::new();
        for (as_id, id, gpa, size) in slots {
            if as_id != 0 {
                continue;
            }
            if u32::from(id) == OWN_SLOT {
                return Err(format!(
                    "the trace uses slot id {OWN_SLOT}, which the KVM replayer keeps for its guest"
                ));
            }
            used.push((gpa, gpa.saturating_add(size)));
        }
        for gpa in mmio {
            if gpa >= ACCESS_LIMIT {
                return Err(format!(
                    "the trace accesses {gpa:#x}; the KVM replayer's guest reaches below {ACCESS_LIMIT:#x} only"
                ));
            }
            // An access never crosses a 4 KiB page, so never a window boundary either.
            used.push((gpa, gpa + 1));
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

    /// A VM with one buffer per union `[start, end)` of recorded `uaddr` ranges, the guest
    /// relocated to the window at `base` (from [`TraceVm::place`]) and one vCPU.
    /// `address_spaces`: 2 when the trace has SMM slots.
    pub fn new(unions: &[(u64, u64)], address_spaces: u16, base: u64) -> Result<TraceVm, KvmError> {
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
        let region = kvm_userspace_memory_region {
            slot: OWN_SLOT,
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
        Ok(TraceVm { vcpu, vm, own, bufs, base, _kvm: kvm })
    }

    /// Guest-physical start of the replay guest's window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Where the access code's closing store goes.
    pub fn sync(&self) -> u64 {
        self.base + SYNC_OFFSET
    }

    /// This process's address for a recorded `uaddr` (the recorded value if no union holds it).
    fn hva(&self, uaddr: u64) -> u64 {
        self.bufs
            .iter()
            .find(|b| (b.start..b.end).contains(&uaddr))
            .map_or(uaddr, |b| b.map.addr() + (uaddr - b.base))
    }

    /// One `KVM_SET_USER_MEMORY_REGION` as recorded; the error is KVM's errno name.
    pub fn set_region(
        &mut self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        uaddr: u64,
    ) -> Result<(), String> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.hva(uaddr),
        };
        // SAFETY: a non-delete request's `uaddr` is remapped into one of this VM's buffers
        // (`hva`: the union holds the whole recorded range), which live as long as the VM; the
        // guest can reach host memory only through slots KVM accepted. A recorded `uaddr` in no
        // union is passed on unchanged only for requests KVM refuses or deletes, which map
        // nothing.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| errno::name(e.errno()))
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

    /// `KVM_GET_DIRTY_LOG` of `slot`, whose size is `size` bytes; the bitmap is dropped.
    pub fn get_dirty_log(&mut self, slot: u32, size: u64) -> Result<(), String> {
        let size = usize::try_from(size).map_err(|_| "slot size too large".to_string())?;
        self.vm.get_dirty_log(slot, size).map(|_| ()).map_err(|e| errno::name(e.errno()))
    }

    /// `KVM_CLEAR_DIRTY_LOG` of pages `[first_page, first_page + num_pages)` of `slot`, with every
    /// bit of the range set (the recorded bitmap is not in the trace); `size`: the slot's size in
    /// bytes when the trace created it (the scenario backend's `dirty::clear`).
    pub fn clear_dirty_log(
        &mut self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        size: Option<u64>,
    ) -> Result<(), String> {
        crate::dirty::clear(&self.vm, slot, first_page, num_pages, size)
    }

    /// One guest access of `len` bytes at `gpa` (a store of `write`, or a load answered with
    /// `reply` if it exits); says whether it exited as MMIO at `gpa`.
    pub fn access(
        &mut self,
        gpa: u64,
        len: u64,
        write: Option<u64>,
        reply: u64,
    ) -> Result<Access, KvmError> {
        let width = match len {
            1 => Width::W1,
            2 => Width::W2,
            4 => Width::W4,
            _ => Width::W8,
        };
        let sync = self.sync();
        let code = match write {
            Some(v) => code::write_then_sync(gpa, width, v, sync),
            None => code::read_then_sync(gpa, width, sync),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_goes_where_the_trace_places_nothing() {
        // The reference recordings use nothing at or above 4 GiB: the preferred window.
        assert_eq!(TraceVm::place([(0, 0, 0, 0x1000_0000)], [0xfee0_0000]), Ok(BASE));
        // Address space 1 does not count; an access or a slot in the window moves it up.
        assert_eq!(TraceVm::place([(1, OWN_SLOT as u16, BASE, 0x1000)], []), Ok(BASE));
        assert_eq!(TraceVm::place([], [BASE + SYNC_OFFSET]), Ok(BASE + WINDOW));
        assert_eq!(TraceVm::place([(0, 1, BASE, 0x1000)], []), Ok(BASE + WINDOW));
        // RAM above 4 GiB (QEMU -m 4G and more): the first free window after it.
        assert_eq!(
            TraceVm::place([(0, 0, 0, 0xc000_0000), (0, 1, BASE, 0x4000_0000)], [BASE + (1 << 30)]),
            Ok(BASE + (1 << 30) + WINDOW)
        );
        // Everything from 4 GiB up taken: below it, where the trace left room.
        let high = (0, 1, BASE, ACCESS_LIMIT - BASE);
        assert_eq!(TraceVm::place([high, (0, 0, 0, 0xa0000)], []), Ok(WINDOW));
        assert!(TraceVm::place([(0, 0, 0, u64::MAX)], []).unwrap_err().contains("no free"));
        // The replayer's slot id, and addresses its guest cannot reach.
        assert!(TraceVm::place([(0, OWN_SLOT as u16, 0, 0x1000)], []).is_err());
        assert!(TraceVm::place([], [ACCESS_LIMIT]).is_err());
    }
}
