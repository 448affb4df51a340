//! Dirty logging (KVM `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG`, `kvm_get_dirty_log_protect`
//! and `kvm_clear_dirty_log_protect`): the per-slot bitmap, the requests' checks in KVM's order,
//! and the collect-and-re-protect step every MMU shares.
//!
//! # The promise, and the rule that keeps it
//! A page the guest writes after a collection returned is in a later collection. The memslot
//! owns the bitmap ([`DirtyBitmap`], reached from a read section through
//! [`crate::memslot::MemslotSet::mark_page_dirty`]); the MMU makes writes to a logged slot fault
//! until the page is marked. Two sides, one lock:
//!
//! - a fault that installs a writable leaf in a logged slot marks the page *before* it installs
//!   the leaf (KVM `make_spte`), under the MMU lock it installs under (shared for the TDP MMU):
//!   the bit is set before any vCPU can write through the leaf, so a manual-mode GET, which
//!   reads the bitmap without the MMU lock, cannot run after such a write and miss the page (it
//!   could when the mark came after the install: `vcpu/fault_path.rs`); and no collection's
//!   exclusive hold sits between the mark and the install. A mark whose install does not happen
//!   (another vCPU's leaf serves) is a spurious dirty page, as in KVM;
//! - a collection takes the MMU lock *exclusive*, and for each bitmap word exchanges it with 0
//!   (or clears the requested bits) and write-protects the pages it took (the crate-internal
//!   trait `WriteProtect`), then flushes remote TLBs before it returns if a writable leaf lost
//!   its write right.
//!
//! So a write either went through a leaf that was writable before the collection's exclusive
//! hold (its page was marked before the hold began: the collection takes the bit) or through a
//! leaf made writable after it (marked again, for the next collection). The flush closes the
//! third way, a vCPU writing through a TLB entry of a leaf the collection just write-protected
//! (the re-injectable bug [`crate::bugs::Bug::DirtyLogNoFlush`] removes it). KVM's
//! `kvm_get_dirty_log_protect` and `kvm_clear_dirty_log_protect` flush whenever they took a dirty
//! bit; a page whose leaves were already read-only or gone leaves no writable translation to
//! flush, so vmmu flushes only when a leaf lost its write right, and its
//! `remote_tlb_flush_requests` can be lower than KVM's for the same guest.
//!
//! An MMU plugs in by implementing `WriteProtect` (the TDP MMU: `tdp/dirty.rs`; the shadow MMU:
//! `shadow/dirty.rs`, through its reverse map, with its shadow lock as the lock above) and by
//! marking pages with [`crate::memslot::MemslotSet::mark_page_dirty`] before it installs a
//! writable leaf in a logged slot, under its lock.
//!
//! With "initially set" ([`DirtyLogMode::InitiallySet`]) a slot starts logging with every bit
//! set and nothing write-protected, so writes through the mappings it had go unmarked; the
//! promise still holds because a bit leaves the bitmap only through `KVM_CLEAR_DIRTY_LOG`, which
//! write-protects (and flushes) what it clears, huge leaves included.

use crate::memslot::{Memslot, KVM_USER_MEM_SLOTS};
use crate::shadow::ShadowProtect;
use crate::shared::{VmMmu, VmShared};
use crate::sync::{AtomicU64, Ordering};
use crate::tdp::Tdp;
use crate::types::Gfn;
use alloc::vec::Vec;

/// How `KVM_GET_DIRTY_LOG` treats the bitmap (per VM: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum DirtyLogMode {
    /// KVM's default: GET returns the dirty pages, clears them and write-protects them again.
    #[default]
    Auto,
    /// Manual protect (`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, without "initially set"): GET only
    /// reads; `KVM_CLEAR_DIRTY_LOG` clears and re-protects.
    Manual,
    /// Manual protect with `KVM_DIRTY_LOG_INITIALLY_SET` (what QEMU and KVM's
    /// `dirty_log_perf_test` ask for where the kernel offers it): as [`Self::Manual`], but a
    /// slot that starts logging gets a bitmap with every page set and keeps its mappings as
    /// they are (nothing is write-protected, huge leaves stay); `KVM_CLEAR_DIRTY_LOG` then
    /// write-protects what it clears, splitting the huge leaves it meets (KVM
    /// `kvm_arch_mmu_enable_log_dirty_pt_masked` with eager page splitting), so a write after
    /// the clear faults and is logged at 4 KiB.
    InitiallySet,
}

impl DirtyLogMode {
    /// Whether `KVM_GET_DIRTY_LOG` only reads the bitmap (manual protect, with or without
    /// "initially set").
    pub const fn is_manual(self) -> bool {
        matches!(self, DirtyLogMode::Manual | DirtyLogMode::InitiallySet)
    }
}

/// Why a dirty-log request was refused, in KVM's order of checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The address space does not exist or the id is not a user slot (`EINVAL`).
    #[error("slot {id} of address space {as_id}: no such user slot id or address space")]
    BadSlot {
        /// The address space asked for.
        as_id: u16,
        /// The slot id asked for.
        id: u16,
    },
    /// `KVM_CLEAR_DIRTY_LOG`'s first page is not a multiple of 64 (`EINVAL`).
    #[error("first page {first} is not a multiple of 64")]
    FirstNotAligned {
        /// The first page asked for.
        first: u64,
    },
    /// No slot with this id, or the slot does not log dirty pages (`ENOENT`).
    #[error("slot {id} of address space {as_id} does not exist or has no dirty logging")]
    NoLog {
        /// The address space.
        as_id: u16,
        /// The slot id.
        id: u16,
    },
    /// `KVM_CLEAR_DIRTY_LOG`'s range leaves the slot, or its count is not a multiple of 64 and
    /// the range does not end at the slot's end (`EINVAL`).
    #[error("pages [{first}, {first}+{count}) do not fit slot of {npages} pages in 64-page units")]
    BadRange {
        /// The first page.
        first: u64,
        /// The number of pages.
        count: u64,
        /// The slot's pages.
        npages: u64,
    },
    /// The caller's bitmap is shorter than the range (`KVM_CLEAR_DIRTY_LOG`: KVM's
    /// `copy_from_user` fails), or a buffer for [`crate::vm::Vm::get_dirty_log_into`] is shorter
    /// than the slot's bitmap (where KVM's `copy_to_user` would fail): `EFAULT`.
    #[error("the bitmap has {words} words, the range needs {needed}")]
    BitmapTooShort {
        /// Words given.
        words: usize,
        /// Words needed.
        needed: usize,
    },
    /// [`crate::vm::Vm::get_dirty_log`] could not allocate the slot's bitmap (`ENOMEM`):
    /// checked before any bit is taken, so nothing is lost, and the same call may be retried
    /// (or [`crate::vm::Vm::get_dirty_log_into`] used with a buffer of the caller's).
    #[error(
        "no heap for a dirty bitmap of {words} words (nothing was collected; retry, or use \
         get_dirty_log_into)"
    )]
    OutOfHeap {
        /// Words the bitmap needs.
        words: usize,
    },
}

impl DirtyLogError {
    /// The errno name KVM returns.
    pub const fn errno(&self) -> &'static str {
        match self {
            DirtyLogError::NoLog { .. } => "ENOENT",
            DirtyLogError::BitmapTooShort { .. } => "EFAULT",
            DirtyLogError::OutOfHeap { .. } => "ENOMEM",
            _ => "EINVAL",
        }
    }

    /// The numeric errno (Linux x86: ENOENT 2, ENOMEM 12, EFAULT 14, EINVAL 22).
    pub const fn errno_value(&self) -> i32 {
        match self {
            DirtyLogError::NoLog { .. } => 2,
            DirtyLogError::BitmapTooShort { .. } => 14,
            DirtyLogError::OutOfHeap { .. } => 12,
            _ => 22,
        }
    }
}

/// The first check of both ioctls: `as_id < nr_as` and `id < KVM_USER_MEM_SLOTS`.
pub(crate) fn check_ids(as_id: u16, id: u16, nr_as: u16) -> Result<(), DirtyLogError> {
    if as_id >= nr_as || id >= KVM_USER_MEM_SLOTS {
        return Err(DirtyLogError::BadSlot { as_id, id });
    }
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG`'s range rule against a slot of `npages` pages.
pub(crate) fn check_clear_range(first: u64, count: u64, npages: u64) -> Result<(), DirtyLogError> {
    let bad = DirtyLogError::BadRange { first, count, npages };
    if first > npages {
        return Err(bad);
    }
    let left = npages - first;
    if count > left || (count < left && count % 64 != 0) {
        return Err(bad);
    }
    Ok(())
}

/// A slot's dirty bitmap: one bit per page, set by faults without a lock, collected under the
/// MMU lock held exclusive (module doc). KVM's `memslot->dirty_bitmap`.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: alloc::boxed::Box<[AtomicU64]>,
    npages: u64,
}

impl DirtyBitmap {
    /// A clear bitmap for `npages` pages, or `None` if the memory cannot be had.
    pub(crate) fn try_new(npages: u64) -> Option<Self> {
        let n = usize::try_from(npages.div_ceil(64)).ok()?;
        Some(DirtyBitmap { words: zeroed_words(n)?, npages })
    }

    /// The number of pages.
    #[inline]
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// The number of 64-bit words.
    #[inline]
    pub fn len_words(&self) -> usize {
        self.words.len()
    }

    /// Marks page `index` (KVM `set_bit_le` in `mark_page_dirty_in_slot`); an index past the
    /// last page marks nothing. Relaxed: the MMU
    /// lock orders it against CLEAR and auto-mode GET; against a manual-mode GET, which takes no
    /// MMU lock, the mark comes before the install of the leaf it is for (module doc), as in
    /// KVM, whose `set_bit_le` is the same relaxed atomic. No lock, no allocation.
    #[inline]
    pub fn mark(&self, index: u64) {
        if index >= self.npages {
            return;
        }
        if let Some(w) = self.words.get((index / 64) as usize) {
            w.fetch_or(1 << (index % 64), Ordering::Relaxed);
        }
    }

    /// Sets every page's bit ("initially set": a fresh bitmap nobody else sees yet).
    pub(crate) fn set_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            let left = self.npages - i as u64 * 64;
            let bits = if left >= 64 { u64::MAX } else { (1u64 << left) - 1 };
            w.store(bits, Ordering::Relaxed);
        }
    }

    /// A copy of the bits (manual mode's GET).
    pub fn snapshot(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.load(Ordering::Relaxed)).collect()
    }

    /// [`Self::snapshot`] into the first [`Self::len_words`] words of `out` (fewer if `out` is
    /// shorter). No allocation.
    pub fn snapshot_into(&self, out: &mut [u64]) {
        for (o, w) in out.iter_mut().zip(self.words.iter()) {
            *o = w.load(Ordering::Relaxed);
        }
    }

    /// Takes word `i` and leaves 0 (auto mode's GET).
    #[inline]
    fn take(&self, i: usize) -> u64 {
        self.words[i].swap(0, Ordering::Relaxed)
    }

    /// Clears `mask` in word `i`; returns the bits of `mask` that were set.
    #[inline]
    fn clear(&self, i: usize, mask: u64) -> u64 {
        // Cheap test first, as in `get_log_into`: a word with none of `mask` set needs no write
        // (and its page of a big bitmap stays unmapped). Callers hold the MMU lock exclusive, so no
        // fault marks the word between the load and the exchange (module doc).
        if self.words[i].load(Ordering::Relaxed) & mask == 0 {
            return 0;
        }
        mask & self.words[i].fetch_and(!mask, Ordering::Relaxed)
    }
}

/// `n` zero words, or `None` if the memory cannot be had. The allocator is asked for zeroed
/// memory rather than writing every word: for a big bitmap that is fresh pages the host maps on
/// first write, so a slot's bitmap costs memory where its pages are dirtied, not 256 MiB up front
/// for a slot of 2^31 pages (a scenario or trace of a few lines could otherwise make the process
/// allocate gigabytes).
#[cfg(not(loom))]
fn zeroed_words(n: usize) -> Option<alloc::boxed::Box<[AtomicU64]>> {
    use alloc::alloc::{alloc_zeroed, Layout};
    if n == 0 {
        return Some(Vec::new().into_boxed_slice());
    }
    let layout = Layout::array::<AtomicU64>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (`n > 0`).
    let p = unsafe { alloc_zeroed(layout) }.cast::<AtomicU64>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a fresh allocation of `layout` (`n` values of `AtomicU64`, its alignment)
    // by the global allocator, every byte zero; an `AtomicU64` has the in-memory representation
    // of a `u64`, so each is `AtomicU64::new(0)`. The box owns it and frees it with that layout.
    Some(unsafe { alloc::boxed::Box::from_raw(core::ptr::slice_from_raw_parts_mut(p, n)) })
}

/// `n` zero words (loom's atomics are not plain memory: made one by one).
#[cfg(loom)]
fn zeroed_words(n: usize) -> Option<alloc::boxed::Box<[AtomicU64]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.extend((0..n).map(|_| AtomicU64::new(0)));
    Some(v.into_boxed_slice())
}

/// What an MMU gives dirty logging: an exclusive hold of its lock, write protection of the pages
/// of one bitmap word, and a remote TLB flush (KVM `kvm_arch_mmu_enable_log_dirty_pt_masked`,
/// `kvm_flush_remote_tlbs_memslot`).
pub(crate) trait WriteProtect {
    /// Proof that the MMU lock is held exclusive.
    type Exclusive<'a>
    where
        Self: 'a;
    /// Takes the MMU lock exclusive.
    fn lock_exclusive(&self) -> Self::Exclusive<'_>;
    /// Removes the write right from every leaf mapping page `offset + b` of `slot` for each set
    /// bit `b` of `mask` (`offset` is a multiple of 64, relative to the slot's base gfn).
    /// Returns whether a leaf lost a write right (vCPUs may cache it: flush before relying on
    /// the protection).
    fn write_protect_masked(
        &self,
        excl: &Self::Exclusive<'_>,
        slot: &Memslot,
        offset: u64,
        mask: u64,
    ) -> bool;
    /// Flushes every vCPU's TLB; returns when each has acknowledged or was outside guest mode.
    fn flush_remote_tlbs(&self);
    /// Whether to skip the flush (the re-injected bug; `false` normally).
    fn skip_flush(&self) -> bool {
        false
    }
}

/// KVM `kvm_get_dirty_log_protect` on a slot that logs, with the slots lock held by the caller:
/// the bitmap's words (bit `i` = page `i` of the slot) into `out`, whose first
/// [`DirtyBitmap::len_words`] words it fills (the caller checked the length). Auto mode also
/// clears them and write-protects those pages, flushing before it returns. Allocates nothing.
pub(crate) fn get_log_into<M: WriteProtect>(
    mmu: &M,
    slot: &Memslot,
    bitmap: &DirtyBitmap,
    mode: DirtyLogMode,
    out: &mut [u64],
) {
    debug_assert!(out.len() >= bitmap.len_words());
    if mode.is_manual() {
        bitmap.snapshot_into(out);
        return;
    }
    let mut flush = false;
    {
        let excl = mmu.lock_exclusive();
        for (i, o) in out.iter_mut().enumerate().take(bitmap.len_words()) {
            // Cheap test first: most words of a big slot are 0 and need no exchange.
            let mask =
                if bitmap.words[i].load(Ordering::Relaxed) == 0 { 0 } else { bitmap.take(i) };
            *o = mask;
            if mask != 0 {
                flush |= mmu.write_protect_masked(&excl, slot, i as u64 * 64, mask);
            }
        }
    }
    if flush && !mmu.skip_flush() {
        mmu.flush_remote_tlbs();
    }
}

/// KVM `kvm_clear_dirty_log_protect` after the checks, with the slots lock held by the caller:
/// clears the bits of `bitmap` (bit `j` of word `k` = page `first + 64k + j`) over
/// `[first, first + count)` and write-protects the pages that were dirty, flushing before it
/// returns. `first` is a multiple of 64 and the range fits the slot (checked).
pub(crate) fn clear_log<M: WriteProtect>(
    mmu: &M,
    slot: &Memslot,
    log: &DirtyBitmap,
    first: u64,
    count: u64,
    bitmap: Option<&[u64]>,
) {
    debug_assert!(first % 64 == 0 && check_clear_range(first, count, log.npages()).is_ok());
    let words = count.div_ceil(64) as usize;
    // `None`: every bit of the range.
    let requests = (0..words).map(|k| bitmap.map_or(u64::MAX, |b| b.get(k).copied().unwrap_or(0)));
    let mut flush = false;
    {
        let excl = mmu.lock_exclusive();
        for (k, req) in requests.enumerate() {
            let i = (first / 64) as usize + k;
            if req == 0 || i >= log.len_words() {
                continue;
            }
            let mask = log.clear(i, req);
            if mask != 0 {
                flush |= mmu.write_protect_masked(&excl, slot, i as u64 * 64, mask);
            }
        }
    }
    if flush && !mmu.skip_flush() {
        mmu.flush_remote_tlbs();
    }
}

/// The pages of a returned bitmap, ascending (bit `i` of word `w` = page `64w + i`).
pub fn pages_of(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(|(w, &bits)| {
        let mut b = bits;
        core::iter::from_fn(move || {
            if b == 0 {
                return None;
            }
            let i = b.trailing_zeros() as u64;
            b &= b - 1;
            Some(w as u64 * 64 + i)
        })
    })
}

/// Calls `f` with the gfn of page `offset + b` of `slot` for each set bit `b` of `mask` that
/// lies in the slot (what every MMU's `WriteProtect::write_protect_masked` walks); returns
/// whether any call returned true.
pub(crate) fn any_masked_gfn(
    slot: &Memslot,
    offset: u64,
    mask: u64,
    mut f: impl FnMut(Gfn) -> bool,
) -> bool {
    let mut any = false;
    let mut m = mask;
    while m != 0 {
        let bit = m.trailing_zeros() as u64;
        m &= m - 1;
        let index = offset + bit;
        if index < slot.npages() {
            any |= f(gfn_of(slot, index));
        }
    }
    any
}

/// The gfn of page `index` of `slot`.
#[inline]
pub(crate) fn gfn_of(slot: &Memslot, index: u64) -> Gfn {
    Gfn(slot.base_gfn().raw() + index)
}

impl<H: crate::host::Host> VmShared<H> {
    /// `KVM_GET_DIRTY_LOG` (see [`crate::vm::Vm::get_dirty_log`]).
    pub(crate) fn get_dirty_log(&self, as_id: u16, id: u16) -> Result<Vec<u64>, DirtyLogError> {
        let mut log = Vec::new();
        let buf = &mut log;
        self.get_dirty_log_to(as_id, id, move |needed| {
            // Fallible: out of heap, `ENOMEM` before a bit is taken.
            buf.try_reserve_exact(needed)
                .map_err(|_| DirtyLogError::OutOfHeap { words: needed })?;
            buf.resize(needed, 0);
            Ok(buf.as_mut_slice())
        })?;
        Ok(log)
    }

    /// `KVM_GET_DIRTY_LOG` into the caller's buffer (see
    /// [`crate::vm::Vm::get_dirty_log_into`]): the words written.
    pub(crate) fn get_dirty_log_into(
        &self,
        as_id: u16,
        id: u16,
        out: &mut [u64],
    ) -> Result<usize, DirtyLogError> {
        self.get_dirty_log_to(as_id, id, |needed| {
            let words = out.len();
            out.get_mut(..needed).ok_or(DirtyLogError::BitmapTooShort { words, needed })
        })
    }

    /// `KVM_GET_DIRTY_LOG` into the buffer `buf` gives for the slot's bitmap (asked with its
    /// length in words, after the checks and before any bit is taken, so a buffer it refuses
    /// loses no dirty bit): the words written.
    fn get_dirty_log_to<'b>(
        &self,
        as_id: u16,
        id: u16,
        buf: impl FnOnce(usize) -> Result<&'b mut [u64], DirtyLogError>,
    ) -> Result<usize, DirtyLogError> {
        // KVM holds `slots_lock` for the whole ioctl: no memslot update meanwhile.
        let _serial = self.vmm_lock.lock_fair_with(&self.core.relax());
        self.memslots.with_dirty_log(
            as_id,
            id,
            || Ok(()),
            |slot, bitmap, mode| {
                let needed = bitmap.len_words();
                let out = buf(needed)?;
                let core = &self.core;
                match &self.mmu {
                    VmMmu::Shadow(shadow) => {
                        get_log_into(&ShadowProtect::new(core, shadow), slot, bitmap, mode, out)
                    }
                    VmMmu::Tdp(tdp) => get_log_into(&Tdp { core, tdp }, slot, bitmap, mode, out),
                }
                Ok(needed)
            },
        )
    }

    /// `KVM_CLEAR_DIRTY_LOG` (see [`crate::vm::Vm::clear_dirty_log`]).
    pub(crate) fn clear_dirty_log(
        &self,
        as_id: u16,
        id: u16,
        first: u64,
        count: u32,
        bitmap: Option<&[u64]>,
    ) -> Result<(), DirtyLogError> {
        let _serial = self.vmm_lock.lock_fair_with(&self.core.relax());
        let count = u64::from(count);
        self.memslots.with_dirty_log(
            as_id,
            id,
            || match first % 64 {
                0 => Ok(()),
                _ => Err(DirtyLogError::FirstNotAligned { first }),
            },
            |slot, log, _mode| {
                check_clear_range(first, count, slot.npages())?;
                // KVM does not check the mode: CLEAR works in auto mode too (checked on
                // /dev/kvm, `tests/scenarios/dirty_log_bad_requests.scn`).
                let needed = count.div_ceil(64) as usize;
                if let Some(bitmap) = bitmap.filter(|b| b.len() < needed) {
                    return Err(DirtyLogError::BitmapTooShort { words: bitmap.len(), needed });
                }
                let core = &self.core;
                match &self.mmu {
                    VmMmu::Shadow(shadow) => clear_log(
                        &ShadowProtect::new(core, shadow),
                        slot,
                        log,
                        first,
                        count,
                        bitmap,
                    ),
                    VmMmu::Tdp(tdp) => {
                        clear_log(&Tdp { core, tdp }, slot, log, first, count, bitmap)
                    }
                }
                Ok(())
            },
        )
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::types::{AsId, Hva, SlotId};
    use core::cell::RefCell;

    /// [`get_log_into`] into a buffer of the bitmap's length.
    fn get_log<M: WriteProtect>(
        mmu: &M,
        slot: &Memslot,
        bitmap: &DirtyBitmap,
        mode: DirtyLogMode,
    ) -> Vec<u64> {
        let mut out = alloc::vec![0; bitmap.len_words()];
        get_log_into(mmu, slot, bitmap, mode, &mut out);
        out
    }

    /// An MMU that records what it was asked to protect and flush.
    #[derive(Default)]
    struct Recorder {
        protected: RefCell<Vec<(u64, u64)>>,
        flushes: RefCell<u32>,
        locked: RefCell<bool>,
    }

    impl WriteProtect for Recorder {
        type Exclusive<'a> = ();
        fn lock_exclusive(&self) {
            *self.locked.borrow_mut() = true;
        }
        fn write_protect_masked(&self, _: &(), _: &Memslot, offset: u64, mask: u64) -> bool {
            assert!(*self.locked.borrow(), "protection outside the exclusive hold");
            self.protected.borrow_mut().push((offset, mask));
            true
        }
        fn flush_remote_tlbs(&self) {
            *self.flushes.borrow_mut() += 1;
        }
    }

    fn slot(npages: u64) -> Memslot {
        Memslot::new(AsId(0), SlotId(1), Gfn(0x100), npages, Hva(0), 1)
    }

    #[test]
    fn auto_get_takes_protects_and_flushes() {
        let s = slot(130);
        let b = DirtyBitmap::try_new(130).unwrap();
        for p in [0, 5, 64, 129] {
            b.mark(p);
        }
        let m = Recorder::default();
        let out = get_log(&m, &s, &b, DirtyLogMode::Auto);
        assert_eq!(pages_of(&out).collect::<Vec<_>>(), [0, 5, 64, 129]);
        assert_eq!(*m.protected.borrow(), [(0, 0x21), (64, 1), (128, 2)]);
        assert_eq!(*m.flushes.borrow(), 1);
        assert_eq!(b.snapshot(), [0, 0, 0], "auto mode clears what it returns");
        let again = get_log(&m, &s, &b, DirtyLogMode::Auto);
        assert_eq!(pages_of(&again).count(), 0);
        assert_eq!(*m.flushes.borrow(), 1, "nothing protected, nothing to flush");
    }

    #[test]
    fn manual_get_only_reads_and_clear_clears_the_requested_bits() {
        let s = slot(200);
        let b = DirtyBitmap::try_new(200).unwrap();
        for p in [1, 2, 70, 199] {
            b.mark(p);
        }
        let m = Recorder::default();
        let out = get_log(&m, &s, &b, DirtyLogMode::Manual);
        assert_eq!(pages_of(&out).collect::<Vec<_>>(), [1, 2, 70, 199]);
        assert!(m.protected.borrow().is_empty() && *m.flushes.borrow() == 0);
        // Clear page 1 only of the first word, and the whole tail from 128.
        clear_log(&m, &s, &b, 0, 64, Some(&[0b10]));
        clear_log(&m, &s, &b, 128, 72, Some(&[u64::MAX, u64::MAX]));
        assert_eq!(pages_of(&b.snapshot()).collect::<Vec<_>>(), [2, 70]);
        assert_eq!(*m.protected.borrow(), [(0, 0b10), (192, 1 << 7)]);
        assert_eq!(*m.flushes.borrow(), 2);
    }

    #[test]
    fn clear_range_rules() {
        assert!(check_clear_range(0, 64, 200).is_ok());
        assert!(check_clear_range(128, 72, 200).is_ok(), "a short count that ends at the end");
        assert!(check_clear_range(0, 200, 200).is_ok());
        assert!(check_clear_range(200, 0, 200).is_ok(), "empty range at the end");
        assert!(check_clear_range(0, 0, 200).is_ok());
        assert!(check_clear_range(0, 65, 200).is_err(), "not a multiple of 64, not at the end");
        assert!(check_clear_range(128, 73, 200).is_err(), "past the end");
        assert!(check_clear_range(256, 0, 200).is_err(), "first beyond the slot");
        assert!(check_ids(0, KVM_USER_MEM_SLOTS, 1).is_err());
        assert!(check_ids(1, 0, 1).is_err());
        assert!(check_ids(1, KVM_USER_MEM_SLOTS - 1, 2).is_ok());
    }

    /// The errno names and the numbers a VMM gets back (KVM returns `-ENOENT`, `-EFAULT`,
    /// `-EINVAL`). The numbers kill `errno_value`'s deleted `NoLog` and `BitmapTooShort` arms,
    /// which made both `EINVAL` (22).
    #[test]
    fn errnos() {
        let no_log = DirtyLogError::NoLog { as_id: 0, id: 0 };
        let short = DirtyLogError::BitmapTooShort { words: 0, needed: 1 };
        assert_eq!((no_log.errno(), no_log.errno_value()), ("ENOENT", 2));
        assert_eq!((short.errno(), short.errno_value()), ("EFAULT", 14));
        assert_eq!(DirtyLogError::BadSlot { as_id: 0, id: 0 }.errno(), "EINVAL");
        assert_eq!(DirtyLogError::FirstNotAligned { first: 1 }.errno_value(), 22);
    }
}
