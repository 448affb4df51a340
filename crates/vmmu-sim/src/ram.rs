//! Guest-sized accesses to host memory: the access [`Width`] and atomic loads and stores of 1, 2,
//! 4 or 8 bytes through raw pointers into host buffers.
//!
//! Invariant: every access is naturally aligned (the pointer is a multiple of its width), so it
//! is one atomic operation on the host, like a guest's aligned load or store, and never tears.
//! Each is carried out as an 8-byte atomic operation on the aligned word holding it, so that
//! accesses of different widths to the same bytes never race (see [`load`]).
//! Ordering is `Relaxed`: the data itself publishes nothing; every cross-thread ordering the
//! machine relies on (memslot updates, TLB flush requests, the oracle's clock) has its own
//! atomics with their own arguments.

use core::sync::atomic::{AtomicU64, Ordering};
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

/// The naturally aligned 8-byte word holding the byte at `ptr`, and the shift of an access of
/// `width` at `ptr` within the word's value.
#[inline]
fn word_of(ptr: *const u8, width: Width) -> (*mut u64, u32) {
    let off = ptr as usize & 7;
    let shift = if cfg!(target_endian = "little") {
        8 * off as u32
    } else {
        8 * (8 - off as u32 - width.bytes() as u32)
    };
    (ptr.wrapping_sub(off) as *mut u64, shift)
}

/// Loads `width` bytes at `ptr` atomically.
///
/// Every access, whatever its width, is an 8-byte atomic operation on the aligned word holding
/// it: Rust's memory model makes an atomic write that races with an atomic access of another
/// size to the same bytes undefined behaviour, and guests (and the VMM through
/// [`crate::host::HostBuffer`]) mix widths on the same memory from several threads.
///
/// # Safety
/// `ptr` is naturally aligned for `width`, the naturally aligned 8-byte word holding it is valid
/// for reads for the duration of the call (true of any in-bounds byte of a page-aligned host
/// buffer), and every concurrent access to that word goes through [`load`] and [`store`] (or
/// is another 8-byte atomic operation on it).
#[inline]
pub unsafe fn load(ptr: *const u8, width: Width) -> u64 {
    debug_assert!(width.is_aligned(ptr as u64));
    let (word, shift) = word_of(ptr, width);
    // SAFETY: the caller guarantees the word is valid and accessed only atomically with this
    // size; `word_of` aligned it to 8.
    let w = unsafe { AtomicU64::from_ptr(word) }.load(Ordering::Relaxed);
    (w >> shift) & width.mask()
}

/// Stores the low `width` bytes of `value` at `ptr` atomically: an 8-byte store, or a
/// compare-exchange loop on the aligned word that changes only the accessed bytes (see
/// [`load`]).
///
/// # Safety
/// As for [`load`], with validity for writes.
#[inline]
pub unsafe fn store(ptr: *mut u8, width: Width, value: u64) {
    debug_assert!(width.is_aligned(ptr as u64));
    let (word, shift) = word_of(ptr, width);
    // SAFETY: as in `load`.
    let a = unsafe { AtomicU64::from_ptr(word) };
    if width == Width::W8 {
        a.store(value, Ordering::Relaxed);
        return;
    }
    let mask = width.mask() << shift;
    let bits = (value & width.mask()) << shift;
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some((w & !mask) | bits));
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

    /// Sub-word stores are read-modify-writes of the whole word: concurrent stores to
    /// different bytes of one word must not undo each other.
    #[test]
    fn concurrent_stores_to_neighbouring_bytes_keep_each_other() {
        let word = AtomicU64::new(0);
        let p = word.as_ptr() as usize;
        std::thread::scope(|s| {
            for (byte, width) in [(0usize, Width::W1), (2, Width::W2), (4, Width::W4)] {
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        // SAFETY: `word` outlives the scope; every access to it is atomic and
                        // goes through `store`/`load`.
                        unsafe { store((p + byte) as *mut u8, width, i) };
                    }
                });
            }
        });
        // SAFETY: as above.
        let w = unsafe { load(p as *const u8, Width::W8) };
        assert_eq!(w & 0xff, 19_999 & 0xff);
        assert_eq!((w >> 16) & 0xffff, 19_999);
        assert_eq!(w >> 32, 19_999);
        assert_eq!((w >> 8) & 0xff, 0, "byte 1 was never written");
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
