//! Host buffers: anonymous, zero-filled, page-aligned mappings followed by an inaccessible guard.
//!
//! A slot may reach past the end of its buffer (KVM accepts that). The guard (reserved address
//! space, `PROT_NONE`, no memory behind it) makes sure that the part beyond the buffer is not
//! some other mapping of this process that a guest store could corrupt: a guest access there
//! makes `KVM_RUN` fail with `EFAULT`. The machine also refuses such accesses before running
//! them (see `KvmMachine::check_backed`), so the guard is the second line of defence.

use std::io;
use std::ptr::NonNull;

/// Address space reserved (not backed) after every buffer.
pub const GUARD: usize = 1 << 30;

/// One buffer: `len` readable and writable bytes at `base`, then `GUARD` bytes of `PROT_NONE`.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` zero-filled bytes (`len` a non-zero multiple of the page size).
    pub fn new(len: usize) -> io::Result<Mapping> {
        let total = len
            .checked_add(GUARD)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffer too large"))?;
        // SAFETY: an anonymous private mapping at an address the kernel chooses; it aliases
        // nothing. MAP_NORESERVE: large buffers cost nothing until touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `p..p+len` lies inside the mapping just made, which nothing else uses yet.
        if unsafe { libc::mprotect(p, len, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping exactly the mapping made above, never handed out.
            unsafe { libc::munmap(p, total) };
            return Err(e);
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        Ok(Mapping { base, len })
    }

    /// The buffer's host-virtual address.
    pub fn addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Whether `[hva, hva + n)` lies inside the buffer.
    pub fn contains(&self, hva: u64, n: u64) -> bool {
        let a = self.addr();
        hva >= a && hva.checked_add(n).is_some_and(|e| e <= a + self.len as u64)
    }

    /// Copies `bytes` to `offset`, one volatile byte store at a time: a guest may run on this
    /// memory on another thread (the selftests' and the benchmark's vCPUs do), so the copy makes
    /// no assumption about what else reads or writes it. Panics if the range is outside the
    /// buffer (a caller bug: the parser only admits in-buffer host accesses).
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        assert!(offset.checked_add(bytes.len()).is_some_and(|e| e <= self.len));
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: `offset + i` is inside the writable part of the mapping (asserted above),
            // which lives as long as `self`; a volatile store is defined whatever a guest does to
            // the byte meanwhile (the guest is outside Rust's memory model).
            unsafe { std::ptr::write_volatile(self.base.as_ptr().add(offset + i), b) };
        }
    }

    /// Reads `out.len()` bytes at `offset`, one volatile byte load at a time (as
    /// [`Mapping::write_bytes`]). Panics if the range is outside the buffer.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset.checked_add(out.len()).is_some_and(|e| e <= self.len));
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: as in `write_bytes`: inside the mapping, a volatile load.
            *o = unsafe { std::ptr::read_volatile(self.base.as_ptr().add(offset + i)) };
        }
    }
}

impl Mapping {
    /// Loads the u64 at `offset` (8-aligned) atomically: a running guest may store to it at the
    /// same time (the selftests' host threads read memory a vCPU is writing). Panics if the
    /// range is outside the buffer or misaligned.
    pub fn load_u64(&self, offset: usize) -> u64 {
        self.word(offset).load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stores `v` at `offset` (8-aligned) atomically; as [`Mapping::load_u64`].
    pub fn store_u64(&self, offset: usize, v: u64) {
        self.word(offset).store(v, std::sync::atomic::Ordering::SeqCst);
    }

    fn word(&self, offset: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(offset % 8 == 0 && offset.checked_add(8).is_some_and(|e| e <= self.len));
        // SAFETY: in bounds and 8-aligned (asserted; the base is page-aligned); the mapping
        // lives as long as `self`; every host access to words shared with a running guest
        // goes through atomics, and the guest's own accesses are outside Rust's model.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// `madvise(MADV_NOHUGEPAGE)` over the whole buffer: the kernel backs it with 4 KiB pages
    /// only, whatever the host's transparent-huge-page setting (`always` would otherwise give a
    /// 2 MiB-aligned part a huge page on first touch, zero-filled and writable as a whole, and
    /// let KVM map it with one 2 MiB leaf). Scenario observations about which pages a read
    /// dirties depend on that, and the recordings and the software machine assume 4 KiB pages.
    /// A kernel without THP refuses the advice (`EINVAL`) and has no huge pages anyway, so that
    /// error counts as success.
    pub fn no_huge_pages(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this private anonymous mapping's accessible part; the
        // advice changes how later faults are backed, not what the memory holds.
        let r =
            unsafe { libc::madvise(self.base.as_ptr().cast(), self.len, libc::MADV_NOHUGEPAGE) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            Ok(())
        } else {
            Err(e)
        }
    }

    /// `madvise(MADV_DONTNEED)` of `len` bytes at `offset` (page-aligned): the pages are
    /// dropped, KVM's MMU notifier zaps their SPTEs, the next touch faults in zeroed pages.
    pub fn dontneed(&self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset % 4096 == 0 && offset.checked_add(len).is_some_and(|e| e <= self.len));
        // SAFETY: the range lies inside this private anonymous mapping (asserted); dropping
        // its pages only makes later reads see zeroes, which every user of it expects.
        let r = unsafe {
            libc::madvise(self.base.as_ptr().add(offset).cast(), len, libc::MADV_DONTNEED)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped. The owner drops the VM (and so every memslot
        // that points here) before its mappings.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len + GUARD) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_filled_page_aligned_and_guarded() {
        let m = Mapping::new(8192).unwrap();
        assert_eq!(m.addr() % 4096, 0);
        let mut b = [1u8; 16];
        m.read_bytes(8192 - 16, &mut b);
        assert_eq!(b, [0; 16]);
        m.write_bytes(8, &[1, 2, 3]);
        m.read_bytes(8, &mut b[..3]);
        assert_eq!(&b[..3], &[1, 2, 3]);
        assert!(m.contains(m.addr() + 8184, 8));
        assert!(!m.contains(m.addr() + 8188, 8));
        assert!(!m.contains(m.addr() - 1, 1));
    }

    /// The advice lands on the buffer's VMA (`nh` in its smaps VmFlags where the kernel has
    /// THP) and leaves the memory as it was.
    #[test]
    fn no_huge_pages_marks_the_mapping() {
        let m = Mapping::new(4 << 20).unwrap();
        m.write_bytes(0x1000, &[7]);
        m.no_huge_pages().unwrap();
        let mut b = [0u8; 2];
        m.read_bytes(0x1000, &mut b);
        assert_eq!(b, [7, 0]);
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return;
        }
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", m.addr());
        let vma = smaps.split('\n').skip_while(|l| !l.starts_with(&start));
        let flags = vma.skip(1).find(|l| l.starts_with("VmFlags:")).unwrap().to_string();
        assert!(flags.split_whitespace().any(|f| f == "nh"), "{flags}");
    }
}
