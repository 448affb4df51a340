//! One scenario's VM on `/dev/kvm`: creation, the per-step ioctls, and the run loop.
//!
//! Invariants:
//! - the VM (and its vCPUs) is dropped before the buffers its memslots point into (field order);
//! - `slots` mirrors the memslots KVM accepted in address space 0 (updated only on success), so
//!   an access through a slot beyond its buffer is refused before the guest makes it;
//! - a vCPU runs only inside [`KvmMachine::run_access`], on this thread, while no host-side copy
//!   of guest memory is in progress.

use crate::code::{self, EXCEPTION_PORT, SYNC_GPA};
use crate::errno;
use crate::guest::{self, CODE, KSTACK_TOP, OWN_SIZE, OWN_SLOT};
use crate::mapping::Mapping;
use kvm_bindings::{
    kvm_userspace_memory_region, KVM_CAP_MULTI_ADDRESS_SPACE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use std::collections::BTreeMap;
use vmmu_scenario::{
    BackendError, ClearDirtyLogOp, DirtyLogMode, DirtyLogOp, DirtyLogResult, HostReadOp,
    HostWriteOp, Machine, MemDecl, MemId, ReadExit, ReadOp, Scenario, SlotOp, SlotResult, Start,
    Width, WriteExit, WriteOp,
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
    #[error("guest access at {gpa:#x} goes through slot {slot} to host address {hva:#x}, beyond its buffer; scenarios must not access that part of a slot")]
    Unbacked {
        /// The address.
        gpa: u64,
        /// The slot id.
        slot: u32,
        /// The host address it maps to.
        hva: u64,
    },
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

/// What this kernel's KVM offers (for messages and test output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmInfo {
    /// `KVM_CAP_NR_MEMSLOTS`.
    pub nr_memslots: i32,
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`.
    pub address_spaces: i32,
}

/// Whether `/dev/kvm` can be opened and a VM created; `Err` says why not.
pub fn probe() -> Result<KvmInfo, String> {
    let (_kvm, vm) = open()?;
    Ok(KvmInfo {
        nr_memslots: vm.check_extension_int(Cap::NrMemslots),
        address_spaces: vm.check_extension_raw(KVM_CAP_MULTI_ADDRESS_SPACE.into()),
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
    /// Sizes of the accepted slots of every address space, by KVM's `slot` number (the size of
    /// the bitmap `KVM_GET_DIRTY_LOG` writes).
    sizes: BTreeMap<u32, u64>,
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
        if let Err(why) = crate::dirty::enable_manual(&vm) {
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
    let cpuid =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for i in 0..scenario.vm.vcpus {
        let v = vm.create_vcpu(u64::from(i)).map_err(ioctl("KVM_CREATE_VCPU"))?;
        v.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        let s = v.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        v.set_sregs(&guest::sregs(s)).map_err(ioctl("KVM_SET_SREGS"))?;
        vcpus.push(v);
    }
    let mut slots = BTreeMap::new();
    let own_id = u16::try_from(OWN_SLOT).unwrap_or(u16::MAX);
    slots.insert(own_id, SlotState { gpa: 0, size: OWN_SIZE as u64, uaddr: own.addr() });
    let sizes = BTreeMap::from([(OWN_SLOT, OWN_SIZE as u64)]);
    let m = KvmMachine { vcpus, vm, own, bufs: Vec::new(), _kvm: kvm, slots, sizes };
    Ok(Start::Run(Box::new(m)))
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

    /// Refuses an access that would reach host memory outside every buffer through a slot.
    fn check_backed(&self, gpa: u64, n: u64) -> Result<(), KvmError> {
        let hit = self.slots.iter().find(|(_, s)| gpa >= s.gpa && gpa - s.gpa < s.size);
        if let Some((&id, s)) = hit {
            let hva = s.uaddr.wrapping_add(gpa - s.gpa);
            // A scenario's slot must lead into a scenario buffer (never into the backend's own
            // tables and code), the backend's slot into its own memory.
            let backed = if u32::from(id) == OWN_SLOT {
                self.own.contains(hva, n)
            } else {
                self.bufs.iter().any(|b| b.contains(hva, n))
            };
            if !backed {
                return Err(KvmError::Unbacked { gpa, slot: u32::from(id), hva });
            }
        }
        Ok(())
    }

    /// Runs `code` on vCPU `vcpu` until it reaches the sync store; returns RAX and the MMIO exit,
    /// if any. MMIO reads are answered with `reply`.
    fn run_access(
        &mut self,
        vcpu: u32,
        code: &[u8],
        gpa: u64,
        width: Width,
        reply: u64,
    ) -> Result<(u64, Option<Mmio>), KvmError> {
        self.check_backed(gpa, u64::from(width.bytes()))?;
        self.own.write_bytes(CODE as usize, code);
        let v = &mut self.vcpus[vcpu as usize];
        v.set_regs(&guest::regs()).map_err(ioctl("KVM_SET_REGS"))?;
        let mut mmio: Option<Mmio> = None;
        let check = |mmio: &Option<Mmio>, addr: u64, len: usize| {
            if mmio.is_some() || addr != gpa || len != width.bytes() as usize {
                return Err(KvmError::MmioMismatch {
                    gpa: addr,
                    len,
                    want_gpa: gpa,
                    want_len: width.bytes(),
                });
            }
            Ok(())
        };
        let exception_port = u16::from(EXCEPTION_PORT);
        let mut exception = None;
        loop {
            let exit = match v.run() {
                Ok(e) => e,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(KvmError::Run { errno: errno::name(e.errno()) }),
            };
            match exit {
                VcpuExit::MmioWrite(SYNC_GPA, _) => break,
                VcpuExit::IoOut(p, data) if p == exception_port => {
                    exception = Some(data.first().copied().unwrap_or(0xff));
                    break;
                }
                VcpuExit::MmioRead(addr, data) => {
                    check(&mmio, addr, data.len())?;
                    let bytes = reply.to_le_bytes();
                    let n = data.len().min(8);
                    data[..n].copy_from_slice(&bytes[..n]);
                    let len = width.bytes();
                    mmio = Some(Mmio { gpa: addr, len, data: reply & width.mask() });
                }
                VcpuExit::MmioWrite(addr, data) => {
                    check(&mmio, addr, data.len())?;
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
        }
        if let Some(vector) = exception {
            return Err(self.exception(vcpu, vector));
        }
        let regs = self.vcpus[vcpu as usize].get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        Ok((regs.rax, mmio))
    }

    /// Describes an exception the guest reported through its stub.
    fn exception(&self, vcpu: u32, vector: u8) -> KvmError {
        let v = &self.vcpus[vcpu as usize];
        let cr2 = v.get_sregs().map(|s| s.cr2).unwrap_or(0);
        // The CPU pushed [error code,] RIP, CS, RFLAGS, RSP, SS on the kernel stack.
        let frame = if has_error_code(vector) { 48 } else { 40 };
        let mut f = [0u8; 48];
        self.own.read_bytes((KSTACK_TOP - frame) as usize, &mut f[..frame as usize]);
        let (error_code, rip) =
            if has_error_code(vector) { (le(&f[0..8]), le(&f[8..16])) } else { (0, le(&f[0..8])) };
        KvmError::Exception { vector, rip, error_code, cr2 }
    }
}

impl Machine for KvmMachine {
    fn mem(&mut self, id: MemId, decl: &MemDecl) -> Result<(), BackendError> {
        debug_assert_eq!(id.0, self.bufs.len());
        let size = usize::try_from(decl.size).map_err(|_| KvmError::Mmap {
            size: decl.size,
            source: std::io::Error::other("larger than the address space"),
        })?;
        let m = Mapping::new(size).map_err(|source| KvmError::Mmap { size: decl.size, source })?;
        self.bufs.push(m);
        Ok(())
    }

    fn slot(&mut self, op: &SlotOp) -> Result<SlotResult, BackendError> {
        let uaddr = match &op.mem {
            Some(r) => self.buffer(r.mem).addr().wrapping_add(r.offset),
            None => 0,
        };
        let region = kvm_userspace_memory_region {
            slot: op.kvm_slot(),
            flags: op.flags.bits(),
            guest_phys_addr: op.gpa,
            memory_size: op.size,
            userspace_addr: uaddr,
        };
        // SAFETY: the request goes to KVM exactly as the scenario wrote it; KVM validates it.
        // Memory safety of this process does not depend on it: a slot can only make the guest
        // write to host memory behind it, and `check_backed` refuses every guest access whose
        // host address is not inside one of the buffers (which live as long as the VM), with a
        // PROT_NONE guard after each buffer as a second line of defence.
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => {
                if op.size == 0 {
                    self.sizes.remove(&op.kvm_slot());
                } else {
                    self.sizes.insert(op.kvm_slot(), op.size);
                }
                if op.as_id == 0 {
                    if op.size == 0 {
                        self.slots.remove(&op.id);
                    } else {
                        let s = SlotState { gpa: op.gpa, size: op.size, uaddr };
                        self.slots.insert(op.id, s);
                    }
                }
                Ok(SlotResult::Ok)
            }
            Err(e) => Ok(SlotResult::Err(errno::name(e.errno()))),
        }
    }

    fn read(&mut self, op: &ReadOp, mmio_reply: u64) -> Result<ReadExit, BackendError> {
        let code = code::read(op.gpa, op.width);
        let (rax, mmio) = self.run_access(op.vcpu, &code, op.gpa, op.width, mmio_reply)?;
        let value = rax & op.width.mask();
        Ok(match mmio {
            None => ReadExit::None { value },
            Some(m) => ReadExit::Mmio { gpa: m.gpa, len: m.len, value },
        })
    }

    fn write(&mut self, op: &WriteOp) -> Result<WriteExit, BackendError> {
        let code = code::write(op.gpa, op.width, op.value);
        let (_, mmio) = self.run_access(op.vcpu, &code, op.gpa, op.width, 0)?;
        Ok(match mmio {
            None => WriteExit::None,
            Some(m) => WriteExit::Mmio { gpa: m.gpa, len: m.len, data: m.data },
        })
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
            Err(e) => DirtyLogResult::Err(e),
        })
    }

    fn clear_dirty_log(&mut self, op: &ClearDirtyLogOp) -> Result<SlotResult, BackendError> {
        Ok(match crate::dirty::clear(&self.vm, op.kvm_slot(), op.first, op.count) {
            Ok(()) => SlotResult::Ok,
            Err(e) => SlotResult::Err(e),
        })
    }
}
