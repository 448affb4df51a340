//! A small VM for benchmarks on real KVM: raw `KVM_SET_USER_MEMORY_REGION` calls to time, and
//! one vCPU thread kept busy at CPL3.
//!
//! The VM reuses the scenario backend's guest ([`crate::guest`]: long mode, CPL3, identity map
//! of the low 64 GiB) and adds two buffers:
//! - a *working set* of [`WORK_SIZE`] bytes in slot [`WORK_SLOT`] at [`WORK_GPA`], which the busy
//!   vCPU keeps writing (one 8-byte add per 4 KiB page, round robin);
//! - a *churn* buffer of [`CHURN_BUF`] bytes that the caller's slot requests ([`BenchVm::set_region`])
//!   may point into (offsets are checked, so a slot never leads outside it).
//!
//! The busy vCPU's loop does [`BUSY_INNER`] adds, then one store to the sync address (an MMIO
//! exit; `out` raises #GP at CPL3 on this kind of host), so the host thread sees progress and
//! can stop it. Its throughput is the number of adds per second.
//!
//! Invariants: no vCPU runs over unmapped memory. The busy thread is owned by the [`BenchVm`]
//! (not by the [`BusyVcpu`] handle the caller holds, which may be dropped or leaked): the VM's
//! `Drop` stops and joins it before any field goes, and then the VM and vCPU fds are dropped
//! before the buffers (field order). A leaked `BenchVm` leaks its buffers too. Guest code only
//! touches the working set and the sync address; slots the caller makes point into the churn
//! buffer (checked), and the dirty-logged slots' sizes are this VM's own record, which no other
//! request can change (their ids are refused by [`BenchVm::set_region`]).

use crate::code::SYNC_GPA;
use crate::errno;
use crate::guest::{self, CODE, OWN_SIZE, OWN_SLOT};
use crate::machine::KvmError;
use crate::mapping::Mapping;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Slot id of the busy vCPU's working set.
pub const WORK_SLOT: u32 = 32761;
/// Guest-physical address of the working set (1 GiB).
pub const WORK_GPA: u64 = 1 << 30;
/// Size of the working set (16 MiB, 4096 pages).
pub const WORK_SIZE: usize = 16 << 20;
/// Size of the churn buffer (4 MiB: room for a 2 MiB slot at a 2 MiB-aligned offset).
pub const CHURN_BUF: usize = 4 << 20;
/// Adds the busy loop does between two exits.
pub const BUSY_INNER: u32 = 4096;

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::Ioctl { what, errno: errno::name(e.errno()) }
}

/// The busy loop: `rdi` = working set, `rsi` = offset; `BUSY_INNER` times `add qword
/// [rdi+rsi], 1` with `rsi` stepping one page through the working set, then a byte store to the
/// sync address, then again.
pub fn busy_code() -> Vec<u8> {
    let mut c = Vec::with_capacity(64);
    c.extend_from_slice(&[0x48, 0xbf]); // mov rdi, imm64
    c.extend_from_slice(&WORK_GPA.to_le_bytes());
    c.extend_from_slice(&[0x31, 0xf6]); // xor esi, esi
    let outer = c.len();
    c.push(0xb9); // mov ecx, imm32
    c.extend_from_slice(&BUSY_INNER.to_le_bytes());
    let inner = c.len();
    c.extend_from_slice(&[0x48, 0x83, 0x04, 0x37, 0x01]); // add qword [rdi+rsi], 1
    c.extend_from_slice(&[0x48, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00]); // add rsi, 0x1000
    c.extend_from_slice(&[0x48, 0x81, 0xe6]); // and rsi, imm32
    let mask = u32::try_from(WORK_SIZE - 1).unwrap_or(u32::MAX) & !0xfff;
    c.extend_from_slice(&mask.to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    let back = inner as i64 - (c.len() as i64 + 2);
    c.extend_from_slice(&[0x75, back as i8 as u8]); // jnz inner
    c.extend_from_slice(&[0x48, 0xb9]); // mov rcx, SYNC_GPA
    c.extend_from_slice(&SYNC_GPA.to_le_bytes());
    c.extend_from_slice(&[0x88, 0x01]); // mov byte [rcx], al  (the exit)
    let back = outer as i64 - (c.len() as i64 + 2);
    c.extend_from_slice(&[0xeb, back as i8 as u8]); // jmp outer
    c
}

/// The busy vCPU's thread: what stops it, and what gives the vCPU back.
struct BusyThread {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<VcpuFd, String>>,
}

impl BusyThread {
    /// Stops the loop and waits for the thread: the vCPU, or why the loop ended early.
    fn join(self) -> Result<VcpuFd, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| Err("the busy vCPU thread panicked".into()))
    }
}

/// A VM with the backend's guest, a working set and a churn buffer; one vCPU.
pub struct BenchVm {
    /// The vCPU while it runs its busy loop ([`BenchVm::start_busy`]); stopped and joined by
    /// `Drop` before anything else goes.
    busy: Option<BusyThread>,
    // Field order is drop order: vCPU and VM before the memory they use.
    vcpu: Option<VcpuFd>,
    vm: VmFd,
    /// Host memory of dirty-logged slots added by [`BenchVm::add_logged_slot`], with their KVM
    /// slot numbers and sizes.
    logged: Vec<(u32, u64, Mapping)>,
    _own: Mapping,
    _work: Mapping,
    churn: Mapping,
    _kvm: Kvm,
}

impl std::fmt::Debug for BenchVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchVm").finish_non_exhaustive()
    }
}

impl BenchVm {
    /// Creates the VM; `Err` with a reason when `/dev/kvm` is not usable.
    pub fn new() -> Result<BenchVm, String> {
        Self::try_new().map_err(|e| e.to_string())
    }

    fn try_new() -> Result<BenchVm, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Ioctl {
            what: "open /dev/kvm",
            errno: errno::name(e.errno()),
        })?;
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        let map = |size: usize| {
            Mapping::new(size).map_err(|source| KvmError::Mmap { size: size as u64, source })
        };
        let own = map(OWN_SIZE)?;
        for (gpa, bytes) in guest::image() {
            own.write_bytes(gpa as usize, &bytes);
        }
        own.write_bytes(CODE as usize, &busy_code());
        let work = map(WORK_SIZE)?;
        let churn = map(CHURN_BUF)?;
        for (slot, gpa, size, addr) in [
            (OWN_SLOT, 0, OWN_SIZE as u64, own.addr()),
            (WORK_SLOT, WORK_GPA, WORK_SIZE as u64, work.addr()),
        ] {
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: addr,
            };
            // SAFETY: the region is one of this VM's own mappings, which outlive the VM (field
            // order) and which nothing else in this process uses.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION (bench)"))?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let v = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;
        v.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let s = v.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        v.set_sregs(&guest::sregs(s)).map_err(ioctl("KVM_SET_SREGS"))?;
        v.set_regs(&guest::regs()).map_err(ioctl("KVM_SET_REGS"))?;
        Ok(BenchVm {
            busy: None,
            vcpu: Some(v),
            vm,
            logged: Vec::new(),
            _own: own,
            _work: work,
            churn,
            _kvm: kvm,
        })
    }

    /// `KVM_CAP_NR_MEMSLOTS` of this VM.
    pub fn nr_memslots(&self) -> i32 {
        self.vm.check_extension_int(Cap::NrMemslots)
    }

    /// One raw `KVM_SET_USER_MEMORY_REGION` whose host memory starts `offset` bytes into the
    /// churn buffer (a delete passes size 0). `Err` is KVM's errno name. Slot ids
    /// [`OWN_SLOT`], [`WORK_SLOT`] and those of [`BenchVm::add_logged_slot`] are refused (EPERM:
    /// the VM's record of their sizes sizes `KVM_GET_DIRTY_LOG`'s bitmap), and so is a range
    /// outside the buffer.
    pub fn set_region(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        offset: u64,
    ) -> Result<(), String> {
        if slot == OWN_SLOT || slot == WORK_SLOT || self.logged.iter().any(|l| l.0 == slot) {
            return Err("EPERM".into());
        }
        if size != 0 && !self.churn.contains(self.churn.addr().wrapping_add(offset), size) {
            return Err("EFAULT".into());
        }
        let r = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.churn.addr() + offset,
        };
        // SAFETY: the slot's host range lies inside the churn buffer (checked above), which lives
        // as long as the VM; the guest code never accesses it.
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| errno::name(e.errno()))
    }

    /// Adds a dirty-logged slot `slot` of `size` bytes at `gpa`, backed by a fresh mapping (the
    /// guest never touches it). `Err` is KVM's errno name or why the mapping failed.
    pub fn add_logged_slot(&mut self, slot: u32, gpa: u64, size: u64) -> Result<(), String> {
        if slot == OWN_SLOT || slot == WORK_SLOT || self.logged.iter().any(|l| l.0 == slot) {
            return Err("EPERM".into());
        }
        let len = usize::try_from(size).map_err(|_| "slot too large".to_string())?;
        let m = Mapping::new(len).map_err(|e| format!("mmap of {size:#x} bytes: {e}"))?;
        let r = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: m.addr(),
        };
        // SAFETY: the slot's host range is the whole of `m`, which this VM keeps until it is
        // dropped (field order: after the VM).
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| errno::name(e.errno()))?;
        self.logged.push((slot, size, m));
        Ok(())
    }

    /// Turns dirty logging of the working set (slot [`WORK_SLOT`]) on (a flags-only
    /// `KVM_SET_USER_MEMORY_REGION`).
    pub fn start_logging_working_set(&self) -> Result<(), String> {
        self.set_working_set_flags(KVM_MEM_LOG_DIRTY_PAGES)
    }

    /// Turns dirty logging of the working set off again.
    pub fn stop_logging_working_set(&self) -> Result<(), String> {
        self.set_working_set_flags(0)
    }

    fn set_working_set_flags(&self, flags: u32) -> Result<(), String> {
        let r = kvm_userspace_memory_region {
            slot: WORK_SLOT,
            flags,
            guest_phys_addr: WORK_GPA,
            memory_size: WORK_SIZE as u64,
            userspace_addr: self._work.addr(),
        };
        // SAFETY: the same working-set mapping as at creation, only the flags change.
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| errno::name(e.errno()))
    }

    /// `KVM_GET_DIRTY_LOG` of the working set or of a slot added by
    /// [`BenchVm::add_logged_slot`]; `Err` is KVM's errno name.
    pub fn get_dirty_log(&self, slot: u32) -> Result<Vec<u64>, String> {
        let size = if slot == WORK_SLOT {
            WORK_SIZE as u64
        } else {
            self.logged.iter().find(|l| l.0 == slot).map(|l| l.1).ok_or("ENOENT")?
        };
        Ok(crate::dirty::get(&self.vm, slot, size)?)
    }

    /// `KVM_CLEAR_DIRTY_LOG` of pages `[first, first + count)` with every bit set.
    pub fn clear_dirty_log(&self, slot: u32, first: u64, count: u32) -> Result<(), String> {
        Ok(crate::dirty::clear(&self.vm, slot, first, count, None)?)
    }

    /// Enables manual dirty-log protection (without "initially set").
    pub fn enable_manual_dirty_log(&self) -> Result<(), String> {
        crate::dirty::enable_manual(&self.vm, crate::dirty::Initially::Clean)
    }

    /// Starts the vCPU on its busy loop in a new thread, pinned to `cpu` if given. `None` if
    /// it is already running (or its loop ended in an error: the vCPU is gone). The thread is
    /// the VM's: [`BenchVm::stop_busy`] or the VM's drop stops it; the [`BusyVcpu`] only watches.
    pub fn start_busy(&mut self, cpu: Option<usize>) -> Option<BusyVcpu> {
        if let Some(t) = self.busy.take() {
            if !t.stop.load(Ordering::Relaxed) {
                self.busy = Some(t);
                return None;
            }
            // Its watch was dropped: the loop is stopping; take the vCPU back.
            self.vcpu = t.join().ok();
        }
        let vcpu = self.vcpu.take()?;
        let stop = Arc::new(AtomicBool::new(false));
        let exits = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (s, e, d) = (stop.clone(), exits.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let r = busy_thread(vcpu, cpu, &s, &e);
            d.store(true, Ordering::Release);
            r
        });
        self.busy = Some(BusyThread { stop: stop.clone(), thread });
        Some(BusyVcpu { stop, exits, done })
    }

    /// Stops the busy loop and takes the vCPU back; the error says why the loop ended early.
    pub fn stop_busy(&mut self, busy: BusyVcpu) -> Result<(), String> {
        drop(busy);
        let t = self.busy.take().ok_or("the vCPU is not running its busy loop")?;
        self.vcpu = Some(t.join()?);
        Ok(())
    }
}

impl Drop for BenchVm {
    fn drop(&mut self) {
        // Before any field goes: no vCPU may run once the buffers are unmapped.
        if let Some(t) = self.busy.take() {
            let _ = t.join();
        }
    }
}

/// Pins the calling thread to `cpu`. `Err` says why not.
pub fn pin_current_thread(cpu: usize) -> Result<(), String> {
    // SAFETY: `cpu_set_t` is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set` (it checks the index against the set size).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("sched_setaffinity(cpu {cpu}): {}", std::io::Error::last_os_error()))
    }
}

fn busy_thread(
    mut vcpu: VcpuFd,
    cpu: Option<usize>,
    stop: &AtomicBool,
    exits: &AtomicU64,
) -> Result<VcpuFd, String> {
    if let Some(c) = cpu {
        pin_current_thread(c)?;
    }
    while !stop.load(Ordering::Relaxed) {
        match vcpu.run() {
            Ok(VcpuExit::MmioWrite(SYNC_GPA, _)) => {
                exits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(other) => return Err(format!("busy vCPU: unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("busy vCPU: KVM_RUN failed: {}", errno::name(e.errno()))),
        }
    }
    Ok(vcpu)
}

/// A watch on the vCPU running the busy loop in the [`BenchVm`]'s thread. Stop it with
/// [`BenchVm::stop_busy`], which gives the vCPU back; dropping it asks the loop to stop (the VM
/// joins the thread at `stop_busy` or when it is dropped).
pub struct BusyVcpu {
    stop: Arc<AtomicBool>,
    exits: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
}

impl std::fmt::Debug for BusyVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusyVcpu").field("adds", &self.adds()).finish_non_exhaustive()
    }
}

impl BusyVcpu {
    /// Guest adds completed so far (exits times [`BUSY_INNER`]).
    pub fn adds(&self) -> u64 {
        self.exits.load(Ordering::Relaxed) * u64::from(BUSY_INNER)
    }

    /// Whether the busy thread ended (an error; it only stops when asked).
    pub fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

impl Drop for BusyVcpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_code_branches_land_on_their_labels() {
        let c = busy_code();
        // mov rdi (10) + xor (2) = outer at 12; mov ecx (5) -> inner at 17.
        assert_eq!(&c[12..13], &[0xb9]);
        let jnz = c.iter().position(|&b| b == 0x75).unwrap();
        let target = jnz as i64 + 2 + i64::from(c[jnz + 1] as i8);
        assert_eq!(target, 17);
        let jmp = c.len() - 2;
        assert_eq!(c[jmp], 0xeb);
        assert_eq!(jmp as i64 + 2 + i64::from(c[jmp + 1] as i8), 12);
    }
}
