//! `dirty_log_perf_test`: vCPUs dirty their part of one slot while the host collects the dirty
//! log. Its constants, parameters, outcome and the check every GET must pass.

use crate::{Result, SelftestError};
use std::time::Duration;

/// The test memory's slot id (memstress's `TEST_MEM_SLOT_INDEX`).
pub const TEST_SLOT: u32 = 1;
/// The test memory's first guest-physical address (4 GiB, as memstress's default offset).
pub const TEST_GPA: u64 = 1 << 32;

/// How the test collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protect {
    /// `-g`: `KVM_GET_DIRTY_LOG` clears what it returns and write-protects it again.
    Auto,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` without "initially set": the GET only reads, a
    /// `KVM_CLEAR_DIRTY_LOG` of what it returned re-protects; enabling logging write-protects.
    Manual,
    /// As `Manual`, with `KVM_DIRTY_LOG_INITIALLY_SET` (the C test's default where the kernel
    /// offers it): logging starts with every page dirty and nothing write-protected.
    InitiallySet,
}

/// The test's parameters (the C test's flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// `-v`: vCPUs.
    pub vcpus: usize,
    /// `-b`: bytes per vCPU.
    pub bytes_per_vcpu: u64,
    /// `-i`: iterations (at least 2).
    pub iterations: u32,
    /// How the test collects.
    pub protect: Protect,
}

impl Default for Params {
    /// The C test's defaults: 1 vCPU, 1 GiB, 2 iterations, manual protect, initially set.
    fn default() -> Self {
        Params { vcpus: 1, bytes_per_vcpu: 1 << 30, iterations: 2, protect: Protect::InitiallySet }
    }
}

impl Params {
    /// Checks what every side needs: a vCPU, a page per vCPU and two iterations.
    pub fn check(&self) -> Result<()> {
        if self.vcpus == 0 || self.bytes_per_vcpu < 4096 {
            return Err(SelftestError::Setup(
                "give at least 1 vCPU and 4096 bytes per vCPU".into(),
            ));
        }
        if self.iterations < 2 {
            return Err(SelftestError::Setup(
                "dirty_log_perf_test makes at least 2 iterations".into(),
            ));
        }
        Ok(())
    }
}

/// The timed phases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Pages in the slot (every vCPU's part).
    pub pages: u64,
    /// Iteration 0: every vCPU writes all its memory.
    pub populate: Duration,
    /// Turning dirty logging on for the slot.
    pub enable: Duration,
    /// Per iteration: the vCPUs dirty all their memory.
    pub dirty: Vec<Duration>,
    /// Per iteration: `KVM_GET_DIRTY_LOG`.
    pub get: Vec<Duration>,
    /// Per iteration: `KVM_CLEAR_DIRTY_LOG` (empty without manual protect).
    pub clear: Vec<Duration>,
    /// Turning dirty logging off.
    pub disable: Duration,
}

/// The mean of `d` (zero for none).
pub fn mean(d: &[Duration]) -> Duration {
    match u32::try_from(d.len()) {
        Ok(n) if n > 0 => d.iter().sum::<Duration>() / n,
        _ => Duration::ZERO,
    }
}

/// Checks that `words` (a GET's bitmap, bit `p` for page `p`) holds every one of the slot's
/// `pages` pages: the vCPUs wrote them all since the previous collection. A page missing is a
/// lost dirty page: the test fails, naming the first one.
pub fn check_all_dirty(words: &[u64], pages: u64, iteration: u32) -> Result<()> {
    let has = |p: u64| {
        usize::try_from(p / 64)
            .ok()
            .and_then(|i| words.get(i))
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    };
    let Some(missing) = (0..pages).find(|&p| !has(p)) else {
        return Ok(());
    };
    let seen = (0..pages).filter(|&p| has(p)).count();
    Err(SelftestError::Failed(format!(
        "iteration {iteration}: KVM_GET_DIRTY_LOG returned {seen} of the {pages} pages the vCPUs \
         wrote (lost dirty pages; first missing: page {missing:#x})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_all_dirty_names_the_first_lost_page() {
        assert_eq!(check_all_dirty(&[u64::MAX, 0b111], 67, 1), Ok(()));
        // Bits past the slot's pages do not count.
        assert_eq!(check_all_dirty(&[u64::MAX, u64::MAX], 65, 1), Ok(()));
        let e = check_all_dirty(&[!(1 << 5), 0b1], 65, 2).expect_err("page 5 lost");
        assert!(e.to_string().contains("returned 64 of the 65 pages"), "{e}");
        assert!(e.to_string().contains("first missing: page 0x5"), "{e}");
        let e = check_all_dirty(&[u64::MAX], 65, 3).expect_err("a short bitmap loses page 64");
        assert!(e.to_string().contains("page 0x40"), "{e}");
    }

    #[test]
    fn params_are_checked_with_messages() {
        assert_eq!(Params::default().check(), Ok(()));
        let e = Params { iterations: 1, ..Params::default() }.check().expect_err("1 iteration");
        assert!(e.to_string().contains("at least 2 iterations"));
        let e = Params { vcpus: 0, ..Params::default() }.check().expect_err("no vCPU");
        assert!(e.to_string().contains("at least 1 vCPU"));
    }

    #[test]
    fn mean_of_nothing_is_zero() {
        assert_eq!(mean(&[]), Duration::ZERO);
        let ms = Duration::from_millis;
        assert_eq!(mean(&[ms(1), ms(3)]), ms(2));
    }
}
