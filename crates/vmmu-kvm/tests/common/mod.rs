//! Shared by the `/dev/kvm` integration tests.

/// Whether `/dev/kvm` is usable here; prints why not (the test then passes without running).
pub fn kvm() -> bool {
    match vmmu_kvm::probe() {
        Ok(_) => true,
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}
