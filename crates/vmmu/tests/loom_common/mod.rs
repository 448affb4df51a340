//! What the loom models share: the model builder with room for the tables' 512-entry loops and
//! a default preemption bound of 2 (`LOOM_MAX_PREEMPTIONS` overrides it), and the check that a
//! model caught a bug by its property (a panic whose message says `VIOLATION`).
#![allow(dead_code)]

/// Runs `f` under loom with the models' bounds.
pub fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 200_000;
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    b.check(f);
}

/// Whether `f` panicked with a model's property violation (a message containing `VIOLATION`).
/// Any other panic (a setup assertion, a failed ioctl-like call) is passed on, so a model that
/// fails for another reason never counts as a catch.
pub fn violation(f: impl FnOnce()) -> bool {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(()) => false,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if msg.contains("VIOLATION") {
                true
            } else {
                std::panic::resume_unwind(p)
            }
        }
    }
}

/// A vCPU thread's life in these models: enter guest mode (handling what is pending first), then
/// spin on TLB hits, leaving only for a pending request, until `done`. `false` when it spun
/// `max_spins` times without being asked to leave: a grace period waited for a vCPU nobody
/// kicked.
pub fn run_in_guest_until(
    v: &mut vmmu::vcpu::Vcpu<vmmu::testing::TestHost>,
    done: &loom::sync::atomic::AtomicBool,
    max_spins: usize,
) -> bool {
    use vmmu::sync::Ordering;
    let mut spins = 0;
    loop {
        loop {
            if done.load(Ordering::Acquire) {
                return true;
            }
            v.service_requests().unwrap();
            if v.enter_guest_mode().is_ok() {
                break;
            }
        }
        // TLB hits: no exit of its own.
        while !v.requests_pending() {
            if done.load(Ordering::Acquire) {
                v.exit_guest_mode();
                return true;
            }
            spins += 1;
            if spins == max_spins {
                v.exit_guest_mode();
                return false;
            }
            loom::thread::yield_now();
        }
        v.exit_guest_mode();
    }
}
