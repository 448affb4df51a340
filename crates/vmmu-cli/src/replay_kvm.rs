//! The `/dev/kvm` half of `vmmu replay`.

use vmmu_sim::replay::{KvmReport, Trace};

/// A report saying the KVM run was skipped and why.
pub fn skipped(why: &str) -> KvmReport {
    KvmReport { skipped: Some(why.to_string()), ..KvmReport::default() }
}

/// Replays `trace` on `/dev/kvm`.
pub fn run(_trace: &Trace) -> KvmReport {
    skipped("not implemented yet")
}
