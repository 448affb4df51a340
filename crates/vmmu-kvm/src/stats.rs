//! A VM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14 and later): the file KVM hands out,
//! read whole and decoded into `name -> value` for the scalar counters.
//!
//! Layout (the kernel's `Documentation/virt/kvm/api.rst`, "KVM_GET_STATS_FD"): a header of six
//! `u32` (flags, name size, descriptor count, id offset, descriptor offset, data offset); each
//! descriptor is `u32` flags, `i16` exponent, `u16` size (in `u64`s), `u32` offset into the data,
//! `u32` bucket size, then the NUL-padded name; each value is `size` little-endian `u64`s at the
//! data offset plus its own. Every offset is checked against the bytes read: a short or
//! inconsistent file is an `InvalidData` error, never a panic.

use kvm_ioctls::VmFd;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `KVM_GET_STATS_FD`, `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;

/// The VM's statistics now: each counter's first value by name (histograms give their first
/// bucket; nothing here reads them).
pub fn vm_stats(vm: &VmFd) -> io::Result<BTreeMap<String, u64>> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new file descriptor; the VM
    // fd is valid for the call (borrowed from `vm`).
    let fd = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    decode(&bytes).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "KVM_GET_STATS_FD: malformed statistics file")
    })
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Decodes a statistics file; `None` where an offset or size leaves the bytes.
fn decode(b: &[u8]) -> Option<BTreeMap<String, u64>> {
    let name_size = u32_at(b, 4)? as usize;
    let count = u32_at(b, 8)? as usize;
    let desc_offset = u32_at(b, 16)? as usize;
    let data_offset = u32_at(b, 20)? as usize;
    let desc_size = name_size.checked_add(16)?;
    let mut out = BTreeMap::new();
    for i in 0..count {
        let d = desc_offset.checked_add(i.checked_mul(desc_size)?)?;
        let size = u16_at(b, d.checked_add(6)?)?;
        let offset = u32_at(b, d.checked_add(8)?)? as usize;
        let name = b.get(d.checked_add(16)?..d.checked_add(desc_size)?)?;
        let name = name.split(|&c| c == 0).next().unwrap_or_default();
        let name = std::str::from_utf8(name).ok()?;
        if size == 0 {
            continue;
        }
        out.insert(name.to_string(), u64_at(b, data_offset.checked_add(offset)?)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of two counters as the kernel lays it out.
    fn file(name_size: u32) -> Vec<u8> {
        let mut b = Vec::new();
        let desc_size = 16 + name_size as usize;
        let desc_offset = 24 + 8; // header, then an 8-byte id string
        let data_offset = desc_offset + 2 * desc_size;
        for v in [0, name_size, 2, 24, desc_offset as u32, data_offset as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(b"kvm-1\0\0\0");
        for (i, name) in ["mmu_cache_miss", "mmu_flooded"].iter().enumerate() {
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&0i16.to_le_bytes());
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&(8 * i as u32).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size as usize, 0);
            b.extend_from_slice(&n);
        }
        b.extend_from_slice(&7u64.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        b
    }

    #[test]
    fn decodes_counters_by_name() {
        let m = decode(&file(48)).expect("well formed");
        assert_eq!(m.get("mmu_cache_miss"), Some(&7));
        assert_eq!(m.get("mmu_flooded"), Some(&3));
    }

    #[test]
    fn a_short_or_inconsistent_file_is_refused_not_a_panic() {
        let good = file(48);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_none());
        let mut far = good;
        far[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&far).is_none());
    }
}
