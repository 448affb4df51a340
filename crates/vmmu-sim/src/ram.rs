//! Guest-sized accesses to host memory: the access [`Width`] and atomic loads and stores of 1, 2,
//! 4 or 8 bytes through raw pointers into host buffers.
//!
//! Invariant: every access is naturally aligned (the pointer is a multiple of its width), so it
//! is one atomic operation on the host, like a guest's aligned load or store, and never tears.
//! Ordering is `Relaxed`: the data itself publishes nothing; every cross-thread ordering the
//! machine relies on (memslot updates, TLB flush requests, the oracle's clock) has its own
//! atomics with their own arguments.

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use serde::Serialize;

/// The size of one guest access.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize)]
pub enum Width {
    /// One byte.
    W1,
    /// Two bytes.
    W2,
    /// Four bytes.
    W4,
    /// Eight bytes.
    W8,
}

impl Width {
    /// All widths, smallest first.
    pub const ALL: [Width; 4] = [Width::W1, Width::W2, Width::W4, Width::W8];

    /// The width in bytes.
    #[inline]
    pub const fn bytes(self) -> u64 {
        match self {
            Width::W1 => 1,
            Width::W2 => 2,
            Width::W4 => 4,
            Width::W8 => 8,
        }
    }

    /// The width of `bytes` bytes, if it is 1, 2, 4 or 8.
    pub const fn from_bytes(bytes: u64) -> Option<Width> {
        match bytes {
            1 => Some(Width::W1),
            2 => Some(Width::W2),
            4 => Some(Width::W4),
            8 => Some(Width::W8),
            _ => None,
        }
    }

    /// The mask of the value bits an access of this width carries.
    #[inline]
    pub const fn mask(self) -> u64 {
        match self {
            Width::W8 => u64::MAX,
            w => (1u64 << (8 * w.bytes())) - 1,
        }
    }

    /// Whether `addr` is naturally aligned for this width.
    #[inline]
    pub const fn is_aligned(self, addr: u64) -> bool {
        addr & (self.bytes() - 1) == 0
    }

    /// The bytes of `word` (little endian, as x86 stores it) that an access of this width at
    /// byte `offset % 8` of the word sees.
    #[inline]
    pub const fn extract(self, word: u64, offset: u64) -> u64 {
        (word >> (8 * (offset & 7))) & self.mask()
    }
}

/// Loads `width` bytes at `ptr` atomically.
///
/// # Safety
/// `ptr` is valid for reads of `width.bytes()` bytes for the duration of the call, is naturally
/// aligned for `width`, and every concurrent access to those bytes is atomic.
#[inline]
pub unsafe fn load(ptr: *const u8, width: Width) -> u64 {
    debug_assert!(width.is_aligned(ptr as u64));
    // SAFETY (all arms): the caller guarantees validity, alignment and that all concurrent
    // accesses are atomic, which is what `Atomic*::from_ptr` requires.
    unsafe {
        match width {
            Width::W1 => AtomicU8::from_ptr(ptr as *mut u8).load(Ordering::Relaxed) as u64,
            Width::W2 => AtomicU16::from_ptr(ptr as *mut u16).load(Ordering::Relaxed) as u64,
            Width::W4 => AtomicU32::from_ptr(ptr as *mut u32).load(Ordering::Relaxed) as u64,
            Width::W8 => AtomicU64::from_ptr(ptr as *mut u64).load(Ordering::Relaxed),
        }
    }
}

/// Stores the low `width` bytes of `value` at `ptr` atomically.
///
/// # Safety
/// As for [`load`], with validity for writes.
#[inline]
pub unsafe fn store(ptr: *mut u8, width: Width, value: u64) {
    debug_assert!(width.is_aligned(ptr as u64));
    // SAFETY (all arms): as in `load`.
    unsafe {
        match width {
            Width::W1 => AtomicU8::from_ptr(ptr).store(value as u8, Ordering::Relaxed),
            Width::W2 => {
                AtomicU16::from_ptr(ptr as *mut u16).store(value as u16, Ordering::Relaxed)
            }
            Width::W4 => {
                AtomicU32::from_ptr(ptr as *mut u32).store(value as u32, Ordering::Relaxed)
            }
            Width::W8 => AtomicU64::from_ptr(ptr as *mut u64).store(value, Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_round_trip_and_mask() {
        for w in Width::ALL {
            assert_eq!(Width::from_bytes(w.bytes()), Some(w));
        }
        assert_eq!(Width::from_bytes(3), None);
        assert_eq!(Width::W2.mask(), 0xffff);
        assert_eq!(Width::W8.mask(), u64::MAX);
        assert!(Width::W4.is_aligned(0x1004));
        assert!(!Width::W4.is_aligned(0x1002));
    }

    #[test]
    fn extract_is_little_endian() {
        let word = 0x8877_6655_4433_2211u64;
        assert_eq!(Width::W1.extract(word, 0), 0x11);
        assert_eq!(Width::W1.extract(word, 7), 0x88);
        assert_eq!(Width::W2.extract(word, 2), 0x4433);
        assert_eq!(Width::W4.extract(word, 4), 0x8877_6655);
        assert_eq!(Width::W8.extract(word, 0), word);
    }

    #[test]
    fn load_and_store_touch_only_their_bytes() {
        let mut buf = [0u64; 2];
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: `buf` is live, 8-aligned, and only this thread touches it.
        unsafe {
            store(p, Width::W8, 0x1111_2222_3333_4444);
            store(p.add(2), Width::W2, 0xabcd);
            assert_eq!(load(p, Width::W8), 0x1111_2222_abcd_4444);
            store(p.add(8), Width::W1, 0x1ff);
            assert_eq!(load(p.add(8), Width::W4), 0xff);
            assert_eq!(load(p.add(4), Width::W4), 0x1111_2222);
        }
    }
}
