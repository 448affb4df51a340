//! KVM's memslot selftests on real `/dev/kvm`, restated with this crate's guest (long mode,
//! CPL3, identity map of the low 64 GiB; [`crate::guest`]) so that `vmmu selftest` can put
//! KVM's figures next to the software machine's (`vmmu_sim::selftest`, which documents each
//! test). The parameters are the C tests'; the differences from them:
//!
//! - the guest's code, page tables and descriptor tables sit in slot [`OWN_SLOT`] at GPA 0 (the
//!   C tests' slot 0), so the perf test's data slots take the other ids from 0 up;
//! - the guest's loops are a few hand-assembled instructions ([`code`]) which the vCPU thread
//!   (re)starts with registers saying where to write, how many pages, which value; a pass ends
//!   with a byte store to [`SYNC_GPA`] (an MMIO exit: this host's PVM raises #GP on `out` at
//!   CPL3, so the C tests' port-I/O ucalls are MMIO stores here);
//! - `guest_perform_sync`/`host_perform_sync` on the sync page become: the guest's pass ends with
//!   its sync exit, and the vCPU thread waits, outside `KVM_RUN`, for the host's sync; the move
//!   tests' exit flag is a byte of the guest's own memory the guest polls once per pass;
//! - `memslot_modification_stress_test`'s memory goes at the top of the identity-mapped 64 GiB,
//!   not at the top of the guest-physical space.
//!
//! Without a usable `/dev/kvm`, every test fails with [`SelftestError::Unavailable`]. The
//! parameters, outcomes and errors are `vmmu_selftest`'s, shared with the software machine.

use crate::code::SYNC_GPA;
use crate::errno;
use crate::guest::{self, CODE, OWN_SIZE, OWN_SLOT};
use crate::mapping::Mapping;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

pub use vmmu_selftest::{Result, SelftestError};

fn failed(e: impl std::fmt::Display) -> SelftestError {
    SelftestError::Failed(e.to_string())
}

/// The guest reports a failed check by storing the value it saw here (MMIO: no slot).
pub const FAIL_GPA: u64 = SYNC_GPA + 8;
/// The move tests' exit flag (a byte of the guest's own memory, in its unused user stack).
const EXIT_FLAG_GPA: u64 = 0x6800;
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);
const PAGE: u64 = 4096;

/// The guest's routines, at fixed offsets of the code page.
pub mod code {
    use super::{FAIL_GPA, SYNC_GPA};

    /// Write loop: `rcx` times `mov [rdi], rbx; add rdi, 4096`, then the sync exit.
    pub const WRITE: u64 = 0x000;
    /// Verify loop: `rcx` pages from `rdi`: the u64 must equal `rbx` (else its value is stored to
    /// [`FAIL_GPA`]), then it is zeroed; then the sync exit.
    pub const VERIFY: u64 = 0x100;
    /// Spin: read the u64 at `r10` until it differs from `rbx`; the value is left in `rax`;
    /// then the sync exit.
    pub const SPIN: u64 = 0x200;
    /// Move loop: write `rbx` to 50 pages from `rdi`, again and again, until the byte at `r11`
    /// is not 0; then the sync exit.
    pub const MOVE: u64 = 0x300;

    fn sync(c: &mut Vec<u8>) {
        c.extend_from_slice(&[0x49, 0xb9]); // mov r9, SYNC_GPA
        c.extend_from_slice(&SYNC_GPA.to_le_bytes());
        c.extend_from_slice(&[0x41, 0x88, 0x01]); // mov byte [r9], al
        c.extend_from_slice(&[0x0f, 0x0b]); // ud2 (the host restarts the routine)
    }

    fn jcc(c: &mut Vec<u8>, op: u8, target: usize) {
        let rel = target as i64 - (c.len() as i64 + 2);
        c.extend_from_slice(&[op, rel as i8 as u8]);
    }

    /// The write loop's bytes.
    pub fn write() -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&[0x48, 0x89, 0x1f]); // mov [rdi], rbx
        c.extend_from_slice(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add rdi, 0x1000
        c.extend_from_slice(&[0x48, 0xff, 0xc9]); // dec rcx
        jcc(&mut c, 0x75, 0); // jnz top
        sync(&mut c);
        c
    }

    /// The verify loop's bytes.
    pub fn verify() -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&[0x48, 0x8b, 0x07]); // mov rax, [rdi]
        c.extend_from_slice(&[0x48, 0x39, 0xd8]); // cmp rax, rbx
        let jne = c.len();
        c.extend_from_slice(&[0x75, 0x00]); // jne fail (patched)
        c.extend_from_slice(&[0x48, 0xc7, 0x07, 0, 0, 0, 0]); // mov qword [rdi], 0
        c.extend_from_slice(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add rdi, 0x1000
        c.extend_from_slice(&[0x48, 0xff, 0xc9]); // dec rcx
        jcc(&mut c, 0x75, 0); // jnz top
        sync(&mut c);
        let fail = c.len();
        c[jne + 1] = (fail as i64 - (jne as i64 + 2)) as i8 as u8;
        c.extend_from_slice(&[0x49, 0xb9]); // mov r9, FAIL_GPA
        c.extend_from_slice(&FAIL_GPA.to_le_bytes());
        c.extend_from_slice(&[0x49, 0x89, 0x01]); // mov [r9], rax
        c.extend_from_slice(&[0x0f, 0x0b]); // ud2
        c
    }

    /// The spin's bytes; the loop is `[0, SPIN_LOOP_END)` of them.
    pub fn spin() -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&[0x49, 0x8b, 0x02]); // mov rax, [r10]
        c.extend_from_slice(&[0x48, 0x39, 0xd8]); // cmp rax, rbx
        jcc(&mut c, 0x74, 0); // je top
        sync(&mut c);
        c
    }

    /// Bytes of the spin loop proper (RIP stays below this while it spins).
    pub const SPIN_LOOP_END: u64 = 8;

    /// The move loop's bytes.
    pub fn move_loop() -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&[0x48, 0x89, 0xfe]); // mov rsi, rdi
        c.extend_from_slice(&[0x48, 0xc7, 0xc1, 50, 0, 0, 0]); // mov rcx, 50
        let inner = c.len();
        c.extend_from_slice(&[0x48, 0x89, 0x1e]); // mov [rsi], rbx
        c.extend_from_slice(&[0x48, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00]); // add rsi, 0x1000
        c.extend_from_slice(&[0x48, 0xff, 0xc9]); // dec rcx
        jcc(&mut c, 0x75, inner); // jnz inner
        c.extend_from_slice(&[0x41, 0x80, 0x3b, 0x00]); // cmp byte [r11], 0
        jcc(&mut c, 0x74, 0); // je top
        sync(&mut c);
        c
    }
}

/// Registers a routine starts with.
#[derive(Clone, Copy, Debug, Default)]
struct Start {
    rip: u64,
    rdi: u64,
    rcx: u64,
    rbx: u64,
    r10: u64,
}

/// How a stretch of `KVM_RUN` ended.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The routine's sync exit; `rax` then.
    Sync(u64),
    /// `KVM_EXIT_SHUTDOWN`.
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR`, RIP then.
    InternalError(u64),
}

/// The VM: the guest's own memory with the routines, and its vCPUs made on demand.
struct TestVm {
    // Field order is drop order: the VM before the memory it maps.
    vm: VmFd,
    own: Mapping,
    kvm: Kvm,
}

impl TestVm {
    fn new() -> Result<TestVm> {
        let kvm = Kvm::new().map_err(|e| SelftestError::Unavailable(format!("open: {e}")))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| SelftestError::Unavailable(format!("KVM_CREATE_VM: {e}")))?;
        let own = Mapping::new(OWN_SIZE).map_err(failed)?;
        for (gpa, bytes) in guest::image() {
            own.write_bytes(gpa as usize, &bytes);
        }
        for (at, bytes) in [
            (code::WRITE, code::write()),
            (code::VERIFY, code::verify()),
            (code::SPIN, code::spin()),
            (code::MOVE, code::move_loop()),
        ] {
            own.write_bytes((CODE + at) as usize, &bytes);
        }
        let t = TestVm { vm, own, kvm };
        // SAFETY: `own` is a field of the VM after `vm`, so it is dropped after it.
        unsafe { t.set_region(OWN_SLOT, 0, OWN_SIZE as u64, t.own.addr()) }?;
        Ok(t)
    }

    fn nr_memslots(&self) -> u64 {
        u64::try_from(self.vm.check_extension_int(Cap::NrMemslots)).unwrap_or(0)
    }

    /// One `KVM_SET_USER_MEMORY_REGION`.
    ///
    /// # Safety
    /// Unless `size` is 0 (a delete), `[hva, hva + size)` lies in a [`Mapping`] that is dropped
    /// after this VM: the guest may store anywhere in it as long as the VM runs.
    unsafe fn set_region(&self, slot: u32, gpa: u64, size: u64, hva: u64) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.set_region_flags(slot, 0, gpa, size, hva) }
    }

    /// [`Self::set_region`] with `KVM_MEM_*` `flags`.
    ///
    /// # Safety
    /// As [`Self::set_region`].
    unsafe fn set_region_flags(
        &self,
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        hva: u64,
    ) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        };
        // SAFETY: this function's contract: a range of a `Mapping` dropped after this VM, or a
        // delete (size 0), which maps nothing.
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| {
            failed(format!(
                "KVM_SET_USER_MEMORY_REGION slot {slot} flags {flags:#x} gpa {gpa:#x} size \
                 {size:#x}: {}",
                errno::name(e.errno())
            ))
        })
    }

    fn vcpu(&self, id: u64) -> Result<VcpuFd> {
        let cpuid = self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(failed)?;
        let v = self.vm.create_vcpu(id).map_err(failed)?;
        v.set_cpuid2(&cpuid).map_err(failed)?;
        let s = v.get_sregs().map_err(failed)?;
        v.set_sregs(&guest::sregs(s)).map_err(failed)?;
        v.set_regs(&guest::regs()).map_err(failed)?;
        Ok(v)
    }
}

/// Starts `routine` with `s`'s registers.
fn start(v: &VcpuFd, s: Start) -> Result<()> {
    let mut r = v.get_regs().map_err(failed)?;
    r.rip = CODE + s.rip;
    r.rdi = s.rdi;
    r.rcx = s.rcx;
    r.rbx = s.rbx;
    r.r10 = s.r10;
    r.r11 = EXIT_FLAG_GPA;
    v.set_regs(&r).map_err(failed)
}

/// Runs until the routine's sync exit (or a shutdown / internal error); MMIO reads are answered
/// by `read`, MMIO writes other than the sync judged by `write` (`Err`: the test fails).
fn run_to_sync(
    v: &mut VcpuFd,
    read: &mut dyn FnMut(u64, usize) -> std::result::Result<u64, String>,
    write: &mut dyn FnMut(u64, usize) -> std::result::Result<(), String>,
) -> Result<Stop> {
    loop {
        let exit = match v.run() {
            Ok(VcpuExit::MmioWrite(SYNC_GPA, _)) => None,
            Ok(VcpuExit::MmioWrite(FAIL_GPA, data)) => {
                let mut b = [0u8; 8];
                b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
                Some(Err(format!("guest check failed: saw {:#x}", u64::from_le_bytes(b))))
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => Some(write(addr, data.len()).map(|()| true)),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let n = data.len().min(8);
                Some(read(addr, n).map(|val| {
                    data[..n].copy_from_slice(&val.to_le_bytes()[..n]);
                    true
                }))
            }
            Ok(VcpuExit::Shutdown) => return Ok(Stop::Shutdown),
            Ok(VcpuExit::InternalError) => {
                return Ok(Stop::InternalError(v.get_regs().map_err(failed)?.rip))
            }
            Ok(other) => Some(Err(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Some(Ok(true)),
            Err(e) => Some(Err(format!("KVM_RUN failed: {}", errno::name(e.errno())))),
        };
        match exit {
            None => return Ok(Stop::Sync(v.get_regs().map_err(failed)?.rax)),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                let rdi = v.get_regs().map(|r| r.rdi).unwrap_or(0);
                return Err(failed(format!("{e} (guest rdi {rdi:#x})")));
            }
        }
    }
}

fn no_mmio_read(addr: u64, _: usize) -> std::result::Result<u64, String> {
    Err(format!("unexpected MMIO read at {addr:#x}"))
}

fn no_mmio_write(addr: u64, _: usize) -> std::result::Result<(), String> {
    Err(format!("unexpected MMIO write at {addr:#x}"))
}

/// `set_memory_region_test`'s MOVE and DELETE on KVM.
pub mod set_memory_region {
    use super::*;

    pub use vmmu_selftest::set_memory_region::{
        Outcome, MEM_REGION_GPA, MEM_REGION_SIZE, MEM_REGION_SLOT, MMIO_VAL,
    };

    /// The guest's spins, in order: (value spun on, allowed results), as the C guest's.
    type Phase = (u64, &'static [u64]);

    fn guest(
        v: &mut VcpuFd,
        phases: &[Phase],
        tx: &mpsc::Sender<()>,
        mmio: &AtomicU64,
    ) -> Result<Stop> {
        let mut read = |addr: u64, len: usize| {
            if addr != MEM_REGION_GPA || len != 8 {
                return Err(format!("unexpected MMIO read: {len} bytes at {addr:#x}"));
            }
            mmio.fetch_add(1, Ordering::Relaxed);
            Ok(MMIO_VAL)
        };
        let _ = tx.send(()); // GUEST_SYNC(0)
        for &(spin, allowed) in phases {
            start(
                v,
                Start { rip: code::SPIN, rbx: spin, r10: MEM_REGION_GPA, ..Start::default() },
            )?;
            match run_to_sync(v, &mut read, &mut no_mmio_write)? {
                Stop::Sync(val) if allowed.contains(&val) => {
                    let _ = tx.send(());
                }
                Stop::Sync(val) => {
                    return Err(failed(format!(
                        "guest assertion failed: spinning on {spin:#x} it saw {val:#x}, allowed \
                         {allowed:#x?}"
                    )))
                }
                other => return Ok(other),
            }
        }
        // The final spin (DELETE: until the code slot goes away).
        start(
            v,
            Start { rip: code::SPIN, rbx: MMIO_VAL, r10: MEM_REGION_GPA, ..Start::default() },
        )?;
        run_to_sync(v, &mut read, &mut no_mmio_write)
    }

    fn wait(rx: &mpsc::Receiver<()>, what: &str) -> Result<()> {
        rx.recv_timeout(SYNC_TIMEOUT)
            .map_err(|_| failed(format!("the guest did not sync within 2 s after {what}")))?;
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    /// MOVE, `loops` times.
    pub fn test_move(loops: u32) -> Result<Outcome> {
        let t0 = Instant::now();
        let mut out = Outcome::default();
        for _ in 0..loops {
            out.mmio_exits += once(SlotChange::Move)?;
            out.loops += 1;
        }
        out.elapsed = t0.elapsed();
        Ok(out)
    }

    /// DELETE, `loops` times.
    pub fn test_delete(loops: u32) -> Result<Outcome> {
        let t0 = Instant::now();
        let mut out = Outcome::default();
        for _ in 0..loops {
            out.mmio_exits += once(SlotChange::Delete)?;
            out.loops += 1;
        }
        out.elapsed = t0.elapsed();
        Ok(out)
    }

    /// What the host does to the test's memory slot while the guest spins on it.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum SlotChange {
        /// MOVE: the slot moves down a page and back.
        Move,
        /// DELETE: the slot is deleted, re-created, deleted, then the code slot too.
        Delete,
    }

    fn once(change: SlotChange) -> Result<u64> {
        let mut regions = vec![Mapping::new(MEM_REGION_SIZE as usize).map_err(failed)?];
        let vm = TestVm::new()?;
        let hva0 = regions[0].addr();
        // SAFETY: the range is a mapping of `regions`, declared before the VM (dropped after it).
        unsafe { vm.set_region(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, hva0) }?;
        let mut vcpu = vm.vcpu(0)?;
        let mmio = AtomicU64::new(0);
        let (tx, rx) = mpsc::channel();
        const MOVE: [Phase; 3] = [(0, &[1, MMIO_VAL]), (MMIO_VAL, &[1, 0]), (0, &[1, MMIO_VAL])];
        const DELETE: [Phase; 3] = [(0, &[MMIO_VAL]), (MMIO_VAL, &[0]), (0, &[MMIO_VAL])];
        let fresh = Mapping::new(MEM_REGION_SIZE as usize).map_err(failed)?;
        let fresh_hva = fresh.addr();
        regions.push(fresh);
        let result = std::thread::scope(|s| {
            let guest = s.spawn(|| {
                let phases: &[Phase] = match change {
                    SlotChange::Move => &MOVE,
                    SlotChange::Delete => &DELETE,
                };
                guest(&mut vcpu, phases, &tx, &mmio)
            });
            let host = || -> Result<()> {
                wait(&rx, "the guest started")?;
                if change == SlotChange::Move {
                    // SAFETY: the range is a mapping of `regions`, declared before the VM
                    // (dropped after it).
                    unsafe {
                        vm.set_region(MEM_REGION_SLOT, MEM_REGION_GPA - 4096, MEM_REGION_SIZE, hva0)
                    }?;
                    regions[0].store_u64(0, 2);
                    std::thread::sleep(Duration::from_millis(100));
                    regions[0].store_u64(0, 1);
                    // SAFETY: the range is a mapping of `regions`, declared before the VM
                    // (dropped after it).
                    unsafe {
                        vm.set_region(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, hva0)
                    }?;
                    wait(&rx, "the move back")?;
                    wait(&rx, "the move back (deferred sync)")
                } else {
                    // SAFETY: a delete (size 0) maps nothing.
                    unsafe { vm.set_region(MEM_REGION_SLOT, MEM_REGION_GPA, 0, 0) }?;
                    wait(&rx, "the delete")?;
                    // SAFETY: the range is a mapping of `regions`, declared before the VM
                    // (dropped after it).
                    unsafe {
                        vm.set_region(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, fresh_hva)
                    }?;
                    wait(&rx, "the re-create")?;
                    // SAFETY: a delete (size 0) maps nothing.
                    unsafe { vm.set_region(MEM_REGION_SLOT, MEM_REGION_GPA, 0, 0) }?;
                    wait(&rx, "the second delete")?;
                    // SAFETY: a delete (size 0) maps nothing.
                    unsafe { vm.set_region(OWN_SLOT, 0, 0, 0) }
                }
            };
            let host = host();
            let end = guest.join().unwrap_or_else(|_| Err(failed("the vCPU thread panicked")));
            (host, end)
        });
        let (host, end) = result;
        let end = end?;
        host?;
        let spin = CODE + code::SPIN..CODE + code::SPIN + code::SPIN_LOOP_END;
        match (change, end) {
            (SlotChange::Move, Stop::Sync(1)) => {}
            (SlotChange::Move, other) => {
                return Err(failed(format!("after the move back the guest must see 1: {other:?}")))
            }
            (SlotChange::Delete, Stop::Shutdown) => {}
            (SlotChange::Delete, Stop::InternalError(rip)) if spin.contains(&rip) => {}
            (SlotChange::Delete, other) => {
                return Err(failed(format!(
                    "after slot 0 is deleted the run must end in a shutdown, or an internal \
                     error with RIP in the final spin loop {spin:#x?}: {other:?}"
                )))
            }
        }
        drop(vm);
        drop(regions);
        Ok(mmio.load(Ordering::Relaxed))
    }
}

/// The host side of the guest's sync exits: the vCPU thread reports that the guest reached its
/// sync and waits for the host's (the C tests' `guest_perform_sync` / `host_perform_sync`).
#[derive(Default)]
struct SyncArea {
    arrived: AtomicBool,
    release: AtomicBool,
    exit: AtomicBool,
    /// Set by the vCPU thread when it stops (done or failed).
    gone: AtomicBool,
}

impl SyncArea {
    /// Host: waits for the guest's sync (2 s at most), then lets it go on.
    fn host_perform_sync(&self) -> Result<()> {
        let t = Instant::now();
        while !self.arrived.swap(false, Ordering::AcqRel) {
            if self.gone.load(Ordering::Acquire) {
                return Err(failed("the guest stopped before a sync"));
            }
            if t.elapsed() > SYNC_TIMEOUT {
                return Err(failed("host sync timed out after 2 s"));
            }
            std::thread::yield_now();
        }
        self.release.store(true, Ordering::Release);
        Ok(())
    }

    /// vCPU thread, at the guest's sync exit: false when told to exit.
    fn guest_perform_sync(&self) -> bool {
        self.arrived.store(true, Ordering::Release);
        loop {
            if self.exit.load(Ordering::Acquire) {
                return false;
            }
            if self.release.swap(false, Ordering::AcqRel) {
                return true;
            }
            std::thread::yield_now();
        }
    }
}

/// `memslot_perf_test` on KVM (see `vmmu_sim::selftest::perf` for each test).
pub mod perf {
    use super::*;

    use vmmu_selftest::perf::{host_loop, PerfHost, SlotLayout};
    pub use vmmu_selftest::perf::{
        Outcome, Params, PerfTest, MEM_GPA, MEM_TEST_GPA, MEM_TEST_MOVE_SIZE_PAGES,
        MEM_TEST_UNMAP_CHUNK_PAGES, MEM_TEST_VAL_1, MEM_TEST_VAL_2,
    };

    /// Which test, and its memory in pages (sync page included).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Test {
        kind: PerfTest,
        pages: u64,
    }

    struct Vm {
        // Drop order: the VM before the test memory.
        t: TestVm,
        mem: Mapping,
        /// The test slots (`1..=nslots`).
        layout: SlotLayout,
    }

    impl Vm {
        /// KVM slot id of test slot `k` (1-based): ids from 0, skipping the guest's own.
        fn id(k: u64) -> u32 {
            let id = (k - 1) as u32;
            if id >= OWN_SLOT {
                id + 1
            } else {
                id
            }
        }
        fn set(&self, k: u64, gpa: u64) -> Result<()> {
            let off = self.layout.slot_gpa(k) - MEM_GPA;
            // SAFETY: the slots tile `mem` (`SlotLayout`), a field of `Vm` after `t`
            // (field order: dropped after the VM).
            unsafe {
                let size = self.layout.slot_pages(k) * PAGE;
                self.t.set_region(Vm::id(k), gpa, size, self.mem.addr() + off)
            }
        }
        /// `MADV_DONTNEED` of `count` test pages from `first`, one call per slot piece.
        fn unmap(&self, first: u64, count: u64) -> Result<()> {
            for (gpa, end) in self.layout.pieces(first, count) {
                self.mem
                    .dontneed((gpa - MEM_GPA) as usize, (end - gpa) as usize)
                    .map_err(|e| failed(format!("madvise(MADV_DONTNEED) at gpa {gpa:#x}: {e}")))?;
            }
            Ok(())
        }
    }

    fn prepare(cap: Option<u32>, mempages: u64) -> Result<(Vm, Duration)> {
        let t = TestVm::new()?;
        let max = t.nr_memslots().min(cap.map_or(u64::MAX, u64::from));
        let layout = SlotLayout::new(max, mempages)?;
        let mem = Mapping::new((mempages * PAGE) as usize).map_err(failed)?;
        let vm = Vm { t, mem, layout };
        let t0 = Instant::now();
        for k in 1..=layout.nslots {
            vm.set(k, layout.slot_gpa(k))?;
        }
        Ok((vm, t0.elapsed()))
    }

    /// Runs `test` with `p`'s parameters (slot cap `None`: KVM's maximum): the best of
    /// `p.runs` runs.
    pub fn run(test: PerfTest, p: &Params) -> Result<Outcome> {
        let t = Test { kind: test, pages: p.sizes.pages(test) };
        vmmu_selftest::perf::best_of(p.runs, || run_once(t, p.slots, p.seconds))
    }

    fn run_once(test: Test, cap: Option<u32>, seconds: f64) -> Result<Outcome> {
        let mempages = test.pages;
        let (vm, slot_setup) = prepare(cap, mempages)?;
        let mut vcpu = vm.t.vcpu(0)?;
        let sync = SyncArea::default();
        let mmio = AtomicU64::new(0);
        let failure: Mutex<Option<SelftestError>> = Mutex::new(None);
        let mut nloops = 0u64;
        let mut runtime = Duration::ZERO;
        let (move_base, mmio_range) = match vm.layout.move_window(test.kind)? {
            Some(w) => (w.base, w.mmio),
            None => (0, None),
        };
        vm.t.own.store_u64(EXIT_FLAG_GPA as usize, 0);
        let host_res = std::thread::scope(|s| {
            let guest = s.spawn(|| {
                let r = guest(test, &mut vcpu, &sync, move_base, mmio_range.clone(), &mmio);
                if let Err(e) = r {
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
                sync.gone.store(true, Ordering::Release);
            });
            let t0 = Instant::now();
            let res = (|| -> Result<()> {
                loop {
                    runtime = t0.elapsed();
                    if runtime.as_secs_f64() >= seconds {
                        return Ok(());
                    }
                    host_loop(test.kind, test.pages, &Host { vm: &vm, sync: &sync })?;
                    nloops += 1;
                }
            })();
            sync.exit.store(true, Ordering::Release);
            vm.t.own.store_u64(EXIT_FLAG_GPA as usize, 1);
            let _ = guest.join();
            res
        });
        if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(f);
        }
        host_res?;
        Ok(Outcome {
            slots: (vm.layout.nslots + 1) as u32,
            pages_per_slot: vm.layout.pages_per_slot,
            slot_setup,
            iterations: nloops,
            per_iteration: (nloops > 0).then(|| runtime / nloops as u32),
            mmio_exits: mmio.load(Ordering::Relaxed),
        })
    }

    /// The test VM as the shared host loop sees it (`vmmu_selftest::perf::host_loop`).
    struct Host<'a> {
        vm: &'a Vm,
        sync: &'a SyncArea,
    }

    impl PerfHost for Host<'_> {
        fn unmap(&self, first: u64, count: u64) -> Result<()> {
            self.vm.unmap(first, count)
        }

        fn load(&self, off: u64) -> Result<u64> {
            Ok(self.vm.mem.load_u64(off as usize))
        }

        fn store(&self, off: u64, v: u64) -> Result<()> {
            self.vm.mem.store_u64(off as usize, v);
            Ok(())
        }

        fn perform_sync(&self) -> Result<()> {
            self.sync.host_perform_sync()
        }

        fn place_last_slot(&self, gpa: Option<u64>) -> Result<()> {
            let last = self.vm.layout.nslots;
            self.vm.set(last, gpa.unwrap_or_else(|| self.vm.layout.slot_gpa(last)))
        }
    }

    fn guest(
        test: Test,
        v: &mut VcpuFd,
        sync: &SyncArea,
        move_base: u64,
        mmio_range: Option<std::ops::RangeInclusive<u64>>,
        mmio: &AtomicU64,
    ) -> Result<()> {
        let mut write_ok = |addr: u64, len: usize| match &mmio_range {
            None => Err(format!("unexpected MMIO exit at {addr:#x}")),
            Some(_) if len != 8 => Err(format!("unexpected exit MMIO size = {len}")),
            Some(r) if !r.contains(&addr) => Err(format!("unexpected exit MMIO address {addr:#x}")),
            Some(_) => {
                mmio.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        };
        let mut pass = |v: &mut VcpuFd, s: Start| -> Result<()> {
            start(v, s)?;
            match run_to_sync(v, &mut no_mmio_read, &mut write_ok)? {
                Stop::Sync(_) => Ok(()),
                other => Err(failed(format!("the guest stopped: {other:?}"))),
            }
        };
        let w = |rdi, rcx, rbx| Start { rip: code::WRITE, rdi, rcx, rbx, r10: 0 };
        let p = test.pages;
        match test.kind {
            PerfTest::MoveActive | PerfTest::MoveInactive => pass(
                v,
                Start { rip: code::MOVE, rdi: move_base, rbx: MEM_TEST_VAL_1, ..Start::default() },
            ),
            PerfTest::Map => {
                let half = (p - 1) / 2;
                loop {
                    pass(v, w(MEM_TEST_GPA, half, MEM_TEST_VAL_1))?;
                    if !sync.guest_perform_sync() {
                        return Ok(());
                    }
                    pass(v, w(MEM_TEST_GPA + half * PAGE, half, MEM_TEST_VAL_2))?;
                    if !sync.guest_perform_sync() {
                        return Ok(());
                    }
                }
            }
            PerfTest::Unmap | PerfTest::UnmapChunked => {
                let half = (p - 1) / 2;
                loop {
                    pass(v, w(MEM_TEST_GPA, 1, MEM_TEST_VAL_1))?;
                    if !sync.guest_perform_sync() {
                        return Ok(());
                    }
                    pass(v, w(MEM_TEST_GPA + half * PAGE, 1, MEM_TEST_VAL_2))?;
                    if !sync.guest_perform_sync() {
                        return Ok(());
                    }
                }
            }
            PerfTest::Rw => loop {
                pass(v, w(MEM_TEST_GPA, p - 1, MEM_TEST_VAL_1))?;
                if !sync.guest_perform_sync() {
                    return Ok(());
                }
                let verify = Start {
                    rip: code::VERIFY,
                    rdi: MEM_TEST_GPA + PAGE / 2,
                    rcx: p - 1,
                    rbx: MEM_TEST_VAL_2,
                    r10: 0,
                };
                pass(v, verify)?;
                if !sync.guest_perform_sync() {
                    return Ok(());
                }
            },
        }
    }
}

/// `memslot_modification_stress_test` on KVM.
pub mod stress {
    use super::*;

    pub use vmmu_selftest::stress::{Outcome, Params, DUMMY_MEMSLOT_INDEX, TEST_SLOT};
    /// Top of the memory the guest's identity map covers (64 GiB).
    const TOP: u64 = 64 << 30;

    /// `p.vcpus` vCPUs, `p.bytes_per_vcpu` each, `p.iterations` add/delete pairs `p.delay`
    /// apart.
    pub fn run(p: &Params) -> Result<Outcome> {
        let Params { vcpus, bytes_per_vcpu, iterations, delay } = *p;
        let per = bytes_per_vcpu.next_multiple_of(PAGE);
        let size = per * vcpus as u64;
        if vcpus == 0 || size == 0 || size + 2 * PAGE > TOP / 2 {
            return Err(failed("give 1 or more vCPUs and at most 32 GiB of memory in all"));
        }
        let mem = Mapping::new(size as usize).map_err(failed)?;
        let dummy = Mapping::new(PAGE as usize).map_err(failed)?;
        let t = TestVm::new()?;
        let test_gpa = TOP - PAGE - size;
        // SAFETY: `mem` is declared before the VM, so it is dropped after it.
        unsafe { t.set_region(TEST_SLOT, test_gpa, size, mem.addr()) }?;
        let mut fds = (0..vcpus).map(|i| t.vcpu(i as u64)).collect::<Result<Vec<_>>>()?;
        let stop = AtomicBool::new(false);
        let passes = AtomicU64::new(0);
        let running = std::sync::atomic::AtomicUsize::new(0);
        let failure: Mutex<Option<SelftestError>> = Mutex::new(None);
        let t0 = Instant::now();
        let updates = std::thread::scope(|s| {
            for (i, v) in fds.iter_mut().enumerate() {
                let (stop, passes, failure, running) = (&stop, &passes, &failure, &running);
                s.spawn(move || {
                    let st = Start {
                        rip: code::WRITE,
                        rdi: test_gpa + i as u64 * per,
                        rcx: per / PAGE,
                        rbx: 1,
                        r10: 0,
                    };
                    running.fetch_add(1, Ordering::SeqCst);
                    while !stop.load(Ordering::Relaxed) {
                        let r = start(v, st)
                            .and_then(|()| run_to_sync(v, &mut no_mmio_read, &mut no_mmio_write));
                        match r {
                            Ok(Stop::Sync(_)) => {
                                passes.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(other) => {
                                *failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(failed(format!("vCPU {i}: invalid exit {other:?}")));
                                stop.store(true, Ordering::Relaxed);
                            }
                            Err(e) => {
                                *failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(failed(format!("vCPU {i}: {e}")));
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
            let mut updates = 0;
            let r = (|| -> Result<()> {
                // memstress_start_vcpu_threads: every vCPU thread is running first.
                while running.load(Ordering::SeqCst) < vcpus && !stop.load(Ordering::Relaxed) {
                    std::thread::yield_now();
                }
                for _ in 0..iterations {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(delay);
                    // SAFETY: `dummy` is declared before the VM, so it is dropped after it.
                    unsafe {
                        t.set_region(DUMMY_MEMSLOT_INDEX, test_gpa - PAGE, PAGE, dummy.addr())
                    }?;
                    // SAFETY: a delete (size 0) maps nothing.
                    unsafe { t.set_region(DUMMY_MEMSLOT_INDEX, test_gpa - PAGE, 0, 0) }?;
                    updates += 2;
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            r.map(|()| updates)
        });
        let elapsed = t0.elapsed();
        if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(f);
        }
        let updates = updates?;
        let passes = passes.load(Ordering::Relaxed);
        drop(fds);
        drop(t);
        Ok(Outcome { updates, accesses: passes * (per / PAGE), passes, elapsed })
    }
}

/// `dirty_log_perf_test` on KVM (`vmmu_sim::selftest::dirty_log_perf` documents the phases).
pub mod dirty_log_perf {
    use super::*;

    use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
    pub use vmmu_selftest::dirty_log_perf::{Outcome, Params, Protect, TEST_GPA, TEST_SLOT};

    /// `p.vcpus` vCPUs, `p.bytes_per_vcpu` each, `p.iterations` (at least 2), collected as
    /// `p.protect` says.
    pub fn run(p: &Params) -> Result<Outcome> {
        p.check()?;
        let Params { vcpus, bytes_per_vcpu, iterations, protect } = *p;
        let manual = protect != Protect::Auto;
        let per = bytes_per_vcpu.next_multiple_of(PAGE);
        let size = per * vcpus as u64;
        if TEST_GPA + size > 64 << 30 {
            return Err(SelftestError::Setup(
                "at most 60 GiB of memory in all (the guest maps 64 GiB, the test memory starts \
                 at 4 GiB)"
                    .into(),
            ));
        }
        let pages = size / PAGE;
        let count = u32::try_from(pages).map_err(|_| failed("too many pages for one slot"))?;
        let mem = Mapping::new(size as usize).map_err(failed)?;
        let t = TestVm::new()?;
        if manual {
            let initially = match protect {
                Protect::InitiallySet => crate::dirty::Initially::AllDirty,
                Protect::Auto | Protect::Manual => crate::dirty::Initially::Clean,
            };
            crate::dirty::enable_manual(&t.vm, initially).map_err(|e| {
                failed(format!("manual dirty-log protect: {e}; run without it (auto mode)"))
            })?;
        }
        // SAFETY: `mem` is declared before the VM, so it is dropped after it.
        unsafe { t.set_region(TEST_SLOT, TEST_GPA, size, mem.addr()) }?;
        let mut fds = (0..vcpus).map(|i| t.vcpu(i as u64)).collect::<Result<Vec<_>>>()?;
        let go = std::sync::Barrier::new(vcpus + 1);
        let done = std::sync::Barrier::new(vcpus + 1);
        let pass = AtomicU64::new(0);
        let failure: Mutex<Option<SelftestError>> = Mutex::new(None);
        let mut out = Outcome { pages, ..Outcome::default() };
        let result = std::thread::scope(|s| {
            for (i, v) in fds.iter_mut().enumerate() {
                let (go, done, pass, failure) = (&go, &done, &pass, &failure);
                s.spawn(move || loop {
                    go.wait();
                    let value = pass.load(Ordering::SeqCst);
                    if value == u64::MAX {
                        break;
                    }
                    let st = Start {
                        rip: code::WRITE,
                        rdi: TEST_GPA + i as u64 * per,
                        rcx: per / PAGE,
                        rbx: value,
                        r10: 0,
                    };
                    let r = start(v, st)
                        .and_then(|()| run_to_sync(v, &mut no_mmio_read, &mut no_mmio_write));
                    let bad = match r {
                        Ok(Stop::Sync(_)) => None,
                        Ok(other) => Some(failed(format!("vCPU {i}: invalid exit {other:?}"))),
                        Err(e) => Some(failed(format!("vCPU {i}: {e}"))),
                    };
                    if let Some(e) = bad {
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    }
                    done.wait();
                });
            }
            let vcpu_pass = |value: u64| -> Result<Duration> {
                pass.store(value, Ordering::SeqCst);
                let t0 = Instant::now();
                go.wait();
                done.wait();
                let d = t0.elapsed();
                match failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    Some(f) => Err(failed(format!("pass {value}: {f}"))),
                    None => Ok(d),
                }
            };
            let r = (|| -> Result<()> {
                out.populate = vcpu_pass(0)?;
                let t0 = Instant::now();
                // SAFETY: `mem` is declared before the VM, so it is dropped after it.
                unsafe {
                    t.set_region_flags(
                        TEST_SLOT,
                        KVM_MEM_LOG_DIRTY_PAGES,
                        TEST_GPA,
                        size,
                        mem.addr(),
                    )
                }?;
                out.enable = t0.elapsed();
                for it in 1..=iterations {
                    out.dirty.push(vcpu_pass(u64::from(it))?);
                    let t0 = Instant::now();
                    let words = crate::dirty::get(&t.vm, TEST_SLOT, size)
                        .map_err(|e| failed(format!("iteration {it}: KVM_GET_DIRTY_LOG: {e}")))?;
                    out.get.push(t0.elapsed());
                    vmmu_selftest::dirty_log_perf::check_all_dirty(&words, pages, it)?;
                    if manual {
                        let t0 = Instant::now();
                        crate::dirty::clear(&t.vm, TEST_SLOT, 0, count, Some(size)).map_err(
                            |e| failed(format!("iteration {it}: KVM_CLEAR_DIRTY_LOG: {e}")),
                        )?;
                        out.clear.push(t0.elapsed());
                    }
                }
                let t0 = Instant::now();
                // SAFETY: `mem` is declared before the VM, so it is dropped after it.
                unsafe { t.set_region(TEST_SLOT, TEST_GPA, size, mem.addr()) }?;
                out.disable = t0.elapsed();
                Ok(())
            })();
            pass.store(u64::MAX, Ordering::SeqCst);
            go.wait();
            r
        });
        drop(fds);
        drop(t);
        result.map(|()| out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(c: &[u8], at: usize) -> usize {
        (at as i64 + 2 + i64::from(c[at + 1] as i8)) as usize
    }

    #[test]
    fn routines_branch_to_their_labels() {
        let w = code::write();
        assert_eq!(target(&w, 13), 0, "jnz back to the top");
        let s = code::spin();
        assert_eq!(s[6], 0x74);
        assert_eq!(target(&s, 6), 0);
        assert_eq!(code::SPIN_LOOP_END, 8);
        let v = code::verify();
        let fail = target(&v, 6);
        assert_eq!(&v[fail..fail + 2], &[0x49, 0xb9], "jne lands on mov r9, FAIL_GPA");
        let m = code::move_loop();
        let jnz = m.iter().position(|&b| b == 0x75).expect("jnz");
        assert_eq!(target(&m, jnz), 10, "inner loop");
        let je = jnz + 2 + 4;
        assert_eq!((m[je], target(&m, je)), (0x74, 0));
        for c in [w, s, v, m] {
            assert!(c.len() < 0x100, "a routine fits its slot in the code page");
        }
    }
}

#[cfg(test)]
mod kvm_tests {
    use super::*;

    /// Runs `f` where `/dev/kvm` is usable; prints why not elsewhere.
    fn on_kvm<T: std::fmt::Debug>(what: &str, f: impl FnOnce() -> Result<T>) -> Option<T> {
        match f() {
            Err(SelftestError::Unavailable(why)) => {
                eprintln!("skipped {what}: /dev/kvm not usable: {why}");
                None
            }
            r => Some(r.unwrap_or_else(|e| panic!("{what}: {e}"))),
        }
    }

    #[test]
    fn set_memory_region_move_and_delete() {
        on_kvm("move", || set_memory_region::test_move(1));
        if let Some(d) = on_kvm("delete", || set_memory_region::test_delete(1)) {
            assert!(d.mmio_exits >= 2, "{d:?}");
        }
    }

    #[test]
    fn perf_tests_run_quickly() {
        let mib4 = (4 << 20) + PAGE;
        let sizes = vmmu_selftest::perf::Sizes { mem: mib4, map: mib4, unmap_test: 4 << 20 };
        let p = perf::Params { slots: Some(16), seconds: 0.1, runs: 1, sizes };
        for t in perf::PerfTest::ALL {
            if let Some(o) = on_kvm("perf", || perf::run(t, &p)) {
                assert!(o.iterations > 0, "{t:?}: {o:?}");
            }
        }
    }

    #[test]
    fn dirty_log_perf_runs_in_both_modes() {
        use dirty_log_perf::Protect;
        for protect in [Protect::InitiallySet, Protect::Manual, Protect::Auto] {
            let p = dirty_log_perf::Params {
                vcpus: 2,
                bytes_per_vcpu: 1 << 20,
                iterations: 2,
                protect,
            };
            if let Some(o) = on_kvm("dirty_log_perf", || dirty_log_perf::run(&p)) {
                assert_eq!((o.pages, o.get.len()), (512, 2), "{o:?}");
                let clears = if protect == Protect::Auto { 0 } else { 2 };
                assert_eq!(o.clear.len(), clears, "{o:?}");
            }
        }
    }

    #[test]
    fn stress_runs() {
        let p = stress::Params {
            vcpus: 2,
            bytes_per_vcpu: 1 << 20,
            iterations: 10,
            delay: Duration::ZERO,
        };
        on_kvm("stress", || stress::run(&p));
    }
}
