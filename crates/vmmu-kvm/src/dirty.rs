//! The dirty-log ioctls as a scenario runs them: `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG` with
//! every bit of the range set, and `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` without "initially set"
//! (`vm dirty_log=manual`) or with it (`vmmu selftest dirty-log-perf`).
//!
//! Memory safety of GET rests on the bitmap being as large as KVM writes: KVM copies
//! `ALIGN(npages, 64) / 8` bytes of the slot it finds, so the caller passes the size of the slot
//! KVM accepted under that id (tracked from every accepted `KVM_SET_USER_MEMORY_REGION`), and
//! the buffer here is never smaller than that.

use crate::errno;
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use std::os::fd::AsRawFd;

/// Why a dirty-log ioctl gave no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DirtyError {
    /// KVM's answer: its errno name.
    #[error("{0}")]
    Kvm(String),
    /// This process could not allocate the bitmap (up to 256 MiB for a slot of 2^31 - 1 pages).
    #[error("cannot allocate a dirty bitmap of {} MiB: this process is out of memory", .bytes >> 20)]
    Alloc {
        /// Its size.
        bytes: u64,
    },
}

impl From<DirtyError> for String {
    fn from(e: DirtyError) -> String {
        e.to_string()
    }
}

/// A bitmap of `words` words, each `fill`, allocated fallibly.
fn bitmap(words: usize, fill: u64) -> Result<Vec<u64>, DirtyError> {
    let mut v = Vec::new();
    v.try_reserve_exact(words).map_err(|_| DirtyError::Alloc { bytes: words as u64 * 8 })?;
    v.resize(words, fill);
    Ok(v)
}

/// `KVM_GET_DIRTY_LOG`, `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_ae42;
/// `KVM_CLEAR_DIRTY_LOG`, `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;

fn last_errno() -> String {
    errno::name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// How a slot's log starts when logging is turned on under manual protect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Initially {
    /// Clean, with every page write-protected.
    Clean,
    /// Every page dirty and nothing write-protected (`KVM_DIRTY_LOG_INITIALLY_SET`).
    AllDirty,
}

/// Enables manual protect (with `KVM_DIRTY_LOG_INITIALLY_SET` for [`Initially::AllDirty`]);
/// `Err` says why it cannot be had.
pub(crate) fn enable_manual(vm: &VmFd, initially: Initially) -> Result<(), String> {
    let offered = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    let mut enable = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    if initially == Initially::AllDirty {
        enable |= u64::from(KVM_DIRTY_LOG_INITIALLY_SET);
    }
    if u64::try_from(offered).unwrap_or(0) & enable != enable {
        return Err(format!(
            "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 offers {offered:#x}, this needs {enable:#x}"
        ));
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [enable, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|e| format!("KVM_ENABLE_CAP: {}", errno::name(e.errno())))
}

/// `KVM_GET_DIRTY_LOG` of `slot`, whose accepted size is `size` bytes (0 if KVM has no slot
/// under that id): the bitmap's words, or KVM's errno name.
pub(crate) fn get(vm: &VmFd, slot: u32, size: u64) -> Result<Vec<u64>, DirtyError> {
    let pages = size.div_ceil(4096);
    let words = usize::try_from(pages.div_ceil(64))
        .map_err(|_| DirtyError::Alloc { bytes: pages.div_ceil(64).saturating_mul(8) })?;
    // One spare word: never a zero-length buffer, and room if KVM's rounding ever differed.
    let mut bitmap = bitmap(words + 1, 0)?;
    let arg = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 { dirty_bitmap: bitmap.as_mut_ptr().cast() },
    };
    // SAFETY: `arg` is a valid `struct kvm_dirty_log`; KVM writes `ALIGN(npages, 64) / 8` bytes
    // for the slot it finds under `slot`, whose size is `size` (module doc), so at most `words`
    // words, and `bitmap` has `words + 1`; it lives until the call returns.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_DIRTY_LOG as _, &arg) };
    if ret < 0 {
        return Err(DirtyError::Kvm(last_errno()));
    }
    bitmap.truncate(words);
    Ok(bitmap)
}

/// `KVM_CLEAR_DIRTY_LOG` of pages `[first, first + count)` of `slot` with every bit set: `Ok` or
/// KVM's errno name. `size`: the slot's size in bytes, when the caller knows the slot exists with
/// it. KVM checks the range against the slot before it reads the bitmap, so a range that does not
/// fit gets a one-word bitmap: a `count` of 2^32 - 1 then costs no 512 MiB of ones.
pub(crate) fn clear(
    vm: &VmFd,
    slot: u32,
    first: u64,
    count: u32,
    size: Option<u64>,
) -> Result<(), DirtyError> {
    let npages = size.map(|s| s >> 12);
    let refused = npages.is_some_and(|n| first > n || u64::from(count) > n - first);
    let words = if refused { 1 } else { (count as usize).div_ceil(64).max(1) };
    let mut bitmap = bitmap(words, u64::MAX)?;
    let arg = kvm_clear_dirty_log {
        slot,
        num_pages: count,
        first_page: first,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `arg` is a valid `struct kvm_clear_dirty_log` whose bitmap points to `words` words
    // that live until the call returns. KVM reads `ALIGN(count, 64) / 8` bytes of it only after
    // the range fits the slot: `words` is `ceil(count / 64)` (at least one) unless the slot's
    // known size refuses the range, and then KVM reads nothing.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &arg) };
    if ret < 0 {
        return Err(DirtyError::Kvm(last_errno()));
    }
    Ok(())
}

#[cfg(test)]
mod bitmap_tests {
    use super::{bitmap, DirtyError};

    /// A bitmap this process cannot allocate is an error naming its size, not an abort in the
    /// allocator's error handler (a scenario may dirty-log a slot of 2^31 - 1 pages: 256 MiB).
    #[test]
    fn a_bitmap_that_cannot_be_allocated_is_an_error() {
        let words = usize::MAX / 16;
        let e = bitmap(words, 0).unwrap_err();
        assert_eq!(e, DirtyError::Alloc { bytes: words as u64 * 8 });
        assert!(e.to_string().contains("out of memory"), "{e}");
        assert_eq!(bitmap(3, u64::MAX), Ok(vec![u64::MAX; 3]));
    }
}
