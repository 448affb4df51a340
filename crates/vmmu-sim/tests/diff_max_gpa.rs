//! `vmmu diff`'s largest-gpa allowance (`vmmu_scenario::diff::allow_tdp_max_gpa`) against a real
//! TDP defect: it reruns the TDP configurations at phys_bits=52, where NPT has no reserved
//! physical-address bit and so no MMIO caching, so an NPT MMIO-caching defect (the historical
//! `mmio-spte-ignores-gen`, re-injected into sim-npt-on only) vanishes there. Review 58c found the
//! allowance then called the file equal when it also held a slot past 2^phys_bits that TDP
//! refuses; each TDP configuration's two runs must now differ only where the refused slot can
//! change them. Runs with `--features historical-bugs`.
#![cfg(feature = "historical-bugs")]

use vmmu::bugs::{Bug, BugSet};
use vmmu_scenario::diff::{
    allow_tdp_max_gpa, compare_machine_sources, machine_configurations, machine_source_name,
    run_source, Configured, Source, Verdict,
};
use vmmu_scenario::{parse, Backend, Scenario};
use vmmu_sim::{SimBackend, SimBackendInjected};

fn backends() -> Vec<(String, Box<dyn Backend>)> {
    machine_configurations(None)
        .into_iter()
        .map(|(suffix, ov)| {
            let name = machine_source_name(&suffix);
            let inner: Box<dyn Backend> = if name == "sim-npt-on" {
                Box::new(SimBackendInjected { bugs: BugSet::only(Bug::MmioSpteIgnoresGen) })
            } else {
                Box::new(SimBackend)
            };
            let b: Box<dyn Backend> = Box::new(Configured::new(&name, inner, ov));
            (name, b)
        })
        .collect()
}

/// What `vmmu diff --no-kvm --no-expected` decides (diff_cmd.rs's `run`, minus the pinned
/// witness, which this unpinned file does not use).
fn verdict(text: &str) -> Verdict {
    let sc = parse(text).unwrap();
    let bs = backends();
    let sources: Vec<Source> = bs.iter().map(|(n, b)| run_source(n, b.as_ref(), &sc)).collect();
    let mut v = compare_machine_sources(&sources);
    if matches!(v, Verdict::Differ { .. }) {
        let rerun = |src: &Source, wide: &Scenario| match bs.iter().find(|(n, _)| *n == src.name) {
            Some((n, b)) => run_source(n, b.as_ref(), wide),
            None => src.clone(),
        };
        if let Some(w) = allow_tdp_max_gpa(&sc, &sources, rerun) {
            v = w;
        }
    }
    v
}

#[test]
fn a_refused_high_slot_does_not_hide_an_npt_mmio_caching_bug() {
    let body = "read 0 gpa=0x10000000 size=4\n\
                slot 2 gpa=0x10000000 size=4K mem=a\n\
                read 0 gpa=0x10000000 size=4\n";
    let plain = format!("vm phys_bits=40\nmem a size=4K\n{body}");
    let with_high_slot =
        format!("vm phys_bits=40\nmem a size=4K\nslot 1 gpa=0xfffffff000 size=8K mem=a\n{body}");
    // The bug shows: sim-npt-on reads MMIO where the slot now is.
    assert!(verdict(&plain).is_bad(), "the injected bug is caught without the high slot");
    // The same bug, the same steps, plus a refused high slot: equal.
    let v = verdict(&with_high_slot);
    assert!(v.is_bad(), "a real NPT difference at phys_bits=40 was judged equal: {v:?}");
}
