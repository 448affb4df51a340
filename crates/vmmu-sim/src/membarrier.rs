//! The host's process-wide memory barrier for the MMU's SRCU readers (`vmmu::host::Sched::
//! process_barrier`): Linux `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every
//! running thread of this process execute a full memory barrier before it returns (an IPI to
//! each CPU running one). With it, a vCPU's read sections are plain stores and a compiler fence;
//! the grace period pays the IPIs instead, and grace periods are rare.
//!
//! The command must be registered once per process; where the kernel lacks it (or on other
//! systems) [`process_barrier`] is `None` and the MMU's readers use full fences.

use std::sync::OnceLock;
use vmmu::srcu::ProcessBarrier;

/// The barrier, if this kernel offers it (registered on first use).
pub fn process_barrier() -> Option<ProcessBarrier> {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    if *AVAILABLE.get_or_init(register) {
        // SAFETY: `register` succeeded, so `barrier` runs `MEMBARRIER_CMD_PRIVATE_EXPEDITED`,
        // which makes every running thread of this process execute a full memory barrier before
        // it returns (a thread not running passes through the scheduler's barrier), and panics
        // if the call ever fails.
        Some(unsafe { ProcessBarrier::new(barrier) })
    } else {
        None
    }
}

#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

#[cfg(target_os = "linux")]
fn membarrier(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier(2) takes a command and flags (0) and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_long, 0 as libc::c_long) }
}

#[cfg(target_os = "linux")]
fn register() -> bool {
    let supported = membarrier(MEMBARRIER_CMD_QUERY);
    supported >= 0
        && supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
        && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
}

#[cfg(target_os = "linux")]
fn barrier() {
    if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 {
        // Registered above, so this cannot fail; if it ever did, a full fence on this side alone
        // would not order the readers: stop rather than risk a missed reader.
        panic!("membarrier(PRIVATE_EXPEDITED) failed after registration");
    }
}

#[cfg(not(target_os = "linux"))]
fn register() -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
fn barrier() {}

#[cfg(test)]
mod tests {
    #[test]
    fn the_barrier_runs_when_offered() {
        if let Some(b) = super::process_barrier() {
            b.call();
        }
    }
}
