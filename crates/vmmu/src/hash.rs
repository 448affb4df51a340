//! Fibonacci hashing of a key into a power-of-two table: the top bits of the key times 2^64
//! divided by the golden ratio. Keys a fixed stride apart (2 MiB regions of device windows at
//! round addresses, or of two vCPUs faulting in step through ranges far apart) spread over every
//! bucket, where the key's low bits would put them all in one.
//!
//! Used where a small table is indexed by a 2 MiB region: the TDP leaf-table cache's sets, the
//! stripes of the leaf counters, and the software machine's paging-structure cache.

/// 2^64 divided by the golden ratio, odd.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The bucket of `key` in a table of `buckets` buckets (a power of two, at least 2).
#[inline(always)]
pub const fn bucket(key: u64, buckets: usize) -> usize {
    assert!(buckets.is_power_of_two() && buckets >= 2, "buckets: a power of two, at least 2");
    (key.wrapping_mul(GOLDEN) >> (64 - buckets.trailing_zeros())) as usize
}

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
