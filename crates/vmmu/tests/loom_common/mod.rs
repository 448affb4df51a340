//! What the loom models share: the model builder with room for the tables' 512-entry loops and
//! a default preemption bound of 2 (`LOOM_MAX_PREEMPTIONS` overrides it).
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
