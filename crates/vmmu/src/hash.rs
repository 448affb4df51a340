//! Fibonacci hashing of a key into a power-of-two table: the top bits of the key times 2^64
//! divided by the golden ratio. Keys a fixed stride apart (2 MiB regions of device windows at
//! round addresses, or of two vCPUs faulting in step through ranges far apart) spread over every
//! bucket, where the key's low bits would put them all in one.
//!
//! Used where a small table is indexed by a 2 MiB region: the TDP leaf-table cache's sets, the
//! stripes of the leaf counters, and the software machine's paging-structure cache.
//!
//! Also `KeyHasher`, the hasher of the crate's hash maps keyed by one integer (the shadow MMU's
//! bookkeeping, the memslots' dirty bitmaps), which need a hasher without std's random state.

/// 2^64 divided by the golden ratio, odd.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The bucket of `key` in a table of `buckets` buckets (a power of two, at least 2).
#[inline(always)]
pub const fn bucket(key: u64, buckets: usize) -> usize {
    assert!(buckets.is_power_of_two() && buckets >= 2, "buckets: a power of two, at least 2");
    (key.wrapping_mul(GOLDEN) >> (64 - buckets.trailing_zeros())) as usize
}

/// Hashes a key (one integer) with MurmurHash3's 64-bit finaliser: every bit of the key moves
/// the low bits (a hash table's index) and the top bits (its control bytes), so consecutive keys,
/// keys a table or a huge page apart, frames of a pool, and both address spaces all spread.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl core::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn write_u32(&mut self, n: u32) {
        self.0 ^= u64::from(n);
    }

    fn finish(&self) -> u64 {
        let mut k = self.0;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
}

/// A hash map keyed by one integer, hashed by [`KeyHasher`].
pub(crate) type KeyMap<K, V> = hashbrown::HashMap<K, V, core::hash::BuildHasherDefault<KeyHasher>>;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_stride_of_regions_spreads_over_every_bucket() {
        for stride in [1u64, 2, 8, 64, 128, 512] {
            let used: std::collections::BTreeSet<usize> =
                (0..64u64).map(|i| bucket(0x680 + i * stride, 8)).collect();
            assert_eq!(used.len(), 8, "stride {stride}");
        }
        assert!((0..1000u64).all(|k| bucket(k, 16) < 16));
    }
}
