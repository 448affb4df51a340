//! The memory of host buffers: an anonymous private mapping (`mmap`), as a VMM maps its guest's
//! RAM, on Unix; a zeroed heap allocation elsewhere.
//!
//! A mapping is zero-filled by the OS page by page on first touch, so a 16 GiB buffer costs what
//! the guest touches. It also lies where a VMM's guest RAM lies, in the mmap area just below the
//! stack, which matters to KVM's memslot check that `userspace_addr + memory_size` stays inside
//! the user address space (`access_ok`): a scenario's oversized slot over a small buffer gets the
//! verdict KVM gives the KVM backend's mapped buffers, not the one a heap address would get.
//!
//! Invariant: an [`AnonMemory`] owns `len` bytes at `base`, readable and writable, zero when
//! made, until it drops; nothing else unmaps or frees them.

use std::alloc::Layout;
use std::ptr::NonNull;

/// Owned, zero-filled memory.
#[derive(Debug)]
pub(crate) struct AnonMemory {
    base: NonNull<u8>,
    len: usize,
    /// `Some` for a heap allocation (its layout), `None` for a mapping.
    heap: Option<Layout>,
}

// SAFETY: the memory is owned (no other handle frees it) and plain bytes; whoever shares it
// between threads (the host buffer) accesses it only atomically.
unsafe impl Send for AnonMemory {}
// SAFETY: as above.
unsafe impl Sync for AnonMemory {}

impl AnonMemory {
    /// At least `len` zero bytes, and a pointer into them aligned to `align` (a power of two)
    /// with `len` bytes after it; `None` if the OS refuses or the sizes overflow.
    pub(crate) fn new(len: usize, align: usize) -> Option<(AnonMemory, NonNull<u8>)> {
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        // The alignment is added to the size and the pointer aligned by hand.
        let total = len.checked_add(align)?;
        let mem = Self::map(total).or_else(|| Self::heap(total))?;
        let addr = mem.base.as_ptr() as usize;
        let pad = addr.checked_next_multiple_of(align)? - addr;
        // `pad < align` and the memory has `len + align` bytes: the aligned part lies inside.
        let ptr = NonNull::new(mem.base.as_ptr().wrapping_add(pad))?;
        Some((mem, ptr))
    }

    #[cfg(unix)]
    fn map(len: usize) -> Option<AnonMemory> {
        // SAFETY: an anonymous private mapping at an address the kernel picks touches no
        // existing memory; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(AnonMemory { base: NonNull::new(p as *mut u8)?, len, heap: None })
    }

    #[cfg(not(unix))]
    fn map(_len: usize) -> Option<AnonMemory> {
        None
    }

    fn heap(len: usize) -> Option<AnonMemory> {
        let layout = Layout::from_size_align(len, 16).ok()?;
        // SAFETY: `layout` has a non-zero size (`len > 0`).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        Some(AnonMemory { base: NonNull::new(p)?, len, heap: Some(layout) })
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        match self.heap {
            // SAFETY: `base` came from `alloc_zeroed(layout)` and is freed once, here.
            Some(layout) => unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) },
            None => {
                #[cfg(unix)]
                // SAFETY: `base..base + len` is the mapping `map` made, unmapped once, here; no
                // reference into it outlives its owner.
                unsafe {
                    libc::munmap(self.base.as_ptr().cast(), self.len);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_zero_aligned_and_writable() {
        for (len, align) in [(4096, 4096), (3 << 21, 2 << 20), (1, 4096)] {
            let (mem, p) = AnonMemory::new(len, align).expect("memory");
            assert_eq!(p.as_ptr() as usize % align, 0);
            let start = p.as_ptr() as usize - mem.base.as_ptr() as usize;
            assert!(start + len <= mem.len);
            // SAFETY: `p..p + len` lies inside the owned memory (checked above), which nothing
            // else accesses.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), len) };
            assert!(bytes.iter().all(|&b| b == 0));
            bytes[len - 1] = 7;
            assert_eq!(bytes[len - 1], 7);
        }
        assert!(AnonMemory::new(0, 4096).is_none());
        assert!(AnonMemory::new(4096, 3).is_none());
    }
}
