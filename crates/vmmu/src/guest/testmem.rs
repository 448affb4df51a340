//! A guest memory for tests and models of the walker and the shadow MMU: sparse 8-byte words in
//! backed 4 KiB frames, some frames read-only, and a hook that makes the next `cmpxchg` at an
//! address lose a race (a concurrent guest write lands first).
//!
//! Invariants: a word is readable iff its frame is backed (unwritten words of a backed frame read
//! 0); [`GuestMemoryMap::write`] backs the frame; `cmpxchg_gpte` never writes a read-only frame.
//! Single-threaded (interior mutability through `RefCell`: the type is not `Sync`).

use super::walk::{GpteWriteError, GuestPteMemory};
use crate::types::{Gfn, Gpa};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::cell::RefCell;

#[derive(Default, Debug)]
struct Inner {
    words: BTreeMap<u64, u64>,
    backed: BTreeSet<u64>,
    read_only: BTreeSet<u64>,
    /// Writes that land just before the next `cmpxchg` at their address, one each.
    races: Vec<(u64, u64)>,
    cmpxchg_calls: u64,
    swaps: u64,
}

/// Sparse guest memory (see the module doc).
#[derive(Default, Debug)]
pub struct GuestMemoryMap {
    inner: RefCell<Inner>,
}

impl GuestMemoryMap {
    /// Empty memory: nothing backed.
    pub fn new() -> Self {
        Self::default()
    }
    /// Writes the word at `gpa` (8-aligned), backing its frame.
    pub fn write(&self, gpa: Gpa, val: u64) {
        debug_assert_eq!(gpa.0 % 8, 0, "gPTEs are 8-aligned");
        let mut m = self.inner.borrow_mut();
        m.backed.insert(gpa.gfn().0);
        m.words.insert(gpa.0, val);
    }
    /// The word at `gpa`, if its frame is backed.
    pub fn read(&self, gpa: Gpa) -> Option<u64> {
        let m = self.inner.borrow();
        m.backed.contains(&gpa.gfn().0).then(|| m.words.get(&gpa.0).copied().unwrap_or(0))
    }
    /// Backs `gfn` (zero-filled where not written).
    pub fn back(&self, gfn: Gfn) {
        self.inner.borrow_mut().backed.insert(gfn.0);
    }
    /// Makes `gfn` unbacked: reads of it give `None` (its words are kept for a later `back`).
    pub fn unback(&self, gfn: Gfn) {
        self.inner.borrow_mut().backed.remove(&gfn.0);
    }
    /// Makes `gfn` read-only (`true`) or writable for `cmpxchg_gpte`.
    pub fn set_read_only(&self, gfn: Gfn, read_only: bool) {
        let mut m = self.inner.borrow_mut();
        if read_only {
            m.read_only.insert(gfn.0);
        } else {
            m.read_only.remove(&gfn.0);
        }
    }
    /// The next `cmpxchg_gpte` at `gpa` first sees `val` written there by "another vCPU".
    pub fn race_next_cmpxchg(&self, gpa: Gpa, val: u64) {
        self.inner.borrow_mut().races.push((gpa.0, val));
    }
    /// `cmpxchg_gpte` calls so far.
    pub fn cmpxchg_calls(&self) -> u64 {
        self.inner.borrow().cmpxchg_calls
    }
    /// Successful swaps so far.
    pub fn swaps(&self) -> u64 {
        self.inner.borrow().swaps
    }
}

impl GuestPteMemory for GuestMemoryMap {
    fn read_gpte(&self, gpa: Gpa) -> Option<u64> {
        self.read(gpa)
    }

    fn cmpxchg_gpte(&self, gpa: Gpa, old: u64, new: u64) -> Result<bool, GpteWriteError> {
        let mut m = self.inner.borrow_mut();
        m.cmpxchg_calls += 1;
        if let Some(i) = m.races.iter().position(|&(a, _)| a == gpa.0) {
            let (_, val) = m.races.remove(i);
            if m.backed.contains(&gpa.gfn().0) && !m.read_only.contains(&gpa.gfn().0) {
                m.words.insert(gpa.0, val);
            }
        }
        if !m.backed.contains(&gpa.gfn().0) {
            return Err(GpteWriteError::Unreadable);
        }
        if m.read_only.contains(&gpa.gfn().0) {
            return Err(GpteWriteError::NotWritable);
        }
        let cur = m.words.get(&gpa.0).copied().unwrap_or(0);
        if cur != old {
            return Ok(false);
        }
        m.words.insert(gpa.0, new);
        m.swaps += 1;
        Ok(true)
    }
}
